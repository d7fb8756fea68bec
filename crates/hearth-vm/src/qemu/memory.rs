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
//! file (by inode: a paused sandbox's or a fork's link to its template memory shares the
//! template's copy) and process, kept while its file is unchanged (a rebuilt template is a new
//! file). A missing file is an error (a restore then boots cold; a resume fails, naming it).
//!
//! Every copy is fully allocated, so the node counts each one (admission, `/metrics`) from its
//! making until its last holder lets go: the cache and each VM restored from it
//! ([`RunningQemu`](super::running::RunningQemu) keeps its copy for its life). A copy no VM holds
//! is given back by [`release_unused_template_copies`]: after a while unused, or at once when
//! admission needs the room. A daemon that adopts VMs an earlier daemon restored counts the copies
//! they still map ([`inherited_copy`], found in the VMM's `/proc/PID/maps`) once each, until the
//! last of those VMs ends: the earlier daemon's descriptors are gone, its copies' pages are not.

use std::ffi::CString;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::error::VmError;

/// The memfd name of every copy; `/proc/PID/maps` shows it as `/memfd:NAME (deleted)`.
const MEMFD_NAME: &str = "hearth-template-memory";
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
    /// The template file it is a copy of, as it was when copied.
    source: Identity,
}

impl SealedMemory {
    /// The path QEMU opens it by.
    pub(super) fn path(&self) -> PathBuf {
        format!("/proc/{}/fd/{}", std::process::id(), self.fd.as_raw_fd()).into()
    }

    /// Whether `file` is (still) the template file this is a copy of: the same inode, size and
    /// modification time (a hard link to it is).
    pub(super) fn is_copy_of(&self, file: &Path) -> bool {
        std::fs::metadata(file).is_ok_and(|m| identity_of(&m) == self.source)
    }
}

impl Drop for SealedMemory {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// What a VM holds to keep its template copy counted for its life: a [`SealedMemory`] this
/// process made or an [`InheritedMemory`] an adopted VM maps.
pub(super) type HeldCopy = Arc<dyn std::any::Any + Send + Sync>;

/// A copy an earlier daemon made, mapped by VMs this process adopted: counted once, however many
/// of them map it, from the first adoption until the last of them ends.
#[derive(Debug)]
pub(super) struct InheritedMemory {
    /// The memfd's device and inode.
    key: (u64, u64),
    /// The memory it holds (its allocated pages).
    len: u64,
}

impl Drop for InheritedMemory {
    fn drop(&mut self) {
        LIVE_BYTES.fetch_sub(self.len, Ordering::Relaxed);
    }
}

/// The inherited copies counted now.
static INHERITED: Mutex<Vec<Weak<InheritedMemory>>> = Mutex::new(Vec::new());

/// The template copy that VMM `pid` (or, for a confined VMM's guard, its child) maps, if any,
/// counted from now on while the handle, or another for the same copy, lives. What is counted is
/// the memory the memfd holds (its allocated blocks, read through `/proc/PID/map_files`), not the
/// size the VMM maps or claims: a taken-over VMM could map a huge sparse memfd of that name, but
/// not make the node count more than it really allocated (charged to its own cgroup).
pub(super) fn inherited_copy(pid: u32) -> Option<Arc<InheritedMemory>> {
    let maps = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/maps")).ok();
    let (pid, range) = std::iter::once(pid)
        .chain(crate::rundir::children(pid))
        .find_map(|pid| Some((pid, mapped_copy(&maps(pid)?)?)))?;
    let file = std::fs::metadata(format!("/proc/{pid}/map_files/{range}")).ok()?;
    let key = (file.dev(), file.ino());
    if held_here(key) {
        return None; // a copy this process made: counted already
    }
    let mut inherited = INHERITED.lock().unwrap_or_else(|e| e.into_inner());
    inherited.retain(|w| w.strong_count() > 0);
    if let Some(held) = inherited
        .iter()
        .filter_map(Weak::upgrade)
        .find(|c| c.key == key)
    {
        return Some(held);
    }
    let len = file.blocks() * 512;
    LIVE_BYTES.fetch_add(len, Ordering::Relaxed);
    tracing::info!(
        pid,
        mib = len >> 20,
        "an adopted VM maps boot template memory an earlier daemon made"
    );
    let copy = Arc::new(InheritedMemory { key, len });
    inherited.push(Arc::downgrade(&copy));
    Some(copy)
}

/// Whether this process holds the memfd `key` (device, inode) open itself.
fn held_here(key: (u64, u64)) -> bool {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return false;
    };
    fds.flatten()
        .any(|fd| std::fs::metadata(fd.path()).is_ok_and(|m| (m.dev(), m.ino()) == key))
}

