//! The QEMU backend: `qemu-system-x86_64 -M microvm` with virtio-mmio block devices, the agent channel
//! on a virtio-serial port bound to a Unix socket, the serial console in a file and QMP on a Unix
//! socket for control. `argv.rs` renders the command line, `running.rs` owns a started VM, `qmp.rs`
//! speaks QMP, `snapshot/` builds boot templates, saves running VMs and restores VMs from either,
//! `kvm_probe.rs` finds out whether KVM boots guests here, `error.rs` holds what only QEMU can fail
//! at (travelling as [`VmError::Backend`]).

mod argv;
mod error;
mod kvm_probe;
mod memory;
mod qmp;
mod running;
pub mod snapshot;

use std::path::{Path, PathBuf};

pub use error::QemuError;
pub use kvm_probe::KvmBootProbe;
pub use memory::{release_unused_template_copies, template_copies_bytes};
pub use qmp::{Qmp, QmpError, QmpEvent};
pub use running::RunningQemu;
pub use snapshot::{ensure_template, SaveError, SnapshotError, Template};

use crate::accel::{Accel, Selection};
use crate::spec::{GuestMemory, VmSpec};
use crate::vmm::{BootTemplate, BootTemplates, Capabilities, LaunchPlan, RunningVm, VmError, Vmm};

/// Name of the virtio-serial port carrying the agent protocol (`/sys/class/virtio-ports/*/name`).
pub const AGENT_PORT_NAME: &str = "hearth.agent";

/// Guest modules for what this backend offers: virtio-mmio transport, block devices, the
/// virtio-serial agent port, overlayfs, the NIC (virtio_net pulls in net_failover and failover).
/// No vsock: QEMU here cannot offer vhost-vsock.
pub const GUEST_MODULES: &[&str] = &[
    "virtio_mmio",
    "virtio_blk",
    "virtio_console",
    "overlay",
    "virtio_net",
];

/// `-cpu` under TCG. Measured on the floor initramfs (5 boots each, same run): qemu64 and `max`
/// boot equally fast within noise; qemu64 is the default and runs the x86-64 baseline static agent.
/// `+arat` (the local APIC timer keeps running in deep C-states, which TCG's does) lets the guest
/// kernel use that timer one-shot and stop its tick when idle: without it Linux keeps the 250 Hz
/// periodic tick (no broadcast timer on microvm), and every idle guest woke its QEMU ~500 times a
/// second, 2.3% of a host core each (bench/README, density).
const TCG_CPU: &str = "qemu64,+arat";

/// TCG's translation cache in MiB by default (`--tcg-cache`). QEMU 7.2's own default is 1 GiB,
/// touched as guest code runs, which would make the VMM's memory limit
/// (`crate::confine::VMM_OVERHEAD_MIB`) a matter of luck; a small guest's hot code fits several
/// times over (QEMU flushes the cache when it fills). Measured (bench/README, density): an idle
/// restored busybox guest holds ~23 MiB of translated code after one exec.
pub const TCG_CACHE_DEFAULT_MIB: u32 = 128;
/// The smallest `--tcg-cache` accepted: below it a guest's working set thrashes the cache (8 MiB
/// already made the first exec of an idle busybox sandbox ~3x slower).
pub const TCG_CACHE_MIN_MIB: u32 = 8;
/// Boot templates a node keeps on disk by default (`--max-templates`): one per VM configuration
/// in use (memory size, vCPUs, network or not); a busybox template holds ~70 MB.
pub const MAX_TEMPLATES_DEFAULT: usize = 16;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QemuVmm {
    binary: PathBuf,
    accel: Accel,
    /// Host TSC kHz, required under TCG (see `crate::tsc`).
    tsc_khz: Option<u32>,
    /// TCG's translation cache (`tb-size`), at most [`TCG_CACHE_DEFAULT_MIB`].
    tcg_cache_mib: u32,
    /// Boot templates kept on disk at most (`snapshot::store`).
    max_templates: usize,
}

impl QemuVmm {
    /// A backend with a decided accelerator. Under TCG `tsc_khz` is required.
    pub fn new(
        binary: impl Into<PathBuf>,
        accel: Accel,
        tsc_khz: Option<u32>,
    ) -> Result<Self, VmError> {
        match (accel, tsc_khz) {
            (Accel::Auto, _) => Err(VmError::Unsupported(
                "QemuVmm needs a decided accelerator: resolve --accel auto with accel::select first".into(),
            )),
            (Accel::Tcg, None) => Err(VmError::Unsupported(
                "TCG guests need the host TSC frequency (tsc::host_tsc_khz)".into(),
            )),
            _ => Ok(QemuVmm {
                binary: binary.into(),
                accel,
                tsc_khz,
                tcg_cache_mib: TCG_CACHE_DEFAULT_MIB,
                max_templates: MAX_TEMPLATES_DEFAULT,
            }),
        }
    }

