//! `ImageStore::ensure`: resolve a reference (cache fast path first), fetch manifest and config,
//! build the root filesystem once per manifest (`build`), record the image in the index. Writes only
//! under `$HEARTH_HOME`.

use crate::index::{now, ImageIndex, ImageRecord};
use crate::lock::FileLock;
use crate::oci::{ConfigFile, ManifestOrIndex, Platform};
use crate::source::Source;
use crate::{ImageConfig, ImageError, ImageStore, PullOptions, PullPolicy, PulledImage, Reference};

impl ImageStore {
    /// Pulls `reference` (or reuses the cache) and makes sure its root filesystem exists, within
    /// `opts.deadline` (cancelling the pull, and removing its partial files, when it runs out).
    pub async fn ensure(
        &self,
        reference: &str,
        opts: &PullOptions,
    ) -> Result<PulledImage, ImageError> {
        match tokio::time::timeout(opts.deadline, self.ensure_unbounded(reference, opts)).await {
            Ok(result) => result,
            Err(_) => Err(ImageError::Deadline {
                reference: reference.chars().take(200).collect(),
                secs: opts.deadline.as_secs(),
            }),
        }
    }

    async fn ensure_unbounded(
        &self,
        reference: &str,
        opts: &PullOptions,
    ) -> Result<PulledImage, ImageError> {
        let reference = Reference::parse(reference)?;
        let key = reference.to_string();
        let platform = opts.platform.to_string();
        let store_lock = self.lock_store_shared().await?;
        let is_registry = matches!(reference, Reference::Registry(_));
        if is_registry && opts.policy == PullPolicy::IfMissing {
            if let Some(image) = self.cached(&reference, &opts.platform)? {
                return Ok(image);
            }
        }
        let source = Source::new(&reference, &opts.client_options()).await?;
        if let Some(current) = source.peek_digest().await? {
            let known = ImageIndex::load(&self.home)?
                .find(&key, &platform)
                .map(|r| r.resolved_digest.clone());
            if known.as_ref() == Some(&current) {
                if let Some(image) = self.cached(&reference, &opts.platform)? {
                    return Ok(image);
                }
            }
        }
        let progress = opts.progress.clone();
        let phase = |m: &str| progress.iter().for_each(|p| p.phase(m));
        phase(&format!("resolving {key}"));
        let top = source.top().await?;
        let resolved_digest = top.digest.clone();
        let fetched = match ManifestOrIndex::parse(&key, top.media_type.as_deref(), &top.body)? {
            ManifestOrIndex::Manifest(_) => top,
            ManifestOrIndex::Index(index) => {
                self.blobs.put(&top.digest, &top.body)?;
                let desc = opts.platform.choose(&key, &index)?;
                source.by_descriptor(desc).await?
            }
        };
        let manifest =
            match ManifestOrIndex::parse(&key, fetched.media_type.as_deref(), &fetched.body)? {
                ManifestOrIndex::Manifest(m) => m,
                ManifestOrIndex::Index(_) => {
                    return Err(ImageError::BadImage {
                        reference: key,
                        what: "index".into(),
                        detail: "nested index".into(),
                    })
                }
            };
        if manifest.layers.len() > opts.max_layers {
            return Err(ImageError::TooManyLayers {
                reference: key,
                count: manifest.layers.len(),
                limit: opts.max_layers,
            });
        }
        let manifest_digest = fetched.digest.clone();
        self.blobs.put(&manifest_digest, &fetched.body)?;
        let config_bytes = match self.blobs.read(&manifest.config.digest) {
            Ok(b) => b,
            Err(_) => {
                let b = source.small_blob(&manifest.config).await?;
                self.blobs.put(&manifest.config.digest, &b)?;
                b
            }
        };
        let config_file: ConfigFile =
            serde_json::from_slice(&config_bytes).map_err(|e| ImageError::BadImage {
                reference: key.clone(),
                what: "image config".into(),
                detail: e.to_string(),
            })?;
        check_platform(&key, &config_file, &opts.platform)?;
        let rootfs = self.home.rootfs_path(&manifest_digest);
        let cached = rootfs.exists();
        if !cached {
            self.build_rootfs(&key, &source, &manifest, &manifest_digest, opts)
                .await?;
        }
        let rootfs_size = std::fs::metadata(&rootfs)
            .map(|m| std::os::unix::fs::MetadataExt::blocks(&m) * 512)
            .unwrap_or(0);
        let record = ImageRecord {
            reference: key.clone(),
            platform: platform.clone(),
            resolved_digest,
            manifest_digest: manifest_digest.clone(),
            config_digest: manifest.config.digest.clone(),
            layers: manifest.layers.iter().map(|l| l.digest.clone()).collect(),
            blobs_size: fetched.body.len() as u64
                + manifest.config.size
                + manifest.layers.iter().map(|l| l.size).sum::<u64>(),
            rootfs_size,
            created: now(),
            last_used: now(),
        };
        ImageIndex::update(&self.home, |i| i.upsert(record))?;
        drop(store_lock);
        if let Some(budget) = opts.cache_budget {
            self.enforce_budget(budget, Some(&manifest_digest))?;
        }
        Ok(PulledImage {
            reference,
            platform: opts.platform.clone(),
            manifest_digest,
            rootfs,
            config: ImageConfig::from(&config_file),
            cached,
        })
    }

    /// The fast path: the index knows the reference and its root filesystem exists.
    fn cached(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Option<PulledImage>, ImageError> {
        let key = reference.to_string();
        let index = ImageIndex::load(&self.home)?;
        let Some(record) = index.find(&key, &platform.to_string()) else {
            return Ok(None);
        };
        let rootfs = self.home.rootfs_path(&record.manifest_digest);
        if !rootfs.exists() {
            return Ok(None);
        }
        let Ok(config_bytes) = self.blobs.read(&record.config_digest) else {
            return Ok(None);
        };
        let Ok(config) = serde_json::from_slice::<ConfigFile>(&config_bytes) else {
            return Ok(None);
        };
        let manifest_digest = record.manifest_digest.clone();
        let platform_key = platform.to_string();
        ImageIndex::update(&self.home, |i| {
            if let Some(r) = i
                .images
                .iter_mut()
                .find(|r| r.reference == key && r.platform == platform_key)
            {
                r.last_used = now();
            }
        })?;
        Ok(Some(PulledImage {
            reference: reference.clone(),
            platform: platform.clone(),
            manifest_digest,
            rootfs,
            config: ImageConfig::from(&config),
            cached: true,
        }))
    }

    pub(crate) async fn lock_store_shared(&self) -> Result<FileLock, ImageError> {
        let path = self.home.store_lock();
        tokio::task::spawn_blocking(move || {
            FileLock::shared(&path).map_err(|source| ImageError::Io {
                op: "lock",
                path,
                source,
            })
        })
        .await
        .map_err(|e| ImageError::Internal(e.to_string()))?
    }
}

fn check_platform(key: &str, config: &ConfigFile, wanted: &Platform) -> Result<(), ImageError> {
    if (!config.os.is_empty() && config.os != wanted.os)
        || (!config.architecture.is_empty() && config.architecture != wanted.architecture)
    {
        return Err(ImageError::BadImage {
            reference: key.to_string(),
            what: "platform".into(),
            detail: format!(
                "the image is {}/{}, but {wanted} was asked for (pass --platform)",
                config.os, config.architecture
            ),
        });
    }
    Ok(())
}
