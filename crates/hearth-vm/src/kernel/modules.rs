//! Kernel module resolution without `modules.dep` (Debian's package ships none): each `.ko` names its
//! dependencies in the `depends=` field of its ELF `.modinfo` section. Given the wanted module names,
//! produces the files to load in dependency order, skipping modules the kernel has built in
//! (`modules.builtin`). Reads the modules directory only.

use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

use super::elf::{Elf, ElfError};

/// A module to load, in load order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedModule {
    /// Canonical name (`-` folded to `_`, as the kernel does).
    pub name: String,
    pub path: PathBuf,
}

/// Resolves `wanted` (module names) against `modules_dir` into a load order: every module after the
/// modules it depends on, wanted modules in the order given otherwise. Built-in modules are dropped.
pub fn resolve_modules(
    modules_dir: &Path,
    wanted: &[&str],
) -> Result<Vec<ResolvedModule>, ModuleError> {
    let index = index_modules(modules_dir)?;
    let builtin = builtin_modules(modules_dir);
    let mut order = Vec::new();
    let mut done = HashSet::new();
    for name in wanted {
        visit(
            &canonical(name),
            &index,
            &builtin,
            &mut done,
            &mut Vec::new(),
            &mut order,
        )?;
    }
    Ok(order)
}

fn visit(
    name: &str,
    index: &BTreeMap<String, PathBuf>,
    builtin: &HashSet<String>,
    done: &mut HashSet<String>,
    stack: &mut Vec<String>,
    order: &mut Vec<ResolvedModule>,
) -> Result<(), ModuleError> {
    if done.contains(name) || builtin.contains(name) {
        return Ok(());
    }
    if stack.iter().any(|n| n == name) {
        stack.push(name.to_owned());
        return Err(ModuleError::Cycle(stack.join(" -> ")));
    }
    let path = index.get(name).ok_or_else(|| ModuleError::NotFound {
        name: name.to_owned(),
        needed_by: stack.last().cloned(),
    })?;
    if path.extension().is_some_and(|e| e != "ko") {
        return Err(ModuleError::Compressed(path.clone()));
    }
    stack.push(name.to_owned());
    for dep in module_depends(path)? {
        visit(&dep, index, builtin, done, stack, order)?;
    }
    stack.pop();
    done.insert(name.to_owned());
    order.push(ResolvedModule {
        name: name.to_owned(),
        path: path.clone(),
    });
    Ok(())
}

/// The `depends=` list of one module file.
pub fn module_depends(path: &Path) -> Result<Vec<String>, ModuleError> {
    let bytes = std::fs::read(path).map_err(|source| ModuleError::Io {
        path: path.to_owned(),
        source,
    })?;
    let elf = Elf::parse(&bytes).map_err(|source| ModuleError::Elf {
        path: path.to_owned(),
        source,
    })?;
    let modinfo = elf
        .section(".modinfo")
        .map_err(|source| ModuleError::Elf {
            path: path.to_owned(),
            source,
        })?
        .ok_or_else(|| ModuleError::NoModinfo(path.to_owned()))?;
    let depends = modinfo
        .split(|&b| b == 0)
        .find_map(|field| field.strip_prefix(b"depends="))
        .unwrap_or_default();
    Ok(String::from_utf8_lossy(depends)
        .split(',')
        .filter(|d| !d.is_empty())
        .map(canonical)
        .collect())
}

/// Every `.ko` under `dir`, by canonical name. A compressed module (`.ko.xz`, `.ko.zst`) is indexed
/// too so that asking for it gives a clear error instead of "not found".
fn index_modules(dir: &Path) -> Result<BTreeMap<String, PathBuf>, ModuleError> {
    let mut index = BTreeMap::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(dir) = pending.pop() {
        let entries = std::fs::read_dir(&dir).map_err(|source| ModuleError::Io {
            path: dir.clone(),
            source,
        })?;
        for entry in entries {
            let entry = entry.map_err(|source| ModuleError::Io {
                path: dir.clone(),
                source,
            })?;
            let path = entry.path();
            let file_type = entry.file_type().map_err(|source| ModuleError::Io {
                path: path.clone(),
                source,
            })?;
            if file_type.is_dir() {
                pending.push(path);
            } else if let Some(name) = module_name(&path) {
                index.insert(name, path);
            }
        }
    }
    Ok(index)
}

fn module_name(path: &Path) -> Option<String> {
    let file = path.file_name()?.to_str()?;
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|ext| file.strip_suffix(ext))?;
    Some(canonical(stem))
}

fn builtin_modules(dir: &Path) -> HashSet<String> {
    std::fs::read_to_string(dir.join("modules.builtin"))
        .unwrap_or_default()
        .lines()
        .filter_map(|line| module_name(Path::new(line.trim())))
        .collect()
}

