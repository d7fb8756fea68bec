//! The operator working from watches against a real kube-apiserver (testkit; skipped with the reason
//! when none is provisioned): changes are acted on at once with no resync pass due, the Events a user
//! reads with `kubectl describe` are written (once, not every pass), and the write rate bound holds.
//! Nodes only register and heartbeat; no VM boots.

mod common;

use std::time::{Duration, Instant};

use common::*;
use hearth_k8s::controller::ratelimit::RateLimit;
use hearth_k8s::controller::{Operator, OperatorConfig};
use hearth_k8s::crd::{Phase, Sandbox, SandboxStatus};
use k8s_openapi::api::events::v1::Event;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, PostParams};
use kube::ResourceExt;

fn spawn_operator(c: &Cluster, cfg: OperatorConfig) -> tokio::task::JoinHandle<()> {
    let op = Operator::new(c.client.clone(), cfg);
    tokio::spawn(async move {
        op.run(futures::future::pending()).await.expect("operator");
    })
}

async fn phase_of(c: &Cluster, name: &str) -> (Phase, Option<String>) {
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let s = api.get(name).await.expect("get Sandbox");
    (s.phase(), s.node_name().map(str::to_string))
}

/// The Events regarding Sandbox `name` with `reason`, as (type, note).
async fn events(c: &Cluster, name: &str, reason: &str) -> Vec<(String, String)> {
    let api: Api<Event> = Api::namespaced(c.client.clone(), &c.ns);
    api.list(&Default::default())
        .await
        .expect("list Events")
        .items
        .into_iter()
        .filter(|e| {
            e.reason.as_deref() == Some(reason)
                && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(name)
        })
        .map(|e| (e.type_.unwrap_or_default(), e.note.unwrap_or_default()))
        .collect()
}

async fn until_scheduled(c: &Cluster, name: &str, within: Duration) -> String {
    eventually(&format!("{name} Scheduled"), within, || async {
        phase_of(c, name).await.0 == Phase::Scheduled
    })
    .await;
    phase_of(c, name)
        .await
        .1
        .expect("a Scheduled Sandbox names its node")
}

#[tokio::test]
async fn acts_on_watched_changes_without_a_resync_and_writes_events_once() {
    let Some(c) = cluster("k8s-watch").await else {
        return;
    };
    let small = registration(
        &c,
        &format!("{}-small", c.ns),
        8,
        "4Gi",
        Duration::from_secs(20),
    );
    let _small_beat = fake_node(&c, small.clone()).await;
    let mut cfg = operator_config(&c, "op");
    cfg.resync = Duration::from_secs(3600); // no pass falls due during the test: only watches wake it
    let op = spawn_operator(&c, cfg);

    create_sandbox(&c, "early", spec(1, "256Mi")).await;
    until_scheduled(&c, "early", Duration::from_secs(20)).await;

    // Created while the operator idles: the Sandbox watch must wake it.
    let created = Instant::now();
    create_sandbox(&c, "late", spec(1, "256Mi")).await;
    let node = until_scheduled(&c, "late", Duration::from_secs(5)).await;
    assert_eq!(node, small.node_name);
    eprintln!("placed from the watch in {:?}", created.elapsed());

    create_sandbox(&c, "big", spec(12, "1Gi")).await;
    eventually("big Unschedulable", Duration::from_secs(5), || async {
        let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
        let s = api.get("big").await.unwrap();
        s.status.and_then(|st| st.reason).as_deref() == Some("Unschedulable")
    })
    .await;
    // More passes while big stays unschedulable: its Event is not repeated.
    for i in 0..3 {
        create_sandbox(&c, &format!("more-{i}"), spec(1, "128Mi")).await;
        until_scheduled(&c, &format!("more-{i}"), Duration::from_secs(5)).await;
    }

    for name in ["early", "late", "more-2"] {
        eventually(
            &format!("a Scheduled Event for {name}"),
            Duration::from_secs(10),
            || async { !events(&c, name, "Scheduled").await.is_empty() },
        )
        .await;
        let evs = events(&c, name, "Scheduled").await;
        assert_eq!(evs.len(), 1, "one Scheduled Event for {name}: {evs:?}");
        assert_eq!(evs[0].0, "Normal");
        assert!(evs[0].1.contains(&small.node_name), "{evs:?}");
    }
    eventually(
        "an Unschedulable Event for big",
        Duration::from_secs(10),
        || async { !events(&c, "big", "Unschedulable").await.is_empty() },
    )
    .await;
    let evs = events(&c, "big", "Unschedulable").await;
    assert_eq!(
        evs.len(),
        1,
        "Unschedulable is not repeated every pass: {evs:?}"
    );
    assert_eq!(evs[0].0, "Warning");
    assert!(
        evs[0].1.contains("vCPU") || evs[0].1.contains("cpu"),
        "says why: {evs:?}"
    );

    // A node that fits registers (HearthNode, then its first heartbeat): the Lease watch wakes the
    // operator, and big is placed there without waiting for a resync.
    let large = registration(
        &c,
        &format!("{}-large", c.ns),
        16,
        "16Gi",
        Duration::from_secs(20),
    );
    let registered = Instant::now();
    let _large_beat = fake_node(&c, large.clone()).await;
    let node = until_scheduled(&c, "big", Duration::from_secs(5)).await;
    assert_eq!(node, large.node_name);
    eprintln!("placed on a new node in {:?}", registered.elapsed());
    op.abort();
}

