//! The sandbox namespace's nftables table (`inet hearth`): renders [`IpRules`] into one nft
//! script in the order the rules' doc gives, applies it and replaces it live as one transaction
//! inside the namespace (`nft -f -` started there), feeds the learned-address set, and recovers a
//! redirected connection's original destination for the proxy.
//!
//! The table has a filter chain at prerouting (before NAT, so it sees the guest's original
//! destinations) that accepts or refuses every new flow from the tap, a NAT chain that redirects
//! the accepted TCP to the proxy, and the `learned` set whose elements expire by themselves. A
//! flow the table accepted once stays accepted (conntrack `established`) when its learned address
//! expires or the rules change: cutting connections a change denies is the proxy's job, which
//! sees every one. A second filter chain, `conn_limit`, made once per sandbox
//! ([`Firewall::limit_connections`]) and never touched by rule replacement, resets the guest's new
//! TCP connections beyond its open-connection limit (`ct count`), so a policy change cannot reset
//! the count either. The sandbox network is IPv4 only (IPv6 is off in the namespace), so IPv6
//! entries are left out of the table and IPv6 packets are dropped.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::io::{self, Write as _};
use std::mem;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6, TcpStream};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ipnet::{IpNet, Ipv4Net};
use thiserror::Error;

use crate::addressing::{GATEWAY, PROXY_PORT, TAP_NAME};
use crate::netns::{NetNs, NetNsError};
use crate::rules::{AddressLearner, IpRules};

/// The table's family and name inside every sandbox namespace.
pub const TABLE: &str = "inet hearth";
/// The most address entries (allow + deny + blocked) one rule set may hold: far more than any
/// real policy, few enough that applying it stays fast.
pub const MAX_ENTRIES: usize = 4096;
/// Learned addresses stay reachable at least this long, so an answer with TTL 0 can still be used.
pub const MIN_LEARNED_TTL: Duration = Duration::from_secs(1);
/// And at most this long, whatever TTL an upstream gave.
pub const MAX_LEARNED_TTL: Duration = Duration::from_secs(24 * 3600);

/// Why the table could not be rendered or applied.
#[derive(Debug, Error)]
pub enum NftError {
    #[error("the network rules hold {count} address entries; at most {max} are allowed")]
    TooManyEntries { count: usize, max: usize },
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error("running nft (Debian package nftables): {0}")]
    Spawn(io::Error),
    #[error("nft refused the sandbox's rules ({status}): {stderr}")]
    Rejected { status: String, stderr: String },
}

/// The firewall of one sandbox namespace.
#[derive(Debug)]
pub struct Firewall {
    ns: NetNs,
    /// Until when each learned address is reachable, as last set in the kernel.
    learned: Mutex<HashMap<Ipv4Addr, Instant>>,
}

impl Firewall {
    /// The firewall of the namespace mounted at `netns`; nothing is applied yet.
    pub fn open(netns: &Path) -> Result<Firewall, NftError> {
        Ok(Firewall {
            ns: NetNs::open(netns)?,
            learned: Mutex::default(),
        })
    }

    /// Makes `rules` the namespace's rules, replacing the previous ones in one transaction (no
    /// packet sees a mix or an empty table). Learned addresses are kept.
    pub fn apply(&self, rules: &IpRules) -> Result<(), NftError> {
        let script = render(rules)?;
        self.run(&script)
    }

    /// Resets (TCP RST) every new guest TCP connection while `max` are open already; replaces an
    /// earlier limit. The kernel counts the namespace's live connections (conntrack), whatever
    /// their destination and whether or not the proxy has accepted them yet.
    pub fn limit_connections(&self, max: usize) -> Result<(), NftError> {
        self.run(&render_connection_limit(max))
    }

