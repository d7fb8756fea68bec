//! The agent's watch over one running exec: forwards output frames within the HTTP/2 send window,
//! reaps the exec-init, enforces the timeout, kills the exec when its session ends or the host
//! resets the stream, and reports the exit status. When the whole connection fails, the session's
//! verdict ([`ExecFate`]) decides: killed, or (a restored VM's new host took over) detached: it runs
//! on to its end with its output read and discarded. An exec started attachable is instead parked
//! whenever its host goes (its session ends, or the VM was restored) until a host attaches (see
//! [`super::attach`]), which hands the supervisor a new stream to serve.

use std::io;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::server::SendResponse;
use h2::SendStream;
use hearth_proto::{frame, AgentError, ErrorKind, ExecStarted, ExitStatus, Frame, FrameKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::time::Instant;

use super::attach::{Attach, Attachments, PARK_GRACE};
use super::spawn::{ExitWatch, ProcessEnd};
use crate::exec_init::ExecInitConfig;
use crate::session::ExecFate;
use crate::{log, server};

/// Bytes read from a pipe per output frame.
const CHUNK: usize = 32 * 1024;
/// How long an exec whose connection failed waits for its session's verdict (kill, or run on
/// detached) before it is killed anyway; longer than the session's own wait for the next handshake.
const LOST_VERDICT: Duration = Duration::from_secs(2 * crate::session::ORPHAN_GRACE.as_secs());
/// How long an exec killed for its timeout is waited for before it is reported killed anyway. Its
/// processes die with its exec-init, but a namespace of thousands of them (a fork bomb) takes an
/// emulated guest tens of seconds to tear down, and one that cannot die yet (frozen, or stuck in
/// the kernel) holds the exec-init's end forever: the caller learns at once, and the agent reaps
/// it in the background (its slot stays taken until then). Output after the kill is dropped.
const KILLED_REPORT_AFTER: Duration = Duration::from_secs(1);

/// Why the agent killed an exec.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum KillReason {
    Timeout,
    SessionEnded,
    HostGone,
}

/// One running exec as seen by the agent.
pub(super) struct Supervisor {
    id: u64,
    exit: ExitWatch,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    /// Set once the exec-init has been reaped.
    ended: Option<ProcessEnd>,
    killed: Option<KillReason>,
    killed_at: Option<Instant>,
    deadline: Option<Instant>,
    fate: ExecFate,
    /// The connection failed (not a reset of this stream): output waits for the session's verdict
    /// (killed after [`LOST_VERDICT`] without one).
    host_lost: Option<h2::Error>,
    lost_at: Option<Instant>,
    /// Runs on with no host: output is discarded.
    detached: bool,
    /// Takeovers, for an exec started attachable.
    attachments: Option<Attachments>,
    /// Parked since (attachable, its host went): its pipes are not read until a host attaches.
    parked_at: Option<Instant>,
}

/// How serving one stream of an exec ended.
pub(super) enum Served {
    /// The exec ended (its status sent, if the host was still there).
    Ended,
    /// A host took the exec over: serve this stream next (see [`Supervisor::answer`]).
    Attached(Attach),
}

impl Supervisor {
    pub(super) fn new(
        id: u64,
        exit: ExitWatch,
        stdout: pipe::Receiver,
        stderr: Option<pipe::Receiver>,
        deadline: Option<Instant>,
        fate: ExecFate,
        attachments: Option<Attachments>,
    ) -> Supervisor {
        Supervisor {
            id,
            exit,
            stdout: Some(stdout),
            stderr,
            ended: None,
            killed: None,
            killed_at: None,
            deadline,
            fate,
            host_lost: None,
            lost_at: None,
            detached: false,
            attachments,
            parked_at: None,
        }
    }

    /// Sends the exec-init its config, answers the request and streams the exec to its end or
    /// until a host takes it over.
    pub(super) async fn serve(
        &mut self,
        pid: i32,
        control: &mut tokio::net::UnixStream,
        config: &ExecInitConfig,
        respond: SendResponse<Bytes>,
    ) -> Result<Served, AgentError> {
        let config = serde_json::to_vec(config).expect("exec-init config serializes");
        let sent = async {
            control.write_all(&config).await?;
            control.shutdown().await
        };
        if let Err(e) = sent.await {
            let error = config_not_taken(self.id, &e);
            server::respond_error(respond, &error);
            return Err(error);
        }
        self.answer(pid, control, respond).await
    }

