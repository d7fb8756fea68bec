//! Claims as a pure function: from one namespace's `SandboxClaim`s, templates, pools and Sandboxes to
//! the writes that give each claim exactly one Sandbox. A claim's Sandbox is the one whose controller
//! ownerReference carries the claim's uid. A claim without one adopts a ready member of a pool of its
//! template (same template spec), oldest first, never one another claim takes in the same pass; the
//! adoption is a merge patch guarded by the member's resourceVersion (pool label off, claim label and
//! ownerReference on, the claim's lifecycle copied), so two claims racing for one member cannot both
//! win. Failing that, a fresh Sandbox named like the claim is created from the template. A claim
//! carries the `hearth.dev/claim` finalizer, added before it gets a Sandbox: deleting the claim
//! deletes its Sandbox, then the finalizer goes (no garbage collector needed). A claim whose Sandbox
//! was deleted is not given another one. The I/O is in [`apply`].

pub mod apply;

use std::collections::HashSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::ObjectMeta;
use kube::{Resource, ResourceExt};

pub use apply::{
    any_pools_or_claims, reconcile_pools_and_claims, reconcile_with, shows_all, PassOutcome, Wrote,
    FIELD_MANAGER,
};

use super::pools::{is_ready, pool_of, template_labels, Write};
use crate::crd::{
    claim_reason, ClaimedSandbox, Phase, Sandbox, SandboxClaim, SandboxClaimStatus,
    SandboxCondition, SandboxTemplate, SandboxWarmPool, ShutdownPolicy, CLAIM_FINALIZER,
    CLAIM_LABEL, POOL_LABEL, TEMPLATE_HASH_LABEL,
};

/// The writes for one claim, to be executed in order, stopping at the first that fails.
pub type Sequence = Vec<Write>;

/// Sequences for every claim of one namespace (oldest claim first, so it gets the oldest member).
pub fn plan_claims(
    claims: &[SandboxClaim],
    templates: &[SandboxTemplate],
    pools: &[SandboxWarmPool],
    sandboxes: &[Sandbox],
    now: Timestamp,
) -> Vec<Sequence> {
    let mut claims: Vec<&SandboxClaim> = claims.iter().collect();
    claims.sort_by_key(|c| (c.creation_timestamp().map(|t| t.0), c.name_any()));
    let mut taken = HashSet::new();
    claims
        .into_iter()
        .map(|c| plan_claim(c, templates, pools, sandboxes, &mut taken, now))
        .filter(|seq| !seq.is_empty())
        .collect()
}

fn owned_by<'a>(claim: &SandboxClaim, sandboxes: &'a [Sandbox]) -> Vec<&'a Sandbox> {
    let uid = claim.uid();
    sandboxes
        .iter()
        .filter(|s| {
            s.owner_references()
                .iter()
                .any(|o| o.controller == Some(true) && Some(&o.uid) == uid.as_ref())
        })
        .collect()
}

