//! The Firecracker backend: `firecracker` (optionally under `jailer`) with virtio-mmio block devices,
//! the agent channel on a hybrid vsock, the guest console on Firecracker's stdout, and its log and
//! metrics in files. `config.rs` holds the typed configuration (one type per API resource),
//! `layout.rs` where files live with and without a chroot, `jailer.rs` the jailer's argv and chroot,
//! `api.rs` the REST client, `running.rs` a started VM, `failure.rs` reading failures from logs,
//! `error.rs` what only Firecracker can fail at (travelling as [`VmError::Backend`]).
//!
//! Two ways to configure, chosen by [`ConfigMode`]: the REST API (`Api`, the default: each call's
//! error is reported on its own) or a `--config-file` (`ConfigFile`, one process start). Both write
//! the full configuration to `vm_config.json` in the run directory (in API mode as the record of
//! what was sent), so `--dry-run` shows the same document either way.

pub mod api;
pub mod config;
mod error;
mod failure;
pub mod jailer;
mod layout;
mod resource_id;
mod running;

use std::path::{Path, PathBuf};

pub use api::{ApiError, FirecrackerApi, InstanceInfo};
pub use config::{RateLimiter, TokenBucket, VmConfig};
pub use error::FirecrackerError;
pub use failure::find_failure;
pub use jailer::JailerConfig;
pub use layout::{snapshot_memory, Layout};
pub use running::RunningFirecracker;

use crate::spec::{SpecError, VmSpec};
use crate::vmm::{Capabilities, LaunchPlan, RunningVm, VmError, Vmm};

/// virtio-mmio transport, block devices, overlayfs, the virtio vsock transport and the NIC
/// (virtio_net). No virtio_console: the agent talks over vsock here.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "overlay",
    "vsock",
    "vmw_vsock_virtio_transport_common",
    "vmw_vsock_virtio_transport",
    "virtio_net",
];

/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// How the VM's configuration reaches Firecracker.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum ConfigMode {
    /// `PUT` each resource over the API socket, then `InstanceStart`.
    #[default]
    Api,
    /// `--config-file`: Firecracker configures and boots by itself; the API socket serves control.
    ConfigFile,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FirecrackerVmm {
    binary: PathBuf,
    jailer: Option<JailerConfig>,
    mode: ConfigMode,
    /// Per-drive rate limiters, keyed by drive serial.
    rate_limiters: Vec<(String, RateLimiter)>,
}

/// What one start needs, computed once so `dry_run` and `start` cannot disagree.
pub(crate) struct Prepared {
    pub id: String,
    pub layout: Layout,
    pub config: VmConfig,
    pub plan: LaunchPlan,
}