    /// Serves the stream of a host that took the exec over, on its session's `fate`.
    pub(super) async fn attached(
        &mut self,
        pid: i32,
        control: &mut tokio::net::UnixStream,
        fate: ExecFate,
        respond: SendResponse<Bytes>,
    ) -> Result<Served, AgentError> {
        log!("exec {}: attached by a new host", self.id);
        self.fate = fate;
        (self.host_lost, self.lost_at, self.parked_at) = (None, None, None);
        self.detached = false;
        if let Some(attachments) = &self.attachments {
            attachments.set_parked(false);
        }
        self.answer(pid, control, respond).await
    }

    /// Answers a request for the exec (`Started`), then streams it to its end (`Exit`) or until a
    /// host takes it over.
    async fn answer(
        &mut self,
        pid: i32,
        control: &mut tokio::net::UnixStream,
        mut respond: SendResponse<Bytes>,
    ) -> Result<Served, AgentError> {
        let host_gone =
            |e: h2::Error| AgentError::internal(format!("host stopped receiving output: {e}"));
        let mut send = respond
            .send_response(http::Response::new(()), false)
            .map_err(host_gone)?;
        let started = ExecStarted {
            id: self.id,
            pid: pid as u32,
        };
        server::send_all(
            &mut send,
            Frame::json(FrameKind::Started, &started)
                .encode()
                .expect("small frame"),
            false,
        )
        .await
        .map_err(host_gone)?;
        match self.stream_output(&mut send).await {
            Ok(None) => {}
            // The old stream is dropped: its host, if still there, sees it reset.
            Ok(Some(attach)) => return Ok(Served::Attached(attach)),
            Err(e) => {
                self.kill(KillReason::HostGone);
                return Err(host_gone(e));
            }
        }
        let status = self.exit_status(control).await;
        if self.detached {
            log!("exec {} (detached) ended: {status}", self.id);
            return Ok(Served::Ended);
        }
        let last = Frame::json(FrameKind::Exit, &status)
            .encode()
            .expect("small frame");
        server::send_all(&mut send, last, true)
            .await
            .map_err(host_gone)?;
        Ok(Served::Ended)
    }

