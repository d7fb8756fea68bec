//! Finding the VM's disks by their virtio-blk serial (`/sys/block/vd*/serial`): the read-only image
//! [`ROOTFS_SERIAL`] and the per-sandbox writable disk [`SCRATCH_SERIAL`].

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

/// Waits until every serial in `serials` has a disk with a device node, polling every 10 ms.
pub fn wait_for(serials: &[&str], timeout: Duration) -> Result<Vec<PathBuf>, String> {
    let started = Instant::now();
    loop {
        let found: Vec<Option<PathBuf>> = serials
            .iter()
            .map(|serial| {
                find_by_serial(Path::new("/sys/block"), serial).filter(|dev| dev.exists())
            })
            .collect();
        if found.iter().all(Option::is_some) {
            return Ok(found.into_iter().flatten().collect());
        }
        if started.elapsed() > timeout {
            let missing: Vec<&str> = serials
                .iter()
                .zip(&found)
                .filter(|(_, f)| f.is_none())
                .map(|(s, _)| *s)
                .collect();
            return Err(format!(
                "no virtio disk with serial {} after {timeout:?} (the VMM must attach the drives with these serials; \
                 virtio_blk must be in the initramfs module list)",
                missing.join(", ")
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
}
