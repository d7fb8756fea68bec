//! Exec messages: the request that starts a command, the confirmation that it started, and how it
//! ended. Carried as JSON payloads of body frames (see [`crate::frame`]).

use serde::{Deserialize, Serialize};

/// Starts one command in the workload root (payload of the `ExecStart` frame).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecRequest {
    /// The command and its arguments. `argv[0]` without a `/` is looked up in the `PATH` of `env`
    /// inside the workload root.
    pub argv: Vec<String>,
    /// The complete environment as `KEY=VALUE` entries. The agent adds `PATH` (a default) and `HOME`
    /// (from the user's passwd entry) when they are missing, as docker does.
    #[serde(default)]
    pub env: Vec<String>,
    /// Working directory inside the root; created if missing (docker's `-w`). Default `/`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cwd: Option<String>,
    /// `user[:group]`, names or numbers, resolved against the root's /etc/passwd and /etc/group.
    /// Default root.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// `true`: the request body carries stdin after the `ExecStart` frame. `false`: stdin is
    /// /dev/null.
    #[serde(default)]
    pub stdin: bool,
    /// Kill the command's whole process tree after this many milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_ms: Option<u64>,
    /// Run the command on a pseudo-terminal of this size: its stdin, stdout and stderr are the
    /// terminal, its output comes as `Stdout` frames only, and `POST /v1/resize` changes the size.
    /// Absent: pipes (and old peers, which do not know the field, keep working).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<TtySize>,
    /// `true`: when the exec's host goes (its session ends, or the VM is saved with it running and
    /// restored: a paused sandbox resumed, a fork's child), the exec waits, its output held in its
    /// pipes, for a host to take it over with `POST /v1/attach?exec=ID` (within the agent's park
    /// grace; killed otherwise) instead of being killed (or, restored, running on detached with
    /// its output discarded). A host may also take over a running attachable exec at any time: its
    /// old stream then ends. `GET /v1/execs` lists them.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub attachable: bool,
    /// The host's name for the exec, listed by `GET /v1/execs` (at most [`MAX_EXEC_LABEL`] bytes),
    /// so that a host that did not start it can tell what it is.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
}

/// Longest [`ExecRequest::label`].
pub const MAX_EXEC_LABEL: usize = 64;

/// One running exec, in the answer to `GET /v1/execs`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecEntry {
    pub id: u64,
    pub pid: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    pub attachable: bool,
    /// Waiting for a host to attach (see [`ExecRequest::attachable`]).
    pub parked: bool,
}

/// Answer to `GET /v1/execs`: every running exec, by id.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecList {
    pub execs: Vec<ExecEntry>,
}

/// A terminal's size in character cells (`struct winsize` without the pixel fields).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TtySize {
    pub rows: u16,
    pub cols: u16,
}

/// The command's process exists (payload of the `Started` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExecStarted {
    /// Agent-wide identifier of this exec, used by `POST /v1/signal`.
    pub id: u64,
    /// PID, in the agent's PID namespace, of the exec's init process (the PID 1 of the command's
    /// PID namespace).
    pub pid: u32,
}

/// How a command ended (payload of the `Exit` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// Exit code, when the command exited.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<i32>,
    /// Signal number, when a signal killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The timeout expired and the agent killed the process tree (then `signal` is 9).
    #[serde(default)]
    pub timed_out: bool,
}

impl ExitStatus {
    pub fn exited(code: i32) -> ExitStatus {
        ExitStatus {
            code: Some(code),
            signal: None,
            timed_out: false,
        }
    }

    pub fn signaled(signal: i32) -> ExitStatus {
        ExitStatus {
            code: None,
            signal: Some(signal),
            timed_out: false,
        }
    }

    /// Exited with code 0.
    pub fn success(&self) -> bool {
        self.code == Some(0)
    }
}

impl std::fmt::Display for ExitStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match (self.code, self.signal) {
            (Some(code), _) => write!(f, "exit code {code}")?,
            (None, Some(signal)) => write!(f, "killed by signal {signal}")?,
            (None, None) => write!(f, "unknown status")?,
        }
        if self.timed_out {
            write!(f, " (timed out)")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_request_defaults_missing_fields() {
        let request: ExecRequest = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(request.argv, ["true"]);
        assert!(request.env.is_empty() && !request.stdin && request.cwd.is_none());
        assert!(request.timeout_ms.is_none() && request.user.is_none());
        assert!(request.tty.is_none());
    }

    #[test]
    fn tty_is_omitted_when_absent_and_carries_its_size() {
        let plain = ExecRequest {
            argv: vec!["sh".into()],
            ..ExecRequest::default()
        };
        assert!(!serde_json::to_string(&plain).unwrap().contains("tty"));
        let request: ExecRequest =
            serde_json::from_str(r#"{"argv":["sh"],"tty":{"rows":24,"cols":80}}"#).unwrap();
        assert_eq!(request.tty, Some(TtySize { rows: 24, cols: 80 }));
    }

    #[test]
    fn exit_status_json_is_compact() {
        assert_eq!(
            serde_json::to_string(&ExitStatus::exited(3)).unwrap(),
            r#"{"code":3,"timed_out":false}"#
        );
        let killed: ExitStatus = serde_json::from_str(r#"{"signal":9,"timed_out":true}"#).unwrap();
        assert_eq!(killed.to_string(), "killed by signal 9 (timed out)");
        assert!(!killed.success());
    }
}
