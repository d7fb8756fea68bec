//! `hearth setup`'s kernel provisioning against the real Debian archive: downloads ~30 MiB, so it runs
//! only with `HEARTH_TEST_APT=1` (and after `apt-get update`).

use hearth_vm::kernel::{provision_kernel, resolve_modules, KernelDir};

#[test]
fn provisions_the_cloud_kernel_from_apt_and_is_idempotent() -> anyhow::Result<()> {
    if std::env::var("HEARTH_TEST_APT").as_deref() != Ok("1") {
        hearth_testkit::skip(
            "set HEARTH_TEST_APT=1 to download Debian's cloud kernel package with apt",
        );
        return Ok(());
    }
    let home = tempfile::tempdir()?;
    let kernel = provision_kernel(home.path())?;
    assert_eq!(kernel.root(), KernelDir::in_home(home.path()));
    assert!(
        kernel.release().ends_with("-cloud-amd64"),
        "{}",
        kernel.release()
    );
    let modules = kernel.modules_dir().expect("modules/");
    assert_eq!(
        resolve_modules(&modules, &["virtio_blk"])?
            .last()
            .unwrap()
            .name,
        "virtio_blk"
    );
    assert!(std::fs::read(kernel.vmlinux()?)?.starts_with(b"\x7fELF"));
    // Only the kernel directory remains; the temp area is empty.
    let leftovers: Vec<_> = std::fs::read_dir(home.path().join("tmp"))?.collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let started = std::time::Instant::now();
    assert_eq!(provision_kernel(home.path())?, kernel);
    assert!(
        started.elapsed().as_millis() < 500,
        "second setup re-downloaded"
    );
    Ok(())
}
