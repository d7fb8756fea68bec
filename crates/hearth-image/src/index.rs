//! The image index (`$HEARTH_HOME/images.json`): which references resolved to which manifest, what
//! blobs each image uses, sizes and last-use times. Written atomically (temp file + rename) under the
//! index lock; read without it. Touches only the index file, its temp files and its lock.

use std::fs;
use std::io;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::digest::Digest;
use crate::home::Home;
use crate::lock::FileLock;

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("cannot {op} the image index {path}: {source}")]
    Io {
        op: &'static str,
        path: String,
        source: io::Error,
    },
    #[error("the image index {path} is corrupt ({source}); remove it and pull again")]
    Corrupt {
        path: String,
        source: serde_json::Error,
    },
}

/// One cached image: a reference (for one platform) and what it resolved to.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ImageRecord {
    pub reference: String,
    pub platform: String,
    /// What the reference pointed at (an index or the manifest itself).
    pub resolved_digest: Digest,
    pub manifest_digest: Digest,
    pub config_digest: Digest,
    pub layers: Vec<Digest>,
    /// Bytes of manifest, config and layer blobs.
    pub blobs_size: u64,
    /// Bytes the root filesystem image occupies on disk (it is sparse).
    pub rootfs_size: u64,
    /// Unix seconds.
    pub created: u64,
    pub last_used: u64,
}

impl ImageRecord {
    pub fn size(&self) -> u64 {
        self.blobs_size + self.rootfs_size
    }

    /// Every blob this image keeps alive.
    pub fn blobs(&self) -> impl Iterator<Item = &Digest> {
        [&self.manifest_digest, &self.config_digest]
            .into_iter()
            .chain(self.layers.iter())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ImageIndex {
    pub images: Vec<ImageRecord>,
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl ImageIndex {
    pub fn load(home: &Home) -> Result<ImageIndex, IndexError> {
        let path = home.index_path();
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| IndexError::Corrupt {
                path: path.display().to_string(),
                source,
            }),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(ImageIndex::default()),
            Err(source) => Err(IndexError::Io {
                op: "read",
                path: path.display().to_string(),
                source,
            }),
        }
    }

    pub fn find(&self, reference: &str, platform: &str) -> Option<&ImageRecord> {
        self.images
            .iter()
            .find(|r| r.reference == reference && r.platform == platform)
    }

    /// Loads the index, lets `change` edit it and writes it back, all under the index lock.
    pub fn update<T>(
        home: &Home,
        change: impl FnOnce(&mut ImageIndex) -> T,
    ) -> Result<T, IndexError> {
        let lock_path = home.index_lock();
        let _lock = FileLock::exclusive(&lock_path).map_err(|source| IndexError::Io {
            op: "lock",
            path: lock_path.display().to_string(),
            source,
        })?;
        let mut index = ImageIndex::load(home)?;
        let out = change(&mut index);
        index.save(&home.index_path())?;
        Ok(out)
    }

    fn save(&self, path: &Path) -> Result<(), IndexError> {
        let io_err = |op| {
            move |source| IndexError::Io {
                op,
                path: path.display().to_string(),
                source,
            }
        };
        let dir = path.parent().unwrap_or(Path::new("."));
        let mut tmp = tempfile::Builder::new()
            .prefix(".images.json.")
            .tempfile_in(dir)
            .map_err(io_err("write"))?;
        // The index names every image this host pulled: owner-only, like the rest of the store.
        use std::os::unix::fs::PermissionsExt;
        tmp.as_file()
            .set_permissions(std::fs::Permissions::from_mode(0o600))
            .map_err(io_err("write"))?;
        serde_json::to_writer_pretty(&mut tmp, self).map_err(|e| io_err("write")(e.into()))?;
        tmp.persist(path).map_err(|e| io_err("replace")(e.error))?;
        Ok(())
    }

    /// Inserts or replaces the record for (reference, platform).
    pub fn upsert(&mut self, record: ImageRecord) {
        match self
            .images
            .iter_mut()
            .find(|r| r.reference == record.reference && r.platform == record.platform)
        {
            Some(existing) => {
                let created = existing.created;
                *existing = ImageRecord { created, ..record };
            }
            None => self.images.push(record),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(reference: &str, n: u8) -> ImageRecord {
        ImageRecord {
            reference: reference.into(),
            platform: "linux/amd64".into(),
            resolved_digest: Digest::of(&[n]),
            manifest_digest: Digest::of(&[n]),
            config_digest: Digest::of(&[n, 1]),
            layers: vec![Digest::of(&[n, 2])],
            blobs_size: 10,
            rootfs_size: 20,
            created: 1,
            last_used: 2,
        }
    }

    #[test]
    fn update_round_trips_and_upsert_replaces() {
        let dir = tempfile::tempdir().unwrap();
        let home = Home::open(dir.path()).unwrap();
        ImageIndex::update(&home, |i| i.upsert(record("a", 1))).unwrap();
        ImageIndex::update(&home, |i| i.upsert(record("a", 2))).unwrap();
        ImageIndex::update(&home, |i| i.upsert(record("b", 3))).unwrap();
        let index = ImageIndex::load(&home).unwrap();
        assert_eq!(index.images.len(), 2);
        assert_eq!(
            index.find("a", "linux/amd64").unwrap().manifest_digest,
            Digest::of(&[2])
        );
        assert_eq!(index.find("a", "linux/amd64").unwrap().size(), 30);
    }
}
