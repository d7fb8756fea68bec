//! The operator against a real kube-apiserver (testkit; skipped with the reason when none is
//! provisioned): placement within capacity and selectors, leader election and fail-over, NodeLost
//! after a node's lease expires, finalizer release and TTL deletion. Nodes here only register and
//! heartbeat; no VM boots.

mod common;

use std::time::Duration;

use common::*;
use hearth_k8s::controller::Operator;
use hearth_k8s::crd::{Phase, Sandbox, SandboxStatus, FINALIZER};
use hearth_k8s::lease::LeaderElection;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;

fn spawn_operator(
    c: &Cluster,
    cfg: hearth_k8s::controller::OperatorConfig,
) -> tokio::task::JoinHandle<()> {
    let op = Operator::new(c.client.clone(), cfg);
    tokio::spawn(async move {
        op.run(futures::future::pending()).await.expect("operator");
    })
}

#[tokio::test]
async fn places_pending_sandboxes_within_capacity_and_selectors() {
    let Some(c) = cluster("k8s-place").await else {
        return;
    };
    let mut big = registration(
        &c,
        &format!("{}-big", c.ns),
        8,
        "4Gi",
        Duration::from_secs(20),
    );
    big.labels.insert("zone".into(), "a".into());
    let small = registration(
        &c,
        &format!("{}-small", c.ns),
        2,
        "1Gi",
        Duration::from_secs(20),
    );
    let beats = [
        fake_node(&c, big.clone()).await,
        fake_node(&c, small.clone()).await,
    ];
    for i in 0..5 {
        create_sandbox(&c, &format!("s{i}"), spec(1, "512Mi")).await;
    }
    let mut zoned = spec(1, "256Mi");
    zoned.node_selector.insert("zone".into(), "a".into());
    create_sandbox(&c, "zoned", zoned).await;
    create_sandbox(&c, "huge", spec(64, "1Gi")).await;
    let op = spawn_operator(&c, operator_config(&c, "op-1"));

    eventually("6 sandboxes Scheduled", Duration::from_secs(30), || async {
        sandboxes(&c)
            .await
            .iter()
            .filter(|s| s.phase() == Phase::Scheduled)
            .count()
            == 6
    })
    .await;
    let all = sandboxes(&c).await;
    let on = |node: &str| {
        all.iter()
            .filter(|s| s.node_name() == Some(node))
            .collect::<Vec<_>>()
    };
    let (big_load, small_load) = (on(&big.node_name), on(&small.node_name));
    assert!(
        big_load.len() <= 8 && small_load.len() <= 2,
        "over capacity"
    );
    let small_mem: u64 = small_load
        .iter()
        .map(|s| s.spec.demand().unwrap().memory_mib)
        .sum();
    assert!(small_mem <= 1024, "small node over memory: {small_mem} MiB");
    let zoned = all.iter().find(|s| s.name_any() == "zoned").unwrap();
    assert_eq!(zoned.node_name(), Some(big.node_name.as_str()));
    let huge = all.iter().find(|s| s.name_any() == "huge").unwrap();
    assert_eq!(huge.phase(), Phase::Pending);
    let st = huge
        .status
        .as_ref()
        .expect("a note on the unschedulable one");
    assert_eq!(st.reason.as_deref(), Some("Unschedulable"));
    op.abort();
    beats.iter().for_each(|b| b.abort());
}

async fn holder(c: &Cluster) -> Option<String> {
    let api: Api<Lease> = Api::namespaced(c.client.clone(), &c.ns);
    api.get_opt("hearth-operator")
        .await
        .unwrap()?
        .spec?
        .holder_identity
}

#[tokio::test]
async fn one_operator_leads_and_a_standby_takes_over_when_it_dies() {
    let Some(c) = cluster("k8s-leader").await else {
        return;
    };
    let node = registration(
        &c,
        &format!("{}-n", c.ns),
        8,
        "8Gi",
        Duration::from_secs(30),
    );
    let beat = fake_node(&c, node).await;
    let mut cfg_a = operator_config(&c, "op-a");
    cfg_a.leader_lease_duration = Duration::from_secs(3);
    let mut cfg_b = cfg_a.clone();
    cfg_b.identity = "op-b".into();
    let a = spawn_operator(&c, cfg_a);
    eventually("op-a leads", Duration::from_secs(10), || async {
        holder(&c).await.as_deref() == Some("op-a")
    })
    .await;
    let b = spawn_operator(&c, cfg_b);
    create_sandbox(&c, "first", spec(1, "256Mi")).await;
    eventually("first Scheduled", Duration::from_secs(10), || async {
        sandboxes(&c)
            .await
            .iter()
            .all(|s| s.phase() == Phase::Scheduled)
    })
    .await;
    // The standby keeps trying but never takes a live leader's lease.
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(holder(&c).await.as_deref(), Some("op-a"));

    // Killed, not shut down: the lease is left to expire.
    a.abort();
    let killed = std::time::Instant::now();
    eventually("op-b takes over", Duration::from_secs(15), || async {
        holder(&c).await.as_deref() == Some("op-b")
    })
    .await;
    assert!(
        killed.elapsed() >= Duration::from_secs(2),
        "took over a lease that had not expired"
    );
    create_sandbox(&c, "second", spec(1, "256Mi")).await;
    eventually(
        "second Scheduled by the new leader",
        Duration::from_secs(10),
        || async {
            sandboxes(&c)
                .await
                .iter()
                .all(|s| s.phase() == Phase::Scheduled)
        },
    )
    .await;
    b.abort();
    beat.abort();
}

