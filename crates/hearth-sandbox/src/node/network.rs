//! A sandbox's network on the node: the policy a new sandbox gets (its own or the node's default,
//! checked against its tenant's ceiling: `hearth_net::ceiling`), reading it with the network's
//! activity, and replacing it while the sandbox runs (in force at once; open connections the new
//! policy refuses are cut). The record keeps the policy, so a restarted daemon serves it again.

use std::sync::Arc;

use hearth_net::ceiling::within_ceiling;
use hearth_net::network::NetworkStats;
use hearth_net::policy::NetworkPolicy;
use hearth_net::proxy::RefusedAttempt;

use super::{Node, NodeError, State, Tenant};

/// A sandbox's network as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkView {
    pub policy: NetworkPolicy,
    pub stats: NetworkStats,
    /// The latest refused connection attempts, oldest first (bounded).
    pub refused: Vec<RefusedAttempt>,
}

/// A running sandbox's network counters, as `/metrics` shows them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxNetworkStats {
    pub id: String,
    pub tenant: String,
    pub stats: NetworkStats,
}

impl Node {
    /// The network counters of the tenant's running sandboxes (those with a network), by id:
    /// the same counters as [`Node::network`]'s.
    pub fn network_stats(&self, tenant: &str) -> Vec<SandboxNetworkStats> {
        let live: Vec<(String, Arc<crate::Sandbox>)> = self
            .table()
            .entries()
            .filter(|e| e.record.info.tenant == tenant && !e.record.deleted)
            .filter(|e| e.record.info.state == State::Running)
            .filter_map(|e| Some((e.record.info.id.clone(), e.live.clone()?)))
            .collect();
        live.into_iter()
            .filter_map(|(id, sandbox)| {
                let (stats, _) = sandbox.network_activity()?;
                let tenant = tenant.to_owned();
                Some(SandboxNetworkStats { id, tenant, stats })
            })
            .collect()
    }

    /// The policy a sandbox created with `asked` gets, or why it may not: `None` when this node
    /// gives sandboxes no network.
    pub(super) fn network_for(
        &self,
        tenant: &Tenant,
        asked: Option<NetworkPolicy>,
    ) -> Result<Option<NetworkPolicy>, NodeError> {
        if self.config.defaults.network.is_none() {
            return match asked {
                Some(policy) if policy != NetworkPolicy::none() => Err(NodeError::Invalid(
                    "this node gives sandboxes no network; leave `network` out".into(),
                )),
                _ => Ok(None),
            };
        }
        let asked = asked.unwrap_or_else(|| self.config.network_default.clone());
        within_ceiling(&asked, &tenant.network_ceiling)
            .map(Some)
            .map_err(|e| NodeError::Forbidden(e.to_string()))
    }

    /// The tenant's running sandbox `id`'s policy and network activity.
    pub fn network(&self, tenant: &str, id: &str) -> Result<NetworkView, NodeError> {
        let sandbox = self.running_sandbox(tenant, id)?;
        view(&sandbox, id)
    }

    /// Replaces the policy of the tenant's running sandbox `id` (within the tenant's ceiling).
    pub async fn set_network(
        &self,
        tenant: &Tenant,
        id: &str,
        asked: NetworkPolicy,
    ) -> Result<NetworkView, NodeError> {
        let sandbox = self.running_sandbox(&tenant.name, id)?;
        let policy = self
            .network_for(tenant, Some(asked))?
            .ok_or_else(|| no_network(id))?;
        let apply = {
            let (sandbox, policy) = (sandbox.clone(), policy.clone());
            tokio::task::spawn_blocking(move || sandbox.set_network_policy(policy))
        };
        if !apply
            .await
            .expect("network policy task")
            .map_err(|e| NodeError::of(id, e))?
        {
            return Err(no_network(id));
        }
        {
            let mut table = self.table();
            if let Some(entry) = table.get_mut(id) {
                entry.record.info.network = Some(policy);
            }
            table.save(id);
        }
        tracing::info!(sandbox = %id, tenant = %tenant.name, "network policy replaced");
        view(&sandbox, id)
    }

    fn running_sandbox(&self, tenant: &str, id: &str) -> Result<Arc<crate::Sandbox>, NodeError> {
        let table = self.table();
        let entry = table.visible(tenant, id)?;
        match (&entry.live, entry.record.info.state) {
            (Some(sandbox), State::Running) => Ok(sandbox.clone()),
            (_, state) => Err(NodeError::NotRunning {
                id: id.to_owned(),
                state,
                detail: None,
            }),
        }
    }
}

fn view(sandbox: &crate::Sandbox, id: &str) -> Result<NetworkView, NodeError> {
    let policy = sandbox.network_policy().ok_or_else(|| no_network(id))?;
    let (stats, refused) = sandbox.network_activity().unwrap_or_default();
    Ok(NetworkView {
        policy,
        stats,
        refused,
    })
}

fn no_network(id: &str) -> NodeError {
    NodeError::Invalid(format!("sandbox {id} has no network"))
}
