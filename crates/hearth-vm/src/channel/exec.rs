//! Host side of `POST /v1/exec`: [`AgentClient::exec`] starts a command; [`ExecHandle`] yields its
//! output in order and then its exit status; [`ExecStdin`] feeds its stdin. [`AgentClient::attach`]
//! takes over a command started `attachable` (`POST /v1/attach`): a VM restored with one running
//! keeps it waiting for its new host.
//!
//! Flow control: output is pulled, never pushed. The HTTP/2 window for bytes already received is
//! released only when the caller comes back for the next event, i.e. after it has dealt with the
//! previous one, so a command printing gigabytes stalls in the guest instead of filling host memory:
//! an exec whose output nobody reads holds at most `tuning::HTTP2_STREAM_WINDOW` (1 MiB) of it on the
//! host (all requests of a client together at most `tuning::HTTP2_CONNECTION_WINDOW`, 4 MiB).
//!
//! Starting is bounded: the agent must report `Started` within [`super::ANSWER_DEADLINE`].

use bytes::Bytes;
use h2::{RecvStream, SendStream};
use hearth_proto::{
    AgentError, AgentRequest, ExecRequest, ExecStarted, ExitStatus, Frame, FrameDecoder, FrameKind,
    TtySize, MAX_PAYLOAD,
};

use tokio::sync::OwnedSemaphorePermit;

use super::{
    bounded, closed_or, read_response, send_all, AgentClient, ChannelError, ANSWER_DEADLINE,
};

/// A chunk of the command's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecOutput {
    Stdout(Bytes),
    Stderr(Bytes),
}

/// Everything a command printed, and how it ended ([`ExecHandle::output`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecResult {
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    pub status: ExitStatus,
}

/// A running command. Dropping it (and its stdin) cancels the request; the agent then kills the
/// command's process tree.
pub struct ExecHandle {
    started: ExecStarted,
    client: AgentClient,
    stdin: Option<ExecStdin>,
    body: RecvStream,
    decoder: FrameDecoder,
    /// Received bytes whose window is not yet released (see the module doc).
    unreleased: usize,
    status: Option<ExitStatus>,
    /// Counts this exec against [`super::MAX_CONCURRENT_REQUESTS`].
    _permit: OwnedSemaphorePermit,
}

/// The command's stdin. Dropping it or calling [`ExecStdin::close`] closes stdin (EOF).
pub struct ExecStdin {
    send: SendStream<Bytes>,
    closed: bool,
}

impl AgentClient {
    /// Starts a command. Returns once the agent reports that its process exists; fails with
    /// [`ChannelError::Unresponsive`] if that takes longer than [`ANSWER_DEADLINE`] (dropping the
    /// request, so the agent kills whatever it started).
    pub async fn exec(&self, request: ExecRequest) -> Result<ExecHandle, ChannelError> {
        bounded("an exec request", ANSWER_DEADLINE, self.start_exec(request)).await
    }

    /// Takes over exec `exec` of this agent, started `attachable` (in this VM, or in the VM this
    /// one was restored from): its output from now on comes through the returned handle, and with
    /// `stdin` its stdin is fed through it (without, its stdin is closed). Bounded like
    /// [`AgentClient::exec`].
    pub async fn attach(&self, exec: u64, stdin: bool) -> Result<ExecHandle, ChannelError> {
        let request = AgentRequest::Attach { exec };
        let opened = self.open_exec(&request, Bytes::new(), stdin);
        bounded("an exec attach request", ANSWER_DEADLINE, opened).await
    }

    async fn start_exec(&self, request: ExecRequest) -> Result<ExecHandle, ChannelError> {
        let start = Frame::json(FrameKind::ExecStart, &request)
            .encode()
            .map_err(|e| ChannelError::Protocol(format!("exec request too large: {e}")))?;
        self.open_exec(&AgentRequest::Exec, start, request.stdin)
            .await
    }

    /// Sends `request` with `first` as the start of its body (the body ends there unless `stdin`)
    /// and waits for the `Started` frame of the answer.
    async fn open_exec(
        &self,
        request: &AgentRequest,
        first: Bytes,
        stdin: bool,
    ) -> Result<ExecHandle, ChannelError> {
        let (response, mut send, permit) = self.start(request, false).await?;
        send_all(&mut send, first, !stdin).await?;
        let body = read_response(response).await?;
        let mut handle = ExecHandle {
            started: ExecStarted { id: 0, pid: 0 },
            client: self.clone(),
            stdin: stdin.then_some(ExecStdin {
                send,
                closed: false,
            }),
            body,
            decoder: FrameDecoder::new(),
            unreleased: 0,
            status: None,
            _permit: permit,
        };
        let first = handle.next_frame().await?;
        handle.started = match first {
            Some(frame) if frame.kind == FrameKind::Started => {
                frame.parse_json().map_err(protocol)?
            }
            Some(frame) => {
                return Err(ChannelError::Protocol(format!(
                    "exec answer began with {:?}, not Started",
                    frame.kind
                )))
            }
            None => {
                return Err(ChannelError::Protocol(
                    "exec answer ended before Started".into(),
                ))
            }
        };
        Ok(handle)
    }
}

