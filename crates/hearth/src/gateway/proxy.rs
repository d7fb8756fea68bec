//! The gateway's hop to a node: one request forwarded, streaming both ways, to a node API over
//! mutual TLS ([`NodeConnector::forward`]). Bodies are never buffered (exec's NDJSON, file uploads
//! and downloads, port proxies flow through as they come); a WebSocket (or any HTTP/1.1 upgrade)
//! the node accepts becomes a byte pipe between the client and the node. Connecting, the TLS
//! handshake and the node's response headers each have a deadline, the node's response headers are
//! bounded, and the client's credentials (`Authorization`, cookies) never reach the node: the
//! gateway authenticates there with its own certificate.
//!
//! One connection per request (no pool): a TLS handshake costs about a millisecond on a LAN, and
//! nothing is shared between requests of different tenants.

use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Request, Response, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use crate::serve::error::ApiError;

/// Deadlines of the hop to a node.
#[derive(Debug, Clone, Copy)]
pub struct ProxyTimeouts {
    /// TCP connect (name lookup included).
    pub connect: Duration,
    /// TLS handshake.
    pub handshake: Duration,
    /// From the request sent until the node's response headers (exec and downloads answer
    /// headers at once and stream after).
    pub response_headers: Duration,
}

impl Default for ProxyTimeouts {
    fn default() -> Self {
        ProxyTimeouts {
            connect: Duration::from_secs(5),
            handshake: Duration::from_secs(10),
            response_headers: Duration::from_secs(60),
        }
    }
}

/// Largest response head (status line and headers) taken from a node.
const MAX_RESPONSE_HEAD: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("node endpoint {0:?} is not https://HOST:PORT")]
    BadEndpoint(String),
    #[error("connecting to the node at {endpoint}: {source}")]
    Connect {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("TLS with the node at {endpoint}: {source}")]
    Tls {
        endpoint: String,
        source: std::io::Error,
    },
    #[error("the node at {endpoint} did not answer within {after:?} ({what})")]
    Timeout {
        endpoint: String,
        what: &'static str,
        after: Duration,
    },
    #[error("HTTP with the node at {endpoint}: {source}")]
    Http {
        endpoint: String,
        source: hyper::Error,
    },
}

impl From<ProxyError> for ApiError {
    fn from(e: ProxyError) -> ApiError {
        let status = match e {
            ProxyError::Timeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            _ => StatusCode::BAD_GATEWAY,
        };
        ApiError::new(status, "node_unreachable", e.to_string())
    }
}

/// Opens mutual-TLS connections to node APIs.
#[derive(Clone)]
pub struct NodeConnector {
    tls: TlsConnector,
    timeouts: ProxyTimeouts,
}

/// Request headers that describe one hop, not the request (RFC 9110 section 7.6.1), and the
/// client's credentials for the gateway.
const DROPPED_REQUEST_HEADERS: &[HeaderName] = &[
    header::CONNECTION,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHORIZATION,
    header::AUTHORIZATION,
    header::COOKIE,
    header::HOST,
    header::FORWARDED,
];

const DROPPED_RESPONSE_HEADERS: &[HeaderName] = &[
    header::CONNECTION,
    header::UPGRADE,
    header::TRAILER,
    header::TRANSFER_ENCODING,
    header::PROXY_AUTHENTICATE,
    header::SET_COOKIE,
];

impl NodeConnector {
    pub fn new(config: Arc<rustls::ClientConfig>, timeouts: ProxyTimeouts) -> NodeConnector {
        NodeConnector {
            tls: TlsConnector::from(config),
            timeouts,
        }
    }

