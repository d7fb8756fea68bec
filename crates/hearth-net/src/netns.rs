//! Network namespaces kept alive by a file, not by a process: [`NetNs::create`] unshares a new
//! namespace on a short-lived thread and bind-mounts its nsfs handle onto a path under hearth's
//! home (no `ip netns`, so nothing is written outside hearth's directories). Work inside the
//! namespace happens on a thread that has `setns` into it ([`NetNs::run_in`]) or in a child
//! process that enters it between fork and exec ([`NetNs::command`]); the calling thread never
//! changes namespace. [`remove`] detaches the mount and unlinks the file; the kernel frees the
//! namespace (and its devices) once nothing else holds it.

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use thiserror::Error;

/// What went wrong with a namespace, and at which path.
#[derive(Debug, Error)]
pub enum NetNsError {
    #[error("creating the network namespace at {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error("opening the network namespace at {path}: {source}")]
    Open { path: PathBuf, source: io::Error },
    #[error("entering the network namespace at {path}: {source}")]
    Enter { path: PathBuf, source: io::Error },
    #[error("removing the network namespace at {path}: {source}")]
    Remove { path: PathBuf, source: io::Error },
    #[error("the thread working in the network namespace at {path} panicked")]
    Panicked { path: PathBuf },
}

/// An open handle on a network namespace that is bind-mounted at a path.
#[derive(Debug)]
pub struct NetNs {
    path: PathBuf,
    file: File,
}

impl NetNs {
    /// Creates a new network namespace with `lo` up and bind-mounts it onto `path` (created as an
    /// empty file; its parent must exist). On failure nothing is left at `path`.
    pub fn create(path: &Path) -> Result<NetNs, NetNsError> {
        let err = |source| NetNsError::Create {
            path: path.to_owned(),
            source,
        };
        OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(err)?;
        let target = CString::new(path.as_os_str().as_bytes())
            .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
        let made = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<()> {
                // The thread's namespace changes, the process's others do not; the thread then
                // ends, so no other work ever runs in the new namespace by accident.
                cvt(unsafe { libc::unshare(libc::CLONE_NEWNET) })?;
                set_loopback_up()?;
                let source = c"/proc/thread-self/ns/net";
                cvt(unsafe {
                    libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        libc::MS_BIND,
                        std::ptr::null(),
                    )
                })
            })
            .join()
        });
        let made = match made {
            Ok(made) => made,
            Err(_) => Err(io::Error::other("namespace thread panicked")),
        };
        if let Err(e) = made {
            let _ = remove(path);
            return Err(err(e));
        }
        match NetNs::open(path) {
            Ok(ns) => Ok(ns),
            Err(e) => {
                let _ = remove(path);
                Err(e)
            }
        }
    }

    /// Opens the namespace bind-mounted at `path`.
    pub fn open(path: &Path) -> Result<NetNs, NetNsError> {
        let file = File::open(path).map_err(|source| NetNsError::Open {
            path: path.to_owned(),
            source,
        })?;
        // A plain file (the mount is gone) opens fine but is not a namespace: setns would fail
        // later with a less helpful error.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        cvt(unsafe { libc::fstatfs(file.as_raw_fd(), &mut st) }).map_err(|source| {
            NetNsError::Open {
                path: path.to_owned(),
                source,
            }
        })?;
        if st.f_type != libc::NSFS_MAGIC {
            return Err(NetNsError::Open {
                path: path.to_owned(),
                source: io::Error::new(
                    io::ErrorKind::InvalidInput,
                    "not a namespace (no nsfs mount)",
                ),
            });
        }
        Ok(NetNs {
            path: path.to_owned(),
            file,
        })
    }

    /// Where the namespace is mounted.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on a new thread that has entered the namespace, and returns its value. Sockets
    /// `f` creates belong to the namespace for their whole life, whichever thread uses them later.
    pub fn run_in<T, F>(&self, f: F) -> Result<T, NetNsError>
    where
        T: Send,
        F: FnOnce() -> T + Send,
    {
        let fd = self.file.as_raw_fd();
        let joined = std::thread::scope(|s| {
            s.spawn(|| -> io::Result<T> {
                cvt(unsafe { libc::setns(fd, libc::CLONE_NEWNET) })?;
                Ok(f())
            })
            .join()
        });
        match joined {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(source)) => Err(NetNsError::Enter {
                path: self.path.clone(),
                source,
            }),
            Err(_) => Err(NetNsError::Panicked {
                path: self.path.clone(),
            }),
        }
    }

    /// A [`Command`] for `program` whose child enters the namespace between fork and exec (only
    /// `setns`, which is async-signal-safe, runs there). The command holds its own handle on the
    /// namespace, so it may outlive `self`.
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Result<Command, NetNsError> {
        let fd: OwnedFd =
            self.file
                .as_fd()
                .try_clone_to_owned()
                .map_err(|source| NetNsError::Open {
                    path: self.path.clone(),
                    source,
                })?;
        let mut cmd = Command::new(program);
        // SAFETY: the closure only makes one raw syscall on an fd it owns; no allocation, no locks.
        unsafe {
            cmd.pre_exec(move || cvt(libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET)));
        }
        Ok(cmd)
    }
}

/// Detaches the namespace mount at `path` (every stacked one) and unlinks the file. Idempotent:
/// a missing path or an unmounted file is not an error.
pub fn remove(path: &Path) -> Result<(), NetNsError> {
    let err = |source| NetNsError::Remove {
        path: path.to_owned(),
        source,
    };
    let target = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| err(io::Error::new(io::ErrorKind::InvalidInput, e)))?;
    loop {
        let rc =
            unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH | libc::UMOUNT_NOFOLLOW) };
        if rc == 0 {
            continue;
        }
        let e = io::Error::last_os_error();
        match e.raw_os_error() {
            // Not a mount point (any more), or nothing there.
            Some(libc::EINVAL) | Some(libc::ENOENT) | Some(libc::ENOTDIR) => break,
            _ => return Err(err(e)),
        }
    }
    match std::fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::ENOENT) | Some(libc::ENOTDIR)) => Ok(()),
        Err(e) => Err(err(e)),
    }
}

/// Brings the calling thread's namespace's `lo` up.
fn set_loopback_up() -> io::Result<()> {
    let sock = crate::tap::ioctl_socket()?;
    crate::tap::set_flags(&sock, "lo", libc::IFF_UP as libc::c_short, true)
}

fn cvt(rc: libc::c_int) -> io::Result<()> {
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}
