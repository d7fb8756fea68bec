//! hearth's initramfs: `/init` (the static guest agent, mode 0755), the kernel modules the guest needs
//! under `/lib/modules/`, and `/etc/hearth/modules` listing them in load order, one path per line.
//! Uncompressed cpio: the guest unpacks it with a memcpy instead of running a decompressor under
//! emulation. Cached as `$HEARTH_HOME/initramfs/<sha256 of the archive's contents>.cpio`.
//!
//! Reads the agent binary and module files; writes only under `$HEARTH_HOME/initramfs/`.

pub mod cpio;
pub mod floor;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::kernel::{resolve_modules, ModuleError, ResolvedModule};

/// Where the agent reads its module load order.
pub const MODULES_LIST: &str = "etc/hearth/modules";

/// Bumped whenever the archive layout changes, so old cache entries are not reused.
const LAYOUT_VERSION: &str = "hearth-initramfs-v1";

/// Builds the agent initramfs with the modules `wanted` (plus their dependencies) from `modules_dir`
/// (`None`: a kernel with everything built in), or returns the cached copy.
pub fn agent_initramfs(
    home: &Path,
    agent: &Path,
    modules_dir: Option<&Path>,
    wanted: &[&str],
) -> Result<PathBuf, InitramfsError> {
    let agent_bytes = std::fs::read(agent).map_err(|source| InitramfsError::Io {
        what: "reading the guest agent",
        path: agent.to_owned(),
        source,
    })?;
    let modules = match modules_dir {
        Some(dir) => resolve_modules(dir, wanted)?,
        None => Vec::new(),
    };
    let mut builder = InitramfsBuilder::new();
    builder.file("init", 0o755, agent_bytes);
    builder.modules(&modules)?;
    builder.write_cached(home)
}

/// An initramfs being put together; entries are kept sorted so parents precede children.
#[derive(Debug, Clone)]
pub struct InitramfsBuilder {
    entries: BTreeMap<String, Entry>,
}

#[derive(Debug, Clone)]
enum Entry {
    Dir,
    File { perm: u32, data: Vec<u8> },
    CharDevice { major: u32, minor: u32 },
}

impl Default for InitramfsBuilder {
    fn default() -> Self {
        Self::new()
    }
}

impl InitramfsBuilder {
    /// Starts with `/dev/console` (so PID 1 has stdin/stdout/stderr from its first instruction) and
    /// the mount points `/proc` and `/sys`.
    pub fn new() -> Self {
        let mut builder = InitramfsBuilder {
            entries: BTreeMap::new(),
        };
        builder.entries.insert(
            "dev/console".into(),
            Entry::CharDevice { major: 5, minor: 1 },
        );
        for dir in ["dev", "proc", "sys"] {
            builder.entries.insert(dir.into(), Entry::Dir);
        }
        builder
    }

    /// Adds a file at `name` (relative, e.g. `bin/busybox`), creating parent directories.
    pub fn file(&mut self, name: &str, perm: u32, data: Vec<u8>) -> &mut Self {
        self.parents(name);
        self.entries
            .insert(name.to_owned(), Entry::File { perm, data });
        self
    }

    /// Adds the modules as `/lib/modules/<name>.ko` and their load order as [`MODULES_LIST`].
    pub fn modules(&mut self, modules: &[ResolvedModule]) -> Result<&mut Self, InitramfsError> {
        let mut list = String::new();
        for module in modules {
            let mut data = std::fs::read(&module.path).map_err(|source| InitramfsError::Io {
                what: "reading kernel module",
                path: module.path.clone(),
                source,
            })?;
            // Under TCG the guest spends ~80 ms verifying six RSA signatures at every boot. The
            // modules come from the Debian package that apt verified on the host, and the guest is
            // untrusted anyway, so the in-guest check adds no protection (the kernel does not
            // enforce signatures: CONFIG_MODULE_SIG_FORCE is off; it only notes a taint).
            crate::kernel::modules::strip_signature(&mut data);
            let name = format!("lib/modules/{}.ko", module.name);
            list.push_str(&format!("/{name}\n"));
            self.file(&name, 0o644, data);
        }
        self.file(MODULES_LIST, 0o644, list.into_bytes());
        Ok(self)
    }

