//! Host side of `POST /v1/forward`: [`AgentClient::forward`] opens a TCP connection to a port on
//! the guest's loopback through the agent channel; [`PortStream`] is that connection as an
//! `AsyncRead + AsyncWrite` (split it with `tokio::io::split`). No network path to the guest is
//! involved, so this reaches a guest whose network policy lets nothing in or out.
//!
//! Bounded like exec (see the channel's module doc): the agent must answer within
//! [`super::ANSWER_DEADLINE`] (it gives up connecting after
//! `hearth_proto::ports::CONNECT_TIMEOUT_MS`); a port nothing listens on fails at once with
//! [`ForwardError::Refused`]. Received bytes hold HTTP/2 window until the reader takes them, so a
//! guest sending faster than the caller reads holds at most `tuning::HTTP2_STREAM_WINDOW` on the
//! host; writes wait for window and go out in DATA frames of at most [`MAX_PAYLOAD`] bytes.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes};
use h2::{RecvStream, SendStream};
use hearth_proto::{ports, AgentRequest, MAX_PAYLOAD};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;

use super::{bounded, read_response, AgentClient, ChannelError, ANSWER_DEADLINE};

/// Why a guest port could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    /// Nothing listens on the port inside the guest.
    #[error("nothing listens on port {port} in the guest: {message}")]
    Refused { port: u16, message: String },
    /// The agent could not connect for another reason, or the channel failed.
    #[error("forwarding guest port {port}: {source}")]
    Channel { port: u16, source: ChannelError },
}

impl AgentClient {
    /// Connects to `127.0.0.1:port` inside the guest. Returns once the guest accepted the
    /// connection.
    pub async fn forward(&self, port: u16) -> Result<PortStream, ForwardError> {
        let request = AgentRequest::Forward { port };
        let opened = bounded("a port forward", ANSWER_DEADLINE, async {
            let (response, send, permit) = self.start(&request, false).await?;
            let body = read_response(response).await?;
            Ok((send, body, permit))
        })
        .await;
        match opened {
            Ok((send, body, permit)) => Ok(PortStream {
                port,
                send,
                body,
                pending: Bytes::new(),
                read_done: false,
                write_closed: false,
                _permit: permit,
            }),
            Err(ChannelError::Agent(e)) if e.kind == ports::REFUSED_KIND => {
                Err(ForwardError::Refused {
                    port,
                    message: e.message,
                })
            }
            Err(source) => Err(ForwardError::Channel { port, source }),
        }
    }
}

/// A TCP connection to a guest port, relayed by the agent. Shutting down the write side half-closes
/// the guest's socket; reading end of file means the guest closed its side. Dropping it before both
/// sides ended aborts the connection (the agent closes the guest socket).
pub struct PortStream {
    port: u16,
    send: SendStream<Bytes>,
    body: RecvStream,
    /// Received bytes not yet read; their window is released as the reader takes them.
    pending: Bytes,
    read_done: bool,
    write_closed: bool,
    /// Counts this connection against [`super::MAX_CONCURRENT_REQUESTS`].
    _permit: OwnedSemaphorePermit,
}

impl PortStream {
    /// The guest port this stream is connected to.
    pub fn port(&self) -> u16 {
        self.port
    }
}

fn io_error(e: h2::Error) -> io::Error {
    let kind = if e.is_reset() {
        io::ErrorKind::ConnectionReset
    } else {
        io::ErrorKind::BrokenPipe
    };
    io::Error::new(kind, format!("guest port connection: {e}"))
}

impl AsyncRead for PortStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        while this.pending.is_empty() {
            if this.read_done {
                return Poll::Ready(Ok(()));
            }
            match this.body.poll_data(cx) {
                Poll::Ready(Some(Ok(chunk))) => this.pending = chunk,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                Poll::Ready(None) => this.read_done = true,
                Poll::Pending => return Poll::Pending,
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        // The reader has the bytes: the guest may send as many more.
        let _ = this.body.flow_control().release_capacity(n);
        Poll::Ready(Ok(()))
    }
}

impl AsyncWrite for PortStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        if self.write_closed {
            let message = "the guest port connection's write side is shut down";
            return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, message)));
        }
        if data.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let want = data.len().min(MAX_PAYLOAD);
        let send = &mut self.send;
        send.reserve_capacity(want);
        let capacity = loop {
            if send.capacity() > 0 {
                break send.capacity();
            }
            match send.poll_capacity(cx) {
                Poll::Ready(Some(Ok(_))) => continue,
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(io_error(e))),
                Poll::Ready(None) => {
                    let message = "the guest port connection closed";
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, message)));
                }
                Poll::Pending => return Poll::Pending,
            }
        };
        let n = want.min(capacity);
        send.send_data(Bytes::copy_from_slice(&data[..n]), false)
            .map_err(io_error)?;
        Poll::Ready(Ok(n))
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // Sent data is queued in the HTTP/2 connection, whose task writes it out.
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.write_closed {
            self.write_closed = true;
            self.send.send_data(Bytes::new(), true).map_err(io_error)?;
        }
        Poll::Ready(Ok(()))
    }
}

impl Drop for PortStream {
    fn drop(&mut self) {
        if !(self.read_done && self.write_closed) {
            self.send.send_reset(h2::Reason::CANCEL);
        }
    }
}
