//! Choosing the accelerator: KVM where it really boots guests, TCG otherwise.
//!
//! `/dev/kvm` opening is not enough: on nested-PVM hosts it opens, yet stock kernels hang. So `Auto`
//! boots the floor initramfs (`crate::initramfs::floor`) under KVM with a short timeout and trusts
//! only a guest that reaches `/init`. The verdict is cached in `$HEARTH_HOME/cache/kvm-probe.json`,
//! keyed by host boot id, QEMU binary and kernel, so the probe runs once per host boot.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::initramfs::floor::{floor_initramfs, FLOOR_MARKER};
use crate::qemu::QemuVmm;
use crate::{RunningVm, VmSpec};

/// A floor guest reaches `/init` in well under a second on working KVM.
const PROBE_TIMEOUT: Duration = Duration::from_secs(6);

/// The accelerator asked for (`--accel`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Accel {
    Kvm,
    Tcg,
    Auto,
}

impl std::fmt::Display for Accel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Accel::Kvm => "kvm",
            Accel::Tcg => "tcg",
            Accel::Auto => "auto",
        })
    }
}

impl std::str::FromStr for Accel {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "kvm" => Ok(Accel::Kvm),
            "tcg" => Ok(Accel::Tcg),
            "auto" => Ok(Accel::Auto),
            other => Err(format!(
                "unknown accelerator {other:?}: use kvm, tcg or auto"
            )),
        }
    }
}

/// The accelerator chosen (never `Auto`) and why, for the user to see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Selection {
    pub accel: Accel,
    pub reason: String,
}

/// Whether KVM boots guests on this host. The seam between selection policy and the real probe.
pub trait KvmProbe {
    /// `Ok(detail)` when a guest booted under KVM, `Err(why not)` otherwise.
    fn kvm_boots_guests(&self) -> Result<String, String>;
}

/// Decides the accelerator. Explicit requests are honoured without probing.
pub fn select(requested: Accel, probe: &dyn KvmProbe) -> Selection {
    match requested {
        Accel::Kvm => Selection {
            accel: Accel::Kvm,
            reason: "requested with --accel kvm".into(),
        },
        Accel::Tcg => Selection {
            accel: Accel::Tcg,
            reason: "requested with --accel tcg".into(),
        },
        Accel::Auto => match probe.kvm_boots_guests() {
            Ok(detail) => Selection {
                accel: Accel::Kvm,
                reason: detail,
            },
            Err(why) => Selection {
                accel: Accel::Tcg,
                reason: format!("{why}; using TCG emulation"),
            },
        },
    }
}

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
            boot_id: crate::host_boot_id(),
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
        if let Err(e) = crate::write_atomic(&cache, &json) {
            tracing::warn!(path = %cache.display(), "caching the KVM probe verdict: {e}");
        }
        verdict
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Fixed(Result<String, String>);
    impl KvmProbe for Fixed {
        fn kvm_boots_guests(&self) -> Result<String, String> {
            self.0.clone()
        }
    }

    #[test]
    fn auto_follows_the_probe_and_says_why() {
        let works = select(Accel::Auto, &Fixed(Ok("booted in 0.3s".into())));
        assert_eq!(
            works,
            Selection {
                accel: Accel::Kvm,
                reason: "booted in 0.3s".into()
            }
        );
        let hangs = select(Accel::Auto, &Fixed(Err("guest hung".into())));
        assert_eq!(hangs.accel, Accel::Tcg);
        assert!(hangs.reason.contains("guest hung"));
    }

    #[test]
    fn explicit_requests_do_not_probe() {
        struct Panics;
        impl KvmProbe for Panics {
            fn kvm_boots_guests(&self) -> Result<String, String> {
                panic!("probed although the user chose")
            }
        }
        assert_eq!(select(Accel::Kvm, &Panics).accel, Accel::Kvm);
        assert_eq!(select(Accel::Tcg, &Panics).accel, Accel::Tcg);
    }

    #[test]
    fn accel_parses_and_prints() {
        for accel in [Accel::Kvm, Accel::Tcg, Accel::Auto] {
            assert_eq!(accel.to_string().parse::<Accel>().unwrap(), accel);
        }
        assert!("hvf".parse::<Accel>().is_err());
    }
}
