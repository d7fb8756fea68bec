//! Warm pools and claims against a real kube-apiserver (testkit; skipped with the reason when none is
//! provisioned). No VM boots and no node agent runs: pool members and claimed Sandboxes are API
//! objects, and where a test needs a member to be ready it sets the Sandbox's status to Running itself,
//! as a node agent would once the VM runs ([`pretend_node_agent`]). The reconciler is
//! `reconcile_pools_and_claims`, run in a loop here as the operator's leader would.

mod claims_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use claims_support::*;
use common::*;
use hearth_k8s::controller::Operator;
use hearth_k8s::crd::{
    ClaimLifecycle, Phase, Sandbox, SandboxTemplate, ShutdownPolicy, POOL_LABEL,
    TEMPLATE_HASH_LABEL,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::ResourceExt;

#[tokio::test]
async fn a_pool_keeps_replicas_members_and_scales_through_the_scale_subresource() {
    let Some(c) = cluster("k8s-pool").await else {
        return;
    };
    create_template(&c, "py", "python").await;
    create_pool(&c, "warm", "py", 3).await;
    let r = reconciler(&c);
    eventually("3 members", WAIT, || async {
        members(&c, "warm").await.len() == 3
    })
    .await;
    let m = &members(&c, "warm").await[0];
    assert!(m.spec.is_service() && m.spec.image == "python");
    assert!(m.name_any().starts_with("warm-"));

    // `kubectl scale` goes through the CRD's /scale subresource.
    let mut kubectl = c.kube.kubectl().expect("kubectl");
    kubectl.args(["-n", &c.ns, "scale", "sandboxwarmpool/warm", "--replicas=5"]);
    let out = tokio::task::spawn_blocking(move || kubectl.output())
        .await
        .unwrap()
        .expect("run kubectl");
    assert!(
        out.status.success(),
        "kubectl scale: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    eventually("5 members", WAIT, || async {
        members(&c, "warm").await.len() == 5
    })
    .await;
    eventually("status.replicas 5", WAIT, || async {
        let scale = pools_api(&c).get_scale("warm").await.unwrap();
        scale.status.is_some_and(|s| {
            s.replicas == 5 && s.selector.as_deref() == Some("hearth.dev/pool=warm")
        })
    })
    .await;

    // And down again, through the same subresource from the API.
    pools_api(&c)
        .patch_scale(
            "warm",
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({ "spec": { "replicas": 1 } })),
        )
        .await
        .expect("patch /scale");
    eventually("1 member", WAIT, || async {
        members(&c, "warm").await.len() == 1
    })
    .await;
    assert_eq!(pools_api(&c).get("warm").await.unwrap().spec.replicas, 1);
    // The status is the operator's by server-side apply: its field manager owns it.
    let pool = pools_api(&c).get("warm").await.unwrap();
    let managers: Vec<(String, String)> = pool
        .managed_fields()
        .iter()
        .map(|m| {
            let owns = m
                .fields_v1
                .as_ref()
                .map(|f| f.0.to_string())
                .unwrap_or_default();
            (
                m.manager.clone().unwrap_or_default(),
                m.operation.clone().unwrap_or_default() + " " + &owns,
            )
        })
        .collect();
    assert!(
        managers.iter().any(|(manager, how)| manager
            == hearth_k8s::controller::claims::FIELD_MANAGER
            && how.starts_with("Apply ")
            && how.contains("f:readyReplicas")),
        "{managers:?}"
    );
    r.abort();
}

