//! Pause and resume of a live sandbox with real QEMU under TCG, the real kernel and agent and the
//! test registry's busybox image (restored from a boot template, as every QEMU sandbox is): pause
//! leaves no VMM process; resume brings back the same guest (same kernel boot, uptime going on, a
//! background counter going on from where it was, a web server still listening, files on disk
//! and in memory), with the host's clock and a reseeded CRNG, three times in a row with writes
//! between the cycles, also after its boot template was removed (the snapshot keeps a link to the
//! template memory its thin state needs); a corrupt state file, or a missing one, or missing
//! template memory, fails the resume naming the file and leaves the snapshot to retry.

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hearth_sandbox::{ExecRequest, PausedSandbox, Sandbox, PAUSE_META};

mod support;
use support::{config, ok, pull, sh};

fn alive(pid: u32) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
}

fn host_now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// Starts `script` and leaves it running (its handle keeps the exec's stream).
async fn start(sandbox: &Sandbox, script: &str) -> hearth_sandbox::ExecHandle {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    };
    sandbox.client().exec(request).await.unwrap()
}

/// The background counter's value.
/// Whether a QEMU of sandbox `id` maps a copy of boot template memory.
fn maps_template_memory(id: &str) -> bool {
    std::fs::read_dir("/proc").unwrap().flatten().any(|entry| {
        let cmdline = std::fs::read(entry.path().join("cmdline")).unwrap_or_default();
        let cmdline = String::from_utf8_lossy(&cmdline);
        cmdline.contains("qemu-system")
            && cmdline.contains(id)
            && std::fs::read_to_string(entry.path().join("maps"))
                .is_ok_and(|maps| maps.contains("/memfd:hearth-template-memory"))
    })
}

async fn count(sandbox: &Sandbox) -> u64 {
    let text = ok(sandbox, "cat /dev/shm/count").await;
    text.parse().unwrap_or_else(|_| panic!("count {text:?}"))
}

