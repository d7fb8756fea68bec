//! Starting an exec-init: `clone(CLONE_NEWPID | CLONE_NEWNS | CLONE_PIDFD)` of the agent, and in the
//! child (which first joins the workload cgroup) only async-signal-safe calls (the agent is
//! multi-threaded) before re-executing the agent binary with [`crate::EXEC_INIT_ARG`]. The child
//! is PID 1 of a fresh PID namespace; killing it makes the kernel kill every process in that
//! namespace. Also waiting for and signalling it through its pidfd, which cannot hit a recycled
//! PID.

use std::ffi::{CStr, CString};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::Arc;

use tokio::io::unix::AsyncFd;

/// How an exec-init process ended, as `waitid` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProcessEnd {
    Exited(i32),
    Signaled(i32),
}

/// A pidfd shared between the exec's task (which waits on it) and the registry (which signals it).
#[derive(Debug, Clone)]
pub struct PidFd(Arc<OwnedFd>);

impl AsRawFd for PidFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl PidFd {
    /// Sends `signal` to the process. `ESRCH` once it has exited.
    pub fn send_signal(&self, signal: i32) -> io::Result<()> {
        // SAFETY: pidfd_send_signal with a valid pidfd and a null siginfo.
        let ret = unsafe {
            libc::syscall(
                libc::SYS_pidfd_send_signal,
                self.as_raw_fd(),
                signal,
                std::ptr::null::<libc::siginfo_t>(),
                0,
            )
        };
        if ret < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Reaps the process if it has exited.
    pub fn try_wait(&self) -> io::Result<Option<ProcessEnd>> {
        // SAFETY: waitid fills a zeroed siginfo_t owned by this frame.
        unsafe {
            let mut info: libc::siginfo_t = std::mem::zeroed();
            let ret = libc::waitid(
                libc::P_PIDFD,
                self.as_raw_fd() as libc::id_t,
                &mut info,
                libc::WEXITED | libc::WNOHANG,
            );
            if ret < 0 {
                return Err(io::Error::last_os_error());
            }
            if info.si_pid() == 0 {
                return Ok(None);
            }
            Ok(Some(match info.si_code {
                libc::CLD_EXITED => ProcessEnd::Exited(info.si_status()),
                _ => ProcessEnd::Signaled(info.si_status()),
            }))
        }
    }
}

/// A pidfd registered with the reactor once (it turns readable when the process exits).
pub struct ExitWatch(AsyncFd<PidFd>);

impl ExitWatch {
    pub fn new(pidfd: PidFd) -> io::Result<ExitWatch> {
        // SAFETY: the Arc inside PidFd keeps the pidfd open and unchanged for the AsyncFd's life.
        let readiness =
            unsafe { AsyncFd::register_with_interest(pidfd, tokio::io::Interest::READABLE)? };
        Ok(ExitWatch(readiness))
    }

    pub fn pidfd(&self) -> &PidFd {
        self.0.get_ref()
    }

    /// Waits until the process exits and reaps it.
    pub async fn wait(&self) -> io::Result<ProcessEnd> {
        loop {
            if let Some(end) = self.pidfd().try_wait()? {
                return Ok(end);
            }
            self.0.readable().await?.clear_ready();
        }
    }
}

/// The fds an exec-init starts with: 0, 1 and 2 for the command, 3 for the control socket.
pub struct ChildFds<'a> {
    pub stdin: BorrowedFd<'a>,
    pub stdout: BorrowedFd<'a>,
    pub stderr: BorrowedFd<'a>,
    pub control: BorrowedFd<'a>,
}

