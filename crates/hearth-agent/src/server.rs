//! Request routing: one `match` from [`AgentRequest`] to its handler, plus the response helpers the
//! handlers share. Handlers stay thin; the work is in [`crate::exec`], [`crate::files`] and the
//! [`crate::PowerControl`] implementation.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use h2::server::SendResponse;
use h2::{RecvStream, SendStream};
use hearth_proto::{AgentError, AgentInfo, AgentRequest, PROTOCOL_MAJOR};
use tokio_util::sync::CancellationToken;

use crate::session::ExecFate;
use crate::{exec, files, forward, log, Agent};

/// Handles one HTTP/2 request. `fate.kill` is cancelled when the session that carried it ends
/// (`fate.keep` instead when a restored VM's new host took over: see [`crate::session`]).
pub async fn handle(
    agent: Arc<Agent>,
    fate: ExecFate,
    request: http::Request<RecvStream>,
    respond: SendResponse<Bytes>,
) {
    let (parts, body) = request.into_parts();
    let target = parts
        .uri
        .path_and_query()
        .map(|p| p.as_str())
        .unwrap_or("/");
    let request = match AgentRequest::parse(parts.method.as_str(), target) {
        Ok(request) => request,
        Err(e) => return respond_error(respond, &e),
    };
    let root = agent.config.root.as_path();
    let session = fate.kill.clone();
    match request {
        AgentRequest::Exec => exec::serve(agent.clone(), fate, body, respond).await,
        AgentRequest::Attach { exec } => exec::attach::serve(&agent, fate, exec, body, respond),
        AgentRequest::Execs => respond_json(respond, Ok::<_, AgentError>(agent.execs.list())).await,
        AgentRequest::Signal { exec, signal } => {
            respond_json(respond, agent.execs.signal(exec, signal)).await
        }
        AgentRequest::Resize { exec, size } => {
            respond_json(respond, agent.execs.resize(exec, size)).await
        }
        AgentRequest::PutFile {
            path,
            mode,
            uid,
            gid,
        } => {
            let owner = files::Owner { uid, gid };
            respond_json(respond, files::put(root, &path, mode, owner, body).await).await
        }
        AgentRequest::GetFile { path } => files::get(root, &path, respond).await,
        AgentRequest::Stat { path } => respond_json(respond, files::stat(root, &path)).await,
        AgentRequest::List { path } => respond_json(respond, files::list(root, &path)).await,
        AgentRequest::Info => respond_json(respond, Ok::<_, AgentError>(info())).await,
        AgentRequest::Shutdown => shutdown(&agent, session, respond).await,
        AgentRequest::Forward { port } => forward::serve(session, port, body, respond).await,
    }
}

fn info() -> AgentInfo {
    AgentInfo {
        protocol: PROTOCOL_MAJOR,
        agent_version: crate::AGENT_VERSION.to_string(),
        kernel_release: nix::sys::utsname::uname()
            .map(|u| u.release().to_string_lossy().into_owned())
            .unwrap_or_default(),
        hostname: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        boot: crate::pid1::BOOT_MARKS.get().copied(),
    }
}

/// Kills every exec, makes data durable, answers, then powers off.
async fn shutdown(agent: &Agent, session: CancellationToken, respond: SendResponse<Bytes>) {
    log!(
        "shutdown requested: killing {} exec(s)",
        agent.execs.kill_all()
    );
    // Exec tasks reap their exec-inits; give them a moment so filesystems are no longer busy.
    for _ in 0..100 {
        if agent.execs.running() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let power = agent.config.power.clone();
    let prepared = tokio::task::spawn_blocking(move || power.prepare())
        .await
        .unwrap_or_else(|e| Err(format!("shutdown preparation panicked: {e}")));
    if let Err(e) = &prepared {
        log!("shutdown: {e}; powering off anyway");
    }
    respond_json(respond, prepared.map_err(AgentError::internal)).await;
    // Let HTTP/2 put the answer on the wire before the machine goes away: the host closing the
    // channel proves it arrived; otherwise give it a moment.
    let _ = tokio::time::timeout(Duration::from_millis(100), session.cancelled()).await;
    log!("powering off");
    agent.config.power.power_off();
}

/// Answers with `result` as JSON (status 200), or the error with its status.
pub async fn respond_json<T: serde::Serialize>(
    mut respond: SendResponse<Bytes>,
    result: Result<T, AgentError>,
) {
    let value = match result {
        Ok(value) => value,
        Err(e) => return respond_error(respond, &e),
    };
    let body = Bytes::from(serde_json::to_vec(&value).expect("protocol types serialize"));
    let response = http::Response::builder()
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("static response");
    if let Ok(mut send) = respond.send_response(response, false) {
        let _ = send_all(&mut send, body, true).await;
    }
}

/// Answers with the error's HTTP status and its JSON body.
pub fn respond_error(mut respond: SendResponse<Bytes>, error: &AgentError) {
    let response = http::Response::builder()
        .status(error.kind.http_status())
        .header(http::header::CONTENT_TYPE, "application/json")
        .body(())
        .expect("static response");
    let body = Bytes::from(serde_json::to_vec(error).expect("errors serialize"));
    if let Ok(mut send) = respond.send_response(response, false) {
        // Error bodies are small: sending without waiting for window cannot buffer much.
        let _ = send.send_data(body, true);
    }
}

/// Sends `data` in pieces the stream's send window allows, so nothing is buffered beyond the window.
pub async fn send_all(
    send: &mut SendStream<Bytes>,
    mut data: Bytes,
    end_of_stream: bool,
) -> Result<(), h2::Error> {
    if data.is_empty() {
        return if end_of_stream {
            send.send_data(data, true)
        } else {
            Ok(())
        };
    }
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let capacity = std::future::poll_fn(|cx| poll_capacity(send, cx)).await?;
        let chunk = data.split_to(capacity.min(data.len()));
        send.send_data(chunk, end_of_stream && data.is_empty())?;
    }
    Ok(())
}

/// Ready with the stream's free send window once it is non-zero.
pub fn poll_capacity(
    send: &mut SendStream<Bytes>,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<Result<usize, h2::Error>> {
    use std::task::Poll;
    loop {
        if send.capacity() > 0 {
            return Poll::Ready(Ok(send.capacity()));
        }
        match send.poll_capacity(cx) {
            Poll::Ready(Some(Ok(_))) => continue,
            Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e)),
            Poll::Ready(None) => {
                return Poll::Ready(Err(h2::Error::from(h2::Reason::STREAM_CLOSED)))
            }
            Poll::Pending => return Poll::Pending,
        }
    }
}
