//! Snapshot restore for QEMU boots. One **template** per [`TemplateKey`] is booted once with
//! `hearth.template=1` (the agent does its early init only and waits), saved with QMP `migrate` to
//! `$HEARTH_HOME/templates/<id>/state` and quit; every later VM with that key is restored from it
//! (`-incoming defer`, `migrate-incoming`, `cont`) with its own disks, sockets and console, and the
//! host's RESUME line (`hearth_proto::handshake`) makes the agent finish its init. The template
//! never touches its (placeholder) disks, so one template serves every image.
//!
//! The template's guest memory is the file `templates/<id>/memory` (mapped shared while it is
//! built, left out of `state`); restored VMs map a sealed copy of it privately
//! ([`crate::GuestMemory`], `qemu/memory.rs`), so the pages they never write are shared by all of
//! them instead of each VM loading its own copy of the template's RAM. A restored VM saved later
//! (a pause, a fork) keeps a link to that file and saves only the pages it changed (`thin.rs`,
//! `thin_save.rs`), so it starts again on the template's memory too.
//!
//! Writes only under `$HEARTH_HOME/templates/` (and the template VM's run directory under
//! `$HEARTH_HOME/run/`). Builds are serialized per key by an `flock` on `templates/<id>.lock`; a
//! template is complete once its `meta.json` exists (written last), so a failed build is never used.
//! [`store`] keeps the number of templates bounded (stale ones removed, idle ones evicted).

mod build;
mod key;
pub(crate) mod restore;
pub(crate) mod save;
pub mod store;
pub(crate) mod thin;
mod thin_save;
pub(crate) use thin_save::save_thin;

use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

pub use key::{FileIdentity, KeyInputs, TemplateKey};
pub use save::SaveError;

use super::QemuVmm;
use crate::spec::{Drive, GuestMemory, KernelCmdline, VmSpec};
use crate::vmm::VmError;

/// Kernel parameter that puts the agent in template mode.
pub const TEMPLATE_PARAM: &str = "hearth.template=1";
pub use crate::spec::HOSTNAME_PARAM;

const STATE: &str = "state";
const MEMORY: &str = "memory";
const META: &str = "meta.json";

/// A template's bookkeeping, `templates/<id>/meta.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TemplateMeta {
    pub id: String,
    pub inputs: KeyInputs,
    /// Size of the saved state.
    pub state_bytes: u64,
    /// How long booting and saving the template took.
    pub build_ms: u64,
    /// When it was built (seconds since the Unix epoch).
    pub built_unix: u64,
}

/// The template for one kind of VM (built or not yet).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Template {
    pub key: TemplateKey,
    /// `$HEARTH_HOME/templates/<id>`.
    pub dir: PathBuf,
    home: PathBuf,
    /// The command line the template booted with; restored VMs keep it (their kernel already ran).
    cmdline: KernelCmdline,
}

impl Template {
    /// The template that VMs like `spec` restore from. Pure apart from reading file metadata.
    pub fn for_spec(qemu: &QemuVmm, home: &Path, spec: &VmSpec) -> Result<Template, SnapshotError> {
        let cmdline = template_cmdline(&spec.cmdline);
        let mut probe = spec.clone();
        probe.cmdline = cmdline.clone();
        probe.memory = GuestMemory::TemplateFile(MEMORY.into());
        let key = TemplateKey::new(qemu, &probe)?;
        Ok(Template {
            dir: home.join("templates").join(&key.id),
            home: home.to_owned(),
            key,
            cmdline,
        })
    }

    /// The saved VM state.
    pub fn state(&self) -> PathBuf {
        self.dir.join(STATE)
    }

    /// The template's guest memory (written by the template VM, mapped by restored ones).
    pub fn memory(&self) -> PathBuf {
        self.dir.join(MEMORY)
    }

    /// The template's bookkeeping, if it is completely built (its memory file there too).
    pub fn meta(&self) -> Option<TemplateMeta> {
        if !self.memory().is_file() {
            return None;
        }
        let bytes = std::fs::read(self.dir.join(META)).ok()?;
        let meta: TemplateMeta = serde_json::from_slice(&bytes).ok()?;
        let state_bytes = std::fs::metadata(self.state()).ok()?.len();
        (meta.id == self.key.id && meta.state_bytes == state_bytes).then_some(meta)
    }

    pub fn is_built(&self) -> bool {
        self.meta().is_some()
    }

