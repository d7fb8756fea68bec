//! Sealed in-memory copies of boot templates' memory files, which restored VMs map copy-on-write
//! ([`GuestMemory::FromTemplate`](crate::GuestMemory)).
//!
//! Why a copy and not the file itself: QEMU opens a memory backend's file read-write whatever the
//! mapping, and QEMU 7.2 (Debian 12's) punches holes into that file when a guest gives memory back
//! (`ram_block_discard_range`, even for a private mapping) — one VM could then zero or, once
//! compromised, rewrite the template memory of every VM restored after it. A memfd sealed with
//! `F_SEAL_WRITE | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL` refuses every write, truncation and
//! hole punch (EPERM), while a private writable mapping of it still works: each VM's writes go to
//! its own anonymous pages and the pages it only reads stay shared by all of them.
//!
//! QEMU opens the copy as `/proc/<hearth's pid>/fd/<fd>` while it starts (before it drops its
//! privileges), so nothing has to be passed through the VMM's guard process. One copy per template
//! file and process, kept while its file is unchanged (a rebuilt template is a new file); a missing
//! file gives an all-zero copy, which serves the restore of a paused sandbox whose template has
//! since been removed (its saved state holds all of its memory).

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::error::VmError;

/// Copies kept per process (templates differ by vCPUs, memory and network; a node has a few).
const CACHE_ENTRIES: usize = 8;
/// Copy chunk; all-zero chunks are skipped, so the copy holds only what the template wrote.
const CHUNK: usize = 1 << 20;

/// A sealed copy of one template memory file.
#[derive(Debug)]
pub(super) struct SealedMemory {
    fd: OwnedFd,
    /// Its size: the memory size of the VMs it serves (sealed, so it cannot change).
    len: u64,
}

impl SealedMemory {
    /// The path QEMU opens it by.
    pub(super) fn path(&self) -> PathBuf {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd()).into()
    }
}

/// What a template file was when it was copied: a changed file is copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

type Cache = Vec<(PathBuf, Option<Identity>, Arc<SealedMemory>)>;

static CACHE: Mutex<Cache> = Mutex::new(Vec::new());

/// [`CACHE`]'s copies' bytes, kept apart so that reading it never waits on a copy being made
/// (admission reads it under the node's table lock).
static CACHED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of the sealed copies this process keeps (every page of each is allocated): memory the
/// node holds for its boot templates on top of its sandboxes' own, which admission counts.
pub fn template_copies_bytes() -> u64 {
    CACHED_BYTES.load(Ordering::Relaxed)
}

/// The sealed copy of `file`, `bytes` long (the VM's memory size), made now or earlier.
pub(super) fn sealed_copy(file: &Path, bytes: u64) -> Result<Arc<SealedMemory>, VmError> {
    let io_error = |what, source| VmError::Io {
        what,
        path: file.to_owned(),
        source,
    };
    let source = match File::open(file) {
        Ok(f) => Some(f),
        Err(e) if e.kind() == io::ErrorKind::NotFound => None,
        Err(e) => return Err(io_error("opening the template memory", e)),
    };
    let identity = match &source {
        Some(f) => {
            let m = f
                .metadata()
                .map_err(|e| io_error("reading the metadata of", e))?;
            if m.len() != bytes {
                let detail = format!(
                    "the template memory file is {} bytes, the VM has {bytes}",
                    m.len()
                );
                return Err(io_error("checking", io::Error::other(detail)));
            }
            Some(Identity {
                dev: m.dev(),
                ino: m.ino(),
                size: m.len(),
                mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
            })
        }
        None => None,
    };
    let mut cache = CACHE.lock().unwrap_or_else(|e| e.into_inner());
    if let Some((_, _, copy)) = cache
        .iter()
        .find(|(p, id, copy)| p == file && *id == identity && copy.len == bytes)
    {
        return Ok(copy.clone());
    }
    if source.is_none() {
        tracing::warn!(file = %file.display(), "template memory is gone: restoring onto zeroed memory");
    }
    let copy = Arc::new(copy_sealed(source.as_ref(), bytes).map_err(|e| io_error("copying", e))?);
    cache.retain(|(p, _, _)| p != file);
    if cache.len() >= CACHE_ENTRIES {
        cache.remove(0);
    }
    cache.push((file.to_owned(), identity, copy.clone()));
    let bytes = cache.iter().map(|(_, _, copy)| copy.len).sum();
    CACHED_BYTES.store(bytes, Ordering::Relaxed);
    Ok(copy)
}

