//! The OCI distribution-spec client: manifests and blobs over HTTPS (plain HTTP only for registries
//! the user lists as insecure). `client` sends requests and answers auth challenges (`auth` parses
//! them, `token` fetches Bearer tokens), `blob` streams layers with resumption, `retry` is the policy.
//! `creds` binds credentials to hosts (`docker_config` reads Docker's, helpers included), `policy`
//! decides which redirect and realm targets are allowed, `body` bounds what is read from a registry
//! and shortens what is shown of it.
//! Talks to the network; writes blobs only through the `BlobStore`'s writers.

mod auth;
mod blob;
mod body;
mod client;
mod creds;
mod docker_config;
mod policy;
mod retry;
mod token;

pub use auth::{Challenge, Credentials};
pub use body::sanitize;
pub use client::{ClientOptions, FetchedManifest, RegistryClient};
pub use creds::{CredentialsError, HostCredentials};
pub use policy::{is_private, Refusal};
pub use retry::RetryPolicy;

use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("cannot reach {url}: {detail} (after {attempts} attempts; check the address, network and --insecure-registry)")]
    Unreachable {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("{url} answered {status} after {attempts} attempts: {body}")]
    Status {
        url: String,
        status: u16,
        attempts: u32,
        body: String,
    },
    #[error("{what} not found at {url} (check the repository name and tag)")]
    NotFound { what: String, url: String },
    #[error("access to {repository} on {registry} was denied ({detail}); pass --creds {registry}=USER:PASS, --creds-file FILE, or log in with `docker login`")]
    Unauthorized {
        registry: String,
        repository: String,
        detail: String,
    },
    #[error("the connection to {url} broke mid-transfer after {attempts} attempts: {detail}")]
    Broken {
        url: String,
        attempts: u32,
        detail: String,
    },
    #[error("{url} stopped sending data for {secs} s (after {attempts} attempts)")]
    Stalled {
        url: String,
        secs: u64,
        attempts: u32,
    },
    #[error("{url} ended the blob after {got} of {expected} bytes (after {attempts} attempts)")]
    Truncated {
        url: String,
        got: u64,
        expected: u64,
        attempts: u32,
    },
    #[error("{url} sent a {what} larger than {limit} bytes")]
    TooLarge {
        url: String,
        what: &'static str,
        limit: u64,
    },
    #[error("{url} sent a manifest whose digest is {actual}, not the expected {expected}")]
    ManifestDigest {
        url: String,
        expected: String,
        actual: String,
    },
    #[error("{url}: {detail}")]
    Refused { url: String, detail: String },
    #[error("cannot build the HTTP client: {0}")]
    Client(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}
