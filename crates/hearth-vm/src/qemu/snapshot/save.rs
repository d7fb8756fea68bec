//! Saving a running QEMU's memory and device state to a file over QMP: `stop`, hand QEMU the file
//! (opened here, passed with `getfd`: a confined QEMU can neither open host paths nor run
//! `exec:cat`), `migrate` to `fd:NAME`, wait for `completed`. Used to build boot templates and to
//! save live VMs ([`crate::RunningVm::save_state`]). Touches only `file` and the QMP connection.
//!
//! A VM with file-backed memory ([`crate::GuestMemory`]: it has the `hearth-mem` backend) is saved
//! with `x-ignore-shared`: a template's shared memory file then stays out of the state (the file is
//! the RAM), while a restored VM's private mapping is not shared and is saved whole, or thinned on
//! its way to the file (`thin_save.rs`).

use std::os::fd::{AsFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::qemu::argv::MEMORY_BACKEND_ID;
use crate::qemu::{Qmp, QmpError};

/// QEMU's migration capability that leaves shared, file-backed RAM out of a saved state.
pub(crate) const IGNORE_SHARED: &str = "x-ignore-shared";

/// The migration's bandwidth cap while saving, in bytes per second: unlimited in practice. QEMU's
/// default (128 MiB/s) is meant for live migration over a network; a stopped guest saved to a local
/// file was held to it (a 166 MiB state took 1.26 s to pause, ~130 MiB/s).
const SAVE_BANDWIDTH: u64 = 1 << 40;
/// Saving ~70 MB took 0.5 s; this bounds a wedged migration.
const SAVE_DEADLINE: Duration = Duration::from_secs(120);
/// The name QEMU knows the state file's descriptor by.
const FD_NAME: &str = "hearth-save";

/// Why a save failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP {command}: {source}")]
    Qmp {
        command: &'static str,
        source: QmpError,
    },
    /// QEMU ended the migration itself (its message says why: a full disk, say).
    #[error("saving the state to {path} {status}: {detail}")]
    Failed {
        path: PathBuf,
        status: String,
        detail: String,
    },
    #[error("saving the state did not finish within {0:?}")]
    Deadline(Duration),
}

impl SaveError {
    /// QEMU did not answer a command in time, or the save never ended: a frozen or starved VMM
    /// rather than a failure of the save itself.
    pub fn is_unresponsive(&self) -> bool {
        matches!(
            self,
            SaveError::Qmp {
                source: QmpError::Timeout(_),
                ..
            } | SaveError::Deadline(_)
        )
    }

    /// QEMU ended the save for a full disk (it says so only in its message).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SaveError::Failed { detail, .. } if detail.contains("No space left on device"))
    }
}

/// Pauses the guest and migrates its state into `file` (created, or truncated).
pub(crate) fn save(qmp: &mut Qmp, file: &Path) -> Result<(), SaveError> {
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|source| SaveError::Create {
            path: file.to_owned(),
            source,
        })?;
    migrate(qmp, out.into(), file)
}

/// Pauses the guest and migrates its state into `out` (a file, or a pipe another thread reads:
/// `thin_save.rs`), which is closed here once QEMU holds it; `file` names the state in errors.
pub(super) fn migrate(qmp: &mut Qmp, out: OwnedFd, file: &Path) -> Result<(), SaveError> {
    let step = |command: &'static str| move |source| SaveError::Qmp { command, source };
    qmp.stop().map_err(step("stop"))?;
    let file_backed = qmp
        .has_memdev(MEMORY_BACKEND_ID)
        .map_err(step("query-memdev"))?;
    if file_backed {
        qmp.set_migration_capability(IGNORE_SHARED, true)
            .map_err(step("migrate-set-capabilities"))?;
    }
    qmp.set_migration_parameters(serde_json::json!({ "max-bandwidth": SAVE_BANDWIDTH }))
        .map_err(step("migrate-set-parameters"))?;
    qmp.send_fd(FD_NAME, out.as_fd()).map_err(step("getfd"))?;
    drop(out); // QEMU holds its own copy now (a pipe's reader sees its end when QEMU closes it)
    qmp.migrate(&format!("fd:{FD_NAME}"))
        .map_err(step("migrate"))?;
    let deadline = Instant::now() + SAVE_DEADLINE;
    loop {
        let (status, error) = qmp.query_migrate().map_err(step("query-migrate"))?;
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(SaveError::Failed {
                    path: file.to_owned(),
                    status,
                    detail: error.unwrap_or_default(),
                })
            }
            _ if Instant::now() > deadline => return Err(SaveError::Deadline(SAVE_DEADLINE)),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
