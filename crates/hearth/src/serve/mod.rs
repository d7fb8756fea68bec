//! `hearth serve`'s HTTP API: the router (one table from route to handler), the shared state, and
//! start-up/shutdown of the server. Handlers are thin — parse, authenticate ([`auth::Authenticated`]),
//! call the [`Node`], map [`NodeError`](hearth_sandbox::node::NodeError) to a status
//! ([`error::ApiError`]) — and live one file per resource: `sandboxes.rs`, `exec.rs`, `code.rs`, `files.rs`,
//! `network.rs`, `ports.rs`, `runs.rs`, `metrics.rs`, `openapi.rs`. Wire types are in `api.rs`.
//!
//! Authentication: every `/v1` route takes a bearer token, or, over TLS with `--client-ca`, a client
//! certificate ([`tls`]). `/healthz`, `/metrics` (aggregate counts
//! only: no tenant names, ids or images) and `/openapi.json` do not, so probes and Prometheus need no
//! secret. Touches nothing itself: all state is the node's.

pub mod api;
pub mod auth;
pub mod code;
pub(crate) mod error;
mod exec;
mod files;
mod lifecycle;
mod metrics;
mod network;
pub mod openapi;
pub mod ports;
pub mod processes;
mod runs;
mod sandboxes;
pub mod tls;
mod wake;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::routing::{any, delete, get, post};
use axum::serve::ListenerExt;
use axum::{Json, Router};
use hearth_sandbox::node::Node;

pub use auth::Tenants;
use error::ApiError;

/// Largest JSON request body (exec and run requests carry base64 stdin).
pub const JSON_BODY_LIMIT: usize = 8 << 20;

/// Knobs of the API itself (the node has its own config).
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Largest file upload, bytes.
    pub max_upload_bytes: u64,
    /// Output kept per stream by `POST /v1/runs`, bytes.
    pub run_output_limit: usize,
    /// How long `POST /v1/sandboxes` waits for the sandbox to run before answering 202.
    pub create_wait: Duration,
}

impl Default for ApiSettings {
    fn default() -> Self {
        ApiSettings {
            max_upload_bytes: 1 << 30,
            run_output_limit: 1 << 20,
            create_wait: Duration::from_secs(300),
        }
    }
}

/// What every handler shares.
pub struct AppState {
    pub node: Arc<Node>,
    pub tenants: Tenants,
    pub settings: ApiSettings,
}

/// The whole API.
pub fn router(state: Arc<AppState>) -> Router {
    let v1 = Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get)
                .patch(sandboxes::update)
                .delete(sandboxes::delete),
        )
        .route("/v1/sandboxes/{id}/pause", post(lifecycle::pause))
        .route("/v1/sandboxes/{id}/resume", post(lifecycle::resume))
        .route(
            "/v1/sandboxes/{id}/network",
            get(network::get).put(network::put),
        )
        .route("/v1/runs", post(runs::run))
        // Reading background processes is answered from the daemon's memory: a sandbox its idle
        // timeout paused is not woken (starting, writing to, signalling one is below, and does).
        .route("/v1/sandboxes/{id}/processes", get(processes::list))
        .route(
            "/v1/sandboxes/{id}/processes/{process}",
            get(processes::get),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/output",
            get(processes::output),
        );
    // Routes that use a running sandbox: one its idle timeout paused is resumed first.
    let wake = axum::middleware::from_fn_with_state(state.clone(), wake::on_use);
    let uses = Router::new()
        .route("/v1/sandboxes/{id}/fork", post(lifecycle::fork))
        .route("/v1/sandboxes/{id}/exec", post(exec::exec))
        .route("/v1/sandboxes/{id}/exec/ws", get(exec::exec_ws))
        .route(
            "/v1/sandboxes/{id}/code",
            post(code::run).delete(code::reset),
        )
        .route("/v1/sandboxes/{id}/files", get(files::get).put(files::put))
        .route("/v1/sandboxes/{id}/processes", post(processes::start))
        .route(
            "/v1/sandboxes/{id}/processes/{process}",
            delete(processes::remove),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/stdin",
            post(processes::stdin),
        )
        .route(
            "/v1/sandboxes/{id}/processes/{process}/signal",
            post(processes::signal),
        )
        .route_layer(wake.clone());
    // Unbounded bodies, streamed to the guest.
    let streams = Router::new()
        .route("/v1/sandboxes/{id}/ports/{port}/", any(ports::proxy_root))
        .route("/v1/sandboxes/{id}/ports/{port}/{*path}", any(ports::proxy))
        .route("/v1/sandboxes/{id}/tunnel/{port}", get(ports::tunnel))
        .route_layer(wake);
    let v1 = v1
        .merge(uses)
        .layer(DefaultBodyLimit::max(JSON_BODY_LIMIT))
        .merge(streams);
    Router::new()
        .merge(v1)
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics::metrics))
        .route("/openapi.json", get(openapi::serve))
        .fallback(not_found)
        .with_state(state)
}

