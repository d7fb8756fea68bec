//! `/v1/sandboxes` and `/v1/sandboxes/{id}`: create, list, get, update (timeouts), delete. Each handler parses,
//! authenticates, calls the node and maps its answer; sizes, durations and environment are
//! converted from their wire form here (shared with `runs.rs`).

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hearth_sandbox::node::{CreateSpec, State as NodeState};

use super::api::{CreateSandbox, ErrorBody, Sandbox, SandboxList};
use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

#[utoipa::path(post, path = "/v1/sandboxes", tag = "sandboxes", operation_id = "createSandbox",
    request_body = CreateSandbox,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "Created and running (or failed: see `state` and `reason`)", body = Sandbox),
        (status = 202, description = "Accepted, still creating (`\"wait\": false`, or boot slower than the daemon waits)", body = Sandbox),
        (status = 400, description = "Bad image reference (a local `oci-layout:`/`oci-archive:` path only from a directory the node allows), size or limit", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The network policy asked for (or the node's default) is above the tenant's ceiling", body = ErrorBody),
        (status = 404, description = "Deleted (by another request) before it ran", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "Tenant quota used up", body = ErrorBody),
        (status = 500, description = "The node failed (the message says what)", body = ErrorBody),
        (status = 503, description = "Node capacity used up (`capacity`, with Retry-After) or shutting down (`shutting_down`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `capacity`)"))),
    ))]
pub async fn create(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    body: Result<Json<CreateSandbox>, JsonRejection>,
) -> Result<(StatusCode, Json<Sandbox>), ApiError> {
    let Json(body) = body?;
    let wait = body.wait.unwrap_or(true);
    let spec = CreateSpec {
        image: nonempty("image", &body.image)?,
        vcpus: body.cpus,
        memory_mib: size_field("memory", body.memory.as_deref())?
            .map(|b| u32::try_from(b >> 20).unwrap_or(u32::MAX)),
        disk_bytes: size_field("disk", body.disk.as_deref())?,
        ttl: seconds_field("ttl_seconds", body.ttl_seconds)?,
        idle_timeout: seconds_field("idle_timeout_seconds", body.idle_timeout_seconds)?,
        on_idle: body.on_idle.unwrap_or_default().into(),
        env: env_pairs(body.env)?,
        workdir: body.workdir,
        user: body.user,
        labels: body.labels,
        network: body.network,
    };
    let created = state.node.create(&tenant, spec).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %created.id, image = %created.image, "created");
    if !wait {
        return Ok((StatusCode::ACCEPTED, Json(created.into())));
    }
    let info = state
        .node
        .wait_ready(&tenant.name, &created.id, state.settings.create_wait)
        .await?;
    let status = match info.state {
        NodeState::Creating => StatusCode::ACCEPTED,
        _ => StatusCode::CREATED,
    };
    Ok((status, Json(info.into())))
}

#[utoipa::path(get, path = "/v1/sandboxes", tag = "sandboxes", operation_id = "listSandboxes",
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The caller's sandboxes (others' are never listed)", body = SandboxList),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
) -> Json<SandboxList> {
    let sandboxes = state.node.list(&tenant.name);
    Json(SandboxList {
        sandboxes: sandboxes.into_iter().map(Sandbox::from).collect(),
    })
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}", tag = "sandboxes", operation_id = "getSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The sandbox", body = Sandbox),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<Sandbox>, ApiError> {
    Ok(Json(state.node.get(&tenant.name, &id)?.into()))
}

/// `PATCH /v1/sandboxes/{id}`: new timeouts for a running or paused sandbox; fields left out
/// stay as they are.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdateSandbox {
    /// The sandbox's whole lifetime, counted from its creation as at create (`expires_at` becomes
    /// `created_at` + this); at most the daemon's `--max-ttl`.
    pub ttl_seconds: Option<u64>,
    /// Stop it after this long without an exec or file request, counted from its last activity.
    pub idle_timeout_seconds: Option<u64>,
}

#[utoipa::path(patch, path = "/v1/sandboxes/{id}", tag = "sandboxes", operation_id = "updateSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = UpdateSandbox,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The sandbox with its new `expires_at`", body = Sandbox),
        (status = 400, description = "A value of 0, a TTL over the daemon's maximum, or a malformed body", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "Neither running nor paused (creating, stopped, failed)", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
    ))]
pub async fn update(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<UpdateSandbox>, JsonRejection>,
) -> Result<Json<Sandbox>, ApiError> {
    let Json(body) = body?;
    let ttl = seconds_field("ttl_seconds", body.ttl_seconds)?;
    let idle = seconds_field("idle_timeout_seconds", body.idle_timeout_seconds)?;
    let info = state.node.update_timeouts(&tenant.name, &id, ttl, idle)?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, ?ttl, ?idle, "timeouts updated");
    Ok(Json(info.into()))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}", tag = "sandboxes", operation_id = "deleteSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Stopped and forgotten"),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
    ))]
pub async fn delete(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.node.delete(&tenant.name, &id).await?;
    tracing::info!(tenant = %tenant.name, sandbox = %id, "deleted");
    Ok(StatusCode::NO_CONTENT)
}

pub(super) fn nonempty(field: &str, value: &str) -> Result<String, ApiError> {
    match value.trim() {
        "" => Err(ApiError::invalid(format!("`{field}` must not be empty"))),
        v => Ok(v.to_string()),
    }
}

/// A size like `512m`; at least 1 MiB.
pub(super) fn size_field(field: &str, value: Option<&str>) -> Result<Option<u64>, ApiError> {
    value
        .map(|v| {
            crate::units::bytes(v)
                .filter(|&n| n >= 1 << 20)
                .ok_or_else(|| {
                    ApiError::invalid(format!(
                        "`{field}` {v:?} is not a size of at least 1m, like 512m or 2g"
                    ))
                })
        })
        .transpose()
}

pub(super) fn seconds_field(field: &str, value: Option<u64>) -> Result<Option<Duration>, ApiError> {
    match value {
        Some(0) => Err(ApiError::invalid(format!("`{field}` must be at least 1"))),
        other => Ok(other.map(Duration::from_secs)),
    }
}

pub(super) fn env_pairs(env: BTreeMap<String, String>) -> Result<Vec<(String, String)>, ApiError> {
    env.into_iter()
        .map(
            |(k, v)| match k.is_empty() || k.contains('=') || k.contains('\0') {
                true => Err(ApiError::invalid(format!(
                    "environment variable name {k:?} must be non-empty without '=' or NUL"
                ))),
                false => Ok((k, v)),
            },
        )
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wire_values_are_checked() {
        assert_eq!(size_field("memory", Some("512m")).unwrap(), Some(512 << 20));
        assert_eq!(size_field("memory", None).unwrap(), None);
        let err = size_field("memory", Some("lots")).unwrap_err();
        assert_eq!(err.status, StatusCode::BAD_REQUEST);
        assert!(err.message.contains("`memory` \"lots\""), "{}", err.message);
        assert!(size_field("disk", Some("12")).is_err(), "bytes below 1m");
        assert!(seconds_field("ttl_seconds", Some(0)).is_err());
        assert!(nonempty("image", " ").is_err());
        let env = BTreeMap::from([("A=B".to_string(), "c".to_string())]);
        assert!(env_pairs(env).is_err());
    }
}
