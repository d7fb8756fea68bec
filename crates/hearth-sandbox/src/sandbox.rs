//! One running sandbox: a booted VM plus a connected agent client. Creation order is image, boot
//! plan, scratch disk, VMM, agent handshake; every failure after the VMM started tears the VM down
//! (dropping a `RunningVm` kills it and removes its run directory), so nothing is left behind.
//!
//! The node manager boots sandboxes detached ([`Sandbox::create_detached`]: the VM outlives this
//! process), lets go of them on shutdown ([`Sandbox::release`]) and takes them over again after a
//! restart ([`Sandbox::adopt`]). [`Sandbox::pause`] (`crate::pause`) saves one to disk and ends
//! its VMM; `PausedSandbox::resume` brings it back.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_image::PulledImage;
use hearth_net::network::SandboxNetwork;
use hearth_vm::channel::{AgentClient, ChannelError, Resume};
use hearth_vm::{AgentEndpoint, RunningVm, VmError, VmExit, VmSpec};

use crate::boot::{new_id, BootPlan, Purpose};
use crate::{SandboxConfig, SandboxError};

/// How long the guest gets from VMM start to agent handshake (TCG boots take 2-5 s here).
pub(crate) const AGENT_DEADLINE: Duration = Duration::from_secs(60);
/// How long a clean shutdown may take, from the shutdown request to the VMM's exit, before the VMM
/// is killed. The agent's confirmation itself is bounded by `channel::SHUTDOWN_DEADLINE` (3 s), so a
/// hung or hostile guest is killed after at most this, plus [`KILL_GRACE`].
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// How long the VMM gets after SIGTERM before SIGKILL (`RunningVm::stop`).
const KILL_GRACE: Duration = Duration::from_millis(500);
/// What of a guest's console log stays on the host disk: once it holds twice this, everything
/// before its last this-many bytes is freed (`hearth_vm::trim_log`), checked every
/// [`CONSOLE_TRIM_EVERY`]. A guest flooding its console costs the host at most ~2 MiB of disk.
const CONSOLE_KEEP: u64 = 1 << 20;
const CONSOLE_TRIM_EVERY: Duration = Duration::from_secs(1);
/// How much of the end of the console log error messages read.
const CONSOLE_TAIL_BYTES: u64 = 16 * 1024;

/// Where boot time went, for `--timings` and the benchmark.
#[derive(Debug, Clone, Copy, Default)]
pub struct BootTimings {
    /// Planning: kernel, agent, initramfs (cached after the first run), scratch disk.
    pub prepare: Duration,
    /// VMM process start until its control socket answered.
    pub vmm_start: Duration,
    /// Control socket answered until the agent completed the handshake (kernel boot + agent init;
    /// for a restored VM, RESUME handling).
    pub guest_boot: Duration,
    /// Restored from a snapshot template: how long loading the state took (part of `vmm_start`).
    /// `None` after a cold boot.
    pub restore: Option<Duration>,
}

/// A running sandbox. Call [`Sandbox::destroy`]; dropping it kills the VM without a clean shutdown.
pub struct Sandbox {
    pub(crate) id: String,
    pub(crate) image: PulledImage,
    pub(crate) client: AgentClient,
    pub(crate) vm: Arc<Mutex<Box<dyn RunningVm>>>,
    timings: BootTimings,
    selection: String,
    /// What the VM was started with (what a pause saves, to start it again identically); also
    /// recorded in the run directory (`crate::spec_record::SPEC_RECORD`) for an adopting process. `None`:
    /// adopted from a run directory without that record.
    pub(crate) spec: Option<VmSpec>,
    /// Keeps the console log's disk use bounded while the sandbox lives.
    _console_trim: ConsoleTrim,
    /// The guest's network (after `vm`: dropped once the VM is gone); taken out by `release`.
    pub(crate) network: Mutex<Option<SandboxNetwork>>,
    /// Set by [`Sandbox::give_up_on_guest`]: `stop` kills the VM without asking the guest first.
    unresponsive: std::sync::atomic::AtomicBool,
}

/// The task that trims a live sandbox's console log; stops with the sandbox.
struct ConsoleTrim(tokio::task::AbortHandle);

