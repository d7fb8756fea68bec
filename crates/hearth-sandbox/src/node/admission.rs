//! Admission: what a [`CreateSpec`] asks for once defaults apply, whether it is within the per-sandbox
//! maxima and well-formed, and whether the tenant's quota and the node's capacity still have room.
//! Pure logic: the node calls [`admit`] while holding its table lock, with usage counted over
//! creating and running sandboxes (and VMs still being stopped), so concurrent creates never
//! overcommit. (`local_images.rs` keeps callers from naming host paths as images.)

use std::time::Duration;

use super::{Capacity, CreateSpec, Limits, NodeError, Quota};
use crate::SandboxConfig;

/// The smallest writable disk `hearth_vm::scratch` accepts.
const MIN_DISK_BYTES: u64 = 16 << 20;
/// The smallest guest memory a VM boots with.
const MIN_MEMORY_MIB: u32 = 64;

/// What a sandbox holds once admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Resources {
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub ttl: Duration,
}

/// Resources held, summed over sandboxes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Usage {
    pub sandboxes: u32,
    pub vcpus: u64,
    pub memory_mib: u64,
    pub disk_bytes: u64,
    /// Node memory held outside any sandbox (the sealed copies of boot templates' memory, see
    /// `hearth_vm::qemu::template_copies_bytes`); zero for a tenant's usage.
    pub reserved_mib: u64,
}

impl Usage {
    pub fn add(&mut self, vcpus: u32, memory_mib: u32, disk_bytes: u64) {
        self.sandboxes += 1;
        self.vcpus += u64::from(vcpus);
        self.memory_mib += u64::from(memory_mib);
        self.disk_bytes = self.disk_bytes.saturating_add(disk_bytes);
    }
}

/// Applies defaults and checks `spec` against the maxima and for well-formedness.
pub(crate) fn size(
    spec: &CreateSpec,
    defaults: &SandboxConfig,
    limits: &Limits,
) -> Result<Resources, NodeError> {
    let invalid = |m: String| Err(NodeError::Invalid(m));
    if spec.image.trim().is_empty() {
        return invalid(
            "image: give an image reference such as `alpine` or `ghcr.io/o/r:tag`".into(),
        );
    }
    if let Err(e) = hearth_image::Reference::parse(&spec.image) {
        return invalid(format!("image {:?}: {e}", spec.image));
    }
    let vcpus = spec.vcpus.unwrap_or(defaults.vcpus);
    if vcpus == 0 || vcpus > limits.max_vcpus {
        return invalid(format!(
            "vcpus {vcpus}: this node allows 1 to {} per sandbox",
            limits.max_vcpus
        ));
    }
    let memory_mib = spec.memory_mib.unwrap_or(defaults.memory_mib);
    if !(MIN_MEMORY_MIB..=limits.max_memory_mib).contains(&memory_mib) {
        return invalid(format!(
            "memory_mib {memory_mib}: this node allows {MIN_MEMORY_MIB} to {} MiB per sandbox",
            limits.max_memory_mib
        ));
    }
    let disk_bytes = spec.disk_bytes.unwrap_or(defaults.scratch_bytes);
    if !(MIN_DISK_BYTES..=limits.max_disk_bytes).contains(&disk_bytes) {
        return invalid(format!(
            "disk_bytes {disk_bytes}: this node allows {MIN_DISK_BYTES} to {} bytes per sandbox",
            limits.max_disk_bytes
        ));
    }
    let ttl = spec.ttl.unwrap_or(limits.max_ttl);
    if ttl.is_zero() || ttl > limits.max_ttl {
        return invalid(format!(
            "ttl {}s: this node allows up to {}s",
            ttl.as_secs_f64(),
            limits.max_ttl.as_secs()
        ));
    }
    if spec.idle_timeout.is_some_and(|t| t.is_zero()) {
        return invalid("idle_timeout must be positive (leave it out for none)".into());
    }
    if spec.on_idle == super::OnIdle::Pause && spec.idle_timeout.is_none() {
        return invalid(
            "on_idle \"pause\" needs an idle timeout (idle_timeout_seconds): without one the \
             sandbox is never idle"
                .into(),
        );
    }
    check_env(&spec.env)?;
    check_workdir(spec.workdir.as_deref())?;
    Ok(Resources {
        vcpus,
        memory_mib,
        disk_bytes,
        ttl,
    })
}

