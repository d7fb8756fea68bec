//! Commands in a sandbox. `POST /v1/sandboxes/{id}/exec` answers with NDJSON ([`ExecEvent`] per
//! line) streamed as the command produces output; `GET /v1/sandboxes/{id}/exec/ws` is the same over a
//! WebSocket with interactive stdin. The command starts before the answer does, so "no such sandbox"
//! or "not running" are plain error statuses; failures after that are an `error` event. A client
//! that goes away drops the exec, and the agent kills the command's process tree.

use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::body::Bytes;
use axum::extract::rejection::JsonRejection;
use axum::extract::ws::{close_code, CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use futures::{SinkExt, StreamExt};
use hearth_sandbox::node::{ExecSpec, NodeError, NodeExec};
use hearth_sandbox::{ExecOutput, ExitStatus, TtySize};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use super::api::{ErrorBody, ExecBody, ExecEvent, WsControl, WsTerminal};
use super::auth::Authenticated;
use super::error::ApiError;
use super::sandboxes::{env_pairs, seconds_field};
use super::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[utoipa::path(post, path = "/v1/sandboxes/{id}/exec", tag = "exec", operation_id = "execInSandbox",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = ExecBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "NDJSON stream: one `ExecEvent` (see the schemas) per line, output in order, the last one \
            `exit_code`, `signal` or `error`. Generated clients get the raw stream and split it at newlines.",
            content_type = "application/x-ndjson", body = inline(super::openapi::Binary)),
        (status = 400, description = "Empty argv, bad stdin base64, environment or working directory", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running. One its idle timeout paused (`on_idle: pause`) is resumed first, \
            as for every use (exec, code, files, ports); a resume that fails answers as `resume` does (503 capacity, 429 quota)", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "The command could not be started (the message says why)", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down, or the guest could not start the command: its own workload holds its process slots or memory (code `guest_exhausted`)", body = ErrorBody),
        (status = 502, description = "The guest went away mid-request (its VM died; code `guest_failed`)", body = ErrorBody),
        (status = 504, description = "The guest agent did not answer in time (the sandbox is hung or misbehaving)", body = ErrorBody),
    ))]
pub async fn exec(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<ExecBody>, JsonRejection>,
) -> Result<Response, ApiError> {
    let Json(body) = body?;
    let stdin = body
        .stdin
        .as_deref()
        .map(|s| B64.decode(s))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("`stdin` is not base64: {e}")))?;
    let spec = exec_spec(body, stdin.is_some())?;
    let mut handle = state.node.exec(&tenant.name, &id, spec).await?;
    if let (Some(data), Some(mut writer)) = (stdin, handle.take_stdin()) {
        tokio::spawn(async move {
            if writer.write(&data).await.is_ok() {
                let _ = writer.close().await;
            }
        });
    }
    let lines = futures::stream::unfold(Some(handle), |handle| async move {
        let (event, rest) = next_event(handle?).await;
        let mut line = serde_json::to_vec(&event).expect("event serializes");
        line.push(b'\n');
        Some((Ok::<_, Infallible>(line), rest))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(lines),
    )
        .into_response())
}

/// The next event of a running exec, and the exec when more events follow.
async fn next_event(mut handle: NodeExec) -> (ExecEvent, Option<NodeExec>) {
    match handle.next_output().await {
        Ok(Some(output)) => (output_event(output), Some(handle)),
        Ok(None) => match handle.wait().await {
            Ok(status) => (exit_event(status), None),
            Err(e) => (error_event(e), None),
        },
        Err(e) => (error_event(e), None),
    }
}

fn output_event(output: ExecOutput) -> ExecEvent {
    match output {
        ExecOutput::Stdout(data) => ExecEvent {
            stdout: Some(B64.encode(data)),
            ..Default::default()
        },
        ExecOutput::Stderr(data) => ExecEvent {
            stderr: Some(B64.encode(data)),
            ..Default::default()
        },
    }
}

pub(super) fn exit_event(status: ExitStatus) -> ExecEvent {
    match (status.code, status.signal) {
        (Some(code), _) => ExecEvent {
            exit_code: Some(code),
            ..Default::default()
        },
        (None, Some(signal)) => ExecEvent {
            signal: Some(signal),
            timed_out: status.timed_out.then_some(true),
            ..Default::default()
        },
        (None, None) => ExecEvent {
            error: Some("the command ended without an exit code or signal".into()),
            ..Default::default()
        },
    }
}

fn error_event(err: NodeError) -> ExecEvent {
    ExecEvent {
        error: Some(err.to_string()),
        ..Default::default()
    }
}

pub(super) fn exec_spec(body: ExecBody, stdin: bool) -> Result<ExecSpec, ApiError> {
    if body.argv.is_empty() || body.argv[0].is_empty() {
        return Err(ApiError::invalid(
            "`argv` must name a command: [\"ls\", \"-l\"]",
        ));
    }
    Ok(ExecSpec {
        argv: body.argv,
        env: env_pairs(body.env)?,
        workdir: body.workdir,
        user: body.user,
        timeout: seconds_field("timeout_seconds", body.timeout_seconds)?,
        stdin,
        tty: None,
        attachable: false,
        label: None,
    })
}

