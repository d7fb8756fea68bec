//! The node side, run inside `hearth serve --kubernetes`: registration and heartbeat
//! ([`registration`]), the reconciler ([`NodeAgent`], `agent.rs`), one Sandbox's run (`run.rs`) and the
//! bounded output tail (`tail.rs`).

mod agent;
pub mod registration;
mod run;
mod tail;

pub use agent::{NodeAgent, NodeAgentConfig};
pub use tail::OutputTail;
