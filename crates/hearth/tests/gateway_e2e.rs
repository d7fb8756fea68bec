//! `hearth gateway` end to end on the real kube-apiserver: `hearth operator`, two node agents
//! (`hearth serve --kubernetes`, each with its own HEARTH_HOME and a mutual-TLS API advertised in
//! its HearthNode) and the gateway, all real processes, with real microVMs under TCG.
//! Through the gateway, with the real CLI as the client: two sandboxes are created (Service
//! Sandbox objects in the tenant's namespace), each gets an exec with its output and exit code, a
//! file goes up and comes back down unchanged, stdin flows over the exec WebSocket (`exec -i`) and a
//! terminal over a raw WebSocket (`"tty": true`), a background process is started and its output
//! followed to its exit code (`spawn`, `logs -f`); another tenant sees none of it (404 for the ids,
//! an empty list, its exec refused); one is paused and resumed (its files survive); fork answers
//! 501; a third, created to pause when idle, sleeps (phase Paused) and is woken by an exec and by
//! the gateway's resume, and a pause of it asleep declares it paused (an exec no longer wakes it);
//! the gateway killed mid-exec fails that exec with an error and a new
//! gateway serves the same sandbox; deleting removes the objects and the VMs.

#[path = "gateway/cluster.rs"]
mod cluster;
#[path = "serve/daemon.rs"]
mod daemon;
#[path = "gateway/pki.rs"]
mod pki;

use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use base64::Engine as _;
use cluster::Cluster;
use daemon::Home;
use futures::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

const ALICE: &str = "gw-alice-token-01";
const BOB: &str = "gw-bob-token-0002";

