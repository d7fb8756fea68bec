//! Unit tests of the pure claim planner.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::ResourceExt;

use super::*;
use crate::controller::pools::tests::{member_of, pool, template, NS};
use crate::crd::{ClaimLifecycle, SandboxClaimSpec, SandboxTemplateRef};

fn now() -> Timestamp {
    Timestamp::from_second(1_800_000_000).unwrap()
}

fn claim(name: &str, template: &str, age: i64) -> SandboxClaim {
    let mut c = SandboxClaim::new(
        name,
        SandboxClaimSpec {
            sandbox_template_ref: SandboxTemplateRef {
                name: template.into(),
            },
            lifecycle: None,
        },
    );
    c.metadata.namespace = Some(NS.into());
    c.metadata.uid = Some(format!("uid-claim-{name}"));
    c.metadata.resource_version = Some("3".into());
    c.metadata.creation_timestamp =
        Some(Time(Timestamp::from_second(1_700_000_000 + age).unwrap()));
    c.metadata.finalizers = Some(vec![CLAIM_FINALIZER.into()]);
    c
}

/// `s` as `c` left it after adopting or creating it.
fn owned(mut s: Sandbox, c: &SandboxClaim) -> Sandbox {
    s.labels_mut().remove(POOL_LABEL);
    s.metadata.owner_references = c.controller_owner_ref(&()).map(|o| vec![o]);
    s
}

fn adopted(seq: &[Write]) -> Option<String> {
    seq.iter().find_map(|w| match w {
        Write::PatchSandbox { sandbox, .. } => Some(sandbox.name_any()),
        _ => None,
    })
}

fn claim_status(seq: &[Write]) -> Option<&SandboxClaimStatus> {
    seq.iter().find_map(|w| match w {
        Write::ClaimStatus { status, .. } => Some(status),
        _ => None,
    })
}

#[test]
fn a_claim_adopts_the_oldest_ready_member_with_a_guarded_patch() {
    let t = template("py", "python");
    let p = pool("warm", "py", 2);
    let members = [
        member_of(&p, &t, "warm-new", Phase::Running, 5),
        member_of(&p, &t, "warm-old", Phase::Running, 1),
        member_of(&p, &t, "warm-booting", Phase::Scheduled, 0),
    ];
    let mut c = claim("mine", "py", 0);
    let at = Time(Timestamp::from_second(1_900_000_000).unwrap());
    c.spec.lifecycle = Some(ClaimLifecycle {
        shutdown_time: Some(at.clone()),
        shutdown_policy: Some(ShutdownPolicy::Retain),
    });
    let seqs = plan_claims(&[c], &[t], &[p], &members, now());
    assert_eq!(seqs.len(), 1);
    let seq = &seqs[0];
    let Write::PatchSandbox { sandbox, patch } = &seq[0] else {
        panic!("{seq:?}")
    };
    assert_eq!(sandbox.name_any(), "warm-old");
    assert_eq!(patch["metadata"]["resourceVersion"], "7", "guarded");
    assert_eq!(
        patch["metadata"]["labels"][POOL_LABEL],
        serde_json::Value::Null
    );
    assert_eq!(patch["metadata"]["labels"][CLAIM_LABEL], "mine");
    assert_eq!(
        patch["metadata"]["ownerReferences"][0]["uid"],
        "uid-claim-mine"
    );
    assert_eq!(
        patch["metadata"]["ownerReferences"][0]["kind"],
        "SandboxClaim"
    );
    assert_eq!(patch["spec"]["lifecycle"]["type"], "Service");
    assert_eq!(patch["spec"]["lifecycle"]["shutdownPolicy"], "Retain");
    assert_eq!(
        patch["spec"]["lifecycle"]["shutdownTime"],
        serde_json::to_value(&at).unwrap()
    );
    let st = claim_status(seq).unwrap();
    assert_eq!(st.sandbox.as_ref().unwrap().name, "warm-old");
    assert_eq!(st.phase, Some(Phase::Running));
    assert_eq!(st.conditions[0].status, "True");
}

