//! Kubernetes Events (`events.k8s.io/v1`) for what the operator did to a Sandbox: Scheduled (which
//! node), Unschedulable (why), NodeLost, InvalidSpec and any other status reason it writes, the
//! finalizer released for a lost node, and deletion after the TTL.
//!
//! One Event per successful write, never per pass: the planner only rewrites a status whose message
//! changed (an Unschedulable note is written once until the reason changes), so Events are deduplicated
//! by construction. That is also why this is not kube-runtime's `Recorder`: its own deduplication keys
//! on (object, reason) without the note, so a changed Unschedulable reason would be published as a
//! repeat of the old text, and its cache is scanned on every publish (10,000 Sandboxes: 10^8 steps).
//! Events are best-effort, as in Kubernetes: they queue (bounded) and are published by a background
//! task that takes only spare tokens from the operator's bucket, a few at a time; when the queue is
//! full, new Events are dropped and counted.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use futures::StreamExt;
use k8s_openapi::api::core::v1::ObjectReference;
use k8s_openapi::api::events::v1::Event as K8sEvent;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client, Resource};
use tokio::sync::mpsc;

use super::plan::Action;
use super::ratelimit::TokenBucket;
use super::AbortOnDrop;
use crate::crd::{reason, Phase, Sandbox};

/// Events published at once by the background task.
const IN_FLIGHT: usize = 4;

/// Who reports: `reportingController` and `reportingInstance` of every Event.
#[derive(Clone, Debug)]
pub struct Reporter {
    pub controller: String,
    pub instance: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EventType {
    Normal,
    Warning,
}

/// One Event about one Sandbox.
#[derive(Clone, Debug)]
pub struct Event {
    pub type_: EventType,
    /// PascalCase, e.g. `Scheduled`.
    pub reason: String,
    /// What was done, e.g. `Binding`.
    pub action: String,
    /// For people; cut to 1 KiB.
    pub note: String,
}

/// The sending side; cheap to share.
pub struct EventSink {
    tx: mpsc::Sender<(Event, ObjectReference)>,
    dropped: AtomicU64,
}

impl EventSink {
    /// Starts the publisher (stopped when the returned guard drops). `queue` bounds the Events waiting.
    pub fn start(
        client: Client,
        reporter: Reporter,
        bucket: Arc<TokenBucket>,
        queue: usize,
    ) -> (Self, AbortOnDrop<()>) {
        let (tx, rx) = mpsc::channel(queue.max(1));
        let task = tokio::spawn(publish(client, reporter, bucket, rx));
        (
            Self {
                tx,
                dropped: AtomicU64::new(0),
            },
            AbortOnDrop(task),
        )
    }

    /// Queues the Event for `action`, which has just been written successfully.
    pub fn written(&self, action: &Action) {
        let Some((sandbox, event)) = event_for(action) else {
            return;
        };
        if self.tx.try_send((event, sandbox.object_ref(&()))).is_err() {
            let n = self.dropped.fetch_add(1, Ordering::Relaxed) + 1;
            if n.is_power_of_two() {
                tracing::warn!(dropped = n, "event queue full: Events dropped");
            }
        }
    }

