//! Per-sandbox run directories under `$HEARTH_HOME/run/<id>/` (VMM sockets, console log, scratch disk)
//! and the sweep that removes what a dead hearth process left behind.
//!
//! Each directory records its owner (the hearth process) and, once started, its VMM process, both as
//! pid plus kernel start time so that a recycled pid is never mistaken for ours. A directory whose owner
//! is gone is stale: its VMM (if still alive) is killed and the directory removed. This module touches
//! only `$HEARTH_HOME/run` and signals only processes it recorded.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use thiserror::Error;

const OWNER_FILE: &str = "owner";
const VMM_FILE: &str = "vmm";

#[derive(Debug, Error)]
pub enum RunDirError {
    #[error("cannot create run directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("cannot record process in {path}: {source}")]
    Record { path: PathBuf, source: io::Error },
}

/// A live process identified robustly: pid plus its start time in clock ticks since boot.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    pub start_time: u64,
}

impl ProcessId {
    /// The identity of a running process, or `None` when it does not exist.
    pub fn of(pid: u32) -> Option<Self> {
        let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Field 2 (comm) may contain spaces; fields after the last ')' are well-formed.
        let rest = &stat[stat.rfind(')')? + 2..];
        // rest starts at field 3 (state); start time is field 22.
        let start_time = rest.split_whitespace().nth(19)?.parse().ok()?;
        Some(Self { pid, start_time })
    }

    fn is_alive(&self) -> bool {
        Self::of(self.pid).is_some_and(|now| now == *self)
    }

    fn parse(text: &str) -> Option<Self> {
        let (pid, start) = text.trim().split_once(' ')?;
        Some(Self {
            pid: pid.parse().ok()?,
            start_time: start.parse().ok()?,
        })
    }

    fn render(&self) -> String {
        format!("{} {}\n", self.pid, self.start_time)
    }
}

/// One sandbox's run directory, removed on drop.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
}

impl RunDir {
    /// Creates `$HEARTH_HOME/run/<id>` owned by the current process.
    pub fn create(home: &Path, id: &str) -> Result<Self, RunDirError> {
        let path = home.join("run").join(id);
        let create = |source| RunDirError::Create {
            path: path.clone(),
            source,
        };
        fs::create_dir_all(&path).map_err(create)?;
        let me = ProcessId::of(std::process::id())
            .ok_or_else(|| create(io::ErrorKind::NotFound.into()))?;
        let dir = Self { path };
        dir.write(OWNER_FILE, &me)?;
        Ok(dir)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Records the VMM process so a later sweep can kill it if this process dies first.
    pub fn record_vmm(&self, pid: u32) -> Result<(), RunDirError> {
        match ProcessId::of(pid) {
            Some(id) => self.write(VMM_FILE, &id),
            None => Ok(()), // already gone: nothing to clean up later
        }
    }

    fn write(&self, name: &str, id: &ProcessId) -> Result<(), RunDirError> {
        let path = self.path.join(name);
        fs::write(&path, id.render()).map_err(|source| RunDirError::Record { path, source })
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub removed_dirs: usize,
    pub killed_vmms: usize,
}

/// Removes every run directory whose owner is dead, killing its recorded VMM first.
pub fn sweep_stale(home: &Path) -> SweepReport {
    let mut report = SweepReport::default();
    let Ok(entries) = fs::read_dir(home.join("run")) else {
        return report;
    };
    for entry in entries.flatten() {
        let dir = entry.path();
        let read = |name| {
            fs::read_to_string(dir.join(name))
                .ok()
                .and_then(|t| ProcessId::parse(&t))
        };
        if read(OWNER_FILE).is_some_and(|owner| owner.is_alive()) {
            continue;
        }
        // An owner file not written yet means a sandbox being created right now; give it a grace.
        if read(OWNER_FILE).is_none() && recently_modified(&dir) {
            continue;
        }
        if let Some(vmm) = read(VMM_FILE).filter(ProcessId::is_alive) {
            // SAFETY: plain kill(2) of a pid we verified by start time to be the recorded VMM.
            if unsafe { libc::kill(vmm.pid as i32, libc::SIGKILL) } == 0 {
                report.killed_vmms += 1;
            }
        }
        if fs::remove_dir_all(&dir).is_ok() {
            report.removed_dirs += 1;
            tracing::info!(dir = %dir.display(), "removed run directory left by a dead hearth process");
        }
    }
    report
}

fn recently_modified(dir: &Path) -> bool {
    fs::metadata(dir)
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.elapsed().ok())
        .is_some_and(|age| age.as_secs() < 10)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    #[test]
    fn own_process_identity_is_stable_and_alive() {
        let me = ProcessId::of(std::process::id()).unwrap();
        assert!(me.is_alive());
        assert_eq!(ProcessId::parse(&me.render()), Some(me));
        let recycled = ProcessId {
            start_time: me.start_time + 1,
            ..me
        };
        assert!(
            !recycled.is_alive(),
            "a different start time is a different process"
        );
    }

    #[test]
    fn live_owner_is_kept_and_removed_on_drop() {
        let home = tempfile::tempdir().unwrap();
        let dir = RunDir::create(home.path(), "a").unwrap();
        assert_eq!(sweep_stale(home.path()), SweepReport::default());
        assert!(dir.path().exists());
        let path = dir.path().to_path_buf();
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn dead_owner_dir_is_removed_and_its_vmm_killed() {
        let home = tempfile::tempdir().unwrap();
        let dir = home.path().join("run/dead");
        fs::create_dir_all(&dir).unwrap();
        // An owner that has exited, and a "VMM" that is still running.
        let mut owner = Command::new("true").spawn().unwrap();
        let owner_id = ProcessId::of(owner.id()).unwrap();
        owner.wait().unwrap();
        let mut vmm = Command::new("sleep").arg("30").spawn().unwrap();
        fs::write(dir.join(OWNER_FILE), owner_id.render()).unwrap();
        fs::write(
            dir.join(VMM_FILE),
            ProcessId::of(vmm.id()).unwrap().render(),
        )
        .unwrap();

        let report = sweep_stale(home.path());
        assert_eq!(
            report,
            SweepReport {
                removed_dirs: 1,
                killed_vmms: 1
            }
        );
        assert!(!dir.exists());
        let status = vmm.wait().unwrap();
        assert!(!status.success(), "the recorded VMM was killed");
    }
}
