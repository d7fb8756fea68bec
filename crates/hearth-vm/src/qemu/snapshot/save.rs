//! Saving a running QEMU's memory and device state to a file over QMP: `stop`, hand QEMU the file
//! (opened here, passed with `getfd`: a confined QEMU can neither open host paths nor run
//! `exec:cat`), `migrate` to `fd:NAME`, wait for `completed`. Used to build boot templates and to
//! save live VMs ([`crate::RunningVm::save_state`]). Touches only `file` and the QMP connection.
//!
//! A VM with file-backed memory ([`crate::GuestMemory`]: it has the `hearth-mem` backend) is saved
//! with `x-ignore-shared`: a template's shared memory file then stays out of the state (the file is
//! the RAM), while a restored VM's private mapping is not shared and is saved whole; [`thin_file`]
//! then takes the pages it shares with its template out (`thin.rs`).

use std::io::{BufReader, BufWriter};
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::thin::{thin, Base, ThinError, Thinned};
use crate::qemu::argv::MEMORY_BACKEND_ID;
use crate::qemu::memory::seek;
use crate::qemu::{Qmp, QmpError};

/// QEMU's migration capability that leaves shared, file-backed RAM out of a saved state.
pub(crate) const IGNORE_SHARED: &str = "x-ignore-shared";

/// The migration's bandwidth cap while saving, in bytes per second: unlimited in practice. QEMU's
/// default (128 MiB/s) is meant for live migration over a network; a stopped guest saved to a local
/// file was held to it (a 166 MiB state took 1.26 s to pause, ~130 MiB/s).
const SAVE_BANDWIDTH: u64 = 1 << 40;
/// Saving ~70 MB took 0.5 s; this bounds a wedged migration.
const SAVE_DEADLINE: Duration = Duration::from_secs(120);
/// The name QEMU knows the state file's descriptor by.
const FD_NAME: &str = "hearth-save";

/// Why a save failed, by step.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("creating {path}: {source}")]
    Create {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("QMP {command}: {source}")]
    Qmp {
        command: &'static str,
        source: QmpError,
    },
    /// QEMU ended the migration itself (its message says why: a full disk, say).
    #[error("saving the state to {path} {status}: {detail}")]
    Failed {
        path: PathBuf,
        status: String,
        detail: String,
    },
    #[error("saving the state did not finish within {0:?}")]
    Deadline(Duration),
}

impl SaveError {
    /// QEMU did not answer a command in time, or the save never ended: a frozen or starved VMM
    /// rather than a failure of the save itself.
    pub fn is_unresponsive(&self) -> bool {
        matches!(
            self,
            SaveError::Qmp {
                source: QmpError::Timeout(_),
                ..
            } | SaveError::Deadline(_)
        )
    }

    /// QEMU ended the save for a full disk (it says so only in its message).
    pub fn is_disk_full(&self) -> bool {
        matches!(self, SaveError::Failed { detail, .. } if detail.contains("No space left on device"))
    }
}

/// Pauses the guest and migrates its state into `file` (created, or truncated).
pub(crate) fn save(qmp: &mut Qmp, file: &Path) -> Result<(), SaveError> {
    let out = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .open(file)
        .map_err(|source| SaveError::Create {
            path: file.to_owned(),
            source,
        })?;
    let step = |command: &'static str| move |source| SaveError::Qmp { command, source };
    qmp.stop().map_err(step("stop"))?;
    let file_backed = qmp
        .has_memdev(MEMORY_BACKEND_ID)
        .map_err(step("query-memdev"))?;
    if file_backed {
        qmp.set_migration_capability(IGNORE_SHARED, true)
            .map_err(step("migrate-set-capabilities"))?;
    }
    qmp.set_migration_parameters(serde_json::json!({ "max-bandwidth": SAVE_BANDWIDTH }))
        .map_err(step("migrate-set-parameters"))?;
    qmp.send_fd(FD_NAME, out.as_fd()).map_err(step("getfd"))?;
    drop(out); // QEMU holds its own copy now
    qmp.migrate(&format!("fd:{FD_NAME}"))
        .map_err(step("migrate"))?;
    let deadline = Instant::now() + SAVE_DEADLINE;
    loop {
        let (status, error) = qmp.query_migrate().map_err(step("query-migrate"))?;
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(SaveError::Failed {
                    path: file.to_owned(),
                    status,
                    detail: error.unwrap_or_default(),
                })
            }
            _ if Instant::now() > deadline => return Err(SaveError::Deadline(SAVE_DEADLINE)),
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}

