//! A small fault-injecting HTTP/1.1 proxy in front of the real test registry: per-path status
//! failures, connection resets, stalls, truncation and corruption of response bodies, and a
//! registry-style auth front (Bearer token endpoint or Basic). One request per connection.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

#[derive(Clone, Debug)]
pub enum Fault {
    /// Answer the first `times` matching requests with this status.
    Status { code: u16, times: usize },
    /// Send the head and `bytes` of the body, then reset the connection; `times` times.
    ResetAfter { bytes: usize, times: usize },
    /// Send the head and `bytes` of the body, then go silent for `stall` and close; `times` times.
    StallAfter {
        bytes: usize,
        stall: Duration,
        times: usize,
    },
    /// Send the head and at most `bytes` of the body, then close cleanly; every time.
    Truncate { bytes: usize },
    /// Flip the body byte at `at`; every time.
    Corrupt { at: usize },
}

#[derive(Clone, Debug)]
pub enum Auth {
    /// `/v2/` wants `Bearer <token>`; the token endpoint (`/token`) wants these Basic credentials.
    Bearer {
        token: String,
        user: String,
        pass: String,
    },
    Basic {
        user: String,
        pass: String,
    },
}

#[derive(Default)]
pub struct State {
    faults: Vec<(String, Fault)>,
    auth: Option<Auth>,
    /// "METHOD path range=... -> outcome" per request.
    pub log: Vec<String>,
}

pub struct FaultProxy {
    pub addr: String,
    pub state: Arc<Mutex<State>>,
}

impl FaultProxy {
    pub async fn start(upstream: &str) -> FaultProxy {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let state = Arc::new(Mutex::new(State::default()));
        let (upstream, st, me) = (upstream.to_string(), state.clone(), addr.clone());
        tokio::spawn(async move {
            loop {
                let Ok((conn, _)) = listener.accept().await else {
                    return;
                };
                let (upstream, st, me) = (upstream.clone(), st.clone(), me.clone());
                tokio::spawn(async move {
                    let _ = handle(conn, &upstream, &st, &me).await;
                });
            }
        });
        FaultProxy { addr, state }
    }

    /// Applies `fault` to requests whose path contains `path_part`.
    pub fn fault(&self, path_part: &str, fault: Fault) {
        self.state
            .lock()
            .unwrap()
            .faults
            .push((path_part.to_string(), fault));
    }

    pub fn auth(&self, auth: Auth) {
        self.state.lock().unwrap().auth = Some(auth);
    }

    pub fn log(&self) -> Vec<String> {
        self.state.lock().unwrap().log.clone()
    }
}

pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub async fn read_request(conn: &mut TcpStream) -> std::io::Result<Request> {
    let mut buf = Vec::new();
    let mut byte = [0u8; 1024];
    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
        let n = conn.read(&mut byte).await?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        buf.extend_from_slice(&byte[..n]);
    }
    let text = String::from_utf8_lossy(&buf).into_owned();
    let mut lines = text.split("\r\n");
    let first: Vec<&str> = lines.next().unwrap_or("").split(' ').collect();
    let headers = lines
        .take_while(|l| !l.is_empty())
        .filter_map(|l| {
            l.split_once(':')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        })
        .collect();
    Ok(Request {
        method: first[0].to_string(),
        path: first.get(1).unwrap_or(&"/").to_string(),
        headers,
    })
}

async fn respond(
    conn: &mut TcpStream,
    status: u16,
    extra: &str,
    body: &str,
) -> std::io::Result<()> {
    let head = format!(
        "HTTP/1.1 {status} X\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
        body.len()
    );
    conn.write_all(head.as_bytes()).await?;
    conn.write_all(body.as_bytes()).await?;
    conn.shutdown().await
}

