//! A hostile API tenant against the real `hearth serve` (issue #12, items 1, 5 and 6): each test
//! performs the attack over real HTTP and WebSockets and fails if the hole comes back. Host paths
//! named as images, oversized and flooding WebSocket stdin (one real VM, shared), and tokens files
//! the daemon must refuse at start.

#[path = "serve/daemon.rs"]
mod daemon;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::Stdio;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine;
use daemon::{hearth, image, Daemon, Home, ALICE};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::Message;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

/// POSTs `image` to `/v1/sandboxes` (not waiting for the boot) and to `/v1/runs`; both answers,
/// each within 10 s (a FIFO opened by the daemon would hang).
async fn create_and_run(d: &Daemon, image: &str) -> [(u16, Value); 2] {
    let within = |f| tokio::time::timeout(Duration::from_secs(10), f);
    let create = within(d.json(
        Method::POST,
        "/v1/sandboxes",
        Some(ALICE),
        Some(json!({"image": image, "wait": false})),
    ))
    .await
    .unwrap_or_else(|_| panic!("POST /v1/sandboxes {image} hung"));
    let run = within(d.json(
        Method::POST,
        "/v1/runs",
        Some(ALICE),
        Some(json!({"image": image, "argv": ["true"], "timeout_seconds": 5})),
    ))
    .await
    .unwrap_or_else(|_| panic!("POST /v1/runs {image} hung"));
    [create, run]
}

async fn list(d: &Daemon) -> Vec<Value> {
    let (status, body) = d
        .json(Method::GET, "/v1/sandboxes", Some(ALICE), None)
        .await;
    assert_eq!(status, 200, "{body}");
    body["sandboxes"]
        .as_array()
        .or(body.as_array())
        .cloned()
        .unwrap_or_else(|| panic!("list: {body}"))
}

/// Attack (item 1): a tenant names host paths as images (`oci-layout:/etc`, a missing path,
/// `oci-archive:/dev/zero`, a FIFO) to make the root daemon read them, to learn from the errors
/// which paths exist, or to hang a boot slot on the FIFO. By default every such request is
/// refused at once with 400 and one message, and nothing is created. With
/// `--allow-local-images DIR`, a layout inside DIR is accepted while `DIR/..` escapes, a symlink in
/// DIR pointing out, and a FIFO in DIR are refused the same way.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_paths_are_not_images() {
    let home = Home::new(TOKENS);
    let base = home.dir.path();
    let allowed = base.join("images");
    std::fs::create_dir_all(allowed.join("layout")).unwrap();
    std::fs::create_dir_all(base.join("secret")).unwrap();
    std::os::unix::fs::symlink(base.join("secret"), allowed.join("link")).unwrap();
    mkfifo(&base.join("fifo"));
    mkfifo(&allowed.join("fifo"));

    let mut d = Daemon::start(&home, &[]);
    let attacks = [
        "oci-layout:/etc".to_string(),
        "oci-layout:/nonexistent".to_string(),
        "oci-archive:/dev/zero".to_string(),
        format!("oci-archive:{}", base.join("fifo").display()),
        format!("oci-layout:{}", allowed.join("layout").display()),
    ];
    let mut messages = Vec::new();
    for attack in &attacks {
        let started = Instant::now();
        for (status, body) in create_and_run(&d, attack).await {
            assert_eq!(status, 400, "{attack}: {body}");
            messages.push(body["error"].to_string());
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "{attack} was not refused at once"
        );
    }
    assert!(
        messages.iter().all(|m| m == &messages[0]),
        "refusals differ (an existence oracle): {messages:#?}"
    );
    assert!(
        messages[0].contains("--allow-local-images"),
        "{}",
        messages[0]
    );
    assert!(
        list(&d).await.is_empty(),
        "a refused request created a sandbox"
    );
    d.kill9();

    let d = Daemon::start(&home, &["--allow-local-images", allowed.to_str().unwrap()]);
    let a = allowed.display();
    let mut messages = Vec::new();
    for attack in [
        format!("oci-layout:{a}/../../../../etc"),
        format!("oci-layout:{a}/../secret"),
        format!("oci-layout:{a}/link"),
        format!("oci-archive:{a}/fifo"),
        "oci-layout:/etc".to_string(),
    ] {
        for (status, body) in create_and_run(&d, &attack).await {
            assert_eq!(status, 400, "{attack}: {body}");
            messages.push(body["error"].to_string());
        }
    }
    assert!(messages.iter().all(|m| m == &messages[0]), "{messages:#?}");
    assert!(list(&d).await.is_empty());

    let (status, created) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": format!("oci-layout:{a}/layout"), "wait": false})),
        )
        .await;
    assert!(
        status == 201 || status == 202,
        "{status}: {created}\n{}",
        d.log_text()
    );
    let id = created["id"].as_str().unwrap();
    let (status, body) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert!((200..300).contains(&status), "delete: {status} {body}");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn websocket(d: &Daemon, id: &str) -> Ws {
    let url = format!(
        "{}/v1/sandboxes/{id}/exec/ws",
        d.url.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    // The client must be able to send what the attack sends.
    let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(64 << 20))
        .max_frame_size(Some(64 << 20));
    tokio_tungstenite::connect_async_with_config(request, Some(config), false)
        .await
        .expect("websocket")
        .0
}

