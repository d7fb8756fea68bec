//! The node-confinement decision, pure: given one `AdmissionRequest`, may it pass? Requests by anyone
//! but a node agent pass (RBAC already decided them). A node agent may only
//!
//! - create and update its own heartbeat Lease ([`node_lease_name`]);
//! - create and update its own `HearthNode`, status included;
//! - update the status of a `Sandbox` whose current (old) `status.nodeName` is its own, without
//!   changing `spec`, `status.nodeName` or metadata;
//! - add or remove the node finalizer ([`FINALIZER`]) of such a Sandbox, changing nothing else.
//!
//! Everything else it asks — deletes, other nodes' objects, Sandboxes bound elsewhere or nowhere, any
//! other resource routed here — is refused with a message naming what was refused.

use serde_json::Value;

use super::identity::{NodeIdentities, Requester};
use super::review::{AdmissionRequest, Operation};
use crate::crd::FINALIZER;
use crate::lease::node_lease_name;

/// Metadata a write may change as a side effect (the server maintains them).
const SERVER_MAINTAINED: [&str; 3] = ["resourceVersion", "managedFields", "generation"];

/// Allows or refuses `req`; the error is the reason shown to the client.
pub fn review(ids: &NodeIdentities, req: &AdmissionRequest) -> Result<(), String> {
    let node = match ids.requester(&req.user_info) {
        Requester::Other => return Ok(()),
        Requester::UnknownNode(why) => return Err(format!("hearth node confinement: {why}")),
        Requester::Node(node) => node,
    };
    node_may(&node, req).map_err(|why| format!("hearth node {node}: {why}"))
}

fn node_may(node: &str, req: &AdmissionRequest) -> Result<(), String> {
    let r = &req.resource;
    let writes = matches!(req.operation, Operation::Create | Operation::Update);
    match (r.group.as_str(), r.resource.as_str()) {
        ("coordination.k8s.io", "leases") if writes && req.sub_resource.is_empty() => {
            let own = node_lease_name(node);
            own_name(req, &own, "Lease")
        }
        ("hearth.dev", "hearthnodes")
            if writes && matches!(req.sub_resource.as_str(), "" | "status") =>
        {
            own_name(req, node, "HearthNode")
        }
        ("hearth.dev", "sandboxes") if req.operation == Operation::Update => {
            sandbox_update(node, req)
        }
        _ => Err(format!(
            "may not {:?} {}{}{} {}",
            req.operation,
            r.resource,
            if req.sub_resource.is_empty() { "" } else { "/" },
            req.sub_resource,
            target(req)
        )),
    }
}

/// `namespace/name` or `name` of the request.
fn target(req: &AdmissionRequest) -> String {
    let name = object_name(req);
    if req.namespace.is_empty() {
        name
    } else {
        format!("{}/{name}", req.namespace)
    }
}

/// The request's name, or on a CREATE the object's own (empty with only `generateName`).
fn object_name(req: &AdmissionRequest) -> String {
    if !req.name.is_empty() {
        return req.name.clone();
    }
    req.object
        .as_ref()
        .and_then(|o| o.pointer("/metadata/name"))
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}

fn own_name(req: &AdmissionRequest, own: &str, kind: &str) -> Result<(), String> {
    let name = object_name(req);
    if name == own {
        Ok(())
    } else {
        Err(format!(
            "may write only its own {kind} {own}, not {kind} {:?}",
            target(req)
        ))
    }
}

fn sandbox_update(node: &str, req: &AdmissionRequest) -> Result<(), String> {
    let what = format!("Sandbox {}", target(req));
    let (Some(old), Some(new)) = (&req.old_object, &req.object) else {
        return Err(format!("{what}: update without old and new object"));
    };
    let bound = old.pointer("/status/nodeName").and_then(Value::as_str);
    if bound != Some(node) {
        return Err(format!(
            "{what} is bound to {}, not to this node",
            bound.map_or("no node".to_string(), |b| format!("node {b}"))
        ));
    }
    if old.get("spec") != new.get("spec") {
        return Err(format!("may not change the spec of {what}"));
    }
    match req.sub_resource.as_str() {
        "status" => {
            if new.pointer("/status/nodeName") != old.pointer("/status/nodeName") {
                return Err(format!("may not change status.nodeName of {what}"));
            }
            same_metadata(old, new, false).map_err(|f| format!("may not change {f} of {what}"))
        }
        "" => {
            if old.get("status") != new.get("status") {
                return Err(format!(
                    "may not change the status of {what} other than through status"
                ));
            }
            same_metadata(old, new, true).map_err(|f| format!("may not change {f} of {what}"))?;
            finalizers_differ_only_in_ours(old, new)
                .map_err(|f| format!("may not change finalizer {f:?} of {what}"))
        }
        other => Err(format!("may not update {what}/{other}")),
    }
}

/// Metadata equal apart from what the server maintains (and the finalizers, when `finalizers_may_differ`);
/// the error names the first field that differs.
fn same_metadata(old: &Value, new: &Value, finalizers_may_differ: bool) -> Result<(), String> {
    let strip = |v: &Value| {
        let mut m = v.get("metadata").cloned().unwrap_or(Value::Null);
        if let Some(map) = m.as_object_mut() {
            for key in SERVER_MAINTAINED {
                map.remove(key);
            }
            if finalizers_may_differ {
                map.remove("finalizers");
            }
        }
        m
    };
    let (old_meta, new_meta) = (strip(old), strip(new));
    if old_meta == new_meta {
        return Ok(());
    }
    let keys = |m: &Value| {
        m.as_object()
            .map(|o| o.keys().cloned().collect::<Vec<_>>())
            .unwrap_or_default()
    };
    let field = keys(&old_meta)
        .into_iter()
        .chain(keys(&new_meta))
        .find(|k| old_meta.get(k) != new_meta.get(k))
        .unwrap_or_default();
    Err(format!("metadata.{field}"))
}

/// The finalizer lists, with [`FINALIZER`] removed from both, are equal; else the first other one that
/// was added or removed.
fn finalizers_differ_only_in_ours(old: &Value, new: &Value) -> Result<(), String> {
    let others = |v: &Value| -> Vec<String> {
        let mut list: Vec<String> = v
            .pointer("/metadata/finalizers")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .map(|f| f.as_str().unwrap_or_default().to_string())
                    .filter(|f| f != FINALIZER)
                    .collect()
            })
            .unwrap_or_default();
        list.sort();
        list
    };
    let (before, after) = (others(old), others(new));
    if before == after {
        return Ok(());
    }
    let changed = before
        .iter()
        .find(|f| !after.contains(f))
        .or_else(|| after.iter().find(|f| !before.contains(f)))
        .cloned()
        .unwrap_or_default();
    Err(changed)
}

#[cfg(test)]
mod tests;
