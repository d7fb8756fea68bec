//! Small host facts and file writes the rest of the crate shares: the host's boot id (caches of host
//! facts are keyed by it) and atomic file replacement. Touches only the paths it is given.

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
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.as_file()
        .set_permissions(std::fs::Permissions::from_mode(0o644))?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
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
}
