//! hearth-vm: boots guest microVMs and gives the rest of hearth a backend-neutral handle on them.
//!
//! Entry points:
//! - [`Vmm`] / [`RunningVm`] (`vmm.rs`): the backend-neutral trait; [`VmSpec`] (`spec.rs`) says what to boot.
//! - [`qemu::QemuVmm`]: the QEMU `microvm` backend (argv rendering, spawning, QMP control).
//! - [`firecracker::FirecrackerVmm`]: the Firecracker backend (typed config, REST API client or
//!   `--config-file`, optional jailer, hybrid vsock agent channel).
//! - [`accel`]: KVM or TCG, with an honest cached probe; [`tsc`]: host TSC frequency for TCG guests.
//! - [`kernel`]: the guest kernel directory, which kernel to boot (`resolve_kernel`, `--kernel`),
//!   vmlinux extraction, module resolution, `hearth setup` provisioning.
//! - [`initramfs`]: hearth's initramfs (agent + modules) and the "floor" initramfs used by the KVM probe
//!   and the boot benchmark.
//! - [`scratch`]: the per-sandbox writable ext4 disk; `rundir`: per-VM run directories and the
//!   cleanup of those a dead hearth left ([`remove_stale_run_dirs`]); `process`: VMM spawning with
//!   a parent-death signal, or detached; `adopt`: taking over a detached VM ([`adopt()`],
//!   [`ProcessIdentity`]).
//! - [`channel`]: the host end of the agent channel.
//!
//! Everything this crate writes goes under `HEARTH_HOME` or a caller-supplied run directory inside it.
//! `KernelDir::vmlinux` caches `vmlinux` beside its `vmlinuz`, which for hearth's own kernel is inside
//! `HEARTH_HOME`; user kernels go through `kernel::resolve_kernel`, which caches in `HEARTH_HOME`.

pub mod accel;
mod adopt;
pub mod channel;
pub mod firecracker;
mod guard;
pub mod initramfs;
pub mod kernel;
mod process;
pub mod qemu;
mod rundir;
pub mod scratch;
mod spec;
pub mod tsc;
mod vmm;

pub use accel::{Accel, Selection};
pub use adopt::{adopt, DetachedRecord, ForeignProcess, ProcessIdentity, DETACHED_RECORD};
pub use rundir::remove_stale_run_dirs;
pub use spec::{Drive, KernelCmdline, SpecError, VmSpec, ROOTFS_SERIAL, SCRATCH_SERIAL};
pub use vmm::{AgentEndpoint, LaunchPlan, RunningVm, VmError, VmExit, Vmm};

/// Reads the host's boot id: caches of host facts (TSC frequency, KVM verdict) are keyed by it, so a
/// reboot (possibly onto other hardware or another hypervisor) invalidates them.
pub(crate) fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, then rename), so that
/// concurrent hearth processes never see a half-written cache file.
pub(crate) fn write_atomic(path: &std::path::Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or_else(|| std::path::Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Helpers for this crate's unit tests.
#[cfg(test)]
pub(crate) mod test_support {
    /// Whether the tests run as root (new namespaces, changing uids).
    pub fn is_root() -> bool {
        // SAFETY: geteuid has no preconditions.
        unsafe { libc::geteuid() == 0 }
    }

    /// The value following `flag` in an argument list, for each occurrence.
    pub fn values<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
        args.windows(2)
            .filter(|w| w[0] == flag)
            .map(|w| w[1].as_str())
            .collect()
    }
}
