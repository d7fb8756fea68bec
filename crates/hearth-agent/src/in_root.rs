//! Paths inside the workload root that the agent itself writes or mounts on (at boot: /etc/hosts,
//! /etc/hostname, /tmp, /proc, /sys, /dev; later: /etc/resolv.conf). The image controls every
//! entry of that tree, so a plain `root.join("etc/hosts")` would follow an image's `/etc -> /` or
//! `/tmp -> ../../..` out of the root. Here every lookup is `openat2(RESOLVE_IN_ROOT |
//! RESOLVE_NO_MAGICLINKS)` from a descriptor of the root: `..` and absolute symlinks resolve
//! against the root, never above it, and /proc magic links are refused. Files written are never
//! written through a symlink, FIFO or device node: such an entry is replaced by a regular file.
//! Mount points must be real directories (no symlink anywhere on the path).

use std::ffi::CString;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// How every path below the root is resolved.
const RESOLVE: u64 = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;

/// Opens the workload root itself (an `O_PATH` directory descriptor to resolve paths from).
pub fn open_root(root: &Path) -> io::Result<OwnedFd> {
    let path = cstring(root.as_os_str().as_bytes())?;
    // SAFETY: open with a NUL-terminated path; the returned fd is ours.
    let fd = unsafe {
        libc::open(
            path.as_ptr(),
            libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC,
        )
    };
    owned(fd)
}

