//! [`TemplateKey`]: everything a saved template depends on, hashed. A restore is only sound into a
//! QEMU with the same binary, accelerator, CPU model, kernel, initramfs, memory, vCPUs, machine and
//! device arguments and kernel command line, so all of them go into the key: the template's QEMU
//! arguments (with per-VM paths replaced by fixed placeholders) plus the identity (path, size,
//! modification time) of the QEMU binary, kernel and initramfs. Reads only file metadata.

use std::path::{Path, PathBuf};
use std::time::UNIX_EPOCH;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::SnapshotError;
use crate::qemu::{argv, QemuVmm};
use crate::spec::{Drive, GuestMemory, VmSpec};

/// Bumped whenever the way templates are made changes, so old ones are not restored (2: guest
/// memory in the template's `memory` file, left out of `state`).
pub(super) const FORMAT: u32 = 2;
/// Hex digits of the key's hash used as the template's name: 64 bits, short enough to keep socket
/// paths under `$HEARTH_HOME` within `sun_path`'s limit.
const ID_HEX_DIGITS: usize = 16;

/// Which file a key input was, and which version of it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileIdentity {
    pub path: PathBuf,
    pub size: u64,
    pub modified_ns: u128,
}

impl FileIdentity {
    pub(super) fn of(path: &Path) -> Result<FileIdentity, SnapshotError> {
        let metadata = std::fs::metadata(path).map_err(|source| SnapshotError::Io {
            what: "reading the metadata of",
            path: path.to_owned(),
            source,
        })?;
        let modified_ns = metadata
            .modified()
            .ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok())
            .map_or(0, |d| d.as_nanos());
        Ok(FileIdentity {
            path: path.to_owned(),
            size: metadata.len(),
            modified_ns,
        })
    }
}

/// What a template was built from (also recorded in its `meta.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyInputs {
    pub format: u32,
    pub qemu: FileIdentity,
    pub kernel: FileIdentity,
    pub initramfs: FileIdentity,
    /// The template VM's QEMU arguments with per-VM paths replaced by placeholders.
    pub argv: Vec<String>,
}

/// A template's identity: [`KeyInputs`] and the short hash that names its directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TemplateKey {
    pub id: String,
    pub inputs: KeyInputs,
}

impl TemplateKey {
    /// The key of the template VM `template_spec` (see `Template::for_spec`) on `qemu`.
    pub fn new(qemu: &QemuVmm, template_spec: &VmSpec) -> Result<TemplateKey, SnapshotError> {
        let inputs = KeyInputs {
            format: FORMAT,
            qemu: FileIdentity::of(qemu.binary())?,
            kernel: FileIdentity::of(&template_spec.kernel)?,
            initramfs: FileIdentity::of(&template_spec.initramfs)?,
            argv: normalized_argv(qemu, template_spec),
        };
        let json = serde_json::to_vec(&inputs).expect("key inputs serialize");
        let id = hex::encode(Sha256::digest(&json))[..ID_HEX_DIGITS].to_owned();
        Ok(TemplateKey { id, inputs })
    }
}

/// `spec`'s QEMU arguments with everything that differs between VMs of one template (run
/// directory, sockets, console, disk files, restore source) replaced by fixed placeholders. Two
/// specs with equal normalized arguments have identical devices and command lines.
pub(super) fn normalized_argv(qemu: &QemuVmm, spec: &VmSpec) -> Vec<String> {
    let mut normal = spec.clone();
    normal.run_dir = "/@run".into();
    normal.agent_socket = "/@run/agent.sock".into();
    normal.console_log = "/@run/console.log".into();
    normal.detached = false;
    normal.restore_from = None;
    // A template (shared file) and the VMs restored from it (private copy) have the same memory.
    if spec.memory.has_memory_backend() {
        normal.memory = GuestMemory::TemplateFile("/@memory".into());
    }
    normal.drives = spec
        .drives
        .iter()
        .map(|d| Drive::new(&d.serial, format!("/@drive/{}", d.serial), d.read_only))
        .collect();
    argv::render(qemu, &normal)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Accel;

    fn spec(dir: &Path) -> VmSpec {
        let kernel = dir.join("vmlinux");
        let initramfs = dir.join("init.cpio");
        std::fs::write(&kernel, b"kernel").unwrap();
        std::fs::write(&initramfs, b"initramfs").unwrap();
        let mut spec = VmSpec::new(kernel, initramfs, dir.join("run/a"));
        spec.drives = vec![
            Drive::rootfs(dir.join("a.ext4")),
            Drive::scratch(dir.join("run/a/scratch.ext4")),
        ];
        spec
    }

    fn qemu(dir: &Path) -> QemuVmm {
        let binary = dir.join("qemu-system-x86_64");
        std::fs::write(&binary, b"qemu").unwrap();
        QemuVmm::new(binary, Accel::Tcg, Some(2_300_000)).unwrap()
    }

    #[test]
    fn per_vm_paths_do_not_change_the_key_but_devices_and_files_do() {
        let dir = tempfile::tempdir().unwrap();
        let qemu = qemu(dir.path());
        let base = spec(dir.path());
        let key = TemplateKey::new(&qemu, &base).unwrap();
        assert_eq!(key.id.len(), ID_HEX_DIGITS);

        let mut other_vm = base.clone();
        other_vm.run_dir = dir.path().join("run/b");
        other_vm.agent_socket = other_vm.run_dir.join("agent.sock");
        other_vm.drives[0].path = dir.path().join("b.ext4");
        other_vm.restore_from = Some("/somewhere/state".into());
        assert_eq!(TemplateKey::new(&qemu, &other_vm).unwrap(), key);

        let mut more_memory = base.clone();
        more_memory.memory_mib = 1024;
        assert_ne!(TemplateKey::new(&qemu, &more_memory).unwrap().id, key.id);

        let mut writable_rootfs = base.clone();
        writable_rootfs.drives[0].read_only = false;
        assert_ne!(
            TemplateKey::new(&qemu, &writable_rootfs).unwrap().id,
            key.id
        );

        let other_tsc = QemuVmm::new(qemu.binary(), Accel::Tcg, Some(1_000_000)).unwrap();
        assert_ne!(TemplateKey::new(&other_tsc, &base).unwrap().id, key.id);

        std::fs::write(&base.kernel, b"another kernel").unwrap();
        assert_ne!(TemplateKey::new(&qemu, &base).unwrap().id, key.id);
    }

    #[test]
    fn a_missing_kernel_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut spec = spec(dir.path());
        spec.kernel = dir.path().join("gone");
        let err = TemplateKey::new(&qemu(dir.path()), &spec).unwrap_err();
        assert!(err.to_string().contains("gone"), "{err}");
    }
}