impl ConsoleTrim {
    fn start(console: PathBuf) -> ConsoleTrim {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(CONSOLE_TRIM_EVERY);
            loop {
                tick.tick().await;
                match hearth_vm::trim_log(&console, CONSOLE_KEEP) {
                    Ok(0) => {}
                    Ok(freed) => {
                        tracing::debug!(console = %console.display(), freed, "trimmed a flooded console")
                    }
                    // Gone with its run directory, or a filesystem without hole punching.
                    Err(e) => tracing::trace!(console = %console.display(), "console trim: {e}"),
                }
            }
        });
        ConsoleTrim(task.abort_handle())
    }
}

impl Drop for ConsoleTrim {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Sandbox {
    /// Boots `image` per `config` and connects to its agent. The VM dies with this process.
    pub async fn create(
        config: &SandboxConfig,
        image: PulledImage,
    ) -> Result<Sandbox, SandboxError> {
        let id = new_id();
        let run_dir = config.home.join("run").join(&id);
        Sandbox::boot(config, image, id, run_dir, false).await
    }

    /// Boots `image` as sandbox `id` in `run_dir` with a detached VMM: it survives this process
    /// (even `kill -9`) until stopped, and [`Sandbox::adopt`] takes it over again.
    pub async fn create_detached(
        config: &SandboxConfig,
        image: PulledImage,
        id: &str,
        run_dir: &Path,
    ) -> Result<Sandbox, SandboxError> {
        Sandbox::boot(config, image, id.to_owned(), run_dir.to_owned(), true).await
    }

    async fn boot(
        config: &SandboxConfig,
        image: PulledImage,
        id: String,
        run_dir: std::path::PathBuf,
        detached: bool,
    ) -> Result<Sandbox, SandboxError> {
        let started = Instant::now();
        let config = config.clone();
        let start_config = config.clone();
        let boot_image = image.clone();
        let plan_id = id.clone();
        let plan_dir = run_dir.clone();
        let (plan, network, prepare) = tokio::task::spawn_blocking(move || {
            // The namespace first: a boot template's VM is built in it too.
            let network = match &config.network {
                Some(networking) => {
                    let network = SandboxNetwork::start(
                        &networking.home,
                        &plan_id,
                        config.network_policy.clone(),
                        &networking.options,
                    )?;
                    if !detached {
                        record_owner(&networking.home, &plan_id)?;
                    }
                    Some(network)
                }
                None => None,
            };
            let mut plan =
                BootPlan::prepare_in(&config, &boot_image, &plan_id, &plan_dir, Purpose::Start)?;
            plan.spec.detached = detached;
            if let Some(restore) = &mut plan.restore {
                restore.cold_spec.detached = detached;
            }
            prepare_run_dir(&plan.spec, &config)?;
            Ok::<_, SandboxError>((plan, network, started.elapsed()))
        })
        .await
        .expect("prepare task")?;
        tracing::info!(sandbox = %id, vmm = %plan.selection, snapshot = %plan.snapshot_note, "starting VM");

        let vmm_started = Instant::now();
        let console = plan.spec.console_log.clone();
        let selection = plan.selection.clone();
        let planned_spec = plan.spec.clone();
        let cold_spec = plan.restore.as_ref().map(|r| r.cold_spec.clone());
        let start =
            tokio::task::spawn_blocking(move || crate::restore::start(&plan, &start_config))
                .await
                .expect("start task");
        let (mut vm, resume) = match start {
            Ok(started) => started,
            Err(err) => {
                let _ = std::fs::remove_dir_all(&run_dir);
                return Err(err);
            }
        };
        let vmm_start = vmm_started.elapsed();
        let restore = vm.restored_in();
        // A planned restore that fell back to a cold boot ran the cold spec.
        let spec = match (cold_spec, &resume) {
            (Some(cold), None) => cold,
            _ => planned_spec,
        };
        crate::spec_record::record_spec(&run_dir, &spec);

        let guest_started = Instant::now();
        let deadline = tokio::time::Instant::now() + AGENT_DEADLINE;
        let connected = match (resume, vm.take_agent_stream()) {
            (Some(resume), Some(stream)) => {
                AgentClient::connect_stream_resume(stream, deadline, resume).await
            }
            (resume, _) => connect_agent(vm.agent_endpoint().clone(), deadline, resume).await,
        };
        let client = match connected {
            Ok(client) => client,
            Err(source) => {
                let tail = console_tail(&console); // before the run directory goes
                drop(vm); // kills the VMM, removes the run directory
                return Err(SandboxError::Agent {
                    source,
                    tail,
                    console,
                });
            }
        };
        let timings = BootTimings {
            prepare,
            vmm_start,
            guest_boot: guest_started.elapsed(),
            restore,
        };
        tracing::info!(sandbox = %id, ?timings, "agent ready");
        Ok(Sandbox::from_parts(
            id,
            image,
            client,
            vm,
            timings,
            selection,
            Some(spec),
            console,
            network,
        ))
    }

