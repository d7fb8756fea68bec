//! File requests: put, get, stat and list of paths inside the workload root. Every path is resolved
//! with `openat2(RESOLVE_IN_ROOT)`, so `..` and symlinks planted by the workload cannot reach the
//! agent's own filesystem. Puts write a temporary file beside the target and rename it into place,
//! so readers never see half a file. Transfers stream: memory stays at one chunk per request.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;
use h2::server::SendResponse;
use h2::RecvStream;
use hearth_proto::files::{MODE_HEADER, SIZE_HEADER};
use hearth_proto::{AgentError, DirEntry, DirListing, ErrorKind, FileKind, FileStat};
use nix::fcntl::{AtFlags, OFlag};
use nix::sys::stat::Mode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::server;

/// Owner of a file written by put.
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// Bytes read from a file per DATA frame on get.
const CHUNK: usize = 64 * 1024;

pub fn stat(root: &Path, path: &str) -> Result<FileStat, AgentError> {
    let fd = open_in_root(root, path, libc::O_PATH | libc::O_NOFOLLOW)
        .map_err(|e| fail("stat", path, e))?;
    let st = nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| fail("stat", path, e.into()))?;
    let link_target = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
        // An O_PATH fd of a symlink plus an empty path reads the link itself.
        Some(read_link(fd.as_raw_fd(), OsStr::new("")).map_err(|e| fail("readlink", path, e))?)
    } else {
        None
    };
    Ok(to_file_stat(&st, link_target))
}

pub fn list(root: &Path, path: &str) -> Result<DirListing, AgentError> {
    let fd = open_in_root(root, path, libc::O_RDONLY | libc::O_DIRECTORY)
        .map_err(|e| fail("list", path, e))?;
    let dir_fd = fd.as_raw_fd();
    let mut dir = nix::dir::Dir::from_fd(dir_fd).map_err(|e| fail("list", path, e.into()))?;
    // Dir now owns the descriptor and closes it.
    std::mem::forget(fd);
    let mut entries = Vec::new();
    let mut truncated = false;
    for entry in dir.iter() {
        let entry = entry.map_err(|e| fail("list", path, e.into()))?;
        let name = OsStr::from_bytes(entry.file_name().to_bytes());
        if name == "." || name == ".." {
            continue;
        }
        if entries.len() == DirListing::MAX_ENTRIES {
            truncated = true;
            break;
        }
        // Entries can vanish while listing; skip those rather than failing the listing.
        let Ok(st) = nix::sys::stat::fstatat(Some(dir_fd), name, AtFlags::AT_SYMLINK_NOFOLLOW)
        else {
            continue;
        };
        let link_target = if st.st_mode & libc::S_IFMT == libc::S_IFLNK {
            read_link(dir_fd, name).ok()
        } else {
            None
        };
        entries.push(DirEntry {
            name: name.to_string_lossy().into_owned(),
            stat: to_file_stat(&st, link_target),
        });
    }
    entries.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(DirListing { entries, truncated })
}

/// Streams a regular file as the response body, reading the next chunk only when the host has
/// window for it.
pub async fn get(root: &Path, path: &str, mut respond: SendResponse<Bytes>) {
    let opened = open_in_root(root, path, libc::O_RDONLY)
        .map_err(|e| fail("read", path, e))
        .and_then(|fd| {
            let st =
                nix::sys::stat::fstat(fd.as_raw_fd()).map_err(|e| fail("read", path, e.into()))?;
            match st.st_mode & libc::S_IFMT {
                libc::S_IFREG => Ok((std::fs::File::from(fd), st)),
                libc::S_IFDIR => Err(AgentError::new(
                    ErrorKind::IsADirectory,
                    format!("read {path}: is a directory"),
                )),
                _ => Err(AgentError::invalid(format!(
                    "read {path}: not a regular file"
                ))),
            }
        });
    let (file, st) = match opened {
        Ok(opened) => opened,
        Err(e) => return server::respond_error(respond, &e),
    };
    let response = http::Response::builder()
        .header(MODE_HEADER, format!("{:o}", st.st_mode & 0o7777))
        .header(SIZE_HEADER, st.st_size.to_string())
        .body(())
        .expect("valid headers");
    let Ok(mut send) = respond.send_response(response, false) else {
        return;
    };
    let mut file = tokio::fs::File::from_std(file);
    let mut buf = vec![0u8; CHUNK];
    loop {
        send.reserve_capacity(CHUNK);
        let Ok(capacity) = std::future::poll_fn(|cx| server::poll_capacity(&mut send, cx)).await
        else {
            return;
        };
        let want = capacity.min(CHUNK);
        match file.read(&mut buf[..want]).await {
            Ok(0) => {
                let _ = send.send_data(Bytes::new(), true);
                return;
            }
            Ok(n) => {
                if send
                    .send_data(Bytes::copy_from_slice(&buf[..n]), false)
                    .is_err()
                {
                    return;
                }
            }
            Err(e) => {
                crate::log!("read {path}: {e}; resetting the transfer");
                send.send_reset(h2::Reason::INTERNAL_ERROR);
                return;
            }
        }
    }
}

