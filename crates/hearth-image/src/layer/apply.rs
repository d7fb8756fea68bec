//! Applies layer tar streams, in order, to a staging directory: regular files, directories, symlinks,
//! hard links, device nodes and fifos with owners, modes, xattrs and timestamps, plus OCI whiteouts.
//! Every write goes through a directory descriptor opened beneath the staging root without following
//! symlinks (see `fsops`), so hostile names fail with an error naming the entry instead of escaping.
//! Touches only the staging directory it was given.

use std::collections::{BTreeMap, HashSet};
use std::ffi::CString;
use std::io::{self, Read};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::{Path, PathBuf};

use tar::EntryType;

use super::entries::{checked_name, io_err};
use super::fsops;
use super::headers::{HeaderGuard, HeaderRefused};
use super::meta::{read_meta, Meta};
use super::safety::{c_name, BombError, EntryPath, LimitedReader, Limits, BOOKKEEPING_OVERHEAD};
use super::whiteout::{self, Whiteout};
use super::LayerError;

const COPY_BUF: usize = 1 << 20;

/// What the staged tree holds, for sizing the filesystem image (upper bounds: overwritten and
/// whited-out content is still counted).
#[derive(Debug, Clone, Copy, Default)]
pub struct StagingStats {
    /// Regular-file bytes, each file rounded up to 4 KiB.
    pub file_blocks_bytes: u64,
    /// Entries written (an upper bound on inodes).
    pub entries: u64,
    /// Uncompressed tar bytes read.
    pub tar_bytes: u64,
}

/// A staging directory being filled layer by layer.
pub struct Staging {
    pub(super) root: OwnedFd,
    pub(super) limits: Limits,
    pub(super) stats: StagingStats,
    /// Directory mtimes, applied at the end because later entries change them.
    pub(super) dir_times: BTreeMap<PathBuf, libc::timespec>,
    /// The last parent directory opened, reused while a tar stays inside one directory.
    pub(super) parent_cache: Option<(PathBuf, OwnedFd)>,
    pub(super) buf: Vec<u8>,
    /// Regular-file bytes written so far, counted against `max_total_bytes` as they are written.
    pub(super) written_bytes: u64,
    /// Bookkeeping charged against `max_bookkeeping_bytes`: the current layer's names plus every
    /// directory time kept (only given back when a layer's name set is dropped).
    pub(super) remembered: u64,
}

impl Staging {
    /// `root` must be an empty directory that the caller owns.
    pub fn new(root: &Path, limits: Limits) -> Result<Staging, LayerError> {
        let dir = std::fs::File::open(root).map_err(|source| LayerError::Io {
            entry: root.display().to_string(),
            op: "open the staging directory",
            source,
        })?;
        Ok(Staging {
            root: dir.into(),
            limits,
            stats: StagingStats::default(),
            dir_times: BTreeMap::new(),
            parent_cache: None,
            buf: vec![0; COPY_BUF],
            written_bytes: 0,
            remembered: 0,
        })
    }

    pub fn stats(&self) -> StagingStats {
        self.stats
    }

    /// Applies one uncompressed layer tar stream. The stream is read to its end (so callers hashing it
    /// see every byte) and counted against the size limit; every header is checked by `HeaderGuard`
    /// before the `tar` crate reads it.
    pub fn apply<R: Read>(&mut self, tar_stream: R) -> Result<(), LayerError> {
        let remaining = self.limits.max_total_bytes;
        let mut limited = LimitedReader::new(tar_stream, self.stats.tar_bytes, remaining);
        let mut written = HashSet::new();
        let guarded = HeaderGuard::new(&mut limited, self.limits.max_extension_header);
        let result = self.apply_entries(guarded, &mut written);
        // The layer's own name set is dropped here: give its charge back (directory times stay).
        let freed: u64 = written
            .iter()
            .map(|p| p.as_os_str().len() as u64 + BOOKKEEPING_OVERHEAD)
            .sum();
        self.remembered = self.remembered.saturating_sub(freed);
        drop(written);
        self.stats.tar_bytes = limited.read;
        result?;
        io::copy(&mut limited, &mut io::sink())
            .map_err(|e| tar_error(e, "read the end of the layer"))?;
        self.stats.tar_bytes = limited.read;
        Ok(())
    }

