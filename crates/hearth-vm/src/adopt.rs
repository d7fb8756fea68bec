//! Detached VMs and taking them over again. A detached VMM (see [`crate::VmSpec::detached`]) outlives
//! the process that started it; its run directory then holds a [`DetachedRecord`] (`vmm.json`) naming
//! the backend, the VMM's pid and the pid's start time, and the sockets and logs a new owner needs.
//! [`adopt`] turns such a run directory back into a [`RunningVm`]; [`ForeignProcess`] watches and
//! kills a VMM that is not our child: liveness by pidfd, identity by pid plus start time (so a
//! recycled pid is never mistaken for the VMM), waiting by polling the pidfd.
//!
//! Touches only the run directory and the process it names.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::vmm::{AgentEndpoint, RunningVm, VmError};

/// The record's file name inside the run directory.
pub const DETACHED_RECORD: &str = "vmm.json";

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

/// What a detached VM's run directory says about it (`vmm.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DetachedRecord {
    /// [`crate::Vmm::name`] of the backend: "qemu" or "firecracker".
    pub vmm: String,
    pub process: ProcessIdentity,
    /// QMP socket (QEMU) or API socket (Firecracker).
    pub control_socket: PathBuf,
    pub agent_socket: PathBuf,
    /// The hybrid vsock port for Firecracker; `None` when the socket is the agent's stream.
    pub vsock_port: Option<u32>,
    pub console_log: PathBuf,
    /// Firecracker's log file.
    pub log: Option<PathBuf>,
    /// A jailed VM's cgroup, removed after exit.
    pub cgroup: Option<PathBuf>,
}

impl DetachedRecord {
    pub fn agent_endpoint(&self) -> AgentEndpoint {
        match self.vsock_port {
            Some(port) => AgentEndpoint::HybridVsock {
                socket: self.agent_socket.clone(),
                port,
            },
            None => AgentEndpoint::Stream(self.agent_socket.clone()),
        }
    }

    /// Writes the record into `run_dir` atomically.
    pub fn write(&self, run_dir: &Path) -> Result<(), VmError> {
        let path = run_dir.join(DETACHED_RECORD);
        let json = serde_json::to_vec_pretty(self).expect("record serializes");
        crate::write_atomic(&path, &json).map_err(|source| VmError::Io {
            what: "writing",
            path,
            source,
        })
    }

    /// Reads the record of `run_dir`.
    pub fn read(run_dir: &Path) -> Result<DetachedRecord, VmError> {
        let path = run_dir.join(DETACHED_RECORD);
        let bytes = std::fs::read(&path).map_err(|source| VmError::Io {
            what: "reading",
            path: path.clone(),
            source,
        })?;
        serde_json::from_slice(&bytes).map_err(|e| VmError::Io {
            what: "parsing",
            path,
            source: io::Error::new(io::ErrorKind::InvalidData, e),
        })
    }
}

/// Takes over the detached VM whose run directory is `run_dir`: checks that its VMM still runs (same
/// pid, same start time) and returns a handle that controls it like one we started. Fails with
/// [`VmError::Gone`] when the VMM has exited or its pid belongs to another process now.
pub fn adopt(run_dir: &Path) -> Result<Box<dyn RunningVm>, VmError> {
    let record = DetachedRecord::read(run_dir)?;
    match record.vmm.as_str() {
        "qemu" => Ok(Box::new(crate::qemu::RunningQemu::adopt(run_dir, record)?)),
        "firecracker" => Ok(Box::new(crate::firecracker::RunningFirecracker::adopt(
            run_dir, record,
        )?)),
        other => Err(VmError::Unsupported(format!(
            "{}: unknown VMM {other:?}",
            run_dir.join(DETACHED_RECORD).display()
        ))),
    }
}

/// A VMM that is not (necessarily) our child: watched through a pidfd.
#[derive(Debug)]
pub struct ForeignProcess {
    identity: ProcessIdentity,
    pidfd: OwnedFd,
    /// Set once we sent SIGKILL, to report the exit as a kill.
    killed: bool,
}

impl ForeignProcess {
    /// Opens the process `identity` names; `None` if it is gone (exited, zombie, or pid recycled).
    pub fn open(identity: ProcessIdentity) -> Option<ForeignProcess> {
        let pidfd = pidfd_open(identity.pid)?;
        // Checked after opening: the pidfd now pins the process the check is about.
        identity.is_alive().then_some(ForeignProcess {
            identity,
            pidfd,
            killed: false,
        })
    }

    pub fn identity(&self) -> ProcessIdentity {
        self.identity
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
    /// real exit status is known only when the process happens to be our child (we started it, or
    /// it was re-parented to us as a subreaper); otherwise it reads as SIGKILL after [`kill`] and as
    /// exit 0 else.
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
        let reaped = unsafe { libc::waitpid(self.identity.pid as i32, &mut raw, libc::WNOHANG) };
        if reaped == self.identity.pid as i32 {
            return ExitStatus::from_raw(raw);
        }
        ExitStatus::from_raw(if self.killed { libc::SIGKILL } else { 0 })
    }
}

/// The VMM process as a backend holds it: a child it spawned, or an adopted foreign process.
pub(crate) enum VmmProcess {
    Child(std::process::Child),
    Foreign(ForeignProcess),
}

impl VmmProcess {
    /// Waits up to `timeout` (`None` = forever); `Ok(None)` while it still runs.
    pub fn wait(&mut self, timeout: Option<Duration>) -> io::Result<Option<ExitStatus>> {
        match (self, timeout) {
            (VmmProcess::Child(child), Some(timeout)) => {
                crate::process::wait_timeout(child, timeout)
            }
            (VmmProcess::Child(child), None) => child.wait().map(Some),
            (VmmProcess::Foreign(process), timeout) => process.wait(timeout),
        }
    }

    /// SIGKILL; a failure means it already exited, and waiting reaps it either way.
    pub fn kill(&mut self) {
        match self {
            VmmProcess::Child(child) => drop(child.kill()),
            VmmProcess::Foreign(process) => process.kill(),
        }
    }
}

pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a fresh fd that we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
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

    #[test]
    fn records_round_trip_through_the_run_dir() {
        let dir = tempfile::tempdir().unwrap();
        let record = DetachedRecord {
            vmm: "qemu".into(),
            process: ProcessIdentity {
                pid: 7,
                start_time: 9,
            },
            control_socket: dir.path().join("qmp.sock"),
            agent_socket: dir.path().join("agent.sock"),
            vsock_port: None,
            console_log: dir.path().join("console.log"),
            log: None,
            cgroup: None,
        };
        record.write(dir.path()).unwrap();
        assert_eq!(DetachedRecord::read(dir.path()).unwrap(), record);
        assert_eq!(
            record.agent_endpoint(),
            AgentEndpoint::Stream(dir.path().join("agent.sock"))
        );
        assert!(matches!(adopt(dir.path()), Err(VmError::Gone { .. })));
    }
}