fn plan_claim(
    claim: &SandboxClaim,
    templates: &[SandboxTemplate],
    pools: &[SandboxWarmPool],
    sandboxes: &[Sandbox],
    taken: &mut HashSet<String>,
    now: Timestamp,
) -> Sequence {
    let mut seq = Vec::new();
    let mut owned = owned_by(claim, sandboxes);
    let has_finalizer = claim.finalizers().iter().any(|f| f == CLAIM_FINALIZER);
    if claim.metadata.deletion_timestamp.is_some() {
        for s in owned
            .iter()
            .filter(|s| s.metadata.deletion_timestamp.is_none())
        {
            seq.push(delete_sandbox(s));
        }
        if seq.is_empty() && has_finalizer {
            seq.push(finalizers(claim, false));
        }
        return seq;
    }
    let old = claim.status.clone().unwrap_or_default();
    let held = old.sandbox.as_ref().map(|s| s.name.as_str());
    // Keep the one the status names (else the oldest); a second one can only come from two
    // reconcilers acting at once: delete it.
    owned.sort_by_key(|s| {
        (
            Some(s.name_any().as_str()) != held,
            s.creation_timestamp().map(|t| t.0),
        )
    });
    if let Some((keep, extra)) = owned.split_first() {
        seq.extend(extra.iter().map(|s| delete_sandbox(s)));
        push_status(&mut seq, claim, mirror(&old, keep, now));
        return seq;
    }
    if held.is_some() {
        let policy = claim
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.shutdown_policy);
        let expired = claim
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.shutdown_time.as_ref())
            .is_some_and(|t| t.0 <= now);
        if expired && policy.unwrap_or_default() == ShutdownPolicy::Delete {
            return vec![Write::DeleteClaim(Box::new(claim.clone()))];
        }
        let status = not_ready(&old, old.phase, claim_reason::SANDBOX_DELETED, None, now);
        push_status(&mut seq, claim, status);
        return seq;
    }
    let template_name = &claim.spec.sandbox_template_ref.name;
    let Some(template) = templates.iter().find(|t| &t.name_any() == template_name) else {
        let msg = format!("SandboxTemplate {template_name:?} not found in this namespace");
        let status = not_ready(&old, None, claim_reason::TEMPLATE_NOT_FOUND, Some(msg), now);
        push_status(&mut seq, claim, status);
        return seq;
    };
    if !has_finalizer {
        seq.push(finalizers(claim, true));
    }
    let (sandbox_name, phase, write) = match pick_member(template, pools, sandboxes, taken) {
        Some(m) => {
            taken.insert(m.uid().unwrap_or_default());
            (m.name_any(), m.phase(), adopt(claim, m))
        }
        None => {
            let name = claim.name_any();
            if sandboxes.iter().any(|s| s.name_any() == name) {
                let msg = format!("a Sandbox named {name:?} exists and is not this claim's");
                let status = not_ready(&old, None, claim_reason::NAME_TAKEN, Some(msg), now);
                push_status(&mut seq, claim, status);
                return seq;
            }
            (name, Phase::Pending, fresh(claim, template))
        }
    };
    seq.push(write);
    let mut status = not_ready(&old, Some(phase), claim_reason::STARTING, None, now);
    status.sandbox = Some(ClaimedSandbox { name: sandbox_name });
    if phase == Phase::Running {
        status.conditions = vec![ready_condition(&old, true, claim_reason::RUNNING, now)];
    }
    push_status(&mut seq, claim, status);
    seq
}

/// The oldest ready member of a pool of `template` made from its current spec, not yet taken.
fn pick_member<'a>(
    template: &SandboxTemplate,
    pools: &[SandboxWarmPool],
    sandboxes: &'a [Sandbox],
    taken: &HashSet<String>,
) -> Option<&'a Sandbox> {
    let name = template.name_any();
    let hash = template.spec.hash();
    let pools: HashSet<String> = pools
        .iter()
        .filter(|p| p.spec.sandbox_template_ref.name == name)
        .map(|p| p.name_any())
        .collect();
    sandboxes
        .iter()
        .filter(|s| pool_of(s).is_some_and(|p| pools.contains(p)))
        .filter(|s| is_ready(s) && s.labels().get(TEMPLATE_HASH_LABEL) == Some(&hash))
        .filter(|s| !taken.contains(&s.uid().unwrap_or_default()))
        .min_by_key(|s| (s.creation_timestamp().map(|t| t.0), s.name_any()))
}

fn claim_labels(claim: &SandboxClaim) -> Option<(String, String)> {
    let name = claim.name_any();
    (name.len() <= 63).then(|| (CLAIM_LABEL.to_string(), name))
}

