//! `hearth sandbox create|ls|exec|cp|rm|...`: the CLI client of a `hearth serve` daemon
//! (`--host`/`HEARTH_HOST`, `--token`/`HEARTH_TOKEN`). `exec` streams the command's output to our
//! stdout and stderr and exits with its exit code (128+N for signal N, 124 on timeout, 125 for
//! hearth's own errors); with `-i` it runs over the WebSocket and forwards our stdin, with `-t` on a
//! terminal in the guest (see [`crate::cmd::tty`]). `cp` copies
//! one file either way: `cp ./f ID:/path` or `cp ID:/path ./f`. Writes only the files `cp` names.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context};
use base64::Engine;
use clap::{Args, Subcommand};
use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use crate::client::Client;
use crate::cmd::common::{parse_duration, runtime, shutdown_signal, Workers};
use crate::cmd::network::PolicyArgs;
use crate::cmd::tty::{self, Terminal};
use crate::serve::api::{
    CreateSandbox, DirListing, ExecBody, ExecEvent, OnIdle, SandboxState, TerminalSize, WsControl,
    WsTerminal,
};

const B64: base64::engine::GeneralPurpose = base64::engine::general_purpose::STANDARD;

#[derive(Args, Debug, Clone)]
pub struct ClientArgs {
    /// The daemon: http://HOST:PORT.
    #[arg(
        long,
        global = true,
        env = "HEARTH_HOST",
        default_value = "http://127.0.0.1:8420"
    )]
    pub host: String,
    /// Bearer token from the daemon's tokens file.
    #[arg(
        long,
        global = true,
        env = "HEARTH_TOKEN",
        hide_env_values = true,
        default_value = ""
    )]
    pub token: String,
}

#[derive(Args, Debug)]
pub struct SandboxArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SandboxCommand,
}

#[derive(Subcommand, Debug)]
pub enum SandboxCommand {
    /// Create a sandbox and print its id once it runs.
    Create(CreateArgs),
    /// List your sandboxes.
    Ls(LsArgs),
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(ExecArgs),
    /// Run Python in the sandbox's code interpreter (names persist between runs, like notebook
    /// cells): prints its output and the last expression's value; exits 1 if it raised.
    Code(crate::cmd::code::CodeArgs),
    /// Copy a file into (`cp ./f ID:/path`) or out of (`cp ID:/path ./f`) a sandbox.
    Cp(CpArgs),
    /// Stop and remove sandboxes.
    Rm(RmArgs),
    /// Save a running sandbox to disk and end its VM (its vCPUs and memory are freed); prints its
    /// id. Execs still running make it refuse unless --force, which ends their streams (their
    /// processes run on after the resume, output discarded).
    Pause(PauseArgs),
    /// Bring a paused sandbox back as it was (processes, files, memory; the host's clock); prints
    /// its id.
    Resume(ResumeArgs),
    /// Make new sandboxes from a running one's state now (processes, memory, files), each with its
    /// own id, hostname, entropy and network; the parent runs on. Prints the new ids, one a line.
    Fork(ForkArgs),
    /// Show a sandbox's egress policy and network activity; with policy flags, replace the policy
    /// while it runs.
    Network(NetworkArgs),
    /// Forward a local TCP port to a port inside a sandbox until Ctrl-C.
    PortForward(crate::cmd::port_forward::PortForwardArgs),
    /// Start a background process in a sandbox (it runs on after this returns); prints its id.
    Spawn(crate::cmd::processes::SpawnArgs),
    /// List a sandbox's background processes.
    Ps(crate::cmd::processes::PsArgs),
    /// Print a background process's kept output (-f: follow it until it ends, then exit with its
    /// exit code).
    Logs(crate::cmd::processes::LogsArgs),
    /// Send a background process a signal (-s); without -s, kill it and forget it.
    Kill(crate::cmd::processes::KillArgs),
}

#[derive(Args, Debug)]
pub struct NetworkArgs {
    pub id: String,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

/// `--on-idle`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum OnIdleArg {
    Stop,
    Pause,
}

