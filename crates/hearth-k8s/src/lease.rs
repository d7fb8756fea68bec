//! `coordination.k8s.io/v1` Leases: node heartbeats and the operator's leader election, written with
//! plain get / create / replace-with-resourceVersion (kube-runtime has no leader-election helper), so
//! two writers racing on one Lease cannot both win. Freshness compares the holder's `renewTime` with the
//! reader's clock: nodes and operator need synchronised clocks (NTP), as Kubernetes itself assumes.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::{SignedDuration, Timestamp};
use kube::api::{ObjectMeta, PostParams};
use kube::Api;

use crate::error::{is_conflict, is_not_found, Context, K8sError};

/// Name of node `node`'s heartbeat Lease.
pub fn node_lease_name(node: &str) -> String {
    format!("hearth-node-{node}")
}

/// Whether `lease` was renewed within its own duration as of `now`.
pub fn is_fresh(lease: &Lease, now: Timestamp) -> bool {
    let Some(spec) = &lease.spec else {
        return false;
    };
    let (Some(renew), Some(secs)) = (&spec.renew_time, spec.lease_duration_seconds) else {
        return false;
    };
    renew.0 + SignedDuration::from_secs(i64::from(secs)) > now
}

fn seconds(d: Duration) -> i32 {
    i32::try_from(d.as_secs().max(1)).unwrap_or(i32::MAX)
}

/// Renews (creating if absent) the Lease `name`, held by `holder`, valid for `duration`.
pub async fn heartbeat(
    api: &Api<Lease>,
    name: &str,
    holder: &str,
    duration: Duration,
) -> Result<(), K8sError> {
    let now = MicroTime(Timestamp::now());
    match api
        .get_opt(name)
        .await
        .ctx(|| format!("reading Lease {name}"))?
    {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.into()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(holder.into()),
                    lease_duration_seconds: Some(seconds(duration)),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Err(e) if is_conflict(&e) => Ok(()), // created concurrently; the next beat renews it
                r => r.map(|_| ()).ctx(|| format!("creating Lease {name}")),
            }
        }
        Some(mut lease) => {
            let spec = lease.spec.get_or_insert_with(Default::default);
            spec.holder_identity = Some(holder.into());
            spec.lease_duration_seconds = Some(seconds(duration));
            spec.renew_time = Some(now);
            match api.replace(name, &PostParams::default(), &lease).await {
                Err(e) if is_conflict(&e) => Ok(()),
                r => r.map(|_| ()).ctx(|| format!("renewing Lease {name}")),
            }
        }
    }
}

/// One candidate in a leader election over one Lease.
#[derive(Clone)]
pub struct LeaderElection {
    pub api: Api<Lease>,
    pub lease_name: String,
    pub identity: String,
    pub duration: Duration,
}

impl LeaderElection {
    /// One attempt to take or keep leadership. `Ok(true)`: we hold the Lease for `duration` from now.
    /// Idempotent; a lost race (409) is `Ok(false)`.
    pub async fn try_acquire_or_renew(&self) -> Result<bool, K8sError> {
        let name = &self.lease_name;
        let now = Timestamp::now();
        let current = self
            .api
            .get_opt(name)
            .await
            .ctx(|| format!("reading leader Lease {name}"))?;
        let Some(mut lease) = current else {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(name.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(self.identity.clone()),
                    lease_duration_seconds: Some(seconds(self.duration)),
                    acquire_time: Some(MicroTime(now)),
                    renew_time: Some(MicroTime(now)),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            return match self.api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(e) if is_conflict(&e) => Ok(false),
                Err(e) => Err(e).ctx(|| format!("creating leader Lease {name}")),
            };
        };
        let ours = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            == Some(self.identity.as_str());
        let vacant = lease
            .spec
            .as_ref()
            .and_then(|s| s.holder_identity.as_deref())
            .is_none_or(str::is_empty);
        if !ours && !vacant && is_fresh(&lease, now) {
            return Ok(false);
        }
        let spec = lease.spec.get_or_insert_with(Default::default);
        if !ours {
            spec.holder_identity = Some(self.identity.clone());
            spec.acquire_time = Some(MicroTime(now));
            spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
        }
        spec.lease_duration_seconds = Some(seconds(self.duration));
        spec.renew_time = Some(MicroTime(now));
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Ok(_) => Ok(true),
            Err(e) if is_conflict(&e) => Ok(false),
            Err(e) => Err(e).ctx(|| format!("renewing leader Lease {name}")),
        }
    }

    /// Gives leadership up at once (graceful shutdown) so a standby need not wait for expiry.
    pub async fn release(&self) -> Result<(), K8sError> {
        let name = &self.lease_name;
        let Some(mut lease) = (match self.api.get_opt(name).await {
            Err(e) if is_not_found(&e) => None,
            r => r.ctx(|| format!("reading leader Lease {name}"))?,
        }) else {
            return Ok(());
        };
        let spec = lease.spec.get_or_insert_with(Default::default);
        if spec.holder_identity.as_deref() != Some(self.identity.as_str()) {
            return Ok(());
        }
        spec.holder_identity = None;
        match self.api.replace(name, &PostParams::default(), &lease).await {
            Err(e) if is_conflict(&e) => Ok(()),
            r => r
                .map(|_| ())
                .ctx(|| format!("releasing leader Lease {name}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(renewed_secs_ago: i64, duration: i32) -> Lease {
        let renew = Timestamp::from_second(1_000_000 - renewed_secs_ago).unwrap();
        Lease {
            metadata: Default::default(),
            spec: Some(LeaseSpec {
                renew_time: Some(MicroTime(renew)),
                lease_duration_seconds: Some(duration),
                ..Default::default()
            }),
        }
    }

    #[test]
    fn freshness_follows_renew_time_plus_duration() {
        let now = Timestamp::from_second(1_000_000).unwrap();
        assert!(is_fresh(&lease(3, 10), now));
        assert!(!is_fresh(&lease(10, 10), now));
        assert!(!is_fresh(&lease(11, 10), now));
        assert!(!is_fresh(&Lease::default(), now));
    }
}
