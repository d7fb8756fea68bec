//! What a sandbox network adds to a sandbox create: create + teardown of the namespace, the tap
//! and the table (with a realistic rule set), measured over 20 runs; prints p50 and max (the
//! issue's target is < 20 ms). The bound asserted is loose (a shared, loaded machine); the
//! printed numbers are the measurement. Needs root and nft.

mod kernel_common;

use std::time::{Duration, Instant};

use hearth_net::rules::IpRules;
use hearth_net::sandbox_net::SandboxNet;
use kernel_common::{can_run, mounts_under};

#[test]
fn create_and_teardown_cost() {
    if !can_run() {
        return;
    }
    let home = tempfile::tempdir().unwrap();
    let rules = IpRules {
        open: true,
        allow: vec![("10.1.2.3/32".parse().unwrap(), Some(8080))],
        deny: vec!["198.51.100.66/32".parse().unwrap()],
        blocked: [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "169.254.0.0/16",
            "127.0.0.0/8",
        ]
        .iter()
        .map(|n| n.parse().unwrap())
        .collect(),
    };
    let mut create = Vec::new();
    let mut teardown = Vec::new();
    for i in 0..20 {
        let start = Instant::now();
        let mut net = SandboxNet::create(home.path(), &format!("cost-{i}"), &rules, None).unwrap();
        create.push(start.elapsed());
        let start = Instant::now();
        net.teardown().unwrap();
        teardown.push(start.elapsed());
    }
    create.sort();
    teardown.sort();
    let p50 = |v: &[Duration]| v[v.len() / 2];
    eprintln!(
        "sandbox network create: p50 {:?} max {:?}; teardown: p50 {:?} max {:?}",
        p50(&create),
        create[create.len() - 1],
        p50(&teardown),
        teardown[teardown.len() - 1]
    );
    assert!(mounts_under(home.path()).is_empty());
    assert!(
        p50(&create) < Duration::from_millis(200),
        "create p50 {:?}",
        p50(&create)
    );
}
