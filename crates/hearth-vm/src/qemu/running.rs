//! A started QEMU: its process ([`VmProcess`]: exit recorded once, run directory removed, killed on
//! drop unless released), QMP connection and agent endpoint. Start-up waits for QMP to answer and
//! fails fast (with QEMU's stderr and the console tail) if QEMU exits first; a VM started with
//! `restore_from` then loads its saved state. Every QEMU is confined (`crate::confine`: its own
//! uid, chroot and cgroup, entered before exec; seccomp from the argv) and runs in the VM's network
//! namespace when the spec names one. A detached QEMU can be adopted by another process
//! ([`RunningQemu::adopt`]).

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::snapshot::restore::load_and_continue;
use super::snapshot::{save::save, save_thin, SnapshotError};
use super::{argv, memory, QemuError, QemuVmm, Qmp, QmpError};
use crate::accel::Accel;
use crate::confine;
use crate::detached::DetachedRecord;
use crate::error::VmError;
use crate::lifecycle::{remove_leftovers, Diagnose, VmExit, VmProcess};
use crate::process::ProcessIdentity;
use crate::process::{spawn_guarded_vmm_in, spawn_vmm_in, Enter, SpawnRequest};
use crate::rundir::{self, read_tail};
use crate::spec::{GuestMemory, VmSpec};
use crate::vmm::{AgentEndpoint, RunningVm, SavedState};

/// QEMU opens its sockets within milliseconds; loading a large kernel under load can take a while.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// After QMP `quit`, QEMU flushes block devices and exits; past this it gets SIGKILL.
const QUIT_GRACE: Duration = Duration::from_secs(3);
/// After a failed state load QEMU prints why and exits at once; its stderr is read after this.
const RESTORE_FAILURE_EXIT: Duration = Duration::from_secs(2);
/// How long an adopted QEMU whose QMP socket refuses connections gets to show that it exited.
const ADOPT_EXIT_GRACE: Duration = Duration::from_secs(1);
const NAME: &str = "qemu";
/// The saved state's file name inside a [`RunningVm::save_state`] directory.
const SAVED_STATE: &str = "state";

pub struct RunningQemu {
    process: VmProcess,
    endpoint: AgentEndpoint,
    console_log: PathBuf,
    qmp: Option<Qmp>,
    /// Restored: how long loading the state took.
    restored_in: Option<Duration>,
    /// Restored: the agent port connection made before the state was loaded.
    agent_stream: Option<UnixStream>,
    /// Restored from a template: the sealed copy of its memory this VM maps (made here, or by an
    /// earlier daemon for an adopted VM), held so that the node counts it while the VM lives (see
    /// `memory.rs`).
    _memory: Option<memory::HeldCopy>,
    /// Restored from a template: [`BASE_MEMORY`] in the run directory, a hard link to the
    /// template memory file its sealed copy was made from, which its saved states keep a link to
    /// (`SavedState::base`): the file stays as it was while they exist, whatever happens to the
    /// template (a rebuilt template is a new file; `snapshot/build.rs`).
    base: Option<PathBuf>,
}

/// The name of the template memory link in a run directory and a saved state's directory.
pub(crate) const BASE_MEMORY: &str = "memory.base";

