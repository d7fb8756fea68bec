//! Loading the kernel modules the guest needs, from the list the host put in the initramfs
//! (`/etc/hearth/modules`: one path per line, in load order, relative to the initramfs root).
//! A template VM (see [`super`]) loads them in two steps: all but [`DEFERRED_IN_TEMPLATE`] before its
//! snapshot, those after RESUME.

use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// The module list inside the initramfs.
pub const MODULE_LIST: &str = "/etc/hearth/modules";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading module list {list}: {source}")]
    List { list: String, source: io::Error },
    #[error("loading kernel module {module}: {source} (is it built for this kernel? the initramfs must match the kernel release)")]
    Load { module: String, source: io::Error },
    #[error("disabling module loading ({MODULES_DISABLED}): {0}")]
    Disable(io::Error),
}

/// The one-way switch that ends module loading until the guest reboots.
pub const MODULES_DISABLED: &str = "/proc/sys/kernel/modules_disabled";

/// Ends module loading for the rest of the guest's life, for everyone (even a process that
/// regained every capability). Call once every module is in: after the workload root is mounted
/// in a cold boot, after RESUME's late init in a template-restored VM (never in the template
/// itself, whose deferred modules load after RESUME).
/// A kernel without module support has no switch: nothing to do.
pub fn disable_loading() -> Result<(), ModuleError> {
    match std::fs::write(MODULES_DISABLED, b"1\n") {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(ModuleError::Disable(e)),
        _ => Ok(()),
    }
}

/// Modules a template VM loads only after RESUME: probing the virtio disks must happen in each
/// restored VM against its own disks, never in the template (whose snapshot would carry the
/// template's placeholder disks' state).
pub const DEFERRED_IN_TEMPLATE: &[&str] = &["virtio_blk"];

/// The module files named in `list`, in load order, as absolute paths (absent list = none).
pub fn read_list(list: &Path) -> Result<Vec<PathBuf>, ModuleError> {
    let text = match std::fs::read_to_string(list) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(ModuleError::List {
                list: list.display().to_string(),
                source,
            })
        }
    };
    Ok(parse_list(&text))
}

fn parse_list(text: &str) -> Vec<PathBuf> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| Path::new("/").join(line))
        .collect()
}

/// Splits `modules` into (load now, load later): later are those named in `deferred`, keeping the
/// list order within each part. Nothing in the list depends on a deferred module (they are leaf
/// drivers), so loading the rest first is a valid order.
pub fn split_deferred(modules: Vec<PathBuf>, deferred: &[&str]) -> (Vec<PathBuf>, Vec<PathBuf>) {
    modules
        .into_iter()
        .partition(|path| !deferred.contains(&module_name(path).as_str()))
}

/// A module's name as the kernel knows it: the file name without `.ko` (and any compression
/// suffix), with `-` read as `_`.
fn module_name(path: &Path) -> String {
    let file = path
        .file_name()
        .map(|f| f.to_string_lossy())
        .unwrap_or_default();
    let stem = file.split(".ko").next().unwrap_or_default();
    stem.replace('-', "_")
}

/// Loads `modules` in order. A module that is already loaded is fine. Returns how many were loaded.
pub fn load_all(modules: &[PathBuf]) -> Result<usize, ModuleError> {
    for path in modules {
        load(path).map_err(|source| ModuleError::Load {
            module: path.display().to_string(),
            source,
        })?;
    }
    Ok(modules.len())
}

fn load(path: &Path) -> io::Result<()> {
    let file = std::fs::File::open(path)?;
    let no_params = c"";
    // SAFETY: finit_module with an open module file, an empty parameter string and no flags.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            no_params.as_ptr(),
            0,
        )
    };
    if ret < 0 {
        let error = io::Error::last_os_error();
        if error.raw_os_error() != Some(libc::EEXIST) {
            return Err(error);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn template_defers_only_virtio_blk_and_keeps_load_order() {
        let list = "# load order\n\
                    lib/modules/6.1/kernel/drivers/virtio/virtio.ko\n\
                    lib/modules/6.1/kernel/drivers/virtio/virtio_ring.ko\n\
                    \n\
                    lib/modules/6.1/kernel/drivers/block/virtio_blk.ko\n\
                    lib/modules/6.1/kernel/fs/overlayfs/overlay.ko\n\
                    lib/modules/6.1/kernel/drivers/block/virtio-blk-extra.ko.xz\n";
        let modules = parse_list(list);
        assert_eq!(modules.len(), 5);
        assert!(modules.iter().all(|m| m.is_absolute()));
        let (now, later) = split_deferred(modules, DEFERRED_IN_TEMPLATE);
        let names = |paths: &[PathBuf]| paths.iter().map(|p| module_name(p)).collect::<Vec<_>>();
        assert_eq!(
            names(&now),
            ["virtio", "virtio_ring", "overlay", "virtio_blk_extra"]
        );
        assert_eq!(
            later,
            [PathBuf::from(
                "/lib/modules/6.1/kernel/drivers/block/virtio_blk.ko"
            )]
        );
    }

    #[test]
    fn a_missing_list_means_no_modules_and_a_missing_module_names_itself() {
        let dir = tempfile::tempdir().unwrap();
        assert!(read_list(&dir.path().join("absent")).unwrap().is_empty());
        let missing = dir.path().join("nope.ko");
        let error = load_all(std::slice::from_ref(&missing)).unwrap_err();
        assert!(error.to_string().contains("nope.ko"), "{error}");
    }
}
