//! `deploy/` against a real kube-apiserver (testkit): every manifest passes `kubectl apply
//! --dry-run=server`, and the RBAC in `deploy/rbac.yaml` is least-privilege — the node agent's and the
//! operator's identities can do their jobs and are refused what they must not do.

mod common;

use std::path::PathBuf;
use std::process::Command;

use hearth_testkit::Kube;

fn deploy_dir() -> PathBuf {
    hearth_testkit::repo_root().join("deploy")
}

fn kubectl(kube: &Kube, kubeconfig: Option<&std::path::Path>, args: &[&str]) -> (bool, String) {
    let mut cmd: Command = kube.kubectl().expect("kubectl");
    if let Some(k) = kubeconfig {
        cmd = Command::new(hearth_testkit::kubectl_bin().unwrap());
        cmd.arg("--kubeconfig").arg(k);
    }
    let out = cmd.args(args).output().expect("run kubectl");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

fn control_plane() -> Option<&'static Kube> {
    let kube = match hearth_testkit::kube() {
        Ok(k) => k,
        Err(e) => {
            hearth_testkit::skip(&format!("needs a test kube-apiserver: {e:#}"));
            return None;
        }
    };
    if hearth_testkit::kubectl_bin().is_none() {
        hearth_testkit::skip("needs kubectl (scripts/provision-kube.sh)");
        return None;
    }
    Some(kube)
}

/// The namespace and the CRDs exist for real (a server dry run does not create them for the objects
/// that follow), then the whole directory is dry-run.
fn install(kube: &Kube) {
    let dir = deploy_dir();
    for file in ["namespace.yaml", "crds.yaml", "rbac.yaml"] {
        let path = dir.join(file);
        // Tests in other processes apply the same files at the same time: a lost create race is retried.
        let mut tries = 0;
        loop {
            let (ok, out) = kubectl(kube, None, &["apply", "-f", &path.to_string_lossy()]);
            tries += 1;
            if ok {
                break;
            }
            assert!(
                tries < 5 && (out.contains("AlreadyExists") || out.contains("conflict")),
                "kubectl apply -f deploy/{file}: {out}"
            );
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

#[test]
fn every_manifest_passes_a_server_dry_run() {
    let Some(kube) = control_plane() else { return };
    install(kube);
    let (ok, out) = kubectl(
        kube,
        None,
        &[
            "apply",
            "--dry-run=server",
            "-f",
            &deploy_dir().to_string_lossy(),
        ],
    );
    assert!(ok, "kubectl apply --dry-run=server -f deploy/: {out}");
    for what in [
        "deployment.apps/hearth-operator",
        "daemonset.apps/hearth-node",
        "clusterrole.rbac.authorization.k8s.io/hearth-node",
    ] {
        assert!(out.contains(what), "{what} missing from: {out}");
    }
}

fn can(kube: &Kube, user: &std::path::Path, verb: &str, resource: &str, ns: Option<&str>) -> bool {
    let (resource, sub) = resource
        .split_once('/')
        .map_or((resource, None), |(r, s)| (r, Some(s)));
    let sub = sub.map(|s| format!("--subresource={s}"));
    let mut args = vec!["auth", "can-i", verb, resource];
    if let Some(sub) = &sub {
        args.push(sub);
    }
    if let Some(ns) = ns {
        args.extend(["-n", ns]);
    }
    let (_, out) = kubectl(kube, Some(user), &args);
    out.lines().any(|l| l.trim() == "yes")
}

#[test]
fn node_agent_and_operator_get_only_what_they_need() {
    let Some(kube) = control_plane() else { return };
    install(kube);
    let node = kube
        .kubeconfig_for(
            "system:serviceaccount:hearth-system:hearth-node",
            &["system:serviceaccounts"],
        )
        .unwrap();
    let op = kube
        .kubeconfig_for(
            "system:serviceaccount:hearth-system:hearth-operator",
            &["system:serviceaccounts"],
        )
        .unwrap();
    let sys = Some("hearth-system");
    let other = Some("default");

    // The node agent: its job.
    assert!(can(kube, &node, "watch", "sandboxes.hearth.dev", other));
    assert!(can(
        kube,
        &node,
        "update",
        "sandboxes.hearth.dev/status",
        other
    ));
    assert!(can(kube, &node, "patch", "sandboxes.hearth.dev", other));
    assert!(can(kube, &node, "create", "hearthnodes.hearth.dev", None));
    assert!(can(
        kube,
        &node,
        "update",
        "leases.coordination.k8s.io",
        sys
    ));
    // ...and not more: no creating or deleting Sandboxes, no Leases elsewhere, no reading Secrets,
    // no deleting nodes, no listing every Lease.
    assert!(!can(kube, &node, "create", "sandboxes.hearth.dev", other));
    assert!(!can(kube, &node, "delete", "sandboxes.hearth.dev", other));
    assert!(!can(
        kube,
        &node,
        "update",
        "leases.coordination.k8s.io",
        other
    ));
    assert!(!can(kube, &node, "list", "leases.coordination.k8s.io", sys));
    assert!(!can(kube, &node, "get", "secrets", sys));
    assert!(!can(kube, &node, "delete", "hearthnodes.hearth.dev", None));

    // The operator: binds, fails, deletes after TTL, leads; never creates Sandboxes or edits nodes.
    assert!(can(
        kube,
        &op,
        "update",
        "sandboxes.hearth.dev/status",
        other
    ));
    assert!(can(kube, &op, "delete", "sandboxes.hearth.dev", other));
    assert!(can(kube, &op, "list", "hearthnodes.hearth.dev", None));
    assert!(can(kube, &op, "create", "leases.coordination.k8s.io", sys));
    assert!(!can(kube, &op, "create", "sandboxes.hearth.dev", other));
    assert!(!can(kube, &op, "patch", "hearthnodes.hearth.dev", None));
    assert!(!can(
        kube,
        &op,
        "create",
        "leases.coordination.k8s.io",
        other
    ));
    assert!(!can(kube, &op, "get", "secrets", sys));

    // And the server really refuses (not just `can-i`): the node identity creating a Sandbox.
    let manifest = "apiVersion: hearth.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: nope, namespace: default}\nspec: {image: x, command: [true]}\n";
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), manifest).unwrap();
    let (ok, out) = kubectl(
        kube,
        Some(&node),
        &["create", "-f", &file.path().to_string_lossy()],
    );
    assert!(
        !ok && out.contains("forbidden"),
        "node identity created a Sandbox: {out}"
    );
}
