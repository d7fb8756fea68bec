//! `hearth mcp` end to end with the official Python MCP client (`mcp` on PyPI, in the suite's venv
//! from `scripts/python-env.sh`), driven by `tests/mcp/client.py` against real VMs (TCG):
//! - over stdio, against a `hearth serve`: tools listed with schemas, one sandbox (python image)
//!   through every tool (a fork of it too, paused and resumed), and a second one, not kept: all
//!   gone once the client disconnects;
//! - over streamable HTTP, against the same daemon: a session lists the tools, calls one and
//!   creates a sandbox, gone once the session is closed; a sessionless client's sandbox lives
//!   until the server stops;
//! - without a daemon: `hearth mcp -- SERVE_FLAGS` runs the sandbox in-process, and none of its
//!   VMs outlives the session.

#[path = "serve/daemon.rs"]
mod daemon;

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use daemon::{image, Daemon, Home, ALICE};
use reqwest::Method;

const TOKENS: &str = r#"
[[tenants]]
name = "alice"
token = "alice-token-0001"
"#;

/// The suite's Python venv's interpreter.
fn python() -> PathBuf {
    let repo = hearth_testkit::repo_root();
    let out = Command::new(repo.join("scripts/python-env.sh"))
        .output()
        .expect("run scripts/python-env.sh");
    assert!(
        out.status.success(),
        "scripts/python-env.sh failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8(out.stdout).unwrap().trim()).join("bin/python")
}

/// `client.py MODE ARGS...` with the environment `hearth mcp` needs; its one JSON line.
fn client(home: &Home, mode: &str, args: &[&str], env: &[(&str, &str)]) -> serde_json::Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/mcp/client.py");
    let registry = hearth_testkit::registry().expect("test registry");
    let mut cmd = Command::new(python());
    cmd.arg(script)
        .arg(mode)
        .args(args)
        .env("HEARTH_BIN", env!("CARGO_BIN_EXE_hearth"))
        .env("HEARTH_HOME", home.path())
        .env("HEARTH_KERNEL", hearth_testkit::kernel_dir())
        .env("HEARTH_AGENT", hearth_testkit::agent_bin())
        .env("HEARTH_INSECURE_REGISTRIES", &registry.addr)
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .env_remove("HEARTH_HOST")
        .env_remove("HEARTH_TOKEN");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let started = Instant::now();
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().expect("run client.py");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&stdout),
        String::from_utf8_lossy(&stderr),
    );
    eprintln!(
        "client.py {mode}: {status} in {:?}\n{stderr}",
        started.elapsed()
    );
    assert!(
        status.success(),
        "client.py {mode} failed:\n{stdout}\n{stderr}"
    );
    serde_json::from_str(stdout.lines().last().unwrap_or_default())
        .unwrap_or_else(|e| panic!("client.py {mode} printed no JSON line ({e}):\n{stdout}"))
}

/// Whether the daemon still knows sandbox `id` (a deleted sandbox is forgotten: 404).
async fn exists(d: &Daemon, id: &str) -> bool {
    let (status, record) = d
        .json(
            Method::GET,
            &format!("/v1/sandboxes/{id}"),
            Some(ALICE),
            None,
        )
        .await;
    assert!(status == 200 || status == 404, "{status}: {record}");
    status == 200
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_over_stdio_and_http_drives_sandboxes_and_ends_them_with_the_session() {
    let home = Home::new(TOKENS);
    // Room for the HTTP session's sandbox while the sessionless one is created.
    let d = Daemon::start(&home, &["--capacity-cpus", "4"]);
    let env = [
        ("HEARTH_HOST", d.url.as_str()),
        ("HEARTH_TOKEN", ALICE),
        ("HEARTH_TEST_IMAGE", &image("python")),
    ];
    let ids = client(&home, "stdio", &[], &env);
    for key in ["destroyed", "left", "forked"] {
        let id = ids[key].as_str().unwrap();
        assert!(
            !exists(&d, id).await,
            "sandbox {key} ({id}) outlived the MCP session; daemon log:\n{}",
            d.log_text()
        );
    }

    // Streamable HTTP, on a loopback port of its choosing.
    let mut server = Killed(
        daemon::hearth(&home)
            .args(["mcp", "--http", "127.0.0.1:0", "--host", &d.url])
            .env("HEARTH_TOKEN", ALICE)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn hearth mcp --http"),
    );
    let server = &mut server.0;
    let mut line = String::new();
    BufReader::new(server.stdout.take().unwrap())
        .read_line(&mut line)
        .unwrap();
    let addr = line
        .trim()
        .strip_prefix("listening on ")
        .map(str::to_string);
    let addr = addr.unwrap_or_else(|| panic!("hearth mcp --http printed {line:?}"));
    let out = client(&home, "http", &[&format!("http://{addr}/mcp")], &env);
    // The session's end destroys its sandbox in the background: give it a moment.
    let id = out["left"].as_str().unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while exists(&d, id).await {
        assert!(
            Instant::now() < deadline,
            "sandbox {id} outlived its HTTP session"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // The sessionless request's sandbox lives as long as the server, and no longer.
    let loose = out["sessionless"].as_str().unwrap();
    assert!(exists(&d, loose).await, "{loose} ended with its request");
    // SAFETY: kill has no memory-safety preconditions; the pid is our child.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    while server.try_wait().unwrap().is_none() {
        assert!(
            Instant::now() < deadline,
            "hearth mcp --http ignored SIGTERM"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.wait().unwrap().success());
    assert!(
        !exists(&d, loose).await,
        "{loose} outlived the hearth mcp that created it"
    );
    assert!(!refused_loopback_only(&home).success());
}

/// A child killed when the test ends, passed or not.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--http` on a non-loopback address is refused: the endpoint has no authentication.
fn refused_loopback_only(home: &Home) -> std::process::ExitStatus {
    daemon::hearth(home)
        .args(["mcp", "--http", "0.0.0.0:0", "--host", "http://127.0.0.1:9"])
        .env("HEARTH_TOKEN", ALICE)
        .stdout(Stdio::null())
        .status()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mcp_without_a_daemon_runs_sandboxes_in_process_and_ends_them() {
    let home = Home::new(TOKENS);
    let flags = [
        "--accel",
        "tcg",
        "--memory",
        "256m",
        "--capacity-disk",
        "1t",
    ];
    let env = [("HEARTH_TEST_IMAGE", image("busybox"))];
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let out = client(&home, "local", &flags, &env);
    assert!(out["left"].is_string(), "{out}");
    // The session's sandbox was destroyed, its VM with it; hearth mcp itself has exited.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = home.processes();
        if left.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "still running after the session ended: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
