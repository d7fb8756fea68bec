//! The decision against the requests a node agent really makes, and the ones a compromised one would.

use serde_json::{json, Value};

use super::review;
use crate::admission::identity::{NodeIdentities, NODE_GROUP, NODE_NAME_EXTRA};
use crate::admission::review::AdmissionRequest;
use crate::crd::FINALIZER;

const SA: &str = "system:serviceaccount:hearth-system:hearth-node";

/// A request by node `node` (per-node certificate form) from its JSON parts.
fn req(node: &str, op: &str, group: &str, resource: &str, sub: &str, name: &str) -> Value {
    json!({
        "uid": "u1",
        "resource": {"group": group, "version": "v1", "resource": resource},
        "subResource": sub,
        "name": name,
        "namespace": if resource == "hearthnodes" { "" } else { "ns" },
        "operation": op,
        "userInfo": {"username": format!("hearth-node:{node}"), "groups": [NODE_GROUP, "system:authenticated"]},
    })
}

fn decide(v: Value) -> Result<(), String> {
    let r: AdmissionRequest = serde_json::from_value(v).expect("request parses");
    review(&NodeIdentities::default(), &r)
}

fn sandbox(node: Option<&str>, finalizers: &[&str]) -> Value {
    json!({
        "apiVersion": "hearth.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": "s", "namespace": "ns", "resourceVersion": "7", "finalizers": finalizers,
                     "labels": {"team": "x"}},
        "spec": {"image": "busybox", "command": ["true"]},
        "status": {"phase": "Scheduled", "nodeName": node},
    })
}

fn with(mut v: Value, pointer: &str, value: Value) -> Value {
    *v.pointer_mut(pointer).expect("pointer exists") = value;
    v
}

fn sandbox_write(node: &str, sub: &str, old: Value, new: Value) -> Result<(), String> {
    let mut r = req(node, "UPDATE", "hearth.dev", "sandboxes", sub, "s");
    r["oldObject"] = old;
    r["object"] = new;
    decide(r)
}

#[test]
fn own_lease_and_node_pass_others_are_refused() {
    for op in ["CREATE", "UPDATE"] {
        let lease = |name| req("a", op, "coordination.k8s.io", "leases", "", name);
        assert_eq!(decide(lease("hearth-node-a")), Ok(()));
        let e = decide(lease("hearth-node-b")).unwrap_err();
        assert!(e.contains("hearth-node-b") && e.contains("node a"), "{e}");
        assert!(decide(lease("hearth-operator")).is_err());
        for sub in ["", "status"] {
            let node = |name| req("a", op, "hearth.dev", "hearthnodes", sub, name);
            assert_eq!(decide(node("a")), Ok(()));
            assert!(decide(node("b")).is_err());
        }
    }
    // A CREATE naming the object only in its body.
    let mut r = req("a", "CREATE", "hearth.dev", "hearthnodes", "", "");
    r["object"] = json!({"metadata": {"name": "b"}});
    assert!(decide(r.clone()).is_err());
    r["object"] = json!({"metadata": {"name": "a"}});
    assert_eq!(decide(r), Ok(()));
}

#[test]
fn nodes_delete_nothing_and_touch_nothing_else() {
    let cases = [
        req(
            "a",
            "DELETE",
            "coordination.k8s.io",
            "leases",
            "",
            "hearth-node-a",
        ),
        req("a", "DELETE", "hearth.dev", "hearthnodes", "", "a"),
        req("a", "DELETE", "hearth.dev", "sandboxes", "", "s"),
        req("a", "CREATE", "hearth.dev", "sandboxes", "", "s"),
        req("a", "UPDATE", "", "secrets", "", "hearth-node-a"),
        req(
            "a",
            "UPDATE",
            "coordination.k8s.io",
            "leases",
            "status",
            "hearth-node-a",
        ),
    ];
    for c in cases {
        assert!(decide(c.clone()).is_err(), "{c}");
    }
}

