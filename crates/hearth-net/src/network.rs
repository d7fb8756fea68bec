//! One sandbox's whole network, as the rest of hearth sees it: [`SandboxNetwork::start`] creates
//! the namespace, tap and firewall ([`crate::sandbox_net`]), binds the resolver and the egress
//! proxy inside it and serves them on the caller's tokio runtime, all sharing one learned-address
//! ledger; [`SandboxNetwork::set_policy`] changes the policy of all three at once (the firewall
//! first, so nothing newly refused gets through while the others catch up; the proxy cuts open
//! connections the new policy refuses); dropping it (or [`SandboxNetwork::teardown`]) stops the
//! services and removes everything; [`SandboxNetwork::release`] and [`SandboxNetwork::adopt`] hand
//! a network over from one node process to the next, like its detached VM. `home` is the
//! directory whose `net/` holds the networks (`hearth run` and the node daemon use different ones,
//! so each sweeps only its own).

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::dns::{DnsError, DnsStats, Resolver, ResolverConfig, ResolverTask};
use crate::learned::LearnedAddrs;
use crate::policy::{Blocked, NetworkPolicy};
use crate::proxy::{EgressProxy, ProxyConfig, ProxyStats, ProxyTask, RefusedAttempt};
use crate::sandbox_net::{SandboxNet, SandboxNetError};

/// Where the resolver forwards when the host names no nameserver: nothing listens there, so
/// allowed names get SERVFAIL.
const NO_UPSTREAM: SocketAddr = SocketAddr::new(IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 53);

/// Addresses remembered per sandbox from DNS answers.
const LEDGER_ADDRESSES: usize = 4096;

/// What every sandbox network of one hearth shares.
#[derive(Debug, Clone)]
pub struct NetworkOptions {
    /// Where the resolver forwards allowed queries (from the host's namespace).
    pub upstream: SocketAddr,
    /// The host's own addresses: never reachable from a sandbox.
    pub host_addrs: Vec<IpAddr>,
    /// Lets a VMM running as this uid open the tap without privileges.
    pub tap_owner: Option<u32>,
    /// Bytes per second in each direction per sandbox (`--net-rate`).
    pub rate_limit: Option<u64>,
    /// Open TCP connections per sandbox (`--net-conns`), enforced by the namespace's table and
    /// by the proxy: more are reset.
    pub max_connections: usize,
}

