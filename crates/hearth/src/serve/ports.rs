//! Exposed ports. `ANY /v1/sandboxes/{id}/ports/{port}/{path...}` proxies one HTTP/1.1 request
//! (and a WebSocket or other upgrade) to `127.0.0.1:PORT` inside the sandbox; `GET
//! /v1/sandboxes/{id}/tunnel/{port}` is a raw TCP connection to that port carried in WebSocket
//! binary messages (what `hearth sandbox port-forward` uses). Both go through the agent channel
//! ([`Node::forward`](hearth_sandbox::node::Node::forward)), never the guest's network, and only
//! with the owning tenant's token.
//!
//! What reaches the guest: the client's method, path, query, headers and body (streamed, never
//! buffered whole), minus the `Authorization` header (the tenant's token stays on the host) and the
//! hop-by-hop headers; `Host` becomes `localhost:PORT`. Bounds: the guest must accept within
//! [`CONNECT_DEADLINE`]; each open connection is one of the sandbox's capped requests (429 past it);
//! request headers and the guest's response head are limited to [`MAX_HEADER_BYTES`].

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, Request, State};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use futures::{SinkExt, StreamExt};
use hearth_sandbox::node::NodePort;
use hyper_util::rt::TokioIo;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::api::ErrorBody;
use super::auth::Authenticated;
use super::error::ApiError;
use super::exec::MAX_WS_MESSAGE;
use super::AppState;

/// How long the guest may take to accept a connection and the HTTP handshake.
pub const CONNECT_DEADLINE: Duration = Duration::from_secs(10);
/// Largest request header block accepted, and largest response head read from the guest.
pub const MAX_HEADER_BYTES: usize = 64 << 10;
/// Bytes read from the guest per tunnel message.
const TUNNEL_CHUNK: usize = 64 << 10;

/// Headers that describe one hop, never forwarded either way (RFC 9110 7.6.1), plus the
/// tenant's credentials.
const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

#[derive(Debug, Deserialize)]
pub struct PortPath {
    id: String,
    port: u16,
    #[serde(default)]
    path: String,
}

// Every method is proxied alike; documented once (as GET) to keep one operation id.
#[utoipa::path(get, path = "/v1/sandboxes/{id}/ports/{port}/{path}", tag = "ports", operation_id = "proxySandboxPort",
    description = "Any method (GET, POST, PUT, PATCH, DELETE, ...) proxied to the guest port as one HTTP/1.1 request; \
        `/v1/sandboxes/{id}/ports/{port}/` is the guest's `/`.",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "TCP port on the guest's loopback"),
        ("path" = String, Path, description = "Path (and query) sent to the guest; empty for `/`"),
    ),
    request_body(content = inline(Option<super::openapi::Binary>), content_type = "application/octet-stream",
        description = "The request's body, if any, streamed to the guest as is (with the client's own `Content-Type`)"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Whatever the guest's server answers (any status, headers and body), streamed. The request \
            reaches it without `Authorization` and hop-by-hop headers, with `Host: localhost:PORT`. \
            WebSocket (and other) upgrades pass through: 101, then bytes both ways.",
            content_type = "application/octet-stream", body = inline(super::openapi::Binary)),
        (status = 400, description = "Port 0 or not a number (the latter in the web framework's plain text), or a path the guest request cannot carry",
            content((ErrorBody = "application/json"), (String = "text/plain"))),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 431, description = "Request headers over 64 KiB", body = ErrorBody),
        (status = 500, description = "The node failed to reach the guest (the message says why)", body = ErrorBody),
        (status = 502, description = "Nothing listens on the port, or the guest's answer is not HTTP/1.1", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
        (status = 504, description = "The guest did not accept the connection in time", body = ErrorBody),
    ))]
