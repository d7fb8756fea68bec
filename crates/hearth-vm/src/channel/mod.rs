//! Host end of the agent channel: [`AgentClient`] speaks the agent protocol (documented in
//! `hearth-proto`) over any byte stream to the guest agent: handshake, then an HTTP/2 client
//! connection driven by a background task. Requests: [`AgentClient::exec`] (see [`ExecHandle`]), file
//! transfer (see [`FileDownload`]), `stat`, `list`, `info`, `signal`, `shutdown`.
//!
//! Reconnecting = dropping the client and calling [`AgentClient::connect`] again on a new stream;
//! the agent answers the new HELLO. A VM restored from a snapshot template is connected with
//! [`AgentClient::connect_unix_resume`] the first time. Dropping the last clone of a client closes its connection, and
//! the agent then kills the process trees of the execs that connection started.
//!
//! Touches only the stream it is given (and, for the connect helpers, the socket path named).
//!
//! The guest is untrusted (a compromised agent included), so every wait on it and everything it can
//! make the host buffer is bounded (see PROTOCOL.md, "Host limits"):
//! - no server push (`SETTINGS_ENABLE_PUSH = 0`: a PUSH_PROMISE is a connection error);
//! - answer header lists of at most [`MAX_HEADER_LIST`] bytes (h2 also caps CONTINUATION frames);
//! - at most [`MAX_CONCURRENT_REQUESTS`] open requests per client (one client per sandbox); one
//!   more fails at once with [`ChannelError::Busy`] instead of queueing;
//! - JSON answers of at most [`MAX_JSON_BODY`] bytes (directory listings [`MAX_LIST_BODY`]);
//! - received-but-unread body data of at most `tuning::HTTP2_STREAM_WINDOW` (1 MiB) per request
//!   and `tuning::HTTP2_CONNECTION_WINDOW` (4 MiB) for the whole connection: window is released
//!   only as the caller consumes data, and h2 fails a peer that sends beyond it;
//! - answer heads (and an exec's `Started` frame) within [`ANSWER_DEADLINE`], the shutdown
//!   confirmation within [`SHUTDOWN_DEADLINE`]; then [`ChannelError::Unresponsive`].

mod exec;
mod files;
mod forward;
pub mod handshake;

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::client::{ResponseFuture, SendRequest};
use h2::{RecvStream, SendStream};
use hearth_proto::{tuning, AgentError, AgentInfo, AgentRequest, DirListing, FileStat};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

pub use hearth_proto::handshake::Resume;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

pub use exec::{ExecHandle, ExecOutput, ExecResult, ExecStdin};
pub use files::FileDownload;
pub use forward::{ForwardError, PortStream};
pub use hearth_proto::{ExecEntry, ExecList, ExecRequest, ExitStatus, TtySize};

/// Largest JSON answer to `info`, `stat`, `signal` and `shutdown` (each is a few hundred bytes; a
/// stat's symlink target is at most 4 KiB).
pub const MAX_JSON_BODY: usize = 1024 * 1024;
/// Largest directory listing answer: [`DirListing::MAX_ENTRIES`] entries with 255-byte names take
/// about 4 MiB; twice that leaves room for escaping and symlink targets.
pub const MAX_LIST_BODY: usize = 8 * 1024 * 1024;
/// Largest header list (HPACK-decoded) of an answer; the agent sends two or three short headers.
pub const MAX_HEADER_LIST: u32 = 64 * 1024;
/// Most requests (execs, file transfers, JSON requests) open at once on one client, i.e. per
/// sandbox. Bounds the streams, and so the buffered data, a guest can hold open on the host.
pub const MAX_CONCURRENT_REQUESTS: usize = 64;
/// How long the agent may take to answer a request's head (for an exec: to report `Started`), and
/// for `info`/`stat`/`list`/`signal` the whole answer. A hung or hostile guest then gets an error.
pub const ANSWER_DEADLINE: Duration = Duration::from_secs(30);
/// How long the agent may take to confirm a shutdown request (the caller then kills the VM).
pub const SHUTDOWN_DEADLINE: Duration = Duration::from_secs(3);

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
    #[error("the agent did not answer the handshake within {0:?}; is the guest booting? (see its console log)")]
    HandshakeTimeout(Duration),
    #[error(
        "the guest agent speaks protocol v{major} (agent {agent_version}) but this hearth speaks v{}; \
         use a hearth and initramfs built from the same release",
        hearth_proto::PROTOCOL_MAJOR
    )]
    Incompatible { major: u32, agent_version: String },
    #[error("the agent channel closed (the VM stopped or another client took over the channel)")]
    Closed,
    #[error("the agent ended this request early ({0}); the exec or transfer is over")]
    StreamEnded(String),
    #[error("agent channel HTTP/2 failure: {0}")]
    Http2(#[from] h2::Error),
    #[error("the agent refused the request: {0}")]
    Agent(#[from] AgentError),
    #[error("the agent sent something this client does not understand: {0}")]
    Protocol(String),
    #[error("the agent did not answer {what} within {after:?}; the guest is hung or misbehaving")]
    Unresponsive { what: &'static str, after: Duration },
    #[error(
        "this sandbox already has {0} requests open (execs, file transfers); \
         wait for one to finish"
    )]
    Busy(usize),
}

