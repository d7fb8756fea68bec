//! The webhook's HTTPS server (served by `hearth operator --webhook-listen`): `POST /validate` takes an
//! `AdmissionReview` from the API server and answers with [`review`]'s verdict; `GET /healthz` and
//! `GET /readyz` answer `ok` for the operator's probes, `GET /metrics` counts reviews (Prometheus text).
//! TLS (rustls, ring) with the certificate and key
//! from PEM files, re-read when the files change (a rotated Secret takes effect without a restart).
//!
//! Everything a peer sends is bounded: the TLS handshake and each request's head and body must arrive
//! within [`IO_TIMEOUT`], bodies are at most [`MAX_BODY`], at most [`MAX_CONNECTIONS`] connections are
//! served at once (more wait in the kernel's backlog), and a connection lives at most [`MAX_CONN_LIFE`].

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;

use super::decide::review;
use super::identity::NodeIdentities;
use super::review::{AdmissionReview, AdmissionReviewResponse};

/// Largest `AdmissionReview` read: an old and a new object of at most etcd's 1.5 MiB each, with room.
pub const MAX_BODY: usize = 4 << 20;
/// Time allowed for a TLS handshake, a request head, or a request body.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Longest life of one connection (the API server reconnects).
pub const MAX_CONN_LIFE: Duration = Duration::from_secs(600);
/// How often the certificate files' modification times are checked.
const RELOAD_CHECK: Duration = Duration::from_secs(10);

/// What can stop the webhook server from starting.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("binding the webhook listener on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("reading webhook TLS material {path}: {message}")]
    Pem { path: PathBuf, message: String },
    #[error("webhook TLS certificate and key: {0}")]
    Tls(#[from] rustls::Error),
}

/// Where and how to serve.
#[derive(Debug, Clone)]
pub struct WebhookConfig {
    pub listen: SocketAddr,
    /// PEM certificate chain (leaf first) the API server verifies against the webhook's `caBundle`.
    pub cert: PathBuf,
    /// PEM private key of `cert`.
    pub key: PathBuf,
    pub identities: NodeIdentities,
}

/// A bound webhook server; [`WebhookServer::run`] serves it.
pub struct WebhookServer {
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
}

/// What every connection shares: who the nodes are, and the counters `/metrics` shows.
struct State {
    identities: NodeIdentities,
    allowed: AtomicU64,
    denied: AtomicU64,
    malformed: AtomicU64,
}

