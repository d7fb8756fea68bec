//! The fixed addressing inside every sandbox's namespace. Each sandbox has its own namespace, so
//! every guest gets the same addresses (a template carries its NIC configuration, and a restored
//! clone needs no new addressing): the guest is [`GUEST`] on a /30 whose other end, [`GATEWAY`], is
//! the namespace's tap and where hearth's resolver and proxy listen. The addresses themselves are
//! defined once in `hearth_proto::net`, which the guest agent shares; the rest is the host's.

pub use hearth_proto::net::{GATEWAY, GUEST, MTU, PREFIX_LEN};

/// The guest's MAC address (locally administered, unicast).
pub const GUEST_MAC: &str = "06:00:64:60:00:02";
/// The tap device's name inside the sandbox namespace.
pub const TAP_NAME: &str = "hearth0";
/// Where the resolver listens (UDP and TCP) at [`GATEWAY`].
pub const DNS_PORT: u16 = 53;
/// Where the egress proxy listens at [`GATEWAY`]; the namespace's table redirects guest TCP here.
pub const PROXY_PORT: u16 = 15001;