/// The daemon's resident memory, from /proc; None once it is gone.
fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

async fn healthy(d: &Daemon, id: &str) {
    let (status, body) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["state"], "running", "{body}");
}

/// Attacks (item 5) on the WebSocket exec, against one real sandbox: a message over the 1 MiB cap
/// must close the connection with 1009 instead of being buffered; a client flooding stdin into a
/// command that never reads it must neither stall the command's output nor grow the daemon's
/// memory past a bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_exec_is_bounded() {
    let home = Home::new(TOKENS);
    let d = Daemon::start(&home, &[]);
    let (status, created) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox")})),
        )
        .await;
    assert_eq!(status, 201, "{created}\n{}", d.log_text());
    let id = created["id"].as_str().unwrap().to_string();

    oversized_message_closes_with_1009(&d, &id).await;
    healthy(&d, &id).await;
    stdin_flood_neither_stalls_output_nor_grows_memory(&d, &id).await;
    healthy(&d, &id).await;

    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
}

async fn oversized_message_closes_with_1009(d: &Daemon, id: &str) {
    let exec = Message::text(json!({"argv": ["cat"]}).to_string());
    let huge_stdin = Message::binary(vec![b'x'; 2 << 20]);
    let huge_request = Message::text(format!("{{\"argv\":[\"{}\"]}}", "x".repeat(2 << 20)));
    for messages in [vec![exec, huge_stdin], vec![huge_request]] {
        let mut ws = websocket(d, id).await;
        for message in messages {
            // A failed send is fine: the daemon may hang up while the message is still going out.
            let _ = ws.send(message).await;
        }
        let close = tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(message) = ws.next().await {
                match message {
                    Ok(Message::Close(frame)) => return frame,
                    Ok(_) => continue,
                    Err(e) => panic!("connection dropped without a close frame: {e}"),
                }
            }
            panic!("connection ended without a close frame");
        })
        .await
        .expect("closed within 30 s")
        .expect("a close frame with a code");
        assert_eq!(close.code, CloseCode::Size, "{close:?}");
        assert!(close.reason.contains("larger than"), "{close:?}");
    }
}

