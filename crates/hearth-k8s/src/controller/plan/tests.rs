//! What one controller pass decides, on hand-built snapshots.

use std::collections::{BTreeMap, HashMap};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, Time};
use k8s_openapi::jiff::Timestamp;

use super::*;
use crate::crd::{HearthNodeSpec, NodeCapacity, SandboxSpec, SandboxStatus};
use crate::quantity::Quantity;

pub(super) fn now() -> Timestamp {
    Timestamp::from_second(2_000_000_000).unwrap()
}

pub(super) fn node(name: &str, cpu: &str, mem: &str) -> HearthNode {
    HearthNode::new(
        name,
        HearthNodeSpec {
            capacity: NodeCapacity {
                cpu: Quantity::new(cpu),
                memory: Quantity::new(mem),
            },
            api_endpoint: None,
        },
    )
}

pub(super) fn lease(node: &str, age_secs: i64) -> (String, Lease) {
    let name = node_lease_name(node);
    let mut l = Lease::default();
    l.metadata.name = Some(name.clone());
    l.spec = Some(LeaseSpec {
        renew_time: Some(MicroTime(
            Timestamp::from_second(now().as_second() - age_secs).unwrap(),
        )),
        lease_duration_seconds: Some(10),
        ..Default::default()
    });
    (name, l)
}

pub(super) fn sandbox(name: &str, created: i64, status: Option<SandboxStatus>) -> Sandbox {
    let mut s = Sandbox::new(
        name,
        SandboxSpec {
            image: "python".into(),
            command: vec!["true".into()],
            args: vec![],
            env: vec![],
            working_dir: None,
            resources: None,
            timeout_seconds: None,
            ttl_seconds_after_finished: None,
            node_selector: BTreeMap::new(),
            network: None,
            lifecycle: None,
            paused: false,
        },
    );
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some(format!("uid-{name}"));
    s.metadata.creation_timestamp = Some(Time(Timestamp::from_second(created).unwrap()));
    s.status = status;
    s
}

pub(super) fn bound(node: &str, phase: Phase) -> Option<SandboxStatus> {
    Some(SandboxStatus {
        phase: Some(phase),
        node_name: Some(node.into()),
        ..Default::default()
    })
}

pub(super) fn binds(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Bind { sandbox, node } => Some((sandbox.name_any(), node.clone())),
            _ => None,
        })
        .collect()
}

#[test]
fn oldest_pending_first_and_existing_bindings_count() {
    let nodes = [node("a", "2", "1Gi"), node("b", "2", "1Gi")];
    let leases: HashMap<_, _> = [lease("a", 1), lease("b", 1)].into();
    let sandboxes = [
        sandbox("running-on-a", 1, bound("a", Phase::Running)),
        sandbox("scheduled-on-a", 2, bound("a", Phase::Scheduled)),
        sandbox("newer", 20, None),
        sandbox("older", 10, None),
        sandbox("third", 30, None),
        sandbox("no-room", 40, None),
    ];
    let actions = plan(&sandboxes, &nodes, &leases, now());
    // a is full (2 vCPU); b takes two; the last one stays Pending with a note.
    assert_eq!(
        binds(&actions),
        [("older".into(), "b".into()), ("newer".into(), "b".into())]
    );
    let notes: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SetStatus { sandbox } => Some(sandbox.status.clone().unwrap()),
            _ => None,
        })
        .collect();
    assert_eq!(notes.len(), 2, "{notes:?}");
    assert!(notes
        .iter()
        .all(|s| s.reason.as_deref() == Some("Unschedulable")));
}

#[test]
fn an_unchanged_unschedulable_note_is_not_rewritten() {
    let nodes = [node("a", "1", "1Gi")];
    let leases: HashMap<_, _> = [lease("a", 1)].into();
    let first = plan(
        &[sandbox("s", 1, None), sandbox("t", 2, None)],
        &nodes,
        &leases,
        now(),
    );
    let Action::SetStatus { sandbox: noted } = &first[1] else {
        panic!("{first:?}")
    };
    let again = plan(
        &[
            sandbox("s", 1, bound("a", Phase::Running)),
            (**noted).clone(),
        ],
        &nodes,
        &leases,
        now(),
    );
    assert!(again.is_empty(), "{again:?}");
}

