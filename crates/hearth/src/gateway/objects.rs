//! The gateway's translation between the HTTP API and the `Sandbox` resource: a `POST
//! /v1/sandboxes` body becomes a Service Sandbox object ([`sandbox_object`]), and an object
//! becomes the API's sandbox shape ([`api_sandbox`]). Pure: no I/O, so every rule is unit-tested.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use hearth_k8s::crd::{
    EnvVar, Lifecycle, LifecycleType, Phase, Sandbox, SandboxNetwork, SandboxResources,
    SandboxSpec, ShutdownPolicy,
};
use hearth_k8s::quantity::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};

use crate::serve::api::{self, CreateSandbox, OnIdle, SandboxState};
use crate::serve::error::ApiError;

/// The annotation holding the API's opaque `labels` (JSON): they are the client's, free-form, and
/// must not mix with the Kubernetes labels the operator and node agents select on.
pub const LABELS_ANNOTATION: &str = "hearth.dev/api-labels";
/// Label marking objects made by the gateway (handy for `kubectl get sbx -l`).
pub const CREATED_BY_LABEL: &str = "hearth.dev/created-by";
/// Largest `labels` the gateway stores, as JSON bytes (an annotation; the API server caps all of an
/// object's annotations at 256 KiB).
pub const MAX_LABELS_BYTES: usize = 16 << 10;
/// Longest `ttl_seconds` (ten years): the shutdown time must stay a valid timestamp.
const MAX_TTL_SECONDS: u64 = 10 * 365 * 24 * 3600;

/// The Service Sandbox object named `name` that `body` asks for, created at `now`. Fields the
/// resource has no place for (`disk`, `user`, and an idle timeout that would stop rather than pause
/// the sandbox) are refused rather than silently dropped; `idle_timeout_seconds` with
/// `on_idle: pause` is `lifecycle.idlePauseSeconds`.
pub fn sandbox_object(
    name: &str,
    body: &CreateSandbox,
    now: SystemTime,
) -> Result<Sandbox, ApiError> {
    if body.image.trim().is_empty() {
        return Err(ApiError::invalid("image is required"));
    }
    let pause = body.on_idle == Some(OnIdle::Pause);
    let idle_pause_seconds = match body.idle_timeout_seconds {
        Some(0) => return Err(ApiError::invalid("idle_timeout_seconds must be at least 1")),
        Some(_) if !pause => {
            return Err(ApiError::invalid(
                "idle_timeout_seconds through hearth gateway needs \"on_idle\": \"pause\" (a \
                 Kubernetes Sandbox pauses when idle, it is not stopped)",
            ))
        }
        None if pause => {
            return Err(ApiError::invalid(
                "on_idle \"pause\" needs an idle timeout (idle_timeout_seconds)",
            ))
        }
        seconds => seconds,
    };
    for (given, field) in [(body.disk.is_some(), "disk"), (body.user.is_some(), "user")] {
        if given {
            return Err(ApiError::invalid(format!(
                "{field} is not supported through hearth gateway (a Kubernetes Sandbox has no such \
                 field); leave it out"
            )));
        }
    }
    let cpu = match body.cpus {
        Some(0) => return Err(ApiError::invalid("cpus must be at least 1")),
        Some(n) => Some(Quantity::new(n.to_string())),
        None => None,
    };
    let memory = match &body.memory {
        Some(m) => {
            let bytes = crate::units::bytes(m)
                .filter(|b| *b >= 1 << 20)
                .ok_or_else(|| {
                    ApiError::invalid(format!("memory {m:?} is not a size of at least 1m"))
                })?;
            Some(Quantity::new(format!("{}Mi", bytes.div_ceil(1 << 20))))
        }
        None => None,
    };
    let resources = (cpu.is_some() || memory.is_some()).then_some(SandboxResources { cpu, memory });
    let shutdown_time = match body.ttl_seconds {
        Some(0) => return Err(ApiError::invalid("ttl_seconds must be at least 1")),
        Some(ttl) if ttl > MAX_TTL_SECONDS => {
            return Err(ApiError::invalid(format!(
                "ttl_seconds {ttl} is more than ten years"
            )))
        }
        Some(ttl) => Some(time(millis(now) + ttl * 1000)?),
        None => None,
    };
    let network = body.network.as_ref().map(crd_network);
    let mut annotations = BTreeMap::new();
    if !body.labels.is_empty() {
        let json = serde_json::to_string(&body.labels).expect("a string map serializes");
        if json.len() > MAX_LABELS_BYTES {
            return Err(ApiError::too_large(format!(
                "labels take {} bytes; at most {MAX_LABELS_BYTES}",
                json.len()
            )));
        }
        annotations.insert(LABELS_ANNOTATION.to_string(), json);
    }
    let spec = SandboxSpec {
        image: body.image.clone(),
        command: Vec::new(),
        args: Vec::new(),
        env: body
            .env
            .iter()
            .map(|(k, v)| EnvVar {
                name: k.clone(),
                value: Some(v.clone()),
            })
            .collect(),
        working_dir: body.workdir.clone(),
        resources,
        timeout_seconds: None,
        ttl_seconds_after_finished: None,
        node_selector: BTreeMap::new(),
        network,
        lifecycle: Some(Lifecycle {
            type_: LifecycleType::Service,
            shutdown_time,
            shutdown_policy: Some(ShutdownPolicy::Delete),
            idle_pause_seconds,
        }),
        paused: false,
    };
    let mut object = Sandbox::new(name, spec);
    object.metadata = ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(BTreeMap::from([(
            CREATED_BY_LABEL.to_string(),
            "hearth-gateway".to_string(),
        )])),
        annotations: (!annotations.is_empty()).then_some(annotations),
        ..ObjectMeta::default()
    };
    Ok(object)
}

