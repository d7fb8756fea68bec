//! The Firecracker process as hearth holds it: a child it spawned with `std::process`, or a pid it
//! waits for with `waitpid` (the guard process a jailed Firecracker runs under, `crate::guard`,
//! which exits with Firecracker's status). Touches only the given pid.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::process::wait_timeout;

const POLL: Duration = Duration::from_millis(5);

pub(super) enum VmmProcess {
    Child(Child),
    /// A child started without `std::process` (the guard; reaped with `waitpid`, signalled with
    /// `kill`).
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
