//! A sandbox's egress policy and every decision made from it. Pure: no I/O, no clock.
//!
//! The shape is the API's: `{"mode": "none"|"allow"|"open", "allow": [ENTRY...], "deny": [ENTRY...]}`
//! where an ENTRY is a string:
//!
//! - a domain, `api.example.com` (that exact name);
//! - a wildcard, `*.example.org`: any name *below* `example.org` (`a.example.org`,
//!   `a.b.example.org`), **not** the apex `example.org` itself, like a TLS wildcard but at any depth;
//!   list both to allow both;
//! - an IP (`203.0.113.7`, `2001:db8::1`) or a CIDR (`198.51.100.0/24`), host bits clear;
//! - any of these with `:port` (`api.example.com:443`, `[2001:db8::1]:443`, `10.0.0.0/8:5432`);
//!   IPv6 addresses take brackets when they carry a port.
//!
//! Decisions:
//! - [`NetworkPolicy::allows_name`]: may the resolver answer for a name;
//! - [`NetworkPolicy::ip_rules`]: the address-level part the namespace's firewall enforces;
//! - [`NetworkPolicy::decide`]: the proxy's exact decision for one connection.
//!
//! Some destinations are never reachable ([`Blocked`]): loopback, `0.0.0.0/8`, link-local
//! (including the cloud metadata addresses), multicast, the sandbox link and the host's own
//! addresses. The private ranges (RFC 1918, CGNAT `100.64.0.0/10`, ULA `fc00::/7`) are blocked too,
//! unless an allow entry names an IP or CIDR *inside* one of them: `0.0.0.0/0` does not open
//! `10.0.0.0/8`, `10.1.0.0/16` opens exactly that.

use std::fmt;
use std::net::{IpAddr, Ipv6Addr, SocketAddr};
use std::str::FromStr;

use ipnet::{IpNet, Ipv4Net};
use serde::{Deserialize, Serialize};

use crate::rules::IpRules;

/// Most entries in one list.
pub const MAX_ENTRIES: usize = 256;
/// Longest entry string accepted (a 253-character name plus `*.` and `:65535` fits).
pub const MAX_ENTRY_LEN: usize = 262;
/// Longest domain name (RFC 1035, presentation form without the trailing dot).
pub const MAX_NAME_LEN: usize = 253;
/// Longest label of a domain name.
pub const MAX_LABEL_LEN: usize = 63;
/// Ports at which the TLS SNI / HTTP Host of a connection reached by name must itself be allowed.
pub const NAME_CHECKED_PORTS: [u16; 2] = [80, 443];

/// What a policy lets out by default.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Nothing leaves; the resolver answers REFUSED for every name.
    #[default]
    None,
    /// Only what the `allow` list names.
    Allow,
    /// The internet, never the blocked ranges unless listed in `allow`.
    Open,
}

/// A sandbox's egress policy. Deserializing validates it ([`NetworkPolicy::validate`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RawPolicy")]
pub struct NetworkPolicy {
    pub mode: Mode,
    pub allow: Vec<Entry>,
    pub deny: Vec<Entry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPolicy {
    #[serde(default)]
    mode: Mode,
    #[serde(default)]
    allow: Vec<Entry>,
    #[serde(default)]
    deny: Vec<Entry>,
}

impl TryFrom<RawPolicy> for NetworkPolicy {
    type Error = PolicyError;
    fn try_from(raw: RawPolicy) -> Result<Self, PolicyError> {
        NetworkPolicy::new(raw.mode, raw.allow, raw.deny)
    }
}

/// Why a policy or an entry was rejected.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("empty network entry")]
    Empty,
    #[error(
        "network entry '{entry}' is {len} characters long; at most {MAX_ENTRY_LEN} are allowed"
    )]
    EntryTooLong { entry: String, len: usize },
    #[error(
        "domain name in '{entry}' is {len} characters long; at most {MAX_NAME_LEN} are allowed"
    )]
    NameTooLong { entry: String, len: usize },
    #[error("network entry '{entry}': label '{label}' {why}")]
    BadLabel {
        entry: String,
        label: String,
        why: &'static str,
    },
    #[error("network entry '{entry}': a wildcard is only allowed as a whole first label ('*.example.com')")]
    BadWildcard { entry: String },
    #[error("network entry '{entry}': '{port}' is not a port (1-65535)")]
    BadPort { entry: String, port: String },
    #[error("network entry '{entry}': port 0 is not a destination")]
    PortZero { entry: String },
    #[error("network entry '{entry}': '{addr}' is not an IP address or CIDR")]
    BadAddress { entry: String, addr: String },
    #[error("network entry '{entry}': the CIDR has host bits set (did you mean {network}?)")]
    HostBits { entry: String, network: String },
    #[error(
        "network entry '{entry}': an IPv6 address with a port takes brackets ('[2001:db8::1]:443')"
    )]
    UnbracketedIpv6 { entry: String },
    #[error("the {list} list has {count} entries; at most {MAX_ENTRIES} are allowed")]
    TooManyEntries { list: &'static str, count: usize },
    #[error("mode 'none' lets nothing out, so it takes no allow entries (use mode 'allow')")]
    AllowWithModeNone,
}

/// One allow or deny entry: a destination and, optionally, a port.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Entry {
    pub target: Target,
    pub port: Option<u16>,
}

/// What an entry names.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Target {
    /// Exactly this name (lowercase, no trailing dot).
    Domain(String),
    /// Any name strictly below this one (lowercase, no trailing dot, without the `*.`).
    Wildcard(String),
    /// An address or a range (a single address is a /32 or /128).
    Net(IpNet),
}

