//! Byte streams the agent serves on: [`FdStream`] (a non-blocking file descriptor driven by the tokio
//! reactor: the virtio-serial port, vsock connections, an inherited socket). Touches only the fd it
//! owns.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};

/// A non-blocking fd as an async byte stream. A read returning 0 is reported as end of stream
/// without clearing readiness: on a virtio-serial port that means "host disconnected", and the
/// caller decides how long to wait before reading again.
///
/// A hang-up (`POLLHUP`, which a virtio-serial port reports while the host is disconnected) stays
/// latched in tokio's readiness for the life of the registration, after which "would block" could
/// never wait again. So once a hang-up has been seen, a read or write that would block fails with
/// `ConnectionReset`/`BrokenPipe` (the session using the stream is stale: its host went away), and
/// [`FdStream::reregister`] clears the latch before the next session.
pub struct FdStream {
    fd: Option<AsyncFd<OwnedFd>>,
}

impl FdStream {
    /// Wraps `fd`, switching it to non-blocking mode.
    pub fn new(fd: OwnedFd) -> io::Result<FdStream> {
        set_nonblocking(&fd)?;
        Ok(FdStream {
            fd: Some(register(fd)?),
        })
    }

    /// Registers the fd with the reactor afresh, forgetting a latched hang-up.
    pub fn reregister(&mut self) -> io::Result<()> {
        let fd = self.fd.take().ok_or_else(unregistered)?.into_inner();
        self.fd = Some(register(fd)?);
        Ok(())
    }

    fn registered(&self) -> io::Result<&AsyncFd<OwnedFd>> {
        self.fd.as_ref().ok_or_else(unregistered)
    }
}

fn register(fd: OwnedFd) -> io::Result<AsyncFd<OwnedFd>> {
    // SAFETY: the AsyncFd owns the OwnedFd, which stays open and unchanged until it is dropped.
    Ok(unsafe { AsyncFd::register(fd)? })
}

fn unregistered() -> io::Error {
    io::Error::other("agent stream lost its reactor registration")
}

pub(crate) fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let raw = fd.as_raw_fd();
    // SAFETY: fcntl on an fd we own, with integer arguments only.
    unsafe {
        let flags = libc::fcntl(raw, libc::F_GETFL);
        if flags < 0 || libc::fcntl(raw, libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsyncRead for FdStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let fd = self.registered()?;
        loop {
            let mut guard = ready!(fd.poll_read_ready(cx))?;
            let unfilled = buf.initialize_unfilled();
            let result = guard.try_io(|fd| {
                // SAFETY: reads into an initialized buffer of the given length.
                let n = unsafe {
                    libc::read(fd.as_raw_fd(), unfilled.as_mut_ptr().cast(), unfilled.len())
                };
                if n < 0 {
                    Err(io::Error::last_os_error())
                } else {
                    Ok(n as usize)
                }
            });
            match result {
                Ok(Ok(n)) => {
                    buf.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(Err(e)) => return Poll::Ready(Err(e)),
                Err(_would_block) if guard.ready().is_read_closed() => {
                    let message = "the host side hung up since this session started";
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::ConnectionReset,
                        message,
                    )));
                }
                Err(_would_block) => continue,
            }
        }
    }
}

impl AsyncWrite for FdStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let fd = self.registered()?;
        let write = |fd: &AsyncFd<OwnedFd>| {
            // SAFETY: writes from a valid buffer of the given length.
            let n = unsafe { libc::write(fd.as_raw_fd(), data.as_ptr().cast(), data.len()) };
            if n < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(n as usize)
            }
        };
        // The write is tried before the reactor is asked whether the port is writable. Around a
        // host reconnect the reactor's write readiness for a virtio-serial port was sometimes
        // lost: a fresh session's HTTP/2 never tried to send its SETTINGS ACK and first answer
        // while the port took writes, until the host gave up and reconnected (every re-attach
        // after a daemon restart waited 3 s for that, found by the soak and a restart loop).
        // Writing first costs one system call when the port is full, and cannot stall.
        match write(fd) {
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::Interrupted
                ) => {}
            other => return Poll::Ready(other),
        }
        loop {
            let mut guard = ready!(fd.poll_write_ready(cx))?;
            let result = guard.try_io(write);
            match result {
                Ok(Err(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
                Ok(result) => return Poll::Ready(result),
                Err(_would_block) if guard.ready().is_write_closed() => {
                    let message = "the host side hung up since this session started";
                    return Poll::Ready(Err(io::Error::new(io::ErrorKind::BrokenPipe, message)));
                }
                Err(_would_block) => continue,
            }
        }
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        // The port outlives sessions: a session ending must not close or half-close it.
        Poll::Ready(Ok(()))
    }
}

/// `stream` with `prefix` (bytes read past the handshake) put back in front of what it reads.
pub fn prefixed<S: AsyncRead + AsyncWrite>(
    prefix: Vec<u8>,
    stream: S,
) -> impl AsyncRead + AsyncWrite {
    let (read, write) = tokio::io::split(stream);
    tokio::io::join(std::io::Cursor::new(prefix).chain(read), write)
}
