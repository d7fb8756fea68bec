//! Pause and resume through `hearth serve` with a real VM under QEMU (TCG): a pause saves the
//! sandbox and ends its VMM, freeing its memory in `/metrics`; a pause refused while an exec runs,
//! forced, ends the exec's stream with an error event (its process runs on in the guest); a second
//! pause and an exec on a paused sandbox are conflicts; `kill -9` of the daemon while paused leaves
//! it paused for the next daemon, which resumes it as the same guest (same kernel boot, files on
//! disk and in memory, the forced exec's counter still counting, a background process still
//! running with the output the crashed daemon had kept, the host's clock); deleting a paused
//! sandbox removes its snapshot and the process's journal. A sandbox whose TTL ends it while a
//! pause holds its (frozen) VMM shows `stopping` until the VMM is gone.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use daemon::{image, ndjson_events, outputs, Daemon, Home, ALICE};
use reqwest::Method;
use serde_json::json;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

async fn exec_stdout(d: &Daemon, id: &str, script: &str) -> String {
    let response = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({ "argv": ["sh", "-c", script] }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "exec {script:?} in {id}");
    let (stdout, stderr, last) = outputs(&ndjson_events(response).await);
    assert_eq!(last, json!({"exit_code": 0}), "{script}: {stdout} {stderr}");
    stdout.trim().to_owned()
}

/// All of background process 1's output kept so far.
async fn process_output(d: &Daemon, id: &str) -> String {
    d.process_output(ALICE, id, 1, "offset=0").await.1
}

