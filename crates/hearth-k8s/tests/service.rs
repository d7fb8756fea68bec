//! Service Sandboxes (`spec.lifecycle.type: Service`) against real parts: the testkit's
//! kube-apiserver, the operator and a node agent in this process over a real `Node` (its own
//! HEARTH_HOME, SQLite state), real microVMs under QEMU/TCG from the busybox test image. The node's
//! sandboxes are reached the way `hearth serve`'s HTTP API reaches them: through `Node` as the
//! agent's tenant.
//!
//! Boots: the life test two (one adopted across a restart, one whose VM is killed while the node is
//! down), the shutdown test three, the idle-pause test one; the invalid-spec test none.

mod common;
mod service_support;

use std::time::Duration;

use common::{cluster, eventually};
use hearth_k8s::crd::{Phase, ShutdownPolicy};
use hearth_sandbox::node::{NodeError, State};
use kube::api::{Api, DeleteParams};
use service_support::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_service_sandbox_runs_pauses_resumes_is_adopted_after_a_restart_and_goes_when_deleted() {
    let Some(c) = cluster("svc-life").await else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let node_name = format!("{}-n1", c.ns);
    let mut rig = Rig::start(&c, home.path(), &node_name).await;
    let _operator = operator(&c);
    let api: Api<hearth_k8s::crd::Sandbox> = Api::namespaced(c.client.clone(), &c.ns);

    // Create -> Running with the node-local id, a start time and Started.
    let t = std::time::Instant::now();
    common::create_sandbox(&c, "svc", service_spec()).await;
    let s = wait_phase(&api, "svc", Phase::Running, BOOT_WAIT).await;
    eprintln!(
        "create -> Running: {:?} (first boot in this home: pull and boot template)",
        t.elapsed()
    );
    let st = s.status.clone().unwrap();
    let id = st
        .sandbox_id
        .clone()
        .expect("status.sandboxId once Running");
    assert_eq!(st.node_name.as_deref(), Some(node_name.as_str()));
    assert!(st.start_time.is_some(), "{st:?}");
    assert!(
        st.conditions
            .iter()
            .any(|c| c.type_ == "Started" && c.status == "True"),
        "{st:?}"
    );
    let info = rig.node.get(TENANT, &id).expect("in the node's store");
    assert_eq!(info.state, State::Running);
    assert_eq!(
        info.labels.get(hearth_k8s::crd::UID_LABEL),
        s.metadata.uid.as_ref()
    );
    assert_eq!(
        sh(&rig.node, &id, "echo kept > /root/file && echo written").await,
        "written"
    );
    assert_eq!(vmm_pids(&id).len(), 1, "one VMM for the sandbox");

    // spec.paused: true -> Paused, no VMM left; false -> Running, the same sandbox with its file.
    let t = std::time::Instant::now();
    set_paused(&api, "svc", true).await;
    let paused = wait_phase(&api, "svc", Phase::Paused, Duration::from_secs(120)).await;
    eprintln!("paused: true -> Paused: {:?}", t.elapsed());
    assert_eq!(
        paused.status.unwrap().sandbox_id.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(rig.node.get(TENANT, &id).unwrap().state, State::Paused);
    assert!(vmm_pids(&id).is_empty(), "a paused sandbox has no VMM");
    let t = std::time::Instant::now();
    set_paused(&api, "svc", false).await;
    let resumed = wait_phase(&api, "svc", Phase::Running, Duration::from_secs(120)).await;
    eprintln!("paused: false -> Running: {:?}", t.elapsed());
    assert_eq!(
        resumed.status.unwrap().sandbox_id.as_deref(),
        Some(id.as_str())
    );
    assert_eq!(sh(&rig.node, &id, "cat /root/file").await, "kept");

    // A second one, whose VM is killed while the node is down.
    let t = std::time::Instant::now();
    common::create_sandbox(&c, "doomed", service_spec()).await;
    let doomed = wait_phase(&api, "doomed", Phase::Running, BOOT_WAIT).await;
    eprintln!(
        "create -> Running: {:?} (warm image and template)",
        t.elapsed()
    );
    let doomed_id = doomed.status.unwrap().sandbox_id.unwrap();

    // `hearth serve --kubernetes` restarts: agent and node go (VMs stay), then come back.
    rig.stop().await;
    kill_vmm(&doomed_id);
    rig = Rig::start(&c, home.path(), &node_name).await;
    let doomed = wait_phase(&api, "doomed", Phase::Failed, Duration::from_secs(60)).await;
    let st = doomed.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("VMLost"), "{st:?}");
    let message = st.message.unwrap_or_default();
    assert!(message.contains("daemon was down"), "{message}");
    // The live one was adopted: still Running, same id, its guest as it was.
    let s = api.get("svc").await.unwrap();
    let st = s.status.unwrap();
    assert_eq!(
        (st.phase, st.sandbox_id.as_deref()),
        (Some(Phase::Running), Some(id.as_str()))
    );
    assert_eq!(sh(&rig.node, &id, "cat /root/file").await, "kept");

    // Delete -> the VM goes, then the object (finalizer dropped).
    let t = std::time::Instant::now();
    api.delete("svc", &DeleteParams::default()).await.unwrap();
    eventually("Sandbox svc gone", Duration::from_secs(60), || {
        let api = api.clone();
        async move { api.get_opt("svc").await.unwrap().is_none() }
    })
    .await;
    eprintln!("delete -> object gone: {:?}", t.elapsed());
    assert!(vmm_pids(&id).is_empty(), "the VM went with the object");
    assert!(matches!(
        rig.node.get(TENANT, &id),
        Err(NodeError::NotFound { .. })
    ));
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn shutdown_time_stops_the_vm_and_deletes_or_retains_and_a_dead_vm_fails_the_sandbox() {
    let Some(c) = cluster("svc-end").await else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let rig = Rig::start(&c, home.path(), &format!("{}-n1", c.ns)).await;
    let _operator = operator(&c);
    let api: Api<hearth_k8s::crd::Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    for name in ["retained", "deleted", "killed"] {
        common::create_sandbox(&c, name, service_spec()).await;
    }
    let mut ids = Vec::new();
    for name in ["retained", "deleted", "killed"] {
        let s = wait_phase(&api, name, Phase::Running, BOOT_WAIT).await;
        ids.push(s.status.unwrap().sandbox_id.unwrap());
    }

    // A VM that dies under a running Sandbox fails it, with how it ended.
    kill_vmm(&ids[2]);
    let killed = wait_phase(&api, "killed", Phase::Failed, Duration::from_secs(30)).await;
    let st = killed.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("VMLost"), "{st:?}");
    assert!(st.message.unwrap().contains("exited"));
    assert!(vmm_pids(&ids[2]).is_empty());

    // Shutdown times a few seconds ahead, set while they run.
    set_shutdown(&api, "retained", 3, ShutdownPolicy::Retain).await;
    set_shutdown(&api, "deleted", 3, ShutdownPolicy::Delete).await;
    let retained = wait_phase(&api, "retained", Phase::Succeeded, Duration::from_secs(60)).await;
    let st = retained.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("ShutdownTime"), "{st:?}");
    assert!(st.completion_time.is_some());
    eventually("Sandbox deleted gone", Duration::from_secs(60), || {
        let api = api.clone();
        async move { api.get_opt("deleted").await.unwrap().is_none() }
    })
    .await;
    for id in &ids[..2] {
        assert!(vmm_pids(id).is_empty(), "sandbox {id}'s VM stopped");
        assert!(
            rig.node.get(TENANT, id).is_err(),
            "sandbox {id} forgotten by the node"
        );
    }
    // Retained: the object stays, finished.
    assert!(api.get_opt("retained").await.unwrap().is_some());
    rig.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_fail_with_a_message_naming_the_field() {
    let Some(c) = cluster("svc-invalid").await else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let node_name = format!("{}-n1", c.ns);
    let rig = Rig::start(&c, home.path(), &node_name).await;
    let api: Api<hearth_k8s::crd::Sandbox> = Api::namespaced(c.client.clone(), &c.ns);

    // Checked by the node agent too: bound straight to the node, as an older operator might have.
    let mut bound = service_spec();
    bound.command = vec!["sleep".into(), "60".into()];
    common::create_sandbox(&c, "bound-with-command", bound).await;
    bind(&api, "bound-with-command", &node_name).await;
    let s = wait_phase(
        &api,
        "bound-with-command",
        Phase::Failed,
        Duration::from_secs(30),
    )
    .await;
    let st = s.status.unwrap();
    assert_eq!(st.reason.as_deref(), Some("InvalidSpec"));
    assert!(
        st.message.unwrap().contains("must be empty for a Service"),
        "the message says what to change"
    );

    // And by the operator, before placement.
    let _operator = operator(&c);
    let mut with_command = service_spec();
    with_command.command = vec!["sleep".into(), "60".into()];
    common::create_sandbox(&c, "service-with-command", with_command).await;
    let mut without = common::spec(1, "256Mi");
    without.command.clear();
    common::create_sandbox(&c, "job-without-command", without).await;
    for (name, says) in [
        (
            "service-with-command",
            "spec.command and spec.args must be empty",
        ),
        ("job-without-command", "spec.command is required"),
    ] {
        let s = wait_phase(&api, name, Phase::Failed, Duration::from_secs(30)).await;
        let st = s.status.unwrap();
        assert_eq!(st.reason.as_deref(), Some("InvalidSpec"), "{name}");
        assert_eq!(st.node_name, None, "{name} was never placed");
        assert!(st.message.unwrap().contains(says), "{name}");
    }
    assert!(rig.node.list(TENANT).is_empty(), "nothing booted");
    rig.stop().await;
}

