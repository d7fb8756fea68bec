//! The testkit's Kubernetes control plane: a real kube-apiserver that stores custom resources, talks to
//! kubectl, and enforces RBAC on the restricted identities the testkit mints.

use std::time::{Duration, Instant};

use hearth_testkit::{kube, kubectl_bin, skip, Kube};
use serde_json::{json, Value};

/// The control plane, or `None` after printing why the test skips.
fn control_plane() -> Option<&'static Kube> {
    match kube() {
        Ok(kube) => Some(kube),
        Err(e) => {
            skip(&format!("no test kube-apiserver: {e:#}"));
            None
        }
    }
}

fn post(kube: &Kube, path: &str, body: &Value) -> (u16, Value) {
    let (status, text) = kube
        .request(&kube.kubeconfig, "POST", path, Some(&body.to_string()))
        .expect("POST");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Polls `what` every 100 ms for up to 30 s.
fn eventually(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

// reflect2 1.0.1, as vendored by Debian's kubernetes source, crashed the server on exactly this POST.
#[test]
fn custom_objects_round_trip_through_a_crd() {
    let Some(kube) = control_plane() else { return };
    let (status, _) = kube
        .request(&kube.kubeconfig, "GET", "/readyz", None)
        .unwrap();
    assert_eq!(status, 200);

    let crd = json!({
        "apiVersion": "apiextensions.k8s.io/v1", "kind": "CustomResourceDefinition",
        "metadata": {"name": "widgets.test.hearth.dev"},
        "spec": {
            "group": "test.hearth.dev", "scope": "Namespaced",
            "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
            "versions": [{
                "name": "v1", "served": true, "storage": true,
                "subresources": {"status": {}},
                "schema": {"openAPIV3Schema": {"type": "object", "properties": {
                    "spec": {"type": "object", "properties": {"size": {"type": "integer"}}},
                    "status": {"type": "object", "properties": {"phase": {"type": "string"}}}
                }}}
            }]
        }
    });
    let crds = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions";
    let (status, body) = post(kube, crds, &crd);
    assert!(
        status == 201 || status == 409,
        "CRD create: {status} {body}"
    );
    eventually("the CRD to be Established", || {
        let (_, text) = kube
            .request(
                &kube.kubeconfig,
                "GET",
                &format!("{crds}/widgets.test.hearth.dev"),
                None,
            )
            .unwrap();
        let crd: Value = serde_json::from_str(&text).unwrap_or(Value::Null);
        crd["status"]["conditions"].as_array().is_some_and(|c| {
            c.iter()
                .any(|c| c["type"] == "Established" && c["status"] == "True")
        })
    });

    let ns = kube.create_namespace("widgets").unwrap();
    let widgets = format!("/apis/test.hearth.dev/v1/namespaces/{ns}/widgets");
    let widget = json!({
        "apiVersion": "test.hearth.dev/v1", "kind": "Widget",
        "metadata": {"name": "w1"}, "spec": {"size": 3}
    });
    // Right after Established the new resource may still be missing from the handler chain for a moment.
    let mut created = (0, Value::Null);
    eventually("the custom object POST to succeed", || {
        created = post(kube, &widgets, &widget);
        created.0 != 404
    });
    assert_eq!(created.0, 201, "custom object create: {}", created.1);

    let (status, text) = kube
        .request(&kube.kubeconfig, "GET", &format!("{widgets}/w1"), None)
        .unwrap();
    assert_eq!(status, 200, "{text}");
    let got: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(got["spec"]["size"], 3);

    let mut with_status = got.clone();
    with_status["status"] = json!({"phase": "Running"});
    let (status, text) = kube
        .request(
            &kube.kubeconfig,
            "PUT",
            &format!("{widgets}/w1/status"),
            Some(&with_status.to_string()),
        )
        .unwrap();
    assert_eq!(status, 200, "status update: {text}");
    let updated: Value = serde_json::from_str(&text).unwrap();
    assert_eq!(updated["status"]["phase"], "Running");
}

#[test]
fn restricted_identities_get_only_what_rbac_grants() {
    let Some(kube) = control_plane() else { return };
    let ns = kube.create_namespace("rbac").unwrap();
    let reader = kube.kubeconfig_for("reader", &["hearth:readers"]).unwrap();
    let configmaps = format!("/api/v1/namespaces/{ns}/configmaps");

    let (status, text) = kube.request(&reader, "GET", &configmaps, None).unwrap();
    assert_eq!(status, 403, "list before any grant: {text}");

    let role = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
        "metadata": {"name": "configmap-reader"},
        "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["get", "list"]}]
    });
    let binding = json!({
        "apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
        "metadata": {"name": "readers-read-configmaps"},
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "configmap-reader"},
        "subjects": [{"apiGroup": "rbac.authorization.k8s.io", "kind": "Group", "name": "hearth:readers"}]
    });
    let rbac = format!("/apis/rbac.authorization.k8s.io/v1/namespaces/{ns}");
    assert_eq!(post(kube, &format!("{rbac}/roles"), &role).0, 201);
    assert_eq!(post(kube, &format!("{rbac}/rolebindings"), &binding).0, 201);

    // The grant reaches the authorizer through an informer: allow it a moment.
    eventually("the group's RoleBinding to take effect", || {
        kube.request(&reader, "GET", &configmaps, None).unwrap().0 == 200
    });
    let configmap = json!({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "c"}});
    let (status, text) = kube
        .request(&reader, "POST", &configmaps, Some(&configmap.to_string()))
        .unwrap();
    assert_eq!(status, 403, "create with a read-only grant: {text}");
    let (status, _) = kube
        .request(
            &reader,
            "GET",
            &format!("/api/v1/namespaces/{ns}/secrets"),
            None,
        )
        .unwrap();
    assert_eq!(status, 403, "secrets were never granted");

    if kubectl_bin().is_none() {
        skip("kubectl is not installed: the kubectl half of this test did not run");
        return;
    }
    let out = kube
        .kubectl()
        .unwrap()
        .args(["get", "ns", "-o", "name"])
        .output()
        .unwrap();
    let names = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "kubectl get ns: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(names.contains(&format!("namespace/{ns}")), "{names}");

    let out = std::process::Command::new(kubectl_bin().unwrap())
        .arg("--kubeconfig")
        .arg(&reader)
        .args(["get", "secrets", "-n", &ns])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "the reader listed secrets");
    assert!(stderr.contains("Forbidden"), "{stderr}");
}
