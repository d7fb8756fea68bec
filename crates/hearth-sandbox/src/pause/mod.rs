//! Pausing a running sandbox to disk and resuming it: [`Sandbox::pause`] saves the guest's memory
//! and device state (`RunningVm::save_state`) into a snapshot directory, moves the scratch disk
//! there, writes what a resume needs ([`PAUSE_META`]: the VM's spec and hostname) and ends the VMM;
//! [`PausedSandbox::resume`] starts a new VMM restored from that state with the same drives, NIC,
//! command line and run directory layout, connects to the agent and sends it a RESUME line (the
//! host's wall clock and fresh entropy, applied by the agent's live refresh: `clock_settime`,
//! `RNDADDENTROPY`, `RNDRESEEDCRNG`; the hostname the guest had at the pause, so it is kept).
//! `fork.rs` starts copies from the same kind of snapshot.
//!
//! A snapshot directory holds the saved state (QEMU's migration stream; Firecracker's `vmstate` and
//! its guest `memory` file beside it), `scratch.ext4` (the sandbox's writable disk) and
//! [`PAUSE_META`]; for a QEMU VM restored from a boot template also `memory.base`, a hard link to
//! the template's memory file, which the VM starts again on: its state then holds only the pages
//! the guest changed since the template (`hearth_vm::SavedState::base`), and the link keeps that
//! memory after the template is evicted or rebuilt. It is removed only by a successful resume (or
//! by its owner, e.g. the node when the sandbox is deleted): a resume that fails, for a missing or
//! corrupt file or a VMM that refuses the state, names the file and leaves the snapshot as it was,
//! to be retried or deleted. (The scratch disk is hard-linked into the new run directory, so the failed VM's
//! cleanup removes only the link. A resume that fails only after the guest ran, when its agent does
//! not answer, may have let the guest write to that disk.)
//!
//! The network is torn down at pause and built again, identically, at resume: the namespace path,
//! tap name, MAC and the guest's addresses are the same for every start of sandbox `id`, so the
//! guest needs no change; connections it had open are cut (as when a daemon restarts). Nothing
//! network-related is held while paused, and no sweep can mistake a paused sandbox's namespace for
//! a stale one.
//!
//! Everything in the guest survives: processes, open files, listening sockets, memory, the disks'
//! contents, the uptime. The agent session changes with the VMM: the guest's old session fails
//! when the new host speaks, and because that host's handshake carries RESUME (a restored VM), the
//! agent lets the execs of the old session run on, detached from any host, their output discarded
//! (`hearth_agent::session`); their callers' streams ended with the pause. An exec started
//! `attachable` waits instead for the new host to take it over (`AgentClient::attach`; the node's
//! code interpreter is one), and is killed if none does within the agent's grace. Execs started
//! after the resume are the new host's as usual.
//!
//! Starting a VM from a snapshot directory, for a resume or a fork's copy, is [`start`]; the spec
//! record both rely on is `crate::spec_record`.
//!
//! Writes only the snapshot directory and the run directory it is given.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hearth_image::PulledImage;
use hearth_vm::{VmSpec, SCRATCH_SERIAL};
use serde::{Deserialize, Serialize};

use crate::spec_record::{SpecRecord, SPEC_RECORD};

mod start;
use crate::{Sandbox, SandboxConfig, SandboxError};
pub(crate) use start::Identity;

/// The snapshot directory's description of the paused VM.
pub const PAUSE_META: &str = "paused.json";
/// The scratch disk's name inside a snapshot directory and a run directory.
pub(crate) const SCRATCH_FILE: &str = "scratch.ext4";
/// Version of [`PAUSE_META`]'s format; another version is refused, naming the file. A snapshot
/// whose state is thin (it needs its base memory file) is written as [`META_FORMAT_THIN`], which a
/// hearth from before thin states refuses instead of loading the state onto empty memory.
const META_FORMAT: u32 = 1;
const META_FORMAT_THIN: u32 = 2;

/// How long a pause asks the guest for its hostname (kept across the resume) before it saves the
/// VM anyway: a guest whose agent does not answer (a workload that exhausts it) is still paused,
/// with hearth's name for it, rather than after the channel's 30 s answer deadline.
const HOSTNAME_PROBE: Duration = Duration::from_secs(5);

/// A sandbox saved to disk by [`Sandbox::pause`]: no VMM runs for it.
#[derive(Debug, Clone)]
pub struct PausedSandbox {
    id: String,
    dir: PathBuf,
    image: PulledImage,
    meta: PauseMeta,
}

/// What [`PAUSE_META`] holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct PauseMeta {
    format: u32,
    id: String,
    /// The guest's hostname (the RESUME line carries it; the running guest keeps its own).
    hostname: String,
    spec: SpecRecord,
    /// The saved memory and device state's file name inside the snapshot directory.
    state_file: String,
    /// Its size.
    state_bytes: u64,
    /// The boot template memory the VM maps, linked into the snapshot directory under this name
    /// (`hearth_vm::SavedState::base`): the VM starts again on it, and its state may leave out
    /// the pages it shares with it. Absent: the state holds every page.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_memory: Option<String>,
}

