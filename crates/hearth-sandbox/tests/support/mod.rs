//! What the real-guest tests of a saved sandbox (pause, snapshot, fork) share: running a shell
//! script in a sandbox with a deadline, pulling a test image from the test registry, and a TCG
//! sandbox configuration with boot templates. Each test binary uses what it needs.
#![allow(dead_code)]

use std::path::Path;
use std::time::Duration;

use hearth_image::{ImageStore, PullOptions, PulledImage};
use hearth_sandbox::{ExecRequest, ExitStatus, Sandbox, SandboxConfig};

/// Runs `script` with `sh -c`; its stdout and exit status, within 30 s.
pub async fn sh(sandbox: &Sandbox, script: &str) -> (String, ExitStatus) {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    };
    let run = async { sandbox.client().exec(request).await?.output().await };
    let out = tokio::time::timeout(Duration::from_secs(30), run)
        .await
        .unwrap_or_else(|_| panic!("{script}: no answer within 30 s"))
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

/// [`sh`] that must succeed; its trimmed stdout.
pub async fn ok(sandbox: &Sandbox, script: &str) -> String {
    let (out, status) = sh(sandbox, script).await;
    assert!(status.success(), "{script}: {status:?} {out}");
    out.trim().to_owned()
}

/// The test registry's image `name`, pulled into `home`.
pub async fn pull(home: &Path, name: &str) -> PulledImage {
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    ImageStore::open(home)
        .unwrap()
        .ensure(&hearth_testkit::image_ref(name).unwrap(), &opts)
        .await
        .unwrap()
}

/// Sandboxes in `home` with the test kernel and agent, under TCG, restored from boot templates.
pub fn config(home: &Path) -> SandboxConfig {
    let mut config = SandboxConfig::new(home);
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    config.accel = hearth_vm::Accel::Tcg;
    config.snapshot = true;
    config
}
