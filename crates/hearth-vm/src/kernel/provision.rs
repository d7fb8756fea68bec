//! `hearth setup`'s kernel step: download (never install) Debian's cloud kernel package and unpack the
//! parts hearth uses into `$HEARTH_HOME/kernel/` (`vmlinuz`, `release`, `modules/`).
//!
//! Runs `apt-cache`, `apt-get download` and `dpkg-deb`; writes only under `HEARTH_HOME` (a temp dir,
//! then one rename into place, so an interrupted setup leaves no half-provisioned kernel).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::KernelDir;

/// The metapackage that always depends on Debian's current cloud kernel.
pub const CLOUD_KERNEL_METAPACKAGE: &str = "linux-image-cloud-amd64";

/// Provisions the kernel into `$home/kernel` unless a usable one is already there (idempotent).
pub fn provision_kernel(home: &Path) -> Result<KernelDir, ProvisionError> {
    let target = KernelDir::in_home(home);
    if let Ok(existing) = KernelDir::open(&target) {
        if existing.modules_dir().is_some() {
            return Ok(existing);
        }
    }
    let package = resolve_kernel_package(CLOUD_KERNEL_METAPACKAGE)?;
    let tmp_parent = home.join("tmp");
    std::fs::create_dir_all(&tmp_parent)
        .map_err(|e| ProvisionError::io("creating", &tmp_parent, e))?;
    let tmp = tempfile::Builder::new()
        .prefix("kernel-setup-")
        .tempdir_in(&tmp_parent)
        .map_err(|e| ProvisionError::io("creating a temp dir in", &tmp_parent, e))?;
    // apt drops to the `_apt` user for downloads; a root-only temp dir only earns a warning.
    run(Command::new("apt-get")
        .args(["download", "-q", &package])
        .current_dir(tmp.path()))?;
    let deb = find_deb(tmp.path(), &package)?;
    let unpacked = tmp.path().join("unpacked");
    run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&unpacked))?;
    let staged = tmp.path().join("kernel");
    stage_kernel(&unpacked, &staged)?;
    if target.exists() {
        std::fs::remove_dir_all(&target).map_err(|e| ProvisionError::io("removing", &target, e))?;
    }
    std::fs::rename(&staged, &target)
        .map_err(|e| ProvisionError::io("moving the kernel to", &target, e))?;
    KernelDir::open(&target).map_err(ProvisionError::Kernel)
}

/// `apt-cache depends linux-image-cloud-amd64` names the versioned image package it pulls in.
pub fn resolve_kernel_package(metapackage: &str) -> Result<String, ProvisionError> {
    let output = run(Command::new("apt-cache").args(["depends", metapackage]))?;
    parse_depends(&output, metapackage).ok_or_else(|| ProvisionError::NoKernelPackage {
        metapackage: metapackage.to_owned(),
        output,
    })
}

fn parse_depends(apt_cache_output: &str, metapackage: &str) -> Option<String> {
    let flavour = metapackage.strip_prefix("linux-image")?; // "-cloud-amd64"
    apt_cache_output.lines().find_map(|line| {
        let package = line
            .trim()
            .trim_start_matches('|')
            .strip_prefix("Depends:")?
            .trim();
        (package.starts_with("linux-image-")
            && package.ends_with(flavour)
            && package != metapackage)
            .then(|| package.to_owned())
    })
}

fn find_deb(dir: &Path, package: &str) -> Result<PathBuf, ProvisionError> {
    let entries = std::fs::read_dir(dir).map_err(|e| ProvisionError::io("listing", dir, e))?;
    entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            name.starts_with(&format!("{package}_")) && name.ends_with(".deb")
        })
        .ok_or_else(|| ProvisionError::NoDeb {
            package: package.to_owned(),
            dir: dir.to_owned(),
        })
}

