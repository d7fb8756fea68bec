//! The `Sandbox` custom resource (`hearth.dev/v1alpha1`, namespaced): one command run in a fresh microVM
//! booted from an OCI image. Users write the spec; the controller writes `status.phase = Scheduled` and
//! `status.nodeName`; the node agent writes everything after that. Types only, no I/O.

// kube's `printcolumn(...)` repeats `type_ = "string"` on purpose; clippy reads that as duplicated.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use hearth_net::policy::{Entry, Mode, NetworkPolicy, PolicyError, MAX_ENTRIES, MAX_ENTRY_LEN};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::quantity::{Quantity, QuantityError};

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
    doc = "A command run to completion in a fresh hearth microVM.",
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
    /// do not apply; its Env, WorkingDir and User do). At least one element.
    #[schemars(length(min = 1))]
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

    /// `command` followed by `args`.
    pub fn argv(&self) -> Vec<String> {
        self.command.iter().chain(&self.args).cloned().collect()
    }
}

/// Where a sandbox is in its life. Pending -> Scheduled -> Running -> Succeeded | Failed; Pending or
/// Scheduled may also go straight to Failed (node lost, refused by the node).
#[derive(Deserialize, Serialize, Clone, Copy, Debug, PartialEq, Eq, Hash, JsonSchema)]
pub enum Phase {
    Pending,
    Scheduled,
    Running,
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
            Phase::Succeeded => "Succeeded",
            Phase::Failed => "Failed",
        }
    }
}

/// The phase as a plain string enum: the derived schema of `Option<Phase>` lists `null` among the enum
/// values, which kubectl's client-side validation rejects.
fn phase_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "description": "Pending, Scheduled, Running, Succeeded or Failed.",
        "type": "string",
        "enum": ["Pending", "Scheduled", "Running", "Succeeded", "Failed"]
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

/// A condition in the usual Kubernetes shape: `Scheduled`, `Started`, `Finished`.
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
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SandboxSpec {
        serde_yaml::from_str(&format!("image: busybox\ncommand: [\"true\"]\n{yaml}")).unwrap()
    }

    #[test]
    fn spec_network_maps_to_the_api_policy() {
        assert_eq!(
            spec("").network_policy().unwrap(),
            None,
            "unset: node default"
        );
        let s = spec(
            "network:\n  mode: allow\n  allow: [pypi.example, \"*.cdn.example:443\", 198.51.100.0/24]\n  deny: [bad.cdn.example]\n",
        );
        let api: NetworkPolicy = serde_json::from_value(serde_json::json!({
            "mode": "allow",
            "allow": ["pypi.example", "*.cdn.example:443", "198.51.100.0/24"],
            "deny": ["bad.cdn.example"],
        }))
        .unwrap();
        assert_eq!(s.network_policy().unwrap(), Some(api));
        assert_eq!(
            spec("network:\n  mode: open\n").network_policy().unwrap(),
            Some(NetworkPolicy::new(Mode::Open, vec![], vec![]).unwrap())
        );
        assert_eq!(
            spec("network: {}\n").network_policy().unwrap(),
            Some(NetworkPolicy::none()),
            "like the API, an empty network is mode none"
        );
        // It round-trips as written (the node agent reads what users wrote).
        let back: SandboxSpec = serde_yaml::from_str(&serde_yaml::to_string(&s).unwrap()).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn a_bad_spec_network_is_an_error_not_a_parse_failure() {
        // The object itself deserializes (one bad Sandbox must not break the watch of all)...
        let bad = spec("network:\n  mode: allow\n  allow: [\"exa mple.com\"]\n");
        // ...and the policy says what is wrong, by the API's rules.
        let err = bad.network_policy().unwrap_err().to_string();
        assert!(err.contains("exa mple.com"), "{err}");
        let none_with_allow = spec("network:\n  allow: [pypi.example]\n");
        assert_eq!(
            none_with_allow.network_policy().unwrap_err(),
            PolicyError::AllowWithModeNone
        );
    }

    #[test]
    fn the_crd_schema_lists_the_modes_and_bounds_the_lists() {
        use kube::CustomResourceExt;
        let crd = serde_json::to_value(Sandbox::crd()).unwrap();
        let network = &crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]["properties"]
            ["spec"]["properties"]["network"];
        assert_eq!(
            network["properties"]["mode"]["enum"],
            serde_json::json!(["none", "allow", "open"])
        );
        assert_eq!(network["properties"]["allow"]["maxItems"], MAX_ENTRIES);
        assert_eq!(
            network["properties"]["deny"]["items"]["maxLength"],
            MAX_ENTRY_LEN
        );
    }
}
