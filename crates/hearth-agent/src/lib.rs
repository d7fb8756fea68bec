//! hearth-agent: the guest side of the agent protocol (documented in `hearth-proto`).
//!
//! The binary (`main.rs`) is the guest's PID 1: [`pid1::run`] mounts, loads modules, assembles the
//! workload root, then [`session::serve_port`] serves the host on the virtio-serial port (and
//! [`session::serve_listener`] on vsock). Requests are routed in [`server`]; commands run through
//! [`exec`] (agent side) and [`exec_init`] (the per-exec init process, PID 1 of the command's own
//! PID namespace); file requests are in [`files`]; port forwards in [`forward`]. The guest's
//! network (`eth0`, resolver files) is set up by [`net`]. Outside a VM ([`standalone`]) the same
//! binary serves on a Unix socket or an inherited fd, which is how the host-side tests run it.
//! A template VM's agent (see [`pid1`]) holds HELLO back until a RESUME line ([`resume`]).
//! A RESUME line to a running agent (its VM restored from its own saved state) refreshes clock and
//! entropy, and the execs of the session the restore cut short run on ([`session`]).

use std::path::PathBuf;
use std::sync::Arc;

pub mod exec;
pub mod exec_init;
pub mod files;
pub mod forward;
pub mod in_root;
pub mod net;
pub mod pid1;
pub mod port;
pub mod resume;
pub mod server;
pub mod session;
pub mod standalone;
pub mod stream;
pub mod workload_cgroup;
pub mod workload_dev;

/// The agent's version, announced in the handshake and in `GET /v1/info`.
pub const AGENT_VERSION: &str = env!("CARGO_PKG_VERSION");

/// Hidden first argument that makes the agent binary act as an exec-init (see [`exec_init`]).
pub const EXEC_INIT_ARG: &str = "__hearth-exec-init";

/// Writes one line to the agent's stderr (the guest console when the agent is PID 1).
#[macro_export]
macro_rules! log {
    ($($arg:tt)*) => {
        eprintln!("hearth-agent: {}", format_args!($($arg)*))
    };
}

/// How the agent powers off when the host asks it to shut down: the kernel-facing seam between
/// "reboot the guest" (PID 1) and "exit the process" (outside a VM).
pub trait PowerControl: Send + Sync + 'static {
    /// Makes written data durable and releases filesystems (sync, unmount). Every exec has been
    /// killed before this is called.
    fn prepare(&self) -> Result<(), String>;
    /// Ends the agent; never returns.
    fn power_off(&self) -> !;
}

/// Outside a VM: shutting down syncs and exits the agent process.
pub struct ExitProcess;

impl PowerControl for ExitProcess {
    fn prepare(&self) -> Result<(), String> {
        nix::unistd::sync();
        Ok(())
    }

    fn power_off(&self) -> ! {
        std::process::exit(0)
    }
}

/// What the agent serves.
pub struct AgentConfig {
    /// The workload root: every command's `/`; file paths are resolved inside it.
    pub root: PathBuf,
    /// The program re-executed (with [`EXEC_INIT_ARG`]) as each exec's init: this binary.
    pub exec_init_program: PathBuf,
    pub power: Arc<dyn PowerControl>,
}

/// State shared by every session.
pub struct Agent {
    pub config: AgentConfig,
    pub execs: exec::ExecRegistry,
    /// Open unless this agent runs in a template VM that has not been resumed yet.
    pub resume: resume::ResumeGate,
}

impl Agent {
    pub fn new(config: AgentConfig) -> Arc<Agent> {
        Arc::new(Agent {
            config,
            execs: exec::ExecRegistry::default(),
            resume: resume::ResumeGate::open(),
        })
    }

    /// An agent that answers HELLO only after a RESUME line has been applied with `late_init`.
    pub fn awaiting_resume(
        config: AgentConfig,
        late_init: Arc<dyn resume::LateInit>,
    ) -> Arc<Agent> {
        Arc::new(Agent {
            config,
            execs: exec::ExecRegistry::default(),
            resume: resume::ResumeGate::closed(late_init),
        })
    }

    /// An agent whose RESUME handling is `gate` (PID 1's, which also refreshes clock and entropy
    /// when a running VM was restored from its saved state).
    pub fn with_resume_gate(config: AgentConfig, gate: resume::ResumeGate) -> Arc<Agent> {
        Arc::new(Agent {
            config,
            execs: exec::ExecRegistry::default(),
            resume: gate,
        })
    }
}