/// Writes `contents` to `rel` (absolute or relative, always taken inside `root`) with permission
/// `mode`, creating missing parent directories (0755) inside the root. An existing symlink, FIFO,
/// socket or device node at `rel` is replaced by the new regular file; a directory there is an error.
pub fn write_in_root(root: &Path, rel: &Path, contents: &[u8], mode: u32) -> io::Result<()> {
    let root_fd = open_root(root)?;
    let (parent, name) = split(rel)?;
    let parent_fd = dir_at(&root_fd, &parent, Lookup::CreateFollowing)?;
    let name = cstring(name.as_bytes())?;
    replace_special(&parent_fd, &name)?;
    let flags = libc::O_WRONLY
        | libc::O_CREAT
        | libc::O_TRUNC
        | libc::O_NOFOLLOW
        | libc::O_NONBLOCK
        | libc::O_NOCTTY
        | libc::O_CLOEXEC;
    // SAFETY: openat of a single path component (no '/') relative to a directory fd we own.
    let fd = unsafe {
        libc::openat(
            parent_fd.as_raw_fd(),
            name.as_ptr(),
            flags,
            mode as libc::c_uint,
        )
    };
    let fd = owned(fd)?;
    // Something swapped in between the check and the open is refused, never written through.
    if file_type(&fd)? != libc::S_IFREG {
        return Err(io::Error::other(format!(
            "{} is not a regular file",
            rel.display()
        )));
    }
    // SAFETY: fchmod on a descriptor we own.
    if unsafe { libc::fchmod(fd.as_raw_fd(), mode as libc::mode_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    std::fs::File::from(fd).write_all(contents)
}

/// Opens `rel` inside `root` with `flags` (close-on-exec added), resolved like every lookup here.
pub fn open_in_root(root: &Path, rel: &Path, flags: i32) -> io::Result<OwnedFd> {
    let root_fd = open_root(root)?;
    openat2(&root_fd, &relative(rel)?, flags, 0, RESOLVE)
}

/// Whether `rel` names anything inside `root` (following symlinks, inside the root only).
pub fn exists_in_root(root: &Path, rel: &Path) -> io::Result<bool> {
    let root_fd = open_root(root)?;
    match openat2(&root_fd, &relative(rel)?, libc::O_PATH, 0, RESOLVE) {
        Ok(_) => Ok(true),
        Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Creates directory `rel` inside `root` (and missing parents, 0755) with permission `mode` if
/// nothing is there yet; an existing entry (followed inside the root) is left as it is.
pub fn ensure_dir_in_root(root: &Path, rel: &Path, mode: u32) -> io::Result<()> {
    let root_fd = open_root(root)?;
    let rel = relative(rel)?;
    if openat2(&root_fd, &rel, libc::O_PATH, 0, RESOLVE).is_ok() {
        return Ok(());
    }
    let dir = dir_at(&root_fd, &rel, Lookup::CreateFollowing)?;
    // fchmod does not take O_PATH descriptors: reopen the directory itself.
    let reopened = openat2(
        &dir,
        Path::new("."),
        libc::O_RDONLY | libc::O_DIRECTORY,
        0,
        0,
    )?;
    // SAFETY: fchmod on a descriptor we own (mkdir's mode is reduced by the umask).
    if unsafe { libc::fchmod(reopened.as_raw_fd(), mode as libc::mode_t) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A mount point inside the root: directory `rel` opened (created with parents if missing, 0755)
/// with no symlink anywhere on its path. Mount onto [`MountPoint::path`], which names exactly
/// this directory however the tree changes afterwards.
pub struct MountPoint {
    fd: OwnedFd,
}

impl MountPoint {
    pub fn open(root: &Path, rel: &Path) -> io::Result<MountPoint> {
        let root_fd = open_root(root)?;
        let fd = dir_at(&root_fd, &relative(rel)?, Lookup::CreateNoSymlinks).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "mount point {} in the workload root must be a directory, not a symlink: {e}",
                    rel.display()
                ),
            )
        })?;
        Ok(MountPoint { fd })
    }

    /// `/proc/self/fd/N` for this directory: a mount target that cannot be redirected.
    pub fn path(&self) -> PathBuf {
        PathBuf::from(format!("/proc/self/fd/{}", self.fd.as_raw_fd()))
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Lookup {
    /// Create missing directories; existing symlinks are followed, inside the root.
    CreateFollowing,
    /// Create missing directories; any symlink on the way is an error (ELOOP).
    CreateNoSymlinks,
}

/// Opens directory `rel` below `root_fd` as `O_PATH`, creating missing components (0755).
fn dir_at(root_fd: &OwnedFd, rel: &Path, lookup: Lookup) -> io::Result<OwnedFd> {
    let resolve = match lookup {
        Lookup::CreateFollowing => RESOLVE,
        Lookup::CreateNoSymlinks => RESOLVE | libc::RESOLVE_NO_SYMLINKS,
    };
    let flags = libc::O_PATH | libc::O_DIRECTORY;
    let mut prefix = PathBuf::new();
    let mut current = openat2(root_fd, Path::new("."), flags, 0, resolve)?;
    for component in rel.components() {
        let Component::Normal(name) = component else {
            continue;
        };
        prefix.push(name);
        current = match openat2(root_fd, &prefix, flags, 0, resolve) {
            Ok(fd) => fd,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                let c_name = cstring(name.as_bytes())?;
                // SAFETY: mkdirat of a single component relative to a directory fd we own.
                let ret = unsafe { libc::mkdirat(current.as_raw_fd(), c_name.as_ptr(), 0o755) };
                if ret < 0 {
                    let error = io::Error::last_os_error();
                    // EEXIST: a dangling symlink (or a racing mkdir); the reopen below decides.
                    if error.raw_os_error() != Some(libc::EEXIST) {
                        return Err(error);
                    }
                }
                openat2(root_fd, &prefix, flags, 0, resolve)?
            }
            Err(e) => return Err(e),
        };
    }
    Ok(current)
}

/// Removes `name` in `dir` if it is a symlink, FIFO, socket or device node (so that a write
/// creates a fresh regular file); a directory is an error.
fn replace_special(dir: &OwnedFd, name: &CString) -> io::Result<()> {
    // SAFETY: fstatat with AT_SYMLINK_NOFOLLOW into a zeroed stat owned by this frame.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    let ret = unsafe {
        libc::fstatat(
            dir.as_raw_fd(),
            name.as_ptr(),
            &mut st,
            libc::AT_SYMLINK_NOFOLLOW,
        )
    };
    if ret < 0 {
        let error = io::Error::last_os_error();
        return match error.raw_os_error() {
            Some(libc::ENOENT) => Ok(()),
            _ => Err(error),
        };
    }
    match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => Ok(()),
        libc::S_IFDIR => Err(io::Error::from_raw_os_error(libc::EISDIR)),
        _ => {
            // SAFETY: unlinkat of a single component relative to a directory fd we own.
            if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } < 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        }
    }
}

fn file_type(fd: &OwnedFd) -> io::Result<libc::mode_t> {
    // SAFETY: fstat into a zeroed stat owned by this frame.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(fd.as_raw_fd(), &mut st) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(st.st_mode & libc::S_IFMT)
}

/// `rel` split into its parent (relative to the root) and its final name.
fn split(rel: &Path) -> io::Result<(PathBuf, std::ffi::OsString)> {
    let rel = relative(rel)?;
    match rel.components().next_back() {
        Some(Component::Normal(name)) => {
            let name = name.to_os_string();
            let parent = rel.parent().map(Path::to_path_buf).unwrap_or_default();
            Ok((parent, name))
        }
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{} does not end in a file name", rel.display()),
        )),
    }
}

/// `rel` without its leading `/` ("." for the root itself).
fn relative(rel: &Path) -> io::Result<PathBuf> {
    let stripped: PathBuf = rel
        .components()
        .filter(|c| !matches!(c, Component::RootDir | Component::CurDir))
        .collect();
    if stripped.as_os_str().is_empty() {
        return Ok(PathBuf::from("."));
    }
    Ok(stripped)
}

