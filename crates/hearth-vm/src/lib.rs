//! hearth-vm: boots guest microVMs and gives the rest of hearth a backend-neutral handle on them.
//!
//! Entry points:
//! - [`select_backend`] (`backend.rs`): the one place that picks a backend — `--vmm`, `--accel`,
//!   the kernel for the KVM probe, the jailer — and says why; [`adopt`] takes over a detached VM of
//!   any backend. Nothing outside this crate names a backend to boot a VM.
//! - [`Vmm`] / [`RunningVm`] (`vmm.rs`): the backend-neutral traits, with the optional capabilities
//!   a backend may lack ([`Capabilities`]: boot templates, saving a running VM to files, a network
//!   interface); [`VmSpec`] (`spec.rs`) says what to boot.
//! - [`VmProcess`] (`lifecycle.rs`): the one VMM-process lifecycle every backend embeds (pid, run
//!   directory, exit recorded once, kill, wait, release, cleanup on drop).
//! - [`qemu::QemuVmm`]: the QEMU `microvm` backend (argv, QMP control, boot templates).
//! - [`firecracker::FirecrackerVmm`]: the Firecracker backend (typed config, REST API client or
//!   `--config-file`, optional jailer under a guard process, hybrid vsock agent channel).
//! - [`accel`]: KVM or TCG, with an honest cached probe; [`tsc`]: host TSC frequency for TCG guests.
//! - [`kernel`]: the guest kernel directory, which kernel to boot (`resolve_kernel`, `--kernel`),
//!   vmlinux extraction, module resolution, `hearth setup` provisioning.
//! - [`initramfs`]: hearth's initramfs (agent + modules) and the "floor" initramfs used by the KVM probe
//!   and the boot benchmark.
//! - [`scratch`]: the per-sandbox writable ext4 disk; `rundir`: per-VM run directories and the
//!   cleanup of those a dead hearth left ([`remove_stale_run_dirs`]); `process`: VMM spawning with
//!   a parent-death signal, or detached, the jailer's guard process, and processes watched by
//!   identity and pidfd; `detached`: what a detached VM leaves for its next owner.
//! - [`confine`]: least privilege for every VMM — a per-VM unprivileged uid (leased host-wide under
//!   `/run/hearth/vmm-uids`), its own cgroup with memory and pids limits, an empty chroot; QEMU's
//!   seccomp filter (`HEARTH_VMM_CONFINEMENT=off` drops all but the filter, for debugging).
//! - [`channel`]: the host end of the agent channel (execs, files, port forwarding).
//!
//! Everything this crate writes goes under `HEARTH_HOME` or a caller-supplied run directory inside it,
//! except the uid leases in `/run/hearth/vmm-uids` (host-wide by nature) and the VMMs' cgroups.
//! `KernelDir::vmlinux` caches `vmlinux` beside its `vmlinuz`, which for hearth's own kernel is inside
//! `HEARTH_HOME`; user kernels go through `kernel::resolve_kernel`, which caches in `HEARTH_HOME`.

pub mod accel;
mod backend;
pub mod channel;
pub mod confine;
mod detached;
mod error;
pub mod firecracker;
mod fsutil;
pub mod initramfs;
pub mod kernel;
mod lifecycle;
mod process;
pub mod qemu;
mod rundir;
pub mod scratch;
mod spec;
#[cfg(test)]
mod test_support;
pub mod tsc;
mod vmm;

pub use accel::{Accel, Selection};
pub use backend::{adopt, select_backend, BackendRequest, Chosen, Jailer, VmmChoice};
pub use detached::{DetachedRecord, DETACHED_RECORD};
pub use error::VmError;
pub use lifecycle::{VmExit, VmProcess};
pub use process::{ForeignProcess, ProcessIdentity};
pub use rundir::{kill_processes_naming, read_log_tail, remove_stale_run_dirs, trim_log};
pub use spec::{
    Drive, GuestMemory, KernelCmdline, MachineRevision, NetworkInterface, SpecError, VmSpec,
    HOSTNAME_PARAM, ROOTFS_SERIAL, SCRATCH_SERIAL,
};
pub use vmm::{
    AgentEndpoint, BootTemplate, BootTemplates, Capabilities, LaunchPlan, RunningVm, SavedState,
    Vmm,
};