#[test]
fn expired_lease_fails_its_unfinished_sandboxes_as_node_lost() {
    let nodes = [node("gone", "4", "4Gi"), node("alive", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("gone", 11), lease("alive", 1)].into();
    let sandboxes = [
        sandbox("r", 1, bound("gone", Phase::Running)),
        sandbox("s", 2, bound("gone", Phase::Scheduled)),
        sandbox("done", 3, bound("gone", Phase::Succeeded)),
        sandbox("ok", 4, bound("alive", Phase::Running)),
    ];
    let actions = plan(&sandboxes, &nodes, &leases, now());
    let lost: Vec<_> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SetStatus { sandbox } => {
                let st = sandbox.status.as_ref().unwrap();
                assert_eq!(st.phase, Some(Phase::Failed));
                assert_eq!(st.reason.as_deref(), Some("NodeLost"));
                Some(sandbox.name_any())
            }
            _ => None,
        })
        .collect();
    assert_eq!(lost, ["r", "s"]);
}

#[test]
fn finalizer_dropped_only_where_no_live_node_will_stop_a_vm() {
    let nodes = [node("alive", "4", "4Gi"), node("gone", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("alive", 1), lease("gone", 60)].into();
    let deleting = |name, status| {
        let mut s = sandbox(name, 1, status);
        s.metadata.deletion_timestamp = Some(Time(now()));
        s.metadata.finalizers = Some(vec![FINALIZER.into()]);
        s
    };
    let sandboxes = [
        deleting("never-bound", None),
        deleting("on-alive", bound("alive", Phase::Running)),
        deleting("on-gone", bound("gone", Phase::Failed)),
    ];
    let dropped: Vec<_> = plan(&sandboxes, &nodes, &leases, now())
        .iter()
        .filter_map(|a| match a {
            Action::RemoveFinalizer { sandbox } => Some(sandbox.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(dropped, ["never-bound", "on-gone"]);
}

#[test]
fn finished_sandboxes_are_deleted_after_their_ttl() {
    let done = |name: &str, ttl: Option<u64>, finished_secs_ago: i64| {
        let mut s = sandbox(name, 1, bound("a", Phase::Succeeded));
        s.spec.ttl_seconds_after_finished = ttl;
        s.status.as_mut().unwrap().completion_time = Some(Time(
            Timestamp::from_second(now().as_second() - finished_secs_ago).unwrap(),
        ));
        s
    };
    let sandboxes = [
        done("expired", Some(5), 6),
        done("young", Some(5), 4),
        done("no-ttl", None, 1000),
    ];
    let deleted: Vec<_> = plan(&sandboxes, &[], &HashMap::new(), now())
        .iter()
        .filter_map(|a| match a {
            Action::Delete { sandbox } => Some(sandbox.name_any()),
            _ => None,
        })
        .collect();
    assert_eq!(deleted, ["expired"]);
}

#[test]
fn bad_quantities_fail_the_sandbox_instead_of_blocking_the_queue() {
    let mut bad = sandbox("bad", 1, None);
    bad.spec.resources = Some(crate::crd::SandboxResources {
        cpu: Some(Quantity::new("lots")),
        memory: None,
    });
    let nodes = [node("a", "4", "4Gi")];
    let leases: HashMap<_, _> = [lease("a", 1)].into();
    let actions = plan(&[bad, sandbox("good", 2, None)], &nodes, &leases, now());
    assert_eq!(binds(&actions), [("good".into(), "a".into())]);
    let Action::SetStatus { sandbox } = &actions[0] else {
        panic!("{actions:?}")
    };
    let st = sandbox.status.as_ref().unwrap();
    assert_eq!(
        (st.phase, st.reason.as_deref()),
        (Some(Phase::Failed), Some("InvalidSpec"))
    );
    assert!(st.message.as_deref().unwrap().contains("lots"));
}
