//! What only the Firecracker backend can fail at. It reaches callers as [`VmError::Backend`] (named
//! "firecracker"); `VmError::backend_error::<FirecrackerError>()` gets it back.

use super::ApiError;
use crate::vmm::VmError;

#[derive(Debug, thiserror::Error)]
pub enum FirecrackerError {
    /// A call to a running Firecracker's API failed.
    #[error(transparent)]
    Api(ApiError),
    /// Firecracker refused the configuration or InstanceStart; `log` holds its stderr and log.
    #[error("configuring Firecracker failed: {source}\n--- firecracker stderr:\n{log}")]
    Config { source: ApiError, log: String },
    /// Firecracker refused to load a snapshot (or to point its drives at this VM's files); the
    /// snapshot files are left as they were.
    #[error("restoring the VM from {state} failed: {source}\n--- firecracker stderr:\n{log}")]
    Restore {
        state: std::path::PathBuf,
        source: ApiError,
        log: String,
    },
    /// Pausing the VM or writing its snapshot failed.
    #[error("saving the VM to {dir} failed: {source}")]
    Save {
        dir: std::path::PathBuf,
        source: ApiError,
    },
    #[error(
        "Firecracker runs through its jailer (the default as root) and no `jailer` binary was \
         found: put it in PATH or set HEARTH_JAILER_BIN (`--jailer off` runs Firecracker unconfined)"
    )]
    NoJailer,
}

impl FirecrackerError {
    /// Firecracker did not answer an API call in time (frozen, or too starved to serve it): the
    /// sandbox's trouble, not a failure of hearth's.
    pub fn is_unresponsive(&self) -> bool {
        match self {
            FirecrackerError::Api(source)
            | FirecrackerError::Config { source, .. }
            | FirecrackerError::Restore { source, .. }
            | FirecrackerError::Save { source, .. } => source.is_timeout(),
            FirecrackerError::NoJailer => false,
        }
    }
}

impl From<FirecrackerError> for VmError {
    fn from(e: FirecrackerError) -> VmError {
        VmError::backend("firecracker", e)
    }
}

impl From<ApiError> for VmError {
    fn from(e: ApiError) -> VmError {
        FirecrackerError::Api(e).into()
    }
}
