//! What one look at a Service Sandbox decides, on hand-built objects and local records.

use std::collections::BTreeMap;

use hearth_sandbox::node::{SandboxInfo, State, IDLE_REASON};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};

use super::*;
use crate::crd::{Lifecycle, LifecycleType, SandboxSpec};

fn now() -> Timestamp {
    Timestamp::from_second(2_000_000_000).unwrap()
}

fn service(phase: Phase, sandbox_id: Option<&str>) -> Sandbox {
    let spec: SandboxSpec =
        serde_yaml::from_str("image: busybox\nlifecycle: {type: Service}\n").unwrap();
    let mut s = Sandbox::new("svc", spec);
    s.metadata.namespace = Some("ns".into());
    s.metadata.uid = Some("uid-1".into());
    s.status = Some(SandboxStatus {
        phase: Some(phase),
        node_name: Some("n1".into()),
        sandbox_id: sandbox_id.map(Into::into),
        ..Default::default()
    });
    s
}

fn local(id: &str, state: State, created_at: u64) -> SandboxInfo {
    SandboxInfo {
        id: id.into(),
        tenant: "kubernetes".into(),
        image: "busybox".into(),
        image_digest: None,
        state,
        reason: (state == State::Failed).then(|| "VM exited: killed by signal 9".into()),
        vcpus: 1,
        memory_mib: 256,
        disk_bytes: 0,
        labels: BTreeMap::from([(UID_LABEL.to_string(), "uid-1".to_string())]),
        created_at,
        ready_at: None,
        finished_at: None,
        expires_at: None,
        last_active_at: 0,
        boot_ms: None,
        network: None,
        warm: false,
        on_idle: Default::default(),
        stopping: false,
    }
}

fn phase_of(step: &Step) -> (Option<Phase>, Option<String>) {
    match step {
        Step::Report(st) => (st.phase, st.reason.clone()),
        other => panic!("not a report: {other:?}"),
    }
}

#[test]
fn a_scheduled_service_starts_or_adopts_its_local_sandbox() {
    let s = service(Phase::Scheduled, None);
    assert_eq!(decide(&s, None, now()), Step::Start);
    let booting = local("a", State::Creating, 1);
    assert_eq!(
        decide(&s, Some(&booting), now()),
        Step::Start,
        "adopted by Start"
    );
    let paused = local("a", State::Paused, 1);
    let Step::Report(st) = decide(&s, Some(&paused), now()) else {
        panic!()
    };
    assert_eq!(
        (st.phase, st.sandbox_id.as_deref()),
        (Some(Phase::Paused), Some("a"))
    );
}

#[test]
fn an_invalid_service_is_failed_before_anything_starts() {
    let mut s = service(Phase::Scheduled, None);
    s.spec.command = vec!["sleep".into()];
    let Step::Invalid(message) = decide(&s, None, now()) else {
        panic!()
    };
    assert!(message.contains("must be empty for a Service"), "{message}");
}

#[test]
fn spec_paused_is_carried_out_and_agreement_is_left_alone() {
    let mut s = service(Phase::Running, Some("a"));
    let running = local("a", State::Running, 1);
    assert_eq!(decide(&s, Some(&running), now()), Step::Nothing);
    s.spec.paused = true;
    assert_eq!(
        decide(&s, Some(&running), now()),
        Step::Pause { id: "a".into() }
    );
    let paused = local("a", State::Paused, 1);
    // Paused locally, status still Running (the write after the pause was lost): report it.
    assert_eq!(
        phase_of(&decide(&s, Some(&paused), now())).0,
        Some(Phase::Paused)
    );
    let mut p = service(Phase::Paused, Some("a"));
    p.spec.paused = true;
    assert_eq!(decide(&p, Some(&paused), now()), Step::Nothing);
    p.spec.paused = false;
    assert_eq!(
        decide(&p, Some(&paused), now()),
        Step::Resume { id: "a".into() }
    );
    // A failed pause noted on a Running one is cleared once paused is false again.
    let mut noted = service(Phase::Running, Some("a"));
    noted.status.as_mut().unwrap().reason = Some(reason::PAUSE_FAILED.into());
    assert_eq!(
        phase_of(&decide(&noted, Some(&running), now())),
        (Some(Phase::Running), None)
    );
}

