//! The operator (`hearth operator`): leader election, then passes of [`plan::plan`] over a fresh list of
//! Sandboxes, HearthNodes and node Leases, whose writes it executes with bounded concurrency. A pass
//! runs when a Sandbox or HearthNode changes (watch) and at least every `resync` (lease expiry, TTLs).
//! Only the leader writes, and only while its leadership is certainly valid.

pub mod plan;

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use tokio::sync::{watch, Notify};

use crate::crd::{HearthNode, Sandbox, FINALIZER};
use crate::error::{is_conflict, is_not_found, Context, K8sError};
use crate::lease::LeaderElection;
use plan::Action;

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
    /// Longest time between passes.
    pub resync: Duration,
    /// Writes in flight at once.
    pub write_concurrency: usize,
    /// Only Sandboxes in this namespace (None: all namespaces).
    pub sandbox_namespace: Option<String>,
    /// Only HearthNodes matching this label selector (None: all), e.g. to run one operator per pool.
    pub node_selector: Option<String>,
}

impl OperatorConfig {
    pub fn new(identity: impl Into<String>, namespace: impl Into<String>) -> Self {
        Self {
            identity: identity.into(),
            namespace: namespace.into(),
            leader_lease: "hearth-operator".into(),
            leader_lease_duration: Duration::from_secs(15),
            resync: Duration::from_secs(1),
            write_concurrency: 32,
            sandbox_namespace: None,
            node_selector: None,
        }
    }
}

pub struct Operator {
    client: Client,
    config: OperatorConfig,
}

/// Until when this replica may act as leader (None: not leader).
type Leadership = watch::Receiver<Option<Instant>>;

impl Operator {
    pub fn new(client: Client, config: OperatorConfig) -> Self {
        Self { client, config }
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
        let wake = Arc::new(Notify::new());
        let watchers = AbortOnDrop(tokio::spawn(watch_changes(
            self.sandbox_api(),
            Api::all(self.client.clone()),
            self.config.node_selector.clone(),
            wake.clone(),
        )));
        let result = tokio::select! {
            r = self.control(leadership, wake) => r,
            () = shutdown => Ok(()),
        };
        drop((elector, watchers));
        if let Err(e) = election.release().await {
            tracing::warn!("could not release leadership: {e}");
        }
        result
    }

    async fn control(&self, mut leadership: Leadership, wake: Arc<Notify>) -> Result<(), K8sError> {
        loop {
            // Wait to lead.
            while !is_leader(&leadership) {
                if leadership.changed().await.is_err() {
                    return Ok(());
                }
            }
            tracing::info!(identity = %self.config.identity, "leading: placing sandboxes");
            while is_leader(&leadership) {
                let started = Instant::now();
                match self.pass(&leadership).await {
                    Ok(n) if n > 0 => tracing::info!(
                        writes = n,
                        ms = started.elapsed().as_millis() as u64,
                        "pass"
                    ),
                    Ok(_) => {}
                    Err(e) => tracing::warn!("controller pass failed: {e}"),
                }
                tokio::select! {
                    () = wake.notified() => {}
                    () = tokio::time::sleep(self.config.resync) => {}
                    _ = leadership.changed() => {}
                }
            }
            tracing::warn!(identity = %self.config.identity, "lost leadership");
        }
    }

    /// One pass: list, plan, write. Returns the number of writes attempted.
    pub async fn pass(&self, leadership: &Leadership) -> Result<usize, K8sError> {
        let sandboxes = self.sandbox_api();
        let nodes: Api<HearthNode> = Api::all(self.client.clone());
        let leases: Api<Lease> = Api::namespaced(self.client.clone(), &self.config.namespace);
        let lp = ListParams::default();
        let node_lp = self.node_list_params();
        let (s, n, l) = tokio::try_join!(
            async { sandboxes.list(&lp).await.ctx(|| "listing Sandboxes".into()) },
            async {
                nodes
                    .list(&node_lp)
                    .await
                    .ctx(|| "listing HearthNodes".into())
            },
            async {
                leases
                    .list(&lp)
                    .await
                    .ctx(|| format!("listing Leases in {}", self.config.namespace))
            },
        )?;
        let leases: HashMap<String, Lease> =
            l.items.into_iter().map(|l| (l.name_any(), l)).collect();
        let actions = plan::plan(&s.items, &n.items, &leases, Timestamp::now());
        let count = actions.len();
        futures::stream::iter(actions)
            .for_each_concurrent(self.config.write_concurrency, |a| async move {
                if !is_leader(leadership) {
                    return;
                }
                if let Err(e) = self.execute(a).await {
                    tracing::warn!("{e}");
                }
            })
            .await;
        Ok(count)
    }

