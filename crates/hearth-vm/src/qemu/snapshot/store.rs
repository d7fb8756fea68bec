//! Keeping `$HEARTH_HOME/templates/` bounded. Every VM configuration (memory size, vCPUs, network
//! or not) and every hearth, kernel or QEMU upgrade makes a new template key, and nothing else ever
//! removes the old ones: a tenant asking for 256, 257, 258... MiB would leave a template of tens of
//! MiB on disk per request. So before a build makes a new one, [`make_room`]:
//!
//! - removes **stale** templates, which no VM can restore from again: built from a kernel,
//!   initramfs (the agent) or QEMU binary that has changed or gone since, by an older template
//!   format, or for an older machine revision ([`crate::MachineRevision`]; paused sandboxes never
//!   need a template: their saved state holds all of their memory);
//! - removes what a build that died half-way left (a directory without `meta.json`);
//! - then, while the node holds more than its limit ([`crate::qemu::QemuVmm::max_templates`],
//!   `--max-templates`), evicts the least recently used ones, but never one used in the last
//!   [`EVICT_AFTER_IDLE`] (a restore from it may be starting) nor one whose build lock is held.
//!
//! A daemon's start removes the stale ones too ([`remove_stale`]).
//!
//! When nothing can go, the build is refused ([`SnapshotError::Full`]) and the VM boots cold:
//! disk stays bounded whatever tenants ask for. "Used" is `meta.json`'s modification time, set
//! by [`mark_used`] at each restore (at most once a minute per template).
//!
//! Removal takes the template's build lock (`<id>.lock`, `flock`), so no build or other remover is
//! cut short, and unlinks the lock file while holding it (`BuildLock::take` retries on a lock
//! file that was unlinked under it). Touches only `templates/`.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use super::key::{FileIdentity, FORMAT};
use super::{BuildLock, SnapshotError, TemplateMeta, META};
use crate::qemu::argv;

/// A template used more recently than this is never evicted.
pub const EVICT_AFTER_IDLE: Duration = Duration::from_secs(600);
/// How stale `meta.json`'s time may get before a restore sets it again.
const MARK_EVERY: Duration = Duration::from_secs(60);

/// What [`make_room`] removed, by template id.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Collected {
    /// Stale (with why) or left by a failed build.
    pub stale: Vec<(String, &'static str)>,
    /// Evicted for room, least recently used first.
    pub evicted: Vec<String>,
    /// Templates left, not counting `building`.
    pub kept: usize,
}

/// Makes room under `templates/` for the build of template `building` (whose lock the caller
/// holds): removes stale templates, then evicts idle ones until at most `limit - 1` others are
/// left. `Err(Full)` when more remain.
pub(super) fn make_room(
    home: &Path,
    building: &str,
    limit: usize,
    now: SystemTime,
) -> Result<Collected, SnapshotError> {
    let mut collected = Collected::default();
    let mut live = sweep(home, Some(building), &mut collected.stale)?;
    live.sort();
    let mut left = live.len();
    for (used, id, dir) in &live {
        if left < limit {
            break;
        }
        let idle = now.duration_since(*used).unwrap_or_default();
        if idle < EVICT_AFTER_IDLE {
            break; // the rest were used more recently still
        }
        if remove(dir)? {
            tracing::info!(template = %id, ?idle, "evicted a boot template for room");
            collected.evicted.push(id.clone());
            left -= 1;
        }
    }
    collected.kept = left;
    if left >= limit {
        return Err(SnapshotError::Full {
            limit,
            idle: EVICT_AFTER_IDLE,
        });
    }
    Ok(collected)
}

/// Removes the stale templates under `templates/` (and what failed builds left), as a build
/// would before making room: for a daemon's start, so that a node that never builds again does
/// not keep its old templates for good. Returns what went, by id, with why.
pub fn remove_stale(home: &Path) -> Result<Vec<(String, &'static str)>, SnapshotError> {
    let mut stale = Vec::new();
    sweep(home, None, &mut stale)?;
    Ok(stale)
}

