//! The backend-neutral VMM seam: [`Vmm`] boots a [`VmSpec`], [`RunningVm`] controls the result.
//! QEMU implements it today (`crate::qemu`); Firecracker (REST config, hybrid vsock) is the second
//! implementation, which is why the launch plan can carry config files and the agent endpoint can be
//! a vsock port behind a Unix socket. A detached VM can be taken over by another process
//! ([`Vmm::adopt`], `crate::adopt`).

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use crate::spec::{SpecError, VmSpec};

/// A virtual machine monitor backend.
///
/// Calls block (spawning, waiting, QMP round trips); async callers use `spawn_blocking`.
pub trait Vmm: Send + Sync {
    /// Short backend name for logs and `--dry-run` ("qemu", "firecracker").
    fn name(&self) -> &'static str;

    /// Kernel modules the guest needs for the devices this backend offers (virtio-mmio, block, the
    /// agent channel's transport, overlay), in any order; `crate::kernel::modules` resolves deps.
    fn guest_modules(&self) -> &'static [&'static str];

    /// The exact command line and configuration `start` would use, without starting anything.
    fn dry_run(&self, spec: &VmSpec) -> Result<LaunchPlan, VmError>;

    /// Creates `spec.run_dir`, starts the VMM and returns once it runs and its control channel answers.
    /// Fails fast, with the VMM's stderr and the console tail, when it exits during start-up.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmError>;

    /// Takes over a VM this backend started detached (`spec.detached`) in `run_dir`, possibly by
    /// another process: see [`crate::adopt()`], which does the same without knowing the backend.
    fn adopt(&self, run_dir: &Path) -> Result<Box<dyn RunningVm>, VmError> {
        let record = crate::DetachedRecord::read(run_dir)?;
        if record.vmm != self.name() {
            return Err(VmError::Unsupported(format!(
                "{} holds a {} VM, not a {} one",
                run_dir.display(),
                record.vmm,
                self.name()
            )));
        }
        crate::adopt(run_dir)
    }
}

/// A started VM. Dropping it kills the VMM if still running and removes the run directory.
pub trait RunningVm: Send {
    /// Process id of the VMM (not of anything inside the guest).
    fn pid(&self) -> u32;

    fn run_dir(&self) -> &Path;

    /// Where the host connects to reach the guest agent.
    fn agent_endpoint(&self) -> &AgentEndpoint;

    /// The host Unix socket of the agent channel (shorthand for the endpoint's socket path).
    fn agent_socket(&self) -> &Path {
        self.agent_endpoint().socket()
    }

    /// Pauses the vCPUs (QMP `stop`; Firecracker `PATCH /vm Paused`).
    fn pause(&mut self) -> Result<(), VmError>;

    /// Resumes paused vCPUs.
    fn resume(&mut self) -> Result<(), VmError>;

    /// Graceful stop: asks the guest to power down and waits up to `grace`, then asks the VMM to quit,
    /// then SIGKILLs it. Returns how it ended; the run directory is removed.
    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError>;

    /// SIGKILLs the VMM, reaps it and removes the run directory.
    fn kill(&mut self) -> Result<VmExit, VmError>;

    /// Waits for the VMM to exit on its own (guest powered off or rebooted), then cleans up.
    fn wait(&mut self) -> Result<VmExit, VmError>;

    /// Like [`RunningVm::wait`] but gives up after `timeout`, returning `None` while still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError>;

    /// Lets go of the VM without stopping it: dropping the handle afterwards leaves the VMM running
    /// and its run directory in place, for a later [`crate::adopt()`]. Meant for detached VMs (a
    /// non-detached VMM still dies with this process).
    fn release(&mut self);

    /// For a VM restored from a snapshot template (QEMU): how long loading its state took.
    /// `None` for a cold boot.
    fn restored_in(&self) -> Option<Duration> {
        None
    }

    /// For a VM restored from a snapshot template: the agent connection the restore opened (the
    /// guest must not see its host disconnect; use it for the first handshake). Taken once.
    fn take_agent_stream(&mut self) -> Option<std::os::unix::net::UnixStream> {
        None
    }
}

/// How the host reaches the guest agent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AgentEndpoint {
    /// A Unix socket that is directly the agent's byte stream (QEMU virtio-serial chardev).
    Stream(PathBuf),
    /// Firecracker's hybrid vsock: connect to `socket`, send `CONNECT <port>\n`, expect `OK <n>\n`.
    HybridVsock { socket: PathBuf, port: u32 },
}

impl AgentEndpoint {
    pub fn socket(&self) -> &Path {
        match self {
            AgentEndpoint::Stream(socket) | AgentEndpoint::HybridVsock { socket, .. } => socket,
        }
    }
}

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub status: ExitStatus,
    /// A failure the VMM or guest kernel reported even though the process may have exited 0: a kernel
    /// panic line from the console (QEMU), a KVM internal error from the log (Firecracker).
    pub failure: Option<String>,
}

/// What a backend would run: program, arguments and any config files it would write first.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// (path, contents) of files written before the program starts (e.g. Firecracker's config).
    pub files: Vec<(PathBuf, String)>,
}

impl LaunchPlan {
    /// The command as a shell would need it typed (POSIX single-quoting where needed).
    pub fn command_line(&self) -> String {
        std::iter::once(self.program.to_string_lossy().into_owned())
            .chain(self.args.iter().cloned())
            .map(|word| shell_quote(&word))
            .collect::<Vec<_>>()
            .join(" ")
    }
}

impl std::fmt::Display for LaunchPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "{}", self.command_line())?;
        for (path, contents) in &self.files {
            writeln!(f, "--- {}", path.display())?;
            writeln!(f, "{}", contents.trim_end())?;
        }
        Ok(())
    }
}

pub(crate) fn shell_quote(word: &str) -> String {
    let plain = !word.is_empty()
        && word
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_=/.,:@+%".contains(&b));
    if plain {
        word.to_owned()
    } else {
        format!("'{}'", word.replace('\'', r"'\''"))
    }
}

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
    #[error("QMP on {socket}: {source}")]
    Qmp {
        socket: PathBuf,
        source: crate::qemu::QmpError,
    },
    #[error(transparent)]
    FirecrackerApi(#[from] crate::firecracker::ApiError),
    #[error("configuring Firecracker failed: {source}\n--- firecracker stderr:\n{log}")]
    FirecrackerConfig {
        source: crate::firecracker::ApiError,
        /// Firecracker's stderr and log file tails.
        log: String,
    },
    #[error("the VMM of {run_dir} (pid {pid}) is no longer running")]
    Gone { run_dir: PathBuf, pid: u32 },
    #[error("waiting for VMM pid {pid}: {source}")]
    Wait { pid: u32, source: std::io::Error },
    #[error(transparent)]
    Tsc(#[from] crate::tsc::TscError),
    #[error("snapshot: {0}")]
    Snapshot(#[from] crate::qemu::snapshot::SnapshotError),
    #[error("{0}")]
    Unsupported(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_line_quotes_only_what_needs_it() {
        let plan = LaunchPlan {
            program: "/usr/bin/qemu".into(),
            args: vec![
                "-append".into(),
                "console=ttyS0 quiet".into(),
                "it's".into(),
            ],
            files: vec![],
        };
        assert_eq!(
            plan.command_line(),
            r#"/usr/bin/qemu -append 'console=ttyS0 quiet' 'it'\''s'"#
        );
    }
}
