//! Whether KVM really boots guests on this host: boots the floor initramfs
//! (`crate::initramfs::floor`) under KVM with a short timeout and trusts only a guest that reaches
//! `/init`. The verdict is cached in `$HEARTH_HOME/cache/kvm-probe.json`, keyed by host boot id,
//! QEMU binary and kernel, so the probe runs once per host boot. Writes only that cache file and a
//! temporary run directory under `$HEARTH_HOME/run`.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::QemuVmm;
use crate::accel::{Accel, KvmProbe};
use crate::initramfs::floor::{floor_initramfs, FLOOR_MARKER};
use crate::spec::VmSpec;
use crate::vmm::RunningVm;

/// A floor guest reaches `/init` in well under a second on working KVM.
const PROBE_TIMEOUT: Duration = Duration::from_secs(6);

/// The real probe: boots the floor initramfs under KVM.
pub struct KvmBootProbe {
    home: PathBuf,
    qemu: PathBuf,
    kernel: PathBuf,
    timeout: Duration,
}

#[derive(Serialize, Deserialize, PartialEq)]
struct CachedVerdict {
    boot_id: String,
    qemu: PathBuf,
    kernel: PathBuf,
    boots: bool,
    detail: String,
}

impl KvmBootProbe {
    /// `kernel` must be bootable by QEMU (an ELF vmlinux or a bzImage).
    pub fn new(home: &Path, qemu: &Path, kernel: &Path) -> Self {
        KvmBootProbe {
            home: home.to_owned(),
            qemu: qemu.to_owned(),
            kernel: kernel.to_owned(),
            timeout: PROBE_TIMEOUT,
        }
    }

    fn cache_path(&self) -> PathBuf {
        self.home.join("cache").join("kvm-probe.json")
    }

    fn boot_floor(&self) -> Result<String, String> {
        let initramfs = floor_initramfs(&self.home).map_err(|e| format!("KVM probe: {e}"))?;
        let run_parent = self.home.join("run");
        std::fs::create_dir_all(&run_parent)
            .map_err(|e| format!("KVM probe: creating {}: {e}", run_parent.display()))?;
        let run_dir = tempfile::Builder::new()
            .prefix("kvm-probe-")
            .tempdir_in(&run_parent)
            .map_err(|e| {
                format!(
                    "KVM probe: creating a run dir in {}: {e}",
                    run_parent.display()
                )
            })?;
        let mut spec = VmSpec::new(&self.kernel, initramfs, run_dir.path().join("vm"));
        spec.console_log = run_dir.path().join("console.log");
        spec.memory_mib = 128;
        let qemu = QemuVmm::new(&self.qemu, Accel::Kvm, None).map_err(|e| e.to_string())?;
        let started = Instant::now();
        let mut vm = qemu
            .start_qemu(&spec)
            .map_err(|e| format!("QEMU could not start a KVM guest: {e}"))?;
        let exit = vm.wait_timeout(self.timeout).map_err(|e| e.to_string())?;
        let elapsed = started.elapsed();
        if exit.is_none() {
            let _ = vm.kill();
        }
        let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
        match exit {
            Some(_) if console.contains(FLOOR_MARKER) => {
                Ok(format!("KVM boots guests here (a probe guest reached /init in {elapsed:.1?})"))
            }
            None => Err(format!(
                "/dev/kvm is present but a probe guest did not reach /init within {:?} (nested or broken KVM)",
                self.timeout
            )),
            Some(exit) => Err(format!(
                "/dev/kvm is present but a probe guest failed ({}); console tail: {}",
                exit.status,
                console.lines().rev().take(3).collect::<Vec<_>>().join(" | ")
            )),
        }
    }
}

impl KvmProbe for KvmBootProbe {
    fn kvm_boots_guests(&self) -> Result<String, String> {
        if let Err(e) = OpenOptions::new().read(true).write(true).open("/dev/kvm") {
            return Err(format!("/dev/kvm is not usable ({e})"));
        }
        let key = |boots, detail| CachedVerdict {
            boot_id: crate::fsutil::host_boot_id(),
            qemu: self.qemu.clone(),
            kernel: self.kernel.clone(),
            boots,
            detail,
        };
        let cache = self.cache_path();
        if let Some(cached) = std::fs::read(&cache)
            .ok()
            .and_then(|b| serde_json::from_slice::<CachedVerdict>(&b).ok())
        {
            if cached == key(cached.boots, cached.detail.clone()) {
                let detail = format!("{} (cached probe)", cached.detail);
                return if cached.boots {
                    Ok(detail)
                } else {
                    Err(detail)
                };
            }
        }
        let verdict = self.boot_floor();
        let (boots, detail) = match &verdict {
            Ok(d) => (true, d.clone()),
            Err(d) => (false, d.clone()),
        };
        let json = serde_json::to_vec(&key(boots, detail)).expect("plain struct serializes");
        if let Err(e) = crate::fsutil::write_atomic(&cache, &json) {
            tracing::warn!(path = %cache.display(), "caching the KVM probe verdict: {e}");
        }
        verdict
    }
}