pub async fn proxy(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(at): Path<PortPath>,
    request: Request,
) -> Result<Response, ApiError> {
    let size: usize = request
        .headers()
        .iter()
        .map(|(k, v)| k.as_str().len() + v.len() + 4)
        .sum();
    if size > MAX_HEADER_BYTES {
        return Err(ApiError::new(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "too_large",
            format!("request headers are {size} bytes; at most {MAX_HEADER_BYTES}"),
        ));
    }
    let stream = connect(&state, &tenant.name, &at.id, at.port).await?;
    let (mut sender, conn) = tokio::time::timeout(
        CONNECT_DEADLINE,
        hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_HEADER_BYTES)
            .handshake::<_, Body>(TokioIo::new(stream)),
    )
    .await
    .map_err(|_| timed_out(at.port))?
    .map_err(|e| bad_gateway(at.port, e))?;
    // Owns the connection (and so the sandbox's activity mark) until the exchange is over.
    tokio::spawn(async move {
        if let Err(e) = conn.with_upgrades().await {
            tracing::debug!("proxied connection ended: {e}");
        }
    });
    let (mut client_upgrade, outgoing) = guest_request(request, &at)?;
    let mut answer = sender
        .send_request(outgoing)
        .await
        .map_err(|e| bad_gateway(at.port, e))?;
    if answer.status() == StatusCode::SWITCHING_PROTOCOLS {
        let (Some(client), guest) = (client_upgrade.take(), hyper::upgrade::on(&mut answer)) else {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                "the guest switched protocols on a request that asked for no upgrade",
            ));
        };
        tokio::spawn(async move {
            let (Ok(client), Ok(guest)) = (client.await, guest.await) else {
                return;
            };
            let (mut client, mut guest) = (TokioIo::new(client), TokioIo::new(guest));
            let _ = tokio::io::copy_bidirectional(&mut client, &mut guest).await;
        });
        return Ok(answer.map(|_| Body::empty()));
    }
    let (mut parts, body) = answer.into_parts();
    strip_hop_by_hop(&mut parts.headers, false);
    Ok(Response::from_parts(parts, Body::new(body)))
}

/// `proxy` for `/ports/{port}/`.
pub async fn proxy_root(
    state: State<Arc<AppState>>,
    tenant: Authenticated,
    Path((id, port)): Path<(String, u16)>,
    request: Request,
) -> Result<Response, ApiError> {
    let at = PortPath {
        id,
        port,
        path: String::new(),
    };
    proxy(state, tenant, Path(at), request).await
}

/// The request as the guest gets it, and the client's pending upgrade if it asked for one.
fn guest_request(
    mut request: Request,
    at: &PortPath,
) -> Result<(Option<hyper::upgrade::OnUpgrade>, Request), ApiError> {
    let upgrade = request.headers().get(header::UPGRADE).cloned();
    let client_upgrade = upgrade.is_some().then(|| hyper::upgrade::on(&mut request));
    let query = request
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let uri: Uri = format!("/{}{query}", at.path)
        .parse()
        .map_err(|e| ApiError::invalid(format!("path {:?}: {e}", at.path)))?;
    let (mut parts, body) = request.into_parts();
    parts.uri = uri;
    parts.version = axum::http::Version::HTTP_11;
    parts.extensions = Default::default();
    strip_hop_by_hop(&mut parts.headers, true);
    let host = HeaderValue::from_str(&format!("localhost:{}", at.port)).expect("ascii");
    parts.headers.insert(header::HOST, host);
    if let Some(protocol) = upgrade {
        parts.headers.insert(header::UPGRADE, protocol);
        parts
            .headers
            .insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
    }
    Ok((client_upgrade, Request::from_parts(parts, body)))
}

/// Removes hop-by-hop headers (and those `Connection` names); `to_guest` also removes the
/// tenant's credentials.
pub fn strip_hop_by_hop(headers: &mut HeaderMap, to_guest: bool) {
    let named: Vec<HeaderName> = headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
    if to_guest {
        headers.remove(header::AUTHORIZATION);
    }
}

async fn connect(
    state: &AppState,
    tenant: &str,
    id: &str,
    port: u16,
) -> Result<NodePort, ApiError> {
    match tokio::time::timeout(CONNECT_DEADLINE, state.node.forward(tenant, id, port)).await {
        Ok(result) => Ok(result?),
        Err(_) => Err(timed_out(port)),
    }
}

fn timed_out(port: u16) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        "guest_unresponsive",
        format!("port {port} in the guest did not accept within {CONNECT_DEADLINE:?}"),
    )
}