/// `lifecycle.idlePauseSeconds`: the node pauses the idle sandbox (no VMM), the agent reports
/// Paused without resuming it although `spec.paused` is false, and a use (what the node's API does
/// before an exec: `Node::wake`) brings it back Running with its files. One boot.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_idle_service_sandbox_sleeps_is_reported_paused_and_wakes_on_use() {
    let Some(c) = cluster("svc-idle").await else {
        return;
    };
    let home = tempfile::tempdir().unwrap();
    let node_name = format!("{}-n1", c.ns);
    let rig = Rig::start(&c, home.path(), &node_name).await;
    let _operator = operator(&c);
    let api: Api<hearth_k8s::crd::Sandbox> = Api::namespaced(c.client.clone(), &c.ns);

    let mut spec = service_spec();
    spec.lifecycle.as_mut().unwrap().idle_pause_seconds = Some(3);
    common::create_sandbox(&c, "sleepy", spec).await;
    let s = wait_phase(&api, "sleepy", Phase::Running, BOOT_WAIT).await;
    let id = s
        .status
        .unwrap()
        .sandbox_id
        .expect("sandboxId once Running");
    assert_eq!(
        sh(&rig.node, &id, "echo kept > /root/file && echo ok").await,
        "ok"
    );

    // Idle: paused by the node, reported Paused, and left so (spec.paused is still false).
    let paused = wait_phase(&api, "sleepy", Phase::Paused, Duration::from_secs(60)).await;
    assert!(!paused.spec.paused);
    let local = rig.node.get(TENANT, &id).unwrap();
    assert_eq!(
        (local.state, local.reason.as_deref()),
        (State::Paused, Some(hearth_sandbox::node::IDLE_REASON))
    );
    assert!(
        vmm_pids(&id).is_empty(),
        "an idle-paused sandbox has no VMM"
    );
    tokio::time::sleep(Duration::from_secs(4)).await;
    assert_eq!(
        rig.node.get(TENANT, &id).unwrap().state,
        State::Paused,
        "the agent resumed an idle-paused sandbox"
    );

    // A use wakes it: Running again, reported, its file there.
    let tenant = hearth_sandbox::node::Tenant {
        name: TENANT.into(),
        quota: hearth_sandbox::node::Quota::unlimited(),
        network_ceiling: hearth_sandbox::node::default_network_ceiling(),
    };
    rig.node.wake(&tenant, &id).await.expect("woken");
    assert_eq!(sh(&rig.node, &id, "cat /root/file").await, "kept");
    wait_phase(&api, "sleepy", Phase::Running, Duration::from_secs(60)).await;

    api.delete("sleepy", &DeleteParams::default())
        .await
        .unwrap();
    eventually("Sandbox sleepy gone", Duration::from_secs(60), || {
        let api = api.clone();
        async move { api.get_opt("sleepy").await.unwrap().is_none() }
    })
    .await;
    rig.stop().await;
}
