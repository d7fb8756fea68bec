//! `/v1/sandboxes/{id}/...` routes the gateway does not answer itself (exec, WebSocket exec,
//! files, code, network, ports, tunnels): the caller's Service sandbox is looked up in its own
//! namespace (404 otherwise), its node's `spec.apiEndpoint` taken from the HearthNode watch
//! ([`super::nodes`]) or read from the API server, and the request forwarded there by [`super::proxy`] to `/v1/sandboxes/{status.sandboxId}/...`. A policy
//! set through `PUT .../network` is written back to the Sandbox's `spec.network`.

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use hearth_k8s::crd::{HearthNode, Phase};
use hearth_net::policy::NetworkPolicy;
use kube::{Api, ResourceExt};

use super::objects::api_sandbox;
use super::sandboxes::{bounded, find, no_such, patch_spec};
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
    let endpoint = match state.endpoints.cached(&node_name) {
        Some(endpoint) => {
            Metrics::bump(&state.metrics.nodes_from_watch);
            Some(endpoint)
        }
        None => {
            Metrics::bump(&state.metrics.nodes_from_api);
            let nodes: Api<HearthNode> = Api::all(state.client.clone());
            bounded(
                &state,
                "reading the sandbox's node",
                nodes.get_opt(&node_name),
            )
            .await?
            .and_then(|n| n.spec.api_endpoint)
        }
    };
    let endpoint = endpoint.ok_or_else(|| {
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
    let sets_network = rest == "network" && request.method() == Method::PUT;
    let response = state
        .nodes
        .forward(&endpoint, &path, request)
        .await
        .map_err(|e| {
            Metrics::bump(&state.metrics.proxy_errors);
            tracing::warn!(node = %node_name, "{e}");
            ApiError::from(e)
        })?;
    if sets_network && response.status().is_success() {
        return record_network(&state, &caller, &found.name_any(), response).await;
    }
    Ok(response)
}

/// Largest network answer the gateway reads back (a policy and its activity: a few KiB).
const MAX_NETWORK_ANSWER: usize = 256 << 10;

/// A policy the node put in force is written back to the Sandbox's `spec.network`, so that the
/// object (and the gateway's own `GET`) says what is in force rather than what the sandbox was
/// created with. The node's answer goes to the client unchanged; a failed write-back is logged
/// (the node's policy is in force either way) and said in a `Warning` header.
async fn record_network(
    state: &GatewayState,
    caller: &Caller,
    name: &str,
    response: Response,
) -> Result<Response, ApiError> {
    let (mut parts, body) = response.into_parts();
    let bytes = axum::body::to_bytes(body, MAX_NETWORK_ANSWER)
        .await
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("reading the node's answer: {e}"),
            )
        })?;
    /// The part of the node's answer (`serve::network::SandboxNetwork`) written back.
    #[derive(serde::Deserialize)]
    struct InForce {
        policy: NetworkPolicy,
    }
    let written = match serde_json::from_slice::<InForce>(&bytes) {
        Ok(InForce { policy }) => {
            let network = serde_json::json!({ "network": super::objects::crd_network(&policy) });
            patch_spec(state, caller, name, network, "writing spec.network")
                .await
                .map_err(|e| e.message)
        }
        Err(e) => Err(format!("the node's answer holds no policy: {e}")),
    };
    if let Err(e) = written {
        tracing::warn!(sandbox = %name, "spec.network not updated: {e}");
        let warning = "199 hearth-gateway \"the policy is in force; the Sandbox object still shows the previous one\"";
        parts.headers.insert(
            axum::http::header::WARNING,
            axum::http::HeaderValue::from_static(warning),
        );
    }
    Ok(Response::from_parts(parts, axum::body::Body::from(bytes)))
}
