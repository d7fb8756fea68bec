//! The tools' arguments: one type per tool, whose doc comments become the JSON schema the model
//! reads (rmcp's `Parameters<T>` derives it with schemars). Unknown fields are refused, so a
//! misspelt argument is an error rather than silently ignored. Pure data.

use std::collections::BTreeMap;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateSandbox {
    /// OCI image reference, e.g. `python:3.12-slim` or `registry.example.com/team/tool:1.2`.
    /// `run_code` needs `python3` in the image.
    pub image: String,
    /// Virtual CPUs (default: the daemon's).
    pub cpus: Option<u32>,
    /// Guest memory, like `512m` or `2g` (default: the daemon's).
    pub memory: Option<String>,
    /// Size of the writable disk, like `4g` (default: the daemon's).
    pub disk: Option<String>,
    /// Hard lifetime in seconds; afterwards the sandbox is stopped (default and maximum: the
    /// daemon's).
    pub ttl_seconds: Option<u64>,
    /// Stop the sandbox after this many seconds without use (or pause it: `on_idle`).
    pub idle_timeout_seconds: Option<u64>,
    /// What `idle_timeout_seconds` does: `stop` (default) ends the sandbox; `pause` saves it to
    /// disk, and the next command, file or code call resumes it with its files and processes.
    pub on_idle: Option<OnIdle>,
    /// Environment variables for every command in the sandbox.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Default working directory of commands.
    pub workdir: Option<String>,
    /// Outbound network access (default: the daemon's, normally none).
    pub network: Option<Network>,
    /// Keep the sandbox after this MCP session ends. By default a sandbox created in a session
    /// is destroyed when the session ends.
    #[serde(default)]
    pub keep: bool,
}

/// What an idle timeout does.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    Stop,
    Pause,
}

/// An egress policy.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Network {
    /// `none`: no network; `allow`: only the `allow` entries; `open`: anything but `deny`.
    pub mode: NetworkMode,
    /// Entries reachable in `allow` mode: a domain (`pypi.org`), a wildcard (`*.pythonhosted.org`),
    /// an IP or a CIDR, each optionally with `:port`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allow: Vec<String>,
    /// Entries refused in any mode, same forms as `allow`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub deny: Vec<String>,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkMode {
    None,
    Allow,
    Open,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RunCode {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// The code. If it ends in an expression, that expression's value comes back as `result`.
    pub code: String,
    /// Only `python` (the default).
    pub language: Option<String>,
    /// Interrupt the code after this many seconds (default 60, at most 3600); the interpreter and
    /// what earlier calls defined survive.
    pub timeout_seconds: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartProcess {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// A shell command line, run with `/bin/sh -c`. Give this or `argv`.
    pub command: Option<String>,
    /// The program and its arguments, run without a shell. Give this or `command`.
    pub argv: Option<Vec<String>>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User (name or uid, optionally `:group`).
    pub user: Option<String>,
    /// Kill it after this many seconds (default: it runs until stopped or the sandbox ends).
    pub timeout_seconds: Option<u64>,
    /// A name of yours for it (at most 64 bytes).
    pub tag: Option<String>,
    /// Keep the sandbox from its idle timeout while it runs (for a build you will wait for; a
    /// server should not: it would keep the sandbox up forever).
    #[serde(default)]
    pub keep_awake: bool,
    /// Wait up to this many seconds (at most 60) for it to end, as `process_output` does: a
    /// command that finishes in time answers like `exec`, one that does not runs on.
    pub wait_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProcessOutput {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// The process's id, from `start_process`.
    pub process_id: u32,
    /// Read from this offset: the `next_offset` of the previous call (default 0, from the start).
    pub offset: Option<u64>,
    /// Wait up to this many seconds (at most 60) for the process to end, returning as soon as it
    /// does, with what it printed meanwhile; 0 or absent: answer at once.
    pub wait_seconds: Option<u32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StopProcess {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// The process's id, from `start_process`.
    pub process_id: u32,
    /// Send this signal number (15 SIGTERM, 2 SIGINT) instead; without it the process is killed
    /// and forgotten.
    pub signal: Option<i32>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// A shell command line, run with `/bin/sh -c`. Give this or `argv`.
    pub command: Option<String>,
    /// The program and its arguments, run without a shell. Give this or `command`.
    pub argv: Option<Vec<String>>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    pub workdir: Option<String>,
    /// User (name or uid, optionally `:group`).
    pub user: Option<String>,
    /// Kill the command after this many seconds (default 120).
    pub timeout_seconds: Option<u64>,
    /// Text to feed to the command's standard input (default: none, it reads end of file).
    pub stdin: Option<String>,
}

/// How file content is given or wanted.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Encoding {
    /// UTF-8 text.
    #[default]
    Text,
    /// Base64 of the raw bytes (for binary files).
    Base64,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WriteFile {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// Absolute path in the sandbox; its parent directory must exist (`exec` `mkdir -p` first).
    pub path: String,
    /// The file's whole new content.
    pub content: String,
    /// How `content` is encoded: `text` (default) or `base64`.
    #[serde(default)]
    pub encoding: Encoding,
    /// Permission bits in octal, like `755` (default `644`).
    pub mode: Option<String>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReadFile {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// Absolute path of a file in the sandbox.
    pub path: String,
    /// `text` (default; a file that is not UTF-8 is refused) or `base64` (any file).
    #[serde(default)]
    pub encoding: Encoding,
    /// Return at most this many bytes from the start (default 65536, at most 1048576).
    pub max_bytes: Option<u64>,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ListFiles {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// Absolute path of a directory in the sandbox.
    pub path: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SandboxId {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SetNetwork {
    /// The sandbox's id, from `create_sandbox`.
    pub sandbox_id: String,
    /// The new policy; it replaces the old one while the sandbox runs.
    pub network: Network,
}

#[derive(Debug, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Fork {
    /// The running sandbox to copy.
    pub sandbox_id: String,
    /// How many copies, 1 to 64 (default 1).
    pub count: Option<u32>,
    /// Keep the copies after this MCP session ends (by default they end with it, like sandboxes
    /// created in it).
    #[serde(default)]
    pub keep: bool,
}

impl Network {
    /// The daemon's policy type, which has the same JSON shape.
    pub fn policy(&self) -> anyhow::Result<hearth_sandbox::NetworkPolicy> {
        let json = serde_json::to_value(self)?;
        serde_json::from_value(json).map_err(|e| anyhow::anyhow!("invalid network policy: {e}"))
    }
}
