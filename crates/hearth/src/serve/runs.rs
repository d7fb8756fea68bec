//! `POST /v1/runs`: one command in a fresh sandbox, through
//! [`Node::run_once`](hearth_sandbox::node::Node::run_once), which creates it, waits for the boot,
//! runs the command and deletes the sandbox however the request ends (also when the client goes
//! away mid-run). This handler only translates: the body into a run spec, the first
//! `--run-output-limit` bytes of each stream into the answer (`truncated` when more came), and a
//! failed step into its HTTP status.

use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine;
use hearth_sandbox::node::{CreateSpec, RunError, RunSpec};
use hearth_sandbox::ExecOutput;

use super::api::{ErrorBody, ExecBody, RunBody, RunResult};
use super::auth::Authenticated;
use super::error::ApiError;
use super::exec::exec_spec;
use super::sandboxes::{nonempty, size_field};
use super::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[utoipa::path(post, path = "/v1/runs", tag = "runs", operation_id = "runOnce",
    request_body = RunBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The command ran; its output and how it ended", body = RunResult),
        (status = 400, description = "Bad image reference (a local `oci-layout:`/`oci-archive:` path only from a directory the node allows), empty argv, bad size or stdin", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The node's default network policy is above the tenant's ceiling", body = ErrorBody),
        (status = 404, description = "The sandbox was deleted (by another request) before the command started", body = ErrorBody),
        (status = 409, description = "The sandbox stopped before the command started", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "Tenant quota used up (`quota`), or the sandbox's request cap (`busy`, with Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `busy`)"))),
        (status = 500, description = "The sandbox failed to boot, or the command's output was lost (the message says why)", body = ErrorBody),
        (status = 503, description = "Node capacity used up (`capacity`, with Retry-After) or shutting down (`shutting_down`)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again (sent with `capacity`)"))),
        (status = 504, description = "The guest agent did not answer in time", body = ErrorBody),
    ))]
pub async fn run(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    body: Result<Json<RunBody>, JsonRejection>,
) -> Result<Json<RunResult>, ApiError> {
    let Json(body) = body?;
    let stdin = body
        .stdin
        .as_deref()
        .map(|s| B64.decode(s))
        .transpose()
        .map_err(|e| ApiError::invalid(format!("`stdin` is not base64: {e}")))?;
    let exec = exec_spec(
        ExecBody {
            argv: body.argv,
            env: body.env,
            workdir: body.workdir,
            user: body.user,
            timeout_seconds: body.timeout_seconds,
            stdin: None,
        },
        stdin.is_some(),
    )?;
    let spec = RunSpec {
        create: CreateSpec {
            image: nonempty("image", &body.image)?,
            vcpus: body.cpus,
            memory_mib: size_field("memory", body.memory.as_deref())?
                .map(|b| u32::try_from(b >> 20).unwrap_or(u32::MAX)),
            disk_bytes: size_field("disk", body.disk.as_deref())?,
            ..CreateSpec::default()
        },
        exec,
        stdin,
        boot_timeout: state.settings.create_wait,
        // A full node answers 503 with Retry-After at once; the client decides whether to wait.
        capacity_wait: std::time::Duration::ZERO,
    };
    let mut output = Head::new(state.settings.run_output_limit);
    let ran = state
        .node
        .run_once(&tenant, spec, |chunk| output.push(chunk))
        .await
        .map_err(api_error)?;
    Ok(Json(RunResult {
        stdout: B64.encode(output.stdout),
        stderr: B64.encode(output.stderr),
        exit_code: ran.status.code,
        signal: ran.status.signal,
        timed_out: ran.status.timed_out,
        truncated: output.truncated,
        boot_ms: Some(ran.boot_ms),
    }))
}

/// The first `limit` bytes of each stream, and whether more came.
struct Head {
    limit: usize,
    stdout: Vec<u8>,
    stderr: Vec<u8>,
    truncated: bool,
}

impl Head {
    fn new(limit: usize) -> Head {
        Head {
            limit,
            stdout: Vec::new(),
            stderr: Vec::new(),
            truncated: false,
        }
    }

    fn push(&mut self, chunk: ExecOutput) {
        let (buf, data) = match chunk {
            ExecOutput::Stdout(data) => (&mut self.stdout, data),
            ExecOutput::Stderr(data) => (&mut self.stderr, data),
        };
        let room = self.limit.saturating_sub(buf.len());
        self.truncated |= data.len() > room;
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }
}

/// A refused run answers as the node's refusal does (400, 429, 503); a failed boot, a failed exec and
/// lost output as the step's own error (a boot failure is the server's: 500).
fn api_error(err: RunError) -> ApiError {
    match err {
        RunError::Refused(e) | RunError::Exec(e) | RunError::OutputLost(e) => e.into(),
        not_started @ RunError::NotStarted { .. } => ApiError::internal(not_started.to_string()),
    }
}
