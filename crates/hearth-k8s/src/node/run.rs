//! One Sandbox's run on this node: finalizer on, status Running (before anything boots, so a restart
//! never starts it again), the command through [`Node::run_once`](hearth_sandbox::node::Node::run_once)
//! (boot, command with its timeout, VM stopped) keeping the output tail, the final status, the
//! finalizer off. Each step that writes uses the resourceVersion it read.

use std::time::Duration;

use hearth_sandbox::node::{CreateSpec, ExecSpec, NodeError, OnIdle, RunError, RunSpec};
use hearth_sandbox::ExecOutput;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

use super::agent::NodeAgent;
use super::tail::OutputTail;
use crate::crd::{reason, Phase, Sandbox, FINALIZER, UID_LABEL};
use crate::error::{is_conflict, is_not_found, Context, K8sError};
use crate::status::{self, Outcome};

/// How long a node-side capacity refusal is retried before the sandbox fails.
pub(super) const CAPACITY_WAIT: Duration = Duration::from_secs(60);
/// Label on node-local sandboxes: the Sandbox object's `namespace/name`.
pub(super) const SANDBOX_LABEL: &str = "hearth.dev/sandbox";

/// How a run ended, ready for the status.
struct Ended {
    outcome: Outcome,
    message: Option<String>,
    tail: Option<String>,
}

fn start_failed(message: String) -> Ended {
    Ended {
        outcome: Outcome::Failed {
            reason: reason::START_FAILED,
        },
        message: Some(message),
        tail: None,
    }
}

