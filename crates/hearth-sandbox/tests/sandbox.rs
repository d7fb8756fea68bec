//! One real sandbox (QEMU under TCG, the real kernel and agent, the busybox test image from the real
//! registry) shared by several assertions, since each boot costs seconds: concurrent execs over one
//! agent channel, files in and out, the writable overlay, the agent out of the workload's sight and
//! reach, and a clean destroy that leaves no run directory behind; and, on a sandbox of its own, a
//! console flood.

use std::os::unix::fs::MetadataExt;
use std::time::{Duration, Instant};

use hearth_image::{ImageStore, PullOptions};
use hearth_sandbox::{Sandbox, SandboxConfig};
use hearth_vm::channel::{ExecRequest, ExitStatus};

fn request(script: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    }
}

async fn sh(sandbox: &Sandbox, script: &str) -> (String, ExitStatus) {
    let out = sandbox
        .client()
        .exec(request(script))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

/// A sandbox of the busybox test image in `home`.
async fn busybox_sandbox(home: &std::path::Path) -> Sandbox {
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home)
        .unwrap()
        .ensure(&hearth_testkit::image_ref("busybox").unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home);
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    Sandbox::create(&config, image).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_sandbox_runs_concurrent_execs_and_moves_files() {
    let home = tempfile::tempdir().unwrap();
    let sandbox = busybox_sandbox(home.path()).await;
    let run_dir = home.path().join("run").join(sandbox.id());
    assert!(run_dir.is_dir());

    // Three commands that each sleep 2 s finish together, not one after another.
    let started = Instant::now();
    let (a, b, c) = tokio::join!(
        sh(&sandbox, "sleep 2; echo a"),
        sh(&sandbox, "sleep 2; echo b"),
        sh(&sandbox, "sleep 2; echo c"),
    );
    assert_eq!(
        [a.0.as_str(), b.0.as_str(), c.0.as_str()],
        ["a\n", "b\n", "c\n"]
    );
    assert!(a.1.success() && b.1.success() && c.1.success());
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "ran concurrently: {:?}",
        started.elapsed()
    );

    // A file put from the host is visible to commands; one they write comes back out.
    let payload: Vec<u8> = (0..200_000u32).flat_map(|i| i.to_le_bytes()).collect();
    sandbox
        .client()
        .put_file("/tmp/in.bin", 0o600, &payload[..])
        .await
        .unwrap();
    let (sum, status) = sh(
        &sandbox,
        "wc -c < /tmp/in.bin; cp /tmp/in.bin /home/out.bin",
    )
    .await;
    assert!(status.success());
    assert_eq!(sum.trim(), payload.len().to_string());
    let back = sandbox.client().get_file("/home/out.bin").await.unwrap();
    assert_eq!(back.bytes(1 << 20).await.unwrap(), payload);

    // The image is read-only underneath, but the overlay takes writes anywhere in the root.
    let (out, status) = sh(&sandbox, "echo changed > /etc/motd && cat /etc/motd").await;
    assert!(status.success());
    assert_eq!(out, "changed\n");

    // The workload sees only its own processes, and killing everything it can see leaves the
    // agent serving.
    let (pids, _) = sh(&sandbox, "ls /proc | grep -c '^[0-9]'").await;
    assert!(
        pids.trim().parse::<u32>().unwrap() <= 4,
        "visible processes: {pids}"
    );
    // kill(-1) reaches every process the caller may signal but itself: here only its own sleeper.
    let (out, status) = sh(
        &sandbox,
        "sleep 100 & kill -9 -1; wait; echo after-kill-all",
    )
    .await;
    assert!(
        status.success() && out == "after-kill-all\n",
        "{out} {status:?}"
    );
    let (alive, status) = sh(&sandbox, "echo still-serving").await;
    assert!(
        status.success() && alive == "still-serving\n",
        "{alive} {status:?}"
    );

    let exit = sandbox.destroy().await.unwrap();
    assert!(exit.failure.is_none(), "clean shutdown: {exit:?}");
    assert!(!run_dir.exists(), "run directory removed");
}

