//! The HTTP API's wire types: what clients send and receive, with their OpenAPI schemas. Kept apart
//! from the node's own types so that the API can stay stable while the node changes; conversions
//! live here too. Pure data: no I/O. The CLI client (`crate::client`) uses the same types.

use std::collections::BTreeMap;

use hearth_sandbox::node::SandboxInfo;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

/// `POST /v1/sandboxes`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// Image reference: `[registry/]repo[:tag|@digest]`.
    pub image: String,
    /// Virtual CPUs (default: the daemon's `--cpus`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    /// Guest memory, a size like `512m` or `2g` (plain number = bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    /// Size of the writable disk, like `4g`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Hard lifetime from creation; default and maximum: the daemon's `--max-ttl`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_seconds: Option<u64>,
    /// Stopped (or paused: `on_idle`) after this long with no exec running and no API use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_seconds: Option<u64>,
    /// What the idle timeout does (needs `idle_timeout_seconds`): `stop` (the default) ends the
    /// sandbox; `pause` saves it to disk (`paused`, reason `idle`: it holds no memory or vCPUs),
    /// and its next exec, file transfer, code run or port connection resumes it first, with its
    /// processes, files and code interpreter (its variables too) as they were.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_idle: Option<OnIdle>,
    /// Environment for every exec (over the image's, under each exec's own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    /// Default working directory of execs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    /// Default user (name or uid, optionally `:group`) of execs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Opaque labels, returned as given.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// Egress policy: `{"mode": "none"|"allow"|"open", "allow": [ENTRY...], "deny": [ENTRY...]}`
    /// (default: the daemon's `--network-default`, `none` unless set). An ENTRY is a domain, a
    /// wildcard (`*.example.org`), an IP or a CIDR, each optionally with `:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub network: Option<hearth_sandbox::NetworkPolicy>,
    /// Wait until the sandbox runs (201) rather than answering at once with `creating` (202).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub wait: Option<bool>,
}

/// What a sandbox's idle timeout does.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Ends it (`stopped`, reason `idle`).
    #[default]
    Stop,
    /// Pauses it (`paused`, reason `idle`); its next use resumes it.
    Pause,
}

impl From<OnIdle> for hearth_sandbox::node::OnIdle {
    fn from(o: OnIdle) -> Self {
        match o {
            OnIdle::Stop => hearth_sandbox::node::OnIdle::Stop,
            OnIdle::Pause => hearth_sandbox::node::OnIdle::Pause,
        }
    }
}

impl From<hearth_sandbox::node::OnIdle> for OnIdle {
    fn from(o: hearth_sandbox::node::OnIdle) -> Self {
        match o {
            hearth_sandbox::node::OnIdle::Stop => OnIdle::Stop,
            hearth_sandbox::node::OnIdle::Pause => OnIdle::Pause,
        }
    }
}

/// A sandbox's life: `creating -> running -> stopped | failed`; `running <-> paused` (saved to
/// disk, no VM running); `paused -> stopped`. Between an end (TTL, idle timeout, VM death) and
/// `stopped`/`failed`, `stopping` while its VM is being stopped: it still holds its resources and
/// `reason` already says why it ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum SandboxState {
    Creating,
    Running,
    Stopping,
    Stopped,
    Failed,
    Paused,
}

/// A sandbox. Times are Unix milliseconds.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Sandbox {
    pub id: String,
    pub image: String,
    /// Manifest digest, once the image is pulled.
    pub image_digest: Option<String>,
    pub state: SandboxState,
    /// Why it stopped or failed ("ttl expired", "idle", "VM exited: ..."); for a paused sandbox,
    /// "idle" when its idle timeout paused it (`on_idle: pause`: its next use resumes it).
    pub reason: Option<String>,
    pub cpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    pub ready_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub last_active_at: u64,
    /// Creation until the agent answered, including pull and the wait for a boot slot.
    pub boot_ms: Option<u64>,
    /// The egress policy in force (absent when the daemon gives sandboxes no network).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<Object>)]
    pub network: Option<hearth_sandbox::NetworkPolicy>,
    /// Taken from the daemon's warm pool (`--warm-pool`): booted before it was asked for. Absent
    /// otherwise.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub warm: bool,
    /// What its idle timeout does.
    #[serde(default)]
    pub on_idle: OnIdle,
}

