//! The I/O of warm pools and claims: one pass takes the Sandboxes (listed, or the operator's watch
//! cache), then lists pools, claims and templates (that order: see
//! [`super::super::pools::plan_pools`]), plans each namespace with the pure planners and executes the
//! writes. Writes run with bounded concurrency; one claim's writes run in order and stop
//! at the first failure. A conflict or a vanished object means the snapshot is stale for that object:
//! the write is skipped and the next pass looks again.

use std::collections::BTreeMap;

use futures::StreamExt;
use k8s_openapi::jiff::Timestamp;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams, Preconditions};
use kube::{Api, Client, Resource, ResourceExt};
use serde::de::DeserializeOwned;

use super::plan_claims;
use crate::controller::pools::{plan_pools, Write};
use crate::crd::{Sandbox, SandboxClaim, SandboxTemplate, SandboxWarmPool};
use crate::error::{is_conflict, is_not_found, Context, K8sError};

/// Writes in flight at once.
const CONCURRENCY: usize = 16;

/// Everything of one namespace the planners look at.
#[derive(Default)]
struct Snapshot {
    sandboxes: Vec<Sandbox>,
    pools: Vec<SandboxWarmPool>,
    claims: Vec<SandboxClaim>,
    templates: Vec<SandboxTemplate>,
}

/// One pass over warm pools and claims in namespace `ns` (None: all namespaces): fills and trims
/// pools, rolls members of changed templates, hands claims their Sandboxes, deletes the Sandboxes of
/// deleted claims, and updates both kinds' status. Idempotent (a pass over an unchanged cluster writes
/// nothing); only the elected leader should call it, at every operator pass. Returns the number of
/// writes attempted. Needs RBAC: list/create/patch/delete Sandboxes; list SandboxTemplates; list
/// SandboxWarmPools and patch their status; list/patch/delete SandboxClaims and patch their status
/// (statuses by server-side apply, field manager [`FIELD_MANAGER`]).
pub async fn reconcile_pools_and_claims(
    client: &Client,
    ns: Option<&str>,
) -> Result<usize, K8sError> {
    Ok(reconcile_with(client, ns, None).await?.writes)
}

/// What one pass did.
#[derive(Debug, Default)]
pub struct PassOutcome {
    /// Writes attempted.
    pub writes: usize,
    /// The Sandboxes it created, adopted or deleted: a cache the next pass plans from must show
    /// every one of these writes, or a pool it filled would look short and be filled again, or a
    /// claim that adopted a member would look unserved and adopt a second.
    pub sandboxes: Vec<Wrote>,
}

/// A Sandbox a pass wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Wrote {
    pub namespace: String,
    pub name: String,
    /// The resourceVersion the write replaced; None: the Sandbox was created.
    pub replaced: Option<String>,
}

impl Wrote {
    /// Whether `stored`, a cache's Sandbox of this namespace and name (None: it has none), shows
    /// this write: a created one is there; an adopted or deleted one is gone or no longer at the
    /// resourceVersion the write replaced (events arrive in order, so any other version is later).
    pub fn seen_in(&self, stored: Option<&Sandbox>) -> bool {
        match (&self.replaced, stored) {
            (None, stored) => stored.is_some(),
            (Some(rv), Some(s)) => s.metadata.resource_version.as_ref() != Some(rv),
            (Some(_), None) => true,
        }
    }
}

/// Whether a cache, whose Sandbox of a namespace and name `stored` looks up, shows every write in
/// `wrote` (see [`Wrote::seen_in`]): only then may the next pass plan from it.
pub fn shows_all<S>(wrote: &[Wrote], stored: impl Fn(&str, &str) -> Option<S>) -> bool
where
    S: std::ops::Deref<Target = Sandbox>,
{
    wrote
        .iter()
        .all(|w| w.seen_in(stored(&w.namespace, &w.name).as_deref()))
}

