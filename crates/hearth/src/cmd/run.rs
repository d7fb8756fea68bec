//! `hearth run [OPTIONS] IMAGE [COMMAND [ARG...]]`: pull, boot a microVM, run one command through the
//! guest agent with `docker run` habits, stream its output, tear everything down, and exit with the
//! command's exit code (128+N when killed by signal N; 124 when `--timeout` fired; 125 for hearth's
//! own errors; 126/127 when the command cannot be run or found).

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use hearth_sandbox::command::{resolve, CommandOverrides, ImageDefaults};
use hearth_sandbox::{
    BootPlan, ExecOutput, ExecRequest, ExitStatus, Purpose, Sandbox, SandboxConfig,
};
use tokio::io::AsyncWriteExt;

use crate::cli::GlobalArgs;
use crate::cmd::common::{parse_duration, parse_size, runtime, shutdown_signal, VmArgs, Workers};
use crate::cmd::images::{Bars, RegistryArgs};
use crate::cmd::network::{NetHostArgs, PolicyArgs};
use crate::cmd::tty::{self, Terminal};

#[derive(Args, Debug)]
#[command(trailing_var_arg = true)]
pub struct RunArgs {
    /// Image reference: [registry/]repo[:tag|@digest], oci-layout:DIR[:TAG] or oci-archive:FILE[:TAG].
    pub image: String,
    /// Command and arguments (default: the image's Entrypoint and Cmd).
    #[arg(allow_hyphen_values = true)]
    pub command: Vec<String>,
    /// Set an environment variable (KEY=VALUE, or KEY to copy it from here). Repeatable.
    #[arg(short, long = "env", value_name = "KEY[=VALUE]")]
    pub env: Vec<String>,
    /// Working directory inside the guest.
    #[arg(short, long = "workdir", value_name = "DIR")]
    pub workdir: Option<String>,
    /// User (name or uid, optionally :group) to run as.
    #[arg(short, long, value_name = "USER[:GROUP]")]
    pub user: Option<String>,
    /// Keep stdin open and forward it to the command.
    #[arg(short, long)]
    pub interactive: bool,
    /// Give the command a terminal (combine as -it): ours goes raw, the guest's follows our window
    /// size, ^C interrupts the guest's foreground job. Needs stdin to be a terminal (warns and
    /// runs without one otherwise).
    #[arg(short = 't', long)]
    pub tty: bool,
    /// Override the image's Entrypoint ("" clears it).
    #[arg(long)]
    pub entrypoint: Option<String>,
    /// Virtual CPUs.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Guest memory (e.g. 512m, 2g).
    #[arg(short, long, default_value = "512m")]
    pub memory: String,
    /// Size of the sparse writable disk (e.g. 4g).
    #[arg(long, default_value = "4g")]
    pub disk: String,
    /// Kill the command (and everything it started) after this long: 30s, 5m, 1h or seconds.
    #[arg(long, value_parser = parse_duration)]
    pub timeout: Option<Duration>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub policy: PolicyArgs,
    #[command(flatten)]
    pub net: NetHostArgs,
    /// Print the VMM command line and VM configuration that would be used, and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print where the time went (boot phases, exec) to stderr when done.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

pub fn run(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<ExitCode> {
    runtime(Workers::Few)?.block_on(run_async(g, a))
}

async fn run_async(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<ExitCode> {
    let t0 = Instant::now();
    let config = sandbox_config(g, &a)?;
    let store = hearth_image::ImageStore::open(&g.home)
        .with_context(|| format!("opening the image store in {}", g.home.display()))?;
    let mut opts = a.registry.pull_options()?;
    let bars = std::io::stderr()
        .is_terminal()
        .then(|| Arc::new(Bars::new()));
    opts.progress = bars.clone().map(|b| b as Arc<dyn hearth_image::Progress>);
    let image = store
        .ensure(&a.image, &opts)
        .await
        .with_context(|| format!("pulling {}", a.image))?;
    if let Some(bars) = bars {
        bars.clear();
    }
    let pulled = t0.elapsed();

    let defaults = ImageDefaults::from(&image.config);
    let overrides = CommandOverrides {
        command: a.command.clone(),
        entrypoint: a.entrypoint.clone(),
        env: a.env.clone(),
        working_dir: a.workdir.clone(),
        user: a.user.clone(),
    };
    let command = resolve(&defaults, &overrides, |k| std::env::var(k).ok())?;

    if a.dry_run {
        let plan = BootPlan::prepare(&config, &image, "dry-run", Purpose::DryRun)?;
        println!("# vmm: {}", plan.selection);
        println!("# image: {} ({})", image.reference, image.manifest_digest);
        println!(
            "# command: {:?} user={} cwd={}",
            command.argv, command.user, command.working_dir
        );
        println!("# snapshot: {}", plan.snapshot_note);
        if let Some(restore) = &plan.restore {
            println!(
                "# then QMP: migrate-incoming exec:cat {}; cont; the agent gets RESUME (clock, seed, hostname {})",
                restore.template.state.display(),
                restore.hostname
            );
        }
        print!("{}", plan.dry_run()?);
        return Ok(ExitCode::SUCCESS);
    }

    let sandbox = Sandbox::create(&config, image).await?;
    tracing::info!(vmm = sandbox.selection(), "sandbox {} ready", sandbox.id());
    // Guest-side milestones, asked for only when they will be printed (one round trip).
    let marks = match a.timings {
        true => sandbox
            .client()
            .info()
            .await
            .ok()
            .and_then(|info| info.boot),
        false => None,
    };
    let exec_started = Instant::now();
    let mut request = command.into_request(a.interactive, a.timeout);
    // Raw from here until the command has ended (dropped below, or on any early return).
    let mut terminal = match tty::usable(a.tty) {
        true => {
            Some(Terminal::attach(a.interactive).context("putting the terminal into raw mode")?)
        }
        false => None,
    };
    request.tty = terminal.as_ref().map(Terminal::size);
    let outcome = tokio::select! {
        status = exec(&sandbox, request, terminal.as_mut()) => Outcome::Exited(status),
        signal = shutdown_signal() => Outcome::Signalled(signal),
    };
    drop(terminal);
    let exec_time = exec_started.elapsed();
    let code = match outcome {
        Outcome::Signalled(signal) => {
            sandbox.kill_now();
            drop(sandbox);
            return Ok(ExitCode::from(128 + signal as u8));
        }
        Outcome::Exited(status) => {
            let status = match status {
                Ok(status) => status,
                Err(err) => {
                    let _ = sandbox.discard().await;
                    return Err(err);
                }
            };
            exit_code(&status, a.timeout)
        }
    };
    let boot = sandbox.timings();
    let teardown_started = Instant::now();
    if let Err(err) = sandbox.discard().await {
        tracing::warn!("tearing down the VM: {err}");
    }
    if a.timings {
        // Cold boot: guest-boot (host clock: VMM answered until handshake done) splits, on the
        // guest's clock, into kernel boot (uptime at /init) and agent init; the rest is QEMU loading
        // the kernel before the guest clock starts plus the handshake. Restored: vmm-start includes
        // loading the template state (restore), and guest-boot is mostly the agent's late init
        // after RESUME (resume, on the guest's clock).
        let split = match (boot.restore, marks) {
            (Some(restore), marks) => format!(
                " (restore {:.3}s{})",
                restore.as_secs_f64(),
                marks
                    .and_then(|m| m.resume_ms)
                    .map_or(String::new(), |ms| format!(
                        " resume {:.3}s",
                        ms as f64 / 1000.0
                    ))
            ),
            (None, Some(m)) => format!(
                " (kernel-boot {:.3}s agent-init {:.3}s)",
                m.init_ms as f64 / 1000.0,
                m.ready_ms.saturating_sub(m.init_ms) as f64 / 1000.0
            ),
            (None, None) => String::new(),
        };
        eprintln!(
            "hearth timings: pull {:.3}s prepare {:.3}s vmm-start {:.3}s guest-boot {:.3}s{split} exec {:.3}s teardown {:.3}s total {:.3}s",
            pulled.as_secs_f64(),
            boot.prepare.as_secs_f64(),
            boot.vmm_start.as_secs_f64(),
            boot.guest_boot.as_secs_f64(),
            exec_time.as_secs_f64(),
            teardown_started.elapsed().as_secs_f64(),
            t0.elapsed().as_secs_f64(),
        );
    }
    Ok(ExitCode::from(code))
}

enum Outcome {
    Exited(anyhow::Result<ExitStatus>),
    Signalled(i32),
}

/// Runs the command, copying its output to ours as it comes and (with -i) our stdin to it; with a
/// terminal, our window size follows to the guest's.
async fn exec(
    sandbox: &Sandbox,
    request: ExecRequest,
    mut terminal: Option<&mut Terminal>,
) -> anyhow::Result<ExitStatus> {
    let forward_stdin = request.stdin;
    let mut handle = sandbox.client().exec(request).await?;
    if forward_stdin {
        if let Some(mut stdin) = handle.take_stdin() {
            let mut ours = tty::stdin_chunks();
            tokio::spawn(async move {
                while let Some(chunk) = ours.recv().await {
                    if stdin.write(&chunk).await.is_err() {
                        return;
                    }
                }
                let _ = stdin.close().await;
            });
        }
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    loop {
        let output = match terminal.as_deref_mut() {
            Some(terminal) => tokio::select! {
                output = handle.next_output() => output?,
                size = terminal.resized() => {
                    // Fails only once the command is gone; its exit status follows.
                    if let Err(e) = handle.resize(size).await {
                        tracing::debug!("resizing the guest's terminal: {e}");
                    }
                    continue;
                }
            },
            None => handle.next_output().await?,
        };
        let Some(output) = output else { break };
        // Write before asking for more: the agent only sends what we have room for.
        match output {
            ExecOutput::Stdout(data) => {
                stdout.write_all(&data).await?;
                stdout.flush().await?;
            }
            ExecOutput::Stderr(data) => {
                stderr.write_all(&data).await?;
                stderr.flush().await?;
            }
        }
    }
    Ok(handle.wait().await?)
}

fn exit_code(status: &ExitStatus, timeout: Option<Duration>) -> u8 {
    if status.timed_out {
        if let Some(t) = timeout {
            eprintln!("hearth: the command timed out after {t:?} and was killed");
        }
        return 124;
    }
    match (status.code, status.signal) {
        (Some(code), _) => (code & 0xff) as u8,
        (None, Some(signal)) => 128u8.wrapping_add(signal as u8),
        (None, None) => 125,
    }
}

/// The sandbox `hearth run` boots: its size flags plus the shared VM options.
pub(crate) fn sandbox_config(g: &GlobalArgs, a: &RunArgs) -> anyhow::Result<SandboxConfig> {
    let mut config = SandboxConfig::new(&g.home);
    config.vcpus = a.cpus;
    config.memory_mib = (parse_size(&a.memory, "--memory")? >> 20) as u32;
    config.scratch_bytes = parse_size(&a.disk, "--disk")?;
    a.vm.apply(&mut config);
    // A dry run shows the NIC the real run would get (nothing is set up until the boot).
    config.network = a.net.networking(&g.home)?;
    config.network_policy = a.policy.policy()?.unwrap_or_default();
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_follow_docker() {
        assert_eq!(exit_code(&ExitStatus::exited(3), None), 3);
        assert_eq!(exit_code(&ExitStatus::signaled(9), None), 137);
        let timed_out = ExitStatus {
            timed_out: true,
            ..ExitStatus::signaled(9)
        };
        assert_eq!(exit_code(&timed_out, Some(Duration::from_secs(1))), 124);
    }
}
