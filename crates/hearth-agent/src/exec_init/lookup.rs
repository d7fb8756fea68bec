//! Finding the program for `argv[0]` in the exec's `PATH` (inside the workload root, after chroot),
//! and the environment the command gets.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// docker's default `PATH` when the environment has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// `name` itself when it contains a `/`; otherwise the first executable regular file called `name`
/// in the absolute directories of `path_var`.
pub fn find_program(name: &str, path_var: &str) -> Option<PathBuf> {
    if name.contains('/') {
        return Some(PathBuf::from(name));
    }
    path_var
        .split(':')
        .filter(|dir| dir.starts_with('/'))
        .map(|dir| Path::new(dir).join(name))
        .find(|candidate| is_executable_file(candidate))
}

fn is_executable_file(path: &Path) -> bool {
    std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// The command's environment: the request's `KEY=VALUE` entries (a later duplicate wins), plus
/// `PATH` and `HOME` when missing. An entry without `=` is an error.
pub fn build_env(entries: &[String], home: &str) -> Result<Vec<(String, String)>, String> {
    let mut env: Vec<(String, String)> = Vec::with_capacity(entries.len() + 2);
    for entry in entries {
        let (key, value) = entry
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| format!("environment entry {entry:?} is not KEY=VALUE"))?;
        env.retain(|(k, _)| k != key);
        env.push((key.to_string(), value.to_string()));
    }
    for (key, default) in [("PATH", DEFAULT_PATH), ("HOME", home)] {
        if !env.iter().any(|(k, _)| k == key) {
            env.push((key.to_string(), default.to_string()));
        }
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_first_executable_in_path_order() {
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a"), dir.path().join("b"));
        std::fs::create_dir_all(&a).unwrap();
        std::fs::create_dir_all(&b).unwrap();
        std::fs::write(a.join("tool"), "").unwrap(); // not executable: skipped
        std::fs::write(b.join("tool"), "").unwrap();
        std::fs::set_permissions(b.join("tool"), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir(a.join("dir")).unwrap();
        let path_var = format!("relative:{}:{}", a.display(), b.display());
        assert_eq!(find_program("tool", &path_var), Some(b.join("tool")));
        assert_eq!(find_program("dir", &path_var), None);
        assert_eq!(find_program("missing", &path_var), None);
        assert_eq!(find_program("./x", ""), Some(PathBuf::from("./x")));
    }

    #[test]
    fn env_adds_defaults_and_later_entries_win() {
        let env = build_env(&["A=1".into(), "B=x=y".into(), "A=2".into()], "/root").unwrap();
        let get = |k: &str| {
            env.iter()
                .find(|(key, _)| key == k)
                .map(|(_, v)| v.as_str())
        };
        assert_eq!(get("A"), Some("2"));
        assert_eq!(get("B"), Some("x=y"));
        assert_eq!(get("PATH"), Some(DEFAULT_PATH));
        assert_eq!(get("HOME"), Some("/root"));
        let custom = build_env(&["PATH=/bin".into(), "HOME=/h".into()], "/root").unwrap();
        assert_eq!(
            custom,
            [("PATH".into(), "/bin".into()), ("HOME".into(), "/h".into())]
        );
        assert!(build_env(&["NOVALUE".into()], "/")
            .unwrap_err()
            .contains("NOVALUE"));
    }
}
