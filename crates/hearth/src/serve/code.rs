//! `/v1/sandboxes/{id}/code`: code run in an interpreter that the sandbox keeps between calls, so
//! names one call defines are there for the next (a notebook kernel's model). Thin handlers over
//! `Node::run_code` and `Node::reset_code`, whose module documents the choices: one Python
//! interpreter per sandbox, calls on it queued one after the other, a timeout as SIGINT
//! (KeyboardInterrupt, state kept), a lost interpreter restarted by the next call, which says so.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use hearth_sandbox::node::{CodeError, CodeOutcome, MAX_CODE_TIMEOUT};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::api::ErrorBody;
use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

/// A call's timeout when the request names none.
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(60);

/// `POST /v1/sandboxes/{id}/code`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCode {
    /// Source code; the value of a trailing expression is returned as `result`.
    pub code: String,
    /// `python` (the default) is the only language.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub language: Option<String>,
    /// Interrupt the code (SIGINT: `KeyboardInterrupt`) after this long; default 60, at most 3600.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
}

/// What one code run produced.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CodeResult {
    /// What the code printed (to `sys.stdout`, fd 1 or from child processes), at most 1 MiB.
    pub stdout: String,
    /// Likewise for stderr.
    pub stderr: String,
    /// `repr()` of the value of the code's last line when it is an expression that is not `None`.
    pub result: Option<String>,
    /// The exception the code raised, or how the interpreter was lost (`InterpreterExited`,
    /// `TimeoutError` when it had to be killed).
    pub error: Option<CodeRunError>,
    /// The timeout interrupted the code (`KeyboardInterrupt` in `error`, earlier state kept) or,
    /// when SIGINT did not stop it within 5 s, killed the interpreter.
    pub timed_out: bool,
    /// This call ran in a fresh interpreter because the previous one was lost (it crashed or exited,
    /// was killed after a timeout, a forced pause or a daemon stop cut a call short): names defined
    /// before are gone. A pause and resume and a daemon restart keep the interpreter; a fork's
    /// children get copies of it.
    pub restarted: bool,
    /// Calls run by this interpreter, this one included.
    pub execution_count: u64,
    /// Output beyond 1 MiB per stream was dropped (the text ends with a marker saying how much).
    pub truncated: bool,
}

/// An exception, as Python reports it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct CodeRunError {
    /// The exception's class name, e.g. `ZeroDivisionError`.
    pub name: String,
    pub message: String,
    /// The formatted traceback, as Python prints it (empty when the interpreter was lost).
    pub traceback: String,
}

impl From<CodeOutcome> for CodeResult {
    fn from(o: CodeOutcome) -> CodeResult {
        CodeResult {
            stdout: o.stdout,
            stderr: o.stderr,
            result: o.result,
            error: o.error.map(
                |CodeError {
                     name,
                     message,
                     traceback,
                 }| CodeRunError {
                    name,
                    message,
                    traceback,
                },
            ),
            timed_out: o.timed_out,
            restarted: o.restarted,
            execution_count: o.execution_count,
            truncated: o.truncated,
        }
    }
}

#[utoipa::path(post, path = "/v1/sandboxes/{id}/code", tag = "code", operation_id = "runCode",
    params(("id" = String, Path, description = "Sandbox id")),
    request_body = RunCode,
    security(("bearer" = [])),
    responses(
        (status = 200, description = "The code ran (an exception it raised is in `error`). Calls on one sandbox are \
            queued and run one at a time in the same interpreter; the timeout counts from the call's start, not its wait.",
            body = CodeResult),
        (status = 400, description = "An unsupported `language` (`unsupported_language`), a bad timeout, or an image without python3", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "Body over 8 MiB", body = ErrorBody),
        (status = 415, description = "The body is not sent as `Content-Type: application/json`", body = ErrorBody),
        (status = 422, description = "Unknown field or wrong type", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "The interpreter could not be run (the message says why)", body = ErrorBody),
        (status = 502, description = "The guest went away mid-call (its VM died; code `guest_failed`)", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
        (status = 504, description = "The guest did not start the interpreter in time", body = ErrorBody),
    ))]
pub async fn run(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    body: Result<Json<RunCode>, JsonRejection>,
) -> Result<Json<CodeResult>, ApiError> {
    let Json(body) = body?;
    match body.language.as_deref() {
        None | Some("python") => {}
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                "unsupported_language",
                format!("language {other:?}: only \"python\" is supported"),
            ))
        }
    }
    let timeout = match body.timeout_seconds {
        None => DEFAULT_TIMEOUT,
        Some(s @ 1..) if Duration::from_secs(s) <= MAX_CODE_TIMEOUT => Duration::from_secs(s),
        Some(_) => {
            return Err(ApiError::invalid(format!(
                "`timeout_seconds` must be 1 to {}",
                MAX_CODE_TIMEOUT.as_secs()
            )))
        }
    };
    let outcome = state
        .node
        .run_code(&tenant.name, &id, body.code, timeout)
        .await?;
    Ok(Json(outcome.into()))
}

#[utoipa::path(delete, path = "/v1/sandboxes/{id}/code", tag = "code", operation_id = "resetCode",
    params(("id" = String, Path, description = "Sandbox id")),
    security(("bearer" = [])),
    responses(
        (status = 204, description = "The interpreter is ended (after the calls queued before this); the next call starts a \
            fresh one, with `restarted: false`"),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 404, description = "No such sandbox for this tenant", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
    ))]
pub async fn reset(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.node.reset_code(&tenant.name, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}
