//! Filesystem operations on the staging tree, always relative to a directory descriptor and never
//! following a symlink: directories are opened with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS)`
//! (or a component-by-component `O_NOFOLLOW` walk), so no entry can make hearth write through a
//! symlink or outside the staging root. Touches only the tree below the given root descriptor.

use std::ffi::{CStr, CString, OsStr};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path};

use super::safety::c_name;

const DIR_FLAGS: libc::c_int =
    libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC | libc::O_NOFOLLOW;

fn cvt(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

fn c_path(path: &Path) -> io::Result<CString> {
    let bytes = path.as_os_str().as_bytes();
    CString::new(if bytes.is_empty() {
        b"." as &[u8]
    } else {
        bytes
    })
    .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in path"))
}

/// Opens directory `rel` below `root` without following any symlink and without leaving `root`.
/// Errors: `ENOENT` (missing), `ELOOP` (a component is a symlink), `ENOTDIR` (a component is not a
/// directory), `EXDEV` (would escape).
pub fn open_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    let path = c_path(rel)?;
    // SAFETY: open_how is a plain C struct for which all-zero is valid.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = DIR_FLAGS as u64;
    how.resolve = libc::RESOLVE_BENEATH | libc::RESOLVE_NO_SYMLINKS | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: valid C string and a properly sized open_how; the returned fd is owned by us.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if ret >= 0 {
        // SAFETY: the kernel returned a fresh descriptor.
        return Ok(unsafe { OwnedFd::from_raw_fd(ret as libc::c_int) });
    }
    let err = io::Error::last_os_error();
    // ENOTDIR hides whether a component is a symlink or a file; the walk tells them apart.
    if matches!(err.raw_os_error(), Some(libc::ENOSYS) | Some(libc::ENOTDIR)) {
        return walk(root, rel, false);
    }
    Err(err)
}

/// Like `open_dir_beneath`, creating missing directories (mode 0755, owner root) on the way, as
/// container runtimes do for parents a layer does not list.
pub fn ensure_dir_beneath(root: BorrowedFd<'_>, rel: &Path) -> io::Result<OwnedFd> {
    match open_dir_beneath(root, rel) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => walk(root, rel, true),
        other => other,
    }
}

fn walk(root: BorrowedFd<'_>, rel: &Path, create: bool) -> io::Result<OwnedFd> {
    let mut current = dup(root)?;
    for component in rel.components() {
        let Component::Normal(name) = component else {
            return Err(io::Error::from_raw_os_error(libc::EXDEV));
        };
        let name = c_name(name)?;
        let next = match open_at(current.as_fd(), &name, DIR_FLAGS, 0) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                mkdir_at(current.as_fd(), &name, 0o755)?;
                open_at(current.as_fd(), &name, DIR_FLAGS, 0)?
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOTDIR) => {
                // O_DIRECTORY wins over O_NOFOLLOW: tell a symlink apart from a plain file.
                let is_link = lstat_at(current.as_fd(), &name)?
                    .is_some_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFLNK);
                return Err(io::Error::from_raw_os_error(if is_link {
                    libc::ELOOP
                } else {
                    libc::ENOTDIR
                }));
            }
            other => other?,
        };
        current = next;
    }
    Ok(current)
}

pub fn dup(fd: BorrowedFd<'_>) -> io::Result<OwnedFd> {
    fd.try_clone_to_owned()
}

pub fn open_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    flags: libc::c_int,
    mode: libc::mode_t,
) -> io::Result<OwnedFd> {
    // SAFETY: valid C string; the returned fd is owned by us.
    let fd = cvt(unsafe {
        libc::openat(
            dir.as_raw_fd(),
            name.as_ptr(),
            flags | libc::O_CLOEXEC,
            mode,
        )
    })?;
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn mkdir_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mkdirat(dir.as_raw_fd(), name.as_ptr(), mode) }).map(drop)
}

/// `lstat` of `name` in `dir`; `None` when it does not exist.
pub fn lstat_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<Option<libc::stat>> {
    let mut st = std::mem::MaybeUninit::<libc::stat>::uninit();
    // SAFETY: valid C string and output buffer.
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            st.as_mut_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret == 0 {
        // SAFETY: fstatat succeeded and filled the buffer.
        return Ok(Some(unsafe { st.assume_init() }));
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::ENOENT) {
        Ok(None)
    } else {
        Err(err)
    }
}

pub fn is_dir(st: &libc::stat) -> bool {
    st.st_mode & libc::S_IFMT == libc::S_IFDIR
}

/// Removes `name` from `dir` whatever it is; a directory goes with everything below it. Missing is fine.
pub fn remove_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    match lstat_at(dir, name)? {
        None => Ok(()),
        Some(st) if is_dir(&st) => {
            let sub = open_at(dir, name, DIR_FLAGS, 0)?;
            remove_children(sub.as_fd(), |_| true)?;
            // SAFETY: valid C string.
            cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), libc::AT_REMOVEDIR) })
                .map(drop)
        }
        Some(_) => unlink_at(dir, name),
    }
}

pub fn unlink_at(dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    // SAFETY: valid C string.
    match cvt(unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) }) {
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other.map(drop),
    }
}

/// Lists the names in directory `dir` (without `.` and `..`).
pub fn list_dir(dir: BorrowedFd<'_>) -> io::Result<Vec<CString>> {
    let fd = open_at(dir, c".", DIR_FLAGS, 0)?;
    let mut handle = nix::dir::Dir::from(fd).map_err(io::Error::from)?;
    let mut names = Vec::new();
    for entry in handle.iter() {
        let entry = entry.map_err(io::Error::from)?;
        let name = entry.file_name();
        if name != c"." && name != c".." {
            names.push(name.to_owned());
        }
    }
    Ok(names)
}

