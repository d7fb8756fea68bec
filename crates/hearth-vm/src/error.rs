//! [`VmError`], the backend-neutral error of everything that boots, controls or adopts a VM. A
//! backend's own failures (QMP, Firecracker's API, boot templates, the jailer) travel boxed in
//! [`VmError::Backend`] and keep their types. A leaf module: it names no backend.

use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::Duration;

use crate::spec::SpecError;

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error(transparent)]
    Spec(#[from] SpecError),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot start {program}: {source}; is it installed and executable? (`hearth setup` installs QEMU; Firecracker comes from its releases)")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("{vmm} exited during start-up with {status}\n--- {vmm} stderr:\n{stderr}\n--- console tail:\n{console}")]
    EarlyExit {
        vmm: &'static str,
        status: ExitStatus,
        stderr: String,
        console: String,
    },
    #[error(
        "{vmm} did not open its control socket {socket} within {waited:?}\n--- stderr:\n{stderr}"
    )]
    StartTimeout {
        vmm: &'static str,
        socket: PathBuf,
        waited: Duration,
        stderr: String,
    },
    #[error("the VMM of {run_dir} (pid {pid}) is no longer running")]
    Gone { run_dir: PathBuf, pid: u32 },
    #[error("waiting for VMM pid {pid}: {source}")]
    Wait { pid: u32, source: std::io::Error },
    /// A failure only one backend can have (QMP, Firecracker's API, boot templates, the jailer):
    /// the backend's own typed error, boxed. [`VmError::backend_error`] gets it back.
    #[error("{vmm}: {source}")]
    Backend {
        vmm: &'static str,
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    #[error("{0}")]
    Unsupported(String),
}

impl VmError {
    /// Wraps a backend's own error.
    pub fn backend(
        vmm: &'static str,
        source: impl std::error::Error + Send + Sync + 'static,
    ) -> VmError {
        VmError::Backend {
            vmm,
            source: Box::new(source),
        }
    }

    /// The backend's own error, if this is one of type `E`.
    pub fn backend_error<E: std::error::Error + 'static>(&self) -> Option<&E> {
        match self {
            VmError::Backend { source, .. } => source.downcast_ref::<E>(),
            _ => None,
        }
    }
}