async fn handle(
    mut conn: TcpStream,
    upstream: &str,
    state: &Mutex<State>,
    me: &str,
) -> std::io::Result<()> {
    let req = read_request(&mut conn).await?;
    let entry = format!(
        "{} {} range={}",
        req.method,
        req.path,
        req.header("range").unwrap_or("-")
    );
    let log = |outcome: &str| {
        state
            .lock()
            .unwrap()
            .log
            .push(format!("{entry} -> {outcome}"))
    };
    let auth = state.lock().unwrap().auth.clone();
    let basic = |user: &str, pass: &str| {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(format!("{user}:{pass}"))
        )
    };
    if req.path.starts_with("/token") {
        if let Some(Auth::Bearer { token, user, pass }) = &auth {
            if req.header("authorization") == Some(basic(user, pass).as_str()) {
                log("token");
                return respond(
                    &mut conn,
                    200,
                    "Content-Type: application/json\r\n",
                    &format!("{{\"token\":\"{token}\"}}"),
                )
                .await;
            }
        }
        log("token denied");
        return respond(&mut conn, 401, "", "{}").await;
    }
    match &auth {
        Some(Auth::Bearer { token, .. })
            if req.header("authorization") != Some(format!("Bearer {token}").as_str()) =>
        {
            log("401 bearer");
            let challenge = format!(
                "WWW-Authenticate: Bearer realm=\"http://{me}/token\",service=\"test\"\r\n"
            );
            return respond(&mut conn, 401, &challenge, "{}").await;
        }
        Some(Auth::Basic { user, pass })
            if req.header("authorization") != Some(basic(user, pass).as_str()) =>
        {
            log("401 basic");
            return respond(
                &mut conn,
                401,
                "WWW-Authenticate: Basic realm=\"test\"\r\n",
                "{}",
            )
            .await;
        }
        _ => {}
    }
    let fault = {
        let mut st = state.lock().unwrap();
        let mut chosen = None;
        for (part, fault) in st.faults.iter_mut() {
            if !req.path.contains(part.as_str()) {
                continue;
            }
            let left = match fault {
                Fault::Status { times, .. }
                | Fault::ResetAfter { times, .. }
                | Fault::StallAfter { times, .. } => Some(times),
                Fault::Truncate { .. } | Fault::Corrupt { .. } => None,
            };
            match left {
                Some(0) => continue,
                Some(n) => *n -= 1,
                None => {}
            }
            chosen = Some(fault.clone());
            break;
        }
        chosen
    };
    if let Some(Fault::Status { code, .. }) = fault {
        log(&format!("injected {code}"));
        return respond(&mut conn, code, "", "injected failure").await;
    }
    // Forward, one request per upstream connection.
    let mut up = TcpStream::connect(upstream).await?;
    let mut head = format!(
        "{} {} HTTP/1.1\r\nHost: {upstream}\r\nConnection: close\r\n",
        req.method, req.path
    );
    for (k, v) in &req.headers {
        if !["host", "connection", "authorization"].contains(&k.to_ascii_lowercase().as_str()) {
            head.push_str(&format!("{k}: {v}\r\n"));
        }
    }
    head.push_str("\r\n");
    up.write_all(head.as_bytes()).await?;
    let mut response = Vec::new();
    up.read_to_end(&mut response).await?;
    let split = response
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|p| p + 4)
        .unwrap_or(response.len());
    let (head, body) = response.split_at(split);
    let mut body = body.to_vec();
    conn.write_all(head).await?;
    match fault {
        Some(Fault::ResetAfter { bytes, .. }) => {
            conn.write_all(&body[..bytes.min(body.len())]).await?;
            log("reset");
            // Zero linger turns the close into a reset (and does not block).
            #[allow(deprecated)]
            conn.set_linger(Some(Duration::ZERO))?;
            drop(conn);
            return Ok(());
        }
        Some(Fault::StallAfter { bytes, stall, .. }) => {
            conn.write_all(&body[..bytes.min(body.len())]).await?;
            log("stall");
            tokio::time::sleep(stall).await;
            return Ok(());
        }
        Some(Fault::Truncate { bytes }) => {
            conn.write_all(&body[..bytes.min(body.len())]).await?;
            log("truncated");
            return conn.shutdown().await;
        }
        Some(Fault::Corrupt { at }) if at < body.len() => {
            body[at] ^= 0xff;
            log("corrupted");
        }
        _ => log("forwarded"),
    }
    conn.write_all(&body).await?;
    conn.shutdown().await
}