/// The kernel treats `-` and `_` in module names alike.
fn canonical(name: &str) -> String {
    name.replace('-', "_")
}

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading kernel module {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("kernel module {path}: {source}")]
    Elf { path: PathBuf, source: ElfError },
    #[error("kernel module {0} has no .modinfo section")]
    NoModinfo(PathBuf),
    #[error("kernel module {name} not found{}; is it built into this kernel or missing from modules/?",
            needed_by.as_ref().map(|n| format!(" (needed by {n})")).unwrap_or_default())]
    NotFound {
        name: String,
        needed_by: Option<String>,
    },
    #[error("kernel module dependency cycle: {0}")]
    Cycle(String),
    #[error("kernel module {0} is compressed; hearth needs uncompressed .ko files in the kernel directory")]
    Compressed(PathBuf),
}

/// The trailer the kernel's sign-file appends after a module's signature.
const SIGNATURE_MAGIC: &[u8] = b"~Module signature appended~\n";
/// `struct module_signature`: algo, hash, id_type, signer_len, key_id_len, pad[3], be32 sig_len.
const SIGNATURE_INFO_LEN: usize = 12;

/// Removes an appended module signature, leaving the plain ELF module. Returns whether one was there.
/// A malformed trailer leaves the data untouched.
pub fn strip_signature(module: &mut Vec<u8>) -> bool {
    let Some(end) = module.len().checked_sub(SIGNATURE_MAGIC.len()) else {
        return false;
    };
    if &module[end..] != SIGNATURE_MAGIC || end < SIGNATURE_INFO_LEN {
        return false;
    }
    let info = &module[end - SIGNATURE_INFO_LEN..end];
    let sig_len = u32::from_be_bytes([info[8], info[9], info[10], info[11]]) as usize;
    let extra = info[3] as usize + info[4] as usize; // signer name and key id, empty for PKCS#7
    match (end - SIGNATURE_INFO_LEN).checked_sub(sig_len + extra) {
        Some(plain) => {
            module.truncate(plain);
            true
        }
        None => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture_modules() -> PathBuf {
        hearth_testkit::kernel_dir().join("modules")
    }

    #[test]
    fn resolves_the_guest_modules_of_the_real_kernel_in_dependency_order() {
        let wanted = [
            "virtio_mmio",
            "virtio_blk",
            "virtio_console",
            "overlay",
            "vsock",
            "vmw_vsock_virtio_transport_common",
            "vmw_vsock_virtio_transport",
        ];
        let order = resolve_modules(&fixture_modules(), &wanted).unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(
            names,
            [
                "virtio_ring",
                "virtio",
                "virtio_mmio",
                "virtio_blk",
                "virtio_console",
                "overlay",
                "vsock",
                "vmw_vsock_virtio_transport_common",
                "vmw_vsock_virtio_transport",
            ]
        );
        assert!(order.iter().all(|m| m.path.is_file()));
    }

    #[test]
    fn signature_is_stripped_to_the_plain_elf_module() {
        let path = fixture_modules().join("kernel/drivers/block/virtio_blk.ko");
        let signed = std::fs::read(&path).unwrap();
        let mut module = signed.clone();
        assert!(strip_signature(&mut module), "Debian signs its modules");
        assert!(module.starts_with(b"\x7fELF") && module.len() < signed.len());
        // The ELF section headers end the plain module: e_shoff + e_shnum * e_shentsize.
        let u64_at = |o: usize| u64::from_le_bytes(module[o..o + 8].try_into().unwrap());
        let u16_at = |o: usize| u16::from_le_bytes(module[o..o + 2].try_into().unwrap()) as u64;
        assert_eq!(
            u64_at(0x28) + u16_at(0x3c) * u16_at(0x3a),
            module.len() as u64
        );
        assert!(!strip_signature(&mut module), "nothing left to strip");
        let mut junk = b"not a module".to_vec();
        assert!(!strip_signature(&mut junk));
        assert_eq!(junk, b"not a module");
    }

    #[test]
    fn builtin_modules_are_skipped_and_unknown_ones_named() {
        // ext4 is built into the Debian cloud kernel (modules.builtin lists it).
        let order = resolve_modules(&fixture_modules(), &["ext4", "virtio"]).unwrap();
        let names: Vec<&str> = order.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["virtio_ring", "virtio"]);
        let err = resolve_modules(&fixture_modules(), &["no_such_module"]).unwrap_err();
        assert!(err.to_string().contains("no_such_module"), "{err}");
    }

    #[test]
    fn dashes_and_underscores_name_the_same_module() {
        assert_eq!(
            module_name(Path::new("a/b/crc-t10dif.ko")).as_deref(),
            Some("crc_t10dif")
        );
        assert_eq!(module_name(Path::new("x.ko.xz")).as_deref(), Some("x"));
        assert_eq!(module_name(Path::new("modules.order")), None);
    }
}