    fn run(&self, script: &str) -> Result<(), NftError> {
        let mut child = self
            .ns
            .command(nft_binary())?
            .args(["-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(NftError::Spawn)?;
        let written = child
            .stdin
            .take()
            .expect("stdin is piped")
            .write_all(script.as_bytes());
        let out = child.wait_with_output().map_err(NftError::Spawn)?;
        if !out.status.success() {
            return Err(NftError::Rejected {
                status: out.status.to_string(),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
            });
        }
        written.map_err(NftError::Spawn)
    }
}

impl AddressLearner for Firewall {
    /// Never shortens a learned address's life (two names may share an address, a CDN's, with
    /// different TTLs), and spares the nft run when the address is reachable long enough already.
    fn learn(&self, addrs: &[IpAddr], ttl: Duration) -> io::Result<()> {
        let ttl = ttl.clamp(MIN_LEARNED_TTL, MAX_LEARNED_TTL);
        let now = Instant::now();
        let until = now + ttl;
        // Held across the nft run, so a shorter TTL can never land after a longer one.
        let mut learned = self.learned.lock().unwrap_or_else(|e| e.into_inner());
        let extend: Vec<Ipv4Addr> = addrs
            .iter()
            .filter_map(|a| match a {
                IpAddr::V4(a) => Some(*a),
                IpAddr::V6(_) => None,
            })
            .filter(|a| learned.get(a).is_none_or(|known| *known < until))
            .collect();
        if extend.is_empty() {
            return Ok(());
        }
        let ms = ttl.as_millis();
        let elements: Vec<String> = extend
            .iter()
            .map(|a| format!("{a} timeout {ms}ms"))
            .collect();
        // Adding an element that is there already sets its timeout anew.
        let script = format!(
            "add element {TABLE} learned {{ {} }}\n",
            elements.join(", ")
        );
        self.run(&script).map_err(|e| match e {
            NftError::Spawn(e) => e,
            other => io::Error::other(other.to_string()),
        })?;
        if learned.len() > 1024 {
            learned.retain(|_, known| *known > now);
        }
        learned.extend(extend.into_iter().map(|a| (a, until)));
        Ok(())
    }
}

/// The nft script that creates the table if needed and replaces its rules with `rules`.
pub fn render(rules: &IpRules) -> Result<String, NftError> {
    let count = rules.allow.len() + rules.deny.len() + rules.blocked.len();
    if count > MAX_ENTRIES {
        return Err(NftError::TooManyEntries {
            count,
            max: MAX_ENTRIES,
        });
    }
    let deny = aggregate(rules.deny.iter());
    let blocked = aggregate(rules.blocked.iter());
    // An allow entry inside a blocked range lists it explicitly, so it passes before the blocked
    // check; any other allow entry (even one covering a blocked range) comes after it.
    let (inside_blocked, elsewhere): (Vec<_>, Vec<_>) = rules
        .allow
        .iter()
        .filter_map(|(net, port)| match net {
            IpNet::V4(net) => Some((net.trunc(), *port)),
            IpNet::V6(_) => None,
        })
        .partition(|(net, _)| blocked.iter().any(|b| b.contains(net)));

    let mut s = String::new();
    let t = TABLE;
    // Declaring what exists already is a no-op, so the same script creates and replaces.
    let _ = writeln!(
        s,
        "table {t} {{\n\
         \tset learned {{ type ipv4_addr; flags timeout; }}\n\
         \tchain guest_in {{ type filter hook prerouting priority -150; policy accept; }}\n\
         \tchain refuse {{ }}\n\
         \tchain to_proxy {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         }}"
    );
    for chain in ["guest_in", "refuse", "to_proxy"] {
        let _ = writeln!(s, "flush chain {t} {chain}");
    }
    let _ = writeln!(
        s,
        "add rule {t} refuse meta l4proto tcp reject with tcp reset"
    );
    let _ = writeln!(s, "add rule {t} refuse reject with icmpx admin-prohibited");

    let guest = |s: &mut String, rule: &str| {
        let _ = writeln!(s, "add rule {t} guest_in {rule}");
    };
    guest(&mut s, &format!("iifname != \"{TAP_NAME}\" accept"));
    guest(&mut s, "meta nfproto ipv6 drop");
    guest(&mut s, "ct state established,related accept");
    // 1. the gateway: DNS only.
    guest(&mut s, &format!("ip daddr {GATEWAY} udp dport 53 accept"));
    guest(&mut s, &format!("ip daddr {GATEWAY} tcp dport 53 accept"));
    guest(&mut s, &format!("ip daddr {GATEWAY} goto refuse"));
    // 2. denied, then blocked unless listed explicitly.
    if let Some(set) = set_of(&deny) {
        guest(&mut s, &format!("ip daddr {set} goto refuse"));
    }
    for rule in allow_rules(&inside_blocked) {
        guest(&mut s, &rule);
    }
    if let Some(set) = set_of(&blocked) {
        guest(&mut s, &format!("ip daddr {set} goto refuse"));
    }
    // 3. allowed, learned, or anything when open: on to the proxy.
    for rule in allow_rules(&elsewhere) {
        guest(&mut s, &rule);
    }
    guest(&mut s, "meta l4proto tcp ip daddr @learned accept");
    if rules.open {
        guest(&mut s, "meta l4proto tcp accept");
    }
    // 4. everything else.
    guest(&mut s, "goto refuse");

    let _ = writeln!(
        s,
        "add rule {t} to_proxy iifname \"{TAP_NAME}\" meta l4proto tcp ip daddr != {GATEWAY} \
         redirect to :{PROXY_PORT}"
    );
    Ok(s)
}

/// The nft script that creates the table if needed and (re)makes its `conn_limit` chain, which
/// runs before `guest_in` (priority -160).
pub fn render_connection_limit(max: usize) -> String {
    let t = TABLE;
    let max = u32::try_from(max).unwrap_or(u32::MAX);
    format!(
        "table {t} {{\n\
         \tchain conn_limit {{ type filter hook prerouting priority -160; policy accept; }}\n\
         }}\n\
         flush chain {t} conn_limit\n\
         add rule {t} conn_limit iifname \"{TAP_NAME}\" meta l4proto tcp ct state new \
         ct count over {max} reject with tcp reset\n"
    )
}

/// One accepting rule per distinct port (and one for entries without a port).
fn allow_rules(entries: &[(Ipv4Net, Option<u16>)]) -> Vec<String> {
    let mut by_port: BTreeMap<Option<u16>, Vec<Ipv4Net>> = BTreeMap::new();
    for (net, port) in entries {
        by_port.entry(*port).or_default().push(*net);
    }
    by_port
        .into_iter()
        .filter_map(|(port, nets)| {
            let set = set_of(&Ipv4Net::aggregate(&nets))?;
            Some(match port {
                Some(port) => format!("ip daddr {set} tcp dport {port} accept"),
                None => format!("meta l4proto tcp ip daddr {set} accept"),
            })
        })
        .collect()
}

/// The IPv4 networks of `nets`, with overlaps merged (nft refuses overlapping intervals).
fn aggregate<'a>(nets: impl Iterator<Item = &'a IpNet>) -> Vec<Ipv4Net> {
    let v4: Vec<Ipv4Net> = nets
        .filter_map(|n| match n {
            IpNet::V4(n) => Some(n.trunc()),
            IpNet::V6(_) => None,
        })
        .collect();
    Ipv4Net::aggregate(&v4)
}

/// An anonymous nft set literal, or `None` when there is nothing to match.
fn set_of(nets: &[Ipv4Net]) -> Option<String> {
    if nets.is_empty() {
        return None;
    }
    let items: Vec<String> = nets.iter().map(ToString::to_string).collect();
    Some(format!("{{ {} }}", items.join(", ")))
}

/// Where Debian puts nft (/usr/sbin, which a non-login PATH may lack) and where others do.
const NFT_PATHS: [&str; 3] = ["/usr/sbin/nft", "/sbin/nft", "/usr/bin/nft"];

fn nft_binary() -> &'static str {
    NFT_PATHS
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("nft")
}

