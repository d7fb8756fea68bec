//! Waking a sandbox its idle timeout paused (`on_idle: pause`) before it is used: a layer on the
//! routes that use a running sandbox (exec and its WebSocket, code, files, ports, tunnel, fork,
//! starting and driving background processes, but not reading them) that asks the node to resume
//! it ([`hearth_sandbox::node::Node::wake`]) before the handler runs. A failed resume is the answer (503 capacity, 429 quota, the snapshot's error). A request
//! that does not authenticate, or names no sandbox of its tenant, passes through untouched: the
//! handler answers it as it always has.

use std::collections::HashMap;
use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

/// The layer's function: wake, then run the handler.
pub async fn on_use(
    State(state): State<Arc<AppState>>,
    tenant: Result<Authenticated, ApiError>,
    params: Result<Path<HashMap<String, String>>, axum::extract::rejection::PathRejection>,
    request: Request,
    next: Next,
) -> Response {
    if let (Ok(Authenticated(tenant)), Ok(Path(params))) = (tenant, params) {
        if let Some(id) = params.get("id") {
            if let Err(e) = state.node.wake(&tenant, id).await {
                return ApiError::from(e).into_response();
            }
        }
    }
    next.run(request).await
}
