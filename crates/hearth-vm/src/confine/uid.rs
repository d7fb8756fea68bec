//! Per-VM user ids: every confined VMM runs as a uid (and gid of the same number) of its own, so
//! two VMs never share one and a compromised VMM cannot signal, ptrace or read the memory of
//! another. Ids come from a fixed range, [`FIRST_UID`] + n for n < [`UID_COUNT`]
//! (0x6a000000..0x6a010000, far above the ids distributions hand out), and are leased host-wide
//! through files in [`LEASE_DIR`] (one per uid, holding the path that keeps it: the VM's run
//! directory), so VMs of different `HEARTH_HOME`s and processes never collide either. A lease ends
//! when the VM's process record removes its file (`VmProcess` leftovers); a lease whose path no
//! longer exists (its hearth died) is taken over by the next allocation. A uid needed before the
//! run directory exists (the jailer's, chosen with the backend) is a [`PendingLease`], kept by
//! hearth's own `/proc/PID` until [`PendingLease::hand_over`] moves it to the run directory, and
//! released when dropped before that. Touches only [`LEASE_DIR`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The first uid (and gid) handed to a VMM.
pub const FIRST_UID: u32 = 0x6a00_0000;
/// How many VMMs can hold a uid at once.
pub const UID_COUNT: u32 = 0x1_0000;
/// Where leases live: tmpfs, emptied at boot, when every VMM is gone anyway.
pub const LEASE_DIR: &str = "/run/hearth/vmm-uids";

/// One uid held for one VM until its lease file is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UidLease {
    pub uid: u32,
    /// The lease's file; removing it (after the VMM exited) frees the uid.
    pub file: PathBuf,
}

/// Leases the lowest free uid of the range for the VM whose run directory is `run_dir` (which
/// must exist: a lease whose run directory is gone counts as abandoned).
pub fn lease(run_dir: &Path) -> io::Result<UidLease> {
    lease_in(Path::new(LEASE_DIR), run_dir)
}

/// A uid leased before its VM's run directory exists.
#[derive(Debug, PartialEq, Eq)]
pub struct PendingLease {
    lease: UidLease,
    holder: PathBuf,
}

impl PendingLease {
    /// Leases a uid kept by this process (`/proc/PID`) until handed over.
    pub fn take() -> io::Result<PendingLease> {
        PendingLease::take_in(Path::new(LEASE_DIR))
    }

    fn take_in(dir: &Path) -> io::Result<PendingLease> {
        let holder = PathBuf::from(format!("/proc/{}", std::process::id()));
        let lease = lease_in(dir, &holder)?;
        Ok(PendingLease { lease, holder })
    }

    pub fn uid(&self) -> u32 {
        self.lease.uid
    }

    pub fn file(&self) -> &Path {
        &self.lease.file
    }

    /// From now on the lease is kept by `run_dir` (which exists), and ends when its file is
    /// removed with the VM's other leftovers.
    pub fn hand_over(&self, run_dir: &Path) -> io::Result<()> {
        std::fs::write(&self.lease.file, run_dir.as_os_str().as_bytes())
    }
}

impl Drop for PendingLease {
    /// Releases the uid unless it was handed over to a VM.
    fn drop(&mut self) {
        let still_ours = std::fs::read(&self.lease.file)
            .is_ok_and(|holder| holder == self.holder.as_os_str().as_bytes());
        if still_ours {
            let _ = std::fs::remove_file(&self.lease.file);
        }
    }
}

fn lease_in(dir: &Path, run_dir: &Path) -> io::Result<UidLease> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    // Allocation and takeover of abandoned leases are serialized; releasing needs no lock.
    let _lock = Flock::take(&dir.join(".lock"))?;
    for n in 0..UID_COUNT {
        let uid = FIRST_UID + n;
        let file = dir.join(uid.to_string());
        match create_new(&file) {
            Ok(mut f) => {
                f.write_all(run_dir.as_os_str().as_bytes())?;
                return Ok(UidLease { uid, file });
            }
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                let holder = std::fs::read(&file).unwrap_or_default();
                let holder = Path::new(std::ffi::OsStr::from_bytes(&holder));
                if holder.as_os_str().is_empty() || holder.exists() {
                    continue;
                }
                std::fs::write(&file, run_dir.as_os_str().as_bytes())?;
                return Ok(UidLease { uid, file });
            }
            Err(e) => return Err(e),
        }
    }
    Err(io::Error::other(format!(
        "all {UID_COUNT} VMM uids from {FIRST_UID} are leased ({})",
        dir.display()
    )))
}