/// Whether the `nft` binary sandbox firewalls need is installed (`hearth setup` installs it).
pub fn installed() -> bool {
    NFT_PATHS.iter().any(|p| Path::new(p).exists())
}

/// The destination a guest connection had before the namespace's table redirected it to the
/// proxy (`SO_ORIGINAL_DST`, from conntrack).
pub fn original_destination(stream: &TcpStream) -> io::Result<SocketAddr> {
    let fd = stream.as_raw_fd();
    if stream.local_addr()?.is_ipv4() {
        // SAFETY: sockaddr_in is plain data; getsockopt writes at most `len` bytes into it.
        let mut addr: libc::sockaddr_in = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IP,
                libc::SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv4Addr::from(u32::from_be(addr.sin_addr.s_addr));
        Ok(SocketAddr::V4(SocketAddrV4::new(
            ip,
            u16::from_be(addr.sin_port),
        )))
    } else {
        // SAFETY: as above, for sockaddr_in6.
        let mut addr: libc::sockaddr_in6 = unsafe { mem::zeroed() };
        let mut len = mem::size_of::<libc::sockaddr_in6>() as libc::socklen_t;
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::SOL_IPV6,
                libc::IP6T_SO_ORIGINAL_DST,
                (&mut addr as *mut libc::sockaddr_in6).cast(),
                &mut len,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        let ip = Ipv6Addr::from(addr.sin6_addr.s6_addr);
        Ok(SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::from_be(addr.sin6_port),
            addr.sin6_flowinfo,
            addr.sin6_scope_id,
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn net(s: &str) -> IpNet {
        s.parse().unwrap()
    }

    #[test]
    fn deny_and_blocked_come_before_allow_except_explicit_entries_inside_blocked() {
        let rules = IpRules {
            open: true,
            allow: vec![(net("10.1.2.3/32"), Some(80)), (net("0.0.0.0/0"), None)],
            deny: vec![net("198.51.100.0/24"), net("198.51.100.7/32")],
            blocked: vec![net("10.0.0.0/8"), net("fd00::/8")],
        };
        let s = render(&rules).unwrap();
        let at = |needle: &str| s.find(needle).unwrap_or_else(|| panic!("{needle} in {s}"));
        assert!(at("ip daddr { 198.51.100.0/24 } goto refuse") < at("10.1.2.3/32"));
        assert!(at("10.1.2.3/32") < at("ip daddr { 10.0.0.0/8 } goto refuse"));
        assert!(at("ip daddr { 10.0.0.0/8 } goto refuse") < at("0.0.0.0/0"));
        assert!(at("0.0.0.0/0") < at("@learned"));
        assert!(at("@learned") < at("guest_in meta l4proto tcp accept"));
        assert!(!s.contains("fd00"), "{s}");
    }

    #[test]
    fn the_connection_limit_is_its_own_chain_that_rule_replacement_leaves_alone() {
        let limit = render_connection_limit(7);
        assert!(
            limit.contains("ct count over 7 reject with tcp reset"),
            "{limit}"
        );
        assert!(
            limit.contains("flush chain inet hearth conn_limit"),
            "{limit}"
        );
        let rules = render(&IpRules::default()).unwrap();
        assert!(!rules.contains("conn_limit"), "{rules}");
    }
}
