//! Plumbing every subcommand shares, kept in one place so the commands cannot drift apart: the VM
//! options of `hearth run` and `hearth serve` ([`VmArgs`], flattened into both), the duration and
//! byte-size parsers behind flags like `--timeout 30s` and `--memory 512m`, the signal that shuts a
//! command down, the async runtime a command runs on, and this host's name. Touches nothing but the
//! values it is given (and, for [`shutdown_signal`], the process's signal dispositions).

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, ValueEnum};
use hearth_sandbox::{Accel, Jailer, SandboxConfig, VmmChoice};
use tokio::signal::unix::{signal, SignalKind};

/// How a guest VM is run: the same flags (and environment variables) for `hearth run` and for the
/// sandboxes of `hearth serve`.
#[derive(Args, Debug, Clone)]
pub struct VmArgs {
    /// Virtual machine monitor (auto: Firecracker where KVM boots guests, else QEMU).
    #[arg(long, value_enum, env = "HEARTH_VMM", default_value_t = VmmArg::Auto)]
    pub vmm: VmmArg,
    /// Accelerator (auto: KVM when it works, else TCG emulation).
    #[arg(long, value_enum, env = "HEARTH_ACCEL", default_value_t = AccelArg::Auto)]
    pub accel: AccelArg,
    /// Guest kernel: a kernel directory (vmlinuz, release, modules/) or a vmlinux/bzImage file.
    #[arg(long, env = "HEARTH_KERNEL")]
    pub kernel: Option<PathBuf>,
    /// The static guest agent binary (default: HEARTH_AGENT, then hearth's home, then the build tree).
    #[arg(long)]
    pub agent: Option<PathBuf>,
    /// With Firecracker: run it through its jailer (chroot, cgroup limits, PID namespace) as this
    /// unprivileged user and group, `auto`: as a uid and gid of each VM's own (the default as
    /// root), or `off`: unconfined, as hearth's own user.
    #[arg(long, value_name = "UID:GID|auto|off", value_parser = parse_jailer)]
    pub jailer: Option<Jailer>,
    /// QEMU without KVM: TCG's translation cache in MiB. Smaller holds less host memory per idle
    /// sandbox but re-translates more (bench/README, density).
    #[arg(long, value_name = "MIB", env = "HEARTH_TCG_CACHE",
          default_value_t = hearth_vm::qemu::TCG_CACHE_DEFAULT_MIB,
          value_parser = clap::value_parser!(u32).range(
              hearth_vm::qemu::TCG_CACHE_MIN_MIB as i64..=hearth_vm::qemu::TCG_CACHE_DEFAULT_MIB as i64))]
    pub tcg_cache: u32,
    /// Boot templates kept on disk at most (one per VM configuration in use). Before a new one is
    /// built, stale ones and the least recently used (idle for 10 minutes) make room; when none
    /// can, the VM boots cold.
    #[arg(long, value_name = "N", env = "HEARTH_MAX_TEMPLATES",
          default_value_t = hearth_vm::qemu::MAX_TEMPLATES_DEFAULT,
          value_parser = clap::builder::RangedU64ValueParser::<usize>::new().range(1..=4096))]
    pub max_templates: usize,
    /// Boot the guest kernel instead of restoring a QEMU snapshot template (also HEARTH_SNAPSHOT=0).
    #[arg(long)]
    pub no_snapshot: bool,
}

/// `--vmm`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum VmmArg {
    Auto,
    Qemu,
    Firecracker,
}

/// `--accel`.
#[derive(ValueEnum, Clone, Copy, Debug)]
pub enum AccelArg {
    Auto,
    Kvm,
    Tcg,
}

impl VmArgs {
    /// Sets the VM fields of `config`; the rest (size, home) is the caller's.
    pub fn apply(&self, config: &mut SandboxConfig) {
        config.vmm = match self.vmm {
            VmmArg::Auto => VmmChoice::Auto,
            VmmArg::Qemu => VmmChoice::Qemu,
            VmmArg::Firecracker => VmmChoice::Firecracker,
        };
        config.accel = match self.accel {
            AccelArg::Auto => Accel::Auto,
            AccelArg::Kvm => Accel::Kvm,
            AccelArg::Tcg => Accel::Tcg,
        };
        config.kernel = self.kernel.clone();
        config.agent = self.agent.clone();
        config.jailer = self.jailer.unwrap_or_default();
        config.tcg_cache_mib = self.tcg_cache;
        config.max_templates = self.max_templates;
        // Without the flag, `HEARTH_SNAPSHOT` (read by `SandboxConfig::new`) decides.
        if self.no_snapshot {
            config.snapshot = false;
        }
    }
}

