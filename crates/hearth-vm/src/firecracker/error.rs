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
    #[error(
        "--jailer needs Firecracker's jailer binary: put `jailer` in PATH or set HEARTH_JAILER_BIN"
    )]
    NoJailer,
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
