//! `POST /v1/exec`, agent side: reads the `ExecStart` frame, starts an exec-init (see
//! [`crate::exec_init`]) with pipes for stdin, stdout and stderr (or one pseudo-terminal for all
//! three, [`pty`]), then streams output frames as the
//! HTTP/2 window allows (a pipe is read only when the previous frame has been handed to HTTP/2, so
//! a command that prints faster than the host reads blocks in `write`), feeds stdin, enforces the
//! timeout and reports the exit status.
//!
//! Killing an exec means SIGKILL to its exec-init, the PID 1 of the exec's PID namespace: the kernel
//! then kills every process in that namespace, i.e. the whole process tree. That happens on
//! timeout, when the host resets the exec's stream, and when the session that started it ends
//! (unless a restored VM's new host took over: the exec then runs on, detached, its output
//! discarded, see [`crate::session::ExecFate`]; or, started attachable, waits for that host to
//! take it over, see [`attach`]).

pub mod attach;
mod pty;
mod registry;
mod spawn;
mod supervise;

use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use hearth_proto::{
    AgentError, ErrorKind, ExecRequest, FrameDecoder, FrameKind, TtySize, MAX_EXEC_LABEL,
};
use tokio::io::AsyncWriteExt;
use tokio::net::unix::pipe;
use tokio::time::Instant;

pub use registry::ExecRegistry;
pub use spawn::{ExitWatch, PidFd, ProcessEnd};

use crate::exec_init::ExecInitConfig;
use crate::session::ExecFate;
use crate::{log, server, Agent};
use supervise::{Served, Supervisor};

/// Serves one exec request to completion.
pub async fn serve(
    agent: Arc<Agent>,
    fate: ExecFate,
    mut body: RecvStream,
    respond: SendResponse<Bytes>,
) {
    let mut decoder = FrameDecoder::new();
    let request = match read_exec_start(&mut body, &mut decoder).await {
        Ok(request) => request,
        Err(e) => return server::respond_error(respond, &e),
    };
    let started = match start(&agent, &request) {
        Ok(started) => started,
        Err(e) => return server::respond_error(respond, &e),
    };
    run(agent, fate, request, started, body, decoder, respond).await;
}

async fn read_exec_start(
    body: &mut RecvStream,
    decoder: &mut FrameDecoder,
) -> Result<ExecRequest, AgentError> {
    loop {
        if let Some(frame) = decoder
            .next_frame()
            .map_err(|e| AgentError::invalid(e.to_string()))?
        {
            if frame.kind != FrameKind::ExecStart {
                return Err(AgentError::invalid(format!(
                    "exec body must start with ExecStart, got {:?}",
                    frame.kind
                )));
            }
            let request: ExecRequest = frame
                .parse_json()
                .map_err(|e| AgentError::invalid(e.to_string()))?;
            if request.argv.is_empty() || request.argv[0].is_empty() {
                return Err(AgentError::invalid(
                    "exec argv is empty: name a command to run",
                ));
            }
            let label = request.label.as_deref().unwrap_or_default();
            if label.len() > MAX_EXEC_LABEL || label.chars().any(char::is_control) {
                return Err(AgentError::invalid(format!(
                    "exec label: at most {MAX_EXEC_LABEL} bytes, no control characters"
                )));
            }
            return Ok(request);
        }
        match body.data().await {
            Some(Ok(chunk)) => {
                let _ = body.flow_control().release_capacity(chunk.len());
                decoder.push(&chunk);
            }
            Some(Err(e)) => {
                return Err(AgentError::invalid(format!(
                    "reading exec request body: {e}"
                )))
            }
            None => {
                return Err(AgentError::invalid(
                    "exec request body ended before its ExecStart frame",
                ))
            }
        }
    }
}

/// A started exec-init and the agent's ends of its pipes (or of its terminal).
struct Started {
    id: u64,
    pid: i32,
    exit: ExitWatch,
    stdin: Option<pipe::Sender>,
    stdout: pipe::Receiver,
    /// `None` with a terminal: it carries stdout and stderr as one stream.
    stderr: Option<pipe::Receiver>,
    control: tokio::net::UnixStream,
}

