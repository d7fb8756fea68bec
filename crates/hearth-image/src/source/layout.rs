//! Offline image sources: an OCI image layout directory (`oci-layout:DIR[:TAG]`) or a tar archive of
//! one (`oci-archive:FILE[:TAG]`, read in place by entry offsets, never extracted). Reads only the
//! given directory or file.

use std::collections::HashMap;
use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use crate::digest::Digest;
use crate::oci::{Descriptor, Index};

#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    #[error("cannot read {what} in OCI layout {layout}: {source}")]
    Io {
        layout: PathBuf,
        what: String,
        source: io::Error,
    },
    #[error("OCI layout {layout} has no {what}")]
    Missing { layout: PathBuf, what: String },
    #[error("OCI layout {layout}: index.json is not valid: {source}")]
    BadIndex {
        layout: PathBuf,
        source: serde_json::Error,
    },
    #[error("OCI layout {layout} has no image tagged {tag:?}; tags present: {available}")]
    NoSuchTag {
        layout: PathBuf,
        tag: String,
        available: String,
    },
    #[error("OCI layout {layout} holds several images ({available}); name one with :TAG")]
    Ambiguous { layout: PathBuf, available: String },
    #[error("blob {digest} in OCI layout {layout} does not match its digest (or size)")]
    Corrupt { layout: PathBuf, digest: Digest },
}

const REF_NAME: &str = "org.opencontainers.image.ref.name";

/// Where the layout's files live.
enum Files {
    Dir(PathBuf),
    /// path inside the archive -> (offset of the data, size).
    Archive {
        file: PathBuf,
        entries: HashMap<String, (u64, u64)>,
    },
}

pub struct Layout {
    files: Files,
    display: PathBuf,
}

impl Layout {
    pub fn dir(path: &Path) -> Layout {
        Layout {
            files: Files::Dir(path.to_path_buf()),
            display: path.to_path_buf(),
        }
    }

