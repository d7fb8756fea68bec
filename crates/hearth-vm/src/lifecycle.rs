//! One VM process lifecycle, embedded by every backend's running VM: the VMM process (a child we
//! spawned, a guard process, or a detached VMM adopted from its run directory), its run directory,
//! and the rule that however the VM ends — it exits, is killed, is waited for, or its handle is
//! dropped — the process is reaped and its exit recorded exactly once, the backend's logs are read
//! for a failure, and the run directory (and any other leftovers: a jailed or confined VM's
//! cgroups, a confined VM's uid lease) removed. A released handle lets go instead: dropping it leaves the VMM running for a later adopt.
//!
//! Touches only the process it holds, its run directory and the leftovers it was given.

use std::io;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::{Duration, Instant};

use crate::error::VmError;
use crate::process::{ForeignProcess, ProcessIdentity};
use crate::rundir::{self, read_tail};

/// Reads what a backend's logs say went wrong once its VMM has exited (a kernel panic on the
/// console, a KVM internal error in Firecracker's log); `None` when they show nothing.
pub(crate) type Diagnose = Box<dyn Fn() -> Option<String> + Send>;

/// How a VM ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmExit {
    pub status: ExitStatus,
    /// A failure the VMM or guest kernel reported even though the process may have exited 0: a kernel
    /// panic line from the console (QEMU), a KVM internal error from the log (Firecracker).
    pub failure: Option<String>,
}

/// The VMM process of one VM and what must happen when it ends. Backends embed it and expose it
/// through [`crate::RunningVm::process`], whose provided methods (pid, wait, kill, release) use it.
pub struct VmProcess {
    handle: Handle,
    pid: u32,
    vmm: &'static str,
    run_dir: PathBuf,
    /// Removed after the exit: empty directories (a jailed or confined VM's cgroups) and files (a
    /// confined VM's uid lease).
    leftovers: Vec<PathBuf>,
    diagnose: Diagnose,
    exit: Option<VmExit>,
    released: bool,
}

enum Handle {
    /// Spawned with `std::process`.
    Child(Child),
    /// Watched through a pidfd: the guard process of a jailed VMM (our child, spawned without
    /// `std::process`), or a detached VMM adopted from its run directory (possibly not our child).
    Pidfd(ForeignProcess),
}

impl VmProcess {
    /// A VMM child just spawned into `run_dir` (which the caller created); writes the pid file.
    pub(crate) fn child(
        vmm: &'static str,
        child: Child,
        run_dir: &Path,
        diagnose: Diagnose,
    ) -> Result<VmProcess, VmError> {
        let pid = child.id();
        VmProcess::with_handle(vmm, Handle::Child(child), pid, run_dir, diagnose)
    }

    /// The guard process of a jailed VMM (a child spawned without `std::process`).
    pub(crate) fn guard(
        vmm: &'static str,
        pid: u32,
        run_dir: &Path,
        diagnose: Diagnose,
    ) -> Result<VmProcess, VmError> {
        let process = ForeignProcess::child(pid).ok_or_else(|| VmError::Wait {
            pid,
            source: io::Error::last_os_error(),
        })?;
        VmProcess::with_handle(vmm, Handle::Pidfd(process), pid, run_dir, diagnose)
    }

    /// A detached VMM another process started: [`VmError::Gone`] unless `identity` still runs.
    pub(crate) fn adopted(
        vmm: &'static str,
        identity: ProcessIdentity,
        run_dir: &Path,
        diagnose: Diagnose,
    ) -> Result<VmProcess, VmError> {
        let gone = || VmError::Gone {
            run_dir: run_dir.to_owned(),
            pid: identity.pid,
        };
        let process = ForeignProcess::open(identity).ok_or_else(gone)?;
        Ok(VmProcess::new(
            vmm,
            Handle::Pidfd(process),
            identity.pid,
            run_dir,
            diagnose,
        ))
    }

    fn with_handle(
        vmm: &'static str,
        handle: Handle,
        pid: u32,
        run_dir: &Path,
        diagnose: Diagnose,
    ) -> Result<VmProcess, VmError> {
        // From here on, dropping the value kills the VMM and removes the run directory.
        let process = VmProcess::new(vmm, handle, pid, run_dir, diagnose);
        rundir::write_pid(run_dir, pid)?;
        Ok(process)
    }

    fn new(
        vmm: &'static str,
        handle: Handle,
        pid: u32,
        run_dir: &Path,
        diagnose: Diagnose,
    ) -> VmProcess {
        VmProcess {
            handle,
            pid,
            vmm,
            run_dir: run_dir.to_owned(),
            leftovers: Vec::new(),
            diagnose,
            exit: None,
            released: false,
        }
    }

    /// Also removes `dirs` (empty directories, such as cgroups, or files, such as a uid lease) once
    /// the VMM has exited.
    pub(crate) fn with_leftovers(mut self, dirs: Vec<PathBuf>) -> VmProcess {
        self.leftovers = dirs;
        self
    }