/// A fresh sandbox name: `sbx-` and 16 random hex digits (64 bits: collisions are not a concern,
/// and the API server refuses one anyway).
pub fn new_name() -> std::io::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 8];
    std::fs::File::open("/dev/urandom")?.read_exact(&mut bytes)?;
    Ok(format!("sbx-{}", hex::encode(bytes)))
}

/// The API's view of a Sandbox object: `id` is the object's name.
pub fn api_sandbox(object: &Sandbox) -> api::Sandbox {
    let status = object.status.clone().unwrap_or_default();
    let running = status.sandbox_id.is_some();
    let state = match object.phase() {
        Phase::Pending | Phase::Scheduled => SandboxState::Creating,
        Phase::Running if running => SandboxState::Running,
        Phase::Running => SandboxState::Creating,
        Phase::Paused => SandboxState::Paused,
        Phase::Succeeded => SandboxState::Stopped,
        Phase::Failed => SandboxState::Failed,
    };
    let reason = match (&status.reason, &status.message) {
        (Some(r), Some(m)) => Some(format!("{r}: {m}")),
        (Some(r), None) => Some(r.clone()),
        (None, Some(m)) => Some(m.clone()),
        (None, None) => None,
    };
    let demand = object.spec.demand().unwrap_or_default();
    let labels = object
        .metadata
        .annotations
        .as_ref()
        .and_then(|a| a.get(LABELS_ANNOTATION))
        .and_then(|json| serde_json::from_str(json).ok())
        .unwrap_or_default();
    let ms = |t: &Time| u64::try_from(t.0.as_millisecond()).unwrap_or(0);
    let created_at = object
        .metadata
        .creation_timestamp
        .as_ref()
        .map(ms)
        .unwrap_or(0);
    let ready_at = status.start_time.as_ref().map(ms);
    api::Sandbox {
        id: object.metadata.name.clone().unwrap_or_default(),
        image: object.spec.image.clone(),
        image_digest: None,
        state,
        reason,
        cpus: demand.vcpus,
        memory_mib: u32::try_from(demand.memory_mib).unwrap_or(u32::MAX),
        disk_bytes: 0,
        labels,
        created_at,
        ready_at,
        finished_at: status.completion_time.as_ref().map(ms),
        expires_at: object
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.shutdown_time.as_ref())
            .map(ms),
        last_active_at: ready_at.unwrap_or(created_at),
        boot_ms: ready_at.map(|r| r.saturating_sub(created_at)),
        network: object.spec.network_policy().ok().flatten(),
        warm: false,
        on_idle: match object
            .spec
            .lifecycle
            .as_ref()
            .and_then(|l| l.idle_pause_seconds)
        {
            Some(_) => OnIdle::Pause,
            None => OnIdle::Stop,
        },
    }
}

fn millis(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).unwrap_or_default().as_millis() as u64
}

fn time(ms: u64) -> Result<Time, ApiError> {
    let ts = k8s_openapi::jiff::Timestamp::from_millisecond(ms as i64)
        .map_err(|e| ApiError::invalid(format!("time out of range: {e}")))?;
    Ok(Time(ts))
}

