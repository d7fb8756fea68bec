//! `hearth serve` end to end: the real daemon binary, real HTTP, real VMs under QEMU (TCG). Boots are
//! expensive (3-5 s each on two shared cores), so one daemon and one long-lived sandbox carry most
//! checks, run in order: unauthenticated routes, malformed requests (nothing changes), create,
//! streamed exec, WebSocket stdin and signals, files, tenant isolation, quota and capacity refusal,
//! the CLI client, TTL expiry, delete, one-shot runs, metrics and a clean SIGTERM.

#[path = "serve/daemon.rs"]
mod daemon;

use std::time::{Duration, Instant};

use base64::Engine;
use daemon::{image, ndjson_events, outputs, CliOutput, Daemon, Home, ALICE, BOB};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
quota = { sandboxes = 1 }

[[tenants]]
name = "bob"
token = "bob-token-0002"
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn api_end_to_end() {
    let home = Home::new(TOKENS);
    let mut d = Daemon::start(
        &home,
        &[
            "--capacity-cpus",
            "3",
            "--max-boots",
            "2",
            "--max-upload",
            "1m",
            "--run-output-limit",
            "64",
            "--shutdown-grace",
            "5s",
        ],
    );
    unauthenticated_routes(&d).await;
    malformed_requests_change_nothing(&d).await;

    // Bob's sandbox is created by the CLI without waiting and expires on its own.
    let ttl_id = cli(
        &home,
        &d,
        BOB,
        &["create", "--no-wait", "--ttl", "20s", &image("busybox")],
    )
    .await;
    assert_eq!(ttl_id.code, Some(0), "cli create: {}", ttl_id.stderr);
    let ttl_id = ttl_id.stdout.trim().to_string();

    let started = Instant::now();
    let (status, a) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox"), "env": {"GREETING": "hello"}, "labels": {"k": "v"}})),
        )
        .await;
    assert_eq!(status, 201, "{a}\n{}", d.log_text());
    assert_eq!(a["state"], "running", "{a}");
    assert_eq!(a["labels"]["k"], "v");
    let id = a["id"].as_str().unwrap().to_string();
    eprintln!("sandbox {id} running after {:?}", started.elapsed());

    exec_streams_output_as_produced(&d, &id).await;
    websocket_stdin_and_signals(&d, &id).await;
    files_put_get_list(&d, &id).await;
    tenants_are_isolated_and_admission_refuses(&d, &id).await;
    cli_client(&home, &d, &id).await;

    let expired = d
        .wait_for(BOB, &ttl_id, Duration::from_secs(90), |s| {
            s["state"] == "stopped"
        })
        .await;
    assert_eq!(expired["state"], "stopped", "TTL expiry: {expired}");
    assert!(
        expired["reason"].as_str().unwrap_or("").contains("ttl"),
        "reason names the TTL: {expired}"
    );

    let (status, _) = d
        .json(
            Method::DELETE,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!(status, 204);
    let (status, body) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert_eq!((status, body["code"].as_str()), (404, Some("not_found")));

    one_shot_runs(&d).await;
    metrics_have_every_family(&d).await;

    let rm = cli(&home, &d, BOB, &["rm", &ttl_id]).await;
    assert_eq!(rm.code, Some(0), "cli rm: {}", rm.stderr);
    let (_, list) = d.json(Method::GET, "/v1/sandboxes", Some(BOB), None).await;
    assert_eq!(list["sandboxes"], json!([]), "bob has nothing left");

    let deadline = Instant::now() + Duration::from_secs(15);
    while !home.processes().is_empty() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(
        home.processes(),
        vec![],
        "no VMM left after every sandbox is gone"
    );
    let status = tokio::task::block_in_place(|| d.terminate(Duration::from_secs(20)));
    assert!(status.success(), "SIGTERM exits 0: {status:?}");
}

async fn unauthenticated_routes(d: &Daemon) {
    let (status, body) = d.json(Method::GET, "/healthz", None, None).await;
    assert_eq!((status, body), (200, json!({"status": "ok"})));

    let served = d.get_text("/openapi.json", None).await;
    let checked_in = include_str!("../openapi.json");
    assert!(
        served == checked_in,
        "served /openapi.json differs from crates/hearth/openapi.json: regenerate it with \
         `hearth serve --print-openapi > crates/hearth/openapi.json`"
    );

    for (header, why) in [
        (None, "no Authorization"),
        (Some("Bearer nope-nope-nope"), "unknown token"),
        (Some("Basic YWxpY2U6eA=="), "not a bearer token"),
    ] {
        let mut request = d.request(Method::GET, "/v1/sandboxes", None);
        if let Some(h) = header {
            request = request.header("authorization", h);
        }
        let response = request.send().await.unwrap();
        assert_eq!(response.status().as_u16(), 401, "{why}");
        let body: Value = response.json().await.unwrap();
        assert_eq!(body["code"], "unauthorized", "{why}: {body}");
    }
}

