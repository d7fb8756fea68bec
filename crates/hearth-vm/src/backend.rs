//! The one place that knows every backend: [`select_backend`] turns `--vmm`, `--accel`, the kernel
//! (for the KVM probe) and `--jailer` into a [`Vmm`] and says why it was chosen; [`adopt`] takes
//! over a detached VM of whichever backend started it. Everything else in hearth holds a
//! `Box<dyn Vmm>` / `Box<dyn RunningVm>` and asks for [`crate::Capabilities`].
//!
//! Selection probes (a KVM test boot, cached per host boot, under `$HEARTH_HOME/cache`) and looks up
//! binaries; it starts no VM of its own.

use std::path::{Path, PathBuf};

use crate::accel::{Accel, Selection};
use crate::confine::FIRST_UID;
use crate::detached::{DetachedRecord, DETACHED_RECORD};
use crate::firecracker::{self, FirecrackerError, FirecrackerVmm, JailerConfig};
use crate::qemu::{QemuVmm, RunningQemu};
use crate::vmm::{RunningVm, VmError, Vmm};

/// `--vmm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum VmmChoice {
    /// Firecracker where its binary is found and KVM boots guests; QEMU otherwise.
    #[default]
    Auto,
    Qemu,
    Firecracker,
}

/// `--jailer`: whether Firecracker runs through its jailer, and as whom.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Jailer {
    /// Through the jailer with a uid and gid of each VM's own wherever hearth confines its VMMs
    /// (as root, unless `HEARTH_VMM_CONFINEMENT=off`): least privilege by default, as for QEMU.
    /// Unprivileged, Firecracker runs as hearth's own user, as QEMU does.
    #[default]
    Default,
    /// `--jailer off`: Firecracker runs as hearth's user, unconfined (debugging).
    Off,
    /// `--jailer auto`: a uid and gid of each VM's own from the [`crate::confine::uid`] range.
    PerVm,
    /// `--jailer UID:GID`: these fixed ids for every VM.
    Ids(u32, u32),
}

impl Jailer {
    /// What this choice comes to on this host: `Default` is `PerVm` where VMMs are confined.
    fn resolve(self) -> Jailer {
        match self {
            Jailer::Default if crate::confine::enabled() => Jailer::PerVm,
            Jailer::Default => Jailer::Off,
            other => other,
        }
    }
}

/// What a backend is chosen from.
#[derive(Debug, Clone, Copy)]
pub struct BackendRequest<'a> {
    /// `$HEARTH_HOME`: the KVM probe's and TSC measurement's caches.
    pub home: &'a Path,
    pub vmm: VmmChoice,
    pub accel: Accel,
    /// The kernel a KVM probe boots (an ELF vmlinux or a bzImage).
    pub kernel: &'a Path,
    /// Whether and as whom Firecracker runs through its jailer.
    pub jailer: Jailer,
    /// QEMU under TCG: the translation cache in MiB (`--tcg-cache`).
    pub tcg_cache_mib: u32,
    /// QEMU: boot templates kept on disk at most (`--max-templates`).
    pub max_templates: usize,
    /// Planning only (`--dry-run`): a missing Firecracker or jailer binary is shown by its name
    /// instead of failing.
    pub dry_run: bool,
}

/// The chosen backend and why, for the user to see.
pub struct Chosen {
    pub vmm: Box<dyn Vmm>,
    pub reason: String,
}