    /// Events dropped so far because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

async fn publish(
    client: Client,
    reporter: Reporter,
    bucket: Arc<TokenBucket>,
    rx: mpsc::Receiver<(Event, ObjectReference)>,
) {
    let events = futures::stream::unfold(rx, |mut rx| async move {
        let item = rx.recv().await?;
        Some((item, rx))
    });
    events
        .for_each_concurrent(IN_FLIGHT, |(event, regarding)| {
            let (client, reporter, bucket) = (&client, &reporter, &bucket);
            async move {
                let ns = regarding
                    .namespace
                    .clone()
                    .unwrap_or_else(|| "default".into());
                let api: Api<K8sEvent> = Api::namespaced(client.clone(), &ns);
                let object = to_k8s(&event, regarding, reporter, Timestamp::now());
                bucket.acquire_spare().await;
                if let Err(e) = api.create(&PostParams::default(), &object).await {
                    tracing::debug!(reason = %event.reason, "event not published: {e}");
                }
            }
        })
        .await;
}

/// The `events.k8s.io/v1` object for `event` about `regarding`, observed at `now`.
pub fn to_k8s(
    event: &Event,
    regarding: ObjectReference,
    reporter: &Reporter,
    now: Timestamp,
) -> K8sEvent {
    let mut note = event.note.clone();
    if note.len() > 1024 {
        let mut cut = 1021;
        while !note.is_char_boundary(cut) {
            cut -= 1;
        }
        note.truncate(cut);
        note.push_str("...");
    }
    K8sEvent {
        metadata: ObjectMeta {
            // Unique like Kubernetes' own: the object's name and the time in nanoseconds.
            name: Some(format!(
                "{}.{:x}",
                regarding.name.as_deref().unwrap_or("sandbox"),
                now.as_nanosecond()
            )),
            namespace: regarding.namespace.clone(),
            ..Default::default()
        },
        event_time: Some(MicroTime(now)),
        type_: Some(format!("{:?}", event.type_)),
        reason: Some(event.reason.clone()),
        action: Some(event.action.clone()),
        note: Some(note),
        regarding: Some(regarding),
        reporting_controller: Some(reporter.controller.clone()),
        reporting_instance: Some(reporter.instance.chars().take(128).collect()),
        ..Default::default()
    }
}

/// The Event describing `action` (after it succeeded), with the Sandbox it regards.
pub fn event_for(action: &Action) -> Option<(&Sandbox, Event)> {
    let event = |type_, reason: &str, action: &str, note: String| Event {
        type_,
        reason: reason.into(),
        action: action.into(),
        note,
    };
    match action {
        Action::Bind { sandbox, node } => Some((
            sandbox,
            event(
                EventType::Normal,
                "Scheduled",
                "Binding",
                format!("placed on node {node}"),
            ),
        )),
        Action::SetStatus { sandbox } => {
            let status = sandbox.status.as_ref()?;
            let why = status.reason.as_deref()?;
            let warning = why == reason::UNSCHEDULABLE || status.phase == Some(Phase::Failed);
            let type_ = if warning {
                EventType::Warning
            } else {
                EventType::Normal
            };
            let note = status.message.clone().unwrap_or_else(|| why.to_string());
            Some((sandbox, event(type_, why, "UpdateStatus", note)))
        }
        Action::RemoveFinalizer { sandbox } => Some((
            sandbox,
            event(
                EventType::Normal,
                "FinalizerReleased",
                "Deleting",
                format!(
                    "no live node will stop a VM for it{}: deletion proceeds",
                    sandbox
                        .node_name()
                        .map(|n| format!(" (node {n} is gone)"))
                        .unwrap_or_default()
                ),
            ),
        )),
        Action::Delete { sandbox } => Some((
            sandbox,
            event(
                EventType::Normal,
                "Deleted",
                "Deleting",
                match sandbox.spec.ttl_seconds_after_finished {
                    _ if sandbox.spec.is_service() => {
                        "deleted at its shutdownTime (shutdownPolicy Delete)".to_string()
                    }
                    Some(ttl) => {
                        format!("deleted {ttl} s after it finished (ttlSecondsAfterFinished)")
                    }
                    None => "deleted by the operator".to_string(),
                },
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::crd::SandboxStatus;

    fn sandbox(status: Option<SandboxStatus>) -> Box<Sandbox> {
        let mut s: Sandbox = serde_json::from_value(serde_json::json!({
            "apiVersion": "hearth.dev/v1alpha1", "kind": "Sandbox",
            "metadata": {"name": "s", "namespace": "ns", "uid": "u1"},
            "spec": {"image": "x", "command": ["true"]}
        }))
        .unwrap();
        s.status = status;
        Box::new(s)
    }

    #[test]
    fn each_write_maps_to_the_event_a_user_would_look_for() {
        let bind = Action::Bind {
            sandbox: sandbox(None),
            node: "n1".into(),
        };
        let (_, e) = event_for(&bind).unwrap();
        assert_eq!(
            (e.reason.as_str(), e.type_),
            ("Scheduled", EventType::Normal)
        );
        assert!(e.note.contains("n1"));

        let unschedulable = Action::SetStatus {
            sandbox: sandbox(Some(SandboxStatus {
                phase: Some(Phase::Pending),
                reason: Some(reason::UNSCHEDULABLE.into()),
                message: Some("no node has 64 vCPUs free".into()),
                ..Default::default()
            })),
        };
        let (s, e) = event_for(&unschedulable).unwrap();
        assert_eq!(
            (e.reason.as_str(), e.type_),
            ("Unschedulable", EventType::Warning)
        );
        assert_eq!(e.note, "no node has 64 vCPUs free");
        let r = s.object_ref(&());
        assert_eq!(
            (r.name.as_deref(), r.namespace.as_deref(), r.uid.as_deref()),
            (Some("s"), Some("ns"), Some("u1"))
        );

        let lost = Action::SetStatus {
            sandbox: sandbox(Some(SandboxStatus {
                phase: Some(Phase::Failed),
                reason: Some(reason::NODE_LOST.into()),
                ..Default::default()
            })),
        };
        let (_, e) = event_for(&lost).unwrap();
        assert_eq!(
            (e.reason.as_str(), e.type_),
            ("NodeLost", EventType::Warning)
        );
    }
}