impl NetworkOptions {
    /// Options for this host: `upstream` or the host's first resolv.conf nameserver (none there:
    /// a warning, and names do not resolve), the host's addresses as they are now.
    pub fn for_host(upstream: Option<SocketAddr>) -> Result<NetworkOptions, NetworkError> {
        let upstream = match upstream {
            Some(addr) => addr,
            None => crate::dns::host_upstream().unwrap_or_else(|e| {
                // Sandboxes still get their network (addresses, `none`); names just do not
                // resolve (the resolver answers SERVFAIL) until --dns-upstream names a server.
                tracing::warn!("{e}; sandboxes' DNS has no upstream (pass --dns-upstream)");
                NO_UPSTREAM
            }),
        };
        Ok(NetworkOptions {
            upstream,
            host_addrs: host_addresses().map_err(NetworkError::HostAddresses)?,
            tap_owner: None,
            rate_limit: None,
            max_connections: ProxyConfig::default().max_connections,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NetworkError {
    #[error(transparent)]
    Net(#[from] SandboxNetError),
    #[error("the sandbox resolver: {0}")]
    Dns(#[from] DnsError),
    #[error("the sandbox egress proxy: {0}")]
    Proxy(io::Error),
    #[error("listing the host's addresses: {0}")]
    HostAddresses(io::Error),
}

/// Counters of one sandbox's network, for its record and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct NetworkStats {
    pub dns: DnsStats,
    pub proxy: ProxyStats,
}

/// A running sandbox network. Needs a tokio runtime to start (its services run on it).
pub struct SandboxNetwork {
    net: Mutex<SandboxNet>,
    blocked: Blocked,
    resolver: Resolver,
    proxy: EgressProxy,
    policy: Mutex<NetworkPolicy>,
    _tasks: (ResolverTask, ProxyTask),
}

impl SandboxNetwork {
    /// Creates sandbox `id`'s network under `home` with `policy` in force from the first packet.
    pub fn start(
        home: &Path,
        id: &str,
        policy: NetworkPolicy,
        options: &NetworkOptions,
    ) -> Result<SandboxNetwork, NetworkError> {
        let blocked = Blocked::for_host(&options.host_addrs);
        let net = SandboxNet::create(home, id, &policy.ip_rules_with(&blocked), options.tap_owner)?;
        net.limit_connections(options.max_connections)?;
        Self::serve(net, blocked, policy, options)
    }

    /// Takes over sandbox `id`'s network left by a previous hearth process (see
    /// [`SandboxNet::open`]) with `policy`, and serves it again. Connections the guest had open
    /// through the previous process are gone; new ones work at once.
    pub fn adopt(
        home: &Path,
        id: &str,
        policy: NetworkPolicy,
        options: &NetworkOptions,
    ) -> Result<SandboxNetwork, NetworkError> {
        let blocked = Blocked::for_host(&options.host_addrs);
        let net = SandboxNet::open(home, id)?;
        net.set_rules(&policy.ip_rules_with(&blocked))?;
        net.limit_connections(options.max_connections)?;
        Self::serve(net, blocked, policy, options)
    }

    fn serve(
        net: SandboxNet,
        blocked: Blocked,
        policy: NetworkPolicy,
        options: &NetworkOptions,
    ) -> Result<SandboxNetwork, NetworkError> {
        let sockets = net.bind_services()?;
        let ledger = Arc::new(LearnedAddrs::new(LEDGER_ADDRESSES));
        let resolver = Resolver::new(
            ResolverConfig::new(options.upstream),
            policy.clone(),
            blocked.clone(),
            ledger.clone(),
            net.learner(),
        );
        let resolver_task = resolver.spawn(sockets.dns_udp, sockets.dns_tcp)?;
        let proxy = EgressProxy::new(
            ProxyConfig {
                rate_limit: options.rate_limit,
                max_connections: options.max_connections,
                ..ProxyConfig::default()
            },
            policy.clone(),
            blocked.clone(),
            ledger,
            crate::proxy::redirected_destination(),
        );
        let proxy_task = proxy.spawn(sockets.proxy).map_err(NetworkError::Proxy)?;
        Ok(SandboxNetwork {
            net: Mutex::new(net),
            blocked,
            resolver,
            proxy,
            policy: Mutex::new(policy),
            _tasks: (resolver_task, proxy_task),
        })
    }

    /// The namespace the VMM runs in.
    pub fn netns_path(&self) -> std::path::PathBuf {
        self.lock_net().netns_path().to_owned()
    }

    /// The tap the VMM opens inside the namespace.
    pub fn tap(&self) -> String {
        self.lock_net().tap().to_owned()
    }

    /// The guest's MAC address.
    pub fn mac(&self) -> String {
        self.lock_net().mac().to_owned()
    }

    /// The policy in force.
    pub fn policy(&self) -> NetworkPolicy {
        self.policy
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Replaces the policy: the firewall at once, then the resolver's next answer and the proxy,
    /// which resets open connections the new policy refuses.
    pub fn set_policy(&self, policy: NetworkPolicy) -> Result<(), NetworkError> {
        let mut current = self.policy.lock().unwrap_or_else(|e| e.into_inner());
        self.lock_net()
            .set_rules(&policy.ip_rules_with(&self.blocked))?;
        self.resolver.set_policy(policy.clone());
        self.proxy.set_policy(policy.clone());
        *current = policy;
        Ok(())
    }

    pub fn stats(&self) -> NetworkStats {
        NetworkStats {
            dns: self.resolver.stats(),
            proxy: self.proxy.stats(),
        }
    }

    /// The most recent refused attempts (bounded), oldest first.
    pub fn refused(&self) -> Vec<RefusedAttempt> {
        self.proxy.refused()
    }

    /// Stops the services and leaves the namespace, tap and table for a VMM that outlives this
    /// process ([`SandboxNetwork::adopt`] serves them again).
    pub fn release(self) {
        let SandboxNetwork { net, _tasks, .. } = self;
        drop(_tasks);
        net.into_inner()
            .unwrap_or_else(|e| e.into_inner())
            .release();
    }

    /// Stops the services and removes the namespace, tap and table.
    pub fn teardown(self) -> Result<(), NetworkError> {
        let SandboxNetwork { net, _tasks, .. } = self;
        drop(_tasks);
        let mut net = net.into_inner().unwrap_or_else(|e| e.into_inner());
        net.teardown()?;
        Ok(())
    }

    fn lock_net(&self) -> std::sync::MutexGuard<'_, SandboxNet> {
        self.net.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Every address configured on the host's interfaces now (`getifaddrs`).
pub fn host_addresses() -> io::Result<Vec<IpAddr>> {
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs allocates a list it returns in `head`; freed below with freeifaddrs.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut addrs = Vec::new();
    let mut cursor = head;
    while !cursor.is_null() {
        // SAFETY: `cursor` is a node of the list getifaddrs returned, not yet freed.
        let entry = unsafe { &*cursor };
        if !entry.ifa_addr.is_null() {
            // SAFETY: ifa_addr points to a sockaddr whose family says which struct it is.
            let family = unsafe { (*entry.ifa_addr).sa_family } as i32;
            match family {
                libc::AF_INET => {
                    // SAFETY: an AF_INET address is a sockaddr_in.
                    let sin = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in) };
                    addrs.push(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ));
                }
                libc::AF_INET6 => {
                    // SAFETY: an AF_INET6 address is a sockaddr_in6.
                    let sin6 = unsafe { &*(entry.ifa_addr as *const libc::sockaddr_in6) };
                    addrs.push(IpAddr::from(sin6.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
        cursor = entry.ifa_next;
    }
    // SAFETY: `head` came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    addrs.sort();
    addrs.dedup();
    Ok(addrs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_host_has_at_least_its_loopback_address() {
        let addrs = host_addresses().unwrap();
        assert!(addrs.contains(&IpAddr::from([127, 0, 0, 1])), "{addrs:?}");
    }
}
