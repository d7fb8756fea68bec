//! The exec-init: the agent binary re-executed (hidden argument [`crate::EXEC_INIT_ARG`]) as PID 1
//! of a fresh PID and mount namespace, one per exec. It reads its [`ExecInitConfig`] from fd 3,
//! mounts /proc for its namespace and makes the workload root its `/` ([`root`]), resolves the
//! user, starts the command (stdin/stdout/stderr are its own fds 0-2) with docker's default
//! capabilities and `no_new_privs` ([`caps`]), forwards every signal it receives to the command, reaps every process of the namespace, and when the command exits writes the command's
//! [`ExitStatus`] to fd 3 and exits. Its exit kills whatever else still runs in the namespace.
//!
//! The workload cannot see the agent (it lives in the parent PID namespace) and cannot signal it.
//! Single-threaded: runs before any async runtime exists.

pub mod caps;
mod lookup;
mod root;
mod user;

use std::io::{Read, Write};
use std::os::fd::FromRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};

use hearth_proto::{ExecRequest, ExitStatus};
use nix::sys::signal::{SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};

pub use lookup::{build_env, find_program, DEFAULT_PATH};
pub use user::{resolve as resolve_user, ResolvedUser, UserError};

/// What the agent sends an exec-init on fd 3.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecInitConfig {
    /// The workload root to enter.
    pub root: PathBuf,
    pub request: ExecRequest,
}

/// Why the command could not be started; each maps to docker's exit code.
#[derive(Debug, thiserror::Error)]
enum StartError {
    /// Exit 127: the program does not exist.
    #[error("{0}")]
    NotFound(String),
    /// Exit 126: anything else that keeps the command from running.
    #[error("{0}")]
    CannotRun(String),
}

impl StartError {
    fn exit_code(&self) -> i32 {
        match self {
            StartError::NotFound(_) => 127,
            StartError::CannotRun(_) => 126,
        }
    }
}

const CONTROL_FD: i32 = 3;

/// Entry point of the exec-init process.
pub fn main() -> ! {
    // Every signal is blocked (the agent started us so, see `exec::spawn`; blocked again here for
    // a start by other means): they queue up and are forwarded to the command once it exists.
    let all = SigSet::all();
    let _ = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&all), None);
    // SAFETY: the agent placed the control socket at fd 3 for this process to own.
    let mut control = unsafe { UnixStream::from_raw_fd(CONTROL_FD) };
    // Keep the command from inheriting it.
    let _ = nix::fcntl::fcntl(
        CONTROL_FD,
        nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
    );
    let status = match start(&mut control) {
        Ok(child) => supervise(child),
        Err(e) => {
            eprintln!("hearth: {e}");
            ExitStatus::exited(e.exit_code())
        }
    };
    let mut report = serde_json::to_vec(&status).expect("status serializes");
    report.push(b'\n');
    let _ = control.write_all(&report);
    std::process::exit(status.code.or(status.signal.map(|s| 128 + s)).unwrap_or(1))
}

