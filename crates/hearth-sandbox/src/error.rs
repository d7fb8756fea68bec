//! The one error type of sandbox life; each variant names the step that failed.

use std::path::PathBuf;

use hearth_vm::channel::ChannelError;

#[derive(Debug, thiserror::Error)]
pub enum SandboxError {
    #[error(transparent)]
    Image(#[from] hearth_image::ImageError),
    #[error("guest kernel: {}", with_setup_advice(.0))]
    Kernel(#[from] hearth_vm::kernel::KernelError),
    #[error("initramfs: {0}")]
    Initramfs(#[from] hearth_vm::initramfs::InitramfsError),
    #[error("scratch disk: {0}")]
    Scratch(#[from] hearth_vm::scratch::ScratchError),
    #[error(transparent)]
    Vm(#[from] hearth_vm::VmError),
    /// The guest never answered; `tail` is the end of its console log `console`, read before the VM
    /// and its run directory were removed.
    #[error("guest agent: {source}\n--- last lines of the guest console ({console}, now removed):\n{tail}")]
    Agent {
        source: ChannelError,
        console: PathBuf,
        tail: String,
    },
    #[error(transparent)]
    Channel(#[from] ChannelError),
    #[error("sandbox network: {0}")]
    Network(#[from] hearth_net::network::NetworkError),
    #[error(
        "no static guest agent found (looked in: {searched}); build it with scripts/build-agent.sh \
         and set HEARTH_AGENT, or run `hearth setup`"
    )]
    NoAgent { searched: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

impl SandboxError {
    /// The VM's process was found gone (it died, or was killed) while hearth asked something of
    /// it.
    pub fn is_vm_gone(&self) -> bool {
        matches!(self, SandboxError::Vm(hearth_vm::VmError::Gone { .. }))
    }

    /// The host's disk (hearth's home) was full: the node's capacity, not a fault of hearth's.
    /// Looks through the error's sources for ENOSPC or EDQUOT, and at QEMU's own message for a
    /// save it ended (never at text a guest wrote, such as a console tail).
    pub fn is_disk_full(&self) -> bool {
        let mut next: Option<&(dyn std::error::Error + 'static)> = Some(self);
        while let Some(e) = next {
            if e.downcast_ref::<std::io::Error>().is_some_and(is_disk_full) {
                return true;
            }
            next = e.source();
        }
        match self {
            SandboxError::Vm(vm) => vm
                .backend_error::<hearth_vm::qemu::QemuError>()
                .is_some_and(hearth_vm::qemu::QemuError::is_disk_full),
            _ => false,
        }
    }

    /// The VMM or the guest did not answer in time (frozen, or a host too loaded to run it): the
    /// sandbox's trouble, not a failure of hearth's.
    pub fn is_unresponsive(&self) -> bool {
        use hearth_vm::firecracker::FirecrackerError;
        use hearth_vm::qemu::QemuError;
        let channel = |c: &ChannelError| {
            matches!(
                c,
                ChannelError::Unresponsive { .. } | ChannelError::HandshakeTimeout(_)
            )
        };
        match self {
            SandboxError::Vm(hearth_vm::VmError::StartTimeout { .. }) => true,
            SandboxError::Vm(vm) => {
                vm.backend_error::<QemuError>()
                    .is_some_and(QemuError::is_unresponsive)
                    || vm
                        .backend_error::<FirecrackerError>()
                        .is_some_and(FirecrackerError::is_unresponsive)
            }
            SandboxError::Agent { source, .. } | SandboxError::Channel(source) => channel(source),
            _ => false,
        }
    }
}

/// Whether `e` says the disk (or the quota on it) is full: ENOSPC or EDQUOT.
pub fn is_disk_full(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ENOSPC | libc::EDQUOT))
}

/// The kernel's error with the way out, unless it already says it.
fn with_setup_advice(err: &hearth_vm::kernel::KernelError) -> String {
    let text = err.to_string();
    match text.contains("hearth setup") {
        true => text,
        false => {
            format!("{text}; run `hearth setup` to provision hearth's kernel, or pass --kernel")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_found_gone_is_told_from_other_failures() {
        let gone = SandboxError::Vm(hearth_vm::VmError::Gone {
            run_dir: "/run/x".into(),
            pid: 7,
        });
        assert!(gone.is_vm_gone());
        let other = SandboxError::Vm(hearth_vm::VmError::Unsupported("no".into()));
        assert!(!other.is_vm_gone());
    }
}
