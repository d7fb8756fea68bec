//! The `HearthNode` custom resource (`hearth.dev/v1alpha1`, cluster-scoped): one node agent's registration.
//! The agent writes its capacity into the spec and what it runs into the status; its labels are what
//! a Sandbox's `nodeSelector` matches. Liveness is not here but in the node's Lease (see `lease`).
//! Types only, no I/O.

// kube's `printcolumn(...)` repeats `type_ = "string"` on purpose; clippy reads that as duplicated.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{Quantity, QuantityError};

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hearth.dev",
    version = "v1alpha1",
    kind = "HearthNode",
    status = "HearthNodeStatus",
    shortname = "hnode",
    category = "hearth",
    doc = "A node agent that runs hearth Sandboxes, with what it may hand out.",
    printcolumn(name = "CPU", type_ = "string", json_path = ".spec.capacity.cpu"),
    printcolumn(name = "Memory", type_ = "string", json_path = ".spec.capacity.memory"),
    printcolumn(name = "Sandboxes", type_ = "integer", json_path = ".status.sandboxes"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct HearthNodeSpec {
    /// What this node may hand out to sandboxes in total.
    pub capacity: NodeCapacity,
    /// Where `hearth gateway` reaches this node's HTTP API (`https://host:port`, mutual TLS); unset:
    /// the node serves no service sandboxes through a gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_endpoint: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct NodeCapacity {
    /// Whole vCPUs.
    pub cpu: Quantity,
    pub memory: Quantity,
}

impl NodeCapacity {
    /// (vCPUs, MiB).
    pub fn parse(&self) -> Result<(u32, u64), QuantityError> {
        Ok((self.cpu.to_vcpus()?, self.memory.to_mib()?))
    }
}

/// What the node agent reports it runs (informational: the controller schedules from its own ledger).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct HearthNodeStatus {
    /// Sandboxes this agent is running now.
    #[serde(default)]
    pub sandboxes: u32,
    /// vCPUs held by them.
    #[serde(default)]
    pub allocated_cpu: u32,
    /// MiB held by them.
    #[serde(default)]
    pub allocated_memory_mib: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updated: Option<Time>,
}
