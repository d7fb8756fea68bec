//! Node confinement against a real kube-apiserver: the operator's admission webhook (served here by
//! `hearth_k8s::admission::WebhookServer` over real TLS) registered from `deploy/webhook.yaml`, RBAC from
//! `deploy/rbac.yaml`, and requests made with node a's own client certificate (user `hearth-node:a`,
//! group `hearth:nodes`). Every refusal checked here is one RBAC would have let through: the webhook
//! is what stops it.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::{cluster, create_sandbox, eventually, registration, spec, Cluster};
use hearth_k8s::admission::{NodeIdentities, WebhookConfig, WebhookServer};
use hearth_k8s::crd::{HearthNode, Phase, Sandbox, FINALIZER};
use hearth_k8s::lease::{heartbeat, node_lease_name};
use hearth_k8s::node::registration::{register, report};
use k8s_openapi::api::admissionregistration::v1::ValidatingWebhookConfiguration;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::api::rbac::v1::{ClusterRole, ClusterRoleBinding, Role, RoleBinding};
use k8s_openapi::ByteString;
use kube::api::{Api, DeleteParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use serde_json::{json, Value};

const LEASE_TTL: Duration = Duration::from_secs(30);

/// A CA and a serving certificate for 127.0.0.1 signed by it (openssl, as kube-env.sh does).
fn certificates(dir: &Path) {
    let sh = format!(
        "set -e; cd {dir}
        openssl req -x509 -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 1 \
          -subj /CN=webhook-ca -addext basicConstraints=critical,CA:TRUE \
          -addext keyUsage=critical,keyCertSign -keyout ca.key -out ca.crt 2>/dev/null
        openssl req -new -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -subj /CN=webhook \
          -keyout tls.key -out tls.csr 2>/dev/null
        printf 'subjectAltName=IP:127.0.0.1\\nextendedKeyUsage=serverAuth\\n' > ext
        openssl x509 -req -in tls.csr -CA ca.crt -CAkey ca.key -set_serial 1 -days 1 -extfile ext \
          -out tls.crt 2>/dev/null",
        dir = dir.display()
    );
    let out = Command::new("sh").arg("-c").arg(sh).output().unwrap();
    assert!(out.status.success(), "openssl: {out:?}");
}

/// The shipped webhook configuration, pointed at `url` and confined to this test's namespace and
/// nodes (the API server may be shared with other tests).
fn webhook_configuration(c: &Cluster, url: &str, ca: Vec<u8>) -> ValidatingWebhookConfiguration {
    let path = hearth_testkit::repo_root().join("deploy/webhook.yaml");
    let mut cfg: ValidatingWebhookConfiguration =
        serde_yaml::from_str(&std::fs::read_to_string(path).unwrap()).expect("deploy/webhook.yaml");
    cfg.metadata.name = Some(format!("hearth-confine-{}", c.ns));
    cfg.metadata.annotations = None;
    for hook in cfg.webhooks.as_mut().expect("webhooks") {
        hook.client_config.service = None;
        hook.client_config.url = Some(url.to_string());
        hook.client_config.ca_bundle = Some(ByteString(ca.clone()));
        let scope = hook
            .rules
            .iter()
            .flatten()
            .next()
            .and_then(|r| r.scope.clone());
        let mine = |key: &str, value: &str| {
            serde_json::from_value(json!({"matchLabels": {key: value}})).unwrap()
        };
        if scope.as_deref() == Some("Cluster") {
            hook.object_selector = Some(mine("hearth.dev/test", &c.ns));
        } else {
            hook.namespace_selector = Some(mine("kubernetes.io/metadata.name", &c.ns));
        }
    }
    cfg
}

/// `deploy/rbac.yaml`'s node rules for the per-node group: the ClusterRole as shipped, the Lease Role
/// moved into the test namespace.
async fn node_rbac(c: &Cluster) {
    let text =
        std::fs::read_to_string(hearth_testkit::repo_root().join("deploy/rbac.yaml")).unwrap();
    for doc in serde_yaml::Deserializer::from_str(&text) {
        let mut v: Value = serde::Deserialize::deserialize(doc).unwrap();
        if v.pointer("/metadata/name") != Some(&json!("hearth-node")) {
            continue;
        }
        match v["kind"].as_str().unwrap() {
            "ClusterRole" => create(Api::<ClusterRole>::all(c.client.clone()), v).await,
            "ClusterRoleBinding" => {
                create(Api::<ClusterRoleBinding>::all(c.client.clone()), v).await
            }
            "Role" => {
                v["metadata"]["namespace"] = json!(c.ns);
                create(Api::<Role>::namespaced(c.client.clone(), &c.ns), v).await
            }
            "RoleBinding" => {
                v["metadata"]["namespace"] = json!(c.ns);
                create(Api::<RoleBinding>::namespaced(c.client.clone(), &c.ns), v).await
            }
            _ => {}
        }
    }
}

async fn create<K>(api: Api<K>, v: Value)
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + serde::Serialize + std::fmt::Debug,
{
    let obj: K = serde_json::from_value(v).unwrap();
    match api.create(&PostParams::default(), &obj).await {
        Ok(_) => {}
        Err(e) if hearth_k8s::is_conflict(&e) => {}
        Err(e) => panic!("creating {:?}: {e}", obj.meta().name),
    }
}

/// The error of a request the webhook refused for node a.
fn refused<T: std::fmt::Debug>(what: &str, r: Result<T, kube::Error>) -> String {
    match r {
        Err(kube::Error::Api(s)) if s.code == 403 && s.message.contains("denied the request") => {
            assert!(s.message.contains("hearth node a"), "{what}: {}", s.message);
            s.message.clone()
        }
        other => panic!("{what}: expected the webhook to refuse it, got {other:?}"),
    }
}

async fn bind(c: &Cluster, name: &str, node: &str) {
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    let status = json!({"status": {"phase": "Scheduled", "nodeName": node}});
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(status))
        .await
        .expect("bind as admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_writes_only_its_own_objects() {
    let Some(c) = cluster("confine").await else {
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    certificates(dir.path());
    let server = WebhookServer::bind(WebhookConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        cert: dir.path().join("tls.crt"),
        key: dir.path().join("tls.key"),
        identities: NodeIdentities::default(),
    })
    .await
    .expect("webhook binds");
    let url = format!("https://{}/validate", server.local_addr().unwrap());
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(server.run(async {
        let _ = stop_rx.await;
    }));

    // The namespace label the selectors use (set by the API server itself from 1.21 on).
    let namespaces: Api<Namespace> = Api::all(c.client.clone());
    let label = json!({"metadata": {"labels": {"kubernetes.io/metadata.name": c.ns}}});
    namespaces
        .patch(&c.ns, &PatchParams::default(), &Patch::Merge(label))
        .await
        .unwrap();
    node_rbac(&c).await;
    let ca = std::fs::read(dir.path().join("ca.crt")).unwrap();
    let hooks: Api<ValidatingWebhookConfiguration> = Api::all(c.client.clone());
    let cfg = hooks
        .create(&PostParams::default(), &webhook_configuration(&c, &url, ca))
        .await
        .expect("register the webhook");

    // Node b exists (registered and heartbeating, as admin here); two Sandboxes, one bound to each node.
    let reg_b = registration(&c, "b", 4, "8Gi", LEASE_TTL);
    register(&c.client, &reg_b).await.unwrap();
    let admin_leases: Api<Lease> = Api::namespaced(c.client.clone(), &c.ns);
    heartbeat(&admin_leases, &node_lease_name("b"), "b", LEASE_TTL)
        .await
        .unwrap();
    create_sandbox(&c, "sb-a", spec(1, "256Mi")).await;
    create_sandbox(&c, "sb-b", spec(1, "256Mi")).await;
    bind(&c, "sb-a", "a").await;
    bind(&c, "sb-b", "b").await;

    let kubeconfig = c
        .kube
        .kubeconfig_for("hearth-node:a", &["hearth:nodes"])
        .unwrap();
    let a = hearth_k8s::client::client(Some(&kubeconfig)).await.unwrap();
    let leases: Api<Lease> = Api::namespaced(a.clone(), &c.ns);
    let nodes: Api<HearthNode> = Api::all(a.clone());
    let sandboxes: Api<Sandbox> = Api::namespaced(a.clone(), &c.ns);

    // Node b's Lease: readable through RBAC, not writable. Waits for the API server to load the webhook.
    let mut lease_b = leases.get(&node_lease_name("b")).await.unwrap();
    lease_b.spec.as_mut().unwrap().holder_identity = Some("a".into());
    eventually("the webhook in force", Duration::from_secs(20), || {
        let (leases, lease_b) = (leases.clone(), lease_b.clone());
        async move {
            matches!(leases.replace(&node_lease_name("b"), &PostParams::default(), &lease_b).await,
                Err(kube::Error::Api(s)) if s.message.contains("denied the request"))
        }
    })
    .await;
    let e = refused(
        "a renews b's Lease",
        leases
            .replace(&node_lease_name("b"), &PostParams::default(), &lease_b)
            .await,
    );
    assert!(e.contains("hearth-node-b"), "{e}");
    // Its own Lease, created then renewed.
    heartbeat(&leases, &node_lease_name("a"), "a", LEASE_TTL)
        .await
        .expect("own lease created");
    heartbeat(&leases, &node_lease_name("a"), "a", LEASE_TTL)
        .await
        .expect("own lease renewed");

    // HearthNodes: b's labels, spec and status refused; its own created, patched and reported.
    let relabel = json!({"metadata": {"labels": {"hearth.dev/test": c.ns, "evil": "yes"}}});
    refused(
        "a patches b's HearthNode",
        nodes
            .patch("b", &PatchParams::default(), &Patch::Merge(&relabel))
            .await,
    );
    refused(
        "a reports b's status",
        report(&a, "b", 0, 0, 0).await.map_err(kube_error),
    );
    let reg_a = registration(&c, "a", 4, "8Gi", LEASE_TTL);
    register(&a, &reg_a).await.expect("own HearthNode created");
    register(&a, &reg_a).await.expect("own HearthNode patched");
    report(&a, "a", 1, 1, 256)
        .await
        .expect("own HearthNode status");

    // Sandbox status: only on Sandboxes bound to a, never rebinding, never the spec.
    let running = |mut s: Sandbox| {
        s.status.as_mut().unwrap().phase = Some(Phase::Running);
        s
    };
    let sb_b = sandboxes.get("sb-b").await.unwrap();
    let e = refused(
        "a writes the status of b's Sandbox",
        sandboxes
            .replace_status("sb-b", &PostParams::default(), &running(sb_b))
            .await,
    );
    assert!(e.contains("bound to node b"), "{e}");
    let sb_a = sandboxes.get("sb-a").await.unwrap();
    let mut moved = sb_a.clone();
    moved.status.as_mut().unwrap().node_name = Some("b".into());
    refused(
        "a hands its Sandbox to b",
        sandboxes
            .replace_status("sb-a", &PostParams::default(), &moved)
            .await,
    );
    let mut respec = running(sb_a.clone());
    respec.spec.image = "registry.example/evil".into();
    // Through the status subresource the API server itself drops spec changes; either way it stays.
    match sandboxes
        .replace_status("sb-a", &PostParams::default(), &respec)
        .await
    {
        Ok(_) | Err(kube::Error::Api(_)) => {}
        Err(e) => panic!("status write: {e}"),
    }
    let after = sandboxes.get("sb-a").await.unwrap();
    assert_eq!(
        after.spec.image, "example.invalid/none",
        "spec changed through status"
    );
    let spec_patch = json!({"spec": {"image": "registry.example/evil"}});
    let e = refused(
        "a patches the spec of its own Sandbox",
        sandboxes
            .patch("sb-a", &PatchParams::default(), &Patch::Merge(&spec_patch))
            .await,
    );
    assert!(e.contains("spec"), "{e}");
    sandboxes
        .replace_status("sb-a", &PostParams::default(), &running(after))
        .await
        .expect("status of its own Sandbox");

    // Finalizers: its own on its own Sandbox; nothing on b's, no other finalizer.
    let add = |f: &str| json!({"metadata": {"finalizers": [f]}});
    sandboxes
        .patch(
            "sb-a",
            &PatchParams::default(),
            &Patch::Merge(add(FINALIZER)),
        )
        .await
        .expect("own finalizer added");
    refused(
        "a adds a finalizer to b's Sandbox",
        sandboxes
            .patch(
                "sb-b",
                &PatchParams::default(),
                &Patch::Merge(add(FINALIZER)),
            )
            .await,
    );
    refused(
        "a sets another finalizer",
        sandboxes
            .patch(
                "sb-a",
                &PatchParams::default(),
                &Patch::Merge(add("example.com/x")),
            )
            .await,
    );

    node_agent_works_under_the_webhook(&c, &a).await;

    // The webhook's own counters saw both verdicts (and its probes answer), over the same TLS.
    let metrics = Command::new("curl")
        .args(["-sSf", "--cacert"])
        .arg(dir.path().join("ca.crt"))
        .arg(url.replace("/validate", "/metrics"))
        .output()
        .unwrap();
    let metrics = String::from_utf8_lossy(&metrics.stdout);
    for verdict in ["allowed", "denied"] {
        let line = format!("hearth_admission_reviews_total{{verdict=\"{verdict}\"}} ");
        let count: u64 = metrics
            .lines()
            .find_map(|l| l.strip_prefix(&line))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no {verdict} count in {metrics}"));
        assert!(count > 0, "{verdict}: {metrics}");
    }

    // failurePolicy Fail: with no webhook answering, node writes are refused, not let through.
    let _ = stop_tx.send(());
    served.await.unwrap();
    let down = heartbeat(&leases, &node_lease_name("a"), "a", LEASE_TTL).await;
    assert!(down.is_err(), "a node write passed with the webhook down");
    hooks
        .delete(&cfg.name_any(), &DeleteParams::default())
        .await
        .unwrap();
}

fn kube_error(e: hearth_k8s::K8sError) -> kube::Error {
    match e {
        hearth_k8s::K8sError::Api { source, .. } => source,
        other => panic!("not an API error: {other}"),
    }
}

/// The real node agent with node a's credentials: registers, heartbeats, reports, and runs a Sandbox
/// bound to it to its end (a local image the node does not allow fails at once; no VM boots): the
/// finalizer goes on and off and every status write passes the webhook.
async fn node_agent_works_under_the_webhook(c: &Cluster, a: &Client) {
    let home = tempfile::tempdir().unwrap();
    let node = hearth_sandbox::node::Node::open(hearth_sandbox::node::NodeConfig::new(home.path()))
        .await
        .expect("node state");
    let mut config =
        hearth_k8s::node::NodeAgentConfig::new(registration(c, "a", 4, "8Gi", LEASE_TTL));
    config.sandbox_namespace = Some(c.ns.clone());
    let agent = hearth_k8s::node::NodeAgent::new(a.clone(), node, config);
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(agent.run(async {
        let _ = stopped.await;
    }));
    let mut s = spec(1, "256Mi");
    s.image = "oci-layout:/nonexistent/layout".into();
    create_sandbox(c, "sb-run", s).await;
    bind(c, "sb-run", "a").await;
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    eventually("sb-run failed by node a", Duration::from_secs(60), || {
        let api = api.clone();
        async move {
            let s = api.get("sb-run").await.unwrap();
            s.status
                .as_ref()
                .is_some_and(|st| st.phase == Some(Phase::Failed))
                && !s.finalizers().iter().any(|f| f == FINALIZER)
        }
    })
    .await;
    let lease: Api<Lease> = Api::namespaced(c.client.clone(), &c.ns);
    let renewed = |l: Lease| l.spec.and_then(|s| s.renew_time).map(|t| t.0);
    let before = renewed(lease.get(&node_lease_name("a")).await.unwrap());
    eventually(
        "node a's Lease renewed by the agent",
        Duration::from_secs(30),
        || {
            let lease = lease.clone();
            async move { renewed(lease.get(&node_lease_name("a")).await.unwrap()) > before }
        },
    )
    .await;
    let _ = stop.send(());
    run.await.unwrap().expect("agent ran without error");
}