#[tokio::test]
async fn a_claim_adopts_a_ready_member_and_the_pool_refills() {
    let Some(c) = cluster("k8s-adopt").await else {
        return;
    };
    create_template(&c, "py", "python").await;
    create_pool(&c, "warm", "py", 2).await;
    let (r, agent) = (reconciler(&c), pretend_node_agent(&c));
    eventually("2 ready members", WAIT, || async {
        ready_members(&c, "warm").await == 2
    })
    .await;
    let before: BTreeSet<String> = members(&c, "warm")
        .await
        .iter()
        .map(|s| s.name_any())
        .collect();

    let mut cl = claim("mine", "py");
    // Whole seconds: that is what the API server keeps.
    let at = Time(Timestamp::from_second(Timestamp::now().as_second() + 3600).unwrap());
    cl.spec.lifecycle = Some(ClaimLifecycle {
        shutdown_time: Some(at.clone()),
        shutdown_policy: Some(ShutdownPolicy::Retain),
    });
    let started = std::time::Instant::now();
    let cl = claims_api(&c)
        .create(&PostParams::default(), &cl)
        .await
        .unwrap();
    eventually("the claim holds a Sandbox", WAIT, || async {
        claimed(&c, "mine").await.is_some()
    })
    .await;
    // The figure: claim created -> its status names a Running Sandbox (reconciler every 150 ms).
    eprintln!(
        "claim served from the warm pool in {} ms",
        started.elapsed().as_millis()
    );
    let name = claimed(&c, "mine").await.unwrap();
    assert!(
        before.contains(&name),
        "{name} is one of the warm members {before:?}"
    );
    let s: Sandbox = Api::namespaced(c.client.clone(), &c.ns)
        .get(&name)
        .await
        .unwrap();
    assert_eq!(owner_uid(&s), cl.uid());
    assert!(!s.labels().contains_key(POOL_LABEL));
    assert_eq!(s.labels()["hearth.dev/claim"], "mine");
    let lifecycle = s.spec.lifecycle.clone().unwrap();
    assert_eq!(
        (lifecycle.shutdown_time, lifecycle.shutdown_policy),
        (Some(at), Some(ShutdownPolicy::Retain))
    );
    let status = claims_api(&c).get("mine").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(Phase::Running));
    assert_eq!(status.conditions[0].status, "True");

    eventually("the pool refilled to 2 ready", WAIT, || async {
        let m = members(&c, "warm").await;
        m.len() == 2
            && m.iter()
                .all(|s| s.phase() == Phase::Running && s.name_any() != name)
    })
    .await;
    r.abort();
    agent.abort();
}

#[tokio::test]
async fn concurrent_claims_never_get_the_same_member() {
    let Some(c) = cluster("k8s-race").await else {
        return;
    };
    create_template(&c, "py", "python").await;
    create_pool(&c, "warm", "py", 3).await;
    let agent = pretend_node_agent(&c);
    let first = reconciler(&c);
    eventually("3 ready members", WAIT, || async {
        ready_members(&c, "warm").await == 3
    })
    .await;
    // Two reconcilers at once (as around a leadership hand-over): only the guarded writes keep them apart.
    let second = reconciler(&c);
    let api = claims_api(&c);
    let made = futures::future::join_all((0..6).map(|i| {
        let api = api.clone();
        async move {
            api.create(&PostParams::default(), &claim(&format!("c{i}"), "py"))
                .await
        }
    }))
    .await;
    assert!(made.iter().all(Result::is_ok), "{made:?}");

    eventually(
        "every claim holds exactly one Sandbox of its own",
        WAIT,
        || async {
            let all = sandboxes(&c).await;
            let claims = api.list(&Default::default()).await.unwrap().items;
            let mut held = BTreeSet::new();
            claims.iter().all(|cl| {
                let owned: Vec<_> = all
                    .iter()
                    .filter(|s| s.metadata.deletion_timestamp.is_none() && owner_uid(s) == cl.uid())
                    .collect();
                let named = cl
                    .status
                    .as_ref()
                    .and_then(|s| s.sandbox.as_ref())
                    .map(|s| s.name.clone());
                owned.len() == 1
                    && named.as_deref() == Some(owned[0].name_any().as_str())
                    && held.insert(owned[0].name_any())
            })
        },
    )
    .await;
    let all = sandboxes(&c).await;
    let adopted: Vec<_> = all
        .iter()
        .filter(|s| owner_uid(s).is_some() && s.name_any().starts_with("warm-"))
        .collect();
    assert!(!adopted.is_empty(), "some claims were served from the pool");
    abort_all([first, second, agent]);
}

