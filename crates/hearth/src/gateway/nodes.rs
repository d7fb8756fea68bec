//! Where each node's API is: a watch (a kube-runtime reflector) of the HearthNodes' endpoints, so
//! forwarding a request reads one object from the API server (the caller's Sandbox, which must be
//! current: its phase and node decide) instead of two. The gateway stays stateless: the watch is
//! a cache any replica rebuilds at start.
//!
//! A node the watch does not know (registered a moment ago, or the watch is down or not yet
//! listed), or knows without an endpoint, is read from the API server instead, so the cache never
//! makes a forward fail that a read would have served. An endpoint that changes (a node agent
//! restarted on another address) reaches the cache with the watch event, within milliseconds.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use hearth_k8s::crd::HearthNode;
use kube::runtime::reflector::{self, ObjectRef, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Resource};

/// HearthNodes' endpoints from a watch; the watch stops when this is dropped.
pub struct NodeEndpoints {
    store: Store<HearthNode>,
    /// The watch has listed every node and its last event was not an error.
    healthy: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

impl NodeEndpoints {
    /// Starts the watch (needs a Tokio runtime). Only the endpoints are kept: status, labels and
    /// managed fields are dropped as they arrive.
    pub fn start(client: kube::Client) -> Self {
        let (store, writer) = reflector::store();
        let healthy = Arc::new(AtomicBool::new(false));
        let nodes: Api<HearthNode> = Api::all(client);
        let events = reflector::reflector(
            writer,
            watcher(nodes, watcher::Config::default())
                .default_backoff()
                .modify(|n| {
                    let meta = n.meta_mut();
                    meta.managed_fields = None;
                    meta.labels = None;
                    meta.annotations = None;
                    n.status = None;
                }),
        );
        let health = healthy.clone();
        let task = tokio::spawn(async move {
            let mut events = std::pin::pin!(events);
            while let Some(event) = events.next().await {
                match event {
                    Ok(watcher::Event::InitDone | watcher::Event::Apply(_))
                    | Ok(watcher::Event::Delete(_)) => health.store(true, Ordering::Release),
                    Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                    Err(e) => {
                        health.store(false, Ordering::Release);
                        tracing::warn!("watching HearthNodes: {e}");
                    }
                }
            }
        });
        NodeEndpoints {
            store,
            healthy,
            task,
        }
    }

    /// `name`'s API endpoint as the watch last saw it: `None` when the watch cannot answer (not
    /// healthy, node unknown, or no endpoint), and the caller reads the node itself.
    pub fn cached(&self, name: &str) -> Option<String> {
        if !self.healthy.load(Ordering::Acquire) {
            return None;
        }
        self.store
            .get(&ObjectRef::new(name))
            .and_then(|n| n.spec.api_endpoint.clone())
    }
}

impl Drop for NodeEndpoints {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    use kube::api::{DeleteParams, Patch, PatchParams, PostParams};

    use super::*;

    /// Waits up to 10 s for the watch to say `want` about `name`.
    async fn until(endpoints: &NodeEndpoints, name: &str, want: Option<&str>) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while endpoints.cached(name).as_deref() != want {
            assert!(Instant::now() < deadline, "the watch never said {want:?}");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn the_watch_follows_a_nodes_endpoint_and_never_guesses_one() {
        let kube = match hearth_testkit::kube() {
            Ok(k) => k,
            Err(e) => return hearth_testkit::skip(&format!("needs a test kube-apiserver: {e:#}")),
        };
        let client = hearth_k8s::client::client(Some(&kube.kubeconfig))
            .await
            .unwrap();
        let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
        for crd in hearth_k8s::crd::crds() {
            if let Err(e) = crds.create(&PostParams::default(), &crd).await {
                assert!(hearth_k8s::is_conflict(&e), "installing a CRD: {e}");
            }
        }
        let nodes: Api<HearthNode> = Api::all(client.clone());
        let deadline = Instant::now() + Duration::from_secs(30);
        while nodes.list(&Default::default()).await.is_err() {
            assert!(
                Instant::now() < deadline,
                "the HearthNode CRD is not served"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }

        let endpoints = NodeEndpoints::start(client.clone());
        let name = format!("gw-watch-{}", std::process::id());
        let node: HearthNode = serde_json::from_value(serde_json::json!({
            "apiVersion": "hearth.dev/v1alpha1", "kind": "HearthNode",
            "metadata": {"name": name}, "spec": {"capacity": {"cpu": "2", "memory": "1Gi"}},
        }))
        .unwrap();
        // A node without an endpoint, then given one, then moved, then gone.
        nodes.create(&PostParams::default(), &node).await.unwrap();
        let listed = Instant::now() + Duration::from_secs(10);
        while !endpoints.healthy.load(Ordering::Acquire) {
            assert!(Instant::now() < listed, "the watch never listed the nodes");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert_eq!(
            endpoints.cached(&name),
            None,
            "no endpoint: the API is asked"
        );
        assert_eq!(endpoints.cached("no-such-node"), None);
        let params = PatchParams::default();
        for endpoint in ["https://192.0.2.10:8443", "https://192.0.2.11:8443"] {
            let patch = serde_json::json!({"spec": {"apiEndpoint": endpoint}});
            nodes
                .patch(&name, &params, &Patch::Merge(&patch))
                .await
                .unwrap();
            until(&endpoints, &name, Some(endpoint)).await;
        }
        nodes.delete(&name, &DeleteParams::default()).await.unwrap();
        until(&endpoints, &name, None).await;
    }
}