    /// Forwards output until both pipes reach end of file and the exec-init has been reaped,
    /// killing the exec on timeout or session end meanwhile, or until a host takes it over (then
    /// output not yet sent is dropped: part of a frame may have gone out on the old stream).
    /// Detached, it reads and discards; parked, it does not read.
    async fn stream_output(
        &mut self,
        send: &mut SendStream<Bytes>,
    ) -> Result<Option<Attach>, h2::Error> {
        let mut stdout_buf = vec![0u8; CHUNK];
        let mut stderr_buf = vec![0u8; CHUNK];
        let mut pending = Bytes::new();
        loop {
            if self.detached {
                pending = Bytes::new();
            }
            if self.killed.is_some() && !self.detached {
                if let Some(e) = self.host_lost.take() {
                    return Err(e);
                }
            }
            let output_done = self.stdout.is_none() && self.stderr.is_none();
            if pending.is_empty() && output_done && self.ended.is_some() {
                return Ok(None);
            }
            let parked = self.parked_at.is_some();
            let can_read = pending.is_empty() && !parked;
            let alive = self.ended.is_none() && self.killed.is_none();
            let sending = !self.detached && self.host_lost.is_none();
            tokio::select! {
                event = poll_send(send, !pending.is_empty()), if sending => match event {
                    SendEvent::Capacity(n) => {
                        let chunk = pending.split_to(n.min(pending.len()));
                        match send.send_data(chunk, false) {
                            Ok(()) => send.reserve_capacity(pending.len()),
                            Err(e) => {
                                self.host_lost = Some(e);
                                self.lost_at = Some(Instant::now());
                            }
                        }
                    }
                    // The host ended this exec: kill it.
                    SendEvent::Reset(e) => return Err(e),
                    // The connection failed: the session's end says what becomes of the exec.
                    SendEvent::Gone(e) => {
                        self.host_lost = Some(e);
                        self.lost_at = Some(Instant::now());
                    }
                },
                n = read_pipe(&mut self.stdout, &mut stdout_buf), if can_read => {
                    pending = output_frame(FrameKind::Stdout, n, &mut self.stdout, &stdout_buf);
                    if sending {
                        send.reserve_capacity(pending.len());
                    }
                }
                n = read_pipe(&mut self.stderr, &mut stderr_buf), if can_read => {
                    pending = output_frame(FrameKind::Stderr, n, &mut self.stderr, &stderr_buf);
                    if sending {
                        send.reserve_capacity(pending.len());
                    }
                }
                end = self.exit.wait(), if self.ended.is_none() => match end {
                    Ok(end) => self.ended = Some(end),
                    Err(e) => {
                        log!("exec {}: waiting for exec-init: {e}", self.id);
                        self.ended = Some(ProcessEnd::Signaled(libc::SIGKILL));
                    }
                },
                _ = sleep_until(self.deadline), if alive => self.kill(KillReason::Timeout),
                // Killed for its timeout and still dying: reported now, reaped later.
                _ = sleep_until(self.killed_at.map(|at| at + KILLED_REPORT_AFTER)),
                    if self.killed == Some(KillReason::Timeout) && self.ended.is_none()
                        && !self.detached => return Ok(None),
                _ = sleep_until(self.lost_at.map(|at| at + LOST_VERDICT)),
                    if alive && !self.detached && !parked => self.host_gone(KillReason::HostGone),
                _ = self.fate.kill.cancelled(), if alive && !self.detached && !parked => {
                    self.host_gone(KillReason::SessionEnded)
                }
                _ = self.fate.keep.cancelled(), if !self.detached && !parked => {
                    if self.attachments.is_some() {
                        self.park("its host went with the saved VM");
                    } else {
                        log!("exec {}: its host went with the saved VM; running on, detached", self.id);
                        self.detached = true;
                    }
                }
                _ = sleep_until(self.parked_at.map(|at| at + PARK_GRACE)), if parked => {
                    log!("exec {}: no host attached within {PARK_GRACE:?}", self.id);
                    (self.parked_at, self.detached) = (None, true);
                    if let Some(attachments) = &self.attachments {
                        attachments.set_parked(false);
                    }
                    self.kill(KillReason::HostGone);
                }
                Some(attach) = next_attach(&mut self.attachments) => return Ok(Some(attach)),
            }
        }
    }

    /// Its host is gone for good (`reason`): an attachable exec waits for another, any other is
    /// killed.
    fn host_gone(&mut self, reason: KillReason) {
        match self.attachments.is_some() {
            true => self.park("its host is gone"),
            false => self.kill(reason),
        }
    }

    /// Stops reading the exec's output until a host attaches (at most [`PARK_GRACE`]).
    fn park(&mut self, why: &str) {
        log!("exec {}: {why}; parked for the next host", self.id);
        self.parked_at = Some(Instant::now());
        if let Some(attachments) = &self.attachments {
            attachments.set_parked(true);
        }
    }

    fn kill(&mut self, reason: KillReason) {
        if self.ended.is_none() && self.killed.is_none() {
            if reason != KillReason::Timeout {
                log!("exec {}: killing its process tree ({reason:?})", self.id);
            }
            self.killed = Some(reason);
            self.killed_at = Some(Instant::now());
            // The exec-init is PID 1 of the exec's namespace: its death kills every process there.
            let _ = self.exit.pidfd().send_signal(libc::SIGKILL);
        }
    }

    /// Makes sure the exec-init is dead and reaped (after any way `serve` ended).
    pub(super) async fn kill_and_reap(&mut self) {
        if self.ended.is_none() {
            self.kill(KillReason::HostGone);
            match self.exit.wait().await {
                Ok(end) => self.ended = Some(end),
                Err(e) => log!("exec {}: reaping exec-init: {e}", self.id),
            }
        }
    }