    fn sandbox_api(&self) -> Api<Sandbox> {
        match &self.config.sandbox_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    fn node_list_params(&self) -> ListParams {
        match &self.config.node_selector {
            Some(sel) => ListParams::default().labels(sel),
            None => ListParams::default(),
        }
    }

    async fn execute(&self, action: Action) -> Result<(), K8sError> {
        let (sandbox, what) = match &action {
            Action::Bind { sandbox, .. } | Action::SetStatus { sandbox } => (sandbox, "status"),
            Action::RemoveFinalizer { sandbox } => (sandbox, "finalizer"),
            Action::Delete { sandbox } => (sandbox, "delete"),
        };
        let ns = sandbox.namespace().unwrap_or_default();
        let name = sandbox.name_any();
        let api: Api<Sandbox> = Api::namespaced(self.client.clone(), &ns);
        let result = match &action {
            Action::Bind { sandbox, node } => {
                tracing::debug!(%ns, %name, %node, "bind");
                api.replace_status(&name, &PostParams::default(), sandbox.as_ref())
                    .await
                    .map(|_| ())
            }
            Action::SetStatus { sandbox } => api
                .replace_status(&name, &PostParams::default(), sandbox.as_ref())
                .await
                .map(|_| ()),
            Action::RemoveFinalizer { sandbox } => remove_finalizer(&api, sandbox).await,
            Action::Delete { sandbox } => {
                let dp = DeleteParams {
                    preconditions: Some(kube::api::Preconditions {
                        uid: sandbox.metadata.uid.clone(),
                        resource_version: None,
                    }),
                    ..Default::default()
                };
                api.delete(&name, &dp).await.map(|_| ())
            }
        };
        match result {
            Err(e) if is_conflict(&e) || is_not_found(&e) => {
                tracing::debug!(%ns, %name, "{what} write skipped: the object changed meanwhile");
                Ok(())
            }
            r => r.ctx(|| format!("writing {what} of Sandbox {ns}/{name}")),
        }
    }
}

/// Removes `hearth.dev/vm` from `sandbox`: a merge patch of the remaining list guarded by the object's
/// resourceVersion, so a concurrent finalizer change fails (409) instead of being lost. Idempotent: an
/// absent finalizer is success.
pub async fn remove_finalizer(api: &Api<Sandbox>, sandbox: &Sandbox) -> Result<(), kube::Error> {
    if !sandbox.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(());
    }
    let rest: Vec<&String> = sandbox
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = serde_json::json!({
        "metadata": { "finalizers": rest, "resourceVersion": sandbox.resource_version() }
    });
    api.patch(
        &sandbox.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(|_| ())
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

/// Wakes the control loop on any Sandbox or HearthNode change.
async fn watch_changes(
    sandboxes: Api<Sandbox>,
    nodes: Api<HearthNode>,
    node_selector: Option<String>,
    wake: Arc<Notify>,
) {
    let node_config = match &node_selector {
        Some(sel) => watcher::Config::default().labels(sel),
        None => watcher::Config::default(),
    };
    let sandboxes = watcher(sandboxes, watcher::Config::default());
    let nodes = watcher(nodes, node_config);
    let mut events = std::pin::pin!(futures::stream::select(
        sandboxes.map(|e| e.is_ok()),
        nodes.map(|e| e.is_ok())
    ));
    while let Some(ok) = events.next().await {
        if ok {
            wake.notify_one();
        } else {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