#[tokio::test]
async fn a_claim_without_a_pool_gets_a_new_sandbox_and_deleting_it_deletes_that() {
    let Some(c) = cluster("k8s-fresh").await else {
        return;
    };
    create_template(&c, "py", "python").await;
    let r = reconciler(&c);
    let cl = claims_api(&c)
        .create(&PostParams::default(), &claim("solo", "py"))
        .await
        .unwrap();
    eventually("the claim holds a Sandbox", WAIT, || async {
        claimed(&c, "solo").await.is_some()
    })
    .await;
    assert_eq!(
        claimed(&c, "solo").await.as_deref(),
        Some("solo"),
        "named like the claim"
    );
    let sbx: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let s = sbx.get("solo").await.unwrap();
    assert_eq!(owner_uid(&s), cl.uid());
    assert!(s.spec.is_service() && s.spec.image == "python" && s.spec.command.is_empty());
    let status = claims_api(&c).get("solo").await.unwrap().status.unwrap();
    assert_eq!(status.phase, Some(Phase::Pending));
    assert_eq!(status.conditions[0].status, "False");

    // Set Running as a node agent would: the claim's phase follows.
    set_running(&sbx, s).await.unwrap();
    eventually("the claim mirrors Running", WAIT, || async {
        let st = claims_api(&c).get("solo").await.unwrap().status.unwrap();
        st.phase == Some(Phase::Running) && st.conditions[0].status == "True"
    })
    .await;

    claims_api(&c)
        .delete("solo", &DeleteParams::default())
        .await
        .unwrap();
    eventually("claim and Sandbox gone", WAIT, || async {
        claims_api(&c).get_opt("solo").await.unwrap().is_none()
            && sbx.get_opt("solo").await.unwrap().is_none()
    })
    .await;
    r.abort();
}

#[tokio::test]
async fn a_template_change_rolls_unclaimed_members_only() {
    let Some(c) = cluster("k8s-roll").await else {
        return;
    };
    create_template(&c, "py", "python:3.11").await;
    create_pool(&c, "warm", "py", 2).await;
    let (r, agent) = (reconciler(&c), pretend_node_agent(&c));
    eventually("2 ready members", WAIT, || async {
        ready_members(&c, "warm").await == 2
    })
    .await;
    claims_api(&c)
        .create(&PostParams::default(), &claim("keep", "py"))
        .await
        .unwrap();
    eventually("the claim holds a Sandbox", WAIT, || async {
        claimed(&c, "keep").await.is_some()
    })
    .await;
    let kept = claimed(&c, "keep").await.unwrap();

    let templates: Api<SandboxTemplate> = Api::namespaced(c.client.clone(), &c.ns);
    let patch = serde_json::json!({ "spec": { "image": "python:3.12" } });
    let t = templates
        .patch("py", &PatchParams::default(), &Patch::Merge(patch))
        .await
        .unwrap();
    let hash = t.spec.hash();
    eventually("2 ready members of the new spec", WAIT, || async {
        let m = members(&c, "warm").await;
        m.len() == 2
            && m.iter().all(|s| {
                s.spec.image == "python:3.12"
                    && s.labels()[TEMPLATE_HASH_LABEL] == hash
                    && s.phase() == Phase::Running
            })
    })
    .await;
    let old_left = sandboxes(&c)
        .await
        .iter()
        .filter(|s| s.spec.image == "python:3.11")
        .map(|s| s.name_any())
        .collect::<Vec<_>>();
    assert_eq!(
        old_left,
        [kept],
        "only the claimed Sandbox keeps the old spec"
    );
    r.abort();
    agent.abort();
}