#[test]
fn claims_in_one_pass_never_share_a_member_and_the_rest_get_fresh_sandboxes() {
    let t = template("py", "python");
    let p = pool("warm", "py", 2);
    let members = [
        member_of(&p, &t, "warm-a", Phase::Running, 1),
        member_of(&p, &t, "warm-b", Phase::Running, 2),
    ];
    let claims: Vec<_> = (0..4).map(|i| claim(&format!("c{i}"), "py", i)).collect();
    let seqs = plan_claims(&claims, &[t], &[p], &members, now());
    let got: Vec<_> = seqs.iter().map(|s| adopted(s)).collect();
    assert_eq!(
        got,
        [Some("warm-a".into()), Some("warm-b".into()), None, None],
        "oldest claims get the oldest members"
    );
    for (seq, name) in seqs[2..].iter().zip(["c2", "c3"]) {
        let Write::CreateSandbox(s) = &seq[0] else {
            panic!("{seq:?}")
        };
        assert_eq!(s.name_any(), name);
        assert_eq!(s.owner_references()[0].uid, format!("uid-claim-{name}"));
        assert_eq!(s.labels()[CLAIM_LABEL], name);
        assert!(!s.labels().contains_key(POOL_LABEL));
        assert_eq!(claim_status(seq).unwrap().phase, Some(Phase::Pending));
    }
}

#[test]
fn members_of_other_templates_stale_or_unready_are_not_adopted() {
    let t = template("py", "python");
    let other = template("js", "node");
    let old = template("py", "python:old");
    let p = pool("warm", "py", 1);
    let q = pool("other", "js", 1);
    let members = [
        member_of(&q, &other, "other-a", Phase::Running, 1),
        member_of(&p, &old, "warm-stale", Phase::Running, 1),
        member_of(&p, &t, "warm-booting", Phase::Scheduled, 1),
    ];
    let seqs = plan_claims(
        &[claim("c", "py", 0)],
        &[t, other],
        &[p, q],
        &members,
        now(),
    );
    assert_eq!(adopted(&seqs[0]), None);
    assert!(matches!(seqs[0][0], Write::CreateSandbox(_)));
}

#[test]
fn a_new_claim_gets_its_finalizer_before_its_sandbox() {
    let t = template("py", "python");
    let mut c = claim("c", "py", 0);
    c.metadata.finalizers = Some(vec!["other/keep".into()]);
    let seqs = plan_claims(&[c], &[t], &[], &[], now());
    let Write::ClaimFinalizers { finalizers, .. } = &seqs[0][0] else {
        panic!("{seqs:?}")
    };
    assert_eq!(finalizers, &["other/keep", CLAIM_FINALIZER]);
    assert!(matches!(seqs[0][1], Write::CreateSandbox(_)));
}

#[test]
fn a_bound_claim_mirrors_its_sandbox_and_then_writes_nothing() {
    let t = template("py", "python");
    let p = pool("warm", "py", 1);
    let mut c = claim("c", "py", 0);
    let s = owned(member_of(&p, &t, "warm-a", Phase::Scheduled, 1), &c);
    let seqs = plan_claims(
        std::slice::from_ref(&c),
        std::slice::from_ref(&t),
        std::slice::from_ref(&p),
        std::slice::from_ref(&s),
        now(),
    );
    let st = claim_status(&seqs[0]).unwrap().clone();
    assert_eq!(st.sandbox.as_ref().unwrap().name, "warm-a");
    assert_eq!(st.phase, Some(Phase::Scheduled));
    assert_eq!(st.conditions[0].status, "False");
    c.status = Some(st);
    assert!(plan_claims(&[c], &[t], &[p], &[s], now()).is_empty());
}

#[test]
fn a_claim_owning_two_sandboxes_keeps_the_one_its_status_names() {
    let t = template("py", "python");
    let p = pool("warm", "py", 1);
    let mut c = claim("c", "py", 0);
    c.status = Some(SandboxClaimStatus {
        sandbox: Some(ClaimedSandbox {
            name: "warm-b".into(),
        }),
        ..Default::default()
    });
    let a = owned(member_of(&p, &t, "warm-a", Phase::Running, 1), &c);
    let b = owned(member_of(&p, &t, "warm-b", Phase::Running, 2), &c);
    let seqs = plan_claims(&[c], &[t], &[p], &[a, b], now());
    let Write::DeleteSandbox { sandbox, .. } = &seqs[0][0] else {
        panic!("{seqs:?}")
    };
    assert_eq!(sandbox.name_any(), "warm-a");
}

#[test]
fn deleting_a_claim_deletes_its_sandbox_then_drops_the_finalizer() {
    let t = template("py", "python");
    let p = pool("warm", "py", 1);
    let mut c = claim("c", "py", 0);
    c.metadata.deletion_timestamp = Some(Time(now()));
    let mut s = owned(member_of(&p, &t, "warm-a", Phase::Running, 1), &c);
    let seqs = plan_claims(
        std::slice::from_ref(&c),
        std::slice::from_ref(&t),
        std::slice::from_ref(&p),
        std::slice::from_ref(&s),
        now(),
    );
    assert!(
        matches!(&seqs[0][..], [Write::DeleteSandbox { sandbox, same_version: false }] if sandbox.name_any() == "warm-a")
    );
    s.metadata.deletion_timestamp = Some(Time(now()));
    let seqs = plan_claims(&[c], &[t], &[p], &[s], now());
    assert!(
        matches!(&seqs[0][..], [Write::ClaimFinalizers { finalizers, .. }] if finalizers.is_empty())
    );
}

