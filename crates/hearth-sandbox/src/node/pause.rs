//! Pausing and resuming a node's sandboxes ([`Node::pause`], [`Node::resume`]) on top of
//! [`crate::Sandbox::pause`] and [`crate::PausedSandbox::resume`]. The snapshot of sandbox `id` lives
//! in `$HOME/node/paused/<id>/` while it is `Paused`; its run directory is `$HOME/sandboxes/<id>/`
//! again once resumed.
//!
//! Choices, as callers see them:
//! - Pause needs a `Running` sandbox and resume a `Paused` one; anything else is a conflict (409),
//!   as is a second pause or resume while one is under way. One exception: a pause of a sandbox
//!   its idle timeout paused answers 200 and makes it a declared pause (its uses no longer wake
//!   it; `reason` goes from `idle` to none).
//! - Execs (and file transfers) still running make a pause a conflict unless it is forced: their
//!   callers would lose the rest of their output and their exit status. Forced, their streams end
//!   when the VM is saved (the agent channel closes: the caller gets an error event, not an exit
//!   status); their processes are not killed: after the resume they run on in the guest, detached,
//!   their output discarded (see `crate::pause`). Detached processes do not keep a sandbox from
//!   counting as idle. The code interpreter is kept with its state (`interpreter.rs`) unless a
//!   call was running in it.
//! - A paused sandbox holds its disk in admission but not its vCPUs and memory; a resume admits
//!   those again like a create would (capacity: 503, quota: 429) and, refused, stays paused.
//! - Its TTL keeps counting while paused (it ends a paused sandbox like a running one, and the
//!   snapshot goes with it); its idle time does not: the pause and the resume count as activity,
//!   so `last_active_at` of a paused sandbox is when it was paused. Paused for longer than the
//!   node's `max_paused`, it is ended with its snapshot (`reaper.rs`).
//! - A resume that fails (a missing or corrupt snapshot file, a VMM that refuses it) leaves the
//!   sandbox `Paused` with its snapshot untouched, and the error names the file.
//!
//! - A sandbox created with `on_idle: pause` is paused by its idle timeout instead of ended, and
//!   woken by its next use (`idle.rs`); a sandbox paused by a call is woken only by a resume.
//!
//! While a pause or resume runs the entry is `releasing` (its whole VM still counted) and has no
//! live sandbox, so no exec can reach a VM that is being saved.

use std::path::PathBuf;
use std::sync::Arc;

use super::{now_ms, Node, NodeError, SandboxInfo, State, Tenant};

/// Why a sandbox is paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Cause {
    /// `POST /v1/sandboxes/{id}/pause` (or the Kubernetes node agent's `spec.paused`).
    Call,
    /// Its idle timeout, with `on_idle: pause` (`idle.rs`).
    Idle,
}

/// Disk a pause needs beyond the guest's memory: device state and the snapshot's bookkeeping.
pub(super) const SAVE_MARGIN: u64 = 64 << 20;

