//! The fixed addressing inside every sandbox's namespace. Each sandbox has its own namespace, so
//! every guest gets the same addresses (a template carries its NIC configuration, and a restored
//! clone needs no new addressing): the guest is [`GUEST`] on a /30 whose other end, [`GATEWAY`], is
//! the namespace's tap and where hearth's resolver and proxy listen. The range is from RFC 6598's
//! shared address space (100.64.0.0/10), which user traffic rarely targets.

use std::net::Ipv4Addr;

/// The guest's `eth0` address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
/// The tap's address in the sandbox namespace: the guest's default route, DNS server and proxy.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 30;
/// The guest's MAC address (locally administered, unicast).
pub const GUEST_MAC: &str = "06:00:64:60:00:02";
/// The tap device's name inside the sandbox namespace.
pub const TAP_NAME: &str = "hearth0";
/// The link MTU on both ends.
pub const MTU: u32 = 1500;
/// Where the resolver listens (UDP and TCP) at [`GATEWAY`].
pub const DNS_PORT: u16 = 53;
/// Where the egress proxy listens at [`GATEWAY`]; the namespace's table redirects guest TCP here.
pub const PROXY_PORT: u16 = 15001;