impl FirecrackerVmm {
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        FirecrackerVmm {
            binary: binary.into(),
            jailer: None,
            mode: ConfigMode::default(),
            rate_limiters: Vec::new(),
        }
    }

    /// Firecracker from `HEARTH_FIRECRACKER_BIN` or `PATH`, unjailed, configured over the API.
    pub fn for_host() -> Result<Self, VmError> {
        Ok(FirecrackerVmm::new(find_binary()?))
    }

    pub fn with_jailer(mut self, jailer: JailerConfig) -> Self {
        self.jailer = Some(jailer);
        self
    }

    pub fn with_config_mode(mut self, mode: ConfigMode) -> Self {
        self.mode = mode;
        self
    }

    /// Limits the drive with `serial` (e.g. [`crate::spec::SCRATCH_SERIAL`]).
    pub fn with_rate_limiter(mut self, serial: impl Into<String>, limiter: RateLimiter) -> Self {
        self.rate_limiters.push((serial.into(), limiter));
        self
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    pub fn jailer(&self) -> Option<&JailerConfig> {
        self.jailer.as_ref()
    }

    pub fn config_mode(&self) -> ConfigMode {
        self.mode
    }

    /// Like [`Vmm::start`] but returns the concrete handle, which also offers the API client.
    pub fn start_firecracker(&self, spec: &VmSpec) -> Result<RunningFirecracker, VmError> {
        RunningFirecracker::start(self, spec)
    }

    /// The configuration `start` would send, with paths as Firecracker sees them.
    pub fn vm_config(&self, spec: &VmSpec) -> Result<VmConfig, VmError> {
        Ok(self.prepare(spec)?.config)
    }

    /// The file name the jailer uses for the chroot path (`<base>/<exec-name>/<id>/root`).
    pub(crate) fn exec_file_name(&self) -> String {
        self.binary
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "firecracker".into())
    }

    pub(crate) fn prepare(&self, spec: &VmSpec) -> Result<Prepared, VmError> {
        spec.validate()?;
        if !matches!(spec.memory, crate::spec::GuestMemory::Anonymous) {
            return Err(VmError::Unsupported(
                "Firecracker guests have anonymous memory (a restore maps its snapshot's memory \
                 file itself): leave VmSpec::memory as GuestMemory::Anonymous"
                    .into(),
            ));
        }
        let id = jailer::vm_id(&spec.run_dir)?;
        let layout = match &self.jailer {
            Some(jail) => {
                Layout::jailed(spec, &jail.chroot_base(spec), &self.exec_file_name(), &id)
            }
            None => Layout::plain(spec),
        };
        for socket in layout.host_sockets() {
            if socket.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
                return Err(SpecError::SocketPathTooLong(socket).into());
            }
        }
        let config = VmConfig::build(spec, &layout, &self.rate_limiters);
        let mut firecracker_args = vec!["--api-sock".to_owned(), layout.vmm_api_socket()];
        // A restore goes through the API whatever the mode: a config file would boot the kernel.
        if self.mode == ConfigMode::ConfigFile && spec.restore_from.is_none() {
            firecracker_args.extend(["--config-file".to_owned(), layout.vmm_config()]);
        }
        let (program, args) = match &self.jailer {
            // The jailer passes `--id` to Firecracker itself.
            Some(jail) => (
                jail.binary.clone(),
                jail.render(spec, &self.binary, &id, firecracker_args),
            ),
            None => {
                firecracker_args.extend(["--id".to_owned(), id.clone()]);
                (self.binary.clone(), firecracker_args)
            }
        };
        let plan = LaunchPlan {
            program,
            args,
            files: vec![(layout.host_config(), config.to_json())],
        };
        Ok(Prepared {
            id,
            layout,
            config,
            plan,
        })
    }
}

impl Vmm for FirecrackerVmm {
    fn name(&self) -> &'static str {
        "firecracker"
    }

    fn guest_modules(&self) -> &'static [&'static str] {
        GUEST_MODULES
    }

    /// Saves and restores through Firecracker's own snapshots (`/snapshot/create`,
    /// `/snapshot/load`); boot templates are QEMU's only so far.
    fn capabilities(&self) -> Capabilities {
        Capabilities {
            network: true,
            save_state: true,
            ..Capabilities::default()
        }
    }

    fn dry_run(&self, spec: &VmSpec) -> Result<LaunchPlan, VmError> {
        Ok(self.prepare(spec)?.plan)
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmError> {
        Ok(Box::new(self.start_firecracker(spec)?))
    }
}

/// `firecracker` from `HEARTH_FIRECRACKER_BIN` or `PATH`.
pub fn find_binary() -> Result<PathBuf, VmError> {
    find("HEARTH_FIRECRACKER_BIN", "firecracker").ok_or_else(|| {
        VmError::Unsupported(
            "firecracker not found in PATH: download a release from Firecracker's GitHub releases \
             and put `firecracker` in PATH (or set HEARTH_FIRECRACKER_BIN)"
                .into(),
        )
    })
}

/// `jailer` from `HEARTH_JAILER_BIN` or `PATH`, if present.
pub fn find_jailer() -> Option<PathBuf> {
    find("HEARTH_JAILER_BIN", "jailer")
}