pub(crate) fn io_error(what: String) -> impl FnOnce(std::io::Error) -> SandboxError {
    move |source| SandboxError::Io { what, source }
}

pub(crate) fn pause_error(sandbox: &str, what: String) -> SandboxError {
    SandboxError::Io {
        what: format!("pausing sandbox {sandbox}"),
        source: std::io::Error::other(what),
    }
}

impl Sandbox {
    /// What saving this VM needs (for a pause or a fork's snapshot): the spec it was started with
    /// and its scratch disk's path. `fail` makes the error; `purpose` ends the message for a VM
    /// without a spec record ("the VM cannot be {purpose}").
    pub(crate) fn saveable(
        &self,
        fail: impl Fn(String) -> SandboxError,
        purpose: &str,
    ) -> Result<(VmSpec, PathBuf), SandboxError> {
        let spec = self.spec.clone().ok_or_else(|| {
            fail(format!(
                "its run directory has no {SPEC_RECORD} (started by an older hearth): the VM \
                 cannot be {purpose}"
            ))
        })?;
        let scratch = spec
            .drives
            .iter()
            .find(|d| d.serial == SCRATCH_SERIAL)
            .map(|d| d.path.clone())
            .ok_or_else(|| fail("the VM has no scratch disk".into()))?;
        Ok((spec, scratch))
    }

    /// Saves this sandbox into `dir` (created; it must not hold a snapshot already) and ends its
    /// VMM and network; the sandbox is dead afterwards (drop it) and [`PausedSandbox::resume`]
    /// brings it back. Streams of execs still running end (their connection closes); their
    /// processes run on after the resume, detached. If saving fails, the VM runs on and the error
    /// is returned; `dir` is removed again.
    pub async fn pause(&self, dir: &Path) -> Result<PausedSandbox, SandboxError> {
        let started = Instant::now();
        let id = self.id.clone();
        let fail = |what| pause_error(&id, what);
        let (spec, scratch) = self.saveable(fail, "saved and started again identically")?;
        if dir.join(PAUSE_META).exists() {
            return Err(pause_error(
                &id,
                format!("{} already holds a paused sandbox", dir.display()),
            ));
        }
        let hostname = match tokio::time::timeout(HOSTNAME_PROBE, self.client.info()).await {
            Ok(Ok(info)) if hearth_proto::handshake::is_resume_hostname(&info.hostname) => {
                info.hostname
            }
            // Renamed by its tenant to more than one DNS label: the agent would refuse the
            // RESUME line with that name, so the resumed guest gets hearth's name for it back;
            // and so does a guest whose agent does not answer (its VM is saved all the same).
            _ => crate::boot::hostname_for(&id),
        };
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        let vm = self.vm.clone();
        let snapshot = dir.to_owned();
        let saved = tokio::task::spawn_blocking(move || {
            let mut vm = vm.lock().unwrap_or_else(|e| e.into_inner());
            let saved = vm.save_state(&snapshot);
            if saved.is_err() {
                // `save_state` stops the vCPUs first: let the guest run on.
                if let Err(e) = vm.resume() {
                    tracing::warn!("resuming the VM after a failed save: {e}");
                }
            }
            saved
        })
        .await
        .expect("save task");
        let saved = match saved {
            Ok(saved) => saved,
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                return Err(e.into());
            }
        };
        // The VM is stopped and its disks flushed: the scratch disk can move out of the run
        // directory, which goes with the VMM.
        let kept = std::fs::rename(&scratch, dir.join(SCRATCH_FILE))
            .map_err(io_error(format!(
                "moving the scratch disk {} into {}",
                scratch.display(),
                dir.display()
            )))
            .and_then(|()| {
                PausedSandbox::describe(dir, &id, hostname, self.image.clone(), &spec, &saved)
            });
        let paused = match kept {
            Ok(paused) => paused,
            Err(e) => {
                let _ = std::fs::rename(dir.join(SCRATCH_FILE), &scratch);
                let vm = self.vm.clone();
                tokio::task::spawn_blocking(move || {
                    let _ = vm.lock().unwrap_or_else(|e| e.into_inner()).resume();
                })
                .await
                .expect("resume task");
                let _ = std::fs::remove_dir_all(dir);
                return Err(e);
            }
        };
        let vm = self.vm.clone();
        let network = self
            .network
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        tokio::task::spawn_blocking(move || {
            if let Err(e) = vm.lock().unwrap_or_else(|e| e.into_inner()).kill() {
                tracing::warn!("ending the paused VM's VMM: {e}");
            }
            if let Some(network) = network {
                if let Err(e) = network.teardown() {
                    tracing::warn!("removing the paused sandbox's network: {e}");
                }
            }
        })
        .await
        .expect("kill task");
        tracing::info!(sandbox = %id, dir = %dir.display(), state_bytes = saved.bytes, took = ?started.elapsed(), "sandbox paused");
        Ok(paused)
    }
}

