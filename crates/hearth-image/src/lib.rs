//! hearth-image: from an image reference to a read-only ext4 root filesystem.
//!
//! Entry point: [`ImageStore::ensure`] (in `pull.rs`) parses the reference (`reference`), resolves it
//! through a `source` (registry client in `registry/`, or an OCI layout); `build` streams blobs into
//! the content store (`store`), applies the layers into a staging tree (`layer/`) while they
//! download, and turns the tree into `$HEARTH_HOME/rootfs/<manifest>.ext4` (`rootfs`). `cache`
//! lists, removes and garbage-collects; `index` records what is cached. Everything is written below
//! `$HEARTH_HOME`.

mod build;
mod cache;
pub mod digest;
mod home;
mod index;
pub mod layer;
mod lock;
pub mod oci;
mod private_mounts;
mod pull;
pub mod reference;
pub mod registry;
pub mod rootfs;
mod source;
pub mod store;
mod untrusted;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

pub use cache::{GcReport, ImageDetails};
pub use digest::Digest;
pub use index::ImageRecord;
pub use layer::Limits;
pub use oci::Platform;
pub use reference::{Reference, RegistryRef};
pub use registry::{ClientOptions, Credentials, CredentialsError, HostCredentials, RetryPolicy};

use home::Home;
use store::BlobStore;

/// The image cache rooted at `$HEARTH_HOME`.
pub struct ImageStore {
    home: Home,
    blobs: BlobStore,
    imager: Arc<dyn rootfs::FilesystemImager>,
}

impl ImageStore {
    pub fn open(home: &Path) -> Result<Self, ImageError> {
        let home = Home::open(home).map_err(|source| ImageError::Home {
            path: home.to_path_buf(),
            source,
        })?;
        let blobs = BlobStore::open(&home.root)?;
        build::sweep_abandoned_builds(&home.tmp_dir());
        Ok(ImageStore {
            home,
            blobs,
            imager: Arc::new(rootfs::Mkfs::default()),
        })
    }

    /// Replaces the filesystem image builder (for another mkfs binary or timeout).
    pub fn with_imager(mut self, imager: Arc<dyn rootfs::FilesystemImager>) -> Self {
        self.imager = imager;
        self
    }

    pub fn home(&self) -> &Path {
        &self.home.root
    }
}

/// When to ask the source again for an image that is already cached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum PullPolicy {
    /// Use the cached image for a registry reference without contacting the registry.
    #[default]
    IfMissing,
    /// Ask the registry what the reference points at now (one HEAD request) and reuse the cache
    /// when it has not moved.
    Always,
}

/// Progress reports during a pull. Called from download tasks and the layer-applying thread.
pub trait Progress: Send + Sync {
    /// A layer is needed; `cached` when its blob is already stored.
    fn layer_start(&self, digest: &Digest, size: u64, cached: bool);
    fn layer_bytes(&self, digest: &Digest, bytes: u64);
    /// The layer is downloaded and applied.
    fn layer_done(&self, digest: &Digest);
    /// A step without byte progress (resolving, building the filesystem).
    fn phase(&self, message: &str);
}

#[derive(Clone)]
pub struct PullOptions {
    pub platform: Platform,
    /// Registries (`host[:port]`) reached over plain HTTP.
    pub insecure_registries: Vec<String>,
    /// Credentials per registry host; a host without an entry falls back to its
    /// `~/.docker/config.json` entry. Never offered to any other host.
    pub credentials: HostCredentials,
    /// Let registry redirects and Bearer token realms point at loopback, link-local, private or
    /// metadata addresses. True for the CLI; `hearth serve` sets false unless
    /// `--allow-private-registries`. The registry the reference names is always allowed.
    pub allow_private: bool,
    /// The whole pull (resolve, download, build) must finish within this.
    pub deadline: Duration,
    /// Images with more layers than this are refused before anything is downloaded.
    pub max_layers: usize,
    pub progress: Option<Arc<dyn Progress>>,
    pub policy: PullPolicy,
    pub limits: Limits,
    pub retry: RetryPolicy,
    pub max_concurrent_downloads: usize,
    /// Evict least-recently-used images after a pull while the cache is larger than this (bytes).
    pub cache_budget: Option<u64>,
}

