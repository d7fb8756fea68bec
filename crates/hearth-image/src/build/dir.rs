//! A root filesystem build's directory, `tmp/build-*`: made private, owned through a lock file
//! for the build's life, and removed however the build ends, including when the pull is
//! cancelled (a creating sandbox deleted) while the build's worker threads (the layer applier,
//! mkfs) still write into it. Directories of builders that died (`kill -9`) are swept at the next
//! store open.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lock::FileLock;
use crate::store::private_dir;
use crate::ImageError;

/// The lock file inside each `tmp/build-*` directory, held by the process building there.
const BUILD_OWNER: &str = ".owner";
/// The longest a cancelled build's workers are waited for before their directory is removed
/// anyway (the applier stops at once when its downloads are dropped; mkfs has its own timeout).
const WORKERS_GRACE: Duration = Duration::from_secs(600);

/// A build directory under `tmp`, removed when dropped. While a worker token
/// ([`BuildDir::worker`]) is alive, a worker may still be writing into it: the removal then waits
/// on a thread of its own for the last token, so that it never races a writer and leaves half a
/// tree behind (the soak found such a directory after a slow pull was cancelled).
pub(super) struct BuildDir {
    path: PathBuf,
    /// Held until the directory is gone, so that no sweep takes it for abandoned meanwhile.
    owner: Option<FileLock>,
    workers: Arc<()>,
}

impl BuildDir {
    /// Makes a new private `build-*` directory in `tmp` and takes its owner lock.
    pub(super) fn create(tmp: &Path) -> Result<BuildDir, ImageError> {
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { op, path, source }
        };
        let dir = tempfile::Builder::new()
            .prefix("build-")
            .tempdir_in(tmp)
            .map_err(io("create a build directory in", tmp))?;
        private_dir(dir.path()).map_err(io("make private", dir.path()))?;
        let owner = dir.path().join(BUILD_OWNER);
        let owner = FileLock::exclusive(&owner).map_err(io("lock", &owner))?;
        Ok(BuildDir {
            path: dir.keep(),
            owner: Some(owner),
            workers: Arc::new(()),
        })
    }

    pub(super) fn path(&self) -> &Path {
        &self.path
    }

    /// A token a worker thread holds while it may write into the directory.
    pub(super) fn worker(&self) -> Arc<()> {
        self.workers.clone()
    }

    /// Removes the directory now (off the async runtime: a staging tree can be large).
    pub(super) async fn remove(mut self) {
        let (path, owner) = (self.path.clone(), self.owner.take());
        let _ = tokio::task::spawn_blocking(move || {
            remove_tree(&path);
            drop(owner);
        })
        .await;
    }
}

impl Drop for BuildDir {
    fn drop(&mut self) {
        let Some(owner) = self.owner.take() else {
            return; // removed by `remove`
        };
        let (path, workers) = (self.path.clone(), self.workers.clone());
        if Arc::strong_count(&workers) == 2 {
            remove_tree(&path); // no worker left: the build failed, or was cancelled between steps
            return;
        }
        let cleanup = move || {
            let deadline = Instant::now() + WORKERS_GRACE;
            while Arc::strong_count(&workers) > 1 && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            remove_tree(&path);
            drop(owner);
        };
        if let Err(e) = std::thread::Builder::new()
            .name("hearth-build-rm".into())
            .spawn(cleanup)
        {
            tracing::warn!(path = %self.path.display(), "removing a cancelled build later: {e}");
        }
    }
}

/// Best-effort removal of a build directory; anything left is collected by `gc`.
fn remove_tree(path: &Path) {
    if let Err(e) = std::fs::remove_dir_all(path) {
        tracing::warn!(path = %path.display(), error = %e, "could not remove a build directory; `hearth` gc will retry");
    }
}

/// Removes the `build-*` directories under `tmp` whose builder died (killed mid-build: its
/// staging tree stays otherwise, found by the soak). A directory whose owner lock is held is a
/// build in progress, by this or another hearth process, and stays; so does one too young to have
/// taken its lock yet.
pub(crate) fn sweep_abandoned_builds(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        if !entry.file_name().to_string_lossy().starts_with("build-") || !dir.is_dir() {
            continue;
        }
        let owner = dir.join(BUILD_OWNER);
        let abandoned = if owner.exists() {
            FileLock::try_exclusive(&owner).is_ok_and(|held| held.is_some())
        } else {
            // No owner file yet: just created, or left by a hearth from before owner files.
            std::fs::metadata(&dir)
                .and_then(|m| m.modified())
                .is_ok_and(|t| t.elapsed().is_ok_and(|age| age.as_secs() > 600))
        };
        if abandoned {
            match std::fs::remove_dir_all(&dir) {
                Ok(()) => tracing::info!(dir = %dir.display(), "removed an abandoned image build"),
                Err(e) => tracing::warn!(dir = %dir.display(), "removing an abandoned build: {e}"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A hearth killed mid-build leaves its staging tree in tmp/; the next store open removes it,
    /// and never a build still running (its owner lock held) or one just created.
    #[test]
    fn abandoned_builds_go_and_running_ones_stay() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = |name: &str| {
            let d = tmp.path().join(name);
            std::fs::create_dir_all(d.join("root/etc")).unwrap();
            d
        };
        let (running, dead, fresh, other) = (
            dir("build-run"),
            dir("build-dead"),
            dir("build-new"),
            dir("keep"),
        );
        let _held = FileLock::exclusive(&running.join(BUILD_OWNER)).unwrap();
        drop(FileLock::exclusive(&dead.join(BUILD_OWNER)).unwrap());
        sweep_abandoned_builds(tmp.path());
        assert!(running.exists() && fresh.exists() && other.exists());
        assert!(!dead.exists());
        sweep_abandoned_builds(&tmp.path().join("absent"));
    }

    /// A build dropped while a worker still writes into its directory (a cancelled pull): the
    /// directory goes once the worker is done, not before (a removal racing the writer left
    /// half a tree), and a sweep meanwhile leaves it alone.
    #[test]
    fn a_cancelled_build_is_removed_after_its_last_worker() {
        let tmp = tempfile::tempdir().unwrap();
        let build = BuildDir::create(tmp.path()).unwrap();
        let path = build.path().to_path_buf();
        let worker = build.worker();
        let root = path.join("root");
        std::fs::create_dir(&root).unwrap();
        let (go, wait) = std::sync::mpsc::channel::<()>();
        let writer = std::thread::spawn({
            move || {
                let _token = worker;
                wait.recv().unwrap();
                // Still writing after the build was dropped.
                for i in 0..200 {
                    std::fs::write(root.join(format!("f{i}")), b"x").unwrap();
                }
            }
        });
        drop(build);
        sweep_abandoned_builds(tmp.path());
        assert!(path.join("root").is_dir(), "kept while its worker writes");
        go.send(()).unwrap();
        writer.join().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while path.exists() {
            assert!(Instant::now() < deadline, "the build directory stayed");
            std::thread::sleep(Duration::from_millis(20));
        }

        // A failed build with no worker left goes at once.
        let failed = BuildDir::create(tmp.path()).unwrap();
        let path = failed.path().to_path_buf();
        drop(failed);
        assert!(!path.exists());
    }
}