impl ChannelError {
    fn io(context: impl Into<String>, source: io::Error) -> ChannelError {
        ChannelError::Io {
            context: context.into(),
            source,
        }
    }
}

/// `stream` with `prefix` (bytes read past the handshake) put back in front of what it reads.
pub(crate) fn prefixed<S: AsyncRead + AsyncWrite>(
    prefix: Vec<u8>,
    stream: S,
) -> impl AsyncRead + AsyncWrite {
    let (read, write) = tokio::io::split(stream);
    tokio::io::join(std::io::Cursor::new(prefix).chain(read), write)
}

/// Aborts the HTTP/2 connection task when the last client clone goes away, so the stream is closed
/// and a new client can take over the channel.
struct ConnectionTask(tokio::task::JoinHandle<()>);

impl Drop for ConnectionTask {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A connected agent. Cheap to clone; requests on clones share one connection and run concurrently.
#[derive(Clone)]
pub struct AgentClient {
    send: SendRequest<Bytes>,
    agent_version: Arc<str>,
    /// [`MAX_CONCURRENT_REQUESTS`] permits; every open request holds one.
    requests: Arc<Semaphore>,
    _connection: Arc<ConnectionTask>,
}

impl AgentClient {
    /// Performs the handshake on `stream` and starts HTTP/2. Waits as long as the guest needs to
    /// answer: bound it with a timeout (as [`AgentClient::connect_unix`] does).
    pub async fn connect<S>(stream: S) -> Result<AgentClient, ChannelError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        AgentClient::connect_resuming(stream, None).await
    }