impl From<SandboxInfo> for Sandbox {
    fn from(s: SandboxInfo) -> Sandbox {
        use hearth_sandbox::node::State;
        Sandbox {
            id: s.id,
            image: s.image,
            image_digest: s.image_digest,
            state: match s.state {
                _ if s.stopping => SandboxState::Stopping,
                State::Creating => SandboxState::Creating,
                State::Running => SandboxState::Running,
                State::Stopped => SandboxState::Stopped,
                State::Failed => SandboxState::Failed,
                State::Paused => SandboxState::Paused,
            },
            reason: s.reason,
            cpus: s.vcpus,
            memory_mib: s.memory_mib,
            disk_bytes: s.disk_bytes,
            labels: s.labels,
            created_at: s.created_at,
            ready_at: s.ready_at,
            finished_at: s.finished_at,
            expires_at: s.expires_at,
            last_active_at: s.last_active_at,
            boot_ms: s.boot_ms,
            network: s.network,
            warm: s.warm,
            on_idle: s.on_idle.into(),
        }
    }
}

/// `GET /v1/sandboxes`: the caller's sandboxes, oldest first.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct SandboxList {
    pub sandboxes: Vec<Sandbox>,
}

/// `POST /v1/sandboxes/{id}/exec`, and the first text message on the exec WebSocket. `argv` runs as
/// given (like `docker exec`): the image's Entrypoint and Cmd do not apply.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecBody {
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Kill the command's process tree after this long.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// All of stdin, base64 (the HTTP form; ignored on the WebSocket, where binary messages are stdin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// One line of an exec's NDJSON answer (one text message on the WebSocket). Exactly one field is
/// set, except `timed_out`, which accompanies `signal`. Output comes in order as produced; the last
/// event is `exit_code`, `signal` or `error`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct ExecEvent {
    /// Output bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdout: Option<String>,
    /// Output bytes, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stderr: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    /// The signal that killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// The timeout fired and killed the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timed_out: Option<bool>,
    /// The exec failed on hearth's side (the sandbox stopped, the channel broke).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A text message from the client on the exec WebSocket, after the first.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WsControl {
    /// Close the command's stdin (it reads end of file; with a terminal nothing is passed on:
    /// send `\u0004`, ^D, as stdin instead).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub close_stdin: Option<bool>,
    /// Send this signal to the command.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub signal: Option<i32>,
    /// Resize the command's terminal (only for an exec started with `"tty": true`); its
    /// foreground process group gets SIGWINCH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resize: Option<TerminalSize>,
}

/// A terminal's size in character cells.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct TerminalSize {
    pub rows: u16,
    pub cols: u16,
}

/// Terminal fields the exec WebSocket's first message may carry beside the `ExecBody` fields
/// (the NDJSON `POST .../exec` has no way to resize or type, so it takes none of them).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct WsTerminal {
    /// Run the command on a pseudo-terminal: stdin, stdout and stderr are the terminal, output
    /// comes as `stdout` events only, ^C (`\u0003`) sent as stdin interrupts the foreground job,
    /// and `{"resize": {"rows": R, "cols": C}}` control messages change its size.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tty: Option<bool>,
    /// Initial rows (default 24); only with `tty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows: Option<u16>,
    /// Initial columns (default 80); only with `tty`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cols: Option<u16>,
}

impl WsTerminal {
    /// Keys of the first message that belong to the terminal, not to the `ExecBody`.
    pub const KEYS: [&'static str; 3] = ["tty", "rows", "cols"];
}

/// `PUT /v1/sandboxes/{id}/files` and `GET` query.
#[derive(Debug, Clone, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct FileQuery {
    /// Absolute path inside the sandbox.
    pub path: String,
    /// Permission bits in octal for `PUT` (default 644).
    pub mode: Option<String>,
}

/// Answer to a file upload.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct FileWritten {
    pub path: String,
    pub bytes: u64,
}

