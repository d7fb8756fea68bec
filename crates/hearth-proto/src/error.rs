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
    /// The guest ran out of something its own workload holds (processes, memory, disk space,
    /// open files): the request may succeed once the guest frees it.
    Exhausted,
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
            ErrorKind::Exhausted => 503,
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
            // EAGAIN (no process or thread slot), ENOMEM, ENFILE, EMFILE, ENOSPC, EDQUOT
            11 | 12 | 23 | 24 | 28 | 122 => ErrorKind::Exhausted,
            _ => ErrorKind::Internal,
        }
    }

    /// The kind for an error of the agent's own work (starting a process, making pipes): the
    /// guest's exhaustion is told apart, anything else is internal.
    pub fn of_own_work(error: &std::io::Error) -> ErrorKind {
        match error.raw_os_error().map(ErrorKind::from_errno) {
            Some(ErrorKind::Exhausted) => ErrorKind::Exhausted,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_guest_out_of_slots_memory_or_disk_is_exhausted_not_internal() {
        // EAGAIN is what clone answers inside a guest whose fork bomb holds every task slot (the
        // soak's guest_forkbomb fault made an exec answer 500 before this kind existed).
        for errno in [
            libc_errno::EAGAIN,
            libc_errno::ENOMEM,
            libc_errno::ENOSPC,
            libc_errno::EMFILE,
        ] {
            let error = std::io::Error::from_raw_os_error(errno);
            assert_eq!(
                ErrorKind::of_own_work(&error),
                ErrorKind::Exhausted,
                "{error}"
            );
            assert_eq!(ErrorKind::Exhausted.http_status(), 503);
        }
        let other = std::io::Error::from_raw_os_error(libc_errno::EIO);
        assert_eq!(ErrorKind::of_own_work(&other), ErrorKind::Internal);
        // A missing path from the agent's own work is its fault, not the request's.
        let missing = std::io::Error::from_raw_os_error(libc_errno::ENOENT);
        assert_eq!(ErrorKind::of_own_work(&missing), ErrorKind::Internal);
        assert_eq!(
            ErrorKind::from_errno(libc_errno::ENOENT),
            ErrorKind::NotFound
        );
    }

    /// Linux x86_64 values (this crate does not depend on libc).
    mod libc_errno {
        pub const ENOENT: i32 = 2;
        pub const EIO: i32 = 5;
        pub const EAGAIN: i32 = 11;
        pub const ENOMEM: i32 = 12;
        pub const EMFILE: i32 = 24;
        pub const ENOSPC: i32 = 28;
    }
}
