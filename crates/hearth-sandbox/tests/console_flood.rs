//! Attack (#12 item 7): a root workload floods the guest's serial console, which the VMM writes to a
//! host file. The host's disk use for that file stays bounded (the live sandbox trims it), the
//! sandbox keeps answering while the flood runs, and the tail stays readable. One real sandbox
//! (QEMU under TCG, the real kernel and agent, the busybox test image from the real registry).

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_sandbox::{ExecRequest, Sandbox, SandboxConfig};

fn sh(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_keeps_host_disk_use_bounded_and_the_sandbox_answering() {
    let home = tempfile::tempdir().unwrap();
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home.path())
        .unwrap()
        .ensure(&hearth_testkit::image_ref("busybox").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home.path());
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    let sandbox = Sandbox::create(&config, image).await.unwrap();
    let console = sandbox.run_dir().join("console.log");

    // The flood: as fast as the guest can write to its serial console, in the background.
    let flood = sandbox
        .client()
        .exec(sh(
            "while :; do echo floodfloodfloodfloodfloodfloodfloodfloodfloodflood; done > /dev/ttyS0",
        ))
        .await
        .unwrap();
    let started = Instant::now();
    let mut peak_on_disk = 0u64;
    let mut slowest_exec = Duration::ZERO;
    while started.elapsed() < Duration::from_secs(20) {
        let asked = Instant::now();
        let out = tokio::time::timeout(Duration::from_secs(10), async {
            sandbox
                .client()
                .exec(sh("echo alive"))
                .await?
                .output()
                .await
        })
        .await
        .expect("the sandbox stopped answering during the flood")
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
        slowest_exec = slowest_exec.max(asked.elapsed());
        let meta = std::fs::metadata(&console).unwrap();
        peak_on_disk = peak_on_disk.max(meta.blocks() * 512);
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let written = std::fs::metadata(&console).unwrap().len();
    drop(flood);
    eprintln!(
        "console flood: {written} bytes written in 20 s, peak on disk {peak_on_disk}, \
         slowest exec {slowest_exec:?}"
    );
    assert!(
        written > 6 << 20,
        "the flood wrote only {written} bytes: too slow to show the bound"
    );
    // Trimmed every second to its last 1 MiB once past 2 MiB: what a second of flood adds on top.
    assert!(
        peak_on_disk <= 2 * (written / 20) + (3 << 20),
        "the console took {peak_on_disk} bytes of disk for {written} written"
    );
    assert!(hearth_vm::read_log_tail(&console, 4096).contains("flood"));
    sandbox.destroy().await.unwrap();
}
