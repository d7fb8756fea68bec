//! `hearth sandbox spawn|ps|logs|kill`: background processes in a sandbox
//! (`/v1/sandboxes/{id}/processes`). `spawn` prints the new process's id; `ps` lists them; `logs`
//! prints the output the daemon kept (the last 1 MiB) and with `-f` follows it until the process
//! ends, then exits with its exit code as `exec` does (128+N for signal N), going on through a
//! daemon restart (it connects again, for up to [`RECONNECT_FOR`], from the offset it had reached:
//! the daemon keeps the output, at the same offsets, across its restarts); `kill` sends a signal,
//! or without `-s` kills the process and forgets it.

use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Args;
use futures::StreamExt;

use crate::client::{Client, DaemonError};
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

/// How long `logs -f` goes on connecting again to a daemon that went (a restart).
pub const RECONNECT_FOR: Duration = Duration::from_secs(60);
/// The longest pause between two of those tries.
const RECONNECT_PAUSE: Duration = Duration::from_secs(2);

pub async fn logs(client: &Client, a: LogsArgs) -> anyhow::Result<ExitCode> {
    let mut offset = a.offset;
    let mut out = Output::default();
    // Tries go on for RECONNECT_FOR from a break, and a connection that brought output starts
    // the count again (a follow may outlive several restarts).
    let (mut deadline, mut pause) = (None, Duration::ZERO);
    loop {
        let broke = match client
            .process_output(&a.id, a.process, offset, a.follow)
            .await
        {
            Ok((start, events)) => {
                // Past the offset asked for when the bytes there were dropped meanwhile.
                offset = start;
                let mut events = Box::pin(events);
                loop {
                    match events.next().await {
                        None => return Ok(ExitCode::SUCCESS),
                        Some(Ok(event)) => {
                            deadline = None;
                            offset += output_len(&event);
                            if let Some(code) = out.handle(event).await? {
                                return Ok(code);
                            }
                        }
                        Some(Err(e)) => break e,
                    }
                }
            }
            Err(e) => e,
        };
        let fresh = deadline.is_none();
        let deadline = *deadline.get_or_insert_with(|| Instant::now() + RECONNECT_FOR);
        if !a.follow || !DaemonError::is_restart(&broke) || Instant::now() >= deadline {
            return Err(broke);
        }
        if fresh {
            eprintln!("hearth: {broke:#}; connecting again");
            pause = Duration::ZERO;
        }
        pause = (pause * 2).clamp(Duration::from_millis(250), RECONNECT_PAUSE);
        tokio::time::sleep(pause).await;
    }
}

/// Bytes of output an event carries, from its base64's length (`Output::handle` decodes it, and
/// fails on bad base64).
fn output_len(event: &crate::serve::api::ExecEvent) -> u64 {
    let data = event.stdout.as_deref().or(event.stderr.as_deref());
    data.map_or(0, |d| {
        let padding = d.bytes().rev().take_while(|&b| b == b'=').count();
        (d.len() / 4 * 3).saturating_sub(padding) as u64
    })
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
    fn an_events_output_length_is_read_off_its_base64() {
        use base64::Engine;
        for data in [&b""[..], b"a", b"ab", b"abc", b"abcd", &[0u8; 1000]] {
            let event = crate::serve::api::ExecEvent {
                stdout: Some(base64::engine::general_purpose::STANDARD.encode(data)),
                ..Default::default()
            };
            assert_eq!(output_len(&event), data.len() as u64);
        }
        assert_eq!(output_len(&Default::default()), 0);
    }

    #[test]
    fn signals_by_name_or_number() {
        assert_eq!(signal_number("TERM").unwrap(), 15);
        assert_eq!(signal_number("sigkill").unwrap(), 9);
        assert_eq!(signal_number("2").unwrap(), 2);
        assert!(signal_number("BOGUS").is_err());
    }
}
