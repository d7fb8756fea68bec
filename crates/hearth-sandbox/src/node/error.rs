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
    /// 404: no background process with this id in the sandbox.
    #[error("no process {process} in sandbox {id}")]
    NoProcess { id: String, process: u32 },
    /// 429: a per-sandbox bound is reached (its background processes); the message says which.
    #[error("{0}")]
    Limit(String),
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
    /// 504: the sandbox's VMM or guest did not answer in time (frozen, or a host too loaded to
    /// run it); the node itself is fine. The message says which step waited.
    #[error("sandbox {id} did not answer in time: {detail}")]
    Unresponsive { id: String, detail: String },
    /// 500: what no other variant classifies. [`NodeError::of`] sorts a [`SandboxError`].
    #[error(transparent)]
    Sandbox(SandboxError),
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

impl NodeError {
    /// `e`, a failure of sandbox `id`, by what it means to the caller: a full disk is the node's
    /// capacity (503, retry later), a VMM or guest that did not answer is the sandbox's trouble
    /// (504), anything else is hearth's own failure (500).
    pub fn of(id: &str, e: SandboxError) -> NodeError {
        if e.is_disk_full() {
            return NodeError::Capacity {
                message: format!("the node's disk is full ({e}); retry when space is freed"),
            };
        }
        if e.is_unresponsive() {
            return NodeError::Unresponsive {
                id: id.to_owned(),
                detail: e.to_string(),
            };
        }
        NodeError::Sandbox(e)
    }
}

impl From<rusqlite::Error> for NodeError {
    fn from(e: rusqlite::Error) -> Self {
        NodeError::Store(e.to_string())
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;
    use std::time::Duration;

    use hearth_vm::qemu::{QemuError, QmpError, SaveError};
    use hearth_vm::VmError;

    use super::*;

    fn qemu_save(source: SaveError) -> SandboxError {
        SandboxError::Vm(VmError::backend(
            "qemu",
            QemuError::Save {
                state: PathBuf::from("/home/node/forks/x/state"),
                source,
            },
        ))
    }

    #[test]
    fn a_full_disk_is_capacity_a_silent_vmm_unresponsive_and_the_rest_internal() {
        let full = SandboxError::Io {
            what: "copying the scratch disk".into(),
            source: std::io::Error::from_raw_os_error(libc::ENOSPC),
        };
        assert!(matches!(
            NodeError::of("s", full),
            NodeError::Capacity { .. }
        ));
        // QEMU says so only in its migration's error text.
        let full = qemu_save(SaveError::Failed {
            path: PathBuf::from("state"),
            status: "failed".into(),
            detail: "Unable to write to file: No space left on device".into(),
        });
        assert!(matches!(
            NodeError::of("s", full),
            NodeError::Capacity { .. }
        ));

        let frozen = qemu_save(SaveError::Qmp {
            command: "stop",
            source: QmpError::Timeout("reply to the command"),
        });
        match NodeError::of("s", frozen) {
            NodeError::Unresponsive { id, detail } => {
                assert_eq!(id, "s");
                assert!(detail.contains("QMP stop"), "{detail}");
            }
            other => panic!("a frozen VMM's save: {other:?}"),
        }
        // A guest's console saying so is not the host's disk.
        let claimed = SandboxError::Agent {
            source: ChannelError::Closed,
            console: PathBuf::from("console.log"),
            tail: "write error: No space left on device".into(),
        };
        assert!(matches!(NodeError::of("s", claimed), NodeError::Sandbox(_)));

        let silent = SandboxError::Channel(ChannelError::HandshakeTimeout(Duration::from_secs(1)));
        assert!(matches!(
            NodeError::of("s", silent),
            NodeError::Unresponsive { .. }
        ));

        let refused = qemu_save(SaveError::Qmp {
            command: "migrate",
            source: QmpError::Command {
                command: "migrate".into(),
                class: "GenericError".into(),
                desc: "no".into(),
            },
        });
        assert!(matches!(NodeError::of("s", refused), NodeError::Sandbox(_)));
    }
}
