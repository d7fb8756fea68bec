//! `POST /v1/forward?port=N`, agent side: connects to `127.0.0.1:N` inside the guest, answers 200
//! once connected (or an error naming why not), then relays bytes both ways over the request's
//! HTTP/2 stream until both directions have ended (see `hearth_proto::ports`).
//!
//! Flow control is end to end, as for exec: window for the host's bytes is released only once they
//! are written into the guest socket, and the socket is read only when the host has window for the
//! bytes, so a slow reader on either side stalls the writer instead of filling memory.

use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use hearth_proto::ports::{CONNECT_TIMEOUT_MS, REFUSED_KIND};
use hearth_proto::{AgentError, MAX_PAYLOAD};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

use crate::server;

/// Serves one forward request until the connection is over, the host resets the stream, or the
/// session ends.
pub async fn serve(
    session: CancellationToken,
    port: u16,
    body: RecvStream,
    mut respond: SendResponse<Bytes>,
) {
    let stream = match connect(port).await {
        Ok(stream) => stream,
        Err(e) => return server::respond_error(respond, &e),
    };
    let response = http::Response::builder().body(()).expect("static response");
    let Ok(send) = respond.send_response(response, false) else {
        return;
    };
    let (read, write) = stream.into_split();
    let relay = async { tokio::try_join!(to_guest(body, write), to_host(read, send)).map(|_| ()) };
    tokio::select! {
        _ = session.cancelled() => {}
        _ = relay => {}
    }
}

async fn connect(port: u16) -> Result<TcpStream, AgentError> {
    let address = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
    let timeout = Duration::from_millis(CONNECT_TIMEOUT_MS);
    match tokio::time::timeout(timeout, TcpStream::connect(address)).await {
        Ok(Ok(stream)) => {
            let _ = stream.set_nodelay(true);
            Ok(stream)
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Err(AgentError::new(
            REFUSED_KIND,
            format!("nothing listens on {address} in the guest (connection refused)"),
        )),
        Ok(Err(e)) => Err(AgentError::internal(format!(
            "connecting to {address} in the guest: {e}"
        ))),
        Err(_) => Err(AgentError::internal(format!(
            "connecting to {address} in the guest did not complete within {timeout:?}"
        ))),
    }
}

/// The host's bytes into the guest socket; the end of the request body half-closes it. An error
/// (the host reset the stream, or the guest socket failed) aborts the whole relay.
async fn to_guest(mut body: RecvStream, mut write: OwnedWriteHalf) -> Result<(), ()> {
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|_| ())?;
        write.write_all(&chunk).await.map_err(|_| ())?;
        // Window is released only once the bytes are in the socket: the host cannot push more.
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let _ = write.shutdown().await;
    Ok(())
}

/// The guest socket's bytes to the host, read only when the stream has window for them; the
/// socket's end of file ends the answer body. Stops at once when the host resets the stream.
async fn to_host(mut read: OwnedReadHalf, mut send: SendStream<Bytes>) -> Result<(), ()> {
    let mut buf = vec![0u8; MAX_PAYLOAD];
    loop {
        send.reserve_capacity(MAX_PAYLOAD);
        let capacity = std::future::poll_fn(|cx| server::poll_capacity(&mut send, cx))
            .await
            .map_err(|_| ())?;
        let want = capacity.min(MAX_PAYLOAD);
        let read_result = tokio::select! {
            result = read.read(&mut buf[..want]) => result,
            _ = std::future::poll_fn(|cx| send.poll_reset(cx)) => return Err(()),
        };
        match read_result {
            Ok(0) => return send.send_data(Bytes::new(), true).map_err(|_| ()),
            Ok(n) => send
                .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                .map_err(|_| ())?,
            Err(_) => {
                send.send_reset(h2::Reason::CANCEL);
                return Err(());
            }
        }
    }
}
