//! Command-line surface shared by every subcommand: global options and the subcommand enum.
//! Each subcommand's own options live beside its implementation in `cmd/`.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Parser, Debug)]
#[command(
    name = "hearth",
    version,
    about = "Run untrusted code in microVMs booted from OCI images"
)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct GlobalArgs {
    /// Directory holding everything hearth writes (images, kernels, VM state).
    #[arg(
        long,
        global = true,
        env = "HEARTH_HOME",
        default_value = "/var/lib/hearth"
    )]
    pub home: PathBuf,
    /// Log output format.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Human)]
    pub log_format: LogFormat,
    /// More log output (-v info, -vv debug, -vvv trace). `RUST_LOG` overrides.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    pub verbose: u8,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum LogFormat {
    Human,
    Json,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run a command in a new microVM booted from an image.
    Run(Box<crate::cmd::run::RunArgs>),
    /// Provision QEMU, the guest kernel and the guest agent on this host.
    Setup(crate::cmd::setup::SetupArgs),
    /// Pull an image and build its root filesystem.
    Pull(crate::cmd::images::PullArgs),
    /// List cached images.
    Images(crate::cmd::images::ImagesArgs),
    /// Remove a cached image (and garbage-collect what nothing else uses).
    Rmi(crate::cmd::images::RmiArgs),
    /// Image subcommands (inspect).
    #[command(subcommand)]
    Image(crate::cmd::images::ImageCommand),
    /// Run the node daemon: long-lived sandboxes behind an HTTP API.
    Serve(Box<crate::cmd::serve::ServeArgs>),
    /// Client of a `hearth serve` daemon: create, ls, exec, cp, rm.
    Sandbox(crate::cmd::sandbox::SandboxArgs),
    /// Kubernetes controller: places Sandbox resources on hearth nodes (leader-elected).
    Operator(Box<crate::cmd::operator::OperatorArgs>),
    /// Cluster-wide HTTP API: the `hearth serve` API for every node of a Kubernetes cluster.
    Gateway(Box<crate::cmd::gateway::GatewayArgs>),
    /// Model Context Protocol server: sandboxes as tools for AI agents (stdio, or --http).
    Mcp(crate::cmd::mcp::McpArgs),
}

/// Logs go to stderr so that a command's stdout stays the workload's own.
pub fn init_logging(global: &GlobalArgs) {
    use tracing_subscriber::EnvFilter;
    let default = match global.verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    match global.log_format {
        LogFormat::Human => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
