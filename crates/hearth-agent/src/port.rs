//! Where the host connects: the virtio-serial port named [`hearth_proto::VIRTIO_PORT_NAME`] (QEMU)
//! and an AF_VSOCK listener on [`hearth_proto::VSOCK_PORT`] (Firecracker). Touches /sys/class and
//! /dev only to find and open them.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use tokio::io::unix::AsyncFd;

use crate::stream::FdStream;

/// The `/dev` node of the virtio-serial port called `name`, if it exists yet.
pub fn find_virtio_port(sys_class: &Path, name: &str) -> io::Result<Option<PathBuf>> {
    let entries = match std::fs::read_dir(sys_class) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let Ok(port_name) = std::fs::read_to_string(entry.path().join("name")) else {
            continue;
        };
        if port_name.trim_end() == name {
            let device = Path::new("/dev").join(entry.file_name());
            if device.exists() {
                return Ok(Some(device));
            }
        }
    }
    Ok(None)
}

/// Waits up to `timeout` for the named port, then opens it read-write and non-blocking. The agent
/// keeps it open for its whole life: closing and reopening a virtio-serial port loses data.
pub async fn open_virtio_port(name: &str, timeout: Duration) -> io::Result<(PathBuf, FdStream)> {
    let started = Instant::now();
    loop {
        if let Some(device) = find_virtio_port(Path::new("/sys/class/virtio-ports"), name)? {
            let file = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open(&device)?;
            return Ok((device, FdStream::new(OwnedFd::from(file))?));
        }
        if started.elapsed() > timeout {
            return Err(io::Error::new(
                io::ErrorKind::NotFound,
                format!(
                    "no virtio-serial port named {name:?} under /sys/class/virtio-ports after {timeout:?} \
                     (is virtio_console loaded and the port configured on the VMM?)"
                ),
            ));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A listening AF_VSOCK stream socket.
pub struct VsockListener {
    fd: AsyncFd<OwnedFd>,
}

impl VsockListener {
    /// Listens on `port` for any CID.
    pub fn bind(port: u32) -> io::Result<VsockListener> {
        // SAFETY: socket/bind/listen with a zeroed, fully initialised sockaddr_vm.
        unsafe {
            let fd = libc::socket(
                libc::AF_VSOCK,
                libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                0,
            );
            if fd < 0 {
                return Err(io::Error::last_os_error());
            }
            let fd = OwnedFd::from_raw_fd(fd);
            let mut addr: libc::sockaddr_vm = std::mem::zeroed();
            addr.svm_family = libc::AF_VSOCK as libc::sa_family_t;
            addr.svm_port = port;
            addr.svm_cid = libc::VMADDR_CID_ANY;
            let len = std::mem::size_of::<libc::sockaddr_vm>() as libc::socklen_t;
            if libc::bind(
                fd.as_raw_fd(),
                (&addr as *const libc::sockaddr_vm).cast(),
                len,
            ) < 0
                || libc::listen(fd.as_raw_fd(), 16) < 0
            {
                return Err(io::Error::last_os_error());
            }
            // The AsyncFd owns the OwnedFd, which stays open and unchanged until it is dropped.
            Ok(VsockListener {
                fd: AsyncFd::register(fd)?,
            })
        }
    }
}

impl crate::session::Listener for VsockListener {
    type Stream = FdStream;

    async fn accept(&mut self) -> io::Result<FdStream> {
        loop {
            let mut ready = self.fd.readable().await?;
            let accepted = ready.try_io(|fd| {
                // SAFETY: accept4 on a listening socket; the peer address is not needed.
                let conn = unsafe {
                    libc::accept4(
                        fd.as_raw_fd(),
                        std::ptr::null_mut(),
                        std::ptr::null_mut(),
                        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                    )
                };
                if conn < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    // SAFETY: accept4 returned a new descriptor we now own.
                    Ok(unsafe { OwnedFd::from_raw_fd(conn) })
                }
            });
            match accepted {
                Ok(Ok(conn)) => return FdStream::new(conn),
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Err(e),
                Err(_would_block) => continue,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_the_port_by_name_only_when_its_device_exists() {
        let sys = tempfile::tempdir().unwrap();
        for (port, name) in [
            ("vport0p0", "org.qemu.guest_agent.0"),
            ("zz-no-such-dev", "hearth.agent"),
        ] {
            std::fs::create_dir(sys.path().join(port)).unwrap();
            std::fs::write(sys.path().join(port).join("name"), format!("{name}\n")).unwrap();
        }
        // The matching entry has no /dev node, so nothing is found yet.
        assert_eq!(find_virtio_port(sys.path(), "hearth.agent").unwrap(), None);
        // /dev/null stands in for a device node that exists.
        std::fs::create_dir(sys.path().join("null")).unwrap();
        std::fs::write(sys.path().join("null").join("name"), "hearth.agent\n").unwrap();
        assert_eq!(
            find_virtio_port(sys.path(), "hearth.agent").unwrap(),
            Some(PathBuf::from("/dev/null"))
        );
        assert_eq!(
            find_virtio_port(&sys.path().join("absent"), "hearth.agent").unwrap(),
            None
        );
    }
}
