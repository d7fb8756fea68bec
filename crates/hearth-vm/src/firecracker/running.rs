//! A started Firecracker: its process ([`VmProcess`]: exit recorded once, failure read from the
//! logs, run directory and a jailed VM's cgroups removed, killed on drop unless released), API
//! client and agent endpoint. Start-up waits for the API to answer, configures the VM (API mode)
//! and starts it (or, for a VM restored from a snapshot, loads the snapshot, points its drives at
//! this VM's files and resumes it), failing fast with Firecracker's log and the console tail if it
//! exits first. A save pauses the VM and has Firecracker write a full snapshot. A
//! jailed VMM runs under hearth's guard process (`crate::process::guard`), which hearth holds instead. A
//! detached Firecracker can be taken over by another process ([`RunningFirecracker::adopt`]).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::config::RunState;
use super::layout::{Layout, SNAPSHOT, SNAPSHOT_MEMORY};
use super::{failure, FirecrackerApi, FirecrackerError, FirecrackerVmm};
use crate::detached::DetachedRecord;
use crate::error::VmError;
use crate::lifecycle::{Diagnose, VmExit, VmProcess};
use crate::process::ProcessIdentity;
use crate::process::{spawn_guarded_vmm, spawn_vmm_in, Enter, SpawnRequest};
use crate::rundir::{self, read_tail};
use crate::spec::VmSpec;
use crate::vmm::{AgentEndpoint, RunningVm, SavedState};

/// Firecracker opens its API socket within milliseconds; a loaded host gets slack.
const START_TIMEOUT: Duration = Duration::from_secs(10);
const NAME: &str = "firecracker";

pub struct RunningFirecracker {
    process: VmProcess,
    endpoint: AgentEndpoint,
    api: FirecrackerApi,
    /// Where its files are (for a save's snapshot).
    layout: Layout,
    /// How long loading its snapshot took, for a restored VM.
    restored_in: Option<Duration>,
}

/// Where a Firecracker VM's logs are, for failure reports.
#[derive(Clone)]
struct Logs {
    stderr: PathBuf,
    log: PathBuf,
    console: PathBuf,
}

impl Logs {
    /// Firecracker's stderr and its log file.
    fn tails(&self) -> String {
        format!(
            "{}\n--- firecracker log:\n{}",
            read_tail(&self.stderr),
            read_tail(&self.log)
        )
    }

    /// Firecracker may exit 0 after a KVM internal error: its failure is read from the logs.
    fn diagnose(self) -> Diagnose {
        Box::new(move || {
            failure::find_failure(&[
                &read_tail(&self.log),
                &read_tail(&self.stderr),
                &read_tail(&self.console),
            ])
        })
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
        let logs = Logs {
            stderr: spec.run_dir.join(rundir::VMM_LOG),
            log: layout.host_log(),
            console: spec.console_log.clone(),
        };
        let stderr = std::fs::File::create(&logs.stderr).map_err(io("creating", &logs.stderr))?;
        let console =
            std::fs::File::create(&spec.console_log).map_err(io("creating", &spec.console_log))?;
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
        let run_dir = &spec.run_dir;
        let process = match vmm.jailer.as_ref().is_some_and(|j| j.new_pid_ns) {
            true => {
                let pid = spawn_guarded_vmm(request).map_err(spawn_error)?;
                VmProcess::guard(NAME, pid, run_dir, logs.clone().diagnose())?
            }
            false => {
                // Without the jailer (which takes `--netns`), the VMM enters the NIC's namespace
                // itself, where its tap lives.
                let netns = match spec.network.as_ref().and_then(|n| n.netns.as_deref()) {
                    Some(path) => Some(Enter::netns(path).map_err(io("opening", path))?),
                    None => None,
                };
                let enter = Enter {
                    netns,
                    ..Enter::default()
                };
                let child = spawn_vmm_in(request, enter).map_err(spawn_error)?;
                VmProcess::child(NAME, child, run_dir, logs.clone().diagnose())?
            }
        };
        let cgroups: Vec<PathBuf> = vmm
            .jailer
            .as_ref()
            .map(|jail| jail.cgroup_dirs(&vmm.exec_file_name(), &prepared.id))
            .unwrap_or_default();
        let mut vm = RunningFirecracker {
            process: process.with_leftovers(cgroups.clone()),
            endpoint: AgentEndpoint::HybridVsock {
                socket: layout.host_vsock(),
                port: hearth_proto::VSOCK_PORT,
            },
            api: FirecrackerApi::new(layout.host_api_socket()),
            layout: layout.clone(),
            restored_in: None,
        };
        if spec.detached {
            // Written before anything else can fail, so that whoever finds this run directory
            // can tell whether its VMM still runs.
            if let Some(process) = ProcessIdentity::of(vm.pid()) {
                DetachedRecord {
                    vmm: NAME.into(),
                    process,
                    control_socket: layout.host_api_socket(),
                    agent_socket: layout.host_vsock(),
                    vsock_port: Some(hearth_proto::VSOCK_PORT),
                    console_log: spec.console_log.clone(),
                    log: Some(layout.host_log()),
                    cgroups,
                }
                .write(run_dir)?;
            }
        }
        let api = vm.api.clone();
        vm.process.await_control(
            api.socket(),
            &spec.console_log,
            START_TIMEOUT,
            || logs.tails(),
            || api.instance_info().ok(),
        )?;
        if let Some(state) = &spec.restore_from {
            let loading = Instant::now();
            let [snapshot, memory] = layout.vmm_restore(state);
            let restored = vm
                .api
                .call_all(&prepared.config.restore_requests(&snapshot, &memory))
                .and_then(|()| vm.api.set_state(RunState::Resumed));
            if let Err(source) = restored {
                let log = logs.tails();
                let _ = vm.process.kill();
                let state = state.clone();
                return Err(FirecrackerError::Restore { state, source, log }.into());
            }
            vm.restored_in = Some(loading.elapsed());
        } else if vmm.mode == super::ConfigMode::Api {
            let configured = vm
                .api
                .configure(&prepared.config)
                .and_then(|()| vm.api.instance_start());
            if let Err(source) = configured {
                let log = logs.tails();
                let _ = vm.process.kill();
                return Err(FirecrackerError::Config { source, log }.into());
            }
        }
        tracing::debug!(pid = vm.pid(), run_dir = %run_dir.display(), "firecracker started");
        Ok(vm)
    }

