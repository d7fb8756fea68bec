//! The operator's writes to Sandboxes: one [`Action`] of a plan executed against the API server, each
//! guarded (status by resourceVersion, finalizer removal by a resourceVersion in the patch, deletion by
//! uid), a conflict or a vanished object being an expected outcome rather than an error.

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};

use super::plan::Action;
use crate::crd::{Sandbox, FINALIZER};
use crate::error::{is_conflict, is_not_found, Context, K8sError};

/// Executes one write. Ok(Some(after)): written, `after` is the object now (None inside: deleted);
/// Ok(None): skipped because the object changed or went meanwhile (the next pass sees why).
pub(super) async fn execute(
    client: &Client,
    action: &Action,
) -> Result<Option<Option<Sandbox>>, K8sError> {
    let sandbox = sandbox_of(action);
    let what = match action {
        Action::Bind { .. } | Action::SetStatus { .. } => "status",
        Action::RemoveFinalizer { .. } => "finalizer",
        Action::Delete { .. } => "delete",
    };
    let ns = sandbox.namespace().unwrap_or_default();
    let name = sandbox.name_any();
    let api: Api<Sandbox> = Api::namespaced(client.clone(), &ns);
    let result = match action {
        Action::Bind { node, .. } => {
            tracing::debug!(%ns, %name, %node, "bind");
            api.replace_status(&name, &PostParams::default(), sandbox)
                .await
                .map(|s| Some(Some(s)))
        }
        Action::SetStatus { .. } => api
            .replace_status(&name, &PostParams::default(), sandbox)
            .await
            .map(|s| Some(Some(s))),
        Action::RemoveFinalizer { .. } => {
            without_finalizer(&api, sandbox).await.map(|s| s.map(Some))
        }
        Action::Delete { .. } => {
            let dp = DeleteParams {
                preconditions: Some(kube::api::Preconditions {
                    uid: sandbox.metadata.uid.clone(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            api.delete(&name, &dp).await.map(|r| Some(r.left()))
        }
    };
    match result {
        Err(e) if is_conflict(&e) || is_not_found(&e) => {
            tracing::debug!(%ns, %name, "{what} write skipped: the object changed meanwhile");
            Ok(None)
        }
        r => r.ctx(|| format!("writing {what} of Sandbox {ns}/{name}")),
    }
}

pub(super) fn sandbox_of(action: &Action) -> &Sandbox {
    match action {
        Action::Bind { sandbox, .. }
        | Action::SetStatus { sandbox }
        | Action::RemoveFinalizer { sandbox }
        | Action::Delete { sandbox } => sandbox,
    }
}

/// Removes `hearth.dev/vm` from `sandbox`: a merge patch of the remaining list guarded by the object's
/// resourceVersion, so a concurrent finalizer change fails (409) instead of being lost. Idempotent: an
/// absent finalizer is success.
pub async fn remove_finalizer(api: &Api<Sandbox>, sandbox: &Sandbox) -> Result<(), kube::Error> {
    without_finalizer(api, sandbox).await.map(|_| ())
}

/// [`remove_finalizer`], returning the object as written (None: there was nothing to remove).
async fn without_finalizer(
    api: &Api<Sandbox>,
    sandbox: &Sandbox,
) -> Result<Option<Sandbox>, kube::Error> {
    if !sandbox.finalizers().iter().any(|f| f == FINALIZER) {
        return Ok(None);
    }
    let rest: Vec<&String> = sandbox
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .collect();
    let patch = serde_json::json!({
        "metadata": { "finalizers": rest, "resourceVersion": sandbox.resource_version() }
    });
    api.patch(
        &sandbox.name_any(),
        &PatchParams::default(),
        &Patch::Merge(patch),
    )
    .await
    .map(Some)
}
