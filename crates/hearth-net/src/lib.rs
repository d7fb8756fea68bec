//! Sandbox networking. Every sandbox's VMM runs in its own network namespace holding one tap device
//! (the guest's `eth0`) and nothing that routes anywhere: the host never forwards a guest packet.
//! What leaves does so through hearth itself, on the host's side of the wall:
//!
//! - the guest's DNS queries reach a per-sandbox socket of the resolver ([`dns`]) bound inside the
//!   namespace at [`addressing::GATEWAY`]; it answers only for names the [`policy`] allows and
//!   records what it handed out ([`learned`]);
//! - the namespace's nftables table ([`nft`]) rejects at once (TCP RST / ICMP admin-prohibited)
//!   what the policy can never allow and redirects the rest of the guest's TCP to the egress proxy
//!   ([`proxy`]), which decides exactly (addresses, ports, names, TLS SNI / HTTP Host) and connects
//!   out from the host's namespace;
//! - [`sandbox_net`] creates, updates and removes one sandbox's namespace, tap and table, and
//!   sweeps whatever a crashed hearth left behind.
//!
//! Kernel-facing parts ([`netns`], [`tap`], [`nft`]) sit behind small types so the policy, the
//! resolver and the proxy are testable on their own.

pub mod addressing;
pub mod ceiling;
pub mod dns;
pub mod learned;
pub mod netns;
pub mod network;
pub mod nft;
pub mod policy;
pub mod proxy;
pub mod rules;
pub mod sandbox_net;
pub mod sni;
pub mod tap;
