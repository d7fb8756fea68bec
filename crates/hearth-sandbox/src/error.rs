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