/// Why a connection is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// A deny entry matches the address, the port, a name the address was learned for, or the
    /// connection's TLS SNI / HTTP Host.
    Denied,
    /// Loopback, link-local, the host, a private range not listed explicitly...
    Blocked,
    /// The policy's mode is `none`.
    ModeNone,
    /// Reached by an allowed name on 80/443, but the TLS SNI / HTTP Host is not an allowed name.
    ServerNameNotAllowed,
    /// Reached by an allowed name on 80/443, but the connection named no server (no SNI / Host).
    NoServerName,
    /// Nothing in the policy allows it.
    NotAllowed,
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Reason::Denied => "denied by policy",
            Reason::Blocked => "blocked destination (host, loopback, link-local or private range)",
            Reason::ModeNone => "network mode is none",
            Reason::ServerNameNotAllowed => "TLS SNI / HTTP Host is not an allowed name",
            Reason::NoServerName => "no TLS SNI / HTTP Host on a connection reached by name",
            Reason::NotAllowed => "not in the allow list",
        })
    }
}

/// The proxy's verdict on one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Allow,
    Refuse(Reason),
}

/// Destinations a sandbox never reaches ([`Blocked::never`]) and the private ranges it reaches
/// only through an explicit allow entry inside them ([`Blocked::private`]).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Blocked {
    pub never: Vec<IpNet>,
    pub private: Vec<IpNet>,
}

impl Blocked {
    /// The standard set, plus the host's own addresses in `never`.
    pub fn for_host(host_addrs: &[IpAddr]) -> Self {
        let mut never: Vec<IpNet> = [
            "0.0.0.0/8",
            "127.0.0.0/8",
            "169.254.0.0/16",
            "224.0.0.0/4",
            "240.0.0.0/4",
            "::/128",
            "::1/128",
            "::ffff:0:0/96",
            "fe80::/10",
            "fd00:ec2::254/128",
            "ff00::/8",
        ]
        .iter()
        .map(|s| s.parse().expect("static network"))
        .collect();
        never.push(IpNet::V4(
            Ipv4Net::new(crate::addressing::GATEWAY, crate::addressing::PREFIX_LEN)
                .expect("static network")
                .trunc(),
        ));
        never.extend(host_addrs.iter().map(|a| IpNet::from(canonical(*a))));
        let private = [
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
        ]
        .iter()
        .map(|s| s.parse().expect("static network"))
        .collect();
        Blocked { never, private }
    }

    fn is_never(&self, ip: IpAddr) -> bool {
        self.never.iter().any(|n| n.contains(&ip))
    }

    /// The private ranges holding `ip`.
    fn private_ranges_of(&self, ip: IpAddr) -> impl Iterator<Item = &IpNet> {
        self.private.iter().filter(move |n| n.contains(&ip))
    }

    /// May an allow entry for `net` reach `ip` (which it contains)?
    fn entry_reaches(&self, net: &IpNet, ip: IpAddr) -> bool {
        !self.is_never(ip) && self.private_ranges_of(ip).all(|p| p.contains(net))
    }
}

impl NetworkPolicy {
    /// A validated policy.
    pub fn new(mode: Mode, allow: Vec<Entry>, deny: Vec<Entry>) -> Result<Self, PolicyError> {
        let policy = NetworkPolicy { mode, allow, deny };
        policy.validate()?;
        Ok(policy)
    }

    /// `none`: nothing leaves.
    pub fn none() -> Self {
        Self::default()
    }

    /// Checks the limits and combinations the entry parser cannot see.
    pub fn validate(&self) -> Result<(), PolicyError> {
        for (list, entries) in [("allow", &self.allow), ("deny", &self.deny)] {
            if entries.len() > MAX_ENTRIES {
                return Err(PolicyError::TooManyEntries {
                    list,
                    count: entries.len(),
                });
            }
        }
        if self.mode == Mode::None && !self.allow.is_empty() {
            return Err(PolicyError::AllowWithModeNone);
        }
        Ok(())
    }

    /// May the resolver answer for `name`? Deny entries win (whatever their port); `none` answers
    /// nothing, `open` everything else, `allow` the names a domain or wildcard entry matches.
    pub fn allows_name(&self, name: &str) -> bool {
        let name = normalize_name(name);
        if self.deny.iter().any(|e| e.target.matches_name(&name)) {
            return false;
        }
        match self.mode {
            Mode::None => false,
            Mode::Open => true,
            Mode::Allow => self.allow.iter().any(|e| e.target.matches_name(&name)),
        }
    }

    /// May the resolver hand out `ip` for an allowed name? Not when it is denied (by a port-less
    /// entry) or blocked: an allowed name resolving to 127.0.0.1 or 169.254.169.254 (DNS
    /// rebinding) yields nothing reachable.
    pub fn allows_learned_address(&self, blocked: &Blocked, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.mode == Mode::None {
            return false;
        }
        if self
            .deny
            .iter()
            .any(|e| e.port.is_none() && e.target.contains_ip(ip))
        {
            return false;
        }
        if blocked.is_never(ip) {
            return false;
        }
        if blocked.private_ranges_of(ip).next().is_none() {
            return true;
        }
        self.allow.iter().any(|e| match &e.target {
            Target::Net(net) => net.contains(&ip) && blocked.entry_reaches(net, ip),
            _ => false,
        })
    }

    /// The address-level rules for the namespace's firewall, with the host's own addresses
    /// blocked. See [`NetworkPolicy::ip_rules_with`].
    pub fn ip_rules(&self, host_addrs: &[IpAddr]) -> IpRules {
        self.ip_rules_with(&Blocked::for_host(host_addrs))
    }