/// `UID:GID`, numeric, `auto` (a uid and gid per VM) or `off`.
fn parse_jailer(value: &str) -> Result<Jailer, String> {
    match value {
        "auto" => return Ok(Jailer::PerVm),
        "off" => return Ok(Jailer::Off),
        _ => {}
    }
    let (uid, gid) = value
        .split_once(':')
        .ok_or("expected UID:GID, e.g. 1234:1234")?;
    let id = |s: &str| {
        s.parse::<u32>()
            .map_err(|_| format!("{s:?} is not a numeric id"))
    };
    Ok(Jailer::Ids(id(uid)?, id(gid)?))
}

pub use crate::units::parse_duration;

const MIB: u64 = 1 << 20;

/// A size of at least 1m given to `flag` (guest memory, disks, capacities, upload limits):
/// `512m`, `8g`, or bytes.
pub fn parse_size(value: &str, flag: &str) -> anyhow::Result<u64> {
    crate::units::bytes(value)
        .filter(|&n| n >= MIB)
        .with_context(|| format!("{flag} {value:?} is not a size of at least 1m, like 512m or 8g"))
}

/// A size above zero given to `flag` (`--run-output-limit`), where less than 1m makes sense.
pub fn parse_nonzero_size(value: &str, flag: &str) -> anyhow::Result<u64> {
    crate::units::bytes(value)
        .filter(|&n| n > 0)
        .with_context(|| format!("{flag} {value:?} is not a size like 1m"))
}

/// Any size, zero included, given to `flag` (`--cache-max`).
pub fn parse_any_size(value: &str, flag: &str) -> anyhow::Result<u64> {
    crate::units::bytes(value).with_context(|| format!("{flag} {value:?} is not a size like 20G"))
}

/// Resolves with the signal number on SIGINT, SIGTERM or SIGHUP: `hearth run` tears its VM down and
/// exits 128+N; the daemons stop gracefully. Handlers are installed on first poll, so call this
/// inside the runtime; from then on these signals no longer kill the process outright.
pub async fn shutdown_signal() -> i32 {
    let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler");
    let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut hup = signal(SignalKind::hangup()).expect("SIGHUP handler");
    let (number, name) = tokio::select! {
        _ = int.recv() => (libc::SIGINT, "SIGINT"),
        _ = term.recv() => (libc::SIGTERM, "SIGTERM"),
        _ = hup.recv() => (libc::SIGHUP, "SIGHUP"),
    };
    tracing::info!("{name}: shutting down");
    number
}

/// How many worker threads a command's runtime gets.
#[derive(Clone, Copy, Debug)]
pub enum Workers {
    /// A command that does one thing and exits: two threads are plenty and start fast.
    Few,
    /// A daemon serving many clients: one per CPU, and the heap kept trimmed ([`crate::heap`]).
    PerCpu,
}

/// The async runtime a command runs on (I/O and timers enabled).
pub fn runtime(workers: Workers) -> anyhow::Result<tokio::runtime::Runtime> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    match workers {
        Workers::Few => drop(builder.worker_threads(2)),
        Workers::PerCpu => crate::heap::bound_retention(),
    }
    builder
        .enable_all()
        .build()
        .context("starting the async runtime")
}

