//! Everything decided before a VM starts: which VMM and accelerator (`hearth_vm::select_backend`),
//! which kernel and agent, the initramfs, the run directory and scratch disk, the [`VmSpec`], and
//! whether the VM is restored from a boot template (`crate::restore`, where the backend has the
//! capability). A [`BootPlan`] can be printed (`--dry-run`) or started. Writes only under
//! `$HEARTH_HOME` (initramfs cache, boot templates, run directory).

use std::path::{Path, PathBuf};

use hearth_image::PulledImage;
use hearth_net::network::NetworkOptions;
use hearth_net::policy::NetworkPolicy;
use hearth_vm::kernel::resolve_kernel;
use hearth_vm::{
    select_backend, Accel, BackendRequest, Chosen, Drive, LaunchPlan, NetworkInterface, VmSpec,
    Vmm, HOSTNAME_PARAM,
};

use crate::restore::{plan_restore, RestorePlan};
use crate::SandboxError;

pub use hearth_vm::{Jailer, VmmChoice};

/// What a sandbox is made of.
#[derive(Debug, Clone)]
pub struct SandboxConfig {
    pub home: PathBuf,
    pub vcpus: u32,
    pub memory_mib: u32,
    /// Size of the sparse per-sandbox writable disk.
    pub scratch_bytes: u64,
    pub vmm: VmmChoice,
    pub accel: Accel,
    /// `--kernel`: a kernel directory or file; `None` = `$HEARTH_HOME/kernel`.
    pub kernel: Option<PathBuf>,
    /// The static guest agent; `None` = [`locate_agent`]'s search.
    pub agent: Option<PathBuf>,
    /// Whether and as whom Firecracker runs through its jailer (default: a uid of each VM's own,
    /// wherever hearth confines its VMMs).
    pub jailer: Jailer,
    /// QEMU under TCG: its translation cache in MiB (`--tcg-cache`; default
    /// [`hearth_vm::qemu::TCG_CACHE_DEFAULT_MIB`]).
    pub tcg_cache_mib: u32,
    /// QEMU: boot templates kept on disk at most (`--max-templates`; default
    /// [`hearth_vm::qemu::MAX_TEMPLATES_DEFAULT`]).
    pub max_templates: usize,
    /// Restore QEMU VMs from a snapshot template instead of booting them (default on;
    /// `--no-snapshot`, `HEARTH_SNAPSHOT=0`).
    pub snapshot: bool,
    /// Sandbox networking (the CLI and the daemon turn it on; `None`: the guest has no NIC).
    pub network: Option<Networking>,
    /// This sandbox's egress policy (with [`SandboxConfig::network`]); default `none`.
    pub network_policy: NetworkPolicy,
    /// Whether the host has room for a new copy of a boot template's memory (a restore that needs
    /// one boots cold otherwise); the node's daemon asks its capacity, the CLI has no bound.
    pub template_memory_room: MemoryRoom,
}

/// Asks, in MiB, whether the host may allocate that much more, and reserves it (see
/// [`SandboxConfig::template_memory_room`]). Unbounded by default.
#[derive(Clone, Default)]
pub struct MemoryRoom(Option<std::sync::Arc<dyn Fn(u64) -> Option<RoomGrant> + Send + Sync>>);

impl MemoryRoom {
    /// `reserve(mib)` grants the room (held until the grant is dropped) or refuses it (`None`).
    pub fn new(reserve: impl Fn(u64) -> Option<RoomGrant> + Send + Sync + 'static) -> MemoryRoom {
        MemoryRoom(Some(std::sync::Arc::new(reserve)))
    }

    /// The room for `mib` more, reserved until the grant is dropped; `None`: no room.
    pub fn reserve(&self, mib: u64) -> Option<RoomGrant> {
        match &self.0 {
            Some(reserve) => reserve(mib),
            None => Some(RoomGrant::unbounded()),
        }
    }
}

impl std::fmt::Debug for MemoryRoom {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(if self.0.is_some() {
            "MemoryRoom(checked)"
        } else {
            "MemoryRoom(unbounded)"
        })
    }
}

/// Room reserved by [`MemoryRoom::reserve`]: counted as taken by whoever granted it until this is
/// dropped, which the restore does once the memory it was for exists (and is counted as such), so
/// two restores asking at the same moment cannot both be granted the same room.
pub struct RoomGrant(Option<Box<dyn FnOnce() + Send + Sync>>);

impl RoomGrant {
    /// A grant that gives the room back by calling `release` when dropped.
    pub fn new(release: impl FnOnce() + Send + Sync + 'static) -> RoomGrant {
        RoomGrant(Some(Box::new(release)))
    }