    /// The address-level rules for the namespace's firewall. The firewall lets an `allow` element
    /// override `blocked`, so allow entries are cut here to what they may really reach: the
    /// `never` ranges are carved out of every entry, and a private range out of every entry not
    /// inside it. Deny entries with a port cannot be expressed at this level and are left to the
    /// proxy (the firewall sends those connections there only when something allows them).
    pub fn ip_rules_with(&self, blocked: &Blocked) -> IpRules {
        let mut rules = IpRules {
            open: self.mode == Mode::Open,
            allow: Vec::new(),
            deny: self
                .deny
                .iter()
                .filter(|e| e.port.is_none())
                .filter_map(|e| e.target.net())
                .collect(),
            blocked: blocked
                .never
                .iter()
                .chain(&blocked.private)
                .copied()
                .collect(),
        };
        if self.mode == Mode::None {
            return rules;
        }
        for entry in &self.allow {
            let Some(net) = entry.target.net() else {
                continue;
            };
            let holes: Vec<IpNet> = blocked
                .never
                .iter()
                .chain(blocked.private.iter().filter(|p| !p.contains(&net)))
                .copied()
                .collect();
            for piece in carve(net, &holes) {
                rules.allow.push((piece, entry.port));
            }
        }
        rules
    }

    /// The proxy's decision for a connection to `dst`. `learned_names` are the names the resolver
    /// handed `dst`'s address out for; `server_name` is the connection's TLS SNI or HTTP Host when
    /// one was found. In order: deny wins (address with port, learned names, server name);
    /// blocked addresses are refused unless an explicit entry may reach them; an explicit address
    /// entry (with its port) allows; `open` allows the rest; otherwise a learned name matching an
    /// allow entry (with its port) allows, and on 80/443 the server name must itself be allowed at
    /// that port.
    pub fn decide(
        &self,
        blocked: &Blocked,
        dst: SocketAddr,
        learned_names: &[&str],
        server_name: Option<&str>,
    ) -> Decision {
        let ip = canonical(dst.ip());
        let port = dst.port();
        let server_name = server_name.map(normalize_name);
        let learned: Vec<String> = learned_names.iter().map(|n| normalize_name(n)).collect();

        let denied = self.deny.iter().any(|e| {
            e.port_matches(port)
                && (e.target.contains_ip(ip)
                    || learned.iter().any(|n| e.target.matches_name(n))
                    || server_name
                        .as_deref()
                        .is_some_and(|n| e.target.matches_name(n)))
        });
        if denied {
            return Decision::Refuse(Reason::Denied);
        }
        if self.mode == Mode::None {
            return Decision::Refuse(Reason::ModeNone);
        }
        let explicit = self.allow.iter().any(|e| match &e.target {
            Target::Net(net) => {
                e.port_matches(port) && net.contains(&ip) && blocked.entry_reaches(net, ip)
            }
            _ => false,
        });
        if explicit {
            return Decision::Allow;
        }
        if blocked.is_never(ip) || blocked.private_ranges_of(ip).next().is_some() {
            return Decision::Refuse(Reason::Blocked);
        }
        let allowed_at_port = |name: &str| {
            self.allow
                .iter()
                .any(|e| e.port_matches(port) && e.target.matches_name(name))
        };
        if self.mode == Mode::Open {
            return Decision::Allow;
        }
        if learned.iter().any(|n| allowed_at_port(n)) {
            if !NAME_CHECKED_PORTS.contains(&port) {
                return Decision::Allow;
            }
            return match server_name.as_deref() {
                Some(name) if allowed_at_port(name) => Decision::Allow,
                Some(_) => Decision::Refuse(Reason::ServerNameNotAllowed),
                None => Decision::Refuse(Reason::NoServerName),
            };
        }
        Decision::Refuse(Reason::NotAllowed)
    }
}

impl Entry {
    fn port_matches(&self, port: u16) -> bool {
        self.port.is_none_or(|p| p == port)
    }
}

impl Target {
    /// Does this domain or wildcard entry match `name` (already normalized)?
    fn matches_name(&self, name: &str) -> bool {
        match self {
            Target::Domain(d) => d == name,
            Target::Wildcard(base) => name
                .strip_suffix(base.as_str())
                .is_some_and(|head| head.len() > 1 && head.ends_with('.')),
            Target::Net(_) => false,
        }
    }

    fn contains_ip(&self, ip: IpAddr) -> bool {
        matches!(self, Target::Net(net) if net.contains(&ip))
    }

    fn net(&self) -> Option<IpNet> {
        match self {
            Target::Net(net) => Some(*net),
            _ => None,
        }
    }
}

/// IPv4-mapped IPv6 addresses as the IPv4 address they are.
fn canonical(ip: IpAddr) -> IpAddr {
    ip.to_canonical()
}

