//! `hearth pull`, `hearth images`, `hearth rmi`, `hearth image inspect` (owned by the images work).

use std::process::ExitCode;

use clap::{Args, Subcommand};

use crate::cli::GlobalArgs;

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference.
    pub image: String,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {}

#[derive(Args, Debug)]
pub struct RmiArgs {
    pub image: String,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Show an image's manifest digest, config and layers.
    Inspect { image: String },
}

pub fn pull(_g: &GlobalArgs, _a: PullArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub fn list(_g: &GlobalArgs, _a: ImagesArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub fn remove(_g: &GlobalArgs, _a: RmiArgs) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
pub fn image(_g: &GlobalArgs, _c: ImageCommand) -> anyhow::Result<ExitCode> {
    anyhow::bail!("not implemented yet")
}
