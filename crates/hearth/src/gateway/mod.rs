//! `hearth gateway`: one HTTP API for a whole Kubernetes cluster, with the same `/v1` routes and
//! OpenAPI document as `hearth serve`, so the CLI, the Python SDK and `hearth mcp` work unchanged
//! against it. Stateless: everything it knows comes from the API server, so any replica serves
//! any request.
//!
//! - A bearer token (the tokens file of `hearth serve`, [`Tenants`]) names a tenant, and each tenant
//!   one namespace; nothing outside it is read or written for that tenant, and a sandbox of another
//!   namespace answers 404 exactly like a missing one.
//! - Creating, listing, reading, pausing, resuming and deleting work on `Sandbox` objects
//!   ([`sandboxes`], translated by [`objects`]); the operator places them and node agents run them.
//! - Everything else under `/v1/sandboxes/{id}/` (exec, WebSocket exec, files, code, network,
//!   ports, tunnels) is forwarded to the node holding the sandbox (`status.nodeName`'s HearthNode
//!   `spec.apiEndpoint`, kept from a watch by [`nodes`], at `/v1/sandboxes/{status.sandboxId}/...`)
//!   over mutual TLS ([`proxy`]).
//! - `"template": NAME` on create makes a `SandboxClaim` of that `SandboxTemplate` instead
//!   ([`claims`]), served from a warm pool when one is ready.
//! - Fork and one-shot runs (`/v1/runs`) answer 501 here: they are node-local operations.
//!
//! `/healthz` (the process answers), `/readyz` (the API server answers), `/metrics` and
//! `/openapi.json` need no token.

mod claims;
mod forward;
pub mod nodes;
pub mod objects;
pub mod proxy;
#[cfg(test)]
mod proxy_tests;
mod sandboxes;

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{DefaultBodyLimit, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};

use crate::serve::api;
use crate::serve::error::ApiError;
use crate::serve::Tenants;
use proxy::NodeConnector;

/// How long the gateway waits on the cluster.
#[derive(Debug, Clone, Copy)]
pub struct GatewaySettings {
    /// `POST /v1/sandboxes` waits this long for Running before answering 202 `creating`.
    pub create_wait: Duration,
    /// Pause and resume wait this long for the phase to change.
    pub lifecycle_wait: Duration,
    /// `DELETE` waits this long for the object to be gone before answering 202.
    pub delete_wait: Duration,
    /// Every single API server request.
    pub api_timeout: Duration,
}

impl Default for GatewaySettings {
    fn default() -> Self {
        GatewaySettings {
            create_wait: Duration::from_secs(300),
            lifecycle_wait: Duration::from_secs(120),
            delete_wait: Duration::from_secs(60),
            api_timeout: Duration::from_secs(10),
        }
    }
}

/// What every handler shares; nothing in it changes after start-up.
pub struct GatewayState {
    pub client: kube::Client,
    pub tenants: Tenants,
    pub nodes: NodeConnector,
    pub endpoints: nodes::NodeEndpoints,
    pub settings: GatewaySettings,
    pub metrics: Metrics,
}

/// Counters for `/metrics` (aggregates only: no tenant names or sandbox ids).
#[derive(Default)]
pub struct Metrics {
    requests: AtomicU64,
    creates: AtomicU64,
    proxied: AtomicU64,
    proxy_errors: AtomicU64,
    unauthorized: AtomicU64,
    nodes_from_watch: AtomicU64,
    nodes_from_api: AtomicU64,
}

impl Metrics {
    fn bump(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// The caller of a `/v1` route: its tenant and that tenant's namespace; 401 without a valid token.
#[derive(Clone)]
pub struct Caller {
    pub tenant: String,
    pub namespace: String,
}

impl FromRequestParts<Arc<GatewayState>> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<GatewayState>,
    ) -> Result<Self, Self::Rejection> {
        Metrics::bump(&state.metrics.requests);
        let found = crate::serve::auth::bearer_token(&parts.headers)
            .and_then(|token| {
                state
                    .tenants
                    .authenticate(token)
                    .ok_or_else(|| ApiError::unauthorized("unknown token"))
            })
            .inspect_err(|_| Metrics::bump(&state.metrics.unauthorized))?;
        let namespace = state
            .tenants
            .namespace(&found.name)
            .ok_or_else(|| ApiError::internal(format!("tenant {} has no namespace", found.name)))?;
        Ok(Caller {
            tenant: found.name.clone(),
            namespace: namespace.to_string(),
        })
    }
}

/// Checks that every tenant maps to a namespace (`namespace = "..."` or a name that is one).
pub fn check_namespaces(tenants: &Tenants) -> Result<(), String> {
    for name in tenants.names() {
        if tenants.namespace(name).is_none() {
            return Err(format!(
                "tenant {name:?} is not a Kubernetes namespace name: give it `namespace = \"...\"` \
                 in the tokens file"
            ));
        }
    }
    Ok(())
}

