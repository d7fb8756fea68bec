//! The operator (`hearth operator`): leader election, then passes of [`plan::plan`] over the watch
//! caches of Sandboxes, HearthNodes and node Leases ([`cache`]), whose writes it executes with bounded
//! concurrency and a bounded rate ([`ratelimit`]), each successful one announced by a Kubernetes Event
//! ([`events`]). A pass runs when a watch delivers a change and at least every `resync` (lease expiry,
//! TTLs). Only the leader writes, and only while its leadership is certainly valid: each term of
//! leadership starts fresh watches (quorum lists, as a list-based pass would read) and plans only once
//! they are synced; a node is declared lost only after a quorum read of its Lease confirms what the
//! cache says.

mod cache;
pub mod claims;
mod events;
pub mod plan;
pub mod pools;
pub mod ratelimit;
mod write;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Future, StreamExt, TryStreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};

use crate::crd::HearthNode;
use crate::error::{Context, K8sError};
use crate::lease::{is_fresh, node_lease_name, LeaderElection};
use cache::{Caches, Snapshot, Sources};
use events::{EventSink, Reporter};
use ratelimit::{RateLimit, TokenBucket};
pub use write::remove_finalizer;

/// Settings of one operator replica.
#[derive(Clone, Debug)]
pub struct OperatorConfig {
    /// This replica's name in the leader Lease (pod name, or host name + pid).
    pub identity: String,
    /// Namespace of the leader Lease and of the node Leases.
    pub namespace: String,
    /// Name of the leader Lease.
    pub leader_lease: String,
    /// How long leadership lasts without renewal; a standby takes over this long after a leader dies.
    pub leader_lease_duration: Duration,
    /// Longest time between passes (changes start a pass at once; this catches expiring Leases, TTLs).
    pub resync: Duration,
    /// Writes in flight at once.
    pub write_concurrency: usize,
    /// Bound on writes and Events per second (one bucket; Events get only spare tokens).
    pub write_rate: RateLimit,
    /// Events waiting to be published at most; more are dropped (and counted).
    pub event_queue: usize,
    /// Only Sandboxes in this namespace (None: all namespaces).
    pub sandbox_namespace: Option<String>,
    /// Only HearthNodes matching this label selector (None: all), e.g. to run one operator per pool.
    pub node_selector: Option<String>,
}

/// The default write bound. Measured with bench/k8s-schedule.sh (kube-apiserver 1.20 + etcd on two
/// shared cores): see bench/README.md for the figures behind it.
pub const DEFAULT_WRITE_RATE: RateLimit = RateLimit {
    per_second: 1000,
    burst: 2000,
};

impl OperatorConfig {
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            namespace: namespace.into(),
            leader_lease: "hearth-operator".into(),
            leader_lease_duration: Duration::from_secs(15),
            resync: Duration::from_secs(1),
            write_concurrency: 32,
            write_rate: DEFAULT_WRITE_RATE,
            event_queue: 16_384,
            sandbox_namespace: None,
            node_selector: None,
        }
    }
}

pub struct Operator {
    client: Client,
    config: OperatorConfig,
    bucket: Arc<TokenBucket>,
}

/// Until when this replica may act as leader (None: not leader).
type Leadership = watch::Receiver<Option<Instant>>;

/// What one term of leadership works with.
struct Term {
    caches: Caches,
    events: EventSink,
}

impl Operator {
    pub fn new(client: Client, config: OperatorConfig) -> Self {
        let bucket = Arc::new(TokenBucket::new(config.write_rate));
        Self {
            client,
            config,
            bucket,
        }
    }

    /// Runs until `shutdown` resolves, then gives leadership up.
    pub async fn run(self, shutdown: impl Future<Output = ()>) -> Result<(), K8sError> {
        let election = LeaderElection {
            api: Api::namespaced(self.client.clone(), &self.config.namespace),
            lease_name: self.config.leader_lease.clone(),
            identity: self.config.identity.clone(),
            duration: self.config.leader_lease_duration,
        };
        let (tx, leadership) = watch::channel(None);
        // Aborted on drop: if this future is dropped (the task running it aborted), nothing keeps
        // renewing leadership behind its back.
        let elector = AbortOnDrop(tokio::spawn(elect(election.clone(), tx)));
        let result = tokio::select! {
            r = self.control(leadership) => r,
            () = shutdown => Ok(()),
        };
        drop(elector);
        if let Err(e) = election.release().await {
            tracing::warn!("could not release leadership: {e}");
        }
        result
    }

