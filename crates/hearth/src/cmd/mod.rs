//! One module per subcommand group; `dispatch` is the single `match` from parsed command to action.

pub mod images;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    match cli.command {
        Command::Pull(args) => images::pull(&global, args),
        Command::Images(args) => images::list(&global, args),
        Command::Rmi(args) => images::remove(&global, args),
        Command::Image(cmd) => images::image(&global, cmd),
    }
}
