//! Entering the workload root, in the exec's own mount namespace: a fresh /proc for the exec's PID
//! namespace (mounted on a mount point resolved inside the root, see [`crate::in_root`]), then the
//! root becomes `/` and the agent's root is gone from this namespace.
//!
//! `pivot_root` + unmounting the old root where it works. In the guest the agent's root is the
//! initramfs (rootfs), which `pivot_root` refuses (EINVAL) and which can never be unmounted; there
//! the exec detaches every agent mount that is not part of the workload root, moves the workload
//! root over `/` (`MS_MOVE`) and chroots into it. `..` at the root of a mount that covers `/` stays
//! where it is, so the classic `mkdir x; chroot x; cd ../../..` escape ends in the workload root;
//! and without CAP_SYS_ADMIN the workload cannot unmount the covering mount.
//!
//! /proc paths that reach outside the workload's namespaces (sysctls such as `core_pattern` and
//! `modprobe`, which the kernel runs as full root; `sysrq-trigger`) are made read-only and a few
//! kernel-memory views are masked, as docker does.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::in_root::MountPoint;

const SECURE: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// /proc entries the workload may read but not write (docker's `ReadonlyPaths`).
const READ_ONLY: &[&str] = &[
    "/proc/bus",
    "/proc/fs",
    "/proc/irq",
    "/proc/sys",
    "/proc/sysrq-trigger",
];

/// /proc files replaced by /dev/null (part of docker's `MaskedPaths`).
const MASKED: &[&str] = &[
    "/proc/kcore",
    "/proc/keys",
    "/proc/timer_list",
    "/proc/sched_debug",
    "/proc/latency_stats",
];

/// Makes `root` this process's `/` (see the module docs). On error, says which step failed.
pub fn enter(root: &Path) -> Result<(), String> {
    let step = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    // Nothing done here may propagate back into the agent's namespace.
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_PRIVATE,
        None::<&str>,
    )
    .map_err(|e| step("making mounts private", &e))?;
    // Outside a VM the agent may serve the host's own `/` (`serve --root /`): already entered.
    let entered = root == Path::new("/");
    if !entered {
        // The root must be a mount point of its own (it already is in a VM; a directory outside one).
        mount(
            Some(root),
            root,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(|e| step(&format!("bind-mounting {}", root.display()), &e))?;
    }
    let proc_point = MountPoint::open(root, Path::new("proc")).map_err(|e| step("/proc", &e))?;
    mount(
        Some("proc"),
        &proc_point.path(),
        Some("proc"),
        SECURE,
        None::<&str>,
    )
    .map_err(|e| step("mounting /proc", &e))?;
    drop(proc_point);
    if !entered {
        switch_root(root)?;
    }
    std::env::set_current_dir("/").map_err(|e| step("chdir /", &e))?;
    protect_proc()
}

/// Makes `root` (a mount point) this process's `/`: `pivot_root`, or on rootfs `MS_MOVE` + chroot.
fn switch_root(root: &Path) -> Result<(), String> {
    let step = |what: &str, e: &dyn std::fmt::Display| format!("{what}: {e}");
    let outside = mounts_outside(root);
    std::env::set_current_dir(root).map_err(|e| step(&format!("chdir {}", root.display()), &e))?;
    match nix::unistd::pivot_root(".", ".") {
        Ok(()) => {
            // The old root is stacked on the new one at "/": detach it with everything under it.
            umount2(".", MntFlags::MNT_DETACH).map_err(|e| step("unmounting the old root", &e))?;
        }
        Err(Errno::EINVAL) => {
            // The agent's root is rootfs (see the module docs).
            for target in outside {
                let _ = umount2(&target, MntFlags::MNT_DETACH);
            }
            mount(Some("."), "/", None::<&str>, MsFlags::MS_MOVE, None::<&str>)
                .map_err(|e| step("moving the workload root over /", &e))?;
            nix::unistd::chroot(".").map_err(|e| step("chroot", &e))?;
        }
        Err(e) => return Err(step("pivot_root", &e)),
    }
    Ok(())
}

/// The agent's mount points (from the agent's /proc, still mounted) that are neither the
/// workload root, inside it, nor above it; deepest first.
fn mounts_outside(root: &Path) -> Vec<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    outside_of(parse_mount_points(&text), root)
}

fn outside_of(points: Vec<PathBuf>, root: &Path) -> Vec<PathBuf> {
    let mut points: Vec<PathBuf> = points
        .into_iter()
        .filter(|p| p != Path::new("/") && !p.starts_with(root) && !root.starts_with(p))
        .collect();
    points.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    points.dedup();
    points
}

/// The mount point field of each `/proc/self/mountinfo` line (octal escapes decoded).
fn parse_mount_points(mountinfo: &str) -> Vec<PathBuf> {
    mountinfo
        .lines()
        .filter_map(|line| line.split(' ').nth(4))
        .map(|field| PathBuf::from(unescape(field)))
        .collect()
}

fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            let value = bytes[i + 1..i + 4]
                .iter()
                .fold(0u32, |acc, b| acc * 8 + u32::from(b - b'0'));
            out.push(value as u8);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Read-only binds over [`READ_ONLY`], /dev/null over [`MASKED`] (when present).
fn protect_proc() -> Result<(), String> {
    for path in READ_ONLY {
        if !Path::new(path).exists() {
            continue;
        }
        let fail = |e: Errno| format!("making {path} read-only: {e}");
        mount(
            Some(*path),
            *path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REC,
            None::<&str>,
        )
        .map_err(fail)?;
        mount(
            None::<&str>,
            *path,
            None::<&str>,
            MsFlags::MS_BIND | MsFlags::MS_REMOUNT | MsFlags::MS_RDONLY | SECURE,
            None::<&str>,
        )
        .map_err(fail)?;
    }
    if Path::new("/dev/null").exists() {
        for path in MASKED {
            if Path::new(path).exists() {
                let _ = mount(
                    Some("/dev/null"),
                    *path,
                    None::<&str>,
                    MsFlags::MS_BIND,
                    None::<&str>,
                );
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mount_points_are_read_from_mountinfo() {
        let mountinfo = "22 1 0:20 / / rw - rootfs rootfs rw\n\
                         23 22 0:21 / /proc rw,nosuid - proc proc rw\n\
                         30 22 0:25 / /run rw - tmpfs tmpfs rw\n\
                         31 30 254:0 / /run/hearth/lower ro - ext4 /dev/vda ro\n\
                         33 30 0:30 / /run/hearth/root rw - overlay overlay rw\n\
                         34 33 0:31 / /run/hearth/root/dev rw - tmpfs tmpfs rw\n\
                         35 22 0:32 / /mnt/a\\040b rw - tmpfs tmpfs rw\n";
        let points = parse_mount_points(mountinfo);
        assert_eq!(points[6], PathBuf::from("/mnt/a b"));
        let outside = outside_of(points, Path::new("/run/hearth/root"));
        assert_eq!(
            outside,
            [
                PathBuf::from("/run/hearth/lower"),
                PathBuf::from("/mnt/a b"),
                PathBuf::from("/proc"),
            ]
        );
    }
}