/// The guarded merge patch that turns pool member `m` into `claim`'s Sandbox.
fn adopt(claim: &SandboxClaim, m: &Sandbox) -> Write {
    let mut lifecycle = m.spec.lifecycle.clone().unwrap_or_default();
    if let Some(l) = &claim.spec.lifecycle {
        lifecycle = l.to_sandbox();
    }
    let mut labels = serde_json::json!({ POOL_LABEL: null });
    if let Some((k, v)) = claim_labels(claim) {
        labels[k] = v.into();
    }
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": m.resource_version(),
            "labels": labels,
            "ownerReferences": claim.controller_owner_ref(&()).into_iter().collect::<Vec<_>>(),
        },
        "spec": { "lifecycle": lifecycle },
    });
    Write::PatchSandbox {
        sandbox: Box::new(m.clone()),
        patch,
    }
}

/// A new Sandbox for `claim`, named like it, owned by it.
fn fresh(claim: &SandboxClaim, template: &SandboxTemplate) -> Write {
    let mut labels = template_labels(template);
    labels.extend(claim_labels(claim));
    let lifecycle = claim.spec.lifecycle.as_ref().map(|l| l.to_sandbox());
    Write::CreateSandbox(Box::new(Sandbox {
        metadata: ObjectMeta {
            name: Some(claim.name_any()),
            namespace: claim.namespace(),
            labels: Some(labels),
            owner_references: claim.controller_owner_ref(&()).map(|o| vec![o]),
            ..Default::default()
        },
        spec: template.spec.sandbox_spec(lifecycle.as_ref()),
        status: None,
    }))
}

fn delete_sandbox(s: &Sandbox) -> Write {
    Write::DeleteSandbox {
        sandbox: Box::new(s.clone()),
        same_version: false,
    }
}

fn finalizers(claim: &SandboxClaim, present: bool) -> Write {
    let mut list: Vec<String> = claim
        .finalizers()
        .iter()
        .filter(|f| *f != CLAIM_FINALIZER)
        .cloned()
        .collect();
    if present {
        list.push(CLAIM_FINALIZER.into());
    }
    Write::ClaimFinalizers {
        claim: Box::new(claim.clone()),
        finalizers: list,
    }
}

fn push_status(seq: &mut Sequence, claim: &SandboxClaim, status: SandboxClaimStatus) {
    if claim.status.as_ref() != Some(&status) {
        seq.push(Write::ClaimStatus {
            claim: Box::new(claim.clone()),
            status,
        });
    }
}

/// The status of a claim holding `s`: its name and phase, Ready when Running.
fn mirror(old: &SandboxClaimStatus, s: &Sandbox, now: Timestamp) -> SandboxClaimStatus {
    let phase = s.phase();
    let (ready, reason) = match phase {
        Phase::Running => (true, claim_reason::RUNNING),
        p if p.is_finished() => (false, claim_reason::FINISHED),
        _ => (false, claim_reason::STARTING),
    };
    SandboxClaimStatus {
        sandbox: Some(ClaimedSandbox { name: s.name_any() }),
        phase: Some(phase),
        conditions: vec![ready_condition(old, ready, reason, now)],
    }
}

fn not_ready(
    old: &SandboxClaimStatus,
    phase: Option<Phase>,
    reason: &str,
    message: Option<String>,
    now: Timestamp,
) -> SandboxClaimStatus {
    let mut cond = ready_condition(old, false, reason, now);
    cond.message = message;
    SandboxClaimStatus {
        sandbox: old.sandbox.clone(),
        phase,
        conditions: vec![cond],
    }
}

/// The `Ready` condition, keeping the old transition time while its status stays the same.
fn ready_condition(
    old: &SandboxClaimStatus,
    ready: bool,
    reason: &str,
    now: Timestamp,
) -> SandboxCondition {
    let status = if ready { "True" } else { "False" };
    let since = old
        .conditions
        .iter()
        .find(|c| c.type_ == "Ready" && c.status == status)
        .map(|c| c.last_transition_time.clone())
        .unwrap_or(Time(now));
    SandboxCondition {
        type_: "Ready".into(),
        status: status.into(),
        reason: Some(reason.into()),
        message: None,
        last_transition_time: since,
    }
}

#[cfg(test)]
mod tests;