/// After a failed save of `sandbox`: a VMM killed under the save may still be exiting (its control
/// socket is reset before its parent can reap it; the soak got a 500 there), so give its death up
/// to half a second to show before [`save_failed`] looks.
pub(super) async fn settle(sandbox: &crate::Sandbox, e: &crate::SandboxError) {
    if e.is_disk_full() {
        return;
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(500);
    while sandbox.exited().is_none() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// What a failed save means to the caller; the VM runs on (or has died) either way. A full disk
/// is the node's capacity (503) and a VMM that did not answer the sandbox's trouble (504; the
/// failed save asked it to continue, which it does once it answers again): see [`NodeError::of`].
pub(super) fn save_failed(id: &str, sandbox: &crate::Sandbox, e: crate::SandboxError) -> NodeError {
    // Its VM died under the save (the soak kills VMMs): not a failure of the node's; the reaper
    // marks the sandbox failed at its next tick. The error may say so when `exited` cannot yet
    // (another task holds the VM: the soak once got a 500 here).
    if !e.is_disk_full() && (e.is_vm_gone() || sandbox.exited().is_some()) {
        return NodeError::NotRunning {
            id: id.to_owned(),
            state: State::Running,
            detail: Some(", but its VM has exited".to_owned()),
        };
    }
    NodeError::of(id, e)
}

impl Node {
    /// Where sandbox `id`'s snapshot lives while it is paused.
    pub fn paused_dir(&self, id: &str) -> PathBuf {
        self.net_home().join("paused").join(id)
    }

    /// Saves the tenant's running sandbox `id` to disk and ends its VMM (see the module docs for
    /// execs still running, admission and timeouts). Returns the record, now `Paused`.
    pub async fn pause(
        &self,
        tenant: &str,
        id: &str,
        force: bool,
    ) -> Result<SandboxInfo, NodeError> {
        self.pause_as(tenant, id, force, Cause::Call).await
    }

    /// [`Node::pause`] for `cause`. Paused for [`Cause::Idle`], the sandbox must still be idle
    /// when the table is locked here (a use marks it active under the same lock, so no use can
    /// start between this check and the save), and its record's reason becomes "idle"; an idle
    /// pause that fails counts as activity, so it is tried again only after another idle timeout.
    pub(super) async fn pause_as(
        &self,
        tenant: &str,
        id: &str,
        force: bool,
        cause: Cause,
    ) -> Result<SandboxInfo, NodeError> {
        self.check_open()?;
        let sandbox = {
            let mut table = self.table();
            let entry = table.visible(tenant, id)?;
            let state = entry.record.info.state;
            if cause == Cause::Idle && !super::idle::is_idle(entry, now_ms()) {
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: Some(", no longer idle".into()),
                });
            }
            let asleep = state == State::Paused
                && !entry.releasing
                && entry.record.info.reason.as_deref() == Some(super::idle::IDLE);
            if cause == Cause::Call && asleep {
                // Asked to pause while its idle timeout has it paused: a declared pause from
                // now on, which its next use does not wake.
                let entry = table.get_mut(id).expect("visible");
                entry.record.info.reason = None;
                let info = entry.info();
                table.save(id);
                drop(table);
                self.bump();
                tracing::info!(sandbox = %id, "idle-paused sandbox paused by a call");
                return Ok(info);
            }
            let busy = entry
                .releasing
                .then(|| ", being paused or resumed".to_owned());
            let Some(sandbox) = entry.live.clone().filter(|_| state == State::Running) else {
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: busy,
                });
            };
            let execs = entry.activity.running_execs();
            if execs > 0 && !force {
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: Some(format!(
                        " with {execs} exec(s) or file transfer(s) running: wait for them, or \
                         pause with \"force\": true, which ends them"
                    )),
                });
            }
            // The saved memory must fit: a save that runs out of space fails only after
            // writing most of it (the soak's full-disk fault found a 500 there).
            let need = (u64::from(entry.record.info.memory_mib) << 20) + SAVE_MARGIN;
            if let Some(free) = super::types::free_disk_bytes(&self.config.home) {
                if free < need {
                    return Err(NodeError::Capacity {
                        message: format!(
                            "no room to save this sandbox: its memory needs up to {} MiB and \
                             the node's disk has {} MiB free; retry when space is freed",
                            need >> 20,
                            free >> 20
                        ),
                    });
                }
            }
            let entry = table.get_mut(id).expect("visible");
            entry.live = None;
            entry.releasing = true;
            sandbox
        };
        self.bump();
        let dir = self.paused_dir(id);
        let paused = sandbox.pause(&dir).await;
        if let Err(e) = &paused {
            settle(&sandbox, e).await;
        }
        let now = now_ms();
        let mut ended_vm_runs = false;
        let outcome = {
            let mut table = self.table();
            match table.get_mut(id) {
                // Ended (deleted, expired) while it was being saved: the VM is gone either way.
                Some(entry) if entry.record.info.state == State::Running => {
                    entry.releasing = false;
                    match paused {
                        Ok(_) => {
                            entry.record.info.state = State::Paused;
                            entry.record.info.reason =
                                (cause == Cause::Idle).then(|| super::idle::IDLE.to_owned());
                            entry.record.vmm = None;
                            // The pause counts as activity: a paused sandbox's last activity
                            // is when it was paused, which `--max-paused` counts from.
                            entry.activity.touch();
                            let last_active = entry.info().last_active_at;
                            entry.record.info.last_active_at = last_active;
                            let info = entry.info();
                            table.save(id);
                            Ok(info)
                        }
                        Err(e) => {
                            entry.live = Some(sandbox.clone());
                            if cause == Cause::Idle {
                                entry.activity.touch();
                            }
                            Err(save_failed(id, &sandbox, e))
                        }
                    }
                }
                ended => {
                    // A failed save left the VM running: it goes first (below), and the
                    // sandbox shows `stopping` until then.
                    ended_vm_runs = paused.is_err();
                    if paused.is_ok() {
                        if let Some(entry) = ended {
                            entry.releasing = false;
                        }
                        let _ = std::fs::remove_dir_all(self.run_dir(id));
                        if table.get_mut(id).is_some_and(|e| e.record.deleted) {
                            table.forget(id);
                        }
                    }
                    let _ = std::fs::remove_dir_all(&dir);
                    Err(NodeError::NotRunning {
                        id: id.to_owned(),
                        state: State::Stopped,
                        detail: Some(", ended while it was being paused".into()),
                    })
                }
            }
        };
        if ended_vm_runs {
            // Ended while its save failed: its VM still runs.
            let vm = sandbox.clone();
            let _ = tokio::task::spawn_blocking(move || vm.kill_now()).await;
            self.released(id);
        }
        drop(sandbox);
        if outcome.is_ok() {
            // Saved with the VM, the code interpreter and the background processes wait there
            // for the resume.
            self.interpreters.park(id, &dir);
            self.park_processes(id, &dir);
        }
        self.bump();
        match &outcome {
            Ok(_) => tracing::info!(sandbox = %id, at = now, ?cause, "sandbox paused"),
            Err(e) => tracing::warn!(sandbox = %id, "pause failed: {e}"),
        }
        outcome
    }

    /// Brings the tenant's paused sandbox `id` back: admitted again (capacity, quota), restored
    /// from its snapshot with its network rebuilt and the guest given the host's clock and fresh
    /// entropy. Returns the record, `Running` again. A failed resume leaves it `Paused`.
    pub async fn resume(&self, tenant: &Tenant, id: &str) -> Result<SandboxInfo, NodeError> {
        self.check_open()?;
        let (record, image) = {
            let mut table = self.table();
            let entry = table.visible(&tenant.name, id)?;
            let state = entry.record.info.state;
            if state != State::Paused || entry.releasing {
                let detail = match entry.releasing {
                    true => ", being paused or resumed",
                    false => ", not paused",
                };
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: Some(detail.into()),
                });
            }
            let record = entry.record.clone();
            let image = super::recovery::image_of(&record, &self.config.pull.platform)
                .map_err(|e| NodeError::Invalid(format!("sandbox {id}: {e}")))?;
            table.readmit(
                tenant,
                id,
                self.config.limits.max_ttl,
                &self.config.capacity,
            )?;
            table.get_mut(id).expect("visible").releasing = true;
            (record, image)
        };
        self.bump();
        let config = self.sandbox_config(&record.info);
        let dir = self.paused_dir(id);
        let run_dir = self.run_dir(id);
        let interpreter = super::interpreter::Interpreters::saved(&dir);
        let processes = super::processes::Processes::saved(&dir);
        let resumed = match crate::PausedSandbox::open(&dir, image) {
            Ok(paused) => paused.resume(&config, &run_dir, true).await,
            Err(e) => Err(e),
        };
        let (outcome, leftover) = {
            let mut table = self.table();
            match (table.get_mut(id), resumed) {
                (Some(entry), Ok(sandbox)) if entry.record.info.state == State::Paused => {
                    entry.releasing = false;
                    entry.record.info.state = State::Running;
                    entry.record.info.reason = None;
                    entry.record.vmm = hearth_vm::ProcessIdentity::of(sandbox.vmm_pid());
                    let sandbox = Arc::new(sandbox);
                    if let Some(saved) = &interpreter {
                        // Before any call can see it running (a call would start a fresh
                        // interpreter, and that kills the saved one as a leftover).
                        self.interpreters
                            .adopt_restored(id, &sandbox, &entry.activity, saved);
                    }
                    entry.live = Some(sandbox);
                    // Paused time is not idle time.
                    entry.activity.touch();
                    let info = entry.info();
                    table.save(id);
                    (Ok(info), None)
                }
                (Some(entry), Err(e)) if entry.record.info.state == State::Paused => {
                    entry.releasing = false;
                    (Err(NodeError::of(id, e)), None)
                }
                // Ended (deleted, expired) while it was being restored. A VM that started
                // goes first (below): the sandbox shows `stopping` until then.
                (entry, resumed) => {
                    if resumed.is_err() {
                        let deleted = entry.is_some_and(|e| {
                            e.releasing = false;
                            e.record.deleted
                        });
                        if deleted {
                            table.forget(id);
                        }
                    }
                    let error = NodeError::NotRunning {
                        id: id.to_owned(),
                        state: State::Stopped,
                        detail: Some(", ended while it was being resumed".into()),
                    };
                    (Err(error), resumed.ok())
                }
            }
        };
        if let Some(sandbox) = leftover {
            let _ = sandbox.discard().await;
            let _ = std::fs::remove_dir_all(&dir);
            self.released(id);
        }
        if outcome.is_ok() {
            self.reattach_code(&tenant.name, id);
            self.reattach_processes(&tenant.name, id, processes);
        }
        self.bump();
        match &outcome {
            Ok(_) => tracing::info!(sandbox = %id, "sandbox resumed"),
            Err(e) => tracing::warn!(sandbox = %id, "resume failed: {e}"),
        }
        outcome
    }
}
