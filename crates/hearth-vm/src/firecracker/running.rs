//! A started Firecracker: its process, API client and run directory. Start-up waits for the API to
//! answer, configures the VM (API mode) and starts it, failing fast with Firecracker's log and the
//! console tail if it exits first. However the VM ends, the process is reaped, its failure read from
//! the logs, and the run directory (and a jailed VM's cgroup) removed exactly once (also on drop).
//! A jailed VMM runs under hearth's guard process (`crate::guard`), which hearth holds instead. A
//! detached Firecracker can be taken over by another process ([`RunningFirecracker::adopt`]) and is
//! then watched through a pidfd; a released handle leaves the VM running when dropped.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use super::config::RunState;
use super::vmm_process::VmmProcess;
use super::{failure, jailer, FirecrackerApi, FirecrackerVmm};
use crate::adopt::{DetachedRecord, ForeignProcess, ProcessIdentity};
use crate::process::{spawn_guarded_vmm, spawn_vmm, SpawnRequest};
use crate::rundir::{self, read_tail};
use crate::vmm::{AgentEndpoint, RunningVm, VmError, VmExit};
use crate::VmSpec;

/// Firecracker opens its API socket within milliseconds; a loaded host gets slack.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const POLL: Duration = Duration::from_millis(5);

pub struct RunningFirecracker {
    process: Process,
    pid: u32,
    run_dir: PathBuf,
    console_log: PathBuf,
    log: PathBuf,
    endpoint: AgentEndpoint,
    api: FirecrackerApi,
    /// A jailed VM's cgroup, removed after exit.
    cgroup: Option<PathBuf>,
    exit: Option<VmExit>,
    /// Released: dropping leaves the VMM running and the run directory in place.
    released: bool,
}

/// The Firecracker process: one this process started (directly or through the jailer), or a
/// detached one adopted from its run directory.
enum Process {
    Started(VmmProcess),
    Adopted(ForeignProcess),
}

impl Process {
    fn wait(&mut self, timeout: Option<Duration>) -> std::io::Result<Option<ExitStatus>> {
        match self {
            Process::Started(process) => process.wait(timeout),
            Process::Adopted(process) => process.wait(timeout),
        }
    }

    fn kill(&mut self) {
        match self {
            Process::Started(process) => process.kill(),
            Process::Adopted(process) => process.kill(),
        }
    }
}

impl RunningFirecracker {
    pub(super) fn start(vmm: &FirecrackerVmm, spec: &VmSpec) -> Result<Self, VmError> {
        let prepared = vmm.prepare(spec)?;
        rundir::create(&spec.run_dir)?;
        // A VM that got as far as a process cleans up on drop; this covers the steps before it.
        Self::launch(vmm, spec, prepared).inspect_err(|_| {
            let _ = std::fs::remove_dir_all(&spec.run_dir);
        })
    }

    fn launch(
        vmm: &FirecrackerVmm,
        spec: &VmSpec,
        prepared: super::Prepared,
    ) -> Result<Self, VmError> {
        let layout = &prepared.layout;
        match &vmm.jailer {
            Some(jail) => jail.prepare(spec, layout)?,
            None => {
                for path in [layout.host_log(), layout.host_metrics()] {
                    std::fs::File::create(&path).map_err(io("creating", &path))?;
                }
            }
        }
        for (path, contents) in &prepared.plan.files {
            std::fs::write(path, contents).map_err(io("writing", path))?;
        }
        let stderr_path = spec.run_dir.join(rundir::VMM_LOG);
        let stderr = std::fs::File::create(&stderr_path).map_err(io("creating", &stderr_path))?;
        let console =
            std::fs::File::create(&spec.console_log).map_err(io("creating", &spec.console_log))?;
        let guarded = vmm.jailer.as_ref().is_some_and(|j| j.new_pid_ns);
        let request = SpawnRequest {
            program: prepared.plan.program.clone(),
            args: prepared.plan.args.clone(),
            log: stderr,
            stdout: Some(console),
            detached: spec.detached,
        };
        let spawn_error = |source| VmError::Spawn {
            program: prepared.plan.program.clone(),
            source,
        };
        let (pid, process) = if guarded {
            let pid = spawn_guarded_vmm(request).map_err(spawn_error)?;
            (pid, VmmProcess::Adopted(pid))
        } else {
            let child = spawn_vmm(request).map_err(spawn_error)?;
            (child.id(), VmmProcess::Child(child))
        };
        let mut vm = RunningFirecracker {
            pid,
            process: Process::Started(process),
            run_dir: spec.run_dir.clone(),
            console_log: spec.console_log.clone(),
            log: layout.host_log(),
            endpoint: AgentEndpoint::HybridVsock {
                socket: layout.host_vsock(),
                port: hearth_proto::VSOCK_PORT,
            },
            api: FirecrackerApi::new(layout.host_api_socket()),
            cgroup: vmm
                .jailer
                .as_ref()
                .map(|_| jailer::cgroup_dir(&vmm.exec_file_name(), &prepared.id)),
            exit: None,
            released: false,
        };
        rundir::write_pid(&vm.run_dir, vm.pid)?;
        if spec.detached {
            // Written before anything else can fail, so that whoever finds this run directory
            // can tell whether its VMM still runs.
            if let Some(process) = ProcessIdentity::of(vm.pid) {
                DetachedRecord {
                    vmm: "firecracker".into(),
                    process,
                    control_socket: layout.host_api_socket(),
                    agent_socket: layout.host_vsock(),
                    vsock_port: Some(hearth_proto::VSOCK_PORT),
                    console_log: spec.console_log.clone(),
                    log: Some(layout.host_log()),
                    cgroup: vm.cgroup.clone(),
                }
                .write(&vm.run_dir)?;
            }
        }
        vm.wait_for_api()?;
        if vmm.mode == super::ConfigMode::Api {
            let configured = vm
                .api
                .configure(&prepared.config)
                .and_then(|()| vm.api.instance_start());
            if let Err(source) = configured {
                let log = vm.log_tails();
                let _ = vm.kill();
                return Err(VmError::FirecrackerConfig { source, log });
            }
        }
        tracing::debug!(pid = vm.pid, run_dir = %vm.run_dir.display(), "firecracker started");
        Ok(vm)
    }