    /// A sandbox whose VM runs and whose agent is connected.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn from_parts(
        id: String,
        image: PulledImage,
        client: AgentClient,
        vm: Box<dyn RunningVm>,
        timings: BootTimings,
        selection: String,
        spec: Option<VmSpec>,
        console: PathBuf,
        network: Option<SandboxNetwork>,
    ) -> Sandbox {
        Sandbox {
            id,
            image,
            client,
            vm: Arc::new(Mutex::new(vm)),
            timings,
            selection,
            spec,
            _console_trim: ConsoleTrim::start(console),
            network: Mutex::new(network),
            unresponsive: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// The guest no longer answers (the node's watchdog): the next `stop` kills its VM at once
    /// instead of waiting out a clean shutdown the guest would never do.
    pub fn give_up_on_guest(&self) {
        self.unresponsive
            .store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Takes over the detached VM of sandbox `id` in `run_dir` (see [`Sandbox::create_detached`])
    /// and reconnects to its agent within `agent_deadline`. The VMM must still be the process
    /// that started it: otherwise [`VmError::Gone`]. A VM whose agent does not answer is killed.
    ///
    /// With `network` (its settings and the policy the sandbox had) the sandbox's network, which
    /// outlived the previous process with the VM, is served again.
    pub async fn adopt(
        image: PulledImage,
        id: &str,
        run_dir: &Path,
        agent_deadline: Duration,
        network: Option<(&crate::Networking, hearth_net::policy::NetworkPolicy)>,
    ) -> Result<Sandbox, SandboxError> {
        let network = match network {
            Some((networking, policy)) => Some(SandboxNetwork::adopt(
                &networking.home,
                id,
                policy,
                &networking.options,
            )?),
            None => None,
        };
        let dir = run_dir.to_owned();
        let vm = tokio::task::spawn_blocking(move || hearth_vm::adopt(&dir))
            .await
            .expect("adopt task")?;
        let console = hearth_vm::DetachedRecord::read(run_dir)
            .map(|r| r.console_log)
            .unwrap_or_else(|_| run_dir.join("console.log"));
        let deadline = tokio::time::Instant::now() + agent_deadline;
        let client = match reconnect_agent(vm.agent_endpoint().clone(), deadline, id).await {
            Ok(client) => client,
            Err(source) => {
                let tail = console_tail(&console);
                drop(vm); // kills the VMM, removes the run directory
                return Err(SandboxError::Agent {
                    source,
                    tail,
                    console,
                });
            }
        };
        tracing::info!(sandbox = %id, pid = vm.pid(), "re-attached to a running VM");
        Ok(Sandbox::from_parts(
            id.to_owned(),
            image,
            client,
            vm,
            BootTimings::default(),
            "adopted from a previous hearth process".into(),
            crate::spec_record::read_spec_record(run_dir),
            console,
            network,
        ))
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn image(&self) -> &PulledImage {
        &self.image
    }

    /// The agent: exec, files, info.
    pub fn client(&self) -> &AgentClient {
        &self.client
    }

    pub fn timings(&self) -> BootTimings {
        self.timings
    }

    /// Which VMM and accelerator run this sandbox, and why.
    pub fn selection(&self) -> &str {
        &self.selection
    }

    /// Process id of the VMM.
    pub fn vmm_pid(&self) -> u32 {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).pid()
    }

    /// The VM's run directory (sockets, scratch disk, console log).
    pub fn run_dir(&self) -> std::path::PathBuf {
        self.vm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .run_dir()
            .to_owned()
    }

    /// How the VM ended, if it has (checked without waiting); its run directory is then removed.
    /// `None` while it runs, or while another call holds the VM (a stop in progress).
    pub fn exited(&self) -> Option<VmExit> {
        let mut vm = self.vm.try_lock().ok()?;
        vm.wait_timeout(Duration::ZERO).ok().flatten()
    }

    /// Lets go of the VM without stopping it: dropping the sandbox afterwards leaves a detached VM
    /// running for a later [`Sandbox::adopt`].
    pub fn release(&self) {
        self.vm.lock().unwrap_or_else(|e| e.into_inner()).release();
        if let Some(network) = self.lock_network().take() {
            network.release();
        }
    }

    /// The egress policy in force, if the sandbox has a network.
    pub fn network_policy(&self) -> Option<hearth_net::policy::NetworkPolicy> {
        self.lock_network().as_ref().map(|n| n.policy())
    }

    /// Replaces the egress policy while the sandbox runs: in force for new connections and DNS
    /// answers at once, and open connections it refuses are cut. `Ok(false)`: no network.
    pub fn set_network_policy(
        &self,
        policy: hearth_net::policy::NetworkPolicy,
    ) -> Result<bool, SandboxError> {
        match self.lock_network().as_ref() {
            Some(network) => {
                network.set_policy(policy)?;
                Ok(true)
            }
            None => Ok(false),
        }
    }

    /// Bytes, connections and DNS counters, and the latest refused attempts.
    pub fn network_activity(
        &self,
    ) -> Option<(
        hearth_net::network::NetworkStats,
        Vec<hearth_net::proxy::RefusedAttempt>,
    )> {
        self.lock_network()
            .as_ref()
            .map(|n| (n.stats(), n.refused()))
    }

    fn lock_network(&self) -> std::sync::MutexGuard<'_, Option<SandboxNetwork>> {
        self.network.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// [`Sandbox::destroy`] for a shared sandbox: asks the guest to shut down, waits for the VMM,
    /// kills it if it does not go in time, and removes the run directory. Bounded whatever the
    /// guest does: at most [`SHUTDOWN_GRACE`] for the shutdown request and the VMM's exit together,
    /// then [`KILL_GRACE`] for the kill (plus the wait for the VM's lock if another call holds it).
    pub async fn stop(&self) -> Result<VmExit, SandboxError> {
        let started = Instant::now();
        let vm = self.vm.clone();
        if self.unresponsive.load(std::sync::atomic::Ordering::SeqCst) {
            let exit = tokio::task::spawn_blocking(move || {
                vm.lock().unwrap_or_else(|e| e.into_inner()).kill()
            });
            return Ok(exit.await.expect("kill task")?);
        }
        // `shutdown` is bounded by its own deadline; this one also covers a guest that never
        // accepts the request's stream.
        let asked = matches!(
            tokio::time::timeout(SHUTDOWN_GRACE, self.client.shutdown()).await,
            Ok(Ok(()))
        );
        let exit = tokio::task::spawn_blocking(move || {
            let mut vm = vm.lock().unwrap_or_else(|e| e.into_inner());
            let left = SHUTDOWN_GRACE.saturating_sub(started.elapsed());
            if asked && !left.is_zero() {
                if let Some(exit) = vm.wait_timeout(left)? {
                    return Ok::<_, VmError>(exit);
                }
            }
            vm.stop(KILL_GRACE)
        })
        .await
        .expect("stop task")?;
        Ok(exit)
    }

    /// Kills the VM at once (for Ctrl-C): no guest shutdown, run directory removed.
    pub fn kill_now(&self) {
        if let Ok(mut vm) = self.vm.lock() {
            let _ = vm.kill();
        }
    }

    /// Ends a sandbox whose disk nothing will read again (a finished `hearth run`): the VM is killed
    /// rather than shut down, since a clean shutdown only flushes the scratch disk that is about to
    /// be deleted. Saves the guest's shutdown time (~70 ms under TCG).
    pub async fn discard(self) -> Result<VmExit, SandboxError> {
        drop(self.client);
        let vm = self.vm;
        let exit = tokio::task::spawn_blocking(move || {
            vm.lock().unwrap_or_else(|e| e.into_inner()).kill()
        })
        .await
        .expect("discard task")?;
        Ok(exit)
    }

    /// Asks the agent to shut the guest down, waits for the VMM to exit, and cleans up. A guest that
    /// does not go in time is killed.
    pub async fn destroy(self) -> Result<VmExit, SandboxError> {
        self.stop().await
    }
}

/// Removes the run directories (VM sockets, scratch disks, logs) of hearth processes that died
/// without cleaning up; their VMMs died with them (parent-death signal). Cheap when nothing is stale.
/// The CLI calls it before every command; a long-lived caller calls it at start-up. Their networks
/// (`$HEARTH_HOME/net/<id>`) go too: those whose run directory is gone and whose owner (the hearth
/// process that made them, recorded in the network's directory) is dead.
pub fn sweep_stale(home: &Path) {
    match hearth_vm::remove_stale_run_dirs(&home.join("run")) {
        Ok(removed) => {
            for dir in removed {
                tracing::info!(dir = %dir.display(), "removed run directory of a dead hearth process");
            }
        }
        Err(err) => tracing::warn!(
            "sweeping stale run directories in {}: {err}",
            home.display()
        ),
    }
    // Their VMMs' uid leases and cgroups (host-wide: any hearth's dead VMMs).
    for uid in hearth_vm::confine::sweep_abandoned() {
        tracing::info!(uid, "removed the uid lease and cgroup of a dead VMM");
    }
    let nets = hearth_net::sandbox_net::net_root(home);
    let owned = |id: &str| {
        if home.join("run").join(id).exists() {
            return true;
        }
        match std::fs::read_to_string(nets.join(id).join(OWNER_FILE)) {
            Ok(text) => parse_owner(&text).is_some_and(|owner| owner.is_alive()),
            // Being set up (the owner is written right after the namespace), or unreadable.
            Err(_) => std::fs::metadata(nets.join(id))
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.elapsed().ok())
                .is_none_or(|age| age < NET_SETUP_GRACE),
        }
    };
    match hearth_net::sandbox_net::sweep(home, owned) {
        Ok(removed) => {
            for id in removed {
                tracing::info!(sandbox = %id, "removed the network of a dead hearth process");
            }
        }
        Err(err) => tracing::warn!("sweeping stale sandbox networks: {err}"),
    }
}

/// How long a sandbox network may exist without its owner file (written right after it).
const NET_SETUP_GRACE: Duration = Duration::from_secs(60);
/// In a `hearth run` sandbox's network directory: the pid and start time of the hearth process that
/// made it, so the next command can tell a live run's network from a dead one's at once.
const OWNER_FILE: &str = "owner";

pub(crate) fn record_owner(net_home: &Path, id: &str) -> Result<(), SandboxError> {
    let path = hearth_net::sandbox_net::net_root(net_home)
        .join(id)
        .join(OWNER_FILE);
    let me =
        hearth_vm::ProcessIdentity::of(std::process::id()).ok_or_else(|| SandboxError::Io {
            what: "reading this process's start time".into(),
            source: std::io::Error::other("no /proc entry for this process"),
        })?;
    std::fs::write(&path, format!("{} {}\n", me.pid, me.start_time)).map_err(|source| {
        SandboxError::Io {
            what: format!("writing {}", path.display()),
            source,
        }
    })
}

fn parse_owner(text: &str) -> Option<hearth_vm::ProcessIdentity> {
    let mut fields = text.split_whitespace();
    Some(hearth_vm::ProcessIdentity {
        pid: fields.next()?.parse().ok()?,
        start_time: fields.next()?.parse().ok()?,
    })
}

/// How long a re-attached agent gets to answer its first request before the host reconnects.
const REATTACH_PROBE: Duration = Duration::from_secs(3);

/// Connects to the agent of a VM another hearth process used, and proves the session works with an
/// `info` request. A fresh session that shakes hands but then never answers is ended by a new
/// connection, whose HELLO ends the stuck session in the guest. (Agents before the port-write fix
/// in `hearth-agent/src/stream.rs` did that on most re-attaches; it stays as the safety net, and
/// `serve_recovery` fails if it is needed.) Tries until `deadline`.
async fn reconnect_agent(
    endpoint: AgentEndpoint,
    deadline: tokio::time::Instant,
    id: &str,
) -> Result<AgentClient, ChannelError> {
    loop {
        let client = connect_agent(endpoint.clone(), deadline, None).await?;
        match tokio::time::timeout(REATTACH_PROBE, client.info()).await {
            Ok(Ok(_)) => return Ok(client),
            Ok(Err(e)) if tokio::time::Instant::now() >= deadline => return Err(e),
            Err(_) if tokio::time::Instant::now() >= deadline => {
                return Err(ChannelError::HandshakeTimeout(REATTACH_PROBE))
            }
            Ok(Err(e)) => {
                tracing::warn!(sandbox = %id, "re-attached agent failed ({e}); reconnecting")
            }
            Err(_) => tracing::warn!(
                sandbox = %id,
                "re-attached agent did not answer within {REATTACH_PROBE:?}; reconnecting"
            ),
        }
    }
}

/// Connects to the agent; a VM restored from a template or a snapshot gets `resume` first.
pub(crate) async fn connect_agent(
    endpoint: AgentEndpoint,
    deadline: tokio::time::Instant,
    resume: Option<Resume>,
) -> Result<AgentClient, ChannelError> {
    match (endpoint, resume) {
        (AgentEndpoint::Stream(socket), Some(resume)) => {
            AgentClient::connect_unix_resume(&socket, deadline, resume).await
        }
        (AgentEndpoint::Stream(socket), None) => AgentClient::connect_unix(&socket, deadline).await,
        (AgentEndpoint::HybridVsock { socket, port }, resume) => {
            AgentClient::connect_hybrid_vsock_resume(&socket, port, deadline, resume).await
        }
    }
}

/// Creates the VM's run directory and its scratch disk (removed again if that fails).
pub(crate) fn prepare_run_dir(spec: &VmSpec, config: &SandboxConfig) -> Result<(), SandboxError> {
    use std::os::unix::fs::DirBuilderExt;
    let dir = &spec.run_dir;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| SandboxError::Io {
            what: format!("creating run directory {}", dir.display()),
            source,
        })?;
    let scratch = dir.join("scratch.ext4");
    if let Err(err) =
        hearth_vm::scratch::create_scratch_disk(&config.home, &scratch, config.scratch_bytes)
    {
        let _ = std::fs::remove_dir_all(dir);
        return Err(err.into());
    }
    Ok(())
}

/// The last lines of the guest console, for errors: at most 20 lines of its last
/// [`CONSOLE_TAIL_BYTES`], however large a flooding guest made the file.
pub(crate) fn console_tail(console: &Path) -> String {
    let text = hearth_vm::read_log_tail(console, CONSOLE_TAIL_BYTES);
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Attack: a guest floods its console until the host file is huge. Quoting its tail in an error
    /// reads only the last [`CONSOLE_TAIL_BYTES`] (a 4 GiB sparse file here: reading it whole would
    /// take 4 GiB of memory and seconds, not milliseconds).
    #[test]
    fn the_console_tail_of_a_flooded_console_reads_only_the_tail() {
        use std::os::unix::fs::FileExt;
        let dir = tempfile::tempdir().unwrap();
        let console = dir.path().join("console.log");
        let file = std::fs::File::create(&console).unwrap();
        file.set_len(4 << 30).unwrap();
        file.write_all_at(b"\nflood\nlast words\n", 4 << 30)
            .unwrap();
        let started = std::time::Instant::now();
        let tail = console_tail(&console);
        assert!(tail.ends_with("flood\nlast words"), "{tail:?}");
        assert!(tail.len() as u64 <= CONSOLE_TAIL_BYTES);
        assert!(started.elapsed() < Duration::from_secs(1));
    }

    /// A restored guest waits for its RESUME (clock, entropy, hostname); a Firecracker guest is
    /// reached through its hybrid vsock socket, so the RESUME goes right after the `CONNECT`
    /// exchange, before HELLO, exactly as on QEMU's stream. Here a peer plays Firecracker's socket
    /// and records what the host sends.
    #[tokio::test]
    async fn a_restored_guest_behind_vsock_gets_its_resume_before_hello() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("v.sock");
        let listener = tokio::net::UnixListener::bind(&socket).unwrap();
        let peer = tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut seen = Vec::new();
            let mut byte = [0u8; 1];
            // CONNECT line, then answer it as Firecracker does and read two more lines.
            while !seen.ends_with(b"\n") {
                stream.read_exact(&mut byte).await.unwrap();
                seen.push(byte[0]);
            }
            stream.write_all(b"OK 1073741824\n").await.unwrap();
            while !String::from_utf8_lossy(&seen).contains(" HELLO") && seen.len() < 4096 {
                stream.read_exact(&mut byte).await.unwrap();
                seen.push(byte[0]);
            }
            String::from_utf8(seen).unwrap()
        });
        let endpoint = AgentEndpoint::HybridVsock { socket, port: 1024 };
        let resume = crate::restore::resume_for("hearth-x").unwrap();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
        let connecting = tokio::spawn(connect_agent(endpoint, deadline, Some(resume)));
        let seen = peer.await.unwrap();
        let lines: Vec<&str> = seen.lines().filter(|l| !l.is_empty()).collect();
        assert_eq!(lines[0], "CONNECT 1024");
        assert!(
            lines[1].contains(" RESUME ") && lines[1].ends_with(" hearth-x"),
            "{seen}"
        );
        assert!(lines[2].contains(" HELLO"), "{seen}");
        // Nobody answers HELLO: the connect gives up at its deadline.
        assert!(connecting.await.unwrap().is_err());
    }
}