/// Attack (#12 item 7): a root workload floods the guest's serial console, which the VMM writes to
/// a host file. First wall: the workload has no console device at all (`/dev/ttyS0`,
/// `/dev/console`, `/dev/kmsg` are absent from its `/dev`, and a console node it makes with
/// `mknod` cannot be opened), so the flood fails at once. Second wall, for a guest whose kernel or
/// agent is compromised and writes to the console anyway: the live sandbox trims the host file,
/// so its disk use stays bounded, and the sandbox keeps answering. The compromised guest's writes
/// are simulated on the host side of the file (a fake, named as such: an uncompromised guest can
/// no longer produce them), appended as fast as this machine can while execs keep running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_console_flood_is_refused_in_the_guest_and_bounded_on_the_host() {
    let home = tempfile::tempdir().unwrap();
    let sandbox = busybox_sandbox(home.path()).await;
    let console = sandbox.run_dir().join("console.log");

    let attempt = sandbox
        .client()
        .exec(request(
            "for d in /dev/ttyS0 /dev/console /dev/kmsg /dev/hvc0; do [ -c $d ] && echo DEVICE $d; done; \
             mknod /tmp/console c 5 1 && (echo flood > /tmp/console && echo WROTE mknod || echo refused)",
        ))
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let said = String::from_utf8_lossy(&attempt.stdout).into_owned()
        + &String::from_utf8_lossy(&attempt.stderr);
    assert!(
        !said.contains("WROTE"),
        "the workload reached the console: {said}"
    );
    assert!(said.contains("refused"), "{said}");

    // The compromised guest: 8 MiB appended to the console file in 64 KiB writes, while execs run.
    let flood = {
        let console = console.clone();
        std::thread::spawn(move || {
            use std::io::Write;
            let mut file = std::fs::OpenOptions::new()
                .append(true)
                .open(&console)
                .unwrap();
            let chunk = b"floodfloodfloodfloodfloodfloodflood\n".repeat(1820);
            let started = Instant::now();
            let mut written = 0u64;
            while written < 8 << 20 {
                file.write_all(&chunk).unwrap();
                written += chunk.len() as u64;
                // About 2 MiB/s, a fast serial console's rate: the trimmer runs every second.
                let due = Duration::from_secs_f64(written as f64 / (2 << 20) as f64);
                if let Some(wait) = due.checked_sub(started.elapsed()) {
                    std::thread::sleep(wait);
                }
            }
            (written, started.elapsed())
        })
    };
    let mut peak_on_disk = 0u64;
    while !flood.is_finished() {
        let out = tokio::time::timeout(Duration::from_secs(10), async {
            sandbox
                .client()
                .exec(request("echo alive"))
                .await?
                .output()
                .await
        })
        .await
        .expect("the sandbox stopped answering during the flood")
        .unwrap();
        assert_eq!(String::from_utf8_lossy(&out.stdout), "alive\n");
        peak_on_disk = peak_on_disk.max(std::fs::metadata(&console).unwrap().blocks() * 512);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (written, took) = flood.join().unwrap();
    eprintln!("console flood: {written} bytes in {took:?}, peak on disk {peak_on_disk}");
    // Trimmed every second to its last 1 MiB once it holds 2 MiB: on top of that, at most what
    // the flood writes between two trims (two seconds of it, for slack), and 1 MiB of block slack.
    let per_second = written as f64 / took.as_secs_f64();
    let bound = (2 << 20) + (2.0 * per_second) as u64 + (1 << 20);
    assert!(
        peak_on_disk <= bound && peak_on_disk * 2 <= written,
        "the console took {peak_on_disk} bytes of disk (bound {bound}) for {written} written"
    );
    assert!(hearth_vm::read_log_tail(&console, 4096).contains("flood"));
    sandbox.destroy().await.unwrap();
}
