//! The guest's mounts: the agent's own (/proc, /sys, /dev, /dev/pts, /run) and the workload root
//! (overlayfs of the read-only image and the writable scratch disk, `nodev`, with /proc, /sys and
//! a minimal /dev ([`crate::workload_dev`]) inside). /tmp is not a tmpfs: like docker, it is the
//! image's /tmp on the writable layer, so it is backed by the scratch disk rather than guest memory.
//!
//! The image controls every path in the workload root: mount points and the files the agent
//! writes there are resolved inside the root ([`crate::in_root`]), never through the image's
//! symlinks to the agent's own tree.

use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::mount::{mount, umount2, MntFlags, MsFlags};

use crate::in_root::{self, MountPoint};

/// Where the read-only image is mounted.
pub const LOWER: &str = "/run/hearth/lower";
/// Where the scratch disk is mounted (overlay upper and work dirs live in it).
pub const SCRATCH: &str = "/run/hearth/scratch";
/// The workload root (overlayfs).
pub const ROOT: &str = "/run/hearth/root";

struct Mount<'a> {
    source: &'a str,
    target: PathBuf,
    fstype: &'a str,
    flags: MsFlags,
    data: Option<&'a str>,
}

impl Mount<'_> {
    fn apply(&self) -> Result<(), String> {
        std::fs::create_dir_all(&self.target)
            .map_err(|e| format!("creating mount point {}: {e}", self.target.display()))?;
        match mount(
            Some(self.source),
            &self.target,
            Some(self.fstype),
            self.flags,
            self.data,
        ) {
            Ok(()) | Err(Errno::EBUSY) => Ok(()),
            Err(e) => Err(format!(
                "mounting {} ({}) on {}: {e}",
                self.source,
                self.fstype,
                self.target.display()
            )),
        }
    }
}

fn mnt<'a>(
    source: &'a str,
    target: impl Into<PathBuf>,
    fstype: &'a str,
    flags: MsFlags,
    data: Option<&'a str>,
) -> Mount<'a> {
    Mount {
        source,
        target: target.into(),
        fstype,
        flags,
        data,
    }
}

const SECURE: MsFlags = MsFlags::MS_NOSUID
    .union(MsFlags::MS_NODEV)
    .union(MsFlags::MS_NOEXEC);

/// The agent's own mounts, first thing after the kernel starts it.
pub fn mount_early() -> Result<(), String> {
    for m in [
        mnt("proc", "/proc", "proc", SECURE, None),
        mnt("sysfs", "/sys", "sysfs", SECURE, None),
        mnt(
            "devtmpfs",
            "/dev",
            "devtmpfs",
            MsFlags::MS_NOSUID,
            Some("mode=0755"),
        ),
        mnt(
            "devpts",
            "/dev/pts",
            "devpts",
            MsFlags::MS_NOSUID | MsFlags::MS_NOEXEC,
            Some("ptmxmode=0666,mode=0620,gid=5"),
        ),
        mnt(
            "tmpfs",
            "/run",
            "tmpfs",
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV,
            Some("mode=0755"),
        ),
    ] {
        m.apply()?;
    }
    Ok(())
}

/// Mounts the image and scratch disks and assembles the workload root at [`ROOT`]; then, every
/// module being loaded, ends module loading ([`super::modules::disable_loading`]).
pub fn mount_workload_root(rootfs: &Path, scratch: &Path, hostname: &str) -> Result<(), String> {
    let rootfs = rootfs.to_string_lossy();
    let scratch = scratch.to_string_lossy();
    mnt(&rootfs, LOWER, "ext4", MsFlags::MS_RDONLY, None).apply()?;
    mnt(&scratch, SCRATCH, "ext4", MsFlags::MS_NOATIME, None).apply()?;
    for dir in ["upper", "work"] {
        let dir = Path::new(SCRATCH).join(dir);
        std::fs::create_dir_all(&dir)
            .map_err(|e| format!("creating {} on the scratch disk: {e}", dir.display()))?;
    }
    let overlay = format!("lowerdir={LOWER},upperdir={SCRATCH}/upper,workdir={SCRATCH}/work");
    // nodev: a device node the workload creates (it keeps CAP_MKNOD) cannot be opened.
    mnt(
        "overlay",
        ROOT,
        "overlay",
        MsFlags::MS_NODEV,
        Some(&overlay),
    )
    .apply()?;
    let root = Path::new(ROOT);
    mount_in_root(root, "proc", "proc", SECURE)?;
    mount_in_root(root, "sys", "sysfs", SECURE | MsFlags::MS_RDONLY)?;
    crate::workload_dev::mount_minimal_dev(root, Path::new("/dev"))?;
    prepare_root_files(root, hostname)?;
    // Both boot paths (cold, and RESUME of a template) load their last module before this point.
    super::modules::disable_loading().map_err(|e| e.to_string())
}

/// Mounts a fresh `fstype` on directory `rel` of the workload root (resolved inside the root; a
/// symlink there is an error).
fn mount_in_root(root: &Path, rel: &str, fstype: &str, flags: MsFlags) -> Result<(), String> {
    let point = MountPoint::open(root, Path::new(rel)).map_err(|e| e.to_string())?;
    mount(
        Some(fstype),
        &point.path(),
        Some(fstype),
        flags,
        None::<&str>,
    )
    .map_err(|e| format!("mounting {fstype} on /{rel} in the workload root: {e}"))
}

/// What docker provides that an image may lack: a world-writable /tmp and /etc/hosts, /etc/hostname.
fn prepare_root_files(root: &Path, hostname: &str) -> Result<(), String> {
    in_root::ensure_dir_in_root(root, Path::new("/tmp"), 0o1777)
        .map_err(|e| format!("creating /tmp in the workload root: {e}"))?;
    let hosts = Path::new("/etc/hosts");
    // Kept if it names a file inside the root; anything else (absent, a dangling or /proc magic
    // link) is replaced.
    if !matches!(in_root::exists_in_root(root, hosts), Ok(true)) {
        let content =
            format!("127.0.0.1\tlocalhost {hostname}\n::1\tlocalhost ip6-localhost ip6-loopback\n");
        in_root::write_in_root(root, hosts, content.as_bytes(), 0o644)
            .map_err(|e| format!("writing /etc/hosts in the workload root: {e}"))?;
    }
    in_root::write_in_root(
        root,
        Path::new("/etc/hostname"),
        format!("{hostname}\n").as_bytes(),
        0o644,
    )
    .map_err(|e| format!("writing /etc/hostname in the workload root: {e}"))
}

/// Unmounts the workload root and the disks, innermost first. Busy mounts are detached instead.
pub fn unmount_all() -> Vec<String> {
    let root = Path::new(ROOT);
    let devices = crate::workload_dev::DEVICES
        .iter()
        .map(|name| root.join("dev").join(name));
    let targets = devices.chain([
        root.join("dev/shm"),
        root.join("dev/pts"),
        root.join("dev"),
        root.join("sys"),
        root.join("proc"),
        root.to_path_buf(),
        PathBuf::from(SCRATCH),
        PathBuf::from(LOWER),
    ]);
    let mut failures = Vec::new();
    for target in targets {
        match umount2(&target, MntFlags::empty()) {
            Ok(()) | Err(Errno::EINVAL) | Err(Errno::ENOENT) => {}
            Err(Errno::EBUSY) => {
                if let Err(e) = umount2(&target, MntFlags::MNT_DETACH) {
                    failures.push(format!("unmounting {}: {e}", target.display()));
                }
            }
            Err(e) => failures.push(format!("unmounting {}: {e}", target.display())),
        }
    }
    failures
}