/// Writes the request body to `path` (created or replaced atomically) and answers its stat.
pub async fn put(
    root: &Path,
    path: &str,
    mode: u32,
    owner: Owner,
    mut body: RecvStream,
) -> Result<FileStat, AgentError> {
    let (parent, name) = split_parent(path)?;
    let parent_fd = open_in_root(root, parent, libc::O_PATH | libc::O_DIRECTORY)
        .map_err(|e| fail("write", path, e))?;
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let temp = format!(
        ".hearth-put-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    );
    let flags =
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC;
    let raw = nix::fcntl::openat(
        Some(parent_fd.as_raw_fd()),
        temp.as_str(),
        flags,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(|e| fail("write", path, e.into()))?;
    // SAFETY: openat returned a new descriptor we now own.
    let file = unsafe { std::fs::File::from_raw_fd(raw) };
    let written = write_body(file, &mut body, mode, owner).await;
    let result = written.and_then(|st| {
        nix::fcntl::renameat(
            Some(parent_fd.as_raw_fd()),
            temp.as_str(),
            Some(parent_fd.as_raw_fd()),
            name,
        )
        .map_err(io::Error::from)?;
        Ok(st)
    });
    match result {
        Ok(st) => Ok(to_file_stat(&st, None)),
        Err(e) => {
            let _ = nix::unistd::unlinkat(
                Some(parent_fd.as_raw_fd()),
                temp.as_str(),
                nix::unistd::UnlinkatFlags::NoRemoveDir,
            );
            Err(fail("write", path, e))
        }
    }
}

async fn write_body(
    file: std::fs::File,
    body: &mut RecvStream,
    mode: u32,
    owner: Owner,
) -> io::Result<nix::sys::stat::FileStat> {
    let mut file = tokio::fs::File::from_std(file);
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| {
            io::Error::new(
                io::ErrorKind::ConnectionAborted,
                format!("upload interrupted: {e}"),
            )
        })?;
        file.write_all(&chunk).await?;
        // Window is released only once the bytes are written, which bounds what the host can push.
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    file.flush().await?;
    let file = file.into_std().await;
    // chown first: it clears set-id bits that the mode may ask for.
    nix::unistd::fchown(
        file.as_raw_fd(),
        Some(owner.uid.into()),
        Some(owner.gid.into()),
    )?;
    nix::sys::stat::fchmod(file.as_raw_fd(), Mode::from_bits_truncate(mode))?;
    Ok(nix::sys::stat::fstat(file.as_raw_fd())?)
}

/// `/a/b/c` -> (`/a/b`, `c`); rejects paths whose last component is not a plain name.
fn split_parent(path: &str) -> Result<(&str, &str), AgentError> {
    let trimmed = path.trim_end_matches('/');
    let (parent, name) = trimmed.rsplit_once('/').unwrap_or(("", trimmed));
    if name.is_empty() || name == "." || name == ".." {
        return Err(AgentError::invalid(format!(
            "write {path}: the path must end in a file name"
        )));
    }
    Ok((if parent.is_empty() { "/" } else { parent }, name))
}

/// Opens `path` (absolute, inside the root) with `openat2(RESOLVE_IN_ROOT)`: `..` and absolute
/// symlinks resolve against the root, never above it.
fn open_in_root(root: &Path, path: &str, flags: libc::c_int) -> io::Result<OwnedFd> {
    let root_fd = std::fs::File::open(root)?;
    let relative = path.trim_start_matches('/');
    let relative = std::ffi::CString::new(if relative.is_empty() { "." } else { relative })
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))?;
    // SAFETY: open_how is plain data; zeroed then filled field by field (it is non_exhaustive).
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    how.flags = (flags | libc::O_CLOEXEC) as u64;
    how.resolve = libc::RESOLVE_IN_ROOT;
    // SAFETY: openat2 with a valid dirfd, a NUL-terminated path and a correctly sized open_how.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            root_fd.as_raw_fd(),
            relative.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: openat2 returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as libc::c_int) })
}

