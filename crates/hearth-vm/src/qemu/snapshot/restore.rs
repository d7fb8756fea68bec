//! Feeding a QEMU started with `-incoming defer` its saved state over QMP: the state file, opened
//! here, is handed to QEMU with `getfd` (a confined QEMU can neither open host paths nor run
//! `exec:cat`), then `migrate-incoming` from `fd:NAME`, wait until the run state leaves
//! `inmigrate`, `cont` (the state was saved paused). Touches only `state` (read) and the QMP
//! connection. A VM with file-backed memory loads with `x-ignore-shared`, as it was saved
//! (`save.rs`).

use std::os::fd::AsFd;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::qemu::Qmp;

/// Loading ~70 MB takes 0.1-0.4 s here; far longer means QEMU is stuck.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);
/// The name QEMU knows the state file's descriptor by.
const FD_NAME: &str = "hearth-restore";

/// Loads `state` and lets the guest run. The error says what QMP reported; QEMU itself exits when
/// the state does not load, so the caller adds its stderr.
pub(crate) fn load_and_continue(
    qmp: &mut Qmp,
    state: &Path,
    file_backed: bool,
) -> Result<(), String> {
    if file_backed {
        qmp.set_migration_capability(super::save::IGNORE_SHARED, true)
            .map_err(|e| format!("QMP migrate-set-capabilities: {e}"))?;
    }
    let input =
        std::fs::File::open(state).map_err(|e| format!("opening {}: {e}", state.display()))?;
    qmp.send_fd(FD_NAME, input.as_fd())
        .map_err(|e| format!("QMP getfd: {e}"))?;
    drop(input); // QEMU holds its own copy now
    qmp.migrate_incoming(&format!("fd:{FD_NAME}"))
        .map_err(|e| format!("QMP migrate-incoming: {e}"))?;
    let deadline = Instant::now() + LOAD_DEADLINE;
    loop {
        let status = qmp
            .query_status()
            .map_err(|e| format!("loading the state failed (QMP query-status: {e})"))?;
        match status.as_str() {
            "inmigrate" if Instant::now() > deadline => {
                return Err(format!("loading the state took over {LOAD_DEADLINE:?}"))
            }
            "inmigrate" => std::thread::sleep(Duration::from_millis(2)),
            "running" => return Ok(()),
            "paused" | "postmigrate" | "prelaunch" => {
                return qmp.cont().map_err(|e| format!("QMP cont: {e}"))
            }
            other => return Err(format!("the VM is {other:?} after loading the state")),
        }
    }
}
