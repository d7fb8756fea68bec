//! Sessions: the guest side of the handshake, then one HTTP/2 server connection over the stream.
//!
//! A session ends when the stream reports end of file or an error, or when HTTP/2 fails (for
//! example because a new host sent `HELLO` into the old session). Ending a session cancels its
//! token, which kills the process trees of every exec it started. [`serve_port`] runs sessions on a
//! stream that outlives them (the virtio-serial port) forever; [`serve_listener`] runs one session
//! per accepted connection (vsock, Unix sockets). In a template VM the handshake first waits for a
//! RESUME line and applies it through the agent's [`ResumeGate`].
//!
//! One exception keeps execs alive: a VM saved with its session open and restored (a paused
//! sandbox resumed) hears its new host in the middle of the old session, which then fails with an
//! HTTP/2 protocol error. On the port, such a session's execs are not killed at once but held
//! ([`ExecFate`]) until the next handshake shows who spoke: a host that sent RESUME to this running
//! agent restored the VM, and the execs run on, detached (their output is discarded; their
//! processes, files and sockets are the workload's as before); any other host, end of file, or no
//! handshake within [`ORPHAN_GRACE`] kills them as usual.
//!
//! Execs started attachable are never killed by a session's end: they wait for a host to attach
//! (see `crate::exec::attach`).

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hearth_proto::handshake::{self, HandshakeLine, LineBuffer, PrefaceMatch};
use hearth_proto::tuning;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_util::sync::CancellationToken;

use crate::resume::{ResumeGate, Resumed};
use crate::stream::{prefixed, FdStream};
use crate::{log, server, Agent};

/// How long to wait before reading again after end of file on a port (the host is disconnected).
const RECONNECT_POLL: Duration = Duration::from_millis(50);
/// How long the execs of a session cut short by a protocol error wait for the next handshake to
/// say whether the VM was restored (then they run on) before they are killed.
pub const ORPHAN_GRACE: Duration = Duration::from_secs(10);

/// How a session's execs end when the session does: `kill` cancelled, they are killed (the rule);
/// `keep` cancelled, they run on detached from any host (a restored VM's new host took over).
#[derive(Clone, Default)]
pub struct ExecFate {
    pub kill: CancellationToken,
    pub keep: CancellationToken,
}

impl ExecFate {
    fn child(&self) -> ExecFate {
        ExecFate {
            kill: self.kill.child_token(),
            keep: self.keep.child_token(),
        }
    }
}

/// How a session ended, for its execs.
enum Ended {
    /// Their host is gone: kill them.
    HostGone,
    /// Cut short by bytes that are not HTTP/2 (a new host's handshake): the next handshake decides.
    Interrupted,
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("stream closed (host disconnected)")]
    Eof,
    #[error("reading or writing the agent stream failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("HTTP/2 failed: {0}")]
    Http2(#[from] h2::Error),
    #[error("applying RESUME failed: {0}")]
    Resume(String),
}

impl SessionError {
    /// Bytes that are not HTTP/2 ended the session: a new host's handshake, or garbage.
    fn is_interruption(&self) -> bool {
        matches!(self, SessionError::Http2(e) if is_interruption(e))
    }
}

fn is_interruption(e: &h2::Error) -> bool {
    e.is_go_away() && !e.is_remote()
}

/// Serves sessions on `port` for ever. End of file means the host side is disconnected; the port
/// stays open (closing and reopening a virtio-serial port loses data) and is polled again after a
/// short sleep. A session interrupted by a new host's handshake (a VM resumed or forked from its
/// saved state: the old session reads the new host's RESUME and HELLO lines) is followed by the
/// next at once, as that host is connected and waiting: sleeping first cost every resume and fork
/// the sleep plus one more WAITING/HELLO round trip. Each session starts with a fresh reactor
/// registration (see [`FdStream`]).
pub async fn serve_port(agent: Arc<Agent>, mut port: FdStream) -> ! {
    // The execs of the last session, when it was interrupted: held until the next handshake.
    let mut held: Option<ExecFate> = None;
    loop {
        if let Err(e) = port.reregister() {
            log!("re-registering the agent port: {e}");
        }
        let interrupted = match run_port_session(&agent, &mut port, &mut held).await {
            Ok(()) => {
                log!("session ended");
                false
            }
            Err(SessionError::Eof) => false,
            Err(e) => {
                log!("session ended: {e}");
                e.is_interruption()
            }
        };
        if !interrupted {
            tokio::time::sleep(RECONNECT_POLL).await;
        }
    }
}

