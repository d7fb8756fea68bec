//! hearth-sandbox: a sandbox's life — image -> VM -> agent — and the commands run in it.
//!
//! Entry points: [`Sandbox::create`] pulls the image, prepares kernel, initramfs and scratch disk
//! ([`boot`]), starts the VMM and connects to the guest agent; [`Sandbox::client`] runs commands and
//! moves files; [`Sandbox::destroy`] stops the VM and removes its run directory. [`command::resolve`]
//! turns an image config plus `docker run` style options into one concrete command. Where the
//! backend has boot templates (QEMU) a VM is restored from one unless snapshots are off
//! ([`restore`]); which backend runs is `hearth_vm::select_backend`'s choice, and nothing here names
//! a backend. [`node::Node`] manages many long-lived sandboxes on one host (state, admission, TTLs,
//! recovery after restarts, pause and resume, the one-shot [`node::Node::run_once`]).
//! [`Sandbox::pause`] saves a running sandbox to disk and ends its VMM; [`PausedSandbox::resume`]
//! brings it back (`pause.rs`); [`Sandbox::snapshot`] saves one without ending it and
//! [`PausedSandbox::start_copy`] starts copies of it with their own identity (`fork.rs`). The exec vocabulary of the agent
//! channel is re-exported here, so that callers need not depend on `hearth-vm`.

pub mod boot;
pub mod command;
mod error;
mod fork;
pub mod node;
mod pause;
pub mod restore;
mod sandbox;
mod spec_record;

pub use boot::{
    BootPlan, Jailer, MemoryRoom, Networking, Purpose, RoomGrant, SandboxConfig, VmmChoice,
};
pub use error::{is_disk_full, SandboxError};
/// Sandbox networking's vocabulary, re-exported for the CLI and the daemon.
pub use hearth_net::network::{NetworkOptions, NetworkStats};
pub use hearth_net::policy::{Entry as NetworkEntry, Mode as NetworkMode, NetworkPolicy};
pub use hearth_net::proxy::RefusedAttempt;
/// The exec and file vocabulary of the agent channel, re-exported so that callers of this crate
/// (the CLI, the Kubernetes node agent) need not depend on `hearth-vm`.
pub use hearth_vm::channel::{
    ChannelError, ExecHandle, ExecOutput, ExecRequest, ExecResult, ExecStdin, ExitStatus,
    FileDownload, TtySize,
};
/// `--accel`.
pub use hearth_vm::Accel;
pub use node::{Node, NodeConfig, NodeError};
pub use pause::{PausedSandbox, PAUSE_META};
pub use restore::RestorePlan;
pub use sandbox::{sweep_stale, BootTimings, Sandbox};
