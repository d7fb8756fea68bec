//! What a detached VM leaves for its next owner. A detached VMM (see [`crate::VmSpec::detached`])
//! outlives the process that started it; its run directory then holds a [`DetachedRecord`]
//! (`vmm.json`) naming the backend, the VMM's identity (pid plus start time, so a recycled pid is
//! never mistaken for the VMM), and the sockets and logs a new owner needs. `crate::backend::adopt`
//! turns such a run directory back into a running VM.
//!
//! Touches only the run directory's record and `/proc`.

use std::io;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::VmError;
use crate::process::ProcessIdentity;
use crate::vmm::AgentEndpoint;

/// The record's file name inside the run directory.
pub const DETACHED_RECORD: &str = "vmm.json";

/// What a detached VM's run directory says about it (`vmm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachedRecord {
    /// [`crate::Vmm::name`] of the backend: "qemu" or "firecracker".
    pub vmm: String,
    pub process: ProcessIdentity,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// The hybrid vsock port for Firecracker; `None` when the socket is the agent's stream.
    pub vsock_port: Option<u32>,
    pub console_log: PathBuf,
    /// Firecracker's log file.
    pub log: Option<PathBuf>,
    /// A jailed VM's cgroup directories, removed after exit.
    #[serde(default)]
    pub cgroups: Vec<PathBuf>,
}

impl DetachedRecord {
    pub fn agent_endpoint(&self) -> AgentEndpoint {
        match self.vsock_port {
            Some(port) => AgentEndpoint::HybridVsock {
                socket: self.agent_socket.clone(),
                port,
            },
            None => AgentEndpoint::Stream(self.agent_socket.clone()),
        }
    }

    /// Writes the record into `run_dir` atomically.
    pub fn write(&self, run_dir: &Path) -> Result<(), VmError> {
        let path = run_dir.join(DETACHED_RECORD);
        let json = serde_json::to_vec_pretty(self).expect("record serializes");
        crate::fsutil::write_atomic(&path, &json).map_err(|source| VmError::Io {
            what: "writing",
            path,
            source,
        })
    }

    /// Reads the record of `run_dir`.
    pub fn read(run_dir: &Path) -> Result<DetachedRecord, VmError> {
        let path = run_dir.join(DETACHED_RECORD);
        let bytes = std::fs::read(&path).map_err(|source| VmError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| VmError::Io {
            what: "parsing",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_round_trip_through_the_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let record = DetachedRecord {
            vmm: "qemu".into(),
            process: ProcessIdentity {
                pid: 7,
                start_time: 9,
            },
            control_socket: dir.path().join("qmp.sock"),
            agent_socket: dir.path().join("agent.sock"),
            vsock_port: None,
            console_log: dir.path().join("console.log"),
            log: None,
            cgroups: Vec::new(),
        };
        record.write(dir.path()).unwrap();
        assert_eq!(DetachedRecord::read(dir.path()).unwrap(), record);
        assert_eq!(
            record.agent_endpoint(),
            AgentEndpoint::Stream(dir.path().join("agent.sock"))
        );
    }
}
