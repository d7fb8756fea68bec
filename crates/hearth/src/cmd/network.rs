//! The network flags, shared so the commands cannot drift apart: a sandbox's egress policy
//! ([`PolicyArgs`]: `hearth run`, `hearth sandbox create` and `network`), and the host side of
//! sandbox networking ([`NetHostArgs`]: the upstream DNS server, rate and connection limits;
//! `hearth run` and `hearth serve`).

use std::net::SocketAddr;
use std::path::Path;

use anyhow::Context;
use clap::{Args, ValueEnum};
use hearth_sandbox::{NetworkMode, NetworkOptions, NetworkPolicy, Networking};

/// `--network`.
#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModeArg {
    /// Nothing leaves; DNS answers REFUSED.
    None,
    /// Only what `--allow-net` lists.
    Allow,
    /// The internet, never the host, link-local/metadata or private ranges unless listed.
    Open,
}

/// A sandbox's egress policy.
#[derive(Args, Debug, Clone, Default)]
pub struct PolicyArgs {
    /// Egress: none (the default), allow (only --allow-net), open (the internet; never the host,
    /// other sandboxes, link-local/metadata, or private ranges unless --allow-net lists them).
    #[arg(long, value_enum)]
    pub network: Option<ModeArg>,
    /// Allow a destination: a domain (api.example.com), a wildcard (*.example.org: names below
    /// it), an IP or a CIDR, each optionally with :PORT. Repeatable; implies --network allow.
    #[arg(long = "allow-net", value_name = "ENTRY")]
    pub allow_net: Vec<String>,
    /// Refuse a destination (same forms as --allow-net); wins over every allow. Repeatable.
    #[arg(long = "deny-net", value_name = "ENTRY")]
    pub deny_net: Vec<String>,
}

impl PolicyArgs {
    /// The policy the flags describe; `None` when none was given.
    pub fn policy(&self) -> anyhow::Result<Option<NetworkPolicy>> {
        if self.network.is_none() && self.allow_net.is_empty() && self.deny_net.is_empty() {
            return Ok(None);
        }
        let mode = match self.network {
            Some(ModeArg::None) => NetworkMode::None,
            Some(ModeArg::Open) => NetworkMode::Open,
            Some(ModeArg::Allow) => NetworkMode::Allow,
            None if self.allow_net.is_empty() => NetworkMode::None,
            None => NetworkMode::Allow,
        };
        let entries = |list: &[String], flag: &str| -> anyhow::Result<Vec<_>> {
            list.iter()
                .map(|e| e.parse().with_context(|| format!("{flag} {e:?}")))
                .collect()
        };
        Ok(Some(NetworkPolicy::new(
            mode,
            entries(&self.allow_net, "--allow-net")?,
            entries(&self.deny_net, "--deny-net")?,
        )?))
    }
}

/// How this host gives sandboxes their network.
#[derive(Args, Debug, Clone, Default)]
pub struct NetHostArgs {
    /// The DNS server sandboxes' resolvers forward allowed names to (default: the first
    /// nameserver of this host's /etc/resolv.conf).
    #[arg(long, value_name = "IP[:PORT]", value_parser = parse_upstream)]
    pub dns_upstream: Option<SocketAddr>,
    /// Bytes per second each sandbox may send, and receive, like 10m.
    #[arg(long, value_name = "RATE")]
    pub net_rate: Option<String>,
    /// TCP connections each sandbox may have open at once; more are refused with a reset
    /// [default: 256].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub net_conns: Option<u32>,
    /// Give guests no network device at all (only `lo`): for hosts where hearth cannot create
    /// network namespaces.
    #[arg(long)]
    pub no_network: bool,
}

