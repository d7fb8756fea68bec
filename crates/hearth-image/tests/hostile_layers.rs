//! A corpus of hostile layers served from OCI layouts built here: traversal, absolute names, symlink
//! and hard-link escapes, decompression and entry-count bombs, GNU sparse members, oversized long-name
//! and PAX headers, bookkeeping floods, digest mismatch, truncated blobs. Each must fail with an error
//! naming the problem, leave no blob or temp file behind, and write nothing outside HEARTH_HOME
//! (sentinel paths outside stay absent). A successful pull must leave the store owner-only.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use hearth_image::{ImageStore, Limits, PullOptions};

/// A home, a layout dir and an outside directory that must stay empty.
struct Fixture {
    _tmp: tempfile::TempDir,
    home: PathBuf,
    layout: PathBuf,
    outside: PathBuf,
}

impl Fixture {
    fn new() -> Fixture {
        let tmp = tempfile::tempdir().unwrap();
        let (home, layout, outside) = (
            tmp.path().join("home"),
            tmp.path().join("layout"),
            tmp.path().join("outside"),
        );
        for d in [&home, &layout, &outside] {
            std::fs::create_dir_all(d).unwrap();
        }
        Fixture {
            _tmp: tmp,
            home,
            layout,
            outside,
        }
    }

    /// Pulls the layout and returns the error text; asserts the aftermath is clean.
    async fn pull_fails(&self, layers: Vec<TestLayer>, opts: &PullOptions) -> String {
        write_layout(&self.layout, &layers);
        let store = ImageStore::open(&self.home).unwrap();
        let err = store
            .ensure(&format!("oci-layout:{}", self.layout.display()), opts)
            .await
            .expect_err("hostile image must not pull")
            .to_string();
        assert!(
            files_below(&self.outside).is_empty(),
            "wrote outside HEARTH_HOME: {:?}",
            files_below(&self.outside)
        );
        assert!(
            files_below(&self.home.join("tmp")).is_empty(),
            "build leftovers: {:?}",
            files_below(&self.home.join("tmp"))
        );
        assert!(
            files_below(&self.home.join("rootfs")).is_empty(),
            "a root filesystem was published"
        );
        let temps: Vec<_> = files_below(&self.home.join("blobs"))
            .into_iter()
            .filter(|p| p.to_string_lossy().contains(".tmp-"))
            .collect();
        assert!(temps.is_empty(), "partial blobs left: {temps:?}");
        err
    }

    fn outside_rel(&self, depth: usize) -> String {
        // From <home>/tmp/build-XXX/root, enough ".." to reach the temp dir holding `outside`.
        format!("{}outside/pwned", "../".repeat(depth))
    }
}

fn layer(tar: RawTar) -> Vec<TestLayer> {
    vec![TestLayer::gzip_tar(tar.finish())]
}

#[tokio::test]
async fn traversal_is_refused_and_named() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let name = f.outside_rel(4);
    let err = f
        .pull_fails(
            layer(RawTar::default().dir("etc/").file(&name, b"x")),
            &PullOptions::default(),
        )
        .await;
    assert!(err.contains(&name) && err.contains(".."), "{err}");
}

#[tokio::test]
async fn absolute_names_are_refused() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let name = f.outside.join("abs").display().to_string();
    let err = f
        .pull_fails(
            layer(RawTar::default().file(&name, b"x")),
            &PullOptions::default(),
        )
        .await;
    assert!(err.contains(&name) && err.contains("absolute"), "{err}");
}

#[tokio::test]
async fn writing_through_a_symlink_is_refused() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let target = f.outside.display().to_string();
    let abs = RawTar::default()
        .symlink("esc", &target)
        .file("esc/pwned", b"x");
    let err = f.pull_fails(layer(abs), &PullOptions::default()).await;
    assert!(
        err.contains("/esc/pwned") && err.contains("symlink"),
        "{err}"
    );
    let rel = RawTar::default()
        .symlink("up", "../../../../outside")
        .file("up/pwned", b"x");
    let err = f.pull_fails(layer(rel), &PullOptions::default()).await;
    assert!(err.contains("/up/pwned"), "{err}");
    // A later layer turning a directory into a symlink does not redirect writes either.
    let layers = vec![
        TestLayer::gzip_tar(RawTar::default().dir("d/").file("d/a", b"1").finish()),
        TestLayer::gzip_tar(
            RawTar::default()
                .symlink("d", &target)
                .file("d/b", b"2")
                .finish(),
        ),
    ];
    let err = f.pull_fails(layers, &PullOptions::default()).await;
    assert!(err.contains("/d/b"), "{err}");
}

