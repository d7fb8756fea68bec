//! Every error answer of the API: [`ApiError`] renders `{"error": "...", "code": "..."}` with one
//! HTTP status per kind. [`NodeError`]s map here, in one `match`, and so do the framework's own
//! rejections (malformed JSON, bad query strings, oversized bodies), so clients see one format.

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hearth_proto::ErrorKind;
use hearth_sandbox::node::NodeError;
use hearth_sandbox::ChannelError;

use super::api::ErrorBody;

/// How long a client refused for capacity should wait before retrying.
const RETRY_AFTER_SECONDS: u64 = 5;
/// How long a client refused because its sandbox has too many requests open should wait.
const BUSY_RETRY_AFTER_SECONDS: u64 = 1;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid", message)
    }

    pub fn unauthorized(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }

    pub fn not_found(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::NOT_FOUND, "not_found", message)
    }

    pub fn too_large(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "too_large", message)
    }

    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.status.is_server_error() {
            tracing::warn!(status = %self.status, "{}", self.message);
        }
        let body = ErrorBody {
            error: self.message,
            code: self.code.to_string(),
        };
        let mut response = (self.status, axum::Json(body)).into_response();
        let retry_after = match self.code {
            "capacity" => Some(RETRY_AFTER_SECONDS),
            "busy" => Some(BUSY_RETRY_AFTER_SECONDS),
            _ => None,
        };
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<NodeError> for ApiError {
    fn from(err: NodeError) -> ApiError {
        let message = err.to_string();
        let (status, code) = match &err {
            NodeError::NotFound { .. } => (StatusCode::NOT_FOUND, "not_found"),
            NodeError::NoProcess { .. } => (StatusCode::NOT_FOUND, "not_found"),
            NodeError::Limit(_) => (StatusCode::TOO_MANY_REQUESTS, "limit"),
            NodeError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid"),
            NodeError::Capacity { .. } => (StatusCode::SERVICE_UNAVAILABLE, "capacity"),
            NodeError::Quota { .. } => (StatusCode::TOO_MANY_REQUESTS, "quota"),
            NodeError::Forbidden(_) => (StatusCode::FORBIDDEN, "forbidden"),
            NodeError::NotRunning { .. } => (StatusCode::CONFLICT, "conflict"),
            NodeError::ShuttingDown | NodeError::Busy(_) => {
                (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
            }
            NodeError::Image(hearth_image::ImageError::Reference(_)) => {
                (StatusCode::BAD_REQUEST, "invalid")
            }
            NodeError::Image(_) => (StatusCode::BAD_GATEWAY, "image"),
            NodeError::PortClosed { .. } => (StatusCode::BAD_GATEWAY, "port_closed"),
            NodeError::Unresponsive { .. } => (StatusCode::GATEWAY_TIMEOUT, "guest_unresponsive"),
            // The node's disk is full: capacity, retried later.
            NodeError::Io { source, .. } if hearth_sandbox::is_disk_full(source) => {
                (StatusCode::SERVICE_UNAVAILABLE, "capacity")
            }
            NodeError::Channel(ChannelError::Agent(agent)) => match agent.kind {
                ErrorKind::NotFound => (StatusCode::NOT_FOUND, "not_found"),
                ErrorKind::PermissionDenied => (StatusCode::FORBIDDEN, "forbidden"),
                ErrorKind::AlreadyExists => (StatusCode::CONFLICT, "conflict"),
                ErrorKind::InvalidRequest | ErrorKind::NotADirectory | ErrorKind::IsADirectory => {
                    (StatusCode::BAD_REQUEST, "invalid")
                }
                // The guest's own workload holds every process slot, its memory or its disk
                // (a fork bomb, say): the sandbox's trouble, not the node's.
                ErrorKind::Exhausted => (StatusCode::SERVICE_UNAVAILABLE, "guest_exhausted"),
                ErrorKind::Internal => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            },
            // The sandbox's own request cap (not the node's): the client should retry soon.
            NodeError::Channel(ChannelError::Busy(_)) => (StatusCode::TOO_MANY_REQUESTS, "busy"),
            // The guest did not answer in time: the node is fine, the sandbox is not.
            NodeError::Channel(
                ChannelError::Unresponsive { .. } | ChannelError::HandshakeTimeout(_),
            ) => (StatusCode::GATEWAY_TIMEOUT, "guest_unresponsive"),
            // The guest's end went away mid-request (its VM died or was killed, the agent broke
            // the protocol): the sandbox failed, not the daemon. The reaper marks it failed.
            NodeError::Channel(
                ChannelError::Closed
                | ChannelError::StreamEnded(_)
                | ChannelError::Http2(_)
                | ChannelError::Io { .. }
                | ChannelError::Protocol(_),
            ) => (StatusCode::BAD_GATEWAY, "guest_failed"),
            // Its VMM was killed (SIGKILL: the OOM killer, an operator) while it started, as a
            // resume does: the sandbox's VM died, not the daemon (a paused one stays paused).
            NodeError::Sandbox(hearth_sandbox::SandboxError::Vm(
                hearth_vm::VmError::EarlyExit { status, .. },
            )) if std::os::unix::process::ExitStatusExt::signal(status) == Some(libc::SIGKILL)
                || status.code() == Some(128 + libc::SIGKILL) =>
            {
                (StatusCode::BAD_GATEWAY, "guest_failed")
            }
            NodeError::Channel(_)
            | NodeError::Sandbox(_)
            | NodeError::Store(_)
            | NodeError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
        };
        ApiError::new(status, code, message)
    }
}

impl From<JsonRejection> for ApiError {
    fn from(rejection: JsonRejection) -> ApiError {
        let message = rejection.body_text();
        match rejection {
            JsonRejection::JsonDataError(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "unprocessable", message)
            }
            JsonRejection::JsonSyntaxError(_) => ApiError::invalid(message),
            JsonRejection::MissingJsonContentType(_) => ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "unsupported_media_type",
                "send the body as JSON with `Content-Type: application/json`",
            ),
            _ if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE => {
                ApiError::too_large(format!("request body too large: {message}"))
            }
            _ => ApiError::invalid(message),
        }
    }
}

