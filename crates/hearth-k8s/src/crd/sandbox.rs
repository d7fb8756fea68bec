//! The `Sandbox` custom resource (`hearth.dev/v1alpha1`, namespaced): a microVM booted from an OCI image,
//! either one command run to completion (the default) or a long-lived service sandbox
//! (`spec.lifecycle.type: Service`) that stays Running, takes execs and files through the node's HTTP
//! API (reached through `hearth gateway`), may be paused (`spec.paused`), and ends when deleted or at
//! `spec.lifecycle.shutdownTime`. Users write the spec; the controller writes `status.phase =
//! Scheduled` and `status.nodeName`; the node agent writes everything after that. Types only, no I/O.

// kube's `printcolumn(...)` repeats `type_ = "string"` on purpose; clippy reads that as duplicated.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use hearth_net::policy::{Entry, Mode, NetworkPolicy, PolicyError, MAX_ENTRIES, MAX_ENTRY_LEN};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{Quantity, QuantityError};

mod validate;
pub use validate::SpecError;

/// vCPUs a sandbox gets when its spec names none.
pub const DEFAULT_VCPUS: u32 = 1;
/// Memory (MiB) a sandbox gets when its spec names none.
pub const DEFAULT_MEMORY_MIB: u64 = 256;

/// What to run: an image, a command, its environment and limits.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hearth.dev",
    version = "v1alpha1",
    kind = "Sandbox",
    namespaced,
    status = "SandboxStatus",
    shortname = "sbx",
    category = "hearth",
    doc = "A hearth microVM: one command run to completion, or a long-lived service sandbox.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Node", type_ = "string", json_path = ".status.nodeName"),
    printcolumn(name = "Exit", type_ = "integer", json_path = ".status.exitCode"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxSpec {
    /// OCI image reference, e.g. `docker.io/library/python:3.12`.
    pub image: String,
    /// The program and its arguments, run as given (like `docker exec`: the image's Entrypoint and Cmd
    /// do not apply; its Env, WorkingDir and User do). Required (at least one element) for a
    /// run-to-completion Sandbox; must be empty for a Service one (it runs what is exec'd into it).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub command: Vec<String>,
    /// Appended to `command`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub args: Vec<String>,
    /// Environment on top of the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Absolute working directory; default: the image's WorkingDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// vCPUs and memory of the microVM (default 1 vCPU, 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SandboxResources>,
    /// The command is killed and the sandbox Failed (reason Timeout) after this many seconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub timeout_seconds: Option<u64>,
    /// The finished Sandbox object is deleted this many seconds after completion; unset: kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds_after_finished: Option<u64>,
    /// Only nodes (HearthNode objects) carrying all these labels may run it.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Egress of the microVM, in the HTTP API's `network` shape; unset: the node's default policy.
    /// A policy above what the node lets Kubernetes sandboxes have fails the Sandbox (StartFailed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
    /// Run to completion (default) or a long-lived service; when a service ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lifecycle: Option<Lifecycle>,
    /// Service sandboxes only: true saves the running VM to disk on its node and frees its memory and
    /// vCPUs (phase Paused); false again resumes it on the node that holds the snapshot.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub paused: bool,
}

/// How long a Sandbox lives. The field names follow kubernetes-sigs/agent-sandbox's `Lifecycle`
/// (`shutdownTime`, `shutdownPolicy`); `type` is hearth's, since hearth Sandboxes may also be jobs.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Lifecycle {
    /// `RunToCompletion` (default: the command runs, the Sandbox ends Succeeded or Failed) or
    /// `Service` (no command; Running until deleted or `shutdownTime`).
    #[serde(default, rename = "type")]
    #[schemars(schema_with = "lifecycle_type_schema")]
    pub type_: LifecycleType,
    /// Service sandboxes: the absolute time at which the sandbox is shut down.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shutdown_time: Option<Time>,
    /// What happens at `shutdownTime`: `Delete` (default: the object is deleted) or `Retain` (the VM
    /// is stopped, the object kept with phase Succeeded and reason `ShutdownTime`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "shutdown_policy_schema")]
    pub shutdown_policy: Option<ShutdownPolicy>,
    /// Service sandboxes (hearth's own field): after this many seconds without use (no exec,
    /// file transfer, code run or port connection) the microVM is saved to disk on its node and
    /// its memory and vCPUs freed (phase Paused, `spec.paused` untouched); its next use through
    /// the node's API or the gateway resumes it first. At least 1.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub idle_pause_seconds: Option<u64>,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum LifecycleType {
    #[default]
    RunToCompletion,
    Service,
}

