//! The reaper: a task ticking once a second that ends sandboxes past their TTL (paused ones too: a
//! TTL keeps counting while paused, and the snapshot goes with the sandbox), running sandboxes
//! idle for longer than their idle timeout (no exec running and no exec or file request; those
//! created with `on_idle: pause` are paused instead, see `idle.rs`), and
//! running sandboxes whose VM exited on its own (`Failed`, with how it ended). It also persists
//! activity times, so an idle timeout survives a restart. Paused time is not idle time: a paused
//! sandbox is never idle, and its pause and resume count as activity; but one paused for longer
//! than the node's `max_paused` (`--max-paused`, default 7 days) is ended, its snapshot removed,
//! with that reason in its record. Each tick also refills the warm pools (`pool.rs`) and gives
//! back boot templates' memory copies no VM has used for ten minutes. Holds the node only weakly:
//! it stops when the node goes.
//!
//! [`Node::update_timeouts`] (`PATCH /v1/sandboxes/{id}`) changes the TTL and idle timeout the
//! reaper goes by, for a running or paused sandbox.

use std::sync::Weak;
use std::time::Duration;

use super::{now_ms, Node, NodeError, OnIdle, SandboxInfo, State};

const TICK: Duration = Duration::from_secs(1);
/// A boot template's memory copy no VM has taken for this long is given back to the host.
const TEMPLATE_MEMORY_IDLE: Duration = Duration::from_secs(600);

pub(super) fn spawn(node: Weak<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = node.upgrade() else {
                return;
            };
            for (id, action) in node.due(now_ms()) {
                let node = node.clone();
                match action {
                    Action::End(state, reason) => {
                        tokio::spawn(async move { node.end(&id, state, &reason, false).await })
                    }
                    Action::Pause => tokio::spawn(async move { node.pause_idle(&id).await }),
                };
            }
            node.refill_pools();
            hearth_vm::qemu::release_unused_template_copies(TEMPLATE_MEMORY_IDLE);
        }
    })
}

/// What the reaper does to one sandbox.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Action {
    /// Ends it in this state, for this reason.
    End(State, String),
    /// Pauses it: idle, with `on_idle: pause` (`idle.rs`).
    Pause,
}

impl Node {
    /// What has to end or sleep now, by id; persists changed activity times.
    fn due(&self, now: u64) -> Vec<(String, Action)> {
        let mut due = Vec::new();
        let mut active = Vec::new();
        let mut table = self.table();
        for entry in table.entries() {
            let info = &entry.record.info;
            let id = &info.id;
            if !info.state.is_live() {
                continue;
            }
            if info.expires_at.is_some_and(|at| at <= now) {
                due.push((
                    id.clone(),
                    Action::End(State::Stopped, "ttl expired".into()),
                ));
                continue;
            }
            if info.state == State::Paused && !entry.releasing {
                let paused_for = now.saturating_sub(entry.info().last_active_at);
                if u128::from(paused_for) >= self.config.max_paused.as_millis() {
                    let reason = format!(
                        "paused for longer than the node allows ({}s, --max-paused)",
                        self.config.max_paused.as_secs()
                    );
                    due.push((id.clone(), Action::End(State::Stopped, reason)));
                }
                continue;
            }
            if info.state != State::Running {
                continue;
            }
            if let Some(exit) = entry.live.as_ref().and_then(|s| s.exited()) {
                let how = match exit.failure {
                    Some(failure) => failure,
                    None => exit.status.to_string(),
                };
                let reason = format!("VM exited: {how}");
                due.push((id.clone(), Action::End(State::Failed, reason)));
                continue;
            }
            // Being paused: not idle, and not to be paused twice.
            if !entry.releasing && super::idle::is_idle(entry, now) {
                let action = match info.on_idle {
                    OnIdle::Stop => Action::End(State::Stopped, super::idle::IDLE.into()),
                    OnIdle::Pause => Action::Pause,
                };
                due.push((id.clone(), action));
                continue;
            }
            let last_active = entry.activity.last_active();
            if last_active > info.last_active_at {
                active.push((id.clone(), last_active));
            }
        }
        for (id, at) in active {
            table.set_last_active(&id, at);
        }
        due
    }
}

impl Node {
    /// Sets the tenant's running or paused sandbox `id`'s TTL (`ttl`, its whole lifetime counted
    /// from its creation, as at create: at most the node's `max_ttl`) and idle timeout (from its
    /// last activity), each only when given. A TTL already past ends it at the reaper's next tick.
    /// Returns the record. Not live: [`NodeError::NotRunning`].
    pub fn update_timeouts(
        &self,
        tenant: &str,
        id: &str,
        ttl: Option<Duration>,
        idle_timeout: Option<Duration>,
    ) -> Result<SandboxInfo, NodeError> {
        let max_ttl = self.config.limits.max_ttl;
        if let Some(ttl) = ttl.filter(|t| t.is_zero() || *t > max_ttl) {
            return Err(NodeError::Invalid(format!(
                "ttl {}s: this node allows 1 to {}s (counted from the sandbox's creation)",
                ttl.as_secs_f64(),
                max_ttl.as_secs()
            )));
        }
        if idle_timeout.is_some_and(|t| t.is_zero()) {
            return Err(NodeError::Invalid("idle_timeout must be positive".into()));
        }
        let info = {
            let mut table = self.table();
            let state = table.visible(tenant, id)?.record.info.state;
            if !matches!(state, State::Running | State::Paused) {
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: Some(", not running or paused".into()),
                });
            }
            let entry = table.get_mut(id).expect("visible");
            if let Some(ttl) = ttl {
                let created = entry.record.info.created_at;
                entry.record.info.expires_at = Some(created.saturating_add(ttl.as_millis() as u64));
            }
            if let Some(idle) = idle_timeout {
                entry.record.idle_timeout_ms = Some(idle.as_millis().max(1) as u64);
            }
            let info = entry.info();
            table.save(id);
            info
        };
        self.bump();
        tracing::info!(sandbox = %id, ?ttl, ?idle_timeout, "timeouts updated");
        Ok(info)
    }
}

