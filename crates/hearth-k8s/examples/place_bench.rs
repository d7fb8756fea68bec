//! Placement benchmark (run by `bench/k8s-schedule.sh`): against a real API server, registers N nodes
//! (HearthNode + heartbeat Lease, no VMs), creates M Pending Sandboxes, then starts the operator and
//! times until every Sandbox is Scheduled; checks that no node is over capacity.
//!
//! Usage: place_bench KUBECONFIG [SANDBOXES=1000] [NODES=50]

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use futures::StreamExt;
use hearth_k8s::controller::{Operator, OperatorConfig};
use hearth_k8s::crd::{crds, NodeCapacity, Phase, Sandbox, SandboxResources, SandboxSpec};
use hearth_k8s::node::registration::{heartbeat_forever, register, Registration};
use hearth_k8s::quantity::Quantity;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, ListParams, PostParams};

const NODE_CPUS: u32 = 32;
const NODE_MEMORY_GIB: u32 = 16;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let kubeconfig = PathBuf::from(
        args.next()
            .context("usage: place_bench KUBECONFIG [SANDBOXES] [NODES]")?,
    );
    let sandboxes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(1000);
    let nodes: usize = args.next().map(|a| a.parse()).transpose()?.unwrap_or(50);
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

    let mut beats = Vec::new();
    for i in 0..nodes {
        let reg = Registration {
            node_name: format!("{ns}-node-{i}"),
            labels: [("hearth.dev/bench".to_string(), ns.clone())].into(),
            capacity: NodeCapacity {
                cpu: Quantity::new(NODE_CPUS.to_string()),
                memory: Quantity::new(format!("{NODE_MEMORY_GIB}Gi")),
            },
            lease_namespace: ns.clone(),
            lease_duration: Duration::from_secs(60),
        };
        register(&client, &reg).await?;
        beats.push(tokio::spawn(heartbeat_forever(client.clone(), reg)));
    }

    let api: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let created = Instant::now();
    let results: Vec<_> = futures::stream::iter(0..sandboxes)
        .map(|i| {
            let api = api.clone();
            async move {
                let cpu = 1 + (i % 2) as u32; // a mix of 1 and 2 vCPUs
                let spec = SandboxSpec {
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
                };
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
        "created {sandboxes} Pending Sandboxes and {nodes} nodes in {:.2} s",
        created.elapsed().as_secs_f64()
    );

    let mut cfg = OperatorConfig::new("bench-operator", &ns);
    cfg.sandbox_namespace = Some(ns.clone());
    cfg.node_selector = Some(format!("hearth.dev/bench={ns}"));
    let started = Instant::now();
    let op = tokio::spawn(Operator::new(client.clone(), cfg).run(futures::future::pending()));
    let all = loop {
        let list = api.list(&ListParams::default()).await?.items;
        if list.iter().all(|s| s.phase() == Phase::Scheduled) {
            break list;
        }
        if started.elapsed() > Duration::from_secs(120) {
            let n = list
                .iter()
                .filter(|s| s.phase() == Phase::Scheduled)
                .count();
            bail!("only {n} of {sandboxes} Scheduled after 120 s");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let secs = started.elapsed().as_secs_f64();
    op.abort();
    beats.iter().for_each(|b| b.abort());

    let mut used: HashMap<String, (u32, u64)> = HashMap::new();
    for s in &all {
        let d = s.spec.demand()?;
        let e = used
            .entry(s.node_name().unwrap_or_default().to_string())
            .or_default();
        e.0 += d.vcpus;
        e.1 += d.memory_mib;
    }
    let over: Vec<_> = used
        .iter()
        .filter(|(_, (c, m))| *c > NODE_CPUS || *m > u64::from(NODE_MEMORY_GIB) * 1024)
        .collect();
    let (min, max) = (
        used.values().map(|u| u.0).min().unwrap_or(0),
        used.values().map(|u| u.0).max().unwrap_or(0),
    );
    println!(
        "placed {sandboxes} sandboxes on {} of {nodes} nodes in {secs:.2} s (target < 10 s); vCPUs per node {min}..{max} of {NODE_CPUS}; nodes over capacity: {}",
        used.len(),
        over.len()
    );
    if !over.is_empty() {
        bail!("nodes over capacity: {over:?}");
    }
    if secs >= 10.0 {
        bail!("placement took {secs:.2} s, over the 10 s target");
    }
    Ok(())
}
