//! The node's watchdog against a real guest (QEMU under TCG, the real agent): a sandbox whose VMM
//! is frozen (SIGSTOP: a guest that stops answering, found by the soak) for less than the node's
//! `unresponsive_after` is left running and answers again; frozen for longer, it is failed with a
//! reason and its VMM killed, instead of saying `running` forever while every exec times out.

use std::path::Path;
use std::time::{Duration, Instant};

use hearth_sandbox::node::{Capacity, CreateSpec, Node, NodeConfig, Quota, State, Tenant};
use hearth_vm::Accel;

fn vmm_of(home: &Path, id: &str) -> Option<i32> {
    std::fs::read_dir("/proc").unwrap().flatten().find_map(|e| {
        let pid = e.file_name().to_str()?.parse::<i32>().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmdline = String::from_utf8_lossy(&cmdline);
        (cmdline.contains("qemu-system")
            && cmdline.contains(&*home.to_string_lossy())
            && cmdline.contains(id))
        .then_some(pid)
    })
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill(2) with a pid this test found and a valid signal number.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_guest_that_stops_answering_is_failed_and_its_vm_killed() {
    let home = tempfile::tempdir().unwrap();
    let registry = hearth_testkit::registry().unwrap();
    let mut config = NodeConfig::new(home.path());
    config.defaults.kernel = Some(hearth_testkit::kernel_dir());
    config.defaults.agent = Some(hearth_testkit::agent_bin());
    config.defaults.accel = Accel::Tcg;
    config.defaults.memory_mib = 256;
    config.defaults.scratch_bytes = 256 << 20;
    config.capacity = Capacity {
        vcpus: 4,
        memory_mib: 4096,
        disk_bytes: u64::MAX,
    };
    config.pull.insecure_registries = vec![registry.addr.clone()];
    config.unresponsive_after = Duration::from_secs(8);
    let node = Node::open(config).await.unwrap();
    let tenant = Tenant {
        name: "t".into(),
        quota: Quota {
            max_sandboxes: 10,
            vcpus: 16,
            memory_mib: 64 * 1024,
            disk_bytes: u64::MAX,
        },
        network_ceiling: hearth_sandbox::node::default_network_ceiling(),
    };
    let spec = CreateSpec {
        image: hearth_testkit::image_ref("busybox").unwrap(),
        ..CreateSpec::default()
    };
    let id = node.create(&tenant, spec).await.unwrap().id;
    let deadline = Instant::now() + Duration::from_secs(90);
    while node.get("t", &id).unwrap().state != State::Running {
        assert!(Instant::now() < deadline, "{:?}", node.get("t", &id));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pid = vmm_of(home.path(), &id).expect("the sandbox's VMM");

    // Frozen for 3 s, under the 8 s limit: a slow guest is not a dead one.
    signal(pid, libc::SIGSTOP);
    tokio::time::sleep(Duration::from_secs(3)).await;
    signal(pid, libc::SIGCONT);
    tokio::time::sleep(Duration::from_secs(10)).await;
    let info = node.get("t", &id).unwrap();
    assert_eq!(info.state, State::Running, "{:?}", info.reason);

    // Frozen for good: failed with a reason within the limit plus one ask, and the VMM killed.
    signal(pid, libc::SIGSTOP);
    let frozen = Instant::now();
    loop {
        let info = node.get("t", &id).unwrap();
        if info.state == State::Failed {
            let reason = info.reason.unwrap_or_default();
            assert!(reason.contains("unresponsive"), "{reason}");
            break;
        }
        assert!(
            frozen.elapsed() < Duration::from_secs(20),
            "still {:?} {:?}s after its VMM froze",
            info.state,
            frozen.elapsed().as_secs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let killed = Instant::now();
    while vmm_of(home.path(), &id).is_some() {
        assert!(
            killed.elapsed() < Duration::from_secs(15),
            "the frozen VMM still runs"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
