//! The placement policy, as pure functions over nodes and an allocation ledger (no I/O, no clock).
//!
//! Policy: a sandbox may go to a node that is **ready** (its Lease is fresh), whose labels include every
//! `nodeSelector` pair, and whose free vCPUs and memory — capacity minus every non-finished sandbox already
//! bound there, as counted by the [`Ledger`] — cover the sandbox's demand. Among those it goes to the
//! **least allocated** one: the smallest sum of vCPU and memory utilisation after placing it (ties: node
//! name), which spreads equal work evenly. Pending sandboxes are placed oldest first. A node is never
//! over capacity because every placement is counted in the ledger before the next one is chosen, and
//! the controller (the only binder, leader-elected) rebuilds the ledger from the API.

use std::collections::{BTreeMap, HashMap};

use crate::crd::Demand;

/// A node as the scheduler sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeInfo {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: Demand,
    /// Lease fresh: the agent is alive.
    pub ready: bool,
}

/// A Pending sandbox waiting for a node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PendingSandbox {
    /// Unique key (the object's uid).
    pub key: String,
    pub demand: Demand,
    pub node_selector: BTreeMap<String, String>,
}

/// What is bound where: every non-finished sandbox that has a node, keyed by uid.
#[derive(Clone, Debug, Default)]
pub struct Ledger {
    bindings: HashMap<String, (String, Demand)>,
    per_node: HashMap<String, Demand>,
}

impl Ledger {
    pub fn new() -> Self {
        Self::default()
    }

    /// Counts `demand` on `node` for sandbox `key`; binding a key twice moves it.
    pub fn bind(&mut self, key: &str, node: &str, demand: Demand) {
        self.release(key);
        let slot = self.per_node.entry(node.to_string()).or_default();
        slot.vcpus += demand.vcpus;
        slot.memory_mib += demand.memory_mib;
        self.bindings
            .insert(key.to_string(), (node.to_string(), demand));
    }

    /// Stops counting sandbox `key` (finished, deleted, or its bind failed).
    pub fn release(&mut self, key: &str) {
        if let Some((node, d)) = self.bindings.remove(key) {
            if let Some(slot) = self.per_node.get_mut(&node) {
                slot.vcpus -= d.vcpus;
                slot.memory_mib -= d.memory_mib;
            }
        }
    }

    pub fn allocated(&self, node: &str) -> Demand {
        self.per_node.get(node).copied().unwrap_or_default()
    }

    pub fn node_of(&self, key: &str) -> Option<&str> {
        self.bindings.get(key).map(|(n, _)| n.as_str())
    }

    pub fn count_on(&self, node: &str) -> usize {
        self.bindings.values().filter(|(n, _)| n == node).count()
    }
}

/// Why a sandbox could not be placed now.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Unschedulable(pub String);

/// Chooses a node for one sandbox and records it in the ledger.
pub fn place(
    sandbox: &PendingSandbox,
    nodes: &[NodeInfo],
    ledger: &mut Ledger,
) -> Result<String, Unschedulable> {
    let (mut ready, mut matching) = (0, 0);
    let mut best: Option<(u128, &str)> = None;
    for node in nodes {
        if !node.ready {
            continue;
        }
        ready += 1;
        if !sandbox
            .node_selector
            .iter()
            .all(|(k, v)| node.labels.get(k) == Some(v))
        {
            continue;
        }
        matching += 1;
        let used = ledger.allocated(&node.name);
        let cpu = u64::from(used.vcpus) + u64::from(sandbox.demand.vcpus);
        let mem = used.memory_mib + sandbox.demand.memory_mib;
        if cpu > u64::from(node.capacity.vcpus) || mem > node.capacity.memory_mib {
            continue;
        }
        // Utilisation in millionths, summed over both resources; capacity > 0 here since it fits.
        let score = u128::from(cpu) * 1_000_000 / u128::from(node.capacity.vcpus.max(1))
            + u128::from(mem) * 1_000_000 / u128::from(node.capacity.memory_mib.max(1));
        if best.is_none_or(|(s, n)| (score, node.name.as_str()) < (s, n)) {
            best = Some((score, &node.name));
        }
    }
    match best {
        Some((_, name)) => {
            let name = name.to_string();
            ledger.bind(&sandbox.key, &name, sandbox.demand);
            Ok(name)
        }
        None => Err(Unschedulable(format!(
            "no node can take {} vCPU and {} MiB now: {ready} ready node(s), {matching} matching the \
             nodeSelector, none with enough free capacity",
            sandbox.demand.vcpus, sandbox.demand.memory_mib
        ))),
    }
}

/// Places `pending` in order; the ledger ends up holding every placement.
pub fn place_all(
    pending: &[PendingSandbox],
    nodes: &[NodeInfo],
    ledger: &mut Ledger,
) -> Vec<(String, Result<String, Unschedulable>)> {
    pending
        .iter()
        .map(|s| (s.key.clone(), place(s, nodes, ledger)))
        .collect()
}

#[cfg(test)]
mod tests;