#[cfg(test)]
mod tests {
    use super::super::admission::Resources;
    use super::super::record::Record;
    use super::super::table::Entry;
    use super::super::{CreateSpec, NodeConfig};
    use super::*;

    const HOUR_MS: u64 = 3600 * 1000;

    /// A node on an empty temp home (no VM is ever started) with `max_paused`.
    async fn node(home: &std::path::Path, max_paused: Duration) -> std::sync::Arc<Node> {
        let mut config = NodeConfig::new(home);
        config.max_paused = max_paused;
        config.limits.max_ttl = Duration::from_secs(24 * 3600);
        Node::open(config).await.unwrap()
    }

    /// Puts a record of tenant "t" in `state`, created and last active at `at` with a 90-minute
    /// TTL, into the table.
    fn insert(node: &Node, id: &str, state: State, at: u64) {
        let resources = Resources {
            vcpus: 1,
            memory_mib: 256,
            disk_bytes: 16 << 20,
            ttl: Duration::from_secs(90 * 60),
        };
        let mut record = Record::new(id.into(), "t", CreateSpec::default(), &resources, at);
        record.info.state = state;
        node.table().insert(Entry::new(record));
    }

    #[tokio::test]
    async fn a_sandbox_paused_longer_than_max_paused_is_due_with_a_reason() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), Duration::from_secs(2 * 3600)).await;
        let now = now_ms();
        insert(&node, "old", State::Paused, now - 3 * HOUR_MS);
        insert(&node, "young", State::Paused, now - HOUR_MS);
        // Paused three hours ago, but its TTL was extended: max-paused still ends it.
        node.update_timeouts("t", "old", Some(Duration::from_secs(20 * 3600)), None)
            .unwrap();
        let due = node.due(now);
        assert_eq!(due.len(), 1, "{due:?}");
        let (id, Action::End(state, reason)) = &due[0] else {
            panic!("{due:?}")
        };
        assert_eq!((id.as_str(), *state), ("old", State::Stopped));
        assert!(
            reason.contains("--max-paused") && reason.contains("7200s"),
            "{reason}"
        );
    }

    #[tokio::test]
    async fn an_idle_sandbox_with_on_idle_pause_is_paused_not_ended_and_only_once() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), Duration::from_secs(3600)).await;
        let now = now_ms();
        insert(&node, "sleepy", State::Running, now - HOUR_MS);
        insert(&node, "busy", State::Running, now - HOUR_MS);
        insert(&node, "ender", State::Running, now - HOUR_MS);
        {
            let mut table = node.table();
            for id in ["sleepy", "busy", "ender"] {
                let entry = table.get_mut(id).unwrap();
                entry.record.idle_timeout_ms = Some(60_000);
                if id != "ender" {
                    entry.record.info.on_idle = OnIdle::Pause;
                }
            }
        }
        // "busy" runs an exec (which touched it now, too): not idle.
        let busy = node.table().get_mut("busy").unwrap().activity.clone();
        let _exec = super::super::exec::ActivityGuard::new(busy);
        // All three unused for an hour, with a minute's idle timeout.
        let mut due = node.due(now);
        due.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            due,
            [
                ("ender".into(), Action::End(State::Stopped, "idle".into())),
                ("sleepy".into(), Action::Pause),
            ]
        );
        // While its pause saves the VM it is not due again.
        node.table().get_mut("sleepy").unwrap().releasing = true;
        let due = node.due(now);
        assert!(due.iter().all(|(id, _)| id != "sleepy"), "{due:?}");
    }

    #[tokio::test]
    async fn timeouts_of_a_live_sandbox_are_set_within_the_maximum() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), Duration::from_secs(3600)).await;
        let now = now_ms();
        insert(&node, "run", State::Running, now - 2 * HOUR_MS);
        insert(&node, "new", State::Creating, now);
        // Created two hours ago with a 90-minute TTL: due now, unless extended.
        assert!(node.due(now).iter().any(|(id, _)| id == "run"));
        let info = node
            .update_timeouts("t", "run", Some(Duration::from_secs(3 * 3600)), None)
            .unwrap();
        assert_eq!(info.expires_at, Some(now - 2 * HOUR_MS + 3 * HOUR_MS));
        assert!(node.due(now).is_empty());
        // An idle timeout set now ends it once it has been idle that long (two hours already).
        node.update_timeouts("t", "run", None, Some(Duration::from_secs(60)))
            .unwrap();
        let due = node.due(now);
        assert_eq!(due.len(), 1, "{due:?}");
        assert_eq!(due[0].1, Action::End(State::Stopped, "idle".into()));
        // The node's maximum, zero, a sandbox that is not live yet, another tenant's.
        let over = node.update_timeouts("t", "run", Some(Duration::from_secs(25 * 3600)), None);
        assert!(matches!(over, Err(NodeError::Invalid(_))), "{over:?}");
        let zero = node.update_timeouts("t", "run", None, Some(Duration::ZERO));
        assert!(matches!(zero, Err(NodeError::Invalid(_))), "{zero:?}");
        let creating = node.update_timeouts("t", "new", Some(Duration::from_secs(60)), None);
        assert!(
            matches!(creating, Err(NodeError::NotRunning { .. })),
            "{creating:?}"
        );
        let other = node.update_timeouts("u", "run", Some(Duration::from_secs(60)), None);
        assert!(
            matches!(other, Err(NodeError::NotFound { .. })),
            "{other:?}"
        );
    }
}