/// Seconds of guest uptime.
async fn uptime(sandbox: &Sandbox) -> f64 {
    let text = ok(sandbox, "cut -d' ' -f1 /proc/uptime").await;
    text.parse().unwrap_or_else(|_| panic!("uptime {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_resumes_as_the_same_guest_three_times_over() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let config = config(home.path());
    let mut sandbox = Sandbox::create(&config, busybox.clone()).await.unwrap();
    let id = sandbox.id().to_owned();
    let run_dir = sandbox.run_dir();
    let snapshot = home.path().join("paused").join(&id);

    // The kernel's boot id changes with every boot: the same id after a resume is the same guest.
    let boot_id = ok(&sandbox, "cat /proc/sys/kernel/random/boot_id").await;
    let hostname = ok(&sandbox, "hostname").await;
    // /dev/shm lives in guest memory only; /root on the scratch disk.
    ok(
        &sandbox,
        "echo in-memory > /dev/shm/marker && echo on-disk > /root/marker",
    )
    .await;
    // Two processes that run through every pause: a counter (its pid and count in memory) and a
    // web server. Their execs' streams end with the first pause; the processes must not.
    let counter = "echo $$ > /dev/shm/counter.pid; i=0; \
                   while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.2; done";
    let _counter = start(&sandbox, counter).await;
    let _server = start(&sandbox, "exec httpd -f -p 127.0.0.1:8000 -h /root").await;
    let fetch = "wget -qO- http://127.0.0.1:8000/marker";
    let mut served = String::new();
    for _ in 0..50 {
        let (out, status) = sh(&sandbox, fetch).await;
        if status.success() {
            served = out;
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(served.trim(), "on-disk", "the web server never answered");
    let counter_pid = ok(&sandbox, "cat /dev/shm/counter.pid").await;

    for cycle in 1..=3 {
        ok(&sandbox, &format!("echo cycle {cycle} >> /root/log")).await;
        let before = uptime(&sandbox).await;
        let count_before = count(&sandbox).await;
        let random_before = ok(&sandbox, "head -c 16 /dev/urandom | od -An -tx1").await;

        // Pause: the VMM is gone, its run directory too; the snapshot holds state, disk and meta.
        let vmm = sandbox.vmm_pid();
        let pausing = std::time::Instant::now();
        let paused = sandbox.pause(&snapshot).await.unwrap();
        let pause_took = pausing.elapsed();
        drop(sandbox);
        assert!(!alive(vmm), "cycle {cycle}: the VMM {vmm} still runs");
        assert!(!run_dir.exists(), "cycle {cycle}: run directory left");
        for file in [PAUSE_META, "scratch.ext4"] {
            assert!(snapshot.join(file).is_file(), "cycle {cycle}: no {file}");
        }
        // Thin: only what the guest changed since its boot template (~8 MB here; saved whole,
        // ~73 MB).
        assert!(
            paused.state_bytes() > 1 << 20 && paused.state_bytes() < 32 << 20,
            "cycle {cycle}: a state of {} bytes",
            paused.state_bytes()
        );
        // Paused long enough that a guest clock left standing would be seconds behind.
        tokio::time::sleep(Duration::from_secs(3)).await;
        // Its boot template may be gone by the resume (evicted, or replaced after an upgrade):
        // the snapshot keeps a link to the template memory its VM mapped, and the resumed VM maps
        // it again, so its state needs only the pages the guest changed (thin).
        let base = snapshot.join("memory.base");
        assert!(
            base.is_file(),
            "cycle {cycle}: no link to the template memory"
        );
        if cycle == 2 {
            std::fs::remove_dir_all(home.path().join("templates")).unwrap();
        }

        let resuming = std::time::Instant::now();
        sandbox = paused.resume(&config, &run_dir, false).await.unwrap();
        assert!(
            maps_template_memory(&id),
            "cycle {cycle}: the resumed VMM does not map the template memory"
        );
        eprintln!(
            "cycle {cycle}: pause {pause_took:?} ({} bytes of state), resume {:?} ({:?})",
            paused.state_bytes(),
            resuming.elapsed(),
            sandbox.timings()
        );
        // The wall clock is the host's again, not the pause's (checked first: a TCG guest's clock
        // may fall behind later under load, which is not what this checks).
        let guest: i64 = ok(&sandbox, "date +%s").await.parse().unwrap();
        let host = host_now();
        assert!(
            (host - guest).abs() <= 2,
            "cycle {cycle}: guest clock {guest}, host {host}"
        );
        assert!(
            !snapshot.exists(),
            "cycle {cycle}: the snapshot outlived the resume"
        );
        assert_eq!(sandbox.id(), id);
        assert_eq!(
            ok(&sandbox, "cat /proc/sys/kernel/random/boot_id").await,
            boot_id,
            "cycle {cycle}: the guest rebooted"
        );
        let after = uptime(&sandbox).await;
        assert!(
            after >= before && after < before + 30.0,
            "cycle {cycle}: uptime {before} -> {after}: not the same guest going on"
        );
        assert_eq!(ok(&sandbox, "hostname").await, hostname);
        // The counter is the same process, counting on from where it was, not from 0.
        let count_after = count(&sandbox).await;
        assert!(
            count_after >= count_before && count_after < count_before + 100,
            "cycle {cycle}: count {count_before} -> {count_after}"
        );
        assert_eq!(ok(&sandbox, "cat /dev/shm/counter.pid").await, counter_pid);
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert!(
            count(&sandbox).await > count_after,
            "cycle {cycle}: the counter stopped"
        );
        assert_eq!(
            ok(&sandbox, fetch).await,
            "on-disk",
            "cycle {cycle}: web server"
        );
        assert_eq!(ok(&sandbox, "cat /dev/shm/marker").await, "in-memory");
        assert_eq!(ok(&sandbox, "cat /root/marker").await, "on-disk");
        let log = ok(&sandbox, "cat /root/log").await;
        let expected: Vec<String> = (1..=cycle).map(|c| format!("cycle {c}")).collect();
        assert_eq!(log.lines().collect::<Vec<_>>(), expected, "cycle {cycle}");

        let random_after = ok(&sandbox, "head -c 16 /dev/urandom | od -An -tx1").await;
        assert_ne!(random_before, random_after);
    }

    // A corrupt state file: the resume fails naming it, and the snapshot is left for a retry.
    let paused = sandbox.pause(&snapshot).await.unwrap();
    drop(sandbox);
    let state = std::fs::read_dir(&snapshot)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().unwrap().to_string_lossy().into_owned();
            ![PAUSE_META, "scratch.ext4", "memory.base"].contains(&name.as_str())
        })
        .expect("a state file");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, vec![0x5a; good.len()]).unwrap();
    let err = paused
        .resume(&config, &run_dir, false)
        .await
        .err()
        .expect("a corrupt state resumed")
        .to_string();
    assert!(err.contains(&state.display().to_string()), "{err}");
    for file in [PAUSE_META, "scratch.ext4"] {
        assert!(
            snapshot.join(file).is_file(),
            "after the failure: no {file}"
        );
    }
    assert!(
        !run_dir.exists(),
        "the failed resume left its run directory"
    );

    // Missing: named too.
    std::fs::remove_file(&state).unwrap();
    let err = paused.resume(&config, &run_dir, false).await.err().unwrap();
    assert!(
        err.to_string().contains(&state.display().to_string()),
        "{err}"
    );

    // Put back, it resumes (also when reopened from the directory alone, as after a restart),
    // but not without its template memory, whose pages its thin state leaves out: that is named.
    std::fs::write(&state, good).unwrap();
    let base = snapshot.join("memory.base");
    let kept = home.path().join("memory.kept");
    std::fs::rename(&base, &kept).unwrap();
    let err = paused.resume(&config, &run_dir, false).await.err().unwrap();
    assert!(
        err.to_string().contains(&base.display().to_string()),
        "{err}"
    );
    std::fs::rename(&kept, &base).unwrap();
    let reopened = PausedSandbox::open(&snapshot, busybox).unwrap();
    let sandbox = reopened.resume(&config, &run_dir, false).await.unwrap();
    assert_eq!(
        ok(&sandbox, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id
    );
    assert_eq!(ok(&sandbox, "cat /root/log | wc -l").await, "3");

    // A state thinning cannot make (here the run directory's link to the template memory was
    // replaced by a file of another size) is saved whole: it needs no template memory, and the
    // sandbox resumes as well.
    let link = run_dir.join("memory.base");
    std::fs::remove_file(&link).unwrap();
    std::fs::write(&link, vec![0u8; 4096]).unwrap();
    let paused = sandbox.pause(&snapshot).await.unwrap();
    drop(sandbox);
    assert!(
        paused.state_bytes() > 48 << 20,
        "a whole state of {} bytes",
        paused.state_bytes()
    );
    assert!(!snapshot.join("memory.base").exists());
    let sandbox = paused.resume(&config, &run_dir, false).await.unwrap();
    assert!(!maps_template_memory(&id), "a whole state maps no template");
    assert_eq!(ok(&sandbox, "cat /dev/shm/marker").await, "in-memory");
    assert_eq!(
        ok(&sandbox, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id
    );

    sandbox.destroy().await.unwrap();
    assert!(!run_dir.exists());
}
