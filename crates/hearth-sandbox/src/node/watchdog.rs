//! The watchdog: a task that asks every running sandbox's agent for its `info` every few seconds
//! and fails the sandbox (`Failed`, "guest unresponsive ...", its VM killed) once the agent has not
//! answered for [`NodeConfig::unresponsive_after`](super::NodeConfig::unresponsive_after). Without
//! it, a guest whose kernel hung or whose VMM froze stays `running` forever while every exec waits
//! out its deadline (the soak's frozen-VMM fault). A guest that answers again in time is left
//! alone. Holds the node only weakly: it stops when the node goes or shuts down.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Weak};

use tokio::time::Instant;

use super::{Node, State};
use crate::{ChannelError, Sandbox};

/// Asks made per `unresponsive_after`: a guest is failed after this many unanswered in a row.
const ASKS: u32 = 4;

pub(super) fn spawn(node: Weak<Node>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let Some(after) = node.upgrade().map(|n| n.config.unresponsive_after) else {
            return;
        };
        let every = after / ASKS;
        // Since when each sandbox's agent has not answered (absent: it answered last time).
        let mut silent_since: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let Some(node) = node.upgrade() else {
                return;
            };
            if node.shutting_down.load(Ordering::SeqCst) {
                return;
            }
            let running = node.running_sandboxes();
            silent_since.retain(|id, _| running.iter().any(|(r, _)| r == id));
            let mut asks = tokio::task::JoinSet::new();
            for (id, sandbox) in running {
                asks.spawn(async move {
                    // Busy: the host side's request cap is full; the agent is alive.
                    let answered = matches!(
                        tokio::time::timeout(every, sandbox.client().info()).await,
                        Ok(Ok(_) | Err(ChannelError::Busy(_)))
                    );
                    (id, sandbox, answered)
                });
            }
            while let Some(Ok((id, sandbox, answered))) = asks.join_next().await {
                if answered {
                    silent_since.remove(&id);
                    continue;
                }
                let since = *silent_since.entry(id.clone()).or_insert_with(Instant::now);
                if since.elapsed() + every >= after {
                    silent_since.remove(&id);
                    let reason = format!(
                        "guest unresponsive: its agent did not answer for {}s",
                        after.as_secs()
                    );
                    tracing::warn!(sandbox = %id, "{reason}; killing its VM");
                    // No clean shutdown to wait for: the guest would not answer it.
                    sandbox.give_up_on_guest();
                    let node = node.clone();
                    tokio::spawn(async move { node.end(&id, State::Failed, &reason, false).await });
                }
            }
        }
    })
}

impl Node {
    /// The running sandboxes with a live VM, as (id, sandbox).
    fn running_sandboxes(&self) -> Vec<(String, Arc<Sandbox>)> {
        self.table()
            .entries()
            .filter(|e| e.record.info.state == State::Running)
            .filter_map(|e| Some((e.record.info.id.clone(), e.live.clone()?)))
            .collect()
    }
}
