//! The error body the agent returns (JSON, with a matching HTTP status) when a request fails.

use serde::{Deserialize, Serialize};

/// What kind of failure, so the host can react without parsing messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// Malformed request: unknown route, bad query, bad frame, bad JSON.
    InvalidRequest,
    NotFound,
    PermissionDenied,
    AlreadyExists,
    NotADirectory,
    IsADirectory,
    /// The agent could not do what was asked for a reason on its side.
    Internal,
}

impl ErrorKind {
    /// The HTTP status the agent answers with.
    pub fn http_status(self) -> u16 {
        match self {
            ErrorKind::InvalidRequest | ErrorKind::NotADirectory | ErrorKind::IsADirectory => 400,
            ErrorKind::PermissionDenied => 403,
            ErrorKind::NotFound => 404,
            ErrorKind::AlreadyExists => 409,
            ErrorKind::Internal => 500,
        }
    }

    /// The kind for an errno value from a file operation.
    pub fn from_errno(errno: i32) -> ErrorKind {
        match errno {
            2 => ErrorKind::NotFound,                   // ENOENT
            1 | 13 | 30 => ErrorKind::PermissionDenied, // EPERM, EACCES, EROFS
            17 => ErrorKind::AlreadyExists,             // EEXIST
            20 | 40 => ErrorKind::NotADirectory, // ENOTDIR, ELOOP (symlink where a dir was needed)
            21 => ErrorKind::IsADirectory,       // EISDIR
            22 | 36 | 18 => ErrorKind::InvalidRequest, // EINVAL, ENAMETOOLONG, EXDEV (escape attempt)
            _ => ErrorKind::Internal,
        }
    }
}

/// A failed request: kind plus a message saying what failed on what input.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct AgentError {
    pub kind: ErrorKind,
    pub message: String,
}

impl AgentError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> AgentError {
        AgentError {
            kind,
            message: message.into(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::InvalidRequest, message)
    }

    pub fn internal(message: impl Into<String>) -> AgentError {
        AgentError::new(ErrorKind::Internal, message)
    }
}