    async fn control(&self, mut leadership: Leadership) -> Result<(), K8sError> {
        loop {
            // Wait to lead.
            while !is_leader(&leadership) {
                if leadership.changed().await.is_err() {
                    return Ok(());
                }
            }
            let wake = Arc::new(Notify::new());
            let (caches, _watches) = Caches::start(self.sources(), wake.clone());
            let synced = Instant::now();
            tokio::select! {
                () = caches.ready() => {}
                () = lost(&leadership) => continue,
            }
            tracing::info!(
                identity = %self.config.identity,
                sync_ms = synced.elapsed().as_millis() as u64,
                "leading: placing sandboxes"
            );
            let reporter = Reporter {
                controller: "hearth.dev/operator".into(),
                instance: self.config.identity.clone(),
            };
            let (events, _publisher) = EventSink::start(
                self.client.clone(),
                reporter,
                self.bucket.clone(),
                self.config.event_queue,
            );
            let term = Term { caches, events };
            // The Sandboxes the last pools-and-claims pass wrote (see `pools_and_claims`).
            let mut wrote = Vec::new();
            while is_leader(&leadership) {
                let started = Instant::now();
                let mut next = self.config.resync;
                match self.pass(&term, &leadership).await {
                    Ok((n, due)) => {
                        next = due.map_or(next, |d| d.clamp(Duration::from_millis(10), next));
                        if n > 0 {
                            tracing::info!(
                                writes = n,
                                ms = started.elapsed().as_millis() as u64,
                                undelivered = term.caches.undelivered(),
                                events_dropped = term.events.dropped(),
                                "pass"
                            );
                        }
                    }
                    Err(e) => tracing::warn!("controller pass failed: {e}"),
                }
                // Warm pools and claims (their own pass: pools, claims and templates are not in the
                // watch caches, so a change to one of them is seen within `resync`).
                if is_leader(&leadership) {
                    if let Err(e) = self.pools_and_claims(&term.caches, &mut wrote).await {
                        tracing::warn!("pools and claims pass failed: {e}");
                    }
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(next) => {}
                    _ = leadership.changed() => {}
                }
            }
            tracing::warn!(identity = %self.config.identity, "lost leadership");
        }
    }

    /// The pools-and-claims pass, skipped (two one-object lists) on a cluster with no pool, no
    /// claim and no pool member in the Sandbox cache. It plans from the Sandbox cache when that
    /// shows every Sandbox write of the previous pass (`wrote`: else a pool it filled would look
    /// short and be filled twice, a claim served would adopt again) and lists the Sandboxes
    /// otherwise; `wrote` becomes this pass's.
    async fn pools_and_claims(
        &self,
        caches: &Caches,
        wrote: &mut Vec<claims::Wrote>,
    ) -> Result<usize, K8sError> {
        let ns = self.config.sandbox_namespace.as_deref();
        if !caches.has_pool_members() && !claims::any_pools_or_claims(&self.client, ns).await? {
            return Ok(0);
        }
        let caught_up =
            caches.healthy() && claims::shows_all(wrote, |ns, name| caches.stored(ns, name));
        if !caught_up {
            tracing::debug!("the Sandbox cache lags the last pass's writes: listing Sandboxes");
        }
        let outcome =
            claims::reconcile_with(&self.client, ns, caught_up.then(|| caches.sandboxes())).await?;
        *wrote = outcome.sandboxes;
        Ok(outcome.writes)
    }

