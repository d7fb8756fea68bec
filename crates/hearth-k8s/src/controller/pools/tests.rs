//! Unit tests of the pure pool planner (and helpers shared with the claim planner's tests).

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::ResourceExt;

use super::*;
use crate::crd::{SandboxStatus, SandboxTemplateRef, SandboxTemplateSpec, SandboxWarmPoolSpec};

pub(crate) const NS: &str = "ns";

pub(crate) fn template(name: &str, image: &str) -> SandboxTemplate {
    let mut t = SandboxTemplate::new(
        name,
        serde_yaml::from_str::<SandboxTemplateSpec>(&format!("image: {image}\n")).unwrap(),
    );
    t.metadata.namespace = Some(NS.into());
    t.metadata.uid = Some(format!("uid-template-{name}"));
    t
}

pub(crate) fn pool(name: &str, template: &str, replicas: i32) -> SandboxWarmPool {
    let mut p = SandboxWarmPool::new(
        name,
        SandboxWarmPoolSpec {
            replicas,
            sandbox_template_ref: SandboxTemplateRef {
                name: template.into(),
            },
        },
    );
    p.metadata.namespace = Some(NS.into());
    p.metadata.uid = Some(format!("uid-pool-{name}"));
    p
}

/// A member of `pool` made from `t`, as the API server would return it, in `phase`, created at
/// second `age` (smaller: older).
pub(crate) fn member_of(
    pool: &SandboxWarmPool,
    t: &SandboxTemplate,
    name: &str,
    phase: Phase,
    age: i64,
) -> Sandbox {
    let mut s = super::member(pool, t);
    s.metadata.name = Some(name.into());
    s.metadata.uid = Some(format!("uid-{name}"));
    s.metadata.resource_version = Some("7".into());
    s.metadata.creation_timestamp =
        Some(Time(Timestamp::from_second(1_700_000_000 + age).unwrap()));
    s.status = Some(SandboxStatus {
        phase: Some(phase),
        ..Default::default()
    });
    s
}

fn creates(w: &[Write]) -> usize {
    w.iter()
        .filter(|w| matches!(w, Write::CreateSandbox(_)))
        .count()
}

fn deleted(w: &[Write]) -> Vec<String> {
    w.iter()
        .filter_map(|w| match w {
            Write::DeleteSandbox { sandbox, .. } => Some(sandbox.name_any()),
            _ => None,
        })
        .collect()
}

fn status(w: &[Write]) -> Option<&SandboxWarmPoolStatus> {
    w.iter().find_map(|w| match w {
        Write::PoolStatus { status, .. } => Some(status),
        _ => None,
    })
}

#[test]
fn an_empty_pool_creates_replicas_members_labelled_and_owned() {
    let t = template("py", "python");
    let p = pool("warm", "py", 3);
    let w = plan_pools(std::slice::from_ref(&p), std::slice::from_ref(&t), &[]);
    assert_eq!(creates(&w), 3);
    let Write::CreateSandbox(s) = &w[0] else {
        panic!("{w:?}")
    };
    assert_eq!(s.metadata.generate_name.as_deref(), Some("warm-"));
    assert_eq!(s.namespace().as_deref(), Some(NS));
    assert_eq!(s.labels()[POOL_LABEL], "warm");
    assert_eq!(s.labels()[TEMPLATE_LABEL], "py");
    assert_eq!(s.labels()[TEMPLATE_HASH_LABEL], t.spec.hash());
    assert!(s.spec.is_service() && s.spec.image == "python");
    let owner = &s.owner_references()[0];
    assert_eq!(
        (owner.kind.as_str(), owner.uid.as_str()),
        ("SandboxWarmPool", "uid-pool-warm")
    );
    assert_eq!(owner.controller, Some(true));
    assert_eq!(
        status(&w),
        Some(&SandboxWarmPoolStatus {
            replicas: 0,
            ready_replicas: 0,
            selector: Some("hearth.dev/pool=warm".into()),
            message: None,
        })
    );
}

