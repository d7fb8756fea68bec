//! Boot slots shared fairly between tenants. A node boots at most `max_concurrent_boots` VMs at
//! once (image pull and VM start are the expensive part of a create); the rest wait. A plain
//! semaphore serves waiters first come, first served, so one tenant that queues a hundred creates
//! makes every other tenant wait behind all of them. Here a freed slot goes to the next tenant in
//! round-robin order that has someone waiting, and within a tenant to its oldest waiter: a tenant
//! waits behind at most one boot of each other waiting tenant.
//!
//! Pure scheduling over tokio primitives: no I/O. A waiter that goes away (its boot task aborted)
//! is skipped; a slot is returned when its [`BootSlot`] is dropped.

use std::collections::{BTreeMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::oneshot;

/// The node's boot slots.
pub(super) struct BootSlots {
    state: Arc<Mutex<State>>,
}

struct State {
    free: usize,
    /// Waiters by tenant, oldest first.
    waiting: BTreeMap<String, VecDeque<oneshot::Sender<BootSlot>>>,
    /// The tenant served last: the round-robin turn starts after it.
    last: Option<String>,
}

/// One held boot slot; dropping it hands the slot to the next waiter.
pub(super) struct BootSlot {
    state: Arc<Mutex<State>>,
}

impl BootSlots {
    pub fn new(slots: usize) -> BootSlots {
        BootSlots {
            state: Arc::new(Mutex::new(State {
                free: slots.max(1),
                waiting: BTreeMap::new(),
                last: None,
            })),
        }
    }

    /// Waits for a slot for `tenant`'s boot. Cancel-safe: dropping the future gives up its place.
    pub async fn acquire(&self, tenant: &str) -> BootSlot {
        let rx = {
            let mut state = lock(&self.state);
            if state.free > 0 && state.waiting.is_empty() {
                state.free -= 1;
                state.last = Some(tenant.to_owned());
                return BootSlot {
                    state: self.state.clone(),
                };
            }
            let (tx, rx) = oneshot::channel();
            state
                .waiting
                .entry(tenant.to_owned())
                .or_default()
                .push_back(tx);
            rx
        };
        // A slot may be free while others waited: hand it out now, in turn.
        dispatch(&self.state);
        rx.await
            .expect("a waiter's sender is only dropped after a send or with the node")
    }

    /// Boots waiting for a slot, for metrics and tests.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        lock(&self.state).waiting.values().map(VecDeque::len).sum()
    }
}

impl Drop for BootSlot {
    fn drop(&mut self) {
        lock(&self.state).free += 1;
        dispatch(&self.state);
    }
}

/// Hands free slots to waiters: the next tenant after the last one served that still has a live
/// waiter, its oldest waiter first.
fn dispatch(shared: &Arc<Mutex<State>>) {
    let mut state = lock(shared);
    // Slots whose waiter went away between the check and the send: dropped once the lock is
    // released, which returns them and dispatches again.
    let mut returned = Vec::new();
    while state.free > 0 {
        let Some(tenant) = next_tenant(&state) else {
            break;
        };
        let queue = state.waiting.get_mut(&tenant).expect("chosen from the map");
        let waiter = queue.pop_front().expect("only non-empty queues are kept");
        if queue.is_empty() {
            state.waiting.remove(&tenant);
        }
        if waiter.is_closed() {
            continue; // its boot was aborted while it waited
        }
        state.free -= 1;
        state.last = Some(tenant);
        let slot = BootSlot {
            state: shared.clone(),
        };
        if let Err(slot) = waiter.send(slot) {
            returned.push(slot);
        }
    }
    drop(state);
    drop(returned);
}

/// The first tenant with waiters after the last one served, wrapping around.
fn next_tenant(state: &State) -> Option<String> {
    let after = state.last.as_deref().and_then(|last| {
        state
            .waiting
            .range::<str, _>((std::ops::Bound::Excluded(last), std::ops::Bound::Unbounded))
            .next()
    });
    after
        .or_else(|| state.waiting.iter().next())
        .map(|(tenant, _)| tenant.clone())
}

fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    /// The attack: one tenant queues many boots; another tenant's single boot must not wait
    /// behind all of them. With one slot, tenant B's boot is the second served, not the sixth.
    #[tokio::test]
    async fn a_tenant_flooding_creates_does_not_starve_another() {
        let slots = Arc::new(BootSlots::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let first = slots.acquire("greedy").await;
        let mut tasks = Vec::new();
        let mut spawn = |tenant: &'static str, n: usize| {
            let (slots, order) = (slots.clone(), order.clone());
            tasks.push(tokio::spawn(async move {
                let _slot = slots.acquire(tenant).await;
                order.lock().unwrap().push(format!("{tenant}{n}"));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }));
        };
        for n in 0..5 {
            spawn("greedy", n);
        }
        while slots.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        spawn("modest", 0);
        while slots.waiting() < 6 {
            tokio::task::yield_now().await;
        }
        drop(first);
        for task in tasks {
            task.await.unwrap();
        }
        let order = order.lock().unwrap().clone();
        assert_eq!(order.len(), 6);
        let modest = order.iter().position(|o| o == "modest0").unwrap();
        assert!(modest <= 1, "modest served at {modest}: {order:?}");
        // Within a tenant: oldest first.
        let greedy: Vec<&String> = order.iter().filter(|o| o.starts_with("greedy")).collect();
        assert_eq!(
            greedy,
            ["greedy0", "greedy1", "greedy2", "greedy3", "greedy4"]
        );
    }

    #[tokio::test]
    async fn never_more_slots_than_configured_and_abandoned_waiters_are_skipped() {
        let slots = Arc::new(BootSlots::new(2));
        let a = slots.acquire("a").await;
        let b = slots.acquire("b").await;
        // A waiter whose boot is aborted while it waits gives up its place.
        let gone = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("c").await })
        };
        while slots.waiting() < 1 {
            tokio::task::yield_now().await;
        }
        gone.abort();
        let _ = gone.await;
        let next = {
            let slots = slots.clone();
            tokio::spawn(async move { slots.acquire("d").await })
        };
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(!next.is_finished(), "a third slot was handed out");
        drop(a);
        let d = tokio::time::timeout(Duration::from_secs(5), next)
            .await
            .expect("the freed slot went to the live waiter, not the aborted one")
            .unwrap();
        assert_eq!(lock(&slots.state).free, 0);
        drop((b, d));
        assert_eq!(lock(&slots.state).free, 2);
    }
}
