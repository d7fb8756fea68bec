//! Placement benchmark (run by `bench/k8s-schedule.sh`): against a real API server, registers N nodes
//! (HearthNode + heartbeat Lease every 10 s, no VMs) and creates M Pending Sandboxes (set-up, not
//! timed), then starts the operator and times until every Sandbox is Scheduled, watching (not listing)
//! so the bench itself adds almost no load. Checks that no node is over capacity and reports the API
//! requests the operator made per placed Sandbox, counted twice: by its own client (a tower layer, exact
//! for this process) and by the API server (`apiserver_request_total` from `/metrics`, before and after,
//! per verb and resource). Then waits for the Scheduled Events to be published.
//!
//! Meanwhile a probe reads one node's Lease every 20 ms, as a heartbeat would, and reports its latency:
//! what the operator's write rate costs everyone else on the API server.
//!
//! Usage: place_bench KUBECONFIG [SANDBOXES=10000] [NODES=500]
//! `HEARTH_BENCH_WRITE_RATE=PER_SECOND/BURST` overrides the operator's write bound (to measure others).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use hearth_k8s::controller::ratelimit::RateLimit;
use hearth_k8s::controller::{Operator, OperatorConfig};
use hearth_k8s::crd::{crds, NodeCapacity, Phase, Sandbox, SandboxResources, SandboxSpec};
use hearth_k8s::node::registration::{heartbeat_forever, register, Registration};
use hearth_k8s::quantity::Quantity;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, PostParams};
use kube::client::ClientBuilder;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::runtime::{watcher, WatchStreamExt};
use kube::Client;

