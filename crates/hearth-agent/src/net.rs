//! The guest's side of the network: brings up `eth0` with the fixed addressing of
//! `hearth_proto::net` (address, netmask, MTU, default route via the gateway) and writes the
//! workload root's `/etc/resolv.conf` (the gateway is the DNS server) and `/etc/hosts`.
//!
//! Interfaces are configured with the classic ioctls on an `AF_INET` socket (`SIOCSIFADDR`,
//! `SIOCSIFNETMASK`, `SIOCSIFMTU`, `SIOCSIFFLAGS`, `SIOCADDRT`): the guest has no `ip` binary and
//! needs no netlink for one fixed link. A guest without `eth0` (a VM with no NIC) is left alone.
//!
//! In a template VM the interface is configured before the snapshot (the NIC state is part of it,
//! and every clone has the same addressing inside its own namespace); the files go into each
//! clone's own workload root after RESUME ([`write_root_files`]).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;

use hearth_proto::net::{netmask, GATEWAY, GUEST, MTU};

/// The guest's NIC (the first virtio-net device).
pub const NIC: &str = "eth0";

/// Why the network could not be configured.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{what} of {interface}: {source}")]
    Ioctl {
        what: &'static str,
        interface: String,
        source: io::Error,
    },
    #[error("opening a socket to configure the network: {0}")]
    Socket(io::Error),
    #[error("writing {path} in the workload root: {message}")]
    RootFile { path: &'static str, message: String },
}

/// PID 1's network step: configures `eth0` if the guest has one (`nic`: a cold boot or a
/// template's early init) and writes the resolver files into the workload root (`workload`: the
/// root and the hostname, once the root is mounted). Failures are reported on the console and the
/// boot goes on: the agent channel does not need the network, and the host enforces the policy
/// whatever the guest configures.
pub fn boot_step(nic: bool, workload: Option<(&Path, &str)>) {
    if !has_nic() {
        return;
    }
    if nic {
        match configure_nic() {
            Ok(_) => crate::log!(
                "{NIC} up: {GUEST}/{} via {GATEWAY}, MTU {MTU}",
                hearth_proto::net::PREFIX_LEN
            ),
            Err(e) => crate::log!("configuring the network: {e} (continuing without it)"),
        }
    }
    if let Some((root, hostname)) = workload {
        if let Err(e) = write_root_files(root, hostname) {
            crate::log!("{e} (continuing without it)");
        }
    }
}

/// Whether the guest has a NIC.
pub fn has_nic() -> bool {
    Path::new("/sys/class/net").join(NIC).exists()
}

/// Brings `eth0` up with the guest address, netmask and MTU, and adds the default route via the
/// gateway. Returns `false` (doing nothing) when the guest has no `eth0`.
pub fn configure_nic() -> Result<bool, NetError> {
    if !has_nic() {
        return Ok(false);
    }
    let socket = inet_socket()?;
    let fd = socket.as_raw_fd();
    let mut request = ifreq(NIC);
    request.ifr_ifru.ifru_addr = sockaddr(GUEST);
    ioctl(fd, libc::SIOCSIFADDR, &mut request, "setting the address")?;
    let mut request = ifreq(NIC);
    request.ifr_ifru.ifru_netmask = sockaddr(netmask());
    ioctl(
        fd,
        libc::SIOCSIFNETMASK,
        &mut request,
        "setting the netmask",
    )?;
    let mut request = ifreq(NIC);
    request.ifr_ifru.ifru_mtu = MTU as libc::c_int;
    ioctl(fd, libc::SIOCSIFMTU, &mut request, "setting the MTU")?;
    set_up(fd, NIC)?;
    add_default_route(fd)?;
    Ok(true)
}

/// Sets interface `name` up (keeping its other flags).
pub fn interface_up(name: &str) -> Result<(), NetError> {
    let socket = inet_socket()?;
    set_up(socket.as_raw_fd(), name)
}

/// Writes the workload root's `/etc/resolv.conf` (the gateway is the only name server) and
/// `/etc/hosts` (localhost, and `hostname` on the guest address). Resolved inside `root`: links the
/// image planted cannot redirect the writes.
pub fn write_root_files(root: &Path, hostname: &str) -> Result<(), NetError> {
    write(root, "etc/resolv.conf", &resolv_conf())?;
    write(root, "etc/hosts", &hosts(hostname))
}

