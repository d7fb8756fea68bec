//! One module per subcommand group; `dispatch` is the single `match` from parsed command to action.
//! `common` holds what several commands share (VM options, parsers, shutdown signal, runtime).

pub mod code;
pub mod common;
pub mod gateway;
pub mod images;
pub mod mcp;
pub mod network;
pub mod operator;
pub mod port_forward;
pub mod processes;
pub mod run;
pub mod sandbox;
pub mod serve;
pub mod setup;
pub mod tty;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    // The clients (`hearth sandbox`, `hearth mcp --host`) touch no local state; every other command first removes what a killed hearth
    // left behind (its VMM died with it).
    let client_only = matches!(
        cli.command,
        Command::Sandbox(_)
            | Command::Gateway(_)
            | Command::Mcp(mcp::McpArgs { host: Some(_), .. })
    );
    if !client_only {
        hearth_sandbox::sweep_stale(&global.home);
    }
    match cli.command {
        Command::Run(args) => run::run(&global, *args),
        Command::Setup(args) => setup::setup(&global, args),
        Command::Pull(args) => images::pull(&global, args),
        Command::Images(args) => images::list(&global, args),
        Command::Rmi(args) => images::remove(&global, args),
        Command::Image(cmd) => images::image(&global, cmd),
        Command::Serve(args) => serve::serve(&global, *args),
        Command::Sandbox(args) => sandbox::sandbox(args),
        Command::Operator(args) => operator::operator(&global, *args),
        Command::Gateway(args) => gateway::gateway(&global, *args),
        Command::Mcp(args) => mcp::mcp(&global, args),
    }
}
