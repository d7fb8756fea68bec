//! The agent-wide table of running execs: exec id -> exec-init pidfd, for `POST /v1/signal`, the
//! terminal of an exec started with a `tty`, for `POST /v1/resize`, the takeover channel of an
//! attachable exec, for `POST /v1/attach`, the host's labels, for `GET /v1/execs`, for shutdown (kill everything) and for PID 1's orphan
//! reaper (which must not reap an exec-init whose status its exec task is waiting for).

use std::collections::HashMap;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use hearth_proto::{AgentError, ErrorKind, ExecEntry, ExecList, TtySize};
use tokio::sync::mpsc;

use super::attach::{self, Attach, Attachments, Handover};
use super::spawn::PidFd;

#[derive(Default)]
pub struct ExecRegistry {
    inner: Mutex<Table>,
}

#[derive(Default)]
struct Table {
    next_id: u64,
    running: HashMap<u64, (i32, PidFd)>,
    /// Terminal masters of the running execs that have one.
    ttys: HashMap<u64, Arc<OwnedFd>>,
    /// Takeover channels of the running execs started attachable.
    attachable: HashMap<u64, Handover>,
    /// The host's labels of the running execs that have one.
    labels: HashMap<u64, String>,
}

impl ExecRegistry {
    /// Runs `spawn` and records the process it started. The table stays locked meanwhile, so the
    /// orphan reaper cannot see the new child before it is recorded.
    pub fn spawn_and_register(
        &self,
        spawn: impl FnOnce() -> io::Result<(i32, PidFd)>,
    ) -> io::Result<(u64, i32, PidFd)> {
        let mut table = self.inner.lock().expect("exec registry poisoned");
        let (pid, pidfd) = spawn()?;
        table.next_id += 1;
        let id = table.next_id;
        table.running.insert(id, (pid, pidfd.clone()));
        Ok((id, pid, pidfd))
    }

    /// Forgets an exec once its exec-init has been reaped.
    pub fn remove(&self, id: u64) {
        let mut table = self.inner.lock().expect("exec registry poisoned");
        table.running.remove(&id);
        table.ttys.remove(&id);
        table.attachable.remove(&id);
        table.labels.remove(&id);
    }

    /// Records the host's `label` of exec `id`, for [`Self::list`].
    pub fn label(&self, id: u64, label: String) {
        let mut table = self.inner.lock().expect("exec registry poisoned");
        if table.running.contains_key(&id) {
            table.labels.insert(id, label);
        }
    }

    /// Makes exec `id` attachable: returns where its supervisor receives takeovers.
    pub fn make_attachable(&self, id: u64) -> Attachments {
        let (handover, attachments) = attach::channel();
        let mut table = self.inner.lock().expect("exec registry poisoned");
        if table.running.contains_key(&id) {
            table.attachable.insert(id, handover);
        }
        attachments
    }

    /// Where to send a takeover of exec `id`, if it is running and attachable.
    pub fn attachments(&self, id: u64) -> Option<mpsc::Sender<Attach>> {
        let table = self.inner.lock().expect("exec registry poisoned");
        table.attachable.get(&id).map(|h| h.sender.clone())
    }

    /// Every running exec, by id (`GET /v1/execs`).
    pub fn list(&self) -> ExecList {
        let table = self.inner.lock().expect("exec registry poisoned");
        let mut execs: Vec<ExecEntry> = table
            .running
            .iter()
            .map(|(&id, &(pid, _))| {
                let handover = table.attachable.get(&id);
                ExecEntry {
                    id,
                    pid: pid as u32,
                    label: table.labels.get(&id).cloned(),
                    attachable: handover.is_some(),
                    parked: handover.is_some_and(Handover::parked),
                }
            })
            .collect();
        execs.sort_by_key(|e| e.id);
        ExecList { execs }
    }

    /// Records the terminal master of exec `id` (started with a `tty`), for [`Self::resize`].
    pub fn attach_tty(&self, id: u64, master: Arc<OwnedFd>) {
        let mut table = self.inner.lock().expect("exec registry poisoned");
        if table.running.contains_key(&id) {
            table.ttys.insert(id, master);
        }
    }

    /// Sets the terminal size of exec `id`; its foreground process group gets SIGWINCH.
    pub fn resize(&self, id: u64, size: TtySize) -> Result<(), AgentError> {
        let master = {
            let table = self.inner.lock().expect("exec registry poisoned");
            if !table.running.contains_key(&id) {
                return Err(AgentError::new(
                    ErrorKind::NotFound,
                    format!("exec {id} is not running"),
                ));
            }
            table.ttys.get(&id).cloned().ok_or_else(|| {
                AgentError::invalid(format!("exec {id} has no terminal (started without `tty`)"))
            })?
        };
        super::pty::resize(master.as_fd(), size)
            .map_err(|e| AgentError::internal(format!("resizing the terminal of exec {id}: {e}")))
    }

    /// Sends `signal` to exec `id`'s init, which forwards it to the command (SIGKILL kills the whole
    /// process tree at once).
    pub fn signal(&self, id: u64, signal: i32) -> Result<(), AgentError> {
        if !(1..=64).contains(&signal) {
            return Err(AgentError::invalid(format!(
                "signal {signal} is not a signal number (1-64)"
            )));
        }
        let pidfd = {
            let table = self.inner.lock().expect("exec registry poisoned");
            let not_running =
                || AgentError::new(ErrorKind::NotFound, format!("exec {id} is not running"));
            table.running.get(&id).ok_or_else(not_running)?.1.clone()
        };
        pidfd
            .send_signal(signal)
            .map_err(|e| match e.raw_os_error() {
                Some(libc::ESRCH) => {
                    AgentError::new(ErrorKind::NotFound, format!("exec {id} has exited"))
                }
                _ => AgentError::internal(format!("sending signal {signal} to exec {id}: {e}")),
            })
    }

    /// SIGKILLs every running exec (shutdown). Returns how many were signalled.
    pub fn kill_all(&self) -> usize {
        let table = self.inner.lock().expect("exec registry poisoned");
        table
            .running
            .values()
            .filter(|(_, pidfd)| pidfd.send_signal(libc::SIGKILL).is_ok())
            .count()
    }

    pub fn running(&self) -> usize {
        self.inner
            .lock()
            .expect("exec registry poisoned")
            .running
            .len()
    }

    /// Runs `reap` with the table locked and a predicate saying whether a PID is an exec-init.
    pub fn with_exec_pids<T>(&self, reap: impl FnOnce(&dyn Fn(i32) -> bool) -> T) -> T {
        let table = self.inner.lock().expect("exec registry poisoned");
        let is_exec = |pid: i32| table.running.values().any(|(p, _)| *p == pid);
        reap(&is_exec)
    }
}