/// [`reconcile_pools_and_claims`] from `sandboxes` when given (taken now, before the other lists:
/// the operator's watch cache, which must show every write of the previous pass, see
/// [`PassOutcome::sandboxes`]; other lag only delays a write by a pass, as every patch and delete
/// is guarded by the uid and resourceVersion seen), or from a list of them.
pub async fn reconcile_with(
    client: &Client,
    ns: Option<&str>,
    sandboxes: Option<Vec<Sandbox>>,
) -> Result<PassOutcome, K8sError> {
    let lp = ListParams::default();
    // Sandboxes strictly first: a member or claimed Sandbox in this list was created after its pool or
    // claim, which the later lists therefore hold unless it was deleted.
    let sandboxes = match sandboxes {
        Some(s) => s,
        None => list::<Sandbox>(client, ns, &lp, "Sandboxes").await?,
    };
    let (pools, claims, templates) = tokio::try_join!(
        list::<SandboxWarmPool>(client, ns, &lp, "SandboxWarmPools"),
        list::<SandboxClaim>(client, ns, &lp, "SandboxClaims"),
        list::<SandboxTemplate>(client, ns, &lp, "SandboxTemplates"),
    )?;
    let mut by_ns: BTreeMap<String, Snapshot> = BTreeMap::new();
    fn slot(by_ns: &mut BTreeMap<String, Snapshot>, ns: Option<String>) -> &mut Snapshot {
        by_ns.entry(ns.unwrap_or_default()).or_default()
    }
    for s in sandboxes {
        slot(&mut by_ns, s.namespace()).sandboxes.push(s);
    }
    for p in pools {
        slot(&mut by_ns, p.namespace()).pools.push(p);
    }
    for c in claims {
        slot(&mut by_ns, c.namespace()).claims.push(c);
    }
    for t in templates {
        slot(&mut by_ns, t.namespace()).templates.push(t);
    }
    let now = Timestamp::now();
    let mut sequences: Vec<Vec<Write>> = Vec::new();
    for snap in by_ns.values() {
        if snap.pools.is_empty() && snap.claims.is_empty() && !has_pool_members(&snap.sandboxes) {
            continue;
        }
        sequences.extend(
            plan_pools(&snap.pools, &snap.templates, &snap.sandboxes)
                .into_iter()
                .map(|w| vec![w]),
        );
        sequences.extend(plan_claims(
            &snap.claims,
            &snap.templates,
            &snap.pools,
            &snap.sandboxes,
            now,
        ));
    }
    let writes = sequences.iter().map(Vec::len).sum();
    let wrote = std::sync::Mutex::new(Vec::new());
    futures::stream::iter(sequences)
        .for_each_concurrent(CONCURRENCY, |seq| {
            let wrote = &wrote;
            async move {
                for w in seq {
                    match execute(client, &w).await {
                        Ok(Done::Written(None)) => {}
                        Ok(Done::Written(Some(sandbox))) => wrote
                            .lock()
                            .unwrap_or_else(|e| e.into_inner())
                            .push(sandbox),
                        Ok(Done::Skipped) => break,
                        Err(e) => {
                            tracing::warn!("{e}");
                            break;
                        }
                    }
                }
            }
        })
        .await;
    Ok(PassOutcome {
        writes,
        sandboxes: wrote.into_inner().unwrap_or_else(|e| e.into_inner()),
    })
}

/// Whether any SandboxWarmPool or SandboxClaim exists in `ns` (None: anywhere): two lists of at
/// most one object each. The operator asks this before [`reconcile_pools_and_claims`], whose list of
/// every Sandbox is the largest read it makes, and skips that pass when the answer is no and its own
/// Sandbox cache holds no pool member (a member of a deleted pool still needs deleting). Skipping is
/// always safe: a pool or claim made meanwhile is seen by the next pass.
pub async fn any_pools_or_claims(client: &Client, ns: Option<&str>) -> Result<bool, K8sError> {
    let one = ListParams::default().limit(1);
    let (pools, claims) = tokio::try_join!(
        list::<SandboxWarmPool>(client, ns, &one, "SandboxWarmPools"),
        list::<SandboxClaim>(client, ns, &one, "SandboxClaims"),
    )?;
    Ok(!pools.is_empty() || !claims.is_empty())
}

fn has_pool_members(sandboxes: &[Sandbox]) -> bool {
    sandboxes
        .iter()
        .any(|s| crate::controller::pools::pool_of(s).is_some())
}

async fn list<K>(
    client: &Client,
    ns: Option<&str>,
    lp: &ListParams,
    what: &str,
) -> Result<Vec<K>, K8sError>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let api: Api<K> = match ns {
        Some(ns) => Api::namespaced(client.clone(), ns),
        None => Api::all(client.clone()),
    };
    Ok(api.list(lp).await.ctx(|| format!("listing {what}"))?.items)
}

/// The field manager of the operator's server-side applies.
pub const FIELD_MANAGER: &str = "hearth-operator";

/// Writes the status of a pool or claim by server-side apply (as kube-rs recommends for what a
/// controller owns outright): the operator declares the fields it manages as `hearth-operator`,
/// and a field it no longer sets (null here) is removed rather than left stale. Forced: the status
/// is the operator's alone.
async fn apply_status<K>(
    client: &Client,
    obj: &K,
    status: serde_json::Value,
) -> Result<(), kube::Error>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug,
{
    let status: serde_json::Map<String, serde_json::Value> = match status {
        serde_json::Value::Object(fields) => {
            fields.into_iter().filter(|(_, v)| !v.is_null()).collect()
        }
        _ => Default::default(),
    };
    let applied = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": obj.name_any() },
        "status": status,
    });
    api_for(client, obj)
        .patch_status(
            &obj.name_any(),
            &PatchParams::apply(FIELD_MANAGER).force(),
            &Patch::Apply(applied),
        )
        .await
        .map(|_| ())
}