    /// The VMM's pid (a jailed VM's guard process).
    pub fn pid(&self) -> u32 {
        self.pid
    }

    pub fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    /// The backend's name ("qemu", "firecracker").
    pub fn vmm(&self) -> &'static str {
        self.vmm
    }

    /// How the VM ended, once it has.
    pub fn exit(&self) -> Option<&VmExit> {
        self.exit.as_ref()
    }

    /// SIGKILLs the VMM (unless it already ended), reaps it and cleans up.
    pub fn kill(&mut self) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        match &mut self.handle {
            // A failure means it already exited; waiting reaps it either way.
            Handle::Child(child) => drop(child.kill()),
            Handle::Pidfd(process) => process.kill(),
        }
        self.wait()
    }

    /// Waits for the VMM to exit on its own, then cleans up.
    pub fn wait(&mut self) -> Result<VmExit, VmError> {
        Ok(self
            .wait_timeout_inner(None)?
            .expect("waiting without a deadline ends with an exit"))
    }

    /// Like [`VmProcess::wait`], giving up after `timeout` (`None` while it still runs).
    pub fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError> {
        self.wait_timeout_inner(Some(timeout))
    }

    fn wait_timeout_inner(&mut self, timeout: Option<Duration>) -> Result<Option<VmExit>, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(Some(exit.clone()));
        }
        let status = self.wait_status(timeout)?;
        Ok(status.map(|status| self.finish(status)))
    }

    /// Waits for the process without recording or cleaning up anything (to read its logs first).
    pub(crate) fn wait_status(
        &mut self,
        timeout: Option<Duration>,
    ) -> Result<Option<ExitStatus>, VmError> {
        let pid = self.pid;
        match (&mut self.handle, timeout) {
            (Handle::Child(child), Some(timeout)) => crate::process::wait_timeout(child, timeout),
            (Handle::Child(child), None) => child.wait().map(Some),
            (Handle::Pidfd(process), timeout) => process.wait(timeout),
        }
        .map_err(|source| VmError::Wait { pid, source })
    }

    /// Whether [`VmProcess::release`] let the VMM go (to a later adopter).
    pub fn is_released(&self) -> bool {
        self.released
    }

    /// Lets go of the VM: dropping this afterwards leaves the VMM running and its run directory in
    /// place, for a later adopt.
    pub fn release(&mut self) {
        self.released = true;
    }

    /// Start-up: polls `connect` (the VMM's control socket) until it answers, failing fast with
    /// [`VmError::EarlyExit`] (quoting `logs` and the `console` tail, read before the run directory
    /// goes) if the VMM exits first, and with [`VmError::StartTimeout`] (the VMM killed) after
    /// `timeout`.
    pub(crate) fn await_control<T>(
        &mut self,
        socket: &Path,
        console: &Path,
        timeout: Duration,
        logs: impl Fn() -> String,
        mut connect: impl FnMut() -> Option<T>,
    ) -> Result<T, VmError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.wait_status(Some(Duration::ZERO))? {
                return Err(self.early_exit(status, &logs(), console));
            }
            if socket.exists() {
                if let Some(connected) = connect() {
                    return Ok(connected);
                }
            }
            if started.elapsed() > timeout {
                let error = VmError::StartTimeout {
                    vmm: self.vmm,
                    socket: socket.to_owned(),
                    waited: timeout,
                    stderr: logs(),
                };
                let _ = self.kill();
                return Err(error);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// The VMM exited during start-up: the error quotes `logs` and the console, then the exit is
    /// recorded and the run directory removed.
    pub(crate) fn early_exit(&mut self, status: ExitStatus, logs: &str, console: &Path) -> VmError {
        let error = VmError::EarlyExit {
            vmm: self.vmm,
            status,
            stderr: logs.to_owned(),
            console: read_tail(console),
        };
        self.finish(status);
        error
    }

    /// Records the exit, reads the failure from the logs and removes what the VM left. Idempotent.
    fn finish(&mut self, status: ExitStatus) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let failure = (self.diagnose)();
        remove_leftovers(&self.leftovers);
        if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
            if e.kind() != io::ErrorKind::NotFound {
                tracing::warn!(run_dir = %self.run_dir.display(), "removing run dir: {e}");
            }
        }
        let exit = VmExit { status, failure };
        self.exit = Some(exit.clone());
        exit
    }
}

/// Removes what a VM leaves outside its run directory: empty directories (cgroups) and files (a
/// uid lease). Also for a VM whose process never started.
pub(crate) fn remove_leftovers(paths: &[PathBuf]) {
    for path in paths {
        let removed = match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.is_dir() => remove_cgroup_dir(path),
            Ok(_) => std::fs::remove_file(path),
            Err(e) => Err(e),
        };
        match removed {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                tracing::warn!(path = %path.display(), "removing what the VM left: {e}")
            }
            _ => {}
        }
    }
}