fn protocol(e: impl std::fmt::Display) -> ChannelError {
    ChannelError::Protocol(e.to_string())
}

impl ExecHandle {
    /// The agent's id for this exec (for [`AgentClient::signal`]).
    pub fn id(&self) -> u64 {
        self.started.id
    }

    /// PID of the exec's init process in the guest.
    pub fn pid(&self) -> u32 {
        self.started.pid
    }

    /// The stdin writer, if the request asked for stdin (once).
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.stdin.take()
    }

    /// Sends `signal` to the command.
    pub async fn signal(&self, signal: i32) -> Result<(), ChannelError> {
        self.client.signal(self.started.id, signal).await
    }

    /// Sets the size of the command's terminal (the exec must have been started with a `tty`).
    pub async fn resize(&self, size: TtySize) -> Result<(), ChannelError> {
        self.client.resize(self.started.id, size).await
    }

    /// Leaves the exec to the agent as a host that went away would ([`AgentClient::disconnect`]:
    /// the whole connection ends): an attachable exec is parked for the next host instead of
    /// killed, as dropping the handle (a reset of its stream) would.
    pub fn disconnect(self) {
        self.client.disconnect();
    }

    /// The exit status once the output has been read to the end.
    pub fn status(&self) -> Option<ExitStatus> {
        self.status
    }

    /// The next chunk of output, or `None` once the command has exited and all its output was
    /// returned (then [`ExecHandle::status`] is set).
    pub async fn next_output(&mut self) -> Result<Option<ExecOutput>, ChannelError> {
        let Some(frame) = self.next_frame().await? else {
            return Ok(None);
        };
        match frame.kind {
            FrameKind::Stdout => Ok(Some(ExecOutput::Stdout(frame.payload))),
            FrameKind::Stderr => Ok(Some(ExecOutput::Stderr(frame.payload))),
            FrameKind::Exit => {
                self.status = Some(frame.parse_json().map_err(protocol)?);
                Ok(None)
            }
            FrameKind::Error => {
                let error: AgentError = frame.parse_json().map_err(protocol)?;
                Err(ChannelError::Agent(error))
            }
            other => Err(ChannelError::Protocol(format!(
                "unexpected {other:?} frame in exec output"
            ))),
        }
    }

    /// Discards remaining output and returns the exit status.
    pub async fn wait(mut self) -> Result<ExitStatus, ChannelError> {
        self.stdin = None;
        while self.next_output().await?.is_some() {}
        self.status.ok_or_else(|| {
            ChannelError::Protocol("exec output ended without an exit status".into())
        })
    }

    /// Collects all output in memory and returns it with the exit status. For commands with
    /// bounded output; stream with [`ExecHandle::next_output`] otherwise.
    pub async fn output(mut self) -> Result<ExecResult, ChannelError> {
        self.stdin = None;
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(output) = self.next_output().await? {
            match output {
                ExecOutput::Stdout(bytes) => stdout.extend_from_slice(&bytes),
                ExecOutput::Stderr(bytes) => stderr.extend_from_slice(&bytes),
            }
        }
        let status = self.status.ok_or_else(|| {
            ChannelError::Protocol("exec output ended without an exit status".into())
        })?;
        Ok(ExecResult {
            stdout,
            stderr,
            status,
        })
    }

    /// The next body frame; `None` at the end of the response body (or after `Exit`).
    async fn next_frame(&mut self) -> Result<Option<Frame>, ChannelError> {
        // The caller is back: whatever it was handed has been dealt with.
        self.release();
        loop {
            if self.status.is_some() {
                return Ok(None);
            }
            if let Some(frame) = self.decoder.next_frame().map_err(protocol)? {
                return Ok(Some(frame));
            }
            self.release();
            match self.body.data().await {
                Some(Ok(chunk)) => {
                    self.unreleased += chunk.len();
                    self.decoder.push(&chunk);
                }
                Some(Err(e)) => return Err(closed_or(e)),
                None => {
                    self.decoder.finish().map_err(protocol)?;
                    return Err(ChannelError::Protocol(
                        "exec output ended without an exit status".into(),
                    ));
                }
            }
        }
    }

    fn release(&mut self) {
        if self.unreleased > 0 {
            let _ = self.body.flow_control().release_capacity(self.unreleased);
            self.unreleased = 0;
        }
    }
}

impl ExecStdin {
    /// Writes `data` to the command's stdin, waiting while the agent has not consumed earlier data.
    pub async fn write(&mut self, data: &[u8]) -> Result<(), ChannelError> {
        for piece in data.chunks(MAX_PAYLOAD) {
            let frame = Frame::new(FrameKind::Stdin, Bytes::copy_from_slice(piece))
                .encode()
                .map_err(protocol)?;
            send_all(&mut self.send, frame, false).await?;
        }
        Ok(())
    }

    /// Closes stdin: the command reads end of file.
    pub async fn close(mut self) -> Result<(), ChannelError> {
        self.closed = true;
        send_all(&mut self.send, Bytes::new(), true).await
    }
}

impl Drop for ExecStdin {
    fn drop(&mut self) {
        if !self.closed {
            let _ = self.send.send_data(Bytes::new(), true);
        }
    }
}
