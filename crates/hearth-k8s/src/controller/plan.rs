//! One controller pass as a pure function: from a consistent snapshot of Sandboxes, HearthNodes and
//! node Leases (and the time) to the writes that bring the cluster to the desired state. The ledger is
//! rebuilt from the snapshot on every pass (the snapshot is a fresh quorum list and every write of the
//! previous pass has completed before it is taken), so placements never double-count or miss a binding.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::crd::{reason, HearthNode, Phase, Sandbox, FINALIZER};
use crate::lease::{is_fresh, node_lease_name};
use crate::schedule::{place, Ledger, NodeInfo, PendingSandbox};
use crate::status;

/// One write. Status writes carry the whole object with its resourceVersion (optimistic concurrency).
#[derive(Clone, Debug)]
pub enum Action {
    /// Pending -> Scheduled on `node` (the object holds the new status).
    Bind { sandbox: Box<Sandbox>, node: String },
    /// Any other status change (Unschedulable note, NodeLost, InvalidSpec).
    SetStatus { sandbox: Box<Sandbox> },
    /// Drop `hearth.dev/vm`: no node will ever stop a VM for it.
    RemoveFinalizer { sandbox: Box<Sandbox> },
    /// TTL after finishing elapsed.
    Delete { sandbox: Box<Sandbox> },
}

/// The nodes whose Lease is fresh, as the scheduler sees them.
pub fn node_infos(
    nodes: &[HearthNode],
    leases: &HashMap<String, Lease>,
    now: Timestamp,
) -> Vec<NodeInfo> {
    nodes
        .iter()
        .filter_map(|n| {
            let name = n.name_any();
            let (vcpus, memory_mib) = n.spec.capacity.parse().ok()?;
            let ready = leases
                .get(&node_lease_name(&name))
                .is_some_and(|l| is_fresh(l, now));
            Some(NodeInfo {
                labels: n.labels().clone(),
                capacity: crate::crd::Demand { vcpus, memory_mib },
                ready,
                name,
            })
        })
        .collect()
}

fn with_status(s: &Sandbox, status: crate::crd::SandboxStatus) -> Box<Sandbox> {
    let mut s = s.clone();
    s.status = Some(status);
    Box::new(s)
}

/// Computes the pass. `leases` is keyed by Lease name.
pub fn plan(
    sandboxes: &[Sandbox],
    nodes: &[HearthNode],
    leases: &HashMap<String, Lease>,
    now: Timestamp,
) -> Vec<Action> {
    let infos = node_infos(nodes, leases, now);
    let ready: BTreeMap<&str, bool> = infos.iter().map(|n| (n.name.as_str(), n.ready)).collect();
    let node_ready = |n: &str| ready.get(n).copied().unwrap_or(false);
    let t = Time(now);
    let mut actions = Vec::new();
    let mut ledger = Ledger::new();
    let mut pending = Vec::new();

    for s in sandboxes {
        let phase = s.phase();
        let deleting = s.metadata.deletion_timestamp.is_some();
        let node = s.node_name().map(str::to_string);
        let old = s.status.clone().unwrap_or_default();
        match (phase, &node) {
            (Phase::Scheduled | Phase::Running, Some(n)) if !node_ready(n) => {
                actions.push(Action::SetStatus {
                    sandbox: with_status(s, status::node_lost(&old, n, &t)),
                });
            }
            (Phase::Scheduled | Phase::Running, Some(n)) => {
                ledger.bind(&uid(s), n, s.spec.demand().unwrap_or_default());
            }
            (Phase::Pending, _) if !deleting => pending.push(s),
            _ => {}
        }
        let never_bound = node.is_none();
        let node_gone = node.as_deref().is_some_and(|n| !node_ready(n));
        if deleting && s.finalizers().iter().any(|f| f == FINALIZER) && (never_bound || node_gone) {
            actions.push(Action::RemoveFinalizer {
                sandbox: Box::new(s.clone()),
            });
        }
        if let (true, false, Some(ttl), Some(done)) = (
            phase.is_finished(),
            deleting,
            s.spec.ttl_seconds_after_finished,
            old.completion_time.as_ref(),
        ) {
            let ttl = SignedDuration::from_secs(i64::try_from(ttl).unwrap_or(i64::MAX / 2));
            if done.0.checked_add(ttl).is_ok_and(|at| at <= now) {
                actions.push(Action::Delete {
                    sandbox: Box::new(s.clone()),
                });
            }
        }
    }

    pending.sort_by(|a, b| {
        let key = |s: &Sandbox| {
            (
                s.metadata.creation_timestamp.clone().map(|t| t.0),
                s.namespace(),
                s.name_any(),
            )
        };
        key(a).cmp(&key(b))
    });
    for s in pending {
        let old = s.status.clone().unwrap_or_default();
        let demand = match s.spec.demand() {
            Ok(d) => d,
            Err(e) => {
                let outcome = status::Outcome::Failed {
                    reason: reason::INVALID,
                };
                actions.push(Action::SetStatus {
                    sandbox: with_status(
                        s,
                        status::finished(&old, &outcome, Some(e.to_string()), None, &t),
                    ),
                });
                continue;
            }
        };
        let want = PendingSandbox {
            key: uid(s),
            demand,
            node_selector: s.spec.node_selector.clone(),
        };
        match place(&want, &infos, &mut ledger) {
            Ok(node) => actions.push(Action::Bind {
                sandbox: with_status(s, status::scheduled(&old, &node, &t)),
                node,
            }),
            Err(why) if old.message.as_deref() != Some(why.0.as_str()) => {
                actions.push(Action::SetStatus {
                    sandbox: with_status(s, status::unschedulable(&old, &why.0, &t)),
                });
            }
            Err(_) => {}
        }
    }
    actions
}

fn uid(s: &Sandbox) -> String {
    s.metadata
        .uid
        .clone()
        .unwrap_or_else(|| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
}

#[cfg(test)]
mod tests;
