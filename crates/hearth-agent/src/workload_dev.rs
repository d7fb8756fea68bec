//! The workload's /dev: a small tmpfs instead of the guest's devtmpfs, so no disk (/dev/vd*), no
//! /dev/mem, serial console (/dev/ttyS*, hvc*), /dev/kmsg, virtio port (the agent's channel) or
//! vsock device is reachable from the workload. It holds null, zero, full, random, urandom and tty
//! (each a bind mount of the agent's node), `ptmx -> pts/ptmx`, a private devpts instance, shm
//! and the fd/stdin/stdout/stderr links.
//!
//! The tmpfs is `nodev` (as are the overlay root and shm, see [`crate::pid1`]): a root workload may
//! keep CAP_MKNOD (docker's set) and create a node for any disk, but opening it fails (EACCES).
//! Only the bind-mounted nodes above carry the devtmpfs mount's permission to be opened.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use nix::mount::{mount, MsFlags};

use crate::in_root::MountPoint;

/// The device nodes bind-mounted from the agent's /dev.
pub const DEVICES: &[&str] = &["null", "zero", "full", "random", "urandom", "tty"];

/// Symlinks in the workload's /dev: (name, target).
pub const LINKS: &[(&str, &str)] = &[
    ("ptmx", "pts/ptmx"),
    ("fd", "/proc/self/fd"),
    ("stdin", "/proc/self/fd/0"),
    ("stdout", "/proc/self/fd/1"),
    ("stderr", "/proc/self/fd/2"),
];

/// Mounts the minimal /dev at `root`/dev, its nodes taken from `agent_dev` (the agent's devtmpfs).
pub fn mount_minimal_dev(root: &Path, agent_dev: &Path) -> Result<(), String> {
    let point = MountPoint::open(root, Path::new("dev")).map_err(|e| e.to_string())?;
    mount(
        Some("tmpfs"),
        &point.path(),
        Some("tmpfs"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        Some("mode=0755,size=1m"),
    )
    .map_err(|e| format!("mounting a tmpfs on the workload's /dev: {e}"))?;
    // /dev was a real directory (MountPoint refuses symlinks): the path now names our tmpfs.
    let dev = root.join("dev");
    let fail = |what: String, e: &dyn std::fmt::Display| format!("workload /dev: {what}: {e}");
    for name in DEVICES {
        let node = dev.join(name);
        std::fs::write(&node, b"").map_err(|e| fail(format!("creating {name}"), &e))?;
        std::fs::set_permissions(&node, std::fs::Permissions::from_mode(0o666))
            .map_err(|e| fail(format!("chmod {name}"), &e))?;
        mount(
            Some(&agent_dev.join(name)),
            &node,
            None::<&str>,
            MsFlags::MS_BIND,
            None::<&str>,
        )
        .map_err(|e| fail(format!("binding {name}"), &e))?;
    }
    for (name, mode, fstype, flags, data) in [
        (
            "pts",
            0o755,
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            "newinstance,ptmxmode=0666,mode=0620,gid=5",
        ),
        (
            "shm",
            0o1777,
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            "mode=1777",
        ),
    ] {
        let dir = dev.join(name);
        std::fs::create_dir(&dir).map_err(|e| fail(format!("creating {name}"), &e))?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode))
            .map_err(|e| fail(format!("chmod {name}"), &e))?;
        mount(Some(fstype), &dir, Some(fstype), flags, Some(data))
            .map_err(|e| fail(format!("mounting {name}"), &e))?;
    }
    for (name, target) in LINKS {
        std::os::unix::fs::symlink(target, dev.join(name))
            .map_err(|e| fail(format!("linking {name}"), &e))?;
    }
    Ok(())
}