fn openat2(dir: &OwnedFd, path: &Path, flags: i32, mode: u64, resolve: u64) -> io::Result<OwnedFd> {
    let path = cstring(path.as_os_str().as_bytes())?;
    // SAFETY: open_how is plain data; zeroed then filled field by field (it is non_exhaustive).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.mode = mode;
    how.resolve = resolve;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a correctly sized open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            path.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    owned(fd as RawFd)
}

fn owned(fd: RawFd) -> io::Result<OwnedFd> {
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a new descriptor returned by the kernel, owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn cstring(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{symlink, PermissionsExt};

    /// The attack: an image whose /etc is a symlink to `/` and /tmp to `../../..`; the agent's
    /// boot-time writes must land inside the root.
    #[test]
    fn writes_through_escaping_symlinks_stay_inside_the_root() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink("/", root.join("etc")).unwrap();
        symlink("../../..", root.join("tmp")).unwrap();
        write_in_root(&root, Path::new("/etc/hosts"), b"127.0.0.1 x\n", 0o644).unwrap();
        write_in_root(&root, Path::new("tmp/marker"), b"m", 0o600).unwrap();
        assert_eq!(std::fs::read(root.join("hosts")).unwrap(), b"127.0.0.1 x\n");
        assert_eq!(std::fs::read(root.join("marker")).unwrap(), b"m");
        assert!(!outer.path().join("marker").exists());
        assert!(!outer.path().join("hosts").exists());
        let mode = std::fs::metadata(root.join("marker"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(exists_in_root(&root, Path::new("/tmp")).unwrap());
    }

    /// The attack: /etc/hostname is a symlink to a file outside the root (absolute or by `..`).
    /// The agent replaces the link with a regular file and never writes through it.
    #[test]
    fn a_symlinked_file_is_replaced_not_written_through() {
        let outer = tempfile::tempdir().unwrap();
        let victim = outer.path().join("victim");
        std::fs::write(&victim, "untouched").unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir_all(root.join("etc")).unwrap();
        symlink(&victim, root.join("etc/hostname")).unwrap();
        symlink("../../victim", root.join("etc/hosts")).unwrap();
        write_in_root(&root, Path::new("/etc/hostname"), b"box\n", 0o644).unwrap();
        write_in_root(&root, Path::new("/etc/hosts"), b"hosts\n", 0o644).unwrap();
        assert_eq!(std::fs::read_to_string(&victim).unwrap(), "untouched");
        let meta = std::fs::symlink_metadata(root.join("etc/hostname")).unwrap();
        assert!(meta.file_type().is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hosts")).unwrap(),
            "hosts\n"
        );
    }

    #[test]
    fn missing_parents_are_created_and_directories_are_not_overwritten() {
        let root = tempfile::tempdir().unwrap();
        write_in_root(root.path(), Path::new("/a/b/c"), b"x", 0o644).unwrap();
        assert_eq!(std::fs::read(root.path().join("a/b/c")).unwrap(), b"x");
        let error = write_in_root(root.path(), Path::new("/a/b"), b"x", 0o644).unwrap_err();
        assert_eq!(error.raw_os_error(), Some(libc::EISDIR));
        assert!(write_in_root(root.path(), Path::new("/"), b"x", 0o644).is_err());
    }

    /// The attack: the image makes /proc a symlink to `/` so the agent would mount over the root
    /// (or, without in-root resolution, over the agent's own /).
    #[test]
    fn mount_points_refuse_symlinks_and_are_created_when_missing() {
        let outer = tempfile::tempdir().unwrap();
        let root = outer.path().join("root");
        std::fs::create_dir(&root).unwrap();
        symlink("/", root.join("proc")).unwrap();
        assert!(MountPoint::open(&root, Path::new("/proc")).is_err());
        let point = MountPoint::open(&root, Path::new("/dev/pts")).unwrap();
        assert!(root.join("dev/pts").is_dir());
        assert_eq!(
            std::fs::read_link(point.path()).unwrap(),
            root.join("dev/pts")
        );
    }

    #[test]
    fn ensure_dir_sets_the_mode_only_when_creating() {
        let root = tempfile::tempdir().unwrap();
        ensure_dir_in_root(root.path(), Path::new("/tmp"), 0o1777).unwrap();
        let mode = std::fs::metadata(root.path().join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o1777);
        std::fs::set_permissions(root.path().join("tmp"), PermissionsExt::from_mode(0o700))
            .unwrap();
        ensure_dir_in_root(root.path(), Path::new("/tmp"), 0o1777).unwrap();
        let mode = std::fs::metadata(root.path().join("tmp"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o700);
    }
}
