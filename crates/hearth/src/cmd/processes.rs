//! `hearth sandbox spawn|ps|logs|kill`: background processes in a sandbox
//! (`/v1/sandboxes/{id}/processes`). `spawn` prints the new process's id; `ps` lists them; `logs`
//! prints the output the daemon kept (the last 1 MiB) and with `-f` follows it until the process
//! ends, then exits with its exit code as `exec` does (128+N for signal N); `kill` sends a signal,
//! or without `-s` kills the process and forgets it.

use std::process::ExitCode;
use std::time::{SystemTime, UNIX_EPOCH};

use clap::Args;
use futures::StreamExt;

use crate::client::Client;
use crate::cmd::sandbox::{CommandOptions, Output};
use crate::serve::processes::{Process, StartProcess};

#[derive(Args, Debug)]
pub struct SpawnArgs {
    pub id: String,
    #[command(flatten)]
    pub options: CommandOptions,
    /// A name of yours for it, shown by `ps`.
    #[arg(long)]
    pub tag: Option<String>,
    /// Keep the sandbox from its idle timeout while this runs (a build you wait for).
    #[arg(long)]
    pub keep_awake: bool,
    #[arg(last = true, required = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct PsArgs {
    pub id: String,
    /// Print the daemon's JSON answer instead.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args, Debug)]
pub struct LogsArgs {
    pub id: String,
    pub process: u32,
    /// Keep printing new output until the process ends.
    #[arg(short, long)]
    pub follow: bool,
    /// Start at this offset of its output (stdout and stderr counted together).
    #[arg(long, default_value_t = 0)]
    pub offset: u64,
}

#[derive(Args, Debug)]
pub struct KillArgs {
    pub id: String,
    pub process: u32,
    /// The signal to send (TERM, INT, HUP, KILL... or a number); without it the process is killed
    /// and forgotten.
    #[arg(short, long)]
    pub signal: Option<String>,
}

pub async fn spawn(client: &Client, a: SpawnArgs) -> anyhow::Result<ExitCode> {
    let exec = a.options.exec_body(a.command)?;
    let body = StartProcess {
        argv: exec.argv,
        env: exec.env,
        workdir: exec.workdir,
        user: exec.user,
        timeout_seconds: exec.timeout_seconds,
        open_stdin: false,
        tag: a.tag,
        keep_awake: a.keep_awake,
    };
    let process = client.start_process(&a.id, &body).await?;
    println!("{}", process.id);
    Ok(ExitCode::SUCCESS)
}

pub async fn ps(client: &Client, a: PsArgs) -> anyhow::Result<ExitCode> {
    let list = client.processes(&a.id).await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&list)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<4} {:<12} {:>7} {:<16} COMMAND",
        "ID", "STATE", "AGE", "TAG"
    );
    for p in list.processes {
        println!(
            "{:<4} {:<12} {:>6}s {:<16} {}",
            p.id,
            state(&p),
            now.saturating_sub(p.started_at) / 1000,
            p.tag.as_deref().unwrap_or("-"),
            p.argv.join(" ")
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn state(p: &Process) -> String {
    match (p.running, p.exit_code, p.signal, &p.lost) {
        (true, ..) => "running".into(),
        (false, Some(code), ..) => format!("exited({code})"),
        (false, None, Some(signal), _) => format!("signal({signal})"),
        (false, None, None, Some(_)) => "lost".into(),
        _ => "ended".into(),
    }
}

pub async fn logs(client: &Client, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let (_, events) = client
        .process_output(&a.id, a.process, a.offset, a.follow)
        .await?;
    let mut events = Box::pin(events);
    let mut out = Output::default();
    while let Some(event) = events.next().await {
        if let Some(code) = out.handle(event?).await? {
            return Ok(code);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn kill(client: &Client, a: KillArgs) -> anyhow::Result<ExitCode> {
    let signal = a.signal.as_deref().map(signal_number).transpose()?;
    client.signal_process(&a.id, a.process, signal).await?;
    Ok(ExitCode::SUCCESS)
}

/// `TERM`, `SIGTERM` or `15`.
fn signal_number(name: &str) -> anyhow::Result<i32> {
    if let Ok(n) = name.parse() {
        return Ok(n);
    }
    let name = name.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name);
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        other => anyhow::bail!("signal {other:?}: give a name such as TERM or a number"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("sigkill").unwrap(), 9);
        assert_eq!(signal_number("2").unwrap(), 2);
        assert!(signal_number("BOGUS").is_err());
    }
}
