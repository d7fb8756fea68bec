//! `hearth pull`, `hearth images`, `hearth rmi`, `hearth image inspect|gc`: thin front ends over
//! `hearth_image::ImageStore`. Progress bars only when stderr is a terminal; `--json` prints the result
//! object on stdout.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::Context;
use clap::{Args, Subcommand};
use hearth_image::{
    Digest, HostCredentials, ImageRecord, ImageStore, Platform, Progress, PullOptions, PullPolicy,
};
use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::cli::GlobalArgs;
use crate::cmd::common::{parse_any_size, runtime, Workers};

/// Options shared by commands that reach a registry.
#[derive(Args, Debug, Clone)]
pub struct RegistryArgs {
    /// Registry (host[:port]) to reach over plain HTTP. Repeatable.
    #[arg(
        long = "insecure-registry",
        env = "HEARTH_INSECURE_REGISTRIES",
        value_delimiter = ','
    )]
    pub insecure_registries: Vec<String>,
    /// Credentials for one registry host, sent to that host only (overrides its
    /// ~/.docker/config.json entry). Repeatable. Visible in `ps`: prefer --creds-file.
    #[arg(long, value_name = "HOST=USER:PASS")]
    pub creds: Vec<String>,
    /// File of `HOST=USER:PASS` lines (`#` comments allowed); must be mode 600 or stricter.
    #[arg(long, env = "HEARTH_CREDS_FILE", value_name = "FILE")]
    pub creds_file: Option<PathBuf>,
    /// Platform to pick from a multi-platform image.
    #[arg(long, default_value = "linux/amd64")]
    pub platform: String,
    /// Evict least-recently-used images while the cache exceeds this size (e.g. 20G; `none` for no
    /// limit). `hearth serve` defaults to 20G; `hearth pull` and `hearth run` to no limit.
    #[arg(long, env = "HEARTH_IMAGE_CACHE_MAX", value_name = "SIZE")]
    pub cache_max: Option<String>,
    /// `hearth serve`: let registry redirects and token realms point at loopback, link-local,
    /// private or cloud-metadata addresses (refused by default; the CLI always allows them).
    #[arg(long, env = "HEARTH_ALLOW_PRIVATE_REGISTRIES")]
    pub allow_private_registries: bool,
}

/// The image-cache budget of `hearth serve` when --cache-max is not given.
pub const SERVE_CACHE_MAX: u64 = 20 << 30;

impl RegistryArgs {
    /// Pull options from these flags (and their environment variables), defaults elsewhere. The
    /// CLI's pulls may follow redirects and token realms to private addresses.
    pub fn pull_options(&self) -> anyhow::Result<PullOptions> {
        let mut credentials = HostCredentials::new();
        if !self.creds.is_empty() {
            eprintln!(
                "hearth: warning: --creds puts a password on the command line, where `ps` shows it \
                 to every local user; prefer --creds-file FILE (mode 600)"
            );
        }
        for entry in &self.creds {
            credentials.add_entry(entry).context("--creds")?;
        }
        if let Some(file) = &self.creds_file {
            credentials.add_file(file).context("--creds-file")?;
        }
        Ok(PullOptions {
            platform: self.platform.parse::<Platform>()?,
            insecure_registries: self.insecure_registries.clone(),
            credentials,
            cache_budget: self.cache_budget()?,
            ..PullOptions::default()
        })
    }

    /// Pull options for `hearth serve`: redirect and token-realm targets on private addresses are
    /// refused unless --allow-private-registries, and the cache budget defaults to 20G.
    pub fn serve_pull_options(&self) -> anyhow::Result<PullOptions> {
        let mut opts = self.pull_options()?;
        opts.allow_private = self.allow_private_registries;
        if self.cache_max.is_none() {
            opts.cache_budget = Some(SERVE_CACHE_MAX);
        }
        Ok(opts)
    }

    fn cache_budget(&self) -> anyhow::Result<Option<u64>> {
        match self.cache_max.as_deref() {
            None | Some("none") => Ok(None),
            Some(max) => Ok(Some(parse_any_size(max, "--cache-max")?)),
        }
    }
}

