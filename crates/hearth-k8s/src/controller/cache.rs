//! The operator's view of the cluster: kube-runtime reflector stores of Sandboxes, HearthNodes and the
//! node Leases, kept current by watches (one initial quorum list each, then only changes), plus an
//! overlay of the operator's own writes that the watches have not delivered yet.
//!
//! The overlay is what keeps placement exact with a cache: a pass plans from [`Caches::snapshot`], and a
//! write of the previous pass (a Sandbox bound to a node) must be in it, or that node's capacity would be
//! counted twice. Each successful write records the object as the server returned it and the
//! resourceVersions it replaced; while the store still holds one of those, the snapshot shows the
//! written object (or leaves a deleted one out); once the store shows anything else, the store has seen
//! the write (events arrive in order) and the overlay entry goes. No resourceVersion is ever compared
//! for order.
//!
//! Watches are restarted with backoff after errors; [`Caches::healthy`] says whether all three are
//! currently delivering, and the operator plans only then.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use futures::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, ResourceExt};
use tokio::sync::Notify;

use super::AbortOnDrop;
use crate::crd::{HearthNode, Sandbox};
use crate::lease::is_fresh;

/// What the watched API objects are: the Sandbox and HearthNode APIs (with the node label selector) and
/// the Lease API of the node Leases' namespace.
pub struct Sources {
    pub sandboxes: Api<Sandbox>,
    pub nodes: Api<HearthNode>,
    pub node_selector: Option<String>,
    pub leases: Api<Lease>,
}

/// One consistent-enough view for one pass (the inputs of `plan::plan`).
pub struct Snapshot {
    pub sandboxes: Vec<Sandbox>,
    pub nodes: Vec<HearthNode>,
    /// Keyed by Lease name.
    pub leases: HashMap<String, Lease>,
}

/// A write of ours the watch may not have delivered yet.
#[derive(Debug)]
struct Written {
    /// resourceVersions our writes replaced: while the store shows one of them, it lags us.
    replaced: Vec<String>,
    /// The object as the server returned it; None: deleted.
    now: Option<Arc<Sandbox>>,
}

pub struct Caches {
    sandboxes: Store<Sandbox>,
    nodes: Store<HearthNode>,
    leases: Store<Lease>,
    healthy: Arc<[AtomicBool; 3]>,
    /// Lease names that were fresh at the last snapshot: a change to any other Lease may make a node
    /// ready, so it wakes the operator; renewals of fresh ones (most Lease traffic) do not.
    fresh: Arc<Mutex<HashSet<String>>>,
    overlay: Mutex<Overlay>,
}

