//! The content-addressed blob store (`$HEARTH_HOME/blobs/sha256/<hex>`). Blobs are written to a temp file
//! in the same directory, hashed as they stream, and renamed into place only after size and digest
//! match, so a reader never sees a partial or corrupt blob. A `BlobFollower` lets the layer applier
//! read a blob while it is still downloading; it reports end-of-file only once the digest checked out.
//! Touches only `blobs/` below the home directory.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};

use crate::digest::{Digest, Hasher};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("blob {digest} failed verification: expected {expected_size} bytes with that digest, got {actual_size} bytes with digest {actual}; the corrupt data was discarded (retry the pull; if it persists the registry serves bad content)")]
    DigestMismatch {
        digest: Digest,
        expected_size: u64,
        actual_size: u64,
        actual: Digest,
    },
    #[error("blob {digest} is larger than the {expected} bytes its descriptor declares; the data was discarded")]
    TooLarge { digest: Digest, expected: u64 },
    #[error("blob {digest} is not in the store at {path}")]
    Missing { digest: Digest, path: PathBuf },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// Creates `dir` (and missing parents) and makes it 0700: what lies below `$HEARTH_HOME` (blobs of
/// possibly private images, root filesystems, build trees holding the images' setuid files and
/// device nodes) is reachable by its owner only.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)?;
    if fs::metadata(dir)?.permissions().mode() & 0o777 != 0o700 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
pub struct BlobStore {
    dir: PathBuf,
}

impl BlobStore {
    pub fn open(home: &Path) -> Result<BlobStore, StoreError> {
        let dir = home.join("blobs").join("sha256");
        for d in [home.join("blobs"), dir.clone()] {
            private_dir(&d).map_err(io_err("create", &d))?;
        }
        Ok(BlobStore { dir })
    }

    pub fn path(&self, digest: &Digest) -> PathBuf {
        self.dir.join(digest.hex())
    }

    pub fn contains(&self, digest: &Digest) -> bool {
        self.path(digest).is_file()
    }

    /// Reads a small blob (manifest, config) and checks it against its digest.
    pub fn read(&self, digest: &Digest) -> Result<Vec<u8>, StoreError> {
        let path = self.path(digest);
        let data = match fs::read(&path) {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(StoreError::Missing {
                    digest: digest.clone(),
                    path,
                })
            }
            other => other.map_err(io_err("read", &path))?,
        };
        let actual = Digest::of(&data);
        if &actual != digest {
            let _ = fs::remove_file(&path);
            return Err(StoreError::DigestMismatch {
                digest: digest.clone(),
                expected_size: data.len() as u64,
                actual_size: data.len() as u64,
                actual,
            });
        }
        Ok(data)
    }

    /// Stores `data` under `digest` after checking it.
    pub fn put(&self, digest: &Digest, data: &[u8]) -> Result<PathBuf, StoreError> {
        let mut writer = self.writer(digest, data.len() as u64)?;
        writer.write(data)?;
        writer.commit()
    }

    /// Starts writing blob `digest` of `size` bytes.
    pub fn writer(&self, digest: &Digest, size: u64) -> Result<BlobWriter, StoreError> {
        let tmp = tempfile::Builder::new()
            .prefix(&format!(".tmp-{}-", digest.short()))
            .tempfile_in(&self.dir)
            .map_err(io_err("create a temp file in", &self.dir))?;
        Ok(BlobWriter {
            tmp: Some(tmp),
            final_path: self.path(digest),
            digest: digest.clone(),
            size,
            hasher: Hasher::default(),
            shared: Arc::new(Shared::default()),
        })
    }

    /// Every blob digest in the store.
    pub fn list(&self) -> Result<Vec<Digest>, StoreError> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            if let Some(d) = entry
                .file_name()
                .to_str()
                .and_then(|n| Digest::from_hex(n).ok())
            {
                out.push(d);
            }
        }
        Ok(out)
    }

    pub fn remove(&self, digest: &Digest) -> Result<(), StoreError> {
        let path = self.path(digest);
        match fs::remove_file(&path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(io_err("remove", &path)(e)),
            _ => Ok(()),
        }
    }

    /// Removes temp files left by crashed writers (callers hold the store's exclusive lock).
    pub fn remove_stale_temps(&self) -> Result<(), StoreError> {
        for entry in fs::read_dir(&self.dir).map_err(io_err("list", &self.dir))? {
            let entry = entry.map_err(io_err("list", &self.dir))?;
            if entry.file_name().to_string_lossy().starts_with(".tmp-") {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }
}

#[derive(Default)]
struct Shared {
    state: Mutex<Progress>,
    changed: Condvar,
}

#[derive(Default)]
struct Progress {
    written: u64,
    outcome: Option<Result<(), String>>,
}

/// An in-progress blob write. Dropping it without `commit` deletes the temp file and tells followers.
pub struct BlobWriter {
    tmp: Option<tempfile::NamedTempFile>,
    final_path: PathBuf,
    digest: Digest,
    size: u64,
    hasher: Hasher,
    shared: Arc<Shared>,
}

impl BlobWriter {
    pub fn digest(&self) -> &Digest {
        &self.digest
    }

    /// Bytes written so far (where a resumed download continues).
    pub fn written(&self) -> u64 {
        self.hasher.len()
    }

    pub fn write(&mut self, chunk: &[u8]) -> Result<(), StoreError> {
        if self.hasher.len() + chunk.len() as u64 > self.size {
            return Err(StoreError::TooLarge {
                digest: self.digest.clone(),
                expected: self.size,
            });
        }
        let tmp = self.tmp.as_mut().expect("writer used after commit");
        tmp.as_file_mut()
            .write_all(chunk)
            .map_err(io_err("write", &self.final_path))?;
        self.hasher.update(chunk);
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        state.written = self.hasher.len();
        self.shared.changed.notify_all();
        Ok(())
    }

    /// Opens a reader that follows this blob as it is written.
    pub fn follower(&self) -> Result<BlobFollower, StoreError> {
        let tmp = self.tmp.as_ref().expect("writer used after commit");
        let file = File::open(tmp.path()).map_err(io_err("open", tmp.path()))?;
        Ok(BlobFollower {
            file,
            pos: 0,
            shared: self.shared.clone(),
        })
    }

    /// Checks size and digest and moves the blob into place.
    pub fn commit(mut self) -> Result<PathBuf, StoreError> {
        let actual = std::mem::take(&mut self.hasher);
        let actual_size = actual.len();
        let actual = actual.finish();
        if actual_size != self.size || actual != self.digest {
            let err = StoreError::DigestMismatch {
                digest: self.digest.clone(),
                expected_size: self.size,
                actual_size,
                actual,
            };
            self.finish(Err(err.to_string()));
            return Err(err);
        }
        let tmp = self.tmp.take().expect("writer used after commit");
        tmp.persist(&self.final_path)
            .map_err(|e| io_err("rename into place", &self.final_path)(e.error))?;
        self.finish(Ok(()));
        Ok(self.final_path.clone())
    }

    fn finish(&self, outcome: Result<(), String>) {
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if state.outcome.is_none() {
            state.outcome = Some(outcome);
        }
        self.shared.changed.notify_all();
    }

    /// Records why the write was abandoned, for followers to report.
    pub fn abandon(self, reason: String) {
        self.finish(Err(reason));
    }
}

impl Drop for BlobWriter {
    fn drop(&mut self) {
        self.finish(Err(format!("download of {} was abandoned", self.digest)));
    }
}

/// Reads a blob while its `BlobWriter` is still writing; end-of-file only after a verified commit,
/// an error if the write failed.
pub struct BlobFollower {
    file: File,
    pos: u64,
    shared: Arc<Shared>,
}

impl Read for BlobFollower {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        let mut state = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if self.pos < state.written {
                let available = (state.written - self.pos).min(buf.len() as u64) as usize;
                drop(state);
                let n = self.file.read_at(&mut buf[..available], self.pos)?;
                self.pos += n as u64;
                return Ok(n);
            }
            match &state.outcome {
                Some(Ok(())) => return Ok(0),
                Some(Err(reason)) => return Err(io::Error::other(reason.clone())),
                None => {
                    state = self
                        .shared
                        .changed
                        .wait(state)
                        .unwrap_or_else(|p| p.into_inner())
                }
            }
        }
    }
}

