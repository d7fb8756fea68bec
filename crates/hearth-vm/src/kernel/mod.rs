//! The guest kernel: hearth's kernel directory ([`KernelDir`]: `vmlinuz`, `release`, `modules/`),
//! the ELF vmlinux that backends boot (extracted from the bzImage once and cached beside it), module
//! resolution (`modules`) and `hearth setup` provisioning (`provision`).
//!
//! Reads the kernel directory; writes only `vmlinux` into it (atomically).

pub mod elf;
mod guest;
pub mod lz4;
pub mod modules;
pub mod provision;

use std::path::{Path, PathBuf};

pub use guest::{resolve_kernel, GuestKernel};
pub use modules::{resolve_modules, ModuleError, ResolvedModule};
pub use provision::{provision_kernel, ProvisionError};

/// A kernel directory: `vmlinuz` (bzImage), `release` (e.g. `6.1.0-56-cloud-amd64`) and `modules/`
/// (the contents of `lib/modules/<release>/`). `$HEARTH_HOME/kernel/` in production.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelDir {
    root: PathBuf,
    release: String,
}

impl KernelDir {
    /// Opens and checks a kernel directory.
    pub fn open(root: impl Into<PathBuf>) -> Result<Self, KernelError> {
        let root = root.into();
        let release_path = root.join("release");
        let release = match std::fs::read_to_string(&release_path) {
            Ok(text) => text.trim().to_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(KernelError::Layout {
                    dir: root,
                    missing: "a release file",
                });
            }
            Err(source) => {
                return Err(KernelError::Io {
                    what: "reading",
                    path: release_path,
                    source,
                })
            }
        };
        if release.is_empty() {
            return Err(KernelError::Layout {
                dir: root,
                missing: "a non-empty release file",
            });
        }
        let dir = KernelDir { root, release };
        if !dir.vmlinuz().is_file() && !dir.root.join("vmlinux").is_file() {
            return Err(KernelError::Layout {
                dir: dir.root,
                missing: "vmlinuz (or vmlinux)",
            });
        }
        Ok(dir)
    }

    /// The conventional location under `HEARTH_HOME`.
    pub fn in_home(home: &Path) -> PathBuf {
        home.join("kernel")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn release(&self) -> &str {
        &self.release
    }

    pub fn vmlinuz(&self) -> PathBuf {
        self.root.join("vmlinuz")
    }

    /// `modules/`, or `None` when the directory ships no modules (a kernel with everything built in).
    pub fn modules_dir(&self) -> Option<PathBuf> {
        let dir = self.root.join("modules");
        dir.is_dir().then_some(dir)
    }

    /// The ELF vmlinux, extracted from `vmlinuz` on first use and cached as `vmlinux` in this
    /// directory. A `vmlinux` already present (e.g. shipped by the user) is used as is after checking
    /// that it is ELF.
    pub fn vmlinux(&self) -> Result<PathBuf, KernelError> {
        let cached = self.root.join("vmlinux");
        if cached.is_file() {
            check_elf(&cached)?;
            return Ok(cached);
        }
        extract_vmlinux_to(&self.vmlinuz(), &cached)?;
        Ok(cached)
    }
}

/// Extracts the vmlinux inside an LZ4 bzImage (or copies an ELF kernel) to `out`, atomically; an
/// `out` already there (a concurrent extraction's) is kept.
pub fn extract_vmlinux_to(kernel: &Path, out: &Path) -> Result<(), KernelError> {
    let bytes = std::fs::read(kernel).map_err(|source| KernelError::Io {
        what: "reading",
        path: kernel.to_owned(),
        source,
    })?;
    let vmlinux = if elf::is_elf(&bytes) {
        bytes
    } else {
        extract_vmlinux(&bytes, kernel)?
    };
    crate::fsutil::write_once(out, &vmlinux).map_err(|source| KernelError::Io {
        what: "writing",
        path: out.to_owned(),
        source,
    })
}

/// Decompresses the vmlinux out of an LZ4 bzImage held in memory and checks that it is ELF.
pub fn extract_vmlinux(bzimage: &[u8], origin: &Path) -> Result<Vec<u8>, KernelError> {
    let payload = lz4::find_payload(bzimage).map_err(|source| KernelError::Lz4 {
        path: origin.to_owned(),
        source,
    })?;
    let vmlinux = lz4::decompress_payload(&payload).map_err(|source| KernelError::Lz4 {
        path: origin.to_owned(),
        source,
    })?;
    elf::Elf::parse(&vmlinux).map_err(|source| KernelError::NotElf {
        path: origin.to_owned(),
        source,
    })?;
    Ok(vmlinux)
}

fn check_elf(path: &Path) -> Result<(), KernelError> {
    use std::io::Read;
    let mut head = [0u8; 64];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut head))
        .map_err(|source| KernelError::Io {
            what: "reading",
            path: path.to_owned(),
            source,
        })?;
    elf::Elf::parse(&head).map_err(|source| KernelError::NotElf {
        path: path.to_owned(),
        source,
    })?;
    Ok(())
}

#[derive(Debug, thiserror::Error)]
pub enum KernelError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel directory {dir} lacks {missing}; run `hearth setup` or pass --kernel")]
    Layout { dir: PathBuf, missing: &'static str },
    #[error("extracting vmlinux from {path}: {source}")]
    Lz4 {
        path: PathBuf,
        source: lz4::Lz4Error,
    },
    #[error("{path} does not hold an ELF vmlinux: {source}")]
    NotElf {
        path: PathBuf,
        source: elf::ElfError,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extracts_an_elf_vmlinux_with_a_pvh_note_from_the_real_kernel() {
        let kernel = KernelDir::open(hearth_testkit::kernel_dir()).unwrap();
        let bzimage = std::fs::read(kernel.vmlinuz()).unwrap();
        let vmlinux = extract_vmlinux(&bzimage, &kernel.vmlinuz()).unwrap();
        assert!(vmlinux.starts_with(b"\x7fELF"));
        assert!(
            vmlinux.len() > bzimage.len(),
            "decompressed is larger than compressed"
        );
        assert!(
            elf::Elf::parse(&vmlinux).unwrap().has_pvh_entry().unwrap(),
            "no PVH entry note"
        );
    }

    #[test]
    fn open_reports_what_is_missing() {
        let tmp = tempfile::tempdir().unwrap();
        let err = KernelDir::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("release"), "{err}");
        std::fs::write(tmp.path().join("release"), "6.1.0-test\n").unwrap();
        let err = KernelDir::open(tmp.path()).unwrap_err();
        assert!(err.to_string().contains("vmlinuz"), "{err}");
        std::fs::write(tmp.path().join("vmlinuz"), b"MZ").unwrap();
        let dir = KernelDir::open(tmp.path()).unwrap();
        assert_eq!(dir.release(), "6.1.0-test");
        assert_eq!(dir.modules_dir(), None);
        assert!(matches!(dir.vmlinux(), Err(KernelError::Lz4 { .. })));
    }
}
