//! `hearth serve`: the node daemon. Builds the [`Node`] once from the flags (capacity, boot
//! concurrency, sandbox defaults and maxima, and the VM options `hearth run` has, [`VmArgs`]),
//! loads the tenants, binds, prints `listening on ADDR` on stdout, and serves the HTTP API
//! (`crate::serve`) until SIGTERM, SIGINT or SIGHUP; then it stops accepting, lets running execs
//! finish up to `--shutdown-grace` and exits 0. VMs keep running: the next `hearth serve` on the
//! same home re-attaches them.
//!
//! Other long-lived parts of the daemon get the same `Arc<Node>`: with `--kubernetes`, the
//! Kubernetes node agent ([`node_agent`]).

pub(crate) mod node_agent;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use hearth_sandbox::node::{Capacity, Limits, Node, NodeConfig};
use hearth_sandbox::SandboxConfig;

use crate::cli::GlobalArgs;
use crate::cmd::common::{
    parse_duration, parse_nonzero_size, parse_size, runtime, shutdown_signal, VmArgs, Workers,
};
use crate::cmd::images::RegistryArgs;
use crate::serve::{ApiSettings, AppState, Tenants};

#[derive(Args, Debug)]
pub struct ServeArgs {
    /// Address to listen on (port 0 picks a free port; the bound address is printed).
    #[arg(long, default_value = "127.0.0.1:8420")]
    pub listen: SocketAddr,
    /// Tenants and their tokens and quotas (TOML, or JSON for a .json file). Required unless
    /// --client-ca is given (then clients may authenticate with certificates only).
    #[arg(
        long,
        env = "HEARTH_TOKENS_FILE",
        required_unless_present_any = ["print_openapi", "client_ca"]
    )]
    pub tokens: Option<PathBuf>,
    #[command(flatten)]
    pub tls: TlsArgs,
    /// vCPUs the node hands out in total (default: the host's CPUs times --cpu-overcommit).
    #[arg(long)]
    pub capacity_cpus: Option<u32>,
    /// vCPUs handed out per host CPU when --capacity-cpus is not given (1 to 64). Idle sandboxes
    /// use no CPU, so the default lets a node hold four times as many as it has cores; memory
    /// stays a hard limit.
    #[arg(long, default_value_t = 4.0)]
    pub cpu_overcommit: f64,
    /// Guest memory the node hands out in total, like 8g (default: the host's memory).
    #[arg(long)]
    pub capacity_memory: Option<String>,
    /// Writable disk the node hands out in total, counting each sandbox's disk at its full size,
    /// like 500g (default: the space free on the home's filesystem at start).
    #[arg(long)]
    pub capacity_disk: Option<String>,
    /// Boots that run at once; more sandboxes wait in `creating`.
    #[arg(long, default_value_t = 2)]
    pub max_boots: usize,
    /// Default vCPUs of a sandbox.
    #[arg(long, default_value_t = 1)]
    pub cpus: u32,
    /// Default guest memory of a sandbox.
    #[arg(long, default_value = "512m")]
    pub memory: String,
    /// Default writable disk of a sandbox.
    #[arg(long, default_value = "4g")]
    pub disk: String,
    /// Largest vCPUs one sandbox may ask for.
    #[arg(long, default_value_t = 8)]
    pub max_cpus: u32,
    /// Largest memory one sandbox may ask for.
    #[arg(long, default_value = "16g")]
    pub max_memory: String,
    /// Largest disk one sandbox may ask for.
    #[arg(long, default_value = "64g")]
    pub max_disk: String,
    /// Longest lifetime of a sandbox; also the TTL of sandboxes created without one.
    #[arg(long, value_parser = parse_duration, default_value = "24h")]
    pub max_ttl: Duration,
    /// A sandbox paused for longer than this (default 7 days) is ended with its snapshot (its
    /// record says why).
    #[arg(long, value_parser = parse_duration, default_value = "168h")]
    pub max_paused: Duration,
    /// Keep N sandboxes of IMAGE booted for creates that ask for that image and size and no env,
    /// workdir, user or network policy (`IMAGE=N[,cpus=C,memory=M]`; repeatable). They count
    /// against the node's capacity, not against any tenant until a create takes one.
    #[arg(long, value_name = "IMAGE=N[,cpus=C,memory=M]", value_parser = parse_warm_pool)]
    pub warm_pool: Vec<hearth_sandbox::node::WarmPool>,
    /// Largest file upload.
    #[arg(long, default_value = "1g")]
    pub max_upload: String,
    /// Output kept per stream by `POST /v1/runs`; more is dropped and flagged `truncated`.
    #[arg(long, default_value = "1m")]
    pub run_output_limit: String,
    /// On SIGTERM, SIGINT or SIGHUP, how long running execs may take to finish.
    #[arg(long, value_parser = parse_duration, default_value = "30s")]
    pub shutdown_grace: Duration,
    /// A directory whose OCI layouts and archives tenants may boot (`oci-layout:DIR/x`,
    /// `oci-archive:DIR/x.tar`); repeatable. Without it only registry references are accepted.
    #[arg(long, value_name = "DIR")]
    pub allow_local_images: Vec<PathBuf>,
    #[command(flatten)]
    pub vm: VmArgs,
    #[command(flatten)]
    pub net: crate::cmd::network::NetHostArgs,
    /// The egress policy of a sandbox created without one: none (the default), open, or a policy
    /// as JSON (`{"mode":"allow","allow":["*.pypi.org"]}`). Tenants' ceilings still apply.
    #[arg(long, default_value = "none", value_parser = crate::cmd::network::parse_policy)]
    pub network_default: hearth_sandbox::NetworkPolicy,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print the OpenAPI document and exit (regenerates crates/hearth/openapi.json).
    #[arg(long)]
    pub print_openapi: bool,
    #[command(flatten)]
    pub kubernetes: node_agent::KubernetesArgs,
}

