//! The node manager's error type: one variant per way a request can fail, each mapping to one HTTP
//! status in the server (noted per variant).

use hearth_vm::channel::ChannelError;

use super::State;
use crate::SandboxError;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    /// 404; also for another tenant's sandbox.
    #[error("no sandbox {id}")]
    NotFound { id: String },
    /// 400: a bad image reference, sizes over the node's maxima, an empty argv, a relative path.
    #[error("{0}")]
    Invalid(String),
    /// 503 with Retry-After: the node is full; the message says what is free.
    #[error("node capacity exceeded: {message}")]
    Capacity { message: String },
    /// 403: the request is above what the operator lets this tenant have (its network ceiling).
    #[error("not allowed for this tenant: {0}")]
    Forbidden(String),
    /// 429: the tenant's quota is used up; the message says which limit.
    #[error("tenant quota exceeded: {message}")]
    Quota { message: String },
    /// 409: the sandbox is not in the state the request needs. `detail` says what it needs (or
    /// what is in the way); `None`: ", not running".
    #[error("sandbox {id} is {state}{}", .detail.as_deref().unwrap_or(", not running"))]
    NotRunning {
        id: String,
        state: State,
        detail: Option<String>,
    },
    /// 502: nothing listens on the guest port a request was forwarded to.
    #[error("nothing listens on port {port} in sandbox {id}")]
    PortClosed { id: String, port: u16 },
    /// 503.
    #[error("the node is shutting down; retry against its successor")]
    ShuttingDown,
    /// Another daemon holds this node's home.
    #[error("{0}")]
    Busy(String),
    #[error(transparent)]
    Image(#[from] hearth_image::ImageError),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error(transparent)]
    Channel(#[from] ChannelError),
    /// The state database failed.
    #[error("node state database: {0}")]
    Store(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl From<rusqlite::Error> for NodeError {
    fn from(e: rusqlite::Error) -> Self {
        NodeError::Store(e.to_string())
    }
}