#[tokio::test]
async fn a_lost_node_and_a_ttl_deletion_are_events() {
    let Some(c) = cluster("k8s-events").await else {
        return;
    };
    let reg = registration(&c, &format!("{}-n", c.ns), 4, "4Gi", Duration::from_secs(2));
    let beat = fake_node(&c, reg.clone()).await;
    // Finished before the operator starts (else it might bind the Pending object first).
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let mut done = spec(1, "256Mi");
    done.ttl_seconds_after_finished = Some(1);
    let mut obj = create_sandbox(&c, "done", done).await;
    obj.status = Some(hearth_k8s::status::finished(
        &SandboxStatus::default(),
        &hearth_k8s::status::Outcome::Exited(0),
        None,
        None,
        &Time(k8s_openapi::jiff::Timestamp::now()),
    ));
    api.replace_status("done", &PostParams::default(), &obj)
        .await
        .unwrap();
    let op = spawn_operator(&c, operator_config(&c, "op"));
    create_sandbox(&c, "a", spec(1, "256Mi")).await;
    until_scheduled(&c, "a", Duration::from_secs(10)).await;

    beat.abort();
    eventually(
        "a NodeLost Event for a",
        Duration::from_secs(15),
        || async { !events(&c, "a", "NodeLost").await.is_empty() },
    )
    .await;
    let evs = events(&c, "a", "NodeLost").await;
    assert_eq!(evs[0].0, "Warning");
    assert!(evs[0].1.contains(&reg.node_name), "names the node: {evs:?}");
    assert_eq!(phase_of(&c, "a").await.0, Phase::Failed);

    eventually("done deleted", Duration::from_secs(10), || async {
        api.get_opt("done").await.unwrap().is_none()
    })
    .await;
    eventually(
        "a Deleted Event for done",
        Duration::from_secs(10),
        || async { !events(&c, "done", "Deleted").await.is_empty() },
    )
    .await;
    op.abort();
}

#[tokio::test]
async fn the_write_rate_bound_holds() {
    let Some(c) = cluster("k8s-rate").await else {
        return;
    };
    let reg = registration(
        &c,
        &format!("{}-n", c.ns),
        64,
        "64Gi",
        Duration::from_secs(30),
    );
    let _beat = fake_node(&c, reg).await;
    let n = 35;
    for i in 0..n {
        create_sandbox(&c, &format!("s{i}"), spec(1, "128Mi")).await;
    }
    let mut cfg = operator_config(&c, "op");
    cfg.write_rate = RateLimit {
        per_second: 10,
        burst: 5,
    };
    let started = Instant::now();
    let op = spawn_operator(&c, cfg);
    eventually("all Scheduled", Duration::from_secs(30), || async {
        sandboxes(&c)
            .await
            .iter()
            .all(|s| s.phase() == Phase::Scheduled)
    })
    .await;
    let took = started.elapsed();
    // 5 at once, then 10/s: the last of 35 binds cannot go before 3 s.
    assert!(
        took >= Duration::from_millis(2900),
        "35 binds at 10/s (burst 5) took only {took:?}"
    );
    eprintln!("35 binds at 10/s, burst 5: {took:?}");
    // The Events follow once the bucket has spare tokens again.
    eventually("35 Scheduled Events", Duration::from_secs(20), || async {
        let api: Api<Event> = Api::namespaced(c.client.clone(), &c.ns);
        api.list(&Default::default())
            .await
            .unwrap()
            .items
            .iter()
            .filter(|e| e.reason.as_deref() == Some("Scheduled"))
            .count()
            == n
    })
    .await;
    let names: Vec<String> = sandboxes(&c).await.iter().map(|s| s.name_any()).collect();
    assert_eq!(names.len(), n);
    op.abort();
}

/// On a cluster with no warm pool and no claim the operator does not re-list every Sandbox at each
/// pass (the largest read it makes, ~1.5 KB per Sandbox: 15 MB a pass at 10,000 Sandboxes); its
/// Sandbox watch already holds them, and two one-object lists show there is nothing to pool or
/// claim. Counted by the operator's own client, so other tests on the API server do not count.
#[tokio::test]
async fn without_pools_or_claims_the_operator_does_not_list_every_sandbox_each_pass() {
    let Some(c) = cluster("nolists").await else {
        return;
    };
    let (client, log) = recording_client(&c).await;
    create_sandbox(&c, "idle", spec(1, "1Gi")).await;
    let mut cfg = OperatorConfig::new("op-nolists", &c.ns);
    cfg.leader_lease = "op-nolists".into();
    cfg.sandbox_namespace = Some(c.ns.clone());
    cfg.resync = Duration::from_millis(200);
    let op = Operator::new(client, cfg);
    let task = tokio::spawn(async move {
        op.run(futures::future::pending()).await.expect("operator");
    });
    // Leadership, the watches' initial lists, then ~15 passes at most 200 ms apart.
    tokio::time::sleep(Duration::from_secs(4)).await;
    task.abort();
    let lists = sandbox_requests(&log, http::Method::GET);
    assert!(
        (1..=2).contains(&lists),
        "the operator listed every Sandbox {lists} times in 4 s (its watch's initial list is 1)"
    );
}