async fn malformed_requests_change_nothing(d: &Daemon) {
    let post = |body: reqwest::Body, content_type: Option<&str>| {
        let mut request = d
            .request(Method::POST, "/v1/sandboxes", Some(ALICE))
            .body(body);
        if let Some(ct) = content_type {
            request = request.header("content-type", ct);
        }
        request
    };
    let json_ct = Some("application/json");
    let cases: Vec<(reqwest::RequestBuilder, u16, &str)> = vec![
        (post("{not json".into(), json_ct), 400, "syntax error"),
        (
            post(r#"{"image":"x","cpus":"two"}"#.into(), json_ct),
            422,
            "wrong type",
        ),
        (
            post(r#"{"image":"x","colour":1}"#.into(), json_ct),
            422,
            "unknown field",
        ),
        (
            post(r#"{"image":"x"}"#.into(), None),
            415,
            "no content type",
        ),
        (
            post(
                json!({"image": "Not A Valid Ref!!"}).to_string().into(),
                json_ct,
            ),
            400,
            "bad image reference",
        ),
        (
            post(
                json!({"image": image("busybox"), "memory": "lots"})
                    .to_string()
                    .into(),
                json_ct,
            ),
            400,
            "bad size",
        ),
        (
            post(
                json!({"image": image("busybox"), "cpus": 99})
                    .to_string()
                    .into(),
                json_ct,
            ),
            400,
            "over the per-sandbox maximum",
        ),
        (
            d.request(Method::POST, "/v1/sandboxes/nope/exec", Some(ALICE))
                .json(&json!({"argv": ["true"]})),
            404,
            "exec in no sandbox",
        ),
        (
            d.request(Method::GET, "/v1/nothing-here", Some(ALICE)),
            404,
            "no route",
        ),
    ];
    for (request, want, why) in cases {
        let response = request.send().await.unwrap();
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        assert_eq!(status, want, "{why}: {text}");
        let body: Value = serde_json::from_str(&text)
            .unwrap_or_else(|_| panic!("{why}: error body is JSON: {text}"));
        assert!(
            body["error"].as_str().is_some_and(|e| !e.is_empty()) && body["code"].is_string(),
            "{why}: {body}"
        );
    }
    for token in [ALICE, BOB] {
        let (_, list) = d
            .json(Method::GET, "/v1/sandboxes", Some(token), None)
            .await;
        assert_eq!(list["sandboxes"], json!([]), "nothing was created");
    }
}

async fn exec(d: &Daemon, id: &str, token: &str, body: Value) -> Vec<(Instant, Value)> {
    let response = d
        .request(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(token),
        )
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 200, "exec {body}");
    assert_eq!(response.headers()["content-type"], "application/x-ndjson");
    ndjson_events(response).await
}

async fn exec_streams_output_as_produced(d: &Daemon, id: &str) {
    let script = "echo one; echo $GREETING; sleep 1; echo two >&2; echo three; exit 3";
    let events = exec(d, id, ALICE, json!({"argv": ["sh", "-c", script]})).await;
    let (stdout, stderr, last) = outputs(&events);
    assert_eq!(stdout, "one\nhello\nthree\n", "sandbox env applies");
    assert_eq!(stderr, "two\n");
    assert_eq!(last, json!({"exit_code": 3}));
    let first_at = events[0].0;
    let last_at = events.last().unwrap().0;
    assert!(
        last_at - first_at >= Duration::from_millis(700),
        "the first line arrived before the command finished (streamed, not buffered)"
    );

    let stdin = B64.encode("fed through stdin\n");
    let events = exec(d, id, ALICE, json!({"argv": ["cat"], "stdin": stdin})).await;
    let (stdout, _, last) = outputs(&events);
    assert_eq!(
        (stdout.as_str(), last),
        ("fed through stdin\n", json!({"exit_code": 0}))
    );

    let events = exec(
        d,
        id,
        ALICE,
        json!({"argv": ["sleep", "30"], "timeout_seconds": 1}),
    )
    .await;
    assert_eq!(outputs(&events).2, json!({"signal": 9, "timed_out": true}));
}

async fn websocket(
    d: &Daemon,
    id: &str,
    token: &str,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    tokio_tungstenite::tungstenite::Error,
> {
    let url = format!(
        "{}/v1/sandboxes/{id}/exec/ws",
        d.url.replace("http://", "ws://")
    );
    let mut request = url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    tokio_tungstenite::connect_async(request)
        .await
        .map(|(s, _)| s)
}

async fn next_event(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(30), ws.next())
            .await
            .expect("a websocket event within 30 s")
            .expect("websocket open")
            .expect("websocket message");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}

async fn websocket_stdin_and_signals(d: &Daemon, id: &str) {
    let mut ws = websocket(d, id, ALICE).await.expect("websocket");
    ws.send(Message::text(json!({"argv": ["cat"]}).to_string()))
        .await
        .unwrap();
    ws.send(Message::binary(b"line one\n".to_vec()))
        .await
        .unwrap();
    let event = next_event(&mut ws).await;
    assert_eq!(
        event,
        json!({"stdout": B64.encode("line one\n")}),
        "echoed while stdin is open"
    );
    ws.send(Message::binary(b"line two\n".to_vec()))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut ws).await["stdout"],
        B64.encode("line two\n")
    );
    ws.send(Message::text(r#"{"close_stdin":true}"#))
        .await
        .unwrap();
    assert_eq!(
        next_event(&mut ws).await,
        json!({"exit_code": 0}),
        "cat ends at EOF"
    );

    let mut ws = websocket(d, id, ALICE).await.expect("websocket");
    ws.send(Message::text(
        json!({"argv": ["sh", "-c", "echo ready; sleep 30"]}).to_string(),
    ))
    .await
    .unwrap();
    assert_eq!(next_event(&mut ws).await["stdout"], B64.encode("ready\n"));
    ws.send(Message::text(r#"{"signal":15}"#)).await.unwrap();
    let last = next_event(&mut ws).await;
    assert!(
        last == json!({"signal": 15}) || last == json!({"exit_code": 143}),
        "SIGTERM ends the command: {last}"
    );

    let refused = websocket(d, id, BOB)
        .await
        .expect_err("bob may not exec in alice's sandbox");
    match refused {
        tokio_tungstenite::tungstenite::Error::Http(response) => {
            assert_eq!(response.status().as_u16(), 404)
        }
        other => panic!("expected a 404 before the upgrade, got {other}"),
    }
}

async fn files_put_get_list(d: &Daemon, id: &str) {
    let files = format!("/v1/sandboxes/{id}/files");
    let put = d
        .request(Method::PUT, &files, Some(ALICE))
        .query(&[("path", "/tmp/hello.sh"), ("mode", "755")])
        .body("echo from a file\n")
        .send()
        .await
        .unwrap();
    assert_eq!(put.status().as_u16(), 200);
    let written: Value = put.json().await.unwrap();
    assert_eq!(written, json!({"path": "/tmp/hello.sh", "bytes": 17}));

    let got = d
        .request(Method::GET, &files, Some(ALICE))
        .query(&[("path", "/tmp/hello.sh")])
        .send()
        .await
        .unwrap();
    assert_eq!(got.status().as_u16(), 200);
    assert_eq!(got.headers()["x-hearth-mode"], "755");
    assert_eq!(got.text().await.unwrap(), "echo from a file\n");
    let events = exec(d, id, ALICE, json!({"argv": ["/tmp/hello.sh"]})).await;
    assert_eq!(
        outputs(&events).0,
        "from a file\n",
        "the file is in the guest, executable"
    );

    let listing = d
        .request(Method::GET, &files, Some(ALICE))
        .query(&[("path", "/tmp")])
        .send()
        .await
        .unwrap();
    assert_eq!(listing.status().as_u16(), 200);
    let listing: Value = listing.json().await.unwrap();
    let entry = listing["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["name"] == "hello.sh")
        .unwrap_or_else(|| panic!("hello.sh listed: {listing}"));
    assert_eq!(
        (entry["kind"].as_str(), entry["size"].as_u64()),
        (Some("file"), Some(17))
    );

    // Over --max-upload (1m): refused whether the size is declared or only seen while streaming.
    // Declared: the answer comes before any body byte is read (raw HTTP, headers only).
    let declared = raw_status(
        d,
        &format!(
            "PUT {files}?path=/tmp/big HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {ALICE}\r\n\
             content-length: 2097152\r\n\r\n"
        ),
    )
    .await;
    assert_eq!(declared, 413, "declared size over --max-upload");
    // Streamed without a length: the daemon answers 413 once 1m has passed and stops reading, so
    // the client may see its body write cut instead of the answer; the upload must not succeed.
    let chunks =
        futures::stream::iter((0..32).map(|_| Ok::<_, std::io::Error>(vec![7u8; 64 << 10])));
    // Its own client: the daemon closes this connection, which must not poison the shared pool.
    let streamed = tokio::time::timeout(
        Duration::from_secs(30),
        reqwest::Client::new()
            .put(format!("{}{files}", d.url))
            .bearer_auth(ALICE)
            .query(&[("path", "/tmp/big")])
            .body(reqwest::Body::wrap_stream(chunks))
            .send(),
    )
    .await
    .expect("an oversized streamed upload is answered");
    match streamed {
        Ok(response) => assert_eq!(response.status().as_u16(), 413),
        Err(e) => assert!(e.is_request(), "only the body write may fail: {e}"),
    }
    for (method, query, want, why) in [
        (
            Method::GET,
            vec![("path", "/tmp/big")],
            404,
            "a refused upload leaves no file",
        ),
        (
            Method::GET,
            vec![("path", "/no/such/file")],
            404,
            "missing file",
        ),
        (
            Method::PUT,
            vec![("path", "/no/such/dir/f")],
            404,
            "missing parent",
        ),
        (Method::GET, vec![], 400, "no path"),
        (
            Method::PUT,
            vec![("path", "/tmp/x"), ("mode", "999")],
            400,
            "bad mode",
        ),
    ] {
        let response = d
            .request(method, &files, Some(ALICE))
            .query(&query)
            .body("x")
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        let body: Value = response.json().await.unwrap_or(Value::Null);
        assert_eq!(status, want, "{why}: {body}");
        assert!(body["code"].is_string(), "{why}: JSON error body: {body}");
    }
}

async fn tenants_are_isolated_and_admission_refuses(d: &Daemon, id: &str) {
    let sandbox = format!("/v1/sandboxes/{id}");
    for (method, path, body) in [
        (Method::GET, sandbox.clone(), None),
        (Method::DELETE, sandbox.clone(), None),
        (
            Method::POST,
            format!("{sandbox}/exec"),
            Some(json!({"argv": ["true"]})),
        ),
        (Method::GET, format!("{sandbox}/files?path=/tmp"), None),
    ] {
        let (status, answer) = d.json(method.clone(), &path, Some(BOB), body).await;
        assert_eq!(status, 404, "bob {method} {path}: {answer}");
    }
    let (_, list) = d.json(Method::GET, "/v1/sandboxes", Some(BOB), None).await;
    assert!(
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["id"] != id),
        "bob's list never shows alice's sandbox: {list}"
    );

    // Alice's quota is one sandbox.
    let (status, answer) = d
        .json(
            Method::POST,
            "/v1/sandboxes",
            Some(ALICE),
            Some(json!({"image": image("busybox")})),
        )
        .await;
    assert_eq!(
        (status, answer["code"].as_str()),
        (429, Some("quota")),
        "{answer}"
    );

    // The node hands out 3 vCPUs and alice holds one.
    let response = d
        .request(Method::POST, "/v1/sandboxes", Some(BOB))
        .json(&json!({"image": image("busybox"), "cpus": 3}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status().as_u16(), 503);
    assert!(response.headers().contains_key("retry-after"));
    let answer: Value = response.json().await.unwrap();
    assert_eq!(answer["code"], "capacity", "{answer}");

    let (_, list) = d
        .json(Method::GET, "/v1/sandboxes", Some(ALICE), None)
        .await;
    assert_eq!(
        list["sandboxes"].as_array().unwrap().len(),
        1,
        "refusals recorded nothing"
    );
    let (_, a) = d.json(Method::GET, &sandbox, Some(ALICE), None).await;
    assert_eq!(a["state"], "running", "bob's attempts did not touch it");
}

/// Sends `head` as a raw HTTP/1.1 request and returns the answer's status code.
async fn raw_status(d: &Daemon, head: &str) -> u16 {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = d.url.trim_start_matches("http://");
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    stream.write_all(head.as_bytes()).await.unwrap();
    let mut answer = vec![0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(10), stream.read(&mut answer))
        .await
        .expect("an answer without the body")
        .unwrap();
    let line = String::from_utf8_lossy(&answer[..n]).into_owned();
    line.split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("not an HTTP answer: {line:?}"))
}

async fn cli(home: &Home, d: &Daemon, token: &str, args: &[&str]) -> CliOutput {
    d.cli(home, token, args, b"").await
}

async fn cli_client(home: &Home, d: &Daemon, id: &str) {
    let ls = cli(home, d, ALICE, &["ls"]).await;
    assert_eq!(ls.code, Some(0), "{}", ls.stderr);
    assert!(
        ls.stdout
            .lines()
            .any(|l| l.contains(id) && l.contains("running")),
        "{}",
        ls.stdout
    );

    let script = "echo hi; echo oops >&2; exit 5";
    let out = cli(home, d, ALICE, &["exec", id, "sh", "-c", script]).await;
    assert_eq!(
        (out.code, out.stdout.as_str(), out.stderr.as_str()),
        (Some(5), "hi\n", "oops\n")
    );

    let out = d
        .cli(home, ALICE, &["exec", "-i", id, "cat"], b"piped in\n")
        .await;
    assert_eq!(
        (out.code, out.stdout.as_str()),
        (Some(0), "piped in\n"),
        "{}",
        out.stderr
    );

    let local = home.dir.path().join("upload.txt");
    std::fs::write(&local, "round trip\n").unwrap();
    let remote = format!("{id}:/tmp/cli.txt");
    let up = cli(home, d, ALICE, &["cp", local.to_str().unwrap(), &remote]).await;
    assert_eq!(up.code, Some(0), "cp in: {}", up.stderr);
    let back = home.dir.path().join("download.txt");
    let down = cli(home, d, ALICE, &["cp", &remote, back.to_str().unwrap()]).await;
    assert_eq!(down.code, Some(0), "cp out: {}", down.stderr);
    assert_eq!(std::fs::read_to_string(&back).unwrap(), "round trip\n");

    let other = cli(home, d, BOB, &["exec", id, "true"]).await;
    assert_eq!(
        other.code,
        Some(125),
        "another tenant's sandbox is an error"
    );
    assert!(other.stderr.contains("404"), "{}", other.stderr);
}

async fn one_shot_runs(d: &Daemon) {
    let script = "head -c 1000 /dev/zero | tr '\\0' a; echo err >&2; exit 7";
    let (status, result) = d
        .json(
            Method::POST,
            "/v1/runs",
            Some(BOB),
            Some(json!({"image": image("busybox"), "argv": ["sh", "-c", script]})),
        )
        .await;
    assert_eq!(status, 200, "{result}");
    let stdout = B64.decode(result["stdout"].as_str().unwrap()).unwrap();
    assert_eq!(stdout, vec![b'a'; 64], "stdout cut at --run-output-limit");
    assert_eq!(result["truncated"], true);
    assert_eq!(
        B64.decode(result["stderr"].as_str().unwrap()).unwrap(),
        b"err\n"
    );
    assert_eq!(result["exit_code"], 7);
    let (_, list) = d.json(Method::GET, "/v1/sandboxes", Some(BOB), None).await;
    assert!(
        list["sandboxes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|s| s["state"] != "running"),
        "the run's sandbox is gone: {list}"
    );
    let (status, answer) = d
        .json(
            Method::POST,
            "/v1/runs",
            Some(BOB),
            Some(json!({"image": image("busybox"), "argv": []})),
        )
        .await;
    assert_eq!((status, answer["code"].as_str()), (400, Some("invalid")));
}

async fn metrics_have_every_family(d: &Daemon) {
    let text = d.get_text("/metrics", None).await;
    let value = |name: &str| -> f64 {
        text.lines()
            .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("{name} missing in\n{text}"))
    };
    for state in ["creating", "running", "stopped", "failed"] {
        value(&format!("hearth_sandboxes{{state=\"{state}\"}}"));
    }
    assert!(value("hearth_boots_total") >= 3.0, "three sandboxes booted");
    assert!(value("hearth_execs_total") >= 8.0);
    assert!(value("hearth_boot_seconds_count") >= 3.0);
    assert!(value("hearth_image_cache_bytes") > 0.0);
    assert_eq!(value("hearth_capacity_vcpus"), 3.0);
    value("hearth_boot_failures_total");
    value("hearth_allocated_vcpus");
    value("hearth_allocated_memory_bytes");
    value("hearth_capacity_memory_bytes");
    // Every sandbox here was restored from one boot template (busybox, the daemon's 256 MiB):
    // the node keeps one sealed copy of its memory, counted against its capacity.
    assert_eq!(value("hearth_template_memory_bytes"), (256u64 << 20) as f64);
    assert!(text.contains("hearth_boot_seconds_bucket{le=\"+Inf\"}"));
}