/// Splits the WebSocket's first message into its `ExecBody` and its terminal ([`WsTerminal`]):
/// both parts refuse unknown fields.
fn ws_start(text: &str) -> Result<(ExecBody, Option<TtySize>), String> {
    let what =
        |e: serde_json::Error| format!("the first message must be the exec request as JSON: {e}");
    let mut fields: serde_json::Map<String, serde_json::Value> =
        serde_json::from_str(text).map_err(what)?;
    let terminal: serde_json::Map<_, _> = WsTerminal::KEYS
        .iter()
        .filter_map(|key| fields.remove_entry(*key))
        .collect();
    let terminal: WsTerminal = serde_json::from_value(terminal.into()).map_err(what)?;
    let body: ExecBody = serde_json::from_value(fields.into()).map_err(what)?;
    let tty = match terminal {
        WsTerminal {
            tty: Some(true),
            rows,
            cols,
        } => Some(TtySize {
            rows: rows.unwrap_or(24),
            cols: cols.unwrap_or(80),
        }),
        WsTerminal {
            rows: None,
            cols: None,
            ..
        } => None,
        _ => return Err("`rows` and `cols` need `\"tty\": true`".into()),
    };
    Ok((body, tty))
}

/// Largest WebSocket message (and frame) a client may send; a larger one closes the connection
/// with 1009 (message too big).
pub const MAX_WS_MESSAGE: usize = 1 << 20;
/// Stdin bytes queued per WebSocket exec while the command does not read them.
const STDIN_QUEUE_BYTES: usize = 1 << 20;
// A message must fit the queue, or waiting for room for it would never end.
const _: () = assert!(STDIN_QUEUE_BYTES >= MAX_WS_MESSAGE);

#[utoipa::path(get, path = "/v1/sandboxes/{id}/exec/ws", tag = "exec", operation_id = "execInSandboxWebSocket",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 101, description = "WebSocket. Client: first a text message holding an `ExecBody`, optionally with the \
            `WsTerminal` fields beside its own (`\"tty\": true, \"rows\": 24, \"cols\": 80`: the command runs on a pseudo-terminal, \
            its output comes as `stdout` events only, ^C sent as stdin interrupts its foreground job); then binary \
            messages are stdin, text messages are `WsControl` (`{\"close_stdin\":true}`, `{\"signal\":15}`, \
            `{\"resize\":{\"rows\":50,\"cols\":132}}` for a terminal). \
            Server: one text message per `ExecEvent`, then close. A client message over 1 MiB closes the connection \
            with 1009; stdin the command does not read is queued up to 1 MiB, then the server stops reading messages \
            until it drains (output keeps flowing)."),
        (status = 400, description = "Not a WebSocket upgrade request (the web framework's plain-text answer)", content_type = "text/plain", body = String),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
    ))]
pub async fn exec_ws(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    // Refuse before upgrading when the sandbox is not there, so the client sees a plain 404.
    state.node.get(&tenant.name, &id)?;
    let upgrade = upgrade
        .max_message_size(MAX_WS_MESSAGE)
        .max_frame_size(MAX_WS_MESSAGE);
    Ok(upgrade.on_upgrade(move |socket| async move {
        if let Err(e) = interactive(state, tenant.name, id, socket).await {
            tracing::debug!("exec websocket ended: {e}");
        }
    }))
}

type WsResult = Result<(), axum::Error>;

/// Queue room a stdin message takes: its length, and at least 1 so empty messages count too.
fn cost(data: &[u8]) -> u32 {
    data.len().max(1) as u32
}

/// Why the connection ends after a read error: 1009 for a message over [`MAX_WS_MESSAGE`], else
/// 1002 (protocol error).
fn close_frame(err: axum::Error) -> CloseFrame {
    use tokio_tungstenite::tungstenite::error::{CapacityError, Error};
    let too_big = err
        .into_inner()
        .downcast_ref::<Error>()
        .is_some_and(|e| matches!(e, Error::Capacity(CapacityError::MessageTooLong { .. })));
    match too_big {
        true => CloseFrame {
            code: close_code::SIZE,
            reason: format!("message larger than {MAX_WS_MESSAGE} bytes").into(),
        },
        false => CloseFrame {
            code: close_code::PROTOCOL,
            reason: "websocket protocol error".into(),
        },
    }
}

