//! `/v1/sandboxes/{id}/...` routes the gateway does not answer itself (exec, WebSocket exec,
//! files, code, network, ports, tunnels): the caller's Service sandbox is looked up in its own
//! namespace (404 otherwise), its node's `spec.apiEndpoint` read from its HearthNode, and the
//! request forwarded there by [`super::proxy`] to `/v1/sandboxes/{status.sandboxId}/...`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::Response;
use hearth_k8s::crd::{HearthNode, Phase};
use kube::Api;

use super::objects::api_sandbox;
use super::sandboxes::{bounded, find, no_such};
use super::{Caller, GatewayState, Metrics};
use crate::serve::error::ApiError;

/// Everything else under `/v1/sandboxes/{id}/`: forwarded to the node holding the sandbox.
pub async fn forward(
    State(state): State<Arc<GatewayState>>,
    caller: Caller,
    Path((id, _rest)): Path<(String, String)>,
    request: Request,
) -> Result<Response, ApiError> {
    // The raw (still percent-encoded) rest of the path, passed on as the client wrote it.
    let prefix = format!("/v1/sandboxes/{id}/");
    let rest = request
        .uri()
        .path()
        .strip_prefix(&prefix)
        .ok_or_else(|| no_such(&id))?
        .to_string();
    if !super::proxy::is_plain_rest(&rest) {
        return Err(ApiError::invalid(
            "the path has a dot segment or an encoded slash: not forwarded",
        ));
    }
    let found = find(&state, &caller, &id).await?;
    let status = found.status.clone().unwrap_or_default();
    let node_id = status
        .sandbox_id
        .filter(|n| {
            !n.is_empty()
                && n.len() <= 128
                && n.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
        .filter(|_| matches!(found.phase(), Phase::Running | Phase::Paused));
    let (Some(node_id), Some(node_name)) = (node_id, status.node_name) else {
        let view = api_sandbox(&found);
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!(
                "sandbox {id} is {}{}",
                serde_json::to_value(view.state)
                    .ok()
                    .and_then(|v| v.as_str().map(str::to_string))
                    .unwrap_or_default(),
                view.reason.map(|r| format!(": {r}")).unwrap_or_default()
            ),
        ));
    };
    let nodes: Api<HearthNode> = Api::all(state.client.clone());
    let node = bounded(
        &state,
        "reading the sandbox's node",
        nodes.get_opt(&node_name),
    )
    .await?;
    let endpoint = node.and_then(|n| n.spec.api_endpoint).ok_or_else(|| {
        ApiError::new(
            StatusCode::BAD_GATEWAY,
            "node_unreachable",
            format!("node {node_name} has no API endpoint (start its agent with --advertise-url)"),
        )
    })?;
    let mut path = format!("/v1/sandboxes/{node_id}/{rest}");
    if let Some(query) = request.uri().query() {
        path.push('?');
        path.push_str(query);
    }
    Metrics::bump(&state.metrics.proxied);
    state
        .nodes
        .forward(&endpoint, &path, request)
        .await
        .map_err(|e| {
            Metrics::bump(&state.metrics.proxy_errors);
            tracing::warn!(node = %node_name, "{e}");
            e.into()
        })
}
