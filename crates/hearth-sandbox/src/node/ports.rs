//! Exposed ports: [`Node::forward`] opens a TCP connection to a port on a running sandbox's
//! loopback through its agent channel (no network path, so it works whatever the sandbox's egress
//! policy). The sandbox counts as active while the returned [`NodePort`] is open, like a running
//! exec, so the idle reaper does not stop a sandbox someone is talking to.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use hearth_vm::channel::{ForwardError, PortStream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::exec::ActivityGuard;
use super::{Node, NodeError};

/// An open connection to a guest port: `AsyncRead + AsyncWrite`, shutdown half-closes, drop aborts.
pub struct NodePort {
    stream: PortStream,
    _active: ActivityGuard,
}

impl Node {
    /// Connects to `127.0.0.1:port` inside the tenant's running sandbox `id`.
    /// [`NodeError::PortClosed`] at once when nothing listens there; the sandbox's own request
    /// cap (`ChannelError::Busy`) applies, one request per open connection.
    pub async fn forward(&self, tenant: &str, id: &str, port: u16) -> Result<NodePort, NodeError> {
        if port == 0 {
            return Err(NodeError::Invalid(
                "port 0: give a port from 1 to 65535".into(),
            ));
        }
        let target = self.target(tenant, id)?;
        let active = ActivityGuard::new(target.activity);
        let stream = target
            .sandbox
            .client()
            .forward(port)
            .await
            .map_err(|e| match e {
                ForwardError::Refused { port, .. } => NodeError::PortClosed {
                    id: id.to_owned(),
                    port,
                },
                ForwardError::Channel { source, .. } => NodeError::Channel(source),
            })?;
        Ok(NodePort {
            stream,
            _active: active,
        })
    }
}

impl NodePort {
    /// The guest port this connection goes to.
    pub fn port(&self) -> u16 {
        self.stream.port()
    }
}

impl AsyncRead for NodePort {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for NodePort {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.stream).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_shutdown(cx)
    }
}
