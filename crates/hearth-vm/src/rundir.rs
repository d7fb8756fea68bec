//! Per-VM run directories (`$HEARTH_HOME/run/<id>/` by convention): sockets, VMM log, pid file, and
//! the cleanup of directories left behind by a hearth process that died (`kill -9`, power loss).
//! Touches only the run directories it is given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::vmm::VmError;

/// The VMM's stdout and stderr.
pub(crate) const VMM_LOG: &str = "vmm.log";
/// The VMM's pid, for recognising live run directories after a crash.
const PID_FILE: &str = "vmm.pid";
/// A run dir without a pid file is being set up; only this old it counts as abandoned.
const SETUP_GRACE: Duration = Duration::from_secs(60);

pub(crate) fn create(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| VmError::Io {
            what: "creating run directory",
            path: dir.to_owned(),
            source,
        })
}

pub(crate) fn write_pid(dir: &Path, pid: u32) -> Result<(), VmError> {
    let path = dir.join(PID_FILE);
    std::fs::write(&path, format!("{pid}\n")).map_err(|source| VmError::Io {
        what: "writing",
        path,
        source,
    })
}

/// Removes every run directory under `parent` whose VMM is gone (it died with its hearth process, or
/// its pid now belongs to an unrelated process). Returns what was removed.
pub fn remove_stale_run_dirs(parent: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let dir = entry?.path();
        if dir.is_dir() && is_stale(&dir) {
            std::fs::remove_dir_all(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

fn is_stale(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else {
        let age = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        return age.is_some_and(|age| age > SETUP_GRACE);
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return true;
    };
    // A zombie has exited; with no reaper around it may linger, but its VM is gone.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    if stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        == Some("Z")
    {
        return true;
    }
    // A live VMM names its run dir in its arguments (socket paths); a recycled pid does not.
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.is_empty() {
        // Mid-exec: its arguments are not set up yet. Not ours to judge now; the next pass decides.
        return false;
    }
    let needle = dir.as_os_str().as_encoded_bytes();
    !cmdline.windows(needle.len()).any(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_dirs_of_dead_or_unrelated_pids_and_keeps_live_ones() {
        let parent = tempfile::tempdir().unwrap();
        let dead = parent.path().join("dead");
        let recycled = parent.path().join("recycled");
        let live = parent.path().join("live");
        let fresh = parent.path().join("being-set-up");
        for dir in [&dead, &recycled, &live, &fresh] {
            create(dir).unwrap();
        }
        write_pid(&dead, u32::MAX - 1).unwrap();
        // Our own pid is alive, but our cmdline does not name the dir: a recycled pid.
        write_pid(&recycled, std::process::id()).unwrap();
        // `sh -c SCRIPT NAME`: NAME stands in for a VMM's socket argument. The shell blocks in
        // its `read` builtin (no child process to leak) until we kill it.
        let mut sleeper = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .arg(live.join("agent.sock"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        write_pid(&live, sleeper.id()).unwrap();
        let mut removed = remove_stale_run_dirs(parent.path()).unwrap();
        removed.sort();
        sleeper.kill().unwrap();
        sleeper.wait().unwrap();
        assert_eq!(removed, [dead.clone(), recycled.clone()]);
        assert!(live.is_dir() && fresh.is_dir());
        assert!(remove_stale_run_dirs(&parent.path().join("absent"))
            .unwrap()
            .is_empty());
    }
}