#[test]
fn a_vm_that_ended_or_vanished_fails_the_sandbox_with_the_nodes_reason() {
    let s = service(Phase::Running, Some("a"));
    let dead = local("a", State::Failed, 1);
    let Step::Report(st) = decide(&s, Some(&dead), now()) else {
        panic!()
    };
    assert_eq!(
        (st.phase, st.reason.as_deref()),
        (Some(Phase::Failed), Some("VMLost"))
    );
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("killed by signal 9"),
        "{st:?}"
    );
    let Step::Report(st) = decide(&service(Phase::Paused, Some("a")), None, now()) else {
        panic!()
    };
    assert_eq!(st.reason.as_deref(), Some("VMLost"));
    assert!(
        st.message
            .as_deref()
            .unwrap()
            .contains("no sandbox a there"),
        "{st:?}"
    );
}

#[test]
fn the_local_sandbox_is_the_one_named_else_the_newest_live_one_with_the_uid() {
    let locals = [
        local("old", State::Failed, 1),
        local("new", State::Running, 2),
        local("newest-dead", State::Stopped, 3),
    ];
    let unnamed = service(Phase::Scheduled, None);
    assert_eq!(local_of(&unnamed, &locals).unwrap().id, "new");
    let named = service(Phase::Running, Some("old"));
    assert_eq!(local_of(&named, &locals).unwrap().id, "old");
}

#[test]
fn shutdown_time_stops_it_in_any_live_phase() {
    for phase in [Phase::Scheduled, Phase::Running, Phase::Paused] {
        let mut s = service(phase, Some("a"));
        s.spec.lifecycle = Some(Lifecycle {
            type_: LifecycleType::Service,
            shutdown_time: Some(Time(
                now().checked_sub(SignedDuration::from_secs(1)).unwrap(),
            )),
            shutdown_policy: None,
            idle_pause_seconds: None,
        });
        assert_eq!(
            decide(&s, Some(&local("a", State::Running, 1)), now()),
            Step::ShutDown
        );
    }
    assert_eq!(
        decide(&service(Phase::Succeeded, Some("a")), None, now()),
        Step::Nothing
    );
}

#[test]
fn an_idle_paused_service_is_reported_paused_not_resumed_and_running_once_woken() {
    // `spec.paused` stays false throughout: the node pauses it when idle and wakes it on use.
    let mut idle = local("a", State::Paused, 1);
    idle.reason = Some(IDLE_REASON.into());
    let running = service(Phase::Running, Some("a"));
    assert_eq!(
        phase_of(&decide(&running, Some(&idle), now())).0,
        Some(Phase::Paused),
        "reported, not resumed"
    );
    let paused = service(Phase::Paused, Some("a"));
    assert_eq!(decide(&paused, Some(&idle), now()), Step::Nothing);
    // Woken by a use: Running again, reported as such.
    let woken = local("a", State::Running, 1);
    assert_eq!(
        phase_of(&decide(&paused, Some(&woken), now())).0,
        Some(Phase::Running)
    );
    // Paused by a call (no idle reason) while `spec.paused` is false: resumed, as before.
    let called = local("a", State::Paused, 1);
    assert_eq!(
        decide(&paused, Some(&called), now()),
        Step::Resume { id: "a".into() }
    );
    // Asleep, then declared paused (`spec.paused: true`): the node's pause makes it a declared
    // pause, once; then it is left paused.
    let mut declared = paused.clone();
    declared.spec.paused = true;
    assert_eq!(
        decide(&declared, Some(&idle), now()),
        Step::Pause { id: "a".into() }
    );
    assert_eq!(decide(&declared, Some(&called), now()), Step::Nothing);
}