const NODE_CPUS: u32 = 32;
const NODE_MEMORY_GIB: u32 = 16;
const TARGET: Duration = Duration::from_secs(10);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kubeconfig = PathBuf::from(
        args.next()
            .context("usage: place_bench KUBECONFIG [SANDBOXES] [NODES]")?,
    );
    let sandboxes: usize = args
        .next()
        .map(|a| a.parse())
        .transpose()?
        .unwrap_or(10_000);
    let nodes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(500);
    let client = hearth_k8s::client::client(Some(&kubeconfig)).await?;

    let crd_api: Api<CustomResourceDefinition> = Api::all(client.clone());
    for crd in crds() {
        match crd_api.create(&PostParams::default(), &crd).await {
            Err(e) if !hearth_k8s::is_conflict(&e) => return Err(e.into()),
            _ => {}
        }
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // CRDs established
    let ns = format!("hearth-bench-{}", std::process::id());
    let ns_api: Api<Namespace> = Api::all(client.clone());
    let mut ns_obj = Namespace::default();
    ns_obj.metadata.name = Some(ns.clone());
    ns_api.create(&PostParams::default(), &ns_obj).await?;

    let set_up = Instant::now();
    let regs: Vec<Registration> = (0..nodes).map(|i| registration(&ns, i)).collect();
    let registered: Vec<_> = futures::stream::iter(&regs)
        .map(|reg| register(&client, reg))
        .buffer_unordered(32)
        .collect()
        .await;
    for r in registered {
        r?;
    }
    let beats: Vec<_> = regs
        .into_iter()
        .map(|reg| tokio::spawn(heartbeat_forever(client.clone(), reg)))
        .collect();

    let api: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let results: Vec<_> = futures::stream::iter(0..sandboxes)
        .map(|i| {
            let api = api.clone();
            async move {
                let spec = sandbox_spec(1 + (i % 2) as u32); // a mix of 1 and 2 vCPUs
                api.create(
                    &PostParams::default(),
                    &Sandbox::new(&format!("s{i}"), spec),
                )
                .await
            }
        })
        .buffer_unordered(32)
        .collect()
        .await;
    for r in results {
        r?;
    }
    eprintln!(
        "set-up (not timed): {sandboxes} Pending Sandboxes and {nodes} nodes in {:.1} s",
        set_up.elapsed().as_secs_f64()
    );

    // The bench's own watch, synced before the operator starts.
    let (store, writer) = kube::runtime::reflector::store::<Sandbox>();
    let scheduled = Arc::new(tokio::sync::Notify::new());
    let watch = {
        let scheduled = scheduled.clone();
        tokio::spawn(
            kube::runtime::reflector(writer, watcher(api.clone(), watcher::Config::default()))
                .applied_objects()
                .for_each(move |_| {
                    scheduled.notify_one();
                    futures::future::ready(())
                }),
        )
    };
    store.wait_until_ready().await?;
    let server_before = server_requests(&client).await?;

    let counter = Arc::new(RequestCounter::default());
    let op_client = counted_client(&kubeconfig, counter.clone()).await?;
    let mut cfg = OperatorConfig::new("bench-operator", &ns);
    cfg.sandbox_namespace = Some(ns.clone());
    cfg.node_selector = Some(format!("hearth.dev/bench={ns}"));
    if let Ok(rate) = std::env::var("HEARTH_BENCH_WRITE_RATE") {
        let (per_second, burst) = rate
            .split_once('/')
            .context("HEARTH_BENCH_WRITE_RATE=PER_SECOND/BURST")?;
        cfg.write_rate = RateLimit {
            per_second: per_second.parse()?,
            burst: burst.parse()?,
        };
    }
    eprintln!(
        "write bound: {}/s, burst {}",
        cfg.write_rate.per_second, cfg.write_rate.burst
    );
    let latencies = Arc::new(std::sync::Mutex::new(Vec::new()));
    let probe = tokio::spawn(probe_lease(
        Api::namespaced(client.clone(), &ns),
        hearth_k8s::lease::node_lease_name(&format!("{ns}-node-0")),
        latencies.clone(),
    ));
    let started = Instant::now();
    let op = tokio::spawn(Operator::new(op_client, cfg).run(futures::future::pending()));
    let mut first = None;
    let all = loop {
        let state = store.state();
        let done = state
            .iter()
            .filter(|s| s.phase() == Phase::Scheduled)
            .count();
        if done > 0 && first.is_none() {
            first = Some(started.elapsed());
        }
        if done == sandboxes {
            break state;
        }
        if started.elapsed() > Duration::from_secs(300) {
            bail!("only {done} of {sandboxes} Scheduled after 300 s");
        }
        let _ = tokio::time::timeout(Duration::from_millis(100), scheduled.notified()).await;
    };
    let secs = started.elapsed().as_secs_f64();
    probe.abort();
    let mut latencies = std::mem::take(&mut *latencies.lock().unwrap());
    let client_count = counter.snapshot();
    let server_delta = diff(&server_requests(&client).await?, &server_before);

    // The Scheduled Events trail the writes (they only get spare tokens): wait for them.
    let events_at = loop {
        let posted = diff(&server_requests(&client).await?, &server_before)
            .get(&("POST".into(), "events".into(), String::new()))
            .copied()
            .unwrap_or(0);
        if posted >= sandboxes as u64 || started.elapsed() > Duration::from_secs(120) {
            break (posted, started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    op.abort();
    watch.abort();
    beats.iter().for_each(|b| b.abort());

    let over = over_capacity(&all)?;
    println!(
        "placed {sandboxes} sandboxes on {nodes} nodes in {secs:.2} s (target < {} s; first Scheduled at {:.2} s); nodes over capacity: {}",
        TARGET.as_secs(),
        first.unwrap_or_default().as_secs_f64(),
        over.len()
    );
    println!(
        "operator's client: {} requests while placing = {:.3} per placed Sandbox ({} writes, {} reads, {} watches)",
        client_count.total(),
        client_count.total() as f64 / sandboxes as f64,
        client_count.writes,
        client_count.reads,
        client_count.watches
    );
    println!("API server (apiserver_request_total delta while placing; Lease GET/PUT include the nodes' heartbeats):");
    for ((verb, resource, sub), n) in &server_delta {
        if n > &0 && resource != "namespaces" {
            println!(
                "  {verb:<6} {resource}{}{sub}: {n}",
                if sub.is_empty() { "" } else { "/" }
            );
        }
    }
    latencies.sort();
    let pct = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    };
    println!(
        "another client's Lease GET while placing: {} samples, p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        latencies.len(),
        pct(50),
        pct(99),
        latencies.last().map_or(0.0, |d| d.as_secs_f64() * 1000.0)
    );
    println!(
        "Scheduled Events: {} published {:.2} s after the operator started",
        events_at.0, events_at.1
    );
    if !over.is_empty() {
        bail!("nodes over capacity: {over:?}");
    }
    if secs >= TARGET.as_secs_f64() {
        bail!(
            "placement took {secs:.2} s, over the {} s target",
            TARGET.as_secs()
        );
    }
    Ok(())
}

/// Reads `name` every 20 ms, recording each answer's latency.
async fn probe_lease(
    api: Api<k8s_openapi::api::coordination::v1::Lease>,
    name: String,
    out: Arc<std::sync::Mutex<Vec<Duration>>>,
) {
    loop {
        let t = Instant::now();
        if api.get(&name).await.is_ok() {
            out.lock().unwrap().push(t.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn registration(ns: &str, i: usize) -> Registration {
    Registration {
        node_name: format!("{ns}-node-{i}"),
        labels: [("hearth.dev/bench".to_string(), ns.to_string())].into(),
        capacity: NodeCapacity {
            cpu: Quantity::new(NODE_CPUS.to_string()),
            memory: Quantity::new(format!("{NODE_MEMORY_GIB}Gi")),
        },
        lease_namespace: ns.to_string(),
        // Heartbeats every 10 s, as a real node's: 500 nodes renew 50 Leases/s meanwhile.
        lease_duration: Duration::from_secs(40),
        api_endpoint: None,
    }
}

fn sandbox_spec(cpu: u32) -> SandboxSpec {
    SandboxSpec {
        image: "example.invalid/bench".into(),
        command: vec!["true".into()],
        args: vec![],
        env: vec![],
        working_dir: None,
        resources: Some(SandboxResources {
            cpu: Some(Quantity::new(cpu.to_string())),
            memory: Some(Quantity::new("256Mi")),
        }),
        timeout_seconds: None,
        ttl_seconds_after_finished: None,
        node_selector: Default::default(),
        network: None,
        lifecycle: None,
        paused: false,
    }
}

/// Nodes whose placed Sandboxes exceed their capacity, with (vCPUs, MiB) used.
fn over_capacity(all: &[Arc<Sandbox>]) -> anyhow::Result<Vec<(String, (u32, u64))>> {
    let mut used: HashMap<String, (u32, u64)> = HashMap::new();
    for s in all {
        let d = s.spec.demand()?;
        let e = used
            .entry(s.node_name().unwrap_or_default().to_string())
            .or_default();
        e.0 += d.vcpus;
        e.1 += d.memory_mib;
    }
    Ok(used
        .into_iter()
        .filter(|(_, (c, m))| *c > NODE_CPUS || *m > u64::from(NODE_MEMORY_GIB) * 1024)
        .collect())
}

/// Requests seen by the operator's own client.
#[derive(Default)]
struct RequestCounter {
    writes: AtomicU64,
    reads: AtomicU64,
    watches: AtomicU64,
}

struct Counted {
    writes: u64,
    reads: u64,
    watches: u64,
}

impl Counted {
    fn total(&self) -> u64 {
        self.writes + self.reads + self.watches
    }
}

impl RequestCounter {
    fn count(&self, req: &http::Request<kube::client::Body>) {
        let watch = req.uri().query().is_some_and(|q| q.contains("watch=true"));
        let which = match (req.method(), watch) {
            (&http::Method::GET, true) => &self.watches,
            (&http::Method::GET, false) => &self.reads,
            _ => &self.writes,
        };
        which.fetch_add(1, Ordering::Relaxed);
    }

    fn snapshot(&self) -> Counted {
        Counted {
            writes: self.writes.load(Ordering::Relaxed),
            reads: self.reads.load(Ordering::Relaxed),
            watches: self.watches.load(Ordering::Relaxed),
        }
    }
}

/// A client like the operator's own, with every request counted.
async fn counted_client(
    kubeconfig: &PathBuf,
    counter: Arc<RequestCounter>,
) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    let layer = tower::util::MapRequestLayer::new(move |req: http::Request<kube::client::Body>| {
        counter.count(&req);
        req
    });
    Ok(ClientBuilder::try_from(config)?.with_layer(&layer).build())
}

type RequestKey = (String, String, String);

/// `apiserver_request_total` summed by (verb, resource, subresource).
async fn server_requests(client: &Client) -> anyhow::Result<BTreeMap<RequestKey, u64>> {
    let text = client
        .request_text(http::Request::get("/metrics").body(Vec::new())?)
        .await?;
    let mut out = BTreeMap::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("apiserver_request_total{") else {
            continue;
        };
        let Some((labels, value)) = rest.rsplit_once("} ") else {
            continue;
        };
        let label = |name: &str| {
            labels
                .split(',')
                .find_map(|kv| kv.strip_prefix(&format!("{name}=\"")))
                .map(|v| v.trim_end_matches('"').to_string())
                .unwrap_or_default()
        };
        let n: f64 = value.trim().parse().unwrap_or(0.0);
        *out.entry((label("verb"), label("resource"), label("subresource")))
            .or_default() += n as u64;
    }
    Ok(out)
}

fn diff(
    after: &BTreeMap<RequestKey, u64>,
    before: &BTreeMap<RequestKey, u64>,
) -> BTreeMap<RequestKey, u64> {
    after
        .iter()
        .map(|(k, v)| (k.clone(), v - before.get(k).copied().unwrap_or(0).min(*v)))
        .collect()
}
