//! `hearth mcp`: the Model Context Protocol server ([`crate::mcp`]) as a subcommand. Parses where
//! the sandboxes run (the daemon named by `--host`/`HEARTH_HOST`, or one started in-process) and
//! how MCP clients connect (stdio, or streamable HTTP with `--http`), then runs the server until the
//! client leaves or a signal.

use std::net::SocketAddr;
use std::process::ExitCode;
use std::time::Duration;

use clap::Args;

use crate::cli::GlobalArgs;
use crate::cmd::common::{runtime, Workers};

#[derive(Args, Debug)]
pub struct McpArgs {
    /// The `hearth serve` daemon that runs the sandboxes (http://HOST:PORT). Without it, hearth
    /// mcp runs a daemon of its own in-process on this host (as `hearth serve` would: root, KVM or
    /// QEMU), for this server's sandboxes only.
    #[arg(long, env = "HEARTH_HOST")]
    pub host: Option<String>,
    /// Bearer token for --host, from the daemon's tokens file.
    #[arg(long, env = "HEARTH_TOKEN", hide_env_values = true, default_value = "")]
    pub token: String,
    /// Speak streamable HTTP at http://ADDR/mcp instead of stdio. It has no authentication of its
    /// own, so ADDR must be a loopback address (port 0 picks one; `listening on ADDR` is printed).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// How long an idle streamable HTTP session lives; its sandboxes go with it.
    #[arg(long, value_parser = crate::units::parse_duration, default_value = "1h")]
    pub http_session_idle: Duration,
    /// Without --host: `hearth serve` flags for the in-process daemon, after `--`
    /// (e.g. `-- --accel tcg --memory 256m`).
    #[arg(last = true, value_name = "SERVE_FLAGS")]
    pub serve_flags: Vec<String>,
}

pub fn mcp(g: &GlobalArgs, a: McpArgs) -> anyhow::Result<ExitCode> {
    let runtime = runtime(Workers::PerCpu)?;
    let options = crate::mcp::Options {
        host: a.host,
        token: a.token,
        http: a.http,
        http_session_idle: a.http_session_idle,
        serve_flags: a.serve_flags,
    };
    runtime.block_on(crate::mcp::run(g, options))?;
    // A read of stdin still pending (the client never closed it) must not hold the exit up.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}
