//! Local image references in the node: `oci-layout:PATH` and `oci-archive:FILE` name host paths, so
//! a tenant (HTTP API) or a Sandbox object (Kubernetes) could make the root daemon read any of them
//! and learn from the answer whether it exists. [`check_local_image`] refuses them unless they lie
//! inside a directory the node's operator allowed (`hearth serve --allow-local-images`). Only
//! `stat`s paths; opens nothing.

use std::path::{Path, PathBuf};

use super::NodeError;

const LOCAL_IMAGE_REFUSED: &str =
    "image: local images (oci-layout:, oci-archive:) are accepted only from the directories this \
     node allows (hearth serve --allow-local-images); use a registry reference such as `alpine` \
     or `ghcr.io/o/r:tag`";

/// Refuses `oci-layout:PATH` and `oci-archive:FILE` references unless the path, with every symlink
/// and `..` resolved, lies inside one of `allowed` (canonical directories, see
/// [`super::NodeConfig::allow_local_images`]) and is a directory (layout) or a regular file
/// (archive). Nothing is opened: only `stat`s, so a FIFO or device never blocks. Every refusal
/// carries the same message whatever the path is, so the answer does not tell whether it exists.
/// Registry references (and unparsable ones, which `admission::size` reports) pass.
pub(crate) fn check_local_image(image: &str, allowed: &[PathBuf]) -> Result<(), NodeError> {
    let (path, want_dir) = match hearth_image::Reference::parse(image) {
        Ok(hearth_image::Reference::OciLayout { dir, .. }) => (dir, true),
        Ok(hearth_image::Reference::OciArchive { file, .. }) => (file, false),
        _ => return Ok(()),
    };
    if !allowed.is_empty() && local_path_allowed(&path, want_dir, allowed) {
        return Ok(());
    }
    // The same words for every refused path, without echoing it: no existence oracle.
    Err(NodeError::Invalid(LOCAL_IMAGE_REFUSED.into()))
}

fn local_path_allowed(path: &Path, want_dir: bool, allowed: &[PathBuf]) -> bool {
    if !path.is_absolute() {
        return false;
    }
    let Ok(real) = std::fs::canonicalize(path) else {
        return false;
    };
    if !allowed.iter().any(|dir| real.starts_with(dir)) {
        return false;
    }
    // `symlink_metadata` of a canonical path: the final component is no longer a link.
    match std::fs::symlink_metadata(&real) {
        Ok(meta) if want_dir => meta.is_dir(),
        Ok(meta) => meta.is_file(),
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(image: &str, allowed: &[PathBuf]) -> String {
        match check_local_image(image, allowed) {
            Err(NodeError::Invalid(m)) => m,
            other => panic!("{image}: {other:?}"),
        }
    }

    /// Attack: a tenant names host paths as images to make the node read them, and compares the
    /// errors to learn which paths exist. Without an allow list every local reference is refused
    /// with one message, before any file is touched.
    #[test]
    fn local_images_are_refused_by_default_with_one_message() {
        assert!(check_local_image("alpine", &[]).is_ok());
        assert!(check_local_image("localhost:5000/a/b:v1", &[]).is_ok());
        let fifo_dir = tempfile::tempdir().unwrap();
        let fifo = fifo_dir.path().join("fifo");
        mkfifo(&fifo);
        let messages: Vec<String> = [
            "oci-layout:/etc".to_string(),
            "oci-layout:/nonexistent".to_string(),
            "oci-archive:/dev/zero".to_string(),
            format!("oci-archive:{}", fifo.display()),
            format!("oci-layout:{}:v1", fifo_dir.path().display()),
        ]
        .iter()
        .map(|image| refused(image, &[]))
        .collect();
        assert!(messages.iter().all(|m| m == &messages[0]), "{messages:?}");
        assert!(
            messages[0].contains("--allow-local-images"),
            "{}",
            messages[0]
        );
    }

    /// Attack: with an allowed directory, a tenant escapes it with `..`, a symlink inside it that
    /// points out, a relative path, or a FIFO or device named as an archive. Only real layouts and
    /// archive files inside it pass, and every refusal reads the same.
    #[test]
    fn local_images_must_resolve_inside_an_allowed_directory() {
        let root = tempfile::tempdir().unwrap();
        let allowed_dir = root.path().join("images");
        let layout = allowed_dir.join("layout");
        std::fs::create_dir_all(&layout).unwrap();
        std::fs::write(allowed_dir.join("img.tar"), b"").unwrap();
        let outside = root.path().join("secret");
        std::fs::create_dir_all(&outside).unwrap();
        std::fs::write(outside.join("file.tar"), b"").unwrap();
        std::os::unix::fs::symlink(&outside, allowed_dir.join("link")).unwrap();
        std::os::unix::fs::symlink(outside.join("file.tar"), allowed_dir.join("link.tar")).unwrap();
        mkfifo(&allowed_dir.join("fifo"));
        let allowed = vec![std::fs::canonicalize(&allowed_dir).unwrap()];
        let d = allowed_dir.display();
        for ok in [
            format!("oci-layout:{d}/layout"),
            format!("oci-layout:{d}/layout:v1"),
            format!("oci-layout:{d}/../images/layout"),
            format!("oci-archive:{d}/img.tar"),
        ] {
            assert!(check_local_image(&ok, &allowed).is_ok(), "{ok}");
        }
        let bad: Vec<String> = [
            format!("oci-layout:{d}/../secret"),
            format!("oci-layout:{d}/../../../../etc"),
            format!("oci-layout:{d}/link"),
            format!("oci-archive:{d}/link.tar"),
            format!("oci-archive:{d}/fifo"),
            format!("oci-archive:{d}/layout"),
            format!("oci-layout:{d}/img.tar"),
            format!("oci-layout:{d}/missing"),
            "oci-layout:images/layout".to_string(),
            "oci-archive:/dev/zero".to_string(),
        ]
        .iter()
        .map(|image| refused(image, &allowed))
        .collect();
        assert!(bad.iter().all(|m| m == &bad[0]), "{bad:?}");
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    }
}
