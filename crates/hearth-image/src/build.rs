//! Building a root filesystem for one manifest: layer blobs download concurrently while one thread
//! applies them in order, each as soon as its bytes arrive (a `BlobFollower` never yields unverified
//! end-of-file); then the staged tree becomes `rootfs/<manifest>.ext4`. Both steps run in a
//! private mount namespace that sees the build directory `nosuid,nodev,noexec` (`private_mounts`).
//! Writes only under `$HEARTH_HOME` (blobs, tmp, rootfs), keeping those directories 0700.

mod dir;

pub(crate) use dir::sweep_abandoned_builds;

use std::fs::File;
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use futures::{StreamExt, TryStreamExt};

use crate::digest::Digest;
use crate::layer::{decompressor, ReadAhead, Staging, StagingStats};
use crate::lock::FileLock;
use crate::oci::{Compression, Manifest};
use crate::private_mounts;
use crate::source::{OnBytes, Source};
use crate::store::{private_dir, BlobFollower, VerifyingReader};
use crate::{ImageError, ImageStore, Limits, Progress, PullOptions};
use dir::BuildDir;

/// A layer for the applier: already stored, or arriving.
enum LayerBytes {
    Stored(PathBuf),
    Arriving(BlobFollower),
}

struct LayerInput {
    digest: Digest,
    compression: Compression,
    bytes: LayerBytes,
}

impl ImageStore {
    pub(crate) async fn build_rootfs(
        &self,
        key: &str,
        source: &Source,
        manifest: &Manifest,
        digest: &Digest,
        opts: &PullOptions,
    ) -> Result<(), ImageError> {
        let lock_path = self.home.build_lock(digest);
        let _build = tokio::task::spawn_blocking(move || {
            FileLock::exclusive(&lock_path).map_err(|source| ImageError::Io {
                op: "lock",
                path: lock_path,
                source,
            })
        })
        .await
        .map_err(|e| ImageError::Internal(e.to_string()))??;
        let rootfs = self.home.rootfs_path(digest);
        if rootfs.exists() {
            return Ok(()); // a concurrent pull built it while we waited
        }
        // The staging tree below tmp/ holds the image's setuid files and device nodes while it is
        // built: tmp/ and each build-* directory (both 0700) keep every other host user from
        // reaching them. rootfs/ and locks/ are owner-only too.
        for dir in [
            self.home.tmp_dir(),
            self.home.rootfs_dir(),
            self.home.locks_dir(),
        ] {
            private_dir(&dir).map_err(|source| ImageError::Io {
                op: "make private",
                path: dir.clone(),
                source,
            })?;
        }
        let tmp = BuildDir::create(&self.home.tmp_dir())?;
        let staging_dir = tmp.path().join("root");
        std::fs::create_dir(&staging_dir).map_err(|source| ImageError::Io {
            op: "create",
            path: staging_dir.clone(),
            source,
        })?;

        let mut inputs = Vec::new();
        let mut downloads = Vec::new();
        for desc in &manifest.layers {
            let compression = Compression::of_layer(desc)?;
            let stored = self.blobs.contains(&desc.digest);
            opts.progress
                .iter()
                .for_each(|p| p.layer_start(&desc.digest, desc.size, stored));
            let bytes = if stored {
                LayerBytes::Stored(self.blobs.path(&desc.digest))
            } else {
                let writer = self.blobs.writer(&desc.digest, desc.size)?;
                let follower = writer.follower()?;
                downloads.push((desc.clone(), writer));
                LayerBytes::Arriving(follower)
            };
            inputs.push(LayerInput {
                digest: desc.digest.clone(),
                compression,
                bytes,
            });
        }

        let cancel = Arc::new(tokio::sync::Notify::new());
        let applier = {
            let (staging_dir, limits, progress, key, cancel) = (
                staging_dir.clone(),
                opts.limits,
                opts.progress.clone(),
                key.to_string(),
                cancel.clone(),
            );
            let (tree, worker) = (tmp.path().to_path_buf(), tmp.worker());
            private_mounts::run_confined("hearth-apply", tree, move || {
                let _worker = worker;
                let result = apply_layers(&key, &staging_dir, inputs, limits, progress.as_deref());
                if result.is_err() {
                    cancel.notify_one();
                }
                result
            })
            .map_err(|source| ImageError::Io {
                op: "start the layer applier for",
                path: tmp.path().to_path_buf(),
                source,
            })?
        };
        let download_all = futures::stream::iter(downloads)
            .map(|(desc, writer)| {
                let progress = opts.progress.clone();
                let digest = desc.digest.clone();
                let on_bytes: OnBytes =
                    Arc::new(move |n| progress.iter().for_each(|p| p.layer_bytes(&digest, n)));
                async move { source.blob_into(&desc, writer, &on_bytes).await }
            })
            .buffer_unordered(opts.max_concurrent_downloads.max(1))
            .try_collect::<Vec<()>>();
        let downloads = async {
            tokio::select! {
                r = download_all => Some(r),
                _ = cancel.notified() => None,
            }
        };
        let started = std::time::Instant::now();
        let (applied, downloaded) = tokio::join!(applier, downloads);
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "layers downloaded and applied"
        );
        if let Some(Err(e)) = downloaded {
            return Err(e); // explains any failure the applier saw on the same blob
        }
        let stats =
            applied.ok_or_else(|| ImageError::Internal("layer application panicked".into()))??;