/// The address range (`start-end`, as `/proc/PID/map_files` names it) of the first mapping of a
/// template copy in a `/proc/PID/maps` text.
fn mapped_copy(maps: &str) -> Option<String> {
    let name = format!("/memfd:{MEMFD_NAME}");
    maps.lines().find_map(|line| {
        let fields: Vec<&str> = line.split_whitespace().collect();
        match fields[..] {
            [range, _perms, _offset, _dev, _inode, path, ..] if path == name => {
                Some(range.to_owned())
            }
            _ => None,
        }
    })
}

/// What a template file was when it was copied: a changed file is copied again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Identity {
    dev: u64,
    ino: u64,
    size: u64,
    mtime_ns: i128,
}

/// A cached copy: which file it is of, and when a VM last took it.
struct Cached {
    file: PathBuf,
    identity: Identity,
    copy: Arc<SealedMemory>,
    used: Instant,
}

impl Cached {
    /// Whether this is a copy of the file `identity` describes, `bytes` long: by inode, not by
    /// path, so that a hard link to a template file (a thin snapshot's base, `snapshot/thin.rs`)
    /// shares the template's copy.
    fn is_copy_of(&self, identity: Identity, bytes: u64) -> bool {
        self.identity == identity && self.copy.len == bytes
    }
}

static CACHE: Mutex<Vec<Cached>> = Mutex::new(Vec::new());

/// Bytes of the copies alive (cached, held by a VM, or both), kept apart from [`CACHE`] so that
/// reading it never waits on a copy being made (admission reads it under the node's table lock).
static LIVE_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes of the sealed copies this process holds (every page of each is allocated): memory the
/// node holds for its boot templates on top of its sandboxes' own, which admission counts.
pub fn template_copies_bytes() -> u64 {
    LIVE_BYTES.load(Ordering::Relaxed)
}

/// Drops the cached copies no VM holds that no VM took for `idle`; returns the bytes given back.
/// A later restore from one of them makes a new copy. Gives nothing back, rather than wait, while
/// a copy is being made (admission calls this under the node's table lock).
pub fn release_unused_template_copies(idle: Duration) -> u64 {
    let mut cache = match CACHE.try_lock() {
        Ok(cache) => cache,
        Err(std::sync::TryLockError::Poisoned(e)) => e.into_inner(),
        Err(std::sync::TryLockError::WouldBlock) => return 0,
    };
    let before = cache.len();
    let mut released = 0;
    cache.retain(|c| {
        let unused = Arc::strong_count(&c.copy) == 1 && c.used.elapsed() >= idle;
        if unused {
            released += c.copy.len;
        }
        !unused
    });
    if cache.len() < before {
        tracing::info!(
            copies = before - cache.len(),
            mib = released >> 20,
            "released boot template memory no VM uses"
        );
    }
    released
}

fn lock() -> std::sync::MutexGuard<'static, Vec<Cached>> {
    CACHE.lock().unwrap_or_else(|e| e.into_inner())
}

/// Whether a copy of `file` as it is now, `bytes` long, is made already (a restore from it then
/// allocates nothing more).
pub(super) fn holds_copy(file: &Path, bytes: u64) -> bool {
    let Ok(identity) = std::fs::metadata(file).map(|m| identity_of(&m)) else {
        return false;
    };
    lock().iter().any(|c| c.is_copy_of(identity, bytes))
}

fn identity_of(m: &std::fs::Metadata) -> Identity {
    Identity {
        dev: m.dev(),
        ino: m.ino(),
        size: m.len(),
        mtime_ns: i128::from(m.mtime()) * 1_000_000_000 + i128::from(m.mtime_nsec()),
    }
}

/// The sealed copy of `file`, `bytes` long (the VM's memory size), made now or earlier.
pub(super) fn sealed_copy(file: &Path, bytes: u64) -> Result<Arc<SealedMemory>, VmError> {
    let io_error = |what, source| VmError::Io {
        what,
        path: file.to_owned(),
        source,
    };
    let source = File::open(file).map_err(|e| io_error("opening the template memory", e))?;
    let m = source
        .metadata()
        .map_err(|e| io_error("reading the metadata of", e))?;
    if m.len() != bytes {
        let detail = format!(
            "the template memory file is {} bytes, the VM has {bytes}",
            m.len()
        );
        return Err(io_error("checking", io::Error::other(detail)));
    }
    let identity = identity_of(&m);
    let mut cache = lock();
    if let Some(cached) = cache.iter_mut().find(|c| c.is_copy_of(identity, bytes)) {
        cached.used = Instant::now();
        return Ok(cached.copy.clone());
    }
    let copy = Arc::new(copy_sealed(&source, bytes, identity).map_err(|e| io_error("copying", e))?);
    // A VM restored from a copy this one replaces (or evicts) keeps that copy, still counted.
    cache.retain(|c| c.file != file);
    if cache.len() >= CACHE_ENTRIES {
        let lru = (0..cache.len())
            .min_by_key(|&i| cache[i].used)
            .expect("full");
        cache.remove(lru);
    }
    cache.push(Cached {
        file: file.to_owned(),
        identity,
        copy: copy.clone(),
        used: Instant::now(),
    });
    Ok(copy)
}