fn api_for<K>(client: &Client, obj: &K) -> Api<K>
where
    K: Resource<DynamicType = (), Scope = kube::core::NamespaceResourceScope>,
{
    Api::namespaced(client.clone(), &obj.namespace().unwrap_or_default())
}

/// How a write ended when it did not fail.
enum Done {
    /// Written; the Sandbox it was of, if it was one.
    Written(Option<Wrote>),
    /// Skipped because the object changed or vanished.
    Skipped,
}

/// Creates a Sandbox; one that exists already (a claim's, named like it) or whose namespace is
/// gone is skipped.
async fn create(client: &Client, s: &Sandbox) -> Result<Done, K8sError> {
    match api_for(client, s).create(&PostParams::default(), s).await {
        Ok(made) => Ok(Done::Written(Some(Wrote {
            namespace: made.namespace().unwrap_or_default(),
            name: made.name_any(),
            replaced: None,
        }))),
        Err(e) if is_conflict(&e) || is_not_found(&e) => {
            tracing::debug!("creating Sandbox {}: skipped: {e}", s.name_any());
            Ok(Done::Skipped)
        }
        Err(e) => Err(e).ctx(|| format!("creating Sandbox {}", s.name_any())),
    }
}

/// Executes one write.
async fn execute(client: &Client, w: &Write) -> Result<Done, K8sError> {
    let pp = PatchParams::default();
    let (what, result) = match w {
        Write::CreateSandbox(s) => return create(client, s).await,
        Write::DeleteSandbox {
            sandbox,
            same_version,
        } => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: sandbox.uid(),
                    resource_version: same_version.then(|| sandbox.resource_version()).flatten(),
                }),
                ..Default::default()
            };
            (
                format!("deleting Sandbox {}", sandbox.name_any()),
                api_for(client, sandbox.as_ref())
                    .delete(&sandbox.name_any(), &dp)
                    .await
                    .map(|_| ()),
            )
        }
        Write::PatchSandbox { sandbox, patch } => (
            format!("adopting Sandbox {}", sandbox.name_any()),
            api_for(client, sandbox.as_ref())
                .patch(&sandbox.name_any(), &pp, &Patch::Merge(patch))
                .await
                .map(|_| ()),
        ),
        Write::PoolStatus { pool, status } => (
            format!("writing status of SandboxWarmPool {}", pool.name_any()),
            apply_status(
                client,
                pool.as_ref(),
                serde_json::json!({
                    "replicas": status.replicas,
                    "readyReplicas": status.ready_replicas,
                    "selector": status.selector,
                    "message": status.message,
                }),
            )
            .await,
        ),
        Write::ClaimStatus { claim, status } => (
            format!("writing status of SandboxClaim {}", claim.name_any()),
            apply_status(
                client,
                claim.as_ref(),
                serde_json::json!({
                    "sandbox": status.sandbox,
                    "phase": status.phase,
                    "conditions": status.conditions,
                }),
            )
            .await,
        ),
        Write::ClaimFinalizers { claim, finalizers } => (
            format!("setting finalizers of SandboxClaim {}", claim.name_any()),
            api_for(client, claim.as_ref())
                .patch(
                    &claim.name_any(),
                    &pp,
                    &Patch::Merge(serde_json::json!({ "metadata": {
                        "finalizers": finalizers,
                        "resourceVersion": claim.resource_version(),
                    }})),
                )
                .await
                .map(|_| ()),
        ),
        Write::DeleteClaim(claim) => {
            let dp = DeleteParams {
                preconditions: Some(Preconditions {
                    uid: claim.uid(),
                    resource_version: None,
                }),
                ..Default::default()
            };
            (
                format!("deleting SandboxClaim {}", claim.name_any()),
                api_for(client, claim.as_ref())
                    .delete(&claim.name_any(), &dp)
                    .await
                    .map(|_| ()),
            )
        }
    };
    let sandbox = match w {
        Write::DeleteSandbox { sandbox, .. } | Write::PatchSandbox { sandbox, .. } => Some(Wrote {
            namespace: sandbox.namespace().unwrap_or_default(),
            name: sandbox.name_any(),
            replaced: sandbox.resource_version(),
        }),
        _ => None,
    };
    match result {
        Ok(()) => Ok(Done::Written(sandbox)),
        Err(e) if is_conflict(&e) || is_not_found(&e) => {
            tracing::debug!("{what}: skipped, the object changed meanwhile");
            Ok(Done::Skipped)
        }
        Err(e) => Err(e).ctx(|| what),
    }
}
