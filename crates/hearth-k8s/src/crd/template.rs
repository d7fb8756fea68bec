//! The `SandboxTemplate` custom resource (`hearth.dev/v1alpha1`, namespaced): the fields of a Service
//! Sandbox, named once, from which `SandboxWarmPool`s keep sandboxes warm and `SandboxClaim`s get
//! theirs. Shaped after kubernetes-sigs/agent-sandbox's `SandboxTemplate`, except that theirs holds a
//! `podTemplate` and ours holds hearth's own sandbox fields (image, resources, network, env,
//! workingDir, nodeSelector: there is no pod). Types and the pure template -> Sandbox mapping; no I/O.

use std::collections::BTreeMap;

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::sandbox::{
    EnvVar, Lifecycle, LifecycleType, SandboxNetwork, SandboxResources, SandboxSpec,
};

/// Label on every Sandbox made from a template: the template's name.
pub const TEMPLATE_LABEL: &str = "hearth.dev/template";
/// Label on every Sandbox made from a template: [`SandboxTemplateSpec::hash`] of the spec it was made from.
pub const TEMPLATE_HASH_LABEL: &str = "hearth.dev/template-hash";

/// What every Sandbox made from this template runs: a long-lived Service sandbox of this image.
#[derive(CustomResource, Deserialize, Serialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "hearth.dev",
    version = "v1alpha1",
    kind = "SandboxTemplate",
    namespaced,
    shortname = "sbxt",
    category = "hearth",
    doc = "The fields of a Service Sandbox that warm pools and claims create Sandboxes from."
)]
#[serde(rename_all = "camelCase")]
pub struct SandboxTemplateSpec {
    /// OCI image reference, e.g. `docker.io/library/python:3.12`.
    pub image: String,
    /// Environment on top of the image's.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub env: Vec<EnvVar>,
    /// Absolute working directory; default: the image's WorkingDir.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_dir: Option<String>,
    /// vCPUs and memory of each microVM (default 1 vCPU, 256Mi).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<SandboxResources>,
    /// Only nodes (HearthNode objects) carrying all these labels may run its sandboxes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// Egress of each microVM (the Sandbox's `network`); unset: the node's default policy.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<SandboxNetwork>,
}

/// A reference to a `SandboxTemplate` in the same namespace (agent-sandbox's `sandboxTemplateRef`).
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
pub struct SandboxTemplateRef {
    /// Name of the SandboxTemplate.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

impl SandboxTemplateSpec {
    /// The Service Sandbox this template describes, with `lifecycle`'s shutdown time and policy
    /// (its type is always Service).
    pub fn sandbox_spec(&self, lifecycle: Option<&Lifecycle>) -> SandboxSpec {
        let mut lifecycle = lifecycle.cloned().unwrap_or_default();
        lifecycle.type_ = LifecycleType::Service;
        SandboxSpec {
            image: self.image.clone(),
            command: vec![],
            args: vec![],
            env: self.env.clone(),
            working_dir: self.working_dir.clone(),
            resources: self.resources.clone(),
            timeout_seconds: None,
            ttl_seconds_after_finished: None,
            node_selector: self.node_selector.clone(),
            network: self.network.clone(),
            lifecycle: Some(lifecycle),
            paused: false,
        }
    }

    /// A short, stable digest of the spec (16 hex digits, a valid label value): Sandboxes carry it in
    /// `hearth.dev/template-hash` so a changed template is told from the one they were made from.
    /// FNV-1a over the canonical JSON (struct fields in declaration order, maps sorted).
    pub fn hash(&self) -> String {
        let json = serde_json::to_vec(self).expect("a template spec serializes");
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in json {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
        format!("{h:016x}")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn template(yaml: &str) -> SandboxTemplateSpec {
        serde_yaml::from_str(yaml).unwrap()
    }

    #[test]
    fn a_template_makes_a_service_sandbox_with_its_fields() {
        let t = template(
            "image: python\nenv: [{name: A, value: b}]\nworkingDir: /w\nresources: {cpu: 2, memory: 512Mi}\nnodeSelector: {zone: a}\nnetwork: {mode: open}\n",
        );
        let s = t.sandbox_spec(None);
        assert!(s.is_service());
        assert!(s.command.is_empty() && !s.paused);
        assert_eq!(s.image, "python");
        assert_eq!(s.working_dir.as_deref(), Some("/w"));
        assert_eq!(s.node_selector["zone"], "a");
        assert_eq!(s.demand().unwrap().vcpus, 2);
        assert_eq!(s.env, t.env);
        assert_eq!(s.network, t.network);
    }

    #[test]
    fn a_claims_lifecycle_is_kept_but_always_as_a_service() {
        let l = Lifecycle {
            type_: LifecycleType::RunToCompletion,
            shutdown_time: None,
            shutdown_policy: Some(super::super::sandbox::ShutdownPolicy::Retain),
            idle_pause_seconds: None,
        };
        let s = template("image: busybox\n").sandbox_spec(Some(&l));
        let got = s.lifecycle.unwrap();
        assert_eq!(got.type_, LifecycleType::Service);
        assert_eq!(got.shutdown_policy, l.shutdown_policy);
    }

    #[test]
    fn the_hash_changes_with_the_spec_and_only_with_it() {
        let a = template("image: busybox\nnodeSelector: {b: '2', a: '1'}\n");
        let same = template("nodeSelector: {a: '1', b: '2'}\nimage: busybox\n");
        let other = template("image: busybox:2\nnodeSelector: {b: '2', a: '1'}\n");
        assert_eq!(a.hash(), same.hash());
        assert_ne!(a.hash(), other.hash());
        assert_eq!(a.hash().len(), 16);
        assert!(a.hash().chars().all(|c| c.is_ascii_hexdigit()));
    }
}
