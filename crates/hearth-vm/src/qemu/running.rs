//! A started QEMU: its process, QMP connection and run directory. Start-up waits for QMP to answer and
//! fails fast (with QEMU's stderr and the console tail) if QEMU exits first. Whatever way the VM ends,
//! the process is reaped and the run directory removed exactly once (also on drop), unless the
//! handle was [released](RunningVm::release). A detached QEMU can be adopted by another process
//! ([`RunningQemu::adopt`]): it is then watched through a pidfd instead of as our child.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::snapshot::{restore::load_and_continue, SnapshotError};
use super::{argv, QemuVmm, Qmp};
use crate::adopt::{DetachedRecord, ForeignProcess, ProcessIdentity, VmmProcess};
use crate::process::{spawn_vmm, SpawnRequest};
use crate::rundir::{self, read_tail};
use crate::vmm::{AgentEndpoint, RunningVm, VmError, VmExit};
use crate::VmSpec;

/// QEMU opens its sockets within milliseconds; loading a large kernel under load can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After QMP `quit`, QEMU flushes block devices and exits; past this it gets SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// After a failed state load QEMU prints why and exits at once; its stderr is read after this.
const RESTORE_FAILURE_EXIT: Duration = Duration::from_secs(2);

pub struct RunningQemu {
    process: VmmProcess,
    pid: u32,
    run_dir: PathBuf,
    console_log: PathBuf,
    endpoint: AgentEndpoint,
    qmp: Option<Qmp>,
    exit: Option<VmExit>,
    /// Released: dropping leaves the VMM running and the run directory in place.
    released: bool,
    /// Restored from a template: how long loading the state took.
    restored_in: Option<Duration>,
    /// Restored from a template: the agent port connection made before the state was loaded.
    agent_stream: Option<UnixStream>,
}

