//! Exposed ports through the real daemon and a real guest: one python sandbox runs a small HTTP
//! server on its loopback (files from /www, POST echoes the request it got, `/upgrade` switches to a
//! line echo). Through `/v1/sandboxes/{id}/ports/8000/...`: a file comes back; a POST body reaches
//! the guest and the guest never sees the tenant's token; an upgrade passes bytes both ways; another
//! tenant gets 404; a closed port is 502 at once. `hearth sandbox port-forward` (the real binary)
//! serves the same file on a local port and stops on Ctrl-C.

#[path = "serve/daemon.rs"]
mod daemon;

use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::time::{Duration, Instant};

use daemon::{hearth, image, Daemon, Home, ALICE, BOB};
use reqwest::Method;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"

[[tenants]]
name = "bob"
token = "bob-token-0002"
"#;

const INDEX: &str = "<h1>hello from the guest</h1>\n";

/// The guest's server: files from /www; POST answers `path=...`, the headers it received
/// (lowercased) and the body; `GET /upgrade` answers 101 and echoes lines.
const SERVER: &str = r#"
import http.server, os
os.makedirs('/www', exist_ok=True)
open('/www/index.html', 'w').write(INDEX)
class H(http.server.SimpleHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def __init__(s, *a, **k):
        super().__init__(*a, directory='/www', **k)
    def do_POST(s):
        body = s.rfile.read(int(s.headers.get('Content-Length') or 0))
        out = ('path=%s\n%s\n' % (s.path, str(s.headers).lower())).encode() + body
        s.send_response(200)
        s.send_header('Content-Length', str(len(out)))
        s.end_headers()
        s.wfile.write(out)
    def do_GET(s):
        if s.path != '/upgrade':
            return super().do_GET()
        s.send_response(101)
        s.send_header('Upgrade', 'echo')
        s.send_header('Connection', 'Upgrade')
        s.end_headers()
        s.wfile.flush()
        while True:
            line = s.rfile.readline()
            if not line:
                break
            s.wfile.write(line)
            s.wfile.flush()
        s.close_connection = True
http.server.ThreadingHTTPServer(('127.0.0.1', 8000), H).serve_forever()
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_ports_are_reachable_through_the_api_and_port_forward_only_by_their_tenant() {
    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &[]);
    let (status, sandbox) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("python")})),
        )
        .await;
    assert_eq!(status, 201, "{sandbox}");
    let id = sandbox["id"].as_str().unwrap().to_owned();

    // The server runs as long as this exec's answer is held open.
    let script = format!("INDEX = {INDEX:?}\n{SERVER}");
    let server = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
        )
        .json(&json!({"argv": ["python3", "-u", "-c", script]}))
        .send()
        .await
        .unwrap();
    assert_eq!(server.status(), 200);

    let ports = format!("/v1/sandboxes/{id}/ports/8000");
    let deadline = Instant::now() + Duration::from_secs(120);
    let page = loop {
        let response = d
            .request(Method::GET, &format!("{ports}/index.html"), Some(ALICE))
            .send()
            .await
            .unwrap();
        if response.status() == 200 {
            break response.text().await.unwrap();
        }
        assert!(
            Instant::now() < deadline,
            "the guest server never answered: {} {}",
            response.status(),
            response.text().await.unwrap()
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert_eq!(page, INDEX);
    // The root path is the guest's `/` (which serves /www/index.html).
    let root = d
        .request(Method::GET, &format!("{ports}/"), Some(ALICE))
        .send()
        .await
        .unwrap();
    assert_eq!(root.status(), 200);
    assert_eq!(root.text().await.unwrap(), INDEX);

    // Attack: read the tenant's bearer token from inside the guest (a guest app logging its
    // requests). The proxy must not pass `Authorization` (nor hop-by-hop headers) on.
    let echoed = d
        .request(Method::POST, &format!("{ports}/echo?x=1"), Some(ALICE))
        .header("x-custom", "kept")
        .header("connection", "x-hop")
        .header("x-hop", "dropped")
        .body("hello guest")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.status(), 200);
    let echoed = echoed.text().await.unwrap();
    assert!(echoed.starts_with("path=/echo?x=1\n"), "{echoed}");
    assert!(echoed.ends_with("hello guest"), "{echoed}");
    assert!(echoed.contains("host: localhost:8000"), "{echoed}");
    assert!(echoed.contains("x-custom: kept"), "{echoed}");
    assert!(!echoed.contains("x-hop"), "{echoed}");
    assert!(!echoed.contains("authorization"), "{echoed}");
    assert!(!echoed.contains(ALICE), "the guest saw the token: {echoed}");

    // An upgrade passes through: 101, then bytes both ways on the same connection.
    let addr = d.url.strip_prefix("http://").unwrap();
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    let head = format!(
        "GET {ports}/upgrade HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {ALICE}\r\n\
         Connection: Upgrade\r\nUpgrade: echo\r\n\r\n"
    );
    raw.write_all(head.as_bytes()).await.unwrap();
    let answer = read_until(&mut raw, b"\r\n\r\n").await;
    assert!(answer.starts_with("HTTP/1.1 101"), "{answer}");
    raw.write_all(b"ping through the upgrade\n").await.unwrap();
    let echo = read_until(&mut raw, b"\n").await;
    assert_eq!(echo, "ping through the upgrade\n");
    drop(raw);

    // Attack: another tenant reaches alice's guest port by guessing the id.
    let (status, body) = d
        .json(Method::GET, &format!("{ports}/index.html"), Some(BOB), None)
        .await;
    assert_eq!(status, 404, "{body}");
    let (status, _) = d
        .json(Method::GET, &format!("{ports}/index.html"), None, None)
        .await;
    assert_eq!(status, 401);

    // Nothing listens on 8001: a clear 502, at once.
    let started = Instant::now();
    let (status, body) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}/ports/8001/"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 502, "{body}");
    assert_eq!(body["code"], "port_closed", "{body}");
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "{:?}",
        started.elapsed()
    );

    // `hearth sandbox port-forward`: a local port to the guest's 8000, until Ctrl-C.
    let mut forward = Reaped(
        hearth(&home)
            .args([
                "sandbox",
                "--host",
                &d.url,
                "--token",
                ALICE,
                "port-forward",
                &id,
                "8000",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    let mut line = String::new();
    BufReader::new(forward.0.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let local = line
        .trim()
        .strip_prefix("forwarding ")
        .and_then(|rest| rest.strip_suffix(&format!(" -> {id}:8000")))
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .to_owned();
    for _ in 0..2 {
        let page = reqwest::get(format!("http://{local}/index.html"))
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert_eq!(page, INDEX);
    }
    // Raw TCP with a half-close: the request, then our write side shut; the whole answer and
    // end of file come back once the guest closes its side.
    let mut raw = tokio::net::TcpStream::connect(&local).await.unwrap();
    raw.write_all(b"GET /index.html HTTP/1.0\r\n\r\n")
        .await
        .unwrap();
    raw.shutdown().await.unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(30), raw.read_to_string(&mut answer))
        .await
        .expect("the tunnel ended")
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(INDEX), "{answer}");

    // SAFETY: kill has no memory-safety preconditions; the pid is our child.
    unsafe { libc::kill(forward.0.id() as i32, libc::SIGINT) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = forward.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "port-forward ignored Ctrl-C");
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status:?}");

    drop(server);
    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert!(status == 200 || status == 204, "{status}");
}

/// A child process killed when dropped (a failed assertion leaves nothing running).
struct Reaped(std::process::Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Reads until `end` has been seen; returns everything read.
async fn read_until(stream: &mut tokio::net::TcpStream, end: &[u8]) -> String {
    let mut got = Vec::new();
    let mut byte = [0u8; 1];
    let read = async {
        while !got.ends_with(end) {
            if stream.read(&mut byte).await.unwrap() == 0 {
                break;
            }
            got.push(byte[0]);
        }
    };
    tokio::time::timeout(Duration::from_secs(30), read)
        .await
        .expect("the answer came");
    String::from_utf8_lossy(&got).into_owned()
}