/// The command's stdio: the exec-init's fds 0-2 and the agent's ends.
struct Stdio {
    child: [OwnedFd; 3],
    stdin: Option<OwnedFd>,
    stdout: OwnedFd,
    stderr: Option<OwnedFd>,
    /// The terminal master, with a `tty`.
    tty: Option<Arc<OwnedFd>>,
}

impl Stdio {
    /// Pipes (stdin `/dev/null` without `stdin`).
    fn pipes(request: &ExecRequest) -> io::Result<Stdio> {
        let (stdin_child, stdin) = if request.stdin {
            let (reader, writer) = pipe_pair()?;
            (reader, Some(writer))
        } else {
            (OwnedFd::from(std::fs::File::open("/dev/null")?), None)
        };
        let (stdout, stdout_child) = pipe_pair()?;
        let (stderr, stderr_child) = pipe_pair()?;
        Ok(Stdio {
            child: [stdin_child, stdout_child, stderr_child],
            stdin,
            stdout,
            stderr: Some(stderr),
            tty: None,
        })
    }

    /// One terminal for all three (see [`pty`]); stdin is written into the master only with
    /// `stdin`.
    fn terminal(agent: &Agent, request: &ExecRequest, size: TtySize) -> io::Result<Stdio> {
        let pty::Pty { master, slave } = pty::open(&agent.config.root, size)?;
        let child = [slave.try_clone()?, slave.try_clone()?, slave];
        let stdin = match request.stdin {
            true => Some(master.try_clone()?),
            false => None,
        };
        Ok(Stdio {
            child,
            stdin,
            stdout: master.try_clone()?,
            stderr: None,
            tty: Some(Arc::new(master)),
        })
    }
}

fn start(agent: &Arc<Agent>, request: &ExecRequest) -> Result<Started, AgentError> {
    let internal = |what: &str, e: io::Error| {
        AgentError::new(
            ErrorKind::of_own_work(&e),
            format!("starting exec {:?}: {what}: {e}", request.argv[0]),
        )
    };
    let stdio = match request.tty {
        Some(size) => Stdio::terminal(agent, request, size)
            .map_err(|e| internal("opening a pseudo-terminal", e))?,
        None => Stdio::pipes(request).map_err(|e| internal("creating pipes", e))?,
    };
    let (control, control_child) = std::os::unix::net::UnixStream::pair()
        .map_err(|e| internal("creating control socket", e))?;
    let fds = spawn::ChildFds {
        stdin: stdio.child[0].as_fd(),
        stdout: stdio.child[1].as_fd(),
        stderr: stdio.child[2].as_fd(),
        control: control_child.as_fd(),
    };
    let program = &agent.config.exec_init_program;
    let (id, pid, pidfd) = agent
        .execs
        .spawn_and_register(|| spawn::spawn_exec_init(program, fds))
        .map_err(|e| internal(&format!("cloning exec-init {}", program.display()), e))?;
    // The child ends are closed here, so the pipes report end of file (a terminal master EIO)
    // once the exec's processes are gone.
    let Stdio {
        child,
        stdin,
        stdout,
        stderr,
        tty,
    } = stdio;
    drop((child, control_child));
    if let Some(master) = tty {
        agent.execs.attach_tty(id, master);
    }
    let setup = || -> io::Result<Started> {
        control.set_nonblocking(true)?;
        // A terminal master is not a pipe, but reads and writes on it behave like one's.
        let (stdin, stdout) = match request.tty {
            Some(_) => (
                stdin
                    .map(pipe::Sender::from_owned_fd_unchecked)
                    .transpose()?,
                pipe::Receiver::from_owned_fd_unchecked(stdout)?,
            ),
            None => (
                stdin.map(pipe::Sender::from_owned_fd).transpose()?,
                pipe::Receiver::from_owned_fd(stdout)?,
            ),
        };
        Ok(Started {
            id,
            pid,
            exit: ExitWatch::new(pidfd.clone())?,
            stdin,
            stdout,
            stderr: stderr.map(pipe::Receiver::from_owned_fd).transpose()?,
            control: tokio::net::UnixStream::from_std(control)?,
        })
    };
    setup().map_err(|e| {
        let _ = pidfd.send_signal(libc::SIGKILL);
        reap_later(agent.clone(), id, pidfd);
        internal("registering its pipes", e)
    })
}

