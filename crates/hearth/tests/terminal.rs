//! Interactive terminals end to end, with real VMs under QEMU (TCG): `hearth run -it` and
//! `hearth sandbox exec -it` driven through a real pseudo-terminal by a Python `pty` harness
//! (`terminal/pty_harness.py`: typed commands, window resizes, ^C, exit, SIGTERM, and the outer
//! terminal's modes before and after), and the exec WebSocket with `"tty": true` and resize
//! messages. Three boots: two for `run` (to the end, and SIGTERM), one sandbox shared by the daemon
//! checks.

#[path = "serve/daemon.rs"]
mod daemon;

use std::process::Command;
use std::time::Duration;

use base64::Engine;
use daemon::{image, Daemon, Home, ALICE};
use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

/// Runs the harness's `scenario` on `hearth ARGS` (with the test environment) and fails the test
/// with the harness's report unless every check passed.
fn harness(home: &Home, scenario: &str, args: &[&str], extra_env: &[(&str, &str)]) {
    let hearth = daemon::hearth(home);
    let mut python = Command::new("python3");
    python
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/terminal/pty_harness.py"
        ))
        .args([scenario, "--"])
        .arg(hearth.get_program())
        .args(args);
    for (key, value) in hearth.get_envs() {
        match value {
            Some(value) => python.env(key, value),
            None => python.env_remove(key),
        };
    }
    python.envs(extra_env.iter().copied());
    let out = python.output().expect("running python3");
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{scenario} {args:?}:\n{report}");
    eprintln!("{report}");
}

#[test]
fn run_it_is_a_real_terminal() {
    let home = Home::new(TOKENS);
    let busybox = image("busybox");
    let args = [
        "run", "-it", "--accel", "tcg", "--memory", "256m", &busybox, "sh",
    ];
    harness(&home, "full", &args, &[]);
    // SIGTERM mid-session: the VM goes, our terminal comes back as it was.
    harness(&home, "sigterm", &args, &[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandbox_exec_tty_over_the_api_and_the_cli() {
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
    assert_eq!(status, 201, "{created}");
    let id = created["id"].as_str().unwrap().to_string();
    let record = d
        .wait_for(ALICE, &id, Duration::from_secs(180), |r| {
            r["state"] != "creating"
        })
        .await;
    assert_eq!(record["state"], "running", "{record}\n{}", d.log_text());

    websocket_tty(&d, &id).await;

    // The CLI over a real terminal, as `run -it`; SIGTERM and SIGHUP leave it as it was.
    let env = [("HEARTH_HOST", d.url.as_str()), ("HEARTH_TOKEN", ALICE)];
    let args = ["sandbox", "exec", "-it", id.as_str(), "sh"];
    tokio::task::block_in_place(|| {
        harness(&home, "full", &args, &env);
        harness(&home, "sigterm", &args, &env);
        harness(&home, "sighup", &args, &env);
    });

    // `-t` without a terminal on stdin: a warning, and the command runs on pipes.
    let out = tokio::task::block_in_place(|| {
        daemon::hearth(&home)
            .args(["sandbox", "exec", "-t", id.as_str(), "tty"])
            .envs(env)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap()
    });
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(
        (out.status.code(), stdout.trim()),
        (Some(1), "not a tty"),
        "{stderr}"
    );
    assert!(stderr.contains("the input device is not a TTY"), "{stderr}");
}

/// `"tty": true` with a size, a resize message, stdout and stderr as one stream, and refusals.
async fn websocket_tty(d: &Daemon, id: &str) {
    let url = format!(
        "{}/v1/sandboxes/{id}/exec/ws",
        d.url.replace("http://", "ws://")
    );
    let connect = || async {
        let mut request = url.clone().into_client_request().unwrap();
        request
            .headers_mut()
            .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
        tokio_tungstenite::connect_async(request).await.unwrap().0
    };
    let mut ws = connect().await;
    let script = "tty; stty size; echo to-stderr >&2; read line; stty size; exit 4";
    ws.send(Message::text(
        json!({"argv": ["sh", "-c", script], "tty": true, "rows": 33, "cols": 111}).to_string(),
    ))
    .await
    .unwrap();
    let mut screen = String::new();
    let mut sent_resize = false;
    let last = loop {
        let event = next_event(&mut ws).await;
        assert!(
            event.get("stderr").is_none(),
            "a terminal has one stream: {event}"
        );
        match event["stdout"].as_str() {
            Some(data) => {
                let data = base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap();
                screen.push_str(&String::from_utf8_lossy(&data));
            }
            None => break event,
        }
        if !sent_resize && screen.contains("to-stderr") {
            sent_resize = true;
            let resize = json!({"resize": {"rows": 44, "cols": 122}});
            ws.send(Message::text(resize.to_string())).await.unwrap();
            ws.send(Message::binary(b"go\r".to_vec())).await.unwrap();
        }
    };
    assert_eq!(last, json!({"exit_code": 4}), "{screen}");
    assert!(screen.contains("/dev/pts/"), "{screen}");
    assert!(screen.contains("33 111"), "{screen}");
    assert!(screen.contains("44 122"), "{screen}");
    // The terminal turns "\n" into "\r\n", as a terminal does.
    assert!(screen.contains("to-stderr\r\n"), "{screen:?}");

    // `rows` without `tty` and a resize of an exec without a terminal are refused with a reason.
    let mut ws = connect().await;
    ws.send(Message::text(
        json!({"argv": ["true"], "rows": 3}).to_string(),
    ))
    .await
    .unwrap();
    let event = next_event(&mut ws).await;
    assert!(
        event["error"]
            .as_str()
            .unwrap()
            .contains("need `\"tty\": true`"),
        "{event}"
    );
    let mut ws = connect().await;
    ws.send(Message::text(json!({"argv": ["sleep", "3"]}).to_string()))
        .await
        .unwrap();
    ws.send(Message::text(
        json!({"resize": {"rows": 1, "cols": 1}}).to_string(),
    ))
    .await
    .unwrap();
    let event = next_event(&mut ws).await;
    assert!(
        event["error"].as_str().unwrap().contains("no terminal"),
        "{event}"
    );

    // The NDJSON exec has no way to type or resize: `tty` there is an unknown field.
    let (status, body) = d
        .json(
            Method::POST,
            &format!("/v1/sandboxes/{id}/exec"),
            Some(ALICE),
            Some(json!({"argv": ["true"], "tty": true})),
        )
        .await;
    assert_eq!(status, 422, "{body}");
}

async fn next_event(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Value {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a websocket event within 60 s")
            .expect("websocket open")
            .expect("websocket message");
        if let Message::Text(text) = message {
            return serde_json::from_str(&text).unwrap();
        }
    }
}
