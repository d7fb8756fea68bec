//! Helpers of tests/claims.rs: the reconciler loop, a stand-in for node agents that only writes
//! status, and creating and reading templates, pools and claims in the test's namespace.

use std::time::Duration;

use hearth_k8s::controller::claims::reconcile_pools_and_claims;
use hearth_k8s::crd::{
    Phase, Sandbox, SandboxClaim, SandboxClaimSpec, SandboxStatus, SandboxTemplate,
    SandboxTemplateRef, SandboxTemplateSpec, SandboxWarmPool, SandboxWarmPoolSpec, POOL_LABEL,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::ResourceExt;

use crate::common::{sandboxes, Cluster};

/// How long any one expectation may take.
pub const WAIT: Duration = Duration::from_secs(30);

/// Runs one reconciler pass every 150 ms until aborted.
pub fn reconciler(c: &Cluster) -> tokio::task::JoinHandle<()> {
    let (client, ns) = (c.client.clone(), c.ns.clone());
    tokio::spawn(async move {
        loop {
            if let Err(e) = reconcile_pools_and_claims(&client, Some(&ns)).await {
                eprintln!("reconcile: {e}");
            }
            tokio::time::sleep(Duration::from_millis(150)).await;
        }
    })
}

/// Stands in for node agents: every Sandbox without a phase is set Running (with a node and a sandbox
/// id), as a node agent writes it once the VM runs. Nothing boots.
pub fn pretend_node_agent(c: &Cluster) -> tokio::task::JoinHandle<()> {
    every_sandbox(c, |api, s| async move {
        if s.status.as_ref().and_then(|st| st.phase).is_none() {
            let _ = set_running(&api, s).await;
        }
    })
}

/// Stands in for the agents of registered nodes: every Sandbox the operator placed (`Scheduled`)
/// starts running on its node (the operator's placement is kept). Nothing boots.
pub fn pretend_placed_agents(c: &Cluster) -> tokio::task::JoinHandle<()> {
    every_sandbox(c, |api, s| async move {
        if s.phase() == Phase::Scheduled {
            let running = serde_json::json!({"status": {"phase": "Running",
                "sandboxId": format!("id-{}", s.name_any())}});
            let pp = PatchParams::default();
            let _ = api
                .patch_status(&s.name_any(), &pp, &Patch::Merge(&running))
                .await;
        }
    })
}

/// Calls `act` on every Sandbox of the test's namespace every 100 ms until aborted.
fn every_sandbox<F, Fut>(c: &Cluster, act: F) -> tokio::task::JoinHandle<()>
where
    F: Fn(Api<Sandbox>, Sandbox) -> Fut + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    tokio::spawn(async move {
        loop {
            for s in api
                .list(&Default::default())
                .await
                .map(|l| l.items)
                .unwrap_or_default()
            {
                act(api.clone(), s).await;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

pub async fn set_running(api: &Api<Sandbox>, mut s: Sandbox) -> Result<Sandbox, kube::Error> {
    s.status = Some(SandboxStatus {
        phase: Some(Phase::Running),
        node_name: Some("pretend-node".into()),
        sandbox_id: Some(format!("id-{}", s.name_any())),
        start_time: Some(Time(Timestamp::now())),
        ..Default::default()
    });
    api.replace_status(&s.name_any(), &PostParams::default(), &s)
        .await
}

pub async fn create_template(c: &Cluster, name: &str, image: &str) {
    let spec: SandboxTemplateSpec = serde_yaml::from_str(&format!(
        "image: {image}\nresources: {{cpu: 1, memory: 256Mi}}\n"
    ))
    .unwrap();
    let api: Api<SandboxTemplate> = Api::namespaced(c.client.clone(), &c.ns);
    api.create(&PostParams::default(), &SandboxTemplate::new(name, spec))
        .await
        .expect("create SandboxTemplate");
}

pub async fn create_pool(c: &Cluster, name: &str, template: &str, replicas: i32) {
    let pool = SandboxWarmPool::new(
        name,
        SandboxWarmPoolSpec {
            replicas,
            sandbox_template_ref: SandboxTemplateRef {
                name: template.into(),
            },
        },
    );
    let api: Api<SandboxWarmPool> = Api::namespaced(c.client.clone(), &c.ns);
    api.create(&PostParams::default(), &pool)
        .await
        .expect("create SandboxWarmPool");
}

pub fn claim(name: &str, template: &str) -> SandboxClaim {
    SandboxClaim::new(
        name,
        SandboxClaimSpec {
            sandbox_template_ref: SandboxTemplateRef {
                name: template.into(),
            },
            lifecycle: None,
        },
    )
}

pub fn claims_api(c: &Cluster) -> Api<SandboxClaim> {
    Api::namespaced(c.client.clone(), &c.ns)
}

pub fn pools_api(c: &Cluster) -> Api<SandboxWarmPool> {
    Api::namespaced(c.client.clone(), &c.ns)
}

/// The unclaimed members of pool `name`, not being deleted.
pub async fn members(c: &Cluster, name: &str) -> Vec<Sandbox> {
    sandboxes(c)
        .await
        .into_iter()
        .filter(|s| s.labels().get(POOL_LABEL).map(String::as_str) == Some(name))
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .collect()
}

pub async fn ready_members(c: &Cluster, name: &str) -> usize {
    members(c, name)
        .await
        .iter()
        .filter(|s| s.phase() == Phase::Running)
        .count()
}

/// The Sandbox name a claim's status names, once it names one.
pub async fn claimed(c: &Cluster, name: &str) -> Option<String> {
    let claim = claims_api(c).get_opt(name).await.unwrap()?;
    Some(claim.status?.sandbox?.name)
}

/// Which claim (by uid) controls each Sandbox.
pub fn owner_uid(s: &Sandbox) -> Option<String> {
    s.owner_references()
        .iter()
        .find(|o| o.controller == Some(true) && o.kind == "SandboxClaim")
        .map(|o| o.uid.clone())
}

/// Aborts background tasks.
pub fn abort_all<const N: usize>(tasks: [tokio::task::JoinHandle<()>; N]) {
    tasks.iter().for_each(|t| t.abort());
}
