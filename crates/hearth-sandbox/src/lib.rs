//! hearth-sandbox: a sandbox's life — image -> VM -> agent — exec, files, timeouts and cleanup.
//!
//! Entry points: [`command::resolve`] (docker-run semantics for the command), [`rundir`] (per-sandbox
//! state directories and the sweep of what dead runs left behind).

pub mod command;
pub mod rundir;
