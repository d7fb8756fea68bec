//! Registry faults from a fault-injecting proxy in front of the real test registry: 5xx answers,
//! Bearer and Basic auth challenges, connection resets and stalls in the middle of a blob (resumed
//! with Range), truncated and corrupted blobs (clear errors, nothing left behind), a pull cancelled
//! mid-blob (no build directory left).

mod common;

use std::time::Duration;

use common::proxy::{Auth, Fault, FaultProxy};
use common::*;
use hearth_image::{Credentials, HostCredentials, ImageStore, PullOptions, RetryPolicy};

struct Setup {
    proxy: FaultProxy,
    home: tempfile::TempDir,
    reference: String,
    layer: String,
}

async fn setup() -> Option<Setup> {
    if skip_unless_root() {
        return None;
    }
    let upstream = registry_addr();
    let proxy = FaultProxy::start(&upstream).await;
    let reference = format!("{}/hearth-test/busybox:latest", proxy.addr);
    let layer = busybox_layer_digest();
    Some(Setup {
        proxy,
        home: tempfile::tempdir().unwrap(),
        reference,
        layer,
    })
}

/// The digest of the busybox image's one layer, read from its OCI layout.
fn busybox_layer_digest() -> String {
    let layout = hearth_testkit::oci_layout("busybox");
    let index: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("index.json")).unwrap()).unwrap();
    let manifest = index["manifests"][0]["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:")
        .to_string();
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(layout.join("blobs/sha256").join(manifest)).unwrap())
            .unwrap();
    manifest["layers"][0]["digest"]
        .as_str()
        .unwrap()
        .to_string()
}

fn opts(s: &Setup) -> PullOptions {
    PullOptions {
        insecure_registries: vec![s.proxy.addr.clone()],
        retry: RetryPolicy {
            attempts: 4,
            base_delay: Duration::from_millis(10),
            max_delay: Duration::from_millis(50),
            stall_timeout: Duration::from_millis(800),
            ..RetryPolicy::default()
        },
        ..PullOptions::default()
    }
}

async fn pull_err(s: &Setup, opts: &PullOptions) -> String {
    let err = ImageStore::open(s.home.path())
        .unwrap()
        .ensure(&s.reference, opts)
        .await
        .expect_err("pull must fail")
        .to_string();
    let temps: Vec<_> = files_below(&s.home.path().join("blobs"))
        .into_iter()
        .filter(|p| p.to_string_lossy().contains(".tmp-"))
        .collect();
    assert!(temps.is_empty(), "partial blobs left: {temps:?}");
    assert!(files_below(&s.home.path().join("rootfs")).is_empty());
    err
}

#[tokio::test]
async fn server_errors_are_retried() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(
        "/manifests/",
        Fault::Status {
            code: 500,
            times: 2,
        },
    );
    s.proxy.fault(
        &s.layer,
        Fault::Status {
            code: 503,
            times: 2,
        },
    );
    let image = pull(s.home.path(), &s.reference, &opts(&s)).await;
    assert!(exists(&image.rootfs, "/bin/busybox"));
    let log = s.proxy.log();
    assert_eq!(
        log.iter().filter(|l| l.contains("injected")).count(),
        4,
        "{log:#?}"
    );
}

#[tokio::test]
async fn persistent_server_errors_give_up_with_the_status() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(
        "/manifests/",
        Fault::Status {
            code: 500,
            times: 1000,
        },
    );
    let err = pull_err(&s, &opts(&s)).await;
    assert!(err.contains("500") && err.contains("4 attempts"), "{err}");
}

#[tokio::test]
async fn bearer_challenge_is_answered_with_a_token() {
    let Some(s) = setup().await else { return };
    s.proxy.auth(Auth::Bearer {
        token: "t0k3n".into(),
        user: "alice".into(),
        pass: "s3cret".into(),
    });
    let err = pull_err(&s, &opts(&s)).await;
    assert!(err.contains("denied") && err.contains("--creds"), "{err}");
    let with_creds = PullOptions {
        credentials: HostCredentials::new().with(
            &s.proxy.addr,
            Credentials {
                username: "alice".into(),
                password: "s3cret".into(),
            },
        ),
        ..opts(&s)
    };
    let image = pull(s.home.path(), &s.reference, &with_creds).await;
    assert!(image.rootfs.exists());
    assert!(s.proxy.log().iter().any(|l| l.ends_with("-> token")));
}

