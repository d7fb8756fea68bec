//! Cache management: list, inspect, remove, garbage-collect and enforce a size budget. Garbage
//! collection holds the store lock exclusively (so no pull is running) and deletes blobs and root
//! filesystems no index record uses, plus leftovers in `tmp/`. Touches only `$HEARTH_HOME`.

use std::collections::HashSet;
use std::fs;
use std::path::Path;

use serde::Serialize;

use crate::digest::Digest;
use crate::index::{ImageIndex, ImageRecord};
use crate::lock::FileLock;
use crate::reference::Reference;
use crate::{ImageError, ImageStore};

/// What garbage collection freed.
#[derive(Debug, Clone, Default, Serialize, PartialEq, Eq)]
pub struct GcReport {
    pub images_evicted: Vec<String>,
    pub blobs_removed: usize,
    pub rootfs_removed: usize,
    pub bytes_freed: u64,
}

/// `hearth image inspect`: the record plus the stored manifest and config.
#[derive(Debug, Clone, Serialize)]
pub struct ImageDetails {
    #[serde(flatten)]
    pub record: ImageRecord,
    pub rootfs: String,
    pub manifest: serde_json::Value,
    pub config: serde_json::Value,
}

impl ImageStore {
    /// Cached images, most recently used first.
    pub fn list(&self) -> Result<Vec<ImageRecord>, ImageError> {
        let mut images = ImageIndex::load(&self.home)?.images;
        images.sort_by(|a, b| {
            b.last_used
                .cmp(&a.last_used)
                .then(a.reference.cmp(&b.reference))
        });
        Ok(images)
    }

    /// Records matching `query`: a reference (normalised, any platform) or a manifest digest or
    /// a prefix of at least 12 hex digits of one.
    pub fn find(&self, query: &str) -> Result<Vec<ImageRecord>, ImageError> {
        let normalised = Reference::parse(query).ok().map(|r| r.to_string());
        let hex = query.strip_prefix("sha256:").unwrap_or(query);
        let by_digest = hex.len() >= 12 && hex.bytes().all(|b| b.is_ascii_hexdigit());
        Ok(self
            .list()?
            .into_iter()
            .filter(|r| {
                Some(&r.reference) == normalised.as_ref()
                    || (by_digest && r.manifest_digest.hex().starts_with(hex))
            })
            .collect())
    }

    pub fn inspect(&self, query: &str) -> Result<Vec<ImageDetails>, ImageError> {
        let records = self.find(query)?;
        if records.is_empty() {
            return Err(ImageError::NotCached(query.to_string()));
        }
        records
            .into_iter()
            .map(|record| {
                let manifest = serde_json::from_slice(&self.blobs.read(&record.manifest_digest)?)
                    .unwrap_or_default();
                let config = serde_json::from_slice(&self.blobs.read(&record.config_digest)?)
                    .unwrap_or_default();
                let rootfs = self
                    .home
                    .rootfs_path(&record.manifest_digest)
                    .display()
                    .to_string();
                Ok(ImageDetails {
                    record,
                    rootfs,
                    manifest,
                    config,
                })
            })
            .collect()
    }

    /// Removes the images matching `query` from the index, then collects what nothing else uses.
    pub fn remove(&self, query: &str) -> Result<(Vec<ImageRecord>, GcReport), ImageError> {
        let doomed = self.find(query)?;
        if doomed.is_empty() {
            return Err(ImageError::NotCached(query.to_string()));
        }
        let _lock = self.lock_store_exclusive()?;
        ImageIndex::update(&self.home, |i| i.images.retain(|r| !doomed.contains(r)))?;
        let report = self.collect_garbage()?;
        Ok((doomed, report))
    }

    /// Deletes unreferenced blobs and root filesystems and stale temp files (waits for running pulls).
    pub fn gc(&self) -> Result<GcReport, ImageError> {
        let _lock = self.lock_store_exclusive()?;
        self.collect_garbage()
    }