/// Lowercase, without a trailing dot.
pub fn normalize_name(name: &str) -> String {
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

/// `net` without `holes`, as the fewest prefixes the halving finds.
fn carve(net: IpNet, holes: &[IpNet]) -> Vec<IpNet> {
    let overlapping: Vec<&IpNet> = holes.iter().filter(|h| overlaps(&net, h)).collect();
    if overlapping.is_empty() {
        return vec![net];
    }
    if overlapping.iter().any(|h| h.contains(&net)) {
        return Vec::new();
    }
    // A hole overlaps but does not cover `net`, so it is inside it and `net` can be halved.
    let Ok(halves) = net.subnets(net.prefix_len() + 1) else {
        return Vec::new();
    };
    halves.flat_map(|half| carve(half, holes)).collect()
}

fn overlaps(a: &IpNet, b: &IpNet) -> bool {
    a.contains(&b.network()) || b.contains(&a.network())
}

impl FromStr for Entry {
    type Err = PolicyError;

    fn from_str(s: &str) -> Result<Self, PolicyError> {
        let entry = s.trim();
        if entry.is_empty() {
            return Err(PolicyError::Empty);
        }
        if entry.len() > MAX_ENTRY_LEN {
            return Err(PolicyError::EntryTooLong {
                entry: entry.chars().take(40).collect::<String>() + "...",
                len: entry.len(),
            });
        }
        // `[v6 or v6/len]` with an optional `:port`.
        if let Some(rest) = entry.strip_prefix('[') {
            let (inside, after) = rest
                .split_once(']')
                .ok_or_else(|| PolicyError::BadAddress {
                    entry: entry.into(),
                    addr: entry.into(),
                })?;
            let port = match after {
                "" => None,
                _ => match after.strip_prefix(':') {
                    Some(p) => Some(parse_port(entry, p)?),
                    None => {
                        return Err(PolicyError::BadAddress {
                            entry: entry.into(),
                            addr: entry.into(),
                        })
                    }
                },
            };
            let net = parse_net(entry, inside)?;
            if !matches!(net, IpNet::V6(_)) {
                return Err(PolicyError::BadAddress {
                    entry: entry.into(),
                    addr: inside.into(),
                });
            }
            return Ok(Entry {
                target: Target::Net(net),
                port,
            });
        }
        let colons = entry.matches(':').count();
        if colons > 1 {
            // A bare IPv6 address or range, which cannot carry a port.
            if entry
                .split('/')
                .next()
                .is_some_and(|a| a.parse::<Ipv6Addr>().is_ok())
            {
                return Ok(Entry {
                    target: Target::Net(parse_net(entry, entry)?),
                    port: None,
                });
            }
            return Err(PolicyError::UnbracketedIpv6 {
                entry: entry.into(),
            });
        }
        let (host, port) = match entry.rsplit_once(':') {
            Some((h, p)) => (h, Some(parse_port(entry, p)?)),
            None => (entry, None),
        };
        let looks_numeric = host
            .chars()
            .all(|c| c.is_ascii_digit() || c == '.' || c == '/');
        let target = if looks_numeric {
            Target::Net(parse_net(entry, host)?)
        } else if let Some(base) = host.strip_prefix("*.") {
            Target::Wildcard(parse_domain(entry, base)?)
        } else if host.contains('*') {
            return Err(PolicyError::BadWildcard {
                entry: entry.into(),
            });
        } else {
            Target::Domain(parse_domain(entry, host)?)
        };
        Ok(Entry { target, port })
    }
}

fn parse_port(entry: &str, p: &str) -> Result<u16, PolicyError> {
    let bad = || PolicyError::BadPort {
        entry: entry.into(),
        port: p.into(),
    };
    if p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    match p.parse::<u16>() {
        Ok(0) => Err(PolicyError::PortZero {
            entry: entry.into(),
        }),
        Ok(port) => Ok(port),
        Err(_) => Err(bad()),
    }
}

fn parse_net(entry: &str, s: &str) -> Result<IpNet, PolicyError> {
    let bad = || PolicyError::BadAddress {
        entry: entry.into(),
        addr: s.into(),
    };
    if !s.contains('/') {
        let ip: IpAddr = s.parse().map_err(|_| bad())?;
        return Ok(IpNet::from(canonical(ip)));
    }
    let net: IpNet = s.parse().map_err(|_| bad())?;
    if net.trunc() != net {
        return Err(PolicyError::HostBits {
            entry: entry.into(),
            network: net.trunc().to_string(),
        });
    }
    Ok(net)
}

fn parse_domain(entry: &str, name: &str) -> Result<String, PolicyError> {
    let name = normalize_name(name);
    if name.len() > MAX_NAME_LEN {
        return Err(PolicyError::NameTooLong {
            entry: entry.into(),
            len: name.len(),
        });
    }
    let bad = |label: &str, why| PolicyError::BadLabel {
        entry: entry.into(),
        label: label.into(),
        why,
    };
    for label in name.split('.') {
        if label.is_empty() {
            return Err(bad(label, "is empty"));
        }
        if label.len() > MAX_LABEL_LEN {
            return Err(bad(label, "is longer than 63 characters"));
        }
        if label.contains('*') {
            return Err(PolicyError::BadWildcard {
                entry: entry.into(),
            });
        }
        if !label
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            return Err(bad(
                label,
                "may hold only letters, digits, '-' and '_' (use punycode for other scripts)",
            ));
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Err(bad(label, "may not start or end with '-'"));
        }
    }
    if name
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(PolicyError::BadAddress {
            entry: entry.into(),
            addr: name,
        });
    }
    Ok(name)
}

impl fmt::Display for Entry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let v6 = matches!(self.target, Target::Net(IpNet::V6(_)));
        if v6 && self.port.is_some() {
            f.write_str("[")?;
        }
        match &self.target {
            Target::Domain(d) => f.write_str(d)?,
            Target::Wildcard(d) => write!(f, "*.{d}")?,
            Target::Net(net) if net.prefix_len() == net.max_prefix_len() => {
                write!(f, "{}", net.addr())?
            }
            Target::Net(net) => write!(f, "{net}")?,
        }
        if v6 && self.port.is_some() {
            f.write_str("]")?;
        }
        if let Some(port) = self.port {
            write!(f, ":{port}")?;
        }
        Ok(())
    }
}

impl TryFrom<String> for Entry {
    type Error = PolicyError;
    fn try_from(s: String) -> Result<Self, PolicyError> {
        s.parse()
    }
}

