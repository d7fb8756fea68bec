//! The node agent: registers this node, heartbeats its Lease, reports what it runs, and reconciles
//! every Sandbox bound to it (`status.nodeName == me`; CR field selectors do not exist in 1.20, so it
//! watches all Sandboxes and filters). Each Scheduled Sandbox gets one task ([`super::run`]); deletion
//! stops the VM and drops the finalizer. Every write is guarded by the resourceVersion of the object it
//! was computed from, so replayed or stale watch events can never start a sandbox twice.
//!
//! After a restart the agent cannot re-attach to a command that was running (its output and exit
//! status went with the old process): a run-to-completion Sandbox still Running on this node becomes
//! Failed (`NodeAgentRestarted`) and any VM the local Node store still has for it is stopped.
//!
//! Service Sandboxes (`service.rs`, `service_act.rs`) are different: their VMs outlive the agent
//! and are adopted again. The agent keeps every Sandbox it watches in a reflector store and looks at
//! each Service one bound here once a second (shutdown times, VMs that died, missed events), and
//! stops local service sandboxes whose Sandbox no longer exists (deleted while the agent was down
//! and its finalizer dropped by the operator as node-lost).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use futures::{Future, StreamExt};
use hearth_sandbox::node::{Node, Quota, Tenant};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, ResourceExt};

use super::registration::{heartbeat_forever, register, report, Registration};
use super::run::SANDBOX_LABEL;
use super::service::{LIFECYCLE_LABEL, SERVICE};
use crate::controller::{remove_finalizer, AbortOnDrop};
use crate::crd::{reason, Phase, Sandbox, UID_LABEL};
use crate::error::{is_conflict, is_not_found, K8sError};
use crate::status::{self, Outcome};

/// Settings of the node agent.
#[derive(Clone, Debug)]
pub struct NodeAgentConfig {
    pub registration: Registration,
    /// The Node tenant Kubernetes sandboxes are created under.
    pub tenant: String,
    /// Bytes of output kept in `status.outputTail`.
    pub tail_bytes: usize,
    /// Longest wait for a VM to boot (image pull included).
    pub boot_timeout: Duration,
    /// Only Sandboxes in this namespace (None: all namespaces).
    pub sandbox_namespace: Option<String>,
}

impl NodeAgentConfig {
    pub fn new(registration: Registration) -> Self {
        Self {
            registration,
            tenant: "kubernetes".into(),
            tail_bytes: 4096,
            boot_timeout: Duration::from_secs(600),
            sandbox_namespace: None,
        }
    }
}

pub struct NodeAgent {
    pub(super) client: Client,
    pub(super) node: Arc<Node>,
    pub(super) config: NodeAgentConfig,
    pub(super) tenant: Tenant,
    /// Sandbox uid -> its run task (run to completion) or its current step (Service).
    pub(super) running: Mutex<HashMap<String, AbortOnDrop<()>>>,
    /// Sandbox uid -> the Service step that failed last, not tried again before its time.
    pub(super) retries: Mutex<HashMap<String, Retry>>,
    /// Uids the local Node store still had a VM for when the agent started.
    known_at_start: Mutex<HashSet<String>>,
}

/// A failed Service step: the same step for the same generation waits until `not_before`.
pub(super) struct Retry {
    pub kind: &'static str,
    pub generation: Option<i64>,
    pub not_before: Instant,
}

/// How often every Service Sandbox bound here is looked at without an event.
const SERVICE_TICK: Duration = Duration::from_secs(1);