/// Removes the stale templates but `building` (adding them to `removed`), and returns the live
/// ones as (last use, id, directory).
fn sweep(
    home: &Path,
    building: Option<&str>,
    removed: &mut Vec<(String, &'static str)>,
) -> Result<Vec<(SystemTime, String, PathBuf)>, SnapshotError> {
    let mut live = Vec::new();
    for (id, dir) in template_dirs(home) {
        if Some(id.as_str()) == building {
            continue;
        }
        match classify(&dir) {
            State::Live(used) => live.push((used, id, dir)),
            State::Stale(why) => {
                if remove(&dir)? {
                    tracing::info!(template = %id, "removed a stale boot template: {why}");
                    removed.push((id, why));
                }
            }
        }
    }
    Ok(live)
}

/// Notes that a VM is being restored from the template in `dir` (see the module doc).
pub(super) fn mark_used(dir: &Path, now: SystemTime) {
    let path = dir.join(META);
    let stamp = || -> std::io::Result<()> {
        let file = std::fs::File::open(&path)?;
        let modified = file.metadata()?.modified()?;
        if now.duration_since(modified).unwrap_or_default() >= MARK_EVERY {
            file.set_modified(now)?;
        }
        Ok(())
    };
    if let Err(err) = stamp() {
        tracing::debug!("marking {} used: {err}", path.display());
    }
}

enum State {
    /// Restorable; last used then.
    Live(SystemTime),
    Stale(&'static str),
}

/// The template directories under `templates/` (symlinks and other files are not templates).
fn template_dirs(home: &Path) -> Vec<(String, PathBuf)> {
    let Ok(entries) = std::fs::read_dir(home.join("templates")) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .map(|e| (e.file_name().to_string_lossy().into_owned(), e.path()))
        .collect()
}

fn classify(dir: &Path) -> State {
    let meta_path = dir.join(META);
    let Ok(bytes) = std::fs::read(&meta_path) else {
        return State::Stale("no meta.json: a build that did not finish");
    };
    let Ok(meta) = serde_json::from_slice::<TemplateMeta>(&bytes) else {
        return State::Stale("an unreadable meta.json");
    };
    if let Some(why) = stale(&meta) {
        return State::Stale(why);
    }
    let used = std::fs::metadata(&meta_path)
        .and_then(|m| m.modified())
        .unwrap_or(SystemTime::UNIX_EPOCH);
    State::Live(used)
}

/// Why no VM can restore from a template built from `meta`'s inputs any more, if so.
fn stale(meta: &TemplateMeta) -> Option<&'static str> {
    let inputs = &meta.inputs;
    if inputs.format != FORMAT {
        return Some("made by an older template format");
    }
    let changed = |file: &FileIdentity| FileIdentity::of(&file.path).ok().as_ref() != Some(file);
    if changed(&inputs.kernel) {
        return Some("its kernel changed or is gone");
    }
    if changed(&inputs.initramfs) {
        return Some("its initramfs (the agent) changed or is gone");
    }
    if changed(&inputs.qemu) {
        return Some("its QEMU binary changed or is gone");
    }
    let machine = argv::template_machine_option();
    if !inputs.argv.contains(&machine) {
        return Some("made for an older machine revision");
    }
    None
}

/// Removes the template in `dir` and its lock file unless a build holds the lock. `Ok(false)`
/// when it is held.
fn remove(dir: &Path) -> Result<bool, SnapshotError> {
    let lock_path = super::lock_path(dir);
    let Some(_lock) = BuildLock::try_take(&lock_path)? else {
        return Ok(false);
    };
    super::remove_dir(dir)?;
    // Unlinked while held: a waiter on this file retries on a fresh one (`BuildLock::take`).
    let _ = std::fs::remove_file(&lock_path);
    Ok(true)
}

#[cfg(test)]
#[path = "store_tests.rs"]
mod tests;
