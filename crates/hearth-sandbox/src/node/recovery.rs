//! What [`Node::open`] does with what a previous daemon left (it may have been `kill -9`ed):
//! - a `Running` record whose VMM still runs (same pid, same start time) is re-attached: the VM is
//!   adopted, the agent channel reconnected, and it stays `Running`; otherwise it becomes `Failed`
//!   ("VM exited while the daemon was down", with the console's last lines) and its disks go;
//! - a `Creating` record's VM (if it got that far) is killed: `Failed`, "daemon restarted during
//!   boot";
//! - a `Paused` record has no VMM to look for: it stays `Paused` while its snapshot
//!   (`$HOME/node/paused/<id>/`) is there, to be resumed, and becomes `Failed` otherwise;
//! - a record deleted while its VM was stopping is finished off and forgotten;
//! - anything in `$HOME/sandboxes/` that no re-attached sandbox owns (a VMM, a run directory with its
//!   scratch disk and sockets) is killed and removed, and so is its network in `$HOME/node/net/`;
//!   a re-attached sandbox's network is served again with the policy its record holds; snapshots in
//!   `$HOME/node/paused/` that no paused sandbox owns are removed, and so are forks' snapshots
//!   (`$HOME/node/forks/`: no fork outlives its daemon);
//! - boot templates no VM can restore from again are removed (`$HOME/templates/`, in the
//!   background).
//!
//! `Stopped` and `Failed` records stay listed. Nothing outside `$HOME/sandboxes/`, `$HOME/node/`
//! and stale templates in `$HOME/templates/` is touched, and a
//! process is killed only when its pid and start time match what its run directory recorded.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use hearth_image::{PulledImage, Reference};
use hearth_vm::{DetachedRecord, VmError};

use super::record::Record;
use super::table::Entry;
use super::{now_ms, Node, NodeError, State};
use crate::{Sandbox, SandboxError};

/// How long a re-attached guest agent gets to answer the handshake.
const REATTACH_DEADLINE: Duration = Duration::from_secs(10);
/// How much of a dead VM's console a failure reason quotes.
const CONSOLE_LINES: usize = 5;

impl Node {
    pub(super) async fn recover(&self, records: Vec<Record>) -> Result<(), NodeError> {
        // Running records are re-attached all at once: each may wait seconds for its agent, and a
        // restart with many sandboxes must not take their sum.
        let (running, others): (Vec<Record>, Vec<Record>) = records
            .into_iter()
            .partition(|r| !r.deleted && r.info.state == State::Running);
        let reattached = futures::future::join_all(running.into_iter().map(|record| async move {
            let run_dir = self.run_dir(&record.info.id);
            let outcome = self.reattach(&record, &run_dir).await;
            // Its code interpreter waits in the guest for a new host: found now, so that it is
            // this node's before any call can start another. So do its background processes.
            let (code, processes) = match &outcome {
                Ok(sandbox) => (
                    super::interpreter::listed_code(&record.info.id, sandbox).await,
                    super::processes::Processes::saved(&run_dir),
                ),
                Err(_) => {
                    kill_and_remove(&run_dir).await;
                    (None, Vec::new())
                }
            };
            (record, outcome, code, processes)
        }))
        .await;
        let mut owned = BTreeSet::new();
        let mut paused = BTreeSet::new();
        for (mut record, outcome, code, processes) in reattached {
            let live = match outcome {
                Ok(sandbox) => {
                    owned.insert(record.info.id.clone());
                    Some(Arc::new(sandbox))
                }
                Err(reason) => {
                    fail(&mut record, reason);
                    None
                }
            };
            let (tenant, id) = (record.info.tenant.clone(), record.info.id.clone());
            self.restore_entry(record, live);
            if let Some(code) = code {
                self.adopt_listed_code(&tenant, &id, code);
            }
            self.reattach_processes(&tenant, &id, processes);
        }
        for mut record in others {
            let id = record.info.id.clone();
            let run_dir = self.run_dir(&id);
            if record.deleted {
                kill_and_remove(&run_dir).await;
                self.table().forget(&id);
                continue;
            }
            match record.info.state {
                State::Creating => {
                    kill_and_remove(&run_dir).await;
                    fail(&mut record, "daemon restarted during boot".into());
                }
                State::Paused => {
                    // Its VMM ended with the pause; a run directory would be a resume cut short.
                    kill_and_remove(&run_dir).await;
                    let meta = self.paused_dir(&id).join(crate::PAUSE_META);
                    match meta.is_file() {
                        true => {
                            paused.insert(id.clone());
                        }
                        false => fail(
                            &mut record,
                            format!(
                                "its paused snapshot is gone ({} is missing)",
                                meta.display()
                            ),
                        ),
                    }
                }
                State::Running | State::Stopped | State::Failed => {}
            }
            self.restore_entry(record, None);
        }
        self.remove_unowned(&owned).await?;
        self.remove_unowned_snapshots(&paused);
        self.processes
            .remove_unowned(|id| owned.contains(id) || paused.contains(id));
        self.remove_fork_snapshots();
        self.remove_stale_templates();
        Ok(())
    }