    /// `spec` turned into a restore from this template: the template's command line (the guest
    /// gets its hostname in RESUME instead) and `restore_from`; its own disks, sockets and console.
    /// Fails if `spec` does not match the template's devices.
    pub fn restore_spec(&self, qemu: &QemuVmm, spec: &VmSpec) -> Result<VmSpec, SnapshotError> {
        let mut restore = spec.clone();
        restore.cmdline = self.cmdline.clone();
        restore.restore_from = Some(self.state());
        restore.memory = GuestMemory::FromTemplate(self.memory());
        if key::normalized_argv(qemu, &restore) != self.key.inputs.argv {
            return Err(SnapshotError::Mismatch {
                id: self.key.id.clone(),
            });
        }
        Ok(restore)
    }

    /// Removes the template (after a restore from it failed) so the next VM builds it afresh.
    pub fn discard(&self) -> Result<(), SnapshotError> {
        discard(&self.dir)
    }

    fn lock_path(&self) -> PathBuf {
        lock_path(&self.dir)
    }

    /// The template VM: `spec` with the template command line, placeholder disks of the same
    /// serials and writability in the template directory, and a run directory of its own.
    fn build_spec(&self, spec: &VmSpec) -> VmSpec {
        let run_dir = self
            .home
            .join("run")
            .join(format!("template-{}", self.key.id));
        let mut template = spec.clone();
        template.cmdline = self.cmdline.clone();
        template.agent_socket = run_dir.join("agent.sock");
        template.console_log = self.dir.join("console.log");
        template.run_dir = run_dir;
        template.detached = false;
        template.restore_from = None;
        template.memory = GuestMemory::TemplateFile(self.memory());
        template.drives = spec
            .drives
            .iter()
            .map(|d| {
                let placeholder = self.dir.join(format!("{}.placeholder", d.serial));
                Drive::new(&d.serial, placeholder, d.read_only)
            })
            .collect();
        template
    }
}

/// The template for VMs like `spec`, built first if it is not yet (a few seconds: one cold boot
/// plus the save), and marked used. Concurrent callers wait for one build. A build that fails
/// leaves nothing behind. Before a build, stale and idle templates make room for it
/// ([`store`]); `Err(Full)` when the node already holds `qemu.max_templates()` in use.
pub fn ensure_template(
    qemu: &QemuVmm,
    home: &Path,
    spec: &VmSpec,
) -> Result<Template, SnapshotError> {
    let template = Template::for_spec(qemu, home, spec)?;
    if template.is_built() {
        store::mark_used(&template.dir, SystemTime::now());
        return Ok(template);
    }
    std::fs::create_dir_all(home.join("templates")).map_err(|source| SnapshotError::Io {
        what: "creating",
        path: home.join("templates"),
        source,
    })?;
    let _lock = BuildLock::take(&template.lock_path())?;
    if template.is_built() {
        return Ok(template); // another process built it while we waited
    }
    store::make_room(
        home,
        &template.key.id,
        qemu.max_templates(),
        SystemTime::now(),
    )?;
    let started = Instant::now();
    remove_dir(&template.dir)?; // a build that died half-way
    let built = build::build(qemu, &template, &template.build_spec(spec));
    match built {
        Ok(meta) => {
            tracing::info!(
                template = %template.key.id,
                state_mib = meta.state_bytes >> 20,
                "built snapshot template in {:.2}s",
                started.elapsed().as_secs_f64()
            );
            Ok(template)
        }
        Err(err) => {
            let _ = remove_dir(&template.dir);
            Err(err)
        }
    }
}

/// Removes the template in `dir` under its build lock, so no build is cut short.
pub fn discard(dir: &Path) -> Result<(), SnapshotError> {
    let _lock = BuildLock::take(&lock_path(dir))?;
    remove_dir(dir)
}

fn lock_path(dir: &Path) -> PathBuf {
    dir.with_extension("lock")
}

/// The template's command line: `hearth.template=1`, and no per-VM hostname.
fn template_cmdline(cmdline: &KernelCmdline) -> KernelCmdline {
    let mut cmdline = cmdline.clone();
    cmdline.remove(HOSTNAME_PARAM).set(TEMPLATE_PARAM);
    cmdline
}

fn remove_dir(dir: &Path) -> Result<(), SnapshotError> {
    match std::fs::remove_dir_all(dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(SnapshotError::Io {
            what: "removing",
            path: dir.to_owned(),
            source: e,
        }),
        _ => Ok(()),
    }
}

/// An exclusive `flock`, released when dropped.
struct BuildLock {
    _file: File,
}

impl BuildLock {
    /// Waits for the lock.
    fn take(path: &Path) -> Result<BuildLock, SnapshotError> {
        loop {
            if let Some(lock) = BuildLock::lock(path, libc::LOCK_EX)? {
                return Ok(lock);
            }
        }
    }

