//! Where a registry may send the client: redirect and Bearer-realm targets must be https (plain
//! http only to hosts listed as insecure registries, and never after https), and when private
//! targets are not allowed (`hearth serve`) they must not be, or resolve to, loopback, link-local,
//! private, shared or metadata addresses. The registry host the user named is always allowed.
//! Checks only; the DNS resolver here applies the address rule at connect time, so a name cannot
//! pass a check and then resolve elsewhere.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;

use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::Url;

/// A target the policy refuses. Its text starts with "hearth refuses" (the transport-error mapper
/// recognises it when it comes back wrapped in a connection error).
#[derive(Debug, thiserror::Error)]
#[error("hearth refuses {what} {target}: {reason}")]
pub struct Refusal {
    pub what: &'static str,
    pub target: String,
    pub reason: String,
}

pub(super) const REFUSAL_MARK: &str = "hearth refuses";

#[derive(Debug, Clone)]
pub(super) struct TargetPolicy {
    /// `host[:port]` of the registry's API, lowercased.
    pub registry_authority: String,
    /// Hosts (`host[:port]` or `host`) reached over plain HTTP.
    pub insecure: Vec<String>,
    pub allow_private: bool,
}

impl TargetPolicy {
    /// Checks a redirect (`from_https`: the previous hop was https) or realm target.
    pub fn check(&self, what: &'static str, url: &Url, from_https: bool) -> Result<(), Refusal> {
        let refuse = |reason: String| Refusal {
            what,
            target: super::body::sanitize(url.as_str().as_bytes()),
            reason,
        };
        let authority = authority(url);
        match url.scheme() {
            "https" => {}
            "http" if from_https => {
                return Err(refuse("a redirect from https to plain http".into()))
            }
            "http" if self.is_insecure(&authority) => {}
            "http" => {
                return Err(refuse(
                    "plain http to a host not listed with --insecure-registry".into(),
                ))
            }
            other => return Err(refuse(format!("scheme {other:?} is not https"))),
        }
        if self.allow_private || authority == self.registry_authority {
            return Ok(());
        }
        if let Some(ip) = literal_ip(url) {
            if is_private(ip) {
                return Err(refuse(format!(
                    "{ip} is a loopback, link-local, private or metadata address (pass --allow-private-registries to allow)"
                )));
            }
        }
        Ok(())
    }

    fn is_insecure(&self, authority: &str) -> bool {
        let host = authority.rsplit_once(':').map_or(authority, |(h, _)| h);
        self.insecure.iter().any(|i| {
            let i = super::creds::normalize_host(i);
            i == authority || i == host
        })
    }

    /// The host name (without port) the resolver must leave alone: the registry's own.
    fn registry_name(&self) -> String {
        let a = &self.registry_authority;
        match a.rsplit_once(':') {
            Some((h, p)) if p.chars().all(|c| c.is_ascii_digit()) => h.to_string(),
            _ => a.clone(),
        }
    }

    /// A resolver that refuses every name but the registry's that resolves to a private address.
    pub fn resolver(&self) -> Arc<GuardedResolver> {
        Arc::new(GuardedResolver {
            registry_name: self.registry_name(),
        })
    }
}

/// `host[:port]` of a URL, lowercased; the port only when it is not the scheme's default.
pub(super) fn authority(url: &Url) -> String {
    let host = url.host_str().unwrap_or("").to_ascii_lowercase();
    match url.port() {
        Some(p) => format!("{host}:{p}"),
        None => host,
    }
}

fn literal_ip(url: &Url) -> Option<IpAddr> {
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse()
        .ok()
}

/// Loopback, link-local (cloud metadata lives there), private, shared (CGNAT), unspecified,
/// broadcast or multicast: nothing a tenant-named registry should make the daemon connect to.
pub fn is_private(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => private_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return private_v4(v4);
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) embeds an IPv4 address.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let [a, b] = seg[6].to_be_bytes();
                let [c, d] = seg[7].to_be_bytes();
                return private_v4(Ipv4Addr::new(a, b, c, d));
            }
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (seg[0] & 0xfe00) == 0xfc00
                || (seg[0] & 0xffc0) == 0xfe80
        }
    }
}

fn private_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_unspecified()
        || ip.is_broadcast()
        || ip.is_multicast()
        || a == 0
        || (a == 100 && (64..128).contains(&b))
}

/// Resolves names and refuses those (other than the registry's own) with a private address.
#[derive(Debug)]
pub struct GuardedResolver {
    registry_name: String,
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let host = name.as_str().to_ascii_lowercase();
        let allowed = host == self.registry_name;
        Box::pin(async move {
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            if !allowed {
                if let Some(bad) = addrs.iter().find(|a| is_private(a.ip())) {
                    return Err(Box::new(Refusal {
                        what: "to connect to",
                        target: host.clone(),
                        reason: format!(
                            "it resolves to {}, a loopback, link-local, private or metadata address (pass --allow-private-registries to allow)",
                            bad.ip()
                        ),
                    }) as Box<dyn std::error::Error + Send + Sync>);
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow_private: bool) -> TargetPolicy {
        TargetPolicy {
            registry_authority: "reg.example:5000".into(),
            insecure: vec!["plain.example".into()],
            allow_private,
        }
    }

    fn check(p: &TargetPolicy, url: &str, from_https: bool) -> Result<(), Refusal> {
        p.check("redirect target", &url.parse().unwrap(), from_https)
    }

    #[test]
    fn schemes() {
        let p = policy(true);
        assert!(check(&p, "https://cdn.example/x", true).is_ok());
        assert!(check(&p, "http://cdn.example/x", false).is_err());
        assert!(check(&p, "http://plain.example:81/x", false).is_ok());
        assert!(check(&p, "http://plain.example/x", true).is_err());
        assert!(check(&p, "ftp://cdn.example/x", false).is_err());
    }

    #[test]
    fn private_targets_in_serve_mode() {
        let p = policy(false);
        for bad in [
            "https://169.254.169.254/latest",
            "https://127.0.0.1:8080/",
            "https://10.1.2.3/",
            "https://[::1]/",
            "https://[::ffff:192.168.0.1]/",
            "https://[fd00:ec2::254]/",
            "https://100.100.100.200/",
        ] {
            assert!(check(&p, bad, false).is_err(), "{bad}");
        }
        assert!(check(&p, "https://8.8.8.8/", false).is_ok());
        assert!(check(&policy(true), "https://127.0.0.1:8080/", false).is_ok());
    }
}
