//! Spawning VMM processes so that they die with hearth (or, detached, outlive it), and waiting for
//! them with a timeout.
//!
//! A VMM starts with an empty environment: it needs none, and hearth's may hold what a guest that
//! took over its VMM must not read (credentials, tokens, the paths of hearth's own files).
//!
//! Every VMM child gets `PR_SET_PDEATHSIG = SIGKILL`: if hearth dies (even by `kill -9`) the kernel
//! kills the VMM. The signal fires when the *thread* that forked the child exits, not the process, so
//! children are forked by one dedicated spawner thread that lives as long as the process (it blocks
//! forever on its request channel, whose sender is a static). Callers on short-lived threads (tokio
//! blocking pool, test threads) are therefore safe. Children also get their own process group, so a
//! terminal's Ctrl-C reaches hearth only and hearth decides how to tear the VM down. A detached VMM
//! (the node daemon's) gets its own session instead and no parent-death signal.
//!
//! `guard.rs`: the guard process a jailed VMM runs under; `foreign.rs`: watching a process that is
//! not (necessarily) our child, by identity and pidfd; `enter.rs`: the cgroups and network
//! namespace a confined VMM enters before exec.

mod enter;
mod foreign;
mod guard;

pub(crate) use enter::Enter;
pub use foreign::{ForeignProcess, ProcessIdentity};

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// What to run; built into a `Command` on the spawner thread.
pub(crate) struct SpawnRequest {
    pub program: PathBuf,
    pub args: Vec<String>,
    /// Receives stderr, and stdout unless `stdout` is set.
    pub log: File,
    /// Receives stdout when set (Firecracker writes the guest's serial console there).
    pub stdout: Option<File>,
    /// Own session, no parent-death signal: the VMM outlives hearth (see `VmSpec::detached`).
    pub detached: bool,
}

enum Job {
    Plain(SpawnRequest, Enter, mpsc::SyncSender<io::Result<Child>>),
    /// Under a guard process (`crate::process::guard`); answers the guard's pid.
    Guarded(SpawnRequest, Enter, mpsc::SyncSender<io::Result<u32>>),
}

static SPAWNER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();

/// Spawns the VMM from the long-lived spawner thread, with PDEATHSIG and its own process group, the
/// child first entering what `enter` holds (its cgroups, a network namespace).
pub(crate) fn spawn_vmm_in(request: SpawnRequest, enter: Enter) -> io::Result<Child> {
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    submit(Job::Plain(request, enter, reply_tx))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("VMM spawner thread is gone"))?
}

/// Spawns a VMM that changes its own credentials (the jailer) under a guard process that keeps the
/// parent-death tie (see `crate::process::guard`). Returns the guard's pid: a child of this process, reaped
/// with `waitpid`; killing it kills the VMM.
pub(crate) fn spawn_guarded_vmm(request: SpawnRequest) -> io::Result<u32> {
    spawn_guarded_vmm_in(request, Enter::default())
}

/// [`spawn_guarded_vmm`], the guard (and so the VMM) first entering what `enter` holds.
pub(crate) fn spawn_guarded_vmm_in(request: SpawnRequest, enter: Enter) -> io::Result<u32> {
    let (reply_tx, reply_rx) = mpsc::sync_channel(1);
    submit(Job::Guarded(request, enter, reply_tx))?;
    reply_rx
        .recv()
        .map_err(|_| io::Error::other("VMM spawner thread is gone"))?
}

fn submit(job: Job) -> io::Result<()> {
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("hearth-vmm-spawner".into())
            .spawn(move || {
                for job in rx {
                    match job {
                        Job::Plain(request, enter, reply) => {
                            drop(reply.send(spawn_here(request, enter)))
                        }
                        Job::Guarded(request, enter, reply) => {
                            drop(reply.send(guard::spawn_guarded(&request, &enter)))
                        }
                    }
                }
            })
            .expect("spawning the VMM spawner thread");
        tx
    });
    spawner
        .send(job)
        .map_err(|_| io::Error::other("VMM spawner thread is gone"))
}

fn spawn_here(request: SpawnRequest, enter: Enter) -> io::Result<Child> {
    let parent = std::process::id();
    let stdout = match request.stdout {
        Some(file) => file,
        None => request.log.try_clone()?,
    };
    let mut command = Command::new(&request.program);
    command
        .args(&request.args)
        .env_clear()
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(request.log);
    // SAFETY: `Enter::apply` calls only write and setns on descriptors opened beforehand.
    unsafe {
        command.pre_exec(move || enter.apply());
    }
    if request.detached {
        // SAFETY: setsid is async-signal-safe and allocates nothing.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        return command.spawn();
    }
    command.process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only async-signal-safe functions
    // (prctl, getppid) without allocating.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong) != 0 {
                return Err(io::Error::last_os_error());
            }
            // If hearth died between fork and prctl, the signal was never armed: give up instead.
            if libc::getppid() as u32 != parent {
                return Err(io::Error::from_raw_os_error(libc::ESRCH));
            }
            Ok(())
        });
    }
    command.spawn()
}

/// Waits up to `timeout` for `child` to exit; `None` if it is still running. Sleeps on a pidfd, so
/// an exit is seen at once rather than at the next poll tick.
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<Option<ExitStatus>> {
    let deadline = Instant::now() + timeout;
    let pidfd = pidfd_open(child.id());
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(Some(status));
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(None);
        }
        match &pidfd {
            Some(fd) => {
                let mut pfd = libc::pollfd {
                    fd: fd.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                };
                let ms = left.as_millis().clamp(1, i32::MAX as u128) as i32;
                // SAFETY: one valid pollfd for the duration of the call.
                unsafe { libc::poll(&mut pfd, 1, ms) };
            }
            None => std::thread::sleep(left.min(Duration::from_millis(5))),
        }
    }
}

/// A pidfd for `pid` (which may be a zombie), or `None` if there is no such process.
pub(crate) fn pidfd_open(pid: u32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    // SAFETY: a non-negative return is a fresh fd that we own.
    (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) })
}
