//! Tap devices, made and configured with ioctls (no `ip` process per step): a persistent tap that a
//! VMM opens later, its MAC, IPv4 address, MTU and link state, and switching IPv6 off. Every
//! function here acts on the calling thread's network namespace, so callers run them inside
//! [`crate::netns::NetNs::run_in`].

use std::fs::{File, OpenOptions};
use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use thiserror::Error;

/// The tap's own MAC in every sandbox namespace (locally administered, unicast). Fixed, like the
/// addressing, so a guest restored from a snapshot keeps a valid ARP entry for its gateway.
pub const GATEWAY_MAC: [u8; 6] = [0x06, 0x00, 0x64, 0x60, 0x00, 0x01];

/// One tap device's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TapConfig {
    /// The interface name (at most 15 bytes).
    pub name: String,
    /// The device's own MAC.
    pub mac: [u8; 6],
    /// The device's IPv4 address and prefix length.
    pub address: Ipv4Addr,
    pub prefix_len: u8,
    pub mtu: u32,
    /// The uid allowed to open the tap without CAP_NET_ADMIN (the VMM's), if any.
    pub owner: Option<u32>,
}

/// A tap step that failed, with the device's name.
#[derive(Debug, Error)]
pub enum TapError {
    #[error("invalid tap name {0:?} (1 to 15 bytes, no '/', NUL or whitespace)")]
    InvalidName(String),
    #[error("invalid prefix length /{0} for the tap's IPv4 address")]
    InvalidPrefix(u8),
    #[error("tap {name}: {step}: {source}")]
    Step {
        name: String,
        step: &'static str,
        source: io::Error,
    },
}

impl TapConfig {
    /// The sandbox side of a guest's link: [`crate::addressing::TAP_NAME`] at
    /// [`crate::addressing::GATEWAY`] with [`GATEWAY_MAC`].
    pub fn gateway(owner: Option<u32>) -> TapConfig {
        use crate::addressing::{GATEWAY, MTU, PREFIX_LEN, TAP_NAME};
        TapConfig {
            name: TAP_NAME.to_owned(),
            mac: GATEWAY_MAC,
            address: GATEWAY,
            prefix_len: PREFIX_LEN,
            mtu: MTU,
            owner,
        }
    }
}

/// Creates the persistent tap `cfg.name` in the calling thread's namespace, owned by
/// `cfg.owner`, with its MAC, address and MTU, and brings it up.
pub fn create_persistent(cfg: &TapConfig) -> Result<(), TapError> {
    let name = &cfg.name;
    let step = |step: &'static str| {
        move |source| TapError::Step {
            name: name.clone(),
            step,
            source,
        }
    };
    if cfg.prefix_len > 32 {
        return Err(TapError::InvalidPrefix(cfg.prefix_len));
    }
    let tun = open_tap(name)?;
    cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 1 as libc::c_ulong) })
        .map_err(step("TUNSETPERSIST"))?;
    if let Some(uid) = cfg.owner {
        cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETOWNER, uid as libc::c_ulong) })
            .map_err(step("TUNSETOWNER"))?;
    }
    drop(tun);
    let configured = (|| {
        let sock = ioctl_socket().map_err(step("socket"))?;
        let mut req = ifreq(name)?;
        let mut hw: libc::sockaddr = unsafe { std::mem::zeroed() };
        hw.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in hw.sa_data.iter_mut().zip(cfg.mac) {
            *d = s as libc::c_char;
        }
        req.ifr_ifru.ifru_hwaddr = hw;
        ioctl(&sock, libc::SIOCSIFHWADDR, &mut req).map_err(step("set MAC"))?;
        req.ifr_ifru.ifru_addr = sockaddr_v4(cfg.address);
        ioctl(&sock, libc::SIOCSIFADDR, &mut req).map_err(step("set address"))?;
        let mask = u32::MAX
            .checked_shl(32 - u32::from(cfg.prefix_len))
            .unwrap_or(0);
        req.ifr_ifru.ifru_netmask = sockaddr_v4(Ipv4Addr::from(mask));
        ioctl(&sock, libc::SIOCSIFNETMASK, &mut req).map_err(step("set netmask"))?;
        req.ifr_ifru.ifru_mtu = cfg.mtu as libc::c_int;
        ioctl(&sock, libc::SIOCSIFMTU, &mut req).map_err(step("set MTU"))?;
        set_flags(&sock, name, libc::IFF_UP as libc::c_short, true).map_err(step("set up"))
    })();
    if configured.is_err() {
        let _ = delete_persistent(name);
    }
    configured
}

