//! Status transitions of a Sandbox, as pure functions from the old status to the new one. Who writes
//! which: the controller Pending -> Scheduled (and -> Failed/NodeLost, -> Failed/InvalidSpec, and a
//! Service never placed before its shutdown time -> Succeeded), the node agent Scheduled -> Running
//! -> Succeeded | Failed, and for Service sandboxes Running <-> Paused and Paused -> Succeeded |
//! Failed. Writers send the whole new status with the object's resourceVersion
//! (`replace_status`), so a transition computed from a stale object fails with a conflict instead of
//! overwriting someone else's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

use crate::crd::{reason, Phase, SandboxCondition, SandboxStatus};

/// Whether `from -> to` is a transition some writer may make.
pub fn allowed(from: Phase, to: Phase) -> bool {
    use Phase::*;
    matches!(
        (from, to),
        (Pending, Scheduled)
            | (Pending, Succeeded | Failed)
            | (Scheduled, Running)
            | (Scheduled, Succeeded | Failed)
            | (Running, Succeeded | Failed)
            | (Running, Paused)
            | (Paused, Running)
            | (Paused, Succeeded | Failed)
    )
}

/// Sets (or updates) condition `type_`, keeping its transition time when the status does not change.
fn set_condition(
    conds: &mut Vec<SandboxCondition>,
    type_: &str,
    status: bool,
    reason: Option<&str>,
    message: Option<&str>,
    now: &Time,
) {
    let status = if status { "True" } else { "False" }.to_string();
    let new = SandboxCondition {
        type_: type_.into(),
        status: status.clone(),
        reason: reason.map(Into::into),
        message: message.map(Into::into),
        last_transition_time: now.clone(),
    };
    match conds.iter_mut().find(|c| c.type_ == type_) {
        Some(c) if c.status == status => {
            c.reason = new.reason;
            c.message = new.message;
        }
        Some(c) => *c = new,
        None => conds.push(new),
    }
}

/// Pending with a note why no node takes it (no phase change).
pub fn unschedulable(old: &SandboxStatus, message: &str, now: &Time) -> SandboxStatus {
    let mut s = old.clone();
    s.phase = Some(Phase::Pending);
    s.reason = Some(reason::UNSCHEDULABLE.into());
    s.message = Some(message.into());
    set_condition(
        &mut s.conditions,
        "Scheduled",
        false,
        Some(reason::UNSCHEDULABLE),
        Some(message),
        now,
    );
    s
}

/// Pending -> Scheduled on `node`.
pub fn scheduled(old: &SandboxStatus, node: &str, now: &Time) -> SandboxStatus {
    let mut s = old.clone();
    s.phase = Some(Phase::Scheduled);
    s.node_name = Some(node.into());
    s.reason = None;
    s.message = None;
    set_condition(&mut s.conditions, "Scheduled", true, None, None, now);
    s
}

/// Scheduled -> Running: written by the node agent *before* it boots anything, so that after a
/// restart it knows the sandbox may have run and never starts it again.
pub fn running(old: &SandboxStatus, now: &Time) -> SandboxStatus {
    let mut s = old.clone();
    s.phase = Some(Phase::Running);
    s.start_time = Some(now.clone());
    set_condition(&mut s.conditions, "Started", true, None, None, now);
    s
}

/// Scheduled (or Running, Paused) -> Running for a Service sandbox whose VM runs as node-local
/// sandbox `sandbox_id`: the first time with its start time and `Started`; after a resume with the
/// `Paused` condition False. A failure noted before (a failed resume) is cleared.
pub fn service_running(old: &SandboxStatus, sandbox_id: &str, now: &Time) -> SandboxStatus {
    let mut s = old.clone();
    let was = s.phase;
    s.phase = Some(Phase::Running);
    s.sandbox_id = Some(sandbox_id.into());
    s.start_time.get_or_insert_with(|| now.clone());
    s.reason = None;
    s.message = None;
    set_condition(&mut s.conditions, "Started", true, None, None, now);
    if was == Some(Phase::Paused) || s.conditions.iter().any(|c| c.type_ == "Paused") {
        set_condition(&mut s.conditions, "Paused", false, None, None, now);
    }
    s
}