    /// Evicts least-recently-used images (never `keep`) until the cache fits in `budget` bytes.
    /// Skipped (returns an empty report) when another pull holds the store.
    pub fn enforce_budget(
        &self,
        budget: u64,
        keep: Option<&Digest>,
    ) -> Result<GcReport, ImageError> {
        let path = self.home.store_lock();
        let Some(_lock) = FileLock::try_exclusive(&path).map_err(|source| ImageError::Io {
            op: "lock",
            path,
            source,
        })?
        else {
            return Ok(GcReport::default());
        };
        let mut images = ImageIndex::load(&self.home)?.images;
        let total = self.disk_usage(&images);
        if total <= budget {
            return Ok(GcReport::default());
        }
        images.sort_by_key(|r| r.last_used);
        let mut evicted = Vec::new();
        let mut remaining = images.clone();
        for record in &images {
            if self.disk_usage(&remaining) <= budget {
                break;
            }
            if Some(&record.manifest_digest) == keep {
                continue;
            }
            remaining.retain(|r| r != record);
            evicted.push(record.clone());
        }
        ImageIndex::update(&self.home, |i| i.images.retain(|r| !evicted.contains(r)))?;
        let mut report = self.collect_garbage()?;
        report.images_evicted = evicted
            .iter()
            .map(|r| format!("{} ({})", r.reference, r.platform))
            .collect();
        Ok(report)
    }

    /// Bytes the given images occupy together (shared blobs counted once).
    fn disk_usage(&self, images: &[ImageRecord]) -> u64 {
        let blobs: HashSet<&Digest> = images.iter().flat_map(|r| r.blobs()).collect();
        let rootfs: HashSet<&Digest> = images.iter().map(|r| &r.manifest_digest).collect();
        blobs
            .iter()
            .map(|d| allocated(&self.blobs.path(d)))
            .sum::<u64>()
            + rootfs
                .iter()
                .map(|d| allocated(&self.home.rootfs_path(d)))
                .sum::<u64>()
    }

    fn lock_store_exclusive(&self) -> Result<FileLock, ImageError> {
        let path = self.home.store_lock();
        FileLock::exclusive(&path).map_err(|source| ImageError::Io {
            op: "lock",
            path,
            source,
        })
    }

    /// Callers hold the store lock exclusively.
    fn collect_garbage(&self) -> Result<GcReport, ImageError> {
        let index = ImageIndex::load(&self.home)?;
        let mut live_blobs: HashSet<Digest> = index
            .images
            .iter()
            .flat_map(|r| r.blobs().cloned())
            .collect();
        // Index blobs (multi-platform) are kept while any platform of that reference is cached.
        live_blobs.extend(index.images.iter().map(|r| r.resolved_digest.clone()));
        let live_rootfs: HashSet<String> = index
            .images
            .iter()
            .map(|r| format!("{}.ext4", r.manifest_digest.hex()))
            .collect();
        let mut report = GcReport::default();
        for digest in self.blobs.list()? {
            if !live_blobs.contains(&digest) {
                report.bytes_freed += allocated(&self.blobs.path(&digest));
                self.blobs.remove(&digest)?;
                report.blobs_removed += 1;
            }
        }
        self.blobs.remove_stale_temps()?;
        let rootfs_dir = self.home.rootfs_dir();
        let io = |op, path: &Path| {
            let path = path.to_path_buf();
            move |source| ImageError::Io { op, path, source }
        };
        for entry in fs::read_dir(&rootfs_dir).map_err(io("list", &rootfs_dir))? {
            let entry = entry.map_err(io("list", &rootfs_dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !live_rootfs.contains(&name) {
                report.bytes_freed += allocated(&entry.path());
                fs::remove_file(entry.path()).map_err(io("remove", &entry.path()))?;
                report.rootfs_removed += 1;
            }
        }
        let tmp = self.home.tmp_dir();
        for entry in fs::read_dir(&tmp).map_err(io("list", &tmp))? {
            let entry = entry.map_err(io("list", &tmp))?;
            let path = entry.path();
            let _ = if path.is_dir() {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
        }
        Ok(report)
    }
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}