impl WebhookServer {
    /// Loads the certificate and key and binds the listener (so the address is known before serving).
    pub async fn bind(config: WebhookConfig) -> Result<Self, WebhookError> {
        let resolver = Arc::new(ReloadingCert::load(config.cert, config.key)?);
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut tls = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_cert_resolver(resolver);
        tls.alpn_protocols = vec![b"http/1.1".to_vec()];
        let listener =
            TcpListener::bind(config.listen)
                .await
                .map_err(|source| WebhookError::Bind {
                    addr: config.listen,
                    source,
                })?;
        Ok(WebhookServer {
            listener,
            acceptor: TlsAcceptor::from(Arc::new(tls)),
            state: Arc::new(State {
                identities: config.identities,
                allowed: AtomicU64::new(0),
                denied: AtomicU64::new(0),
                malformed: AtomicU64::new(0),
            }),
        })
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `stop` completes; connections in flight are dropped then.
    pub async fn run(self, stop: impl Future<Output = ()>) {
        let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
        let mut connections = tokio::task::JoinSet::new();
        tokio::pin!(stop);
        loop {
            let permit = tokio::select! {
                _ = &mut stop => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let (tcp, peer) = tokio::select! {
                _ = &mut stop => break,
                accepted = self.listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!("webhook accept: {e}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            while connections.try_join_next().is_some() {}
            let acceptor = self.acceptor.clone();
            let state = self.state.clone();
            connections.spawn(async move {
                let _permit = permit;
                let served =
                    tokio::time::timeout(MAX_CONN_LIFE, serve_connection(tcp, acceptor, state));
                if let Ok(Err(e)) = served.await {
                    tracing::debug!(%peer, "webhook connection: {e}");
                }
            });
        }
        connections.shutdown().await;
    }
}

async fn serve_connection(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    state: Arc<State>,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>> {
    let tls = tokio::time::timeout(IO_TIMEOUT, acceptor.accept(tcp)).await??;
    let service = hyper::service::service_fn(move |req| {
        let state = state.clone();
        async move { Ok::<_, std::convert::Infallible>(route(req, &state).await) }
    });
    hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(IO_TIMEOUT)
        .max_buf_size(64 * 1024)
        .serve_connection(TokioIo::new(tls), service)
        .await?;
    Ok(())
}

async fn route(req: Request<Incoming>, state: &State) -> Response<Full<Bytes>> {
    match (req.method(), req.uri().path()) {
        (&Method::GET, "/healthz" | "/readyz") => plain(StatusCode::OK, "ok"),
        (&Method::GET, "/metrics") => plain(StatusCode::OK, &metrics(state)),
        (&Method::POST, "/validate") => {
            let (counter, response) = match validate(req, &state.identities).await {
                Ok((true, r)) => (&state.allowed, r),
                Ok((false, r)) => (&state.denied, r),
                Err(r) => (&state.malformed, r),
            };
            counter.fetch_add(1, Ordering::Relaxed);
            response
        }
        _ => plain(StatusCode::NOT_FOUND, "not found"),
    }
}

fn metrics(state: &State) -> String {
    let n = |c: &AtomicU64| c.load(Ordering::Relaxed);
    format!(
        "# HELP hearth_admission_reviews_total Admission reviews answered, by verdict.\n\
         # TYPE hearth_admission_reviews_total counter\n\
         hearth_admission_reviews_total{{verdict=\"allowed\"}} {}\n\
         hearth_admission_reviews_total{{verdict=\"denied\"}} {}\n\
         hearth_admission_reviews_total{{verdict=\"malformed\"}} {}\n",
        n(&state.allowed),
        n(&state.denied),
        n(&state.malformed)
    )
}

/// Reads and answers one `AdmissionReview`: `Ok((allowed, answer))`. A body that is too big, too slow
/// or not a v1 review is `Err(400)`: the API server counts that as a webhook failure and, with
/// `failurePolicy: Fail`, refuses the request.
async fn validate(
    req: Request<Incoming>,
    ids: &NodeIdentities,
) -> Result<(bool, Response<Full<Bytes>>), Response<Full<Bytes>>> {
    let bad = |why: String| plain(StatusCode::BAD_REQUEST, &why);
    let body = Limited::new(req.into_body(), MAX_BODY).collect();
    let bytes = match tokio::time::timeout(IO_TIMEOUT, body).await {
        Ok(Ok(collected)) => collected.to_bytes(),
        Ok(Err(e)) => return Err(bad(format!("reading body: {e}"))),
        Err(_) => return Err(bad("body not received in time".into())),
    };
    let review_in: AdmissionReview =
        serde_json::from_slice(&bytes).map_err(|e| bad(format!("not an AdmissionReview: {e}")))?;
    let request = match review_in.request {
        Some(r) if review_in.api_version == "admission.k8s.io/v1" => r,
        _ => return Err(bad("expected an admission.k8s.io/v1 request".into())),
    };
    let verdict = review(ids, &request);
    if let Err(why) = &verdict {
        tracing::info!(user = %request.user_info.username, "admission denied: {why}");
    }
    let allowed = verdict.is_ok();
    let answer = AdmissionReviewResponse::new(request.uid, verdict);
    let json = serde_json::to_vec(&answer).expect("a response serialises");
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(json)))
        .expect("static response parts");
    Ok((allowed, response))
}

fn plain(status: StatusCode, text: &str) -> Response<Full<Bytes>> {
    Response::builder()
        .status(status)
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from(text.to_string())))
        .expect("static response parts")
}

/// The serving certificate, re-read from its files when their modification time changes (checked at
/// most every [`RELOAD_CHECK`]); a bad new pair is logged and the old one kept.
#[derive(Debug)]
struct ReloadingCert {
    cert: PathBuf,
    key: PathBuf,
    current: Mutex<Current>,
}

#[derive(Debug)]
struct Current {
    key: Arc<CertifiedKey>,
    stamp: Option<(SystemTime, SystemTime)>,
    checked: std::time::Instant,
}

impl ReloadingCert {
    fn load(cert: PathBuf, key: PathBuf) -> Result<Self, WebhookError> {
        let stamp = stamps(&cert, &key);
        let certified = Arc::new(certified_key(&cert, &key)?);
        Ok(ReloadingCert {
            cert,
            key,
            current: Mutex::new(Current {
                key: certified,
                stamp,
                checked: std::time::Instant::now(),
            }),
        })
    }
}

impl ResolvesServerCert for ReloadingCert {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let mut cur = self.current.lock().unwrap_or_else(|e| e.into_inner());
        if cur.checked.elapsed() >= RELOAD_CHECK {
            cur.checked = std::time::Instant::now();
            let stamp = stamps(&self.cert, &self.key);
            if stamp != cur.stamp {
                match certified_key(&self.cert, &self.key) {
                    Ok(k) => {
                        tracing::info!(cert = %self.cert.display(), "webhook certificate reloaded");
                        cur.key = Arc::new(k);
                        cur.stamp = stamp;
                    }
                    Err(e) => tracing::warn!("webhook certificate not reloaded: {e}"),
                }
            }
        }
        Some(cur.key.clone())
    }
}

fn stamps(cert: &Path, key: &Path) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(cert)?, m(key)?))
}

fn certified_key(cert: &Path, key: &Path) -> Result<CertifiedKey, WebhookError> {
    let pem_err = |path: &Path, message: String| WebhookError::Pem {
        path: path.to_path_buf(),
        message,
    };
    let chain = CertificateDer::pem_file_iter(cert)
        .map_err(|e| pem_err(cert, e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(pem_err(cert, "no certificate in it".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| pem_err(key, e.to_string()))?;
    let provider = rustls::crypto::ring::default_provider();
    Ok(CertifiedKey::from_der(chain, private, &provider)?)
}
