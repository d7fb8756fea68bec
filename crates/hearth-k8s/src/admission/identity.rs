//! Which node, if any, a request comes from. Two identity forms are recognised, like the kubelet's:
//!
//! - a per-node client certificate (or any authenticator) naming user `hearth-node:NODE` — the group
//!   `hearth:nodes` marks the whole class, and a member of that group without a node name is a node we
//!   cannot confine, so everything it asks is refused;
//! - the node agents' shared ServiceAccount, when the API server put the pod's node name in the token's
//!   user info (`authentication.kubernetes.io/node-name`, Kubernetes 1.30 and later). A token of that
//!   ServiceAccount without it (older servers, legacy Secret tokens) is likewise refused.
//!
//! Pure: no I/O.

use super::review::UserInfo;

/// The group every per-node identity is in.
pub const NODE_GROUP: &str = "hearth:nodes";
/// Per-node users are `hearth-node:NODE`.
pub const NODE_USER_PREFIX: &str = "hearth-node:";
/// The user-info extra the API server adds to a bound ServiceAccount token of a pod (1.30+).
pub const NODE_NAME_EXTRA: &str = "authentication.kubernetes.io/node-name";

/// Who the node identities are.
#[derive(Debug, Clone)]
pub struct NodeIdentities {
    /// Group of per-node users ([`NODE_GROUP`]).
    pub group: String,
    /// Usernames of ServiceAccounts node agents run as, e.g.
    /// `system:serviceaccount:hearth-system:hearth-node`.
    pub service_accounts: Vec<String>,
}

impl Default for NodeIdentities {
    fn default() -> Self {
        NodeIdentities {
            group: NODE_GROUP.into(),
            service_accounts: vec!["system:serviceaccount:hearth-system:hearth-node".into()],
        }
    }
}

/// The requester, as far as confinement is concerned.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Requester {
    /// Not a node agent: RBAC alone decides.
    Other,
    /// The node agent of node `.0`.
    Node(String),
    /// A node identity whose node cannot be told; the reason says why.
    UnknownNode(String),
}

impl NodeIdentities {
    /// Classifies `user`.
    pub fn requester(&self, user: &UserInfo) -> Requester {
        if let Some(node) = user.username.strip_prefix(NODE_USER_PREFIX) {
            return if valid_node_name(node) {
                Requester::Node(node.to_string())
            } else {
                Requester::UnknownNode(format!(
                    "user {:?} does not name a valid node",
                    user.username
                ))
            };
        }
        if self.service_accounts.contains(&user.username) {
            return match user.extra.get(NODE_NAME_EXTRA).map(Vec::as_slice) {
                Some([node]) if valid_node_name(node) => Requester::Node(node.clone()),
                _ => Requester::UnknownNode(format!(
                    "{} carries no node name ({NODE_NAME_EXTRA}): use per-node credentials \
                     (user {NODE_USER_PREFIX}NODE in group {}) or a Kubernetes 1.30+ bound token",
                    user.username, self.group
                )),
            };
        }
        if user.groups.contains(&self.group) {
            return Requester::UnknownNode(format!(
                "user {:?} is in group {} but is not {NODE_USER_PREFIX}NODE",
                user.username, self.group
            ));
        }
        Requester::Other
    }
}

/// A Kubernetes object name (DNS subdomain: lowercase alphanumerics, `-` and `.`, at most 253).
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(name: &str, groups: &[&str], extra: &[(&str, &[&str])]) -> UserInfo {
        UserInfo {
            username: name.into(),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            extra: extra
                .iter()
                .map(|(k, v)| (k.to_string(), v.iter().map(|s| s.to_string()).collect()))
                .collect(),
        }
    }

    #[test]
    fn per_node_users_and_bound_tokens_name_their_node() {
        let ids = NodeIdentities::default();
        assert_eq!(
            ids.requester(&user("hearth-node:a", &[NODE_GROUP], &[])),
            Requester::Node("a".into())
        );
        let sa = "system:serviceaccount:hearth-system:hearth-node";
        assert_eq!(
            ids.requester(&user(sa, &[], &[(NODE_NAME_EXTRA, &["kvm-3"])])),
            Requester::Node("kvm-3".into())
        );
    }

    #[test]
    fn node_identities_without_a_usable_node_are_unknown() {
        let ids = NodeIdentities::default();
        let sa = "system:serviceaccount:hearth-system:hearth-node";
        for u in [
            user(sa, &[], &[]),
            user(sa, &[], &[(NODE_NAME_EXTRA, &["a", "b"])]),
            user("mallory", &[NODE_GROUP], &[]),
            user("hearth-node:", &[NODE_GROUP], &[]),
            user("hearth-node:../b", &[NODE_GROUP], &[]),
            user("hearth-node:B", &[], &[]),
        ] {
            assert!(
                matches!(ids.requester(&u), Requester::UnknownNode(_)),
                "{u:?}"
            );
        }
    }

    #[test]
    fn everyone_else_is_left_to_rbac() {
        let ids = NodeIdentities::default();
        for u in [
            user("alice", &["system:authenticated"], &[]),
            user(
                "system:serviceaccount:hearth-system:hearth-operator",
                &[],
                &[(NODE_NAME_EXTRA, &["a"])],
            ),
        ] {
            assert_eq!(ids.requester(&u), Requester::Other);
        }
    }
}
