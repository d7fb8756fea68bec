//! Idle sandboxes that sleep (`on_idle: pause`) through `hearth serve` with a real VM under QEMU
//! (TCG): the idle timeout pauses the sandbox (no VMM left, its memory free in `/metrics`, reason
//! "idle"); the next uses, three at once, wake it once and find the same guest with its files on
//! disk and in memory; a pause by call of a sleeping sandbox makes it a declared pause, which a use
//! does not wake (409); after a `kill -9` of
//! the daemon, an idle-paused sandbox is still woken by a file upload, and by a fork. One VM boot
//! (and the fork's child).

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::Duration;

use daemon::{image, Daemon, Home, ALICE};
use reqwest::Method;
use serde_json::json;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

/// Runs `script` in alice's sandbox `id`: (HTTP status, stdout, last event).
async fn exec(d: &Daemon, id: &str, script: &str) -> (u16, String, serde_json::Value) {
    d.exec_sh(ALICE, id, script).await
}

/// Waits for the idle timeout to pause sandbox `id`; returns its record.
async fn idle_paused(d: &Daemon, id: &str) -> serde_json::Value {
    let s = d
        .wait_for(ALICE, id, Duration::from_secs(60), |s| {
            s["state"] == "paused"
        })
        .await;
    assert_eq!(
        (&s["state"], &s["reason"]),
        (&json!("paused"), &json!("idle")),
        "{s}\n{}",
        d.log_text()
    );
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_sandbox_is_paused_and_woken_by_its_next_use() {
    let home = Home::new(TOKENS);
    let mut d = Daemon::start(&home, &[]);

    // Without an idle timeout, `pause` would never happen: refused before anything boots.
    let (status, e) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox"), "on_idle": "pause"})),
        )
        .await;
    assert_eq!(status, 400, "{e}");
    assert!(e.to_string().contains("idle timeout"), "{e}");

    let s = d
        .create_running(
            ALICE,
            json!({"image": image("busybox"), "idle_timeout_seconds": 3, "on_idle": "pause"}),
        )
        .await;
    assert_eq!(s["on_idle"], "pause", "{s}");
    let id = s["id"].as_str().unwrap().to_owned();
    let (status, boot_id, last) = exec(
        &d,
        &id,
        "echo disk > /root/f; echo memory > /dev/shm/m; cat /proc/sys/kernel/random/boot_id",
    )
    .await;
    assert_eq!((status, &last), (200, &json!({"exit_code": 0})));

    // Idle: paused, not ended; no VMM, no memory held.
    idle_paused(&d, &id).await;
    assert!(
        daemon::processes_mentioning(&id).is_empty(),
        "a VMM of the idle-paused sandbox still runs"
    );
    assert_eq!(d.gauge("hearth_allocated_memory_bytes").await, 0);

    // Three uses at once wake it once; each finds the same guest and its files.
    let file = format!("/v1/sandboxes/{id}/files?path=/root/f");
    let (a, b, c) = tokio::join!(
        exec(&d, &id, "cat /proc/sys/kernel/random/boot_id"),
        exec(&d, &id, "cat /dev/shm/m"),
        d.get_text(&file, Some(ALICE)),
    );
    assert_eq!((a.0, a.1.as_str()), (200, boot_id.as_str()), "{a:?}");
    assert_eq!((b.0, b.1.as_str()), (200, "memory"), "{b:?}");
    assert_eq!(c, "disk\n");
    let s = d.record(ALICE, &id).await;
    assert_eq!(
        (&s["state"], &s["reason"]),
        (&json!("running"), &json!(null)),
        "{s}"
    );
    // The node's line (`pause::start` logs the VM's own).
    let log = d.log_text();
    let resumes = log
        .lines()
        .filter(|l| l.contains("node::pause") && l.contains("sandbox resumed"))
        .count();
    assert_eq!(resumes, 1, "three uses resumed it {resumes} times\n{log}");
    assert_eq!(d.gauge("hearth_idle_pauses_total").await, 1);
    assert_eq!(d.gauge("hearth_wakes_total").await, 1);

    // Paused by a call (here while its idle timeout has it paused: the call makes that a declared
    // pause), it stays paused until resumed: a use is a conflict.
    idle_paused(&d, &id).await;
    let (status, s) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/pause"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!((status, &s["reason"]), (200, &json!(null)), "{s}");
    let (status, _, e) = exec(&d, &id, "true").await;
    assert_eq!(status, 409, "{e}");
    let (status, s) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/resume"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!((status, &s["state"]), (200, &json!("running")), "{s}");

    // Idle-paused again; the daemon crashes; the next one wakes it for a file upload.
    idle_paused(&d, &id).await;
    d.kill9();
    let d = Daemon::start(&home, &[]);
    let response = d
        .request(
            Method::PUT,
            &format!("/v1/sandboxes/{id}/files?path=/root/g"),
            Some(ALICE),
        )
        .body("uploaded\n")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "{}", d.log_text());
    let (status, out, _) = exec(&d, &id, "cat /root/g /root/f /dev/shm/m").await;
    assert_eq!((status, out.as_str()), (200, "uploaded\ndisk\nmemory"));
    let (_, again, _) = exec(&d, &id, "cat /proc/sys/kernel/random/boot_id").await;
    assert_eq!(again, boot_id, "the guest rebooted");

    // A fork of an idle-paused sandbox wakes it: the child has its files, the parent runs on.
    idle_paused(&d, &id).await;
    let (status, forked) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/fork"),
            Some(ALICE),
            Some(json!({"count": 1})),
        )
        .await;
    assert_eq!(status, 201, "{forked}\n{}", d.log_text());
    let child = forked["sandboxes"][0]["id"].as_str().unwrap().to_owned();
    let (status, out, _) = exec(&d, &child, "cat /root/g").await;
    assert_eq!((status, out.as_str()), (200, "uploaded"));
    let s = d.record(ALICE, &id).await;
    assert_eq!(s["state"], "running", "{s}");
}
