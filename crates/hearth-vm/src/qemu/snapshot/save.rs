//! Saving a running QEMU's memory and device state to a file over QMP: `stop`, `migrate` to
//! `exec:cat > FILE`, wait for `completed`. Used to build boot templates and to save live VMs
//! ([`crate::RunningVm::save_state`]). Touches only the QMP connection (QEMU writes the file).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::qemu::Qmp;
use crate::vmm::shell_quote;

/// Saving ~70 MB took 0.5 s; this bounds a wedged migration.
const SAVE_DEADLINE: Duration = Duration::from_secs(120);

/// Pauses the guest and migrates its state into `file`.
pub(crate) fn save(qmp: &mut Qmp, file: &Path) -> Result<(), String> {
    qmp.stop().map_err(|e| format!("QMP stop: {e}"))?;
    let uri = format!("exec:cat > {}", shell_quote(&file.to_string_lossy()));
    qmp.migrate(&uri).map_err(|e| format!("QMP migrate: {e}"))?;
    let deadline = Instant::now() + SAVE_DEADLINE;
    loop {
        let (status, error) = qmp
            .query_migrate()
            .map_err(|e| format!("QMP query-migrate: {e}"))?;
        match status.as_str() {
            "completed" => return Ok(()),
            "failed" | "cancelled" => {
                return Err(format!(
                    "saving the state to {} {status}: {}",
                    file.display(),
                    error.unwrap_or_default()
                ))
            }
            _ if Instant::now() > deadline => {
                return Err(format!(
                    "saving the state did not finish within {SAVE_DEADLINE:?}"
                ))
            }
            _ => std::thread::sleep(Duration::from_millis(10)),
        }
    }
}