#[tokio::test]
async fn hard_link_escapes_are_refused() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let secret = f.outside.parent().unwrap().join("secret");
    std::fs::write(&secret, b"secret").unwrap();
    let err = f
        .pull_fails(
            layer(RawTar::default().hardlink("hl", "../../../../secret")),
            &PullOptions::default(),
        )
        .await;
    assert!(
        err.contains("hl") && err.contains("../../../../secret"),
        "{err}"
    );
    let via_symlink = RawTar::default()
        .symlink("s", f.outside.parent().unwrap().to_str().unwrap())
        .hardlink("hl", "s/secret");
    let err = f
        .pull_fails(layer(via_symlink), &PullOptions::default())
        .await;
    assert!(err.contains("hl") && err.contains("symlink"), "{err}");
    let err = f
        .pull_fails(
            layer(RawTar::default().hardlink("hl", &secret.display().to_string())),
            &PullOptions::default(),
        )
        .await;
    assert!(err.contains("hl") && err.contains("absolute"), "{err}");
    assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
}

#[tokio::test]
async fn bombs_hit_the_limits() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    // 64 MiB of zeros compresses to ~64 KiB.
    let zeros = vec![0u8; 64 << 20];
    let opts = PullOptions {
        limits: Limits {
            max_total_bytes: 16 << 20,
            ..Limits::default()
        },
        ..PullOptions::default()
    };
    let err = f
        .pull_fails(layer(RawTar::default().file("zero", &zeros)), &opts)
        .await;
    assert!(
        err.contains("limit") && err.contains(&(16u64 << 20).to_string()),
        "{err}"
    );
    let mut many = RawTar::default();
    for i in 0..200 {
        many = many.file(&format!("f{i}"), b"");
    }
    let opts = PullOptions {
        limits: Limits {
            max_entries: 100,
            ..Limits::default()
        },
        ..PullOptions::default()
    };
    let err = f.pull_fails(layer(many), &opts).await;
    assert!(err.contains("more than 100 entries"), "{err}");
    let opts = PullOptions {
        limits: Limits {
            max_path_len: 20,
            ..Limits::default()
        },
        ..PullOptions::default()
    };
    let err = f
        .pull_fails(
            layer(RawTar::default().file("a/very/long/path/name/here", b"")),
            &opts,
        )
        .await;
    assert!(err.contains("entry name length"), "{err}");
}

#[tokio::test]
async fn corrupt_and_truncated_blobs_leave_nothing_behind() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let good = TestLayer::gzip_tar(RawTar::default().file("a", b"hello").finish());
    let mut evil = good.blob.clone();
    let last = evil.len() - 9;
    evil[last] ^= 0xff; // inside the gzip trailer: decompression may still succeed
    let digest = hex_digest(&good.blob);
    let err = f
        .pull_fails(
            vec![TestLayer {
                stored_instead: Some(evil),
                ..good
            }],
            &PullOptions::default(),
        )
        .await;
    assert!(err.contains(&digest), "{err}");
    assert!(!blob_exists(&f.home, &digest));

    let f = Fixture::new();
    let good = TestLayer::gzip_tar(RawTar::default().file("a", b"hello").finish());
    let digest = hex_digest(&good.blob);
    let short = good.blob[..good.blob.len() / 2].to_vec();
    let err = f
        .pull_fails(
            vec![TestLayer {
                stored_instead: Some(short),
                ..good
            }],
            &PullOptions::default(),
        )
        .await;
    assert!(err.contains(&digest), "{err}");
    assert!(!blob_exists(&f.home, &digest));
}

fn hex_digest(data: &[u8]) -> String {
    hearth_image::Digest::of(data).hex().to_string()
}

