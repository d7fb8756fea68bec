//! Node confinement, enforced by the API server: a validating admission webhook that lets a node
//! agent's credentials write only its own Lease and HearthNode and the status and node finalizer of
//! Sandboxes bound to it. RBAC cannot express "only objects bound to me"; this can.
//!
//! [`identity`] tells which node (if any) a request comes from, [`decide`] is the pure decision,
//! [`review`] the `AdmissionReview` wire types, [`server`] the HTTPS endpoint `hearth operator` serves.
//! `deploy/webhook.yaml` registers it (failure policy Fail, so an unanswered review is a refusal).

pub mod decide;
pub mod identity;
pub mod review;
pub mod server;

pub use decide::review as review_request;
pub use identity::{NodeIdentities, Requester, NODE_GROUP, NODE_NAME_EXTRA, NODE_USER_PREFIX};
pub use server::{WebhookConfig, WebhookError, WebhookServer};
