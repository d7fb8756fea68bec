//! The write overlay: a pass after our own write plans from what we wrote until the watch delivers it,
//! then from the store again, whatever else happened meanwhile.

use super::*;
use crate::crd::{Phase, SandboxStatus};

fn sandbox(uid: &str, rv: &str, phase: Option<Phase>) -> Arc<Sandbox> {
    let mut s: Sandbox = serde_json::from_value(serde_json::json!({
        "apiVersion": "hearth.dev/v1alpha1", "kind": "Sandbox",
        "metadata": {"name": uid, "namespace": "ns", "uid": uid, "resourceVersion": rv},
        "spec": {"image": "x", "command": ["true"]}
    }))
    .unwrap();
    s.status = phase.map(|p| SandboxStatus {
        phase: Some(p),
        ..Default::default()
    });
    Arc::new(s)
}

fn phases(v: &[Sandbox]) -> Vec<(String, String, Phase)> {
    v.iter()
        .map(|s| (s.name_any(), s.resource_version().unwrap(), s.phase()))
        .collect()
}

#[test]
fn a_write_shows_until_the_store_has_it_then_the_store_wins() {
    let mut o = Overlay::default();
    let pending = sandbox("a", "10", None);
    o.wrote(
        &pending,
        Some((*sandbox("a", "11", Some(Phase::Scheduled))).clone()),
    );

    // The watch lags: the store still has rv 10, the pass sees our Scheduled write.
    let seen = o.apply(vec![pending.clone(), sandbox("b", "5", None)]);
    assert_eq!(
        phases(&seen),
        [
            ("a".into(), "11".into(), Phase::Scheduled),
            ("b".into(), "5".into(), Phase::Pending)
        ]
    );
    assert_eq!(o.undelivered(), 1);

    // The store moved on (our write, or anything after it): the store is the truth again.
    let seen = o.apply(vec![sandbox("a", "12", Some(Phase::Running))]);
    assert_eq!(phases(&seen), [("a".into(), "12".into(), Phase::Running)]);
    assert_eq!(o.undelivered(), 0);
}

#[test]
fn chained_writes_on_a_lagging_store_keep_the_latest_and_deletes_hide_the_object() {
    let mut o = Overlay::default();
    let v10 = sandbox("a", "10", None);
    let v11 = sandbox("a", "11", Some(Phase::Scheduled));
    o.wrote(&v10, Some((*v11).clone()));
    // A second write planned from the overlay (based on rv 11) while the store still shows rv 10.
    o.wrote(
        &v11,
        Some((*sandbox("a", "12", Some(Phase::Failed))).clone()),
    );
    for stored in [&v10, &v11] {
        let seen = o.apply(vec![stored.clone()]);
        assert_eq!(phases(&seen), [("a".into(), "12".into(), Phase::Failed)]);
    }
    // Deleted by us: left out while the store lags, forgotten once the object is gone from it.
    let gone = sandbox("d", "7", Some(Phase::Succeeded));
    o.wrote(&gone, None);
    assert!(o
        .apply(vec![gone.clone()])
        .iter()
        .all(|s| s.name_any() != "d"));
    assert!(o.apply(vec![]).is_empty());
    assert_eq!(o.undelivered(), 0);
}