/// Clones the calling process into a new PID and mount namespace and executes `program` with
/// [`crate::EXEC_INIT_ARG`] there. Returns the child's PID (in the caller's namespace) and pidfd.
pub fn spawn_exec_init(program: &Path, fds: ChildFds<'_>) -> io::Result<(i32, PidFd)> {
    // Everything the child needs is allocated here: after clone only raw syscalls are allowed.
    let program = CString::new(program.as_os_str().as_bytes()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "exec-init program path contains NUL",
        )
    })?;
    let hidden_arg = CString::new(crate::EXEC_INIT_ARG).expect("constant has no NUL");
    let argv = [program.as_ptr(), hidden_arg.as_ptr(), std::ptr::null()];
    let envp = [std::ptr::null::<libc::c_char>()];
    let raw_fds = [fds.stdin, fds.stdout, fds.stderr, fds.control].map(|fd| fd.as_fd().as_raw_fd());
    let cgroup = crate::workload_cgroup::procs_fd();
    let mut pidfd: libc::c_int = -1;
    let flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS | libc::CLONE_PIDFD | libc::SIGCHLD;
    // The child starts with every signal blocked and keeps them blocked through execve, until the
    // exec-init forwards them: as the init of its PID namespace, it would otherwise drop every
    // signal it has no handler for, and a signal the host sent right after the start (a SIGTERM
    // of an exec whose Started frame just arrived) was lost.
    // SAFETY: plain calls on sigsets owned by this frame (zeroed is a valid sigset_t); the old
    // mask is restored below.
    let old = unsafe {
        let mut all: libc::sigset_t = std::mem::zeroed();
        let mut old: libc::sigset_t = std::mem::zeroed();
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
        old
    };
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork: the child gets a copy
    // of this address space and runs only `child_exec`, which uses async-signal-safe calls.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0 as libc::c_ulong,
            &mut pidfd as *mut libc::c_int,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if ret == 0 {
        // SAFETY: in the cloned child; never returns.
        unsafe { child_exec(raw_fds, cgroup, &program, argv.as_ptr(), envp.as_ptr()) }
    }
    let error = io::Error::last_os_error();
    // SAFETY: restores this thread's mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    if ret < 0 {
        return Err(error);
    }
    // SAFETY: CLONE_PIDFD stored a new pidfd (close-on-exec) for us to own.
    let pidfd = unsafe { OwnedFd::from_raw_fd(pidfd) };
    Ok((ret as i32, PidFd(Arc::new(pidfd))))
}

/// Runs in the cloned child: joins the workload cgroup (`cgroup`: its `cgroup.procs`, when the
/// guest has one; see [`crate::workload_cgroup`]), moves the four fds to 0..=3, asks for SIGKILL if
/// the agent dies, and executes the exec-init with every signal still blocked (it unblocks them
/// for the command only; see `spawn_exec_init`).
unsafe fn child_exec(
    fds: [RawFd; 4],
    cgroup: Option<RawFd>,
    program: &CStr,
    argv: *const *const libc::c_char,
    envp: *const *const libc::c_char,
) -> ! {
    if let Some(procs) = cgroup {
        // "0": this process. Refused, the exec fails rather than run outside the bound.
        if libc::write(procs, b"0".as_ptr().cast(), 1) != 1 {
            child_fail(b"hearth-agent: exec-init: cannot join the workload cgroup\n");
        }
    }
    // Park the fds above the targets first so that moving one cannot clobber another.
    let mut parked = [0; 4];
    for (i, fd) in fds.iter().enumerate() {
        parked[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 64);
        if parked[i] < 0 {
            child_fail(b"hearth-agent: exec-init: cannot duplicate fds\n");
        }
    }
    for (target, fd) in parked.iter().enumerate() {
        if libc::dup2(*fd, target as RawFd) < 0 {
            child_fail(b"hearth-agent: exec-init: cannot set up fds\n");
        }
    }
    libc::prctl(
        libc::PR_SET_PDEATHSIG,
        libc::SIGKILL as libc::c_ulong,
        0,
        0,
        0,
    );
    libc::execve(program.as_ptr(), argv, envp);
    child_fail(b"hearth-agent: exec-init: cannot execute the agent binary\n")
}

unsafe fn child_fail(message: &[u8]) -> ! {
    libc::write(2, message.as_ptr().cast(), message.len());
    libc::_exit(126)
}
