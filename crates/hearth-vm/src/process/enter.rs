//! What a VMM enters between fork and exec, before it runs a single instruction of its own: its
//! cgroups (by writing `0`, "this process", to each `cgroup.procs`), the network namespace its tap
//! lives in (`setns(CLONE_NEWNET)`) and, for an emulating QEMU, no transparent huge pages
//! (`prctl(PR_SET_THP_DISABLE)`, kept across exec). Everything is opened by hearth beforehand; the
//! child only calls `write`, `setns` and `prctl`, which are async-signal-safe and allocate nothing.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

#[derive(Debug, Default)]
pub(crate) struct Enter {
    /// `cgroup.procs` of each cgroup the VMM joins.
    pub cgroup_procs: Vec<File>,
    /// The network namespace file (e.g. a bind-mounted `/proc/PID/ns/net`).
    pub netns: Option<File>,
    /// No transparent huge pages for this process. QEMU asks for them (`MADV_HUGEPAGE`) on its
    /// TCG translation cache, which then grows 2 MiB per region touched: measured on an idle
    /// restored guest, 24 MiB resident for 23 MiB of code and 3 MiB more elsewhere, and its first
    /// exec was no faster with them (bench/README, density). Under KVM guest memory keeps them.
    pub no_huge_pages: bool,
}

impl Enter {
    /// Opens the network namespace at `path` for the VMM to enter.
    pub fn netns(path: &Path) -> io::Result<File> {
        File::open(path)
    }

    /// Runs in the forked child: joins the cgroups, then the network namespace.
    pub fn apply(&self) -> io::Result<()> {
        for procs in &self.cgroup_procs {
            // SAFETY: write of a static buffer to a descriptor this process holds.
            let written = unsafe { libc::write(procs.as_raw_fd(), b"0".as_ptr().cast(), 1) };
            if written != 1 {
                return Err(io::Error::last_os_error());
            }
        }
        if let Some(netns) = &self.netns {
            // SAFETY: setns on a descriptor this process holds.
            if unsafe { libc::setns(netns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: prctl with integer arguments only.
        if self.no_huge_pages && unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}