/// Running -> Paused: the VM is saved on its node and holds no vCPUs or memory there.
pub fn paused(old: &SandboxStatus, now: &Time) -> SandboxStatus {
    let mut s = old.clone();
    s.phase = Some(Phase::Paused);
    s.reason = None;
    s.message = None;
    set_condition(&mut s.conditions, "Paused", true, None, None, now);
    s
}

/// A pause (`PauseFailed`, still running) or resume (`ResumeFailed`, still paused) that did not
/// happen: the phase stays, the `Paused` condition and the message say why.
pub fn pause_or_resume_failed(
    old: &SandboxStatus,
    resuming: bool,
    message: &str,
    now: &Time,
) -> SandboxStatus {
    let mut s = old.clone();
    let why = match resuming {
        true => reason::RESUME_FAILED,
        false => reason::PAUSE_FAILED,
    };
    s.reason = Some(why.into());
    s.message = Some(message.into());
    set_condition(
        &mut s.conditions,
        "Paused",
        resuming,
        Some(why),
        Some(message),
        now,
    );
    s
}

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this code (0 = Succeeded).
    Exited(i32),
    /// Killed after `timeoutSeconds`; exit code as reported (e.g. 137).
    TimedOut(Option<i32>),
    /// Ended without a result: `reason` is one of `reason::*`.
    Failed { reason: &'static str },
    /// A Service sandbox reached its `lifecycle.shutdownTime` (Succeeded, `ShutdownTime`).
    ShutDown,
}

/// Running (or Scheduled, for failures before start) -> Succeeded | Failed.
pub fn finished(
    old: &SandboxStatus,
    outcome: &Outcome,
    message: Option<String>,
    output_tail: Option<String>,
    now: &Time,
) -> SandboxStatus {
    let mut s = old.clone();
    let (phase, code, why) = match outcome {
        Outcome::Exited(0) => (Phase::Succeeded, Some(0), reason::COMPLETED),
        Outcome::Exited(c) => (Phase::Failed, Some(*c), reason::ERROR),
        Outcome::TimedOut(c) => (Phase::Failed, *c, reason::TIMEOUT),
        Outcome::Failed { reason } => (Phase::Failed, None, *reason),
        Outcome::ShutDown => (Phase::Succeeded, None, reason::SHUTDOWN_TIME),
    };
    s.phase = Some(phase);
    s.exit_code = code;
    s.reason = Some(why.into());
    s.message = message;
    s.completion_time = Some(now.clone());
    if output_tail.is_some() {
        s.output_tail = output_tail;
    }
    set_condition(
        &mut s.conditions,
        "Finished",
        true,
        Some(why),
        s.message.clone().as_deref(),
        now,
    );
    s
}

