//! Layer application: turning an image's layer tars into one directory tree. `safety` decides what an
//! entry may name, `fsops` performs symlink-proof filesystem calls, `whiteout` implements the OCI
//! deletion markers, `headers` checks each tar header before the `tar` crate reads it, `apply` drives a tar stream through them, `decompress` picks the codec and `readahead`
//! decompresses on a second core.

mod apply;
mod decompress;
mod entries;
mod fsops;
mod headers;
mod meta;
mod readahead;
mod safety;
mod whiteout;

pub use apply::{Staging, StagingStats};
pub use decompress::decompressor;
pub use headers::HeaderRefused;
pub use readahead::ReadAhead;
pub use safety::Limits;

/// Why a layer could not be applied. Every variant names the entry (as `/path`) it is about.
#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer entry {entry:?} has an absolute name; layers may only name paths relative to the image root")]
    AbsoluteName { entry: String },
    #[error("layer entry {entry:?} contains '..'; refusing to write outside the image root")]
    Traversal { entry: String },
    #[error("layer entry {entry:?} is not valid: {reason}")]
    BadName { entry: String, reason: String },
    #[error("layer entry {entry:?} lies below {parent}, which is a symlink; refusing to write through it")]
    SymlinkEscape { entry: String, parent: String },
    #[error("layer entry {entry:?} lies below {parent}, which is not a directory")]
    NotADirectory { entry: String, parent: String },
    #[error("hard link {entry:?} -> {target:?} is refused: {reason}")]
    HardLinkEscape {
        entry: String,
        target: String,
        reason: String,
    },
    #[error("layer entry {entry:?} has unsupported type {kind}")]
    UnsupportedEntry { entry: String, kind: String },
    #[error("layer exceeds a safety limit: {what} (raise the limit in PullOptions if the image is genuine)")]
    LimitExceeded { what: String },
    #[error("cannot {op} for layer entry {entry:?}: {source}")]
    Io {
        entry: String,
        op: &'static str,
        source: std::io::Error,
    },
    #[error("cannot set xattr {key} on layer entry {entry:?}: {source}")]
    Xattr {
        entry: String,
        key: String,
        source: std::io::Error,
    },
    #[error("the layer is not a valid tar stream ({what}): {source}")]
    Archive {
        what: String,
        source: std::io::Error,
    },
}