    /// Takes over the detached Firecracker `record` describes (see [`crate::adopt()`]).
    pub(crate) fn adopt(run_dir: &Path, record: DetachedRecord) -> Result<Self, VmError> {
        let pid = record.process.pid;
        let process = ForeignProcess::open(record.process).ok_or(VmError::Gone {
            run_dir: run_dir.to_owned(),
            pid,
        })?;
        Ok(RunningFirecracker {
            process: Process::Adopted(process),
            pid,
            run_dir: run_dir.to_owned(),
            console_log: record.console_log.clone(),
            log: record
                .log
                .clone()
                .unwrap_or_else(|| run_dir.join("firecracker.log")),
            endpoint: record.agent_endpoint(),
            api: FirecrackerApi::new(record.control_socket.clone()),
            cgroup: record.cgroup.clone(),
            exit: None,
            released: false,
        })
    }

    fn wait_for_api(&mut self) -> Result<(), VmError> {
        let started = Instant::now();
        loop {
            if let Some(status) = self.wait_process(Some(Duration::ZERO))? {
                return Err(self.early_exit(status));
            }
            if self.api.socket().exists() && self.api.instance_info().is_ok() {
                return Ok(());
            }
            if started.elapsed() > START_TIMEOUT {
                let error = VmError::StartTimeout {
                    vmm: "firecracker",
                    socket: self.api.socket().to_owned(),
                    waited: START_TIMEOUT,
                    stderr: self.log_tails(),
                };
                let _ = self.kill();
                return Err(error);
            }
            std::thread::sleep(POLL);
        }
    }

    fn early_exit(&mut self, status: ExitStatus) -> VmError {
        let error = VmError::EarlyExit {
            vmm: "firecracker",
            status,
            stderr: self.log_tails(),
            console: read_tail(&self.console_log),
        };
        self.finish(status);
        error
    }

    /// Firecracker's stderr and its log file, for error reports.
    fn log_tails(&self) -> String {
        format!(
            "{}\n--- firecracker log:\n{}",
            read_tail(&self.run_dir.join(rundir::VMM_LOG)),
            read_tail(&self.log)
        )
    }

    /// The API client, for calls beyond the [`RunningVm`] surface (e.g. `GET /`).
    pub fn api(&self) -> &FirecrackerApi {
        &self.api
    }

    fn wait_process(&mut self, timeout: Option<Duration>) -> Result<Option<ExitStatus>, VmError> {
        let pid = self.pid;
        self.process
            .wait(timeout)
            .map_err(|source| VmError::Wait { pid, source })
    }

    /// Records the exit, reads failures from the logs and removes what the VM left. Idempotent.
    fn finish(&mut self, status: ExitStatus) -> VmExit {
        if let Some(exit) = &self.exit {
            return exit.clone();
        }
        let failure = failure::find_failure(&[
            &read_tail(&self.log),
            &read_tail(&self.run_dir.join(rundir::VMM_LOG)),
            &read_tail(&self.console_log),
        ]);
        if let Some(cgroup) = &self.cgroup {
            match std::fs::remove_dir(cgroup) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    tracing::warn!(cgroup = %cgroup.display(), "removing the VM's cgroup: {e}")
                }
                _ => {}
            }
        }
        if let Err(e) = std::fs::remove_dir_all(&self.run_dir) {
            tracing::warn!(run_dir = %self.run_dir.display(), "removing run dir: {e}");
        }
        let exit = VmExit { status, failure };
        self.exit = Some(exit.clone());
        exit
    }
}

impl RunningVm for RunningFirecracker {
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
        self.api.set_state(RunState::Paused).map_err(VmError::from)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        self.api.set_state(RunState::Resumed).map_err(VmError::from)
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        if !grace.is_zero() {
            // The guest reboots on Ctrl+Alt+Del and `reboot=k` makes that a Firecracker exit.
            match self.api.send_ctrl_alt_del() {
                Ok(()) => {
                    if let Some(exit) = self.wait_timeout(grace)? {
                        return Ok(exit);
                    }
                }
                Err(e) => tracing::debug!(pid = self.pid, "SendCtrlAltDel: {e}"),
            }
        }
        tracing::debug!(
            pid = self.pid,
            "firecracker still running after {grace:?}; killing it"
        );
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
            .expect("waiting forever returns a status");
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
    }
}

impl Drop for RunningFirecracker {
    fn drop(&mut self) {
        if self.exit.is_none() && !self.released {
            if let Err(e) = self.kill() {
                tracing::warn!(pid = self.pid, "killing firecracker on drop: {e}");
            }
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
