//! One background process on the host's side: what it is ([`Meta`], the part that is saved), its
//! kept output and how it ended, the task that reads its output off the agent channel (the pump),
//! and readers following its output ([`OutputReader`]).
//!
//! The pump owns the exec's handle. When the channel goes (the VM was saved by a pause or a fork,
//! or stopped) the pump ends without deciding anything: the process is *detached*, and either a VM
//! restored with it attaches again ([`Process::attach`]) or it stays detached until its sandbox
//! goes. Only an exit frame ends a process; only a failed attach loses one.
//!
//! The pump also writes the output to the process's [`journal`](super::journal), from which a
//! process known from saved metas (a restarted daemon's) gets back what the old daemon kept.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use hearth_vm::channel::{ExecHandle, ExecOutput, ExecStdin, ExitStatus};
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

use super::journal::{self, Journal};
use super::output::{Output, Stream};
use super::ProcessInfo;
use crate::node::exec::Activity;
use crate::node::lock_ignoring_poison;
use crate::Sandbox;

/// How often a `keep_awake` process marks its sandbox used, and a reader following output does.
const AWAKE_TICK: Duration = Duration::from_secs(2);

/// How long an attach waits for the pump on the old VM's channel to end.
const OLD_PUMP: Duration = Duration::from_secs(2);

/// A process's stdin, shared by the callers writing to it; `None` once closed.
pub(super) type SharedStdin = Arc<tokio::sync::Mutex<Option<ExecStdin>>>;

/// What is saved of a process (in a paused sandbox's snapshot, in a running one's run directory):
/// enough for another daemon, or the VM restored from a snapshot, to attach to it again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(in crate::node) struct Meta {
    pub id: u32,
    /// The agent's exec id, the same in every VM restored from a state saved with it.
    pub exec: u64,
    /// Its PID in the guest.
    pub pid: u32,
    pub argv: Vec<String>,
    pub tag: Option<String>,
    pub started_at: u64,
    /// Started with a stdin pipe the caller writes to.
    pub stdin: bool,
    /// Counts as a use of its sandbox while it runs (the idle timeout waits for it).
    #[serde(default)]
    pub keep_awake: bool,
}

pub(super) struct Process {
    pub meta: Meta,
    state: Mutex<State>,
    /// Bumped at every change of `state` (output, exit, loss), for readers following it.
    changed: watch::Sender<u64>,
    /// The sandbox's record: readers stop following once the node forgets the sandbox.
    record: Weak<Activity>,
    /// The sandbox's journal directory.
    journal: PathBuf,
}

#[derive(Default)]
struct State {
    output: Output,
    exit: Option<ExitStatus>,
    /// Why the process is lost (not found when a restored VM attached to it).
    lost: Option<String>,
    stdin: Option<SharedStdin>,
    pump: Option<tokio::task::JoinHandle<()>>,
    /// Tells the pump to leave the exec to the agent, parked (daemon shutdown).
    leave: Option<tokio::sync::oneshot::Sender<()>>,
}

impl State {
    /// Known to have ended: its exit status came, or it is lost.
    fn finished(&self) -> bool {
        self.exit.is_some() || self.lost.is_some()
    }
}

impl Process {
    /// A process just started, not yet read from; its journal in `journal` starts empty (one
    /// left there by an ended process of the same id goes).
    pub fn started(meta: Meta, record: Weak<Activity>, journal: PathBuf) -> Arc<Process> {
        journal::remove(&journal, meta.id);
        Process::with_output(meta, record, journal, Output::new())
    }

    /// A process known from saved `meta`, to be attached to, with the output kept in its journal
    /// in `journal` (none for a fork's child: its journal directory is new).
    pub fn restored(meta: Meta, record: Weak<Activity>, journal: PathBuf) -> Arc<Process> {
        let output = journal::load(&journal, meta.id);
        Process::with_output(meta, record, journal, output)
    }

    fn with_output(
        meta: Meta,
        record: Weak<Activity>,
        journal: PathBuf,
        output: Output,
    ) -> Arc<Process> {
        Arc::new(Process {
            meta,
            state: Mutex::new(State {
                output,
                ..Default::default()
            }),
            changed: watch::channel(0).0,
            record,
            journal,
        })
    }

