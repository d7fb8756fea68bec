//! Test support for `hearth serve`: starts the real binary on a free port with a temp home and a
//! tokens file, talks to it over real HTTP, and on drop leaves nothing running — the daemon is
//! killed and so is every process whose command line names this test's home (the detached VMs
//! the daemon started), found through /proc by that unique path, and the sandboxes' network
//! namespace mounts under it are removed.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use reqwest::{Method, RequestBuilder};

pub const ALICE: &str = "alice-token-0001";
pub const BOB: &str = "bob-token-0002";

/// A test's home and tokens file; kills what ran from it when dropped.
pub struct Home {
    pub dir: tempfile::TempDir,
}

impl Home {
    /// A short path under /tmp: VM socket paths must fit in `sun_path`.
    pub fn new(tokens: &str) -> Home {
        let dir = tempfile::Builder::new()
            .prefix("hs")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::write(dir.path().join("tokens.toml"), tokens).unwrap();
        let private = std::os::unix::fs::PermissionsExt::from_mode(0o600);
        std::fs::set_permissions(dir.path().join("tokens.toml"), private).unwrap();
        Home { dir }
    }

    pub fn path(&self) -> PathBuf {
        self.dir.path().join("home")
    }

    /// Live processes whose command line mentions this home (VMMs), with their command lines.
    pub fn processes(&self) -> Vec<(u32, String)> {
        processes_mentioning(&self.path().to_string_lossy())
    }
}

