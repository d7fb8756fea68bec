//! A guard process for VMMs that drop privileges on their own (Firecracker's jailer, QEMU's
//! `-runas`).
//!
//! The parent-death signal that ties a VMM to hearth (see `crate::process`) is cleared by the
//! kernel when a process changes its credentials, which is the jailer's job. So a jailed VMM is
//! started under a guard: a fork of hearth that is PID 1 of a new PID namespace, keeps hearth's
//! parent-death signal (it never changes credentials and never executes anything), forks the jailer
//! into that namespace and waits for it. When hearth dies the guard is killed, and when a PID
//! namespace's first process dies the kernel kills every process in it: the jailed Firecracker goes
//! within the same second, whatever its uid. Killing the guard is how hearth kills the VM, and the
//! guard exits with the jailer's (Firecracker's) exit status. What the VMM must enter (its
//! cgroups, a network namespace: [`Enter`]) the guard enters before it forks the VMM, so the VMM
//! inherits it.
//!
//! After `clone` only async-signal-safe system calls run (hearth is multi-threaded): everything the
//! guard and the jailer need is allocated before, and the guard forks the VMM with the raw system
//! call (glibc's `fork` would take locks other threads may have held at the `clone`).

use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;

use super::{Enter, SpawnRequest};

/// Starts `request` under a guard that first enters `enter`; returns the guard's pid (a child of
/// the calling thread, to be waited for with `waitpid`). Call it from the spawner thread, like
/// every VMM spawn.
pub(crate) fn spawn_guarded(request: &SpawnRequest, enter: &Enter) -> io::Result<u32> {
    let nul = |what: &str| io::Error::new(io::ErrorKind::InvalidInput, format!("{what} has a NUL"));
    let program =
        CString::new(request.program.as_os_str().as_bytes()).map_err(|_| nul("the VMM path"))?;
    let args = std::iter::once(Ok(program.clone()))
        .chain(
            request
                .args
                .iter()
                .map(|a| CString::new(a.as_bytes()).map_err(|_| nul("a VMM argument"))),
        )
        .collect::<io::Result<Vec<CString>>>()?;
    // Like every VMM (see `crate::process`), with an empty environment.
    let argv = pointers(&args);
    let envp = pointers(&[]);
    let devnull = std::fs::File::open("/dev/null")?;
    let stdout = request.stdout.as_ref().unwrap_or(&request.log);
    let fds = [
        devnull.as_raw_fd(),
        stdout.as_raw_fd(),
        request.log.as_raw_fd(),
    ];
    // `alive`: the guard sees hangup on it if hearth died before the parent-death signal was armed.
    // `armed`: the guard says it checked, so hearth may close its end of `alive`.
    let (alive_read, alive_write) = pipe()?;
    let (armed_read, armed_write) = pipe()?;
    let raw = |fd: &OwnedFd| fd.as_raw_fd();
    let pipes = [
        raw(&alive_read),
        raw(&alive_write),
        raw(&armed_read),
        raw(&armed_write),
    ];
    let flags = libc::CLONE_NEWPID | libc::SIGCHLD;
    // SAFETY: clone without CLONE_VM and with a null stack behaves like fork; the child runs only
    // `guard`, which makes async-signal-safe system calls on memory prepared above.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            flags as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
            0 as libc::c_ulong,
        )
    };
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    if pid == 0 {
        // SAFETY: in the cloned child; never returns.
        unsafe { guard(request.detached, enter, pipes, fds, &program, &argv, &envp) }
    }
    drop(alive_read);
    drop(armed_write);
    // Wait for the guard's "armed" byte (or its exit) before letting go of `alive`.
    let mut byte = 0u8;
    // SAFETY: read into a one-byte buffer owned by this frame.
    let n = unsafe { libc::read(raw(&armed_read), (&mut byte as *mut u8).cast(), 1) };
    if n == 1 {
        // Then for end-of-file: the guard has closed its end too and holds no fd but its stdio.
        // SAFETY: as above.
        while unsafe { libc::read(raw(&armed_read), (&mut byte as *mut u8).cast(), 1) } > 0 {}
    }
    drop(alive_write);
    if n != 1 {
        let mut status = 0;
        // SAFETY: reaping our own child with a valid status pointer.
        unsafe { libc::waitpid(pid as libc::pid_t, &mut status, 0) };
        return Err(io::Error::other(
            "the VMM guard process exited during start-up (is CAP_SYS_ADMIN available for a new \
             PID namespace?)",
        ));
    }
    Ok(pid as u32)
}

/// Closes every fd from 3 up except `keep`. Async-signal-safe.
unsafe fn close_from_3_except(keep: RawFd) {
    let close_range = |first: RawFd, last: RawFd| {
        if first <= last
            && libc::syscall(libc::SYS_close_range, first as u32, last as u32, 0u32) != 0
        {
            for fd in first..=last.min(4095) {
                libc::close(fd);
            }
        }
    };
    close_range(3, keep - 1);
    close_range(keep + 1, RawFd::MAX);
}

