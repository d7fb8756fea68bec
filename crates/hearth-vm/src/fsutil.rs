//! Small host facts and file writes the rest of the crate shares: the host's boot id (caches of host
//! facts are keyed by it), atomic file replacement and write-once cache files. Touches only the
//! paths it is given.

use std::io::Write;
use std::path::Path;

/// Reads the host's boot id: caches of host facts (TSC frequency, KVM verdict) are keyed by it, so a
/// reboot (possibly onto other hardware or another hypervisor) invalidates them.
pub(crate) fn host_boot_id() -> String {
    std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default()
}

/// Writes `bytes` to `path` atomically (temp file in the same directory, then rename), so that
/// concurrent hearth processes never see a half-written cache file. The file is world-readable
/// (0644, not the temp file's 0600): these are caches such as the vmlinux and the initramfs, which a
/// jailed VMM running as an unprivileged user must open through its chroot's hard links.
pub(crate) fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_with(path, bytes)?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Writes `bytes` to `path` like [`write_atomic`] unless a file is already there, which is kept as
/// it is: for content-addressed caches (the initramfs, the extracted vmlinux), whose existing file
/// holds the same bytes. Replacing it would change its inode and modification time, which boot
/// templates' keys include: two first boots racing each other then built two templates of one VM
/// and the node held two copies of its memory.
pub(crate) fn write_once(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = temp_with(path, bytes)?;
    match tmp.persist_noclobber(path) {
        Ok(_) => Ok(()),
        // The loser's temp file is removed when the error (which holds it) is dropped.
        Err(e) if e.error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(e) => Err(e.error),
    }
}

/// A synced, world-readable temp file beside `path` holding `bytes`.
fn temp_with(path: &Path, bytes: &[u8]) -> std::io::Result<tempfile::NamedTempFile> {
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    Ok(tmp)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn atomic_writes_replace_the_file_and_leave_it_readable_to_a_jailed_vmm() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cache/vmlinux");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let mode = std::fs::metadata(&path).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1
        );
    }

    #[test]
    fn a_cache_file_written_once_is_never_replaced() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("initramfs/abc.cpio");
        write_once(&path, b"one").unwrap();
        let first = std::fs::metadata(&path).unwrap();
        // A second writer that lost the race (same bytes in real use; other bytes here, to see it).
        write_once(&path, b"two").unwrap();
        let after = std::fs::metadata(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(
            (after.ino(), after.mtime_nsec()),
            (first.ino(), first.mtime_nsec())
        );
        assert_eq!(after.permissions().mode() & 0o777, 0o644);
        assert_eq!(
            std::fs::read_dir(path.parent().unwrap()).unwrap().count(),
            1,
            "the loser's temp file is gone"
        );
    }
}