fn bad_gateway(port: u16, e: hyper::Error) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "bad_gateway",
        format!("port {port} in the guest: {e}"),
    )
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/tunnel/{port}", tag = "ports", operation_id = "tunnelSandboxPort",
    params(
        ("id" = String, Path, description = "Sandbox id"),
        ("port" = u16, Path, description = "TCP port on the guest's loopback"),
    ),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "WebSocket carrying one TCP connection to the port: binary messages are the \
            bytes, both ways (at most 1 MiB per client message, else close 1009). An empty binary message ends \
            that direction (half-close; the server sends one when the guest closes its side); a close frame \
            ends the connection. The server closes once both directions ended."),
        (status = 400, description = "Port 0, or not a WebSocket upgrade request or a port number (those two in the web framework's plain text)",
            content((ErrorBody = "application/json"), (String = "text/plain"))),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "The node failed to reach the guest (the message says why)", body = ErrorBody),
        (status = 502, description = "Nothing listens on the port", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
        (status = 504, description = "The guest did not accept the connection in time", body = ErrorBody),
    ))]
pub async fn tunnel(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, port)): Path<(String, u16)>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Connected before upgrading, so a closed port or a wrong id is a plain error status.
    let stream = connect(&state, &tenant.name, &id, port).await?;
    let upgrade = upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE);
    Ok(upgrade
        .on_upgrade(move |socket| async move {
            if let Err(e) = relay(socket, stream).await {
                tracing::debug!("port tunnel ended: {e}");
            }
        })
        .into_response())
}

/// Copies between the WebSocket and the guest connection until both directions ended. The two
/// directions run independently, so a side that does not read never stops the other one.
async fn relay(socket: WebSocket, stream: NodePort) -> Result<(), axum::Error> {
    let (mut tx, mut rx) = socket.split();
    let (mut from_guest, mut to_guest) = tokio::io::split(stream);
    // Client to guest; false when the client closed or broke the socket (abort everything).
    let upstream = async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Binary(data))) if data.is_empty() => {
                    let _ = to_guest.shutdown().await;
                    return true;
                }
                Some(Ok(Message::Binary(data))) => {
                    if to_guest.write_all(&data).await.is_err() {
                        return true;
                    }
                }
                Some(Ok(Message::Text(_) | Message::Ping(_) | Message::Pong(_))) => {}
                Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
            }
        }
    };
    // Guest to client, ending with an empty message once the guest closed its side.
    let downstream = async {
        let mut buf = vec![0u8; TUNNEL_CHUNK];
        loop {
            match from_guest.read(&mut buf).await {
                Ok(0) | Err(_) => {
                    return tx.send(Message::Binary(Default::default())).await;
                }
                Ok(n) => tx.send(Message::Binary(buf[..n].to_vec().into())).await?,
            }
        }
    };
    let finished = both_ended(upstream, downstream).await?;
    // Dropped without a close when the client aborted: the guest connection is aborted too.
    if finished {
        tx.close().await?;
    }
    Ok(())
}

/// Runs both directions of a tunnel: `Ok(true)` once both ended, `Ok(false)` as soon as
/// `upstream` reports an abort, the error as soon as `downstream` fails.
pub(crate) async fn both_ended<E>(
    upstream: impl std::future::Future<Output = bool>,
    downstream: impl std::future::Future<Output = Result<(), E>>,
) -> Result<bool, E> {
    tokio::pin!(upstream, downstream);
    let (mut up_done, mut down_done) = (false, false);
    while !(up_done && down_done) {
        tokio::select! {
            clean = &mut upstream, if !up_done => {
                if !clean {
                    return Ok(false);
                }
                up_done = true;
            }
            sent = &mut downstream, if !down_done => {
                sent?;
                down_done = true;
            }
        }
    }
    Ok(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn credentials_and_hop_by_hop_headers_do_not_reach_the_guest() {
        let mut headers = HeaderMap::new();
        for (k, v) in [
            ("authorization", "Bearer alice-token"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "hop"),
            ("keep-alive", "timeout=5"),
            ("transfer-encoding", "chunked"),
            ("te", "trailers"),
            ("upgrade", "websocket"),
            ("proxy-authorization", "Basic x"),
            ("content-type", "text/plain"),
            ("x-end-to-end", "kept"),
        ] {
            headers.append(k, HeaderValue::from_static(v));
        }
        let mut answer = headers.clone();
        strip_hop_by_hop(&mut headers, true);
        assert_eq!(names(&headers), ["content-type", "x-end-to-end"]);
        // Answers keep everything end-to-end; there is no credential to drop.
        strip_hop_by_hop(&mut answer, false);
        assert_eq!(
            names(&answer),
            ["authorization", "content-type", "x-end-to-end"]
        );
    }

    fn names(headers: &HeaderMap) -> Vec<&str> {
        let mut names: Vec<_> = headers.keys().map(|k| k.as_str()).collect();
        names.sort();
        names
    }
}