    /// The lock if nobody holds it.
    fn try_take(path: &Path) -> Result<Option<BuildLock>, SnapshotError> {
        loop {
            match BuildLock::lock(path, libc::LOCK_EX | libc::LOCK_NB) {
                Err(SnapshotError::Io { source, .. })
                    if source.kind() == std::io::ErrorKind::WouldBlock =>
                {
                    return Ok(None)
                }
                Ok(None) => continue,
                other => return other,
            }
        }
    }

    /// One attempt: `Ok(None)` when the file was unlinked (by [`store`]'s removal, which holds the
    /// lock while it unlinks) between our open and our lock, so that the lock guards nothing.
    fn lock(path: &Path, operation: libc::c_int) -> Result<Option<BuildLock>, SnapshotError> {
        use std::os::unix::fs::MetadataExt;
        let io = |source| SnapshotError::Io {
            what: "locking",
            path: path.to_owned(),
            source,
        };
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(io)?;
        // SAFETY: flock on a descriptor we own.
        while unsafe { libc::flock(file.as_raw_fd(), operation) } != 0 {
            let err = std::io::Error::last_os_error();
            if err.kind() != std::io::ErrorKind::Interrupted {
                return Err(io(err));
            }
        }
        let held = file.metadata().map_err(io)?;
        let same = std::fs::metadata(path)
            .is_ok_and(|now| (now.dev(), now.ino()) == (held.dev(), held.ino()));
        Ok(same.then_some(BuildLock { _file: file }))
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("starting the snapshot template VM: {0}")]
    Boot(#[source] Box<VmError>),
    #[error(
        "building the snapshot template in {dir}: {detail}\n--- template console tail:\n{console}"
    )]
    Build {
        dir: PathBuf,
        detail: String,
        console: String,
    },
    #[error("restoring the VM from {state}: {detail}\n--- qemu stderr:\n{stderr}")]
    Restore {
        state: PathBuf,
        detail: String,
        stderr: String,
    },
    #[error("this VM's devices differ from snapshot template {id}'s; boot it cold")]
    Mismatch { id: String },
    /// The node holds its limit of templates and each was used within `idle` or is being built
    /// (see [`store`]).
    #[error(
        "the node keeps at most {limit} boot templates (--max-templates) and each was used in the \
         last {} minutes or is being built; this VM boots cold",
        idle.as_secs() / 60
    )]
    Full { limit: usize, idle: Duration },
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Accel;

    #[test]
    fn template_cmdline_drops_the_hostname_and_marks_template_mode() {
        let mut cmdline = KernelCmdline::default();
        cmdline.set("hearth.hostname=hearth-abc");
        let template = template_cmdline(&cmdline).render();
        assert!(!template.contains("hearth.hostname"), "{template}");
        assert!(
            template.split(' ').any(|p| p == TEMPLATE_PARAM),
            "{template}"
        );
        assert!(template.starts_with(&KernelCmdline::default().render()));
    }

    #[test]
    fn restore_spec_keeps_the_vms_own_files_and_takes_the_template_cmdline() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path();
        for file in ["vmlinux", "init.cpio", "qemu"] {
            std::fs::write(home.join(file), file).unwrap();
        }
        let qemu = QemuVmm::new(home.join("qemu"), Accel::Tcg, Some(1)).unwrap();
        let mut spec = VmSpec::new(
            home.join("vmlinux"),
            home.join("init.cpio"),
            home.join("run/x"),
        );
        spec.cmdline.set("hearth.hostname=hearth-x");
        spec.drives = vec![
            Drive::rootfs(home.join("img.ext4")),
            Drive::scratch(home.join("run/x/scratch.ext4")),
        ];
        let template = Template::for_spec(&qemu, home, &spec).unwrap();
        assert!(!template.is_built());
        assert_eq!(template.dir, home.join("templates").join(&template.key.id));

        let restore = template.restore_spec(&qemu, &spec).unwrap();
        assert_eq!(restore.restore_from, Some(template.state()));
        assert_eq!(restore.drives, spec.drives);
        assert_eq!(restore.agent_socket, spec.agent_socket);
        assert_eq!(restore.cmdline.get("hearth.template"), Some(TEMPLATE_PARAM));
        assert_eq!(restore.cmdline.get(HOSTNAME_PARAM), None);

        let built = template.build_spec(&spec);
        assert!(built
            .drives
            .iter()
            .all(|d| d.path.starts_with(&template.dir)));
        assert_eq!(built.drives[0].read_only, spec.drives[0].read_only);
        assert_eq!(
            key::normalized_argv(&qemu, &built),
            template.key.inputs.argv
        );

        let mut other = spec.clone();
        other.vcpus = 2;
        assert!(matches!(
            template.restore_spec(&qemu, &other),
            Err(SnapshotError::Mismatch { .. })
        ));
    }
}