    /// The command's status as the exec-init reported it on the control socket, or else how the
    /// exec-init itself ended (killed by the agent, or failed before it could report).
    async fn exit_status(&self, control: &mut tokio::net::UnixStream) -> ExitStatus {
        let mut report = Vec::new();
        let read = match self.ended {
            // Killed and not yet ended: nothing will be reported before it has died.
            None if self.killed.is_some() => Ok(Ok(0)),
            _ => {
                tokio::time::timeout(Duration::from_secs(1), control.read_to_end(&mut report)).await
            }
        };
        let reported = match read {
            Ok(Ok(_)) if !report.is_empty() => serde_json::from_slice::<ExitStatus>(&report).ok(),
            _ => None,
        };
        let mut status = match (reported, self.ended) {
            (Some(status), _) => status,
            (None, Some(ProcessEnd::Exited(code))) => ExitStatus::exited(code),
            (None, Some(ProcessEnd::Signaled(signal))) => ExitStatus::signaled(signal),
            (None, None) => ExitStatus::signaled(libc::SIGKILL),
        };
        status.timed_out = self.killed == Some(KillReason::Timeout);
        status
    }
}

enum SendEvent {
    Capacity(usize),
    /// The host reset this stream.
    Reset(h2::Error),
    /// The connection failed.
    Gone(h2::Error),
}

/// Resolves when the host reset the stream (or the connection failed) or, if `want_capacity`,
/// when some send window is free.
fn poll_send(
    send: &mut SendStream<Bytes>,
    want_capacity: bool,
) -> impl std::future::Future<Output = SendEvent> + '_ {
    std::future::poll_fn(move |cx| {
        use std::task::Poll;
        if let Poll::Ready(reset) = send.poll_reset(cx) {
            return Poll::Ready(match reset {
                // The host dropped the exec (RST_STREAM CANCEL).
                Ok(h2::Reason::CANCEL) => SendEvent::Reset(h2::Error::from(h2::Reason::CANCEL)),
                // Any other reason is the connection's failure, reported to each stream.
                Ok(reason) => SendEvent::Gone(h2::Error::from(reason)),
                Err(e) => SendEvent::Gone(e),
            });
        }
        if !want_capacity {
            return Poll::Pending;
        }
        server::poll_capacity(send, cx).map(|capacity| match capacity {
            Ok(n) => SendEvent::Capacity(n),
            Err(e) => SendEvent::Gone(e),
        })
    })
}

/// The next takeover of an attachable exec; never resolves for another.
async fn next_attach(attachments: &mut Option<Attachments>) -> Option<Attach> {
    match attachments {
        Some(attachments) => attachments.takeovers.recv().await,
        None => std::future::pending().await,
    }
}

/// Reads from a pipe that is still open; never resolves for a closed one.
async fn read_pipe(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(pipe) => pipe.read(buf).await,
        None => std::future::pending().await,
    }
}

/// The frame for a pipe read; closes the pipe on end of file or error (empty result). A terminal
/// master reads EIO once every slave descriptor is closed: that is its end of file.
fn output_frame(
    kind: FrameKind,
    read: io::Result<usize>,
    pipe: &mut Option<pipe::Receiver>,
    buf: &[u8],
) -> Bytes {
    match read {
        Ok(n) if n > 0 => {
            let mut out = BytesMut::with_capacity(frame::HEADER_LEN + n);
            frame::encode_into(kind, &buf[..n], &mut out).expect("chunk is below the frame limit");
            out.freeze()
        }
        _ => {
            *pipe = None;
            Bytes::new()
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The answer when exec `id`'s exec-init did not take its config: it died first (a broken pipe or
/// reset) because something in the guest killed it, the OOM killer or a workload that killed every
/// process, and the request may succeed once the guest has recovered, as with its other
/// exhaustion; any other failure is the agent's own.
fn config_not_taken(id: u64, e: &io::Error) -> AgentError {
    match e.kind() {
        io::ErrorKind::BrokenPipe | io::ErrorKind::ConnectionReset => AgentError::new(
            ErrorKind::Exhausted,
            format!(
                "exec {id}: its process was killed in the guest before it started the command \
                 (out of memory, or a kill of every process?): {e}"
            ),
        ),
        _ => AgentError::internal(format!("exec {id}: sending exec-init its config: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_exec_init_killed_before_it_took_its_config_is_the_guests_exhaustion() {
        for kind in [io::ErrorKind::BrokenPipe, io::ErrorKind::ConnectionReset] {
            let e = config_not_taken(3, &io::Error::from(kind));
            assert_eq!(e.kind, ErrorKind::Exhausted, "{}", e.message);
            assert!(e.message.contains("killed in the guest"), "{}", e.message);
        }
        let e = config_not_taken(3, &io::Error::other("something else"));
        assert_eq!(e.kind, ErrorKind::Internal);
    }
}