/// `--tls-cert`, `--tls-key`, `--client-ca`: HTTPS for the API, with client certificates.
#[derive(Args, Debug, Clone, Default)]
pub struct TlsArgs {
    /// Serve the API over HTTPS with this certificate chain (PEM); needs --tls-key.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// CA certificates (PEM): a client certificate that chains to one of them authenticates as the
    /// node's Kubernetes tenant (what `hearth gateway` uses), no token needed. Needs --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub client_ca: Option<PathBuf>,
}

impl TlsArgs {
    /// The server TLS configuration, when --tls-cert is given.
    pub fn server_config(&self) -> anyhow::Result<Option<Arc<rustls::ServerConfig>>> {
        let (Some(cert), Some(key)) = (&self.tls_cert, &self.tls_key) else {
            return Ok(None);
        };
        let files = crate::serve::tls::ServerTlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            client_ca: self.client_ca.clone(),
        };
        Ok(Some(crate::serve::tls::server_config(&files)?))
    }
}

/// The tenant a verified client certificate authenticates as: the one the Kubernetes node agent
/// creates its sandboxes under, limited only by the node's capacity (as the agent's own).
fn client_certificate_tenant() -> hearth_sandbox::node::Tenant {
    hearth_sandbox::node::Tenant {
        name: crate::serve::auth::RESERVED_TENANTS[0].to_string(),
        quota: hearth_sandbox::node::Quota::unlimited(),
        network_ceiling: hearth_sandbox::node::default_network_ceiling(),
    }
}

pub fn serve(g: &GlobalArgs, a: ServeArgs) -> anyhow::Result<ExitCode> {
    if a.print_openapi {
        print!("{}", crate::serve::openapi::document());
        return Ok(ExitCode::SUCCESS);
    }
    let runtime = runtime(Workers::PerCpu)?;
    runtime.block_on(serve_async(g, a))?;
    // Execs still streaming after the grace period are cut here, not waited for.
    runtime.shutdown_timeout(Duration::from_secs(1));
    Ok(ExitCode::SUCCESS)
}

