//! The one place that knows every backend: [`select_backend`] turns `--vmm`, `--accel`, the kernel
//! (for the KVM probe) and `--jailer` into a [`Vmm`] and says why it was chosen; [`adopt`] takes
//! over a detached VM of whichever backend started it. Everything else in hearth holds a
//! `Box<dyn Vmm>` / `Box<dyn RunningVm>` and asks for [`crate::Capabilities`].
//!
//! Selection probes (a KVM test boot, cached per host boot, under `$HEARTH_HOME/cache`) and looks up
//! binaries; it starts no VM of its own.

use std::path::{Path, PathBuf};

use crate::accel::{Accel, Selection};
use crate::confine::{FIRST_UID, JAILER_PER_VM_IDS};
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

/// What a backend is chosen from.
#[derive(Debug, Clone, Copy)]
pub struct BackendRequest<'a> {
    /// `$HEARTH_HOME`: the KVM probe's and TSC measurement's caches.
    pub home: &'a Path,
    pub vmm: VmmChoice,
    pub accel: Accel,
    /// The kernel a KVM probe boots (an ELF vmlinux or a bzImage).
    pub kernel: &'a Path,
    /// Run Firecracker through its jailer as this unprivileged (uid, gid);
    /// [`crate::confine::JAILER_PER_VM_IDS`] gives each VM a uid and gid of its own.
    pub jailer: Option<(u32, u32)>,
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
            let (qemu, selection) = QemuVmm::for_host(request.home, request.accel, request.kernel)?;
            if selection.accel == Accel::Kvm {
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
            let (qemu, Selection { accel, reason }) =
                QemuVmm::for_host(request.home, request.accel, request.kernel)?;
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

/// Firecracker, through its jailer when the request asks for one (with a uid of the VM's own
/// for [`JAILER_PER_VM_IDS`]: each `select_backend` call plans one VM).
fn jailed(request: &BackendRequest, vmm: FirecrackerVmm) -> Result<Box<dyn Vmm>, VmError> {
    let Some((uid, gid)) = request.jailer else {
        return Ok(Box::new(vmm));
    };
    let jailer = match firecracker::find_jailer() {
        Some(jailer) => jailer,
        None if request.dry_run => PathBuf::from("jailer"),
        None => return Err(FirecrackerError::NoJailer.into()),
    };
    let config = match (uid, gid) {
        // A dry run shows the range's first uid and leases none.
        JAILER_PER_VM_IDS if request.dry_run => JailerConfig::new(jailer, FIRST_UID, FIRST_UID),
        JAILER_PER_VM_IDS => JailerConfig::per_vm(jailer)?,
        _ => JailerConfig::new(jailer, uid, gid),
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
            jailer: Some((1234, 1234)),
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
}