    /// Starts reading `handle` (this process's exec, just started or attached).
    pub fn pump(self: &Arc<Process>, mut handle: ExecHandle) {
        let (leave, mut leaving) = tokio::sync::oneshot::channel();
        let stdin = handle
            .take_stdin()
            .map(|s| Arc::new(tokio::sync::Mutex::new(Some(s))));
        let me = Arc::downgrade(self);
        let (keep_awake, record) = (self.meta.keep_awake, self.record.clone());
        let end = lock_ignoring_poison(&self.state).output.end();
        let mut journal = Journal::open(&self.journal, self.meta.id, end);
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(AWAKE_TICK);
            loop {
                let next = tokio::select! {
                    _ = &mut leaving => return handle.disconnect(),
                    _ = tick.tick(), if keep_awake => {
                        if let Some(activity) = record.upgrade() {
                            activity.touch();
                        }
                        continue;
                    }
                    next = handle.next_output() => next,
                };
                let Some(process) = me.upgrade() else {
                    return;
                };
                match next {
                    Ok(Some(ExecOutput::Stdout(data))) => {
                        journal.append(Stream::Stdout, &data);
                        process.push(Stream::Stdout, data);
                    }
                    Ok(Some(ExecOutput::Stderr(data))) => {
                        journal.append(Stream::Stderr, &data);
                        process.push(Stream::Stderr, data);
                    }
                    Ok(None) => return process.ended(handle.status()),
                    // The VM was saved or stopped: detached until a restored one attaches.
                    Err(e) => return process.channel_gone(&e.to_string()),
                }
            }
        });
        let mut state = lock_ignoring_poison(&self.state);
        state.stdin = stdin;
        state.pump = Some(task);
        state.leave = Some(leave);
    }

    /// Attaches to this process in `sandbox`, a VM restored with it (resumed, a fork's child, or
    /// re-attached by a new daemon); a process the agent no longer has is lost.
    pub async fn attach(self: &Arc<Process>, sandbox: &Sandbox) {
        // The pump on the old VM's channel ends as that channel closes, having read what was left
        // on it; one still reading after that is on a live channel, and stays.
        let old = lock_ignoring_poison(&self.state).pump.take();
        if let Some(mut old) = old {
            if tokio::time::timeout(OLD_PUMP, &mut old).await.is_err() {
                lock_ignoring_poison(&self.state).pump = Some(old);
                return;
            }
        }
        if !self.detached() {
            return;
        }
        match sandbox
            .client()
            .attach(self.meta.exec, self.meta.stdin)
            .await
        {
            Ok(handle) => self.pump(handle),
            Err(e) => {
                journal::remove(&self.journal, self.meta.id);
                let mut state = lock_ignoring_poison(&self.state);
                state.lost = Some(format!(
                    "the process was not found when its sandbox came back ({e}): it ended \
                     meanwhile, and its exit status is unknown"
                ));
                drop(state);
                self.changed.send_modify(|n| *n += 1);
            }
        }
    }

    /// Neither ended nor lost, and no pump reads it.
    pub fn detached(&self) -> bool {
        let state = lock_ignoring_poison(&self.state);
        !state.finished() && state.pump.as_ref().is_none_or(|p| p.is_finished())
    }

    /// Still running (as far as the node knows: a detached one may have ended meanwhile).
    pub fn running(&self) -> bool {
        !lock_ignoring_poison(&self.state).finished()
    }

    /// Stops reading: `leave`, the exec is left to the agent as a host that went away would
    /// (parked, for the next daemon); otherwise its handle is dropped (after a pause or fork saved
    /// its VM, when nothing reaches the old guest any more, or to kill it).
    pub fn stop(&self, leave: bool) {
        let mut state = lock_ignoring_poison(&self.state);
        state.stdin = None;
        match (leave, state.leave.take()) {
            (true, Some(leave)) => {
                let _ = leave.send(());
            }
            _ => {
                if let Some(pump) = state.pump.take() {
                    pump.abort();
                }
            }
        }
    }

    /// Its output as kept now.
    pub fn output(&self) -> Output {
        lock_ignoring_poison(&self.state).output.clone()
    }

    /// The process is forgotten: its journal goes.
    pub fn forget(&self) {
        journal::remove(&self.journal, self.meta.id);
    }

    /// Its sandbox ended (stopped, failed, deleted): unless it is known to have ended, the process
    /// is lost with it, and readers following it are told so.
    pub fn lose(&self, why: &str) {
        let mut state = lock_ignoring_poison(&self.state);
        if state.finished() {
            return;
        }
        state.lost = Some(why.to_owned());
        state.stdin = None;
        if let Some(pump) = state.pump.take() {
            pump.abort();
        }
        drop(state);
        self.changed.send_modify(|n| *n += 1);
    }

    /// The writer of the process's stdin, if it was started with one and is attached.
    pub fn stdin(&self) -> Option<SharedStdin> {
        lock_ignoring_poison(&self.state).stdin.clone()
    }

    pub fn info(&self) -> ProcessInfo {
        let state = lock_ignoring_poison(&self.state);
        ProcessInfo {
            id: self.meta.id,
            pid: self.meta.pid,
            argv: self.meta.argv.clone(),
            tag: self.meta.tag.clone(),
            started_at: self.meta.started_at,
            running: !state.finished(),
            keep_awake: self.meta.keep_awake,
            exit_code: state.exit.and_then(|e| e.code),
            signal: state.exit.and_then(|e| e.signal),
            timed_out: state.exit.is_some_and(|e| e.timed_out),
            lost: state.lost.clone(),
            output_bytes: state.output.end(),
            output_dropped: state.output.dropped(),
        }
    }

    /// A reader of the output from `offset`.
    pub fn reader(self: &Arc<Process>, offset: u64, follow: bool) -> OutputReader {
        OutputReader {
            process: self.clone(),
            offset,
            follow,
            changes: self.changed.subscribe(),
            done: false,
        }
    }

    fn push(&self, stream: Stream, data: Bytes) {
        lock_ignoring_poison(&self.state).output.push(stream, data);
        self.changed.send_modify(|n| *n += 1);
    }

    /// Its exit came: no later daemon attaches to it, so its journal goes (its output stays kept
    /// in memory).
    fn ended(&self, status: Option<ExitStatus>) {
        journal::remove(&self.journal, self.meta.id);
        let mut state = lock_ignoring_poison(&self.state);
        state.stdin = None;
        match status {
            Some(status) => state.exit = Some(status),
            None => state.lost = Some("its output ended without an exit status".into()),
        }
        drop(state);
        self.changed.send_modify(|n| *n += 1);
    }

    fn channel_gone(&self, why: &str) {
        tracing::debug!(process = self.meta.id, "background process detached: {why}");
        lock_ignoring_poison(&self.state).stdin = None;
        self.changed.send_modify(|n| *n += 1);
    }
}