    /// [`AgentClient::connect`] to a VM restored from a snapshot template: `resume` (its clock,
    /// entropy seed and hostname) goes before the HELLO (see `hearth_proto::handshake`).
    pub async fn connect_resuming<S>(
        mut stream: S,
        resume: Option<Resume>,
    ) -> Result<AgentClient, ChannelError>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let ready = handshake::hello_resuming(&mut stream, resume.as_ref()).await?;
        let (send, connection) = h2::client::Builder::new()
            .enable_push(false)
            .max_header_list_size(MAX_HEADER_LIST)
            .initial_window_size(tuning::HTTP2_STREAM_WINDOW)
            .initial_connection_window_size(tuning::HTTP2_CONNECTION_WINDOW)
            .max_frame_size(tuning::HTTP2_MAX_FRAME)
            .handshake::<_, Bytes>(prefixed(ready.rest, stream))
            .await?;
        let task = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!("agent channel connection ended: {e}");
            }
        });
        Ok(AgentClient {
            send,
            agent_version: ready.agent_version.into(),
            requests: Arc::new(Semaphore::new(MAX_CONCURRENT_REQUESTS)),
            _connection: Arc::new(ConnectionTask(task)),
        })
    }

    /// Connects to a Unix socket that is the agent's byte stream (QEMU's virtio-serial chardev),
    /// retrying while the socket does not exist or refuses connections (the VMM is starting), and
    /// completes the handshake, all before `deadline`.
    pub async fn connect_unix(path: &Path, deadline: Instant) -> Result<AgentClient, ChannelError> {
        AgentClient::connect_unix_inner(path, deadline, None).await
    }

    /// [`AgentClient::connect_unix`] to a VM restored from a snapshot template, which gets `resume`
    /// before its HELLO.
    pub async fn connect_unix_resume(
        path: &Path,
        deadline: Instant,
        resume: Resume,
    ) -> Result<AgentClient, ChannelError> {
        AgentClient::connect_unix_inner(path, deadline, Some(resume)).await
    }

    /// [`AgentClient::connect_unix_resume`] on a connection already open (the one a QEMU restore
    /// made before loading the state: `RunningVm::take_agent_stream`).
    pub async fn connect_stream_resume(
        stream: std::os::unix::net::UnixStream,
        deadline: Instant,
        resume: Resume,
    ) -> Result<AgentClient, ChannelError> {
        let started = Instant::now();
        let stream = stream
            .set_nonblocking(true)
            .and_then(|()| tokio::net::UnixStream::from_std(stream))
            .map_err(|e| ChannelError::io("using the restored VM's agent connection", e))?;
        let connect = AgentClient::connect_resuming(stream, Some(resume));
        with_deadline(deadline, started, connect).await
    }

    async fn connect_unix_inner(
        path: &Path,
        deadline: Instant,
        resume: Option<Resume>,
    ) -> Result<AgentClient, ChannelError> {
        let started = Instant::now();
        let stream = loop {
            match tokio::net::UnixStream::connect(path).await {
                Ok(stream) => break stream,
                Err(e) if retryable(&e) && Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => {
                    return Err(ChannelError::io(
                        format!("connecting to the agent socket {}", path.display()),
                        e,
                    ))
                }
            }
        };
        with_deadline(
            deadline,
            started,
            AgentClient::connect_resuming(stream, resume),
        )
        .await
    }

    /// Connects through Firecracker's hybrid vsock socket: `CONNECT <port>\n` -> `OK <n>\n`, retried
    /// until the guest listens, then the handshake; all before `deadline`.
    pub async fn connect_hybrid_vsock(
        path: &Path,
        port: u32,
        deadline: Instant,
    ) -> Result<AgentClient, ChannelError> {
        AgentClient::connect_hybrid_vsock_resume(path, port, deadline, None).await
    }

    /// [`AgentClient::connect_hybrid_vsock`] to a VM restored from saved state (Firecracker's
    /// snapshot), which gets `resume` before its HELLO, as over a Unix socket.
    pub async fn connect_hybrid_vsock_resume(
        path: &Path,
        port: u32,
        deadline: Instant,
        resume: Option<Resume>,
    ) -> Result<AgentClient, ChannelError> {
        let started = Instant::now();
        loop {
            let attempt = async {
                let mut stream = tokio::net::UnixStream::connect(path).await?;
                stream
                    .write_all(format!("CONNECT {port}\n").as_bytes())
                    .await?;
                let line = read_line(&mut stream).await?;
                if line.starts_with("OK ") {
                    Ok(stream)
                } else {
                    Err(io::Error::new(
                        io::ErrorKind::ConnectionRefused,
                        format!("vsock CONNECT answered {line:?}"),
                    ))
                }
            };
            match attempt.await {
                Ok(stream) => {
                    let handshake = AgentClient::connect_resuming(stream, resume);
                    return with_deadline(deadline, started, handshake).await;
                }
                Err(e)
                    if (retryable(&e) || e.kind() == io::ErrorKind::UnexpectedEof)
                        && Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await
                }
                Err(e) => {
                    let context =
                        format!("connecting to vsock port {port} through {}", path.display());
                    return Err(ChannelError::io(context, e));
                }
            }
        }
    }

    /// The agent version announced in the handshake.
    /// Ends the connection now, for every clone: requests still open end without a word to the
    /// agent (no stream is reset), so it treats their execs as those of a host that went (killed,
    /// or parked for the next host when attachable). For a host that leaves on purpose (a daemon
    /// shutting down, whose successor attaches again).
    pub fn disconnect(&self) {
        self._connection.0.abort();
    }

    pub fn agent_version(&self) -> &str {
        &self.agent_version
    }

    pub async fn info(&self) -> Result<AgentInfo, ChannelError> {
        self.simple_json(&AgentRequest::Info, MAX_JSON_BODY, ANSWER_DEADLINE)
            .await
    }

    /// The agent's running execs (to find an attachable one this host did not start).
    pub async fn execs(&self) -> Result<ExecList, ChannelError> {
        self.simple_json(&AgentRequest::Execs, MAX_JSON_BODY, ANSWER_DEADLINE)
            .await
    }

    /// `lstat` of `path` inside the workload root.
    pub async fn stat(&self, path: &str) -> Result<FileStat, ChannelError> {
        let request = AgentRequest::Stat { path: path.into() };
        self.simple_json(&request, MAX_JSON_BODY, ANSWER_DEADLINE)
            .await
    }

    pub async fn list(&self, path: &str) -> Result<DirListing, ChannelError> {
        let request = AgentRequest::List { path: path.into() };
        self.simple_json(&request, MAX_LIST_BODY, ANSWER_DEADLINE)
            .await
    }

    /// Sends `signal` to a running exec (the agent forwards it to the command; SIGKILL kills the
    /// exec's whole process tree).
    pub async fn signal(&self, exec_id: u64, signal: i32) -> Result<(), ChannelError> {
        let request = AgentRequest::Signal {
            exec: exec_id,
            signal,
        };
        self.simple_json(&request, MAX_JSON_BODY, ANSWER_DEADLINE)
            .await
    }

    /// Sets the terminal size of a running exec started with a `tty` (its foreground process
    /// group gets SIGWINCH).
    pub async fn resize(&self, exec_id: u64, size: TtySize) -> Result<(), ChannelError> {
        let request = AgentRequest::Resize {
            exec: exec_id,
            size,
        };
        self.simple_json(&request, MAX_JSON_BODY, ANSWER_DEADLINE)
            .await
    }

    /// Asks the agent to kill every exec, sync and unmount, and power the guest off. Returns once
    /// the agent confirmed; the guest powers off when this connection closes (drop every clone of
    /// the client) or 100 ms after answering, whichever comes first. Fails with
    /// [`ChannelError::Unresponsive`] after [`SHUTDOWN_DEADLINE`]: kill the VM then.
    pub async fn shutdown(&self) -> Result<(), ChannelError> {
        self.simple_json(&AgentRequest::Shutdown, MAX_JSON_BODY, SHUTDOWN_DEADLINE)
            .await
    }

    /// One request without a body whose whole JSON answer (at most `limit` bytes) must arrive
    /// within `deadline`.
    async fn simple_json<T: serde::de::DeserializeOwned>(
        &self,
        request: &AgentRequest,
        limit: usize,
        deadline: Duration,
    ) -> Result<T, ChannelError> {
        let answer = async {
            let (response, _, _permit) = self.start(request, true).await?;
            let body = read_response(response).await?;
            read_json(body, limit).await
        };
        bounded(what(request), deadline, answer).await
    }

    /// Opens a request stream. With `end_of_stream` the request has no body. The permit counts the
    /// request against [`MAX_CONCURRENT_REQUESTS`] until dropped. Waits for the agent to accept a
    /// new stream: callers bound it (see [`bounded`]).
    async fn start(
        &self,
        request: &AgentRequest,
        end_of_stream: bool,
    ) -> Result<(ResponseFuture, SendStream<Bytes>, OwnedSemaphorePermit), ChannelError> {
        let permit = self
            .requests
            .clone()
            .try_acquire_owned()
            .map_err(|_| ChannelError::Busy(MAX_CONCURRENT_REQUESTS))?;
        let mut send = self.send.clone().ready().await.map_err(closed_or)?;
        let uri = format!("http://hearth-agent{}", request.path_and_query());
        let http_request = http::Request::builder()
            .method(request.method())
            .uri(uri)
            .body(())
            .map_err(|e| ChannelError::Protocol(format!("building request: {e}")))?;
        let (response, send) = send
            .send_request(http_request, end_of_stream)
            .map_err(closed_or)?;
        Ok((response, send, permit))
    }
}

