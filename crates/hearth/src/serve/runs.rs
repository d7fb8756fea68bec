//! `POST /v1/runs`: one command in a fresh sandbox — create (waiting for the boot), exec, collect
//! the output up to `--run-output-limit` per stream, delete. The sandbox is deleted however the
//! request ends, including when the client goes away mid-run (a drop guard), and its TTL is the
//! command's timeout plus boot time, so the node reaps it even if this daemon dies.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::State;
use axum::Json;
use base64::Engine;
use hearth_sandbox::node::{CreateSpec, Node, State as NodeState};
use hearth_vm::channel::ExecOutput;

use super::api::{ErrorBody, ExecBody, RunBody, RunResult};
use super::auth::Authenticated;
use super::error::ApiError;
use super::exec::exec_spec;
use super::sandboxes::{nonempty, size_field};
use super::AppState;

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;
/// Time allowed for pull and boot on top of the command's timeout when sizing the sandbox's TTL.
const BOOT_ALLOWANCE: Duration = Duration::from_secs(600);

#[utoipa::path(post, path = "/v1/runs", tag = "runs",
    request_body = RunBody,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The command ran; its output and how it ended", body = RunResult),
        (status = 400, description = "Bad image reference, empty argv, bad size or stdin", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 413, description = "Body too large", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "Tenant quota used up", body = ErrorBody),
        (status = 500, description = "The sandbox failed to boot (the message says why)", body = ErrorBody),
        (status = 503, description = "Node capacity used up (see Retry-After) or shutting down", body = ErrorBody),
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
    let spec = CreateSpec {
        image: nonempty("image", &body.image)?,
        vcpus: body.cpus,
        memory_mib: size_field("memory", body.memory.as_deref())?
            .map(|b| u32::try_from(b >> 20).unwrap_or(u32::MAX)),
        disk_bytes: size_field("disk", body.disk.as_deref())?,
        ttl: exec.timeout.map(|t| t + BOOT_ALLOWANCE),
        ..CreateSpec::default()
    };
    let node = &state.node;
    let created = node.create(&tenant, spec).await?;
    let mut guard = DeleteOnDrop {
        node: node.clone(),
        tenant: tenant.name.clone(),
        id: Some(created.id.clone()),
    };
    let ready = node
        .wait_ready(&tenant.name, &created.id, state.settings.create_wait)
        .await?;
    if ready.state != NodeState::Running {
        return Err(ApiError::internal(format!(
            "the sandbox did not start ({}): {}",
            ready.state,
            ready.reason.as_deref().unwrap_or("still creating")
        )));
    }
    let mut handle = node.exec(&tenant.name, &created.id, exec).await?;
    if let (Some(data), Some(mut writer)) = (stdin, handle.take_stdin()) {
        tokio::spawn(async move {
            if writer.write(&data).await.is_ok() {
                let _ = writer.close().await;
            }
        });
    }
    let limit = state.settings.run_output_limit;
    let (mut stdout, mut stderr, mut truncated) = (Vec::new(), Vec::new(), false);
    while let Some(output) = handle.next_output().await? {
        let (buf, data) = match output {
            ExecOutput::Stdout(data) => (&mut stdout, data),
            ExecOutput::Stderr(data) => (&mut stderr, data),
        };
        let room = limit.saturating_sub(buf.len());
        truncated |= data.len() > room;
        buf.extend_from_slice(&data[..data.len().min(room)]);
    }
    let status = handle.wait().await?;
    guard.delete_now().await;
    Ok(Json(RunResult {
        stdout: B64.encode(stdout),
        stderr: B64.encode(stderr),
        exit_code: status.code,
        signal: status.signal,
        timed_out: status.timed_out,
        truncated,
        boot_ms: ready.boot_ms,
    }))
}

/// Deletes the run's sandbox when the request ends, however it ends: awaited on the normal path
/// (the answer comes after the sandbox is gone), spawned when the request is dropped or fails.
struct DeleteOnDrop {
    node: Arc<Node>,
    tenant: String,
    id: Option<String>,
}

impl DeleteOnDrop {
    async fn delete_now(&mut self) {
        if let Some(id) = self.id.take() {
            delete(&self.node, &self.tenant, &id).await;
        }
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        if let Some(id) = self.id.take() {
            let (node, tenant) = (self.node.clone(), self.tenant.clone());
            tokio::spawn(async move { delete(&node, &tenant, &id).await });
        }
    }
}

async fn delete(node: &Node, tenant: &str, id: &str) {
    if let Err(e) = node.delete(tenant, id).await {
        tracing::warn!(sandbox = %id, "deleting the sandbox of a finished run: {e}");
    }
}