impl Drop for Home {
    fn drop(&mut self) {
        for (pid, _) in self.processes() {
            // SAFETY: kill has no memory-safety preconditions; the pid is a VMM of this test.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        }
        std::thread::sleep(Duration::from_millis(200));
        // The sandboxes' network namespaces the killed daemon left (its successor would sweep them;
        // a test has none): unmounted, so the temp directory can go.
        let home = self.dir.path().to_string_lossy().into_owned();
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        for point in mounts.lines().filter_map(|l| l.split(' ').nth(4)) {
            if point.starts_with(&home) {
                let c = std::ffi::CString::new(point).unwrap();
                // SAFETY: umount2 of a path this test's home holds; no memory is shared.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let me = std::process::id();
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
        let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .map(|s| s[s.rfind(')').unwrap_or(0) + 2..].starts_with('Z'))
            .unwrap_or(true);
        if cmdline.contains(needle) && !zombie {
            found.push((pid, cmdline));
        }
    }
    found
}

pub fn image(name: &str) -> String {
    hearth_testkit::image_ref(name).expect("test registry")
}

/// `hearth` with the test environment.
pub fn hearth(home: &Home) -> Command {
    let registry = hearth_testkit::registry().expect("test registry");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    cmd.env("HEARTH_HOME", home.path())
        .env("HEARTH_KERNEL", hearth_testkit::kernel_dir())
        .env("HEARTH_AGENT", hearth_testkit::agent_bin())
        .env("HEARTH_INSECURE_REGISTRIES", &registry.addr)
        .env_remove("HEARTH_HOST")
        .env_remove("HEARTH_TOKEN")
        .env_remove("RUST_LOG");
    cmd
}

/// How a `hearth sandbox` command run by [`Daemon::cli`] ended.
pub struct CliOutput {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

/// A running `hearth serve`.
pub struct Daemon {
    child: Option<Child>,
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub http: reqwest::Client,
    pub log: PathBuf,
}

impl Daemon {
    /// Starts the daemon with `--accel tcg --memory 256m` plus `args`, and waits for its address.
    pub fn start(home: &Home, args: &[&str]) -> Daemon {
        Daemon::start_on(home, args, "127.0.0.1:0")
    }

    /// [`Daemon::start`] listening on `listen`.
    fn start_on(home: &Home, args: &[&str], listen: &str) -> Daemon {
        static STARTED: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = STARTED.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let log = home.dir.path().join(format!("daemon-{n}.log"));
        let mut child = hearth(home)
            .args([
                "-v",
                "serve",
                "--listen",
                listen,
                "--accel",
                "tcg",
                "--memory",
                "256m",
                // Disks are sparse; the suite must not depend on how full the CI machine's disk
                // is (a 3 GB free one refused every default 4 GiB disk).
                "--capacity-disk",
                "1t",
            ])
            .arg("--tokens")
            .arg(home.dir.path().join("tokens.toml"))
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("spawn hearth serve");
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .unwrap_or_default();
        let Some(addr) = line.trim().strip_prefix("listening on ") else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "hearth serve did not print its address (got {line:?}); log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        Daemon {
            url: format!("http://{addr}"),
            child: Some(child),
            http: reqwest::Client::new(),
            log,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn request(&self, method: Method, path: &str, token: Option<&str>) -> RequestBuilder {
        let request = self.http.request(method, format!("{}{path}", self.url));
        match token {
            Some(token) => request.bearer_auth(token),
            None => request,
        }
    }

    /// A JSON request; returns status and body as JSON (Null for an empty body).
    pub async fn json(
        &self,
        method: Method,
        path: &str,
        token: Option<&str>,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let mut request = self.request(method, path, token);
        if let Some(body) = body {
            request = request.json(&body);
        }
        let response = request.send().await.expect("request");
        let status = response.status().as_u16();
        let text = response.text().await.unwrap();
        let value = match text.is_empty() {
            true => serde_json::Value::Null,
            false => serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{path}: {status} answered non-JSON ({e}): {text}")),
        };
        (status, value)
    }

    /// Creates a sandbox from `body` as `token`'s tenant and asserts it answered 201 running (with
    /// the daemon's log when not); returns its record.
    pub async fn create_running(&self, token: &str, body: serde_json::Value) -> serde_json::Value {
        let (status, s) = self
            .json(Method::POST, "/v1/sandboxes", Some(token), Some(body))
            .await;
        assert_eq!(
            (status, &s["state"]),
            (201, &serde_json::json!("running")),
            "{s}\n{}",
            self.log_text()
        );
        s
    }

    /// `GET /v1/sandboxes/{id}` as `token`: status and body.
    async fn get_sandbox(&self, token: &str, id: &str) -> (u16, serde_json::Value) {
        let path = format!("/v1/sandboxes/{id}");
        self.json(Method::GET, &path, Some(token), None).await
    }

    /// `token`'s sandbox `id` as `GET /v1/sandboxes/{id}` answers it (asserting 200).
    pub async fn record(&self, token: &str, id: &str) -> serde_json::Value {
        let (status, s) = self.get_sandbox(token, id).await;
        assert_eq!(status, 200, "GET sandbox {id}: {s}");
        s
    }

    /// Runs `sh -c script` in `token`'s sandbox `id`: (HTTP status, trimmed stdout, last event);
    /// for a status other than 200, the answer's body as a JSON string in place of the event.
    pub async fn exec_sh(
        &self,
        token: &str,
        id: &str,
        script: &str,
    ) -> (u16, String, serde_json::Value) {
        let response = self
            .request(
                Method::POST,
                &format!("/v1/sandboxes/{id}/exec"),
                Some(token),
            )
            .json(&serde_json::json!({ "argv": ["sh", "-c", script] }))
            .send()
            .await
            .unwrap();
        let status = response.status().as_u16();
        if status != 200 {
            let body = response.text().await.unwrap_or_default();
            return (status, String::new(), serde_json::json!(body));
        }
        let (stdout, _, last) = outputs(&ndjson_events(response).await);
        (status, stdout.trim().to_owned(), last)
    }

    /// `GET path` (with `token` when given): asserts it answered 200, returns the body.
    pub async fn get_text(&self, path: &str, token: Option<&str>) -> String {
        let response = self.request(Method::GET, path, token).send().await.unwrap();
        assert_eq!(response.status().as_u16(), 200, "GET {path}");
        response.text().await.unwrap()
    }

    /// The value of the unlabelled sample `name` in `/metrics` (a gauge or counter in whole units).
    pub async fn gauge(&self, name: &str) -> u64 {
        let text = self.get_text("/metrics", None).await;
        let prefix = format!("{name} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or_else(|| panic!("no {name} in {text}"))
            .trim()
            .parse()
            .unwrap()
    }

    /// Polls a sandbox until `done` says so or `timeout` passes; returns the last record.
    pub async fn wait_for(
        &self,
        token: &str,
        id: &str,
        timeout: Duration,
        done: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = Instant::now() + timeout;
        loop {
            let (_, record) = self.get_sandbox(token, id).await;
            if done(&record) || Instant::now() > deadline {
                return record;
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// `GET /v1/sandboxes/{id}/processes/{n}/output?{query}` as `token`, read to its end (within
    /// 60 s): (the offset header, stdout, stderr, last event).
    pub async fn process_output(
        &self,
        token: &str,
        id: &str,
        n: u64,
        query: &str,
    ) -> (u64, String, String, serde_json::Value) {
        let path = format!("/v1/sandboxes/{id}/processes/{n}/output?{query}");
        let response = self
            .request(Method::GET, &path, Some(token))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status().as_u16(), 200, "{path}");
        let offset = response.headers()["hearth-output-offset"]
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        let events = tokio::time::timeout(Duration::from_secs(60), ndjson_events(response)).await;
        let Ok(events) = events else {
            let (_, info) = self
                .json(
                    Method::GET,
                    &format!("/v1/sandboxes/{id}/processes/{n}"),
                    Some(token),
                    None,
                )
                .await;
            panic!("{path}: no end within 60 s; {info}\n{}", self.log_text());
        };
        let (out, err, last) = outputs(&events);
        (offset, out, err, last)
    }

    /// Runs `hearth sandbox ARGS` against this daemon as `token`, with `stdin` fed and closed
    /// (within 120 s).
    pub async fn cli(&self, home: &Home, token: &str, args: &[&str], stdin: &[u8]) -> CliOutput {
        use tokio::io::AsyncWriteExt;
        let mut cmd = tokio::process::Command::from(hearth(home));
        cmd.arg("sandbox")
            .args(["--host", &self.url, "--token", token])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("spawn hearth sandbox");
        let mut input = child.stdin.take().unwrap();
        input.write_all(stdin).await.unwrap();
        drop(input);
        let out = tokio::time::timeout(Duration::from_secs(120), child.wait_with_output())
            .await
            .expect("hearth sandbox finishes")
            .unwrap();
        CliOutput {
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops this daemon with SIGTERM (asserting a clean exit) and starts the next on the same
    /// home and address with the same `args`; returns it once `token`'s sandbox `id` runs again
    /// under it.
    pub async fn restart(mut self, home: &Home, args: &[&str], token: &str, id: &str) -> Daemon {
        let status = tokio::task::block_in_place(|| self.terminate(Duration::from_secs(60)));
        assert!(status.success(), "{status:?}\n{}", self.log_text());
        self.next(home, args, token, id).await
    }

    /// Kills this daemon with SIGKILL, as a crash would, and starts the next as
    /// [`Daemon::restart`] does.
    pub async fn crash_and_restart(
        mut self,
        home: &Home,
        args: &[&str],
        token: &str,
        id: &str,
    ) -> Daemon {
        self.kill9();
        self.next(home, args, token, id).await
    }

    async fn next(&self, home: &Home, args: &[&str], token: &str, id: &str) -> Daemon {
        let listen = self.url.strip_prefix("http://").expect("an http URL");
        let next = Daemon::start_on(home, args, listen);
        let record = next
            .wait_for(token, id, Duration::from_secs(60), |s| {
                s["state"] == "running"
            })
            .await;
        assert_eq!(record["state"], "running", "{record}\n{}", next.log_text());
        next
    }

    /// SIGTERM, then wait for the exit.
    pub fn terminate(&mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("daemon running");
        // SAFETY: kill has no memory-safety preconditions; the pid is our child.
        unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("hearth serve did not exit within {timeout:?} of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// Collects an NDJSON exec answer: (stdout, stderr, final event, arrival time of each event).
pub async fn ndjson_events(response: reqwest::Response) -> Vec<(Instant, serde_json::Value)> {
    use futures::StreamExt;
    let mut events = Vec::new();
    let mut buf = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        buf.extend_from_slice(&chunk.expect("exec stream"));
        while let Some(end) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=end).collect();
            events.push((
                Instant::now(),
                serde_json::from_slice(&line).expect("event JSON"),
            ));
        }
    }
    assert!(buf.is_empty(), "stream ended mid-line");
    events
}

/// Decoded stdout and stderr of exec events, and the last event.
pub fn outputs(events: &[(Instant, serde_json::Value)]) -> (String, String, serde_json::Value) {
    use base64::Engine;
    let b64 = base64::engine::general_purpose::STANDARD;
    let (mut out, mut err) = (Vec::new(), Vec::new());
    for (_, e) in events {
        if let Some(s) = e["stdout"].as_str() {
            out.extend(b64.decode(s).unwrap());
        }
        if let Some(s) = e["stderr"].as_str() {
            err.extend(b64.decode(s).unwrap());
        }
    }
    let last = events.last().map(|(_, e)| e.clone()).unwrap_or_default();
    (
        String::from_utf8_lossy(&out).into_owned(),
        String::from_utf8_lossy(&err).into_owned(),
        last,
    )
}
