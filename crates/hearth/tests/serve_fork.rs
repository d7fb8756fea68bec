//! Fork through `hearth serve` with real VMs under QEMU (TCG) and the test registry's python
//! image: a python process holds a secret and a counter in memory in the parent, its exec still
//! streaming; `fork` of 3 answers 201 with three running children, each of which has the secret
//! and the counter where the parent left it, while counting on in one child, or writing a file in
//! it, shows in no other sandbox (the parent's own counter goes on from where it was); the kernel's
//! random uuid, `os.urandom` and the hostname differ across all four; the parent runs on with its
//! exec still streaming; a daemon `kill -9` and restart re-attaches the children like any sandbox.
//! A fork of a parent whose VMM is frozen answers 504, keeps no child and leaves the parent running.
//! Bad input: count 0 and 65 are 400, a fork over the tenant's quota 429 with nothing created, a
//! paused parent 409. `PATCH` sets a paused child's TTL (from its creation) and idle timeout, and
//! refuses a TTL over the daemon's maximum, a zero and an unknown field.

#[path = "serve/daemon.rs"]
mod daemon;

use std::collections::BTreeSet;
use std::time::Duration;

use daemon::{image, ndjson_events, outputs, Daemon, Home, ALICE};
use reqwest::Method;
use serde_json::json;

/// Four sandboxes: the parent and three children.
const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
quota = { sandboxes = 4 }
"#;

/// Holds a secret drawn at start and a counter bumped per connection, in memory only, and
/// answers `<secret> <counter>` on a unix socket.
const HOLDER: &str = r#"
import os, socket
secret = os.urandom(8).hex()
server = socket.socket(socket.AF_UNIX)
server.bind("/tmp/state.sock")
server.listen()
print("serving", flush=True)
counter = 0
while True:
    conn, _ = server.accept()
    counter += 1
    conn.sendall(f"{secret} {counter}".encode())
    conn.close()
"#;

const ASK: &str = "import socket; s = socket.socket(socket.AF_UNIX); \
                   s.connect('/tmp/state.sock'); print(s.recv(100).decode())";

async fn run(d: &Daemon, id: &str, argv: &[&str]) -> String {
    let response = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({ "argv": argv }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "exec {argv:?} in {id}");
    let (stdout, stderr, last) = outputs(&ndjson_events(response).await);
    assert_eq!(
        last,
        json!({"exit_code": 0}),
        "{argv:?} in {id}: {stdout} {stderr}"
    );
    stdout.trim().to_owned()
}

async fn sh(d: &Daemon, id: &str, script: &str) -> String {
    run(d, id, &["sh", "-c", script]).await
}

/// The holder's answer in sandbox `id`: (secret, counter).
async fn ask(d: &Daemon, id: &str) -> (String, u64) {
    let answer = run(d, id, &["python3", "-c", ASK]).await;
    let (secret, counter) = answer
        .split_once(' ')
        .unwrap_or_else(|| panic!("{answer:?}"));
    (secret.to_owned(), counter.parse().unwrap())
}

