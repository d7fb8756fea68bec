//! Unit and property tests of the placement policy.

use proptest::prelude::*;

use super::*;

fn node(name: &str, vcpus: u32, mib: u64, labels: &[(&str, &str)]) -> NodeInfo {
    NodeInfo {
        name: name.into(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        capacity: Demand {
            vcpus,
            memory_mib: mib,
        },
        ready: true,
    }
}

fn sbx(key: &str, vcpus: u32, mib: u64, sel: &[(&str, &str)]) -> PendingSandbox {
    PendingSandbox {
        key: key.into(),
        demand: Demand {
            vcpus,
            memory_mib: mib,
        },
        node_selector: sel
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
    }
}

#[test]
fn least_allocated_node_wins() {
    let nodes = [node("a", 4, 4096, &[]), node("b", 4, 4096, &[])];
    let mut ledger = Ledger::new();
    ledger.bind(
        "old",
        "a",
        Demand {
            vcpus: 2,
            memory_mib: 1024,
        },
    );
    assert_eq!(
        place(&sbx("x", 1, 256, &[]), &nodes, &mut ledger).unwrap(),
        "b"
    );
}

#[test]
fn full_nodes_and_stale_leases_and_selectors_are_skipped() {
    let mut stale = node("stale", 64, 65536, &[("zone", "a")]);
    stale.ready = false;
    let nodes = [
        stale,
        node("other-zone", 64, 65536, &[("zone", "b")]),
        node("small", 1, 128, &[("zone", "a")]),
    ];
    let mut ledger = Ledger::new();
    let err = place(&sbx("x", 1, 256, &[("zone", "a")]), &nodes, &mut ledger).unwrap_err();
    assert!(err.0.contains("2 ready node(s), 1 matching"), "{}", err.0);
    assert_eq!(ledger.count_on("small"), 0);
    assert_eq!(
        place(&sbx("y", 1, 128, &[("zone", "a")]), &nodes, &mut ledger).unwrap(),
        "small"
    );
}

#[test]
fn releasing_frees_capacity() {
    let nodes = [node("a", 1, 512, &[])];
    let mut ledger = Ledger::new();
    place(&sbx("x", 1, 256, &[]), &nodes, &mut ledger).unwrap();
    assert!(place(&sbx("y", 1, 256, &[]), &nodes, &mut ledger).is_err());
    ledger.release("x");
    assert_eq!(
        place(&sbx("y", 1, 256, &[]), &nodes, &mut ledger).unwrap(),
        "a"
    );
}

fn arb_nodes() -> impl Strategy<Value = Vec<NodeInfo>> {
    prop::collection::vec((1u32..8, 1u64..8, 0u8..3, any::<bool>()), 1..8).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, gib, zone, ready))| {
                let zone = ["a", "b", "c"][zone as usize];
                let mut n = node(&format!("n{i}"), cpu, gib * 1024, &[("zone", zone)]);
                n.ready = ready || i == 0;
                n
            })
            .collect()
    })
}

fn arb_pending() -> impl Strategy<Value = Vec<PendingSandbox>> {
    prop::collection::vec((1u32..4, 1u64..8, 0u8..4), 0..60).prop_map(|specs| {
        specs
            .into_iter()
            .enumerate()
            .map(|(i, (cpu, quarter_gib, zone))| {
                let sel: &[(&str, &str)] = match zone {
                    0 => &[("zone", "a")],
                    1 => &[("zone", "b")],
                    _ => &[],
                };
                sbx(&format!("s{i}"), cpu, quarter_gib * 256, sel)
            })
            .collect()
    })
}

proptest! {
    #[test]
    fn never_over_capacity_and_selectors_respected(nodes in arb_nodes(), pending in arb_pending()) {
        let mut ledger = Ledger::new();
        let results = place_all(&pending, &nodes, &mut ledger);
        for n in &nodes {
            let used = ledger.allocated(&n.name);
            prop_assert!(used.vcpus <= n.capacity.vcpus && used.memory_mib <= n.capacity.memory_mib,
                "{} over capacity: {:?} > {:?}", n.name, used, n.capacity);
        }
        for (s, (_, r)) in pending.iter().zip(&results) {
            match r {
                Ok(name) => {
                    let n = nodes.iter().find(|n| &n.name == name).unwrap();
                    prop_assert!(n.ready);
                    for (k, v) in &s.node_selector {
                        prop_assert_eq!(n.labels.get(k), Some(v));
                    }
                }
                // Allocation only grows within a pass, so what did not fit then does not fit now.
                Err(_) => for n in nodes.iter().filter(|n| n.ready) {
                    let sel_ok = s.node_selector.iter().all(|(k, v)| n.labels.get(k) == Some(v));
                    let used = ledger.allocated(&n.name);
                    let fits = used.vcpus + s.demand.vcpus <= n.capacity.vcpus
                        && used.memory_mib + s.demand.memory_mib <= n.capacity.memory_mib;
                    prop_assert!(!(sel_ok && fits), "{} left pending though {} has room", s.key, n.name);
                }
            }
        }
    }

    #[test]
    fn equal_work_spreads_evenly(n_nodes in 1usize..10, n_sbx in 0usize..100) {
        let nodes: Vec<_> = (0..n_nodes).map(|i| node(&format!("n{i}"), 1000, 1 << 20, &[])).collect();
        let pending: Vec<_> = (0..n_sbx).map(|i| sbx(&format!("s{i}"), 1, 256, &[])).collect();
        let mut ledger = Ledger::new();
        for (_, r) in place_all(&pending, &nodes, &mut ledger) {
            prop_assert!(r.is_ok());
        }
        let counts: Vec<_> = nodes.iter().map(|n| ledger.count_on(&n.name)).collect();
        let (min, max) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
        prop_assert!(max - min <= 1, "uneven spread {:?}", counts);
    }
}
