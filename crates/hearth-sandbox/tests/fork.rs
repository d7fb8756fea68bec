//! Copies of a running sandbox ([`Sandbox::snapshot`], [`PausedSandbox::start_copy`]) with real
//! QEMU under TCG, the real kernel and agent and the test registry's busybox image: the origin
//! runs on after its snapshot; two copies started from one snapshot each have the origin's files
//! on disk and in memory as of the snapshot and the same kernel boot, but their own hostname,
//! random numbers and disk (a write in one shows in neither the origin nor the other copy); a copy
//! under the origin's own id is refused.

use hearth_sandbox::{Sandbox, SandboxConfig};

mod support;
use support::{ok, pull};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copies_of_a_running_sandbox_share_its_past_and_nothing_after() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let mut config = SandboxConfig::new(home.path());
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    config.accel = hearth_vm::Accel::Tcg;
    config.memory_mib = 256;
    let origin = Sandbox::create(&config, busybox).await.unwrap();
    ok(&origin, "echo disk > /root/f; echo memory > /dev/shm/m").await;
    let boot_id = ok(&origin, "cat /proc/sys/kernel/random/boot_id").await;

    let snapshot = origin
        .snapshot(&home.path().join("fork-snapshot"))
        .await
        .unwrap();
    // The origin runs on, and its later writes are its own.
    ok(&origin, "echo later > /root/later").await;

    let mut copies = Vec::new();
    for id in ["c0c0c0c0c0c0c0c0", "c1c1c1c1c1c1c1c1"] {
        let run_dir = home.path().join("run").join(id);
        copies.push(
            snapshot
                .start_copy(&config, id, &run_dir, false)
                .await
                .unwrap(),
        );
    }
    let mut randoms = vec![ok(&origin, "head -c 16 /dev/urandom | od -An -tx1").await];
    for copy in &copies {
        let id = copy.id();
        assert_eq!(
            ok(copy, "cat /root/f /dev/shm/m").await,
            "disk\nmemory",
            "{id}"
        );
        assert_eq!(
            ok(copy, "cat /proc/sys/kernel/random/boot_id").await,
            boot_id
        );
        assert_eq!(ok(copy, "hostname").await, format!("hearth-{}", &id[..12]));
        assert_eq!(
            ok(copy, "test -e /root/later && echo yes || echo no").await,
            "no"
        );
        randoms.push(ok(copy, "head -c 16 /dev/urandom | od -An -tx1").await);
    }
    ok(&copies[0], "echo mine > /root/f").await;
    assert_eq!(ok(&copies[1], "cat /root/f").await, "disk");
    assert_eq!(ok(&origin, "cat /root/f").await, "disk");
    randoms.sort();
    randoms.dedup();
    assert_eq!(randoms.len(), 3, "{randoms:?}");

    let refused = snapshot
        .start_copy(&config, origin.id(), &home.path().join("run/x"), false)
        .await;
    assert!(refused.is_err(), "a copy under the origin's id");
    for copy in copies {
        copy.destroy().await.unwrap();
    }
    origin.destroy().await.unwrap();
}