impl NetHostArgs {
    /// Sandbox networking with namespaces under `home`'s `net/`, or `None` with --no-network.
    pub fn networking(&self, home: &Path) -> anyhow::Result<Option<Networking>> {
        if self.no_network {
            return Ok(None);
        }
        let mut options = NetworkOptions::for_host(self.dns_upstream)
            .context("sandbox networking (pass --dns-upstream IP, or --no-network)")?;
        options.rate_limit = match &self.net_rate {
            Some(rate) => Some(
                crate::units::bytes(rate)
                    .filter(|&n| n > 0)
                    .with_context(|| format!("--net-rate {rate:?} is not a rate like 10m"))?,
            ),
            None => None,
        };
        if let Some(n) = self.net_conns {
            options.max_connections = n as usize;
        }
        Ok(Some(Networking {
            options,
            home: home.to_owned(),
        }))
    }
}

/// `IP` or `IP:PORT` (port 53 by default); IPv6 with a port as `[IP]:PORT`.
fn parse_upstream(value: &str) -> Result<SocketAddr, String> {
    value
        .parse::<SocketAddr>()
        .or_else(|_| value.parse::<std::net::IpAddr>().map(|ip| (ip, 53).into()))
        .map_err(|_| format!("{value:?} is not IP or IP:PORT"))
}

/// `--network-default`: a mode name (`none`, `open`) or a whole policy as JSON.
pub fn parse_policy(value: &str) -> anyhow::Result<NetworkPolicy> {
    match value.trim() {
        "none" => Ok(NetworkPolicy::none()),
        "open" => Ok(NetworkPolicy::new(NetworkMode::Open, vec![], vec![])?),
        json => serde_json::from_str(json).with_context(|| {
            format!("--network-default {value:?}: give none, open or a policy as JSON")
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_make_a_policy() {
        let args = PolicyArgs {
            allow_net: vec!["*.pypi.org".into(), "198.51.100.0/24:443".into()],
            deny_net: vec!["evil.pypi.org".into()],
            ..Default::default()
        };
        let policy = args.policy().unwrap().unwrap();
        assert_eq!(policy.mode, NetworkMode::Allow);
        assert_eq!((policy.allow.len(), policy.deny.len()), (2, 1));
        assert!(PolicyArgs::default().policy().unwrap().is_none());
        let bad = PolicyArgs {
            allow_net: vec!["exa mple.com".into()],
            ..Default::default()
        };
        let err = format!("{:#}", bad.policy().unwrap_err());
        assert!(err.contains("--allow-net \"exa mple.com\""), "{err}");
        let none_with_allow = PolicyArgs {
            network: Some(ModeArg::None),
            allow_net: vec!["example.com".into()],
            ..Default::default()
        };
        assert!(none_with_allow.policy().is_err());
    }

    #[test]
    fn net_conns_sets_the_connection_limit_and_has_a_default() {
        let home = Path::new("/nonexistent");
        let upstream = Some("198.51.100.53:53".parse().unwrap());
        let args = NetHostArgs {
            dns_upstream: upstream,
            net_conns: Some(9),
            ..Default::default()
        };
        let options = args.networking(home).unwrap().unwrap().options;
        assert_eq!(options.max_connections, 9);
        let args = NetHostArgs {
            dns_upstream: upstream,
            ..Default::default()
        };
        let options = args.networking(home).unwrap().unwrap().options;
        assert_eq!(
            options.max_connections,
            hearth_net::proxy::DEFAULT_MAX_CONNECTIONS
        );
    }

    #[test]
    fn upstreams_and_default_policies_parse() {
        assert_eq!(
            parse_upstream("198.51.100.53").unwrap(),
            "198.51.100.53:53".parse().unwrap()
        );
        assert_eq!(
            parse_upstream("127.0.0.1:5353").unwrap(),
            "127.0.0.1:5353".parse().unwrap()
        );
        assert!(parse_upstream("dns.example").is_err());
        assert_eq!(parse_policy("open").unwrap().mode, NetworkMode::Open);
        let json = parse_policy(r#"{"mode":"allow","allow":["pypi.org"]}"#).unwrap();
        assert_eq!(json.allow.len(), 1);
        assert!(parse_policy("sideways").is_err());
    }
}