/// A directory's entries (`GET /v1/sandboxes/{id}/files` on a directory).
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirListing {
    pub path: String,
    pub entries: Vec<DirEntry>,
    /// More entries exist than were returned.
    pub truncated: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct DirEntry {
    pub name: String,
    /// `file`, `dir`, `symlink` or `other`.
    pub kind: String,
    pub size: u64,
    /// Permission bits.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Seconds since the Unix epoch.
    pub mtime: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

impl DirListing {
    pub fn from_agent(path: &str, listing: hearth_proto::DirListing) -> DirListing {
        use hearth_proto::files::FileKind;
        DirListing {
            path: path.to_string(),
            truncated: listing.truncated,
            entries: listing
                .entries
                .into_iter()
                .map(|e| DirEntry {
                    name: e.name,
                    kind: match e.stat.kind {
                        FileKind::File => "file",
                        FileKind::Dir => "dir",
                        FileKind::Symlink => "symlink",
                        FileKind::Other => "other",
                    }
                    .to_string(),
                    size: e.stat.size,
                    mode: e.stat.mode,
                    uid: e.stat.uid,
                    gid: e.stat.gid,
                    mtime: e.stat.mtime,
                    link_target: e.stat.link_target,
                })
                .collect(),
        }
    }
}

/// `POST /v1/runs`: boot a sandbox, run one command, return its output, destroy the sandbox.
#[derive(Debug, Clone, Default, Serialize, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RunBody {
    pub image: String,
    pub argv: Vec<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub env: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub workdir: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpus: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub memory: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Kill the command after this long (the sandbox goes with it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<u64>,
    /// All of stdin, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stdin: Option<String>,
}

/// Answer to `POST /v1/runs`. Each stream keeps at most the daemon's `--run-output-limit` bytes.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct RunResult {
    /// base64.
    pub stdout: String,
    /// base64.
    pub stderr: String,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    pub timed_out: bool,
    /// Output beyond the limit was dropped.
    pub truncated: bool,
    pub boot_ms: Option<u64>,
}

/// Every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct ErrorBody {
    /// What failed, on what input, and what to do.
    pub error: String,
    /// Stable machine-readable kind: `not_found`, `invalid`, `unauthorized`, `forbidden`,
    /// `capacity`, `quota`, `busy`, `conflict`, `too_large`, `unprocessable`,
    /// `unsupported_media_type`, `shutting_down`, `port_closed`, `bad_gateway`, `image`,
    /// `guest_unresponsive`, `guest_failed` (the guest's end went away mid-request: its VM
    /// died), `guest_exhausted` (the guest's own workload holds its process slots, memory or
    /// disk), `internal`.
    pub code: String,
}

/// `GET /healthz`.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Health {
    pub status: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exec_events_serialize_as_one_field_lines() {
        let out = ExecEvent {
            stdout: Some("aGk=".into()),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&out).unwrap(), r#"{"stdout":"aGk="}"#);
        let exit = ExecEvent {
            exit_code: Some(3),
            ..Default::default()
        };
        assert_eq!(serde_json::to_string(&exit).unwrap(), r#"{"exit_code":3}"#);
    }

    #[test]
    fn an_ended_sandbox_whose_vm_is_still_going_shows_stopping_then_its_end() {
        let mut info: hearth_sandbox::node::SandboxInfo =
            serde_json::from_value(serde_json::json!({
                "id": "s1", "tenant": "t", "image": "i", "image_digest": null, "state": "failed",
                "reason": "VM exited", "vcpus": 1, "memory_mib": 256, "disk_bytes": 0, "labels": {},
                "created_at": 1, "ready_at": null, "finished_at": 2, "expires_at": null,
                "last_active_at": 1, "boot_ms": null
            }))
            .unwrap();
        info.stopping = true;
        let shown = Sandbox::from(info.clone());
        assert_eq!(shown.state, SandboxState::Stopping);
        assert_eq!(shown.reason.as_deref(), Some("VM exited"));
        assert_eq!(serde_json::to_value(shown.state).unwrap(), "stopping");
        info.stopping = false;
        assert_eq!(Sandbox::from(info).state, SandboxState::Failed);
    }

    #[test]
    fn unknown_fields_are_refused() {
        let err = serde_json::from_str::<CreateSandbox>(r#"{"image":"x","cpu":2}"#).unwrap_err();
        assert!(err.to_string().contains("unknown field `cpu`"), "{err}");
        assert!(serde_json::from_str::<ExecBody>(r#"{"argv":["ls"],"tty":true}"#).is_err());
    }
}
