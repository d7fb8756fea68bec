//! hearth-k8s: hearth on Kubernetes. The cluster is the source of truth; a leader-elected operator
//! places `Sandbox` objects on registered nodes; node agents (inside `hearth serve --kubernetes`) run
//! them through `hearth_sandbox::node::Node` and report status.
//!
//! Entry points: [`crd`] (the custom resource types and the generated CRD YAML), [`schedule`] (the
//! placement policy, pure), [`status`] (status transitions, pure), [`lease`] (heartbeats and leader
//! election), [`admission`] (the node-confinement webhook), [`controller::Operator`] (the
//! `hearth operator` loop), [`node::NodeAgent`] (the node side).
//! Everything that talks to the API server goes through `kube::Client`; nothing here touches the host
//! except through `Node`.

pub mod admission;
pub mod client;
pub mod controller;
pub mod crd;
mod error;
pub mod lease;
pub mod node;
pub mod quantity;
pub mod schedule;
pub mod status;

pub use error::{is_conflict, is_not_found, K8sError};
