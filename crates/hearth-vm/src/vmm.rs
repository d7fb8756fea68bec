//! The backend-neutral VMM seam: [`Vmm`] boots a [`VmSpec`], [`RunningVm`] controls the result.
//! QEMU (`crate::qemu`) and Firecracker (`crate::firecracker`) implement it; `crate::backend`
//! chooses between them. What only some backends can do is a capability ([`Capabilities`]) with a
//! method that the others answer with [`VmError::Unsupported`]: boot templates
//! ([`Vmm::boot_templates`]), saving a running VM to files ([`RunningVm::save_state`]) and starting
//! one from them ([`VmSpec::restore_from`]), a network interface. Errors are backend-neutral
//! ([`VmError`]); a backend's own failures travel boxed in [`VmError::Backend`].

use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::error::VmError;
use crate::lifecycle::{VmExit, VmProcess};
use crate::spec::VmSpec;

/// A virtual machine monitor backend.
///
/// Calls block (spawning, waiting, control round trips); async callers use `spawn_blocking`.
pub trait Vmm: Send + Sync {
    /// Short backend name for logs and `--dry-run` ("qemu", "firecracker").
    fn name(&self) -> &'static str;

    /// Kernel modules the guest needs for the devices this backend offers (virtio-mmio, block, the
    /// agent channel's transport, overlay), in any order; `crate::kernel::modules` resolves deps.
    fn guest_modules(&self) -> &'static [&'static str];

    /// What this backend can do beyond booting and stopping a VM.
    fn capabilities(&self) -> Capabilities;

    /// The exact command line and configuration `start` would use, without starting anything.
    fn dry_run(&self, spec: &VmSpec) -> Result<LaunchPlan, VmError>;

    /// Creates `spec.run_dir`, starts the VMM and returns once it runs and its control channel answers.
    /// Fails fast, with the VMM's stderr and the console tail, when it exits during start-up.
    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmError>;

    /// Boot templates, where the backend has them ([`Capabilities::boot_templates`]).
    fn boot_templates(&self) -> Option<&dyn BootTemplates> {
        None
    }
}

/// What a backend can do beyond booting and stopping a VM. Callers check before they plan on it;
/// the methods behind a missing capability answer [`VmError::Unsupported`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Capabilities {
    /// Starts VMs by restoring a saved, booted guest instead of booting the kernel
    /// ([`Vmm::boot_templates`]).
    pub boot_templates: bool,
    /// Saves a running VM's memory and device state to files ([`RunningVm::save_state`]) and starts
    /// VMs from such files ([`VmSpec::restore_from`]): what pause to disk, resume and fork build on.
    pub save_state: bool,
    /// Gives the guest a virtio-net interface backed by a host tap device.
    pub network: bool,
}

/// Starting VMs from a saved, booted guest: one template per VM configuration, built once by a cold
/// boot and reused by every VM of that configuration, whatever its image.
pub trait BootTemplates {
    /// The template VMs like `spec` (a cold-boot spec) restore from, and `spec` turned into a
    /// restore from it. With `build`, a missing template is built now (one cold boot plus a save;
    /// concurrent callers wait for one build); without, the plan only says whether it exists.
    fn template_for(
        &self,
        home: &Path,
        spec: &VmSpec,
        build: bool,
    ) -> Result<(BootTemplate, VmSpec), VmError>;

    /// Removes `template` (a restore from it failed) so that the next VM builds it afresh.
    fn discard(&self, template: &BootTemplate) -> Result<(), VmError>;

    /// Bytes of host memory that starting `restore` (a spec from [`BootTemplates::template_for`]
    /// of a built template) newly allocates for the template's memory, on top of the VM's own:
    /// zero when a copy this process holds serves it.
    fn memory_to_allocate(&self, restore: &VmSpec) -> u64;
}

