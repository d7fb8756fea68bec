//! One controller pass as a pure function: from a consistent snapshot of Sandboxes, HearthNodes and
//! node Leases (and the time) to the writes that bring the cluster to the desired state. The ledger is
//! rebuilt from the snapshot on every pass (the snapshot is a fresh quorum list and every write of the
//! previous pass has completed before it is taken), so placements never double-count or miss a binding.
//!
//! Service sandboxes: a Paused one holds no vCPUs or memory in the ledger (it holds none on its
//! node either) unless `spec.paused` is false again (a resume is asked for: its room is held from
//! then on). A resume that no longer fits because other sandboxes were placed on its node while it
//! was paused is refused by the node, which keeps it Paused (condition `Paused`, reason
//! `ResumeFailed`) and retries until room frees up; it is never moved, since its snapshot lives on
//! that node. At `lifecycle.shutdownTime` the operator deletes one with policy Delete; the node
//! agent stops the VM of either policy by itself.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use crate::crd::{reason, HearthNode, Phase, Sandbox, ShutdownPolicy, FINALIZER};
use crate::lease::{is_fresh, node_lease_name};
use crate::schedule::{place, Ledger, NodeInfo, PendingSandbox};
use crate::status;

/// One write. Status writes carry the whole object with its resourceVersion (optimistic concurrency).
#[derive(Clone, Debug)]
pub enum Action {
    /// Pending -> Scheduled on `node` (the object holds the new status).
    Bind { sandbox: Box<Sandbox>, node: String },
    /// Any other status change (Unschedulable note, NodeLost, InvalidSpec, a Service shut down
    /// before it was placed).
    SetStatus { sandbox: Box<Sandbox> },
    /// Drop `hearth.dev/vm`: no node will ever stop a VM for it.
    RemoveFinalizer { sandbox: Box<Sandbox> },
    /// TTL after finishing elapsed, or a Service's shutdown time with policy Delete came.
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
        let shutdown = shutdown_due(s, now);
        match (phase, &node) {
            (Phase::Scheduled | Phase::Running | Phase::Paused, Some(n)) if !node_ready(n) => {
                actions.push(Action::SetStatus {
                    sandbox: with_status(s, status::node_lost(&old, n, &t)),
                });
            }
            (Phase::Scheduled | Phase::Running, Some(n)) => {
                ledger.bind(&uid(s), n, s.spec.demand().unwrap_or_default());
            }
            // A paused sandbox holds no vCPUs or memory (as on its node), unless it is asked to
            // resume: then its room is kept for it, so nothing placed meanwhile takes it.
            (Phase::Paused, Some(n)) if !s.spec.paused => {
                ledger.bind(&uid(s), n, s.spec.demand().unwrap_or_default());
            }
            (Phase::Pending, _) if !deleting => match shutdown {
                None => pending.push(s),
                Some(ShutdownPolicy::Retain) => {
                    let message = "lifecycle.shutdownTime passed before the sandbox was placed";
                    actions.push(Action::SetStatus {
                        sandbox: with_status(
                            s,
                            status::finished(
                                &old,
                                &status::Outcome::ShutDown,
                                Some(message.into()),
                                None,
                                &t,
                            ),
                        ),
                    });
                }
                Some(ShutdownPolicy::Delete) => {} // deleted below
            },
            _ => {}
        }
        let never_bound = node.is_none();
        let node_gone = node.as_deref().is_some_and(|n| !node_ready(n));
        if deleting && s.finalizers().iter().any(|f| f == FINALIZER) && (never_bound || node_gone) {
            actions.push(Action::RemoveFinalizer {
                sandbox: Box::new(s.clone()),
            });
        }
        // Deleting is the operator's part of a Delete policy (node agents may not delete objects):
        // the finalizer then has the node stop the VM, which its agent also does by itself at the
        // shutdown time.
        if !deleting && shutdown == Some(ShutdownPolicy::Delete) {
            actions.push(Action::Delete {
                sandbox: Box::new(s.clone()),
            });
            continue;
        }
        if let (true, false, Some(ttl), Some(done)) = (
            phase.is_finished(),
            deleting,
            s.spec.ttl_seconds_after_finished,
            old.completion_time.as_ref(),
        ) {
            if ttl_deadline(done, ttl).is_some_and(|at| at <= now) {
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
        let demand = match s.spec.validate() {
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

/// The shutdown policy of a Service sandbox whose `lifecycle.shutdownTime` has come.
fn shutdown_due(s: &Sandbox, now: Timestamp) -> Option<ShutdownPolicy> {
    let lifecycle = s.spec.lifecycle.as_ref().filter(|_| s.spec.is_service())?;
    let at = lifecycle.shutdown_time.as_ref()?;
    (at.0 <= now).then(|| lifecycle.shutdown_policy.unwrap_or_default())
}

fn ttl_deadline(done: &Time, ttl: u64) -> Option<Timestamp> {
    let ttl = SignedDuration::from_secs(i64::try_from(ttl).unwrap_or(i64::MAX / 2));
    done.0.checked_add(ttl).ok()
}

/// The earliest time after `now` at which [`plan`] would act on a clock alone (a Service's
/// shutdown time, a finished Sandbox's TTL), so a loop driven by watches knows when to run a pass
/// without a change. `None`: no such time.
pub fn next_deadline(sandboxes: &[Sandbox], now: Timestamp) -> Option<Timestamp> {
    sandboxes
        .iter()
        .filter(|s| s.metadata.deletion_timestamp.is_none())
        .filter_map(|s| {
            let shutdown = s
                .spec
                .lifecycle
                .as_ref()
                .filter(|_| s.spec.is_service())
                .and_then(|l| l.shutdown_time.as_ref())
                .map(|t| t.0);
            let status = s.status.as_ref();
            let ttl = match (s.phase().is_finished(), s.spec.ttl_seconds_after_finished) {
                (true, Some(ttl)) => status
                    .and_then(|st| st.completion_time.as_ref())
                    .and_then(|done| ttl_deadline(done, ttl)),
                _ => None,
            };
            [shutdown, ttl]
                .into_iter()
                .flatten()
                .filter(|at| *at > now)
                .min()
        })
        .min()
}

fn uid(s: &Sandbox) -> String {
    s.metadata
        .uid
        .clone()
        .unwrap_or_else(|| format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()))
}

#[cfg(test)]
mod service_tests;
#[cfg(test)]
mod tests;
