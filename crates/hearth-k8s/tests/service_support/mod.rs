//! Set-up shared by the Service Sandbox tests: a node (a real `Node` in its own HEARTH_HOME with the
//! provisioned kernel and agent, QEMU under TCG) with its node agent, restartable like
//! `hearth serve --kubernetes`; the operator; and the waits and pokes the tests make.

#![allow(dead_code)]

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hearth_k8s::controller::Operator;
use hearth_k8s::crd::{Lifecycle, LifecycleType, Phase, Sandbox, SandboxSpec, ShutdownPolicy};
use hearth_k8s::node::{NodeAgent, NodeAgentConfig};
use hearth_sandbox::node::{Capacity, ExecSpec, Node, NodeConfig};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{Api, Patch, PatchParams, PostParams};

use crate::common::{registration, Cluster};

/// The node tenant Kubernetes sandboxes live under (the node agent's default).
pub const TENANT: &str = "kubernetes";
/// Pull, first (cold) boot of the boot template, boot: generous, the machine is shared.
pub const BOOT_WAIT: Duration = Duration::from_secs(300);

pub fn node_config(home: &Path) -> NodeConfig {
    let registry = hearth_testkit::registry().expect("test registry");
    let mut config = NodeConfig::new(home);
    config.defaults.kernel = Some(hearth_testkit::kernel_dir());
    config.defaults.agent = Some(hearth_testkit::agent_bin());
    config.defaults.accel = hearth_sandbox::Accel::Tcg;
    config.defaults.memory_mib = 256;
    config.defaults.scratch_bytes = 256 << 20;
    config.capacity = Capacity {
        vcpus: 4,
        memory_mib: 4096,
        disk_bytes: u64::MAX,
    };
    config.pull.insecure_registries = vec![registry.addr.clone()];
    config
}

/// One node: its `Node` and the agent running over it.
pub struct Rig {
    pub node: Arc<Node>,
    agent: Option<tokio::task::JoinHandle<()>>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Rig {
    /// Opens the node's home (re-attaching what a previous `Rig` left running) and starts its agent.
    pub async fn start(c: &Cluster, home: &Path, node_name: &str) -> Rig {
        let node = open_node(home).await;
        let mut config = NodeAgentConfig::new(registration(
            c,
            node_name,
            4,
            "4Gi",
            Duration::from_secs(60),
        ));
        config.sandbox_namespace = Some(c.ns.clone());
        config.boot_timeout = BOOT_WAIT;
        let agent = NodeAgent::new(c.client.clone(), node.clone(), config);
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async {
                let _ = stopped.await;
            };
            if let Err(e) = agent.run(shutdown).await {
                panic!("node agent: {e}");
            }
        });
        Rig {
            node,
            agent: Some(task),
            stop: Some(stop),
        }
    }

    /// Stops the agent and shuts the node down as a daemon exit does: VMs keep running. The node
    /// is dropped with the rig, which frees its home for the next [`Rig::start`].
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.agent.take() {
            tokio::time::timeout(Duration::from_secs(30), task)
                .await
                .expect("the node agent stops")
                .expect("the node agent ended cleanly");
        }
        self.node.shutdown(Duration::from_secs(2)).await;
    }
}

/// `Node::open`, retried while the previous node of this home is still being dropped.
async fn open_node(home: &Path) -> Arc<Node> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match Node::open(node_config(home)).await {
            Ok(node) => return node,
            Err(hearth_sandbox::node::NodeError::Busy(_)) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(200)).await
            }
            Err(e) => panic!("opening the node: {e}"),
        }
    }
}

/// The operator, confined to the test's namespace and nodes, until dropped.
pub fn operator(c: &Cluster) -> AbortOnDrop {
    let op = Operator::new(c.client.clone(), crate::common::operator_config(c, "op"));
    AbortOnDrop(tokio::spawn(async move {
        let _ = op.run(futures::future::pending()).await;
    }))
}

