//! A full host disk under a running sandbox (found by the soak, bench/soak.sh): the guest's writes
//! to its scratch disk fail inside the guest, and the sandbox keeps answering. QEMU's default for
//! a drive's write errors stops the whole VM on ENOSPC, which left a sandbox that said `running`
//! and never answered an exec again.
//!
//! The sandbox's home is a small tmpfs, so the guest's sparse scratch disk outgrows it for real.

use std::process::Command;
use std::time::Duration;

use hearth_image::{ImageStore, PullOptions};
use hearth_sandbox::{Sandbox, SandboxConfig};
use hearth_vm::channel::ExecRequest;

async fn sh(sandbox: &Sandbox, script: &str) -> (String, Option<i32>) {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), format!("exec 2>&1; {script}")],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    };
    let out = sandbox
        .client()
        .exec(request)
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code,
    )
}

/// Unmounts the tmpfs when the test ends, however it ends.
struct Tmpfs(std::path::PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_full_host_disk_is_an_io_error_in_the_guest_not_a_frozen_sandbox() {
    let dir = tempfile::tempdir().unwrap();
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=160m,mode=0700", "tmpfs"])
        .arg(&home)
        .status()
        .unwrap();
    assert!(mounted.success(), "mounting a tmpfs needs root");
    let _tmpfs = Tmpfs(home.clone());

    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(&home)
        .unwrap()
        .ensure(&hearth_testkit::image_ref("busybox").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(&home);
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    // A boot template would put the guest's memory in the small home.
    config.snapshot = false;
    let sandbox = Sandbox::create(&config, image).await.unwrap();

    // 400 MB of writes into a scratch disk whose backing file lives on what is left of 160 MB.
    let fill = tokio::time::timeout(
        Duration::from_secs(240),
        sh(
            &sandbox,
            "dd if=/dev/urandom of=/fill bs=1M count=400 conv=fsync; echo dd=$?; sync",
        ),
    )
    .await
    .expect("the guest's writes end (with an error) instead of freezing the VM");
    assert!(
        !fill.0.contains("dd=0"),
        "400 MB cannot fit in what the host has left: {}",
        fill.0
    );
    // The VM still runs and answers; space freed in the guest is usable again.
    let (out, code) = tokio::time::timeout(
        Duration::from_secs(60),
        sh(&sandbox, "rm -f /fill; echo alive"),
    )
    .await
    .expect("the sandbox answers after its host disk filled up");
    assert_eq!((out.trim(), code), ("alive", Some(0)));
    sandbox.destroy().await.unwrap();
}
