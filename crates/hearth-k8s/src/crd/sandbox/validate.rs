//! What makes a `SandboxSpec` runnable, decided in one place for both writers of `InvalidSpec`: the
//! operator fails a Pending Sandbox whose spec is invalid before it places it (so it never holds
//! capacity), and the node agent checks again before it boots one (a Sandbox bound by an older
//! operator). The API server cannot check these rules itself (no CEL on Kubernetes 1.20), so they
//! end the Sandbox with a message saying what to change. Pure, no I/O.

use hearth_net::policy::PolicyError;
use thiserror::Error;

use super::{Demand, SandboxSpec};
use crate::quantity::QuantityError;

/// Why a spec cannot run anywhere; the message names the field and what to do.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum SpecError {
    #[error(
        "spec.command is required for a RunToCompletion Sandbox: name the program to run, or set \
         spec.lifecycle.type: Service for a long-lived sandbox that runs what is exec'd into it"
    )]
    NoCommand,
    #[error(
        "spec.command and spec.args must be empty for a Service Sandbox (it runs what is exec'd \
         into it); found {0} element(s)"
    )]
    ServiceCommand(usize),
    #[error("spec.{0} applies only to Service Sandboxes (spec.lifecycle.type: Service)")]
    ServiceOnly(&'static str),
    #[error(
        "spec.timeoutSeconds applies only to RunToCompletion Sandboxes: a Service Sandbox ends at \
         spec.lifecycle.shutdownTime or when deleted"
    )]
    ServiceTimeout,
    #[error("spec.lifecycle.idlePauseSeconds must be at least 1 (leave it out for no idle pause)")]
    IdlePauseZero,
    #[error("spec.resources: {0}")]
    Resources(#[from] QuantityError),
    #[error("spec.network: {0}")]
    Network(#[from] PolicyError),
}

impl SandboxSpec {
    /// Checks the spec and returns what it demands of a node. A RunToCompletion Sandbox needs a
    /// command and may not be paused or have a shutdown time; a Service Sandbox has no command, args
    /// or timeout. Quantities and the network policy must parse.
    pub fn validate(&self) -> Result<Demand, SpecError> {
        if self.is_service() {
            let argv = self.command.len() + self.args.len();
            if argv > 0 {
                return Err(SpecError::ServiceCommand(argv));
            }
            if self.timeout_seconds.is_some() {
                return Err(SpecError::ServiceTimeout);
            }
        } else {
            if self.command.is_empty() {
                return Err(SpecError::NoCommand);
            }
            if self.paused {
                return Err(SpecError::ServiceOnly("paused"));
            }
            let lifecycle = self.lifecycle.clone().unwrap_or_default();
            if lifecycle.shutdown_time.is_some() {
                return Err(SpecError::ServiceOnly("lifecycle.shutdownTime"));
            }
            if lifecycle.shutdown_policy.is_some() {
                return Err(SpecError::ServiceOnly("lifecycle.shutdownPolicy"));
            }
            if lifecycle.idle_pause_seconds.is_some() {
                return Err(SpecError::ServiceOnly("lifecycle.idlePauseSeconds"));
            }
        }
        let idle = self.lifecycle.as_ref().and_then(|l| l.idle_pause_seconds);
        if idle == Some(0) {
            return Err(SpecError::IdlePauseZero);
        }
        self.network_policy()?;
        Ok(self.demand()?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(yaml: &str) -> SandboxSpec {
        serde_yaml::from_str(&format!("image: busybox\n{yaml}")).unwrap()
    }

    #[test]
    fn run_to_completion_needs_a_command_and_no_service_fields() {
        assert!(spec("command: [\"true\"]\n").validate().is_ok());
        assert_eq!(spec("").validate(), Err(SpecError::NoCommand));
        assert_eq!(
            spec("args: [x]\nlifecycle: {type: RunToCompletion}\n").validate(),
            Err(SpecError::NoCommand),
            "args alone are not a command"
        );
        assert_eq!(
            spec("command: [\"true\"]\npaused: true\n").validate(),
            Err(SpecError::ServiceOnly("paused"))
        );
        assert_eq!(
            spec("command: [\"true\"]\nlifecycle: {idlePauseSeconds: 60}\n").validate(),
            Err(SpecError::ServiceOnly("lifecycle.idlePauseSeconds"))
        );
        assert_eq!(
            spec("lifecycle: {type: Service, idlePauseSeconds: 0}\n").validate(),
            Err(SpecError::IdlePauseZero)
        );
        assert!(spec("lifecycle: {type: Service, idlePauseSeconds: 60}\n")
            .validate()
            .is_ok());
        let at = "lifecycle: {shutdownTime: \"2030-01-01T00:00:00Z\"}\n";
        assert_eq!(
            spec(&format!("command: [\"true\"]\n{at}")).validate(),
            Err(SpecError::ServiceOnly("lifecycle.shutdownTime"))
        );
    }

    #[test]
    fn a_service_has_no_command_and_may_pause() {
        let service = "lifecycle: {type: Service, shutdownTime: \"2030-01-01T00:00:00Z\", shutdownPolicy: Retain}\n";
        let ok = spec(&format!(
            "{service}paused: true\nresources: {{cpu: 2, memory: 1Gi}}\n"
        ));
        assert_eq!(
            ok.validate(),
            Ok(Demand {
                vcpus: 2,
                memory_mib: 1024
            })
        );
        let with_command = spec(&format!("{service}command: [sh]\nargs: [-c, x]\n"));
        let err = with_command.validate().unwrap_err();
        assert_eq!(err, SpecError::ServiceCommand(3));
        assert!(
            err.to_string().contains("must be empty for a Service"),
            "{err}"
        );
        assert_eq!(
            spec(&format!("{service}timeoutSeconds: 5\n")).validate(),
            Err(SpecError::ServiceTimeout)
        );
    }

    #[test]
    fn quantities_and_network_are_checked_with_the_field_named() {
        let bad_cpu = spec("command: [\"true\"]\nresources: {cpu: lots}\n");
        let err = bad_cpu.validate().unwrap_err().to_string();
        assert!(err.starts_with("spec.resources: invalid quantity"), "{err}");
        let bad_net = spec("command: [\"true\"]\nnetwork: {mode: allow, allow: [\"exa mple\"]}\n");
        let err = bad_net.validate().unwrap_err().to_string();
        assert!(err.starts_with("spec.network: "), "{err}");
    }
}