impl Caches {
    /// Starts the three watches (stopped when the returned guard drops). `wake` is notified on every
    /// Sandbox or HearthNode change and on Lease changes that may make a node ready.
    pub fn start(src: Sources, wake: Arc<Notify>) -> (Self, AbortOnDrop<()>) {
        let (sandboxes, sandbox_writer) = reflector::store();
        let (nodes, node_writer) = reflector::store();
        let (leases, lease_writer) = reflector::store();
        let node_config = match &src.node_selector {
            Some(sel) => watcher::Config::default().labels(sel),
            None => watcher::Config::default(),
        };
        let healthy: Arc<[AtomicBool; 3]> = Arc::new(Default::default());
        let fresh = Arc::new(Mutex::new(HashSet::new()));
        // Managed fields are not read here and are a large share of each object: not kept.
        let s = reflector::reflector(
            sandbox_writer,
            watcher(src.sandboxes, watcher::Config::default())
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear()),
        )
        .map(|e| (0, e.map(|_| true)));
        let n = reflector::reflector(
            node_writer,
            watcher(src.nodes, node_config)
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear()),
        )
        .map(|e| (1, e.map(|_| true)));
        let fresh_now = fresh.clone();
        let l = reflector::reflector(
            lease_writer,
            watcher(src.leases, watcher::Config::default())
                .default_backoff()
                .modify(|o| o.managed_fields_mut().clear()),
        )
        .map(move |e| {
            let wakes = match &e {
                Ok(watcher::Event::Apply(l)) => !lock(&fresh_now).contains(&l.name_any()),
                Ok(_) => true,
                Err(_) => false,
            };
            (2, e.map(|_| wakes))
        });
        let health = healthy.clone();
        let task = tokio::spawn(async move {
            let mut all = std::pin::pin!(futures::stream::select(futures::stream::select(s, n), l));
            while let Some((i, event)) = all.next().await {
                match event {
                    Ok(wakes) => {
                        health[i].store(true, Ordering::Release);
                        if wakes {
                            wake.notify_one();
                        }
                    }
                    Err(e) => {
                        health[i].store(false, Ordering::Release);
                        tracing::warn!(watch = ["Sandboxes", "HearthNodes", "Leases"][i], "{e}");
                    }
                }
            }
        });
        let caches = Self {
            sandboxes,
            nodes,
            leases,
            healthy,
            fresh,
            overlay: Mutex::new(Overlay::default()),
        };
        (caches, AbortOnDrop(task))
    }

    /// Waits until each store holds its initial list.
    pub async fn ready(&self) {
        // The writers live as long as the watch task; if it is gone, so is the operator.
        let _ = tokio::try_join!(
            self.sandboxes.wait_until_ready(),
            self.nodes.wait_until_ready(),
            self.leases.wait_until_ready(),
        );
    }

    /// Whether the Sandbox cache holds a warm-pool member (`hearth.dev/pool` label).
    pub fn has_pool_members(&self) -> bool {
        self.sandboxes
            .find(|s| crate::controller::pools::pool_of(s).is_some())
            .is_some()
    }

    /// The Sandboxes as the pools-and-claims pass plans from them: the store with our placement
    /// writes applied (that pass's own writes are checked by the operator with
    /// [`Caches::stored`]).
    pub fn sandboxes(&self) -> Vec<Sandbox> {
        lock(&self.overlay).apply(self.sandboxes.state())
    }

    /// The stored Sandbox `name` of namespace `ns`, as the watch last delivered it.
    pub fn stored(&self, ns: &str, name: &str) -> Option<Arc<Sandbox>> {
        self.sandboxes.get(&ObjectRef::new(name).within(ns))
    }

    /// Whether every watch delivered since its last error.
    pub fn healthy(&self) -> bool {
        self.healthy.iter().all(|h| h.load(Ordering::Acquire))
    }

    /// The objects to plan from, with our undelivered writes applied. `now` decides which Leases count
    /// as fresh for waking.
    pub fn snapshot(&self, now: Timestamp) -> Snapshot {
        let sandboxes = self.sandboxes();
        let leases: HashMap<String, Lease> = self
            .leases
            .state()
            .into_iter()
            .map(|l| (l.name_any(), Lease::clone(&l)))
            .collect();
        *lock(&self.fresh) = leases
            .iter()
            .filter(|(_, l)| is_fresh(l, now))
            .map(|(n, _)| n.clone())
            .collect();
        Snapshot {
            sandboxes,
            nodes: self
                .nodes
                .state()
                .into_iter()
                .map(|n| HearthNode::clone(&n))
                .collect(),
            leases,
        }
    }

    /// Records a successful write of `before` (as planned from the last snapshot); `after` is the
    /// object the server returned, None when it was deleted.
    pub fn wrote(&self, before: &Sandbox, after: Option<Sandbox>) {
        lock(&self.overlay).wrote(before, after);
    }

    /// How many writes the watches had not delivered at the last snapshot.
    pub fn undelivered(&self) -> usize {
        lock(&self.overlay).undelivered()
    }
}

/// Our writes the Sandbox watch has not delivered yet, by uid.
#[derive(Debug, Default)]
pub struct Overlay {
    written: HashMap<String, Written>,
}

impl Overlay {
    /// The stored Sandboxes with our undelivered writes applied; forgets writes the store has seen.
    pub fn apply(&mut self, stored: Vec<Arc<Sandbox>>) -> Vec<Sandbox> {
        let mut seen = HashSet::with_capacity(self.written.len());
        let mut out = Vec::with_capacity(stored.len());
        for s in stored {
            let uid = s.uid().unwrap_or_default();
            let lagging = self.written.get(&uid).filter(|w| {
                s.resource_version()
                    .is_some_and(|rv| w.replaced.contains(&rv))
            });
            match lagging {
                Some(w) => {
                    if let Some(now) = &w.now {
                        out.push(Sandbox::clone(now));
                    }
                    seen.insert(uid);
                }
                None => out.push(Sandbox::clone(&s)),
            }
        }
        self.written.retain(|uid, _| seen.contains(uid));
        out
    }

    /// Records a successful write of `before`; `after` is what the server returned (None: deleted).
    pub fn wrote(&mut self, before: &Sandbox, after: Option<Sandbox>) {
        let (Some(uid), Some(rv)) = (before.uid(), before.resource_version()) else {
            return;
        };
        let entry = self.written.entry(uid).or_insert_with(|| Written {
            replaced: Vec::new(),
            now: None,
        });
        entry.replaced.push(rv);
        entry.now = after.map(|mut a| {
            a.managed_fields_mut().clear();
            Arc::new(a)
        });
    }

    /// Writes not yet seen in the store.
    pub fn undelivered(&self) -> usize {
        self.written.len()
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests;
