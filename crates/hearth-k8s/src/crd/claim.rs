//! The `SandboxClaim` custom resource (`hearth.dev/v1alpha1`, namespaced): "give me a Service Sandbox of
//! this template". The operator hands it a ready member of a warm pool of that template, or creates a
//! fresh Sandbox, owned by the claim; deleting the claim deletes that Sandbox. Shaped after
//! kubernetes-sigs/agent-sandbox's `SandboxClaim` (`sandboxTemplateRef`, `lifecycle.shutdownTime` /
//! `shutdownPolicy`, status `sandbox.name`, conditions). Differences: the lifecycle is copied onto the
//! Sandbox, whose own shutdown handling enforces it (theirs is enforced on the claim), and the status
//! also mirrors the Sandbox's `phase`. Types only, no I/O.

// kube's `printcolumn(...)` repeats `type_ = "string"` on purpose; clippy reads that as duplicated.
#![allow(clippy::duplicated_attributes)]

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::sandbox::{Lifecycle, LifecycleType, Phase, SandboxCondition, ShutdownPolicy};
use super::template::SandboxTemplateRef;

/// Label on a claimed Sandbox: the claim's name (the ownerReference, by uid, is what counts).
pub const CLAIM_LABEL: &str = "hearth.dev/claim";
/// Finalizer on a claim: its Sandbox is deleted before the claim goes (no garbage collector needed).
pub const CLAIM_FINALIZER: &str = "hearth.dev/claim";

#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hearth.dev",
    version = "v1alpha1",
    kind = "SandboxClaim",
    namespaced,
    status = "SandboxClaimStatus",
    shortname = "sbxc",
    category = "hearth",
    doc = "A request for a Service Sandbox of a template, served from a warm pool when one is ready.",
    printcolumn(
        name = "Template",
        type_ = "string",
        json_path = ".spec.sandboxTemplateRef.name"
    ),
    printcolumn(name = "Sandbox", type_ = "string", json_path = ".status.sandbox.name"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimSpec {
    /// The SandboxTemplate (same namespace) the Sandbox is made from.
    pub sandbox_template_ref: SandboxTemplateRef,
    /// When the claimed Sandbox shuts down; copied onto it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<ClaimLifecycle>,
}

/// agent-sandbox's claim `Lifecycle`: the Sandbox's `lifecycle` without `type` (always Service).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ClaimLifecycle {
    /// The absolute time at which the Sandbox is shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<Time>,
    /// `Delete` (default: the Sandbox object is deleted, then the claim) or `Retain`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "shutdown_policy_schema")]
    pub shutdown_policy: Option<ShutdownPolicy>,
}

impl ClaimLifecycle {
    /// The Sandbox lifecycle this asks for.
    pub fn to_sandbox(&self) -> Lifecycle {
        Lifecycle {
            type_: LifecycleType::Service,
            shutdown_time: self.shutdown_time.clone(),
            shutdown_policy: self.shutdown_policy,
            // A claim may be served by a warm pool's Sandbox, booted before it was asked for.
            idle_pause_seconds: None,
        }
    }
}

fn shutdown_policy_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Delete (default) or Retain.",
        "type": "string",
        "enum": ["Delete", "Retain"]
    })
}

fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "The claimed Sandbox's phase: Pending, Scheduled, Running, Paused, Succeeded or Failed.",
        "type": "string",
        "enum": ["Pending", "Scheduled", "Running", "Paused", "Succeeded", "Failed"]
    })
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxClaimStatus {
    /// The Sandbox this claim holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox: Option<ClaimedSandbox>,
    /// That Sandbox's phase.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    /// `Ready`: True when the Sandbox is Running; reason says why not otherwise.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<SandboxCondition>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct ClaimedSandbox {
    /// Name of the Sandbox (same namespace).
    pub name: String,
}

/// Machine-readable reasons of a claim's `Ready` condition.
pub mod claim_reason {
    /// The Sandbox is Running.
    pub const RUNNING: &str = "SandboxRunning";
    /// The Sandbox exists and is starting (Pending, Scheduled) or paused.
    pub const STARTING: &str = "SandboxNotRunning";
    /// The Sandbox finished (Succeeded, Failed).
    pub const FINISHED: &str = "SandboxFinished";
    /// The Sandbox this claim held was deleted; a claim is never given a second one.
    pub const SANDBOX_DELETED: &str = "SandboxDeleted";
    /// `sandboxTemplateRef` names no SandboxTemplate in the namespace.
    pub const TEMPLATE_NOT_FOUND: &str = "TemplateNotFound";
    /// A Sandbox named like the claim exists and belongs to something else.
    pub const NAME_TAKEN: &str = "SandboxNameTaken";
    /// Nothing assigned yet (the operator has not acted).
    pub const PENDING: &str = "Pending";
}