#[test]
fn a_claim_whose_sandbox_is_gone_gets_no_second_one() {
    let t = template("py", "python");
    let mut c = claim("c", "py", 0);
    c.status = Some(SandboxClaimStatus {
        sandbox: Some(ClaimedSandbox { name: "c".into() }),
        phase: Some(Phase::Running),
        conditions: vec![],
    });
    let seqs = plan_claims(
        std::slice::from_ref(&c),
        std::slice::from_ref(&t),
        &[],
        &[],
        now(),
    );
    assert_eq!(seqs[0].len(), 1);
    let st = claim_status(&seqs[0]).unwrap();
    assert_eq!(
        st.conditions[0].reason.as_deref(),
        Some(claim_reason::SANDBOX_DELETED)
    );
    // Past its shutdown time with policy Delete (the default), the claim goes too.
    c.spec.lifecycle = Some(ClaimLifecycle {
        shutdown_time: Some(Time(now() - SignedDuration::from_secs(1))),
        shutdown_policy: None,
    });
    let seqs = plan_claims(&[c], &[t], &[], &[], now());
    assert!(matches!(&seqs[0][..], [Write::DeleteClaim(_)]));
}

#[test]
fn a_missing_template_or_a_taken_name_is_reported_not_acted_on() {
    let t = template("py", "python");
    let seqs = plan_claims(
        &[claim("c", "nope", 0)],
        std::slice::from_ref(&t),
        &[],
        &[],
        now(),
    );
    let st = claim_status(&seqs[0]).unwrap();
    assert_eq!(
        st.conditions[0].reason.as_deref(),
        Some(claim_reason::TEMPLATE_NOT_FOUND)
    );
    assert_eq!(seqs[0].len(), 1);

    let p = pool("warm", "py", 1);
    let mut stranger = member_of(&p, &t, "c", Phase::Running, 1);
    stranger.labels_mut().clear();
    stranger.metadata.owner_references = None;
    let seqs = plan_claims(&[claim("c", "py", 0)], &[t], &[], &[stranger], now());
    assert!(seqs[0]
        .iter()
        .all(|w| !matches!(w, Write::CreateSandbox(_) | Write::PatchSandbox { .. })));
    let st = claim_status(&seqs[0]).unwrap();
    assert_eq!(
        st.conditions[0].reason.as_deref(),
        Some(claim_reason::NAME_TAKEN)
    );
}

#[test]
fn a_cache_shows_a_write_only_once_it_holds_the_result() {
    let (t, p) = (template("py", "python"), pool("warm", "py", 1));
    let at = |rv: &str| {
        let mut s = member_of(&p, &t, "warm-1", Phase::Running, 1);
        s.metadata.resource_version = Some(rv.into());
        s
    };
    let created = Wrote {
        namespace: NS.into(),
        name: "warm-1".into(),
        replaced: None,
    };
    assert!(!created.seen_in(None), "a create not yet delivered");
    assert!(created.seen_in(Some(&at("7"))));
    let changed = Wrote {
        replaced: Some("7".into()),
        ..created
    };
    assert!(
        !changed.seen_in(Some(&at("7"))),
        "an adoption or delete not yet delivered"
    );
    assert!(changed.seen_in(Some(&at("9"))), "adopted (or terminating)");
    assert!(changed.seen_in(None), "deleted");

    // A pass that adopted warm-1 (at version 7) and created warm-2: the next pass may plan from
    // the cache only once it shows both.
    let pass = [
        changed,
        Wrote {
            namespace: NS.into(),
            name: "warm-2".into(),
            replaced: None,
        },
    ];
    let cache = |m1: &'static str, m2: bool| {
        let (m1, m2) = (at(m1), m2.then(|| at("8")));
        move |_: &str, name: &str| match name {
            "warm-1" => Some(Box::new(m1.clone())),
            "warm-2" => m2.clone().map(Box::new),
            _ => None,
        }
    };
    assert!(!shows_all(&pass, cache("7", false)), "neither delivered");
    assert!(!shows_all(&pass, cache("9", false)), "the create lags");
    assert!(!shows_all(&pass, cache("7", true)), "the adoption lags");
    assert!(shows_all(&pass, cache("9", true)));
    assert!(shows_all(&[], cache("7", false)), "nothing written");
}
