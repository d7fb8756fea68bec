//! Everything decided before a VM starts: which VMM and accelerator, which kernel and agent, the
//! initramfs, the run directory and scratch disk, the [`VmSpec`], and whether the VM is restored
//! from a snapshot template (`crate::restore`). A [`BootPlan`] can be printed (`--dry-run`) or
//! started. Writes only under `$HEARTH_HOME` (initramfs cache, snapshot templates, run directory).

use std::path::{Path, PathBuf};

use hearth_image::PulledImage;
use hearth_vm::firecracker::{self, FirecrackerVmm, JailerConfig};
use hearth_vm::kernel::resolve_kernel;
use hearth_vm::qemu::snapshot::HOSTNAME_PARAM;
use hearth_vm::qemu::QemuVmm;
use hearth_vm::{Accel, Drive, LaunchPlan, Selection, VmSpec, Vmm};

use crate::restore::{plan_restore, RestorePlan};
use crate::SandboxError;

/// `--vmm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmmChoice {
    #[default]
    Auto,
    Qemu,
    Firecracker,
}

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
    /// Run Firecracker through its jailer as this unprivileged (uid, gid).
    pub jailer: Option<(u32, u32)>,
    /// Restore QEMU VMs from a snapshot template instead of booting them (default on;
    /// `--no-snapshot`, `HEARTH_SNAPSHOT=0`).
    pub snapshot: bool,
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
            jailer: None,
            snapshot: crate::restore::snapshots_enabled_by_env(),
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
        let (backend, selection) = choose_backend(config, &kernel.image, purpose)?;
        let (vmm, qemu): (Box<dyn Vmm>, Option<QemuVmm>) = match backend {
            Backend::Qemu(qemu) => (Box::new(qemu.clone()), Some(qemu)),
            Backend::Firecracker(firecracker) => (Box::new(firecracker), None),
        };
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
        let planned = match &qemu {
            Some(qemu) => plan_restore(config, qemu, &spec, &hostname, purpose),
            None => Err(format!("{} boots cold", vmm.name())),
        };
        let (spec, restore, snapshot_note) = match planned {
            Ok((restore_spec, restore)) => {
                let note = format!(
                    "restore from snapshot template {} ({}{})",
                    restore.template.key.id,
                    restore.template.dir.display(),
                    if restore.built {
                        ""
                    } else {
                        "; built on first start"
                    }
                );
                (restore_spec, Some(restore), note)
            }
            Err(why) => {
                if qemu.is_some() && config.snapshot {
                    tracing::warn!("booting cold: {why}");
                }
                (spec, None, format!("cold boot: {why}"))
            }
        };
        Ok(BootPlan {
            vmm,
            selection,
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

fn hostname_for(id: &str) -> String {
    format!("hearth-{}", &id[..id.len().min(12)])
}

/// The chosen VMM backend; QEMU's is kept concrete because snapshot templates are QEMU's.
enum Backend {
    Qemu(QemuVmm),
    Firecracker(FirecrackerVmm),
}

/// `--vmm`: Firecracker when asked, or with `auto` where its binary is found and KVM boots a guest
/// (the same probe boot QEMU's accelerator choice uses); QEMU otherwise. Says which and why.
fn choose_backend(
    config: &SandboxConfig,
    probe_kernel: &Path,
    purpose: Purpose,
) -> Result<(Backend, String), SandboxError> {
    let firecracker = firecracker::find_binary();
    let dry = purpose == Purpose::DryRun;
    let jailed = |vmm: FirecrackerVmm| -> Result<FirecrackerVmm, SandboxError> {
        let Some((uid, gid)) = config.jailer else {
            return Ok(vmm);
        };
        let jailer = match firecracker::find_jailer() {
            Some(jailer) => jailer,
            None if dry => PathBuf::from("jailer"),
            None => return Err(SandboxError::NoJailer),
        };
        Ok(vmm.with_jailer(JailerConfig::new(jailer, uid, gid)))
    };
    match (config.vmm, firecracker) {
        (VmmChoice::Firecracker, Ok(binary)) => Ok((
            Backend::Firecracker(jailed(FirecrackerVmm::new(binary))?),
            "firecracker as requested (needs a KVM that boots guests)".into(),
        )),
        // A dry run shows the configuration even where Firecracker is not installed.
        (VmmChoice::Firecracker, Err(_)) if dry => Ok((
            Backend::Firecracker(jailed(FirecrackerVmm::new("firecracker"))?),
            "firecracker as requested (binary not found: shown as `firecracker`)".into(),
        )),
        (VmmChoice::Firecracker, Err(err)) => Err(err.into()),
        (VmmChoice::Auto, Ok(binary)) => {
            let (qemu, selection) = QemuVmm::for_host(&config.home, config.accel, probe_kernel)?;
            if selection.accel == Accel::Kvm {
                let why = format!(
                    "firecracker: found {}; {}",
                    binary.display(),
                    selection.reason
                );
                return Ok((
                    Backend::Firecracker(jailed(FirecrackerVmm::new(binary))?),
                    why,
                ));
            }
            let why = format!(
                "qemu: firecracker is installed but KVM cannot boot guests here ({})",
                selection.reason
            );
            Ok((Backend::Qemu(qemu), why))
        }
        (VmmChoice::Qemu | VmmChoice::Auto, _) => {
            let (qemu, Selection { accel, reason }) =
                QemuVmm::for_host(&config.home, config.accel, probe_kernel)?;
            let why_qemu = match config.vmm {
                VmmChoice::Qemu => "qemu as requested",
                _ => "qemu: no firecracker binary (HEARTH_FIRECRACKER_BIN or PATH)",
            };
            let accel = match accel {
                Accel::Kvm => "kvm",
                _ => "tcg",
            };
            Ok((
                Backend::Qemu(qemu),
                format!("{why_qemu}; accel {accel}: {reason}"),
            ))
        }
    }
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
