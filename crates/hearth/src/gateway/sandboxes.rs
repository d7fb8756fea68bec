//! The gateway's handlers: sandboxes as `Sandbox` objects in the caller's namespace (create and
//! wait for Running, list, get, pause and resume through `spec.paused`, delete and wait until gone)
//! (`super::forward` sends everything else under a sandbox to its node). Every lookup is in the
//! caller's own namespace, and only Service sandboxes are visible: a run-to-completion Sandbox, one
//! of another namespace and a missing one all answer the same 404.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use hearth_k8s::crd::{Phase, Sandbox, SandboxClaim};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::runtime::wait::{await_condition, conditions};
use kube::Api;

use super::objects::{api_sandbox, new_name, sandbox_object};
use super::{Caller, GatewayState, Metrics};
use crate::serve::api::{self, CreateSandbox, SandboxList};
use crate::serve::error::ApiError;

/// The field manager of the gateway's writes.
const MANAGER: &str = "hearth-gateway";

fn sandboxes(state: &GatewayState, caller: &Caller) -> Api<Sandbox> {
    Api::namespaced(state.client.clone(), &caller.namespace)
}

/// Merges `spec` into the caller's Sandbox `name` as the gateway's field manager; `what` says
/// what for errors.
pub(super) async fn patch_spec(
    state: &GatewayState,
    caller: &Caller,
    name: &str,
    spec: serde_json::Value,
    what: &str,
) -> Result<(), ApiError> {
    let params = PatchParams {
        field_manager: Some(MANAGER.into()),
        ..PatchParams::default()
    };
    let patch = serde_json::json!({ "spec": spec });
    let api = sandboxes(state, caller);
    bounded(state, what, api.patch(name, &params, &Patch::Merge(&patch)))
        .await
        .map(drop)
}

/// A kube error as the API's error; `what` says what the gateway was doing.
fn kube_error(what: &str, e: kube::Error) -> ApiError {
    match &e {
        kube::Error::Api(status) => match status.code {
            404 => ApiError::not_found(format!("{what}: not found")),
            409 => ApiError::new(StatusCode::CONFLICT, "conflict", format!("{what}: {e}")),
            400 | 422 => ApiError::invalid(format!("{what}: {}", status.message)),
            403 => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "kubernetes",
                format!("{what}: the gateway's service account may not do this: {e}"),
            ),
            _ => ApiError::new(
                StatusCode::BAD_GATEWAY,
                "kubernetes",
                format!("{what}: {e}"),
            ),
        },
        _ => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "kubernetes",
            format!("{what}: {e}"),
        ),
    }
}

/// `future` bounded by the gateway's per-request API timeout.
pub(super) async fn bounded<T>(
    state: &GatewayState,
    what: &str,
    future: impl std::future::Future<Output = Result<T, kube::Error>>,
) -> Result<T, ApiError> {
    match tokio::time::timeout(state.settings.api_timeout, future).await {
        Ok(result) => result.map_err(|e| kube_error(what, e)),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "kubernetes",
            format!("{what}: the Kubernetes API server did not answer"),
        )),
    }
}

pub(super) fn no_such(id: &str) -> ApiError {
    ApiError::not_found(format!("no sandbox {id}"))
}

/// The caller's Service sandbox `id`; 404 for anything else.
pub(super) async fn find(
    state: &GatewayState,
    caller: &Caller,
    id: &str,
) -> Result<Sandbox, ApiError> {
    let valid = !id.is_empty()
        && id.len() <= 253
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
    if !valid {
        return Err(no_such(id));
    }
    let api = sandboxes(state, caller);
    match bounded(state, "reading the sandbox", api.get_opt(id)).await? {
        Some(s) if s.spec.is_service() => Ok(s),
        _ => Err(no_such(id)),
    }
}