fn pointers(strings: &[CString]) -> Vec<*const libc::c_char> {
    strings
        .iter()
        .map(|s| s.as_ptr())
        .chain(std::iter::once(std::ptr::null()))
        .collect()
}

fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two fds on success.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both fds are fresh and ours.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// The guard: PID 1 of the new namespace. Arms the parent-death signal (unless detached), forks the
/// VMM and reaps everything until the VMM exits, then exits with the VMM's status.
unsafe fn guard(
    detached: bool,
    enter: &Enter,
    [alive_read, alive_write, armed_read, armed_write]: [RawFd; 4],
    fds: [RawFd; 3],
    program: &CString,
    argv: &[*const libc::c_char],
    envp: &[*const libc::c_char],
) -> ! {
    libc::close(alive_write);
    libc::close(armed_read);
    if detached {
        libc::setsid();
    } else {
        libc::setpgid(0, 0);
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            libc::_exit(126);
        }
        let mut poll = libc::pollfd {
            fd: alive_read,
            events: 0,
            revents: 0,
        };
        // Hangup on `alive` now means hearth died before the signal was armed.
        if libc::poll(&mut poll, 1, 0) != 0 {
            libc::_exit(126);
        }
    }
    libc::close(alive_read);
    if enter.apply().is_err() {
        let message = b"hearth: VMM guard: cannot enter the VMM's cgroups or network namespace\n";
        libc::write(fds[2], message.as_ptr().cast(), message.len());
        libc::_exit(126);
    }
    // The guard lives as long as the VM: it must not hold hearth's other fds (listening sockets,
    // a caller's pipes). Its own 0-2 become the VMM's, everything else goes — before the "armed"
    // byte, so that once the caller hears it the guard holds nothing else.
    let mut parked = [0; 3];
    for (i, fd) in fds.iter().enumerate() {
        parked[i] = libc::fcntl(*fd, libc::F_DUPFD_CLOEXEC, 10);
        if parked[i] < 0 {
            libc::_exit(126);
        }
    }
    for (target, fd) in parked.iter().enumerate() {
        if libc::dup2(*fd, target as RawFd) < 0 {
            libc::_exit(126);
        }
    }
    close_from_3_except(armed_write);
    libc::write(armed_write, b"1".as_ptr().cast(), 1);
    libc::close(armed_write);
    let mut empty: libc::sigset_t = std::mem::zeroed();
    libc::sigemptyset(&mut empty);
    libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut());

    // A raw fork, not glibc's `fork`: that takes every malloc arena lock first, and one another
    // thread of hearth held when the guard was cloned is locked here forever.
    let vmm =
        libc::syscall(libc::SYS_clone, libc::SIGCHLD as libc::c_ulong, 0, 0, 0, 0) as libc::pid_t;
    if vmm < 0 {
        libc::_exit(126);
    }
    if vmm == 0 {
        libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr());
        let message = b"hearth: VMM guard: cannot execute the VMM\n";
        libc::write(2, message.as_ptr().cast(), message.len());
        libc::_exit(127);
    }
    loop {
        let mut status = 0;
        let reaped = libc::waitpid(-1, &mut status, 0);
        if reaped == vmm {
            if libc::WIFEXITED(status) {
                libc::_exit(libc::WEXITSTATUS(status));
            }
            // Re-raising would not work for PID 1 (it ignores signals it has no handler for).
            libc::_exit(128 + libc::WTERMSIG(status));
        }
        if reaped < 0 && *libc::__errno_location() != libc::EINTR {
            libc::_exit(126);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::{BufRead, BufReader};
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    use super::*;
    use crate::rundir::children;

    const HELPER: &str = "HEARTH_GUARD_TEST_HELPER";

    fn request(program: &str, args: &[&str], log: &Path) -> SpawnRequest {
        SpawnRequest {
            program: program.into(),
            args: args.iter().map(|a| a.to_string()).collect(),
            log: std::fs::File::create(log).unwrap(),
            stdout: None,
            detached: false,
        }
    }

    fn wait(pid: u32) -> i32 {
        let mut status = 0;
        // SAFETY: reaping our own child with a valid status pointer.
        assert_eq!(
            unsafe { libc::waitpid(pid as i32, &mut status, 0) },
            pid as i32
        );
        assert!(libc::WIFEXITED(status), "guard died of a signal: {status}");
        libc::WEXITSTATUS(status)
    }

    fn alive(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| !stat.rsplit(')').next().unwrap_or("").starts_with(" Z"))
    }

    #[test]
    fn the_guard_exits_with_the_vmms_status_and_holds_only_its_stdio() {
        if !crate::test_support::is_root() {
            return eprintln!("SKIPPED: a new PID namespace needs root");
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let guard = process_spawn(request("/bin/sh", &["-c", "echo out; exit 3"], &log));
        assert_eq!(wait(guard), 3);
        assert_eq!(std::fs::read_to_string(&log).unwrap(), "out\n");

        // A long-lived guard must not keep the caller's other fds (sockets, pipes) open.
        let (_keep_read, keep_write) = pipe().unwrap();
        let guard = process_spawn(request("/bin/sleep", &["30"], &log));
        let fds: Vec<String> = std::fs::read_dir(format!("/proc/{guard}/fd"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        drop(keep_write);
        // SAFETY: signalling our own child.
        unsafe { libc::kill(guard as i32, libc::SIGKILL) };
        let mut fds = fds;
        fds.sort();
        assert_eq!(fds, ["0", "1", "2"]);
    }

    /// Regression (found by the soak): the guard is a raw `clone` of a multi-threaded process, so
    /// a malloc arena lock another thread held at that instant stays locked in the guard forever.
    /// glibc's `fork` takes every arena lock first, and so hung the guard before it ran the VMM
    /// ("did not open its control socket within 30s", nothing on stderr).
    #[test]
    fn guards_start_their_vmm_while_other_threads_allocate() {
        if !crate::test_support::is_root() {
            return eprintln!("SKIPPED: a new PID namespace needs root");
        }
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("vmm.log");
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let allocators: Vec<_> = (0..3)
            .map(|i| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut kept = Vec::new();
                    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                        kept.push(vec![i as u8; 64 + kept.len() % 4096]);
                        if kept.len() > 256 {
                            kept.clear();
                        }
                    }
                })
            })
            .collect();
        let mut hung = None;
        for _ in 0..150 {
            let guard = process_spawn(request("/bin/true", &[], &log));
            let started = Instant::now();
            let mut status = 0;
            // SAFETY: polling our own child with a valid status pointer.
            while unsafe { libc::waitpid(guard as i32, &mut status, libc::WNOHANG) } == 0 {
                if started.elapsed() > Duration::from_secs(10) {
                    // SAFETY: killing our own, hung child.
                    unsafe { libc::kill(guard as i32, libc::SIGKILL) };
                    wait(guard);
                    hung = Some(guard);
                    break;
                }
                std::thread::sleep(Duration::from_millis(1));
            }
            if hung.is_some() {
                break;
            }
            assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
        }
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        allocators.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(hung, None, "a guard never ran its VMM within 10 s");
    }

    fn process_spawn(request: SpawnRequest) -> u32 {
        crate::process::spawn_guarded_vmm(request).expect("spawning under a guard")
    }

    /// Not a test on its own: the child process of the next test, killed with SIGKILL by it.
    #[test]
    #[ignore = "helper process of a_vmm_that_drops_privileges_dies_with_its_starter"]
    fn start_guarded_vmm_and_wait_to_be_killed() {
        let Some(log) = std::env::var_os(HELPER) else {
            return;
        };
        // setpriv changes uid and gid, which clears any parent-death signal of its own.
        let guard = process_spawn(request(
            "/usr/bin/setpriv",
            &[
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                "/bin/sleep",
                "60",
            ],
            Path::new(&log),
        ));
        println!("GUARD_PID={guard}");
        std::thread::sleep(Duration::from_secs(60));
    }

    #[test]
    fn a_vmm_that_drops_privileges_dies_with_its_starter() {
        if !crate::test_support::is_root() {
            return eprintln!("SKIPPED: a new PID namespace and setpriv need root");
        }
        let dir = tempfile::tempdir().unwrap();
        let mut helper = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "process::guard::tests::start_guarded_vmm_and_wait_to_be_killed",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(HELPER, dir.path().join("vmm.log"))
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
        let guard: u32 = loop {
            let line = lines.next().expect("helper exited early").unwrap();
            if let Some((_, pid)) = line.split_once("GUARD_PID=") {
                break pid.trim().parse().unwrap();
            }
        };
        let started = Instant::now();
        let vmm = loop {
            let uid_changed = children(guard).into_iter().find(|pid| {
                std::fs::read_to_string(format!("/proc/{pid}/status"))
                    .is_ok_and(|s| s.lines().any(|l| l.starts_with("Uid:\t65534")))
            });
            if let Some(pid) = uid_changed {
                break pid;
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the guarded VMM never ran as uid 65534"
            );
            std::thread::sleep(Duration::from_millis(10));
        };
        helper.kill().unwrap(); // SIGKILL
        helper.wait().unwrap();
        let killed = Instant::now();
        while (alive(vmm) || alive(guard)) && killed.elapsed() < Duration::from_secs(1) {
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            !alive(vmm),
            "the VMM {vmm} outlived its starter by a second"
        );
        assert!(!alive(guard), "the guard {guard} outlived its starter");
    }
}