async fn interactive(
    state: Arc<AppState>,
    tenant: String,
    id: String,
    socket: WebSocket,
) -> WsResult {
    let (mut tx, mut rx) = socket.split();
    let send =
        |event: ExecEvent| Message::Text(serde_json::to_string(&event).expect("event").into());
    let failed = |message: String| ExecEvent {
        error: Some(message),
        ..Default::default()
    };
    let first = match rx.next().await {
        Some(Ok(Message::Text(text))) => ws_start(&text),
        Some(Ok(_)) => Err("the first message must be a text message with the exec request".into()),
        Some(Err(e)) => {
            let _ = tx.send(Message::Close(Some(close_frame(e)))).await;
            return Ok(());
        }
        None => return Ok(()),
    };
    let started = match first.map_err(ApiError::invalid).and_then(|(body, tty)| {
        Ok(ExecSpec {
            tty,
            ..exec_spec(body, true)?
        })
    }) {
        Ok(spec) => state
            .node
            .exec(&tenant, &id, spec)
            .await
            .map_err(ApiError::from),
        Err(e) => Err(e),
    };
    let mut handle = match started {
        Ok(handle) => handle,
        Err(e) => {
            tx.send(send(failed(e.message))).await?;
            return tx.close().await;
        }
    };
    // Stdin goes through its own task: a write waiting for the guest to read must never stop
    // output from flowing (the guest may be blocked writing output we have not read). What waits
    // for that task is bounded in bytes: once `STDIN_QUEUE_BYTES` are queued, the next message is
    // held and no more are read from the socket (TCP pushes back on the client) while output
    // keeps flowing.
    let budget = Arc::new(Semaphore::new(STDIN_QUEUE_BYTES));
    let (stdin_tx, mut stdin_rx) = mpsc::unbounded_channel::<(Bytes, OwnedSemaphorePermit)>();
    if let Some(mut writer) = handle.take_stdin() {
        tokio::spawn(async move {
            while let Some((data, _permit)) = stdin_rx.recv().await {
                if writer.write(&data).await.is_err() {
                    return;
                }
            }
            let _ = writer.close().await;
        });
    }
    let mut stdin_tx = Some(stdin_tx);
    // A stdin message waiting for room in the queue; the socket is not read meanwhile.
    let mut held: Option<Bytes> = None;
    loop {
        let room = held
            .as_ref()
            .map(|data| budget.clone().acquire_many_owned(cost(data)));
        tokio::select! {
            permit = async { room.expect("guarded").await }, if held.is_some() => {
                let data = held.take().expect("guarded");
                if let (Some(stdin), Ok(permit)) = (&stdin_tx, permit) {
                    let _ = stdin.send((data, permit));
                }
            }
            message = rx.next(), if held.is_none() => match message {
                Some(Ok(Message::Binary(data))) => {
                    if let Some(stdin) = &stdin_tx {
                        match budget.clone().try_acquire_many_owned(cost(&data)) {
                            Ok(permit) => {
                                let _ = stdin.send((data, permit));
                            }
                            Err(_) => held = Some(data),
                        }
                    }
                }
                Some(Ok(Message::Text(text))) => match serde_json::from_str::<WsControl>(&text) {
                    Ok(control) => {
                        if control.close_stdin == Some(true) {
                            stdin_tx = None;
                        }
                        if let Some(signal) = control.signal {
                            if let Err(e) = handle.signal(signal).await {
                                tx.send(send(failed(e.to_string()))).await?;
                            }
                        }
                        if let Some(size) = control.resize {
                            let size = TtySize { rows: size.rows, cols: size.cols };
                            if let Err(e) = handle.resize(size).await {
                                tx.send(send(failed(e.to_string()))).await?;
                            }
                        }
                    }
                    Err(e) => {
                        let message = format!("control messages are {{\"close_stdin\":true}}, {{\"signal\":N}} or {{\"resize\":{{\"rows\":R,\"cols\":C}}}}: {e}");
                        tx.send(send(failed(message))).await?;
                    }
                },
                Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                Some(Err(e)) => {
                    // Say why before hanging up (the exec is dropped, killing the command).
                    let _ = tx.send(Message::Close(Some(close_frame(e)))).await;
                    return Ok(());
                }
                // The client went away: dropping the exec kills the command.
                Some(Ok(Message::Close(_))) | None => return Ok(()),
            },
            output = handle.next_output() => match output {
                Ok(Some(output)) => tx.send(send(output_event(output))).await?,
                Ok(None) => {
                    let event = match handle.wait().await {
                        Ok(status) => exit_event(status),
                        Err(e) => error_event(e),
                    };
                    tx.send(send(event)).await?;
                    return tx.close().await;
                }
                Err(e) => {
                    tx.send(send(error_event(e))).await?;
                    return tx.close().await;
                }
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_websocket_message_splits_into_exec_and_terminal() {
        let (body, tty) = ws_start(r#"{"argv":["sh"],"tty":true,"cols":100}"#).unwrap();
        assert_eq!(body.argv, ["sh"]);
        assert_eq!(
            tty,
            Some(TtySize {
                rows: 24,
                cols: 100
            })
        );
        assert_eq!(ws_start(r#"{"argv":["sh"],"tty":false}"#).unwrap().1, None);
        for (bad, needle) in [
            (r#"{"argv":["sh"],"rows":3}"#, "need `\"tty\": true`"),
            (r#"{"argv":["sh"],"tty":true,"rows":-1}"#, "invalid value"),
            (r#"{"argv":["sh"],"tyy":true}"#, "unknown field `tyy`"),
            (r#"["sh"]"#, "exec request as JSON"),
        ] {
            let err = ws_start(bad).unwrap_err();
            assert!(err.contains(needle), "{bad}: {err}");
        }
    }
}
