//! `hearth operator`: the Kubernetes controller (leader-elected; places Sandboxes on HearthNodes, fails
//! them on lost nodes, releases finalizers, applies TTLs). All logic lives in `hearth_k8s::controller`;
//! this file parses options and runs it until SIGTERM, SIGINT or SIGHUP. `--print-crds` prints
//! `deploy/crds.yaml`. With `--webhook-listen` it also serves the node-confinement admission webhook
//! (`hearth_k8s::admission`) on every replica, leader or not. (The node agent's start-up is `hearth serve --kubernetes`'s, in `cmd/serve/`.)

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;
use hearth_k8s::admission::{NodeIdentities, WebhookConfig, WebhookServer};
use hearth_k8s::controller::{Operator, OperatorConfig};

use crate::cli::GlobalArgs;
use crate::cmd::common::{host_name, runtime, shutdown_signal, Workers};

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
    /// Serve the node-confinement admission webhook (HTTPS, `POST /validate`, `/healthz`, `/readyz`)
    /// on this address, e.g. `0.0.0.0:8443`.
    #[arg(long, requires_all = ["webhook_cert", "webhook_key"])]
    pub webhook_listen: Option<SocketAddr>,
    /// PEM certificate (chain) of the webhook, signed by the CA in the webhook configuration's caBundle.
    #[arg(long)]
    pub webhook_cert: Option<PathBuf>,
    /// PEM private key of `--webhook-cert`.
    #[arg(long)]
    pub webhook_key: Option<PathBuf>,
    /// Username of a ServiceAccount node agents run as (repeatable); its requests are confined to the
    /// node named in the token (Kubernetes 1.30+), refused without one. Per-node users
    /// `hearth-node:NODE` (group `hearth:nodes`) are always confined.
    #[arg(long = "webhook-node-service-account", default_values_t = NodeIdentities::default().service_accounts)]
    pub webhook_node_service_accounts: Vec<String>,
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
    runtime(Workers::PerCpu)?.block_on(async {
        let webhook = match (&args.webhook_listen, &args.webhook_cert, &args.webhook_key) {
            (Some(listen), Some(cert), Some(key)) => {
                let server = WebhookServer::bind(WebhookConfig {
                    listen: *listen,
                    cert: cert.clone(),
                    key: key.clone(),
                    identities: NodeIdentities {
                        service_accounts: args.webhook_node_service_accounts.clone(),
                        ..NodeIdentities::default()
                    },
                })
                .await?;
                tracing::info!(
                    "admission webhook listening on https://{}",
                    server.local_addr()?
                );
                Some(server)
            }
            _ => None,
        };
        let client = hearth_k8s::client::client(args.kubeconfig.as_deref()).await?;
        let stop = async {
            shutdown_signal().await;
        };
        let operator = Operator::new(client, config).run(stop);
        match webhook {
            None => operator.await?,
            // The webhook serves until the operator returns (on a signal or an error).
            Some(server) => tokio::select! {
                r = operator => r?,
                () = server.run(std::future::pending()) => {}
            },
        }
        anyhow::Ok(())
    })?;
    Ok(ExitCode::SUCCESS)
}

/// `HOSTNAME-PID`: unique per process on one host, readable in `kubectl get lease`.
pub fn default_identity() -> String {
    let host = host_name().unwrap_or_else(|_| "hearth".into());
    format!("{host}-{}", std::process::id())
}
