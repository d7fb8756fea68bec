//! The crate's error type: what failed against the API server (and while doing what), or a bad setting.

use thiserror::Error;

use crate::quantity::QuantityError;

#[derive(Debug, Error)]
pub enum K8sError {
    #[error("Kubernetes API request failed while {context}: {source}")]
    Api {
        context: String,
        #[source]
        source: kube::Error,
    },
    #[error("cannot build a Kubernetes client from {what}: {message}; give --kubeconfig or run in a pod with a service account")]
    Config { what: String, message: String },
    #[error("invalid setting: {0}")]
    Invalid(String),
    #[error(transparent)]
    Quantity(#[from] QuantityError),
}

/// Adds what we were doing to a kube error.
pub(crate) trait Context<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, K8sError>;
}

impl<T> Context<T> for Result<T, kube::Error> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T, K8sError> {
        self.map_err(|source| K8sError::Api {
            context: context(),
            source,
        })
    }
}

/// True for HTTP 409 Conflict (someone else wrote first) — expected under optimistic concurrency.
pub fn is_conflict(e: &kube::Error) -> bool {
    status_code(e) == Some(409)
}

pub fn is_not_found(e: &kube::Error) -> bool {
    status_code(e) == Some(404)
}

fn status_code(e: &kube::Error) -> Option<u16> {
    match e {
        kube::Error::Api(s) => Some(s.code),
        _ => None,
    }
}