/// The node's lease expired: the sandbox's result is lost with it.
pub fn node_lost(old: &SandboxStatus, node: &str, now: &Time) -> SandboxStatus {
    let msg =
        format!("node {node} stopped renewing its lease while the sandbox was assigned to it");
    finished(
        old,
        &Outcome::Failed {
            reason: reason::NODE_LOST,
        },
        Some(msg),
        None,
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn now() -> Time {
        Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_000).unwrap())
    }

    #[test]
    fn finished_phases_allow_nothing() {
        for to in [
            Phase::Pending,
            Phase::Scheduled,
            Phase::Running,
            Phase::Paused,
            Phase::Succeeded,
            Phase::Failed,
        ] {
            assert!(!allowed(Phase::Succeeded, to));
            assert!(!allowed(Phase::Failed, to));
        }
        assert!(!allowed(Phase::Pending, Phase::Running));
        assert!(!allowed(Phase::Running, Phase::Scheduled));
        assert!(allowed(Phase::Scheduled, Phase::Running));
        assert!(allowed(Phase::Running, Phase::Paused) && allowed(Phase::Paused, Phase::Running));
        assert!(
            !allowed(Phase::Scheduled, Phase::Paused),
            "only a running VM pauses"
        );
        assert!(
            !allowed(Phase::Paused, Phase::Scheduled),
            "a snapshot never moves node"
        );
    }

    #[test]
    fn a_service_runs_pauses_resumes_and_shuts_down() {
        let t = now();
        let later = Time(k8s_openapi::jiff::Timestamp::from_second(1_700_000_100).unwrap());
        let s = scheduled(&SandboxStatus::default(), "n1", &t);
        let s = service_running(&s, "sb-1", &t);
        assert_eq!(
            (s.phase, s.sandbox_id.as_deref()),
            (Some(Phase::Running), Some("sb-1"))
        );
        assert!(!s.conditions.iter().any(|c| c.type_ == "Paused"));
        let s = pause_or_resume_failed(&s, false, "execs running", &t);
        assert_eq!(
            (s.phase, s.reason.as_deref()),
            (Some(Phase::Running), Some("PauseFailed"))
        );
        let s = paused(&s, &later);
        assert_eq!((s.phase, s.message.as_deref()), (Some(Phase::Paused), None));
        let s = pause_or_resume_failed(&s, true, "node full", &later);
        let cond = s.conditions.iter().find(|c| c.type_ == "Paused").unwrap();
        assert_eq!(
            (s.phase, cond.status.as_str(), cond.reason.as_deref()),
            (Some(Phase::Paused), "True", Some("ResumeFailed"))
        );
        assert_eq!(
            cond.last_transition_time, later,
            "still paused: no transition"
        );
        let s = service_running(&s, "sb-1", &later);
        assert_eq!(s.start_time, Some(t), "the start time is the first start");
        assert_eq!(s.reason, None);
        let cond = s.conditions.iter().find(|c| c.type_ == "Paused").unwrap();
        assert_eq!(cond.status, "False");
        let s = finished(&s, &Outcome::ShutDown, None, None, &later);
        assert_eq!(
            (s.phase, s.reason.as_deref(), s.sandbox_id.as_deref()),
            (Some(Phase::Succeeded), Some("ShutdownTime"), Some("sb-1"))
        );
    }

    #[test]
    fn a_full_life_keeps_node_and_times() {
        let t = now();
        let s = unschedulable(&SandboxStatus::default(), "full", &t);
        assert_eq!(s.reason.as_deref(), Some("Unschedulable"));
        let s = scheduled(&s, "n1", &t);
        assert_eq!(
            (s.phase, s.reason.as_deref()),
            (Some(Phase::Scheduled), None)
        );
        let s = running(&s, &t);
        let s = finished(&s, &Outcome::Exited(3), None, Some("out".into()), &t);
        assert_eq!(s.phase, Some(Phase::Failed));
        assert_eq!(s.exit_code, Some(3));
        assert_eq!(s.node_name.as_deref(), Some("n1"));
        assert_eq!(s.output_tail.as_deref(), Some("out"));
        assert!(s.start_time.is_some() && s.completion_time.is_some());
        let types: Vec<_> = s
            .conditions
            .iter()
            .map(|c| (c.type_.as_str(), c.status.as_str()))
            .collect();
        assert_eq!(
            types,
            [
                ("Scheduled", "True"),
                ("Started", "True"),
                ("Finished", "True")
            ]
        );
    }

    #[test]
    fn timeouts_and_lost_nodes_fail_with_their_reason() {
        let t = now();
        let s = finished(
            &SandboxStatus::default(),
            &Outcome::TimedOut(Some(137)),
            None,
            None,
            &t,
        );
        assert_eq!(
            (s.phase, s.reason.as_deref()),
            (Some(Phase::Failed), Some("Timeout"))
        );
        let s = node_lost(&scheduled(&SandboxStatus::default(), "n9", &t), "n9", &t);
        assert_eq!(s.reason.as_deref(), Some("NodeLost"));
        assert!(s.message.unwrap().contains("n9"));
        let s = finished(
            &SandboxStatus::default(),
            &Outcome::Exited(0),
            None,
            None,
            &t,
        );
        assert_eq!(s.phase, Some(Phase::Succeeded));
    }
}
