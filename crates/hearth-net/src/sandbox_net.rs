//! One sandbox's network, from creation to removal: the namespace mounted at
//! `$HEARTH_HOME/net/<id>/netns` holding `lo` and the tap [`crate::addressing::TAP_NAME`] (IPv6
//! off), the namespace's firewall, and the resolver's and proxy's sockets bound inside it at the
//! gateway. [`SandboxNet::teardown`] (also on drop) removes it all; [`sweep`] removes what a
//! killed hearth left behind. Nothing is created outside `$HEARTH_HOME/net`: no veth, no route,
//! no host firewall change; the namespace, its tap and its table go with the last reference to it.

use std::io;
use std::net::{TcpListener, UdpSocket};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use thiserror::Error;

use crate::addressing::{DNS_PORT, GATEWAY, GUEST_MAC, PROXY_PORT, TAP_NAME};
use crate::netns::{self, NetNs, NetNsError};
use crate::nft::{Firewall, NftError};
use crate::rules::{AddressLearner, IpRules};
use crate::tap::{self, TapConfig, TapError};

/// The longest sandbox id accepted (it becomes a directory name).
pub const MAX_ID_LEN: usize = 64;

/// Why a sandbox network could not be created, changed or removed.
#[derive(Debug, Error)]
pub enum SandboxNetError {
    #[error(
        "invalid sandbox id {0:?} for a network: 1 to {MAX_ID_LEN} ASCII letters, digits, '-' or \
         '_', not starting with '-'"
    )]
    InvalidId(String),
    #[error("a network for sandbox {0} exists already")]
    Exists(String),
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error(transparent)]
    NetNs(#[from] NetNsError),
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Nft(#[from] NftError),
    #[error("switching IPv6 off in the sandbox namespace: {0}")]
    Ipv6(io::Error),
}

/// The sockets hearth's resolver and proxy serve a sandbox on, bound inside its namespace at
/// [`GATEWAY`] and set non-blocking (ready for `tokio::net::*::from_std`).
#[derive(Debug)]
pub struct ServiceSockets {
    /// UDP [`DNS_PORT`].
    pub dns_udp: UdpSocket,
    /// TCP [`DNS_PORT`].
    pub dns_tcp: TcpListener,
    /// TCP [`PROXY_PORT`], where the namespace's table redirects the guest's TCP.
    pub proxy: TcpListener,
}

/// A live sandbox network.
#[derive(Debug)]
pub struct SandboxNet {
    id: String,
    dir: PathBuf,
    netns_path: PathBuf,
    ns: NetNs,
    firewall: Arc<Firewall>,
    torn_down: bool,
}

impl SandboxNet {
    /// Creates sandbox `id`'s network under `home` with `rules` in force from the start. The tap
    /// is persistent (the VMM opens it later) and, with `tap_owner`, openable by that uid without
    /// privileges. On failure nothing is left behind.
    pub fn create(
        home: &Path,
        id: &str,
        rules: &IpRules,
        tap_owner: Option<u32>,
    ) -> Result<SandboxNet, SandboxNetError> {
        validate_id(id)?;
        // Render first: an absurd rule set fails before anything exists.
        crate::nft::render(rules)?;
        let root = net_root(home);
        std::fs::create_dir_all(&root).map_err(|source| SandboxNetError::Io {
            what: "creating",
            path: root.clone(),
            source,
        })?;
        let dir = root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SandboxNetError::Exists(id.to_owned()))
            }
            Err(source) => {
                return Err(SandboxNetError::Io {
                    what: "creating",
                    path: dir,
                    source,
                })
            }
        }
        let made = Self::populate(id, &dir, rules, tap_owner);
        if made.is_err() {
            let _ = remove_dir(&dir);
        }
        made
    }

    fn populate(
        id: &str,
        dir: &Path,
        rules: &IpRules,
        tap_owner: Option<u32>,
    ) -> Result<SandboxNet, SandboxNetError> {
        let netns_path = dir.join("netns");
        let ns = NetNs::create(&netns_path)?;
        ns.run_in(|| -> Result<(), SandboxNetError> {
            tap::disable_ipv6().map_err(SandboxNetError::Ipv6)?;
            tap::create_persistent(&TapConfig::gateway(tap_owner))?;
            Ok(())
        })??;
        let firewall = Firewall::open(&netns_path)?;
        firewall.apply(rules)?;
        Ok(SandboxNet {
            id: id.to_owned(),
            dir: dir.to_owned(),
            netns_path,
            ns,
            firewall: Arc::new(firewall),
            torn_down: false,
        })
    }

    /// Takes over sandbox `id`'s network, made under `home` by another hearth process whose VMM
    /// outlived it (the node daemon after a restart): the namespace and its tap stay as they are;
    /// [`SandboxNet::set_rules`] replaces the table and [`SandboxNet::bind_services`] binds the
    /// services anew (the old process's sockets died with it).
    pub fn open(home: &Path, id: &str) -> Result<SandboxNet, SandboxNetError> {
        validate_id(id)?;
        let dir = net_root(home).join(id);
        let netns_path = dir.join("netns");
        let ns = NetNs::open(&netns_path)?;
        let firewall = Firewall::open(&netns_path)?;
        Ok(SandboxNet {
            id: id.to_owned(),
            dir,
            netns_path,
            ns,
            firewall: Arc::new(firewall),
            torn_down: false,
        })
    }

    /// Lets go without removing anything: the namespace stays for a VMM that outlives this
    /// process, for [`SandboxNet::open`] to take over.
    pub fn release(mut self) {
        self.torn_down = true;
    }

    /// The sandbox id.
    pub fn id(&self) -> &str {
        &self.id
    }

    /// The namespace file the VMM is started in.
    pub fn netns_path(&self) -> &Path {
        &self.netns_path
    }

    /// The tap's name inside the namespace.
    pub fn tap(&self) -> &str {
        TAP_NAME
    }

    /// The MAC the guest's NIC gets (the same in every sandbox: each has its own namespace).
    pub fn mac(&self) -> &str {
        GUEST_MAC
    }

    /// Replaces the namespace's rules atomically; new flows see the new rules at once.
    pub fn set_rules(&self, rules: &IpRules) -> Result<(), SandboxNetError> {
        Ok(self.firewall.apply(rules)?)
    }

    /// Limits the guest to `max` open TCP connections at once; the next ones are reset at once.
    /// Replacing the rules ([`SandboxNet::set_rules`]) keeps the limit and its count.
    pub fn limit_connections(&self, max: usize) -> Result<(), SandboxNetError> {
        Ok(self.firewall.limit_connections(max)?)
    }

    /// What the resolver makes addresses reachable through.
    pub fn learner(&self) -> Arc<dyn AddressLearner> {
        self.firewall.clone()
    }

    /// Binds the resolver's and the proxy's sockets inside the namespace (once per sandbox: a
    /// second call fails with "address in use" while the first sockets live).
    pub fn bind_services(&self) -> Result<ServiceSockets, SandboxNetError> {
        let bound = self.ns.run_in(|| -> io::Result<ServiceSockets> {
            let sockets = ServiceSockets {
                dns_udp: UdpSocket::bind((GATEWAY, DNS_PORT))?,
                dns_tcp: TcpListener::bind((GATEWAY, DNS_PORT))?,
                proxy: TcpListener::bind((GATEWAY, PROXY_PORT))?,
            };
            sockets.dns_udp.set_nonblocking(true)?;
            sockets.dns_tcp.set_nonblocking(true)?;
            sockets.proxy.set_nonblocking(true)?;
            Ok(sockets)
        })?;
        bound.map_err(|source| SandboxNetError::Io {
            what: "binding the resolver and proxy sockets in",
            path: self.netns_path.clone(),
            source,
        })
    }

    /// Removes the namespace mount and the sandbox's directory. Idempotent. The kernel frees the
    /// namespace, its tap and its table when the last process and socket in it are gone (the
    /// VMM's, and the [`ServiceSockets`]' once the resolver and proxy drop them).
    pub fn teardown(&mut self) -> Result<(), SandboxNetError> {
        if self.torn_down {
            return Ok(());
        }
        remove_dir(&self.dir)?;
        self.torn_down = true;
        Ok(())
    }
}

