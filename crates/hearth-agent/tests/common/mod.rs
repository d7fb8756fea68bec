//! Test support: runs the real agent binary outside a VM (as `hearth-agent serve`, workload root
//! `/` or a directory the test builds) and connects the real host client to it. Needs root
//! (exec-inits clone PID and mount namespaces); tests skip with that reason otherwise.
#![allow(dead_code)]

use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::Duration;

use hearth_vm::channel::{AgentClient, ExecRequest, ExecResult};

pub const AGENT: &str = env!("CARGO_BIN_EXE_hearth-agent");

/// `true` (after printing why) when the test cannot run here.
pub fn skip_unless_root() -> bool {
    if nix::unistd::geteuid().is_root() {
        return false;
    }
    eprintln!("skipped: needs root (the agent clones PID and mount namespaces for each exec)");
    true
}

/// A running `hearth-agent serve`, killed when dropped.
pub struct AgentProcess {
    pub child: Child,
    /// `--listen` socket path, when started that way.
    pub socket: Option<PathBuf>,
    _dir: tempfile::TempDir,
}

impl AgentProcess {
    /// One session per connection on a Unix socket (like vsock).
    pub fn listening() -> AgentProcess {
        AgentProcess::listening_in(Path::new("/"))
    }

    /// Like [`AgentProcess::listening`], with `root` as the workload root.
    pub fn listening_in(root: &Path) -> AgentProcess {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("agent.sock");
        let child = Command::new(AGENT)
            .args(["serve", "--root"])
            .arg(root)
            .arg("--listen")
            .arg(&socket)
            .spawn()
            .expect("starting hearth-agent");
        AgentProcess {
            child,
            socket: Some(socket),
            _dir: dir,
        }
    }

    /// Sessions for ever on one stream (like the virtio-serial port). Returns the host end.
    pub fn on_stream() -> (AgentProcess, UnixStream) {
        let (host_end, agent_end) = UnixStream::pair().unwrap();
        (AgentProcess::on_fd(agent_end.into()), host_end)
    }

    /// Sessions for ever on `agent_end` (given to the agent as its fd 3).
    pub fn on_fd(agent_end: OwnedFd) -> AgentProcess {
        let agent_fd = agent_end.as_raw_fd();
        let mut command = Command::new(AGENT);
        command.args(["serve", "--root", "/", "--fd", "3"]);
        // SAFETY: dup2/fcntl between fork and exec.
        unsafe {
            command.pre_exec(move || {
                let ret = if agent_fd == 3 {
                    libc::fcntl(3, libc::F_SETFD, 0)
                } else {
                    libc::dup2(agent_fd, 3)
                };
                if ret < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command.spawn().expect("starting hearth-agent");
        drop(agent_end);
        AgentProcess {
            child,
            socket: None,
            _dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub async fn connect(&self) -> AgentClient {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        AgentClient::connect_unix(self.socket.as_ref().expect("listening agent"), deadline)
            .await
            .expect("connecting to the agent")
    }
}

impl Drop for AgentProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A client on a duplicate of `stream` (the stream itself stays open when the client goes).
pub async fn connect_on(stream: &UnixStream) -> AgentClient {
    let dup = stream.try_clone().unwrap();
    dup.set_nonblocking(true).unwrap();
    let stream = KeepOpen(tokio::net::UnixStream::from_std(dup).unwrap());
    tokio::time::timeout(Duration::from_secs(10), AgentClient::connect(stream))
        .await
        .expect("handshake within 10 s")
        .expect("connecting to the agent")
}

pub fn request(argv: &[&str]) -> ExecRequest {
    ExecRequest {
        argv: argv.iter().map(|s| s.to_string()).collect(),
        env: vec!["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()],
        ..ExecRequest::default()
    }
}

pub async fn run(client: &AgentClient, request: ExecRequest) -> ExecResult {
    let handle = client.exec(request).await.expect("starting exec");
    tokio::time::timeout(Duration::from_secs(60), handle.output())
        .await
        .expect("exec finished within 60 s")
        .expect("exec output")
}

pub async fn sh(client: &AgentClient, script: &str) -> ExecResult {
    run(client, request(&["sh", "-c", script])).await
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// PIDs (host namespace) of processes whose argv is exactly `argv`.
pub fn processes_with_argv(argv: &[&str]) -> Vec<u32> {
    let wanted: Vec<u8> = argv.iter().flat_map(|a| a.bytes().chain([0])).collect();
    std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| c == wanted))
        .collect()
}

/// Polls until no process has argv `argv`, up to `timeout`; returns the survivors.
pub async fn wait_until_gone(argv: &[&str], timeout: Duration) -> Vec<u32> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        let left = processes_with_argv(argv);
        if left.is_empty() || std::time::Instant::now() > deadline {
            return left;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Resident memory of a process, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// Polls until a process with argv `argv` exists (up to 5 s).
pub async fn wait_until_present(argv: &[&str]) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while processes_with_argv(argv).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "no process {argv:?} appeared"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A duplicate of the test's end of a socket pair that never shuts the socket down: a client
/// closing its HTTP/2 connection shuts down its stream's write half, and on a duplicated descriptor
/// that is the shared socket's, which would leave the test's own end unable to write the next
/// session's handshake (the guest's virtio port is reopened per session instead).
struct KeepOpen(tokio::net::UnixStream);

impl tokio::io::AsyncRead for KeepOpen {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for KeepOpen {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.0).poll_write(cx, buf)
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.0).poll_flush(cx)
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::task::Poll::Ready(Ok(()))
    }
}