    /// Sends `request` to `endpoint` (`https://host:port`) at `path_and_query` and returns the
    /// node's response, its body streaming. An upgrade the node accepts (101) is spliced to the
    /// client's connection in the background.
    pub async fn forward(
        &self,
        endpoint: &str,
        path_and_query: &str,
        mut request: Request<Body>,
    ) -> Result<Response<Body>, ProxyError> {
        let (host, port) = parse_endpoint(endpoint)?;
        let client_upgrade = wants_upgrade(request.headers())
            .then(|| {
                request
                    .extensions_mut()
                    .remove::<hyper::upgrade::OnUpgrade>()
            })
            .flatten();
        let endpoint_owned = endpoint.to_string();
        let t = self.timeouts;
        let timeout = |what, after| ProxyError::Timeout {
            endpoint: endpoint_owned.clone(),
            what,
            after,
        };
        let tcp = tokio::time::timeout(t.connect, TcpStream::connect((host.as_str(), port)))
            .await
            .map_err(|_| timeout("connect", t.connect))?
            .map_err(|source| ProxyError::Connect {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']'))
            .map_err(|_| ProxyError::BadEndpoint(endpoint.to_string()))?
            .to_owned();
        let tls = tokio::time::timeout(t.handshake, self.tls.connect(name, tcp))
            .await
            .map_err(|_| timeout("TLS handshake", t.handshake))?
            .map_err(|source| ProxyError::Tls {
                endpoint: endpoint.to_string(),
                source,
            })?;
        let http = |source| ProxyError::Http {
            endpoint: endpoint.to_string(),
            source,
        };
        let (mut sender, connection) = hyper::client::conn::http1::Builder::new()
            .max_buf_size(MAX_RESPONSE_HEAD)
            .handshake::<_, Body>(TokioIo::new(tls))
            .await
            .map_err(http)?;
        tokio::spawn(async move {
            if let Err(e) = connection.with_upgrades().await {
                tracing::debug!("gateway connection to a node ended: {e}");
            }
        });

        let (parts, body) = request.into_parts();
        let mut outbound = Request::builder()
            .method(parts.method)
            .uri(
                Uri::try_from(path_and_query)
                    .map_err(|_| ProxyError::BadEndpoint(format!("{endpoint}{path_and_query}")))?,
            )
            .body(body)
            .expect("method and URI are valid");
        let headers = outbound.headers_mut();
        copy_headers(&parts.headers, headers, DROPPED_REQUEST_HEADERS);
        headers.insert(
            header::HOST,
            HeaderValue::from_str(&format!("{host}:{port}"))
                .map_err(|_| ProxyError::BadEndpoint(endpoint.to_string()))?,
        );
        if client_upgrade.is_some() {
            headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = parts.headers.get(header::UPGRADE) {
                headers.insert(header::UPGRADE, protocol.clone());
            }
        }

        let mut response = tokio::time::timeout(t.response_headers, sender.send_request(outbound))
            .await
            .map_err(|_| timeout("response headers", t.response_headers))?
            .map_err(http)?;

        if response.status() == StatusCode::SWITCHING_PROTOCOLS {
            let node_upgrade = hyper::upgrade::on(&mut response);
            let mut answer = Response::builder().status(StatusCode::SWITCHING_PROTOCOLS);
            let out = answer.headers_mut().expect("builder is fine");
            copy_headers(response.headers(), out, DROPPED_RESPONSE_HEADERS);
            out.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
            if let Some(protocol) = response.headers().get(header::UPGRADE) {
                out.insert(header::UPGRADE, protocol.clone());
            }
            match client_upgrade {
                Some(client_upgrade) => {
                    tokio::spawn(splice(client_upgrade, node_upgrade));
                    return Ok(answer.body(Body::empty()).expect("valid response"));
                }
                // The node switched protocols the client never asked for: refuse it.
                None => {
                    return Err(ProxyError::BadEndpoint(format!(
                        "{endpoint}: unexpected protocol switch"
                    )))
                }
            }
        }
        let (parts, body) = response.into_parts();
        let mut answer = Response::builder().status(parts.status);
        copy_headers(
            &parts.headers,
            answer.headers_mut().expect("builder is fine"),
            DROPPED_RESPONSE_HEADERS,
        );
        Ok(answer.body(Body::new(body)).expect("valid response"))
    }
}

/// Joins the client's upgraded connection to the node's, byte for byte, until either side ends.
async fn splice(client: hyper::upgrade::OnUpgrade, node: hyper::upgrade::OnUpgrade) {
    let (client, node) = match tokio::try_join!(client, node) {
        Ok(both) => both,
        Err(e) => {
            tracing::debug!("a proxied upgrade failed: {e}");
            return;
        }
    };
    let (mut client, mut node) = (TokioIo::new(client), TokioIo::new(node));
    if let Err(e) = tokio::io::copy_bidirectional(&mut client, &mut node).await {
        tracing::debug!("a proxied WebSocket ended: {e}");
    }
}