impl From<QueryRejection> for ApiError {
    fn from(rejection: QueryRejection) -> ApiError {
        ApiError::invalid(rejection.body_text())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_map_to_one_status_each() {
        let cases = [
            (NodeError::NotFound { id: "x".into() }, 404, "not_found"),
            (NodeError::Invalid("bad".into()), 400, "invalid"),
            (
                NodeError::Capacity {
                    message: "full".into(),
                },
                503,
                "capacity",
            ),
            (
                NodeError::Quota {
                    message: "3 of 3".into(),
                },
                429,
                "quota",
            ),
            (NodeError::ShuttingDown, 503, "shutting_down"),
            (
                NodeError::PortClosed {
                    id: "x".into(),
                    port: 8000,
                },
                502,
                "port_closed",
            ),
            (NodeError::Channel(ChannelError::Busy(64)), 429, "busy"),
            // A VMM killed while it started (a guard process reports it as code 137).
            (
                NodeError::Sandbox(hearth_sandbox::SandboxError::Vm(
                    hearth_vm::VmError::EarlyExit {
                        vmm: "qemu",
                        status: std::os::unix::process::ExitStatusExt::from_raw(137 << 8),
                        stderr: String::new(),
                        console: String::new(),
                    },
                )),
                502,
                "guest_failed",
            ),
            (
                NodeError::Sandbox(hearth_sandbox::SandboxError::Vm(
                    hearth_vm::VmError::EarlyExit {
                        vmm: "qemu",
                        status: std::os::unix::process::ExitStatusExt::from_raw(1 << 8),
                        stderr: "bad option".into(),
                        console: String::new(),
                    },
                )),
                500,
                "internal",
            ),
            (
                NodeError::Channel(ChannelError::Closed),
                502,
                "guest_failed",
            ),
            (
                NodeError::Channel(ChannelError::Agent(hearth_proto::AgentError::new(
                    ErrorKind::Exhausted,
                    "starting exec \"sh\": cloning exec-init: Resource temporarily unavailable",
                ))),
                503,
                "guest_exhausted",
            ),
            (
                NodeError::Channel(ChannelError::Unresponsive {
                    what: "the exec's start",
                    after: std::time::Duration::from_secs(30),
                }),
                504,
                "guest_unresponsive",
            ),
        ];
        for (err, status, code) in cases {
            let api = ApiError::from(err);
            assert_eq!((api.status.as_u16(), api.code), (status, code));
        }
        let capacity = ApiError::from(NodeError::Capacity {
            message: "full".into(),
        })
        .into_response();
        assert_eq!(capacity.headers()[header::RETRY_AFTER], "5");
        let busy = ApiError::from(NodeError::Channel(ChannelError::Busy(64))).into_response();
        assert_eq!(busy.headers()[header::RETRY_AFTER], "1");
    }
}
