//! The Firecracker process as hearth holds it: a child it spawned, or, under `jailer --new-pid-ns`,
//! the Firecracker the jailer forked before exiting. For the latter hearth marks itself a child
//! subreaper, so the orphan is re-parented to hearth, which can then reap it and read its real exit
//! status. Touches only the given pid.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::process::wait_timeout;

const POLL: Duration = Duration::from_millis(5);

pub(super) enum VmmProcess {
    Child(Child),
    /// A re-parented grandchild (reaped with `waitpid`, signalled with `kill`).
    Adopted(u32),
}

impl VmmProcess {
    /// Waits for the exit (`None` = forever); `Ok(None)` if it still runs at the deadline.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
        match (self, timeout) {
            (VmmProcess::Child(child), Some(timeout)) => wait_timeout(child, timeout),
            (VmmProcess::Child(child), None) => child.wait().map(Some),
            (VmmProcess::Adopted(pid), timeout) => {
                let deadline = timeout.map(|t| Instant::now() + t);
                loop {
                    let mut raw = 0;
                    // SAFETY: waitpid on a pid re-parented to us, with a valid status pointer.
                    let reaped = unsafe { libc::waitpid(*pid as i32, &mut raw, libc::WNOHANG) };
                    if reaped == *pid as i32 {
                        return Ok(Some(ExitStatus::from_raw(raw)));
                    }
                    if reaped < 0 {
                        return Err(io::Error::last_os_error());
                    }
                    if deadline.is_some_and(|d| Instant::now() >= d) {
                        return Ok(None);
                    }
                    std::thread::sleep(POLL);
                }
            }
        }
    }

    /// SIGKILL. A failure means it already exited; waiting reaps it either way.
    pub fn kill(&mut self) {
        match self {
            VmmProcess::Child(child) => drop(child.kill()),
            // SAFETY: kill(2) with a pid and a signal number.
            VmmProcess::Adopted(pid) => drop(unsafe { libc::kill(*pid as i32, libc::SIGKILL) }),
        }
    }
}

/// Makes orphaned descendants (the Firecracker a `--new-pid-ns` jailer forks) re-parent to hearth.
/// Process-wide and idempotent; hearth reaps every child it starts, so nothing else changes.
pub(super) fn become_subreaper() -> io::Result<()> {
    // SAFETY: prctl with integer arguments; affects only this process's re-parenting.
    if unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
