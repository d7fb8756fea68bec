//! Warm pools as a pure function: from one namespace's `SandboxWarmPool`s, `SandboxTemplate`s and
//! Sandboxes to the writes that keep each pool at `replicas` unclaimed Service Sandboxes of its
//! template's current spec. Members are the Sandboxes labelled `hearth.dev/pool=NAME`; a claim that
//! adopts one removes that label, so the pool refills. Finished members (node lost, failed to start),
//! members made from an older template spec (`hearth.dev/template-hash`) and members beyond `replicas`
//! (not-ready ones first) are deleted; members of a pool that no longer exists too. No I/O: the writes
//! are executed by [`super::claims::reconcile_pools_and_claims`].

use std::collections::{BTreeMap, BTreeSet};

use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

use crate::crd::{
    Phase, Sandbox, SandboxClaim, SandboxClaimStatus, SandboxTemplate, SandboxWarmPool,
    SandboxWarmPoolStatus, POOL_LABEL, TEMPLATE_HASH_LABEL, TEMPLATE_LABEL,
};

/// Most Sandboxes one pool creates in one pass (the next pass creates more): bounds the burst a
/// `kubectl scale --replicas=1000` causes.
pub const MAX_CREATES_PER_PASS: usize = 32;
/// Longest name usable as a label value.
const MAX_LABEL_VALUE: usize = 63;

/// One write of the pools-and-claims reconciler. Every write is guarded: creates by the name (or a
/// server-generated one), deletes and Sandbox patches by the uid and resourceVersion seen, so an object
/// changed meanwhile (adopted, relabelled) is left alone and looked at again next pass.
#[derive(Clone, Debug)]
pub enum Write {
    /// Create this Sandbox (its metadata holds the namespace, name or generateName, labels, owner).
    CreateSandbox(Box<Sandbox>),
    /// Delete this Sandbox if its uid is unchanged and, when `same_version`, its resourceVersion too.
    DeleteSandbox {
        sandbox: Box<Sandbox>,
        same_version: bool,
    },
    /// Merge-patch this Sandbox; the patch carries the resourceVersion seen (fails if it changed).
    PatchSandbox {
        sandbox: Box<Sandbox>,
        patch: serde_json::Value,
    },
    /// Set the pool's status (only the leader's reconciler writes it).
    PoolStatus {
        pool: Box<SandboxWarmPool>,
        status: SandboxWarmPoolStatus,
    },
    /// Set the claim's status (only the leader's reconciler writes it).
    ClaimStatus {
        claim: Box<SandboxClaim>,
        status: SandboxClaimStatus,
    },
    /// Set the claim's finalizers, guarded by its resourceVersion.
    ClaimFinalizers {
        claim: Box<SandboxClaim>,
        finalizers: Vec<String>,
    },
    /// Delete the claim (its shutdown time passed with policy Delete and its Sandbox is gone).
    DeleteClaim(Box<SandboxClaim>),
}

/// Writes for every pool of one namespace, plus deletion of members whose pool is gone. `sandboxes`
/// must have been listed before `pools` (so a member's pool, created before it, is in `pools` unless
/// deleted).
pub fn plan_pools(
    pools: &[SandboxWarmPool],
    templates: &[SandboxTemplate],
    sandboxes: &[Sandbox],
) -> Vec<Write> {
    let names: BTreeSet<String> = pools.iter().map(|p| p.name_any()).collect();
    let mut writes: Vec<Write> = sandboxes
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter(|s| pool_of(s).is_some_and(|p| !names.contains(p)))
        .map(|s| delete(s, true))
        .collect();
    for pool in pools {
        let template = templates
            .iter()
            .find(|t| t.name_any() == pool.spec.sandbox_template_ref.name);
        writes.extend(plan_pool(pool, template, sandboxes));
    }
    writes
}

/// The pool a Sandbox is an unclaimed member of.
pub fn pool_of(s: &Sandbox) -> Option<&str> {
    s.labels().get(POOL_LABEL).map(String::as_str)
}