/// One session on the port; `held` are the execs of an interrupted previous session, decided on
/// by this session's handshake, and this session's own execs if it is interrupted too.
async fn run_port_session(
    agent: &Arc<Agent>,
    port: &mut FdStream,
    held: &mut Option<ExecFate>,
) -> Result<(), SessionError> {
    let greeted = answer_hello(port, &agent.resume).await;
    if let Some(fate) = held.take() {
        match &greeted {
            Ok((_, true)) => {
                log!("the VM was restored: the previous session's execs run on, detached");
                fate.keep.cancel();
            }
            _ => fate.kill.cancel(),
        }
    }
    let (prefix, _) = greeted?;
    let fate = ExecFate::default();
    let (result, ended) = serve_http2(agent, port, prefix, &fate).await;
    match ended {
        Ended::Interrupted => {
            let kill = fate.kill.clone();
            tokio::spawn(async move {
                tokio::time::sleep(ORPHAN_GRACE).await;
                kill.cancel();
            });
            *held = Some(fate);
        }
        Ended::HostGone => fate.kill.cancel(),
    }
    result
}

/// Accepts connections for ever, one session per connection.
pub async fn serve_listener<L: Listener>(
    agent: Arc<Agent>,
    mut listener: L,
) -> std::io::Result<()> {
    loop {
        let stream = listener.accept().await?;
        let agent = agent.clone();
        tokio::spawn(async move {
            let mut stream = stream;
            match run_session(&agent, &mut stream).await {
                Ok(()) | Err(SessionError::Eof) => {}
                Err(e) => log!("session ended: {e}"),
            }
        });
    }
}

/// Something that yields one stream per host connection.
pub trait Listener: Send + 'static {
    type Stream: AsyncRead + AsyncWrite + Unpin + Send + 'static;
    fn accept(&mut self)
        -> impl std::future::Future<Output = std::io::Result<Self::Stream>> + Send;
}

impl Listener for tokio::net::UnixListener {
    type Stream = tokio::net::UnixStream;
    async fn accept(&mut self) -> std::io::Result<tokio::net::UnixStream> {
        Ok(tokio::net::UnixListener::accept(self).await?.0)
    }
}

/// One session: handshake, then HTTP/2 until the host goes away; its execs are killed when it
/// ends.
pub async fn run_session<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &Arc<Agent>,
    io: &mut S,
) -> Result<(), SessionError> {
    let (prefix, _) = answer_hello(io, &agent.resume).await?;
    let fate = ExecFate::default();
    let (result, _) = serve_http2(agent, io, prefix, &fate).await;
    fate.kill.cancel();
    result
}

/// HTTP/2 on `io` (after the handshake, `prefix` read past it) until the host goes away; says how
/// the session ended. `fate` reaches every exec it starts. Should this future be dropped, the execs
/// are killed.
async fn serve_http2<S: AsyncRead + AsyncWrite + Unpin>(
    agent: &Arc<Agent>,
    io: &mut S,
    prefix: Vec<u8>,
    fate: &ExecFate,
) -> (Result<(), SessionError>, Ended) {
    let guard = fate.kill.clone().drop_guard();
    let handshake = h2::server::Builder::new()
        .initial_window_size(tuning::HTTP2_STREAM_WINDOW)
        .initial_connection_window_size(tuning::HTTP2_CONNECTION_WINDOW)
        .max_frame_size(tuning::HTTP2_MAX_FRAME)
        .max_concurrent_streams(1024)
        .handshake::<_, Bytes>(prefixed(prefix, io))
        .await;
    let mut connection = match handshake {
        Ok(connection) => connection,
        Err(e) => return (Err(e.into()), Ended::HostGone),
    };
    log!("session started");
    let result = loop {
        match connection.accept().await {
            None => break Ok(()),
            Some(Err(e)) => break Err(e),
            Some(Ok((request, respond))) => {
                tokio::spawn(server::handle(
                    agent.clone(),
                    fate.child(),
                    request,
                    respond,
                ));
            }
        }
    };
    drop(connection);
    guard.disarm();
    match result {
        Ok(()) => (Ok(()), Ended::HostGone),
        // Not HTTP/2 from the host: a new host's handshake lines, or garbage.
        Err(e) if is_interruption(&e) => (Err(e.into()), Ended::Interrupted),
        Err(e) => (Err(e.into()), Ended::HostGone),
    }
}

/// How long announcing `WAITING` may take before the agent just listens.
const WAITING_WRITE: std::time::Duration = std::time::Duration::from_millis(20);

