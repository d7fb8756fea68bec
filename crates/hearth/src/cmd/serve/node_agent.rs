//! `hearth serve --kubernetes`: the Kubernetes node agent's options and start-up. The agent
//! (`hearth_k8s::node`) registers this host as a HearthNode, heartbeats its Lease and runs the
//! Sandboxes bound to it on the daemon's own [`Node`], beside the HTTP API; it lives as long as the
//! returned [`NodeAgentTask`]. The controller that places Sandboxes is `hearth operator`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hearth_k8s::crd::NodeCapacity;
use hearth_k8s::node::registration::Registration;
use hearth_k8s::node::{NodeAgent, NodeAgentConfig};
use hearth_k8s::quantity::Quantity;
use hearth_sandbox::node::{Capacity, Node};

use crate::cmd::common::host_name;

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
    /// Where `hearth gateway` reaches this node's API (`https://host:port`, served with
    /// --tls-cert and --client-ca), written to the HearthNode's `spec.apiEndpoint`; unset: no
    /// gateway can reach this node's service sandboxes.
    #[arg(long, env = "HEARTH_ADVERTISE_URL", value_parser = parse_advertise_url)]
    pub advertise_url: Option<String>,
}

/// `https://host:port` (no path, query or credentials): the gateway appends the API's paths.
fn parse_advertise_url(s: &str) -> Result<String, String> {
    let usage = || format!("{s:?} is not https://HOST:PORT");
    let rest = s.strip_prefix("https://").ok_or_else(usage)?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let authority: axum::http::uri::Authority = rest.parse().map_err(|_| usage())?;
    if authority.as_str().contains('@') || authority.port_u16().is_none() || rest.contains('/') {
        return Err(usage());
    }
    Ok(format!("https://{authority}"))
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
pub async fn start(
    args: &KubernetesArgs,
    node: Arc<Node>,
    capacity: Capacity,
) -> anyhow::Result<Option<NodeAgentTask>> {
    if !args.kubernetes {
        return Ok(None);
    }
    let node_name = match &args.node_name {
        Some(n) => n.clone(),
        None => host_name().context("reading the host name (give --node-name)")?,
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
        api_endpoint: args.advertise_url.clone(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn advertise_urls_are_https_host_and_port_only() {
        assert_eq!(
            parse_advertise_url("https://10.0.0.5:8443/").unwrap(),
            "https://10.0.0.5:8443"
        );
        assert_eq!(
            parse_advertise_url("https://node-1.hearth.svc:8443").unwrap(),
            "https://node-1.hearth.svc:8443"
        );
        for bad in [
            "http://10.0.0.5:8443",
            "https://10.0.0.5",
            "https://10.0.0.5:8443/v1",
            "https://u:p@10.0.0.5:8443",
            "10.0.0.5:8443",
        ] {
            assert!(parse_advertise_url(bad).is_err(), "{bad}");
        }
    }
}