/// Removes the children of `dir` for which `keep_out` says true.
pub fn remove_children(
    dir: BorrowedFd<'_>,
    mut remove: impl FnMut(&CStr) -> bool,
) -> io::Result<()> {
    for name in list_dir(dir)? {
        if remove(&name) {
            remove_at(dir, &name)?;
        }
    }
    Ok(())
}

pub fn symlink_at(target: &[u8], dir: BorrowedFd<'_>, name: &CStr) -> io::Result<()> {
    let target = CString::new(target)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in symlink target"))?;
    // SAFETY: valid C strings.
    cvt(unsafe { libc::symlinkat(target.as_ptr(), dir.as_raw_fd(), name.as_ptr()) }).map(drop)
}

/// Hard link without following a symlink at the source (flags 0: the link names the symlink itself).
pub fn link_at(
    old_dir: BorrowedFd<'_>,
    old: &CStr,
    new_dir: BorrowedFd<'_>,
    new: &CStr,
) -> io::Result<()> {
    // SAFETY: valid C strings.
    cvt(unsafe {
        libc::linkat(
            old_dir.as_raw_fd(),
            old.as_ptr(),
            new_dir.as_raw_fd(),
            new.as_ptr(),
            0,
        )
    })
    .map(drop)
}

pub fn mknod_at(
    dir: BorrowedFd<'_>,
    name: &CStr,
    mode: libc::mode_t,
    dev: libc::dev_t,
) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe { libc::mknodat(dir.as_raw_fd(), name.as_ptr(), mode, dev) }).map(drop)
}

pub fn lchown_at(dir: BorrowedFd<'_>, name: &CStr, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: valid C string.
    cvt(unsafe {
        libc::fchownat(
            dir.as_raw_fd(),
            name.as_ptr(),
            uid,
            gid,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn fchown(fd: BorrowedFd<'_>, uid: u32, gid: u32) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we hold.
    cvt(unsafe { libc::fchown(fd.as_raw_fd(), uid, gid) }).map(drop)
}

pub fn fchmod(fd: BorrowedFd<'_>, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: plain syscall on an fd we hold.
    cvt(unsafe { libc::fchmod(fd.as_raw_fd(), mode) }).map(drop)
}

/// chmod of a non-symlink by name (symlink modes are meaningless on Linux and cannot be set).
pub fn chmod_at(dir: BorrowedFd<'_>, name: &CStr, mode: libc::mode_t) -> io::Result<()> {
    // SAFETY: valid C string. fchmodat without AT_SYMLINK_NOFOLLOW is safe here because callers
    // only use it for device nodes and fifos they just created (never symlinks).
    cvt(unsafe { libc::fchmodat(dir.as_raw_fd(), name.as_ptr(), mode, 0) }).map(drop)
}

/// Sets atime and mtime of `name` (not following a symlink).
pub fn set_times_at(dir: BorrowedFd<'_>, name: &CStr, mtime: libc::timespec) -> io::Result<()> {
    let times = [mtime, mtime];
    // SAFETY: valid C string and a two-element timespec array.
    cvt(unsafe {
        libc::utimensat(
            dir.as_raw_fd(),
            name.as_ptr(),
            times.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
        )
    })
    .map(drop)
}

pub fn set_times_fd(fd: BorrowedFd<'_>, mtime: libc::timespec) -> io::Result<()> {
    let times = [mtime, mtime];
    // SAFETY: fd we hold and a two-element timespec array.
    cvt(unsafe { libc::futimens(fd.as_raw_fd(), times.as_ptr()) }).map(drop)
}

pub fn fsetxattr(fd: BorrowedFd<'_>, key: &CStr, value: &[u8]) -> io::Result<()> {
    // SAFETY: valid key and value buffer.
    cvt(unsafe {
        libc::fsetxattr(
            fd.as_raw_fd(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

/// Sets an xattr on `name` in `dir` without following a symlink, through the directory's
/// `/proc/self/fd` entry (the only way to reach a symlink's own xattrs relative to a descriptor).
pub fn lsetxattr_at(dir: BorrowedFd<'_>, name: &OsStr, key: &CStr, value: &[u8]) -> io::Result<()> {
    let mut path = format!("/proc/self/fd/{}/", dir.as_raw_fd()).into_bytes();
    path.extend_from_slice(name.as_bytes());
    let path = CString::new(path)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL in name"))?;
    // SAFETY: valid C strings and value buffer.
    cvt(unsafe {
        libc::lsetxattr(
            path.as_ptr(),
            key.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    })
    .map(drop)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn refuses_symlinked_parents_and_creates_missing_ones() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let root = std::fs::File::open(tmp.path()).unwrap();
        symlink(outside.path(), tmp.path().join("esc")).unwrap();
        let err = ensure_dir_beneath(root.as_fd(), Path::new("esc/sub")).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        let err = walk(root.as_fd(), Path::new("esc/sub"), true).unwrap_err();
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP));
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
        ensure_dir_beneath(root.as_fd(), Path::new("a/b/c")).unwrap();
        assert!(tmp.path().join("a/b/c").is_dir());
    }

    #[test]
    fn remove_at_deletes_trees_but_not_symlink_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("keep"), b"x").unwrap();
        std::fs::create_dir_all(tmp.path().join("d/e")).unwrap();
        symlink(outside.path(), tmp.path().join("d/e/link")).unwrap();
        let root = std::fs::File::open(tmp.path()).unwrap();
        remove_at(root.as_fd(), c"d").unwrap();
        assert!(!tmp.path().join("d").exists());
        assert!(outside.path().join("keep").exists());
    }
}