impl NodeAgent {
    pub(super) async fn run_sandbox(&self, s: Sandbox) {
        let name = format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any());
        match self.run_steps(s).await {
            Ok(true) => tracing::info!(sandbox = %name, "finished"),
            Ok(false) => {
                tracing::debug!(sandbox = %name, "changed meanwhile; a newer event decides")
            }
            Err(e) => tracing::warn!(sandbox = %name, "{e}"),
        }
    }

    /// `Ok(false)`: the object changed under us before it started (nothing ran).
    async fn run_steps(&self, s: Sandbox) -> Result<bool, K8sError> {
        let api = self.api_for(&s);
        let name = s.name_any();
        let uid = s.metadata.uid.clone().unwrap_or_default();

        // 1. The finalizer, so a deletion waits until the VM is stopped.
        let Some(s) = self.add_finalizer(&api, s).await? else {
            return Ok(false);
        };
        if s.phase() != Phase::Scheduled || s.metadata.deletion_timestamp.is_some() {
            return Ok(false);
        }

        // 2. Running, before anything boots: the record that it may have run.
        let mut next = s.clone();
        next.status = Some(status::running(
            &s.status.clone().unwrap_or_default(),
            &now(),
        ));
        match api
            .replace_status(&name, &PostParams::default(), &next)
            .await
        {
            Ok(_) => {}
            Err(e) if is_conflict(&e) || is_not_found(&e) => return Ok(false),
            Err(e) => return Err(e).ctx(|| format!("marking Sandbox {name} Running")),
        }

        // 3. Boot, run, collect. The VM is stopped before `execute` returns, so that when the
        //    operator sees the result and counts the capacity free again, the node's own admission
        //    agrees.
        let ended = self.execute(&s, &uid).await;

        // 4. The result, then the finalizer, unless the Sandbox is being deleted: then the deletion
        //    (`agent.rs`) drops it once it has stopped the VM.
        self.write_final(&api, &name, &ended).await?;
        if let Some(latest) = api
            .get_opt(&name)
            .await
            .ctx(|| format!("reading Sandbox {name}"))?
        {
            if latest.metadata.deletion_timestamp.is_none() {
                self.drop_finalizer(&latest).await;
            }
        }
        Ok(true)
    }

    /// Puts `hearth.dev/vm` on `s` (guarded by its resourceVersion) and returns the object as
    /// written; `None` when it changed or went meanwhile (a newer event decides).
    pub(super) async fn add_finalizer(
        &self,
        api: &Api<Sandbox>,
        s: Sandbox,
    ) -> Result<Option<Sandbox>, K8sError> {
        if s.finalizers().iter().any(|f| f == FINALIZER) {
            return Ok(Some(s));
        }
        let name = s.name_any();
        let mut finalizers = s.finalizers().to_vec();
        finalizers.push(FINALIZER.into());
        let patch = serde_json::json!({
            "metadata": { "finalizers": finalizers, "resourceVersion": s.resource_version() }
        });
        match api
            .patch(&name, &PatchParams::default(), &Patch::Merge(patch))
            .await
        {
            Ok(s) => Ok(Some(s)),
            Err(e) if is_conflict(&e) || is_not_found(&e) => Ok(None),
            Err(e) => Err(e).ctx(|| format!("adding the finalizer to Sandbox {name}")),
        }
    }

    async fn execute(&self, s: &Sandbox, uid: &str) -> Ended {
        let spec = match run_spec(s, uid, self.config.boot_timeout) {
            Ok(spec) => spec,
            Err(ended) => return ended,
        };
        let mut tail = OutputTail::new(self.config.tail_bytes);
        let ran = self
            .node
            .run_once(&self.tenant, spec, |chunk| match chunk {
                ExecOutput::Stdout(b) | ExecOutput::Stderr(b) => tail.push(&b),
            })
            .await;
        let st = match ran {
            Ok(ran) => ran.status,
            Err(RunError::OutputLost(e)) => {
                return Ended {
                    outcome: Outcome::Failed {
                        reason: reason::START_FAILED,
                    },
                    message: Some(format!("lost the command's output: {e}")),
                    tail: Some(tail.text()),
                }
            }
            Err(RunError::Refused(e)) => return start_failed(refused_message(&e)),
            Err(RunError::NotStarted { reason, .. }) => {
                return start_failed(format!("the microVM did not start: {reason}"))
            }
            Err(RunError::Exec(e)) => return start_failed(format!("starting the command: {e}")),
        };
        let code = st.code.or(st.signal.map(|sig| 128 + sig));
        let outcome = if st.timed_out {
            Outcome::TimedOut(code)
        } else {
            Outcome::Exited(code.unwrap_or(-1))
        };
        let message = match (&outcome, st.signal) {
            (Outcome::TimedOut(_), _) => Some(format!(
                "killed after timeoutSeconds={}",
                s.spec.timeout_seconds.unwrap_or_default()
            )),
            (_, Some(sig)) => Some(format!("killed by signal {sig}")),
            _ => None,
        };
        Ended {
            outcome,
            message,
            tail: Some(tail.text()),
        }
    }

    /// Writes the final status on a fresh read (a few tries on conflicts: only this agent writes a
    /// Running Sandbox bound to it, but users may touch labels or annotations meanwhile).
    async fn write_final(
        &self,
        api: &Api<Sandbox>,
        name: &str,
        ended: &Ended,
    ) -> Result<(), K8sError> {
        for _ in 0..5 {
            let Some(latest) = api
                .get_opt(name)
                .await
                .ctx(|| format!("reading Sandbox {name}"))?
            else {
                return Ok(());
            };
            if latest.phase() != Phase::Running || latest.node_name() != Some(self.node_name()) {
                return Ok(()); // e.g. the operator declared this node lost meanwhile
            }
            let mut next = latest.clone();
            next.status = Some(status::finished(
                &latest.status.clone().unwrap_or_default(),
                &ended.outcome,
                ended.message.clone(),
                ended.tail.clone(),
                &now(),
            ));
            match api
                .replace_status(name, &PostParams::default(), &next)
                .await
            {
                Ok(_) => return Ok(()),
                Err(e) if is_conflict(&e) => continue,
                Err(e) if is_not_found(&e) => return Ok(()),
                Err(e) => return Err(e).ctx(|| format!("writing the result of Sandbox {name}")),
            }
        }
        Ok(())
    }
}

/// What the node runs for `s`, or how the Sandbox ends when its spec cannot run anywhere.
fn run_spec(s: &Sandbox, uid: &str, boot_timeout: Duration) -> Result<RunSpec, Ended> {
    let create = create_spec(s, uid).map_err(|message| Ended {
        outcome: Outcome::Failed {
            reason: reason::INVALID,
        },
        message: Some(message),
        tail: None,
    })?;
    let timeout = s.spec.timeout_seconds.map(Duration::from_secs);
    Ok(RunSpec {
        exec: ExecSpec {
            argv: s.spec.argv(),
            env: create.env.clone(),
            workdir: s.spec.working_dir.clone(),
            timeout,
            ..Default::default()
        },
        create,
        stdin: None,
        boot_timeout,
        // The operator's ledger and the node's admission can briefly disagree (a VM still
        // stopping, sandboxes created through the HTTP API): a capacity refusal is retried.
        capacity_wait: CAPACITY_WAIT,
    })
}