/// A gzip layer of concatenated members (as some layer tools write, and every reader accepts): `head`,
/// then `zeros_mib` MiB of zeros as copies of one member, then `tail`. Gigabytes cost kilobytes and
/// no compression time.
fn zeros_layer(head: &[u8], zeros_mib: u64, tail: &[u8]) -> Vec<TestLayer> {
    let mib_of_zeros = {
        use std::io::Write;
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
        enc.write_all(&vec![0u8; 1 << 20]).unwrap();
        enc.finish().unwrap()
    };
    let mut blob = gzip(head);
    for _ in 0..zeros_mib {
        blob.extend_from_slice(&mib_of_zeros);
    }
    blob.extend_from_slice(&gzip(tail));
    vec![TestLayer {
        blob,
        media_type: "application/vnd.oci.image.layer.v1.tar+gzip",
        declared_size: None,
        stored_instead: None,
    }]
}

/// Peak resident memory of this test process (nextest runs each test in its own process).
fn vm_hwm_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM in /proc/self/status");
    kb * 1024
}

/// Attack: a ~1 KiB layer holding a GNU sparse member whose map declares a 1 TiB file. The `tar` crate
/// expands the holes as zeros that no byte counter sees, so it used to write a terabyte. It must be
/// refused at its header, naming the entry, with nothing written.
#[tokio::test]
async fn gnu_sparse_members_are_refused() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let mut h = tar::Header::new_gnu();
    h.set_path("huge").unwrap();
    h.set_entry_type(tar::EntryType::GNUSparse);
    h.set_mode(0o644);
    h.set_size(512);
    {
        let gnu = h.as_gnu_mut().unwrap();
        gnu.set_real_size(1 << 40);
        gnu.sparse[0].set_offset((1 << 40) - 512);
        gnu.sparse[0].set_length(512);
    }
    h.set_cksum();
    let mut tar = h.as_bytes().to_vec();
    tar.extend_from_slice(&[b'x'; 512]);
    tar.extend_from_slice(&[0; 1024]);
    let layers = layer_of(tar);
    assert!(layers[0].blob.len() < 1024, "the attack layer is tiny");
    let started = Instant::now();
    let err = f.pull_fails(layers, &PullOptions::default()).await;
    assert!(
        err.contains("/huge") && err.contains("sparse") && err.contains(&(1u64 << 40).to_string()),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "not refused fast"
    );
}

fn layer_of(tar: Vec<u8>) -> Vec<TestLayer> {
    vec![TestLayer::gzip_tar(tar)]
}

/// Attack: a 64 MiB PAX extended header and a 64 MiB GNU long name, each compressing to ~64 KiB. The
/// `tar` crate reads such headers into memory whole (a few-MB layer could force gigabytes); they must
/// be refused at the 1 MiB cap before any of their data is buffered. Bound: the pull raises this
/// process's peak RSS by less than 48 MiB (reading either header whole would take at least 64 MiB).
#[tokio::test]
async fn oversized_extension_headers_are_refused_before_reading() {
    if skip_unless_root() {
        return;
    }
    for (kind, name, label) in [
        (b'x', "PaxHeaders.0/victim", "PAX extended"),
        (b'L', "././@LongLink", "GNU long-name"),
    ] {
        let f = Fixture::new();
        let size = 64u64 << 20;
        let mut tail = raw_header("victim", b'0', 0, "", 0o644).to_vec();
        tail.extend_from_slice(&[0; 1024]);
        let layers = zeros_layer(&raw_header(name, kind, size, "", 0o644), size >> 20, &tail);
        assert!(layers[0].blob.len() < 1 << 20, "the attack layer is small");
        let before = vm_hwm_bytes();
        let started = Instant::now();
        let err = f.pull_fails(layers, &PullOptions::default()).await;
        let grew = vm_hwm_bytes().saturating_sub(before);
        assert!(
            err.contains(label) && err.contains(name) && err.contains(&size.to_string()),
            "{err}"
        );
        assert!(
            err.contains(&(1u64 << 20).to_string()),
            "names the cap: {err}"
        );
        assert!(grew < 48 << 20, "{label}: peak RSS grew by {grew} bytes");
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "not refused fast"
        );
    }
}

