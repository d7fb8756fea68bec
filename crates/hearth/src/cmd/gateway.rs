//! `hearth gateway`: the cluster-wide HTTP API (`crate::gateway`). Parses the flags, loads the
//! tenants and the certificates, connects to the API server, binds, prints `listening on ADDR` on
//! stdout and serves until SIGTERM, SIGINT or SIGHUP. Holds no state of its own: run as many
//! replicas as wanted behind one Service.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::cli::GlobalArgs;
use crate::cmd::common::{parse_duration, runtime, shutdown_signal, Workers};
use crate::gateway::nodes::NodeEndpoints;
use crate::gateway::proxy::{NodeConnector, ProxyTimeouts};
use crate::gateway::{GatewaySettings, GatewayState};
use crate::serve::tls::{ClientTlsFiles, ServerTlsFiles, TlsListener};
use crate::serve::Tenants;

#[derive(Args, Debug)]
pub struct GatewayArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8421")]
    pub listen: SocketAddr,
    /// Tenants and their tokens, as for `hearth serve`; each tenant's `namespace` (default: its
    /// name) is the only namespace its requests touch.
    #[arg(long, env = "HEARTH_TOKENS_FILE")]
    pub tokens: PathBuf,
    /// Kubeconfig; default: in-cluster service account, then $KUBECONFIG, then ~/.kube/config.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// CA certificates (PEM) node API certificates must chain to.
    #[arg(long, env = "HEARTH_NODE_CA")]
    pub node_ca: PathBuf,
    /// The gateway's client certificate (PEM) for node APIs (their --client-ca must accept it).
    #[arg(long, env = "HEARTH_CLIENT_CERT")]
    pub client_cert: PathBuf,
    /// The private key (PEM) of --client-cert.
    #[arg(long, env = "HEARTH_CLIENT_KEY")]
    pub client_key: PathBuf,
    /// Serve the gateway itself over HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// How long `POST /v1/sandboxes` waits for the sandbox to run before answering 202.
    #[arg(long, value_parser = parse_duration, default_value = "300s")]
    pub create_wait: Duration,
    /// On SIGTERM, SIGINT or SIGHUP, how long open streams (execs, WebSockets) may continue.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
}

pub fn gateway(_g: &GlobalArgs, a: GatewayArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(Workers::PerCpu)?;
    runtime.block_on(gateway_async(a))?;
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

async fn gateway_async(a: GatewayArgs) -> anyhow::Result<()> {
    let tenants = Tenants::load(&a.tokens)?;
    crate::gateway::check_namespaces(&tenants)
        .map_err(anyhow::Error::msg)
        .with_context(|| format!("in the tokens file {}", a.tokens.display()))?;
    let client_tls = crate::serve::tls::client_config(&ClientTlsFiles {
        server_ca: a.node_ca.clone(),
        cert: a.client_cert.clone(),
        key: a.client_key.clone(),
    })
    .context("the gateway's certificates for node APIs")?;
    let own_tls = match (&a.tls_cert, &a.tls_key) {
        (Some(cert), Some(key)) => Some(crate::serve::tls::server_config(&ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: None,
        })?),
        _ => None,
    };
    let client = hearth_k8s::client::client(a.kubeconfig.as_deref()).await?;
    let state = Arc::new(GatewayState {
        endpoints: NodeEndpoints::start(client.clone()),
        client,
        tenants,
        nodes: NodeConnector::new(client_tls, ProxyTimeouts::default()),
        settings: GatewaySettings {
            create_wait: a.create_wait,
            ..GatewaySettings::default()
        },
        metrics: Default::default(),
    });
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, tls = own_tls.is_some(), "hearth gateway ready");
    // The one line on stdout: scripts and tests read the bound address from it.
    println!("listening on {addr}");
    let stop = async {
        shutdown_signal().await;
    };
    match own_tls {
        Some(config) => {
            let listener = TlsListener::new(listener, config)?;
            crate::gateway::serve(listener, state, stop, a.shutdown_grace).await?
        }
        None => {
            let listener = crate::serve::no_delay(listener);
            crate::gateway::serve(listener, state, stop, a.shutdown_grace).await?
        }
    }
    tracing::info!("hearth gateway stopped");
    Ok(())
}