    /// Boot templates no VM can restore from again (hearth, its kernel or QEMU upgraded since),
    /// and what failed builds left, go now rather than at the next build, which may never come
    /// (`hearth_vm::qemu::snapshot::store`); in the background, as they may be many.
    fn remove_stale_templates(&self) {
        let home = self.config.home.clone();
        drop(tokio::task::spawn_blocking(move || {
            match hearth_vm::qemu::snapshot::store::remove_stale(&home) {
                Ok(removed) if !removed.is_empty() => {
                    tracing::info!(
                        count = removed.len(),
                        "removed stale boot templates at start"
                    )
                }
                Ok(_) => {}
                Err(e) => tracing::warn!("removing stale boot templates: {e}"),
            }
        }));
    }

    /// Puts a recovered record back in the table, with its re-attached sandbox if any (a record
    /// without one is saved: recovery may have changed it).
    fn restore_entry(&self, record: Record, live: Option<Arc<Sandbox>>) {
        let mut table = self.table();
        if live.is_none() {
            table.save_record(&record);
        }
        let mut entry = Entry::new(record);
        entry.live = live;
        table.insert(entry);
    }

    /// Removes the snapshots in `$HOME/node/paused/` of sandboxes not in `paused`.
    fn remove_unowned_snapshots(&self, paused: &BTreeSet<String>) {
        let dir = self.net_home().join("paused");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !paused.contains(&name) {
                tracing::info!(path = %entry.path().display(), "removing a snapshot no paused sandbox owns");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// Takes over a running record's VM and reconnects its agent; the reason it cannot otherwise.
    async fn reattach(&self, record: &Record, run_dir: &Path) -> Result<Sandbox, String> {
        const DEAD: &str = "VM exited while the daemon was down";
        let id = &record.info.id;
        let detached = match DetachedRecord::read(run_dir) {
            Ok(detached) => detached,
            Err(_) => return Err(DEAD.into()),
        };
        if record.vmm.is_some_and(|vmm| vmm != detached.process) || !detached.process.is_alive() {
            return Err(with_console(DEAD, &detached.console_log));
        }
        let image = image_of(record, &self.config.pull.platform)?;
        let networking = self.config.defaults.network.clone().map(|mut n| {
            n.home = self.net_home();
            n
        });
        let network = networking
            .as_ref()
            .map(|n| (n, record.info.network.clone().unwrap_or_default()));
        match Sandbox::adopt(image, id, run_dir, REATTACH_DEADLINE, network).await {
            Ok(sandbox) => Ok(sandbox),
            Err(SandboxError::Vm(VmError::Gone { .. })) => {
                Err(with_console(DEAD, &detached.console_log))
            }
            Err(e) => Err(format!("could not re-attach after a daemon restart: {e}")),
        }
    }

    /// Kills and removes whatever lives in `$HOME/sandboxes/` outside `owned`.
    async fn remove_unowned(&self, owned: &BTreeSet<String>) -> Result<(), NodeError> {
        let dir = self.config.home.join("sandboxes");
        let entries = std::fs::read_dir(&dir).map_err(|source| NodeError::Io {
            what: format!("listing {}", dir.display()),
            source,
        })?;
        for entry in entries.flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            if owned.contains(&name) {
                continue;
            }
            let path = entry.path();
            tracing::info!(path = %path.display(), "removing what no sandbox owns");
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                kill_and_remove(&path).await;
            } else {
                let _ = std::fs::remove_file(&path);
            }
        }
        // Their networks too (after their VMs: a namespace goes with its last process).
        match hearth_net::sandbox_net::sweep(&self.net_home(), |id| owned.contains(id)) {
            Ok(removed) => {
                for id in removed {
                    tracing::info!(sandbox = %id, "removed a network no sandbox owns");
                }
            }
            Err(e) => tracing::warn!("sweeping sandbox networks: {e}"),
        }
        Ok(())
    }
}