#[derive(Deserialize, Serialize, Clone, Copy, Debug, Default, PartialEq, Eq, JsonSchema)]
pub enum ShutdownPolicy {
    #[default]
    Delete,
    Retain,
}

fn lifecycle_type_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "RunToCompletion (default) or Service.",
        "type": "string",
        "enum": ["RunToCompletion", "Service"]
    })
}

fn shutdown_policy_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Delete (default) or Retain.",
        "type": "string",
        "enum": ["Delete", "Retain"]
    })
}

/// A sandbox's egress policy as written in `spec.network`: `{mode, allow, deny}` exactly like the
/// HTTP API's `network`, parsed by `hearth_net::policy` when the node runs it (so a malformed entry
/// fails that one Sandbox, never the watch of all of them).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SandboxNetwork {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "network_mode_schema")]
    pub mode: Option<Mode>,
    /// Destinations let out: a domain (`api.example.com`), a wildcard (`*.example.org`: names
    /// below it), an IP or a CIDR, each optionally with `:port`. Needs mode `allow` or `open`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENTRIES), inner(length(min = 1, max = MAX_ENTRY_LEN)))]
    pub allow: Vec<String>,
    /// Destinations refused whatever `allow` says (same forms).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = MAX_ENTRIES), inner(length(min = 1, max = MAX_ENTRY_LEN)))]
    pub deny: Vec<String>,
}

impl SandboxNetwork {
    /// The validated policy, by the same rules as the HTTP API's.
    pub fn policy(&self) -> Result<NetworkPolicy, PolicyError> {
        let entries = |list: &[String]| -> Result<Vec<Entry>, PolicyError> {
            list.iter().map(|e| e.parse()).collect()
        };
        NetworkPolicy::new(
            self.mode.unwrap_or_default(),
            entries(&self.allow)?,
            entries(&self.deny)?,
        )
    }
}

/// The mode as a plain string enum (see [`phase_schema`] for why not the derived one).
fn network_mode_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "none (the default: nothing leaves, DNS answers REFUSED), allow (only what \
            `allow` lists) or open (the internet; never the node, other sandboxes, link-local or \
            metadata addresses, or private ranges unless `allow` lists them).",
        "type": "string",
        "enum": ["none", "allow", "open"]
    })
}

#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
pub struct EnvVar {
    pub name: String,
    /// Unset: empty. (Not a schema default: a 1.20 API server mangles an empty-string default.)
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub value: Option<String>,
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SandboxResources {
    /// CPU, rounded up to whole vCPUs (`500m` -> 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu: Option<Quantity>,
    /// Memory, rounded up to MiB (`512Mi`, `1Gi`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<Quantity>,
}

/// The resources a sandbox occupies on its node, in the units node admission counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub struct Demand {
    pub vcpus: u32,
    pub memory_mib: u64,
}

impl SandboxSpec {
    /// The vCPUs and memory this sandbox needs, defaults applied.
    pub fn demand(&self) -> Result<Demand, QuantityError> {
        let res = self.resources.clone().unwrap_or_default();
        Ok(Demand {
            vcpus: match &res.cpu {
                Some(q) => q.to_vcpus()?.max(1),
                None => DEFAULT_VCPUS,
            },
            memory_mib: match &res.memory {
                Some(q) => q.to_mib()?.max(1),
                None => DEFAULT_MEMORY_MIB,
            },
        })
    }

    /// The egress policy `spec.network` asks for; `None` when unset (the node's default applies).
    pub fn network_policy(&self) -> Result<Option<NetworkPolicy>, PolicyError> {
        self.network
            .as_ref()
            .map(SandboxNetwork::policy)
            .transpose()
    }

    /// Whether this is a long-lived service sandbox (`lifecycle.type: Service`).
    pub fn is_service(&self) -> bool {
        self.lifecycle
            .as_ref()
            .is_some_and(|l| l.type_ == LifecycleType::Service)
    }

    /// `command` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        self.command.iter().chain(&self.args).cloned().collect()
    }
}

