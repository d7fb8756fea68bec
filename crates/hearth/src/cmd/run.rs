//! `hearth run [OPTIONS] IMAGE [COMMAND [ARG...]]`: pull, boot a microVM, run one command through the
//! guest agent with `docker run` habits, stream its output, tear everything down, and exit with the
//! command's exit code (128+N when killed by signal N; 124 when `--timeout` fired; 125 for hearth's
//! own errors; 126/127 when the command cannot be run or found).

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::{Args, ValueEnum};
use hearth_sandbox::command::{resolve, CommandOverrides, ImageDefaults};
use hearth_sandbox::{BootPlan, Purpose, Sandbox, SandboxConfig, VmmChoice};
use hearth_vm::channel::{ExecOutput, ExecRequest, ExitStatus};
use hearth_vm::Accel;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::signal::unix::{signal, SignalKind};

use crate::cli::GlobalArgs;
use crate::cmd::images::{Bars, RegistryArgs};

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
    #[arg(long, value_enum, env = "HEARTH_VMM", default_value_t = VmmArg::Auto)]
    pub vmm: VmmArg,
    #[arg(long, value_enum, env = "HEARTH_ACCEL", default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest kernel: a kernel directory (vmlinuz, release, modules/) or a vmlinux/bzImage file.
    #[arg(long, env = "HEARTH_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The static guest agent binary (default: HEARTH_AGENT, then hearth's home, then the build tree).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// With Firecracker: run it through its jailer (chroot, cgroup v2 limits, PID namespace) as this
    /// unprivileged user and group.
    #[arg(long, value_name = "UID:GID", value_parser = parse_ids)]
    pub jailer: Option<(u32, u32)>,
    /// Boot the guest kernel instead of restoring a QEMU snapshot template (also HEARTH_SNAPSHOT=0).
    #[arg(long)]
    pub no_snapshot: bool,
    /// Print the VMM command line and VM configuration that would be used, and start nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Print where the time went (boot phases, exec) to stderr when done.
    #[arg(long)]
    pub timings: bool,
    #[command(flatten)]
    pub registry: RegistryArgs,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum VmmArg {
    Auto,
    Qemu,
    Firecracker,
}

#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

pub fn run(g: &GlobalArgs, a: RunArgs) -> anyhow::Result<ExitCode> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(run_async(g, a))
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

    let c = &image.config;
    let defaults = ImageDefaults {
        entrypoint: c.entrypoint.clone(),
        cmd: c.cmd.clone(),
        env: c.env.clone(),
        working_dir: c.working_dir.clone(),
        user: c.user.clone(),
    };
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
                restore.template.state().display(),
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
    let request = ExecRequest {
        argv: command.argv,
        env: command.env,
        cwd: Some(command.working_dir),
        user: Some(command.user),
        stdin: a.interactive,
        timeout_ms: a.timeout.map(|t| t.as_millis() as u64),
    };
    let outcome = tokio::select! {
        status = exec(&sandbox, request) => Outcome::Exited(status),
        signal = terminated() => Outcome::Signalled(signal),
    };
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

/// Runs the command, copying its output to ours as it comes and (with -i) our stdin to it.
async fn exec(sandbox: &Sandbox, request: ExecRequest) -> anyhow::Result<ExitStatus> {
    let forward_stdin = request.stdin;
    let mut handle = sandbox.client().exec(request).await?;
    if forward_stdin {
        if let Some(mut stdin) = handle.take_stdin() {
            tokio::spawn(async move {
                let mut ours = tokio::io::stdin();
                let mut buf = vec![0u8; 64 * 1024];
                loop {
                    match ours.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            if stdin.write(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    }
                }
                let _ = stdin.close().await;
            });
        }
    }
    let mut stdout = tokio::io::stdout();
    let mut stderr = tokio::io::stderr();
    while let Some(output) = handle.next_output().await? {
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

/// SIGINT, SIGTERM or SIGHUP to hearth: the caller tears the VM down.
async fn terminated() -> i32 {
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    tokio::select! {
        _ = int.recv() => libc::SIGINT,
        _ = term.recv() => libc::SIGTERM,
        _ = hup.recv() => libc::SIGHUP,
    }
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

fn sandbox_config(g: &GlobalArgs, a: &RunArgs) -> anyhow::Result<SandboxConfig> {
    let mut config = SandboxConfig::new(&g.home);
    config.vcpus = a.cpus;
    config.memory_mib = (parse_size(&a.memory, "--memory")? >> 20) as u32;
    config.scratch_bytes = parse_size(&a.disk, "--disk")?;
    config.vmm = match a.vmm {
        VmmArg::Auto => VmmChoice::Auto,
        VmmArg::Qemu => VmmChoice::Qemu,
        VmmArg::Firecracker => VmmChoice::Firecracker,
    };
    config.accel = match a.accel {
        AccelArg::Auto => Accel::Auto,
        AccelArg::Kvm => Accel::Kvm,
        AccelArg::Tcg => Accel::Tcg,
    };
    config.kernel = a.kernel.clone();
    config.agent = a.agent.clone();
    config.jailer = a.jailer;
    if a.no_snapshot {
        config.snapshot = false;
    }
    Ok(config)
}

fn parse_size(value: &str, flag: &str) -> anyhow::Result<u64> {
    hearth_image::parse_size(value)
        .filter(|&n| n >= 1 << 20)
        .with_context(|| format!("{flag} {value:?} is not a size of at least 1m, like 512m or 2g"))
}

/// `UID:GID`, numeric.
fn parse_ids(value: &str) -> Result<(u32, u32), String> {
    let (uid, gid) = value
        .split_once(':')
        .ok_or("expected UID:GID, e.g. 1234:1234")?;
    let id = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{s:?} is not a numeric id"))
    };
    Ok((id(uid)?, id(gid)?))
}

/// `30s`, `5m`, `1h`, `250ms` or plain seconds.
pub fn parse_duration(value: &str) -> Result<Duration, String> {
    let value = value.trim();
    let (number, unit) = value
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((value, "s"), |i| value.split_at(i));
    let n: f64 = number
        .parse()
        .map_err(|_| format!("{value:?} is not a duration like 30s"))?;
    let secs = match unit {
        "ms" => n / 1000.0,
        "s" => n,
        "m" => n * 60.0,
        "h" => n * 3600.0,
        _ => {
            return Err(format!(
                "{value:?}: unknown unit {unit:?} (use ms, s, m or h)"
            ))
        }
    };
    if !(secs > 0.0 && secs.is_finite()) {
        return Err(format!("{value:?} must be a positive duration"));
    }
    Ok(Duration::from_secs_f64(secs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("5m").unwrap(), Duration::from_secs(300));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("2").unwrap(), Duration::from_secs(2));
        assert!(parse_duration("0").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

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
