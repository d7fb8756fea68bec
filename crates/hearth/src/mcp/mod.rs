//! `hearth mcp`: a Model Context Protocol server (built on the official Rust SDK, `rmcp`) whose
//! tools create sandboxes and work in them — `create_sandbox`, `run_code`, `exec`, `write_file`,
//! `read_file`, `list_files`, `destroy_sandbox`, and `pause_sandbox`, `resume_sandbox`,
//! `fork_sandbox`, `set_network`, `start_process`, `process_output`, `stop_process` where the
//! daemon has those routes.
//!
//! [`run`] is the entry point: it picks the daemon (the one named by `--host`, or an in-process
//! one, [`local`]), reads which optional routes it has ([`features`]), and serves MCP over stdio
//! (one session: the process's) or streamable HTTP at `/mcp` (a session per client, or none with
//! the sessionless 2026 protocol) until the client leaves or a signal comes. Every tool goes
//! through the same HTTP client ([`crate::client`]), remote daemon or not; [`tools`] declares them,
//! [`calls`] (and [`processes`], for background processes) does their work, [`output`] bounds what goes back to the model, [`ledger`] destroys
//! each session's sandboxes when it ends. Stdout belongs to the protocol in stdio mode: logs go to
//! stderr.

mod calls;
mod features;
mod ledger;
mod local;
mod output;
mod params;
mod processes;
mod tools;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::ServiceExt;

use crate::cli::GlobalArgs;
use crate::client::Client;
use crate::cmd::common::shutdown_signal;

/// What `hearth mcp` was asked for.
#[derive(Debug)]
pub struct Options {
    /// The daemon; None: an in-process one.
    pub host: Option<String>,
    pub token: String,
    /// Streamable HTTP at this address instead of stdio.
    pub http: Option<SocketAddr>,
    pub http_session_idle: Duration,
    /// `hearth serve` flags of the in-process daemon.
    pub serve_flags: Vec<String>,
}

pub async fn run(g: &GlobalArgs, o: Options) -> anyhow::Result<()> {
    if let Some(addr) = o.http {
        // The endpoint can do whatever the token can; nothing here checks who is calling.
        if !addr.ip().is_loopback() {
            bail!(
                "--http {addr}: hearth mcp's HTTP endpoint has no authentication of its own; \
                 listen on a loopback address (127.0.0.1:PORT) and put an authenticating proxy \
                 in front of it to serve other hosts"
            );
        }
    }
    let (client, local) = match &o.host {
        Some(host) => {
            if !o.serve_flags.is_empty() {
                bail!("flags after `--` configure the in-process daemon: they do not apply with --host");
            }
            (Client::new(host, &o.token)?, None)
        }
        None => {
            let daemon = local::LocalDaemon::start(g, &o.serve_flags).await?;
            let client = Client::new(&daemon.url, &daemon.token)?;
            (client, Some(daemon))
        }
    };
    let client = Arc::new(client);
    let served = serve(&client, &o).await;
    if let Some(daemon) = local {
        daemon.stop().await;
    }
    served
}

/// Serves MCP on the chosen transport; at the end, destroys every sandbox a session still owns.
async fn serve(client: &Arc<Client>, o: &Options) -> anyhow::Result<()> {
    let openapi = client.openapi().await?;
    let features = features::Features::from_openapi(&openapi);
    let ledger = ledger::Ledger::new(client.clone(), local::random_token()?);
    let toolbox = tools::Toolbox::new(client.clone(), ledger.clone(), &features);
    let served = match o.http {
        None => serve_stdio(&toolbox).await,
        Some(addr) => serve_http(addr, o.http_session_idle, toolbox).await,
    };
    ledger.destroy_all().await;
    served
}

/// One session on stdin/stdout, until end of file or a signal.
async fn serve_stdio(toolbox: &tools::Toolbox) -> anyhow::Result<()> {
    let session = async {
        let running = toolbox
            .session()
            .serve(rmcp::transport::stdio())
            .await
            .context("starting the MCP session on stdio")?;
        let reason = running.waiting().await?;
        tracing::info!(?reason, "the MCP session on stdio ended");
        anyhow::Ok(())
    };
    tokio::select! {
        ended = session => ended,
        _ = shutdown_signal() => Ok(()),
    }
}

/// Streamable HTTP at `http://addr/mcp` until a signal.
async fn serve_http(
    addr: SocketAddr,
    idle: Duration,
    toolbox: tools::Toolbox,
) -> anyhow::Result<()> {
    let stop = tokio_util::sync::CancellationToken::new();
    let mut sessions = LocalSessionManager::default();
    let mut config = SessionConfig::default();
    config.keep_alive = Some(idle);
    sessions.session_config = config;
    let service = StreamableHttpService::new(
        move || Ok(toolbox.session()),
        Arc::new(sessions),
        StreamableHttpServerConfig::default().with_cancellation_token(stop.child_token()),
    );
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr}"))?;
    let bound = listener.local_addr()?;
    tracing::info!("MCP over streamable HTTP at http://{bound}/mcp");
    // The one line on stdout: scripts and tests read the bound address from it.
    println!("listening on {bound}");
    let app = axum::Router::new().nest_service("/mcp", service);
    axum::serve(crate::serve::no_delay(listener), app)
        .with_graceful_shutdown(async move {
            shutdown_signal().await;
            stop.cancel();
        })
        .await
        .context("serving MCP over HTTP")
}