async fn serve_async(g: &GlobalArgs, a: ServeArgs) -> anyhow::Result<()> {
    let mut tenants = match a.tokens.as_deref() {
        Some(tokens) => Tenants::load(tokens)?,
        None if a.tls.client_ca.is_some() => Tenants::none(),
        None => anyhow::bail!("--tokens FILE is required"),
    };
    if a.tls.client_ca.is_some() {
        tenants = tenants.with_client_certificate_tenant(client_certificate_tenant());
    }
    let tls = a.tls.server_config()?;
    let settings = api_settings(&a)?;
    let config = node_config(g, &a)?;
    let capacity = config.capacity;
    let config_default_disk = config.defaults.scratch_bytes;
    let listener = tokio::net::TcpListener::bind(a.listen)
        .await
        .with_context(|| format!("listening on {}", a.listen))?;
    let node = Node::open(config)
        .await
        .with_context(|| format!("opening the node state in {}", g.home.display()))?;
    // `--kubernetes`: the node agent shares the Node; it stops when this function returns.
    let _node_agent = node_agent::start(&a.kubernetes, node.clone(), capacity).await?;
    let addr = listener.local_addr()?;
    if capacity.disk_bytes < config_default_disk {
        tracing::warn!(
            capacity_disk = capacity.disk_bytes,
            default_disk = config_default_disk,
            "less disk free than one sandbox of the default size: creates that ask for the \
             default disk will be refused; pass --capacity-disk to overcommit sparse disks or \
             --disk for smaller ones"
        );
    }
    tracing::info!(
        %addr, vcpus = capacity.vcpus, memory_mib = capacity.memory_mib,
        disk_bytes = capacity.disk_bytes,
        "hearth serve ready"
    );
    // The one line on stdout: scripts and tests read the bound address from it.
    // (The same line with TLS: scripts pick the scheme they configured.)
    println!("listening on {addr}");
    let state = Arc::new(AppState {
        node,
        tenants,
        settings,
    });
    let stop = async {
        shutdown_signal().await;
    };
    match tls {
        Some(config) => {
            let listener = crate::serve::tls::TlsListener::new(listener, config)?;
            crate::serve::serve_tls(listener, state, stop, a.shutdown_grace).await?
        }
        None => crate::serve::serve(listener, state, stop, a.shutdown_grace).await?,
    }
    tracing::info!("hearth serve stopped");
    Ok(())
}

/// The API's own knobs the flags describe (`hearth mcp`'s in-process daemon takes them too).
pub(crate) fn api_settings(a: &ServeArgs) -> anyhow::Result<ApiSettings> {
    Ok(ApiSettings {
        max_upload_bytes: parse_size(&a.max_upload, "--max-upload")?,
        run_output_limit: parse_nonzero_size(&a.run_output_limit, "--run-output-limit")? as usize,
        ..ApiSettings::default()
    })
}

/// `cpus` host CPUs times `ratio` (`--cpu-overcommit`), at least one vCPU.
fn overcommitted(cpus: u32, ratio: f64) -> anyhow::Result<u32> {
    anyhow::ensure!(
        (1.0..=64.0).contains(&ratio),
        "--cpu-overcommit {ratio}: give a ratio from 1 to 64 (vCPUs handed out per host CPU)"
    );
    Ok(((f64::from(cpus) * ratio).floor() as u32).max(1))
}

