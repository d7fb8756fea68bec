//! Finding the VM's two disks: the read-only image [`ROOTFS_SERIAL`] and the per-sandbox writable
//! disk [`SCRATCH_SERIAL`], by virtio-blk serial (`/sys/block/vd*/serial`) where the VMM sets one
//! (QEMU). Firecracker derives serials from the backing file's device and inode instead, so when no
//! disk carries a hearth serial the two are told apart by the read-only flag both VMMs expose
//! (`/sys/block/vd*/ro`): exactly one read-only disk (the image) and one writable (the scratch disk).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

pub const ROOTFS_SERIAL: &str = "hearth-rootfs";
pub const SCRATCH_SERIAL: &str = "hearth-scratch";

/// The `/dev` node of the virtio disk whose serial is `serial`, if present now.
pub fn find_by_serial(sys_block: &Path, serial: &str) -> Option<PathBuf> {
    let entries = std::fs::read_dir(sys_block).ok()?;
    entries.flatten().find_map(|entry| {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("vd") {
            return None;
        }
        let found = std::fs::read_to_string(entry.path().join("serial")).ok()?;
        (found.trim() == serial).then(|| Path::new("/dev").join(&name))
    })
}

/// The image and scratch disks if both are present now: by serial, else by the read-only flag.
pub fn find_disks(sys_block: &Path) -> Option<(PathBuf, PathBuf)> {
    let by_serial = (
        find_by_serial(sys_block, ROOTFS_SERIAL),
        find_by_serial(sys_block, SCRATCH_SERIAL),
    );
    if let (Some(rootfs), Some(scratch)) = by_serial {
        return Some((rootfs, scratch));
    }
    if by_serial.0.is_some() || by_serial.1.is_some() {
        return None; // serials in use and one still missing: wait for it
    }
    let mut read_only = Vec::new();
    let mut writable = Vec::new();
    for entry in std::fs::read_dir(sys_block).ok()?.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().starts_with("vd") {
            continue;
        }
        let ro = std::fs::read_to_string(entry.path().join("ro")).ok()?;
        let dev = Path::new("/dev").join(&name);
        match ro.trim() {
            "1" => read_only.push(dev),
            _ => writable.push(dev),
        }
    }
    match (read_only.as_slice(), writable.as_slice()) {
        ([rootfs], [scratch]) => Some((rootfs.clone(), scratch.clone())),
        _ => None,
    }
}

/// Waits until both disks are present with device nodes, polling every 10 ms.
pub fn wait_for_disks(timeout: Duration) -> Result<(PathBuf, PathBuf), String> {
    let started = Instant::now();
    loop {
        if let Some((rootfs, scratch)) = find_disks(Path::new("/sys/block")) {
            if rootfs.exists() && scratch.exists() {
                return Ok((rootfs, scratch));
            }
        }
        if started.elapsed() > timeout {
            return Err(format!(
                "no virtio disks {ROOTFS_SERIAL} and {SCRATCH_SERIAL} after {timeout:?}: the VMM must attach \
                 them with these serials, or as exactly one read-only and one writable disk; \
                 virtio_blk must be in the initramfs module list"
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_virtio_disks_by_serial() {
        let sys = tempfile::tempdir().unwrap();
        for (disk, serial) in [
            ("vda", "hearth-rootfs\n"),
            ("vdb", "hearth-scratch"),
            ("sda", "hearth-other"),
        ] {
            std::fs::create_dir(sys.path().join(disk)).unwrap();
            std::fs::write(sys.path().join(disk).join("serial"), serial).unwrap();
        }
        assert_eq!(
            find_by_serial(sys.path(), ROOTFS_SERIAL),
            Some(PathBuf::from("/dev/vda"))
        );
        assert_eq!(
            find_by_serial(sys.path(), SCRATCH_SERIAL),
            Some(PathBuf::from("/dev/vdb"))
        );
        assert_eq!(
            find_by_serial(sys.path(), "hearth-other"),
            None,
            "only virtio disks count"
        );
    }

    fn disk(sys: &Path, name: &str, serial: Option<&str>, ro: bool) {
        std::fs::create_dir(sys.join(name)).unwrap();
        if let Some(serial) = serial {
            std::fs::write(sys.join(name).join("serial"), serial).unwrap();
        }
        std::fs::write(sys.join(name).join("ro"), if ro { "1\n" } else { "0\n" }).unwrap();
    }

    #[test]
    fn disks_by_serial_win_over_order_and_flags() {
        let sys = tempfile::tempdir().unwrap();
        disk(sys.path(), "vda", Some("hearth-scratch"), false);
        disk(sys.path(), "vdb", Some("hearth-rootfs"), true);
        assert_eq!(
            find_disks(sys.path()),
            Some((PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vda")))
        );
    }

    #[test]
    fn without_serials_the_read_only_disk_is_the_image() {
        // Firecracker: serials are derived from the backing files, not ours.
        let sys = tempfile::tempdir().unwrap();
        disk(sys.path(), "vda", Some("2049123456"), false);
        disk(sys.path(), "vdb", Some("2049123999"), true);
        assert_eq!(
            find_disks(sys.path()),
            Some((PathBuf::from("/dev/vdb"), PathBuf::from("/dev/vda")))
        );
        // Ambiguous (two writable disks) or half-present serials: keep waiting, never guess.
        disk(sys.path(), "vdc", None, false);
        assert_eq!(find_disks(sys.path()), None);
        let half = tempfile::tempdir().unwrap();
        disk(half.path(), "vda", Some("hearth-rootfs"), true);
        disk(half.path(), "vdb", None, false);
        assert_eq!(find_disks(half.path()), None);
    }
}