fn wants_upgrade(headers: &HeaderMap) -> bool {
    headers.contains_key(header::UPGRADE)
        && headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
}

/// Copies `from` into `to`, less `dropped` and whatever `Connection` names as hop-by-hop.
fn copy_headers(from: &HeaderMap, to: &mut HeaderMap, dropped: &[HeaderName]) {
    let named_by_connection: Vec<String> = from
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .collect();
    for (name, value) in from {
        if dropped.contains(name)
            || name.as_str() == "keep-alive"
            || name.as_str().starts_with("proxy-")
            || named_by_connection.iter().any(|n| n == name.as_str())
        {
            continue;
        }
        to.append(name.clone(), value.clone());
    }
}

/// Whether `rest` (the raw path after `/v1/sandboxes/{id}/`) may be appended to the node's path
/// for the sandbox: no dot segments, plain or percent-encoded, so that nothing on the way can
/// resolve it to another sandbox's path.
pub fn is_plain_rest(rest: &str) -> bool {
    rest.split('/').all(|segment| {
        let decoded = segment.to_ascii_lowercase().replace("%2e", ".");
        decoded != "." && decoded != ".." && !decoded.contains("%2f") && !decoded.contains("%5c")
    })
}

/// `https://host:port` -> (host, port); IPv6 hosts keep their brackets.
fn parse_endpoint(endpoint: &str) -> Result<(String, u16), ProxyError> {
    let bad = || ProxyError::BadEndpoint(endpoint.to_string());
    let uri: Uri = endpoint.parse().map_err(|_| bad())?;
    if uri.scheme_str() != Some("https") {
        return Err(bad());
    }
    let authority = uri.authority().ok_or_else(bad)?;
    if authority.as_str().contains('@') {
        return Err(bad());
    }
    let port = authority.port_u16().unwrap_or(443);
    Ok((authority.host().to_string(), port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_must_be_https_without_credentials() {
        assert_eq!(
            parse_endpoint("https://10.0.0.1:8443").unwrap(),
            ("10.0.0.1".into(), 8443)
        );
        assert_eq!(
            parse_endpoint("https://[::1]:9").unwrap(),
            ("[::1]".into(), 9)
        );
        for bad in ["http://10.0.0.1:1", "https://u:p@h:1", "10.0.0.1:8443", ""] {
            assert!(parse_endpoint(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn dot_segments_never_reach_a_node() {
        for ok in [
            "exec",
            "exec/ws",
            "ports/8080/",
            "ports/8080/a/b.css",
            "files",
            "tunnel/22",
        ] {
            assert!(is_plain_rest(ok), "{ok}");
        }
        for bad in [
            "../other/exec",
            "ports/80/../../../x/exec",
            "%2e%2E/x/exec",
            "./exec",
            "ports/80/a%2F..%2Fb",
            "ports/80/%5c..",
        ] {
            assert!(!is_plain_rest(bad), "{bad}");
        }
    }

    #[test]
    fn credentials_and_hop_by_hop_headers_stay_behind() {
        let mut from = HeaderMap::new();
        from.insert(
            header::AUTHORIZATION,
            "Bearer tenant-secret".parse().unwrap(),
        );
        from.insert(header::COOKIE, "a=b".parse().unwrap());
        from.insert(header::CONNECTION, "keep-alive, x-private".parse().unwrap());
        from.insert("x-private", "1".parse().unwrap());
        from.insert(header::CONTENT_TYPE, "application/json".parse().unwrap());
        from.insert("sec-websocket-key", "k".parse().unwrap());
        let mut to = HeaderMap::new();
        copy_headers(&from, &mut to, DROPPED_REQUEST_HEADERS);
        let names: Vec<_> = to.keys().map(|k| k.as_str().to_string()).collect();
        assert_eq!(names, vec!["content-type", "sec-websocket-key"]);
    }
}
