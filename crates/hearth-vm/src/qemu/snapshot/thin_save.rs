//! Saving a VM restored from a boot template as a thin state (`thin.rs`): QEMU migrates into a
//! pipe, and a thread here thins the stream on its way into the state file, against the template
//! memory file (`base`, mapped read-only; its holes, by `SEEK_DATA`, are never read). No full
//! state is written first, so a pause costs what QEMU's save costs, not that plus a second pass
//! over the file. A stream thinning does not understand, or a thread that fails to write (a full
//! disk), drains what is left of the pipe (QEMU never blocks on it) and the state is then saved
//! whole by [`save`] (the guest runs on for the moment in between: QEMU saves a VM once per
//! stop), whose errors are the ones a plain save reports. Touches only `file`, `base`
//! (read) and the QMP connection.

use std::io::{self, BufReader, BufWriter, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::save::{migrate, save, SaveError};
use super::thin::{thin, Base, ThinError, Thinned};
use crate::qemu::argv::MEMORY_BACKEND_ID;
use crate::qemu::memory::data_ranges;
use crate::qemu::Qmp;

/// Buffer size for the pipe and the state file.
const IO_BUFFER: usize = 1 << 20;
/// How long the thinning thread may still take once QEMU says the save completed (QEMU closes
/// its end of the pipe just after): past it, the thread is told to stop.
const DRAIN_DEADLINE: Duration = Duration::from_secs(30);

/// Pauses the VM on `qmp` and saves it into `file`, thinned against `base`. `Ok(Some(_))`:
/// thinned; `Ok(None)`: saved whole (why is logged).
pub(crate) fn save_thin(
    qmp: &mut Qmp,
    file: &Path,
    base: &Path,
) -> Result<Option<Thinned>, SaveError> {
    let attempt = (|| -> Result<_, ThinError> {
        let base_file = std::fs::File::open(base)?;
        let len = base_file.metadata()?.len();
        let data = data_ranges(&base_file, len)?;
        let (reader, writer) = pipe()?;
        let out = std::fs::File::create(file)?;
        Ok((base_file, len, data, reader, writer, out))
    })();
    let (base_file, len, data, reader, writer, out) = match attempt {
        Ok(parts) => parts,
        Err(e) => {
            tracing::warn!(base = %base.display(), "saving the state whole: {e}");
            return save(qmp, file).map(|()| None);
        }
    };
    let stop = AtomicBool::new(false);
    let outcome = with_mapped(&base_file, len as usize, |bytes| {
        std::thread::scope(|scope| {
            let thinning = scope.spawn(|| {
                let mut input = PipeReader {
                    fd: reader,
                    stop: &stop,
                };
                let base = Base { bytes, data: &data };
                let buffered = BufReader::with_capacity(IO_BUFFER, &mut input);
                let output = BufWriter::with_capacity(IO_BUFFER, out);
                let thinned = thin(buffered, output, &base, MEMORY_BACKEND_ID, true);
                // Whatever happened, read the pipe to its end: QEMU must never block on it.
                let _ = io::copy(&mut input, &mut io::sink());
                thinned
            });
            let migrated = migrate(qmp, writer, file);
            if migrated.is_err() {
                // Nothing to wait for (the state is not kept), nor to wait on a wedged QEMU for.
                stop.store(true, Ordering::Relaxed);
            }
            let deadline = Instant::now() + DRAIN_DEADLINE;
            while !thinning.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            stop.store(true, Ordering::Relaxed);
            (migrated, thinning.join().expect("thinning thread"))
        })
    });
    let (migrated, thinned) = match outcome {
        Ok(both) => both,
        Err(e) => {
            tracing::warn!(base = %base.display(), "saving the state whole: {e}");
            return save(qmp, file).map(|()| None);
        }
    };
    migrated?;
    match thinned {
        Ok(thinned) => Ok(Some(thinned)),
        Err(e) => {
            tracing::warn!(state = %file.display(), "saving the state whole: {e}");
            // QEMU saves a VM once per stop ("Can't migrate the vm that was paused due to
            // previous migration"): let it run again for the moment between the two saves.
            qmp.cont().map_err(|source| SaveError::Qmp {
                command: "cont",
                source,
            })?;
            save(qmp, file).map(|()| None)
        }
    }
}

/// The read end of the pipe QEMU writes the state into; a read waits at most 100 ms at a time and
/// fails once `stop` is set, so a thread reading it never outlives a save that gave up on QEMU.
struct PipeReader<'a> {
    fd: OwnedFd,
    stop: &'a AtomicBool,
}

impl Read for PipeReader<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        loop {
            if self.stop.load(Ordering::Relaxed) {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "QEMU did not finish writing its state",
                ));
            }
            let mut poll = libc::pollfd {
                fd: self.fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd for the duration of the call.
            let ready = unsafe { libc::poll(&mut poll, 1, 100) };
            if ready < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            if ready == 0 {
                continue;
            }
            // SAFETY: reading into a valid buffer of `buf.len()` bytes from an owned descriptor.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
            if n >= 0 {
                return Ok(n as usize);
            }
            let e = io::Error::last_os_error();
            if !matches!(
                e.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock
            ) {
                return Err(e);
            }
        }
    }
}

/// A pipe (read end, write end), close-on-exec; the read end does not block.
fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 fills two descriptors on success, owned at once below.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: two new descriptors nobody else owns.
    let (reader, writer) = unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
    // SAFETY: fcntl on an owned descriptor.
    let flags = unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_GETFL) };
    // SAFETY: as above.
    if flags < 0
        || unsafe { libc::fcntl(reader.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0
    {
        return Err(io::Error::last_os_error());
    }
    // A larger pipe lets QEMU write on while a page is compared (best effort).
    // SAFETY: fcntl on an owned descriptor.
    unsafe {
        libc::fcntl(
            writer.as_raw_fd(),
            libc::F_SETPIPE_SZ,
            IO_BUFFER as libc::c_int,
        )
    };
    Ok((reader, writer))
}

/// Runs `f` on the first `len` bytes of `file`, mapped read-only and private for the call. The
/// file is a template memory file, which nothing writes once its template is built (a rebuild
/// makes a new file).
fn with_mapped<T>(file: &std::fs::File, len: usize, f: impl FnOnce(&[u8]) -> T) -> io::Result<T> {
    if len == 0 {
        return Ok(f(&[]));
    }
    // SAFETY: a private read-only mapping of an open file, `len` bytes (its size); unmapped
    // below, after the only borrow of it ends.
    let at = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_PRIVATE,
            file.as_raw_fd(),
            0,
        )
    };
    if at == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the mapping made above, `len` readable bytes.
    let result = f(unsafe { std::slice::from_raw_parts(at as *const u8, len) });
    // SAFETY: the mapping made above, no longer borrowed.
    unsafe { libc::munmap(at, len) };
    Ok(result)
}