#[test]
fn a_full_pool_with_unchanged_status_writes_nothing() {
    let t = template("py", "python");
    let mut p = pool("warm", "py", 2);
    let members = [
        member_of(&p, &t, "warm-a", Phase::Running, 1),
        member_of(&p, &t, "warm-b", Phase::Scheduled, 2),
    ];
    let w = plan_pools(std::slice::from_ref(&p), std::slice::from_ref(&t), &members);
    let st = status(&w).cloned().unwrap();
    assert_eq!((st.replicas, st.ready_replicas), (2, 1));
    assert_eq!(w.len(), 1, "only the status: {w:?}");
    p.status = Some(st);
    assert!(plan_pools(&[p], &[t], &members).is_empty());
}

#[test]
fn scaling_down_deletes_not_ready_members_first_then_the_newest() {
    let t = template("py", "python");
    let p = pool("warm", "py", 1);
    let members = [
        member_of(&p, &t, "warm-new", Phase::Running, 3),
        member_of(&p, &t, "warm-old", Phase::Running, 1),
        member_of(&p, &t, "warm-booting", Phase::Pending, 0),
    ];
    let w = plan_pools(&[p], &[t], &members);
    let mut gone = deleted(&w);
    gone.sort();
    assert_eq!(gone, ["warm-booting", "warm-new"]);
    assert_eq!(creates(&w), 0);
    // Scale-down deletes are guarded by the resourceVersion: a member adopted meanwhile survives.
    assert!(w.iter().all(|w| !matches!(
        w,
        Write::DeleteSandbox {
            same_version: false,
            ..
        }
    )));
}

#[test]
fn finished_and_stale_members_are_replaced() {
    let old = template("py", "python:3.11");
    let new = template("py", "python:3.12");
    let p = pool("warm", "py", 3);
    let members = [
        member_of(&p, &new, "warm-ok", Phase::Running, 1),
        member_of(&p, &new, "warm-lost", Phase::Failed, 2),
        member_of(&p, &old, "warm-stale", Phase::Running, 0),
    ];
    let w = plan_pools(&[p], &[new], &members);
    let mut gone = deleted(&w);
    gone.sort();
    assert_eq!(gone, ["warm-lost", "warm-stale"]);
    assert_eq!(creates(&w), 2);
    assert_eq!(status(&w).unwrap().replicas, 1);
}

#[test]
fn deleting_members_do_not_count_and_claimed_ones_are_not_members() {
    let t = template("py", "python");
    let p = pool("warm", "py", 2);
    let mut going = member_of(&p, &t, "warm-going", Phase::Running, 1);
    going.metadata.deletion_timestamp = going.metadata.creation_timestamp.clone();
    let mut claimed = member_of(&p, &t, "warm-claimed", Phase::Running, 1);
    claimed.labels_mut().remove(POOL_LABEL);
    let w = plan_pools(&[p], &[t], &[going, claimed]);
    assert_eq!(creates(&w), 2);
    assert!(deleted(&w).is_empty());
}

#[test]
fn a_pool_without_its_template_keeps_its_members_and_says_why() {
    let t = template("py", "python");
    let p = pool("warm", "gone", 2);
    let members = [member_of(&p, &t, "warm-a", Phase::Running, 1)];
    let w = plan_pools(&[p], &[t], &members);
    assert_eq!((creates(&w), deleted(&w).len()), (0, 0));
    assert!(status(&w)
        .unwrap()
        .message
        .as_deref()
        .unwrap()
        .contains("\"gone\""));
}

#[test]
fn members_of_a_deleted_pool_are_deleted() {
    let t = template("py", "python");
    let p = pool("warm", "py", 1);
    let orphan = member_of(&p, &t, "warm-a", Phase::Running, 1);
    let w = plan_pools(&[], &[t], &[orphan]);
    assert_eq!(deleted(&w), ["warm-a"]);
}

#[test]
fn a_huge_scale_up_is_created_in_bounded_bursts() {
    let t = template("py", "python");
    let w = plan_pools(&[pool("warm", "py", 1000)], &[t], &[]);
    assert_eq!(creates(&w), MAX_CREATES_PER_PASS);
}

#[test]
fn a_pool_name_too_long_for_a_label_creates_nothing() {
    let t = template("py", "python");
    let w = plan_pools(&[pool(&"p".repeat(64), "py", 1)], &[t], &[]);
    assert_eq!(creates(&w), 0);
    assert!(status(&w).unwrap().message.is_some());
}
