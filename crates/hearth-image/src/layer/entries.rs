//! How each entry kind lands in the staging tree: regular files, directories, hard links, and the
//! metadata calls (owner before mode, since chown clears setuid; xattrs after chown, since chown
//! clears security.capability). Touches only the staging tree, through `fsops`.

use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, BorrowedFd};

use super::apply::{tar_error, Staging};
use super::fsops;
use super::meta::Meta;
use super::safety::{c_name, EntryPath};
use super::LayerError;

impl Staging {
    pub(super) fn write_file<R: Read>(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &EntryPath,
        entry: &mut tar::Entry<'_, R>,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        let flags = libc::O_WRONLY | libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW;
        // Most files are new: try to create first and only look at what is in the way on EEXIST.
        let fd = match fsops::open_at(dir, name, flags, 0o600) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                self.replace_non_dir(dir, name, path)?;
                fsops::open_at(dir, name, flags, 0o600)
            }
            other => other,
        }
        .map_err(|e| io_err(path, "create file", e))?;
        let mut file = std::fs::File::from(fd);
        let mut size = 0u64;
        loop {
            let n = match entry.read(&mut self.buf) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(tar_error(e, &format!("read the content of {path}"))),
            };
            self.written_bytes += n as u64;
            if self.written_bytes > self.limits.max_total_bytes {
                return Err(LayerError::LimitExceeded {
                    what: format!(
                        "file content written passed {} bytes at entry {path}",
                        self.limits.max_total_bytes
                    ),
                });
            }
            file.write_all(&self.buf[..n])
                .map_err(|e| io_err(path, "write file", e))?;
            size += n as u64;
        }
        self.stats.file_blocks_bytes += size.div_ceil(4096) * 4096;
        let fd = file.as_fd();
        fsops::fchown(fd, meta.uid, meta.gid).map_err(|e| io_err(path, "chown", e))?;
        fsops::fchmod(fd, meta.mode & 0o7777).map_err(|e| io_err(path, "chmod", e))?;
        for (key, value) in &meta.xattrs {
            fsops::fsetxattr(fd, key, value).map_err(|e| xattr_err(path, key, e))?;
        }
        fsops::set_times_fd(fd, meta.mtime).map_err(|e| io_err(path, "set times", e))
    }

    pub(super) fn make_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &EntryPath,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        match fsops::lstat_at(dir, name).map_err(|e| io_err(path, "stat", e))? {
            Some(st) if fsops::is_dir(&st) => {}
            Some(_) => {
                fsops::remove_at(dir, name)
                    .map_err(|e| io_err(path, "replace an existing entry", e))?;
                fsops::mkdir_at(dir, name, 0o700).map_err(|e| io_err(path, "mkdir", e))?;
            }
            None => fsops::mkdir_at(dir, name, 0o700).map_err(|e| io_err(path, "mkdir", e))?,
        }
        let flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NOFOLLOW;
        let fd =
            fsops::open_at(dir, name, flags, 0).map_err(|e| io_err(path, "open directory", e))?;
        self.set_meta_fd(fd.as_fd(), path, meta)
    }

    pub(super) fn set_root_meta(
        &mut self,
        path: &EntryPath,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        let root = fsops::dup(self.root.as_fd()).map_err(|e| io_err(path, "dup", e))?;
        self.set_meta_fd(root.as_fd(), path, meta)
    }

    fn set_meta_fd(
        &mut self,
        fd: BorrowedFd<'_>,
        path: &EntryPath,
        meta: &Meta,
    ) -> Result<(), LayerError> {
        fsops::fchown(fd, meta.uid, meta.gid).map_err(|e| io_err(path, "chown", e))?;
        fsops::fchmod(fd, meta.mode & 0o7777).map_err(|e| io_err(path, "chmod", e))?;
        for (key, value) in &meta.xattrs {
            fsops::fsetxattr(fd, key, value).map_err(|e| xattr_err(path, key, e))?;
        }
        self.remember(path)?;
        self.dir_times
            .insert(path.as_path().to_path_buf(), meta.mtime);
        Ok(())
    }

    /// Metadata for symlinks and special files, which cannot be opened for writing.
    pub(super) fn set_meta_by_name(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &OsStr,
        cname: &CString,
        path: &EntryPath,
        meta: &Meta,
        chmod: bool,
    ) -> Result<(), LayerError> {
        fsops::lchown_at(dir, cname, meta.uid, meta.gid).map_err(|e| io_err(path, "chown", e))?;
        if chmod {
            fsops::chmod_at(dir, cname, meta.mode & 0o7777)
                .map_err(|e| io_err(path, "chmod", e))?;
        }
        for (key, value) in &meta.xattrs {
            // The kernel refuses user.* xattrs on symlinks; Docker drops them the same way.
            if !chmod && key.to_bytes().starts_with(b"user.") {
                continue;
            }
            fsops::lsetxattr_at(dir, name, key, value).map_err(|e| xattr_err(path, key, e))?;
        }
        fsops::set_times_at(dir, cname, meta.mtime).map_err(|e| io_err(path, "set times", e))
    }

    pub(super) fn hard_link(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &EntryPath,
        target_raw: &[u8],
    ) -> Result<(), LayerError> {
        let escape = |reason: &str| LayerError::HardLinkEscape {
            entry: path.to_string(),
            target: String::from_utf8_lossy(target_raw).into_owned(),
            reason: reason.to_string(),
        };
        let target =
            EntryPath::parse(target_raw, &self.limits).map_err(|e| escape(&e.to_string()))?;
        let Some((target_parent_rel, target_name)) = target.split() else {
            return Err(escape("it names the root directory"));
        };
        if target.as_path() == path.as_path() {
            return Ok(());
        }
        let target_parent =
            fsops::open_dir_beneath(self.root.as_fd(), target_parent_rel).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::ELOOP) | Some(libc::EXDEV) => {
                        escape("its parent directory is a symlink")
                    }
                    _ => escape(&format!("its directory cannot be opened: {e}")),
                }
            })?;
        let target_c = c_name(target_name).map_err(|e| io_err(path, "name", e))?;
        match fsops::lstat_at(target_parent.as_fd(), &target_c)
            .map_err(|e| io_err(path, "stat link target", e))?
        {
            None => return Err(escape("the target does not exist in this or a lower layer")),
            Some(st) if fsops::is_dir(&st) => return Err(escape("the target is a directory")),
            Some(_) => {}
        }
        self.replace_non_dir(dir, name, path)?;
        fsops::link_at(target_parent.as_fd(), &target_c, dir, name)
            .map_err(|e| io_err(path, "create hard link", e))
    }
}

pub(super) fn checked_name(path: &EntryPath, name: &OsStr) -> Result<CString, LayerError> {
    if name.is_empty() || name == "." || name == ".." {
        return Err(LayerError::BadName {
            entry: path.to_string(),
            reason: "the whiteout names no valid entry".into(),
        });
    }
    c_name(name).map_err(|e| io_err(path, "name", e))
}

pub(super) fn io_err(path: &EntryPath, op: &'static str, source: io::Error) -> LayerError {
    LayerError::Io {
        entry: path.to_string(),
        op,
        source,
    }
}

pub(super) fn xattr_err(path: &EntryPath, key: &CString, source: io::Error) -> LayerError {
    LayerError::Xattr {
        entry: path.to_string(),
        key: key.to_string_lossy().into_owned(),
        source,
    }
}