/// This host's name (the kernel's, as `hostname` prints it).
pub fn host_name() -> std::io::Result<String> {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_string())
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::cli::{Cli, Command};

    #[test]
    fn sizes_keep_their_lower_bounds_and_name_the_flag() {
        assert_eq!(parse_size("512m", "--memory").unwrap(), 512 * MIB);
        assert_eq!(parse_size("2G", "--disk").unwrap(), 2 << 30);
        let err = parse_size("1k", "--memory").unwrap_err().to_string();
        assert!(
            err.contains("--memory") && err.contains("at least 1m"),
            "{err}"
        );
        assert!(parse_size("lots", "--disk").is_err());

        assert_eq!(
            parse_nonzero_size("1k", "--run-output-limit").unwrap(),
            1024
        );
        let err = parse_nonzero_size("0", "--run-output-limit").unwrap_err();
        assert!(err.to_string().contains("--run-output-limit"), "{err}");

        assert_eq!(parse_any_size("0", "--cache-max").unwrap(), 0);
        assert!(parse_any_size("x", "--cache-max").is_err());
    }

    #[test]
    fn jailer_ids_are_numeric_pairs() {
        assert_eq!(parse_jailer("1234:5678"), Ok(Jailer::Ids(1234, 5678)));
        assert!(parse_jailer("1234").is_err());
        assert!(parse_jailer("me:you").is_err());
        assert_eq!(parse_jailer("auto"), Ok(Jailer::PerVm));
        assert_eq!(parse_jailer("off"), Ok(Jailer::Off));
    }

    /// The sandbox config `hearth run` and `hearth serve` (its sandbox defaults) build from `vm`.
    fn configs(vm: &[&str]) -> (SandboxConfig, SandboxConfig) {
        let parse = |head: &[&str], tail: &[&str]| {
            let argv = ["hearth", "--home", "/nonexistent/hearth"]
                .iter()
                .chain(head)
                .chain(vm)
                .chain(tail);
            Cli::try_parse_from(argv).unwrap()
        };
        let run = parse(&["run"], &["busybox"]);
        let serve = parse(&["serve", "--tokens", "tokens.toml"], &[]);
        let run_config = match &run.command {
            Command::Run(a) => crate::cmd::run::sandbox_config(&run.global, a).unwrap(),
            other => panic!("parsed as {other:?}"),
        };
        let serve_config = match &serve.command {
            Command::Serve(a) => {
                crate::cmd::serve::node_config(&serve.global, a)
                    .unwrap()
                    .defaults
            }
            other => panic!("parsed as {other:?}"),
        };
        (run_config, serve_config)
    }

    fn vm_fields(c: &SandboxConfig) -> String {
        format!(
            "{:?} {:?} {:?} {:?} {:?} {}",
            c.vmm, c.accel, c.kernel, c.agent, c.jailer, c.snapshot
        )
    }

    // One test for flags and environment: it sets process-wide variables that every parse reads.
    #[test]
    fn run_and_serve_take_the_same_vm_flags_and_environment() {
        let (run, serve) = configs(&[
            "--vmm",
            "firecracker",
            "--accel",
            "tcg",
            "--kernel",
            "/k/vmlinux",
            "--agent",
            "/a/agent",
            "--jailer",
            "1000:1001",
            "--no-snapshot",
        ]);
        assert_eq!(serve.vmm, VmmChoice::Firecracker);
        assert_eq!(serve.accel, Accel::Tcg);
        assert_eq!(serve.kernel, Some(PathBuf::from("/k/vmlinux")));
        assert_eq!(serve.agent, Some(PathBuf::from("/a/agent")));
        assert_eq!(serve.jailer, Jailer::Ids(1000, 1001));
        assert!(!serve.snapshot);
        assert_eq!(vm_fields(&run), vm_fields(&serve));

        std::env::set_var("HEARTH_VMM", "qemu");
        std::env::set_var("HEARTH_ACCEL", "kvm");
        std::env::set_var("HEARTH_KERNEL", "/env/kernel");
        let (run, serve) = configs(&[]);
        let (flagged, _) = configs(&["--vmm", "auto"]);
        std::env::remove_var("HEARTH_VMM");
        std::env::remove_var("HEARTH_ACCEL");
        std::env::remove_var("HEARTH_KERNEL");
        assert_eq!(serve.vmm, VmmChoice::Qemu);
        assert_eq!(serve.accel, Accel::Kvm);
        assert_eq!(serve.kernel, Some(PathBuf::from("/env/kernel")));
        assert_eq!(vm_fields(&run), vm_fields(&serve));
        assert_eq!(flagged.vmm, VmmChoice::Auto, "a flag beats the environment");
    }
}