/// Removes an empty directory; a cgroup is busy for a moment after its last task was reaped, so
/// `EBUSY` is retried for up to 2 s.
fn remove_cgroup_dir(dir: &Path) -> io::Result<()> {
    // A killed VMM leaves its cgroups only once the kernel has torn its memory down, which on a
    // busy host took over 200 ms (the suite saw EBUSY at that bound).
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        match std::fs::remove_dir(dir) {
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(5))
            }
            done => return done,
        }
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if self.exit.is_none() && !self.released {
            if let Err(e) = self.kill() {
                tracing::warn!(
                    pid = self.pid,
                    vmm = self.vmm,
                    "killing the VMM on drop: {e}"
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::ExitStatusExt;
    use std::process::{Command, Stdio};

    fn sleeper() -> Child {
        Command::new("sh")
            .args(["-c", "read line"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap()
    }

    fn quiet() -> Diagnose {
        Box::new(|| None)
    }

    #[test]
    fn every_way_of_ending_reaps_once_and_removes_the_run_dir() {
        let home = tempfile::tempdir().unwrap();
        for (i, ending) in ["kill", "drop", "exit"].into_iter().enumerate() {
            let run_dir = home.path().join(format!("vm{i}"));
            let leftover = home.path().join(format!("cgroup{i}"));
            let lease = home.path().join(format!("lease{i}"));
            std::fs::create_dir_all(&run_dir).unwrap();
            std::fs::create_dir_all(&leftover).unwrap();
            std::fs::write(&lease, "run dir").unwrap();
            let child = match ending {
                "exit" => Command::new("sh").args(["-c", "exit 3"]).spawn().unwrap(),
                _ => sleeper(),
            };
            let pid = child.id();
            let diagnose: Diagnose = Box::new(|| Some("it panicked".into()));
            let mut vm = VmProcess::child("test", child, &run_dir, diagnose)
                .unwrap()
                .with_leftovers(vec![leftover.clone(), lease.clone()]);
            assert_eq!(vm.pid(), pid);
            assert!(run_dir.join("vmm.pid").is_file());
            match ending {
                "kill" => {
                    assert_eq!(vm.wait_timeout(Duration::from_millis(20)).unwrap(), None);
                    let exit = vm.kill().unwrap();
                    assert_eq!(exit.status.signal(), Some(libc::SIGKILL));
                    assert_eq!(exit.failure.as_deref(), Some("it panicked"));
                    // Idempotent: the same exit again, no second reap.
                    assert_eq!(vm.wait().unwrap(), exit);
                    assert_eq!(vm.exit(), Some(&exit));
                }
                "drop" => drop(vm),
                _ => assert_eq!(vm.wait().unwrap().status.code(), Some(3)),
            }
            assert!(!run_dir.exists(), "{ending}: run dir left");
            assert!(!leftover.exists(), "{ending}: leftover left");
            assert!(!lease.exists(), "{ending}: lease left");
            assert!(
                ProcessIdentity::of(pid).is_none(),
                "{ending}: still running"
            );
        }
    }

    #[test]
    fn a_released_process_outlives_its_handle() {
        let home = tempfile::tempdir().unwrap();
        let mut child = sleeper();
        let pid = child.id();
        let identity = ProcessIdentity::of(pid).unwrap();
        // A second handle on the same child, as an adopting process would hold it.
        let mut vm = VmProcess::adopted("test", identity, home.path(), quiet()).unwrap();
        vm.release();
        drop(vm);
        assert!(identity.is_alive());
        assert!(home.path().exists());
        let mut vm = VmProcess::adopted("test", identity, home.path(), quiet()).unwrap();
        let exit = vm.kill().unwrap();
        assert_eq!(exit.status.signal(), Some(libc::SIGKILL));
        assert!(!home.path().exists());
        let _ = child.wait();
    }

    #[test]
    fn an_exit_during_start_up_quotes_the_logs_and_cleans_up() {
        let home = tempfile::tempdir().unwrap();
        let run_dir = home.path().join("vm");
        std::fs::create_dir_all(&run_dir).unwrap();
        let console = home.path().join("console.log");
        std::fs::write(&console, "Kernel panic - not syncing\n").unwrap();
        let child = Command::new("sh").args(["-c", "exit 1"]).spawn().unwrap();
        let mut vm = VmProcess::child("test", child, &run_dir, quiet()).unwrap();
        let err = vm
            .await_control(
                &run_dir.join("never.sock"),
                &console,
                Duration::from_secs(10),
                || "bad flag".to_owned(),
                || Some(()),
            )
            .unwrap_err();
        let text = err.to_string();
        assert!(matches!(err, VmError::EarlyExit { .. }), "{text}");
        assert!(
            text.contains("bad flag") && text.contains("Kernel panic"),
            "{text}"
        );
        assert!(!run_dir.exists());
    }
}
