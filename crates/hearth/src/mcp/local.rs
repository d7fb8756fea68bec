//! `hearth mcp` without a daemon named: the daemon `hearth serve` runs ([`crate::serve`] over a
//! [`Node`] configured from `hearth serve`'s own flags, given after `--`), started in-process on
//! 127.0.0.1 with a port the kernel picks and one tenant whose token is generated here and never
//! written down. The tools reach it through the same HTTP client as a remote daemon, so there is
//! one code path for them. Touches what `hearth serve` touches: the home, VMs, network namespaces.

use std::sync::Arc;

use anyhow::{bail, Context};
use clap::{Args, FromArgMatches};
use hearth_sandbox::node::Node;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

use crate::cli::GlobalArgs;
use crate::cmd::serve::{api_settings, node_config, ServeArgs};
use crate::serve::{AppState, Tenants};

/// The in-process daemon's only tenant.
const TENANT: &str = "mcp";

/// A running in-process daemon.
pub struct LocalDaemon {
    /// `http://127.0.0.1:PORT`.
    pub url: String,
    pub token: String,
    stop: oneshot::Sender<()>,
    server: JoinHandle<std::io::Result<()>>,
}

impl LocalDaemon {
    /// Opens the node in `g.home` and serves its API on a loopback port.
    pub async fn start(g: &GlobalArgs, serve_flags: &[String]) -> anyhow::Result<LocalDaemon> {
        let a = parse_serve_flags(serve_flags)?;
        let token = random_token()?;
        let tenants = Tenants::parse(
            &format!("[[tenants]]\nname = \"{TENANT}\"\ntoken = \"{token}\"\n"),
            false,
        )?;
        let settings = api_settings(&a)?;
        let config = node_config(g, &a)?;
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .context("binding the in-process daemon to a loopback port")?;
        let url = format!("http://{}", listener.local_addr()?);
        let node = Node::open(config)
            .await
            .with_context(|| format!("opening the node state in {}", g.home.display()))?;
        let state = Arc::new(AppState {
            node,
            tenants,
            settings,
        });
        let (stop, stopped) = oneshot::channel::<()>();
        let server = tokio::spawn(crate::serve::serve(
            listener,
            state,
            async {
                let _ = stopped.await;
            },
            a.shutdown_grace,
        ));
        tracing::info!(%url, "in-process daemon ready");
        Ok(LocalDaemon {
            url,
            token,
            stop,
            server,
        })
    }

    /// Stops serving and saves the node's state; VMs still running (kept sandboxes) run on, and
    /// the next `hearth serve` or `hearth mcp` on the same home adopts them.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        match self.server.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!("the in-process daemon failed: {e}"),
            Err(e) => tracing::warn!("the in-process daemon panicked: {e}"),
        }
    }
}

/// `hearth serve`'s flags, minus those that make no sense here.
fn parse_serve_flags(flags: &[String]) -> anyhow::Result<ServeArgs> {
    let command = ServeArgs::augment_args(
        clap::Command::new("hearth mcp --")
            .no_binary_name(true)
            .disable_help_flag(true),
    )
    // Not required here (and not read from HEARTH_TOKENS_FILE): refused below when given.
    .mut_arg("tokens", |_| {
        clap::Arg::new("tokens")
            .long("tokens")
            .value_parser(clap::value_parser!(std::path::PathBuf))
    });
    let matches = command
        .try_get_matches_from(flags)
        .context("in the `hearth serve` flags after `--`")?;
    for (id, why) in [
        ("tokens", "its one tenant is hearth mcp itself"),
        ("listen", "it listens on a loopback port of its own"),
        ("print_openapi", "it serves no one but hearth mcp"),
    ] {
        if matches.value_source(id) == Some(clap::parser::ValueSource::CommandLine) {
            bail!(
                "--{} does not apply to hearth mcp's in-process daemon: {why}",
                id.replace('_', "-")
            );
        }
    }
    Ok(ServeArgs::from_arg_matches(&matches)?)
}

/// 24 random bytes from the kernel, as hex.
pub(super) fn random_token() -> anyhow::Result<String> {
    use std::io::Read;
    let mut bytes = [0u8; 24];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .context("reading /dev/urandom for the in-process daemon's token")?;
    Ok(hex::encode(bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serve_flags_configure_the_daemon_and_refuse_what_does_not_apply() {
        let flags = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        let a = parse_serve_flags(&flags(&["--accel", "tcg", "--memory", "256m"])).unwrap();
        assert_eq!(a.memory, "256m");
        assert!(a.tokens.is_none());
        assert!(parse_serve_flags(&[]).is_ok());
        let err = parse_serve_flags(&flags(&["--tokens", "t.toml"])).unwrap_err();
        assert!(err.to_string().contains("--tokens does not apply"), "{err}");
        let err = parse_serve_flags(&flags(&["--listen", "0.0.0.0:1"])).unwrap_err();
        assert!(err.to_string().contains("--listen"), "{err}");
        assert!(parse_serve_flags(&flags(&["--no-such-flag"])).is_err());
        assert_ne!(random_token().unwrap(), random_token().unwrap());
    }
}