/// The whole gateway API.
pub fn router(state: Arc<GatewayState>) -> Router {
    Router::new()
        .route(
            "/v1/sandboxes",
            post(sandboxes::create).get(sandboxes::list),
        )
        .route(
            "/v1/sandboxes/{id}",
            get(sandboxes::get)
                .delete(sandboxes::delete)
                .patch(not_here),
        )
        .route("/v1/sandboxes/{id}/pause", post(sandboxes::pause))
        .route("/v1/sandboxes/{id}/resume", post(sandboxes::resume))
        .route("/v1/sandboxes/{id}/fork", post(not_here))
        .route("/v1/runs", post(not_here))
        .layer(DefaultBodyLimit::max(crate::serve::JSON_BODY_LIMIT))
        // Streamed to the node as they come: no body limit here (the node applies its own).
        .route("/v1/sandboxes/{id}/{*rest}", any(forward::forward))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/openapi.json", get(openapi))
        .fallback(|uri: axum::http::Uri| async move {
            ApiError::not_found(format!(
                "no route {}: see /openapi.json for the API",
                uri.path()
            ))
        })
        .with_state(state)
}

/// Serves the gateway on `listener` (plain TCP or [`crate::serve::tls::TlsListener`]) until
/// `shutdown` completes; open streams then get `grace` to finish.
pub async fn serve<L>(
    listener: L,
    state: Arc<GatewayState>,
    shutdown: impl Future<Output = ()> + Send + 'static,
    grace: Duration,
) -> std::io::Result<()>
where
    L: axum::serve::Listener,
    L::Addr: std::fmt::Debug,
{
    let (stopping_tx, mut stopping) = tokio::sync::watch::channel(false);
    let server = axum::serve(listener, router(state)).with_graceful_shutdown(async move {
        shutdown.await;
        let _ = stopping_tx.send(true);
    });
    let mut server = tokio::spawn(async move { server.await });
    tokio::select! {
        result = &mut server => return result.map_err(std::io::Error::other)?,
        _ = stopping.wait_for(|&s| s) => {}
    }
    tracing::info!("shutting down: no new connections; waiting up to {grace:?} for open streams");
    match tokio::time::timeout(grace, server).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(std::io::Error::other(join)),
        Err(_) => Ok(()),
    }
}

async fn not_here(uri: axum::http::Uri) -> ApiError {
    let what = if uri.path().ends_with("/fork") {
        "fork"
    } else if uri.path() == "/v1/runs" {
        "one-shot runs (POST /v1/runs)"
    } else {
        "updating a sandbox (PATCH)"
    };
    ApiError::new(
        StatusCode::NOT_IMPLEMENTED,
        "not_implemented",
        format!(
            "{what} is not available through hearth gateway: use a node's own `hearth serve` \
             API, or a run-to-completion Sandbox object"
        ),
    )
}

async fn healthz() -> Json<api::Health> {
    Json(api::Health {
        status: "ok".into(),
    })
}

/// Ready when the API server answers.
async fn readyz(State(state): State<Arc<GatewayState>>) -> Response {
    let probe =
        tokio::time::timeout(state.settings.api_timeout, state.client.apiserver_version()).await;
    match probe {
        Ok(Ok(_)) => Json(api::Health {
            status: "ok".into(),
        })
        .into_response(),
        Ok(Err(e)) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            format!("the Kubernetes API server: {e}"),
        )
        .into_response(),
        Err(_) => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the Kubernetes API server did not answer",
        )
        .into_response(),
    }
}

async fn metrics(State(state): State<Arc<GatewayState>>) -> Response {
    let m = &state.metrics;
    let line = |name: &str, help: &str, c: &AtomicU64| {
        format!(
            "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}\n",
            c.load(Ordering::Relaxed)
        )
    };
    let text = [
        line(
            "hearth_gateway_requests_total",
            "Authenticated /v1 requests received.",
            &m.requests,
        ),
        line(
            "hearth_gateway_creates_total",
            "Sandbox objects created.",
            &m.creates,
        ),
        line(
            "hearth_gateway_proxied_total",
            "Requests forwarded to node APIs.",
            &m.proxied,
        ),
        line(
            "hearth_gateway_proxy_errors_total",
            "Requests a node API could not be reached for.",
            &m.proxy_errors,
        ),
        line(
            "hearth_gateway_unauthorized_total",
            "Requests refused for a missing or unknown token.",
            &m.unauthorized,
        ),
        line(
            "hearth_gateway_node_lookups_watch_total",
            "Forwards whose node endpoint came from the HearthNode watch.",
            &m.nodes_from_watch,
        ),
        line(
            "hearth_gateway_node_lookups_api_total",
            "Forwards whose node endpoint was read from the API server.",
            &m.nodes_from_api,
        ),
    ]
    .concat();
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        text,
    )
        .into_response()
}

/// `hearth serve`'s document, saying what differs through the gateway.
pub fn openapi_document() -> String {
    let mut doc: serde_json::Value =
        serde_json::from_str(&crate::serve::openapi::document()).expect("our document is JSON");
    let note = " Through `hearth gateway`: fork, PATCH of a sandbox and POST /v1/runs answer 501; \
                `disk` and `user` on create are refused (400), and so is `idle_timeout_seconds` without \
                `\"on_idle\": \"pause\"` (with it: `lifecycle.idlePauseSeconds`).";
    if let Some(desc) = doc.pointer_mut("/info/description") {
        if let Some(text) = desc.as_str() {
            *desc = serde_json::Value::String(format!("{text}{note}"));
        }
    }
    serde_json::to_string_pretty(&doc).expect("JSON serializes")
}

async fn openapi() -> Response {
    (
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        openapi_document(),
    )
        .into_response()
}
