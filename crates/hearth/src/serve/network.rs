//! `GET|PUT /v1/sandboxes/{id}/network`: a running sandbox's egress policy with its network's
//! activity (bytes, connections, DNS counters, the latest refused attempts), and replacing the
//! policy while the sandbox runs (in force at once; open connections it refuses are cut; within
//! the tenant's ceiling from the tokens file). Thin: the node decides.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::Json;
use hearth_sandbox::node::NetworkView;
use hearth_sandbox::{NetworkPolicy, NetworkStats, RefusedAttempt};
use serde::Serialize;
use utoipa::ToSchema;

use super::api::ErrorBody;
use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

/// A sandbox's network: the policy in force and what went through it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct SandboxNetwork {
    /// `{"mode": "none"|"allow"|"open", "allow": [ENTRY...], "deny": [ENTRY...]}`; an ENTRY is a
    /// domain (`api.example.com`), a wildcard (`*.example.org`, names below it), an IP or a CIDR,
    /// each optionally with `:port`.
    #[schema(value_type = Object)]
    pub policy: NetworkPolicy,
    /// Bytes in and out, connections, DNS queries answered and refused.
    #[schema(value_type = Object)]
    pub stats: NetworkStats,
    /// The latest refused connection attempts (destination, name, time, reason), oldest first.
    #[schema(value_type = Vec<Object>)]
    pub refused: Vec<RefusedAttempt>,
}

impl From<NetworkView> for SandboxNetwork {
    fn from(view: NetworkView) -> SandboxNetwork {
        SandboxNetwork {
            policy: view.policy,
            stats: view.stats,
            refused: view.refused,
        }
    }
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/network", tag = "network", operation_id = "getSandboxNetwork",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The policy in force and the network's activity", body = SandboxNetwork),
        (status = 400, description = "The sandbox has no network (the daemon runs without)", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<SandboxNetwork>, ApiError> {
    Ok(Json(state.node.network(&tenant.name, &id)?.into()))
}

#[utoipa::path(put, path = "/v1/sandboxes/{id}/network", tag = "network", operation_id = "setSandboxNetwork",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    request_body(content = Object, description = "The new policy: `{\"mode\": ..., \"allow\": [...], \"deny\": [...]}`"),
    responses(
        (status = 200, description = "In force: new connections and DNS answers follow it, open connections it refuses were cut", body = SandboxNetwork),
        (status = 400, description = "Malformed JSON, or the sandbox has no network", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "Above the tenant's network ceiling", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field, wrong type or a malformed entry (the message says which)", body = ErrorBody),
        (status = 500, description = "The new policy could not be applied (the message says why)", body = ErrorBody),
    ))]
pub async fn put(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<NetworkPolicy>, JsonRejection>,
) -> Result<Json<SandboxNetwork>, ApiError> {
    let Json(policy) = body?;
    let view = state.node.set_network(&tenant, &id, policy).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, "network policy replaced");
    Ok(Json(view.into()))
}