    /// The same backend with TCG's translation cache set to `mib` (`--tcg-cache`): less host
    /// memory per guest for more re-translation. Only between [`TCG_CACHE_MIN_MIB`] and
    /// [`TCG_CACHE_DEFAULT_MIB`]: the VMM's memory limit is sized for the default.
    pub fn with_tcg_cache_mib(mut self, mib: u32) -> Result<Self, VmError> {
        if !(TCG_CACHE_MIN_MIB..=TCG_CACHE_DEFAULT_MIB).contains(&mib) {
            return Err(VmError::Unsupported(format!(
                "a TCG translation cache of {mib} MiB: it must be {TCG_CACHE_MIN_MIB} to \
                 {TCG_CACHE_DEFAULT_MIB} MiB"
            )));
        }
        self.tcg_cache_mib = mib;
        Ok(self)
    }

    /// The same backend keeping at most `count` boot templates on disk (`--max-templates`, at
    /// least 1; `--no-snapshot` is how a node does without).
    pub fn with_max_templates(mut self, count: usize) -> Result<Self, VmError> {
        if count == 0 {
            return Err(VmError::Unsupported(
                "keeping at most 0 boot templates: use --no-snapshot to boot every VM cold".into(),
            ));
        }
        self.max_templates = count;
        Ok(self)
    }

    /// How many boot templates this backend keeps on disk at most.
    pub fn max_templates(&self) -> usize {
        self.max_templates
    }

    /// Finds QEMU, picks the accelerator (`Auto` probes KVM by booting the floor initramfs on
    /// `probe_kernel`, once per host boot) and measures the TSC when TCG is chosen.
    pub fn for_host(
        home: &Path,
        requested: Accel,
        probe_kernel: &Path,
    ) -> Result<(Self, Selection), VmError> {
        let binary = find_binary()?;
        let probe = KvmBootProbe::new(home, &binary, probe_kernel);
        let selection = crate::accel::select(requested, &probe);
        let tsc_khz = match selection.accel {
            Accel::Tcg => Some(crate::tsc::host_tsc_khz(home).map_err(QemuError::Tsc)?),
            _ => None,
        };
        Ok((QemuVmm::new(binary, selection.accel, tsc_khz)?, selection))
    }

    pub fn accel(&self) -> Accel {
        self.accel
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Like [`Vmm::start`] but returns the concrete handle, which also offers QMP.
    pub fn start_qemu(&self, spec: &VmSpec) -> Result<RunningQemu, VmError> {
        RunningQemu::start(self, spec)
    }

    fn plan(&self, spec: &VmSpec) -> Result<LaunchPlan, VmError> {
        spec.validate()?;
        Ok(LaunchPlan {
            program: self.binary.clone(),
            args: argv::render(self, spec),
            files: Vec::new(),
        })
    }
}

impl Vmm for QemuVmm {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn guest_modules(&self) -> &'static [&'static str] {
        GUEST_MODULES
    }

    fn capabilities(&self) -> Capabilities {
        Capabilities {
            boot_templates: true,
            save_state: true,
            network: true,
        }
    }

    fn boot_templates(&self) -> Option<&dyn BootTemplates> {
        Some(self)
    }

    fn dry_run(&self, spec: &VmSpec) -> Result<LaunchPlan, VmError> {
        self.plan(spec)
    }

    fn start(&self, spec: &VmSpec) -> Result<Box<dyn RunningVm>, VmError> {
        Ok(Box::new(self.start_qemu(spec)?))
    }
}

impl BootTemplates for QemuVmm {
    fn template_for(
        &self,
        home: &Path,
        spec: &VmSpec,
        build: bool,
    ) -> Result<(BootTemplate, VmSpec), VmError> {
        let template = match build {
            true => ensure_template(self, home, spec),
            false => Template::for_spec(self, home, spec),
        }
        .map_err(QemuError::Snapshot)?;
        let restore = template
            .restore_spec(self, spec)
            .map_err(QemuError::Snapshot)?;
        let neutral = BootTemplate {
            id: template.key.id.clone(),
            dir: template.dir.clone(),
            state: template.state(),
            built: template.is_built(),
        };
        Ok((neutral, restore))
    }

    fn discard(&self, template: &BootTemplate) -> Result<(), VmError> {
        Ok(snapshot::discard(&template.dir).map_err(QemuError::Snapshot)?)
    }

    fn memory_to_allocate(&self, restore: &VmSpec) -> u64 {
        let bytes = u64::from(restore.memory_mib) << 20;
        match &restore.memory {
            GuestMemory::FromTemplate(file) if !memory::holds_copy(file, bytes) => bytes,
            _ => 0,
        }
    }
}

/// `qemu-system-x86_64` from `HEARTH_QEMU` or `PATH`.
pub fn find_binary() -> Result<PathBuf, VmError> {
    if let Some(path) = std::env::var_os("HEARTH_QEMU") {
        return Ok(PathBuf::from(path));
    }
    std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|dir| dir.join("qemu-system-x86_64"))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            VmError::Unsupported(
                "qemu-system-x86_64 not found in PATH: run `hearth setup` or install qemu-system-x86 \
                 (or set HEARTH_QEMU)"
                    .into(),
            )
        })
}
