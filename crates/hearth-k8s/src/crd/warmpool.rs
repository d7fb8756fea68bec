//! The `SandboxWarmPool` custom resource (`hearth.dev/v1alpha1`, namespaced): keep `replicas` Service
//! Sandboxes of a template booted and ready, so a `SandboxClaim` gets a running VM at once. Same
//! shape as kubernetes-sigs/agent-sandbox's `SandboxWarmPool` (`replicas`, `sandboxTemplateRef`,
//! status `replicas`/`readyReplicas`/`selector`, scale subresource, so `kubectl scale` works); no
//! `updateStrategy` yet: a changed template always recreates the unclaimed members (their
//! `Recreate`). Types only, no I/O.

// kube's `printcolumn(...)` repeats `type_ = "string"` on purpose; clippy reads that as duplicated.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::template::SandboxTemplateRef;

/// Label on a pool's unclaimed members: the pool's name. Adoption by a claim removes it.
pub const POOL_LABEL: &str = "hearth.dev/pool";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hearth.dev",
    version = "v1alpha1",
    kind = "SandboxWarmPool",
    namespaced,
    status = "SandboxWarmPoolStatus",
    shortname = "sbxwp",
    category = "hearth",
    doc = "Ready Service Sandboxes of one template, kept warm for SandboxClaims to take.",
    scale(
        spec_replicas_path = ".spec.replicas",
        status_replicas_path = ".status.replicas",
        label_selector_path = ".status.selector"
    ),
    printcolumn(
        name = "Template",
        type_ = "string",
        json_path = ".spec.sandboxTemplateRef.name"
    ),
    printcolumn(name = "Desired", type_ = "integer", json_path = ".spec.replicas"),
    printcolumn(name = "Ready", type_ = "integer", json_path = ".status.readyReplicas"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolSpec {
    /// How many unclaimed sandboxes to keep (claimed ones are replaced).
    #[schemars(range(min = 0, max = 1000))]
    pub replicas: i32,
    /// The SandboxTemplate (same namespace) its sandboxes are made from.
    pub sandbox_template_ref: SandboxTemplateRef,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxWarmPoolStatus {
    /// Unclaimed members of the current template, ready or still starting.
    #[serde(default)]
    pub replicas: i32,
    /// Of those, the ones Running (a claim may take them).
    #[serde(default)]
    pub ready_replicas: i32,
    /// The label selector of the members (`hearth.dev/pool=NAME`), for the scale subresource.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub selector: Option<String>,
    /// Why the pool cannot be filled, if it cannot (e.g. its template does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}
