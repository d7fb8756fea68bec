//! Idle sandboxes that sleep instead of ending (`on_idle: pause`): the reaper pauses a running
//! sandbox whose idle timeout has passed ([`Node::pause_idle`]) when its record says so, and its
//! next use wakes it ([`Node::wake`], called by the API before an exec, a file transfer, a code
//! run, a port connection or a fork). A paused sandbox holds only its disk (`pause.rs`), so a node
//! can keep many more idle sandboxes than it could keep running; the price is the resume on the
//! next use (its processes, files and listening sockets are as they were, and its clock and
//! entropy are renewed as at any resume).
//!
//! Only what the idle timeout paused is woken by a use: such a sandbox is `Paused` with reason
//! [`IDLE`]. One paused by a call stays paused until a resume, as before (a use answers 409). The
//! Kubernetes node agent reports an idle-paused Service Sandbox as Paused and leaves it so
//! (`lifecycle.idlePauseSeconds`, `hearth-k8s`'s `node/service.rs`).

use std::time::Duration;

use super::pause::Cause;
use super::table::Entry;
use super::{lock_ignoring_poison, Node, NodeError, OnIdle, State, Tenant};

/// The reason of a sandbox its idle timeout paused.
pub const IDLE: &str = "idle";

/// How long a use waits for a pause or resume already under way before it gives up (and answers
/// what it finds: 409 while one is still running).
const WAKE_WAIT: Duration = Duration::from_secs(120);

/// Whether running sandbox `entry` has been idle for its idle timeout at `now` (Unix ms): no exec,
/// transfer or port connection running, and its last use at least that long ago.
pub(super) fn is_idle(entry: &Entry, now: u64) -> bool {
    entry.record.idle_timeout_ms.is_some_and(|idle| {
        entry.activity.running_execs() == 0
            && now.saturating_sub(entry.activity.last_active()) >= idle
    })
}

/// What [`Node::wake`] does after one look at the sandbox.
enum Next {
    Done,
    Resume,
    Wait,
}

impl Node {
    /// Pauses running sandbox `id` because it is idle (the reaper calls this for `on_idle: pause`).
    /// Nothing happens when it has been used since the reaper looked.
    pub(super) async fn pause_idle(&self, id: &str) {
        let tenant = match self.table().get_mut(id) {
            Some(entry) => entry.record.info.tenant.clone(),
            None => return,
        };
        match self.pause_as(&tenant, id, false, Cause::Idle).await {
            Ok(_) => lock_ignoring_poison(&self.counters).idle_pauses_total += 1,
            Err(NodeError::NotRunning { .. }) => {} // used, ended or paused meanwhile
            Err(e) => {
                let retry = "retried after another idle timeout";
                tracing::warn!(sandbox = %id, "idle pause failed, {retry}: {e}")
            }
        }
    }

    /// Before the tenant uses sandbox `id`: resumes it if its idle timeout paused it, after
    /// waiting for a pause or resume under way (so a use that arrives while the idle pause saves
    /// the VM gets the sandbox back rather than a conflict, and concurrent uses resume it once).
    /// A running sandbox is marked active, so an idle pause cannot start before the use does.
    /// Anything else is left to the use to report (not found, not running). A failed resume is
    /// the answer (capacity 503, quota 429, a damaged snapshot), and the sandbox stays paused.
    pub async fn wake(&self, tenant: &Tenant, id: &str) -> Result<(), NodeError> {
        let deadline = tokio::time::Instant::now() + WAKE_WAIT;
        let mut changes = self.changed.subscribe();
        loop {
            let next = {
                let table = self.table();
                let Ok(entry) = table.visible(&tenant.name, id) else {
                    return Ok(());
                };
                let info = &entry.record.info;
                match (info.on_idle, info.state, entry.releasing) {
                    (OnIdle::Pause, State::Running, false) => {
                        entry.activity.touch();
                        Next::Done
                    }
                    (OnIdle::Pause, State::Paused, false)
                        if info.reason.as_deref() == Some(IDLE) =>
                    {
                        Next::Resume
                    }
                    // Being paused or resumed: wait for it to finish, then look again.
                    (OnIdle::Pause, State::Running | State::Paused, true) => Next::Wait,
                    _ => Next::Done,
                }
            };
            match next {
                Next::Done => return Ok(()),
                Next::Resume => match self.resume(tenant, id).await {
                    Ok(_) => {
                        lock_ignoring_poison(&self.counters).wakes_total += 1;
                        return Ok(());
                    }
                    // Another use's resume (or a pause) got there first: look again.
                    Err(NodeError::NotRunning { .. }) => {}
                    Err(e) => return Err(e),
                },
                Next::Wait => {
                    if tokio::time::timeout_at(deadline, changes.changed())
                        .await
                        .is_err()
                    {
                        return Ok(());
                    }
                }
            }
        }
    }
}