    /// A grant with nothing to give back (no bound).
    pub fn unbounded() -> RoomGrant {
        RoomGrant(None)
    }
}

impl Drop for RoomGrant {
    fn drop(&mut self) {
        if let Some(release) = self.0.take() {
            release();
        }
    }
}

impl std::fmt::Debug for RoomGrant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RoomGrant")
    }
}

/// How sandboxes get their network: one namespace, tap, firewall, resolver and egress proxy each
/// (`hearth_net::network`).
#[derive(Debug, Clone)]
pub struct Networking {
    pub options: NetworkOptions,
    /// The directory whose `net/` holds the sandboxes' namespaces: `$HEARTH_HOME` for `hearth run`,
    /// the node's own directory for the daemon, so each sweeps only its own.
    pub home: PathBuf,
}

impl Networking {
    /// The NIC a sandbox's VM gets: the tap inside the sandbox's own namespace.
    pub fn interface(&self, id: &str) -> NetworkInterface {
        NetworkInterface {
            tap: hearth_net::addressing::TAP_NAME.into(),
            mac: hearth_net::addressing::GUEST_MAC.into(),
            netns: Some(
                hearth_net::sandbox_net::net_root(&self.home)
                    .join(id)
                    .join("netns"),
            ),
        }
    }
}

impl SandboxConfig {
    pub fn new(home: impl Into<PathBuf>) -> Self {
        SandboxConfig {
            home: home.into(),
            vcpus: 1,
            memory_mib: 512,
            scratch_bytes: hearth_vm::scratch::DEFAULT_SCRATCH_BYTES,
            vmm: VmmChoice::Auto,
            accel: Accel::Auto,
            kernel: None,
            agent: None,
            jailer: Jailer::Default,
            tcg_cache_mib: hearth_vm::qemu::TCG_CACHE_DEFAULT_MIB,
            max_templates: hearth_vm::qemu::MAX_TEMPLATES_DEFAULT,
            snapshot: crate::restore::snapshots_enabled_by_env(),
            network: None,
            network_policy: NetworkPolicy::none(),
            template_memory_room: MemoryRoom::default(),
        }
    }
}

/// A VM ready to start (or to print).
pub struct BootPlan {
    pub vmm: Box<dyn Vmm>,
    /// Why this VMM and accelerator were chosen.
    pub selection: String,
    /// What starts: the restore spec when `restore` is set, the cold-boot spec otherwise.
    pub spec: VmSpec,
    /// Set when the VM is restored from a snapshot template.
    pub restore: Option<RestorePlan>,
    /// Why the VM is restored or booted cold.
    pub snapshot_note: String,
}

impl BootPlan {
    /// Chooses the backend, resolves kernel and agent, builds (or reuses) the initramfs, lays out
    /// the VM in `$HEARTH_HOME/run/<id>` and, on QEMU with snapshots on, plans a restore (for
    /// [`Purpose::Start`], building the template first if needed: one cold boot plus a save, after
    /// which it is reused; a template that cannot be built means a cold boot and a warning).
    /// Creates nothing in the run directory yet.
    pub fn prepare(
        config: &SandboxConfig,
        image: &PulledImage,
        id: &str,
        purpose: Purpose,
    ) -> Result<BootPlan, SandboxError> {
        let run_dir = config.home.join("run").join(id);
        BootPlan::prepare_in(config, image, id, &run_dir, purpose)
    }

