//! Advisory `flock` locks under `$HEARTH_HOME/locks`: pulls hold the store lock shared, garbage
//! collection holds it exclusive; one build lock per manifest digest makes concurrent pulls of one
//! image build its root filesystem once. Touches only the lock files.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// A held lock; released on drop (closing the descriptor).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

#[derive(Clone, Copy)]
enum Mode {
    Shared,
    Exclusive,
}

impl FileLock {
    /// Blocks until the lock is held shared.
    pub fn shared(path: &Path) -> io::Result<FileLock> {
        Self::take(path, Mode::Shared, true).map(|l| l.expect("blocking lock"))
    }

    /// Blocks until the lock is held exclusively.
    pub fn exclusive(path: &Path) -> io::Result<FileLock> {
        Self::take(path, Mode::Exclusive, true).map(|l| l.expect("blocking lock"))
    }

    /// Takes the lock exclusively if nobody holds it; `None` otherwise.
    pub fn try_exclusive(path: &Path) -> io::Result<Option<FileLock>> {
        Self::take(path, Mode::Exclusive, false)
    }

    fn take(path: &Path, mode: Mode, block: bool) -> io::Result<Option<FileLock>> {
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)?;
        let mut op = match mode {
            Mode::Shared => libc::LOCK_SH,
            Mode::Exclusive => libc::LOCK_EX,
        };
        if !block {
            op |= libc::LOCK_NB;
        }
        loop {
            // SAFETY: flock on a descriptor we own.
            if unsafe { libc::flock(file.as_raw_fd(), op) } == 0 {
                return Ok(Some(FileLock { _file: file }));
            }
            let err = io::Error::last_os_error();
            match err.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EWOULDBLOCK) if !block => return Ok(None),
                _ => return Err(err),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exclusive_excludes_shared_holders() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("l");
        let shared = FileLock::shared(&path).unwrap();
        assert!(FileLock::try_exclusive(&path).unwrap().is_none());
        drop(shared);
        assert!(FileLock::try_exclusive(&path).unwrap().is_some());
    }
}