fn retryable(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::ConnectionRefused
    )
}

/// Names `request` in errors.
fn what(request: &AgentRequest) -> &'static str {
    match request {
        AgentRequest::Exec => "an exec request",
        AgentRequest::Attach { .. } => "an exec attach request",
        AgentRequest::Execs => "an exec list request",
        AgentRequest::Signal { .. } => "a signal request",
        AgentRequest::Resize { .. } => "a terminal resize request",
        AgentRequest::Shutdown => "the shutdown request",
        AgentRequest::PutFile { .. } => "a file upload",
        AgentRequest::GetFile { .. } => "a file download",
        AgentRequest::Stat { .. } => "a stat request",
        AgentRequest::List { .. } => "a directory listing request",
        AgentRequest::Info => "an info request",
        AgentRequest::Forward { .. } => "a port forward",
    }
}

/// `future`, failing with [`ChannelError::Unresponsive`] if the agent takes longer than `deadline`.
async fn bounded<T>(
    what: &'static str,
    deadline: Duration,
    future: impl std::future::Future<Output = Result<T, ChannelError>>,
) -> Result<T, ChannelError> {
    tokio::time::timeout(deadline, future)
        .await
        .map_err(|_| ChannelError::Unresponsive {
            what,
            after: deadline,
        })?
}