async fn stdin_flood_neither_stalls_output_nor_grows_memory(d: &Daemon, id: &str) {
    // The stdin queue (1 MiB), one held message (1 MiB) and the socket's read buffer, with room for
    // allocator noise; the old 16-deep queue of up to 64 MiB messages could hold 1 GiB.
    const RSS_GROWTH_BOUND_KIB: u64 = 16 << 10;
    let pid = d.pid();
    let before = rss_kib(pid).expect("daemon running");
    let ws = websocket(d, id).await;
    let (mut sink, mut stream) = ws.split();
    sink.send(Message::text(
        json!({"argv": ["sh", "-c", "sleep 2; seq 1000000"]}).to_string(),
    ))
    .await
    .unwrap();
    // 1 MiB messages (the largest allowed) as fast as the daemon takes them. The output (6.9 MB)
    // is larger than the guest channel's HTTP/2 window (1 MiB), so a daemon that stops forwarding
    // output while it waits to queue stdin deadlocks: the command blocks writing output and never
    // exits.
    let flood = tokio::spawn(async move {
        let chunk = vec![b'y'; 1 << 20];
        let mut sent = 0u64;
        while sink.send(Message::binary(chunk.clone())).await.is_ok() {
            sent += 1;
        }
        sent
    });
    let stop = Arc::new(AtomicBool::new(false));
    let sampler = tokio::spawn({
        let stop = stop.clone();
        async move {
            let mut peak = 0;
            while !stop.load(Ordering::Relaxed) {
                let Some(rss) = rss_kib(pid) else { break };
                peak = peak.max(rss);
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            peak
        }
    });
    let b64 = base64::engine::general_purpose::STANDARD;
    let mut stdout = Vec::new();
    let last = tokio::time::timeout(Duration::from_secs(90), async {
        while let Some(message) = stream.next().await {
            let Message::Text(text) = message.unwrap_or_else(|e| {
                panic!(
                    "the websocket broke while output flowed: {e}\n{}",
                    d.log_text()
                )
            }) else {
                continue;
            };
            let event: Value = serde_json::from_str(&text).unwrap();
            if let Some(s) = event["stdout"].as_str() {
                stdout.extend(b64.decode(s).unwrap());
            } else if event.get("exit_code").is_some() || event.get("error").is_some() {
                return event;
            }
        }
        panic!("websocket ended before the exit event");
    })
    .await
    .expect("output stalled behind the stdin flood: no exit within 90 s");
    stop.store(true, Ordering::Relaxed);
    let peak = sampler.await.unwrap();
    drop(stream);
    // The daemon hung up after the exit event, so the flood's sends fail and it ends.
    let sent = tokio::time::timeout(Duration::from_secs(30), flood)
        .await
        .expect("the flood ends once the daemon hangs up")
        .unwrap();
    assert_eq!(last["exit_code"], 0, "{last}");
    let want: String = (1..=1_000_000).map(|n| format!("{n}\n")).collect();
    assert!(
        stdout == want.as_bytes(),
        "output lost: {} of {} bytes",
        stdout.len(),
        want.len()
    );
    let growth = peak.saturating_sub(before);
    eprintln!("stdin flood: {sent} MiB sent; daemon RSS {before} KiB before, peak {peak} KiB");
    assert!(
        growth <= RSS_GROWTH_BOUND_KIB,
        "daemon RSS grew {growth} KiB during the stdin flood (bound {RSS_GROWTH_BOUND_KIB} KiB)"
    );
}

/// Attacks (item 6) on the tokens file, through the real binary: a file other users can read, a
/// tenant taking the Kubernetes node agent's tenant name, and two tenants sharing one token. The
/// daemon must refuse to start, saying why.
#[test]
fn bad_tokens_files_stop_the_daemon() {
    let home = Home::new(TOKENS);
    let tokens = home.dir.path().join("tokens.toml");
    let cases: [(&str, u32, &str); 3] = [
        (TOKENS, 0o644, "chmod 600"),
        (
            "[[tenants]]\nname = \"kubernetes\"\ntoken = \"k8s-token-0001\"",
            0o600,
            "reserved",
        ),
        (
            "[[tenants]]\nname = \"a\"\ntoken = \"same-token-01\"\n\
             [[tenants]]\nname = \"b\"\ntoken = \"same-token-01\"",
            0o600,
            "have the same token",
        ),
    ];
    for (text, mode, want) in cases {
        std::fs::write(&tokens, text).unwrap();
        std::fs::set_permissions(&tokens, std::fs::Permissions::from_mode(mode)).unwrap();
        let mut child = hearth(&home)
            .args(["serve", "--listen", "127.0.0.1:0", "--tokens"])
            .arg(&tokens)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        while child.try_wait().unwrap().is_none() {
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("hearth serve started with a bad tokens file ({want})");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{want}: {stderr}");
        assert!(out.stdout.is_empty(), "{want}: it listened");
        assert!(stderr.contains(want), "{want}: {stderr}");
        if mode == 0o644 {
            assert!(stderr.contains("permissions 0644"), "{stderr}");
        }
    }
}