/// Chooses the backend: Firecracker when asked, or with `auto` where its binary is found and KVM
/// boots a guest (the same probe boot QEMU's accelerator choice uses); QEMU with the best
/// accelerator that works otherwise.
pub fn select_backend(request: &BackendRequest) -> Result<Chosen, VmError> {
    let firecracker = firecracker::find_binary();
    let chosen = |vmm: Box<dyn Vmm>, reason: String| Ok(Chosen { vmm, reason });
    match (request.vmm, firecracker) {
        (VmmChoice::Firecracker, Ok(binary)) => chosen(
            jailed(request, FirecrackerVmm::new(binary))?,
            "firecracker as requested (needs a KVM that boots guests)".into(),
        ),
        // A dry run shows the configuration even where Firecracker is not installed.
        (VmmChoice::Firecracker, Err(_)) if request.dry_run => chosen(
            jailed(request, FirecrackerVmm::new("firecracker"))?,
            "firecracker as requested (binary not found: shown as `firecracker`)".into(),
        ),
        (VmmChoice::Firecracker, Err(err)) => Err(err),
        (VmmChoice::Auto, Ok(binary)) => {
            let (qemu, selection) = qemu_for_host(request)?;
            if selection.accel == Accel::Kvm {
                let unjailable = request.jailer.resolve() != Jailer::Off
                    && firecracker::find_jailer().is_none()
                    && !request.dry_run;
                if unjailable {
                    let why = format!(
                        "qemu: firecracker is installed but its jailer is not (HEARTH_JAILER_BIN \
                         or PATH), and VMMs run confined; accel {}: {}",
                        selection.accel, selection.reason
                    );
                    return chosen(Box::new(qemu), why);
                }
                let why = format!(
                    "firecracker: found {}; {}",
                    binary.display(),
                    selection.reason
                );
                return chosen(jailed(request, FirecrackerVmm::new(binary))?, why);
            }
            let why = format!(
                "qemu: firecracker is installed but KVM cannot boot guests here ({})",
                selection.reason
            );
            chosen(Box::new(qemu), why)
        }
        (VmmChoice::Qemu | VmmChoice::Auto, _) => {
            let (qemu, Selection { accel, reason }) = qemu_for_host(request)?;
            let why_qemu = match request.vmm {
                VmmChoice::Qemu => "qemu as requested",
                _ => "qemu: no firecracker binary (HEARTH_FIRECRACKER_BIN or PATH)",
            };
            chosen(
                Box::new(qemu),
                format!("{why_qemu}; accel {accel}: {reason}"),
            )
        }
    }
}

/// QEMU with the accelerator that works here, the requested translation cache and template limit.
fn qemu_for_host(request: &BackendRequest) -> Result<(QemuVmm, Selection), VmError> {
    let (qemu, selection) = QemuVmm::for_host(request.home, request.accel, request.kernel)?;
    let qemu = qemu
        .with_tcg_cache_mib(request.tcg_cache_mib)?
        .with_max_templates(request.max_templates)?;
    Ok((qemu, selection))
}

/// Firecracker, through its jailer unless the request (or an unconfined hearth) says otherwise,
/// with a uid of the VM's own for [`Jailer::PerVm`] (each `select_backend` call plans one VM).
fn jailed(request: &BackendRequest, vmm: FirecrackerVmm) -> Result<Box<dyn Vmm>, VmError> {
    let ids = match request.jailer.resolve() {
        Jailer::Off | Jailer::Default => return Ok(Box::new(vmm)),
        Jailer::PerVm => None,
        Jailer::Ids(uid, gid) => Some((uid, gid)),
    };
    let jailer = match firecracker::find_jailer() {
        Some(jailer) => jailer,
        None if request.dry_run => PathBuf::from("jailer"),
        None => return Err(FirecrackerError::NoJailer.into()),
    };
    let config = match ids {
        Some((uid, gid)) => JailerConfig::new(jailer, uid, gid),
        // A dry run shows the range's first uid and leases none.
        None if request.dry_run => JailerConfig::new(jailer, FIRST_UID, FIRST_UID),
        None => JailerConfig::per_vm(jailer)?,
    };
    Ok(Box::new(vmm.with_jailer(config)))
}