/// Where a sandbox is in its life. Pending -> Scheduled -> Running -> Succeeded | Failed; Pending or
/// Scheduled may also go straight to Failed (node lost, refused by the node, invalid spec). A Service
/// sandbox is Running once its VM runs (not before it boots, unlike a run-to-completion one), may go
/// Running -> Paused -> Running any number of times, and ends Succeeded (reason `ShutdownTime`) or
/// Failed (`VMLost`, `NodeLost`) from Running or Paused.
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    Pending,
    Scheduled,
    Running,
    Paused,
    Succeeded,
    Failed,
}

impl Phase {
    pub fn is_finished(self) -> bool {
        matches!(self, Phase::Succeeded | Phase::Failed)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Pending => "Pending",
            Phase::Scheduled => "Scheduled",
            Phase::Running => "Running",
            Phase::Paused => "Paused",
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// The phase as a plain string enum: the derived schema of `Option<Phase>` lists `null` among the enum
/// values, which kubectl's client-side validation rejects.
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Pending, Scheduled, Running, Paused, Succeeded or Failed.",
        "type": "string",
        "enum": ["Pending", "Scheduled", "Running", "Paused", "Succeeded", "Failed"]
    })
}

/// Machine-readable reasons written to `status.reason`.
pub mod reason {
    /// The node's lease expired while the sandbox was Scheduled or Running there.
    pub const NODE_LOST: &str = "NodeLost";
    /// The command ran longer than `timeoutSeconds`.
    pub const TIMEOUT: &str = "Timeout";
    /// The command exited non-zero.
    pub const ERROR: &str = "Error";
    /// The command exited 0.
    pub const COMPLETED: &str = "Completed";
    /// The node agent restarted while the command ran: the result is lost and it is not run again.
    pub const AGENT_RESTARTED: &str = "NodeAgentRestarted";
    /// The node could not boot the sandbox (bad image, node refused it).
    pub const START_FAILED: &str = "StartFailed";
    /// No node can take the sandbox now (kept Pending).
    pub const UNSCHEDULABLE: &str = "Unschedulable";
    /// The spec cannot be run anywhere (bad quantity).
    pub const INVALID: &str = "InvalidSpec";
    /// A Service sandbox reached `lifecycle.shutdownTime`: its VM was stopped and it is Succeeded
    /// (policy Delete: the operator then deletes the object).
    pub const SHUTDOWN_TIME: &str = "ShutdownTime";
    /// A Service sandbox's VM ended on its own: it exited or was killed, the node ended it (its
    /// maximum TTL, `--max-paused`), or it was gone when the node agent restarted. The message says
    /// which.
    pub const VM_LOST: &str = "VMLost";
    /// `spec.paused` could not be carried out (condition `Paused`; the phase is unchanged).
    pub const PAUSE_FAILED: &str = "PauseFailed";
    /// `spec.paused: false` could not be carried out (condition `Paused`; the phase stays Paused
    /// and the node retries, e.g. until its capacity has room again).
    pub const RESUME_FAILED: &str = "ResumeFailed";
}

#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(schema_with = "phase_schema")]
    pub phase: Option<Phase>,
    /// The HearthNode the sandbox is bound to (set once by the controller).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    /// Service sandboxes: the id of the sandbox in its node's HTTP API (`/v1/sandboxes/{id}`), set by
    /// the node agent once the VM runs. `hearth gateway` proxies to `nodeName`'s API with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sandbox_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// One word why the phase is what it is (see `reason::*`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<Time>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_time: Option<Time>,
    /// The last few KiB of the command's stdout and stderr, interleaved as produced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tail: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<SandboxCondition>,
}

/// A condition in the usual Kubernetes shape: `Scheduled`, `Started`, `Finished`, and for Service
/// sandboxes `Paused` (True while paused; its reason and message say why a pause or resume failed).
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SandboxCondition {
    #[serde(rename = "type")]
    pub type_: String,
    /// "True", "False" or "Unknown".
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    pub last_transition_time: Time,
}

impl Sandbox {
    /// The phase, treating a missing status as Pending.
    pub fn phase(&self) -> Phase {
        self.status
            .as_ref()
            .and_then(|s| s.phase)
            .unwrap_or(Phase::Pending)
    }

    pub fn node_name(&self) -> Option<&str> {
        self.status.as_ref().and_then(|s| s.node_name.as_deref())
    }
}

#[cfg(test)]
mod tests;