fn write(root: &Path, path: &'static str, contents: &str) -> Result<(), NetError> {
    crate::in_root::write_in_root(root, Path::new(path), contents.as_bytes(), 0o644).map_err(|e| {
        NetError::RootFile {
            path,
            message: e.to_string(),
        }
    })
}

fn resolv_conf() -> String {
    format!("# written by hearth: the sandbox's resolver\nnameserver {GATEWAY}\n")
}

fn hosts(hostname: &str) -> String {
    format!(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{GUEST}\t{hostname}\n"
    )
}

fn inet_socket() -> Result<OwnedFd, NetError> {
    // SAFETY: socket(2) with constant arguments; the result is checked before use.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(NetError::Socket(io::Error::last_os_error()));
    }
    // SAFETY: socket returned a new descriptor we now own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn set_up(fd: libc::c_int, name: &str) -> Result<(), NetError> {
    let mut request = ifreq(name);
    ioctl(fd, libc::SIOCGIFFLAGS, &mut request, "reading the flags")?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { request.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short };
    ioctl(fd, libc::SIOCSIFFLAGS, &mut request, "setting it up")
}

fn add_default_route(fd: libc::c_int) -> Result<(), NetError> {
    // SAFETY: rtentry is plain data; zeroed means "no metric, no device, no options".
    let mut route: libc::rtentry = unsafe { std::mem::zeroed() };
    route.rt_dst = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_genmask = sockaddr(Ipv4Addr::UNSPECIFIED);
    route.rt_gateway = sockaddr(GATEWAY);
    route.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
    // SAFETY: SIOCADDRT reads a fully initialised rtentry.
    if unsafe { libc::ioctl(fd, libc::SIOCADDRT as _, &route) } < 0 {
        let source = io::Error::last_os_error();
        // A route that exists already (configured twice) is what we want.
        if source.raw_os_error() != Some(libc::EEXIST) {
            return Err(NetError::Ioctl {
                what: "adding the default route via the gateway",
                interface: NIC.into(),
                source,
            });
        }
    }
    Ok(())
}

fn ioctl(
    fd: libc::c_int,
    request: libc::c_ulong,
    ifreq: &mut libc::ifreq,
    what: &'static str,
) -> Result<(), NetError> {
    // SAFETY: an interface ioctl on a socket, with a valid ifreq naming the interface.
    if unsafe { libc::ioctl(fd, request as _, ifreq as *mut libc::ifreq) } < 0 {
        return Err(NetError::Ioctl {
            what,
            interface: ifreq_name(ifreq),
            source: io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// A zeroed `ifreq` naming `name` (truncated to `IFNAMSIZ - 1` bytes, NUL-terminated).
fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is a valid value.
    let mut request: libc::ifreq = unsafe { std::mem::zeroed() };
    for (slot, byte) in request
        .ifr_name
        .iter_mut()
        .zip(name.bytes().take(libc::IFNAMSIZ - 1))
    {
        *slot = byte as libc::c_char;
    }
    request
}

fn ifreq_name(request: &libc::ifreq) -> String {
    request
        .ifr_name
        .iter()
        .take_while(|c| **c != 0)
        .map(|c| *c as u8 as char)
        .collect()
}

fn sockaddr(address: Ipv4Addr) -> libc::sockaddr {
    let inet = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(address).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(inet) }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockaddr_carries_the_address_in_network_order() {
        let raw = sockaddr(GUEST);
        assert_eq!(raw.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(
            &raw.sa_data[2..6],
            &[100, 96, 0, 2].map(|b| b as libc::c_char)
        );
    }

    #[test]
    fn resolver_is_the_gateway_and_hosts_names_the_guest() {
        assert!(resolv_conf().contains("\nnameserver 100.96.0.1\n"));
        let hosts = hosts("box");
        assert!(hosts.starts_with("127.0.0.1\tlocalhost\n"), "{hosts}");
        assert!(hosts.contains("100.96.0.2\tbox\n"), "{hosts}");
    }

    #[test]
    fn long_interface_names_are_truncated_and_terminated() {
        let request = ifreq("a-very-long-interface-name");
        assert_eq!(ifreq_name(&request).len(), libc::IFNAMSIZ - 1);
        assert_eq!(request.ifr_name[libc::IFNAMSIZ - 1], 0);
    }
}