    /// The archive bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut writer = cpio::CpioWriter::new(Vec::new());
        for (name, entry) in &self.entries {
            // Writing into a Vec cannot fail.
            match entry {
                Entry::Dir => writer.dir(name, 0o755),
                Entry::File { perm, data } => writer.file(name, *perm, data),
                Entry::CharDevice { major, minor } => {
                    writer.char_device(name, 0o600, *major, *minor)
                }
            }
            .expect("writing to memory");
        }
        writer.finish().expect("writing to memory")
    }

    /// Writes the archive to `$home/initramfs/<sha256>.cpio` unless that file exists already.
    pub fn write_cached(&self, home: &Path) -> Result<PathBuf, InitramfsError> {
        let bytes = self.to_bytes();
        let mut hasher = Sha256::new();
        hasher.update(LAYOUT_VERSION);
        hasher.update(&bytes);
        let path = home
            .join("initramfs")
            .join(format!("{}.cpio", hex::encode(hasher.finalize())));
        if !path.is_file() {
            crate::fsutil::write_once(&path, &bytes).map_err(|source| InitramfsError::Io {
                what: "writing initramfs",
                path: path.clone(),
                source,
            })?;
        }
        Ok(path)
    }

    fn parents(&mut self, name: &str) {
        let mut at = 0;
        while let Some(slash) = name[at..].find('/') {
            self.entries
                .entry(name[..at + slash].to_owned())
                .or_insert(Entry::Dir);
            at += slash + 1;
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Modules(#[from] ModuleError),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_initramfs_holds_init_modules_and_their_load_order() {
        let home = tempfile::tempdir().unwrap();
        let agent = home.path().join("agent");
        std::fs::write(&agent, b"\x7fELF pretend agent").unwrap();
        let modules = hearth_testkit::kernel_dir().join("modules");
        let modules = Some(modules.as_path());
        let path = agent_initramfs(home.path(), &agent, modules, &["virtio_blk"]).unwrap();
        assert!(path.starts_with(home.path().join("initramfs")));
        let entries = cpio::read_archive(&std::fs::read(&path).unwrap()).unwrap();
        let find = |name: &str| {
            entries
                .iter()
                .find(|e| e.name == name)
                .unwrap_or_else(|| panic!("{name}"))
        };
        assert_eq!(find("init").mode, cpio::S_IFREG | 0o755);
        assert_eq!(find("init").data, b"\x7fELF pretend agent");
        assert_eq!(find("dev/console").rdev, (5, 1));
        let list = String::from_utf8(find(MODULES_LIST).data.clone()).unwrap();
        assert_eq!(
            list,
            "/lib/modules/virtio_ring.ko\n/lib/modules/virtio.ko\n/lib/modules/virtio_blk.ko\n"
        );
        assert!(find("lib/modules/virtio_blk.ko")
            .data
            .starts_with(b"\x7fELF"));
        // Parents come before children, as the kernel unpacks in archive order.
        let pos = |name: &str| entries.iter().position(|e| e.name == name).unwrap();
        assert!(
            pos("lib") < pos("lib/modules") && pos("lib/modules") < pos("lib/modules/virtio.ko")
        );

        // Same inputs: same cached file. Different agent: a different file.
        let again = agent_initramfs(home.path(), &agent, modules, &["virtio_blk"]).unwrap();
        assert_eq!(again, path);
        std::fs::write(&agent, b"\x7fELF another agent").unwrap();
        assert_ne!(
            agent_initramfs(home.path(), &agent, modules, &["virtio_blk"]).unwrap(),
            path
        );
    }
}
