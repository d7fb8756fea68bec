//! Carrying out what `service.rs` decided for a Service Sandbox, on the local `Node` and in the
//! Sandbox's status. One step at a time per Sandbox: [`NodeAgent::reconcile_service`] runs each in
//! the Sandbox's task slot (`NodeAgent::running`), so a boot, pause or resume is never started twice
//! at once; a step that fails is tried again after `RETRY_AFTER` unless the object changes.
//! Status writes after an action read the object afresh and are guarded by its resourceVersion.

use std::sync::Arc;
use std::time::Instant;

use hearth_sandbox::node::{NodeError, SandboxInfo, State};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, ResourceExt};

use super::agent::{lock, NodeAgent, Retry};
use super::run::{create_spec, now, refused_message, CAPACITY_WAIT};
use super::service::{decide, key, local_of, Step, LIFECYCLE_LABEL, RETRY_AFTER, SERVICE};
use crate::controller::AbortOnDrop;
use crate::crd::{reason, Phase, Sandbox, SandboxStatus};
use crate::error::{is_conflict, is_not_found, Context, K8sError};
use crate::status::{self, Outcome};

/// Why a step failed (it is tried again after `RETRY_AFTER`).
#[derive(Debug, thiserror::Error)]
enum StepError {
    #[error(transparent)]
    Api(#[from] K8sError),
    /// The node refused a pause or resume (the status says so too).
    #[error("{0}")]
    Node(String),
}

/// How often a capacity refusal of a create is retried while `CAPACITY_WAIT` lasts.
const CAPACITY_RETRY: std::time::Duration = std::time::Duration::from_millis(500);

impl NodeAgent {
    /// Looks at Service Sandbox `s` (bound here, not being deleted, not finished) and starts the
    /// step it needs, unless one runs for it already or the same step failed lately.
    pub(super) fn reconcile_service(self: &Arc<Self>, s: Sandbox) {
        let Some(uid) = s.metadata.uid.clone() else {
            return;
        };
        let mut running = lock(&self.running);
        if running.contains_key(&uid) {
            return;
        }
        let locals = self.node.list(&self.tenant.name);
        let step = decide(&s, local_of(&s, &locals), Timestamp::now());
        if step == Step::Nothing {
            return;
        }
        let generation = s.metadata.generation;
        if let Some(r) = lock(&self.retries).get(&uid) {
            if r.kind == step.kind() && r.generation == generation && Instant::now() < r.not_before
            {
                return;
            }
        }
        let agent = self.clone();
        let key = uid.clone();
        // Spawned under the lock so the task cannot remove its entry before it is inserted.
        let task = tokio::spawn(async move {
            let kind = step.kind();
            let name = super::service::key(&s);
            match agent.carry_out(s, step).await {
                Ok(()) => {
                    lock(&agent.retries).remove(&key);
                }
                Err(e) => {
                    tracing::warn!(sandbox = %name, step = kind, "{e}");
                    let retry = Retry {
                        kind,
                        generation,
                        not_before: Instant::now() + RETRY_AFTER,
                    };
                    lock(&agent.retries).insert(key.clone(), retry);
                }
            }
            lock(&agent.running).remove(&key);
        });
        running.insert(uid, AbortOnDrop(task));
    }

    /// `Err`: the step failed (noted in the status where it concerns the user) and is retried.
    async fn carry_out(&self, s: Sandbox, step: Step) -> Result<(), StepError> {
        let api = self.api_for(&s);
        let name = s.name_any();
        match step {
            Step::Nothing => Ok(()),
            Step::Report(next) => {
                // Written only over the very object it was decided from (a store may lag), sent
                // as read now: never with a spec older than the server's.
                let Some(mut want) = api
                    .get_opt(&name)
                    .await
                    .ctx(|| format!("reading Sandbox {}", key(&s)))?
                    .filter(|latest| latest.resource_version() == s.resource_version())
                else {
                    return Ok(());
                };
                want.status = Some(next);
                match api
                    .replace_status(&name, &PostParams::default(), &want)
                    .await
                {
                    Err(e) if !is_conflict(&e) && !is_not_found(&e) => {
                        Ok(Err(e).ctx(|| format!("writing the status of Sandbox {}", key(&s)))?)
                    }
                    _ => Ok(()),
                }
            }
            Step::Invalid(message) => {
                let outcome = Outcome::Failed {
                    reason: reason::INVALID,
                };
                Ok(self
                    .update_status(&s, |st| {
                        Some(status::finished(
                            st,
                            &outcome,
                            Some(message.clone()),
                            None,
                            &now(),
                        ))
                    })
                    .await?)
            }
            Step::ShutDown => {
                self.stop_local(s.metadata.uid.as_deref().unwrap_or_default())
                    .await;
                let at = s
                    .spec
                    .lifecycle
                    .as_ref()
                    .and_then(|l| l.shutdown_time.clone());
                let message = format!(
                    "lifecycle.shutdownTime {} came; its microVM was stopped",
                    at.map(|t| t.0.to_string()).unwrap_or_default()
                );
                Ok(self
                    .update_status(&s, |st| {
                        Some(status::finished(
                            st,
                            &Outcome::ShutDown,
                            Some(message.clone()),
                            None,
                            &now(),
                        ))
                    })
                    .await?)
            }
            Step::Pause { id } => {
                let paused = self.node.pause(&self.tenant.name, &id, true).await;
                self.after_pause_or_resume(&s, &id, false, paused).await
            }
            Step::Resume { id } => {
                let resumed = self.node.resume(&self.tenant, &id).await;
                self.after_pause_or_resume(&s, &id, true, resumed).await
            }
            Step::Start => Ok(self.start(s).await?),
        }
    }