/// Rewrites the saved state `state` as a thin state against `base`, the template memory file the
/// VM maps (see `thin.rs`): written beside it, then renamed over it, so that a failure at any
/// point leaves the full state as it was.
pub(crate) fn thin_file(state: &Path, base: &Path) -> Result<Thinned, ThinError> {
    let base_file = std::fs::File::open(base)?;
    let len = base_file.metadata()?.len();
    let data = data_ranges(&base_file, len)?;
    let tmp = state.with_extension("thin");
    let thinned = with_mapped(
        &base_file,
        len as usize,
        |bytes| -> Result<Thinned, ThinError> {
            let input = BufReader::with_capacity(IO_BUFFER, std::fs::File::open(state)?);
            let output = BufWriter::with_capacity(IO_BUFFER, std::fs::File::create(&tmp)?);
            let base = Base { bytes, data: &data };
            thin(input, output, &base, MEMORY_BACKEND_ID, true)
        },
    )
    .and_then(|thinned| thinned)
    .and_then(|thinned| {
        std::fs::rename(&tmp, state)?;
        Ok(thinned)
    });
    if thinned.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    thinned
}

/// Where `file` (`len` bytes) holds data, by `SEEK_DATA`/`SEEK_HOLE`: a template memory file is
/// sparse (the template wrote ~100 MiB of a 512 MiB guest).
fn data_ranges(file: &std::fs::File, len: u64) -> std::io::Result<Vec<std::ops::Range<u64>>> {
    let mut ranges = Vec::new();
    let mut at = 0;
    while at < len {
        let Some(start) = seek(file, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push(start..end);
        at = end;
    }
    Ok(ranges)
}

/// Buffer size for reading and writing saved states.
const IO_BUFFER: usize = 1 << 20;

/// Runs `f` on the first `len` bytes of `file`, mapped read-only and private for the call. The
/// file is a template memory file, which nothing writes once its template is built (a rebuild
/// makes a new file).
fn with_mapped<T>(
    file: &std::fs::File,
    len: usize,
    f: impl FnOnce(&[u8]) -> T,
) -> Result<T, ThinError> {
    if len == 0 {
        return Ok(f(&[]));
    }
    // SAFETY: a private read-only mapping of an open file, `len` bytes (its size); unmapped
    // below, after the only borrow of it ends.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            std::os::fd::AsRawFd::as_raw_fd(file),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error().into());
    }
    // SAFETY: the mapping made above, `len` readable bytes.
    let result = f(unsafe { std::slice::from_raw_parts(at as *const u8, len) });
    // SAFETY: the mapping made above, no longer borrowed.
    unsafe { libc::munmap(at, len) };
    Ok(result)
}

impl crate::SavedState {
    /// Makes the state thin against its [`base`](crate::SavedState::base) (see `thin.rs`): the
    /// pages the VM shares with its boot template are taken out, so that starting it again loads
    /// only what it changed. Returns whether it did; a state without a base, or one thinning does
    /// not understand, stays whole (logged), and loads as it did. It reads and writes the state
    /// whole (~0.1 s for 170 MB here): run it where the VM need not wait for it.
    pub fn thin(&mut self) -> bool {
        let Some(base) = &self.base else {
            return false;
        };
        let started = Instant::now();
        match thin_file(&self.state, base) {
            Ok(done) => {
                tracing::debug!(
                    state = %self.state.display(),
                    kept_pages = done.kept_pages,
                    dropped_pages = done.dropped_pages,
                    dropped_zero = done.dropped_zero,
                    bytes_in = done.bytes_in,
                    bytes_out = done.bytes_out,
                    took = ?started.elapsed(),
                    "saved state thinned against its template"
                );
                self.bytes = done.bytes_out;
                true
            }
            Err(e) => {
                tracing::warn!(state = %self.state.display(), "keeping the whole saved state: {e}");
                false
            }
        }
    }
}
