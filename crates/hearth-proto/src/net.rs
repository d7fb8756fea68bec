//! The guest's fixed network addressing, shared by the host (`hearth-net`, which puts the gateway
//! on the tap in each sandbox's own network namespace) and the guest agent (which configures
//! `eth0`).
//! Every sandbox has its own namespace, so every guest gets the same addresses: a template carries
//! its NIC configuration and a restored clone needs no new addressing. The range is from RFC 6598's
//! shared address space (100.64.0.0/10), which user traffic rarely targets.

use std::net::Ipv4Addr;

/// The guest's `eth0` address.
pub const GUEST: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 2);
/// The host end of the link (the tap in the sandbox's namespace): the guest's default route, DNS
/// server and egress proxy.
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(100, 96, 0, 1);
/// Prefix length of the guest's link.
pub const PREFIX_LEN: u8 = 30;
/// The link MTU on both ends.
pub const MTU: u32 = 1500;

/// The netmask of [`PREFIX_LEN`].
pub fn netmask() -> Ipv4Addr {
    Ipv4Addr::from(u32::MAX << (32 - PREFIX_LEN))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_and_gateway_share_the_link() {
        assert_eq!(netmask(), Ipv4Addr::new(255, 255, 255, 252));
        let mask = u32::from(netmask());
        assert_eq!(u32::from(GUEST) & mask, u32::from(GATEWAY) & mask);
        assert_ne!(GUEST, GATEWAY);
    }
}