impl Default for PullOptions {
    fn default() -> Self {
        PullOptions {
            platform: Platform::default(),
            insecure_registries: Vec::new(),
            credentials: HostCredentials::default(),
            allow_private: true,
            deadline: DEFAULT_PULL_DEADLINE,
            max_layers: DEFAULT_MAX_LAYERS,
            progress: None,
            policy: PullPolicy::default(),
            limits: Limits::default(),
            retry: RetryPolicy::default(),
            max_concurrent_downloads: 4,
            cache_budget: None,
        }
    }
}

/// Default [`PullOptions::deadline`]: a slow-drip registry cannot hold a boot slot longer.
pub const DEFAULT_PULL_DEADLINE: Duration = Duration::from_secs(600);

/// Default [`PullOptions::max_layers`] (each layer costs open files and a download task).
pub const DEFAULT_MAX_LAYERS: usize = 256;

impl PullOptions {
    /// What the registry client needs of these options.
    pub fn client_options(&self) -> ClientOptions {
        ClientOptions {
            insecure: self.insecure_registries.clone(),
            credentials: self.credentials.clone(),
            retry: self.retry,
            allow_private: self.allow_private,
        }
    }
}

/// An image ready to boot.
#[derive(Debug, Clone)]
pub struct PulledImage {
    pub reference: Reference,
    pub platform: Platform,
    pub manifest_digest: Digest,
    /// The read-only ext4 root filesystem (shared by every VM of this image: never write to it).
    pub rootfs: PathBuf,
    pub config: ImageConfig,
    /// True when nothing had to be downloaded or built.
    pub cached: bool,
}

/// The parts of the OCI image config that decide how a command runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ImageConfig {
    pub entrypoint: Vec<String>,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
}

impl From<&oci::ConfigFile> for ImageConfig {
    fn from(c: &oci::ConfigFile) -> Self {
        let run = c.config.clone().unwrap_or_default();
        ImageConfig {
            entrypoint: run.entrypoint.unwrap_or_default(),
            cmd: run.cmd.unwrap_or_default(),
            env: run.env.unwrap_or_default(),
            working_dir: run.working_dir.filter(|w| !w.is_empty()),
            user: run.user.filter(|u| !u.is_empty()),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error(transparent)]
    Reference(#[from] reference::ReferenceError),
    #[error(transparent)]
    Document(#[from] oci::DocumentError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Layout(#[from] source::layout::LayoutError),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Index(#[from] index::IndexError),
    #[error("layer {index} ({digest}) of {reference}: {source}")]
    Layer {
        reference: String,
        index: usize,
        digest: Digest,
        source: Box<layer::LayerError>,
    },
    #[error("staging the layers of {reference}: {source}")]
    Tree {
        reference: String,
        source: Box<layer::LayerError>,
    },
    #[error("building the root filesystem of {reference}: {source}")]
    Rootfs {
        reference: String,
        source: Box<rootfs::RootfsError>,
    },
    #[error("cannot use {path} as the hearth home directory: {source}")]
    Home {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{what} of {reference} is not valid: {detail}")]
    BadImage {
        reference: String,
        what: String,
        detail: String,
    },
    #[error("pulling {reference} took longer than the {secs} s pull deadline")]
    Deadline { reference: String, secs: u64 },
    #[error("{reference} has {count} layers; at most {limit} are allowed")]
    TooManyLayers {
        reference: String,
        count: usize,
        limit: usize,
    },
    #[error("no cached image matches {0:?}; see `hearth images`")]
    NotCached(String),
    #[error("internal error: {0}")]
    Internal(String),
}