/// Attack: gzip of 512 MiB of zeros (~0.5 MiB compressed) in one file. The limit counts bytes after
/// decompression and the bytes written, so the pull stops at the limit, names the file, and the disk
/// under the home never holds much more than the limit.
#[tokio::test]
async fn gzip_of_zeros_stops_at_the_uncompressed_limit() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let size = 512u64 << 20;
    let layers = zeros_layer(
        &raw_header("zero", b'0', size, "", 0o644),
        size >> 20,
        &[0; 1024],
    );
    assert!(layers[0].blob.len() < 4 << 20, "the attack layer is small");
    let limit = 32u64 << 20;
    let opts = PullOptions {
        limits: Limits {
            max_total_bytes: limit,
            ..Limits::default()
        },
        ..PullOptions::default()
    };
    let started = Instant::now();
    let err = f.pull_fails(layers, &opts).await;
    assert!(
        err.contains("/zero") && err.contains("limit") && err.contains(&limit.to_string()),
        "{err}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "not refused fast"
    );
}

/// Attack: thousands of tiny entries with long names. Each name is remembered (for whiteouts and
/// directory times), so bookkeeping is bounded by bytes, not only by entry count: past the bound the
/// pull fails naming the entry where it stopped.
#[tokio::test]
async fn bookkeeping_floods_hit_their_bound() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let mut many = RawTar::default();
    for i in 0..20_000 {
        many = many.file(&format!("{i:06}{}", "n".repeat(90)), b"");
    }
    let opts = PullOptions {
        limits: Limits {
            max_bookkeeping_bytes: 1 << 20,
            ..Limits::default()
        },
        ..PullOptions::default()
    };
    let err = f.pull_fails(layer(many), &opts).await;
    assert!(
        err.contains("bookkeeping")
            && err.contains(&(1u64 << 20).to_string())
            && err.contains("nnnn"),
        "{err}"
    );
}

/// Records, while mkfs runs, the mode of the directory holding the staged tree and whether the
/// image's setuid file and device node are there, tries what a builder tricked by the image could
/// do with them (open the device, run the setuid file) and reads the mount tables; then builds as
/// usual.
struct WatchingImager {
    seen: Arc<Mutex<Option<(u32, u32)>>>,
    attempts: Arc<Mutex<Vec<String>>>,
}

impl hearth_image::rootfs::FilesystemImager for WatchingImager {
    fn build(
        &self,
        staging: &Path,
        stats: &hearth_image::layer::StagingStats,
        output: &Path,
    ) -> Result<(), hearth_image::rootfs::RootfsError> {
        use std::os::unix::fs::MetadataExt;
        let parent = std::fs::metadata(staging.parent().unwrap()).unwrap().mode();
        let tmp = std::fs::metadata(staging.parent().unwrap().parent().unwrap())
            .unwrap()
            .mode();
        assert!(staging.join("bin/su").exists() && staging.join("dev/evil").exists());
        *self.seen.lock().unwrap() = Some((parent & 0o777, tmp & 0o777));
        let mut attempts = self.attempts.lock().unwrap();
        let outcome = |r: std::io::Result<()>| match r {
            Ok(()) => "allowed".to_string(),
            Err(e) => format!("{:?}", e.kind()),
        };
        attempts.push(outcome(
            std::fs::File::open(staging.join("dev/evil")).map(drop),
        ));
        attempts.push(outcome(
            std::process::Command::new(staging.join("bin/su"))
                .status()
                .map(drop),
        ));
        // This thread's mount table has the build directory nosuid,nodev,noexec; the host's
        // (PID 1's) has no mount there.
        let build_dir = staging.parent().unwrap().to_str().unwrap();
        let mount_of = |table: &str| {
            std::fs::read_to_string(table)
                .unwrap()
                .lines()
                .find(|l| l.split(' ').nth(4) == Some(build_dir))
                .map(|l| {
                    let options: Vec<&str> =
                        l.split(' ').nth(5).unwrap_or_default().split(',').collect();
                    ["nosuid", "nodev", "noexec"]
                        .iter()
                        .filter(|o| options.contains(o))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(",")
                })
        };
        attempts.push(format!("{:?}", mount_of("/proc/thread-self/mountinfo")));
        attempts.push(format!("{:?}", mount_of("/proc/1/mountinfo")));
        hearth_image::rootfs::Mkfs::default().build(staging, stats, output)
    }
}