/// A policy as a Sandbox's `spec.network`.
pub(super) fn crd_network(p: &hearth_net::policy::NetworkPolicy) -> SandboxNetwork {
    SandboxNetwork {
        mode: Some(p.mode),
        allow: p.allow.iter().map(ToString::to_string).collect(),
        deny: p.deny.iter().map(ToString::to_string).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: serde_json::Value) -> CreateSandbox {
        serde_json::from_value(json).unwrap()
    }

    #[test]
    fn a_create_body_becomes_a_service_sandbox() {
        let now = UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        let b = body(serde_json::json!({
            "image": "busybox", "cpus": 2, "memory": "300m", "ttl_seconds": 60,
            "env": {"A": "1"}, "workdir": "/tmp", "labels": {"who": "me"},
            "network": {"mode": "allow", "allow": ["pypi.org"]},
        }));
        let o = sandbox_object("sbx-1", &b, now).unwrap();
        assert!(o.spec.is_service() && o.spec.command.is_empty());
        let d = o.spec.demand().unwrap();
        assert_eq!((d.vcpus, d.memory_mib), (2, 300));
        let lifecycle = o.spec.lifecycle.clone().unwrap();
        assert_eq!(
            lifecycle.shutdown_time.unwrap().0.as_millisecond(),
            1_000_060_000
        );
        assert_eq!(o.spec.env[0].value.as_deref(), Some("1"));
        assert_eq!(
            o.spec.network.as_ref().unwrap().allow,
            vec!["pypi.org".to_string()]
        );
        // Back to the API's shape: the id is the name, labels as given, not running yet.
        let a = api_sandbox(&o);
        assert_eq!(a.id, "sbx-1");
        assert_eq!(a.state, SandboxState::Creating);
        assert_eq!(a.labels.get("who").map(String::as_str), Some("me"));
        assert_eq!(a.expires_at, Some(1_000_060_000));
        assert_eq!((a.cpus, a.memory_mib), (2, 300));
    }

    #[test]
    fn fields_a_sandbox_resource_cannot_hold_are_refused_not_dropped() {
        for (field, value) in [
            ("disk", serde_json::json!("4g")),
            ("idle_timeout_seconds", serde_json::json!(60)),
            ("user", serde_json::json!("nobody")),
        ] {
            let mut json = serde_json::json!({"image": "busybox"});
            json[field] = value;
            let err = sandbox_object("x", &body(json), SystemTime::now()).unwrap_err();
            assert_eq!(err.status, 400);
            assert!(err.message.contains(field), "{}", err.message);
        }
        for bad in [
            serde_json::json!({"image": ""}),
            serde_json::json!({"image": "b", "cpus": 0}),
            serde_json::json!({"image": "b", "memory": "lots"}),
            serde_json::json!({"image": "b", "ttl_seconds": 0}),
            serde_json::json!({"image": "b", "on_idle": "pause"}),
            serde_json::json!({"image": "b", "on_idle": "stop", "idle_timeout_seconds": 60}),
            serde_json::json!({"image": "b", "on_idle": "pause", "idle_timeout_seconds": 0}),
        ] {
            assert!(sandbox_object("x", &body(bad), SystemTime::now()).is_err());
        }
    }

    #[test]
    fn an_idle_pause_becomes_the_lifecycle_field() {
        let json =
            serde_json::json!({"image": "b", "idle_timeout_seconds": 90, "on_idle": "pause"});
        let o = sandbox_object("x", &body(json), SystemTime::now()).unwrap();
        let lifecycle = o.spec.lifecycle.clone().unwrap();
        assert_eq!(lifecycle.idle_pause_seconds, Some(90));
        assert_eq!(lifecycle.type_, LifecycleType::Service);
        assert_eq!(api_sandbox(&o).on_idle, OnIdle::Pause);
    }

    #[test]
    fn phases_map_to_api_states_and_failures_carry_the_reason() {
        let mut o = sandbox_object(
            "s",
            &body(serde_json::json!({"image": "b"})),
            SystemTime::now(),
        )
        .unwrap();
        let mut status = hearth_k8s::crd::SandboxStatus {
            phase: Some(Phase::Running),
            ..Default::default()
        };
        o.status = Some(status.clone());
        assert_eq!(
            api_sandbox(&o).state,
            SandboxState::Creating,
            "no node id yet"
        );
        status.sandbox_id = Some("abc".into());
        o.status = Some(status.clone());
        assert_eq!(api_sandbox(&o).state, SandboxState::Running);
        status.phase = Some(Phase::Failed);
        status.reason = Some("NodeLost".into());
        status.message = Some("node n1 stopped heartbeating".into());
        o.status = Some(status);
        let a = api_sandbox(&o);
        assert_eq!(a.state, SandboxState::Failed);
        assert_eq!(
            a.reason.as_deref(),
            Some("NodeLost: node n1 stopped heartbeating")
        );
    }

    #[test]
    fn names_are_fresh_and_valid_object_names() {
        let (a, b) = (new_name().unwrap(), new_name().unwrap());
        assert_ne!(a, b);
        assert!(crate::serve::auth::is_namespace_name(&a), "{a}");
    }
}