#[tokio::test]
async fn basic_challenge_uses_credentials() {
    let Some(s) = setup().await else { return };
    s.proxy.auth(Auth::Basic {
        user: "bob".into(),
        pass: "pw".into(),
    });
    let wrong = PullOptions {
        credentials: HostCredentials::new().with(&s.proxy.addr, "bob:nope".parse().unwrap()),
        ..opts(&s)
    };
    let err = pull_err(&s, &wrong).await;
    assert!(err.contains("refused"), "{err}");
    let right = PullOptions {
        credentials: HostCredentials::new().with(&s.proxy.addr, "bob:pw".parse().unwrap()),
        ..opts(&s)
    };
    assert!(pull(s.home.path(), &s.reference, &right)
        .await
        .rootfs
        .exists());
}

#[tokio::test]
async fn reset_and_stall_mid_blob_resume_with_range() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(
        &s.layer,
        Fault::ResetAfter {
            bytes: 100_000,
            times: 1,
        },
    );
    s.proxy.fault(
        &s.layer,
        Fault::StallAfter {
            bytes: 100_000,
            stall: Duration::from_secs(3),
            times: 1,
        },
    );
    let image = pull(s.home.path(), &s.reference, &opts(&s)).await;
    assert!(exists(&image.rootfs, "/bin/busybox"));
    let log = s.proxy.log();
    let blob: Vec<_> = log.iter().filter(|l| l.contains(&s.layer)).collect();
    assert!(
        blob[0].contains("range=-") && blob[0].ends_with("reset"),
        "{log:#?}"
    );
    assert!(
        blob[1].contains("range=bytes=100000-") && blob[1].ends_with("stall"),
        "{log:#?}"
    );
    assert!(
        blob[2].contains("range=bytes=200000-") && blob[2].ends_with("forwarded"),
        "{log:#?}"
    );
}

#[tokio::test]
async fn truncated_blob_fails_and_leaves_nothing() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(&s.layer, Fault::Truncate { bytes: 1000 });
    let err = pull_err(&s, &opts(&s)).await;
    assert!(
        err.contains(&s.layer) && err.contains("after 4 attempts"),
        "{err}"
    );
    assert!(!blob_exists(s.home.path(), &s.layer));
}

#[tokio::test]
async fn corrupted_blob_fails_verification_and_leaves_nothing() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(&s.layer, Fault::Corrupt { at: 5000 });
    let err = pull_err(&s, &opts(&s)).await;
    assert!(
        err.contains(&s.layer) && err.contains("failed verification"),
        "{err}"
    );
    assert!(!blob_exists(s.home.path(), &s.layer));
}

/// A pull cancelled in the middle of a blob (its sandbox deleted while creating) leaves no build
/// directory behind, and the next pull of the image works.
#[tokio::test]
async fn a_pull_cancelled_mid_blob_leaves_no_build_directory() {
    let Some(s) = setup().await else { return };
    s.proxy.fault(
        &s.layer,
        Fault::StallAfter {
            bytes: 300_000,
            stall: Duration::from_secs(5),
            times: 1,
        },
    );
    let (home, reference, options) = (s.home.path().to_owned(), s.reference.clone(), opts(&s));
    let pulling = tokio::spawn(async move {
        let store = ImageStore::open(&home).unwrap();
        store.ensure(&reference, &options).await.map(|_| ())
    });
    let tmp = s.home.path().join("tmp");
    let builds = || -> Vec<_> {
        std::fs::read_dir(&tmp)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !s.proxy.log().iter().any(|l| l.ends_with("stall")) {
        assert!(std::time::Instant::now() < deadline, "{:#?}", s.proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        builds().len(),
        1,
        "a build directory while the blob arrives"
    );
    pulling.abort();
    let _ = pulling.await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !builds().is_empty() {
        assert!(std::time::Instant::now() < deadline, "left: {:?}", builds());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let image = pull(s.home.path(), &s.reference, &opts(&s)).await;
    assert!(exists(&image.rootfs, "/bin/busybox"));
}