#[tokio::test]
async fn the_operator_spreads_a_pools_members_over_nodes() {
    let Some(c) = cluster("k8s-spread").await else {
        return;
    };
    let beats: Vec<_> = futures::future::join_all((0..3).map(|i| {
        let reg = registration(
            &c,
            &format!("{}-n{i}", c.ns),
            4,
            "4Gi",
            Duration::from_secs(20),
        );
        fake_node(&c, reg)
    }))
    .await;
    create_template(&c, "py", "python").await;
    create_pool(&c, "warm", "py", 3).await;
    // The operator runs the pools-and-claims pass itself (no separate reconciler: two would race to
    // fill the pool).
    let op = Operator::new(c.client.clone(), operator_config(&c, "op"));
    let op =
        tokio::spawn(async move { op.run(futures::future::pending()).await.expect("operator") });
    eventually("3 members Scheduled", WAIT, || async {
        let m = members(&c, "warm").await;
        m.len() == 3 && m.iter().all(|s| s.phase() == Phase::Scheduled)
    })
    .await;
    let mut per_node: BTreeMap<String, usize> = BTreeMap::new();
    for s in members(&c, "warm").await {
        *per_node
            .entry(s.node_name().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(per_node.len(), 3, "one member per node: {per_node:?}");
    op.abort();
    beats.iter().for_each(|b| b.abort());
}

/// The operator's pools-and-claims pass plans from its Sandbox watch rather than listing every
/// Sandbox each pass, and its cache never makes it act twice: a pool filled, refilled after an
/// adoption and scaled up gets exactly one create per missing member, a claim exactly one Sandbox.
/// It lists only while the watch has not shown its previous pass's writes. Counted by the
/// operator's own client.
#[tokio::test]
async fn the_operator_runs_pools_from_its_watch_and_never_acts_twice() {
    let Some(c) = cluster("k8s-poolwatch").await else {
        return;
    };
    let reg = registration(
        &c,
        &format!("{}-n", c.ns),
        16,
        "16Gi",
        Duration::from_secs(20),
    );
    let beat = fake_node(&c, reg).await;
    create_template(&c, "py", "python").await;
    create_pool(&c, "warm", "py", 3).await;
    let (client, log) = recording_client(&c).await;
    let mut cfg = operator_config(&c, "op-poolwatch");
    cfg.leader_lease = "op-poolwatch".into();
    cfg.resync = Duration::from_millis(200);
    let op = Operator::new(client, cfg);
    let op =
        tokio::spawn(async move { op.run(futures::future::pending()).await.expect("operator") });
    let agents = pretend_placed_agents(&c);
    eventually("3 ready members", WAIT, || async {
        ready_members(&c, "warm").await == 3
    })
    .await;

    let made = claims_api(&c)
        .create(&PostParams::default(), &claim("c1", "py"))
        .await
        .unwrap();
    eventually("c1 served and the pool refilled", WAIT, || async {
        claimed(&c, "c1").await.is_some() && ready_members(&c, "warm").await == 3
    })
    .await;
    let scale = serde_json::json!({"spec": {"replicas": 5}});
    pools_api(&c)
        .patch("warm", &PatchParams::default(), &Patch::Merge(&scale))
        .await
        .unwrap();
    eventually("5 members", WAIT, || async {
        members(&c, "warm").await.len() == 5
    })
    .await;
    // Passes at most 200 ms apart, each free to overfill if its cache lagged.
    tokio::time::sleep(Duration::from_secs(2)).await;
    op.abort();
    agents.abort();
    beat.abort();

    assert_eq!(members(&c, "warm").await.len(), 5);
    let creates = sandbox_requests(&log, http::Method::POST);
    assert_eq!(creates, 3 + 1 + 2, "one create per missing member");
    let owned = sandboxes(&c)
        .await
        .iter()
        .filter(|s| owner_uid(s) == made.uid())
        .count();
    assert_eq!(owned, 1, "the claim has one Sandbox");
    let lists = sandbox_requests(&log, http::Method::GET);
    eprintln!("Sandbox lists by the operator: {lists}");
    assert!(
        lists <= 8,
        "{lists} Sandbox lists: the pass lists only while its watch lags its own writes"
    );
}