    /// One pass: snapshot the caches, confirm lost nodes, plan, write. Returns the writes attempted
    /// and how soon the clock alone makes work (a node Lease expiring, a TTL, a shutdown time), which
    /// no watch would announce.
    async fn pass(
        &self,
        term: &Term,
        leadership: &Leadership,
    ) -> Result<(usize, Option<Duration>), K8sError> {
        if !term.caches.healthy() {
            tracing::debug!("a watch is reconnecting: pass skipped");
            return Ok((0, None));
        }
        let now = Timestamp::now();
        let mut snap = term.caches.snapshot(now);
        self.confirm_lost_nodes(&mut snap, now).await?;
        let actions = plan::plan(&snap.sandboxes, &snap.nodes, &snap.leases, now);
        let due = [
            plan::next_deadline(&snap.sandboxes, now),
            first_expiry(snap.leases.values(), now),
        ]
        .into_iter()
        .flatten()
        .min()
        .map(|at| Duration::try_from(now.duration_until(at)).unwrap_or_default());
        drop(snap);
        let count = actions.len();
        let _writing = (count > 0).then(|| self.bucket.writing());
        futures::stream::iter(actions)
            .for_each_concurrent(self.config.write_concurrency, |a| async move {
                self.bucket.acquire().await;
                if !is_leader(leadership) {
                    return;
                }
                match write::execute(&self.client, &a).await {
                    Ok(Some(after)) => {
                        term.caches.wrote(write::sandbox_of(&a), after);
                        term.events.written(&a);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::warn!("{e}"),
                }
            })
            .await;
        Ok((count, due))
    }

    /// The cache may lag a node's heartbeat (a slow or broken Lease watch): before the planner may
    /// declare a node lost, the Leases of nodes that look lost while holding unfinished or
    /// finalizer-held Sandboxes are read from the API server (a quorum read) into the snapshot.
    async fn confirm_lost_nodes(
        &self,
        snap: &mut Snapshot,
        now: Timestamp,
    ) -> Result<(), K8sError> {
        let known: BTreeSet<String> = snap.nodes.iter().map(|n| n.name_any()).collect();
        let suspects: BTreeSet<String> = snap
            .sandboxes
            .iter()
            .filter(|s| !s.phase().is_finished() || !s.finalizers().is_empty())
            .filter_map(|s| s.node_name())
            .filter(|n| known.contains(*n))
            .map(node_lease_name)
            .filter(|l| !snap.leases.get(l).is_some_and(|l| is_fresh(l, now)))
            .collect();
        if suspects.is_empty() {
            return Ok(());
        }
        let api: Api<Lease> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let read: Vec<(String, Option<Lease>)> = futures::stream::iter(suspects)
            .map(|name| {
                let api = api.clone();
                async move {
                    let lease = api
                        .get_opt(&name)
                        .await
                        .ctx(|| format!("confirming Lease {name}"))?;
                    Ok::<_, K8sError>((name, lease))
                }
            })
            .buffer_unordered(8)
            .try_collect()
            .await?;
        for (name, lease) in read {
            match lease {
                Some(l) => snap.leases.insert(name, l),
                None => snap.leases.remove(&name),
            };
        }
        Ok(())
    }

    fn sources(&self) -> Sources {
        Sources {
            sandboxes: match &self.config.sandbox_namespace {
                Some(ns) => Api::namespaced(self.client.clone(), ns),
                None => Api::all(self.client.clone()),
            },
            nodes: Api::<HearthNode>::all(self.client.clone()),
            node_selector: self.config.node_selector.clone(),
            leases: Api::namespaced(self.client.clone(), &self.config.namespace),
        }
    }
}

/// When the first Lease still fresh at `now` expires, if one does.
fn first_expiry<'a>(leases: impl Iterator<Item = &'a Lease>, now: Timestamp) -> Option<Timestamp> {
    leases
        .filter_map(|l| {
            let spec = l.spec.as_ref()?;
            let renewed = spec.renew_time.as_ref()?.0;
            let secs = i64::from(spec.lease_duration_seconds?);
            renewed.checked_add(SignedDuration::from_secs(secs)).ok()
        })
        .filter(|at| *at > now)
        .min()
}

/// Resolves once leadership is lost (or the elector is gone).
async fn lost(leadership: &Leadership) {
    let mut l = leadership.clone();
    while is_leader(&l) {
        if l.changed().await.is_err() {
            return;
        }
    }
}

/// Aborts a spawned task when dropped.
pub(crate) struct AbortOnDrop<T>(pub tokio::task::JoinHandle<T>);

impl<T> Drop for AbortOnDrop<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn is_leader(l: &Leadership) -> bool {
    l.borrow().is_some_and(|until| Instant::now() < until)
}

/// Renews (or tries to take) leadership every fifth of the lease duration. Leadership counts as valid
/// until two thirds of the duration after the start of the last successful renewal: a standby only takes
/// over after the full duration has passed without a renewal.
async fn elect(election: LeaderElection, tx: watch::Sender<Option<Instant>>) {
    let period = (election.duration / 5).max(Duration::from_millis(200));
    loop {
        let started = Instant::now();
        match election.try_acquire_or_renew().await {
            Ok(true) => {
                let _ = tx.send(Some(started + election.duration * 2 / 3));
            }
            Ok(false) => {
                let _ = tx.send(None);
            }
            Err(e) => tracing::warn!("leader election: {e}"),
        }
        tokio::time::sleep(period).await;
    }
}
