//! `hearth sandbox port-forward ID [LOCAL:]PORT`: listens on `127.0.0.1:LOCAL` (0 or absent: any
//! free port, printed as `forwarding 127.0.0.1:N -> ID:PORT`) and carries each accepted connection
//! to `127.0.0.1:PORT` inside the sandbox through its own `GET /v1/sandboxes/{id}/tunnel/{port}`
//! WebSocket (binary messages are the bytes; an empty one ends a direction). Runs until Ctrl-C.

use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::Args;
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::serve::ports::both_ended;

/// Bytes read from the local connection per message (below the server's 1 MiB cap).
const CHUNK: usize = 64 << 10;

#[derive(Args, Debug)]
pub struct PortForwardArgs {
    pub id: String,
    /// `PORT` (any free local port) or `LOCAL:PORT`.
    #[arg(value_name = "[LOCAL:]PORT")]
    pub ports: String,
}

pub async fn port_forward(client: &Client, a: PortForwardArgs) -> anyhow::Result<ExitCode> {
    let (local, remote) = parse_ports(&a.ports)?;
    let listener = TcpListener::bind(("127.0.0.1", local))
        .await
        .with_context(|| format!("listening on 127.0.0.1:{local}"))?;
    let bound = listener.local_addr()?;
    println!("forwarding {bound} -> {}:{remote}", a.id);
    // The sandbox's WebSocket base, as the client spells it for exec (client.rs is not ours).
    let exec_ws = client.exec_ws_url(&a.id);
    let sandbox = exec_ws.strip_suffix("/exec/ws").unwrap_or(&exec_ws);
    let url = format!("{sandbox}/tunnel/{remote}");
    let auth = format!("Bearer {}", client.token());
    loop {
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = tokio::signal::ctrl_c() => return Ok(ExitCode::SUCCESS),
        };
        let (conn, peer) = accepted.context("accepting a local connection")?;
        let (url, auth, id) = (url.clone(), auth.clone(), a.id.clone());
        tokio::spawn(async move {
            if let Err(e) = carry(conn, &url, &auth).await {
                eprintln!(
                    "hearth: connection from {peer} to {id}:{remote}: {}",
                    crate::report::chain(&e)
                );
            }
        });
    }
}

/// `8000` -> (0, 8000); `9000:8000` -> (9000, 8000).
fn parse_ports(arg: &str) -> anyhow::Result<(u16, u16)> {
    let port = |s: &str| {
        s.parse::<u16>()
            .with_context(|| format!("{arg:?}: expected [LOCAL:]PORT, e.g. 8000 or 9000:8000"))
    };
    let (local, remote) = match arg.split_once(':') {
        Some((local, remote)) => (port(local)?, port(remote)?),
        None => (0, port(arg)?),
    };
    if remote == 0 {
        bail!("{arg:?}: the sandbox port must be 1-65535");
    }
    Ok((local, remote))
}

/// One local connection through one tunnel, until both directions ended.
async fn carry(conn: TcpStream, url: &str, auth: &str) -> anyhow::Result<()> {
    let mut request = url.into_client_request()?;
    request.headers_mut().insert("authorization", auth.parse()?);
    let (socket, _) = match tokio_tungstenite::connect_async(request).await {
        Ok(opened) => opened,
        Err(tokio_tungstenite::tungstenite::Error::Http(answer)) => {
            let body = answer
                .body()
                .as_deref()
                .map(String::from_utf8_lossy)
                .unwrap_or_default();
            bail!(
                "the daemon refused the tunnel ({}): {body}",
                answer.status()
            );
        }
        Err(e) => return Err(e).context("opening the tunnel"),
    };
    let (mut tx, mut rx) = socket.split();
    let (mut from_local, mut to_local) = conn.into_split();
    // Sandbox to local; false when the tunnel was closed or broke (abort everything).
    let from_sandbox = async {
        loop {
            match rx.next().await {
                Some(Ok(Message::Binary(data))) if data.is_empty() => {
                    let _ = to_local.shutdown().await;
                    return true;
                }
                Some(Ok(Message::Binary(data))) => {
                    if to_local.write_all(&data).await.is_err() {
                        return true;
                    }
                }
                Some(Ok(Message::Close(_)) | Err(_)) | None => return false,
                Some(Ok(_)) => {}
            }
        }
    };
    // Local to sandbox, ending with an empty message once the local side closed.
    let to_sandbox = async {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match from_local.read(&mut buf).await {
                Ok(0) | Err(_) => return tx.send(Message::binary(Vec::new())).await,
                Ok(n) => tx.send(Message::binary(buf[..n].to_vec())).await?,
            }
        }
    };
    let finished = both_ended(from_sandbox, to_sandbox)
        .await
        .context("the tunnel broke")?;
    if finished {
        let _ = tx.close().await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_remote_or_local_colon_remote() {
        assert_eq!(parse_ports("8000").unwrap(), (0, 8000));
        assert_eq!(parse_ports("9000:8000").unwrap(), (9000, 8000));
        assert_eq!(parse_ports("0:80").unwrap(), (0, 80));
        for bad in ["", "x", "9000:", "1:0", "0", "70000"] {
            assert!(parse_ports(bad).is_err(), "{bad:?}");
        }
    }
}