#[derive(Args, Debug)]
pub struct CreateArgs {
    pub image: String,
    #[arg(long)]
    pub cpus: Option<u32>,
    #[arg(short, long)]
    pub memory: Option<String>,
    #[arg(long)]
    pub disk: Option<String>,
    /// Lifetime: 30s, 5m, 1h.
    #[arg(long, value_parser = parse_duration)]
    pub ttl: Option<Duration>,
    /// Stop (or, with `--on-idle pause`, pause) after this long without use.
    #[arg(long, value_parser = parse_duration)]
    pub idle_timeout: Option<Duration>,
    /// What the idle timeout does: `stop` ends the sandbox; `pause` saves it to disk, and its
    /// next use (exec, files, code, ports) resumes it.
    #[arg(long, value_enum, requires = "idle_timeout")]
    pub on_idle: Option<OnIdleArg>,
    /// Environment for every exec (KEY=VALUE). Repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    #[arg(short, long = "workdir")]
    pub workdir: Option<String>,
    #[arg(short, long)]
    pub user: Option<String>,
    /// KEY=VALUE. Repeatable.
    #[arg(long = "label", value_name = "KEY=VALUE")]
    pub labels: Vec<String>,
    /// Print the id at once instead of waiting for the sandbox to run.
    #[arg(long)]
    pub no_wait: bool,
    #[command(flatten)]
    pub policy: PolicyArgs,
}

#[derive(Args, Debug)]
pub struct PauseArgs {
    pub id: String,
    /// Pause even while execs run: their streams end; their processes run on after the resume.
    #[arg(long)]
    pub force: bool,
}

#[derive(Args, Debug)]
pub struct ResumeArgs {
    pub id: String,
}

#[derive(Args, Debug)]
pub struct ForkArgs {
    pub id: String,
    /// How many new sandboxes (1 to 64).
    #[arg(short = 'n', long = "count", default_value_t = 1)]
    pub count: u32,
}

#[derive(Args, Debug)]
pub struct LsArgs {
    /// Print the daemon's JSON.
    #[arg(long)]
    pub json: bool,
}

/// How a command runs, for `exec` and `spawn`.
#[derive(Args, Debug, Clone)]
pub struct CommandOptions {
    /// Environment (KEY=VALUE). Repeatable.
    #[arg(short, long = "env", value_name = "KEY=VALUE")]
    pub env: Vec<String>,
    #[arg(short, long = "workdir")]
    pub workdir: Option<String>,
    #[arg(short, long)]
    pub user: Option<String>,
    /// Kill it after this long: 30s, 5m, 1h.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
}

impl CommandOptions {
    /// `argv` run this way, as the API's exec body (without stdin).
    pub fn exec_body(&self, argv: Vec<String>) -> anyhow::Result<ExecBody> {
        Ok(ExecBody {
            argv,
            env: pairs(&self.env, "--env")?,
            workdir: self.workdir.clone(),
            user: self.user.clone(),
            timeout_seconds: self.timeout.map(|d| d.as_secs().max(1)),
            stdin: None,
        })
    }
}

#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct ExecArgs {
    /// Forward stdin to the command (over a WebSocket).
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (combine as -it; over a WebSocket): ours goes raw, the guest's
    /// follows our window size. Needs stdin to be a terminal (warns and runs without otherwise).
    #[arg(short = 't', long)]
    pub tty: bool,
    #[command(flatten)]
    pub options: CommandOptions,
    pub id: String,
    #[arg(required = true, allow_hyphen_values = true)]
    pub command: Vec<String>,
}

#[derive(Args, Debug)]
pub struct CpArgs {
    pub source: String,
    pub destination: String,
}

#[derive(Args, Debug)]
pub struct RmArgs {
    #[arg(required = true)]
    pub ids: Vec<String>,
}

