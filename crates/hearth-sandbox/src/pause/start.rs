//! Starting a VM from a snapshot directory: the saved sandbox itself (a resume) or a copy of it
//! (a fork's child, [`Identity::copy`]). The same kernel, command line, drives and NIC as at the
//! save, the network rebuilt for the new identity, the scratch disk linked or copied in, the state
//! loaded, then the agent told the host's clock, fresh entropy and the hostname.

use std::path::Path;
use std::time::Instant;

use hearth_net::network::SandboxNetwork;
use hearth_vm::channel::AgentClient;
use hearth_vm::{select_backend, BackendRequest, GuestMemory};

use super::{io_error, PausedSandbox, SCRATCH_FILE};
use crate::sandbox::{connect_agent, console_tail, record_owner, AGENT_DEADLINE};
use crate::spec_record::record_spec;
use crate::{BootTimings, Sandbox, SandboxConfig, SandboxError};

impl PausedSandbox {
    /// Starts the saved VM in `run_dir` as `identity` (the snapshot's own sandbox, or a copy: see
    /// [`Identity`]), leaving the snapshot directory as it was.
    pub(crate) async fn start_saved(
        &self,
        config: &SandboxConfig,
        identity: Identity<'_>,
        run_dir: &Path,
        detached: bool,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let state = self.dir.join(&self.meta.state_file);
        let scratch = self.dir.join(SCRATCH_FILE);
        let base = self.base_memory();
        for file in [Some(&state), Some(&scratch), base.as_ref()]
            .into_iter()
            .flatten()
        {
            if !file.is_file() {
                return Err(SandboxError::Io {
                    what: format!("resuming sandbox {} from {}", self.id, file.display()),
                    source: std::io::Error::new(
                        std::io::ErrorKind::NotFound,
                        "the paused sandbox's file is missing",
                    ),
                });
            }
        }
        let mut spec = self.meta.spec.spec(run_dir, &state, detached);
        if let Some(base) = base {
            // The same template memory again: the state holds only the pages the VM changed.
            spec.memory = GuestMemory::FromTemplate(base);
        }
        let networking = match (&mut spec.network, &config.network) {
            (None, _) => None,
            (Some(nic), Some(networking)) => {
                if identity.copy {
                    // The same tap, MAC and guest addresses, in the copy's own namespace.
                    *nic = networking.interface(identity.id);
                }
                Some(networking.clone())
            }
            (Some(_), None) => {
                return Err(SandboxError::Io {
                    what: format!("resuming sandbox {}", self.id),
                    source: std::io::Error::other(
                        "it was paused with a network, and this configuration gives it none",
                    ),
                })
            }
        };
        let id = identity.id.to_owned();
        let copy = identity.copy;
        let policy = config.network_policy.clone();
        let home = config.home.clone();
        let (vmm_choice, accel, jailer) = (config.vmm, config.accel, config.jailer);
        let (tcg_cache_mib, max_templates) = (config.tcg_cache_mib, config.max_templates);
        let start_spec = spec.clone();
        let link_from = scratch.clone();
        let start = tokio::task::spawn_blocking(move || {
            let chosen = select_backend(&BackendRequest {
                home: &home,
                vmm: vmm_choice,
                accel,
                kernel: &start_spec.kernel,
                jailer,
                tcg_cache_mib,
                max_templates,
                dry_run: false,
            })?;
            let network = match &networking {
                Some(n) => {
                    let network = SandboxNetwork::start(&n.home, &id, policy, &n.options)?;
                    if !detached {
                        record_owner(&n.home, &id)?;
                    }
                    Some(network)
                }
                None => None,
            };
            let vm = place_scratch(&link_from, &start_spec.run_dir, copy)
                .and_then(|()| Ok(chosen.vmm.start(&start_spec)?));
            match vm {
                Ok(vm) => Ok((vm, network, chosen.reason)),
                Err(e) => {
                    // The VM's cleanup removed the run directory, or it never existed.
                    let _ = std::fs::remove_dir_all(&start_spec.run_dir);
                    if let Some(network) = network {
                        let _ = network.teardown();
                    }
                    Err(e)
                }
            }
        })
        .await
        .expect("resume task");
        let (mut vm, network, reason) = start?;
        let vmm_start = started.elapsed();
        let guest_started = Instant::now();
        let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
        let resume = crate::restore::resume_for(identity.hostname)?;
        let connected = match vm.take_agent_stream() {
            Some(stream) => AgentClient::connect_stream_resume(stream, deadline, resume).await,
            None => connect_agent(vm.agent_endpoint().clone(), deadline, Some(resume)).await,
        };
        let client = match connected {
            Ok(client) => client,
            Err(source) => {
                let console = spec.console_log.clone();
                let tail = console_tail(&console);
                let restored_run_dir = spec.run_dir.clone();
                tokio::task::spawn_blocking(move || {
                    drop(vm); // kills the VMM, removes the run directory
                    let _ = std::fs::remove_dir_all(restored_run_dir);
                    if let Some(network) = network {
                        let _ = network.teardown();
                    }
                })
                .await
                .expect("cleanup task");
                return Err(SandboxError::Agent {
                    source,
                    tail,
                    console,
                });
            }
        };
        record_spec(run_dir, &spec);
        let timings = BootTimings {
            prepare: std::time::Duration::ZERO,
            vmm_start,
            guest_boot: guest_started.elapsed(),
            restore: vm.restored_in(),
        };
        let how = if copy { "forked" } else { "resumed" };
        tracing::info!(sandbox = %identity.id, from = %self.id, ?timings, "sandbox {how}");
        Ok(Sandbox::from_parts(
            identity.id.to_owned(),
            self.image.clone(),
            client,
            vm,
            timings,
            format!("{reason}; {how} from {}", self.dir.display()),
            Some(spec.clone()),
            spec.console_log.clone(),
            network,
        ))
    }
}

/// Who a VM started from a snapshot is.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Identity<'a> {
    pub id: &'a str,
    /// Sent in RESUME: a running agent takes it as its hostname when it differs.
    pub hostname: &'a str,
    /// A copy of the snapshot's sandbox (a fork's child) rather than that sandbox itself: its
    /// NIC goes into `id`'s namespace and it gets its own copy of the scratch disk, so that the
    /// snapshot can start more copies.
    pub copy: bool,
}

/// Creates `run_dir` and puts the snapshot's scratch disk into it: hard-linked (so that a failed
/// start, whose cleanup removes the run directory, leaves the snapshot's copy), or with `copy` a
/// copy of its own (reflinked where the filesystem can, sparse otherwise).
fn place_scratch(scratch: &Path, run_dir: &Path, copy: bool) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(run_dir)
        .map_err(io_error(format!(
            "creating run directory {}",
            run_dir.display()
        )))?;
    let target = run_dir.join(SCRATCH_FILE);
    let placed = match copy {
        true => hearth_vm::scratch::copy_sparse(scratch, &target),
        false => std::fs::hard_link(scratch, &target),
    };
    placed.map_err(io_error(format!(
        "{} the scratch disk {} into {}",
        if copy { "copying" } else { "linking" },
        scratch.display(),
        run_dir.display()
    )))
}