/// The node-local sandbox of Sandbox `s` (uid `uid`): image, size, env, working directory,
/// network, labelled with the uid and `namespace/name`. `Err`: why the spec is invalid
/// ([`SandboxSpec::validate`](crate::crd::SandboxSpec::validate)'s message).
pub(super) fn create_spec(s: &Sandbox, uid: &str) -> Result<CreateSpec, String> {
    let demand = s.spec.validate().map_err(|e| e.to_string())?;
    // Validated: only a Service Sandbox has one, and it is at least 1.
    let idle_pause = s.spec.lifecycle.as_ref().and_then(|l| l.idle_pause_seconds);
    let network = s.spec.network_policy().map_err(|e| e.to_string())?;
    let env: Vec<(String, String)> = s
        .spec
        .env
        .iter()
        .map(|e| (e.name.clone(), e.value.clone().unwrap_or_default()))
        .collect();
    Ok(CreateSpec {
        image: s.spec.image.clone(),
        vcpus: Some(demand.vcpus),
        memory_mib: Some(u32::try_from(demand.memory_mib).unwrap_or(u32::MAX)),
        env,
        workdir: s.spec.working_dir.clone(),
        labels: [
            (UID_LABEL.to_string(), uid.to_string()),
            (
                SANDBOX_LABEL.to_string(),
                format!("{}/{}", s.namespace().unwrap_or_default(), s.name_any()),
            ),
        ]
        .into(),
        // `None`: the node's default policy. Either way the node checks it against the
        // Kubernetes tenant's ceiling and refuses what reaches above it.
        network,
        idle_timeout: idle_pause.map(std::time::Duration::from_secs),
        on_idle: match idle_pause {
            Some(_) => OnIdle::Pause,
            None => OnIdle::Stop,
        },
        ..Default::default()
    })
}

/// The status message of a sandbox the node refused to create; a network policy above the node's
/// ceiling (the only `Forbidden`) names `spec.network`.
pub(super) fn refused_message(e: &NodeError) -> String {
    match e {
        NodeError::Forbidden(why) => {
            format!("spec.network is above what this node allows: {why}")
        }
        e => format!("the node refused the sandbox: {e}"),
    }
}

pub(super) fn now() -> Time {
    Time(Timestamp::now())
}

#[cfg(test)]
mod tests {
    use hearth_net::ceiling::within_ceiling;
    use hearth_sandbox::node::default_network_ceiling;
    use hearth_sandbox::{NetworkMode, NetworkPolicy};

    use super::*;
    use crate::crd::{SandboxNetwork, SandboxSpec};

    fn sandbox(network: Option<SandboxNetwork>) -> Sandbox {
        let mut spec: SandboxSpec =
            serde_yaml::from_str("image: busybox\ncommand: [wget, http://pypi.example/]\n")
                .unwrap();
        spec.network = network;
        let mut s = Sandbox::new("s", spec);
        s.metadata.namespace = Some("ns".into());
        s
    }

    fn network(mode: NetworkMode, allow: &[&str]) -> Option<SandboxNetwork> {
        Some(SandboxNetwork {
            mode: Some(mode),
            allow: allow.iter().map(|e| e.to_string()).collect(),
            deny: vec![],
        })
    }

    #[test]
    fn spec_network_reaches_the_nodes_create() {
        let boot = Duration::from_secs(1);
        let unset = run_spec(&sandbox(None), "u", boot).ok().unwrap();
        assert_eq!(unset.create.network, None, "the node's default applies");
        let asked = network(NetworkMode::Allow, &["pypi.example", "*.cdn.example:443"]);
        let run = run_spec(&sandbox(asked.clone()), "u", boot).ok().unwrap();
        assert_eq!(run.create.network, Some(asked.unwrap().policy().unwrap()));
    }

    #[test]
    fn a_malformed_spec_network_fails_the_sandbox_as_invalid() {
        let bad = network(NetworkMode::Allow, &["exa mple.com"]);
        let Err(ended) = run_spec(&sandbox(bad), "u", Duration::from_secs(1)) else {
            panic!("a malformed entry must not run");
        };
        assert!(matches!(
            ended.outcome,
            Outcome::Failed {
                reason: reason::INVALID
            }
        ));
        let message = ended.message.unwrap();
        assert!(message.starts_with("spec.network: "), "{message}");
        assert!(message.contains("exa mple.com"), "{message}");
    }

    /// What the node's ceiling refuses (a private range here) fails the Sandbox with a message
    /// naming `spec.network` and the entry.
    #[test]
    fn a_policy_over_the_ceiling_fails_with_a_clear_message() {
        let asked = network(NetworkMode::Allow, &["10.0.0.0/8"])
            .unwrap()
            .policy()
            .unwrap();
        let why = within_ceiling(&asked, &default_network_ceiling()).unwrap_err();
        let message = refused_message(&NodeError::Forbidden(why.to_string()));
        assert_eq!(
            message,
            "spec.network is above what this node allows: network entry '10.0.0.0/8' is \
             outside this tenant's allowed destinations"
        );
        let open: NetworkPolicy = network(NetworkMode::Open, &[]).unwrap().policy().unwrap();
        assert!(within_ceiling(&open, &default_network_ceiling()).is_ok());
    }
}
