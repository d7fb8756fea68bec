//! The build's private mount namespace (issue #12, item 13). Layer application and `mkfs` handle an
//! untrusted image's setuid files and device nodes; each runs on a thread of its own that first
//! leaves the host's mount namespace (`unshare(CLONE_NEWNS)`, every mount made a slave so nothing
//! propagates back) and then sees the build directory through a bind mount of it onto itself with
//! `nosuid`, `nodev` and `noexec`. A device node an image ships cannot be opened there, a setuid
//! file cannot be run, nothing in the tree can be executed, whatever the builder is tricked into;
//! and the mount is invisible to the rest of the host. The tree itself stays in the 0700 build
//! directory, for the host's root only, and lives only as long as the build.
//!
//! Needs `CAP_SYS_ADMIN`: unprivileged (no device nodes, no foreign owners, so little to guard),
//! or where the namespace cannot be made (a container without the capability), the work runs
//! without it and says so once.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// Runs `work` on a new thread inside a private mount namespace in which `tree` is mounted
/// `nosuid,nodev,noexec`; the returned future gives its result (`None` if it panicked).
/// Processes `work` starts inherit the namespace.
pub(crate) fn run_confined<T: Send + 'static>(
    name: &str,
    tree: PathBuf,
    work: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<impl std::future::Future<Output = Option<T>>> {
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name(name.into())
        .spawn(move || {
            // The thread is this build's alone and ends with it, so its namespace does too
            // (a pooled thread would carry it into unrelated work).
            // SAFETY: geteuid cannot fail.
            if unsafe { libc::geteuid() } == 0 {
                if let Err(e) = enter(&tree) {
                    warn_once(&tree, &e);
                }
            }
            let _ = tx.send(std::panic::catch_unwind(std::panic::AssertUnwindSafe(work)));
        })?;
    Ok(async move { rx.await.ok().and_then(Result::ok) })
}

/// Leaves the host's mount namespace and mounts `tree` onto itself `nosuid,nodev,noexec`.
fn enter(tree: &Path) -> nix::Result<()> {
    unshare(CloneFlags::CLONE_NEWNS)?;
    // Slave, not private: the host's unmounts still reach this copy, and nothing mounted here
    // reaches the host's.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    mount(
        Some(tree),
        tree,
        None::<&str>,
        MsFlags::MS_BIND,
        None::<&str>,
    )?;
    mount(
        None::<&str>,
        tree,
        None::<&str>,
        MsFlags::MS_REMOUNT
            | MsFlags::MS_BIND
            | MsFlags::MS_NOSUID
            | MsFlags::MS_NODEV
            | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
}

fn warn_once(tree: &Path, error: &nix::Error) {
    static WARNED: AtomicBool = AtomicBool::new(false);
    if !WARNED.swap(true, Ordering::Relaxed) {
        tracing::warn!(
            tree = %tree.display(),
            "image builds run without a private nosuid,nodev mount of their tree: {error}"
        );
    }
}