impl From<Entry> for String {
    fn from(e: Entry) -> String {
        e.to_string()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(mode: Mode, allow: &[&str], deny: &[&str]) -> NetworkPolicy {
        let parse = |v: &[&str]| v.iter().map(|s| s.parse().unwrap()).collect();
        NetworkPolicy::new(mode, parse(allow), parse(deny)).unwrap()
    }

    #[test]
    fn entries_parse_and_show_canonically() {
        let table = [
            ("api.example.com", "api.example.com", None),
            ("API.Example.COM.", "api.example.com", None),
            ("*.example.org", "*.example.org", None),
            ("api.example.com:443", "api.example.com:443", Some(443)),
            ("203.0.113.7", "203.0.113.7", None),
            ("203.0.113.7:22", "203.0.113.7:22", Some(22)),
            ("198.51.100.0/24", "198.51.100.0/24", None),
            ("10.0.0.0/8:5432", "10.0.0.0/8:5432", Some(5432)),
            ("2001:db8::1", "2001:db8::1", None),
            ("2001:db8::/32", "2001:db8::/32", None),
            ("[2001:db8::1]:443", "[2001:db8::1]:443", Some(443)),
            ("[2001:db8::/32]:443", "[2001:db8::/32]:443", Some(443)),
            ("[::1]", "::1", None),
            ("_acme.example.com", "_acme.example.com", None),
        ];
        for (input, shown, port) in table {
            let e: Entry = input.parse().unwrap_or_else(|err| panic!("{input}: {err}"));
            assert_eq!(e.to_string(), shown, "{input}");
            assert_eq!(e.port, port, "{input}");
            assert_eq!(shown.parse::<Entry>().unwrap(), e, "round trip of {input}");
        }
    }

    #[test]
    fn bad_entries_get_typed_errors() {
        let long_label = format!("{}.com", "a".repeat(64));
        let long_name = format!("{}comxx", "abcdefghi.".repeat(25));
        type Check = fn(&PolicyError) -> bool;
        let table: Vec<(&str, Check)> = vec![
            ("", |e| matches!(e, PolicyError::Empty)),
            ("   ", |e| matches!(e, PolicyError::Empty)),
            ("example.com:0", |e| {
                matches!(e, PolicyError::PortZero { .. })
            }),
            ("example.com:65536", |e| {
                matches!(e, PolicyError::BadPort { .. })
            }),
            ("example.com:", |e| matches!(e, PolicyError::BadPort { .. })),
            ("example.com:+1", |e| {
                matches!(e, PolicyError::BadPort { .. })
            }),
            ("example..com", |e| {
                matches!(e, PolicyError::BadLabel { .. })
            }),
            ("-a.example.com", |e| {
                matches!(e, PolicyError::BadLabel { .. })
            }),
            ("a b.com", |e| matches!(e, PolicyError::BadLabel { .. })),
            ("exämple.com", |e| {
                matches!(e, PolicyError::BadLabel { .. })
            }),
            (&long_label, |e| matches!(e, PolicyError::BadLabel { .. })),
            (&long_name, |e| matches!(e, PolicyError::NameTooLong { .. })),
            ("a.*.example.com", |e| {
                matches!(e, PolicyError::BadWildcard { .. })
            }),
            ("*example.com", |e| {
                matches!(e, PolicyError::BadWildcard { .. })
            }),
            ("*", |e| matches!(e, PolicyError::BadWildcard { .. })),
            ("*.", |e| matches!(e, PolicyError::BadLabel { .. })),
            ("300.1.2.3", |e| matches!(e, PolicyError::BadAddress { .. })),
            ("1.2.3", |e| matches!(e, PolicyError::BadAddress { .. })),
            ("10.0.0.1/8", |e| matches!(e, PolicyError::HostBits { .. })),
            ("10.0.0.0/33", |e| {
                matches!(e, PolicyError::BadAddress { .. })
            }),
            ("2001:db8::1:443x", |e| {
                matches!(e, PolicyError::UnbracketedIpv6 { .. })
            }),
            ("[2001:db8::1]443", |e| {
                matches!(e, PolicyError::BadAddress { .. })
            }),
            ("[10.0.0.1]:80", |e| {
                matches!(e, PolicyError::BadAddress { .. })
            }),
            ("[2001:db8::1]:0", |e| {
                matches!(e, PolicyError::PortZero { .. })
            }),
        ];
        for (input, check) in table {
            let err = input.parse::<Entry>().expect_err(input);
            assert!(check(&err), "{input}: unexpected {err:?}");
            assert!(!err.to_string().is_empty());
        }
        let too_long = "a".repeat(MAX_ENTRY_LEN + 1);
        assert!(matches!(
            too_long.parse::<Entry>(),
            Err(PolicyError::EntryTooLong { .. })
        ));
    }

    #[test]
    fn serde_shape_is_the_apis() {
        let p: NetworkPolicy = serde_json::from_str(
            r#"{"mode":"allow","allow":["api.example.com:443","*.example.org","10.1.0.0/16"],"deny":["bad.example.org"]}"#,
        )
        .unwrap();
        assert_eq!(p.mode, Mode::Allow);
        assert_eq!(p.allow.len(), 3);
        let back = serde_json::to_value(&p).unwrap();
        assert_eq!(back["allow"][0], "api.example.com:443");
        assert_eq!(back["mode"], "allow");
        let defaulted: NetworkPolicy = serde_json::from_str("{}").unwrap();
        assert_eq!(defaulted, NetworkPolicy::none());
        for bad in [
            r#"{"mode":"sideways"}"#,
            r#"{"mode":"allow","allow":["example.com:0"]}"#,
            r#"{"mode":"none","allow":["example.com"]}"#,
            r#"{"mode":"open","extra":1}"#,
        ] {
            assert!(serde_json::from_str::<NetworkPolicy>(bad).is_err(), "{bad}");
        }
        let many: Vec<String> = (0..=MAX_ENTRIES)
            .map(|i| format!("h{i}.example.com"))
            .collect();
        let body = serde_json::json!({"mode": "allow", "allow": many}).to_string();
        let err = serde_json::from_str::<NetworkPolicy>(&body).unwrap_err();
        assert!(err.to_string().contains("at most 256"), "{err}");
    }

    #[test]
    fn names_the_resolver_answers() {
        let p = policy(
            Mode::Allow,
            &["api.example.com", "*.example.org:443", "198.51.100.0/24"],
            &["bad.example.org"],
        );
        let table = [
            ("api.example.com", true),
            ("API.EXAMPLE.COM.", true),
            ("x.api.example.com", false),
            ("example.com", false),
            ("a.example.org", true),
            ("a.b.example.org", true),
            ("example.org", false),
            ("badexample.org", false),
            ("bad.example.org", false),
            ("x.bad.example.org", true),
            ("other.test", false),
        ];
        for (name, want) in table {
            assert_eq!(p.allows_name(name), want, "{name}");
        }
        assert!(!NetworkPolicy::none().allows_name("api.example.com"));
        let open = policy(Mode::Open, &[], &["*.evil.test"]);
        assert!(open.allows_name("anything.test"));
        assert!(!open.allows_name("a.evil.test"));
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn decisions() {
        use Decision::*;
        use Reason::*;
        let blocked = crate::policy::Blocked::for_host(&["192.0.2.10".parse().unwrap()]);
        let allow = policy(
            Mode::Allow,
            &[
                "api.example.com",
                "*.cdn.test:443",
                "203.0.113.7:22",
                "198.51.100.0/24",
                "10.1.0.0/16",
                "0.0.0.0/0:5432",
            ],
            &["198.51.100.66", "evil.cdn.test", "203.0.113.99:443"],
        );
        let open = policy(
            Mode::Open,
            &["192.168.1.5", "api.example.com"],
            &["*.evil.test"],
        );
        let none = NetworkPolicy::none();
        #[rustfmt::skip]
        type Row<'a> = (&'a NetworkPolicy, &'a str, &'a [&'a str], Option<&'a str>, Decision);
        let table: Vec<Row> = vec![
            // explicit addresses, ports
            (&allow, "198.51.100.1:1234", &[], None, Allow),
            (&allow, "198.51.100.66:1234", &[], None, Refuse(Denied)),
            (&allow, "203.0.113.7:22", &[], None, Allow),
            (&allow, "203.0.113.7:23", &[], None, Refuse(NotAllowed)),
            (&allow, "10.1.2.3:80", &[], None, Allow),
            (&allow, "10.2.0.1:80", &[], None, Refuse(Blocked)),
            // 0.0.0.0/0 does not open private ranges, the host or loopback
            (&allow, "8.8.8.8:5432", &[], None, Allow),
            (&allow, "10.2.0.1:5432", &[], None, Refuse(Blocked)),
            (&allow, "127.0.0.1:5432", &[], None, Refuse(Blocked)),
            (&allow, "192.0.2.10:5432", &[], None, Refuse(Blocked)),
            (&allow, "169.254.169.254:80", &[], None, Refuse(Blocked)),
            (
                &allow,
                "[::ffff:127.0.0.1]:5432",
                &[],
                None,
                Refuse(Blocked),
            ),
            (&allow, "[fd00:ec2::254]:80", &[], None, Refuse(Blocked)),
            (&allow, "100.96.0.1:5432", &[], None, Refuse(Blocked)),
            // by learned name
            (
                &allow,
                "192.0.2.200:8080",
                &["api.example.com"],
                None,
                Allow,
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["api.example.com"],
                Some("api.example.com"),
                Allow,
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["api.example.com"],
                Some("other.test"),
                Refuse(ServerNameNotAllowed),
            ),
            (
                &allow,
                "192.0.2.200:80",
                &["api.example.com"],
                None,
                Refuse(NoServerName),
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["x.cdn.test"],
                Some("y.cdn.test"),
                Allow,
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["x.cdn.test"],
                Some("evil.cdn.test"),
                Refuse(Denied),
            ),
            (
                &allow,
                "192.0.2.200:80",
                &["x.cdn.test"],
                Some("x.cdn.test"),
                Refuse(NotAllowed),
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["evil.cdn.test", "x.cdn.test"],
                Some("x.cdn.test"),
                Refuse(Denied),
            ),
            (
                &allow,
                "192.0.2.200:443",
                &["unknown.test"],
                Some("api.example.com"),
                Refuse(NotAllowed),
            ),
            (
                &allow,
                "192.0.2.200:443",
                &[],
                Some("api.example.com"),
                Refuse(NotAllowed),
            ),
            (
                &allow,
                "203.0.113.99:443",
                &["api.example.com"],
                Some("api.example.com"),
                Refuse(Denied),
            ),
            (
                &allow,
                "10.9.9.9:443",
                &["api.example.com"],
                Some("api.example.com"),
                Refuse(Blocked),
            ),
            // open
            (&open, "8.8.8.8:443", &[], None, Allow),
            (
                &open,
                "8.8.8.8:443",
                &["api.example.com"],
                Some("other.test"),
                Allow,
            ),
            (
                &open,
                "8.8.8.8:443",
                &[],
                Some("a.evil.test"),
                Refuse(Denied),
            ),
            (&open, "8.8.8.8:22", &["a.evil.test"], None, Refuse(Denied)),
            (&open, "192.168.1.5:22", &[], None, Allow),
            (&open, "192.168.1.6:22", &[], None, Refuse(Blocked)),
            (&open, "172.16.0.1:22", &[], None, Refuse(Blocked)),
            (&open, "100.64.0.1:22", &[], None, Refuse(Blocked)),
            (&open, "[fc00::1]:22", &[], None, Refuse(Blocked)),
            (&open, "[fe80::1]:22", &[], None, Refuse(Blocked)),
            (&open, "224.0.0.1:22", &[], None, Refuse(Blocked)),
            (&open, "0.0.0.0:22", &[], None, Refuse(Blocked)),
            (&open, "192.0.2.10:8080", &[], None, Refuse(Blocked)),
            // none
            (
                &none,
                "8.8.8.8:443",
                &["api.example.com"],
                Some("api.example.com"),
                Refuse(ModeNone),
            ),
        ];
        for (p, dst, names, sni, want) in table {
            assert_eq!(
                p.decide(&blocked, sa(dst), names, sni),
                want,
                "{dst} {names:?} {sni:?} under {:?}",
                p.mode
            );
        }
    }

    #[test]
    fn rebinding_addresses_are_not_handed_out() {
        let blocked = Blocked::for_host(&["192.0.2.10".parse().unwrap()]);
        let p = policy(
            Mode::Allow,
            &["a.test", "10.1.0.0/16"],
            &["198.51.100.66", "198.51.100.67:22"],
        );
        let table = [
            ("198.51.100.1", true),
            ("198.51.100.66", false),
            ("198.51.100.67", true),
            ("127.0.0.1", false),
            ("169.254.169.254", false),
            ("192.0.2.10", false),
            ("10.1.0.1", true),
            ("10.2.0.1", false),
            ("::1", false),
            ("::ffff:169.254.169.254", false),
            ("fd00:ec2::254", false),
            ("2001:db8::1", true),
        ];
        for (ip, want) in table {
            assert_eq!(
                p.allows_learned_address(&blocked, ip.parse().unwrap()),
                want,
                "{ip}"
            );
        }
    }

    #[test]
    fn ip_rules_carve_never_and_foreign_private_ranges_out_of_allow_entries() {
        let host: IpAddr = "10.1.2.3".parse().unwrap();
        let p = policy(
            Mode::Allow,
            &[
                "10.1.0.0/16:443",
                "203.0.113.0/24",
                "127.0.0.1",
                "a.test",
                "0.0.0.0/0:5432",
            ],
            &["198.51.100.66", "198.51.100.67:22", "evil.test"],
        );
        let rules = p.ip_rules(&[host]);
        assert!(!rules.open);
        assert_eq!(
            rules.deny,
            vec!["198.51.100.66/32".parse::<IpNet>().unwrap()]
        );
        assert!(rules.blocked.contains(&"10.1.2.3/32".parse().unwrap()));
        assert!(rules.blocked.contains(&"169.254.0.0/16".parse().unwrap()));
        let reach = |ip: &str, port: u16| {
            let ip: IpAddr = ip.parse().unwrap();
            rules
                .allow
                .iter()
                .any(|(n, p)| n.contains(&ip) && p.is_none_or(|p| p == port))
        };
        assert!(reach("10.1.9.9", 443));
        assert!(!reach("10.1.9.9", 80));
        assert!(
            !reach("10.1.2.3", 443),
            "the host's own address is carved out"
        );
        assert!(reach("10.1.2.2", 443) && reach("10.1.2.4", 443));
        assert!(reach("203.0.113.5", 80));
        assert!(!reach("127.0.0.1", 80), "loopback is never allowed");
        assert!(reach("8.8.8.8", 5432));
        for ip in [
            "10.9.0.1",
            "192.168.0.1",
            "172.16.0.1",
            "100.64.0.1",
            "127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
        ] {
            assert!(
                !reach(ip, 5432),
                "{ip} must not be reachable through 0.0.0.0/0"
            );
        }
        // Carving stays small: at most one piece per prefix bit per hole.
        assert!(rules.allow.len() < 200, "{}", rules.allow.len());
        let none_rules = NetworkPolicy::none().ip_rules(&[host]);
        assert!(none_rules.allow.is_empty() && !none_rules.open);
        assert!(policy(Mode::Open, &[], &[]).ip_rules(&[]).open);
    }

    mod prop {
        use super::*;
        use proptest::prelude::*;

        fn entry() -> impl Strategy<Value = Entry> {
            let port = proptest::option::of(prop_oneof![Just(22u16), Just(80), Just(443), 1u16..]);
            let target = prop_oneof![
                (0u8..4).prop_map(|i| Target::Domain(format!("n{i}.test"))),
                (0u8..2).prop_map(|i| Target::Wildcard(format!("w{i}.test"))),
                (any::<u32>(), 8u8..=32).prop_map(|(a, len)| {
                    Target::Net(IpNet::V4(Ipv4Net::new(a.into(), len).unwrap().trunc()))
                }),
                (0u8..4).prop_map(|i| Target::Net(format!("198.51.100.{i}/32").parse().unwrap())),
            ];
            (target, port).prop_map(|(target, port)| Entry { target, port })
        }

        fn name() -> impl Strategy<Value = String> {
            prop_oneof![
                (0u8..4).prop_map(|i| format!("n{i}.test")),
                (0u8..2, 0u8..3).prop_map(|(w, i)| format!("x{i}.w{w}.test")),
                Just("w0.test".to_string()),
            ]
        }

        /// What the namespace's table does with a TCP connection to `ip:port`, read from
        /// [`IpRules`]' documented semantics: `true` = redirected to the proxy.
        fn kernel_redirects(rules: &IpRules, ip: IpAddr, port: u16) -> bool {
            if rules.deny.iter().any(|n| n.contains(&ip)) {
                return false;
            }
            let allowed = rules
                .allow
                .iter()
                .any(|(n, p)| n.contains(&ip) && p.is_none_or(|p| p == port));
            if allowed {
                return true;
            }
            if rules.blocked.iter().any(|n| n.contains(&ip)) {
                return false;
            }
            rules.open
        }

        fn any_ip() -> impl Strategy<Value = IpAddr> {
            prop_oneof![
                any::<u32>().prop_map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))),
                (0u8..=255, 0u8..=255).prop_map(|(a, b)| IpAddr::from([10, 1, a, b])),
                (0u8..=255).prop_map(|a| IpAddr::from([127, 0, 0, a])),
                (0u8..=255).prop_map(|a| IpAddr::from([169, 254, 169, a])),
                Just(IpAddr::from([192, 0, 2, 10])),
                (0u8..4).prop_map(|i| IpAddr::from([198, 51, 100, i])),
            ]
        }