impl Drop for SandboxNet {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::warn!(sandbox = %self.id, error = %e, "removing the sandbox network failed");
        }
    }
}

/// Removes every sandbox network under `home` whose id `owned` does not claim (what a killed
/// hearth left behind); returns the ids removed.
pub fn sweep(home: &Path, owned: impl Fn(&str) -> bool) -> Result<Vec<String>, SandboxNetError> {
    let root = net_root(home);
    let entries = match std::fs::read_dir(&root) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(source) => {
            return Err(SandboxNetError::Io {
                what: "listing",
                path: root,
                source,
            })
        }
    };
    let mut removed = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|source| SandboxNetError::Io {
            what: "listing",
            path: root.clone(),
            source,
        })?;
        let name = entry.file_name();
        let Some(id) = name.to_str() else { continue };
        if owned(id) {
            continue;
        }
        remove_dir(&entry.path())?;
        removed.push(id.to_owned());
    }
    Ok(removed)
}

/// Where sandbox networks live under hearth's home.
pub fn net_root(home: &Path) -> PathBuf {
    home.join("net")
}

/// Accepts ids that are safe as one path component and short.
pub fn validate_id(id: &str) -> Result<(), SandboxNetError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && !id.starts_with('-')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(SandboxNetError::InvalidId(id.to_owned()))
    }
}

/// Unmounts the namespace in `dir` and removes `dir`; a missing `dir` is fine, and so is a stray
/// file in its place.
fn remove_dir(dir: &Path) -> Result<(), SandboxNetError> {
    netns::remove(&dir.join("netns"))?;
    let removed = match std::fs::symlink_metadata(dir) {
        Ok(meta) if !meta.is_dir() => std::fs::remove_file(dir),
        _ => std::fs::remove_dir_all(dir),
    };
    match removed {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(source) => Err(SandboxNetError::Io {
            what: "removing",
            path: dir.to_owned(),
            source,
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_that_are_not_one_safe_path_part_are_refused() {
        for bad in [
            "",
            "..",
            ".",
            "a/b",
            "-x",
            "a b",
            "é",
            &"x".repeat(MAX_ID_LEN + 1),
        ] {
            assert!(validate_id(bad).is_err(), "{bad:?} accepted");
        }
        for good in ["a", "sb-0123_x", &"x".repeat(MAX_ID_LEN)] {
            validate_id(good).unwrap();
        }
    }
}