impl RunningQemu {
    pub(super) fn start(qemu: &QemuVmm, spec: &VmSpec) -> Result<Self, VmError> {
        spec.validate()?;
        if let Some(state) = &spec.restore_from {
            if !state.is_file() {
                let missing = SnapshotError::Restore {
                    state: state.clone(),
                    detail: "the saved state does not exist".into(),
                    stderr: String::new(),
                };
                return Err(QemuError::Snapshot(missing).into());
            }
        }
        let run_dir = &spec.run_dir;
        rundir::create(run_dir)?;
        let confined = match confine::prepare(run_dir, spec.memory_mib, spec.vcpus) {
            Ok(confined) => confined,
            Err(e) => {
                let _ = std::fs::remove_dir_all(run_dir);
                return Err(e);
            }
        };
        let leftovers = confined
            .as_ref()
            .map(|c| c.leftovers.clone())
            .unwrap_or_default();
        let launched = Self::launch(qemu, spec, confined);
        let (process, memory) = match launched {
            Ok((process, memory)) => (process.with_leftovers(leftovers.clone()), memory),
            Err(e) => {
                remove_leftovers(&leftovers);
                let _ = std::fs::remove_dir_all(run_dir);
                return Err(e);
            }
        };
        let log_path = run_dir.join(rundir::VMM_LOG);
        let base = match (&spec.memory, &memory) {
            (GuestMemory::FromTemplate(file), Some(copy)) => link_base(file, run_dir, copy),
            _ => None,
        };
        let mut vm = RunningQemu {
            process,
            endpoint: AgentEndpoint::Stream(spec.agent_socket.clone()),
            console_log: spec.console_log.clone(),
            qmp: None,
            restored_in: None,
            agent_stream: None,
            _memory: memory.map(|m| m as memory::HeldCopy),
            base,
        };
        if spec.detached {
            // Written before anything can fail, so that whoever finds this run directory can
            // tell whether its VMM still runs. (Exited at once: start-up below reports why.)
            if let Some(process) = ProcessIdentity::of(vm.pid()) {
                DetachedRecord {
                    vmm: NAME.into(),
                    process,
                    control_socket: run_dir.join("qmp.sock"),
                    agent_socket: spec.agent_socket.clone(),
                    vsock_port: None,
                    console_log: spec.console_log.clone(),
                    log: None,
                    cgroups: leftovers,
                }
                .write(run_dir)?;
            }
        }
        let socket = run_dir.join("qmp.sock");
        let qmp = vm.process.await_control(
            &socket,
            &spec.console_log,
            START_TIMEOUT,
            || read_tail(&log_path),
            || Qmp::connect(&socket).ok(),
        )?;
        vm.qmp = Some(qmp);
        if let Some(state) = &spec.restore_from {
            vm.restore(state, &spec.agent_socket, spec.memory.has_memory_backend())?;
        }
        tracing::debug!(pid = vm.pid(), run_dir = %run_dir.display(), restored_in = ?vm.restored_in, "qemu started");
        Ok(vm)
    }

    /// Spawns QEMU in `spec.run_dir` (created), confined by `confined` when set, in the VM's
    /// network namespace when it has one. A confined QEMU runs under a guard process
    /// (`crate::process`): its uid change clears its parent-death signal, and the guard's PID
    /// namespace is what still ties it to hearth.
    fn launch(
        qemu: &QemuVmm,
        spec: &VmSpec,
        confined: Option<confine::Confined>,
    ) -> Result<(VmProcess, Option<Arc<memory::SealedMemory>>), VmError> {
        let run_dir = &spec.run_dir;
        let log_path = run_dir.join(rundir::VMM_LOG);
        let log = std::fs::File::create(&log_path).map_err(|source| VmError::Io {
            what: "creating",
            path: log_path.clone(),
            source,
        })?;
        // A VM restored from a template maps a sealed copy of its memory (see `memory.rs`); the
        // copy must stay open until QEMU has opened it, which it has once its QMP socket answers;
        // the VM keeps it for its life.
        let sealed = match &spec.memory {
            GuestMemory::FromTemplate(file) => {
                Some(memory::sealed_copy(file, u64::from(spec.memory_mib) << 20)?)
            }
            _ => None,
        };
        let source = sealed.as_ref().map(|s| s.path());
        let mut args = argv::render_with_memory(qemu, spec, source.as_deref());
        let mut enter = Enter::default();
        let guarded = confined.is_some();
        if let Some(confined) = confined {
            args.extend(argv::confinement(
                confined.uid,
                confined.gid,
                &confined.chroot,
            ));
            enter = confined.enter;
        }
        if let Some(netns) = spec.network.as_ref().and_then(|n| n.netns.as_ref()) {
            let file = Enter::netns(netns).map_err(|source| VmError::Io {
                what: "opening the VM's network namespace",
                path: netns.clone(),
                source,
            })?;
            enter.netns = Some(file);
        }
        enter.no_huge_pages = qemu.accel != Accel::Kvm;
        let request = SpawnRequest {
            program: qemu.binary.clone(),
            args,
            log,
            stdout: None,
            detached: spec.detached,
        };
        let spawn_error = |source| VmError::Spawn {
            program: qemu.binary.clone(),
            source,
        };
        let diagnose = diagnose(&spec.console_log);
        let process = if guarded {
            let pid = spawn_guarded_vmm_in(request, enter).map_err(spawn_error)?;
            VmProcess::guard(NAME, pid, run_dir, diagnose)?
        } else {
            let child = spawn_vmm_in(request, enter).map_err(spawn_error)?;
            VmProcess::child(NAME, child, run_dir, diagnose)?
        };
        Ok((process, sealed))
    }

