//! `hearth sandbox code ID [CODE]`: runs Python in the sandbox's code interpreter
//! (`POST /v1/sandboxes/{id}/code`), like a notebook cell: names one run defines are there for the
//! next, across pauses and daemon restarts. The code is the argument, or stdin when it is `-` or
//! absent. Prints what the code printed (its stdout and stderr to ours) and then the repr of its
//! last expression; an exception's traceback goes to stderr and the exit code is 1 (124 when the
//! timeout interrupted it). `--reset` ends the interpreter first (`DELETE .../code`).

use std::io::{Read, Write};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::client::Client;
use crate::cmd::common::parse_duration;
use crate::serve::code::{CodeResult, RunCode};

#[derive(Args, Debug)]
pub struct CodeArgs {
    pub id: String,
    /// The code to run; `-` or nothing reads it from stdin.
    pub code: Option<String>,
    /// Interrupt the code (KeyboardInterrupt, names kept) after this long (default 60s).
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    /// Start a fresh interpreter first (earlier names are gone).
    #[arg(long)]
    pub reset: bool,
    /// Print the daemon's JSON answer instead.
    #[arg(long)]
    pub json: bool,
}

pub async fn code(client: &Client, a: CodeArgs) -> anyhow::Result<ExitCode> {
    let code = match a.code.as_deref() {
        Some(code) if code != "-" => code.to_owned(),
        _ => {
            let mut code = String::new();
            std::io::stdin()
                .read_to_string(&mut code)
                .context("reading the code from stdin")?;
            code
        }
    };
    if a.reset {
        client.reset_code(&a.id).await?;
    }
    let body = RunCode {
        code,
        language: None,
        timeout_seconds: a.timeout.map(|t| t.as_secs().max(1)),
    };
    let answer = client.run_code(&a.id, &body).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&answer)?);
    } else {
        print(&answer)?;
    }
    Ok(exit_code(&answer))
}

fn print(answer: &CodeResult) -> anyhow::Result<()> {
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr().lock());
    if answer.restarted {
        writeln!(
            err,
            "hearth: the interpreter was lost and started afresh: earlier names are gone"
        )?;
    }
    out.write_all(answer.stdout.as_bytes())?;
    err.write_all(answer.stderr.as_bytes())?;
    if let Some(result) = &answer.result {
        writeln!(out, "{result}")?;
    }
    if let Some(error) = &answer.error {
        match error.traceback.is_empty() {
            true => writeln!(err, "{}: {}", error.name, error.message)?,
            false => err.write_all(error.traceback.as_bytes())?,
        }
    }
    out.flush()?;
    Ok(())
}

/// 0, or 1 when the code raised (or its interpreter was lost), 124 when the timeout interrupted
/// it (as `timeout(1)` says).
fn exit_code(answer: &CodeResult) -> ExitCode {
    match (answer.timed_out, &answer.error) {
        (true, _) => ExitCode::from(124),
        (false, Some(_)) => ExitCode::from(1),
        (false, None) => ExitCode::SUCCESS,
    }
}
