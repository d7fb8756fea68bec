//! OCI whiteouts: `.wh.NAME` deletes NAME from lower layers, `.wh..wh..opq` hides every lower-layer
//! entry of its directory. Entries the current layer itself wrote are kept (the spec applies
//! whiteouts to lower layers only). Touches only the staging tree, through `fsops`.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};

use super::fsops;

pub const PREFIX: &str = ".wh.";
pub const OPAQUE: &str = ".wh..wh..opq";

/// What a name means to the whiteout rules.
#[derive(Debug, PartialEq, Eq)]
pub enum Whiteout<'a> {
    /// An ordinary entry.
    Ordinary,
    /// Hide all lower-layer contents of the directory holding the marker.
    Opaque,
    /// Delete this sibling name.
    Remove(&'a OsStr),
}

pub fn classify(name: &OsStr) -> Whiteout<'_> {
    let bytes = name.as_bytes();
    if bytes == OPAQUE.as_bytes() {
        Whiteout::Opaque
    } else if let Some(target) = bytes.strip_prefix(PREFIX.as_bytes()) {
        Whiteout::Remove(OsStr::from_bytes(target))
    } else {
        Whiteout::Ordinary
    }
}

/// Removes everything under `dir` (at `dir_rel`) that the current layer did not write, descending into
/// directories the layer did write so their lower-layer children go too.
pub fn clear_lower(
    dir: BorrowedFd<'_>,
    dir_rel: &Path,
    written: &HashSet<PathBuf>,
) -> io::Result<()> {
    for name in fsops::list_dir(dir)? {
        let child_rel = dir_rel.join(OsStr::from_bytes(name.to_bytes()));
        if !written.contains(&child_rel) {
            fsops::remove_at(dir, &name)?;
            continue;
        }
        if let Some(st) = fsops::lstat_at(dir, &name)? {
            if fsops::is_dir(&st) {
                let sub = fsops::open_at(
                    dir,
                    &name,
                    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW,
                    0,
                )?;
                clear_lower(sub.as_fd(), &child_rel, written)?;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    #[test]
    fn classifies_names() {
        assert_eq!(classify(OsStr::new(".wh..wh..opq")), Whiteout::Opaque);
        assert_eq!(
            classify(OsStr::new(".wh.gone")),
            Whiteout::Remove(OsStr::new("gone"))
        );
        assert_eq!(classify(OsStr::new("wh.x")), Whiteout::Ordinary);
    }

    #[test]
    fn opaque_keeps_only_what_this_layer_wrote() {
        let tmp = tempfile::tempdir().unwrap();
        let d = tmp.path().join("opt");
        fs::create_dir_all(d.join("keepdir/lower")).unwrap();
        fs::write(d.join("old.txt"), b"old").unwrap();
        fs::write(d.join("new.txt"), b"new").unwrap();
        fs::write(d.join("keepdir/mine"), b"m").unwrap();
        let written: HashSet<PathBuf> = ["opt/new.txt", "opt/keepdir", "opt/keepdir/mine"]
            .iter()
            .map(PathBuf::from)
            .collect();
        let dir = fs::File::open(&d).unwrap();
        clear_lower(dir.as_fd(), Path::new("opt"), &written).unwrap();
        assert!(!d.join("old.txt").exists());
        assert!(!d.join("keepdir/lower").exists());
        assert!(d.join("new.txt").exists() && d.join("keepdir/mine").exists());
    }
}
