//! File and agent metadata returned by the file, stat, list and info requests (JSON bodies).

use serde::{Deserialize, Serialize};

/// What a path names. Symlinks are reported, not followed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FileKind {
    File,
    Dir,
    Symlink,
    Other,
}

/// `lstat` of a path inside the workload root.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileStat {
    pub kind: FileKind,
    pub size: u64,
    /// Permission bits (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the Unix epoch.
    pub mtime: i64,
    /// Target of a symlink.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link_target: Option<String>,
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirEntry {
    pub name: String,
    pub stat: FileStat,
}

/// A directory listing, sorted by name. At most [`DirListing::MAX_ENTRIES`] entries; `truncated`
/// says more exist.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirListing {
    pub entries: Vec<DirEntry>,
    #[serde(default)]
    pub truncated: bool,
}

impl DirListing {
    pub const MAX_ENTRIES: usize = 10_000;
}

/// Answer to `GET /v1/info`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentInfo {
    /// Protocol major version the agent speaks.
    pub protocol: u32,
    /// The agent's crate version.
    pub agent_version: String,
    /// `uname -r` of the kernel the agent runs on.
    pub kernel_release: String,
    pub hostname: String,
    /// When the agent reached its boot milestones (absent when it is not a VM's PID 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot: Option<BootMarks>,
}

/// Guest uptimes, in milliseconds since the guest kernel started, at the agent's boot milestones.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BootMarks {
    /// The kernel ran /init (the agent): kernel boot time.
    pub init_ms: u64,
    /// Modules loaded, disks mounted, agent port open: the agent could answer. In a VM restored from
    /// a template: when the late init that RESUME started had finished.
    pub ready_ms: u64,
    /// In a VM restored from a template: how long applying RESUME took (clock, entropy, hostname,
    /// deferred modules, disks, workload root), in milliseconds. Absent after a cold boot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_ms: Option<u64>,
}

/// Response header of `GET /v1/files` carrying the file's permission bits (octal).
pub const MODE_HEADER: &str = "x-hearth-mode";
/// Response header of `GET /v1/files` carrying the file's size when opened (decimal).
pub const SIZE_HEADER: &str = "x-hearth-size";
