//! `/v1/sandboxes/{id}/pause` and `/v1/sandboxes/{id}/resume`: a running sandbox saved to disk
//! with no VM left, and brought back as it was; `/v1/sandboxes/{id}/fork`: new sandboxes from a
//! running one's state. Thin handlers over `Node::pause`, `Node::resume` and `Node::fork`, whose
//! modules document the choices (execs running at pause, admission, TTL and idle time, failed
//! resumes; what a fork's children share and what is their own, all-or-nothing forks).

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{ErrorBody, Sandbox, SandboxList};
use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

/// `POST /v1/sandboxes/{id}/pause` (the body is optional).
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PauseSandbox {
    /// Pause even while execs or file transfers run: their streams end with an error event (no exit
    /// status); their processes are not killed and run on after the resume, their output
    /// discarded. Without it such a pause answers 409.
    #[serde(default)]
    pub force: bool,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/pause", tag = "sandboxes", operation_id = "pauseSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body(content = Option<PauseSandbox>, description = "Optional; `{\"force\": true}` pauses even while execs run"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Saved to disk: `paused`, no VM running; its vCPUs and memory are free, its disk still counted", body = Sandbox),
        (status = 400, description = "Malformed JSON body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "Not running (already paused, creating, stopped, failed, or being paused or resumed), or execs running without `force`", body = ErrorBody),
        (status = 415, description = "A body not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 500, description = "Saving failed; the sandbox runs on (the message says why)", body = ErrorBody),
        (status = 503, description = "No room on the node's disk for the sandbox's memory (`capacity`, with Retry-After; the sandbox runs on) or shutting down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `capacity`)"))),
        (status = 504, description = "The sandbox's VMM did not answer in time (`guest_unresponsive`: frozen, or a host too loaded to run it); nothing was saved and the sandbox runs on once its VMM does", body = ErrorBody),
    ))]
pub async fn pause(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Option<Json<PauseSandbox>>, JsonRejection>,
) -> Result<Json<Sandbox>, ApiError> {
    let force = body?.map(|Json(b)| b.force).unwrap_or(false);
    let info = state.node.pause(&tenant.name, &id, force).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, force, "paused");
    Ok(Json(info.into()))
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/resume", tag = "sandboxes", operation_id = "resumeSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Running again, restored from its snapshot: same files and memory, the host's clock, fresh entropy", body = Sandbox),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "Not paused (running, creating, stopped, failed, or being paused or resumed)", body = ErrorBody),
        (status = 429, description = "Tenant quota used up; the sandbox stays paused", body = ErrorBody),
        (status = 500, description = "The resume failed (e.g. a missing or corrupt snapshot file, named in the message); the sandbox stays paused with its snapshot", body = ErrorBody),
        (status = 503, description = "Node capacity used up (`capacity`, with Retry-After; the sandbox stays paused) or shutting down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `capacity`)"))),
        (status = 504, description = "The restored VM or its guest did not answer in time (`guest_unresponsive`); the sandbox stays paused with its snapshot", body = ErrorBody),
    ))]
pub async fn resume(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    let info = state.node.resume(&tenant, &id).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, "resumed");
    Ok(Json(info.into()))
}

/// `POST /v1/sandboxes/{id}/fork`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ForkSandbox {
    /// How many new sandboxes: 1 to 64.
    #[schema(minimum = 1, maximum = 64)]
    pub count: u32,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/fork", tag = "sandboxes", operation_id = "forkSandbox",
    params(("id" = String, Path, description = "Sandbox id (running)")),
    request_body(content = ForkSandbox, description = "`{\"count\": N}`"),
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The children, `running`: each has the parent's processes, memory and files as of the fork, and its own id, hostname, entropy, clock, network namespace and a copy of the parent's network policy; the parent runs on. Execs running in the parent are not the children's", body = SandboxList),
        (status = 400, description = "`count` is 0 or over 64, or a malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The parent is not running (paused, creating, stopped, failed, or being paused or resumed); \
            one its idle timeout paused (`on_idle: pause`) is resumed first", body = ErrorBody),
        (status = 415, description = "A body not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "The children would exceed the tenant's quota; none was created", body = ErrorBody),
        (status = 500, description = "The snapshot or a child failed (the message names it); all or nothing: no child was kept, the parent runs on", body = ErrorBody),
        (status = 503, description = "Node capacity (memory, vCPUs, or disk for the snapshot or the children) used up (`capacity`, with Retry-After; none created) or shutting down", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `capacity`)"))),
        (status = 504, description = "The parent's VMM, or a child, did not answer in time (`guest_unresponsive`); no child was kept, the parent runs on once its VMM does", body = ErrorBody),
    ))]
pub async fn fork(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<ForkSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<SandboxList>), ApiError> {
    let Json(body) = body?;
    let children = state.node.fork(&tenant, &id, body.count).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, count = body.count, "forked");
    let sandboxes = children.into_iter().map(Sandbox::from).collect();
    Ok((StatusCode::CREATED, Json(SandboxList { sandboxes })))
}
