//! Least privilege for the VMM processes hearth runs itself (QEMU; Firecracker has its jailer,
//! which `backend::Jailer` turns on by default wherever this confinement is on).
//! A VMM emulates devices for a guest hearth does not trust, and TCG is no security boundary, so
//! a guest that breaks out into its VMM must find itself as an unprivileged user of its own
//! ([`uid`]), in an empty chroot inside its run directory, in a cgroup that caps its memory and
//! tasks (`cgroup.rs`), under a seccomp filter (QEMU's `-sandbox`, rendered by `qemu::argv`).
//!
//! The VMM starts as root only to open what it needs (kernel, initramfs, disks, sockets, console,
//! tap: all named on its command line), then chroots and drops to its uid before running the
//! guest; later inputs (saved states) arrive as file descriptors over its control socket. So
//! nothing under `$HEARTH_HOME` needs to be readable by the VMM's uid.
//!
//! Confinement needs root (changing uid, chroot, cgroups); a hearth running unprivileged already
//! runs its VMMs unprivileged, and they get the seccomp filter only. `HEARTH_VMM_CONFINEMENT=off`
//! turns it off for debugging (e.g. to attach a debugger as root); the default is confined.

mod cgroup;
pub mod uid;

use std::path::{Path, PathBuf};

pub use cgroup::{VmCgroup, PARENT as CGROUP_PARENT};
pub use uid::{PendingLease, UidLease, FIRST_UID, LEASE_DIR, UID_COUNT};

use crate::error::VmError;
use crate::process::Enter;

/// Memory a VMM needs beyond guest RAM: QEMU's own heap, the TCG translation cache (capped at
/// [`crate::qemu::TCG_CACHE_DEFAULT_MIB`], 128 MiB; QEMU's default would let it grow to 1 GiB), device
/// buffers, and the page cache of the disks it writes (reclaimed, not fatal, at the limit).
/// Measured: a TCG QEMU peaked at about 70 MiB over its guest's RAM after start-up
/// (tests/confinement.rs prints the peak).
pub const VMM_OVERHEAD_MIB: u64 = 256;
/// Tasks (threads) the VMM may have besides one per vCPU: main loop, RCU, the block layer's worker
/// pool (up to 64), migration, I/O. It cannot fork (seccomp), so this only bounds threads.
pub const PIDS_BASE: u64 = 128;
/// The empty directory inside the run directory the VMM chroots into.
pub const CHROOT_DIR: &str = "vmm-root";
/// `off` disables confinement.
pub const ENV_SWITCH: &str = "HEARTH_VMM_CONFINEMENT";

/// What one confined VMM runs as and in.
#[derive(Debug)]
pub(crate) struct Confined {
    pub uid: u32,
    pub gid: u32,
    /// The (empty) root directory it is chrooted into.
    pub chroot: PathBuf,
    /// Removed after it exits: its cgroup directories and its uid lease.
    pub leftovers: Vec<PathBuf>,
    /// The cgroups it enters before exec.
    pub enter: Enter,
}

/// Whether VMMs started by this process are confined (root, and not switched off).
pub(crate) fn enabled() -> bool {
    // SAFETY: geteuid cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    root && std::env::var_os(ENV_SWITCH).is_none_or(|v| v != "off")
}

/// Removes what confined VMMs of dead hearth processes left: the uid leases whose run directory
/// is gone, with their cgroups once no task is in them (see [`uid::sweep_abandoned`]). Returns
/// the uids freed; does nothing unprivileged.
pub fn sweep_abandoned() -> Vec<u32> {
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Vec::new();
    }
    let release = |uid: u32| VmCgroup::remove_named(&format!("vmm-{uid}"));
    match uid::sweep_abandoned(release) {
        Ok(freed) => freed,
        Err(e) => {
            tracing::warn!("sweeping abandoned VMM uid leases in {LEASE_DIR}: {e}");
            Vec::new()
        }
    }
}

/// The task limit of a VMM running `vcpus` vCPUs.
pub fn pids_max(vcpus: u32) -> u64 {
    PIDS_BASE + u64::from(vcpus)
}

/// Sets up the confinement of the VMM about to start in `run_dir` (which exists) for a guest of
/// `memory_mib` and `vcpus`: leases its uid, creates its chroot and its cgroup. `None` when
/// confinement is off.
pub(crate) fn prepare(
    run_dir: &Path,
    memory_mib: u32,
    vcpus: u32,
) -> Result<Option<Confined>, VmError> {
    if !enabled() {
        tracing::debug!("VMM confinement off (not root, or {ENV_SWITCH}=off)");
        return Ok(None);
    }
    let lease = uid::lease(run_dir).map_err(|source| VmError::Io {
        what: "leasing a uid for the VMM in",
        path: PathBuf::from(LEASE_DIR),
        source,
    })?;
    let release = |lease: &UidLease| drop(std::fs::remove_file(&lease.file));
    let chroot = run_dir.join(CHROOT_DIR);
    if let Err(source) = make_chroot(&chroot) {
        release(&lease);
        return Err(VmError::Io {
            what: "creating the VMM's chroot",
            path: chroot,
            source,
        });
    }
    let memory = (u64::from(memory_mib) + VMM_OVERHEAD_MIB) << 20;
    let name = format!("vmm-{}", lease.uid);
    let cgroup = match VmCgroup::create(&name, memory, pids_max(vcpus)) {
        Ok(cgroup) => cgroup,
        Err(source) => {
            release(&lease);
            return Err(VmError::Io {
                what: "creating the VMM's cgroup",
                path: PathBuf::from(CGROUP_PARENT).join(name),
                source,
            });
        }
    };
    let mut leftovers = cgroup.dirs.clone();
    leftovers.push(lease.file.clone());
    Ok(Some(Confined {
        uid: lease.uid,
        gid: lease.uid,
        chroot,
        leftovers,
        enter: Enter {
            cgroup_procs: cgroup.procs,
            netns: None,
            no_huge_pages: false,
        },
    }))
}

/// An empty directory only root can write; the VMM sees it as `/` and can list nothing in it.
fn make_chroot(dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new().mode(0o500).create(dir)
}
