//! `hearth`: the one host binary. `main` parses the command line, calls the library code behind the
//! chosen subcommand and maps its error to an exit code. Subcommands live in `cmd/`, one file per group;
//! global options (home directory, logging) in `cli.rs`; `units.rs` parses sizes and durations for
//! flags and API fields alike; `report.rs` renders an error with its causes, each once. `serve/` is the node daemon's HTTP API
//! (`hearth serve`), `client.rs` its client (`hearth sandbox ...`, `hearth mcp`); `mcp/` the Model
//! Context Protocol server (`hearth mcp`); `gateway/` the cluster-wide API (`hearth gateway`).

mod cli;
mod client;
mod cmd;
mod gateway;
mod heap;
mod mcp;
mod report;
mod serve;
mod units;

use std::process::ExitCode;

use clap::Parser;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    cli::init_logging(&cli.global);
    match cmd::dispatch(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("hearth: error: {}", report::chain(&err));
            ExitCode::from(125)
        }
    }
}
