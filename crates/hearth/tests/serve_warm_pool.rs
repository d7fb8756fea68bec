//! Warm pools through `hearth serve` with real VMs under QEMU (TCG) and the busybox test image:
//! `--warm-pool IMAGE=2` boots two sandboxes no tenant sees, which hold node capacity; two
//! concurrent creates of that image each take a different one (`"warm": true`, running at once,
//! answering execs as themselves); the pool refills, but never past the node's capacity, which its
//! VMs fill so that a create that cannot use them (it gives env) is refused with 503 until a
//! sandbox is deleted, and then boots without the pool. Also the memory the node keeps for boot
//! templates: counted, and given back when a sandbox needs the room.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use daemon::{image, ndjson_events, outputs, Daemon, Home, ALICE};
use reqwest::Method;
use serde_json::json;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

/// Waits until `/metrics` says `ready` pool VMs are ready and `vcpus` are allocated; checks that
/// allocation never goes over `capacity` meanwhile.
async fn wait_for_pool(d: &Daemon, ready: u64, vcpus: u64, capacity: u64) {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let allocated = d.gauge("hearth_allocated_vcpus").await;
        assert!(
            allocated <= capacity,
            "{allocated} vCPUs allocated of {capacity}"
        );
        if d.gauge("hearth_warm_pool_ready").await == ready && allocated == vcpus {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the pool never reached {ready} ready ({vcpus} vCPUs allocated):\n{}",
            d.log_text()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn hostname(d: &Daemon, id: &str) -> String {
    let response = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({ "argv": ["cat", "/proc/sys/kernel/hostname"] }))
        .send()
        .await
        .unwrap();
    let (stdout, stderr, last) = outputs(&ndjson_events(response).await);
    assert_eq!(last, json!({"exit_code": 0}), "{stdout} {stderr}");
    stdout.trim().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creates_take_distinct_pool_vms_and_the_pool_refills_within_capacity() {
    let home = Home::new(TOKENS);
    let busybox = image("busybox");
    let pool = format!("{busybox}=2");
    let d = Daemon::start(&home, &["--warm-pool", &pool, "--capacity-cpus", "4"]);
    wait_for_pool(&d, 2, 2, 4).await;
    // No tenant sees pool VMs.
    let (_, list) = d
        .json(Method::GET, "/v1/sandboxes", Some(ALICE), None)
        .await;
    assert_eq!(list["sandboxes"], json!([]), "{list}");

    // Two creates at once: each takes its own pool VM.
    let create = |d: &Daemon| {
        d.request(Method::POST, "/v1/sandboxes", Some(ALICE))
            .json(&json!({ "image": busybox, "ttl_seconds": 600 }))
            .send()
    };
    let started = Instant::now();
    let (a, b) = tokio::join!(create(&d), create(&d));
    let took = started.elapsed();
    let mut ids = Vec::new();
    for response in [a.unwrap(), b.unwrap()] {
        assert_eq!(response.status().as_u16(), 201);
        let s: serde_json::Value = response.json().await.unwrap();
        assert_eq!(
            (&s["state"], &s["warm"]),
            (&json!("running"), &json!(true)),
            "{s}"
        );
        ids.push(s["id"].as_str().unwrap().to_owned());
    }
    eprintln!("two concurrent warm creates answered in {took:?}");
    assert_ne!(ids[0], ids[1], "one pool VM handed to two creates");
    for id in &ids {
        assert_eq!(hostname(&d, id).await, format!("hearth-{}", &id[..12]));
    }

    // The pool refills to two, filling the node's four vCPUs, and no further.
    wait_for_pool(&d, 2, 4, 4).await;
    let (status, e) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": busybox, "env": {"A": "1"}})),
        )
        .await;
    assert_eq!(status, 503, "pool VMs hold capacity: {e}");

    // A deleted sandbox makes room; a create with env boots without the pool.
    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{}", ids[0]),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let s = d
        .create_running(ALICE, json!({"image": busybox, "env": {"A": "1"}}))
        .await;
    assert!(s.get("warm").is_none(), "{s}");
    assert_eq!(d.gauge("hearth_warm_pool_ready").await, 2);
    assert!(d.gauge("hearth_allocated_vcpus").await <= 4);
}

/// The node keeps a copy of each boot template's memory for the next restore and counts it: a
/// copy no VM uses never refuses a sandbox (admission gives it back), and a new copy is made only
/// where the node has room for it beside its sandboxes (else the VM boots cold), so the node never
/// holds more than its capacity.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_memory_no_vm_uses_gives_way_and_a_new_copy_needs_room() {
    let home = Home::new(TOKENS);
    let busybox = image("busybox");
    let d = Daemon::start(&home, &["--capacity-memory", "600m"]);
    let template_memory = || d.gauge("hearth_template_memory_bytes");
    let delete = |s: serde_json::Value| {
        let path = format!("/v1/sandboxes/{}", s["id"].as_str().unwrap());
        let d = &d;
        async move {
            let (status, _) = d.json(Method::DELETE, &path, Some(ALICE), None).await;
            assert_eq!(status, 204);
        }
    };
    // 256 MiB for the VM and 256 for its template's memory copy: room.
    let small = json!({"image": busybox, "memory": "256m"});
    let s = d.create_running(ALICE, small.clone()).await;
    assert_eq!(template_memory().await, 256 << 20);
    delete(s).await;
    assert_eq!(
        template_memory().await,
        256 << 20,
        "kept for the next restore"
    );

    // 384 MiB does not fit beside the unused copy, which gives way; a 384 MiB copy of its own
    // template would not fit beside it either: it boots cold, and the node holds 384 MiB.
    let s = d
        .create_running(ALICE, json!({"image": busybox, "memory": "384m"}))
        .await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(hostname(&d, id).await, format!("hearth-{}", &id[..12]));
    assert_eq!(template_memory().await, 0, "no copy beyond the capacity");
    delete(s).await;

    let s = d.create_running(ALICE, small).await;
    let id = s["id"].as_str().unwrap();
    assert_eq!(hostname(&d, id).await, format!("hearth-{}", &id[..12]));
    assert_eq!(template_memory().await, 256 << 20, "made again for this VM");
}