/// The node the flags describe; its `defaults` is the sandbox `hearth run` would boot from the
/// same VM and size flags.
pub(crate) fn node_config(g: &GlobalArgs, a: &ServeArgs) -> anyhow::Result<NodeConfig> {
    let mut config = NodeConfig::new(&g.home);
    let host = Capacity::from_host(&g.home);
    config.capacity = Capacity {
        vcpus: match a.capacity_cpus {
            Some(n) => n,
            None => overcommitted(host.vcpus, a.cpu_overcommit)?,
        },
        memory_mib: match &a.capacity_memory {
            Some(s) => parse_size(s, "--capacity-memory")? >> 20,
            None => host.memory_mib,
        },
        disk_bytes: match &a.capacity_disk {
            Some(s) => parse_size(s, "--capacity-disk")?,
            None => host.disk_bytes,
        },
    };
    anyhow::ensure!(a.max_boots >= 1, "--max-boots must be at least 1");
    config.max_concurrent_boots = a.max_boots;
    config.max_paused = a.max_paused;
    config.warm_pools = a.warm_pool.clone();
    config.limits = Limits {
        max_vcpus: a.max_cpus,
        max_memory_mib: (parse_size(&a.max_memory, "--max-memory")? >> 20) as u32,
        max_disk_bytes: parse_size(&a.max_disk, "--max-disk")?,
        max_ttl: a.max_ttl,
    };
    let mut defaults = SandboxConfig::new(&g.home);
    defaults.vcpus = a.cpus;
    defaults.memory_mib = (parse_size(&a.memory, "--memory")? >> 20) as u32;
    defaults.scratch_bytes = parse_size(&a.disk, "--disk")?;
    a.vm.apply(&mut defaults);
    // The node puts its sandboxes' namespaces under its own directory (see `Node::start_vm`).
    defaults.network = a.net.networking(&g.home)?;
    config.defaults = defaults;
    config.network_default = a.network_default.clone();
    config.pull = a.registry.serve_pull_options()?;
    // Canonical once, here: the node compares resolved image paths against these.
    config.allow_local_images = a
        .allow_local_images
        .iter()
        .map(|dir| {
            std::fs::canonicalize(dir)
                .ok()
                .filter(|real| real.is_dir())
                .with_context(|| format!("--allow-local-images {}: not a directory", dir.display()))
        })
        .collect::<anyhow::Result<_>>()?;
    Ok(config)
}

/// `--warm-pool IMAGE=N[,cpus=C,memory=M]`.
fn parse_warm_pool(value: &str) -> Result<hearth_sandbox::node::WarmPool, String> {
    let usage = || format!("{value:?} is not IMAGE=N[,cpus=C,memory=M]");
    // An image reference has no `=`: the first one ends it.
    let (image, rest) = value.split_once('=').ok_or_else(usage)?;
    let mut parts = rest.split(',');
    let size = parts
        .next()
        .and_then(|n| n.parse::<usize>().ok())
        .filter(|&n| n >= 1)
        .ok_or_else(usage)?;
    let mut pool = hearth_sandbox::node::WarmPool {
        image: image.trim().to_owned(),
        size,
        vcpus: None,
        memory_mib: None,
    };
    for part in parts {
        match part.split_once('=') {
            Some(("cpus", c)) => pool.vcpus = Some(c.parse().map_err(|_| usage())?),
            Some(("memory", m)) => {
                let bytes = crate::units::bytes(m).ok_or_else(usage)?;
                pool.memory_mib = Some(u32::try_from(bytes >> 20).map_err(|_| usage())?);
            }
            _ => return Err(usage()),
        }
    }
    if pool.image.is_empty() {
        return Err(usage());
    }
    Ok(pool)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vcpus_are_overcommitted_by_the_ratio_and_bad_ratios_are_refused() {
        assert_eq!(overcommitted(2, 4.0).unwrap(), 8);
        assert_eq!(overcommitted(2, 1.0).unwrap(), 2);
        assert_eq!(overcommitted(3, 1.5).unwrap(), 4);
        for bad in [0.0, 0.5, 65.0, f64::NAN] {
            let e = overcommitted(2, bad).unwrap_err().to_string();
            assert!(e.contains("--cpu-overcommit"), "{e}");
        }
    }

    #[test]
    fn warm_pools_parse_with_and_without_a_size() {
        let pool = parse_warm_pool("reg:5000/hearth-test/busybox:1=3,cpus=2,memory=1g").unwrap();
        assert_eq!(pool.image, "reg:5000/hearth-test/busybox:1");
        assert_eq!(
            (pool.size, pool.vcpus, pool.memory_mib),
            (3, Some(2), Some(1024))
        );
        let plain = parse_warm_pool("python=1").unwrap();
        assert_eq!((plain.size, plain.vcpus, plain.memory_mib), (1, None, None));
        for bad in [
            "python",
            "python=0",
            "python=x",
            "=2",
            "python=2,gpus=1",
            "python=2,memory=lots",
        ] {
            assert!(parse_warm_pool(bad).is_err(), "{bad}");
        }
    }
}