#[tokio::test]
async fn an_expired_node_lease_fails_its_sandboxes_and_frees_their_finalizers() {
    let Some(c) = cluster("k8s-lost").await else {
        return;
    };
    let reg = registration(&c, &format!("{}-n", c.ns), 4, "4Gi", Duration::from_secs(2));
    let beat = fake_node(&c, reg.clone()).await;
    let op = spawn_operator(&c, operator_config(&c, "op"));
    create_sandbox(&c, "a", spec(1, "256Mi")).await;
    create_sandbox(&c, "b", spec(1, "256Mi")).await;
    eventually("both Scheduled", Duration::from_secs(10), || async {
        sandboxes(&c)
            .await
            .iter()
            .filter(|s| s.phase() == Phase::Scheduled)
            .count()
            == 2
    })
    .await;
    // What a node agent does: finalizer on, then Running.
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let patch = serde_json::json!({"metadata": {"finalizers": [FINALIZER]}});
    api.patch("a", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let mut a = api.get("a").await.unwrap();
    a.status = Some(hearth_k8s::status::running(
        a.status.as_ref().unwrap(),
        &Time(k8s_openapi::jiff::Timestamp::now()),
    ));
    api.replace_status("a", &PostParams::default(), &a)
        .await
        .unwrap();

    beat.abort();
    let stopped = std::time::Instant::now();
    eventually("both Failed/NodeLost", Duration::from_secs(15), || async {
        sandboxes(&c).await.iter().all(|s| {
            s.phase() == Phase::Failed
                && s.status.as_ref().unwrap().reason.as_deref() == Some("NodeLost")
        })
    })
    .await;
    assert!(
        stopped.elapsed() >= Duration::from_millis(1000),
        "NodeLost before the lease could expire"
    );

    // Nobody will stop a VM on a lost node: deleting goes through without it.
    api.delete("a", &DeleteParams::default()).await.unwrap();
    eventually("a deleted", Duration::from_secs(10), || async {
        api.get_opt("a").await.unwrap().is_none()
    })
    .await;
    op.abort();
}

#[tokio::test]
async fn finished_sandboxes_go_after_their_ttl_and_unbound_ones_delete_freely() {
    let Some(c) = cluster("k8s-ttl").await else {
        return;
    };
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let mut short = spec(1, "256Mi");
    short.ttl_seconds_after_finished = Some(1);
    let mut none = short.clone();
    none.ttl_seconds_after_finished = None;
    for (name, s) in [("short", short), ("kept", none)] {
        let mut obj = create_sandbox(&c, name, s).await;
        let now = Time(k8s_openapi::jiff::Timestamp::now());
        obj.status = Some(hearth_k8s::status::finished(
            &SandboxStatus::default(),
            &hearth_k8s::status::Outcome::Exited(0),
            None,
            None,
            &now,
        ));
        api.replace_status(name, &PostParams::default(), &obj)
            .await
            .unwrap();
    }
    // Never bound but carrying the finalizer (e.g. a node agent restarted mid-way): deletion proceeds.
    let mut pinned = spec(64, "1Gi");
    pinned.node_selector.insert("nowhere".into(), "x".into());
    create_sandbox(&c, "pinned", pinned).await;
    let patch = serde_json::json!({"metadata": {"finalizers": [FINALIZER]}});
    api.patch("pinned", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();

    let op = spawn_operator(&c, operator_config(&c, "op"));
    eventually(
        "short deleted after its TTL",
        Duration::from_secs(10),
        || async { api.get_opt("short").await.unwrap().is_none() },
    )
    .await;
    api.delete("pinned", &DeleteParams::default())
        .await
        .unwrap();
    eventually("pinned deleted", Duration::from_secs(10), || async {
        api.get_opt("pinned").await.unwrap().is_none()
    })
    .await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(api.get_opt("kept").await.unwrap().is_some(), "no TTL: kept");
    op.abort();
}

#[tokio::test]
async fn leader_election_is_exclusive_under_races() {
    let Some(c) = cluster("k8s-race").await else {
        return;
    };
    let candidates: Vec<_> = (0..5)
        .map(|i| LeaderElection {
            api: Api::namespaced(c.client.clone(), &c.ns),
            lease_name: "race".into(),
            identity: format!("c{i}"),
            duration: Duration::from_secs(30),
        })
        .collect();
    for _ in 0..3 {
        let wins =
            futures::future::join_all(candidates.iter().map(|c| c.try_acquire_or_renew())).await;
        let winners: Vec<_> = wins
            .into_iter()
            .enumerate()
            .filter(|(_, r)| *r.as_ref().unwrap())
            .collect();
        assert_eq!(
            winners.len(),
            1,
            "exactly one leader per round: {winners:?}"
        );
    }
}