/// Environment entries must have a non-empty key without `=` or NUL.
pub(crate) fn check_env(env: &[(String, String)]) -> Result<(), NodeError> {
    for (key, value) in env {
        if key.is_empty() || key.contains('=') || key.contains('\0') || value.contains('\0') {
            return Err(NodeError::Invalid(format!(
                "environment variable {key:?}: the name must be non-empty without '=' or NUL"
            )));
        }
    }
    Ok(())
}

pub(crate) fn check_workdir(workdir: Option<&str>) -> Result<(), NodeError> {
    match workdir {
        Some(dir) if !dir.starts_with('/') || dir.contains('\0') => Err(NodeError::Invalid(
            format!("workdir {dir:?} must be an absolute path"),
        )),
        _ => Ok(()),
    }
}

/// Whether `want` fits the tenant's quota (checked first: a tenant over quota hears so even on a
/// full node) and then the node's capacity.
pub(crate) fn admit(
    want: &Resources,
    tenant: &str,
    quota: &Quota,
    tenant_usage: Usage,
    capacity: &Capacity,
    node_usage: Usage,
) -> Result<(), NodeError> {
    let vcpus = u64::from(want.vcpus);
    let memory = u64::from(want.memory_mib);
    if tenant_usage.sandboxes + 1 > quota.max_sandboxes {
        return Err(NodeError::Quota {
            message: format!(
                "tenant {tenant} has {} of its {} sandboxes; delete one first",
                tenant_usage.sandboxes, quota.max_sandboxes
            ),
        });
    }
    if tenant_usage.vcpus + vcpus > u64::from(quota.vcpus) {
        return Err(NodeError::Quota {
            message: format!(
                "tenant {tenant} uses {} of its {} vCPUs and asked for {vcpus} more",
                tenant_usage.vcpus, quota.vcpus
            ),
        });
    }
    if tenant_usage.memory_mib + memory > quota.memory_mib {
        return Err(NodeError::Quota {
            message: format!(
                "tenant {tenant} uses {} of its {} MiB and asked for {memory} MiB more",
                tenant_usage.memory_mib, quota.memory_mib
            ),
        });
    }
    if tenant_usage.disk_bytes.saturating_add(want.disk_bytes) > quota.disk_bytes {
        return Err(NodeError::Quota {
            message: format!(
                "tenant {tenant} uses {} of its {} disk bytes and asked for {} more",
                tenant_usage.disk_bytes, quota.disk_bytes, want.disk_bytes
            ),
        });
    }
    let free_vcpus = u64::from(capacity.vcpus).saturating_sub(node_usage.vcpus);
    let free_memory = capacity
        .memory_mib
        .saturating_sub(node_usage.memory_mib + node_usage.reserved_mib);
    if vcpus > free_vcpus || memory > free_memory {
        let templates = match node_usage.reserved_mib {
            0 => String::new(),
            n => format!(" ({n} MiB of it held for boot templates' memory)"),
        };
        return Err(NodeError::Capacity {
            message: format!(
                "asked for {vcpus} vCPUs and {memory} MiB; free now: {free_vcpus} of {} vCPUs and \
                 {free_memory} of {} MiB{templates}; retry when sandboxes end",
                capacity.vcpus, capacity.memory_mib
            ),
        });
    }
    let free_disk = capacity.disk_bytes.saturating_sub(node_usage.disk_bytes);
    if want.disk_bytes > free_disk {
        return Err(NodeError::Capacity {
            message: format!(
                "asked for a {} byte disk; free now: {free_disk} of {} bytes of disk; retry when \
                 sandboxes end or ask for a smaller disk",
                want.disk_bytes, capacity.disk_bytes
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_vcpus: 2,
            max_memory_mib: 1024,
            max_disk_bytes: 1 << 30,
            max_ttl: Duration::from_secs(3600),
        }
    }

    fn spec() -> CreateSpec {
        CreateSpec {
            image: "busybox".into(),
            ..CreateSpec::default()
        }
    }

    fn defaults() -> SandboxConfig {
        let mut d = SandboxConfig::new("/h");
        d.memory_mib = 256;
        d.scratch_bytes = 64 << 20;
        d
    }

    #[test]
    fn defaults_fill_in_and_ttl_defaults_to_the_maximum() {
        let r = size(&spec(), &defaults(), &limits()).unwrap();
        assert_eq!(
            r,
            Resources {
                vcpus: 1,
                memory_mib: 256,
                disk_bytes: 64 << 20,
                ttl: Duration::from_secs(3600)
            }
        );
    }

    #[test]
    fn requests_over_the_maxima_or_malformed_are_invalid() {
        let cases: Vec<(CreateSpec, &str)> = vec![
            (
                CreateSpec {
                    vcpus: Some(3),
                    ..spec()
                },
                "vcpus 3",
            ),
            (
                CreateSpec {
                    vcpus: Some(0),
                    ..spec()
                },
                "vcpus 0",
            ),
            (
                CreateSpec {
                    memory_mib: Some(2048),
                    ..spec()
                },
                "memory_mib 2048",
            ),
            (
                CreateSpec {
                    disk_bytes: Some(2 << 30),
                    ..spec()
                },
                "disk_bytes",
            ),
            (
                CreateSpec {
                    ttl: Some(Duration::from_secs(7200)),
                    ..spec()
                },
                "ttl",
            ),
            (
                CreateSpec {
                    image: "".into(),
                    ..spec()
                },
                "image",
            ),
            (
                CreateSpec {
                    image: "UPPER/Case::x".into(),
                    ..spec()
                },
                "image",
            ),
            (
                CreateSpec {
                    env: vec![("A=B".into(), "c".into())],
                    ..spec()
                },
                "environment",
            ),
            (
                CreateSpec {
                    workdir: Some("rel".into()),
                    ..spec()
                },
                "workdir",
            ),
            (
                CreateSpec {
                    idle_timeout: Some(Duration::ZERO),
                    ..spec()
                },
                "idle_timeout",
            ),
            (
                CreateSpec {
                    on_idle: crate::node::OnIdle::Pause,
                    ..spec()
                },
                "needs an idle timeout",
            ),
        ];
        for (spec, needle) in cases {
            match size(&spec, &defaults(), &limits()) {
                Err(NodeError::Invalid(m)) => assert!(m.contains(needle), "{m} lacks {needle}"),
                other => panic!("{spec:?}: {other:?}"),
            }
        }
    }

    fn want(vcpus: u32, memory_mib: u32) -> Resources {
        Resources {
            vcpus,
            memory_mib,
            disk_bytes: 1 << 20,
            ttl: Duration::from_secs(1),
        }
    }

    const QUOTA: Quota = Quota {
        max_sandboxes: 2,
        vcpus: 4,
        memory_mib: 2048,
        disk_bytes: 10 << 30,
    };
    const CAPACITY: Capacity = Capacity {
        vcpus: 4,
        memory_mib: 1024,
        disk_bytes: 20 << 30,
    };

    fn usage(sandboxes: u32, vcpus: u64, memory_mib: u64) -> Usage {
        Usage {
            sandboxes,
            vcpus,
            memory_mib,
            disk_bytes: 0,
            reserved_mib: 0,
        }
    }

    /// A restored VM maps a copy of its boot template's memory that the node keeps (every page
    /// allocated, 512 MiB for 512 MiB guests): a node whose sandboxes' memory fits its capacity
    /// but not with that copy would be promising memory it does not have.
    #[test]
    fn boot_template_memory_counts_against_the_nodes_memory() {
        let holding = Usage {
            reserved_mib: 512,
            ..usage(1, 1, 256)
        };
        assert!(admit(
            &want(1, 256),
            "t",
            &QUOTA,
            Usage::default(),
            &CAPACITY,
            holding
        )
        .is_ok());
        match admit(
            &want(1, 512),
            "t",
            &QUOTA,
            Usage::default(),
            &CAPACITY,
            holding,
        ) {
            Err(NodeError::Capacity { message }) => assert!(
                message.contains("256 of 1024 MiB (512 MiB of it held for boot templates"),
                "{message}"
            ),
            other => panic!("{other:?}"),
        }
    }

    /// Attack (#12 item 4): a tenant asks for sandboxes with the largest disk each and fills them,
    /// to fill the host's filesystem. Disks count at their full size against the tenant's quota
    /// and the node's capacity, so the node never promises more disk than it has.
    #[test]
    fn disks_count_against_quota_and_capacity_at_full_size() {
        let disk = |bytes: u64| Resources {
            disk_bytes: bytes,
            ..want(1, 64)
        };
        let holding = |bytes: u64| Usage {
            disk_bytes: bytes,
            ..usage(1, 1, 64)
        };
        let ok = admit(
            &disk(4 << 30),
            "t",
            &QUOTA,
            holding(6 << 30),
            &CAPACITY,
            holding(6 << 30),
        );
        assert!(ok.is_ok(), "{ok:?}");
        match admit(
            &disk(5 << 30),
            "t",
            &QUOTA,
            holding(6 << 30),
            &CAPACITY,
            holding(6 << 30),
        ) {
            Err(NodeError::Quota { message }) => assert!(message.contains("disk"), "{message}"),
            other => panic!("over the tenant's disk quota: {other:?}"),
        }
        match admit(
            &disk(4 << 30),
            "t",
            &QUOTA,
            holding(0),
            &CAPACITY,
            holding(17 << 30),
        ) {
            Err(NodeError::Capacity { message }) => {
                assert!(
                    message.contains("3221225472 of 21474836480 bytes"),
                    "{message}"
                )
            }
            other => panic!("over the node's disk: {other:?}"),
        }
    }

    #[test]
    fn capacity_counts_what_is_held_and_says_what_is_free() {
        assert!(admit(
            &want(1, 512),
            "t",
            &QUOTA,
            Usage::default(),
            &CAPACITY,
            usage(1, 3, 512)
        )
        .is_ok());
        let err = admit(
            &want(1, 768),
            "t",
            &QUOTA,
            Usage::default(),
            &CAPACITY,
            usage(1, 1, 512),
        )
        .unwrap_err();
        match err {
            NodeError::Capacity { message } => {
                assert!(
                    message.contains("free now: 3 of 4 vCPUs and 512 of 1024 MiB"),
                    "{message}"
                )
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            admit(
                &want(2, 64),
                "t",
                &QUOTA,
                Usage::default(),
                &CAPACITY,
                usage(3, 3, 64)
            ),
            Err(NodeError::Capacity { .. })
        ));
    }

    #[test]
    fn quota_is_checked_before_capacity_and_names_the_limit() {
        let full_node = usage(9, 4, 1024);
        for (tenant_usage, needle) in [
            (usage(2, 2, 512), "2 of its 2 sandboxes"),
            (usage(1, 4, 512), "4 of its 4 vCPUs"),
            (usage(1, 1, 2000), "2000 of its 2048 MiB"),
        ] {
            match admit(
                &want(1, 64),
                "acme",
                &QUOTA,
                tenant_usage,
                &CAPACITY,
                full_node,
            ) {
                Err(NodeError::Quota { message }) => {
                    assert!(
                        message.contains(needle) && message.contains("acme"),
                        "{message}"
                    )
                }
                other => panic!("{other:?}"),
            }
        }
    }
}
