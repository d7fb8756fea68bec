//! A process as the kernel knows it, for VMMs hearth did not necessarily start: [`ProcessIdentity`]
//! (pid plus start time, so a recycled pid is never mistaken for the VMM) and [`ForeignProcess`]
//! (watched, waited for and killed through a pidfd). Touches only `/proc` and the process named.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// A process as the kernel knows it: pid plus start time (clock ticks since boot, `/proc/PID/stat`
/// field 22). Two processes never share both.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessIdentity {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessIdentity {
    /// The identity of the live (non-zombie) process `pid`; `None` if there is none.
    pub fn of(pid: u32) -> Option<ProcessIdentity> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // The command name may contain spaces and parentheses: fields start after the last ')'.
        let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
        if matches!(fields.first(), Some(&"Z") | Some(&"X") | None) {
            return None;
        }
        // fields[0] is field 3 (state), so field 22 (starttime) is fields[19].
        let start_time = fields.get(19)?.parse().ok()?;
        Some(ProcessIdentity { pid, start_time })
    }

    /// Whether this very process still runs (not exited, not a zombie, pid not recycled).
    pub fn is_alive(&self) -> bool {
        ProcessIdentity::of(self.pid) == Some(*self)
    }
}

/// A VMM watched through a pidfd: liveness and waiting by polling it, killing through it (so a
/// recycled pid is never signalled). It need not be our child; when it is, its real exit status is
/// reaped.
#[derive(Debug)]
pub struct ForeignProcess {
    pid: u32,
    pidfd: OwnedFd,
    /// Set once we sent SIGKILL, to report the exit as a kill.
    killed: bool,
}

impl ForeignProcess {
    /// Opens the process `identity` names; `None` if it is gone (exited, zombie, or pid recycled).
    pub fn open(identity: ProcessIdentity) -> Option<ForeignProcess> {
        let process = ForeignProcess::child(identity.pid)?;
        // Checked after opening: the pidfd now pins the process the check is about.
        identity.is_alive().then_some(process)
    }

    /// Opens our own child `pid`, even if it already exited (a zombie until reaped).
    pub(crate) fn child(pid: u32) -> Option<ForeignProcess> {
        Some(ForeignProcess {
            pid,
            pidfd: super::pidfd_open(pid)?,
            killed: false,
        })
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// SIGKILL through the pidfd, which cannot reach a process that merely reuses the pid.
    pub fn kill(&mut self) {
        self.killed = true;
        // SAFETY: pidfd_send_signal with a valid pidfd, a signal number, no siginfo and no flags.
        unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.pidfd.as_raw_fd(),
                libc::SIGKILL,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
    }

    /// Waits up to `timeout` (`None` = forever) for the process to exit; `None` while it runs. The
    /// real exit status is known only when the process is our child (we started it, or it was
    /// re-parented to us as a subreaper); otherwise it reads as SIGKILL after [`kill`] and as exit 0
    /// else.
    ///
    /// [`kill`]: ForeignProcess::kill
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
        let deadline = timeout.map(|t| Instant::now() + t);
        loop {
            let left = deadline.map(|d| d.saturating_duration_since(Instant::now()));
            let ms = match left {
                None => -1,
                Some(left) => left.as_millis().min(i32::MAX as u128) as i32,
            };
            let mut pfd = libc::pollfd {
                fd: self.pidfd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut pfd, 1, ms) };
            if ready < 0 {
                let err = io::Error::last_os_error();
                if err.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(err);
            }
            if ready > 0 {
                return Ok(Some(self.exit_status()));
            }
            if left.is_some_and(|l| l.is_zero()) || deadline.is_some_and(|d| Instant::now() >= d) {
                return Ok(None);
            }
        }
    }

    fn exit_status(&self) -> ExitStatus {
        let mut raw = 0;
        // SAFETY: waitpid with WNOHANG and a valid status pointer; fails harmlessly (ECHILD) when
        // the process is not our child.
        let reaped = unsafe { libc::waitpid(self.pid as i32, &mut raw, libc::WNOHANG) };
        if reaped == self.pid as i32 {
            return ExitStatus::from_raw(raw);
        }
        ExitStatus::from_raw(if self.killed { libc::SIGKILL } else { 0 })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::{Command, Stdio};

    fn sleeper() -> std::process::Child {
        Command::new("sh")
            .args(["-c", "read line"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    #[test]
    fn foreign_process_waits_and_kills() {
        let child = sleeper();
        let identity = ProcessIdentity::of(child.id()).unwrap();
        let mut foreign = ForeignProcess::open(identity).unwrap();
        assert_eq!(foreign.wait(Some(Duration::from_millis(50))).unwrap(), None);
        foreign.kill();
        let status = foreign.wait(Some(Duration::from_secs(5))).unwrap().unwrap();
        // Our child, so waitpid reaped it with its real status.
        assert_eq!(status.signal(), Some(libc::SIGKILL));
        assert!(!identity.is_alive());
        std::mem::forget(child); // already reaped above
    }

    #[test]
    fn identity_tells_a_live_process_from_a_recycled_pid() {
        let mut child = sleeper();
        let identity = ProcessIdentity::of(child.id()).unwrap();
        assert!(identity.is_alive());
        let recycled = ProcessIdentity {
            start_time: identity.start_time + 1,
            ..identity
        };
        assert!(!recycled.is_alive());
        assert!(ForeignProcess::open(recycled).is_none());
        child.kill().unwrap();
        child.wait().unwrap();
        assert!(!identity.is_alive());
        assert!(ProcessIdentity::of(u32::MAX - 1).is_none());
    }

    #[test]
    fn a_zombie_counts_as_dead() {
        let mut child = Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Wait for the exit without reaping: the process stays a zombie.
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| !s.rsplit_once(')').unwrap().1.trim_start().starts_with('Z'))
            && Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(ProcessIdentity::of(pid).is_none());
        child.wait().unwrap();
    }
}