/// Waits up to `limit` for `cond` on object `name`; `Ok(None)` when it is gone, `Err(None)` on
/// timeout (the caller decides what that means).
async fn wait_until(
    api: Api<Sandbox>,
    name: &str,
    limit: Duration,
    cond: impl Fn(&Sandbox) -> bool + Send + Sync + 'static,
) -> Result<Option<Sandbox>, Option<ApiError>> {
    let condition = move |o: Option<&Sandbox>| o.is_none_or(&cond);
    match tokio::time::timeout(limit, await_condition(api, name, condition)).await {
        Ok(Ok(found)) => Ok(found),
        Ok(Err(e)) => Err(Some(ApiError::new(
            StatusCode::BAD_GATEWAY,
            "kubernetes",
            format!("watching sandbox {name}: {e}"),
        ))),
        Err(_) => Err(None),
    }
}

fn runs(s: &Sandbox) -> bool {
    s.phase() == Phase::Running && s.status.as_ref().is_some_and(|st| st.sandbox_id.is_some())
}

fn failure(s: &Sandbox) -> ApiError {
    let view = api_sandbox(s);
    let why = view.reason.unwrap_or_else(|| "no reason given".into());
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "start_failed",
        format!(
            "sandbox {} {}: {why}",
            view.id,
            s.phase().as_str().to_lowercase()
        ),
    )
}

pub async fn create(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
    body: Result<Json<serde_json::Value>, JsonRejection>,
) -> Result<(StatusCode, Json<api::Sandbox>), ApiError> {
    let Json(body) = body?;
    let api = sandboxes(&state, &caller);
    let fresh = || new_name().map_err(|e| ApiError::internal(format!("random name: {e}")));
    let (name, wait) = match super::claims::template_create(&body)? {
        Some(template) => {
            let claims = Api::namespaced(state.client.clone(), &caller.namespace);
            let (limit, timeout) = (state.settings.create_wait, state.settings.api_timeout);
            let claim = fresh()?;
            let name = super::claims::claim(claims, &claim, &template, limit, timeout).await?;
            (name, template.wait)
        }
        None => {
            let body: CreateSandbox = serde_json::from_value(body).map_err(|e| {
                ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "unprocessable",
                    format!("Failed to deserialize the JSON body into the target type: {e}"),
                )
            })?;
            let name = fresh()?;
            let object = sandbox_object(&name, &body, SystemTime::now())?;
            let params = PostParams {
                field_manager: Some(MANAGER.into()),
                ..PostParams::default()
            };
            bounded(&state, "creating the sandbox", api.create(&params, &object)).await?;
            (name, body.wait != Some(false))
        }
    };
    Metrics::bump(&state.metrics.creates);
    tracing::info!(tenant = %caller.tenant, namespace = %caller.namespace, %name, "sandbox created");
    if !wait {
        let now = bounded(&state, "reading the sandbox", api.get_opt(&name)).await?;
        let now = now.ok_or_else(|| no_such(&name))?;
        return Ok((StatusCode::ACCEPTED, Json(api_sandbox(&now))));
    }
    let ended = |s: &Sandbox| runs(s) || s.phase().is_finished();
    match wait_until(api.clone(), &name, state.settings.create_wait, ended).await {
        Ok(Some(s)) if runs(&s) => Ok((StatusCode::CREATED, Json(api_sandbox(&s)))),
        Ok(Some(s)) => Err(failure(&s)),
        Ok(None) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("sandbox {name} was deleted before it ran"),
        )),
        Err(Some(e)) => Err(e),
        // Still starting: answer like `hearth serve` does after its wait.
        Err(None) => {
            let now = bounded(&state, "reading the sandbox", api.get_opt(&name)).await?;
            let now = now.ok_or_else(|| no_such(&name))?;
            Ok((StatusCode::ACCEPTED, Json(api_sandbox(&now))))
        }
    }
}

