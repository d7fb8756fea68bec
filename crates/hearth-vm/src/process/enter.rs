//! What a confined VMM enters between fork and exec, before it runs a single instruction of its
//! own: its cgroups (by writing `0`, "this process", to each `cgroup.procs`) and the network
//! namespace its tap lives in (`setns(CLONE_NEWNET)`). Everything is opened by hearth beforehand;
//! the child only calls `write` and `setns`, which are async-signal-safe and allocate nothing.

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
        Ok(())
    }
}
