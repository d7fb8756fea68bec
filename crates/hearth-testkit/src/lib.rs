//! Test infrastructure shared by hearth's integration tests: the real OCI registry serving the project's
//! own test images, a real Kubernetes API server ([`kube()`]), and the paths of the provisioned guest
//! kernel, test images and static guest agent.
//!
//! Everything here is provisioned by the repository's scripts (`scripts/provision.sh`, which runs
//! `scripts/provision-kube.sh`), never downloaded by tests. A test that needs something the machine
//! cannot provide calls [`skip`] with the reason.
//! This crate only reads the fixture cache and starts processes; it writes only into temp dirs,
//! except [`fake_internet`], which adds (and removes) a namespace, a veth pair and two routes.

pub mod fake_internet;
mod kube;
mod registry;

use std::path::{Path, PathBuf};

pub use kube::{kube, kubectl_bin, Kube};
pub use registry::{registry, Registry};

/// Where `scripts/provision.sh` caches fixtures on this machine.
pub const CACHE_DIR: &str = "/var/cache/hearth-test";

/// The repository root (this crate lives in `crates/hearth-testkit`).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .expect("repo root")
}

/// The OCI layout of a test image (`busybox`, `python`, `layers`, `multiarch`, `scratch`), tag `latest`.
pub fn oci_layout(name: &str) -> PathBuf {
    let path = Path::new(CACHE_DIR).join("images").join(name);
    assert!(
        path.join("index.json").exists(),
        "test image {name} missing at {}: run scripts/provision.sh",
        path.display()
    );
    path
}

/// A reference to a test image in the test registry, e.g. `127.0.0.1:5000/hearth-test/busybox:latest`.
pub fn image_ref(name: &str) -> anyhow::Result<String> {
    Ok(format!("{}/hearth-test/{name}:latest", registry()?.addr))
}

/// The guest kernel directory (`vmlinuz`, `release`, `modules/`), as `hearth setup` lays it out.
pub fn kernel_dir() -> PathBuf {
    let path = std::env::var_os("HEARTH_TEST_KERNEL_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(CACHE_DIR).join("kernel"));
    assert!(
        path.join("vmlinuz").exists(),
        "guest kernel missing at {}: run scripts/provision.sh",
        path.display()
    );
    path
}

/// The static guest agent. `HEARTH_AGENT` overrides; otherwise the release build for the explicit
/// x86_64-unknown-linux-gnu target in the same target directory as the running test binary.
pub fn agent_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("HEARTH_AGENT") {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // <target>/<profile>/deps/<test-binary>
    let target = exe.ancestors().nth(3).expect("target dir");
    let path = target.join("x86_64-unknown-linux-gnu/release/hearth-agent");
    assert!(
        path.exists(),
        "static guest agent missing at {}: run scripts/build-agent.sh",
        path.display()
    );
    path
}

/// The real Firecracker and jailer binaries, as (firecracker, jailer); see [`firecracker_bin`] and
/// [`jailer_bin`]. `Err` says which is missing and how to get it, for the caller's [`skip`].
pub fn firecracker_bins() -> Result<(PathBuf, PathBuf), String> {
    Ok((firecracker_bin()?, jailer_bin()?))
}

/// The real Firecracker: `HEARTH_FIRECRACKER_BIN` when set, otherwise the one
/// `scripts/provision-firecracker.sh` built into `${HEARTH_TEST_CACHE:-/var/cache/hearth-test}/firecracker/`.
pub fn firecracker_bin() -> Result<PathBuf, String> {
    provisioned_binary("HEARTH_FIRECRACKER_BIN", "firecracker")
}

/// The real jailer: `HEARTH_JAILER_BIN`, otherwise beside the cached Firecracker.
pub fn jailer_bin() -> Result<PathBuf, String> {
    provisioned_binary("HEARTH_JAILER_BIN", "jailer")
}

fn provisioned_binary(variable: &str, name: &str) -> Result<PathBuf, String> {
    let path = match std::env::var_os(variable).filter(|v| !v.is_empty()) {
        Some(path) => PathBuf::from(path),
        None => std::env::var_os("HEARTH_TEST_CACHE")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(CACHE_DIR))
            .join("firecracker")
            .join(name),
    };
    if path.is_file() {
        Ok(path)
    } else {
        Err(format!(
            "no {name} binary at {} (set {variable} or run scripts/provision-firecracker.sh)",
            path.display()
        ))
    }
}

/// Skip the calling test with a reason naming what is missing. Prints to stderr so nextest shows it.
pub fn skip(reason: &str) {
    eprintln!("SKIPPED: {reason}");
}

/// Whether the test process runs as root (needed to build root filesystems with real owners).
pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
