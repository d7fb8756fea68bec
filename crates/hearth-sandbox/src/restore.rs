//! Snapshot restore policy for sandboxes: whether a VM is restored from a boot template (on a
//! backend with [`hearth_vm::BootTemplates`]) or booted cold, building the template when it is
//! missing, the fallback to a cold boot when the template cannot be built or restored or the node
//! has no room for a new copy of its memory ([`SandboxConfig::template_memory_room`]), and the
//! RESUME a restored guest gets (host clock, fresh entropy, its hostname). Writes only under
//! `$HEARTH_HOME` (templates, the VM's run directory).

use std::time::{SystemTime, UNIX_EPOCH};

use hearth_vm::channel::Resume;
use hearth_vm::{BootTemplate, RunningVm, VmSpec, Vmm};

use crate::boot::{BootPlan, Purpose, SandboxConfig};
use crate::SandboxError;

/// `HEARTH_SNAPSHOT=0` (or `false`, `off`, `no`) turns snapshot restore off; it is on otherwise.
pub const SNAPSHOT_ENV: &str = "HEARTH_SNAPSHOT";

/// Whether the environment leaves snapshot restore on (the default).
pub fn snapshots_enabled_by_env() -> bool {
    snapshot_setting(std::env::var(SNAPSHOT_ENV).ok().as_deref())
}

fn snapshot_setting(value: Option<&str>) -> bool {
    value.is_none_or(|v| {
        !matches!(
            v.trim().to_ascii_lowercase().as_str(),
            "0" | "false" | "off" | "no"
        )
    })
}

/// A VM to be restored from a template instead of booted.
#[derive(Debug, Clone)]
pub struct RestorePlan {
    /// Says whether it exists yet (a dry run does not build it).
    pub template: BootTemplate,
    /// Goes to the guest in RESUME: a restored kernel keeps the template's command line.
    pub hostname: String,
    /// What a cold boot of this VM would be: the fallback when the restore fails.
    pub cold_spec: VmSpec,
    /// The room reserved for a new copy of the template's memory, until the VM has started (and
    /// the copy, made then, is counted as the host's own).
    room: std::sync::Arc<std::sync::Mutex<Option<crate::RoomGrant>>>,
}

impl RestorePlan {
    /// Gives back the room reserved for the template memory's copy (the VM started or failed to).
    fn release_room(&self) {
        let grant = self.room.lock().unwrap_or_else(|e| e.into_inner()).take();
        drop(grant);
    }
}

/// Decides how `spec` (a cold-boot spec) starts: `Ok` with the restore spec and plan, or `Err`
/// saying why it boots cold. For [`Purpose::Start`] a missing template is built here.
pub(crate) fn plan_restore(
    config: &SandboxConfig,
    vmm: &dyn Vmm,
    spec: &VmSpec,
    hostname: &str,
    purpose: Purpose,
) -> Result<(VmSpec, RestorePlan), String> {
    let Some(templates) = vmm.boot_templates() else {
        return Err(format!("{} has no boot templates", vmm.name()));
    };
    if !config.snapshot {
        return Err("snapshots are off (--no-snapshot or HEARTH_SNAPSHOT=0)".into());
    }
    let no_template = |err| format!("no boot template ({err})");
    let (mut template, mut restore_spec) = templates
        .template_for(&config.home, spec, false)
        .map_err(no_template)?;
    let mut room = None;
    if purpose == Purpose::Start {
        // A restore maps a copy of the template's memory, the guest's size, made by the first
        // restore of a template and kept for the next: a new one is held to the node's room (the
        // VM itself is already admitted), checked before a missing template is built for nothing.
        let new_copy = match template.built {
            true => templates.memory_to_allocate(&restore_spec),
            false => u64::from(spec.memory_mib) << 20,
        };
        let mib = new_copy.div_ceil(1 << 20);
        if new_copy > 0 {
            let Some(grant) = config.template_memory_room.reserve(mib) else {
                return Err(format!(
                    "no room on this node for a {mib} MiB copy of the boot template's memory"
                ));
            };
            room = Some(grant);
        }
        // Builds a missing template; marks a built one used (the store evicts by last use).
        (template, restore_spec) = templates
            .template_for(&config.home, spec, true)
            .map_err(no_template)?;
    }
    let plan = RestorePlan {
        template,
        hostname: hostname.to_owned(),
        cold_spec: spec.clone(),
        room: std::sync::Arc::new(std::sync::Mutex::new(room)),
    };
    Ok((restore_spec, plan))
}

/// Starts the plan's VM. A restore that fails (a corrupt or stale state file, a VMM that rejects
/// it) discards the template, so the next VM rebuilds it, and boots this one cold instead. Returns
/// the VM and, when it was restored, the RESUME its agent needs. Blocking.
pub(crate) fn start(
    plan: &BootPlan,
    config: &SandboxConfig,
) -> Result<(Box<dyn RunningVm>, Option<Resume>), SandboxError> {
    let Some(restore) = &plan.restore else {
        return Ok((plan.vmm.start(&plan.spec)?, None));
    };
    let started = plan.vmm.start(&plan.spec);
    restore.release_room();
    match started {
        Ok(vm) => Ok((vm, Some(resume_for(&restore.hostname)?))),
        Err(err) => {
            tracing::warn!(
                template = %restore.template.dir.display(),
                "restoring from the boot template failed; discarding it and booting cold: {err}"
            );
            let discarded = plan
                .vmm
                .boot_templates()
                .map(|templates| templates.discard(&restore.template));
            if let Some(Err(err)) = discarded {
                tracing::warn!("discarding the boot template: {err}");
            }
            // The failed start removed the run directory, scratch disk included.
            crate::sandbox::prepare_run_dir(&restore.cold_spec, config)?;
            Ok((plan.vmm.start(&restore.cold_spec)?, None))
        }
    }
}

/// What differs between clones of one template: the host's wall clock now, 32 fresh random bytes
/// (the clones share the template's CRNG state otherwise) and the sandbox's hostname.
pub(crate) fn resume_for(hostname: &str) -> Result<Resume, SandboxError> {
    let mut seed = [0u8; hearth_proto::handshake::RESUME_SEED_LEN];
    let mut filled = 0;
    while filled < seed.len() {
        let rest = &mut seed[filled..];
        // SAFETY: getrandom writes at most `rest.len()` bytes into the buffer it is given.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(SandboxError::Io {
                what: "reading 32 random bytes for the restored guest (getrandom)".into(),
                source: err,
            });
        }
        filled += n as usize;
    }
    let unix_time_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    Ok(Resume {
        unix_time_ns,
        seed,
        hostname: hostname.to_owned(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_carries_the_clock_a_fresh_seed_and_the_hostname() {
        let a = resume_for("hearth-abc").unwrap();
        let b = resume_for("hearth-abc").unwrap();
        assert_ne!(a.seed, b.seed);
        assert_ne!(a.seed, [0; 32]);
        assert_eq!(a.hostname, "hearth-abc");
        let now = SystemTime::now().duration_since(UNIX_EPOCH).unwrap();
        let skew = now.as_nanos() as i128 - a.unix_time_ns as i128;
        assert!((0..5_000_000_000).contains(&skew), "clock skew {skew} ns");
    }

    #[test]
    fn snapshot_restore_is_off_only_when_the_environment_says_so() {
        for (value, on) in [
            (None, true),
            (Some("1"), true),
            (Some("0"), false),
            (Some("off"), false),
            (Some(" FALSE"), false),
        ] {
            assert_eq!(snapshot_setting(value), on, "{value:?}");
        }
    }
}
