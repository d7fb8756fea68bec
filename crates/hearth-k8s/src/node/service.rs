//! Service sandboxes (`spec.lifecycle.type: Service`) on this node: what to do about one, decided
//! by comparing its object with the node-local sandbox that carries its uid ([`decide`], pure);
//! `service_act.rs` carries the step out.
//!
//! The life of one, as the node agent runs it:
//! - **Scheduled**: the finalizer, then a node-local sandbox is created under the agent's tenant
//!   (labelled with the uid, `namespace/name` and `hearth.dev/lifecycle: Service`) and booted; once
//!   it runs, the status says Running with `sandboxId` (its id in this node's HTTP API), the start
//!   time and `Started`. Unlike a run-to-completion Sandbox, Running is written only once the VM
//!   runs: starting one again is harmless (no command runs twice), so an agent that restarts during
//!   the boot simply boots it again (or adopts the boot it finds).
//! - **Running / Paused**: `spec.paused` is carried out on the local sandbox (a pause is forced:
//!   execs still running end with an error event, since a declared `paused: true` must not wait
//!   for clients); a failure leaves the phase as it is and says why in the `Paused` condition, and
//!   the step is retried after [`RETRY_AFTER`] (a resume refused for capacity thus runs once room
//!   frees up). A local sandbox that ended on its own (VM exited or killed, the node's maximum TTL
//!   or `--max-paused`, gone after a restart) makes the Sandbox Failed (`VMLost`) with the node's
//!   reason.
//! - **`lifecycle.idlePauseSeconds`**: the local sandbox is created with that idle timeout and
//!   `on_idle: pause`; the node pauses it when idle and wakes it on its next use, and the agent
//!   reports what it finds (Paused, then Running again) without undoing either, whatever
//!   `spec.paused` (false) says.
//! - **`lifecycle.shutdownTime`**: the VM is stopped and the Sandbox Succeeded (`ShutdownTime`),
//!   whatever the policy; with policy Delete the operator also deletes the object (node agents may
//!   only write status and finalizers, so deletion is the operator's), and the finalizer is dropped
//!   as for any deletion.
//! - **Agent restart**: the node re-attaches the VMs that still run (`Node::open`), and the agent
//!   adopts them: the Sandbox stays Running with the same `sandboxId`. Local sandboxes of Service
//!   Sandboxes that no longer exist are stopped ([`super::NodeAgent`]'s sweep).
//!
//! Every object is looked at again every second (`agent.rs`), so a missed event, a shutdown time
//! or a dead VM is noticed without one; [`decide`] answers [`Step::Nothing`] when object and node
//! agree, and no request is made then.

use std::time::Duration;

use hearth_sandbox::node::{SandboxInfo, State, IDLE_REASON};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use crate::crd::{reason, Phase, Sandbox, SandboxStatus, UID_LABEL};
use crate::status::{self, Outcome};

/// Label on node-local sandboxes of Service Sandboxes (value [`SERVICE`]): they outlive an agent
/// restart, unlike run-to-completion ones.
pub(super) const LIFECYCLE_LABEL: &str = "hearth.dev/lifecycle";
pub(super) const SERVICE: &str = "Service";
/// How long after a failed step (boot, pause, resume, status write) the same step is tried again
/// for the same generation of the object.
pub(super) const RETRY_AFTER: Duration = Duration::from_secs(10);

/// What one look at a Service Sandbox calls for.
#[derive(Clone, Debug, PartialEq)]
pub(super) enum Step {
    /// Object and node agree.
    Nothing,
    /// Boot a local sandbox (or adopt the live one carrying the uid) and report Running.
    Start,
    /// Write this status: it is what the node holds.
    Report(SandboxStatus),
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// `lifecycle.shutdownTime` came: stop the VM, report Succeeded.
    ShutDown,
    /// The spec cannot run (nothing started): Failed, InvalidSpec, with this message.
    Invalid(String),
}

impl Step {
    /// The kind of step, for retry bookkeeping.
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Step::Nothing => "nothing",
            Step::Start => "start",
            Step::Report(_) => "report",
            Step::Pause { .. } => "pause",
            Step::Resume { .. } => "resume",
            Step::ShutDown => "shutdown",
            Step::Invalid(_) => "invalid",
        }
    }
}

