//! `PUT|GET /v1/sandboxes/{id}/files?path=`: files in and out of a sandbox, streamed both ways (no
//! whole file in memory). Uploads are bounded by `--max-upload`; the agent replaces the target only
//! once the upload is complete, so a refused or broken upload changes nothing. `GET` on a directory
//! answers its listing as JSON.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap};
use axum::response::{IntoResponse, Response};
use axum::Json;
use futures::StreamExt;
use hearth_proto::ErrorKind;
use hearth_sandbox::node::NodeError;
use hearth_sandbox::ChannelError;

use super::api::{DirListing, ErrorBody, FileQuery, FileWritten};
use super::auth::Authenticated;
use super::error::ApiError;
use super::AppState;

/// Header carrying a downloaded file's permission bits (octal).
pub const MODE_HEADER: &str = "x-hearth-mode";

#[utoipa::path(put, path = "/v1/sandboxes/{id}/files", tag = "files", operation_id = "putSandboxFile",
    params(("id" = String, Path, description = "Sandbox id"), FileQuery),
    request_body(content = inline(super::openapi::Binary), content_type = "application/octet-stream", description = "The file's bytes"),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "Written", body = FileWritten),
        (status = 400, description = "Bad path or mode, or the parent is not a directory", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The guest refused the write (permission denied)", body = ErrorBody),
        (status = 404, description = "No such sandbox, or no such parent directory", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 413, description = "Larger than the daemon's --max-upload", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "The write failed in the guest or on the node (the message says why)", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
        (status = 502, description = "The guest went away mid-request (its VM died; code `guest_failed`)", body = ErrorBody),
        (status = 504, description = "The guest agent did not answer in time (the sandbox is hung or misbehaving)", body = ErrorBody),
    ))]
pub async fn put(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<FileWritten>, ApiError> {
    let Query(query) = query?;
    let mode = match query.mode.as_deref() {
        None => 0o644,
        Some(text) => u32::from_str_radix(text, 8)
            .ok()
            .filter(|&m| m <= 0o7777)
            .ok_or_else(|| {
                ApiError::invalid(format!(
                    "`mode` {text:?} is not octal permission bits like 644"
                ))
            })?,
    };
    let limit = state.settings.max_upload_bytes;
    let too_large = || {
        ApiError::too_large(format!(
            "uploads are limited to {limit} bytes (--max-upload)"
        ))
    };
    let declared = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit) {
        return Err(too_large());
    }
    // The upload is abandoned the moment it passes the limit: dropping the node's future resets the
    // transfer, and the agent discards the partial file.
    let (overflow_tx, overflow_rx) = tokio::sync::oneshot::channel::<()>();
    let mut overflow_tx = Some(overflow_tx);
    let mut seen = 0u64;
    let chunks = body.into_data_stream().map(move |chunk| {
        let chunk = chunk.map_err(std::io::Error::other)?;
        seen += chunk.len() as u64;
        if seen > limit {
            if let Some(tx) = overflow_tx.take() {
                let _ = tx.send(());
            }
            return Err(std::io::Error::other("upload larger than --max-upload"));
        }
        Ok(chunk)
    });
    let reader = tokio_util::io::StreamReader::new(chunks);
    let upload = state
        .node
        .put_file(&tenant.name, &id, &query.path, mode, reader);
    tokio::select! {
        written = upload => Ok(Json(FileWritten {
            path: query.path,
            bytes: written?,
        })),
        Ok(()) = overflow_rx => Err(too_large()),
    }
}

#[utoipa::path(get, path = "/v1/sandboxes/{id}/files", tag = "files", operation_id = "getSandboxFile",
    params(("id" = String, Path, description = "Sandbox id"), FileQuery),
    security(("bearer" = [])),
    responses(
        (status = 200, description = "A regular file's bytes (`x-hearth-mode` holds its permission bits in octal), or a directory's listing as JSON",
            content((inline(super::openapi::Binary) = "application/octet-stream"), (DirListing = "application/json")),
            headers(("x-hearth-mode" = String, description = "The file's permission bits in octal, like `644` (regular files only)"))),
        (status = 400, description = "Bad path, or not a regular file or directory", body = ErrorBody),
        (status = 401, description = "Missing or unknown token", body = ErrorBody),
        (status = 403, description = "The guest refused the read (permission denied)", body = ErrorBody),
        (status = 404, description = "No such sandbox or file", body = ErrorBody),
        (status = 409, description = "The sandbox is not running", body = ErrorBody),
        (status = 429, description = "The sandbox already has its maximum of requests open (`busy`, see Retry-After)", body = ErrorBody,
            headers(("Retry-After" = u64, description = "Seconds to wait before trying again"))),
        (status = 500, description = "The read failed in the guest or on the node (the message says why)", body = ErrorBody),
        (status = 503, description = "The daemon is shutting down", body = ErrorBody),
        (status = 502, description = "The guest went away mid-request (its VM died; code `guest_failed`)", body = ErrorBody),
        (status = 504, description = "The guest agent did not answer in time (the sandbox is hung or misbehaving)", body = ErrorBody),
    ))]
pub async fn get(
    State(state): State<Arc<AppState>>,
    Authenticated(tenant): Authenticated,
    Path(id): Path<String>,
    query: Result<Query<FileQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Query(query) = query?;
    let node = &state.node;
    let download = match node.get_file(&tenant.name, &id, &query.path).await {
        Ok(download) => download,
        Err(NodeError::Channel(ChannelError::Agent(e))) if e.kind == ErrorKind::IsADirectory => {
            let listing = node.list_dir(&tenant.name, &id, &query.path).await?;
            return Ok(Json(DirListing::from_agent(&query.path, listing)).into_response());
        }
        Err(e) => return Err(e.into()),
    };
    let mode = format!("{:o}", download.mode());
    let chunks = futures::stream::unfold(Some(download), |download| async move {
        let mut download = download?;
        match download.chunk().await {
            Ok(Some(chunk)) => Some((Ok(chunk), Some(download))),
            Ok(None) => None,
            // Cut the body: the client sees a broken transfer, not a short file.
            Err(e) => Some((Err(std::io::Error::other(e)), None)),
        }
    });
    Ok((
        [
            (header::CONTENT_TYPE, "application/octet-stream".to_string()),
            (header::HeaderName::from_static(MODE_HEADER), mode),
        ],
        Body::from_stream(chunks),
    )
        .into_response())
}