    /// Indexes the archive's entries (one pass over the headers; data is skipped, not read).
    pub fn archive(path: &Path) -> Result<Layout, LayoutError> {
        let io_err = |source| LayoutError::Io {
            layout: path.to_path_buf(),
            what: "the archive".into(),
            source,
        };
        let mut archive = tar::Archive::new(File::open(path).map_err(io_err)?);
        let mut entries = HashMap::new();
        for entry in archive.entries().map_err(io_err)? {
            let entry = entry.map_err(io_err)?;
            if entry.header().entry_type().is_file() {
                let name = String::from_utf8_lossy(&entry.path_bytes())
                    .trim_start_matches("./")
                    .to_string();
                entries.insert(name, (entry.raw_file_position(), entry.size()));
            }
        }
        Ok(Layout {
            files: Files::Archive {
                file: path.to_path_buf(),
                entries,
            },
            display: path.to_path_buf(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.display
    }

    /// Opens a file of the layout; returns the reader and its size.
    pub fn open(&self, rel: &str) -> Result<(Box<dyn Read + Send>, u64), LayoutError> {
        let io_err = |source| LayoutError::Io {
            layout: self.display.clone(),
            what: rel.to_string(),
            source,
        };
        match &self.files {
            Files::Dir(root) => {
                let file = match File::open(root.join(rel)) {
                    Err(e) if e.kind() == io::ErrorKind::NotFound => {
                        return Err(LayoutError::Missing {
                            layout: self.display.clone(),
                            what: rel.into(),
                        })
                    }
                    other => other.map_err(io_err)?,
                };
                let size = file.metadata().map_err(io_err)?.len();
                Ok((Box::new(file), size))
            }
            Files::Archive { file, entries } => {
                let &(offset, size) = entries.get(rel).ok_or_else(|| LayoutError::Missing {
                    layout: self.display.clone(),
                    what: rel.into(),
                })?;
                let mut f = File::open(file).map_err(io_err)?;
                f.seek(SeekFrom::Start(offset)).map_err(io_err)?;
                Ok((Box::new(f.take(size)), size))
            }
        }
    }

    /// Opens a file of the layout for async reading; returns the reader and its size.
    pub async fn open_async(
        &self,
        rel: &str,
    ) -> Result<(tokio::io::Take<tokio::fs::File>, u64), LayoutError> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let io_err = |source| LayoutError::Io {
            layout: self.display.clone(),
            what: rel.to_string(),
            source,
        };
        let (path, offset, size) = match &self.files {
            Files::Dir(root) => (root.join(rel), 0, None),
            Files::Archive { file, entries } => {
                let &(offset, size) = entries.get(rel).ok_or_else(|| LayoutError::Missing {
                    layout: self.display.clone(),
                    what: rel.into(),
                })?;
                (file.clone(), offset, Some(size))
            }
        };
        let mut file = match tokio::fs::File::open(&path).await {
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                return Err(LayoutError::Missing {
                    layout: self.display.clone(),
                    what: rel.into(),
                })
            }
            other => other.map_err(io_err)?,
        };
        let size = match size {
            Some(s) => s,
            None => file.metadata().await.map_err(io_err)?.len(),
        };
        file.seek(SeekFrom::Start(offset)).await.map_err(io_err)?;
        Ok((file.take(size), size))
    }

    pub fn blob_path(digest: &Digest) -> String {
        format!("blobs/sha256/{}", digest.hex())
    }

    /// Reads a small blob and checks it against its descriptor.
    pub fn read_blob(&self, desc: &Descriptor) -> Result<Vec<u8>, LayoutError> {
        let rel = Self::blob_path(&desc.digest);
        let (mut reader, size) = self.open(&rel)?;
        if size != desc.size || size > 16 << 20 {
            return Err(LayoutError::Corrupt {
                layout: self.display.clone(),
                digest: desc.digest.clone(),
            });
        }
        let mut data = Vec::with_capacity(size as usize);
        reader
            .read_to_end(&mut data)
            .map_err(|source| LayoutError::Io {
                layout: self.display.clone(),
                what: rel,
                source,
            })?;
        if Digest::of(&data) != desc.digest {
            return Err(LayoutError::Corrupt {
                layout: self.display.clone(),
                digest: desc.digest.clone(),
            });
        }
        Ok(data)
    }

    /// Picks the top-level descriptor: the one tagged `tag`, else the only one, else `latest`.
    pub fn select(&self, tag: Option<&str>) -> Result<Descriptor, LayoutError> {
        let (mut reader, _) = self.open("index.json")?;
        let mut bytes = Vec::new();
        reader
            .read_to_end(&mut bytes)
            .map_err(|source| LayoutError::Io {
                layout: self.display.clone(),
                what: "index.json".into(),
                source,
            })?;
        let index: Index =
            serde_json::from_slice(&bytes).map_err(|source| LayoutError::BadIndex {
                layout: self.display.clone(),
                source,
            })?;
        let tags = || {
            let t: Vec<&str> = index
                .manifests
                .iter()
                .filter_map(|d| d.annotations.get(REF_NAME).map(String::as_str))
                .collect();
            if t.is_empty() {
                "(none)".to_string()
            } else {
                t.join(", ")
            }
        };
        let by_tag = |t: &str| {
            index
                .manifests
                .iter()
                .find(|d| d.annotations.get(REF_NAME).map(String::as_str) == Some(t))
        };
        match tag {
            Some(t) => by_tag(t).cloned().ok_or_else(|| LayoutError::NoSuchTag {
                layout: self.display.clone(),
                tag: t.to_string(),
                available: tags(),
            }),
            None if index.manifests.len() == 1 => Ok(index.manifests[0].clone()),
            None => by_tag("latest")
                .cloned()
                .ok_or_else(|| LayoutError::Ambiguous {
                    layout: self.display.clone(),
                    available: tags(),
                }),
        }
    }
}