    /// Loads the saved state into a QEMU started with `-incoming defer` and lets it run. On
    /// failure QEMU usually exits by itself; its stderr goes into the error before it is killed.
    fn restore(
        &mut self,
        state: &Path,
        agent_socket: &Path,
        file_backed: bool,
    ) -> Result<(), VmError> {
        let started = Instant::now();
        // The state was saved with its host connected; connecting before the load keeps it so for
        // the restored guest (see snapshot/build.rs).
        let agent = UnixStream::connect(agent_socket).map_err(|source| VmError::Io {
            what: "connecting to the agent socket before restoring",
            path: agent_socket.to_owned(),
            source,
        })?;
        let qmp = self.qmp.as_mut().expect("QMP connected before restoring");
        match load_and_continue(qmp, state, file_backed) {
            Ok(()) => {
                self.restored_in = Some(started.elapsed());
                self.agent_stream = Some(agent);
                Ok(())
            }
            Err(detail) => {
                let _ = self.process.wait_status(Some(RESTORE_FAILURE_EXIT));
                let stderr = read_tail(&self.process.run_dir().join(rundir::VMM_LOG));
                let _ = self.process.kill();
                let failed = SnapshotError::Restore {
                    state: state.to_owned(),
                    detail,
                    stderr,
                };
                Err(QemuError::Snapshot(failed).into())
            }
        }
    }

    /// Takes over the detached QEMU `record` describes (see [`crate::adopt()`]).
    pub(crate) fn adopt(run_dir: &Path, record: DetachedRecord) -> Result<Self, VmError> {
        let mut process =
            VmProcess::adopted(NAME, record.process, run_dir, diagnose(&record.console_log))?
                .with_leftovers(record.cgroups.clone());
        // QMP serves one client at a time; the previous owner's connection died with it.
        let qmp = match Qmp::connect(&record.control_socket) {
            Ok(qmp) => Some(qmp),
            Err(e) => {
                // A confined QEMU's recorded process is its guard, which outlives a killed QEMU
                // by a moment: a refused control socket and an exit right after mean it is gone.
                if let Ok(Some(_)) = process.wait_status(Some(ADOPT_EXIT_GRACE)) {
                    process.release();
                    return Err(VmError::Gone {
                        run_dir: run_dir.to_owned(),
                        pid: record.process.pid,
                    });
                }
                tracing::warn!(
                    pid = process.pid(),
                    "adopted qemu: QMP unavailable ({e}); stop will kill it"
                );
                None
            }
        };
        Ok(RunningQemu {
            process,
            endpoint: record.agent_endpoint(),
            console_log: record.console_log,
            qmp,
            restored_in: None,
            agent_stream: None,
            // Its copy was made by the daemon that restored it: counted here while it lives.
            _memory: memory::inherited_copy(record.process.pid).map(|m| m as memory::HeldCopy),
            base: Some(run_dir.join(BASE_MEMORY)).filter(|link| link.is_file()),
        })
    }

    /// The QMP connection, while the VM runs.
    pub fn qmp(&mut self) -> Option<&mut Qmp> {
        self.qmp.as_mut().filter(|_| self.process.exit().is_none())
    }

    pub fn console_log(&self) -> &Path {
        &self.console_log
    }

    fn qmp_quietly(&mut self, what: &str, f: impl FnOnce(&mut Qmp) -> Result<(), QmpError>) {
        let pid = self.pid();
        if let Some(qmp) = self.qmp() {
            if let Err(e) = f(qmp) {
                tracing::debug!(pid, "qmp {what}: {e}");
            }
        }
    }

    fn qmp_required<T>(
        &mut self,
        f: impl FnOnce(&mut Qmp) -> Result<T, QmpError>,
    ) -> Result<T, VmError> {
        let socket = self.process.run_dir().join("qmp.sock");
        if self.process.exit().is_some() {
            // Typed, so that a caller tells a VM that died under it from a failure of its own.
            return Err(VmError::Gone {
                run_dir: self.process.run_dir().to_owned(),
                pid: self.pid(),
            });
        }
        if self.process.is_released() {
            return Err(VmError::Unsupported(
                "the VM was let go: its control connection is closed".into(),
            ));
        }
        if self.qmp.is_none() {
            // Adopted while its QMP did not answer (a VMM frozen across a daemon restart): try
            // again. A VMM still frozen fails as unresponsive (QMP's greeting timeout), one that
            // came back is under control again.
            let qmp = Qmp::connect(&socket).map_err(|source| QemuError::Qmp {
                socket: socket.clone(),
                source,
            })?;
            tracing::info!(pid = self.pid(), "adopted qemu: QMP answers now");
            self.qmp = Some(qmp);
        }
        let qmp = self.qmp.as_mut().expect("connected above");
        f(qmp).map_err(|source| QemuError::Qmp { socket, source }.into())
    }
}

