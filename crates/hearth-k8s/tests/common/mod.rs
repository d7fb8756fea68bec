//! Shared setup for tests against the testkit's real kube-apiserver: a client, the CRDs installed, a
//! fresh namespace, and helpers to wait for conditions.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hearth_k8s::crd::{crds, NodeCapacity, Sandbox, SandboxSpec};
use hearth_k8s::node::registration::{heartbeat_forever, register, Registration};
use hearth_k8s::quantity::Quantity;
use hearth_testkit::Kube;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::{Client, ResourceExt};

pub struct Cluster {
    pub kube: &'static Kube,
    pub client: Client,
    pub ns: String,
}

/// The test cluster with hearth's CRDs installed and a fresh namespace, or `None` after printing why
/// the test skips (no kube-apiserver provisioned).
pub async fn cluster(prefix: &str) -> Option<Cluster> {
    let kube = match hearth_testkit::kube() {
        Ok(k) => k,
        Err(e) => {
            hearth_testkit::skip(&format!("needs a test kube-apiserver: {e:#}"));
            return None;
        }
    };
    let client = hearth_k8s::client::client(Some(&kube.kubeconfig))
        .await
        .expect("client from the testkit's kubeconfig");
    install_crds(&client).await;
    let ns = kube.create_namespace(prefix).expect("namespace");
    Some(Cluster { kube, client, ns })
}

pub async fn install_crds(client: &Client) {
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        match api.create(&PostParams::default(), &crd).await {
            Ok(_) => {}
            Err(e) if hearth_k8s::is_conflict(&e) => {}
            Err(e) => panic!("installing CRD {}: {e}", crd.name_any()),
        }
        let name = crd.name_any();
        eventually(
            &format!("CRD {name} established"),
            Duration::from_secs(30),
            || {
                let api = api.clone();
                let name = name.clone();
                async move {
                    api.get(&name)
                        .await
                        .ok()
                        .and_then(|c| c.status)
                        .is_some_and(|s| {
                            s.conditions
                                .unwrap_or_default()
                                .iter()
                                .any(|c| c.type_ == "Established" && c.status == "True")
                        })
                }
            },
        )
        .await;
    }
}

/// Polls `check` every 100 ms until it holds or `timeout` passes (then panics naming `what`).
pub async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The requests a client made, as (method, path, query): kept by [`recording_client`].
pub type RequestLog = std::sync::Arc<std::sync::Mutex<Vec<(http::Method, String, String)>>>;

/// A client for the test cluster that records every request it makes, so a test can count the
/// requests of the one component it hands the client to (other tests share the API server).
pub async fn recording_client(c: &Cluster) -> (Client, RequestLog) {
    let log = RequestLog::default();
    let to = log.clone();
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        let query = req.uri().query().unwrap_or_default().to_string();
        to.lock()
            .unwrap()
            .push((req.method().clone(), req.uri().path().to_string(), query));
        req
    });
    let kubeconfig = kube::config::Kubeconfig::read_from(&c.kube.kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
        .await
        .expect("config");
    let client = kube::client::ClientBuilder::try_from(config)
        .expect("client")
        .with_layer(&layer)
        .build();
    (client, log)
}

/// How many requests in `log` were `method` on a path ending in `/sandboxes` that is not a watch:
/// GET counts lists, POST creates.
pub fn sandbox_requests(log: &RequestLog, method: http::Method) -> usize {
    log.lock()
        .unwrap()
        .iter()
        .filter(|(m, path, query)| {
            *m == method && path.ends_with("/sandboxes") && !query.contains("watch=true")
        })
        .count()
}

pub fn spec(cpu: u32, mem: &str) -> SandboxSpec {
    SandboxSpec {
        image: "example.invalid/none".into(),
        command: vec!["true".into()],
        args: vec![],
        env: vec![],
        working_dir: None,
        resources: Some(hearth_k8s::crd::SandboxResources {
            cpu: Some(Quantity::new(cpu.to_string())),
            memory: Some(Quantity::new(mem)),
        }),
        timeout_seconds: None,
        ttl_seconds_after_finished: None,
        node_selector: BTreeMap::new(),
        network: None,
        lifecycle: None,
        paused: false,
    }
}

pub async fn create_sandbox(c: &Cluster, name: &str, spec: SandboxSpec) -> Sandbox {
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    api.create(&PostParams::default(), &Sandbox::new(name, spec))
        .await
        .expect("create Sandbox")
}

pub fn registration(c: &Cluster, name: &str, cpu: u32, mem: &str, lease: Duration) -> Registration {
    Registration {
        node_name: name.into(),
        labels: [("hearth.dev/test".to_string(), c.ns.clone())].into(),
        capacity: NodeCapacity {
            cpu: Quantity::new(cpu.to_string()),
            memory: Quantity::new(mem),
        },
        lease_namespace: c.ns.clone(),
        lease_duration: lease,
        api_endpoint: None,
    }
}

/// Registers a node that heartbeats until the returned task is aborted (it runs no VMs).
pub async fn fake_node(c: &Cluster, reg: Registration) -> tokio::task::JoinHandle<()> {
    register(&c.client, &reg).await.expect("register node");
    tokio::spawn(heartbeat_forever(c.client.clone(), reg))
}

/// An operator config confined to this test's namespace and nodes.
pub fn operator_config(c: &Cluster, identity: &str) -> hearth_k8s::controller::OperatorConfig {
    let mut cfg = hearth_k8s::controller::OperatorConfig::new(identity, &c.ns);
    cfg.sandbox_namespace = Some(c.ns.clone());
    cfg.node_selector = Some(format!("hearth.dev/test={}", c.ns));
    cfg.resync = Duration::from_millis(300);
    cfg
}

pub async fn sandboxes(c: &Cluster) -> Vec<Sandbox> {
    let api: Api<Sandbox> = Api::namespaced(c.client.clone(), &c.ns);
    api.list(&Default::default()).await.expect("list").items
}
