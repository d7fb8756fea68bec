//! The VM id Firecracker and its jailer take as `--id`: their rule, and the id hearth derives from
//! a VM's run directory. The jailer also names the chroot (`<base>/<exec>/<id>/root`) and the
//! cgroups after it. Pure: no I/O.

use std::path::Path;

use crate::vmm::VmError;

/// Firecracker's and the jailer's bound on `--id` (`MAX_INSTANCE_ID_LEN` in its `validators.rs`).
pub const MAX_VM_ID_LEN: usize = 64;

/// Why a string is not a Firecracker VM id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidVmId {
    #[error("a Firecracker VM id must be 1 to {MAX_VM_ID_LEN} bytes long, not {0}")]
    Length(usize),
    #[error("a Firecracker VM id may contain only ASCII letters, digits and '-', not {0:?}")]
    Character(char),
}

/// The `--id` rule of Firecracker and its jailer (`validate_instance_id` in Firecracker's
/// `src/utils/src/validators.rs`: 1 to 64 bytes of alphanumerics and `-`), kept to ASCII.
pub fn check_vm_id(id: &str) -> Result<(), InvalidVmId> {
    if id.is_empty() || id.len() > MAX_VM_ID_LEN {
        return Err(InvalidVmId::Length(id.len()));
    }
    match id
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || *c == '-'))
    {
        Some(c) => Err(InvalidVmId::Character(c)),
        None => Ok(()),
    }
}

/// The `--id` for a run directory: its name with every other character turned into `-`, cut to
/// [`MAX_VM_ID_LEN`] bytes; refused when no letter or digit is left.
pub fn vm_id(run_dir: &Path) -> Result<String, VmError> {
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(MAX_VM_ID_LEN)
        .collect();
    let unusable = |why: String| {
        VmError::Unsupported(format!(
            "cannot derive a Firecracker VM id from the run directory {}: {why}",
            run_dir.display()
        ))
    };
    if id.trim_matches('-').is_empty() {
        return Err(unusable("name it with letters or digits".into()));
    }
    check_vm_id(&id).map_err(|e| unusable(e.to_string()))?;
    Ok(id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_ids_follow_firecrackers_instance_id_rule() {
        assert_eq!(check_vm_id("sb-01-x"), Ok(()));
        assert_eq!(check_vm_id(&"a".repeat(MAX_VM_ID_LEN)), Ok(()));
        assert_eq!(check_vm_id(""), Err(InvalidVmId::Length(0)));
        assert_eq!(check_vm_id(&"a".repeat(65)), Err(InvalidVmId::Length(65)));
        // Unlike resource ids: '-' yes, '_' no.
        assert_eq!(check_vm_id("sb_1"), Err(InvalidVmId::Character('_')));
        assert_eq!(
            check_vm_id("\u{e9}t\u{e9}"),
            Err(InvalidVmId::Character('\u{e9}'))
        );
    }

    #[test]
    fn vm_ids_are_sanitized_run_dir_names() {
        assert_eq!(vm_id(Path::new("/h/run/sb_01.x")).unwrap(), "sb-01-x");
        assert_eq!(vm_id(Path::new("/h/run/\u{e9}t\u{e9}1")).unwrap(), "-t-1");
        let long = format!("/h/run/{}", "b".repeat(100));
        assert_eq!(vm_id(Path::new(&long)).unwrap().len(), MAX_VM_ID_LEN);
        assert!(vm_id(Path::new("/")).is_err());
        assert!(vm_id(Path::new("/h/run/__")).is_err());
    }
}