impl RunningQemu {
    pub(super) fn start(qemu: &QemuVmm, spec: &VmSpec) -> Result<Self, VmError> {
        spec.validate()?;
        if let Some(state) = &spec.restore_from {
            if !state.is_file() {
                return Err(SnapshotError::Restore {
                    state: state.clone(),
                    detail: "the saved state does not exist".into(),
                    stderr: String::new(),
                }
                .into());
            }
        }
        let run_dir = spec.run_dir.clone();
        rundir::create(&run_dir)?;
        let log_path = run_dir.join(rundir::VMM_LOG);
        let log = std::fs::File::create(&log_path).map_err(|source| VmError::Io {
            what: "creating",
            path: log_path.clone(),
            source,
        })?;
        let request = SpawnRequest {
            program: qemu.binary.clone(),
            args: argv::render(qemu, spec),
            log,
            stdout: None,
            detached: spec.detached,
        };
        let child = match spawn_vmm(request) {
            Ok(child) => child,
            Err(source) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(VmError::Spawn {
                    program: qemu.binary.clone(),
                    source,
                });
            }
        };
        let pid = child.id();
        let mut vm = RunningQemu {
            process: VmmProcess::Child(child),
            pid,
            console_log: spec.console_log.clone(),
            endpoint: AgentEndpoint::Stream(spec.agent_socket.clone()),
            qmp: None,
            exit: None,
            released: false,
            restored_in: None,
            agent_stream: None,
            run_dir,
        };
        rundir::write_pid(&vm.run_dir, pid)?;
        if spec.detached {
            // Written before anything can fail, so that whoever finds this run directory can
            // tell whether its VMM still runs.
            // (Exited at once: connect_qmp reports why.)
            if let Some(process) = ProcessIdentity::of(pid) {
                DetachedRecord {
                    vmm: "qemu".into(),
                    process,
                    control_socket: vm.run_dir.join("qmp.sock"),
                    agent_socket: spec.agent_socket.clone(),
                    vsock_port: None,
                    console_log: spec.console_log.clone(),
                    log: None,
                    cgroup: None,
                }
                .write(&vm.run_dir)?;
            }
        }
        vm.qmp = Some(vm.connect_qmp()?);
        if let Some(state) = &spec.restore_from {
            vm.restore(state, &spec.agent_socket)?;
        }
        tracing::debug!(pid, run_dir = %vm.run_dir.display(), restored_in = ?vm.restored_in, "qemu started");
        Ok(vm)
    }

    /// Loads the template state into a QEMU started with `-incoming defer` and lets it run. On
    /// failure QEMU usually exits by itself; its stderr goes into the error before it is killed.
    fn restore(&mut self, state: &Path, agent_socket: &Path) -> Result<(), VmError> {
        let started = Instant::now();
        // The template was saved with its host connected; connecting before the load keeps it
        // so for the restored guest (see snapshot/build.rs).
        let agent = UnixStream::connect(agent_socket).map_err(|source| VmError::Io {
            what: "connecting to the agent socket before restoring",
            path: agent_socket.to_owned(),
            source,
        })?;
        let qmp = self.qmp.as_mut().expect("QMP connected before restoring");
        match load_and_continue(qmp, state) {
            Ok(()) => {
                self.restored_in = Some(started.elapsed());
                self.agent_stream = Some(agent);
                Ok(())
            }
            Err(detail) => {
                let _ = self.wait_process(Some(RESTORE_FAILURE_EXIT));
                let stderr = read_tail(&self.run_dir.join(rundir::VMM_LOG));
                let _ = self.kill();
                Err(SnapshotError::Restore {
                    state: state.to_owned(),
                    detail,
                    stderr,
                }
                .into())
            }
        }
    }

    /// Polls for the QMP socket while watching for an early exit.
    fn connect_qmp(&mut self) -> Result<Qmp, VmError> {
        let socket = self.run_dir.join("qmp.sock");
        let started = Instant::now();
        loop {
            if let Some(status) = self.wait_process(Some(Duration::ZERO))? {
                return Err(self.early_exit(status));
            }
            if socket.exists() {
                match Qmp::connect(&socket) {
                    Ok(qmp) => return Ok(qmp),
                    Err(e) if started.elapsed() > START_TIMEOUT => {
                        return Err(VmError::Qmp { socket, source: e });
                    }
                    Err(_) => {} // bound but not yet listening: retry
                }
            }
            if started.elapsed() > START_TIMEOUT {
                return Err(VmError::StartTimeout {
                    vmm: "qemu",
                    socket,
                    waited: START_TIMEOUT,
                    stderr: read_tail(&self.run_dir.join(rundir::VMM_LOG)),
                });
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Takes over the detached QEMU `record` describes (see [`crate::adopt()`]).
    pub(crate) fn adopt(run_dir: &Path, record: DetachedRecord) -> Result<Self, VmError> {
        let pid = record.process.pid;
        let process = ForeignProcess::open(record.process).ok_or(VmError::Gone {
            run_dir: run_dir.to_owned(),
            pid,
        })?;
        // QMP serves one client at a time; the previous owner's connection died with it.
        let qmp = match Qmp::connect(&record.control_socket) {
            Ok(qmp) => Some(qmp),
            Err(e) => {
                tracing::warn!(
                    pid,
                    "adopted qemu: QMP unavailable ({e}); stop will kill it"
                );
                None
            }
        };
        Ok(RunningQemu {
            process: VmmProcess::Foreign(process),
            pid,
            run_dir: run_dir.to_owned(),
            console_log: record.console_log.clone(),
            endpoint: record.agent_endpoint(),
            qmp,
            exit: None,
            released: false,
            restored_in: None,
            agent_stream: None,
        })
    }

    fn wait_process(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>, VmError> {
        let pid = self.pid;
        self.process
            .wait(timeout)
            .map_err(|source| VmError::Wait { pid, source })
    }

    /// Builds the early-exit error, then cleans up (the error carries what the run dir held).
    fn early_exit(&mut self, status: ExitStatus) -> VmError {
        let error = VmError::EarlyExit {
            vmm: "qemu",
            status,
            stderr: read_tail(&self.run_dir.join(rundir::VMM_LOG)),
            console: read_tail(&self.console_log),
        };
        self.finish(status);
        error
    }

    /// The QMP connection, while the VM runs.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut()
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    /// Records the exit, reads a panic from the console and removes the run directory. Idempotent.
    fn finish(&mut self, status: ExitStatus) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        self.qmp = None;
        let failure = kernel_panic(&read_tail(&self.console_log));
        if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
            tracing::warn!(run_dir = %self.run_dir.display(), "removing run dir: {e}");
        }
        let exit = VmExit { status, failure };
        self.exit = Some(exit.clone());
        exit
    }

    fn qmp_quietly(&mut self, what: &str, f: impl FnOnce(&mut Qmp) -> Result<(), super::QmpError>) {
        if let Some(qmp) = self.qmp.as_mut() {
            if let Err(e) = f(qmp) {
                tracing::debug!(pid = self.pid, "qmp {what}: {e}");
            }
        }
    }

    fn qmp_required(
        &mut self,
        f: impl FnOnce(&mut Qmp) -> Result<(), super::QmpError>,
    ) -> Result<(), VmError> {
        let socket = self.run_dir.join("qmp.sock");
        let qmp = self
            .qmp
            .as_mut()
            .ok_or_else(|| VmError::Unsupported("the VM has exited".into()))?;
        f(qmp).map_err(|source| VmError::Qmp { socket, source })
    }
}

impl RunningVm for RunningQemu {
    fn pid(&self) -> u32 {
        self.pid
    }

    fn run_dir(&self) -> &Path {
        &self.run_dir
    }

    fn agent_endpoint(&self) -> &AgentEndpoint {
        &self.endpoint
    }

    fn pause(&mut self) -> Result<(), VmError> {
        self.qmp_required(Qmp::stop)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.qmp_required(Qmp::cont)
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        if !grace.is_zero() {
            self.qmp_quietly("system_powerdown", Qmp::system_powerdown);
            if let Some(exit) = self.wait_timeout(grace)? {
                return Ok(exit);
            }
        }
        self.qmp_quietly("quit", Qmp::quit);
        if let Some(exit) = self.wait_timeout(QUIT_GRACE)? {
            return Ok(exit);
        }
        tracing::warn!(pid = self.pid, "qemu ignored quit; killing it");
        self.kill()
    }

    fn kill(&mut self) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        self.process.kill();
        self.wait()
    }

    fn wait(&mut self) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let status = self
            .wait_process(None)?
            .expect("waiting without a timeout ends with a status");
        Ok(self.finish(status))
    }

    fn wait_timeout(&mut self, timeout: Duration) -> Result<Option<VmExit>, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(Some(exit.clone()));
        }
        let status = self.wait_process(Some(timeout))?;
        Ok(status.map(|status| self.finish(status)))
    }

    fn release(&mut self) {
        self.released = true;
        self.qmp = None;
    }

    fn restored_in(&self) -> Option<Duration> {
        self.restored_in
    }

    fn take_agent_stream(&mut self) -> Option<UnixStream> {
        self.agent_stream.take()
    }
}

impl Drop for RunningQemu {
    fn drop(&mut self) {
        if self.exit.is_none() && !self.released {
            if let Err(e) = self.kill() {
                tracing::warn!(pid = self.pid, "killing qemu on drop: {e}");
            }
        }
    }
}

/// The kernel's panic line, if the console shows one.
fn kernel_panic(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| l.contains("Kernel panic - not syncing"))
        .map(|l| l.trim().to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_panic_line_in_a_console_tail() {
        let console = "[    1.0] Run /init as init process\n\
                       [    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100\n\
                       [    1.3] Rebooting in 1 seconds..\n";
        assert_eq!(
            kernel_panic(console).as_deref(),
            Some(
                "[    1.2] Kernel panic - not syncing: Attempted to kill init! exitcode=0x00000100"
            )
        );
        assert_eq!(kernel_panic("all fine\n"), None);
    }
}
