//! The node side, run inside `hearth serve --kubernetes`: registration and heartbeat
//! ([`registration`]), the reconciler ([`NodeAgent`], `agent.rs`), one run-to-completion Sandbox's run
//! (`run.rs`) and its bounded output tail (`tail.rs`), and Service Sandboxes: what to do about one
//! (`service.rs`, pure) and doing it (`service_act.rs`).

mod agent;
pub mod registration;
mod run;
mod service;
mod service_act;
mod tail;

pub use agent::{NodeAgent, NodeAgentConfig};
pub use tail::OutputTail;
