//! What only the QEMU backend can fail at. It reaches callers as [`VmError::Backend`] (named
//! "qemu"); `VmError::backend_error::<QemuError>()` gets it back.

use std::path::PathBuf;

use super::snapshot::SaveError;
use super::{QmpError, SnapshotError};
use crate::tsc::TscError;
use crate::vmm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    #[error("QMP on {socket}: {source}")]
    Qmp { socket: PathBuf, source: QmpError },
    /// TCG guests need the host's TSC frequency.
    #[error(transparent)]
    Tsc(TscError),
    #[error("snapshot: {0}")]
    Snapshot(SnapshotError),
    #[error("saving the VM to {state}: {source}")]
    Save { state: PathBuf, source: SaveError },
}

impl QemuError {
    /// QEMU did not answer in time (frozen, or too starved to run its main loop): the sandbox's
    /// trouble, not a failure of hearth's.
    pub fn is_unresponsive(&self) -> bool {
        match self {
            QemuError::Qmp {
                source: QmpError::Timeout(_),
                ..
            } => true,
            QemuError::Save { source, .. } => source.is_unresponsive(),
            _ => false,
        }
    }

    /// Saving the VM failed for a full disk.
    pub fn is_disk_full(&self) -> bool {
        matches!(self, QemuError::Save { source, .. } if source.is_disk_full())
    }
}

impl From<QemuError> for VmError {
    fn from(e: QemuError) -> VmError {
        VmError::backend("qemu", e)
    }
}