fn find(variable: &str, name: &str) -> Option<PathBuf> {
    if let Some(path) = std::env::var_os(variable).filter(|p| !p.is_empty()) {
        return Some(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join(name))
        .find(|candidate| candidate.is_file())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::Drive;

    fn spec() -> VmSpec {
        let mut spec = VmSpec::new("/k/vmlinux", "/k/initrd", "/h/run/vm1");
        spec.drives = vec![
            Drive::rootfs("/h/r.ext4"),
            Drive::scratch("/h/run/vm1/s.ext4"),
        ];
        spec
    }

    #[test]
    fn dry_run_shows_the_command_and_the_config_file() {
        let vmm =
            FirecrackerVmm::new("/usr/bin/firecracker").with_config_mode(ConfigMode::ConfigFile);
        let plan = vmm.dry_run(&spec()).unwrap();
        assert_eq!(
            plan.command_line(),
            "/usr/bin/firecracker --api-sock /h/run/vm1/firecracker.sock \
             --config-file /h/run/vm1/vm_config.json --id vm1"
        );
        let (path, json) = &plan.files[0];
        assert_eq!(path, Path::new("/h/run/vm1/vm_config.json"));
        let doc: serde_json::Value = serde_json::from_str(json).unwrap();
        assert_eq!(doc["drives"][0]["drive_id"], "hearth_rootfs");
        assert_eq!(doc["drives"][0]["is_read_only"], true);
        assert_eq!(doc["drives"][1]["is_read_only"], false);
        assert_eq!(doc["vsock"]["uds_path"], "/h/run/vm1/agent.sock");
        let boot_args = doc["boot-source"]["boot_args"].as_str().unwrap();
        for param in ["console=ttyS0", "reboot=k", "panic=1", "pci=off", "quiet"] {
            assert!(boot_args.split(' ').any(|p| p == param), "{boot_args}");
        }
        assert!(!boot_args.contains("panic=-1"), "{boot_args}");
    }

    #[test]
    fn api_mode_omits_the_config_file_flag_and_jailed_runs_start_the_jailer() {
        let plain = FirecrackerVmm::new("/usr/bin/firecracker")
            .dry_run(&spec())
            .unwrap();
        assert!(!plain.args.contains(&"--config-file".to_owned()));
        let jailed = FirecrackerVmm::new("/usr/bin/firecracker")
            .with_jailer(JailerConfig::new("/usr/bin/jailer", 100, 100))
            .dry_run(&spec())
            .unwrap();
        assert_eq!(jailed.program, Path::new("/usr/bin/jailer"));
        let tail = &jailed.args[jailed.args.iter().position(|a| a == "--").unwrap() + 1..];
        assert_eq!(tail, ["--api-sock", "/firecracker.sock"]);
        let root = "/h/run/vm1/jail/firecracker/vm1/root";
        assert_eq!(jailed.files[0].0, Path::new(root).join("vm_config.json"));
    }

    #[test]
    fn rate_limiters_attach_to_their_drive() {
        let limiter = RateLimiter {
            bandwidth: Some(TokenBucket {
                size: 1 << 20,
                one_time_burst: None,
                refill_time: 1000,
            }),
            ops: None,
        };
        let config = FirecrackerVmm::new("fc")
            .with_rate_limiter(crate::spec::SCRATCH_SERIAL, limiter.clone())
            .vm_config(&spec())
            .unwrap();
        assert_eq!(config.drives[0].rate_limiter, None);
        assert_eq!(config.drives[1].rate_limiter, Some(limiter));
    }

    #[test]
    fn overlong_jail_socket_paths_are_refused() {
        let mut long = spec();
        long.run_dir = PathBuf::from(format!("/{}", "d".repeat(60)));
        long.agent_socket = long.run_dir.join("a.sock");
        let jailed = FirecrackerVmm::new("fc").with_jailer(JailerConfig::new("jailer", 1, 1));
        assert!(matches!(
            jailed.dry_run(&long),
            Err(VmError::Spec(SpecError::SocketPathTooLong(_)))
        ));
    }
}