    /// [`BootPlan::prepare`] with the run directory chosen by the caller (the node keeps its VMs
    /// apart from `hearth run`'s, whose stale sweep owns `$HEARTH_HOME/run`).
    pub fn prepare_in(
        config: &SandboxConfig,
        image: &PulledImage,
        id: &str,
        run_dir: &Path,
        purpose: Purpose,
    ) -> Result<BootPlan, SandboxError> {
        let home = &config.home;
        let kernel = resolve_kernel(home, config.kernel.as_deref())?;
        let Chosen { vmm, reason } = select_backend(&BackendRequest {
            home,
            vmm: config.vmm,
            accel: config.accel,
            kernel: &kernel.image,
            jailer: config.jailer,
            tcg_cache_mib: config.tcg_cache_mib,
            max_templates: config.max_templates,
            dry_run: purpose == Purpose::DryRun,
        })?;
        let agent = locate_agent(config.agent.as_deref(), home)?;
        let initramfs = hearth_vm::initramfs::agent_initramfs(
            home,
            &agent,
            kernel.modules_dir.as_deref(),
            vmm.guest_modules(),
        )?;
        let mut spec = VmSpec::new(&kernel.image, initramfs, run_dir);
        spec.vcpus = config.vcpus;
        spec.memory_mib = config.memory_mib;
        let hostname = hostname_for(id);
        spec.cmdline.set(format!("{HOSTNAME_PARAM}={hostname}"));
        spec.drives = vec![
            Drive::rootfs(&image.rootfs),
            Drive::scratch(run_dir.join("scratch.ext4")),
        ];
        spec.network = config.network.as_ref().map(|n| n.interface(id));
        let (spec, restore, snapshot_note) =
            match plan_restore(config, vmm.as_ref(), &spec, &hostname, purpose) {
                Ok((restore_spec, restore)) => {
                    let note = format!(
                        "restore from boot template {} ({}{})",
                        restore.template.id,
                        restore.template.dir.display(),
                        if restore.template.built {
                            ""
                        } else {
                            "; built on first start"
                        }
                    );
                    (restore_spec, Some(restore), note)
                }
                Err(why) => {
                    if vmm.capabilities().boot_templates && config.snapshot {
                        tracing::warn!("booting cold: {why}");
                    }
                    (spec, None, format!("cold boot: {why}"))
                }
            };
        Ok(BootPlan {
            vmm,
            selection: reason,
            spec,
            restore,
            snapshot_note,
        })
    }

    /// The exact command line and configuration `start` would use.
    pub fn dry_run(&self) -> Result<LaunchPlan, SandboxError> {
        Ok(self.vmm.dry_run(&self.spec)?)
    }
}

pub(crate) fn hostname_for(id: &str) -> String {
    format!("hearth-{}", &id[..id.len().min(12)])
}

/// Whether a plan is for starting a VM or only for showing it (`--dry-run`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Purpose {
    Start,
    DryRun,
}

/// Finds the static guest agent: `explicit` (`--agent`), `HEARTH_AGENT`, `$HEARTH_HOME/agent/hearth-agent`
/// (installed by `hearth setup`), then the build tree beside this executable
/// (`target/x86_64-unknown-linux-gnu/release/hearth-agent`, as `scripts/build-agent.sh` builds it).
pub fn locate_agent(explicit: Option<&Path>, home: &Path) -> Result<PathBuf, SandboxError> {
    let mut candidates: Vec<PathBuf> = Vec::new();
    if let Some(path) = explicit {
        candidates.push(path.to_path_buf());
    } else {
        if let Some(path) = std::env::var_os("HEARTH_AGENT").filter(|p| !p.is_empty()) {
            candidates.push(path.into());
        }
        candidates.push(home.join("agent/hearth-agent"));
        if let Some(target) = std::env::current_exe().ok().and_then(|exe| {
            // <target>/<profile>/hearth, or <target>/<profile>/deps/<test binary>
            exe.ancestors()
                .skip(1)
                .take(3)
                .find(|dir| dir.join("x86_64-unknown-linux-gnu").is_dir())
                .map(Path::to_path_buf)
        }) {
            candidates.push(target.join("x86_64-unknown-linux-gnu/release/hearth-agent"));
        }
    }
    if let Some(found) = candidates.iter().find(|p| p.is_file()) {
        return Ok(found.clone());
    }
    Err(SandboxError::NoAgent {
        searched: candidates
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", "),
    })
}

/// A fresh sandbox id: 16 hex digits, unique enough to name run directories.
pub fn new_id() -> String {
    format!("{:016x}", rand::random::<u64>())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn explicit_agent_must_exist() {
        let home = tempfile::tempdir().unwrap();
        let missing = home.path().join("nope");
        let err = locate_agent(Some(&missing), home.path()).unwrap_err();
        assert!(
            err.to_string().contains(&missing.display().to_string()),
            "{err}"
        );
    }

    #[test]
    fn installed_agent_in_home_is_found() {
        let home = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(home.path().join("agent")).unwrap();
        std::fs::write(home.path().join("agent/hearth-agent"), b"x").unwrap();
        if std::env::var_os("HEARTH_AGENT").is_none() {
            assert_eq!(
                locate_agent(None, home.path()).unwrap(),
                home.path().join("agent/hearth-agent")
            );
        }
    }

    #[test]
    fn ids_are_distinct_hex() {
        let (a, b) = (new_id(), new_id());
        assert_ne!(a, b);
        assert!(a.len() == 16 && a.chars().all(|c| c.is_ascii_hexdigit()));
        assert_eq!(hostname_for(&a), format!("hearth-{}", &a[..12]));
    }
}