/// Attack: an image ships a setuid-root shell and a device node. While the tree is staged on the
/// host, no other host user may reach them (the staging tree's parent and tmp/ are 0700), and after
/// the pull nothing under the home is group/world-writable or readable, except the root filesystem
/// image itself (0644 inside the 0700 rootfs/ directory, because the Firecracker jailer's
/// unprivileged uid opens it through a hard link) and the empty lock files inside the 0700 locks/.
/// The builder works in a private mount namespace where the tree is `nosuid,nodev,noexec`: the
/// device node cannot be opened, the setuid file cannot be run, and the host sees no such mount.
#[tokio::test]
async fn the_store_is_owner_only_and_staging_is_unreachable() {
    if skip_unless_root() {
        return;
    }
    let f = Fixture::new();
    let mut tar = RawTar::default().dir("bin/").dir("dev/").finish();
    tar.truncate(tar.len() - 1024);
    tar.extend_from_slice(&raw_header("bin/su", b'0', 4, "", 0o4755));
    tar.extend_from_slice(b"#!x\n");
    tar.resize(tar.len().div_ceil(512) * 512, 0);
    let mut dev = raw_header("dev/evil", b'3', 0, "", 0o666);
    // major 1, minor 3 (/dev/null's numbers): harmless if it ever leaked, but a real device node.
    dev[329..337].copy_from_slice(b"0000001\0");
    dev[337..345].copy_from_slice(b"0000003\0");
    dev[148..156].copy_from_slice(b"        ");
    let sum: u32 = dev.iter().map(|b| *b as u32).sum();
    dev[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    tar.extend_from_slice(&dev);
    tar.extend_from_slice(&[0; 1024]);
    write_layout(&f.layout, &layer_of(tar));
    let seen = Arc::new(Mutex::new(None));
    let attempts = Arc::new(Mutex::new(Vec::new()));
    let store = ImageStore::open(&f.home)
        .unwrap()
        .with_imager(Arc::new(WatchingImager {
            seen: seen.clone(),
            attempts: attempts.clone(),
        }));
    store
        .ensure(
            &format!("oci-layout:{}", f.layout.display()),
            &PullOptions::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        *seen.lock().unwrap(),
        Some((0o700, 0o700)),
        "staging parent and tmp/ modes"
    );
    assert_eq!(
        *attempts.lock().unwrap(),
        [
            "PermissionDenied",
            "PermissionDenied",
            "Some(\"nosuid,nodev,noexec\")",
            "None"
        ],
        "open the device node, run the setuid file, the build's mount, the host's mount"
    );
    let mut checked = 0;
    for path in walk(&f.home) {
        let meta = std::fs::symlink_metadata(&path).unwrap();
        let mode = meta.permissions().mode() & 0o7777;
        let rel = path.strip_prefix(&f.home).unwrap();
        checked += 1;
        assert_eq!(
            mode & 0o022,
            0,
            "{} is group/world-writable ({mode:o})",
            rel.display()
        );
        let justified = (rel.starts_with("rootfs") && rel.extension() == Some("ext4".as_ref()))
            || rel.starts_with("locks") && meta.is_file() && meta.len() == 0;
        if !justified {
            assert_eq!(
                mode & 0o077,
                0,
                "{} is readable by others ({mode:o})",
                rel.display()
            );
        }
        if rel.starts_with("rootfs") && meta.is_file() {
            assert_eq!(
                mode, 0o644,
                "the rootfs image must stay readable for the jailer"
            );
        }
    }
    assert!(checked > 5, "walked the home");
    assert!(f.home.join("images.json").exists());
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).unwrap() {
        let p = e.unwrap().path();
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            out.extend(walk(&p));
        }
        out.push(p);
    }
    out
}