    /// Takes over the detached Firecracker `record` describes (see [`crate::adopt()`]).
    pub(crate) fn adopt(run_dir: &Path, record: DetachedRecord) -> Result<Self, VmError> {
        let logs = Logs {
            stderr: run_dir.join(rundir::VMM_LOG),
            log: record
                .log
                .clone()
                .unwrap_or_else(|| run_dir.join("firecracker.log")),
            console: record.console_log.clone(),
        };
        let process = VmProcess::adopted(NAME, record.process, run_dir, logs.diagnose())?
            .with_leftovers(record.cgroups.clone());
        Ok(RunningFirecracker {
            process,
            endpoint: record.agent_endpoint(),
            api: FirecrackerApi::new(record.control_socket.clone()),
            layout: Layout::found(run_dir, &record.control_socket, &record.agent_socket),
            restored_in: None,
        })
    }

    /// The API client, for calls beyond the [`RunningVm`] surface (e.g. `GET /`).
    pub fn api(&self) -> &FirecrackerApi {
        &self.api
    }
}

impl RunningVm for RunningFirecracker {
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
        Ok(self.api.set_state(RunState::Paused)?)
    }

    fn resume(&mut self) -> Result<(), VmError> {
        Ok(self.api.set_state(RunState::Resumed)?)
    }

    /// Pauses the VM, has Firecracker write a full snapshot into its own directory (the jail's
    /// chroot when jailed), then moves the snapshot and the memory file into `dir`.
    fn save_state(&mut self, dir: &Path) -> Result<SavedState, VmError> {
        let started = Instant::now();
        std::fs::create_dir_all(dir).map_err(io("creating", dir))?;
        let ([host_state, host_memory], [state, memory]) = self.layout.saved();
        let save_error = |source| FirecrackerError::Save {
            dir: dir.to_owned(),
            source,
        };
        self.api.set_state(RunState::Paused).map_err(save_error)?;
        self.api
            .snapshot_create(&state, &memory)
            .map_err(save_error)?;
        let saved = [
            (host_state, dir.join(SNAPSHOT)),
            (host_memory, dir.join(SNAPSHOT_MEMORY)),
        ];
        let mut bytes = 0;
        for (from, to) in &saved {
            std::fs::rename(from, to).map_err(io("moving the snapshot file", from))?;
            bytes += std::fs::metadata(to).map_err(io("reading", to))?.len();
        }
        Ok(SavedState {
            state: dir.join(SNAPSHOT),
            bytes,
            took: started.elapsed(),
            base: None,
        })
    }

    fn restored_in(&self) -> Option<Duration> {
        self.restored_in
    }

    fn stop(&mut self, grace: Duration) -> Result<VmExit, VmError> {
        if let Some(exit) = self.process.exit() {
            return Ok(exit.clone());
        }
        if !grace.is_zero() {
            // The guest reboots on Ctrl+Alt+Del and `reboot=k` makes that a Firecracker exit.
            match self.api.send_ctrl_alt_del() {
                Ok(()) => {
                    if let Some(exit) = self.process.wait_timeout(grace)? {
                        return Ok(exit);
                    }
                }
                Err(e) => tracing::debug!(pid = self.pid(), "SendCtrlAltDel: {e}"),
            }
        }
        tracing::debug!(
            pid = self.pid(),
            "firecracker still running after {grace:?}; killing it"
        );
        self.process.kill()
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