/// What a reader of a process's output gets next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputEvent {
    /// Output starting at `offset`.
    Output {
        offset: u64,
        stream: Stream,
        data: Bytes,
    },
    /// The process has ended (or is lost): the last event.
    Ended(ProcessInfo),
}

/// Reads a process's kept output from an offset, then (following) its new output as it comes,
/// until it ends.
pub struct OutputReader {
    process: Arc<Process>,
    offset: u64,
    follow: bool,
    changes: watch::Receiver<u64>,
    done: bool,
}

impl OutputReader {
    /// Where the output this reader returns starts (past the offset asked for when the bytes there
    /// were dropped).
    pub fn start(&self) -> u64 {
        let state = lock_ignoring_poison(&self.process.state);
        match state.output.read(self.offset) {
            Some((at, _, _)) => at,
            None => self.offset.max(state.output.end()),
        }
    }

    /// The next event; `None` after the last (not following: once the kept output was read).
    pub async fn next(&mut self) -> Option<OutputEvent> {
        loop {
            if self.done {
                return None;
            }
            if self.follow {
                // A client following the output is using the sandbox (a paused one ignores it).
                if let Some(activity) = self.process.record.upgrade() {
                    activity.touch();
                }
            }
            self.changes.borrow_and_update();
            let ended = {
                let state = lock_ignoring_poison(&self.process.state);
                if let Some((at, stream, data)) = state.output.read(self.offset) {
                    self.offset = at + data.len() as u64;
                    return Some(OutputEvent::Output {
                        offset: at,
                        stream,
                        data,
                    });
                }
                state.finished()
            };
            if ended {
                self.done = true;
                return Some(OutputEvent::Ended(self.process.info()));
            }
            if !self.follow || self.process.record.strong_count() == 0 {
                self.done = true;
                return None;
            }
            // Woken by a change; a sandbox deleted meanwhile is noticed within a few seconds.
            let _ = tokio::time::timeout(AWAKE_TICK, self.changes.changed()).await;
        }
    }
}
