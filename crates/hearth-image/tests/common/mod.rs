//! Shared helpers for hearth-image's integration tests: reading built ext4 images with `debugfs`
//! (no mounting), writing OCI layouts with hand-made (also hostile) layers, raw tar headers.
#![allow(dead_code)]

pub mod hostile;
pub mod proxy;

use std::path::{Path, PathBuf};
use std::process::Command;

use flate2::write::GzEncoder;
use hearth_image::{Digest, ImageStore, PullOptions, PulledImage};
use sha2::{Digest as _, Sha256};

/// Runs a debugfs request against an image; returns stdout, or Err(stderr) when debugfs reports a problem.
pub fn debugfs(image: &Path, request: &str) -> Result<String, String> {
    let out = Command::new("debugfs")
        .arg("-R")
        .arg(request)
        .arg(image)
        .output()
        .expect("run debugfs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    let problem = stderr
        .lines()
        .any(|l| !l.starts_with("debugfs ") && !l.trim().is_empty());
    if problem {
        Err(stderr)
    } else {
        Ok(stdout)
    }
}

pub fn stat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("stat {path}")).unwrap_or_else(|e| panic!("stat {path}: {e}"))
}

pub fn cat(image: &Path, path: &str) -> String {
    debugfs(image, &format!("cat {path}")).unwrap_or_else(|e| panic!("cat {path}: {e}"))
}

pub fn exists(image: &Path, path: &str) -> bool {
    debugfs(image, &format!("stat {path}")).is_ok()
}

/// `fsck` says the image is clean.
pub fn assert_fsck_clean(image: &Path) {
    let out = Command::new("e2fsck")
        .args(["-f", "-n"])
        .arg(image)
        .output()
        .expect("run e2fsck");
    assert!(
        out.status.success(),
        "e2fsck: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn skip_unless_root() -> bool {
    if !hearth_testkit::is_root() {
        hearth_testkit::skip("building root filesystems needs root (owners, device nodes)");
        return true;
    }
    false
}

/// The test registry's address.
pub fn registry_addr() -> String {
    hearth_testkit::registry()
        .expect("test registry")
        .addr
        .clone()
}

pub fn image_ref(name: &str) -> String {
    hearth_testkit::image_ref(name).expect("test registry")
}

pub fn registry_options() -> PullOptions {
    PullOptions {
        insecure_registries: vec![registry_addr()],
        ..PullOptions::default()
    }
}

pub async fn pull(home: &Path, reference: &str, opts: &PullOptions) -> PulledImage {
    ImageStore::open(home)
        .unwrap()
        .ensure(reference, opts)
        .await
        .unwrap_or_else(|e| panic!("pull {reference}: {e}"))
}

/// A 512-byte ustar header written by hand, so names the `tar` crate refuses (`..`, absolute) can be made.
pub fn raw_header(name: &str, kind: u8, size: u64, link: &str, mode: u32) -> [u8; 512] {
    let mut h = [0u8; 512];
    assert!(
        name.len() <= 100 && link.len() <= 100,
        "raw_header names must fit ustar's 100 bytes"
    );
    h[..name.len()].copy_from_slice(name.as_bytes());
    let octal = |field: &mut [u8], value: u64| {
        let s = format!("{:0width$o}\0", value, width = field.len() - 1);
        field.copy_from_slice(s.as_bytes());
    };
    octal(&mut h[100..108], mode as u64);
    octal(&mut h[108..116], 0);
    octal(&mut h[116..124], 0);
    octal(&mut h[124..136], size);
    octal(&mut h[136..148], 1_700_000_000);
    h[156] = kind;
    h[157..157 + link.len()].copy_from_slice(link.as_bytes());
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|b| *b as u32).sum();
    let s = format!("{sum:06o}\0 ");
    h[148..156].copy_from_slice(s.as_bytes());
    h
}

/// Builds an uncompressed tar from raw entries.
#[derive(Default)]
pub struct RawTar {
    bytes: Vec<u8>,
}

