//! What one controller pass decides for Service sandboxes: validation before placement, the ledger
//! of paused ones, shutdown times.

use std::collections::HashMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::tests::{binds, bound, lease, node, now, sandbox};
use super::*;
use crate::crd::{Lifecycle, LifecycleType};

fn service(name: &str, created: i64, status: Option<crate::crd::SandboxStatus>) -> Sandbox {
    let mut s = sandbox(name, created, status);
    s.spec.command.clear();
    s.spec.lifecycle = Some(Lifecycle {
        type_: LifecycleType::Service,
        ..Default::default()
    });
    s
}

fn shutting_down(mut s: Sandbox, in_secs: i64, policy: Option<ShutdownPolicy>) -> Sandbox {
    let at = now()
        .checked_add(SignedDuration::from_secs(in_secs))
        .unwrap();
    let lifecycle = s.spec.lifecycle.as_mut().unwrap();
    lifecycle.shutdown_time = Some(Time(at));
    lifecycle.shutdown_policy = policy;
    s
}

fn statuses(actions: &[Action]) -> Vec<(String, Option<Phase>, Option<String>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SetStatus { sandbox } => {
                let st = sandbox.status.clone().unwrap_or_default();
                Some((sandbox.name_any(), st.phase, st.reason))
            }
            _ => None,
        })
        .collect()
}

fn deletes(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Delete { sandbox } => Some(sandbox.name_any()),
            _ => None,
        })
        .collect()
}

#[test]
fn invalid_specs_fail_before_placement_with_the_field_named() {
    let nodes = [node("a", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("a", 1)].into();
    let mut with_command = service("svc-with-command", 1, None);
    with_command.spec.command = vec!["sleep".into(), "1".into()];
    let mut no_command = sandbox("job-without-command", 2, None);
    no_command.spec.command.clear();
    let actions = plan(
        &[with_command, no_command, service("fine", 3, None)],
        &nodes,
        &leases,
        now(),
    );
    assert_eq!(binds(&actions), [("fine".into(), "a".into())]);
    let failed: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SetStatus { sandbox } => Some(sandbox.status.clone().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(failed.len(), 2);
    for st in &failed {
        assert_eq!(
            (st.phase, st.reason.as_deref()),
            (Some(Phase::Failed), Some("InvalidSpec"))
        );
    }
    assert!(failed[0]
        .message
        .as_deref()
        .unwrap()
        .contains("must be empty for a Service"));
    assert!(failed[1]
        .message
        .as_deref()
        .unwrap()
        .contains("spec.command is required"));
}

#[test]
fn a_paused_service_holds_no_room_unless_it_is_asked_to_resume() {
    let nodes = [node("a", "2", "4Gi")];
    let leases: HashMap<_, _> = [lease("a", 1)].into();
    let mut sleeping = service("sleeping", 1, bound("a", Phase::Paused));
    sleeping.spec.paused = true;
    let waking = service("waking", 2, bound("a", Phase::Paused)); // spec.paused back to false
                                                                  // Two vCPUs: the sleeping one leaves its vCPU free, the waking one keeps its own.
    let actions = plan(
        &[
            sleeping.clone(),
            waking,
            sandbox("new-1", 10, None),
            sandbox("new-2", 11, None),
        ],
        &nodes,
        &leases,
        now(),
    );
    assert_eq!(binds(&actions), [("new-1".into(), "a".into())]);
    // A running service asked to pause still holds its room until it is Paused.
    let mut pausing = service("pausing", 1, bound("a", Phase::Running));
    pausing.spec.paused = true;
    let actions = plan(
        &[pausing, sleeping, sandbox("new", 10, None)],
        &nodes,
        &leases,
        now(),
    );
    assert_eq!(binds(&actions), [("new".into(), "a".into())]);
}

#[test]
fn paused_sandboxes_on_a_lost_node_fail_with_it() {
    let nodes = [node("gone", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("gone", 60)].into();
    let mut p = service("p", 1, bound("gone", Phase::Paused));
    p.spec.paused = true;
    let actions = plan(&[p], &nodes, &leases, now());
    assert_eq!(
        statuses(&actions),
        [("p".into(), Some(Phase::Failed), Some("NodeLost".into()))]
    );
}

#[test]
fn shutdown_time_deletes_with_policy_delete_and_never_places_a_late_one() {
    let nodes = [node("a", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("a", 1)].into();
    let sandboxes = [
        shutting_down(
            service("running-due", 1, bound("a", Phase::Running)),
            -1,
            None,
        ),
        shutting_down(
            service("retained-due", 2, bound("a", Phase::Running)),
            -1,
            Some(ShutdownPolicy::Retain),
        ),
        shutting_down(service("future", 3, bound("a", Phase::Running)), 60, None),
        shutting_down(
            service("pending-due", 4, None),
            0,
            Some(ShutdownPolicy::Delete),
        ),
        shutting_down(
            service("pending-retained", 5, None),
            -5,
            Some(ShutdownPolicy::Retain),
        ),
        shutting_down(service("pending-future", 6, None), 60, None),
    ];
    let actions = plan(&sandboxes, &nodes, &leases, now());
    assert_eq!(deletes(&actions), ["running-due", "pending-due"]);
    assert_eq!(binds(&actions), [("pending-future".into(), "a".into())]);
    // Retain: the node agent stops a running one; one never placed ends here.
    assert_eq!(
        statuses(&actions),
        [(
            "pending-retained".into(),
            Some(Phase::Succeeded),
            Some("ShutdownTime".into())
        )]
    );
    // A deleting object is not deleted again.
    let mut deleting = sandboxes[0].clone();
    deleting.metadata.deletion_timestamp = Some(Time(now()));
    assert!(deletes(&plan(&[deleting], &nodes, &leases, now())).is_empty());
}

#[test]
fn next_deadline_is_the_earliest_future_shutdown_or_ttl() {
    let at = |secs: i64| now().checked_add(SignedDuration::from_secs(secs)).unwrap();
    let mut done = sandbox("done", 1, bound("a", Phase::Succeeded));
    done.spec.ttl_seconds_after_finished = Some(30);
    done.status.as_mut().unwrap().completion_time = Some(Time(at(-10)));
    let later = shutting_down(service("later", 2, bound("a", Phase::Running)), 50, None);
    let past = shutting_down(service("past", 3, bound("a", Phase::Running)), -5, None);
    assert_eq!(
        next_deadline(&[later.clone(), past.clone()], now()),
        Some(at(50))
    );
    assert_eq!(next_deadline(&[later, done, past], now()), Some(at(20)));
    assert_eq!(
        next_deadline(&[sandbox("x", 1, None)], now()),
        None::<Timestamp>
    );
}
