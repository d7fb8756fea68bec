//! Forking a running sandbox: [`Sandbox::snapshot`] saves the running VM's memory and device
//! state and a copy of its scratch disk into a snapshot directory while the VM keeps running
//! (stopped only for the save and the disk copy: QMP `stop`, migrate to a file, copy, `cont`);
//! [`PausedSandbox::start_copy`] starts a new sandbox from such a snapshot, as many times as
//! wanted, each with its own id, hostname, network namespace and scratch disk.
//!
//! What a copy shares with its origin and what it does not:
//! - Shared, as of the snapshot's instant: every process, open file and byte of memory, the
//!   scratch disk's contents, the uptime.
//! - Its own: the id; the hostname (`hearth-<id prefix>`, sent in RESUME: the agent renames a
//!   running guest whose hostname differs); the wall clock and fresh entropy with a CRNG reseed
//!   (the same RESUME a resumed sandbox gets), so no two copies draw the same random numbers after
//!   the copy; the network namespace and tap of its own id (the guest's MAC and addresses are the
//!   same in every namespace, so the guest needs no change; connections the origin had open are
//!   cut in the copy); the egress policy its [`SandboxConfig`] gives (the node passes the origin's);
//!   the scratch disk, a copy (see below).
//! - Execs running in the origin are not the copy's: its agent session is new, and the old
//!   session's processes run on detached, output discarded (as after a resume).
//!
//! The scratch disk is copied once while the origin is stopped, into the snapshot directory, and
//! again for each copy from there (`hearth_vm::scratch::copy_sparse`: a `FICLONE` reflink where
//! the filesystem has them, btrfs and XFS, O(1); otherwise a copy of the data extents only, holes
//! kept). Measured on the development host for a 4 GiB sparse disk holding 100 MiB: ext4 refuses
//! `FICLONE` and the extent copy (`copy_file_range`) takes 40-60 ms warm, 180 ms cold; tmpfs
//! (`/dev/shm`) has no reflinks either and takes 55-70 ms. A qcow2 overlay would be O(1) too, but
//! needs a frozen base the origin no longer writes, i.e. the same one copy, plus a format change
//! for every drive; the copy costs the origin only its own disk's data, once per fork.
//!
//! Writes the snapshot directory it is given and the copies' run directories.

use std::path::Path;
use std::time::Instant;

use crate::pause::{io_error, Identity, SCRATCH_FILE};
use crate::{PausedSandbox, Sandbox, SandboxConfig, SandboxError};

fn fork_error(sandbox: &str, what: String) -> SandboxError {
    SandboxError::Io {
        what: format!("forking sandbox {sandbox}"),
        source: std::io::Error::other(what),
    }
}

impl Sandbox {
    /// Saves this running sandbox into `dir` (created; it must not exist yet) without ending it:
    /// the VM is stopped while its state is saved and its scratch disk copied, then continues.
    /// Execs keep running (they only stall for that moment). [`PausedSandbox::start_copy`] starts
    /// copies from the result; the caller removes `dir` when done with it. If saving fails, `dir`
    /// is removed and the VM runs on.
    pub async fn snapshot(&self, dir: &Path) -> Result<PausedSandbox, SandboxError> {
        let started = Instant::now();
        let id = self.id.clone();
        let (spec, scratch) = self.saveable(|what| fork_error(&id, what), "copied")?;
        {
            use std::os::unix::fs::DirBuilderExt;
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(dir)
                .map_err(io_error(format!("creating {}", dir.display())))?;
        }
        let vm = self.vm.clone();
        let snapshot = dir.to_owned();
        let saved = tokio::task::spawn_blocking(move || {
            let mut vm = vm.lock().unwrap_or_else(|e| e.into_inner());
            let stopped = Instant::now();
            let saved = vm.save_state(&snapshot).map_err(SandboxError::from);
            // The guest is stopped and its disk flushed: the copy is consistent with the state.
            let copied = saved.and_then(|saved| {
                let copy = snapshot.join(SCRATCH_FILE);
                hearth_vm::scratch::copy_sparse(&scratch, &copy)
                    .map_err(io_error(format!(
                        "copying the scratch disk {} to {}",
                        scratch.display(),
                        copy.display()
                    )))
                    .map(|()| saved)
            });
            // `save_state` stops the vCPUs; the origin runs on whatever happened.
            let resumed = vm.resume();
            (copied, resumed, stopped.elapsed())
        })
        .await
        .expect("snapshot task");
        let (copied, resumed, stopped_for) = saved;
        if let Err(e) = resumed {
            tracing::warn!(sandbox = %id, "continuing the VM after its snapshot: {e}");
        }
        let described = copied.and_then(|saved| {
            let hostname = crate::boot::hostname_for(&id);
            PausedSandbox::describe(dir, &id, hostname, self.image.clone(), &spec, &saved)
        });
        match described {
            Ok(paused) => {
                tracing::info!(sandbox = %id, dir = %dir.display(), state_bytes = paused.state_bytes(), ?stopped_for, took = ?started.elapsed(), "sandbox snapshot taken");
                Ok(paused)
            }
            Err(e) => {
                let _ = std::fs::remove_dir_all(dir);
                Err(e)
            }
        }
    }
}

impl PausedSandbox {
    /// Starts sandbox `id` in `run_dir` (detached like the node's VMs with `detached`) as a copy
    /// of the snapshot's sandbox: its own hostname, network per `config` in `id`'s namespace, a
    /// copy of the scratch disk, then the agent told the host's clock, fresh entropy and the new
    /// hostname. The snapshot stays as it was, for more copies.
    pub async fn start_copy(
        &self,
        config: &SandboxConfig,
        id: &str,
        run_dir: &Path,
        detached: bool,
    ) -> Result<Sandbox, SandboxError> {
        if id == self.id() {
            return Err(fork_error(
                id,
                "a copy needs an id of its own (resume the snapshot instead)".into(),
            ));
        }
        let hostname = crate::boot::hostname_for(id);
        let identity = Identity {
            id,
            hostname: &hostname,
            copy: true,
        };
        self.start_saved(config, identity, run_dir, detached).await
    }
}