/// A new memfd of `bytes`, every page allocated, holding `source`'s non-zero data, then sealed
/// against any change.
fn copy_sealed(source: &File, bytes: u64, identity: Identity) -> io::Result<SealedMemory> {
    let name = CString::new(MEMFD_NAME).expect("no NUL");
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
    copy_data(source, &memfd, bytes)?;
    let seals = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
    // SAFETY: fcntl on an owned descriptor.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_ADD_SEALS, seals) } != 0 {
        return Err(io::Error::last_os_error());
    }
    LIVE_BYTES.fetch_add(bytes, Ordering::Relaxed);
    Ok(SealedMemory {
        fd,
        len: bytes,
        source: identity,
    })
}

/// Copies the data extents of `source` ([`data_ranges`]: the template file is sparse), skipping
/// chunks that are all zero, which the memfd already reads as.
fn copy_data(source: &File, dest: &File, bytes: u64) -> io::Result<()> {
    let mut buf = vec![0u8; CHUNK];
    for range in data_ranges(source, bytes)? {
        let mut at = range.start;
        while at < range.end {
            let n = ((range.end - at) as usize).min(CHUNK);
            source.read_exact_at(&mut buf[..n], at)?;
            if buf[..n].iter().any(|&b| b != 0) {
                dest.write_all_at(&buf[..n], at)?;
            }
            at += n as u64;
        }
    }
    Ok(())
}

