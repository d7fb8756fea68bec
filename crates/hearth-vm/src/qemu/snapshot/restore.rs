//! Feeding a QEMU started with `-incoming defer` its template state over QMP: `migrate-incoming`
//! from `exec:cat STATE`, wait until the run state leaves `inmigrate`, `cont` (the template was
//! saved paused). Touches only the QMP connection (QEMU reads the state file itself).

use std::path::Path;
use std::time::{Duration, Instant};

use crate::qemu::Qmp;
use crate::vmm::shell_quote;

/// Loading ~70 MB takes 0.1-0.4 s here; far longer means QEMU is stuck.
const LOAD_DEADLINE: Duration = Duration::from_secs(60);

/// Loads `state` and lets the guest run. The error says what QMP reported; QEMU itself exits when
/// the state does not load, so the caller adds its stderr.
pub(crate) fn load_and_continue(qmp: &mut Qmp, state: &Path) -> Result<(), String> {
    let uri = format!("exec:cat {}", shell_quote(&state.to_string_lossy()));
    qmp.migrate_incoming(&uri)
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
