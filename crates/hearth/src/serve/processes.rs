//! `/v1/sandboxes/{id}/processes`: background processes, commands that run on after the call that
//! started them has answered, whose output the daemon keeps (the last 1 MiB of each) to be read
//! later from an offset or followed. Thin handlers over `Node::start_process` and its siblings,
//! whose module documents the choices: 16 per sandbox, not a use of the sandbox for its idle
//! timeout unless started `keep_awake`, kept across pauses, forks and daemon restarts. Reads (list,
//! one, output) are answered from the daemon's memory and do not wake a sandbox its idle timeout
//! paused (they count as a use of a running one); the rest do.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderName, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use base64::Engine;
use hearth_sandbox::node::{OutputEvent, OutputReader, ProcessInfo, Stream};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::{ErrorBody, ExecBody, ExecEvent};
use super::auth::Authenticated;
use super::error::ApiError;
use super::exec::{exec_spec, exit_event};
use super::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

/// The header of an output answer saying at which offset its first byte is.
pub const OFFSET_HEADER: &str = "hearth-output-offset";

/// `POST /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the process's tree after this long (default: it runs until removed or its sandbox ends).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// Keep a pipe to its stdin open for `POST .../stdin` (default: stdin is `/dev/null`).
    #[serde(default)]
    pub open_stdin: bool,
    /// A name of the caller's, at most 64 bytes (listed, not interpreted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tag: Option<String>,
    /// Count as a use of the sandbox while it runs, so that its idle timeout waits for it (a build
    /// you wait for). Default: it does not (a server waiting for requests would keep its sandbox
    /// awake forever); the sandbox sleeps with it and it goes on after the wake.
    #[serde(default)]
    pub keep_awake: bool,
}

/// A background process.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Process {
    /// Its id in the sandbox, from 1; the same after pauses, forks and daemon restarts.
    pub id: u32,
    /// Its PID in the guest.
    pub pid: u32,
    pub argv: Vec<String>,
    pub tag: Option<String>,
    /// Unix milliseconds.
    pub started_at: u64,
    pub running: bool,
    /// Started with `keep_awake`.
    pub keep_awake: bool,
    pub exit_code: Option<i32>,
    /// The signal that killed it.
    pub signal: Option<i32>,
    /// Its `timeout_seconds` killed it.
    pub timed_out: bool,
    /// Why it is lost, its exit status unknown: it was gone when its sandbox came back (after a
    /// resume, a fork or a daemon restart).
    pub lost: Option<String>,
    /// Bytes of output produced, stdout and stderr together: the offset after its last byte (a
    /// restarted daemon, and a fork's child, go on counting where the old daemon or the parent was).
    pub output_bytes: u64,
    /// Of those, bytes no longer kept (beyond the last 1 MiB).
    pub output_dropped: u64,
}

impl From<ProcessInfo> for Process {
    fn from(p: ProcessInfo) -> Process {
        Process {
            id: p.id,
            pid: p.pid,
            argv: p.argv,
            tag: p.tag,
            started_at: p.started_at,
            running: p.running,
            keep_awake: p.keep_awake,
            exit_code: p.exit_code,
            signal: p.signal,
            timed_out: p.timed_out,
            lost: p.lost,
            output_bytes: p.output_bytes,
            output_dropped: p.output_dropped,
        }
    }
}

/// Answer to `GET /v1/sandboxes/{id}/processes`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ProcessList {
    /// Oldest first.
    pub processes: Vec<Process>,
}

/// `GET .../processes/{process}/output` query.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OutputQuery {
    /// Output from this offset on (default 0): a client that reconnects gives `output_bytes` as
    /// it last saw it, or the offset after the last byte it got.
    #[serde(default)]
    pub offset: u64,
    /// Keep the answer open for new output until the process ends (default: answer with what is
    /// kept now).
    #[serde(default)]
    pub follow: bool,
}

/// `POST .../processes/{process}/stdin`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessStdin {
    /// Bytes to write, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub data: Option<String>,
    /// Close its stdin afterwards (it reads end of file).
    #[serde(default)]
    pub close: bool,
}

/// `POST .../processes/{process}/signal`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessSignal {
    /// Signal number, 1-64 (15 SIGTERM, 9 SIGKILL, 2 SIGINT).
    pub signal: i32,
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes", tag = "processes", operation_id = "startProcess",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = StartProcess,
    security(("bearer" = [])),
    responses(
        (status = 201, description = "The process runs; read its output with `GET .../output`", body = Process),
        (status = 400, description = "Empty argv, bad environment, working directory or tag", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running (one its idle timeout paused is resumed first)", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "The sandbox already runs 16 background processes (`limit`), or has its maximum of \
            requests open (`busy`)", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down, or the guest could not start the command", body = ErrorBody),
    ))]
pub async fn start(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<StartProcess>, JsonRejection>,
) -> Result<(StatusCode, Json<Process>), ApiError> {
    let Json(body) = body?;
    let exec = ExecBody {
        argv: body.argv,
        env: body.env,
        workdir: body.workdir,
        user: body.user,
        timeout_seconds: body.timeout_seconds,
        stdin: None,
    };
    let spec = exec_spec(exec, body.open_stdin)?;
    let info = state
        .node
        .start_process(&tenant.name, &id, spec, body.tag, body.keep_awake)
        .await?;
    Ok((StatusCode::CREATED, Json(info.into())))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes", tag = "processes", operation_id = "listProcesses",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Its background processes, running and ended (the 16 newest); a paused sandbox \
            answers without being woken", body = ProcessList),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
    ))]
