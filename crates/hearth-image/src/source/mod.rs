//! Where image content comes from: a registry or an OCI layout (directory or archive). One interface
//! for the puller: resolve the top manifest, fetch manifests and configs by digest, stream layer
//! blobs into the store. Reads the network or the given layout; writes only through `BlobWriter`.

pub mod layout;

use std::sync::Arc;

use crate::digest::Digest;
use crate::oci::Descriptor;
use crate::reference::{Reference, RegistryRef};
use crate::registry::{ClientOptions, FetchedManifest, RegistryClient};
use crate::store::BlobWriter;
use crate::ImageError;
use layout::{Layout, LayoutError};

pub enum Source {
    Registry {
        client: Box<RegistryClient>,
        reference: RegistryRef,
    },
    Layout {
        layout: Arc<Layout>,
        tag: Option<String>,
    },
}

impl Source {
    pub async fn new(
        reference: &Reference,
        registry: &ClientOptions,
    ) -> Result<Source, ImageError> {
        Ok(match reference {
            Reference::Registry(r) => Source::Registry {
                client: Box::new(RegistryClient::new(r, registry)?),
                reference: r.clone(),
            },
            Reference::OciLayout { dir, tag } => Source::Layout {
                layout: Arc::new(Layout::dir(dir)),
                tag: tag.clone(),
            },
            Reference::OciArchive { file, tag } => {
                let file = file.clone();
                let layout = tokio::task::spawn_blocking(move || Layout::archive(&file))
                    .await
                    .map_err(|e| {
                        ImageError::Internal(format!("indexing the archive failed: {e}"))
                    })??;
                Source::Layout {
                    layout: Arc::new(layout),
                    tag: tag.clone(),
                }
            }
        })
    }

    /// The manifest (or index) the reference names.
    pub async fn top(&self) -> Result<FetchedManifest, ImageError> {
        match self {
            Source::Registry { client, reference } => {
                Ok(client.manifest(&reference.manifest_reference()).await?)
            }
            Source::Layout { layout, tag } => {
                let desc = layout.select(tag.as_deref())?;
                self.by_descriptor(&desc).await
            }
        }
    }

    /// The current digest of the reference when it can be had cheaply (a registry HEAD).
    pub async fn peek_digest(&self) -> Result<Option<Digest>, ImageError> {
        match self {
            Source::Registry { client, reference } => {
                if let Some(d) = &reference.digest {
                    return Ok(Some(d.clone()));
                }
                Ok(client
                    .head_manifest(&reference.manifest_reference())
                    .await?)
            }
            Source::Layout { .. } => Ok(None),
        }
    }

    /// A manifest named by a descriptor (from an index).
    pub async fn by_descriptor(&self, desc: &Descriptor) -> Result<FetchedManifest, ImageError> {
        match self {
            Source::Registry { client, .. } => {
                Ok(client.manifest(&desc.digest.to_string()).await?)
            }
            Source::Layout { layout, .. } => {
                let body = layout.read_blob(desc)?;
                Ok(FetchedManifest {
                    body,
                    media_type: Some(desc.media_type.clone()),
                    digest: desc.digest.clone(),
                })
            }
        }
    }

    /// A small blob (the image config), verified.
    pub async fn small_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, ImageError> {
        match self {
            Source::Registry { client, .. } => Ok(client.small_blob(&desc.digest).await?),
            Source::Layout { layout, .. } => Ok(layout.read_blob(desc)?),
        }
    }

    /// Streams a layer blob into `writer` and commits it (verifying size and digest).
    pub async fn blob_into(
        &self,
        desc: &Descriptor,
        writer: BlobWriter,
        on_bytes: &OnBytes,
    ) -> Result<(), ImageError> {
        match self {
            Source::Registry { client, .. } => {
                Ok(client.blob_into(writer, desc.size, &**on_bytes).await?)
            }
            // Read asynchronously so that cancelling the pull drops the writer (and its temp file) at once.
            Source::Layout { layout, .. } => {
                copy_layout_blob(layout, desc, writer, &**on_bytes).await
            }
        }
    }
}

/// Progress callback: called with each chunk's length.
pub type OnBytes = Arc<dyn Fn(u64) + Send + Sync>;

async fn copy_layout_blob(
    layout: &Layout,
    desc: &Descriptor,
    mut writer: BlobWriter,
    on_bytes: &(dyn Fn(u64) + Sync),
) -> Result<(), ImageError> {
    use tokio::io::AsyncReadExt;
    let corrupt = || LayoutError::Corrupt {
        layout: layout.path().to_path_buf(),
        digest: desc.digest.clone(),
    };
    let (mut reader, size) = layout.open_async(&Layout::blob_path(&desc.digest)).await?;
    if size != desc.size {
        writer.abandon(corrupt().to_string());
        return Err(corrupt().into());
    }
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(source) => {
                writer.abandon(source.to_string());
                let what = Layout::blob_path(&desc.digest);
                return Err(LayoutError::Io {
                    layout: layout.path().to_path_buf(),
                    what,
                    source,
                }
                .into());
            }
        };
        writer.write(&buf[..n])?;
        on_bytes(n as u64);
    }
    writer.commit()?;
    Ok(())
}