/// The local sandbox of `s` among `locals`: the one `status.sandboxId` names once it is set,
/// before that the newest live one labelled with its uid.
pub(super) fn local_of<'a>(s: &Sandbox, locals: &'a [SandboxInfo]) -> Option<&'a SandboxInfo> {
    if let Some(id) = s.status.as_ref().and_then(|st| st.sandbox_id.as_deref()) {
        return locals.iter().find(|l| l.id == id);
    }
    let uid = s.metadata.uid.as_deref()?;
    locals
        .iter()
        .filter(|l| l.state.is_live() && l.labels.get(UID_LABEL).map(String::as_str) == Some(uid))
        .max_by_key(|l| l.created_at)
}

/// Whether `s`'s `lifecycle.shutdownTime` has come.
pub(super) fn shutdown_due(s: &Sandbox, now: Timestamp) -> bool {
    s.spec
        .lifecycle
        .as_ref()
        .and_then(|l| l.shutdown_time.as_ref())
        .is_some_and(|at| at.0 <= now)
}

/// What to do about Service Sandbox `s` (bound to this node, not being deleted) whose local sandbox
/// is `local`. Pure.
pub(super) fn decide(s: &Sandbox, local: Option<&SandboxInfo>, now: Timestamp) -> Step {
    let st = s.status.clone().unwrap_or_default();
    let t = Time(now);
    let live = local.filter(|l| l.state.is_live());
    match s.phase() {
        Phase::Scheduled => {
            if let Err(e) = s.spec.validate() {
                return Step::Invalid(e.to_string());
            }
            if shutdown_due(s, now) {
                return Step::ShutDown;
            }
            match live {
                // Paused locally before Running was written (an agent restart in between).
                Some(l) if l.state == State::Paused => {
                    let mut next = status::paused(&st, &t);
                    next.sandbox_id = Some(l.id.clone());
                    Step::Report(next)
                }
                _ => Step::Start,
            }
        }
        Phase::Running | Phase::Paused => {
            if shutdown_due(s, now) {
                return Step::ShutDown;
            }
            let Some(l) = live else {
                let message = lost_message(s, local);
                return Step::Report(status::finished(
                    &st,
                    &Outcome::Failed {
                        reason: reason::VM_LOST,
                    },
                    Some(message),
                    None,
                    &t,
                ));
            };
            let id = l.id.clone();
            // Paused by its idle timeout (`lifecycle.idlePauseSeconds`): it stays so until a use
            // wakes it (the node does that), reported like a declared pause.
            let idle_paused = l.state == State::Paused && l.reason.as_deref() == Some(IDLE_REASON);
            match (l.state, s.spec.paused || idle_paused) {
                (State::Running, true) => Step::Pause { id },
                // Asleep and now declared paused: the node's pause makes it a declared pause,
                // which a use no longer wakes.
                (State::Paused, true) if s.spec.paused && idle_paused => Step::Pause { id },
                (State::Paused, false) => Step::Resume { id },
                (State::Running, false) => {
                    let agrees = s.phase() == Phase::Running
                        && st.sandbox_id.as_deref() == Some(&id)
                        && st.reason.is_none();
                    match agrees {
                        true => Step::Nothing,
                        false => Step::Report(status::service_running(&st, &id, &t)),
                    }
                }
                (State::Paused, true) => {
                    let agrees = s.phase() == Phase::Paused && st.reason.is_none();
                    match agrees {
                        true => Step::Nothing,
                        false => Step::Report(status::paused(&st, &t)),
                    }
                }
                // Booting (its start task went with an earlier agent): the next look decides.
                _ => Step::Nothing,
            }
        }
        _ => Step::Nothing,
    }
}

/// Why a Running or Paused Service Sandbox has no live local sandbox, as its Failed message.
fn lost_message(s: &Sandbox, local: Option<&SandboxInfo>) -> String {
    let node = s.node_name().unwrap_or_default();
    match local {
        Some(l) => format!(
            "its microVM on node {node} ended ({}): {}",
            l.state,
            l.reason.as_deref().unwrap_or("no reason recorded")
        ),
        None => format!(
            "its microVM is no longer on node {node} (no sandbox {} there)",
            s.status
                .as_ref()
                .and_then(|st| st.sandbox_id.as_deref())
                .unwrap_or("with its uid")
        ),
    }
}

/// `namespace/name`, for logs.
pub(super) fn key(s: &Sandbox) -> String {
    format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any())
}

#[cfg(test)]
#[path = "service_tests.rs"]
mod tests;