pub async fn list(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
) -> Result<Json<SandboxList>, ApiError> {
    let api = sandboxes(&state, &caller);
    let all = bounded(
        &state,
        "listing sandboxes",
        api.list(&ListParams::default()),
    )
    .await?;
    let mut found: Vec<_> = all.items.iter().filter(|s| s.spec.is_service()).collect();
    found.sort_by_key(|s| s.metadata.creation_timestamp.clone().map(|t| t.0));
    Ok(Json(SandboxList {
        sandboxes: found.into_iter().map(api_sandbox).collect(),
    }))
}

pub async fn get(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<api::Sandbox>, ApiError> {
    Ok(Json(api_sandbox(&find(&state, &caller, &id).await?)))
}

pub async fn delete(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let found = find(&state, &caller, &id).await?;
    let uid = found.metadata.uid.clone().unwrap_or_default();
    let api = sandboxes(&state, &caller);
    let claim = found
        .metadata
        .labels
        .as_ref()
        .and_then(|l| l.get(hearth_k8s::crd::CLAIM_LABEL))
        .cloned();
    if let Some(claim) = claim {
        // Its claim's finalizer deletes it; deleting only the Sandbox would leave the claim.
        let claims: Api<SandboxClaim> = Api::namespaced(state.client.clone(), &caller.namespace);
        let params = DeleteParams::default();
        let deleted = claims.delete(&claim, &params);
        match tokio::time::timeout(state.settings.api_timeout, deleted).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) if hearth_k8s::is_not_found(&e) => {}
            Ok(Err(e)) => return Err(kube_error("deleting the sandbox's claim", e)),
            Err(_) => {
                return Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "kubernetes",
                    "deleting the sandbox's claim: no answer",
                ))
            }
        }
    }
    let params = DeleteParams {
        // Never a newer object that took the same name.
        preconditions: Some(Preconditions {
            uid: Some(uid.clone()),
            resource_version: None,
        }),
        ..DeleteParams::default()
    };
    match tokio::time::timeout(state.settings.api_timeout, api.delete(&id, &params)).await {
        Ok(Ok(_)) => {}
        // Already gone (its claim took it).
        Ok(Err(e)) if hearth_k8s::is_not_found(&e) => return Ok(StatusCode::NO_CONTENT),
        Ok(Err(e)) => return Err(kube_error("deleting the sandbox", e)),
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "kubernetes",
                "deleting the sandbox: no answer",
            ))
        }
    }
    let gone = conditions::is_deleted(&uid);
    let limit = state.settings.delete_wait;
    match tokio::time::timeout(limit, await_condition(api, &id, gone)).await {
        Ok(Ok(_)) => Ok(StatusCode::NO_CONTENT),
        // Asked for, and the node agent will finish it: say so rather than fail.
        Ok(Err(_)) | Err(_) => Ok(StatusCode::ACCEPTED),
    }
}

pub async fn pause(
    state: State<Arc<GatewayState>>,
    caller: Caller,
    id: Path<String>,
) -> Result<Response, ApiError> {
    set_paused(state, caller, id, true).await
}

pub async fn resume(
    state: State<Arc<GatewayState>>,
    caller: Caller,
    id: Path<String>,
) -> Result<Response, ApiError> {
    set_paused(state, caller, id, false).await
}