pub(super) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl NodeAgent {
    pub fn new(client: Client, node: Arc<Node>, config: NodeAgentConfig) -> Arc<Self> {
        let tenant = Tenant {
            name: config.tenant.clone(),
            // The node's own capacity is the only limit: the operator already placed within it.
            quota: Quota::unlimited(),
            network_ceiling: hearth_sandbox::node::default_network_ceiling(),
        };
        Arc::new(Self {
            client,
            node,
            config,
            tenant,
            running: Mutex::new(HashMap::new()),
            retries: Mutex::new(HashMap::new()),
            known_at_start: Mutex::new(HashSet::new()),
        })
    }

    pub fn node_name(&self) -> &str {
        &self.config.registration.node_name
    }

    fn sandbox_api(&self) -> Api<Sandbox> {
        match &self.config.sandbox_namespace {
            Some(ns) => Api::namespaced(self.client.clone(), ns),
            None => Api::all(self.client.clone()),
        }
    }

    pub(super) fn api_for(&self, s: &Sandbox) -> Api<Sandbox> {
        Api::namespaced(self.client.clone(), &s.namespace().unwrap_or_default())
    }

    /// Runs until `shutdown` resolves. Running commands are abandoned on shutdown (their VMs are left
    /// to the Node, and the next start fails their Sandboxes as described in the module doc).
    pub async fn run(self: Arc<Self>, shutdown: impl Future<Output = ()>) -> Result<(), K8sError> {
        let reg = self.config.registration.clone();
        register(&self.client, &reg).await?;
        self.stop_leftovers().await;
        let _beat = AbortOnDrop(tokio::spawn(heartbeat_forever(self.client.clone(), reg)));
        let _report = AbortOnDrop(tokio::spawn(self.clone().report_loop()));
        tracing::info!(
            node = self.node_name(),
            "node agent registered; watching Sandboxes"
        );
        let (store, writer) = reflector::store();
        let events = reflector::reflector(
            writer,
            watcher(self.sandbox_api(), watcher::Config::default()).default_backoff(),
        );
        let mut events = std::pin::pin!(events);
        let agent = self.clone();
        let watch = async move {
            let mut tick = tokio::time::interval(SERVICE_TICK);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut synced = false;
            loop {
                tokio::select! {
                    event = events.next() => match event {
                        Some(Ok(watcher::Event::Apply(s) | watcher::Event::InitApply(s))) => {
                            agent.reconcile(s).await
                        }
                        Some(Ok(watcher::Event::Delete(s))) => agent.gone(&s).await,
                        Some(Ok(watcher::Event::InitDone)) => synced = true,
                        Some(Ok(watcher::Event::Init)) => {}
                        Some(Err(e)) => tracing::warn!("watching Sandboxes: {e}"),
                        None => return,
                    },
                    _ = tick.tick(), if synced => agent.look_at_services(&store).await,
                }
            }
        };
        tokio::select! {
            () = watch => {}
            () = shutdown => {}
        }
        lock(&self.running).clear();
        Ok(())
    }

    /// At start no run-to-completion command of ours legitimately runs: every such VM the Node still
    /// holds belongs to a command whose result is lost. Stop them all; remember which for the Failed
    /// message. Service sandboxes stay, to be adopted.
    async fn stop_leftovers(&self) {
        for info in self.node.list(&self.tenant.name) {
            if is_service(&info) {
                continue;
            }
            if let Some(uid) = info.labels.get(UID_LABEL) {
                lock(&self.known_at_start).insert(uid.clone());
            }
            if let Err(e) = self.node.delete(&self.tenant.name, &info.id).await {
                tracing::warn!(id = %info.id, "stopping a leftover sandbox: {e}");
            }
        }
    }

    /// Brings one Sandbox event to the desired state. Idempotent.
    async fn reconcile(self: &Arc<Self>, s: Sandbox) {
        if s.node_name() != Some(self.node_name()) {
            return;
        }
        let Some(uid) = s.metadata.uid.clone() else {
            return;
        };
        let busy = lock(&self.running).contains_key(&uid);
        if s.metadata.deletion_timestamp.is_some() {
            // The VM first, found by label and stopped (awaited, so the finalizer goes only after
            // it); then the run's task, which finds its sandbox gone, is ended. Aborted first, the
            // task's own clean-up would delete the sandbox in the background and hide it from
            // `stop_local` before its VM is stopped. A Service step cut short may just have
            // created a sandbox: it is stopped by the second look.
            self.stop_local(&uid).await;
            self.end_task(&uid).await;
            self.stop_local(&uid).await;
            self.drop_finalizer(&s).await;
            return;
        }
        if s.spec.is_service() && !s.phase().is_finished() {
            return self.reconcile_service(s);
        }
        match s.phase() {
            Phase::Scheduled if !busy => {
                let agent = self.clone();
                let key = uid.clone();
                // Spawned under the lock so the task cannot remove its entry before it is inserted.
                let mut running = lock(&self.running);
                let task = tokio::spawn(async move {
                    agent.run_sandbox(s).await;
                    lock(&agent.running).remove(&key);
                });
                running.insert(uid, AbortOnDrop(task));
            }
            Phase::Running if !busy => {
                self.fail_restarted(&s).await;
                self.stop_local(&uid).await;
                self.drop_finalizer(&s).await;
            }
            Phase::Succeeded | Phase::Failed if !busy => {
                self.stop_local(&uid).await;
                self.drop_finalizer(&s).await;
            }
            _ => {}
        }
    }

    /// Aborts the task of Sandbox `uid`, if any, and waits (briefly) for it to end.
    async fn end_task(&self, uid: &str) {
        let task = lock(&self.running).remove(uid);
        if let Some(mut task) = task {
            task.0.abort();
            let _ = tokio::time::timeout(Duration::from_secs(5), &mut task.0).await;
        }
        lock(&self.retries).remove(uid);
    }

    /// Sandbox `s` is gone from the API (its finalizer dropped by someone, e.g. the operator when
    /// this node was lost): nothing of it may keep running here.
    async fn gone(&self, s: &Sandbox) {
        if let Some(uid) = s.metadata.uid.as_deref() {
            self.end_task(uid).await;
            self.stop_local(uid).await;
        }
    }

    /// The once-a-second look at every Service Sandbox bound here (see the module doc), and the
    /// sweep of local service sandboxes whose Sandbox no longer exists.
    async fn look_at_services(self: &Arc<Self>, store: &Store<Sandbox>) {
        let all = store.state();
        let mut known = HashSet::new();
        for s in &all {
            known.extend(s.metadata.uid.clone());
            let mine = s.node_name() == Some(self.node_name());
            let live = s.metadata.deletion_timestamp.is_none() && !s.phase().is_finished();
            if mine && s.spec.is_service() && live {
                self.reconcile_service(Sandbox::clone(s));
            }
        }
        let scope = self
            .config
            .sandbox_namespace
            .as_ref()
            .map(|ns| format!("{ns}/"));
        for info in self.node.list(&self.tenant.name) {
            let Some(uid) = info.labels.get(UID_LABEL) else {
                continue;
            };
            let in_scope = scope.as_ref().is_none_or(|prefix| {
                info.labels
                    .get(SANDBOX_LABEL)
                    .is_some_and(|k| k.starts_with(prefix.as_str()))
            });
            if is_service(&info) && in_scope && !known.contains(uid) {
                if lock(&self.running).contains_key(uid) {
                    continue;
                }
                tracing::warn!(id = %info.id, "stopping the VM of a Sandbox that no longer exists");
                if let Err(e) = self.node.delete(&self.tenant.name, &info.id).await {
                    tracing::warn!(id = %info.id, "stopping an orphaned sandbox: {e}");
                }
            }
        }
    }

    async fn fail_restarted(&self, s: &Sandbox) {
        let uid = s.metadata.uid.clone().unwrap_or_default();
        let message = if lock(&self.known_at_start).contains(&uid) {
            "the node agent restarted while the command ran; its VM was stopped and it is not run again"
        } else {
            "the node agent restarted while the command ran; it is not run again"
        };
        let mut next = s.clone();
        next.status = Some(status::finished(
            &s.status.clone().unwrap_or_default(),
            &Outcome::Failed {
                reason: reason::AGENT_RESTARTED,
            },
            Some(message.into()),
            None,
            &Time(Timestamp::now()),
        ));
        match self
            .api_for(s)
            .replace_status(&s.name_any(), &PostParams::default(), &next)
            .await
        {
            Ok(_) => tracing::warn!(sandbox = %s.name_any(), "{message}"),
            Err(e) if is_conflict(&e) || is_not_found(&e) => {}
            Err(e) => tracing::warn!(sandbox = %s.name_any(), "marking Failed after restart: {e}"),
        }
    }

    /// Stops and forgets every local sandbox labelled with `uid`.
    pub(super) async fn stop_local(&self, uid: &str) {
        for info in self.node.list(&self.tenant.name) {
            if info.labels.get(UID_LABEL).map(String::as_str) == Some(uid) {
                if let Err(e) = self.node.delete(&self.tenant.name, &info.id).await {
                    tracing::warn!(id = %info.id, "stopping the VM of Sandbox {uid}: {e}");
                }
            }
        }
    }

    pub(super) async fn drop_finalizer(&self, s: &Sandbox) {
        match remove_finalizer(&self.api_for(s), s).await {
            Ok(()) => {}
            Err(e) if is_conflict(&e) || is_not_found(&e) => {} // a newer event retries
            Err(e) => tracing::warn!(sandbox = %s.name_any(), "removing finalizer: {e}"),
        }
    }

    /// Publishes the node's allocation when it changes (checked every few seconds). Paused sandboxes
    /// hold no vCPUs or memory and are not counted.
    async fn report_loop(self: Arc<Self>) {
        let mut last = None;
        loop {
            let m = self.node.metrics();
            let now = (
                m.sandboxes.creating + m.sandboxes.running,
                m.allocated_vcpus,
                m.allocated_memory_mib,
            );
            if last != Some(now) {
                let r = report(&self.client, self.node_name(), now.0 as u32, now.1, now.2).await;
                match r {
                    Ok(()) => last = Some(now),
                    Err(e) => tracing::warn!("{e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
    }
}

/// Whether a node-local sandbox belongs to a Service Sandbox.
fn is_service(info: &hearth_sandbox::node::SandboxInfo) -> bool {
    info.labels.get(LIFECYCLE_LABEL).map(String::as_str) == Some(SERVICE)
}