/// A boot template, as the rest of hearth sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootTemplate {
    pub id: String,
    /// Where it lives (`$HEARTH_HOME/templates/<id>`).
    pub dir: PathBuf,
    /// The saved VM state restored VMs load.
    pub state: PathBuf,
    /// Whether it exists yet (a plan made without building may name one still to build).
    pub built: bool,
}

/// A running VM's state saved to files by [`RunningVm::save_state`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SavedState {
    /// Memory and device state; a [`VmSpec`] with `restore_from` set to it starts the VM again.
    pub state: PathBuf,
    pub bytes: u64,
    pub took: Duration,
    /// QEMU, a VM restored from a boot template: a hard link beside `state` to the template
    /// memory file the VM maps. Started again with [`crate::GuestMemory::FromTemplate`] of it,
    /// the VM maps the same memory, and `state` holds only the pages it changed (a thin state,
    /// `qemu/snapshot/thin.rs`). `None`: `state` holds every page (no template, or thinning did
    /// not work out); start it again with [`crate::GuestMemory::Saved`].
    pub base: Option<PathBuf>,
}

/// A started VM. Dropping it kills the VMM if still running and removes the run directory.
///
/// Process lifecycle (pid, waiting, killing, releasing) is the embedded [`VmProcess`]'s; backends
/// implement control (pause, resume, a clean stop) and what they can do beyond that.
pub trait RunningVm: Send {
    /// The VMM process and run directory.
    fn process(&self) -> &VmProcess;

    fn process_mut(&mut self) -> &mut VmProcess;

    /// Where the host connects to reach the guest agent.
    fn agent_endpoint(&self) -> &AgentEndpoint;

    /// Pauses the vCPUs (QMP `stop`; Firecracker `PATCH /vm Paused`).
    fn pause(&mut self) -> Result<(), VmError>;

    /// Resumes paused vCPUs.
    fn resume(&mut self) -> Result<(), VmError>;

    /// Graceful stop: asks the guest to power down and waits up to `grace`, then asks the VMM to quit,
    /// then SIGKILLs it. Returns how it ended; the run directory is removed.
    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError>;

    /// Process id of the VMM (not of anything inside the guest).
    fn pid(&self) -> u32 {
        self.process().pid()
    }

    fn run_dir(&self) -> &Path {
        self.process().run_dir()
    }

    /// The host Unix socket of the agent channel (shorthand for the endpoint's socket path).
    fn agent_socket(&self) -> &Path {
        self.agent_endpoint().socket()
    }

    /// SIGKILLs the VMM, reaps it and removes the run directory.
    fn kill(&mut self) -> Result<VmExit, VmError> {
        self.process_mut().kill()
    }

    /// Waits for the VMM to exit on its own (guest powered off or rebooted), then cleans up.
    fn wait(&mut self) -> Result<VmExit, VmError> {
        self.process_mut().wait()
    }

    /// Like [`RunningVm::wait`] but gives up after `timeout`, returning `None` while still running.
    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError> {
        self.process_mut().wait_timeout(timeout)
    }

    /// Lets go of the VM without stopping it: dropping the handle afterwards leaves the VMM running
    /// and its run directory in place, for a later [`crate::adopt()`]. Meant for detached VMs (a
    /// non-detached VMM still dies with this process).
    fn release(&mut self) {
        self.process_mut().release()
    }

    /// Pauses the VM and saves its memory and device state into `dir` (created if missing); the VM
    /// stays paused. Needs [`Capabilities::save_state`].
    fn save_state(&mut self, dir: &Path) -> Result<SavedState, VmError> {
        let _ = dir;
        Err(VmError::Unsupported(format!(
            "the {} backend cannot save a running VM to files",
            self.process().vmm()
        )))
    }

    /// For a VM restored from saved state: how long loading it took. `None` for a cold boot.
    fn restored_in(&self) -> Option<Duration> {
        None
    }

    /// For a VM restored from saved state: the agent connection the restore opened (the guest must
    /// not see its host disconnect; use it for the first handshake). Taken once.
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
