//! A node agent's presence in the cluster: its `HearthNode` object (capacity, labels, what it runs) and
//! its heartbeat Lease. Used by the node reconciler, and by the placement benchmark to register nodes
//! that run nothing.

use std::collections::BTreeMap;
use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::{Api, Client};

use crate::crd::{HearthNode, HearthNodeSpec, HearthNodeStatus, NodeCapacity};
use crate::error::{is_conflict, Context, K8sError};
use crate::lease::{heartbeat, node_lease_name};

/// Who a node is and where its Lease lives.
#[derive(Clone, Debug)]
pub struct Registration {
    pub node_name: String,
    /// Matched by Sandboxes' `nodeSelector`.
    pub labels: BTreeMap<String, String>,
    pub capacity: NodeCapacity,
    /// Namespace of the node Leases (the operator's `--namespace`).
    pub lease_namespace: String,
    /// The node counts as lost this long after its last heartbeat.
    pub lease_duration: Duration,
    /// Where `hearth gateway` reaches this node's HTTP API (HearthNode `spec.apiEndpoint`).
    pub api_endpoint: Option<String>,
}

/// Creates or updates the node's HearthNode (labels and capacity; status untouched).
pub async fn register(client: &Client, reg: &Registration) -> Result<(), K8sError> {
    let api: Api<HearthNode> = Api::all(client.clone());
    let name = &reg.node_name;
    let node = HearthNode {
        metadata: ObjectMeta {
            name: Some(name.clone()),
            labels: Some(reg.labels.clone()),
            ..Default::default()
        },
        spec: HearthNodeSpec {
            capacity: reg.capacity.clone(),
            api_endpoint: reg.api_endpoint.clone(),
        },
        status: None,
    };
    match api.create(&PostParams::default(), &node).await {
        Ok(_) => Ok(()),
        Err(e) if is_conflict(&e) => {
            let patch = serde_json::json!({
                "metadata": { "labels": reg.labels },
                "spec": node.spec,
            });
            api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
                .await
                .map(|_| ())
                .ctx(|| format!("updating HearthNode {name}"))
        }
        Err(e) => Err(e).ctx(|| format!("registering HearthNode {name}")),
    }
}

/// Writes what the node runs now into the HearthNode's status.
pub async fn report(
    client: &Client,
    node: &str,
    sandboxes: u32,
    vcpus: u32,
    memory_mib: u64,
) -> Result<(), K8sError> {
    let api: Api<HearthNode> = Api::all(client.clone());
    let status = HearthNodeStatus {
        sandboxes,
        allocated_cpu: vcpus,
        allocated_memory_mib: memory_mib,
        updated: Some(Time(Timestamp::now())),
    };
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({ "status": status })),
    )
    .await
    .map(|_| ())
    .ctx(|| format!("reporting the allocation of HearthNode {node}"))
}

/// Renews the node's Lease every quarter of its duration, forever (abort the task to stop).
pub async fn heartbeat_forever(client: Client, reg: Registration) {
    let api: Api<Lease> = Api::namespaced(client, &reg.lease_namespace);
    let name = node_lease_name(&reg.node_name);
    let period = (reg.lease_duration / 4).max(Duration::from_millis(250));
    loop {
        if let Err(e) = heartbeat(&api, &name, &reg.node_name, reg.lease_duration).await {
            tracing::warn!("node heartbeat: {e}");
        }
        tokio::time::sleep(period).await;
    }
}