    fn apply_entries<R: Read>(
        &mut self,
        stream: R,
        written: &mut HashSet<PathBuf>,
    ) -> Result<(), LayerError> {
        let mut archive = tar::Archive::new(stream);
        let entries = archive
            .entries()
            .map_err(|e| tar_error(e, "read the layer"))?;
        for entry in entries {
            let mut entry = entry.map_err(|e| tar_error(e, "read an entry header"))?;
            self.stats.entries += 1;
            if self.stats.entries > self.limits.max_entries {
                return Err(LayerError::LimitExceeded {
                    what: format!("more than {} entries", self.limits.max_entries),
                });
            }
            let kind = entry.header().entry_type();
            if matches!(
                kind,
                EntryType::XGlobalHeader
                    | EntryType::XHeader
                    | EntryType::GNULongName
                    | EntryType::GNULongLink
            ) {
                continue;
            }
            let path = EntryPath::parse(&entry.path_bytes(), &self.limits)?;
            let meta = read_meta(&mut entry, &path)?;
            self.apply_entry(&mut entry, kind, &path, meta, written)?;
        }
        Ok(())
    }

    fn apply_entry<R: Read>(
        &mut self,
        entry: &mut tar::Entry<'_, R>,
        kind: EntryType,
        path: &EntryPath,
        meta: Meta,
        written: &mut HashSet<PathBuf>,
    ) -> Result<(), LayerError> {
        let Some((parent_rel, name)) = path.split() else {
            return self.set_root_meta(path, &meta);
        };
        let parent_rel = parent_rel.to_path_buf();
        let name = name.to_os_string();
        match whiteout::classify(&name) {
            Whiteout::Opaque => {
                let parent = self.parent(path, &parent_rel)?;
                self.parent_cache = None;
                return whiteout::clear_lower(parent.as_fd(), &parent_rel, written)
                    .map_err(|source| io_err(path, "clear an opaque directory", source));
            }
            Whiteout::Remove(target) => {
                let target_rel = parent_rel.join(target);
                if written.contains(&target_rel) {
                    return Ok(());
                }
                let target_c = checked_name(path, target)?;
                let parent = self.parent(path, &parent_rel)?;
                self.forget(&target_rel);
                return fsops::remove_at(parent.as_fd(), &target_c)
                    .map_err(|source| io_err(path, "apply a whiteout", source));
            }
            Whiteout::Ordinary => {}
        }
        self.remember(path)?;
        written.insert(path.as_path().to_path_buf());
        let cname = c_name(&name).map_err(|source| io_err(path, "name", source))?;
        let parent = self.parent(path, &parent_rel)?;
        let dir = parent.as_fd();
        match kind {
            EntryType::Regular | EntryType::Continuous | EntryType::GNUSparse => {
                self.write_file(dir, &cname, path, entry, &meta)
            }
            EntryType::Directory => self.make_dir(dir, &cname, path, &meta),
            EntryType::Symlink => {
                let target = entry.link_name_bytes().ok_or_else(|| LayerError::BadName {
                    entry: path.to_string(),
                    reason: "symlink without a target".into(),
                })?;
                if let Err(e) = fsops::symlink_at(&target, dir, &cname) {
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(io_err(path, "create symlink", e));
                    }
                    self.replace_non_dir(dir, &cname, path)?;
                    fsops::symlink_at(&target, dir, &cname)
                        .map_err(|e| io_err(path, "create symlink", e))?;
                }
                self.set_meta_by_name(dir, &name, &cname, path, &meta, false)
            }
            EntryType::Link => {
                let target = entry.link_name_bytes().ok_or_else(|| LayerError::BadName {
                    entry: path.to_string(),
                    reason: "hard link without a target".into(),
                })?;
                self.hard_link(dir, &cname, path, &target)
            }
            EntryType::Char | EntryType::Block | EntryType::Fifo => {
                let file_type = match kind {
                    EntryType::Char => libc::S_IFCHR,
                    EntryType::Block => libc::S_IFBLK,
                    _ => libc::S_IFIFO,
                };
                let header = entry.header();
                let major = header.device_major().ok().flatten().unwrap_or(0);
                let minor = header.device_minor().ok().flatten().unwrap_or(0);
                self.replace_non_dir(dir, &cname, path)?;
                fsops::mknod_at(
                    dir,
                    &cname,
                    file_type | (meta.mode & 0o7777),
                    libc::makedev(major, minor),
                )
                .map_err(|e| io_err(path, "create device node", e))?;
                self.set_meta_by_name(dir, &name, &cname, path, &meta, true)
            }
            other => Err(LayerError::UnsupportedEntry {
                entry: path.to_string(),
                kind: format!("{other:?}"),
            }),
        }
    }

    /// Opens (creating if needed) the parent directory of `path`, refusing symlinked components.
    fn parent(
        &mut self,
        path: &EntryPath,
        parent_rel: &Path,
    ) -> Result<BorrowedParent, LayerError> {
        if let Some((cached, fd)) = &self.parent_cache {
            if cached == parent_rel {
                return Ok(BorrowedParent(
                    fsops::dup(fd.as_fd()).map_err(|e| io_err(path, "dup", e))?,
                ));
            }
        }
        let fd = fsops::ensure_dir_beneath(self.root.as_fd(), parent_rel).map_err(|e| {
            match e.raw_os_error() {
                Some(libc::ELOOP) | Some(libc::EXDEV) => LayerError::SymlinkEscape {
                    entry: path.to_string(),
                    parent: format!("/{}", parent_rel.display()),
                },
                Some(libc::ENOTDIR) => LayerError::NotADirectory {
                    entry: path.to_string(),
                    parent: format!("/{}", parent_rel.display()),
                },
                _ => io_err(path, "open the parent directory", e),
            }
        })?;
        let dup = fsops::dup(fd.as_fd()).map_err(|e| io_err(path, "dup", e))?;
        self.parent_cache = Some((parent_rel.to_path_buf(), fd));
        Ok(BorrowedParent(dup))
    }

    /// Charges one remembered path against the bookkeeping bound, so a layer of many long names
    /// cannot grow the applier's memory without limit.
    pub(super) fn remember(&mut self, path: &EntryPath) -> Result<(), LayerError> {
        self.remembered += path.as_path().as_os_str().len() as u64 + BOOKKEEPING_OVERHEAD;
        if self.remembered > self.limits.max_bookkeeping_bytes {
            return Err(LayerError::LimitExceeded {
                what: format!(
                    "per-path bookkeeping passed {} bytes at entry {path} (too many or too long names)",
                    self.limits.max_bookkeeping_bytes
                ),
            });
        }
        Ok(())
    }

    /// Drops cached state about `rel` and everything below it (it is being removed or replaced).
    pub(super) fn forget(&mut self, rel: &Path) {
        self.parent_cache = None;
        let doomed: Vec<PathBuf> = self
            .dir_times
            .range(rel.to_path_buf()..)
            .take_while(|(p, _)| p.starts_with(rel))
            .map(|(p, _)| p.clone())
            .collect();
        for p in doomed {
            self.dir_times.remove(&p);
        }
    }

    pub(super) fn replace_non_dir(
        &mut self,
        dir: BorrowedFd<'_>,
        name: &CString,
        path: &EntryPath,
    ) -> Result<(), LayerError> {
        match fsops::lstat_at(dir, name).map_err(|e| io_err(path, "stat", e))? {
            None => Ok(()),
            Some(st) => {
                if fsops::is_dir(&st) {
                    self.forget(path.as_path());
                }
                fsops::remove_at(dir, name)
                    .map_err(|e| io_err(path, "replace an existing entry", e))
            }
        }
    }

    /// Applies the deferred directory timestamps and returns the totals.
    pub fn finish(mut self) -> Result<StagingStats, LayerError> {
        let times = std::mem::take(&mut self.dir_times);
        for (rel, mtime) in times {
            let entry = format!("/{}", rel.display());
            if rel.as_os_str().is_empty() {
                fsops::set_times_fd(self.root.as_fd(), mtime).map_err(|e| LayerError::Io {
                    entry,
                    op: "set times",
                    source: e,
                })?;
                continue;
            }
            let (parent, name) = (
                rel.parent().unwrap_or(Path::new("")),
                rel.file_name().unwrap_or_default(),
            );
            let Ok(dir) = fsops::open_dir_beneath(self.root.as_fd(), parent) else {
                continue;
            };
            let cname = c_name(name).map_err(|source| LayerError::Io {
                entry: entry.clone(),
                op: "name",
                source,
            })?;
            match fsops::set_times_at(dir.as_fd(), &cname, mtime) {
                Err(e) if e.raw_os_error() != Some(libc::ENOENT) => {
                    return Err(LayerError::Io {
                        entry,
                        op: "set times",
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(self.stats)
    }
}

/// An owned duplicate of a cached directory descriptor (keeps the borrow checker out of `self`).
pub(super) struct BorrowedParent(OwnedFd);

impl BorrowedParent {
    pub(super) fn as_fd(&self) -> BorrowedFd<'_> {
        self.0.as_fd()
    }
}

pub(super) fn tar_error(e: io::Error, what: &str) -> LayerError {
    if let Some(bomb) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<BombError>())
    {
        return LayerError::LimitExceeded {
            what: format!("{bomb} (while trying to {what})"),
        };
    }
    if let Some(refused) = e
        .get_ref()
        .and_then(|inner| inner.downcast_ref::<HeaderRefused>())
    {
        return match refused {
            HeaderRefused::Sparse { entry, real_size } => LayerError::UnsupportedEntry {
                entry: format!("/{}", entry.trim_start_matches('/')),
                kind: format!(
                    "GNU sparse (declared size {real_size}): its holes would expand without bound, \
                     and Docker-built images never contain sparse members"
                ),
            },
            HeaderRefused::TooLarge { .. } => LayerError::LimitExceeded {
                what: refused.to_string(),
            },
        };
    }
    LayerError::Archive {
        what: what.to_string(),
        source: e,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tar(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn add(
        b: &mut tar::Builder<Vec<u8>>,
        path: &str,
        kind: EntryType,
        data: &[u8],
        link: Option<&str>,
    ) {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(data.len() as u64);
        h.set_mode(if kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        b.append_data(&mut h, path, data).unwrap();
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::new(dir.path(), Limits::default()).unwrap();
        s.apply(
            &tar(|b| {
                add(b, "a/old", EntryType::Regular, b"1", None);
                add(b, "a/sub/deep", EntryType::Regular, b"2", None);
                add(b, "gone", EntryType::Regular, b"3", None);
            })[..],
        )
        .unwrap();
        s.apply(
            &tar(|b| {
                add(b, "a/mine", EntryType::Regular, b"4", None);
                add(b, "a/.wh..wh..opq", EntryType::Regular, b"", None);
                add(b, ".wh.gone", EntryType::Regular, b"", None);
            })[..],
        )
        .unwrap();
        s.finish().unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path().join("a"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["mine"]);
        assert!(!dir.path().join("gone").exists());
    }

    #[test]
    fn replacing_kinds_and_hard_links() {
        let dir = tempfile::tempdir().unwrap();
        let mut s = Staging::new(dir.path(), Limits::default()).unwrap();
        s.apply(
            &tar(|b| {
                add(b, "x/", EntryType::Directory, b"", None);
                add(b, "x/inner", EntryType::Regular, b"in", None);
                add(b, "f", EntryType::Regular, b"data", None);
                add(b, "h", EntryType::Link, b"", Some("f"));
            })[..],
        )
        .unwrap();
        s.apply(&tar(|b| add(b, "x", EntryType::Regular, b"now a file", None))[..])
            .unwrap();
        s.finish().unwrap();
        assert_eq!(std::fs::read(dir.path().join("x")).unwrap(), b"now a file");
        use std::os::unix::fs::MetadataExt;
        let (f, h) = (
            dir.path().join("f").metadata().unwrap(),
            dir.path().join("h").metadata().unwrap(),
        );
        assert_eq!(f.ino(), h.ino());
        assert_eq!(
            dir.path().join("f").metadata().unwrap().mtime(),
            1_700_000_000
        );
    }

    #[test]
    fn symlinked_parent_is_refused_with_the_entry_name() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let mut s = Staging::new(dir.path(), Limits::default()).unwrap();
        let err = s
            .apply(
                &tar(|b| {
                    add(
                        b,
                        "l",
                        EntryType::Symlink,
                        b"",
                        Some(outside.path().to_str().unwrap()),
                    );
                    add(b, "l/file", EntryType::Regular, b"x", None);
                })[..],
            )
            .unwrap_err();
        assert!(
            matches!(&err, LayerError::SymlinkEscape { entry, .. } if entry == "/l/file"),
            "{err}"
        );
        assert!(std::fs::read_dir(outside.path()).unwrap().next().is_none());
    }
}