pub async fn list(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<Json<ProcessList>, ApiError> {
    let processes = state.node.processes(&tenant.name, &id)?;
    Ok(Json(ProcessList {
        processes: processes.into_iter().map(Process::from).collect(),
    }))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{process}", tag = "processes", operation_id = "getProcess",
    params(("id" = String, Path, description = "Sandbox id"), ("process" = u32, Path, description = "Process id")),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The process", body = Process),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant, or no such process in it", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, process)): Path<(String, u32)>,
) -> Result<Json<Process>, ApiError> {
    Ok(Json(state.node.process(&tenant.name, &id, process)?.into()))
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/processes/{process}/output", tag = "processes", operation_id = "processOutput",
    params(("id" = String, Path, description = "Sandbox id"), ("process" = u32, Path, description = "Process id"), OutputQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "NDJSON stream of `ExecEvent`s: the kept output from `offset` in order, then (with \
            `follow`) new output as it comes; the last line is `exit_code`, `signal` or `error` (the process is lost) once it \
            has ended, and absent while it runs. The `Hearth-Output-Offset` header gives the offset of the first byte \
            sent: past `offset` when bytes there are no longer kept.",
            content_type = "application/x-ndjson", body = inline(super::openapi::Binary),
            headers(("Hearth-Output-Offset" = u64, description = "Offset of the first byte in this answer"))),
        (status = 400, description = "A bad query", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant, or no such process in it", body = ErrorBody),
    ))]
pub async fn output(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, process)): Path<(String, u32)>,
    query: Result<Query<OutputQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let reader =
        state
            .node
            .process_output(&tenant.name, &id, process, query.offset, query.follow)?;
    let start = reader.start();
    let lines = futures::stream::unfold(reader, |mut reader: OutputReader| async move {
        let event = match reader.next().await? {
            OutputEvent::Output { stream, data, .. } => {
                let data = Some(B64.encode(data));
                match stream {
                    Stream::Stdout => ExecEvent {
                        stdout: data,
                        ..Default::default()
                    },
                    Stream::Stderr => ExecEvent {
                        stderr: data,
                        ..Default::default()
                    },
                }
            }
            OutputEvent::Ended(info) => ended_event(&info),
        };
        let mut line = serde_json::to_vec(&event).expect("event serializes");
        line.push(b'\n');
        Some((Ok::<_, Infallible>(line), reader))
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/x-ndjson".to_owned()),
            (HeaderName::from_static(OFFSET_HEADER), start.to_string()),
        ],
        Body::from_stream(lines),
    )
        .into_response())
}

/// The last event of an ended (or lost) process's output.
fn ended_event(info: &ProcessInfo) -> ExecEvent {
    if let Some(lost) = &info.lost {
        return ExecEvent {
            error: Some(lost.clone()),
            ..Default::default()
        };
    }
    exit_event(hearth_sandbox::ExitStatus {
        code: info.exit_code,
        signal: info.signal,
        timed_out: info.timed_out,
    })
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{process}/stdin", tag = "processes", operation_id = "writeProcessStdin",
    params(("id" = String, Path, description = "Sandbox id"), ("process" = u32, Path, description = "Process id")),
    request_body = ProcessStdin,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Written (and closed, with `close`)"),
        (status = 400, description = "`data` is not base64", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant, or no such process in it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running, or the process was started without `open_stdin`, has \
            closed its stdin or has ended", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
    ))]
pub async fn stdin(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, process)): Path<(String, u32)>,
    body: Result<Json<ProcessStdin>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body?;
    let data = body
        .data
        .as_deref()
        .map(|s| B64.decode(s))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("`data` is not base64: {e}")))?
        .unwrap_or_default();
    state
        .node
        .write_process_stdin(&tenant.name, &id, process, &data, body.close)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/processes/{process}/signal", tag = "processes", operation_id = "signalProcess",
    params(("id" = String, Path, description = "Sandbox id"), ("process" = u32, Path, description = "Process id")),
    request_body = ProcessSignal,
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Sent (nothing is sent to a process that has ended)"),
        (status = 400, description = "A signal number outside 1-64", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant, or no such process in it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
pub async fn signal(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, process)): Path<(String, u32)>,
    body: Result<Json<ProcessSignal>, JsonRejection>,
) -> Result<StatusCode, ApiError> {
    let Json(body) = body?;
    state
        .node
        .signal_process(&tenant.name, &id, process, body.signal)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/processes/{process}", tag = "processes", operation_id = "removeProcess",
    params(("id" = String, Path, description = "Sandbox id"), ("process" = u32, Path, description = "Process id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "Killed (its whole process tree) if it ran, and forgotten with its output"),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant, or no such process in it", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
    ))]
pub async fn remove(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path((id, process)): Path<(String, u32)>,
) -> Result<StatusCode, ApiError> {
    state
        .node
        .remove_process(&tenant.name, &id, process)
        .await?;
    Ok(StatusCode::NO_CONTENT)
}
