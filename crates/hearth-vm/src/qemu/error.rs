//! What only the QEMU backend can fail at. It reaches callers as [`VmError::Backend`] (named
//! "qemu"); `VmError::backend_error::<QemuError>()` gets it back.

use std::path::PathBuf;

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
    #[error("saving the VM to {state}: {detail}")]
    Save { state: PathBuf, detail: String },
}

impl From<QemuError> for VmError {
    fn from(e: QemuError) -> VmError {
        VmError::backend("qemu", e)
    }
}