async fn with_deadline<T>(
    deadline: Instant,
    started: Instant,
    future: impl std::future::Future<Output = Result<T, ChannelError>>,
) -> Result<T, ChannelError> {
    tokio::time::timeout_at(deadline, future)
        .await
        .map_err(|_| ChannelError::HandshakeTimeout(started.elapsed()))?
}

/// Reads one `\n`-terminated line byte by byte (nothing after it is consumed).
async fn read_line(stream: &mut tokio::net::UnixStream) -> io::Result<String> {
    let mut line = Vec::new();
    loop {
        let byte = stream.read_u8().await?;
        if byte == b'\n' || line.len() > 256 {
            return Ok(String::from_utf8_lossy(&line).into_owned());
        }
        line.push(byte);
    }
}

/// A broken connection means the channel is gone; a reset means this one request is over.
fn closed_or(e: h2::Error) -> ChannelError {
    if e.is_io() || e.is_go_away() {
        ChannelError::Closed
    } else if e.is_reset() {
        ChannelError::StreamEnded(e.to_string())
    } else {
        ChannelError::Http2(e)
    }
}

/// Awaits the response head: the body for 200, the agent's error otherwise.
async fn read_response(response: ResponseFuture) -> Result<RecvStream, ChannelError> {
    let response = response.await.map_err(closed_or)?;
    let status = response.status();
    let body = response.into_body();
    if status == http::StatusCode::OK {
        return Ok(body);
    }
    Err(error_from_body(status, body).await)
}

/// The agent's JSON error from a non-200 answer.
async fn error_from_body(status: http::StatusCode, body: RecvStream) -> ChannelError {
    let bytes = match read_body(body, 64 * 1024).await {
        Ok(bytes) => bytes,
        Err(e) => return e,
    };
    match serde_json::from_slice::<AgentError>(&bytes) {
        Ok(error) => ChannelError::Agent(error),
        Err(_) => ChannelError::Protocol(format!(
            "status {status} with body {:?}",
            String::from_utf8_lossy(&bytes)
        )),
    }
}

async fn read_body(mut body: RecvStream, limit: usize) -> Result<Vec<u8>, ChannelError> {
    let mut out = Vec::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(closed_or)?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if out.len() + chunk.len() > limit {
            return Err(ChannelError::Protocol(format!(
                "answer larger than {limit} bytes"
            )));
        }
        out.extend_from_slice(&chunk);
    }
    Ok(out)
}

async fn read_json<T: serde::de::DeserializeOwned>(
    body: RecvStream,
    limit: usize,
) -> Result<T, ChannelError> {
    let bytes = read_body(body, limit).await?;
    serde_json::from_slice(&bytes)
        .map_err(|e| ChannelError::Protocol(format!("bad JSON answer: {e}")))
}

/// Sends `data` in pieces the stream's send window allows (nothing is buffered beyond the window).
async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), ChannelError> {
    if data.is_empty() {
        if end_of_stream {
            send.send_data(data, true).map_err(closed_or)?;
        }
        return Ok(());
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = std::future::poll_fn(|cx| {
            use std::task::Poll;
            loop {
                if send.capacity() > 0 {
                    return Poll::Ready(Ok(send.capacity()));
                }
                match send.poll_capacity(cx) {
                    Poll::Ready(Some(Ok(_))) => continue,
                    Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(closed_or(e))),
                    Poll::Ready(None) => {
                        return Poll::Ready(Err(ChannelError::StreamEnded("stream closed".into())))
                    }
                    Poll::Pending => return Poll::Pending,
                }
            }
        })
        .await?;
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, end_of_stream && data.is_empty())
            .map_err(closed_or)?;
    }
    Ok(())
}