/// Where the first `len` bytes of `file` hold data, by `SEEK_DATA`/`SEEK_HOLE`, in order: a
/// template memory file is sparse (the template wrote ~100 MiB of a 512 MiB guest).
pub(super) fn data_ranges(file: &File, len: u64) -> io::Result<Vec<std::ops::Range<u64>>> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push(start..end);
        at = end;
    }
    Ok(ranges)
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

    /// The cache and the byte count are process-wide: these tests take turns.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn serial() -> std::sync::MutexGuard<'static, ()> {
        SERIAL.lock().unwrap_or_else(|e| e.into_inner())
    }

    #[test]
    fn a_copy_mapped_by_an_adopted_vm_is_counted_once_until_its_last_vm_ends() {
        let _serial = serial();
        let template = tempfile::tempfile().unwrap();
        template.set_len(4 << 20).unwrap();
        let identity = identity_of(&template.metadata().unwrap());
        let copy = copy_sealed(&template, 4 << 20, identity).unwrap();
        // This process stands in for the adopted VMM: it maps the copy as QEMU does, and the
        // daemon that made it is gone (the descriptor closed, the pages mapped).
        // SAFETY: a private mapping of an owned descriptor, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                4 << 20,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE,
                copy.fd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        let made = template_copies_bytes();
        assert!(
            inherited_copy(std::process::id()).is_none(),
            "a copy this process holds is counted already"
        );
        drop(copy);
        let before = template_copies_bytes();
        assert_eq!(before, made - (4 << 20));
        let first = inherited_copy(std::process::id()).expect("the mapping is found");
        assert_eq!(template_copies_bytes(), before + (4 << 20));
        let second = inherited_copy(std::process::id()).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        assert_eq!(template_copies_bytes(), before + (4 << 20), "counted once");
        drop(first);
        assert_eq!(template_copies_bytes(), before + (4 << 20));
        drop(second);
        assert_eq!(template_copies_bytes(), before);
        // SAFETY: the mapping made above.
        assert_eq!(unsafe { libc::munmap(at, 4 << 20) }, 0);
    }

    /// A taken-over VMM maps a huge sparse memfd under the copies' name before the daemon
    /// restarts: the node counts what it holds (nothing), not the size it maps.
    #[test]
    fn a_sparse_memfd_under_the_copies_name_counts_only_what_it_holds() {
        let _serial = serial();
        let name = CString::new(MEMFD_NAME).unwrap();
        // SAFETY: memfd_create with a valid C string; the result is checked and owned at once.
        let raw = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
        assert!(raw >= 0);
        // SAFETY: `raw` is a new descriptor nobody else owns.
        let memfd = File::from(unsafe { OwnedFd::from_raw_fd(raw) });
        let huge: usize = 1 << 40;
        memfd.set_len(huge as u64).unwrap();
        // SAFETY: a private mapping of an owned descriptor, unmapped below.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                huge,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                memfd.as_raw_fd(),
                0,
            )
        };
        assert_ne!(at, libc::MAP_FAILED);
        drop(memfd);
        let before = template_copies_bytes();
        let counted = inherited_copy(std::process::id()).expect("the mapping is found");
        assert_eq!(counted.len, 0, "a sparse memfd holds nothing");
        assert_eq!(template_copies_bytes(), before);
        drop(counted);
        // SAFETY: the mapping made above.
        assert_eq!(unsafe { libc::munmap(at, huge) }, 0);
    }

    #[test]
    fn the_copy_is_found_by_its_memfd_name_in_the_maps() {
        let maps = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 1234 /usr/bin/qemu-system-x86_64
7f0000000000-7f0008000000 rw-p 00000000 00:01 2051 /memfd:hearth-template-memory (deleted)
7f0008000000-7f0010000000 rw-p 08000000 00:01 2051 /memfd:hearth-template-memory (deleted)
7f2000000000-7f2000001000 rw-p 00000000 00:00 0
";
        assert_eq!(
            mapped_copy(maps).as_deref(),
            Some("7f0000000000-7f0008000000")
        );
        assert_eq!(
            mapped_copy("7f0-7f1 rw-p 0 00:01 9 /memfd:other (deleted)\n"),
            None
        );
    }

    #[test]
    fn the_copy_holds_the_template_and_refuses_writes_and_hole_punching() {
        let _serial = serial();
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
    fn copies_count_until_their_last_holder_lets_go_and_unused_ones_are_released() {
        let _serial = serial();
        release_unused_template_copies(Duration::ZERO);
        let base = template_copies_bytes();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory");
        let template = |byte: u8| {
            let tmp = dir.path().join("memory.new");
            std::fs::write(&tmp, vec![byte; 1 << 20]).unwrap();
            std::fs::rename(&tmp, &file).unwrap();
        };
        template(1);
        let vm = sealed_copy(&file, 1 << 20).unwrap();
        assert_eq!(template_copies_bytes(), base + (1 << 20));
        assert_eq!(
            release_unused_template_copies(Duration::ZERO),
            0,
            "a copy a VM maps stays"
        );
        // The template is rebuilt: restores take a new copy, the running VM keeps the old one,
        // and both are counted until the VM lets go of its own.
        template(2);
        let newer = sealed_copy(&file, 1 << 20).unwrap();
        assert!(!Arc::ptr_eq(&vm, &newer));
        assert_eq!(template_copies_bytes(), base + (2 << 20));
        drop(vm);
        assert_eq!(template_copies_bytes(), base + (1 << 20));
        // No VM maps the cached one now: kept while recently used, released once idle.
        drop(newer);
        assert_eq!(release_unused_template_copies(Duration::from_secs(3600)), 0);
        assert_eq!(template_copies_bytes(), base + (1 << 20));
        assert_eq!(release_unused_template_copies(Duration::ZERO), 1 << 20);
        assert_eq!(template_copies_bytes(), base);
        // The next restore makes it again.
        let again = sealed_copy(&file, 1 << 20).unwrap();
        let mut got = [0u8; 4];
        File::open(again.path())
            .unwrap()
            .read_exact_at(&mut got, 4096)
            .unwrap();
        assert_eq!(got, [2; 4]);
    }

    #[test]
    fn a_missing_template_is_an_error_not_a_zeroed_copy() {
        let _serial = serial();
        let dir = tempfile::tempdir().unwrap();
        let before = template_copies_bytes();
        let err = sealed_copy(&dir.path().join("gone"), 1 << 20).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
        assert_eq!(template_copies_bytes(), before, "nothing allocated");
    }

    /// A thin snapshot keeps a hard link to its template's memory file and resumes from it: the
    /// link shares the template's copy, and the copy says which files it is a copy of.
    #[test]
    fn a_hard_link_to_a_template_file_shares_its_copy() {
        let _serial = serial();
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("memory");
        let mut bytes = vec![0u8; 1 << 20];
        bytes[8192] = 7;
        std::fs::write(&file, &bytes).unwrap();
        let copy = sealed_copy(&file, 1 << 20).unwrap();
        let link = dir.path().join("memory.base");
        std::fs::hard_link(&file, &link).unwrap();
        assert!(Arc::ptr_eq(&copy, &sealed_copy(&link, 1 << 20).unwrap()));
        assert!(holds_copy(&link, 1 << 20));
        assert!(copy.is_copy_of(&file) && copy.is_copy_of(&link));
        // The template rebuilt (a new file): the link still is the copy's file, the path is not.
        let tmp = dir.path().join("memory.new");
        std::fs::write(&tmp, vec![1u8; 1 << 20]).unwrap();
        std::fs::rename(&tmp, &file).unwrap();
        assert!(!copy.is_copy_of(&file));
        assert!(copy.is_copy_of(&link));
    }
}