/// `listener` with Nagle off on every connection it accepts: a streamed answer (exec's NDJSON, file
/// bodies, MCP's) is several small writes, and with Nagle each after the first waits for the
/// client's delayed ACK, 40 ms on Linux.
pub fn no_delay(
    listener: tokio::net::TcpListener,
) -> impl axum::serve::Listener<Io = tokio::net::TcpStream, Addr = std::net::SocketAddr> {
    listener.tap_io(|tcp| {
        if let Err(e) = tcp.set_nodelay(true) {
            tracing::debug!("TCP_NODELAY on an API connection: {e}");
        }
    })
}

/// Serves `router(state)` on `listener` until `shutdown` completes, then stops accepting and gives
/// open connections (streams, WebSockets) `grace` to finish; whatever is left is cut.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let node = state.node.clone();
    let app = router(state);
    let server = axum::serve(no_delay(listener), app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let server = tokio::spawn(async move { server.await });
    run_until_stopped(server, stopping_rx, node, grace).await
}

/// [`serve`] over TLS: the same API on a [`tls::TlsListener`], where a client certificate that
/// verified authenticates as [`Tenants::client_certificate_tenant`] (see [`auth::Authenticated`]).
pub async fn serve_tls(
    listener: tls::TlsListener,
    state: Arc<AppState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()> {
    let (stopping_tx, stopping_rx) = tokio::sync::watch::channel(false);
    let node = state.node.clone();
    let app = router(state).into_make_service_with_connect_info::<tls::Peer>();
    let server = axum::serve(listener, app).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let server = tokio::spawn(async move { server.await });
    run_until_stopped(server, stopping_rx, node, grace).await
}

async fn run_until_stopped(
    mut server: tokio::task::JoinHandle<std::io::Result<()>>,
    mut stopping: tokio::sync::watch::Receiver<bool>,
    node: Arc<Node>,
    grace: Duration,
) -> std::io::Result<()> {
    // `biased`: with no connection open the server ends in the same poll as the signal, and
    // whichever branch won, the node must hand its VMs over below — a daemon that returned
    // without `Node::shutdown` dropped every live sandbox, killing its VM (the soak found it).
    let failed = tokio::select! {
        biased;
        _ = stopping.wait_for(|&s| s) => None,
        // The server failed on its own (it never ends otherwise before shutdown).
        result = &mut server => Some(result),
    };
    if let Some(result) = failed {
        node.shutdown(Duration::ZERO).await;
        return result.map_err(std::io::Error::other)?;
    }
    tracing::info!("shutting down: no new connections; waiting up to {grace:?} for running execs");
    node.shutdown(grace).await;
    match tokio::time::timeout(Duration::from_secs(1), server).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(std::io::Error::other(join)),
        Err(_) => {
            tracing::info!("closing connections still open after the grace period");
            Ok(())
        }
    }
}

#[utoipa::path(get, path = "/healthz", tag = "node", operation_id = "getHealth",
    responses((status = 200, description = "The daemon answers", body = api::Health)))]
async fn healthz() -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
    })
}

async fn not_found(uri: axum::http::Uri) -> ApiError {
    ApiError::not_found(format!(
        "no route {}: see /openapi.json for the API",
        uri.path()
    ))
}