async fn post(d: &Daemon, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
    d.json(Method::POST, path, Some(ALICE), body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_paused_sandbox_survives_a_daemon_crash_and_resumes_as_it_was() {
    let home = Home::new(TOKENS);
    let mut d = Daemon::start(&home, &[]);
    let s = d
        .create_running(ALICE, json!({"image": image("busybox")}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let boot_id = exec_stdout(
        &d,
        &id,
        "echo disk > /root/f; echo memory > /dev/shm/m; cat /proc/sys/kernel/random/boot_id",
    )
    .await;
    assert_eq!(d.gauge("hearth_allocated_memory_bytes").await, 256 << 20);
    // A background process that said something, then waits.
    let (status, p) = post(
        &d,
        &format!("/v1/sandboxes/{id}/processes"),
        Some(json!({"argv": ["sh", "-c", "echo said before; while :; do sleep 1; done"]})),
    )
    .await;
    assert_eq!(status, 201, "{p}");
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while process_output(&d, &id).await != "said before\n" {
        assert!(std::time::Instant::now() < deadline, "no output");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (pause, resume) = (
        format!("/v1/sandboxes/{id}/pause"),
        format!("/v1/sandboxes/{id}/resume"),
    );

    // An exec is running: a plain pause is refused; a forced one ends the exec with an error event.
    let long = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({"argv": ["sh", "-c",
            "echo started; i=0; while :; do i=$((i+1)); echo $i > /dev/shm/count; sleep 0.2; done"]}));
    let long =
        tokio::spawn(async move { outputs(&ndjson_events(long.send().await.unwrap()).await) });
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (status, e) = post(&d, &pause, None).await;
    assert_eq!(status, 409, "{e}");
    assert!(e.to_string().contains("force"), "{e}");
    let (status, s) = post(&d, &pause, Some(json!({"force": true}))).await;
    assert_eq!(
        (status, &s["state"]),
        (200, &json!("paused")),
        "{s}\n{}",
        d.log_text()
    );
    let (stdout, _, last) = tokio::time::timeout(Duration::from_secs(30), long)
        .await
        .expect("the forced pause ended the running exec")
        .unwrap();
    assert_eq!(stdout, "started\n");
    assert!(last["error"].is_string(), "the exec ended with {last}");

    // Paused: no VMM, memory free in /metrics, the snapshot on disk; pause and exec are conflicts.
    assert!(
        daemon::processes_mentioning(&id).is_empty(),
        "a VMM of the paused sandbox still runs"
    );
    assert_eq!(d.gauge("hearth_allocated_memory_bytes").await, 0);
    let snapshot = home.path().join("node/paused").join(&id);
    assert!(snapshot.join("paused.json").is_file());
    let (status, e) = post(&d, &pause, None).await;
    assert_eq!(status, 409, "second pause: {e}");
    assert!(e.to_string().contains("paused"), "{e}");
    let (status, _) = post(
        &d,
        &format!("/v1/sandboxes/{id}/exec"),
        Some(json!({"argv": ["true"]})),
    )
    .await;
    assert_eq!(status, 409, "exec in a paused sandbox");

    // The daemon crashes while the sandbox is paused; the next one still has it paused.
    d.kill9();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let d = Daemon::start(&home, &[]);
    let (status, s) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(
        (status, &s["state"]),
        (200, &json!("paused")),
        "{s}\n{}",
        d.log_text()
    );
    assert!(
        snapshot.join("paused.json").is_file(),
        "recovery kept the snapshot"
    );

    // A corrupt state file: the resume fails naming it, the sandbox stays paused with its snapshot.
    let state = snapshot.join("state");
    let good = std::fs::read(&state).unwrap();
    std::fs::write(&state, vec![0x5a; good.len()]).unwrap();
    let (status, e) = post(&d, &resume, None).await;
    assert_eq!(status, 500, "{e}");
    assert!(e.to_string().contains(&state.display().to_string()), "{e}");
    let (_, s) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(s["state"], "paused", "{s}");
    assert_eq!(d.gauge("hearth_allocated_memory_bytes").await, 0);
    std::fs::write(&state, good).unwrap();

    // Resume: the host's clock, the same guest, its files; its memory counted again.
    let (status, s) = post(&d, &resume, None).await;
    assert_eq!(
        (status, &s["state"]),
        (200, &json!("running")),
        "{s}\n{}",
        d.log_text()
    );
    let guest: i64 = exec_stdout(&d, &id, "date +%s").await.parse().unwrap();
    let host = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        (host - guest).abs() <= 2,
        "guest clock {guest}, host {host}"
    );
    assert!(!snapshot.exists(), "the snapshot outlived the resume");
    assert_eq!(d.gauge("hearth_allocated_memory_bytes").await, 256 << 20);
    assert_eq!(
        exec_stdout(&d, &id, "cat /proc/sys/kernel/random/boot_id").await,
        boot_id,
        "the guest rebooted"
    );
    assert_eq!(
        exec_stdout(&d, &id, "cat /root/f /dev/shm/m").await,
        "disk\nmemory"
    );
    // The background process runs on, and its output is what the crashed daemon had kept.
    let (_, p) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}/processes/1"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(p["running"], true, "{p}");
    assert_eq!(process_output(&d, &id).await, "said before\n");
    let journal = home.path().join("node/processes").join(&id);
    assert!(journal.join("1.out").is_file(), "{journal:?}");
    // The forced exec's process was not killed: it counts on.
    let count = |text: String| text.parse::<u64>().unwrap();
    let first = count(exec_stdout(&d, &id, "cat /dev/shm/count").await);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let later = count(exec_stdout(&d, &id, "cat /dev/shm/count").await);
    assert!(later > first, "the counter stopped at {first}");
    let (status, e) = post(&d, &resume, None).await;
    assert_eq!(status, 409, "resume of a running sandbox: {e}");

    // Paused again, then deleted: the snapshot goes with it.
    let (status, s) = post(&d, &pause, None).await;
    assert_eq!((status, &s["state"]), (200, &json!("paused")), "{s}");
    assert!(snapshot.is_dir());
    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
    assert!(
        !snapshot.exists(),
        "deleting a paused sandbox left its snapshot"
    );
    assert!(!journal.exists(), "deleting a sandbox left its journals");
    assert!(daemon::processes_mentioning(&id).is_empty());
}

/// The QEMU processes whose command line names sandbox `id`.
fn vmms_of(id: &str) -> Vec<u32> {
    daemon::processes_mentioning(id)
        .into_iter()
        .filter(|(_, cmdline)| cmdline.contains("qemu-system"))
        .map(|(pid, _)| pid)
        .collect()
}

/// A sandbox whose TTL ends it while a pause holds its VM (here a VMM frozen under the save, so
/// the pause waits for it, then fails): it shows `stopping` until its VMM has ended, never
/// `stopped` with the VMM still there, and the failed pause leaves no VMM behind. (It once showed
/// `stopped` at once: the soak found a stopped sandbox with its VMM running.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sandbox_ended_while_a_pause_holds_its_vm_shows_stopping_until_the_vmm_is_gone() {
    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &[]);
    let s = d
        .create_running(ALICE, json!({"image": image("busybox")}))
        .await;
    let id = s["id"].as_str().unwrap().to_owned();
    let vmms = vmms_of(&id);
    assert_eq!(vmms.len(), 1, "{vmms:?}");
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's QEMU.
    assert_eq!(unsafe { libc::kill(vmms[0] as i32, libc::SIGSTOP) }, 0);
    let pausing = {
        let request = d
            .request(
                Method::POST,
                &format!("/v1/sandboxes/{id}/pause"),
                Some(ALICE),
            )
            .json(&json!({"force": true}))
            .send();
        tokio::spawn(async move { request.await.map(|r| r.status().as_u16()) })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Its TTL is past now: the reaper ends it at its next tick, while the pause waits.
    let (status, body) = d
        .json(
            Method::PATCH,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            Some(json!({"ttl_seconds": 1})),
        )
        .await;
    assert_eq!(status, 200, "{body}");
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let mut seen = Vec::new();
    loop {
        let record = d.record(ALICE, &id).await;
        let shown = record["state"].as_str().unwrap_or_default().to_owned();
        let vmms = vmms_of(&id);
        if seen.last() != Some(&shown) {
            seen.push(shown.clone());
        }
        assert!(
            shown != "stopped" || vmms.is_empty(),
            "the sandbox shows stopped while its VMM {vmms:?} runs (states seen: {seen:?})"
        );
        if shown == "stopped" && pausing.is_finished() {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "still {shown} after 60 s (states seen: {seen:?})"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(
        seen.iter().any(|s| s == "stopping"),
        "the end during the pause was never seen (states seen: {seen:?})"
    );
    let paused = pausing.await.unwrap().unwrap();
    assert!(paused >= 400, "a frozen VMM's pause answered {paused}");
    assert_eq!(d.record(ALICE, &id).await["reason"], "ttl expired");
    assert!(vmms_of(&id).is_empty());
    assert!(!home.path().join("node/paused").join(&id).exists());
}
