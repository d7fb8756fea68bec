//! `hearth pull`, `hearth images`, `hearth image inspect` and `hearth rmi` through the real binary
//! against the real test registry: what a user types and reads. (The library behind them is tested
//! in depth in hearth-image's own tests.)

use std::path::Path;
use std::process::{Command, Output};

fn hearth(home: &Path, args: &[&str]) -> Output {
    let registry = hearth_testkit::registry().expect("test registry");
    Command::new(env!("CARGO_BIN_EXE_hearth"))
        .env("HEARTH_HOME", home)
        .env("HEARTH_INSECURE_REGISTRIES", &registry.addr)
        .args(args)
        .output()
        .expect("spawn hearth")
}

fn json(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("JSON on stdout")
}

#[test]
fn pull_list_inspect_and_remove() {
    let home = tempfile::tempdir().unwrap();
    let image = hearth_testkit::image_ref("busybox").unwrap();

    let pulled = json(&hearth(home.path(), &["pull", "--json", &image]));
    let digest = pulled["manifest_digest"].as_str().unwrap().to_string();
    assert!(digest.starts_with("sha256:"));
    assert_eq!(pulled["cached"], false);
    let rootfs = pulled["rootfs"].as_str().unwrap();
    assert!(rootfs.starts_with(home.path().to_str().unwrap()) && Path::new(rootfs).is_file());
    assert_eq!(pulled["config"]["cmd"], serde_json::json!(["sh"]));

    let again = json(&hearth(home.path(), &["pull", "--json", &image]));
    assert_eq!(again["cached"], true, "a repeat pull reuses the cache");
    assert_eq!(again["manifest_digest"], digest.as_str());

    let listed = json(&hearth(home.path(), &["images", "--json"]));
    let records = listed.as_array().unwrap();
    assert_eq!(records.len(), 1);
    assert_eq!(records[0]["manifest_digest"], digest.as_str());
    let table = hearth(home.path(), &["images"]);
    assert!(String::from_utf8_lossy(&table.stdout).contains("hearth-test/busybox"));

    let inspected = json(&hearth(home.path(), &["image", "inspect", &image]));
    assert!(inspected.to_string().contains(&digest));

    let removed = hearth(home.path(), &["rmi", &image]);
    assert!(
        removed.status.success(),
        "{}",
        String::from_utf8_lossy(&removed.stderr)
    );
    assert!(
        !Path::new(rootfs).exists(),
        "root filesystem deleted with the image"
    );
    assert_eq!(
        json(&hearth(home.path(), &["images", "--json"])),
        serde_json::json!([])
    );
}

#[test]
fn bad_references_fail_clearly_and_write_nothing() {
    let home = tempfile::tempdir().unwrap();
    let registry = hearth_testkit::registry().unwrap();
    for (reference, says) in [
        ("UPPER/case", "UPPER/case"),
        ("busybox:bad tag", "busybox:bad tag"),
        (
            &*format!("{}/hearth-test/missing:latest", registry.addr),
            "missing",
        ),
    ] {
        let out = hearth(home.path(), &["pull", reference]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(125), "{reference}: {stderr}");
        assert!(
            stderr.contains(says),
            "{reference}: the error names the input: {stderr}"
        );
    }
    assert_eq!(
        json(&hearth(home.path(), &["images", "--json"])),
        serde_json::json!([])
    );
}