    async fn after_pause_or_resume(
        &self,
        s: &Sandbox,
        id: &str,
        resuming: bool,
        outcome: Result<SandboxInfo, NodeError>,
    ) -> Result<(), StepError> {
        let what = if resuming { "resume" } else { "pause" };
        match outcome {
            Ok(info) => {
                tracing::info!(sandbox = %key(s), id, "{what}d");
                Ok(self
                    .update_status(s, |st| match info.state {
                        State::Paused => Some(status::paused(st, &now())),
                        _ => Some(status::service_running(st, id, &now())),
                    })
                    .await?)
            }
            Err(e) => {
                let message = format!("{what} on node {} failed: {e}", self.node_name());
                self.update_status(s, |st| {
                    Some(status::pause_or_resume_failed(
                        st,
                        resuming,
                        &message,
                        &now(),
                    ))
                })
                .await?;
                Err(StepError::Node(message))
            }
        }
    }

    /// Boots the local sandbox of Scheduled Service Sandbox `s` (or adopts the live one carrying its
    /// uid) and reports Running, or Failed (StartFailed) when it cannot start.
    async fn start(&self, s: Sandbox) -> Result<(), K8sError> {
        let api = self.api_for(&s);
        let uid = s.metadata.uid.clone().unwrap_or_default();
        let Some(s) = self.add_finalizer(&api, s).await? else {
            return Ok(()); // changed meanwhile: a newer look decides
        };
        let info = match self.local_or_create(&s, &uid).await {
            Ok(info) => info,
            Err(message) => return self.start_failed(&s, message).await,
        };
        let ready = self
            .node
            .wait_ready(&self.tenant.name, &info.id, self.config.boot_timeout)
            .await;
        let info = match ready {
            Ok(info) if info.state == State::Running => info,
            Ok(info) => {
                let why = match info.state {
                    State::Creating => format!(
                        "still booting after {}s",
                        self.config.boot_timeout.as_secs()
                    ),
                    _ => info
                        .reason
                        .clone()
                        .unwrap_or_else(|| info.state.to_string()),
                };
                let _ = self.node.delete(&self.tenant.name, &info.id).await;
                return self
                    .start_failed(&s, format!("the microVM did not start: {why}"))
                    .await;
            }
            Err(e) => {
                return self
                    .start_failed(&s, format!("the microVM did not start: {e}"))
                    .await
            }
        };
        tracing::info!(sandbox = %key(&s), id = %info.id, "service sandbox running");
        self.update_status(&s, |st| match st.phase {
            Some(Phase::Scheduled) => Some(status::service_running(st, &info.id, &now())),
            _ => None,
        })
        .await
    }

    /// The live local sandbox labelled with `uid`, else a new one (a capacity refusal retried for
    /// `CAPACITY_WAIT`, as for run-to-completion Sandboxes). `Err`: the status message.
    async fn local_or_create(&self, s: &Sandbox, uid: &str) -> Result<SandboxInfo, String> {
        let locals = self.node.list(&self.tenant.name);
        if let Some(live) = local_of(s, &locals).filter(|l| l.state.is_live()) {
            return Ok(live.clone());
        }
        // Ended ones (a boot the node failed at its restart) go first: one record per uid.
        self.stop_local(uid).await;
        let mut spec = create_spec(s, uid)?;
        spec.labels.insert(LIFECYCLE_LABEL.into(), SERVICE.into());
        let deadline = tokio::time::Instant::now() + CAPACITY_WAIT;
        loop {
            match self.node.create(&self.tenant, spec.clone()).await {
                Ok(info) => return Ok(info),
                Err(NodeError::Capacity { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(CAPACITY_RETRY).await
                }
                Err(e) => return Err(refused_message(&e)),
            }
        }
    }

    async fn start_failed(&self, s: &Sandbox, message: String) -> Result<(), K8sError> {
        tracing::warn!(sandbox = %key(s), "{message}");
        let outcome = Outcome::Failed {
            reason: reason::START_FAILED,
        };
        self.update_status(s, |st| match st.phase {
            Some(Phase::Scheduled) => Some(status::finished(
                st,
                &outcome,
                Some(message.clone()),
                None,
                &now(),
            )),
            _ => None,
        })
        .await
    }

    /// Writes `next(status)` on a fresh read of `s` while it is still the same object, bound here,
    /// not being deleted and not finished (a few tries on conflicts). `next` returning `None`:
    /// nothing to write.
    async fn update_status(
        &self,
        s: &Sandbox,
        next: impl Fn(&SandboxStatus) -> Option<SandboxStatus>,
    ) -> Result<(), K8sError> {
        let api: Api<Sandbox> = self.api_for(s);
        let name = s.name_any();
        for _ in 0..5 {
            let Some(latest) = api
                .get_opt(&name)
                .await
                .ctx(|| format!("reading Sandbox {}", key(s)))?
            else {
                return Ok(());
            };
            let same = latest.metadata.uid == s.metadata.uid
                && latest.node_name() == Some(self.node_name())
                && latest.metadata.deletion_timestamp.is_none()
                && !latest.phase().is_finished();
            if !same {
                return Ok(());
            }
            let Some(status) = next(&latest.status.clone().unwrap_or_default()) else {
                return Ok(());
            };
            let mut want = latest;
            want.status = Some(status);
            match api
                .replace_status(&name, &PostParams::default(), &want)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => {
                    return Err(e).ctx(|| format!("writing the status of Sandbox {}", key(s)))
                }
            }
        }
        Ok(())
    }
}
