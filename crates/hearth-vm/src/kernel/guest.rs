//! Which kernel a VM boots: hearth's own (`$HEARTH_HOME/kernel`, provisioned by `hearth setup`) or
//! the user's (`--kernel PATH`: a kernel directory of the same layout, or a single vmlinux/bzImage).
//! A user's bzImage is decompressed into `$HEARTH_HOME/cache/vmlinux/` rather than beside it, since
//! hearth writes nothing outside its home.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use super::{elf, extract_vmlinux_to, KernelDir, KernelError};

/// A kernel ready to boot.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    /// What the VMM boots: an ELF vmlinux, or a bzImage that is not LZ4 (QEMU boots those as is).
    pub image: PathBuf,
    /// Modules for the initramfs; `None` for a bare kernel file (everything must be built in).
    pub modules_dir: Option<PathBuf>,
    /// The kernel release, when known.
    pub release: Option<String>,
}

/// Resolves `user` (`--kernel`) or, when `None`, hearth's provisioned kernel.
pub fn resolve_kernel(home: &Path, user: Option<&Path>) -> Result<GuestKernel, KernelError> {
    let Some(path) = user else {
        let dir = KernelDir::open(KernelDir::in_home(home))?;
        return Ok(GuestKernel {
            image: dir.vmlinux()?,
            modules_dir: dir.modules_dir(),
            release: Some(dir.release().to_owned()),
        });
    };
    if path.is_dir() {
        let dir = KernelDir::open(path)?;
        let shipped = dir.root().join("vmlinux");
        let image = if shipped.is_file() {
            dir.vmlinux()?
        } else {
            cached_vmlinux(home, &dir.vmlinuz())?
        };
        return Ok(GuestKernel {
            image,
            modules_dir: dir.modules_dir(),
            release: Some(dir.release().to_owned()),
        });
    }
    Ok(GuestKernel {
        image: cached_vmlinux(home, path)?,
        modules_dir: None,
        release: None,
    })
}

/// An ELF kernel as is; an LZ4 bzImage as its vmlinux, extracted once into the cache (keyed by path,
/// size and modification time, so a rebuilt kernel is extracted again); any other bzImage as is.
fn cached_vmlinux(home: &Path, kernel: &Path) -> Result<PathBuf, KernelError> {
    let meta = std::fs::metadata(kernel).map_err(|source| KernelError::Io {
        what: "reading",
        path: kernel.to_owned(),
        source,
    })?;
    let mut head = [0u8; 4];
    let n = std::fs::File::open(kernel)
        .and_then(|mut f| std::io::Read::read(&mut f, &mut head))
        .map_err(|source| KernelError::Io {
            what: "reading",
            path: kernel.to_owned(),
            source,
        })?;
    if elf::is_elf(&head[..n]) {
        return Ok(kernel.to_owned());
    }
    let mtime = meta
        .modified()
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .unwrap_or_default();
    let key = Sha256::digest(format!(
        "{}|{}|{}",
        kernel.display(),
        meta.len(),
        mtime.as_nanos()
    ));
    let cached = home.join("cache").join("vmlinux").join(hex::encode(key));
    if cached.is_file() {
        return Ok(cached);
    }
    match extract_vmlinux_to(kernel, &cached) {
        Ok(()) => Ok(cached),
        // Not LZ4 (gzip, zstd, ...): QEMU boots the bzImage itself.
        Err(KernelError::Lz4 {
            source: super::lz4::Lz4Error::NoPayload,
            ..
        }) => Ok(kernel.to_owned()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_user_bzimage_is_extracted_into_the_home_cache_once() {
        let home = tempfile::tempdir().unwrap();
        let bzimage = KernelDir::open(hearth_testkit::kernel_dir())
            .unwrap()
            .vmlinuz();
        let kernel = resolve_kernel(home.path(), Some(&bzimage)).unwrap();
        assert!(
            kernel.image.starts_with(home.path().join("cache/vmlinux")),
            "{}",
            kernel.image.display()
        );
        assert_eq!(kernel.modules_dir, None);
        assert!(std::fs::read(&kernel.image)
            .unwrap()
            .starts_with(b"\x7fELF"));
        assert_eq!(resolve_kernel(home.path(), Some(&bzimage)).unwrap(), kernel);
        // An ELF kernel is used where it is.
        let again = resolve_kernel(home.path(), Some(&kernel.image)).unwrap();
        assert_eq!(again.image, kernel.image);
    }

    #[test]
    fn without_a_user_kernel_hearths_own_is_required() {
        let home = tempfile::tempdir().unwrap();
        let err = resolve_kernel(home.path(), None).unwrap_err();
        assert!(err.to_string().contains("hearth setup"), "{err}");
    }
}
