//! The contract between the policy side (policy, resolver, proxy) and the kernel side (the
//! namespace's nftables table): [`IpRules`], the address-level part of a policy that the kernel
//! enforces before the proxy sees a connection, and [`AddressLearner`], through which the resolver
//! makes the addresses it handed out for allowed names reachable for their TTL.

use std::io;
use std::net::IpAddr;
use std::time::Duration;

use ipnet::IpNet;

/// What the namespace's firewall enforces for guest traffic, in this order:
/// 1. to [`crate::addressing::GATEWAY`]: DNS (UDP/TCP 53) accepted, anything else rejected;
/// 2. TCP to an address in `deny` or `blocked`: rejected with a TCP reset, unless `blocked` is
///    overridden by an explicit entry in `allow` (only the private ranges may be; see `policy`);
/// 3. TCP to an address in `allow` (with its port, when one is given), to a learned address, or to
///    anything when `open`: redirected to the proxy at [`crate::addressing::PROXY_PORT`];
/// 4. everything else (other TCP, all other UDP, ICMP...): rejected (TCP reset / ICMP
///    admin-prohibited), so tools fail at once instead of hanging.
///
/// The proxy re-checks every redirected connection against the full policy: the table is the
/// fast, kernel-enforced first wall, not the only one.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IpRules {
    /// `open` mode: any destination not denied or blocked goes to the proxy.
    pub open: bool,
    /// Explicit address entries, each with an optional port.
    pub allow: Vec<(IpNet, Option<u16>)>,
    /// Address entries that win over everything.
    pub deny: Vec<IpNet>,
    /// Never reachable unless an `allow` entry lists a range inside them explicitly: loopback,
    /// link-local and metadata, the host's own addresses, private ranges.
    pub blocked: Vec<IpNet>,
}

/// Makes addresses reachable for a while: the resolver calls it with the addresses it is about to
/// hand out for an allowed name, before the guest sees the answer.
pub trait AddressLearner: Send + Sync {
    /// Make `addrs` reachable (subject to `deny` and `blocked`) for `ttl`.
    fn learn(&self, addrs: &[IpAddr], ttl: Duration) -> io::Result<()>;
}
