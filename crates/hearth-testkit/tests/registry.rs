//! The testkit's private registry serves the project's test images and goes away with the process.

use std::process::Command;

#[test]
fn private_registry_serves_test_images() {
    if std::env::var_os("HEARTH_TEST_REGISTRY").is_some() {
        // Exercise the private path even when the suite shares a registry.
        std::env::remove_var("HEARTH_TEST_REGISTRY");
    }
    let registry = hearth_testkit::registry().expect("registry");
    let out = Command::new("curl")
        .args(["-fsS", &format!("http://{}/v2/_catalog", registry.addr)])
        .output()
        .expect("curl");
    let catalog = String::from_utf8_lossy(&out.stdout);
    for name in ["busybox", "python", "layers", "multiarch"] {
        assert!(
            catalog.contains(&format!("hearth-test/{name}")),
            "{name} missing from {catalog}"
        );
    }
}
