//! One module per subcommand group; `dispatch` is the single `match` from parsed command to action.

pub mod images;
pub mod run;
pub mod setup;

use std::process::ExitCode;

use crate::cli::{Cli, Command};

pub fn dispatch(cli: Cli) -> anyhow::Result<ExitCode> {
    let global = cli.global;
    // Every command first removes what a killed hearth left behind (its VMM died with it).
    hearth_sandbox::sweep_stale(&global.home);
    match cli.command {
        Command::Run(args) => run::run(&global, *args),
        Command::Setup(args) => setup::setup(&global, args),
        Command::Pull(args) => images::pull(&global, args),
        Command::Images(args) => images::list(&global, args),
        Command::Rmi(args) => images::remove(&global, args),
        Command::Image(cmd) => images::image(&global, cmd),
    }
}