/// Takes over the detached VM whose run directory is `run_dir`: checks that its VMM still runs (same
/// pid, same start time) and returns a handle that controls it like one we started. Fails with
/// [`VmError::Gone`] when the VMM has exited or its pid belongs to another process now.
pub fn adopt(run_dir: &Path) -> Result<Box<dyn RunningVm>, VmError> {
    let record = DetachedRecord::read(run_dir)?;
    let leftovers = record.cgroups.clone();
    let adopted: Result<Box<dyn RunningVm>, VmError> = match record.vmm.as_str() {
        "qemu" => RunningQemu::adopt(run_dir, record).map(|vm| Box::new(vm) as _),
        "firecracker" => {
            firecracker::RunningFirecracker::adopt(run_dir, record).map(|vm| Box::new(vm) as _)
        }
        other => Err(VmError::Unsupported(format!(
            "{}: unknown VMM {other:?}",
            run_dir.join(DETACHED_RECORD).display()
        ))),
    };
    // A VMM that died unowned (its hearth was killed while stopping it) left its cgroups and uid
    // lease; nobody else will remove them (the soak found them).
    if let Err(VmError::Gone { .. }) = &adopted {
        crate::lifecycle::remove_leftovers(&leftovers);
    }
    adopted
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::process::ProcessIdentity;

    #[test]
    fn a_run_dir_whose_vmm_is_gone_cannot_be_adopted_and_its_leftovers_go() {
        let dir = tempfile::tempdir().unwrap();
        for vmm in ["qemu", "firecracker"] {
            // What its confinement left outside the run directory: a cgroup and a uid lease.
            let (cgroup, lease) = (dir.path().join("cgroup"), dir.path().join("lease"));
            std::fs::create_dir(&cgroup).unwrap();
            std::fs::write(&lease, "holder").unwrap();
            DetachedRecord {
                vmm: vmm.into(),
                process: ProcessIdentity {
                    pid: 7,
                    start_time: 9,
                },
                control_socket: dir.path().join("control.sock"),
                agent_socket: dir.path().join("agent.sock"),
                vsock_port: None,
                console_log: dir.path().join("console.log"),
                log: None,
                cgroups: vec![cgroup.clone(), lease.clone()],
            }
            .write(dir.path())
            .unwrap();
            assert!(matches!(adopt(dir.path()), Err(VmError::Gone { .. })));
            assert!(
                !cgroup.exists() && !lease.exists(),
                "{vmm}: leftovers removed"
            );
        }
    }

    #[test]
    fn a_dry_run_shows_a_jailed_firecracker_even_without_its_binaries() {
        let home = tempfile::tempdir().unwrap();
        let request = BackendRequest {
            home: home.path(),
            vmm: VmmChoice::Firecracker,
            accel: Accel::Auto,
            kernel: Path::new("/nonexistent/vmlinux"),
            jailer: Jailer::Ids(1234, 1234),
            tcg_cache_mib: crate::qemu::TCG_CACHE_DEFAULT_MIB,
            max_templates: crate::qemu::MAX_TEMPLATES_DEFAULT,
            dry_run: true,
        };
        let chosen = select_backend(&request).unwrap();
        assert_eq!(chosen.vmm.name(), "firecracker");
        assert!(
            chosen.reason.contains("firecracker as requested"),
            "{}",
            chosen.reason
        );
        assert!(!chosen.vmm.capabilities().boot_templates);
    }

    // Sets process-wide variables: nextest runs each test in a process of its own.
    #[test]
    fn as_root_firecracker_is_jailed_by_default_and_refused_without_a_jailer() {
        if !crate::confine::enabled() {
            eprintln!("SKIP: the default jailer applies where hearth confines VMMs (root)");
            return;
        }
        let home = tempfile::tempdir().unwrap();
        std::env::set_var("HEARTH_FIRECRACKER_BIN", "/bin/true");
        std::env::remove_var("HEARTH_JAILER_BIN");
        std::env::set_var("PATH", home.path());
        let request = |vmm, jailer| BackendRequest {
            home: home.path(),
            vmm,
            accel: Accel::Tcg,
            kernel: Path::new("/nonexistent/vmlinux"),
            jailer,
            tcg_cache_mib: crate::qemu::TCG_CACHE_DEFAULT_MIB,
            max_templates: crate::qemu::MAX_TEMPLATES_DEFAULT,
            dry_run: false,
        };
        let refused = select_backend(&request(VmmChoice::Firecracker, Jailer::Default))
            .err()
            .expect("an unjailed Firecracker as root");
        assert!(refused.to_string().contains("--jailer off"), "{refused}");
        let unconfined = select_backend(&request(VmmChoice::Firecracker, Jailer::Off)).unwrap();
        assert_eq!(unconfined.vmm.name(), "firecracker");
        // With a jailer, the default plan is jailed: its command line is the jailer's.
        std::env::set_var("HEARTH_JAILER_BIN", "/bin/false");
        let jailed = select_backend(&request(VmmChoice::Firecracker, Jailer::Default)).unwrap();
        let spec = crate::VmSpec::new("/k/vmlinux", "/k/initrd", home.path().join("run/vm1"));
        let plan = jailed.vmm.dry_run(&spec).unwrap();
        assert_eq!(plan.program, Path::new("/bin/false"), "{plan}");
    }
}