/// Reaps an exec-init that was killed before its exec got going, then forgets it.
fn reap_later(agent: Arc<Agent>, id: u64, pidfd: PidFd) {
    tokio::spawn(async move {
        if let Ok(exit) = ExitWatch::new(pidfd) {
            let _ = exit.wait().await;
        }
        // Once forgotten, PID 1's orphan reaper may reap it if the wait above could not.
        agent.execs.remove(id);
    });
}

/// `(read end, write end)`, both close-on-exec.
fn pipe_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC)?)
}

#[allow(clippy::too_many_arguments)]
async fn run(
    agent: Arc<Agent>,
    fate: ExecFate,
    request: ExecRequest,
    started: Started,
    body: RecvStream,
    decoder: FrameDecoder,
    respond: SendResponse<Bytes>,
) {
    let deadline = request
        .timeout_ms
        .map(|ms| Instant::now() + Duration::from_millis(ms));
    let attachable = request.attachable;
    let config = ExecInitConfig {
        root: agent.config.root.clone(),
        request,
    };
    let stdin = Arc::new(tokio::sync::Mutex::new(started.stdin));
    let mut stdin_pump = tokio::spawn(pump_stdin(body, decoder, stdin.clone(), attachable));
    let attachments = attachable.then(|| agent.execs.make_attachable(started.id));
    if let Some(label) = config.request.label.clone() {
        agent.execs.label(started.id, label);
    }
    let mut exec = Supervisor::new(
        started.id,
        started.exit,
        started.stdout,
        started.stderr,
        deadline,
        fate,
        attachments,
    );
    let mut control = started.control;
    let mut served = exec
        .serve(started.pid, &mut control, &config, respond)
        .await;
    // A takeover: the new stream's body is the command's stdin from now on.
    while let Ok(Served::Attached(attach)) = served {
        stdin_pump.abort();
        let body = pump_stdin(attach.body, FrameDecoder::new(), stdin.clone(), true);
        stdin_pump = tokio::spawn(body);
        served = exec
            .attached(started.pid, &mut control, attach.fate, attach.respond)
            .await;
    }
    if let Err(e) = served {
        log!("exec {}: {e}", started.id);
    }
    exec.kill_and_reap().await;
    stdin_pump.abort();
    agent.execs.remove(started.id);
}

/// The command's stdin while it is open: shared by the body pumps of the streams that carry it (an
/// attachable exec's takeovers each bring one).
type SharedStdin = Arc<tokio::sync::Mutex<Option<pipe::Sender>>>;

/// Copies `Stdin` frames from the request body into the command's stdin, releasing HTTP/2 window
/// only after the bytes are in the pipe (so the host cannot outrun a command that reads slowly).
/// End of the request body closes stdin; so does a failed body, unless `keep_on_failure` (an
/// attachable exec, whose next host brings the rest). Once the command stops reading (broken
/// pipe), the rest of the body is discarded.
async fn pump_stdin(
    mut body: RecvStream,
    mut decoder: FrameDecoder,
    stdin: SharedStdin,
    keep_on_failure: bool,
) {
    let close = || async { *stdin.lock().await = None };
    let mut unreleased = 0;
    loop {
        loop {
            match decoder.next_frame() {
                Ok(Some(frame)) if frame.kind == FrameKind::Stdin => {
                    let mut pipe = stdin.lock().await;
                    if let Some(sender) = pipe.as_mut() {
                        if sender.write_all(&frame.payload).await.is_err() {
                            *pipe = None;
                        }
                    }
                }
                Ok(Some(frame)) => {
                    log!(
                        "exec request body: unexpected {:?} frame ignored",
                        frame.kind
                    );
                }
                Ok(None) => break,
                Err(e) => {
                    log!("exec request body: {e}; closing stdin");
                    return close().await;
                }
            }
        }
        let _ = body
            .flow_control()
            .release_capacity(std::mem::take(&mut unreleased));
        match body.data().await {
            Some(Ok(chunk)) => {
                decoder.push(&chunk);
                unreleased = chunk.len();
            }
            Some(Err(_)) if keep_on_failure => return,
            Some(Err(_)) | None => return close().await,
        }
    }
}