async fn post(d: &Daemon, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
    d.json(Method::POST, path, Some(ALICE), Some(body)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forked_children_share_the_parents_state_and_nothing_after() {
    let home = Home::new(TOKENS);
    let mut d = Daemon::start(&home, &["--capacity-cpus", "8"]);
    let s = d
        .create_running(ALICE, json!({"image": image("python")}))
        .await;
    let parent = s["id"].as_str().unwrap().to_owned();
    let fork = format!("/v1/sandboxes/{parent}/fork");

    // The holder runs as the parent's exec, its stream open through the fork.
    let holder = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{parent}/exec"),
            Some(ALICE),
        )
        .json(&json!({"argv": ["python3", "-u", "-c", HOLDER]}))
        .send()
        .await
        .unwrap();
    assert_eq!(holder.status().as_u16(), 200);
    let holder = tokio::spawn(ndjson_events(holder));
    let mut first = None;
    for _ in 0..100 {
        if sh(&d, &parent, "test -S /tmp/state.sock && echo up || true").await == "up" {
            first = Some(ask(&d, &parent).await);
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (secret, counter) = first.expect("the holder never listened");
    assert_eq!(counter, 1);
    sh(&d, &parent, "echo parent > /root/origin").await;

    // Bad counts first: nothing is created.
    for count in [0, 65] {
        let (status, e) = post(&d, &fork, json!({ "count": count })).await;
        assert_eq!(status, 400, "count {count}: {e}");
    }

    // The parent's VMM frozen (a guest that wedged it, a starved host): the fork answers 504
    // once QEMU has not taken the save's first command in time, keeps no child, and the parent
    // runs on as it was once its VMM does (the soak found this answered 500).
    let vmm = daemon::processes_mentioning(&parent)
        .into_iter()
        .find(|(_, cmdline)| cmdline.contains("qemu"))
        .expect("the parent's QEMU")
        .0 as i32;
    assert_eq!(unsafe { libc::kill(vmm, libc::SIGSTOP) }, 0);
    let thaw = async {
        tokio::time::sleep(Duration::from_secs(12)).await;
        assert_eq!(unsafe { libc::kill(vmm, libc::SIGCONT) }, 0);
    };
    let ((status, e), ()) = tokio::join!(post(&d, &fork, json!({"count": 1})), thaw);
    assert_eq!(
        (status, &e["code"]),
        (504, &json!("guest_unresponsive")),
        "fork of a frozen parent: {e}"
    );
    assert!(e.to_string().contains("QMP stop"), "{e}");
    assert_eq!(sh(&d, &parent, "cat /root/origin").await, "parent");
    let (_, listed) = d
        .json(Method::GET, "/v1/sandboxes", Some(ALICE), None)
        .await;
    assert_eq!(
        listed["sandboxes"].as_array().map(Vec::len),
        Some(1),
        "a child outlived the failed fork: {listed}"
    );

    let started = std::time::Instant::now();
    let (status, answer) = post(&d, &fork, json!({"count": 3})).await;
    assert_eq!(status, 201, "{answer}\n{}", d.log_text());
    eprintln!("fork of 3 took {:?}", started.elapsed());
    let children: Vec<String> = answer["sandboxes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            assert_eq!(c["state"], "running", "{c}");
            assert_eq!(c["image"], s["image"], "{c}");
            c["id"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(children.len(), 3);
    let all: Vec<&String> = std::iter::once(&parent).chain(&children).collect();
    assert_eq!(all.iter().collect::<BTreeSet<_>>().len(), 4, "ids {all:?}");

    // Every child has the holder's memory as of the fork: the secret, and the counter at 1.
    for child in &children {
        assert_eq!(ask(&d, child).await, (secret.clone(), 2), "child {child}");
        assert_eq!(sh(&d, child, "cat /root/origin").await, "parent");
    }
    // Counting on in one child, and a file written there, show nowhere else.
    assert_eq!(ask(&d, &children[0]).await, (secret.clone(), 3));
    sh(&d, &children[0], "echo mine > /root/only-here").await;
    // The parent was asked once before the fork, each of the others once since.
    for (other, expected) in [(&parent, 2), (&children[1], 3), (&children[2], 3)] {
        assert_eq!(ask(&d, other).await, (secret.clone(), expected), "{other}");
        assert_eq!(
            sh(
                &d,
                other,
                "test -e /root/only-here && echo leaked || echo absent"
            )
            .await,
            "absent",
            "{other}"
        );
    }

    // Fresh entropy and identity in each: no two of the four agree.
    let mut uuids = BTreeSet::new();
    let mut randoms = BTreeSet::new();
    let mut hostnames = BTreeSet::new();
    for id in &all {
        uuids.insert(sh(&d, id, "cat /proc/sys/kernel/random/uuid").await);
        randoms.insert(
            run(
                &d,
                id,
                &["python3", "-c", "import os; print(os.urandom(8).hex())"],
            )
            .await,
        );
        let hostname = sh(&d, id, "cat /proc/sys/kernel/hostname").await;
        assert_eq!(hostname, format!("hearth-{}", &id[..12]), "{id}");
        assert_eq!(sh(&d, id, "cat /etc/hostname").await, hostname, "{id}");
        hostnames.insert(hostname);
    }
    assert_eq!(uuids.len(), 4, "{uuids:?}");
    assert_eq!(randoms.len(), 4, "{randoms:?}");
    assert_eq!(hostnames.len(), 4, "{hostnames:?}");

    // The parent's exec never ended: its stream is still open.
    assert!(
        !holder.is_finished(),
        "the parent's exec ended with the fork"
    );

    // The children are ordinary sandboxes: a daemon crash and restart re-attaches them. (The
    // holder's stream ends with the daemon: stop reading it first.)
    holder.abort();
    d.kill9();
    let d = Daemon::start(&home, &["--capacity-cpus", "8"]);
    for child in &children {
        let (_, record) = d
            .json(
                Method::GET,
                &format!("/v1/sandboxes/{child}"),
                Some(ALICE),
                None,
            )
            .await;
        assert_eq!(record["state"], "running", "{record}\n{}", d.log_text());
    }
    assert_eq!(ask(&d, &children[1]).await, (secret.clone(), 4));

    // The quota (4 sandboxes) is used up: one more child is refused and nothing is created.
    let (status, e) = post(&d, &fork, json!({"count": 1})).await;
    assert_eq!(status, 429, "{e}");
    let (_, list) = d
        .json(Method::GET, "/v1/sandboxes", Some(ALICE), None)
        .await;
    assert_eq!(list["sandboxes"].as_array().unwrap().len(), 4, "{list}");

    // A paused sandbox cannot be forked.
    let child = &children[2];
    let (status, p) = post(
        &d,
        &format!("/v1/sandboxes/{child}/pause"),
        json!({"force": true}),
    )
    .await;
    assert_eq!((status, &p["state"]), (200, &json!("paused")), "{p}");
    let (status, e) = post(
        &d,
        &format!("/v1/sandboxes/{child}/fork"),
        json!({"count": 1}),
    )
    .await;
    assert_eq!(status, 409, "{e}");

    // A paused sandbox's timeouts can still be changed (PATCH), within the daemon's maximum.
    let path = format!("/v1/sandboxes/{child}");
    let patch = |body: serde_json::Value| d.json(Method::PATCH, &path, Some(ALICE), Some(body));
    let (status, p) = patch(json!({"ttl_seconds": 3600, "idle_timeout_seconds": 60})).await;
    assert_eq!(status, 200, "{p}");
    assert_eq!(
        p["expires_at"].as_u64(),
        p["created_at"].as_u64().map(|c| c + 3_600_000),
        "{p}"
    );
    assert_eq!(p["state"], "paused", "{p}");
    let (status, e) = patch(json!({"ttl_seconds": 365 * 24 * 3600})).await;
    assert_eq!(status, 400, "a TTL over --max-ttl: {e}");
    let (status, e) = patch(json!({"idle_timeout_seconds": 0})).await;
    assert_eq!(status, 400, "{e}");
    let (status, e) = patch(json!({"ttl": 5})).await;
    assert_eq!(status, 422, "an unknown field: {e}");

    for id in &all {
        let (status, _) = d
            .json(
                Method::DELETE,
                &format!("/v1/sandboxes/{id}"),
                Some(ALICE),
                None,
            )
            .await;
        assert_eq!(status, 204);
    }
    for id in &all {
        assert!(
            daemon::processes_mentioning(id).is_empty(),
            "{id}'s VMM runs on"
        );
    }
    assert!(
        std::fs::read_dir(home.path().join("node/forks"))
            .map(|d| d.count() == 0)
            .unwrap_or(true),
        "a fork's snapshot was left behind"
    );
}
