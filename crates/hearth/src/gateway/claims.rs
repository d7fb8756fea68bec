//! `POST /v1/sandboxes` with `"template": NAME`: the gateway makes a `SandboxClaim` of that
//! `SandboxTemplate` in the caller's namespace (served from a warm pool when one is ready), waits
//! for the claim to name its Sandbox and answers with that Sandbox, whose name is the id every
//! other route takes. Deleting such a sandbox deletes its claim, whose finalizer removes the
//! Sandbox. Only `ttl_seconds` and `wait` may go with a template: the template sets the rest.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::http::StatusCode;
use hearth_k8s::crd::{
    claim_reason, ClaimLifecycle, SandboxClaim, SandboxClaimSpec, SandboxTemplateRef,
    ShutdownPolicy,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::api::PostParams;
use kube::runtime::wait::await_condition;
use kube::Api;

use crate::serve::error::ApiError;

/// The keys a body with a template may have.
const TEMPLATE_KEYS: [&str; 3] = ["template", "ttl_seconds", "wait"];

/// What a create body with a template asks for.
#[derive(Debug, PartialEq)]
pub struct TemplateCreate {
    pub template: String,
    pub ttl_seconds: Option<u64>,
    pub wait: bool,
}

/// `Some` when `body` names a template; an error when it also names what the template sets.
pub fn template_create(body: &serde_json::Value) -> Result<Option<TemplateCreate>, ApiError> {
    let Some(template) = body.get("template") else {
        return Ok(None);
    };
    let template = template
        .as_str()
        .filter(|t| !t.is_empty() && t.len() <= 253)
        .ok_or_else(|| ApiError::invalid("template must be the name of a SandboxTemplate"))?;
    if let Some(other) = body
        .as_object()
        .into_iter()
        .flat_map(|o| o.keys())
        .find(|k| !TEMPLATE_KEYS.contains(&k.as_str()))
    {
        return Err(ApiError::invalid(format!(
            "{other} cannot go with a template (it sets the image and the rest); only \
             ttl_seconds and wait may"
        )));
    }
    let ttl_seconds = match body.get("ttl_seconds") {
        None | Some(serde_json::Value::Null) => None,
        Some(v) => Some(
            v.as_u64()
                .filter(|t| (1..=10 * 365 * 24 * 3600).contains(t))
                .ok_or_else(|| ApiError::invalid("ttl_seconds must be a positive number"))?,
        ),
    };
    let wait = body.get("wait").and_then(|w| w.as_bool()).unwrap_or(true);
    Ok(Some(TemplateCreate {
        template: template.to_string(),
        ttl_seconds,
        wait,
    }))
}

/// The claim `name` for `create`, made at `now`.
pub fn claim_object(name: &str, create: &TemplateCreate, now: SystemTime) -> SandboxClaim {
    let shutdown_time = create.ttl_seconds.map(|ttl| {
        let ms = now
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_millis() as i64
            + ttl as i64 * 1000;
        Time(k8s_openapi::jiff::Timestamp::from_millisecond(ms).expect("bounded ttl"))
    });
    SandboxClaim::new(
        name,
        SandboxClaimSpec {
            sandbox_template_ref: SandboxTemplateRef {
                name: create.template.clone(),
            },
            lifecycle: Some(ClaimLifecycle {
                shutdown_time,
                shutdown_policy: Some(ShutdownPolicy::Delete),
            }),
        },
    )
}

/// Creates the claim and waits (up to `limit`) until it names its Sandbox; returns that name.
pub async fn claim(
    api: Api<SandboxClaim>,
    name: &str,
    create: &TemplateCreate,
    limit: Duration,
    api_timeout: Duration,
) -> Result<String, ApiError> {
    let object = claim_object(name, create, SystemTime::now());
    let params = PostParams {
        field_manager: Some("hearth-gateway".into()),
        ..PostParams::default()
    };
    match tokio::time::timeout(api_timeout, api.create(&params, &object)).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "kubernetes",
                format!("creating the claim: {e}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "kubernetes",
                "creating the claim: no answer",
            ))
        }
    }
    let no_template = |c: &SandboxClaim| {
        c.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.reason.as_deref() == Some(claim_reason::TEMPLATE_NOT_FOUND))
        })
    };
    let settled = move |c: Option<&SandboxClaim>| {
        c.is_none_or(|c| c.status.as_ref().is_some_and(|s| s.sandbox.is_some()) || no_template(c))
    };
    let done = tokio::time::timeout(limit, await_condition(api.clone(), name, settled)).await;
    let claim = match done {
        Ok(Ok(Some(c))) => c,
        Ok(Ok(None)) => return Err(ApiError::not_found(format!("claim {name} was deleted"))),
        Ok(Err(e)) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "kubernetes",
                format!("watching claim {name}: {e}"),
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("claim {name} got no sandbox within {limit:?}"),
            ))
        }
    };
    if let Some(sandbox) = claim.status.as_ref().and_then(|s| s.sandbox.as_ref()) {
        return Ok(sandbox.name.clone());
    }
    // No such template: the claim is useless; remove it.
    let _ = tokio::time::timeout(api_timeout, api.delete(name, &Default::default())).await;
    Err(ApiError::invalid(format!(
        "no SandboxTemplate {}",
        create.template
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_template_body_takes_only_a_ttl_and_wait() {
        let t = template_create(&serde_json::json!({"template": "py", "ttl_seconds": 60}))
            .unwrap()
            .unwrap();
        assert_eq!(
            t,
            TemplateCreate {
                template: "py".into(),
                ttl_seconds: Some(60),
                wait: true
            }
        );
        assert!(template_create(&serde_json::json!({"image": "b"}))
            .unwrap()
            .is_none());
        for bad in [
            serde_json::json!({"template": "py", "image": "busybox"}),
            serde_json::json!({"template": ""}),
            serde_json::json!({"template": "py", "ttl_seconds": 0}),
        ] {
            assert!(template_create(&bad).is_err(), "{bad}");
        }
        let claim = claim_object("c", &t, UNIX_EPOCH);
        assert_eq!(claim.spec.sandbox_template_ref.name, "py");
        let at = claim.spec.lifecycle.unwrap().shutdown_time.unwrap();
        assert_eq!(at.0.as_millisecond(), 60_000);
    }
}