/// Reads a stored blob and fails at the end if its content no longer matches the digest.
pub struct VerifyingReader<R> {
    inner: R,
    hasher: Hasher,
    digest: Digest,
}

impl<R: Read> VerifyingReader<R> {
    pub fn new(inner: R, digest: Digest) -> Self {
        VerifyingReader {
            inner,
            hasher: Hasher::default(),
            digest,
        }
    }
}

impl<R: Read> Read for VerifyingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n == 0 && !buf.is_empty() {
            let actual = self.hasher.clone().finish();
            if actual != self.digest {
                return Err(io::Error::other(format!(
                    "stored blob {} is corrupt (its content hashes to {actual}); run `hearth rmi` on the image and pull again",
                    self.digest
                )));
            }
        }
        self.hasher.update(&buf[..n]);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mismatch_leaves_no_blob_and_fails_followers() {
        let home = tempfile::tempdir().unwrap();
        let store = BlobStore::open(home.path()).unwrap();
        let digest = Digest::of(b"good");
        let mut w = store.writer(&digest, 4).unwrap();
        let mut follower = w.follower().unwrap();
        w.write(b"evil").unwrap();
        let err = w.commit().unwrap_err();
        assert!(matches!(err, StoreError::DigestMismatch { .. }), "{err}");
        assert!(!store.contains(&digest));
        assert_eq!(
            fs::read_dir(home.path().join("blobs/sha256"))
                .unwrap()
                .count(),
            0
        );
        let mut out = Vec::new();
        assert!(follower.read_to_end(&mut out).is_err());
    }

    #[test]
    fn follower_sees_all_bytes_then_eof_after_commit() {
        let home = tempfile::tempdir().unwrap();
        let store = BlobStore::open(home.path()).unwrap();
        let data = vec![7u8; 100_000];
        let digest = Digest::of(&data);
        let mut w = store.writer(&digest, data.len() as u64).unwrap();
        let mut follower = w.follower().unwrap();
        let reader = std::thread::spawn(move || {
            let mut out = Vec::new();
            follower.read_to_end(&mut out).map(|_| out)
        });
        for chunk in data.chunks(7000) {
            w.write(chunk).unwrap();
        }
        w.commit().unwrap();
        assert_eq!(reader.join().unwrap().unwrap(), data);
        assert_eq!(store.read(&digest).unwrap(), data);
    }

    #[test]
    fn oversize_and_truncation_are_refused() {
        let home = tempfile::tempdir().unwrap();
        let store = BlobStore::open(home.path()).unwrap();
        let digest = Digest::of(b"abc");
        let mut w = store.writer(&digest, 2).unwrap();
        assert!(matches!(w.write(b"abc"), Err(StoreError::TooLarge { .. })));
        let w = store.writer(&digest, 3).unwrap();
        assert!(w.commit().is_err());
        assert!(!store.contains(&digest));
    }
}