/// `hearth sandbox ARGS` against the gateway as `token`.
fn cli(url: &str, token: &str, args: &[&str], stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .env("HEARTH_HOST", url)
        .env("HEARTH_TOKEN", token)
        .env_remove("RUST_LOG")
        .arg("sandbox")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    if let Some(data) = stdin {
        use std::io::Write;
        input.write_all(data).unwrap();
    }
    drop(input);
    child.wait_with_output().unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

async fn tty_over_websocket(url: &str, id: &str) -> (String, Value) {
    let ws_url = format!(
        "{}/v1/sandboxes/{id}/exec/ws",
        url.replace("http://", "ws://")
    );
    let mut request = ws_url.into_client_request().unwrap();
    request
        .headers_mut()
        .insert("authorization", format!("Bearer {ALICE}").parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("a WebSocket through the gateway");
    let first = json!({"argv": ["sh", "-c", "tty; stty size; exit 5"], "tty": true, "rows": 30, "cols": 100});
    ws.send(Message::text(first.to_string())).await.unwrap();
    let mut screen = String::new();
    loop {
        let message = tokio::time::timeout(Duration::from_secs(60), ws.next())
            .await
            .expect("a WebSocket event within 60 s")
            .expect("WebSocket open")
            .expect("WebSocket message");
        let Message::Text(event) = message else {
            continue;
        };
        let event: Value = serde_json::from_str(&event).unwrap();
        match event["stdout"].as_str() {
            Some(data) => screen.push_str(&text(
                &base64::engine::general_purpose::STANDARD
                    .decode(data)
                    .unwrap(),
            )),
            None => return (screen, event),
        }
    }
}

#[test]
fn sandboxes_through_the_gateway_on_two_nodes_with_tenants_kept_apart() {
    let kube = match hearth_testkit::kube() {
        Ok(k) => k,
        Err(e) => return hearth_testkit::skip(&format!("needs a test kube-apiserver: {e:#}")),
    };
    if hearth_testkit::kubectl_bin().is_none() {
        return hearth_testkit::skip("needs kubectl (scripts/provision-kube.sh)");
    }
    let image = hearth_testkit::image_ref("busybox").expect("test registry");
    let ns = kube.create_namespace("gw").unwrap();
    let other_ns = kube.create_namespace("gwb").unwrap();
    let dir = tempfile::Builder::new()
        .prefix("gwe2e")
        .tempdir_in("/tmp")
        .unwrap();
    let pki = pki::Pki::new(dir.path(), "cluster");
    let cluster = Cluster {
        gateway_cert: pki.client("gateway"),
        pki,
        kube,
        ns: ns.clone(),
        dir: dir.path().to_owned(),
    };
    let crds = hearth_testkit::repo_root().join("deploy/crds.yaml");
    let (ok, out) = cluster.kubectl(&["apply", "-f", &crds.to_string_lossy()]);
    assert!(ok, "{out}");

    let (h1, h2) = (Home::new(""), Home::new(""));
    let (n1, _) = cluster.node(&h1, "n1");
    let (n2, _) = cluster.node(&h2, "n2");
    let operator = cluster.operator();
    let tokens = format!(
        "[[tenants]]\nname = \"alice\"\ntoken = \"{ALICE}\"\nnamespace = \"{ns}\"\n\
         [[tenants]]\nname = \"bob\"\ntoken = \"{BOB}\"\nnamespace = \"{other_ns}\"\n"
    );
    let (gateway, url) = cluster.gateway(&tokens);
    let logs = || {
        format!(
            "--- gateway\n{}\n--- operator\n{}\n--- n1\n{}\n--- n2\n{}",
            gateway.log_text(),
            operator.log_text(),
            n1.log_text(),
            n2.log_text()
        )
    };

    // Two sandboxes through the gateway, timed.
    let mut ids = Vec::new();
    for _ in 0..2 {
        let started = Instant::now();
        let out = cli(&url, ALICE, &["create", &image], None);
        assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
        let id = text(&out.stdout).trim().to_string();
        eprintln!(
            "created {id} through the gateway in {:?}",
            started.elapsed()
        );
        ids.push(id);
    }
    let mut nodes = Vec::new();
    for id in &ids {
        let (ok, json) = cluster.kubectl(&["get", "sandbox", id, "-o", "json"]);
        assert!(ok, "{json}");
        let object: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(object["spec"]["lifecycle"]["type"], "Service");
        nodes.push(object["status"]["nodeName"].as_str().unwrap().to_string());
    }
    eprintln!("placed on {nodes:?}");

    for id in &ids {
        // Exec: output and exit code.
        let started = Instant::now();
        let out = cli(
            &url,
            ALICE,
            &[
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "echo out-$((6*7)); echo err >&2; exit 7",
            ],
            None,
        );
        eprintln!("exec through the gateway took {:?}", started.elapsed());
        assert_eq!(out.status.code(), Some(7), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "out-42\n");
        assert!(text(&out.stderr).contains("err"));

        // A file up and back down.
        let up = dir.path().join(format!("{id}-up.bin"));
        let down = dir.path().join(format!("{id}-down.bin"));
        let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&up, &data).unwrap();
        let target = format!("{id}:/tmp/data.bin");
        let out = cli(&url, ALICE, &["cp", &up.to_string_lossy(), &target], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let out = cli(
            &url,
            ALICE,
            &["exec", id, "--", "wc", "-c", "/tmp/data.bin"],
            None,
        );
        assert!(
            text(&out.stdout).starts_with("300000"),
            "{}",
            text(&out.stdout)
        );
        let out = cli(&url, ALICE, &["cp", &target, &down.to_string_lossy()], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        assert!(
            std::fs::read(&down).unwrap() == data,
            "the file came back changed"
        );

        // Stdin over the exec WebSocket (`exec -i`).
        let out = cli(
            &url,
            ALICE,
            &["exec", "-i", id, "--", "cat"],
            Some(b"through the websocket\n"),
        );
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        assert_eq!(text(&out.stdout), "through the websocket\n");

        // A background process through the gateway: started, then its output followed to the end.
        let script = "echo in the background; exit 3";
        let out = cli(&url, ALICE, &["spawn", id, "--", "sh", "-c", script], None);
        assert!(out.status.success(), "{}", text(&out.stderr));
        let n = text(&out.stdout).trim().to_owned();
        let out = cli(&url, ALICE, &["logs", id, &n, "-f"], None);
        assert_eq!(
            (out.status.code(), text(&out.stdout).as_str()),
            (Some(3), "in the background\n"),
            "{}",
            text(&out.stderr)
        );
    }

    let rt = tokio::runtime::Runtime::new().unwrap();
    // The nodes' endpoints came from the gateway's HearthNode watch, not one API read per request.
    let metrics = rt.block_on(async {
        let response = reqwest::get(format!("{url}/metrics")).await.unwrap();
        response.text().await.unwrap()
    });
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.trim().parse().ok())
            .unwrap_or_else(|| panic!("{name} missing in\n{metrics}"))
    };
    let (watch, api) = (
        counter("hearth_gateway_node_lookups_watch_total"),
        counter("hearth_gateway_node_lookups_api_total"),
    );
    eprintln!("node endpoints: {watch} from the gateway's watch, {api} read from the API");
    assert!(
        watch >= 6 && api <= 2,
        "lookups: {watch} from the watch, {api} from the API"
    );

    // A terminal over a raw WebSocket.
    let (screen, last) = rt.block_on(tty_over_websocket(&url, &ids[0]));
    assert_eq!(last, json!({"exit_code": 5}), "{screen}");
    assert!(
        screen.contains("/dev/pts/") && screen.contains("30 100"),
        "{screen}"
    );

    // A network policy set through the gateway is in force on the node and written back to the
    // Sandbox's spec.network, which the gateway's own GET reads.
    let policy = json!({"mode": "allow", "allow": ["example.com:443"]});
    let answer: Value = rt.block_on(async {
        let response = reqwest::Client::new()
            .put(format!("{url}/v1/sandboxes/{}/network", ids[0]))
            .bearer_auth(ALICE)
            .json(&policy)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        response.json().await.unwrap()
    });
    assert_eq!(
        answer["policy"]["allow"],
        json!(["example.com:443"]),
        "{answer}"
    );
    let (ok, json) = cluster.kubectl(&["get", "sandbox", &ids[0], "-o", "json"]);
    assert!(ok, "{json}");
    let object: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(object["spec"]["network"]["mode"], "allow", "{object}");
    assert_eq!(
        object["spec"]["network"]["allow"],
        json!(["example.com:443"]),
        "{object}"
    );
    let shown: Value = rt.block_on(async {
        reqwest::Client::new()
            .get(format!("{url}/v1/sandboxes/{}", ids[0]))
            .bearer_auth(ALICE)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    });
    assert_eq!(
        shown["network"]["allow"],
        json!(["example.com:443"]),
        "{shown}"
    );

    // Pause and resume (`spec.paused`, done by the node agent): the file written before is back.
    let started = Instant::now();
    let out = cli(&url, ALICE, &["pause", &ids[1]], None);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
    eprintln!("pause through the gateway took {:?}", started.elapsed());
    let (ok, json) = cluster.kubectl(&["get", "sandbox", &ids[1], "-o", "json"]);
    assert!(ok, "{json}");
    assert_eq!(
        serde_json::from_str::<Value>(&json).unwrap()["status"]["phase"],
        "Paused"
    );
    let out = cli(&url, ALICE, &["exec", &ids[1], "--", "true"], None);
    assert!(!out.status.success(), "an exec ran in a paused sandbox");
    let started = Instant::now();
    let out = cli(&url, ALICE, &["resume", &ids[1]], None);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
    eprintln!("resume through the gateway took {:?}", started.elapsed());
    let out = cli(
        &url,
        ALICE,
        &["exec", &ids[1], "--", "wc", "-c", "/tmp/data.bin"],
        None,
    );
    assert!(
        text(&out.stdout).starts_with("300000"),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );

    // An idle sandbox sleeps (`lifecycle.idlePauseSeconds`): phase Paused with `spec.paused` false;
    // an exec through the gateway wakes it on its node; so does the gateway's resume.
    let out = cli(
        &url,
        ALICE,
        &[
            "create",
            &image,
            "--idle-timeout",
            "3s",
            "--on-idle",
            "pause",
        ],
        None,
    );
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
    let sleepy = text(&out.stdout).trim().to_string();
    let phase = |id: &str| {
        let (ok, json) = cluster.kubectl(&["get", "sandbox", id, "-o", "json"]);
        assert!(ok, "{json}");
        let object: Value = serde_json::from_str(&json).unwrap();
        assert_eq!(
            object["spec"]["lifecycle"]["idlePauseSeconds"], 3,
            "{object}"
        );
        assert_ne!(object["spec"]["paused"], true, "{object}");
        object["status"]["phase"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
    let reaches = |id: &str, want: &str| {
        let deadline = Instant::now() + Duration::from_secs(90);
        while phase(id) != want {
            assert!(Instant::now() < deadline, "{id} never {want}\n{}", logs());
            std::thread::sleep(Duration::from_millis(500));
        }
    };
    let asleep = |id: &str| reaches(id, "Paused");
    asleep(&sleepy);
    let started = Instant::now();
    let out = cli(&url, ALICE, &["exec", &sleepy, "--", "echo", "woken"], None);
    assert_eq!(
        text(&out.stdout),
        "woken\n",
        "{}\n{}",
        text(&out.stderr),
        logs()
    );
    eprintln!(
        "an exec that woke an idle-paused sandbox took {:?}",
        started.elapsed()
    );
    reaches(&sleepy, "Running");
    asleep(&sleepy);
    let out = cli(&url, ALICE, &["resume", &sleepy], None);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
    assert_eq!(phase(&sleepy), "Running");
    // Asleep again, a pause declares it: `spec.paused` true, and a use no longer wakes it.
    asleep(&sleepy);
    let out = cli(&url, ALICE, &["pause", &sleepy], None);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());
    let (ok, json) = cluster.kubectl(&["get", "sandbox", &sleepy, "-o", "json"]);
    assert!(ok, "{json}");
    let object: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (&object["spec"]["paused"], &object["status"]["phase"]),
        (&json!(true), &json!("Paused")),
        "{object}"
    );
    let out = cli(&url, ALICE, &["exec", &sleepy, "--", "true"], None);
    assert!(
        !out.status.success() && text(&out.stderr).contains("paused"),
        "a declared pause was woken: {}\n{}",
        text(&out.stderr),
        logs()
    );
    let out = cli(&url, ALICE, &["rm", &sleepy], None);
    assert!(out.status.success(), "{}\n{}", text(&out.stderr), logs());

    // The other tenant: every id is 404, its list is empty, its exec fails.
    let http = reqwest::Client::new();
    let status = |method: reqwest::Method, path: String, token: Option<&str>| {
        let mut request = http.request(method, format!("{url}{path}"));
        if let Some(token) = token {
            request = request.bearer_auth(token);
        }
        rt.block_on(async { request.json(&json!({"argv": ["true"]})).send().await })
            .unwrap()
            .status()
            .as_u16()
    };
    for id in &ids {
        for (method, path) in [
            (reqwest::Method::GET, format!("/v1/sandboxes/{id}")),
            (reqwest::Method::POST, format!("/v1/sandboxes/{id}/exec")),
            (
                reqwest::Method::GET,
                format!("/v1/sandboxes/{id}/files?path=/tmp/data.bin"),
            ),
            (reqwest::Method::DELETE, format!("/v1/sandboxes/{id}")),
        ] {
            assert_eq!(
                status(method.clone(), path.clone(), Some(BOB)),
                404,
                "{method} {path}"
            );
        }
        let out = cli(&url, BOB, &["exec", id, "--", "true"], None);
        assert!(!out.status.success());
    }
    let out = cli(&url, BOB, &["ls", "--json"], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(listed, json!([]), "bob lists alice's sandboxes");
    assert_eq!(
        status(reqwest::Method::GET, "/v1/sandboxes".into(), None),
        401
    );
    assert_eq!(
        status(
            reqwest::Method::POST,
            format!("/v1/sandboxes/{}/fork", ids[0]),
            Some(ALICE)
        ),
        501
    );

    // Alice lists both, running.
    let out = cli(&url, ALICE, &["ls", "--json"], None);
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let running: Vec<_> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["state"] == "running")
        .filter_map(|s| s["id"].as_str())
        .collect();
    assert_eq!(running.len(), 2, "{listed}");

    // The gateway killed mid-exec: the client's exec fails with an error, the sandbox stays, and a
    // new gateway (a replica keeps nothing) serves it at once.
    let mut long = Command::new(env!("CARGO_BIN_EXE_hearth"))
        .env("HEARTH_HOST", &url)
        .env("HEARTH_TOKEN", ALICE)
        .args([
            "sandbox",
            "exec",
            &ids[0],
            "--",
            "sh",
            "-c",
            "echo started; sleep 60",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    let mut stdout = std::io::BufReader::new(long.stdout.take().unwrap());
    std::io::BufRead::read_line(&mut stdout, &mut first).unwrap();
    assert_eq!(first, "started\n");
    drop(gateway);
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(long.wait_with_output());
    });
    let out = rx
        .recv_timeout(Duration::from_secs(30))
        .expect("the exec ends when its gateway dies")
        .unwrap();
    eprintln!(
        "exec cut by the gateway's death: {:?}: {}",
        out.status.code(),
        text(&out.stderr).trim()
    );
    assert!(!out.status.success() && !out.stderr.is_empty());
    let (gateway, url) = cluster.gateway(&tokens);
    let out = cli(&url, ALICE, &["exec", &ids[0], "--", "echo", "again"], None);
    assert_eq!(text(&out.stdout), "again\n", "{}", text(&out.stderr));

    // A sandbox from a SandboxTemplate: the gateway makes a SandboxClaim, the operator gives it a
    // Sandbox, a node runs it; its id takes every route; deleting it takes the claim and the
    // Sandbox with it.
    let template = dir.path().join("template.yaml");
    std::fs::write(
        &template,
        format!(
            "apiVersion: hearth.dev/v1alpha1\nkind: SandboxTemplate\nmetadata:\n  name: tiny\n\
             spec:\n  image: {image}\n  resources: {{cpu: 1, memory: 256Mi}}\n"
        ),
    )
    .unwrap();
    let (ok, out) = cluster.kubectl(&["apply", "-f", &template.to_string_lossy()]);
    assert!(ok, "{out}");
    let started = Instant::now();
    let created: Value = rt.block_on(async {
        let response = reqwest::Client::new()
            .post(format!("{url}/v1/sandboxes"))
            .bearer_auth(ALICE)
            .json(&json!({"template": "tiny"}))
            .send()
            .await
            .unwrap();
        let status = response.status();
        let body: Value = response.json().await.unwrap();
        assert_eq!(status, 201, "{body}");
        body
    });
    eprintln!(
        "created from a template through the gateway in {:?}",
        started.elapsed()
    );
    let from_template = created["id"].as_str().unwrap().to_string();
    assert_eq!(created["state"], "running", "{created}");
    let (ok, json) = cluster.kubectl(&["get", "sandboxclaims", "-o", "json"]);
    assert!(ok, "{json}");
    let claims: Value = serde_json::from_str(&json).unwrap();
    assert_eq!(
        claims["items"][0]["status"]["sandbox"]["name"],
        from_template.as_str(),
        "{claims}"
    );
    let out = cli(
        &url,
        ALICE,
        &["exec", &from_template, "--", "echo", "templated"],
        None,
    );
    assert_eq!(
        text(&out.stdout),
        "templated\n",
        "{}\n--- operator\n{}",
        text(&out.stderr),
        operator.log_text()
    );
    let out = cli(&url, ALICE, &["rm", &from_template], None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (_, claims) = cluster.kubectl(&["get", "sandboxclaims", "-o", "name"]);
        let (exists, _) = cluster.kubectl(&["get", "sandbox", &from_template]);
        if claims.trim().is_empty() && !exists {
            break;
        }
        assert!(Instant::now() < deadline, "claim or Sandbox left: {claims}");
        std::thread::sleep(Duration::from_millis(250));
    }

    // Delete: the objects go, and so do the VMs.
    let mut args = vec!["rm"];
    args.extend(ids.iter().map(String::as_str));
    let out = cli(&url, ALICE, &args, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    for id in &ids {
        let (ok, _) = cluster.kubectl(&["get", "sandbox", id]);
        assert!(!ok, "sandbox {id} still exists");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(h1.processes().is_empty() && h2.processes().is_empty()) {
        assert!(
            Instant::now() < deadline,
            "VMs left running: {:?}",
            (h1.processes(), h2.processes())
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    drop((gateway, operator, n1, n2));
}