/// A kernel panic line on the console is how a QEMU guest's failure shows.
fn diagnose(console: &Path) -> Diagnose {
    let console = console.to_owned();
    Box::new(move || kernel_panic(&read_tail(&console)))
}

impl RunningVm for RunningQemu {
    fn process(&self) -> &VmProcess {
        &self.process
    }

    fn process_mut(&mut self) -> &mut VmProcess {
        &mut self.process
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
        if let Some(exit) = self.process.exit() {
            return Ok(exit.clone());
        }
        if !grace.is_zero() {
            self.qmp_quietly("system_powerdown", Qmp::system_powerdown);
            if let Some(exit) = self.process.wait_timeout(grace)? {
                return Ok(exit);
            }
        }
        self.qmp_quietly("quit", Qmp::quit);
        if let Some(exit) = self.process.wait_timeout(QUIT_GRACE)? {
            return Ok(exit);
        }
        tracing::warn!(pid = self.pid(), "qemu ignored quit; killing it");
        self.process.kill()
    }

    fn release(&mut self) {
        // QMP serves one client: the next owner needs the connection free.
        self.qmp = None;
        self.process.release();
    }

    fn save_state(&mut self, dir: &Path) -> Result<SavedState, VmError> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(|source| VmError::Io {
            what: "creating",
            path: dir.to_owned(),
            source,
        })?;
        let state = dir.join(SAVED_STATE);
        // A VM restored from a template: its state keeps a link to the template memory, and
        // leaves out the pages it shares with it (`snapshot/thin.rs`).
        let base = self
            .base
            .as_deref()
            .and_then(|base| link_memory(base, &dir.join(BASE_MEMORY)));
        let saved = match &base {
            Some(link) => self.qmp_required(|qmp| Ok(save_thin(qmp, &state, link)))?,
            None => self.qmp_required(|qmp| Ok(save(qmp, &state).map(|()| None)))?,
        };
        let thinned = saved.map_err(|source| QemuError::Save {
            state: state.clone(),
            source,
        })?;
        let bytes = std::fs::metadata(&state)
            .map_err(|source| VmError::Io {
                what: "reading",
                path: state.clone(),
                source,
            })?
            .len();
        // Saved whole: it starts again as such a state always did, needing no template memory.
        let base = match (base, &thinned) {
            (Some(link), None) => {
                let _ = std::fs::remove_file(link);
                None
            }
            (base, _) => base,
        };
        if let Some(done) = thinned {
            tracing::debug!(
                state = %state.display(),
                kept_pages = done.kept_pages,
                dropped_pages = done.dropped_pages,
                dropped_zero = done.dropped_zero,
                bytes_in = done.bytes_in,
                bytes_out = done.bytes_out,
                "saved a thin state"
            );
        }
        Ok(SavedState {
            state,
            bytes,
            took: started.elapsed(),
            base,
        })
    }

    fn restored_in(&self) -> Option<Duration> {
        self.restored_in
    }

    fn take_agent_stream(&mut self) -> Option<UnixStream> {
        self.agent_stream.take()
    }
}

/// Links the template memory `file` a VM was restored from into its run directory, if it still is
/// the file `copy` was made from (a template rebuilt in between is not): the base of the VM's
/// saved states. `None` (logged) when it cannot be linked: its states are then saved whole.
fn link_base(file: &Path, run_dir: &Path, copy: &memory::SealedMemory) -> Option<PathBuf> {
    let link = link_memory(file, &run_dir.join(BASE_MEMORY))?;
    if !copy.is_copy_of(&link) {
        tracing::info!(file = %file.display(), "the template changed while the VM started: its states are saved whole");
        let _ = std::fs::remove_file(&link);
        return None;
    }
    Some(link)
}

/// Hard-links the template memory `file` as `link` (replacing what was there); `None` (logged)
/// when it cannot.
fn link_memory(file: &Path, link: &Path) -> Option<PathBuf> {
    let _ = std::fs::remove_file(link);
    match std::fs::hard_link(file, link) {
        Ok(()) => Some(link.to_owned()),
        Err(e) => {
            tracing::warn!(file = %file.display(), link = %link.display(), "linking the template memory: {e}");
            None
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