/// A new memfd of `bytes`, every page allocated, holding `source`'s non-zero data, then sealed
/// against any change.
fn copy_sealed(source: Option<&File>, bytes: u64) -> io::Result<SealedMemory> {
    let name = CString::new("hearth-template-memory").expect("no NUL");
    // SAFETY: memfd_create with a valid C string; the result is checked and owned at once.
    let raw =
        unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING) };
    if raw < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `raw` is a new descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let memfd = File::from(fd.try_clone()?);
    memfd.set_len(bytes)?;
    // Every page allocated now, zero where the template wrote nothing: a hole in a shared memory
    // file is filled on the first fault of any VM mapping it, even a read or the copy-on-write of
    // a write, and that page is charged to the faulting VMM's cgroup on top of the private copy
    // it then writes. A guest touching all its memory cost twice its size and its QEMU was killed
    // at the cgroup limit (a fork or memory bomb did it). Filled here, the pages are the daemon's,
    // once per template, and a VM's own cost stays its private copies.
    // SAFETY: fallocate on an owned descriptor.
    if unsafe { libc::fallocate(fd.as_raw_fd(), 0, 0, bytes as libc::off_t) } != 0 {
        return Err(io::Error::last_os_error());
    }
    if let Some(source) = source {
        copy_data(source, &memfd, bytes)?;
    }
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an owned descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(SealedMemory { fd, len: bytes })
}

/// Copies the data extents of `source` (SEEK_DATA/SEEK_HOLE: the template file is sparse), skipping
/// chunks that are all zero, which the memfd already reads as.
fn copy_data(source: &File, dest: &File, bytes: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    let mut offset = 0u64;
    while offset < bytes {
        let Some(data) = seek(source, offset, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(source, data, libc::SEEK_HOLE)?
            .unwrap_or(bytes)
            .min(bytes);
        let mut at = data;
        while at < hole {
            let n = ((hole - at) as usize).min(CHUNK);
            source.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dest.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
        offset = hole;
    }
    Ok(())
}

/// `lseek(fd, offset, whence)`; `None` when there is no more data (ENXIO).
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    // SAFETY: lseek on a borrowed, open descriptor.
    let at = unsafe { libc::lseek(file.as_raw_fd(), offset as libc::off_t, whence) };
    if at < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(at as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_copy_holds_the_template_and_refuses_writes_and_hole_punching() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory");
        let f = File::create(&file).unwrap();
        f.set_len(8 << 20).unwrap();
        f.write_all_at(b"template page", 3 << 20).unwrap();
        drop(f);
        let copy = sealed_copy(&file, 8 << 20).unwrap();
        // No holes: a VM's fault on one would allocate a page of the shared copy and charge it to
        // that VM's cgroup. All 8 MiB are allocated (st_blocks counts 512-byte units; SEEK_HOLE
        // would not say, as shmem reports allocated pages never written as holes).
        let meta = File::open(copy.path()).unwrap().metadata().unwrap();
        assert_eq!(meta.blocks() * 512, 8 << 20);
        // Opened by path, as QEMU does, read-write.
        let reopened = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(copy.path())
            .unwrap();
        let mut got = [0u8; 13];
        reopened.read_exact_at(&mut got, 3 << 20).unwrap();
        assert_eq!(&got, b"template page");
        assert_eq!(reopened.metadata().unwrap().len(), 8 << 20);
        let refused = reopened.write_all_at(b"evil", 3 << 20).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::EPERM));
        // SAFETY: fallocate on an open descriptor.
        let punched = unsafe {
            libc::fallocate(
                reopened.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                3 << 20,
                4096,
            )
        };
        assert_eq!(punched, -1, "a hole punch must be refused");
        reopened.read_exact_at(&mut got, 3 << 20).unwrap();
        assert_eq!(&got, b"template page");
        assert!(reopened.set_len(4096).is_err(), "shrinking must be refused");
        // The same unchanged file gives the same copy; a size that does not match is an error.
        assert!(Arc::ptr_eq(&copy, &sealed_copy(&file, 8 << 20).unwrap()));
        let err = sealed_copy(&file, 16 << 20).unwrap_err().to_string();
        assert!(err.contains("16777216"), "{err}");
    }

    #[test]
    fn a_missing_template_gives_zeroed_memory() {
        let dir = tempfile::tempdir().unwrap();
        let copy = sealed_copy(&dir.path().join("gone"), 1 << 20).unwrap();
        let reopened = File::open(copy.path()).unwrap();
        let mut got = [1u8; 64];
        reopened.read_exact_at(&mut got, 4096).unwrap();
        assert_eq!(got, [0u8; 64]);
    }
}