fn write_meta(dir: &Path, meta: &PauseMeta) -> Result<(), SandboxError> {
    let path = dir.join(PAUSE_META);
    let json = serde_json::to_vec_pretty(meta).expect("pause meta serializes");
    let tmp = dir.join(format!("{PAUSE_META}.tmp"));
    std::fs::write(&tmp, json)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io_error(format!("writing {}", path.display())))
}

impl PausedSandbox {
    /// Writes [`PAUSE_META`] for sandbox `id` (called `hostname`), whose VM, started with
    /// `spec`, was just saved into `dir` as `saved` and whose scratch disk is in `dir` too.
    pub(crate) fn describe(
        dir: &Path,
        id: &str,
        hostname: String,
        image: PulledImage,
        spec: &VmSpec,
        saved: &hearth_vm::SavedState,
    ) -> Result<PausedSandbox, SandboxError> {
        let file_name = |path: &Path| {
            path.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        };
        let base_memory = saved.base.as_deref().map(file_name);
        let meta = PauseMeta {
            format: match base_memory {
                Some(_) => META_FORMAT_THIN,
                None => META_FORMAT,
            },
            id: id.to_owned(),
            hostname,
            spec: SpecRecord::of(spec),
            state_file: file_name(&saved.state),
            state_bytes: saved.bytes,
            base_memory,
        };
        write_meta(dir, &meta)?;
        Ok(PausedSandbox {
            id: id.to_owned(),
            dir: dir.to_owned(),
            image,
            meta,
        })
    }

    /// The paused sandbox saved in `dir` (after a restart), booted from `image`. A missing or
    /// unreadable [`PAUSE_META`] is an error naming it.
    pub fn open(dir: &Path, image: PulledImage) -> Result<PausedSandbox, SandboxError> {
        let path = dir.join(PAUSE_META);
        let bytes =
            std::fs::read(&path).map_err(io_error(format!("reading {}", path.display())))?;
        let meta: PauseMeta = serde_json::from_slice(&bytes).map_err(|e| SandboxError::Io {
            what: format!("reading {}", path.display()),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
        })?;
        let plain_name = |name: &str| !name.is_empty() && !name.contains('/') && name != "..";
        let readable = match (meta.format, &meta.base_memory) {
            (META_FORMAT, None) => true,
            (META_FORMAT_THIN, Some(base)) => plain_name(base),
            _ => false,
        };
        if !readable || !plain_name(&meta.state_file) {
            return Err(SandboxError::Io {
                what: format!("reading {}", path.display()),
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!(
                        "format {} with state file {:?} and base memory {:?} (this hearth reads \
                         formats {META_FORMAT} and {META_FORMAT_THIN})",
                        meta.format, meta.state_file, meta.base_memory
                    ),
                ),
            });
        }
        Ok(PausedSandbox {
            id: meta.id.clone(),
            dir: dir.to_owned(),
            image,
            meta,
        })
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    /// The snapshot directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Bytes of saved memory and device state.
    pub fn state_bytes(&self) -> u64 {
        self.meta.state_bytes
    }

    /// The template memory the saved VM starts again on, linked into the snapshot directory.
    fn base_memory(&self) -> Option<PathBuf> {
        self.meta
            .base_memory
            .as_ref()
            .map(|name| self.dir.join(name))
    }

    /// Starts the saved VM again in `run_dir` (detached like the node's VMs with `detached`): the
    /// same kernel, command line, drives and NIC, the network rebuilt per `config` (its policy
    /// too), the scratch disk linked in, the state loaded, then the agent told the host's clock
    /// and fresh entropy. On success the snapshot directory is removed; on failure it stays as it
    /// was and the error names the file at fault.
    pub async fn resume(
        &self,
        config: &SandboxConfig,
        run_dir: &Path,
        detached: bool,
    ) -> Result<Sandbox, SandboxError> {
        let identity = Identity {
            id: &self.id,
            hostname: &self.meta.hostname,
            copy: false,
        };
        let sandbox = self
            .start_saved(config, identity, run_dir, detached)
            .await?;
        if let Err(e) = std::fs::remove_dir_all(&self.dir) {
            tracing::warn!(dir = %self.dir.display(), "removing the resumed sandbox's snapshot: {e}");
        }
        Ok(sandbox)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_or_corrupt_meta_file_is_named() {
        let dir = tempfile::tempdir().unwrap();
        let image = || PulledImage {
            reference: "busybox".parse().unwrap(),
            platform: Default::default(),
            manifest_digest:
                "sha256:0000000000000000000000000000000000000000000000000000000000000000"
                    .parse()
                    .unwrap(),
            rootfs: "/nonexistent".into(),
            config: Default::default(),
            cached: true,
        };
        let path = dir.path().join(PAUSE_META);
        let missing = PausedSandbox::open(dir.path(), image()).unwrap_err();
        assert!(
            missing.to_string().contains(&path.display().to_string()),
            "{missing}"
        );
        std::fs::write(&path, b"{not json").unwrap();
        let corrupt = PausedSandbox::open(dir.path(), image()).unwrap_err();
        assert!(
            corrupt.to_string().contains(&path.display().to_string()),
            "{corrupt}"
        );
    }
}