        fn net_entry() -> impl Strategy<Value = Entry> {
            let port = proptest::option::of(prop_oneof![Just(22u16), Just(443)]);
            let net = prop_oneof![
                (any::<u32>(), 0u8..=32).prop_map(|(a, len)| {
                    IpNet::V4(Ipv4Net::new(a.into(), len).unwrap().trunc())
                }),
                (8u8..=32).prop_map(|len| IpNet::V4(
                    Ipv4Net::new([10, 1, 2, 3].into(), len).unwrap().trunc()
                )),
                (0u8..=32).prop_map(|len| IpNet::V4(
                    Ipv4Net::new([127, 0, 0, 1].into(), len).unwrap().trunc()
                )),
            ];
            (net, port).prop_map(|(n, port)| Entry {
                target: Target::Net(n),
                port,
            })
        }

        proptest! {
            /// The kernel's first wall and the proxy agree on addresses: whatever the proxy would
            /// allow by address the table redirects to it, and whatever the table redirects the
            /// proxy allows (deny entries with a port being the proxy's alone). In particular no
            /// allow entry, however wide, lets the table pass loopback, link-local or the host.
            #[test]
            fn firewall_and_proxy_agree(
                mode in prop_oneof![Just(Mode::Allow), Just(Mode::Open)],
                allow in proptest::collection::vec(net_entry(), 0..6),
                deny in proptest::collection::vec(net_entry(), 0..3),
                ip in any_ip(),
                port in prop_oneof![Just(22u16), Just(443), Just(8080)],
            ) {
                let p = NetworkPolicy::new(mode, allow, deny).unwrap();
                let host: IpAddr = "192.0.2.10".parse().unwrap();
                let blocked = Blocked::for_host(&[host]);
                let rules = p.ip_rules_with(&blocked);
                let redirected = kernel_redirects(&rules, ip, port);
                let allowed = p.decide(&blocked, SocketAddr::new(ip, port), &[], None) == Decision::Allow;
                let port_denied = p.deny.iter().any(|e| e.port == Some(port) && e.target.contains_ip(ip));
                prop_assert!(!allowed || redirected, "proxy allows {ip}:{port} but the table refuses");
                prop_assert!(!redirected || allowed || port_denied, "table passes {ip}:{port} but the proxy refuses");
                if blocked.is_never(ip) {
                    prop_assert!(!redirected && !allowed);
                }
            }

            /// Any string either parses to an entry that shows as a string parsing back to the
            /// same entry, or is rejected with an error; nothing panics.
            #[test]
            fn entries_round_trip(s in "[a-z0-9*.:/\\[\\]-]{0,40}") {
                if let Ok(e) = s.parse::<Entry>() {
                    prop_assert_eq!(e.to_string().parse::<Entry>(), Ok(e));
                }
            }

            /// Whatever else the policy says, a destination, learned name or server name that a
            /// deny entry matches is refused, and a denied name never resolves.
            #[test]
            fn deny_always_wins(
                mode in prop_oneof![Just(Mode::Allow), Just(Mode::Open)],
                allow in proptest::collection::vec(entry(), 0..8),
                deny in proptest::collection::vec(entry(), 1..4),
                ip in prop_oneof![any::<u32>().prop_map(|a| IpAddr::from(std::net::Ipv4Addr::from(a))),
                                  (0u8..4).prop_map(|i| IpAddr::from([198, 51, 100, i]))],
                port in prop_oneof![Just(22u16), Just(80), Just(443), 1u16..],
                names in proptest::collection::vec(name(), 0..3),
                sni in proptest::option::of(name()),
            ) {
                let p = NetworkPolicy::new(mode, allow, deny).unwrap();
                let blocked = Blocked::default();
                let dst = SocketAddr::new(ip, port);
                let learned: Vec<&str> = names.iter().map(String::as_str).collect();
                let d = p.decide(&blocked, dst, &learned, sni.as_deref());
                let hit = p.deny.iter().any(|e| e.port_matches(port) && (
                    e.target.contains_ip(ip)
                    || names.iter().any(|n| e.target.matches_name(n))
                    || sni.as_deref().is_some_and(|n| e.target.matches_name(n))));
                if hit {
                    prop_assert_eq!(d, Decision::Refuse(Reason::Denied));
                }
                for n in &names {
                    if p.deny.iter().any(|e| e.target.matches_name(n)) {
                        prop_assert!(!p.allows_name(n));
                    }
                }
                let rules = p.ip_rules_with(&blocked);
                for e in p.deny.iter().filter(|e| e.port.is_none()) {
                    if let Target::Net(net) = e.target {
                        prop_assert!(rules.deny.contains(&net));
                    }
                }
            }
        }
    }
}
