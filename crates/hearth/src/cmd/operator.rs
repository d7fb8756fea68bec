//! `hearth operator`: the Kubernetes controller (leader-elected; places Sandboxes on HearthNodes, fails
//! them on lost nodes, releases finalizers, applies TTLs). All logic lives in `hearth_k8s::controller`;
//! this file parses options and runs it until SIGTERM/SIGINT. `--print-crds` prints `deploy/crds.yaml`.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hearth_k8s::controller::{Operator, OperatorConfig};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::GlobalArgs;

#[derive(Args, Debug)]
pub struct OperatorArgs {
    /// Print the CustomResourceDefinitions (the content of deploy/crds.yaml) and exit.
    #[arg(long)]
    pub print_crds: bool,
    /// Kubeconfig file; default: in-cluster service account, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the leader Lease and of the node Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "hearth-system")]
    pub namespace: String,
    /// This replica's name in the leader Lease (default: host name and pid).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Seconds a leader's Lease lasts without renewal (a standby takes over after this).
    #[arg(long, default_value_t = 15)]
    pub leader_lease_seconds: u64,
    /// Only place Sandboxes of this namespace (default: all namespaces).
    #[arg(long)]
    pub sandbox_namespace: Option<String>,
    /// Only use HearthNodes matching this label selector (default: all).
    #[arg(long)]
    pub node_selector: Option<String>,
    /// Longest time between passes, in milliseconds (lease expiry and TTLs are noticed this often).
    #[arg(long, default_value_t = 1000)]
    pub resync_ms: u64,
    /// API writes in flight at once.
    #[arg(long, default_value_t = 32)]
    pub write_concurrency: usize,
}

pub fn operator(_global: &GlobalArgs, args: OperatorArgs) -> anyhow::Result<ExitCode> {
    if args.print_crds {
        print!("{}", hearth_k8s::crd::crds_yaml());
        return Ok(ExitCode::SUCCESS);
    }
    let identity = args.identity.clone().unwrap_or_else(default_identity);
    let mut config = OperatorConfig::new(identity, &args.namespace);
    config.leader_lease_duration = Duration::from_secs(args.leader_lease_seconds.max(1));
    config.sandbox_namespace = args.sandbox_namespace.clone();
    config.node_selector = args.node_selector.clone();
    config.resync = Duration::from_millis(args.resync_ms.max(10));
    config.write_concurrency = args.write_concurrency.max(1);
    let runtime = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    runtime.block_on(async {
        let client = hearth_k8s::client::client(args.kubeconfig.as_deref()).await?;
        Operator::new(client, config).run(terminated()).await?;
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `HOSTNAME-PID`: unique per process on one host, readable in `kubectl get lease`.
pub fn default_identity() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "hearth".into());
    format!("{host}-{}", std::process::id())
}

/// Resolves on SIGTERM or SIGINT.
pub async fn terminated() {
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// `hearth serve --kubernetes`: the node agent's options (flattened into `hearth serve`).
#[derive(Args, Debug, Clone)]
pub struct KubernetesArgs {
    /// Also run the Kubernetes node agent: register this node and run the Sandboxes bound to it.
    #[arg(long)]
    pub kubernetes: bool,
    /// This node's name (its HearthNode object); default: the host name.
    #[arg(long, env = "NODE_NAME")]
    pub node_name: Option<String>,
    /// Kubeconfig for the node agent; default: in-cluster service account, then $KUBECONFIG.
    #[arg(long = "kubeconfig")]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the node Leases (the operator's --namespace).
    #[arg(long, env = "POD_NAMESPACE", default_value = "hearth-system")]
    pub kube_namespace: String,
    /// A label on this node's HearthNode, matched by Sandboxes' nodeSelector (repeatable): KEY=VALUE.
    #[arg(long = "node-label", value_parser = parse_label)]
    pub node_labels: Vec<(String, String)>,
    /// The node counts as lost (its Sandboxes fail with NodeLost) this long after its last heartbeat.
    #[arg(long, default_value_t = 40)]
    pub node_lease_seconds: u64,
    /// Only run Sandboxes of this namespace (default: all namespaces).
    #[arg(long)]
    pub kube_sandbox_namespace: Option<String>,
}

fn parse_label(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("label {s:?} is not KEY=VALUE")),
    }
}

/// The running node agent; dropping it stops the agent.
pub struct NodeAgentTask(tokio::task::JoinHandle<()>);

impl Drop for NodeAgentTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// Starts the node agent next to the HTTP API when `--kubernetes` is given, sharing the daemon's Node.
pub async fn start_node_agent(
    args: &KubernetesArgs,
    node: std::sync::Arc<hearth_sandbox::node::Node>,
    capacity: hearth_sandbox::node::Capacity,
) -> anyhow::Result<Option<NodeAgentTask>> {
    use hearth_k8s::crd::NodeCapacity;
    use hearth_k8s::node::registration::Registration;
    use hearth_k8s::node::{NodeAgent, NodeAgentConfig};
    use hearth_k8s::quantity::Quantity;

    if !args.kubernetes {
        return Ok(None);
    }
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => std::fs::read_to_string("/proc/sys/kernel/hostname")
            .context("reading the host name (give --node-name)")?
            .trim()
            .to_string(),
    };
    let client = hearth_k8s::client::client(args.kubeconfig.as_deref()).await?;
    let registration = Registration {
        node_name,
        labels: args.node_labels.iter().cloned().collect(),
        capacity: NodeCapacity {
            cpu: Quantity::new(capacity.vcpus.to_string()),
            memory: Quantity::new(format!("{}Mi", capacity.memory_mib)),
        },
        lease_namespace: args.kube_namespace.clone(),
        lease_duration: Duration::from_secs(args.node_lease_seconds.max(1)),
    };
    let mut config = NodeAgentConfig::new(registration);
    config.sandbox_namespace = args.kube_sandbox_namespace.clone();
    let agent = NodeAgent::new(client, node, config);
    let task = tokio::spawn(async move {
        if let Err(e) = agent.run(futures::future::pending()).await {
            tracing::error!("Kubernetes node agent stopped: {e}");
        }
    });
    Ok(Some(NodeAgentTask(task)))
}