/// Whether a member may be handed to a claim now: Running, not being deleted.
pub fn is_ready(s: &Sandbox) -> bool {
    s.phase() == Phase::Running && s.metadata.deletion_timestamp.is_none()
}

/// Writes for one pool. `template` is the one its `sandboxTemplateRef` names, if it exists.
pub fn plan_pool(
    pool: &SandboxWarmPool,
    template: Option<&SandboxTemplate>,
    sandboxes: &[Sandbox],
) -> Vec<Write> {
    let name = pool.name_any();
    let want = usize::try_from(pool.spec.replicas).unwrap_or(0);
    let mut writes = Vec::new();
    let mut live: Vec<&Sandbox> = Vec::new();
    let hash = template.map(|t| t.spec.hash());
    for s in sandboxes
        .iter()
        .filter(|s| pool_of(s) == Some(name.as_str()))
    {
        if s.metadata.deletion_timestamp.is_some() {
            continue;
        }
        let stale = hash
            .as_deref()
            .is_some_and(|h| s.labels().get(TEMPLATE_HASH_LABEL).map(String::as_str) != Some(h));
        if s.phase().is_finished() || stale {
            writes.push(delete(s, true));
        } else {
            live.push(s);
        }
    }
    // Keep the ready ones, oldest first; delete the rest beyond `replicas`.
    live.sort_by_key(|s| {
        (
            !is_ready(s),
            s.creation_timestamp().map(|t| t.0),
            s.name_any(),
        )
    });
    for s in live.iter().skip(want) {
        writes.push(delete(s, true));
    }
    let message = if name.len() > MAX_LABEL_VALUE {
        Some(format!(
            "the pool's name is longer than {MAX_LABEL_VALUE} characters, so it cannot label its members"
        ))
    } else if template.is_none() {
        Some(format!(
            "SandboxTemplate {:?} not found in this namespace",
            pool.spec.sandbox_template_ref.name
        ))
    } else {
        None
    };
    if let (None, Some(t)) = (&message, template) {
        let missing = want.saturating_sub(live.len()).min(MAX_CREATES_PER_PASS);
        for _ in 0..missing {
            writes.push(Write::CreateSandbox(Box::new(member(pool, t))));
        }
    }
    let status = SandboxWarmPoolStatus {
        replicas: count(live.len()),
        ready_replicas: count(live.iter().filter(|s| is_ready(s)).count()),
        selector: Some(format!("{POOL_LABEL}={name}")),
        message,
    };
    if pool.status.as_ref() != Some(&status) {
        writes.push(Write::PoolStatus {
            pool: Box::new(pool.clone()),
            status,
        });
    }
    writes
}

fn count(n: usize) -> i32 {
    i32::try_from(n).unwrap_or(i32::MAX)
}

fn delete(s: &Sandbox, same_version: bool) -> Write {
    Write::DeleteSandbox {
        sandbox: Box::new(s.clone()),
        same_version,
    }
}

/// The labels every Sandbox made from `template` carries (the name only when it fits a label value).
pub fn template_labels(template: &SandboxTemplate) -> BTreeMap<String, String> {
    let mut labels = BTreeMap::from([(TEMPLATE_HASH_LABEL.to_string(), template.spec.hash())]);
    let name = template.name_any();
    if name.len() <= MAX_LABEL_VALUE {
        labels.insert(TEMPLATE_LABEL.into(), name);
    }
    labels
}

/// A new member of `pool`: a Service Sandbox of `template`, named `POOL-xxxxx` by the API server,
/// labelled as the pool's and owned by it.
fn member(pool: &SandboxWarmPool, template: &SandboxTemplate) -> Sandbox {
    let mut labels = template_labels(template);
    labels.insert(POOL_LABEL.into(), pool.name_any());
    Sandbox {
        metadata: ObjectMeta {
            generate_name: Some(format!("{}-", pool.name_any())),
            namespace: pool.namespace(),
            labels: Some(labels),
            owner_references: pool.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: template.spec.sandbox_spec(None),
        status: None,
    }
}

#[cfg(test)]
pub(crate) mod tests;