#[derive(Args, Debug)]
pub struct PullArgs {
    /// Image reference: [registry/]repo[:tag|@digest], oci-layout:DIR[:TAG] or oci-archive:FILE[:TAG].
    pub image: String,
    #[command(flatten)]
    pub registry: RegistryArgs,
    /// Print the result as JSON.
    #[arg(long)]
    pub json: bool,
    /// Print only the manifest digest.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct ImagesArgs {
    #[arg(long)]
    pub json: bool,
    /// Print only manifest digests.
    #[arg(short, long)]
    pub quiet: bool,
}

#[derive(Args, Debug)]
pub struct RmiArgs {
    /// Image references or manifest digests (a prefix of 12+ hex digits will do).
    #[arg(required = true)]
    pub images: Vec<String>,
    #[arg(long)]
    pub json: bool,
}

#[derive(Subcommand, Debug)]
pub enum ImageCommand {
    /// Show an image's record, manifest and config as JSON.
    Inspect { image: String },
    /// Delete blobs and root filesystems no cached image uses, and stale temp files.
    Gc {
        #[arg(long)]
        json: bool,
    },
}

fn open_store(g: &GlobalArgs) -> anyhow::Result<ImageStore> {
    ImageStore::open(&g.home)
        .with_context(|| format!("opening the image store in {}", g.home.display()))
}

pub fn pull(g: &GlobalArgs, a: PullArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(g)?;
    let mut opts = a.registry.pull_options()?;
    opts.policy = PullPolicy::Always;
    let bars =
        (!a.json && !a.quiet && std::io::stderr().is_terminal()).then(|| Arc::new(Bars::new()));
    opts.progress = bars.clone().map(|b| b as Arc<dyn Progress>);
    let image = runtime(Workers::Few)?
        .block_on(store.ensure(&a.image, &opts))
        .with_context(|| format!("pulling {}", a.image))?;
    if let Some(b) = bars {
        b.clear();
    }
    if a.json {
        let out = serde_json::json!({
            "reference": image.reference.to_string(),
            "platform": image.platform.to_string(),
            "manifest_digest": image.manifest_digest.to_string(),
            "rootfs": image.rootfs,
            "config": image.config,
            "cached": image.cached,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else if a.quiet {
        println!("{}", image.manifest_digest);
    } else {
        let how = if image.cached { "up to date" } else { "pulled" };
        println!(
            "{} ({}): {how}, {}",
            image.reference,
            image.manifest_digest,
            image.rootfs.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

pub fn list(g: &GlobalArgs, a: ImagesArgs) -> anyhow::Result<ExitCode> {
    let images = open_store(g)?.list()?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&images)?);
    } else if a.quiet {
        images
            .iter()
            .for_each(|r| println!("{}", r.manifest_digest));
    } else {
        print_table(&images);
    }
    Ok(ExitCode::SUCCESS)
}

fn print_table(images: &[ImageRecord]) {
    let rows: Vec<[String; 5]> = images
        .iter()
        .map(|r| {
            [
                r.reference.clone(),
                r.platform.clone(),
                r.manifest_digest.short().to_string(),
                human_size(r.size()),
                ago(r.last_used),
            ]
        })
        .collect();
    let header = ["REFERENCE", "PLATFORM", "DIGEST", "SIZE", "LAST USED"].map(String::from);
    let mut widths = header.clone().map(|h| h.len());
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.len());
        }
    }
    for row in std::iter::once(&header).chain(&rows) {
        let line: Vec<String> = row
            .iter()
            .zip(widths)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", line.join("  ").trim_end());
    }
}

fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn ago(unix: u64) -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let secs = now.saturating_sub(unix);
    match secs {
        0..=59 => format!("{secs} s ago"),
        60..=3599 => format!("{} min ago", secs / 60),
        3600..=86399 => format!("{} h ago", secs / 3600),
        _ => format!("{} days ago", secs / 86400),
    }
}

pub fn remove(g: &GlobalArgs, a: RmiArgs) -> anyhow::Result<ExitCode> {
    let store = open_store(g)?;
    let mut results = Vec::new();
    for image in &a.images {
        let (removed, report) = store
            .remove(image)
            .with_context(|| format!("removing {image}"))?;
        if !a.json {
            for r in &removed {
                println!(
                    "removed {} ({}) {}",
                    r.reference, r.platform, r.manifest_digest
                );
            }
            eprintln!(
                "freed {} ({} blobs, {} root filesystems)",
                human_size(report.bytes_freed),
                report.blobs_removed,
                report.rootfs_removed
            );
        }
        results.push(serde_json::json!({ "query": image, "removed": removed, "gc": report }));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&results)?);
    }
    Ok(ExitCode::SUCCESS)
}

