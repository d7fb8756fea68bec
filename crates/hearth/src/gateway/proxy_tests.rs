//! [`super::proxy::NodeConnector`] against a real TLS server in this process (the API's own
//! [`crate::serve::tls::TlsListener`]) with certificates made for the test: the request and its
//! body reach the node without the caller's credentials, the answer streams back, and a node whose
//! certificate does not chain to `--node-ca` is refused before anything is sent.

#[path = "../../tests/gateway/pki.rs"]
mod pki;

use axum::body::Body;
use axum::http::{HeaderMap, Request};
use axum::routing::any;
use axum::Router;

use super::proxy::{NodeConnector, ProxyError, ProxyTimeouts};
use crate::serve::tls::{self, ClientTlsFiles, ServerTlsFiles, TlsListener};
use pki::Pki;

/// A TLS "node" that answers every request with its method, path, headers and body.
async fn echo_node(cert: &pki::Issued, client_ca: &Pki) -> String {
    let config = tls::server_config(&ServerTlsFiles {
        cert: cert.cert.clone(),
        key: cert.key.clone(),
        client_ca: Some(client_ca.ca()),
    })
    .unwrap();
    let tcp = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = tcp.local_addr().unwrap();
    let listener = TlsListener::new(tcp, config).unwrap();
    let app = Router::new().fallback(any(
        |headers: HeaderMap, request: Request<Body>| async move {
            let (parts, body) = request.into_parts();
            let body = axum::body::to_bytes(body, 1 << 20).await.unwrap();
            let mut names: Vec<_> = headers.keys().map(|k| k.as_str().to_string()).collect();
            names.sort();
            format!(
                "{} {} [{}] {}",
                parts.method,
                parts.uri,
                names.join(","),
                String::from_utf8_lossy(&body)
            )
        },
    ));
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("https://{addr}")
}

fn connector(node_ca: &Pki, client: &pki::Issued) -> NodeConnector {
    let config = tls::client_config(&ClientTlsFiles {
        server_ca: node_ca.ca(),
        cert: client.cert.clone(),
        key: client.key.clone(),
    })
    .unwrap();
    NodeConnector::new(config, ProxyTimeouts::default())
}

fn request() -> Request<Body> {
    Request::builder()
        .method("PUT")
        .uri("/v1/sandboxes/sbx-1/files?path=/x")
        .header("authorization", "Bearer tenant-secret")
        .header("cookie", "session=1")
        .header("content-type", "application/octet-stream")
        .body(Body::from("file bytes"))
        .unwrap()
}

#[tokio::test]
async fn a_request_reaches_the_node_without_the_callers_credentials() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Pki::new(dir.path(), "cluster");
    let endpoint = echo_node(&cluster.server("node"), &cluster).await;
    let nodes = connector(&cluster, &cluster.client("gateway"));
    let response = nodes
        .forward(&endpoint, "/v1/sandboxes/node-id/files?path=/x", request())
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    let body = axum::body::to_bytes(response.into_body(), 1 << 20)
        .await
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&body),
        "PUT /v1/sandboxes/node-id/files?path=/x [content-length,content-type,host] file bytes"
    );
}

#[tokio::test]
async fn a_node_outside_the_node_ca_is_refused_before_the_request_is_sent() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Pki::new(dir.path(), "cluster");
    let rogue = Pki::new(dir.path(), "rogue");
    let endpoint = echo_node(&rogue.server("node"), &cluster).await;
    let nodes = connector(&cluster, &cluster.client("gateway"));
    let err = nodes
        .forward(&endpoint, "/v1/sandboxes/x/exec", request())
        .await
        .unwrap_err();
    assert!(matches!(err, ProxyError::Tls { .. }), "{err}");
    // And a node that does not take the gateway's certificate: no answer either.
    let strict = echo_node(&cluster.server("node2"), &rogue).await;
    let err = nodes
        .forward(&strict, "/v1/sandboxes/x/exec", request())
        .await
        .unwrap_err();
    assert!(
        matches!(err, ProxyError::Tls { .. } | ProxyError::Http { .. }),
        "{err}"
    );
}

#[tokio::test]
async fn an_unreachable_node_is_a_clear_bad_gateway() {
    let dir = tempfile::tempdir().unwrap();
    let cluster = Pki::new(dir.path(), "cluster");
    let nodes = connector(&cluster, &cluster.client("gateway"));
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let err = nodes
        .forward(&format!("https://127.0.0.1:{port}"), "/v1/x", request())
        .await
        .unwrap_err();
    let api: crate::serve::error::ApiError = err.into();
    assert_eq!(api.status, 502);
    assert!(
        api.message.contains("connecting to the node"),
        "{}",
        api.message
    );
}
