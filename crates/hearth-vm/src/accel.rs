//! Choosing the accelerator: KVM where it really boots guests, TCG otherwise. The policy lives
//! here ([`select`]); whether KVM boots guests is a [`KvmProbe`]'s answer — `/dev/kvm` opening is
//! not enough (on nested-PVM hosts it opens, yet stock kernels hang), so the real probe boots a
//! guest (`crate::qemu::KvmBootProbe`). Pure logic: no I/O.

use serde::{Deserialize, Serialize};

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