/// The pulled image a record remembers (to re-attach or resume its sandbox), or why there is none.
pub(super) fn image_of(
    record: &Record,
    platform: &hearth_image::Platform,
) -> Result<PulledImage, String> {
    let Some(meta) = &record.image else {
        return Err("the node lost this sandbox's image record; it cannot run commands".into());
    };
    Ok(PulledImage {
        reference: Reference::parse(&meta.reference).map_err(|e| e.to_string())?,
        platform: platform.clone(),
        manifest_digest: record
            .info
            .image_digest
            .as_deref()
            .unwrap_or_default()
            .parse()
            .map_err(|e| format!("image digest: {e}"))?,
        rootfs: meta.rootfs.clone(),
        config: meta.config.clone(),
        cached: true,
    })
}

fn fail(record: &mut Record, reason: String) {
    tracing::warn!(sandbox = %record.info.id, "{reason}");
    record.fail(reason, now_ms());
}

fn with_console(reason: &str, console: &Path) -> String {
    // The tail only: a guest may have flooded its console to any size.
    let text = hearth_vm::read_log_tail(console, 16 * 1024);
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return reason.to_owned();
    }
    let tail = lines[lines.len().saturating_sub(CONSOLE_LINES)..].join("\n");
    format!("{reason}; last console lines:\n{tail}")
}

/// Kills the detached VMM a run directory names (only if pid and start time still match), then
/// removes the directory.
async fn kill_and_remove(run_dir: &Path) {
    let dir = run_dir.to_owned();
    let _ = tokio::task::spawn_blocking(move || {
        if DetachedRecord::read(&dir).is_ok() {
            match hearth_vm::adopt(&dir) {
                Ok(mut vm) => {
                    tracing::info!(pid = vm.pid(), run_dir = %dir.display(), "killing a VMM no sandbox owns");
                    if let Err(e) = vm.kill() {
                        tracing::warn!(run_dir = %dir.display(), "killing its VMM: {e}");
                    }
                }
                Err(VmError::Gone { .. }) => {}
                Err(e) => tracing::warn!(run_dir = %dir.display(), "inspecting its VMM: {e}"),
            }
        }
        for pid in hearth_vm::kill_processes_naming(&dir) {
            tracing::warn!(pid, run_dir = %dir.display(), "killed a VMM its record did not lead to");
        }
        match std::fs::remove_dir_all(&dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                tracing::warn!(run_dir = %dir.display(), "removing: {e}")
            }
            _ => {}
        }
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::super::NodeConfig;
    use super::*;

    #[tokio::test]
    async fn a_node_removes_stale_boot_templates_when_it_opens() {
        let home = tempfile::tempdir().unwrap();
        // What a build that died half-way left.
        let died = home.path().join("templates/00000000deadbeef");
        std::fs::create_dir_all(&died).unwrap();
        std::fs::write(died.join("state.tmp"), b"half").unwrap();
        let node = Node::open(NodeConfig::new(home.path())).await.unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while died.exists() && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(
            !died.exists(),
            "a failed build's template outlived the start"
        );
        drop(node);
    }
}