pub fn image(g: &GlobalArgs, c: ImageCommand) -> anyhow::Result<ExitCode> {
    let store = open_store(g)?;
    match c {
        ImageCommand::Inspect { image } => {
            let details = store.inspect(&image)?;
            println!("{}", serde_json::to_string_pretty(&details)?);
        }
        ImageCommand::Gc { json } => {
            let report = store.gc()?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!(
                    "freed {} ({} blobs, {} root filesystems)",
                    human_size(report.bytes_freed),
                    report.blobs_removed,
                    report.rootfs_removed
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Per-layer progress bars on stderr.
/// Per-layer progress bars on stderr (used only when stderr is a terminal).
pub(crate) struct Bars {
    multi: MultiProgress,
    layers: Mutex<HashMap<Digest, ProgressBar>>,
    phase: Mutex<Option<ProgressBar>>,
}

impl Bars {
    pub(crate) fn new() -> Bars {
        Bars {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            layers: Mutex::default(),
            phase: Mutex::default(),
        }
    }

    /// Leaves the per-layer lines (like `docker pull`) and removes the spinner.
    pub(crate) fn clear(&self) {
        if let Some(spinner) = self.phase.lock().unwrap_or_else(|p| p.into_inner()).take() {
            spinner.finish_and_clear();
        }
    }
}

impl Progress for Bars {
    fn layer_start(&self, digest: &Digest, size: u64, cached: bool) {
        let bar = self.multi.add(ProgressBar::new(size));
        bar.set_style(
            ProgressStyle::with_template("{prefix} {bar:30} {bytes}/{total_bytes} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(digest.short().to_string());
        if cached {
            bar.set_position(size);
            bar.set_message("cached");
        }
        self.layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(digest.clone(), bar);
    }

    fn layer_bytes(&self, digest: &Digest, bytes: u64) {
        if let Some(bar) = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            bar.inc(bytes);
        }
    }

    fn layer_done(&self, digest: &Digest) {
        if let Some(bar) = self
            .layers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(digest)
        {
            bar.finish_with_message("applied");
        }
    }

    fn phase(&self, message: &str) {
        let mut phase = self.phase.lock().unwrap_or_else(|p| p.into_inner());
        let bar = phase.get_or_insert_with(|| {
            let b = self.multi.add(ProgressBar::new_spinner());
            b.enable_steady_tick(std::time::Duration::from_millis(120));
            b
        });
        bar.set_message(message.to_string());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        registry: RegistryArgs,
    }

    fn args(argv: &[&str]) -> RegistryArgs {
        Cli::parse_from(std::iter::once("hearth").chain(argv.iter().copied())).registry
    }

    #[test]
    fn plain_user_pass_is_refused_and_host_bound_creds_work() {
        let Err(err) = args(&["--creds", "bob:pw"]).pull_options() else {
            panic!("a bare USER:PASS must be refused");
        };
        assert!(format!("{err:#}").contains("HOST=USER:PASS"), "{err:#}");
        let opts = args(&[
            "--creds",
            "reg.example=bob:pw",
            "--creds",
            "other.example:5000=a:b",
        ])
        .pull_options()
        .unwrap();
        assert_eq!(
            opts.credentials.explicit("reg.example").unwrap().username,
            "bob"
        );
        assert!(opts.credentials.explicit("evil.example").is_none());
    }

    #[test]
    fn serve_refuses_private_targets_and_has_a_cache_budget() {
        let cli = args(&[]).pull_options().unwrap();
        assert!(cli.allow_private && cli.cache_budget.is_none());
        let serve = args(&[]).serve_pull_options().unwrap();
        assert!(!serve.allow_private);
        assert_eq!(serve.cache_budget, Some(SERVE_CACHE_MAX));
        let opted = args(&["--allow-private-registries", "--cache-max", "none"])
            .serve_pull_options()
            .unwrap();
        assert!(opted.allow_private && opted.cache_budget.is_none());
    }
}
