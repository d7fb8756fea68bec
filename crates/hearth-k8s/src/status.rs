//! Status transitions of a Sandbox, as pure functions from the old status to the new one. Who writes
//! which: the controller Pending -> Scheduled (and -> Failed/NodeLost), the node agent Scheduled ->
//! Running -> Succeeded | Failed. Writers send the whole new status with the object's resourceVersion
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
            | (Pending, Failed)
            | (Scheduled, Running)
            | (Scheduled, Failed)
            | (Running, Succeeded)
            | (Running, Failed)
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

/// How a run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The command exited with this code (0 = Succeeded).
    Exited(i32),
    /// Killed after `timeoutSeconds`; exit code as reported (e.g. 137).
    TimedOut(Option<i32>),
    /// Ended without a result: `reason` is one of `reason::*`.
    Failed { reason: &'static str },
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
            Phase::Succeeded,
            Phase::Failed,
        ] {
            assert!(!allowed(Phase::Succeeded, to));
            assert!(!allowed(Phase::Failed, to));
        }
        assert!(!allowed(Phase::Pending, Phase::Running));
        assert!(!allowed(Phase::Running, Phase::Scheduled));
        assert!(allowed(Phase::Scheduled, Phase::Running));
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