        opts.progress
            .iter()
            .for_each(|p| p.phase("building root filesystem"));
        let image = tmp.path().join("rootfs.ext4");
        let imager = self.imager.clone();
        let (staging, image_path) = (staging_dir.clone(), image.clone());
        let (tree, worker) = (tmp.path().to_path_buf(), tmp.worker());
        private_mounts::run_confined("hearth-mkfs", tree, move || {
            let _worker = worker;
            imager.build(&staging, &stats, &image_path)
        })
        .map_err(|source| ImageError::Io {
            op: "start the filesystem builder for",
            path: tmp.path().to_path_buf(),
            source,
        })?
        .await
        .ok_or_else(|| ImageError::Internal("mkfs panicked".into()))?
        .map_err(|source| ImageError::Rootfs {
            reference: key.to_string(),
            source: Box::new(source),
        })?;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "filesystem image built"
        );
        // 0644 inside the 0700 rootfs/ directory: no other host user can reach it by path, while the
        // Firecracker jailer's unprivileged uid opens it through the hard link in its chroot (a hard
        // link bypasses directory permissions, so the file mode alone decides).
        std::fs::set_permissions(&image, std::fs::Permissions::from_mode(0o644)).map_err(
            |source| ImageError::Io {
                op: "set the mode of",
                path: image.clone(),
                source,
            },
        )?;
        std::fs::rename(&image, &rootfs).map_err(|source| ImageError::Io {
            op: "move into place",
            path: rootfs.clone(),
            source,
        })?;
        tmp.remove().await;
        tracing::debug!(
            elapsed_ms = started.elapsed().as_millis() as u64,
            "build directory removed"
        );
        Ok(())
    }
}

fn apply_layers(
    key: &str,
    staging_dir: &Path,
    inputs: Vec<LayerInput>,
    limits: Limits,
    progress: Option<&dyn Progress>,
) -> Result<StagingStats, ImageError> {
    let layer_err = |index: usize, digest: &Digest| {
        let (reference, digest) = (key.to_string(), digest.clone());
        move |source| ImageError::Layer {
            reference,
            index,
            digest,
            source: Box::new(source),
        }
    };
    let tree_err = |source| ImageError::Tree {
        reference: key.to_string(),
        source: Box::new(source),
    };
    let mut staging = Staging::new(staging_dir, limits).map_err(tree_err)?;
    for (index, input) in inputs.into_iter().enumerate() {
        let digest = input.digest;
        let raw: Box<dyn std::io::Read + Send> = match input.bytes {
            LayerBytes::Stored(path) => {
                let file = File::open(&path).map_err(|source| ImageError::Io {
                    op: "open",
                    path,
                    source,
                })?;
                Box::new(VerifyingReader::new(file, digest.clone()))
            }
            LayerBytes::Arriving(follower) => Box::new(follower),
        };
        let decoded = decompressor(input.compression, BufReader::with_capacity(1 << 20, raw))
            .map_err(|source| ImageError::Layer {
                reference: key.to_string(),
                index,
                digest: digest.clone(),
                source: Box::new(crate::layer::LayerError::Archive {
                    what: "start decompressing".into(),
                    source,
                }),
            })?;
        // Decompression runs on its own thread, overlapping with file creation here.
        let decoded = ReadAhead::new(decoded).map_err(|source| ImageError::Io {
            op: "start a read-ahead thread for",
            path: staging_dir.into(),
            source,
        })?;
        staging.apply(decoded).map_err(layer_err(index, &digest))?;
        progress.iter().for_each(|p| p.layer_done(&digest));
    }
    staging.finish().map_err(tree_err)
}