pub fn sandbox(a: SandboxArgs) -> anyhow::Result<ExitCode> {
    runtime(Workers::Few)?.block_on(async move {
        let client = Client::new(&a.client.host, &a.client.token)?;
        match a.command {
            SandboxCommand::Create(args) => create(&client, args).await,
            SandboxCommand::Ls(args) => ls(&client, args).await,
            SandboxCommand::Exec(args) if args.interactive || args.tty => {
                exec_interactive(&client, args).await
            }
            SandboxCommand::Exec(args) => exec(&client, args).await,
            SandboxCommand::Code(args) => crate::cmd::code::code(&client, args).await,
            SandboxCommand::Cp(args) => cp(&client, args).await,
            SandboxCommand::Rm(args) => rm(&client, args).await,
            SandboxCommand::Pause(args) => {
                let sandbox = client.pause(&args.id, args.force).await?;
                println!("{}", sandbox.id);
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Resume(args) => {
                let sandbox = client.resume(&args.id).await?;
                println!("{}", sandbox.id);
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::Fork(args) => {
                for child in client.fork(&args.id, args.count).await? {
                    println!("{}", child.id);
                }
                Ok(ExitCode::SUCCESS)
            }
            SandboxCommand::PortForward(args) => {
                crate::cmd::port_forward::port_forward(&client, args).await
            }
            SandboxCommand::Spawn(args) => crate::cmd::processes::spawn(&client, args).await,
            SandboxCommand::Ps(args) => crate::cmd::processes::ps(&client, args).await,
            SandboxCommand::Logs(args) => crate::cmd::processes::logs(&client, args).await,
            SandboxCommand::Kill(args) => crate::cmd::processes::kill(&client, args).await,
            SandboxCommand::Network(args) => {
                let policy = args.policy.policy()?;
                let answer = client.network(&args.id, policy.as_ref()).await?;
                println!("{}", serde_json::to_string_pretty(&answer)?);
                Ok(ExitCode::SUCCESS)
            }
        }
    })
}

async fn create(client: &Client, a: CreateArgs) -> anyhow::Result<ExitCode> {
    let body = CreateSandbox {
        image: a.image,
        cpus: a.cpus,
        memory: a.memory,
        disk: a.disk,
        ttl_seconds: a.ttl.map(|d| d.as_secs().max(1)),
        idle_timeout_seconds: a.idle_timeout.map(|d| d.as_secs().max(1)),
        on_idle: a.on_idle.map(|o| match o {
            OnIdleArg::Stop => OnIdle::Stop,
            OnIdleArg::Pause => OnIdle::Pause,
        }),
        env: pairs(&a.env, "--env")?,
        workdir: a.workdir,
        user: a.user,
        labels: pairs(&a.labels, "--label")?,
        network: a.policy.policy()?,
        wait: Some(!a.no_wait),
    };
    let (_, sandbox) = client.create(&body).await?;
    println!("{}", sandbox.id);
    match sandbox.state {
        SandboxState::Running | SandboxState::Creating => Ok(ExitCode::SUCCESS),
        state => bail!(
            "sandbox {} is {state:?}: {}",
            sandbox.id,
            sandbox.reason.as_deref().unwrap_or("no reason given")
        ),
    }
}

async fn ls(client: &Client, a: LsArgs) -> anyhow::Result<ExitCode> {
    let sandboxes = client.list().await?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&sandboxes)?);
        return Ok(ExitCode::SUCCESS);
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64);
    println!(
        "{:<26} {:<9} {:>4} {:>7} {:>8}  {:<40} REASON",
        "ID", "STATE", "CPUS", "MEMORY", "AGE", "IMAGE"
    );
    for s in sandboxes {
        let state = serde_json::to_value(s.state)?;
        println!(
            "{:<26} {:<9} {:>4} {:>6}M {:>7}s  {:<40} {}",
            s.id,
            state.as_str().unwrap_or("?"),
            s.cpus,
            s.memory_mib,
            now.saturating_sub(s.created_at) / 1000,
            s.image,
            s.reason.unwrap_or_default()
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn exec_body(a: &ExecArgs) -> anyhow::Result<ExecBody> {
    a.options.exec_body(a.command.clone())
}

async fn exec(client: &Client, a: ExecArgs) -> anyhow::Result<ExitCode> {
    let mut events = Box::pin(client.exec(&a.id, &exec_body(&a)?).await?);
    let mut out = Output::default();
    while let Some(event) = events.next().await {
        if let Some(code) = out.handle(event?).await? {
            return Ok(code);
        }
    }
    bail!("the exec stream ended without an exit status")
}

/// `exec -i` and `exec -t`: over the WebSocket, with our stdin (`-i`) and a terminal (`-t`).
async fn exec_interactive(client: &Client, a: ExecArgs) -> anyhow::Result<ExitCode> {
    // Raw (with -it) from here to the end, on every way out (SIGTERM/SIGHUP included).
    let mut terminal = match tty::usable(a.tty) {
        true => {
            Some(Terminal::attach(a.interactive).context("putting the terminal into raw mode")?)
        }
        false => None,
    };
    let outcome = match terminal.as_mut() {
        Some(terminal) => tokio::select! {
            code = exec_ws(client, &a, Some(terminal)) => code,
            signal = shutdown_signal() => Ok(ExitCode::from(128 + signal as u8)),
        },
        None => exec_ws(client, &a, None).await,
    };
    drop(terminal);
    outcome
}

async fn exec_ws(
    client: &Client,
    a: &ExecArgs,
    mut terminal: Option<&mut Terminal>,
) -> anyhow::Result<ExitCode> {
    let mut request = client.exec_ws_url(&a.id).into_client_request()?;
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {}", client.token()).parse()?,
    );
    let (socket, _) = tokio_tungstenite::connect_async(request)
        .await
        .with_context(|| format!("opening the exec WebSocket of sandbox {}", a.id))?;
    let (mut tx, mut rx) = socket.split();
    let mut first = serde_json::to_value(exec_body(a)?)?;
    if let (Some(terminal), Some(fields)) = (terminal.as_deref(), first.as_object_mut()) {
        let size = terminal.size();
        let tty = WsTerminal {
            tty: Some(true),
            rows: Some(size.rows),
            cols: Some(size.cols),
        };
        if let serde_json::Value::Object(tty) = serde_json::to_value(tty)? {
            fields.extend(tty);
        }
    }
    tx.send(Message::text(first.to_string())).await?;
    let control = |control: WsControl| -> anyhow::Result<Message> {
        Ok(Message::text(serde_json::to_string(&control)?))
    };
    let mut stdin = a.interactive.then(tty::stdin_chunks);
    if stdin.is_none() {
        // `-t` alone: the command's stdin ends at once, as without `-i` anywhere.
        let close = WsControl {
            close_stdin: Some(true),
            ..WsControl::default()
        };
        tx.send(control(close)?).await?;
    }
    let mut out = Output::default();
    loop {
        tokio::select! {
            chunk = async { stdin.as_mut().expect("guarded").recv().await }, if stdin.is_some() => match chunk {
                Some(chunk) => tx.send(Message::binary(chunk)).await?,
                None => {
                    stdin = None;
                    let close = WsControl { close_stdin: Some(true), ..WsControl::default() };
                    tx.send(control(close)?).await?;
                }
            },
            size = async { terminal.as_deref_mut().expect("guarded").resized().await }, if terminal.is_some() => {
                let resize = WsControl {
                    resize: Some(TerminalSize { rows: size.rows, cols: size.cols }),
                    ..WsControl::default()
                };
                tx.send(control(resize)?).await?;
            }
            message = rx.next() => match message {
                Some(Ok(Message::Text(text))) => {
                    let event: ExecEvent = serde_json::from_str(&text)?;
                    if let Some(code) = out.handle(event).await? {
                        return Ok(code);
                    }
                }
                Some(Ok(_)) => {}
                Some(Err(e)) => bail!("the exec WebSocket broke: {e}"),
                None => bail!("the exec WebSocket closed without an exit status"),
            },
        }
    }
}

/// Where exec events go: output to ours; the final event to an exit code.
#[derive(Default)]
pub(crate) struct Output {
    stdout: Option<tokio::io::Stdout>,
    stderr: Option<tokio::io::Stderr>,
}

impl Output {
    pub(crate) async fn handle(&mut self, event: ExecEvent) -> anyhow::Result<Option<ExitCode>> {
        if let Some(data) = &event.stdout {
            let out = self.stdout.get_or_insert_with(tokio::io::stdout);
            out.write_all(&B64.decode(data)?).await?;
            out.flush().await?;
        }
        if let Some(data) = &event.stderr {
            let err = self.stderr.get_or_insert_with(tokio::io::stderr);
            err.write_all(&B64.decode(data)?).await?;
            err.flush().await?;
        }
        if let Some(error) = event.error {
            bail!("the exec failed: {error}");
        }
        if event.timed_out == Some(true) {
            eprintln!("hearth: the command timed out and was killed");
            return Ok(Some(ExitCode::from(124)));
        }
        if let Some(code) = event.exit_code {
            return Ok(Some(ExitCode::from((code & 0xff) as u8)));
        }
        if let Some(signal) = event.signal {
            return Ok(Some(ExitCode::from(128u8.wrapping_add(signal as u8))));
        }
        Ok(None)
    }
}

async fn cp(client: &Client, a: CpArgs) -> anyhow::Result<ExitCode> {
    match (remote(&a.source), remote(&a.destination)) {
        (None, Some((id, path))) => {
            let local = PathBuf::from(&a.source);
            let file = tokio::fs::File::open(&local)
                .await
                .with_context(|| format!("opening {}", local.display()))?;
            let mode = {
                use std::os::unix::fs::PermissionsExt;
                file.metadata().await?.permissions().mode() & 0o7777
            };
            let body = reqwest::Body::wrap_stream(tokio_util::io::ReaderStream::new(file));
            client.put_file(id, path, mode, body).await?;
        }
        (Some((id, path)), None) => {
            let mut response = client.get_file(id, path).await?;
            let is_json = response
                .headers()
                .get(reqwest::header::CONTENT_TYPE)
                .is_some_and(|v| v.as_bytes().starts_with(b"application/json"));
            if is_json {
                let listing: DirListing = response.json().await?;
                bail!(
                    "{id}:{path} is a directory ({} entries); cp copies single files",
                    listing.entries.len()
                );
            }
            let local = PathBuf::from(&a.destination);
            let mut file = tokio::fs::File::create(&local)
                .await
                .with_context(|| format!("creating {}", local.display()))?;
            while let Some(chunk) = response.chunk().await.context("downloading")? {
                file.write_all(&chunk).await?;
            }
            file.flush().await?;
        }
        _ => bail!("name exactly one side as ID:/path, e.g. `hearth sandbox cp ./f ID:/tmp/f`"),
    }
    Ok(ExitCode::SUCCESS)
}

/// `ID:/path` -> (ID, /path). Local paths with a colon can be written `./a:b`.
fn remote(arg: &str) -> Option<(&str, &str)> {
    let (id, path) = arg.split_once(':')?;
    (!id.is_empty() && !id.contains('/') && path.starts_with('/')).then_some((id, path))
}

async fn rm(client: &Client, a: RmArgs) -> anyhow::Result<ExitCode> {
    let mut failed = false;
    for id in &a.ids {
        match client.delete(id).await {
            Ok(()) => println!("{id}"),
            Err(e) => {
                eprintln!("hearth: {}", crate::report::chain(&e));
                failed = true;
            }
        }
    }
    Ok(if failed {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

fn pairs(items: &[String], flag: &str) -> anyhow::Result<BTreeMap<String, String>> {
    items
        .iter()
        .map(|item| match item.split_once('=') {
            Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
            _ => bail!("{flag} {item:?}: expected KEY=VALUE"),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn remote_paths() {
        assert_eq!(remote("abc:/tmp/f"), Some(("abc", "/tmp/f")));
        assert_eq!(remote("./a:b"), None);
        assert_eq!(remote("/x:/y"), None);
        assert_eq!(remote("f"), None);
    }
}