#[test]
fn sandbox_status_only_on_own_sandboxes_and_never_rebinding() {
    let mine = sandbox(Some("a"), &[]);
    let running = with(mine.clone(), "/status/phase", json!("Running"));
    assert_eq!(
        sandbox_write("a", "status", mine.clone(), running.clone()),
        Ok(())
    );
    // Bound to b, or to nobody: refused, whatever the new object says.
    let theirs = sandbox(Some("b"), &[]);
    let e = sandbox_write("a", "status", theirs.clone(), running.clone()).unwrap_err();
    assert!(e.contains("bound to node b"), "{e}");
    assert!(sandbox_write("a", "status", sandbox(None, &[]), running.clone()).is_err());
    // Handing its own Sandbox to another node, or unbinding it.
    let moved = with(mine.clone(), "/status/nodeName", json!("b"));
    assert!(sandbox_write("a", "status", mine.clone(), moved)
        .unwrap_err()
        .contains("nodeName"));
    let unbound = with(mine.clone(), "/status/nodeName", Value::Null);
    assert!(sandbox_write("a", "status", mine.clone(), unbound).is_err());
    // The spec, through either endpoint.
    let other_image = with(running.clone(), "/spec/image", json!("evil"));
    for sub in ["status", ""] {
        let e = sandbox_write("a", sub, mine.clone(), other_image.clone()).unwrap_err();
        assert!(e.contains("spec"), "{e}");
    }
}

#[test]
fn finalizer_patches_add_or_drop_only_the_node_finalizer() {
    let bare = sandbox(Some("a"), &["example.com/keep"]);
    let held = sandbox(Some("a"), &["example.com/keep", FINALIZER]);
    let bumped = |v: &Value| with(v.clone(), "/metadata/resourceVersion", json!("8"));
    assert_eq!(sandbox_write("a", "", bare.clone(), bumped(&held)), Ok(()));
    assert_eq!(sandbox_write("a", "", held.clone(), bumped(&bare)), Ok(()));
    // Someone else's finalizer, labels, status through the main resource, or another node's Sandbox.
    let stripped = sandbox(Some("a"), &[FINALIZER]);
    let e = sandbox_write("a", "", held.clone(), stripped).unwrap_err();
    assert!(e.contains("example.com/keep"), "{e}");
    let relabelled = with(held.clone(), "/metadata/labels", json!({"team": "y"}));
    assert!(sandbox_write("a", "", held.clone(), relabelled)
        .unwrap_err()
        .contains("metadata.labels"));
    let finished = with(held.clone(), "/status/phase", json!("Succeeded"));
    assert!(sandbox_write("a", "", held.clone(), finished).is_err());
    let theirs = sandbox(Some("b"), &[FINALIZER]);
    assert!(sandbox_write("a", "", theirs.clone(), sandbox(Some("b"), &[])).is_err());
}

#[test]
fn others_pass_and_unconfinable_node_identities_are_refused() {
    let mut r = req("a", "DELETE", "hearth.dev", "sandboxes", "", "s");
    r["userInfo"] = json!({"username": "alice", "groups": ["system:authenticated"]});
    assert_eq!(decide(r.clone()), Ok(()));
    // The shared ServiceAccount: confined by the node name a bound token carries, refused without one.
    let lease = |extra: Value| {
        let mut r = req(
            "x",
            "UPDATE",
            "coordination.k8s.io",
            "leases",
            "",
            "hearth-node-a",
        );
        r["userInfo"] =
            json!({"username": SA, "groups": ["system:serviceaccounts"], "extra": extra});
        decide(r)
    };
    assert_eq!(lease(json!({NODE_NAME_EXTRA: ["a"]})), Ok(()));
    assert!(lease(json!({NODE_NAME_EXTRA: ["b"]})).is_err());
    assert!(lease(json!({}))
        .unwrap_err()
        .contains("per-node credentials"));
}