/// Moves `boot/vmlinuz-<release>` and `lib/modules/<release>/` of an unpacked package into the
/// kernel directory layout; everything else in the package is dropped.
fn stage_kernel(unpacked: &Path, staged: &Path) -> Result<(), ProvisionError> {
    let boot = unpacked.join("boot");
    let entries = std::fs::read_dir(&boot).map_err(|e| ProvisionError::io("listing", &boot, e))?;
    let release = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            e.file_name()
                .to_str()?
                .strip_prefix("vmlinuz-")
                .map(str::to_owned)
        })
        .next()
        .ok_or_else(|| {
            ProvisionError::PackageLayout(format!("no vmlinuz-* in {}", boot.display()))
        })?;
    let modules = ["lib", "usr/lib"]
        .iter()
        .map(|lib| unpacked.join(lib).join("modules").join(&release))
        .find(|p| p.is_dir())
        .ok_or_else(|| {
            ProvisionError::PackageLayout(format!("no lib/modules/{release} in the package"))
        })?;
    std::fs::create_dir_all(staged).map_err(|e| ProvisionError::io("creating", staged, e))?;
    let vmlinuz = boot.join(format!("vmlinuz-{release}"));
    std::fs::rename(&vmlinuz, staged.join("vmlinuz"))
        .map_err(|e| ProvisionError::io("moving", &vmlinuz, e))?;
    std::fs::rename(&modules, staged.join("modules"))
        .map_err(|e| ProvisionError::io("moving", &modules, e))?;
    let release_file = staged.join("release");
    std::fs::write(&release_file, format!("{release}\n"))
        .map_err(|e| ProvisionError::io("writing", &release_file, e))
}

fn run(command: &mut Command) -> Result<String, ProvisionError> {
    let program = command.get_program().to_string_lossy().into_owned();
    let output = command.output().map_err(|source| ProvisionError::Tool {
        program: program.clone(),
        source,
    })?;
    if !output.status.success() {
        return Err(ProvisionError::ToolFailed {
            command: format!(
                "{program} {}",
                command
                    .get_args()
                    .map(|a| a.to_string_lossy())
                    .collect::<Vec<_>>()
                    .join(" ")
            ),
            status: output.status,
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(String::from_utf8_lossy(&output.stdout).into_owned())
}

#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(
        "cannot run {program}: {source}; kernel provisioning needs Debian's apt tools \
             (or pass --kernel PATH to use your own kernel)"
    )]
    Tool {
        program: String,
        source: std::io::Error,
    },
    #[error("`{command}` failed ({status}): {stderr}; if apt has no package lists yet, run `apt-get update`")]
    ToolFailed {
        command: String,
        status: std::process::ExitStatus,
        stderr: String,
    },
    #[error("`apt-cache depends {metapackage}` names no versioned kernel package; output was:\n{output}")]
    NoKernelPackage { metapackage: String, output: String },
    #[error("apt-get download left no {package}_*.deb in {dir}")]
    NoDeb { package: String, dir: PathBuf },
    #[error("unexpected kernel package layout: {0}")]
    PackageLayout(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("provisioned kernel is unusable: {0}")]
    Kernel(super::KernelError),
}

impl ProvisionError {
    fn io(what: &'static str, path: &Path, source: std::io::Error) -> Self {
        ProvisionError::Io {
            what,
            path: path.to_owned(),
            source,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn picks_the_versioned_image_from_apt_cache_depends() {
        let output = "linux-image-cloud-amd64\n  Depends: linux-image-6.1.0-56-cloud-amd64\n";
        assert_eq!(
            parse_depends(output, CLOUD_KERNEL_METAPACKAGE).as_deref(),
            Some("linux-image-6.1.0-56-cloud-amd64")
        );
        let alternatives =
            "linux-image-cloud-amd64\n |Depends: linux-image-6.1.0-9-cloud-amd64\n  Depends: x\n";
        assert_eq!(
            parse_depends(alternatives, CLOUD_KERNEL_METAPACKAGE).as_deref(),
            Some("linux-image-6.1.0-9-cloud-amd64")
        );
        assert_eq!(
            parse_depends(
                "linux-image-cloud-amd64\n  Depends: foo\n",
                CLOUD_KERNEL_METAPACKAGE
            ),
            None
        );
    }

    #[test]
    fn stages_vmlinuz_release_and_modules_from_an_unpacked_package() {
        let tmp = tempfile::tempdir().unwrap();
        let unpacked = tmp.path().join("u");
        std::fs::create_dir_all(unpacked.join("boot")).unwrap();
        std::fs::create_dir_all(unpacked.join("lib/modules/6.1.0-1-cloud-amd64/kernel")).unwrap();
        std::fs::write(unpacked.join("boot/vmlinuz-6.1.0-1-cloud-amd64"), b"bz").unwrap();
        std::fs::write(unpacked.join("boot/config-6.1.0-1-cloud-amd64"), b"c").unwrap();
        let staged = tmp.path().join("k");
        stage_kernel(&unpacked, &staged).unwrap();
        let dir = KernelDir::open(&staged).unwrap();
        assert_eq!(dir.release(), "6.1.0-1-cloud-amd64");
        assert!(dir.modules_dir().unwrap().join("kernel").is_dir());
        assert!(!staged.join("config-6.1.0-1-cloud-amd64").exists());
    }
}