fn read_link(dir_fd: libc::c_int, name: &OsStr) -> io::Result<String> {
    Ok(nix::fcntl::readlinkat(Some(dir_fd), name)?
        .to_string_lossy()
        .into_owned())
}

fn to_file_stat(st: &nix::sys::stat::FileStat, link_target: Option<String>) -> FileStat {
    let kind = match st.st_mode & libc::S_IFMT {
        libc::S_IFREG => FileKind::File,
        libc::S_IFDIR => FileKind::Dir,
        libc::S_IFLNK => FileKind::Symlink,
        _ => FileKind::Other,
    };
    FileStat {
        kind,
        size: st.st_size as u64,
        mode: st.st_mode & 0o7777,
        uid: st.st_uid,
        gid: st.st_gid,
        mtime: st.st_mtime,
        link_target,
    }
}

fn fail(operation: &str, path: &str, error: io::Error) -> AgentError {
    let kind = error
        .raw_os_error()
        .map(ErrorKind::from_errno)
        .unwrap_or(ErrorKind::Internal);
    AgentError::new(kind, format!("{operation} {path}: {error}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_cannot_escape_the_root() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "host").unwrap();
        let root = tempfile::tempdir().unwrap();
        std::fs::write(root.path().join("secret"), "guest").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), root.path().join("abs")).unwrap();
        std::os::unix::fs::symlink("../../../../../../secret", root.path().join("rel")).unwrap();
        for link in ["/abs", "/rel", "/../../secret"] {
            let fd = open_in_root(root.path(), link, libc::O_RDONLY);
            if let Ok(fd) = fd {
                let content =
                    std::fs::read_to_string(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap();
                assert_eq!(content, "guest", "{link} escaped the root");
            }
        }
        let stat = stat(root.path(), "/abs").unwrap();
        assert_eq!(stat.kind, FileKind::Symlink);
        assert_eq!(
            stat.link_target.unwrap(),
            outside.path().join("secret").to_str().unwrap()
        );
    }

    #[test]
    fn list_reports_entries_sorted_with_kinds() {
        let root = tempfile::tempdir().unwrap();
        std::fs::create_dir(root.path().join("dir")).unwrap();
        std::fs::write(root.path().join("b"), "12345").unwrap();
        std::os::unix::fs::symlink("b", root.path().join("a")).unwrap();
        let listing = list(root.path(), "/").unwrap();
        let summary: Vec<_> = listing
            .entries
            .iter()
            .map(|e| (e.name.as_str(), e.stat.kind))
            .collect();
        assert_eq!(
            summary,
            [
                ("a", FileKind::Symlink),
                ("b", FileKind::File),
                ("dir", FileKind::Dir)
            ]
        );
        assert_eq!(listing.entries[0].stat.link_target.as_deref(), Some("b"));
        assert_eq!(listing.entries[1].stat.size, 5);
        assert!(!listing.truncated);
        let missing = list(root.path(), "/nope").unwrap_err();
        assert_eq!(missing.kind, ErrorKind::NotFound);
        assert!(missing.message.contains("/nope"), "{}", missing.message);
        assert_eq!(
            list(root.path(), "/b").unwrap_err().kind,
            ErrorKind::NotADirectory
        );
    }

    #[test]
    fn split_parent_needs_a_file_name() {
        assert_eq!(split_parent("/a/b").unwrap(), ("/a", "b"));
        assert_eq!(split_parent("/b").unwrap(), ("/", "b"));
        for bad in ["/", "/a/..", "/a/."] {
            assert!(split_parent(bad).is_err(), "{bad}");
        }
    }
}
