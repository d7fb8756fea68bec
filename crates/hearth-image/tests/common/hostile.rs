//! A tiny hostile registry on 127.0.0.1: each request (one per connection) is recorded with its
//! `Authorization` header and answered by a test-supplied function: fixed answers, endless bodies,
//! or bodies dripped a byte at a time.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};

use super::proxy::read_request;

/// One request the server received.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: String,
    pub path: String,
    pub authorization: Option<String>,
}

pub enum Reply {
    /// Status, extra header lines (`Name: value`), body.
    Fixed(u16, Vec<String>, Vec<u8>),
    /// Status, extra headers, then `chunk` repeated until the client goes away.
    Endless(u16, Vec<String>, Vec<u8>),
    /// Status, extra headers, a declared length of `len` bytes sent one byte per `every`.
    Drip(u16, Vec<String>, usize, Duration),
}

type Handler = dyn Fn(&Seen, &str) -> Reply + Send + Sync;

pub struct Hostile {
    pub addr: String,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Hostile {
    /// Starts the server; `handler` gets the request and the server's own `host:port`.
    pub async fn start(handler: impl Fn(&Seen, &str) -> Reply + Send + Sync + 'static) -> Hostile {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let handler: Arc<Handler> = Arc::new(handler);
        let (me, log) = (addr.clone(), seen.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (me, log, handler) = (me.clone(), log.clone(), handler.clone());
                tokio::spawn(async move {
                    let _ = serve(conn, &me, &log, &*handler).await;
                });
            }
        });
        Hostile { addr, seen }
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().unwrap().clone()
    }
}

async fn serve(
    mut conn: TcpStream,
    me: &str,
    log: &Mutex<Vec<Seen>>,
    handler: &Handler,
) -> std::io::Result<()> {
    let req = read_request(&mut conn).await?;
    let seen = Seen {
        method: req.method.clone(),
        path: req.path.clone(),
        authorization: req.header("authorization").map(str::to_string),
    };
    log.lock().unwrap().push(seen.clone());
    let head = |status: u16, headers: &[String], len: Option<usize>| {
        let mut h = format!("HTTP/1.1 {status} X\r\nConnection: close\r\n");
        if let Some(n) = len {
            h.push_str(&format!("Content-Length: {n}\r\n"));
        }
        for line in headers {
            h.push_str(line);
            h.push_str("\r\n");
        }
        h.push_str("\r\n");
        h
    };
    match handler(&seen, me) {
        Reply::Fixed(status, headers, body) => {
            conn.write_all(head(status, &headers, Some(body.len())).as_bytes())
                .await?;
            if req.method != "HEAD" {
                conn.write_all(&body).await?;
            }
        }
        Reply::Endless(status, headers, chunk) => {
            conn.write_all(head(status, &headers, None).as_bytes())
                .await?;
            loop {
                conn.write_all(&chunk).await?;
            }
        }
        Reply::Drip(status, headers, len, every) => {
            conn.write_all(head(status, &headers, Some(len)).as_bytes())
                .await?;
            for _ in 0..len {
                conn.write_all(b" ").await?;
                tokio::time::sleep(every).await;
            }
        }
    }
    conn.shutdown().await
}

/// A 401 asking for Basic credentials, to collect whatever the client sends.
pub fn basic_challenge(_: &Seen, _: &str) -> Reply {
    Reply::Fixed(
        401,
        vec!["WWW-Authenticate: Basic realm=\"x\"".into()],
        b"{}".to_vec(),
    )
}

/// The `Authorization` headers among `seen`.
pub fn authorizations(seen: &[Seen]) -> Vec<String> {
    seen.iter()
        .filter_map(|s| s.authorization.clone())
        .collect()
}

/// Plain HTTP to `insecure`, one try per request, short stalls, a 20 s deadline; the CLI's
/// permissive mode, the Docker config read as by default.
pub fn plain_http_opts(insecure: &[&str]) -> hearth_image::PullOptions {
    hearth_image::PullOptions {
        insecure_registries: insecure.iter().map(|s| s.to_string()).collect(),
        retry: hearth_image::RetryPolicy {
            attempts: 1,
            stall_timeout: Duration::from_secs(5),
            ..hearth_image::RetryPolicy::default()
        },
        deadline: Duration::from_secs(20),
        ..hearth_image::PullOptions::default()
    }
}

/// Pulls `reference` into a fresh home; the error text, which must come within `within`.
pub async fn pull_err(
    reference: &str,
    opts: &hearth_image::PullOptions,
    within: Duration,
) -> String {
    let home = tempfile::tempdir().unwrap();
    let t0 = std::time::Instant::now();
    let err = hearth_image::ImageStore::open(home.path())
        .unwrap()
        .ensure(reference, opts)
        .await
        .expect_err("the pull must fail")
        .to_string();
    eprintln!("{reference}: {err}");
    assert!(
        t0.elapsed() < within,
        "took {:?} (limit {within:?}): {err}",
        t0.elapsed()
    );
    err
}
