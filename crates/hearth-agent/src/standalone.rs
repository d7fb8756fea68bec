//! The agent outside a VM (not PID 1): serves on a Unix socket or an inherited fd with a chosen
//! workload root, and exits on shutdown. This is how host-side tests run the real agent, and a
//! way to debug the protocol without booting a guest.
//!
//! `hearth-agent serve (--listen SOCKET | --fd N) [--root DIR]`
//! - `--listen SOCKET`: one session per connection (as on vsock).
//! - `--fd N`: serve sessions for ever on one inherited stream (as on the virtio-serial port).
//! - `--root DIR`: the workload root (default `/`).

use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::sync::Arc;

use crate::{session, stream::FdStream, Agent, AgentConfig, ExitProcess};

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    Listen(PathBuf),
    Fd(RawFd),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Options {
    pub endpoint: Endpoint,
    pub root: PathBuf,
}

const USAGE: &str = "usage: hearth-agent serve (--listen SOCKET | --fd N) [--root DIR]";

pub fn parse_args(args: &[String]) -> Result<Options, String> {
    let mut args = args.iter();
    if args.next().map(String::as_str) != Some("serve") {
        return Err(format!(
            "not running as PID 1, so a command is needed\n{USAGE}"
        ));
    }
    let mut endpoint = None;
    let mut root = PathBuf::from("/");
    while let Some(flag) = args.next() {
        let mut value = || {
            args.next()
                .ok_or_else(|| format!("{flag} needs a value\n{USAGE}"))
        };
        match flag.as_str() {
            "--listen" => endpoint = Some(Endpoint::Listen(PathBuf::from(value()?))),
            "--fd" => {
                let text = value()?;
                let fd = text
                    .parse()
                    .map_err(|_| format!("--fd {text:?} is not a file descriptor number"))?;
                endpoint = Some(Endpoint::Fd(fd));
            }
            "--root" => root = PathBuf::from(value()?),
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    let endpoint = endpoint.ok_or_else(|| format!("--listen or --fd is required\n{USAGE}"))?;
    Ok(Options { endpoint, root })
}

pub fn run(options: Options) -> Result<(), String> {
    let exec_init_program =
        std::env::current_exe().map_err(|e| format!("finding the agent binary: {e}"))?;
    let agent = Agent::new(AgentConfig {
        root: options.root,
        exec_init_program,
        power: Arc::new(ExitProcess),
    });
    let runtime =
        tokio::runtime::Runtime::new().map_err(|e| format!("starting the async runtime: {e}"))?;
    runtime.block_on(async move {
        match options.endpoint {
            Endpoint::Listen(path) => {
                let _ = std::fs::remove_file(&path);
                let listener = tokio::net::UnixListener::bind(&path)
                    .map_err(|e| format!("listening on {}: {e}", path.display()))?;
                session::serve_listener(agent, listener)
                    .await
                    .map_err(|e| format!("accepting on {}: {e}", path.display()))
            }
            Endpoint::Fd(fd) => {
                // SAFETY: the caller handed this fd to us to own (documented in the usage).
                let owned = unsafe { OwnedFd::from_raw_fd(fd) };
                let stream = FdStream::new(owned).map_err(|e| format!("using fd {fd}: {e}"))?;
                session::serve_port(agent, stream).await
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn parses_endpoints_and_root() {
        assert_eq!(
            parse_args(&args(&["serve", "--fd", "3", "--root", "/srv"])).unwrap(),
            Options {
                endpoint: Endpoint::Fd(3),
                root: PathBuf::from("/srv")
            }
        );
        assert_eq!(
            parse_args(&args(&["serve", "--listen", "/tmp/s"]))
                .unwrap()
                .endpoint,
            Endpoint::Listen(PathBuf::from("/tmp/s"))
        );
        for bad in [
            &["serve"][..],
            &["serve", "--fd"],
            &["serve", "--fd", "x"],
            &["serve", "--bogus"],
            &[],
        ] {
            assert!(parse_args(&args(bad)).is_err(), "{bad:?}");
        }
    }
}
