//! What the node remembers about one sandbox ([`Record`]): the caller-visible [`SandboxInfo`] plus
//! its exec defaults, the pulled image and the VMM's identity. The record is built here for an
//! admitted sandbox ([`Record::new`]) and moves through its states only here (`running`, `fail`,
//! `end`), so every writer agrees on which fields a transition sets. Pure data: the table
//! (`table.rs`) decides when a record is saved, the store (`store.rs`) how.

use hearth_image::PulledImage;
use hearth_vm::ProcessIdentity;
use serde::{Deserialize, Serialize};

use super::admission::Resources;
use super::{CreateSpec, SandboxInfo, State};

/// What the node remembers about a sandbox beyond what callers see.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Record {
    pub info: SandboxInfo,
    pub idle_timeout_ms: Option<u64>,
    pub defaults: ExecDefaults,
    /// The pulled image, once known: enough to run commands and to re-attach after a restart.
    pub image: Option<ImageMeta>,
    /// The VMM, once it runs.
    pub vmm: Option<ProcessIdentity>,
    /// Deleted by its tenant, VM still being stopped: hidden, and gone once the VM is.
    pub deleted: bool,
}

/// `CreateSpec`'s defaults for every exec.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ExecDefaults {
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ImageMeta {
    /// The normalised reference it was pulled as.
    pub reference: String,
    pub rootfs: std::path::PathBuf,
    pub config: hearth_image::ImageConfig,
}

impl Record {
    /// A sandbox just admitted at `now` (Unix ms): `Creating`, sized by `resources`, expiring after
    /// their TTL.
    pub fn new(
        id: String,
        tenant: &str,
        spec: CreateSpec,
        resources: &Resources,
        now: u64,
    ) -> Record {
        Record {
            info: SandboxInfo {
                id,
                tenant: tenant.to_owned(),
                image: spec.image,
                image_digest: None,
                state: State::Creating,
                reason: None,
                vcpus: resources.vcpus,
                memory_mib: resources.memory_mib,
                disk_bytes: resources.disk_bytes,
                labels: spec.labels,
                created_at: now,
                ready_at: None,
                finished_at: None,
                expires_at: Some(now.saturating_add(resources.ttl.as_millis() as u64)),
                last_active_at: now,
                boot_ms: None,
                network: spec.network.clone(),
                warm: false,
                on_idle: spec.on_idle,
                stopping: false,
            },
            idle_timeout_ms: spec.idle_timeout.map(|t| t.as_millis().max(1) as u64),
            defaults: ExecDefaults {
                env: spec.env,
                workdir: spec.workdir,
                user: spec.user,
            },
            image: None,
            vmm: None,
            deleted: false,
        }
    }

    /// Booted at `now`: `Running` on `image` with the VMM `vmm`. Returns the boot time (ms since
    /// creation).
    pub fn running(&mut self, image: &PulledImage, vmm: Option<ProcessIdentity>, now: u64) -> u64 {
        let info = &mut self.info;
        info.state = State::Running;
        info.ready_at = Some(now);
        info.image_digest = Some(image.manifest_digest.to_string());
        let boot_ms = now.saturating_sub(info.created_at);
        info.boot_ms = Some(boot_ms);
        self.image = Some(ImageMeta {
            reference: image.reference.to_string(),
            rootfs: image.rootfs.clone(),
            config: image.config.clone(),
        });
        self.vmm = vmm;
        boot_ms
    }

    /// `Failed` at `now` because of `reason`, whatever it was.
    pub fn fail(&mut self, reason: String, now: u64) {
        let info = &mut self.info;
        info.state = State::Failed;
        info.reason = Some(reason);
        info.finished_at = Some(now);
    }

    /// Ends a creating or running sandbox as `state` with `reason`; an ended one keeps its first
    /// reason. Returns whether it changed.
    pub fn end(&mut self, state: State, reason: &str, now: u64) -> bool {
        if !self.info.state.is_live() {
            return false;
        }
        let info = &mut self.info;
        info.state = state;
        info.reason = Some(reason.to_owned());
        info.finished_at = Some(now);
        true
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn a_new_record_is_creating_sized_and_expires_after_its_ttl() {
        let spec = CreateSpec {
            image: "busybox".into(),
            idle_timeout: Some(Duration::from_micros(10)),
            env: vec![("A".into(), "1".into())],
            labels: [("k".to_string(), "v".to_string())].into(),
            ..CreateSpec::default()
        };
        let resources = Resources {
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 1 << 30,
            ttl: Duration::from_secs(60),
        };
        let r = Record::new("sb-1".into(), "acme", spec, &resources, 1000);
        assert_eq!(r.info.state, State::Creating);
        assert_eq!((r.info.vcpus, r.info.memory_mib), (2, 512));
        assert_eq!(r.info.expires_at, Some(61_000));
        assert_eq!(r.info.labels["k"], "v");
        assert_eq!(
            r.idle_timeout_ms,
            Some(1),
            "a sub-millisecond idle timeout still counts"
        );
        assert_eq!(r.defaults.env, [("A".to_string(), "1".to_string())]);
        assert!(!r.deleted && r.image.is_none() && r.vmm.is_none());
    }

    #[test]
    fn an_ended_sandbox_keeps_its_first_reason() {
        let resources = Resources {
            vcpus: 1,
            memory_mib: 64,
            disk_bytes: 16 << 20,
            ttl: Duration::from_secs(1),
        };
        let mut r = Record::new("x".into(), "t", CreateSpec::default(), &resources, 0);
        assert!(r.end(State::Stopped, "ttl expired", 5));
        assert!(!r.end(State::Failed, "VM exited", 6));
        assert_eq!(
            (r.info.state, r.info.reason.as_deref(), r.info.finished_at),
            (State::Stopped, Some("ttl expired"), Some(5))
        );
    }
}