pub struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A Service Sandbox of the busybox test image, 1 vCPU, 256 MiB.
pub fn service_spec() -> SandboxSpec {
    let mut spec = crate::common::spec(1, "256Mi");
    spec.image = hearth_testkit::image_ref("busybox").expect("test registry");
    spec.command.clear();
    spec.lifecycle = Some(Lifecycle {
        type_: LifecycleType::Service,
        ..Default::default()
    });
    spec
}

/// Waits until Sandbox `name` is in `phase` (panics, with the status, if it ends elsewhere).
pub async fn wait_phase(api: &Api<Sandbox>, name: &str, phase: Phase, within: Duration) -> Sandbox {
    let deadline = Instant::now() + within;
    loop {
        let s = api.get(name).await.expect("get Sandbox");
        if s.phase() == phase {
            return s;
        }
        assert!(
            !s.phase().is_finished(),
            "Sandbox {name} ended {:?} waiting for {phase:?}: {:?}",
            s.phase(),
            s.status
        );
        assert!(
            Instant::now() < deadline,
            "Sandbox {name} still {:?} after {within:?}, waiting for {phase:?}: {:?}",
            s.phase(),
            s.status
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn set_paused(api: &Api<Sandbox>, name: &str, paused: bool) {
    let patch = serde_json::json!({ "spec": { "paused": paused } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch spec.paused");
}

/// Sets `lifecycle.shutdownTime` `in_secs` from now with `policy`.
pub async fn set_shutdown(api: &Api<Sandbox>, name: &str, in_secs: i64, policy: ShutdownPolicy) {
    let at = Timestamp::now()
        .checked_add(SignedDuration::from_secs(in_secs))
        .unwrap();
    let lifecycle = Lifecycle {
        type_: LifecycleType::Service,
        shutdown_time: Some(Time(at)),
        shutdown_policy: Some(policy),
        idle_pause_seconds: None,
    };
    let patch = serde_json::json!({ "spec": { "lifecycle": lifecycle } });
    api.patch(name, &PatchParams::default(), &Patch::Merge(patch))
        .await
        .expect("patch spec.lifecycle");
}

/// Binds Sandbox `name` to `node` as the operator would (status Scheduled).
pub async fn bind(api: &Api<Sandbox>, name: &str, node: &str) {
    let mut s = api.get(name).await.unwrap();
    let old = s.status.clone().unwrap_or_default();
    s.status = Some(hearth_k8s::status::scheduled(
        &old,
        node,
        &Time(Timestamp::now()),
    ));
    api.replace_status(name, &PostParams::default(), &s)
        .await
        .expect("bind");
}

/// Runs `script` in node-local sandbox `id` as the Kubernetes tenant; its stdout, trimmed (it must
/// exit 0).
pub async fn sh(node: &Node, id: &str, script: &str) -> String {
    let spec = ExecSpec {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        ..ExecSpec::default()
    };
    let run = async {
        let exec = node
            .exec(TENANT, id, spec)
            .await
            .map_err(|e| e.to_string())?;
        exec.output().await.map_err(|e| e.to_string())
    };
    let out = tokio::time::timeout(Duration::from_secs(60), run)
        .await
        .unwrap_or_else(|_| panic!("{script}: no answer within 60 s"))
        .unwrap_or_else(|e| panic!("{script}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    assert_eq!(out.status.code, Some(0), "{script}: {stdout}");
    stdout
}

/// Live (non-zombie) QEMU processes whose command line names node-local sandbox `id`.
pub fn vmm_pids(id: &str) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let cmdline = String::from_utf8_lossy(&cmdline);
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            let zombie = stat
                .rsplit_once(')')
                .is_some_and(|(_, rest)| rest.trim_start().starts_with('Z'));
            cmdline.contains("qemu-system") && cmdline.contains(id) && !zombie
        })
        .collect()
}

/// `kill -9` the VMM of node-local sandbox `id`.
pub fn kill_vmm(id: &str) {
    let pids = vmm_pids(id);
    assert!(!pids.is_empty(), "no VMM found for sandbox {id}");
    for pid in pids {
        let status = std::process::Command::new("kill")
            .args(["-9", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -9 {pid}");
    }
}