/// Removes the persistent tap `name` from the calling thread's namespace (clears its persist
/// flag; the device goes when its last opener closes it).
pub fn delete_persistent(name: &str) -> Result<(), TapError> {
    let tun = open_tap(name)?;
    cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETPERSIST, 0 as libc::c_ulong) }).map_err(
        |source| TapError::Step {
            name: name.to_owned(),
            step: "TUNSETPERSIST off",
            source,
        },
    )
}

/// Attaches to the tap `name` in the calling thread's namespace as a VMM does (creating it, not
/// persistent, if it does not exist): reads from the returned file are frames the namespace sends
/// to the guest, writes are frames from the guest.
pub fn open_tap(name: &str) -> Result<File, TapError> {
    let step = |step: &'static str| {
        move |source| TapError::Step {
            name: name.to_owned(),
            step,
            source,
        }
    };
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(step("open /dev/net/tun"))?;
    let mut req = ifreq(name)?;
    req.ifr_ifru.ifru_flags = (libc::IFF_TAP | libc::IFF_NO_PI) as libc::c_short;
    cvt(unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &mut req) })
        .map_err(step("TUNSETIFF"))?;
    Ok(tun)
}

/// Turns IPv6 off for every interface of the calling thread's namespace, present and future:
/// the sandbox network is IPv4 only for now, so the guest has no IPv6 path to anything.
pub fn disable_ipv6() -> io::Result<()> {
    // /proc/sys/net shows the namespace of the thread that opens it.
    for conf in ["default", "all", "lo"] {
        let path = format!("/proc/sys/net/ipv6/conf/{conf}/disable_ipv6");
        match std::fs::write(&path, "1") {
            Ok(()) => {}
            // A kernel without IPv6 has nothing to switch off.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(io::Error::new(e.kind(), format!("{path}: {e}"))),
        }
    }
    Ok(())
}

/// An AF_INET datagram socket in the calling thread's namespace, for interface ioctls.
pub(crate) fn ioctl_socket() -> io::Result<OwnedFd> {
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Sets (`on`) or clears `flags` on interface `name`.
pub(crate) fn set_flags(
    sock: &OwnedFd,
    name: &str,
    flags: libc::c_short,
    on: bool,
) -> io::Result<()> {
    let mut req = ifreq(name).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    ioctl(sock, libc::SIOCGIFFLAGS, &mut req)?;
    unsafe {
        if on {
            req.ifr_ifru.ifru_flags |= flags;
        } else {
            req.ifr_ifru.ifru_flags &= !flags;
        }
    }
    ioctl(sock, libc::SIOCSIFFLAGS, &mut req)
}

fn ifreq(name: &str) -> Result<libc::ifreq, TapError> {
    let bytes = name.as_bytes();
    if bytes.is_empty()
        || bytes.len() >= libc::IFNAMSIZ
        || bytes
            .iter()
            .any(|b| *b == 0 || *b == b'/' || b.is_ascii_whitespace())
    {
        return Err(TapError::InvalidName(name.to_owned()));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    Ok(req)
}

fn ioctl(sock: &OwnedFd, request: libc::Ioctl, req: &mut libc::ifreq) -> io::Result<()> {
    cvt(unsafe { libc::ioctl(sock.as_raw_fd(), request, req as *mut libc::ifreq) })
}

fn sockaddr_v4(ip: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; the kernel reads it as sockaddr_in.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