fn start(control: &mut UnixStream) -> Result<Pid, StartError> {
    let setup = |what: &str, e: &dyn std::fmt::Display| {
        StartError::CannotRun(format!("exec setup: {what}: {e}"))
    };
    let mut raw = Vec::new();
    control
        .read_to_end(&mut raw)
        .map_err(|e| setup("reading config from the agent", &e))?;
    let config: ExecInitConfig =
        serde_json::from_slice(&raw).map_err(|e| setup("parsing config from the agent", &e))?;
    let request = &config.request;

    root::enter(&config.root).map_err(|e| setup("entering the workload root", &e))?;

    let passwd = std::fs::read_to_string("/etc/passwd").ok();
    let group = std::fs::read_to_string("/etc/group").ok();
    let user = user::resolve(request.user.as_deref(), passwd.as_deref(), group.as_deref())
        .map_err(|e| StartError::CannotRun(e.to_string()))?;
    let env = lookup::build_env(&request.env, &user.home).map_err(StartError::CannotRun)?;
    let cwd = request
        .cwd
        .as_deref()
        .filter(|c| !c.is_empty())
        .unwrap_or("/");
    // docker creates a missing working directory.
    std::fs::create_dir_all(cwd)
        .map_err(|e| setup(&format!("creating working directory {cwd}"), &e))?;

    let argv0 = &request.argv[0];
    let path_var = env
        .iter()
        .find(|(k, _)| k == "PATH")
        .map(|(_, v)| v.as_str())
        .unwrap_or(DEFAULT_PATH);
    let program = lookup::find_program(argv0, path_var).ok_or_else(|| {
        StartError::NotFound(format!(
            "exec: {argv0:?}: executable file not found in $PATH"
        ))
    })?;
    let mut command = std::process::Command::new(&program);
    command
        .arg0(argv0)
        .args(&request.argv[1..])
        .env_clear()
        .envs(env)
        .current_dir(cwd);
    let ResolvedUser {
        uid, gid, groups, ..
    } = user;
    let tty = request.tty.is_some();
    // SAFETY: the closure runs in the forked child before exec and only makes raw syscalls.
    unsafe {
        command.pre_exec(move || prepare_child(uid, gid, &groups, tty));
    }
    let child = command
        .spawn()
        .map_err(|e| start_error(argv0, &program, &e))?;
    Ok(Pid::from_raw(child.id() as i32))
}

fn start_error(argv0: &str, program: &Path, error: &std::io::Error) -> StartError {
    let name = program.display();
    match error.raw_os_error() {
        Some(libc::ENOENT) => StartError::NotFound(format!(
            "exec: {argv0:?}: stat {name}: no such file or directory"
        )),
        Some(libc::EACCES) => {
            StartError::CannotRun(format!("exec: {argv0:?}: {name}: permission denied"))
        }
        Some(libc::ENOEXEC) => {
            StartError::CannotRun(format!("exec: {argv0:?}: {name}: exec format error"))
        }
        _ => StartError::CannotRun(format!("exec: {argv0:?}: {name}: {error}")),
    }
}

/// In the command's process between fork and exec: own session (with a `tty`, its stdin, the
/// terminal the agent opened, becomes the session's controlling terminal, so that ^C typed there
/// reaches the foreground job as SIGINT from the line discipline, and is given to the user),
/// default signal handling,
/// docker's default capabilities ([`caps`]), then the user's identity (groups and gid before uid,
/// while still privileged), and last `no_new_privs`.
fn prepare_child(uid: u32, gid: u32, groups: &[u32], tty: bool) -> std::io::Result<()> {
    let check = |ret: libc::c_int| {
        if ret < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(())
        }
    };
    // SAFETY: plain syscalls on values owned by this frame.
    unsafe {
        libc::setsid();
        if tty {
            check(libc::ioctl(0, libc::TIOCSCTTY, 0))?;
            // The user owns its terminal, as after a login (the group stays devpts' `tty`).
            check(libc::fchown(0, uid, libc::gid_t::MAX))?;
        }
        for signal in 1..libc::SIGRTMIN() {
            libc::signal(signal, libc::SIG_DFL);
        }
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        check(libc::sigprocmask(
            libc::SIG_SETMASK,
            &empty,
            std::ptr::null_mut(),
        ))?;
        caps::restrict_to_default()?;
        check(libc::setgroups(groups.len(), groups.as_ptr()))?;
        check(libc::setgid(gid))?;
        check(libc::setuid(uid))?;
    }
    caps::set_no_new_privs()
}

/// Forwards signals to the command and reaps every process until the command exits.
fn supervise(command: Pid) -> ExitStatus {
    let all = SigSet::all();
    loop {
        let Ok(signal) = all.wait() else { continue };
        if signal != Signal::SIGCHLD {
            let _ = nix::sys::signal::kill(command, signal);
            continue;
        }
        // Orphans of the namespace are reparented to us: reap them all, watch for the command.
        loop {
            match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) if pid == command => {
                    return ExitStatus::exited(code)
                }
                Ok(WaitStatus::Signaled(pid, signal, _)) if pid == command => {
                    return ExitStatus::signaled(signal as i32)
                }
                Ok(WaitStatus::StillAlive) | Err(_) => break,
                Ok(_) => continue,
            }
        }
    }
}
