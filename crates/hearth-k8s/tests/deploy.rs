//! `deploy/` against a real kube-apiserver (testkit): the kustomize base renders (`kubectl kustomize
//! deploy/`) with the image named once, probes and metrics annotations on every workload, and every
//! rendered object passes `kubectl apply --dry-run=server`; the RBAC in `deploy/rbac.yaml` is
//! least-privilege — a node's own identity, the operator's and the gateway's can do their jobs and are
//! refused what they must not do. And the image `deploy/` runs: `scripts/build-image.sh` builds it twice
//! to the same digest, pushes it to the test registry, and hearth's own puller pulls it back; the hearth
//! binary in it runs from the image's root alone.

mod common;

use std::path::PathBuf;
use std::process::Command;

use hearth_testkit::Kube;
use serde_json::Value;

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

/// `kubectl kustomize deploy/`, parsed: one JSON value per object.
fn render() -> Vec<Value> {
    let out = Command::new(hearth_testkit::kubectl_bin().expect("kubectl"))
        .arg("kustomize")
        .arg(deploy_dir())
        .output()
        .expect("run kubectl kustomize");
    assert!(
        out.status.success(),
        "kubectl kustomize deploy/: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    serde_yaml::Deserializer::from_str(&text)
        .map(|doc| serde::Deserialize::deserialize(doc).expect("rendered YAML"))
        .filter(|v: &Value| !v.is_null())
        .collect()
}

fn named<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("{kind} {name} missing from the rendered base"))
}

