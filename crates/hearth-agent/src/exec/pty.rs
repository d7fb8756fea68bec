//! Pseudo-terminals for execs started with a `tty` ([`hearth_proto::TtySize`]): the agent opens
//! the pair, hands the slave to the exec-init as the command's fds 0-2 (the command makes it its
//! controlling terminal, see [`crate::exec_init`]), relays the master's output as `Stdout` frames
//! and writes stdin into it, and applies resizes with `TIOCSWINSZ` (the kernel then sends the
//! terminal's foreground process group SIGWINCH).
//!
//! The pair comes from the workload root's own devpts instance (`<root>/dev/pts/ptmx`, resolved
//! inside the root), so that inside the exec the slave is `/dev/pts/N` of the devpts the command
//! sees and `tty`/`ttyname(3)` name it. A root without one (a test root outside a VM) falls back to
//! the agent's `/dev/ptmx`: still a terminal, just one whose name does not resolve in the root.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use hearth_proto::TtySize;

use crate::in_root;

/// Both ends of a new pseudo-terminal.
pub struct Pty {
    /// The agent's end: non-blocking, close-on-exec.
    pub master: OwnedFd,
    /// The command's end: blocking, close-on-exec (the exec-init's set-up moves it to fds 0-2).
    pub slave: OwnedFd,
}

/// Opens a pseudo-terminal of `size` for an exec in `root`.
pub fn open(root: &Path, size: TtySize) -> io::Result<Pty> {
    let flags = libc::O_RDWR | libc::O_NOCTTY | libc::O_NONBLOCK;
    let master = match in_root::open_in_root(root, Path::new("dev/pts/ptmx"), flags) {
        Ok(master) => master,
        Err(e) => {
            crate::log!(
                "tty: no devpts in {} ({e}); using the agent's /dev/ptmx",
                root.display()
            );
            std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(libc::O_NOCTTY | libc::O_NONBLOCK | libc::O_CLOEXEC)
                .open("/dev/ptmx")?
                .into()
        }
    };
    // Anything but a pty master (a hostile root's FIFO or device node) fails this ioctl.
    let mut number: libc::c_int = 0;
    ioctl(
        &master,
        libc::TIOCGPTN,
        &mut number as *mut libc::c_int as usize,
    )?;
    let unlock: libc::c_int = 0;
    ioctl(
        &master,
        libc::TIOCSPTLCK,
        &unlock as *const libc::c_int as usize,
    )?;
    resize(master.as_fd(), size)?;
    // TIOCGPTPEER opens the slave through the master itself: no path lookup that could be raced.
    let peer_flags = (libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) as usize;
    let slave = ioctl(&master, libc::TIOCGPTPEER, peer_flags)?;
    // SAFETY: TIOCGPTPEER returned a new descriptor that nobody else owns.
    let slave = unsafe { OwnedFd::from_raw_fd(slave) };
    Ok(Pty { master, slave })
}

/// Sets the terminal size; the kernel sends SIGWINCH to the foreground process group when it
/// changed.
pub fn resize(master: BorrowedFd<'_>, size: TtySize) -> io::Result<()> {
    let winsize = libc::winsize {
        ws_row: size.rows,
        ws_col: size.cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads one winsize owned by this frame.
    let ret = unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSWINSZ, &winsize) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ioctl(fd: &OwnedFd, request: libc::Ioctl, arg: usize) -> io::Result<libc::c_int> {
    // SAFETY: each caller passes the argument its request expects (a pointer to a c_int owned by
    // its frame, or open flags).
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), request, arg) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(ret)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_a_terminal_of_the_requested_size_and_resizes_it() {
        let pty = match open(Path::new("/"), TtySize { rows: 24, cols: 80 }) {
            Ok(pty) => pty,
            Err(e) => {
                eprintln!("skipped: no pseudo-terminals here ({e})");
                return;
            }
        };
        let size = |fd: &OwnedFd| {
            let mut winsize: libc::winsize = unsafe { std::mem::zeroed() };
            // SAFETY: TIOCGWINSZ fills a winsize owned by this frame.
            assert!(unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut winsize) } >= 0);
            (winsize.ws_row, winsize.ws_col)
        };
        assert_eq!(size(&pty.slave), (24, 80));
        // SAFETY: isatty on a descriptor we own.
        assert_eq!(unsafe { libc::isatty(pty.slave.as_raw_fd()) }, 1);
        resize(
            pty.master.as_fd(),
            TtySize {
                rows: 50,
                cols: 132,
            },
        )
        .unwrap();
        assert_eq!(size(&pty.slave), (50, 132));
    }
}