/// Ends the leases in [`LEASE_DIR`] whose holder is gone (a hearth killed before its VM's process
/// record removed them), with what `release` removes for the uid (its VMM's cgroups; `true`
/// when nothing of them is left). A lease whose `release` fails stays, to be retried by the next
/// sweep. Returns the uids freed. Every hearth runs it at start-up (`rundir`'s stale sweep).
pub fn sweep_abandoned(release: impl FnMut(u32) -> bool) -> io::Result<Vec<u32>> {
    sweep_in(Path::new(LEASE_DIR), release)
}

fn sweep_in(dir: &Path, mut release: impl FnMut(u32) -> bool) -> io::Result<Vec<u32>> {
    if !dir.exists() {
        return Ok(Vec::new());
    }
    // Under the allocation lock: an allocation may be taking the same abandoned lease over.
    let _lock = Flock::take(&dir.join(".lock"))?;
    let mut freed = Vec::new();
    for entry in std::fs::read_dir(dir)?.flatten() {
        let Some(uid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let holder = std::fs::read(entry.path()).unwrap_or_default();
        let holder = Path::new(std::ffi::OsStr::from_bytes(&holder));
        if holder.as_os_str().is_empty() || holder.exists() {
            continue;
        }
        if release(uid) && std::fs::remove_file(entry.path()).is_ok() {
            freed.push(uid);
        }
    }
    Ok(freed)
}

fn create_new(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
}

/// An exclusive `flock`, released when dropped (with the file).
struct Flock {
    _file: File,
}

impl Flock {
    fn take(path: &Path) -> io::Result<Flock> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(path)?;
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
                return Ok(Flock { _file: file });
            }
            let err = io::Error::last_os_error();
            if err.kind() != io::ErrorKind::Interrupted {
                return Err(err);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sweep_ends_abandoned_leases_whose_cgroups_went_and_keeps_the_rest() {
        let tmp = tempfile::tempdir().unwrap();
        let leases = tmp.path().join("leases");
        let (live, gone, busy) = (
            tmp.path().join("live"),
            tmp.path().join("gone"),
            tmp.path().join("busy"),
        );
        for d in [&live, &gone, &busy] {
            std::fs::create_dir(d).unwrap();
        }
        let live = lease_in(&leases, &live).unwrap();
        let gone_lease = lease_in(&leases, &gone).unwrap();
        let busy_lease = lease_in(&leases, &busy).unwrap();
        std::fs::remove_dir(&gone).unwrap();
        std::fs::remove_dir(&busy).unwrap();
        let mut asked = Vec::new();
        let freed = sweep_in(&leases, |uid| {
            asked.push(uid);
            uid != busy_lease.uid // its cgroup still has a task
        })
        .unwrap();
        assert_eq!(freed, vec![gone_lease.uid]);
        asked.sort();
        assert_eq!(asked, vec![gone_lease.uid, busy_lease.uid]);
        assert!(live.file.exists() && busy_lease.file.exists());
        assert!(!gone_lease.file.exists());
        assert!(sweep_in(&tmp.path().join("absent"), |_| true)
            .unwrap()
            .is_empty());
    }

    #[test]
    fn live_vms_get_distinct_uids_and_abandoned_leases_are_taken_over() {
        let tmp = tempfile::tempdir().unwrap();
        let leases = tmp.path().join("leases");
        let (a, b) = (tmp.path().join("a"), tmp.path().join("b"));
        std::fs::create_dir(&a).unwrap();
        std::fs::create_dir(&b).unwrap();
        let first = lease_in(&leases, &a).unwrap();
        let second = lease_in(&leases, &b).unwrap();
        assert_eq!(first.uid, FIRST_UID);
        assert_eq!(second.uid, FIRST_UID + 1);
        // Released: the uid is free again.
        std::fs::remove_file(&first.file).unwrap();
        let c = tmp.path().join("c");
        std::fs::create_dir(&c).unwrap();
        assert_eq!(lease_in(&leases, &c).unwrap().uid, FIRST_UID);
        // Abandoned (its run directory is gone): taken over; a live one is not.
        std::fs::remove_dir(&b).unwrap();
        let d = tmp.path().join("d");
        std::fs::create_dir(&d).unwrap();
        let taken = lease_in(&leases, &d).unwrap();
        assert_eq!(taken.uid, FIRST_UID + 1);
        assert_eq!(
            std::fs::read(&taken.file).unwrap(),
            d.as_os_str().as_bytes()
        );
    }
}