#[test]
fn the_kustomize_base_renders_and_passes_a_server_dry_run() {
    let Some(kube) = control_plane() else { return };
    let objects = render();
    // The image: named once in kustomization.yaml, and every workload runs exactly that.
    let kustomization: Value = serde_yaml::from_str(
        &std::fs::read_to_string(deploy_dir().join("kustomization.yaml")).unwrap(),
    )
    .unwrap();
    let image = &kustomization["images"][0];
    let want = format!(
        "{}:{}",
        image["newName"].as_str().unwrap(),
        image["newTag"].as_str().unwrap()
    );
    for (kind, name) in [
        ("Deployment", "hearth-operator"),
        ("Deployment", "hearth-gateway"),
        ("DaemonSet", "hearth-node"),
    ] {
        let pod = &named(&objects, kind, name)["spec"]["template"];
        assert_eq!(
            pod["metadata"]["annotations"]["prometheus.io/scrape"], "true",
            "{name}"
        );
        for c in pod["spec"]["containers"].as_array().unwrap() {
            assert_eq!(c["image"], want.as_str(), "{name}");
            for probe in ["readinessProbe", "livenessProbe"] {
                assert!(
                    c[probe]["httpGet"]["path"].is_string(),
                    "{name} has no {probe}"
                );
            }
        }
    }
    assert_eq!(
        named(&objects, "Service", "hearth-node")["spec"]["clusterIP"],
        "None"
    );
    named(&objects, "Service", "hearth-gateway");
    named(&objects, "Service", "hearth-webhook");
    let hooks = named(
        &objects,
        "ValidatingWebhookConfiguration",
        "hearth-node-confinement",
    );
    for hook in hooks["webhooks"].as_array().unwrap() {
        assert_eq!(hook["failurePolicy"], "Fail");
    }

    install(kube);
    let file = tempfile::NamedTempFile::new().unwrap();
    let list = serde_json::json!({"apiVersion": "v1", "kind": "List", "items": objects});
    std::fs::write(file.path(), serde_json::to_vec(&list).unwrap()).unwrap();
    let (ok, out) = kubectl(
        kube,
        None,
        &[
            "apply",
            "--dry-run=server",
            "-f",
            &file.path().to_string_lossy(),
        ],
    );
    assert!(
        ok,
        "kubectl apply --dry-run=server (rendered deploy/): {out}"
    );
    for what in [
        "deployment.apps/hearth-operator",
        "deployment.apps/hearth-gateway",
        "daemonset.apps/hearth-node",
        "service/hearth-gateway",
        "validatingwebhookconfiguration.admissionregistration.k8s.io/hearth-node-confinement",
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
fn node_operator_and_gateway_get_only_what_they_need() {
    let Some(kube) = control_plane() else { return };
    install(kube);
    // A node's own identity (like a kubelet's); the ServiceAccount form gets the same rules.
    let node = kube
        .kubeconfig_for("hearth-node:a", &["hearth:nodes"])
        .unwrap();
    let gateway = kube
        .kubeconfig_for(
            "system:serviceaccount:hearth-system:hearth-gateway",
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

    // The operator: binds, fails, deletes after TTL, fills warm pools, leads; never edits nodes.
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
    assert!(can(kube, &op, "create", "sandboxes.hearth.dev", other));
    assert!(can(kube, &op, "create", "events.events.k8s.io", other));
    assert!(!can(kube, &op, "patch", "hearthnodes.hearth.dev", None));
    assert!(!can(
        kube,
        &op,
        "create",
        "leases.coordination.k8s.io",
        other
    ));
    assert!(!can(kube, &op, "get", "secrets", sys));

    // The gateway: Sandboxes for its tenants, node endpoints; no status, no nodes, no secrets.
    assert!(can(kube, &gateway, "create", "sandboxes.hearth.dev", other));
    assert!(can(kube, &gateway, "patch", "sandboxes.hearth.dev", other));
    assert!(can(kube, &gateway, "list", "hearthnodes.hearth.dev", None));
    assert!(!can(
        kube,
        &gateway,
        "update",
        "sandboxes.hearth.dev/status",
        other
    ));
    assert!(!can(
        kube,
        &gateway,
        "patch",
        "hearthnodes.hearth.dev",
        None
    ));
    assert!(!can(
        kube,
        &gateway,
        "update",
        "leases.coordination.k8s.io",
        sys
    ));
    assert!(!can(kube, &gateway, "get", "secrets", sys));

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

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn the_image_builds_reproducibly_and_hearth_pulls_and_runs_it() {
    if Command::new("skopeo").arg("--version").output().is_err() {
        hearth_testkit::skip("needs skopeo (apt-get install skopeo) to push the image");
        return;
    }
    let registry = match hearth_testkit::registry() {
        Ok(r) => r,
        Err(e) => {
            hearth_testkit::skip(&format!("needs the test registry: {e:#}"));
            return;
        }
    };
    let root = hearth_testkit::repo_root();
    let work = tempfile::tempdir().unwrap();
    // The debug build (the script's default is release), copied so that both builds below see the
    // same binary even if the tree is rebuilt meanwhile.
    run(Command::new(env!("CARGO"))
        .args(["build", "--quiet", "-p", "hearth"])
        .current_dir(&root));
    let target = std::env::var_os("CARGO_TARGET_DIR").map_or(root.join("target"), PathBuf::from);
    let binary = work.path().join("hearth");
    std::fs::copy(target.join("debug/hearth"), &binary).unwrap();

    let reference = format!("{}/hearth-test/hearth:built", registry.addr);
    let build = |out: &str, push: bool| {
        let mut cmd = Command::new(root.join("scripts/build-image.sh"));
        cmd.arg("--binary")
            .arg(&binary)
            .arg("--fast")
            .arg("--out")
            .arg(work.path().join(out))
            .arg("--kernel")
            .arg(hearth_testkit::kernel_dir());
        if push {
            cmd.args(["--push", &reference, "--insecure"]);
        }
        run(&mut cmd)
    };
    let first = build("one", false);
    let second = build("two", true);
    assert!(first.starts_with("sha256:"), "{first}");
    assert_eq!(first, second, "two builds of the same inputs differ");

    let home = work.path().join("home");
    let store = hearth_image::ImageStore::open(&home).unwrap();
    let opts = hearth_image::PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let rt = tokio::runtime::Runtime::new().unwrap();
    let pulled = rt
        .block_on(store.ensure(&reference, &opts))
        .expect("hearth pulls its own image");
    assert_eq!(pulled.manifest_digest.to_string(), first);
    assert_eq!(pulled.config.entrypoint, ["/usr/bin/hearth"]);
    assert!(pulled
        .config
        .env
        .iter()
        .any(|e| e == "HEARTH_AGENT=/usr/lib/hearth/hearth-agent"));

    // Out of the root filesystem hearth built, then run with nothing but what the image holds.
    let tree = work.path().join("tree");
    std::fs::create_dir(&tree).unwrap();
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!(
            "rdump /usr /lib /lib64 /etc /tmp {}",
            tree.display()
        ))
        .arg(&pulled.rootfs));
    for file in [
        "usr/lib/hearth/hearth-agent",
        "usr/lib/hearth/kernel/vmlinuz",
        "usr/bin/qemu-system-x86_64",
    ] {
        assert!(tree.join(file).is_file(), "{file} missing from the image");
    }
    let version = if hearth_testkit::is_root() {
        run(Command::new("chroot")
            .arg(&tree)
            .args(["/usr/bin/hearth", "--version"]))
    } else {
        // Without root: the image's own loader and libraries, still none of the host's.
        run(Command::new(tree.join("lib64/ld-linux-x86-64.so.2"))
            .arg("--library-path")
            .arg(tree.join("lib/x86_64-linux-gnu"))
            .arg(tree.join("usr/bin/hearth"))
            .arg("--version"))
    };
    assert!(version.starts_with("hearth "), "{version}");
}
