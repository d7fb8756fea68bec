//! The local terminal for `-t` (`hearth run -it`, `hearth sandbox exec -it`): whether one is there,
//! its size, raw mode while the remote command owns it, and window-size changes to forward.
//!
//! Raw mode is held by [`Terminal`] and restored when it is dropped: on every return path of the
//! commands (the command's exit, an error, SIGTERM/SIGHUP, which the commands turn into a return
//! through [`crate::cmd::common::shutdown_signal`]) and on a panic's unwinding. Nothing can restore
//! it after SIGKILL: the shell is then left raw (`stty sane` or `reset` repairs it). SIGINT cannot
//! come from the keyboard in raw mode: ^C is a byte sent to the guest's terminal, whose line
//! discipline interrupts the guest's foreground job.

use std::io::{self, IsTerminal};
use std::os::fd::{AsRawFd, RawFd};

use hearth_sandbox::TtySize;
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;

/// Bytes per read of stdin.
const STDIN_CHUNK: usize = 64 * 1024;

/// Whether `-t` can be honoured: stdin must be a terminal (docker refuses with "the input device
/// is not a TTY"; hearth warns and runs the command without a terminal, so scripts that pass
/// `-it` out of habit still work when piped).
pub fn usable(asked: bool) -> bool {
    if asked && !io::stdin().is_terminal() {
        eprintln!("hearth: warning: -t: the input device is not a TTY; running without a terminal");
        return false;
    }
    asked
}

/// Our terminal, with a watch on its size; in raw mode when keys go to the guest. Dropping it
/// restores the saved mode.
pub struct Terminal {
    fd: RawFd,
    /// The mode to restore, when raw mode was entered.
    saved: Option<libc::termios>,
    winch: Signal,
    size: TtySize,
}

impl Terminal {
    /// Starts watching SIGWINCH on stdin's terminal and, with `raw` (`-it`: our keys go to the
    /// guest), puts it into raw mode: no echo, no line editing, no signals from keys, no output
    /// processing; the guest's terminal does all that. Without `raw` (`-t` alone) ^C stays ours
    /// and ends hearth (and with it the command). Call inside the runtime.
    pub fn attach(raw: bool) -> io::Result<Terminal> {
        let fd = io::stdin().as_raw_fd();
        let winch = signal(SignalKind::window_change())?;
        let saved = match raw {
            true => Some(enter_raw(fd)?),
            false => None,
        };
        let size = size_of(fd).unwrap_or(TtySize { rows: 24, cols: 80 });
        Ok(Terminal {
            fd,
            saved,
            winch,
            size,
        })
    }

    /// The size when raw mode began, or the last one [`Terminal::resized`] returned.
    pub fn size(&self) -> TtySize {
        self.size
    }

    /// Waits for the window size to change and returns the new size (SIGWINCH that changed
    /// nothing is skipped). Cancel-safe.
    pub async fn resized(&mut self) -> TtySize {
        loop {
            self.winch.recv().await;
            if let Some(size) = size_of(self.fd) {
                if size != self.size {
                    self.size = size;
                    return size;
                }
            }
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        if let Some(saved) = &self.saved {
            // SAFETY: tcsetattr reads the termios saved at entry.
            unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, saved) };
        }
    }
}

/// Puts the terminal on `fd` into raw mode; returns the mode it had.
fn enter_raw(fd: RawFd) -> io::Result<libc::termios> {
    // SAFETY: tcgetattr fills a termios owned by this frame.
    let mut saved: libc::termios = unsafe { std::mem::zeroed() };
    check(unsafe { libc::tcgetattr(fd, &mut saved) })?;
    let mut raw = saved;
    // SAFETY: cfmakeraw edits the copy owned by this frame.
    unsafe { libc::cfmakeraw(&mut raw) };
    // SAFETY: tcsetattr reads a termios owned by this frame.
    check(unsafe { libc::tcsetattr(fd, libc::TCSANOW, &raw) })?;
    Ok(saved)
}

/// Our stdin (typed keys or a pipe), chunk by chunk, until end of file. Read on a plain thread
/// rather than tokio's blocking pool: a read waiting for a key that never comes must not keep the
/// runtime from shutting down once the remote command has exited. At most 4 chunks are buffered.
pub fn stdin_chunks() -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel(4);
    std::thread::spawn(move || {
        use std::io::Read;
        let mut stdin = io::stdin().lock();
        let mut buf = vec![0u8; STDIN_CHUNK];
        loop {
            match stdin.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if tx.blocking_send(buf[..n].to_vec()).is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

/// The window size of the terminal on `fd`.
fn size_of(fd: RawFd) -> Option<TtySize> {
    // SAFETY: TIOCGWINSZ fills a winsize owned by this frame.
    let mut winsize: libc::winsize = unsafe { std::mem::zeroed() };
    let ret = unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut winsize) };
    (ret == 0).then_some(TtySize {
        rows: winsize.ws_row,
        cols: winsize.ws_col,
    })
}

fn check(ret: libc::c_int) -> io::Result<()> {
    match ret {
        0 => Ok(()),
        _ => Err(io::Error::last_os_error()),
    }
}