/// Writes `spec.paused` and waits for the node agent to follow (phase Paused, or Running again
/// with a node sandbox id).
async fn set_paused(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
    Path(id): Path<String>,
    paused: bool,
) -> Result<Response, ApiError> {
    let found = find(&state, &caller, &id).await?;
    if found.phase().is_finished() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "sandbox {id} has ended ({})",
                found.phase().as_str().to_lowercase()
            ),
        ));
    }
    let reached = move |s: &Sandbox| match paused {
        true => s.phase() == Phase::Paused,
        false => runs(s),
    };
    // Paused with `spec.paused` false: its idle timeout may have paused it
    // (`lifecycle.idlePauseSeconds`), and the node agent leaves it so until a use.
    let maybe_asleep = !found.spec.paused && found.phase() == Phase::Paused;
    // A pause of a sleeping sandbox still writes `spec.paused`: a declared pause, not woken by use.
    if reached(&found) && !(paused && maybe_asleep) {
        return Ok(Json(api_sandbox(&found)).into_response());
    }
    let what = if paused { "pausing" } else { "resuming" };
    // Whole seconds, as the API server keeps condition times.
    let asked = k8s_openapi::jiff::Timestamp::now()
        .round(k8s_openapi::jiff::Unit::Second)
        .unwrap_or_else(|_| k8s_openapi::jiff::Timestamp::now())
        - k8s_openapi::jiff::SignedDuration::from_secs(1);
    if maybe_asleep {
        // A resume wakes it with a use (the node resumes it first, and does nothing to one paused
        // by `spec.paused` and not yet resumed by its agent: 409); a pause declares it paused on
        // the node before `spec.paused` says so, so that no use wakes it meanwhile.
        let (method, tail) = match paused {
            false => (axum::http::Method::GET, "files?path=/"),
            true => (axum::http::Method::POST, "pause"),
        };
        if let Some(refused) = on_node_as_a_use(&state, &caller, &id, method, tail).await? {
            return Ok(refused);
        }
    }
    let api = sandboxes(&state, &caller);
    patch_spec(
        &state,
        &caller,
        &id,
        serde_json::json!({ "paused": paused }),
        what,
    )
    .await?;
    let refused = move |s: &Sandbox| refused_since(s, asked);
    let ended = move |s: &Sandbox| reached(s) || s.phase().is_finished() || refused(s);
    match wait_until(api, &id, state.settings.lifecycle_wait, ended).await {
        Ok(Some(s)) if reached(&s) => Ok(Json(api_sandbox(&s)).into_response()),
        Ok(Some(s)) if refused(&s) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "sandbox {id}: {what} failed: {}",
                api_sandbox(&s).reason.unwrap_or_default()
            ),
        )),
        Ok(Some(s)) => Err(failure(&s)),
        Ok(None) => Err(no_such(&id)),
        Err(Some(e)) => Err(e),
        Err(None) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("sandbox {id}: {what} asked for; its node has not finished yet"),
        )),
    }
}

/// Sends `method` `/v1/sandboxes/{id}/{tail}` (a POST with body `{}`) to sandbox `id`'s node,
/// forwarded as any use is: a listing of its root wakes it if its idle timeout paused it, a pause
/// declares a sleeping sandbox paused. `Some`: the node's answer when it refused (503 capacity, 429 quota, a
/// damaged snapshot), for the client as it is; a 409 (running, or paused by `spec.paused` and left
/// to its agent) is not a refusal.
async fn on_node_as_a_use(
    state: &Arc<GatewayState>,
    caller: &Caller,
    id: &str,
    method: axum::http::Method,
    tail: &str,
) -> Result<Option<Response>, ApiError> {
    let body = match method == axum::http::Method::POST {
        true => axum::body::Body::from("{}"),
        false => axum::body::Body::empty(),
    };
    let request = axum::extract::Request::builder()
        .method(method)
        .uri(format!("/v1/sandboxes/{id}/{tail}"))
        .header(axum::http::header::CONTENT_TYPE, "application/json")
        .body(body)
        .expect("a well-formed request");
    let path = Path((id.to_owned(), tail.to_owned()));
    let answer =
        super::forward::forward(State(state.clone()), caller.clone(), path, request).await?;
    let status = answer.status();
    Ok((!status.is_success() && status != StatusCode::CONFLICT).then_some(answer))
}

/// The node agent refused a pause or resume asked at `since`: it leaves the phase as it was and
/// sets the `Paused` condition, with reason `PauseFailed` or `ResumeFailed`.
fn refused_since(s: &Sandbox, since: k8s_openapi::jiff::Timestamp) -> bool {
    s.status.as_ref().is_some_and(|st| {
        st.conditions.iter().any(|c| {
            c.type_ == "Paused"
                && matches!(c.reason.as_deref(), Some("PauseFailed" | "ResumeFailed"))
                && c.last_transition_time.0 >= since
        })
    })
}