/// Announces `WAITING`, reads until a `HELLO` line, answers `READY` once per nonce, skips repeated `HELLO`s and stale
/// bytes, and returns once the HTTP/2 preface starts: the bytes read past the handshake, and
/// whether a RESUME line refreshed this running agent (the VM was restored from its own saved
/// state). While `gate` is closed, HELLO lines are skipped and a RESUME line opens it (applying the
/// late init).
pub async fn answer_hello<S: AsyncRead + AsyncWrite + Unpin>(
    io: &mut S,
    gate: &ResumeGate,
) -> Result<(Vec<u8>, bool), SessionError> {
    // Tell a host that is already connected (a booting VM's) to say HELLO now. While no host is
    // connected a virtio port does not take writes, so this must not wait long.
    let waiting = handshake::waiting_line();
    let _ = tokio::time::timeout(WAITING_WRITE, async {
        io.write_all(waiting.as_bytes()).await?;
        io.flush().await
    })
    .await;
    let mut lines = LineBuffer::new();
    let mut answered: Option<String> = None;
    // The host sends RESUME before every HELLO: apply the first of this session only.
    let mut resumed = None;
    let mut chunk = vec![0u8; 4096];
    loop {
        if answered.is_some() {
            match lines.preface() {
                PrefaceMatch::Complete => {
                    let refreshed = resumed == Some(Resumed::Refreshed);
                    return Ok((lines.take_rest(), refreshed));
                }
                PrefaceMatch::Partial => {}
                PrefaceMatch::No => {
                    if let Some(line) = lines.next_line() {
                        answer_line(io, &line, &mut answered, &mut resumed, gate).await?;
                        continue;
                    }
                }
            }
        } else if let Some(line) = lines.next_line() {
            answer_line(io, &line, &mut answered, &mut resumed, gate).await?;
            continue;
        }
        let n = io.read(&mut chunk).await?;
        if n == 0 {
            return Err(SessionError::Eof);
        }
        lines.push(&chunk[..n]);
    }
}

async fn answer_line<S: AsyncWrite + Unpin>(
    io: &mut S,
    line: &[u8],
    answered: &mut Option<String>,
    resumed: &mut Option<Resumed>,
    gate: &ResumeGate,
) -> Result<(), SessionError> {
    let nonce = match handshake::parse_line(line) {
        Some(HandshakeLine::Hello { nonce, .. }) => nonce,
        Some(HandshakeLine::Resume(_)) if resumed.is_some() => return Ok(()),
        Some(HandshakeLine::Resume(resume)) => {
            let started = std::time::Instant::now();
            let hostname = resume.hostname.clone();
            let outcome = gate.resume(resume).await.map_err(SessionError::Resume)?;
            match outcome {
                Resumed::Applied => log!("resumed as {hostname} in {:?}", started.elapsed()),
                Resumed::Refreshed => log!(
                    "restored from saved state: clock set, CRNG reseeded in {:?}",
                    started.elapsed()
                ),
                Resumed::Ignored => {}
            }
            *resumed = Some(outcome);
            return Ok(());
        }
        _ => return Ok(()),
    };
    if !gate.is_open() {
        // The host talks to a template that was never resumed: it must send RESUME first.
        if gate.first_early_hello() {
            log!("HELLO before RESUME in a template VM: not answering until RESUME arrives");
        }
        return Ok(());
    }
    // The host re-sends HELLO until it sees READY: answer each nonce once, or the extra READY lines
    // would land inside the host's HTTP/2 stream.
    if answered.as_deref() != Some(nonce.as_str()) {
        io.write_all(handshake::ready_line(&nonce, crate::AGENT_VERSION).as_bytes())
            .await?;
        io.flush().await?;
        *answered = Some(nonce);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn answers_hello_once_among_garbage_and_returns_the_preface() {
        let (mut guest, host) = tokio::io::duplex(64 * 1024);
        let (host_read, mut host_write) = tokio::io::split(host);
        let answer = tokio::spawn(async move {
            answer_hello(&mut guest, &ResumeGate::open())
                .await
                .unwrap()
                .0
        });
        let mut stale = vec![0u8; 3000];
        stale.extend_from_slice(
            b"\nhalf a line\nHEARTH-AGENT/1 HELLO beef\nHEARTH-AGENT/1 HELLO beef\n",
        );
        stale.extend_from_slice(b"HEARTH-AGENT/1 HELLO cafe\n");
        stale.extend_from_slice(handshake::HTTP2_PREFACE);
        stale.extend_from_slice(b"\x00\x00\x12");
        host_write.write_all(&stale).await.unwrap();
        let rest = answer.await.unwrap();
        assert!(rest.starts_with(handshake::HTTP2_PREFACE) && rest.ends_with(b"\x00\x00\x12"));
        drop(host_write);
        let mut replies = String::new();
        tokio::io::AsyncReadExt::read_to_string(
            &mut tokio::io::BufReader::new(host_read),
            &mut replies,
        )
        .await
        .unwrap();
        let version = crate::AGENT_VERSION;
        assert_eq!(
            replies,
            format!(
                "\nHEARTH-AGENT/1 WAITING\n\nHEARTH-AGENT/1 READY beef {version}\n\nHEARTH-AGENT/1 READY cafe {version}\n"
            )
        );
    }

    #[tokio::test]
    async fn end_of_file_before_hello_is_eof() {
        let (mut guest, host) = tokio::io::duplex(1024);
        drop(host);
        assert!(matches!(
            answer_hello(&mut guest, &ResumeGate::open()).await,
            Err(SessionError::Eof)
        ));
    }
}
