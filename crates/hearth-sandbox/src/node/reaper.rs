//! The reaper: a task ticking once a second that ends sandboxes past their TTL (paused ones too: a
//! TTL keeps counting while paused, and the snapshot goes with the sandbox), running sandboxes
//! idle for longer than their idle timeout (no exec running and no exec or file request), and
//! running sandboxes whose VM exited on its own (`Failed`, with how it ended). It also persists
//! activity times, so an idle timeout survives a restart. Paused time is not idle time: a paused
//! sandbox is never idle, and its resume counts as activity. Holds the node only weakly: it stops
//! when the node goes.

use std::sync::Weak;
use std::time::Duration;

use super::{now_ms, Node, State};

const TICK: Duration = Duration::from_secs(1);

pub(super) fn spawn(node: Weak<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = node.upgrade() else {
                return;
            };
            for (id, state, reason) in node.due(now_ms()) {
                let node = node.clone();
                tokio::spawn(async move { node.end(&id, state, &reason, false).await });
            }
        }
    })
}

impl Node {
    /// What has to end now, as (id, new state, reason); persists changed activity times.
    fn due(&self, now: u64) -> Vec<(String, State, String)> {
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
                due.push((id.clone(), State::Stopped, "ttl expired".to_owned()));
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
                due.push((id.clone(), State::Failed, format!("VM exited: {how}")));
                continue;
            }
            let last_active = entry.activity.last_active();
            let idle_for = now.saturating_sub(last_active);
            if entry
                .record
                .idle_timeout_ms
                .is_some_and(|idle| entry.activity.running_execs() == 0 && idle_for >= idle)
            {
                due.push((id.clone(), State::Stopped, "idle".to_owned()));
                continue;
            }
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
