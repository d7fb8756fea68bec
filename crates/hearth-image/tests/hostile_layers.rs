//! A corpus of hostile layers served from OCI layouts built here: traversal, absolute names, symlink
//! and hard-link escapes, decompression and entry-count bombs, digest mismatch, truncated blobs. Each
//! must fail with an error naming the problem, leave no blob or temp file behind, and write nothing
//! outside HEARTH_HOME (sentinel paths outside stay absent).

mod common;

use std::path::PathBuf;

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
