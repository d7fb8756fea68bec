//! Loading the kernel modules the guest needs, from the list the host put in the initramfs
//! (`/etc/hearth/modules`: one path per line, in load order, relative to the initramfs root).

use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// The module list inside the initramfs.
pub const MODULE_LIST: &str = "/etc/hearth/modules";

#[derive(Debug, thiserror::Error)]
pub enum ModuleError {
    #[error("reading module list {list}: {source}")]
    List { list: String, source: io::Error },
    #[error("loading kernel module {module}: {source} (is it built for this kernel? the initramfs must match the kernel release)")]
    Load { module: String, source: io::Error },
}

/// Loads every module named in `list` (absent list = nothing to load). A module that is already
/// loaded is fine. Returns how many were loaded.
pub fn load_listed(list: &Path) -> Result<usize, ModuleError> {
    let text = match std::fs::read_to_string(list) {
        Ok(text) => text,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(source) => {
            return Err(ModuleError::List {
                list: list.display().to_string(),
                source,
            })
        }
    };
    let mut loaded = 0;
    for line in text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        let path = Path::new("/").join(line);
        load(&path).map_err(|source| ModuleError::Load {
            module: path.display().to_string(),
            source,
        })?;
        loaded += 1;
    }
    Ok(loaded)
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