impl RawTar {
    pub fn file(mut self, name: &str, data: &[u8]) -> Self {
        self.bytes
            .extend_from_slice(&raw_header(name, b'0', data.len() as u64, "", 0o644));
        self.bytes.extend_from_slice(data);
        self.bytes.resize(self.bytes.len().div_ceil(512) * 512, 0);
        self
    }
    pub fn dir(mut self, name: &str) -> Self {
        self.bytes
            .extend_from_slice(&raw_header(name, b'5', 0, "", 0o755));
        self
    }
    pub fn symlink(mut self, name: &str, target: &str) -> Self {
        self.bytes
            .extend_from_slice(&raw_header(name, b'2', 0, target, 0o777));
        self
    }
    pub fn hardlink(mut self, name: &str, target: &str) -> Self {
        self.bytes
            .extend_from_slice(&raw_header(name, b'1', 0, target, 0o644));
        self
    }
    pub fn finish(mut self) -> Vec<u8> {
        self.bytes.extend_from_slice(&[0u8; 1024]);
        self.bytes
    }
}

pub fn gzip(data: &[u8]) -> Vec<u8> {
    use std::io::Write;
    let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    enc.write_all(data).unwrap();
    enc.finish().unwrap()
}

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

/// A layer to put in a test layout: bytes as stored, media type, and (when set) a size to declare
/// instead of the real one.
pub struct TestLayer {
    pub blob: Vec<u8>,
    pub media_type: &'static str,
    pub declared_size: Option<u64>,
    /// Bytes to store in place of `blob` (same declared digest): simulates corruption.
    pub stored_instead: Option<Vec<u8>>,
}

impl TestLayer {
    pub fn gzip_tar(tar: Vec<u8>) -> Self {
        TestLayer {
            blob: gzip(&tar),
            media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
            declared_size: None,
            stored_instead: None,
        }
    }
}

/// Writes an OCI layout at `dir` with one linux/amd64 image tagged `latest`; returns the manifest digest.
pub fn write_layout(dir: &Path, layers: &[TestLayer]) -> Digest {
    let blobs = dir.join("blobs/sha256");
    std::fs::create_dir_all(&blobs).unwrap();
    let put = |data: &[u8]| {
        let hex = sha(data);
        std::fs::write(blobs.join(&hex), data).unwrap();
        hex
    };
    let mut descs = Vec::new();
    for l in layers {
        let hex = sha(&l.blob);
        std::fs::write(
            blobs.join(&hex),
            l.stored_instead.as_deref().unwrap_or(&l.blob),
        )
        .unwrap();
        descs.push(serde_json::json!({
            "mediaType": l.media_type, "digest": format!("sha256:{hex}"),
            "size": l.declared_size.unwrap_or(l.blob.len() as u64),
        }));
    }
    let config = serde_json::json!({
        "architecture": "amd64", "os": "linux",
        "config": {"Cmd": ["sh"], "Env": ["PATH=/bin"]},
        "rootfs": {"type": "layers", "diff_ids": []},
    });
    let config = serde_json::to_vec(&config).unwrap();
    let config_hex = put(&config);
    let manifest = serde_json::json!({
        "schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json",
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{config_hex}"), "size": config.len()},
        "layers": descs,
    });
    let manifest = serde_json::to_vec(&manifest).unwrap();
    let manifest_hex = put(&manifest);
    let index = serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{manifest_hex}"),
            "size": manifest.len(), "annotations": {"org.opencontainers.image.ref.name": "latest"}}],
    });
    std::fs::write(dir.join("index.json"), serde_json::to_vec(&index).unwrap()).unwrap();
    std::fs::write(dir.join("oci-layout"), br#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
    Digest::from_hex(&manifest_hex).unwrap()
}

/// Every file below `dir` (relative paths), for "nothing left behind" checks.
pub fn files_below(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                stack.push(p);
            } else {
                out.push(p.strip_prefix(dir).unwrap().to_path_buf());
            }
        }
    }
    out
}

/// Whether the blob store under `home` holds `digest` (`sha256:<hex>` or bare hex).
pub fn blob_exists(home: &Path, digest: &str) -> bool {
    let hex = digest.trim_start_matches("sha256:");
    home.join("blobs/sha256").join(hex).exists()
}
