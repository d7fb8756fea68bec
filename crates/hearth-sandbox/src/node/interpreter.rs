//! The code interpreter ([`Node::run_code`]): one Python interpreter per running sandbox, kept
//! alive between calls so that what one call defines the next one sees, like a notebook kernel.
//!
//! The interpreter is an exec like any other (`python3 -u -c <interpreter.py>`, the sandbox's
//! environment, user and working directory), started lazily by the first call and then kept as a
//! bare `ExecHandle`: between calls it does not count as a running exec (the sandbox can go idle,
//! be paused, the daemon can shut down); each call counts as activity while it runs.
//!
//! It survives a pause: it is started `attachable`, so a VM saved with it and restored keeps it
//! waiting (see the agent's `exec::attach`), and right after the resume the node attaches to it
//! again ([`Node::reattach_code`]), its state, execution count and all; the snapshot names it
//! ([`SAVED`]), so a daemon restarted while the sandbox was paused does too. It survives a daemon
//! restart while the sandbox runs as well: its host gone, the agent keeps it waiting the same way,
//! and the next daemon finds it in the agent's exec list by its label ([`Node::adopt_listed_code`]).
//! A fork's children inherit it the same way, each its own copy of the parent's interpreter at the
//! fork (unless a call was running in the parent then: its children start fresh interpreters, which
//! say `restarted`).
//!
//! Protocol (see `interpreter.py`): a JSON line per call on the interpreter's stdin carrying the
//! code and a fresh random nonce; the answer is the line on its stdout that starts with that nonce.
//! The driver moves the protocol off fds 0/1/2 before user code runs, and any other line (a guess
//! at the protocol, a stale answer) is dropped, so output cannot pass for an answer. Everything the
//! guest sends is bounded (a line's size, the start, the wait for an answer: `interpreter/driver.rs`,
//! the host's half of the protocol).
//!
//! Calls on one sandbox are serialised (a FIFO queue: the slot's async mutex), and each runs in a
//! task of its own, so a caller that goes away does not leave the protocol mid-call. A timeout
//! sends SIGINT (KeyboardInterrupt in the code, state kept); an interpreter that does not answer
//! within the grace period after it is killed. A lost interpreter (killed, crashed, exited, in a
//! call cut short by a forced pause or a daemon stop) is started afresh by the next call, which says
//! `restarted`; the driver leaves a marker file in the guest's /tmp so that a new daemon learns that
//! one ran before. [`Node::reset_code`] ends it on request (the next is not a restart).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Deserialize;

use super::exec::{Activity, ActivityGuard, Target};
use super::{lock_ignoring_poison, Node, NodeError};
use crate::Sandbox;
use driver::{CallEnd, Live, Parked, INTERRUPT_GRACE};

mod driver;

/// The file in a paused sandbox's snapshot directory that names the interpreter saved with it.
const SAVED: &str = "interpreter.json";

/// Longest timeout a call may ask for.
pub const MAX_CODE_TIMEOUT: Duration = Duration::from_secs(3600);

/// What one call produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CodeOutcome {
    pub stdout: String,
    pub stderr: String,
    /// `repr()` of the last expression's value, unless it was `None` or there was none.
    pub result: Option<String>,
    pub error: Option<CodeError>,
    /// The timeout interrupted the code (or killed the interpreter).
    pub timed_out: bool,
    /// This call runs in a fresh interpreter because the previous one was lost.
    pub restarted: bool,
    /// This interpreter's call counter, from 1.
    pub execution_count: u64,
    /// Output beyond 1 MiB per stream was dropped (a marker says how much).
    pub truncated: bool,
}

/// An exception the code raised, or how the interpreter was lost.
#[derive(Debug, Clone, Default, PartialEq, Eq, Deserialize)]
pub struct CodeError {
    pub name: String,
    pub message: String,
    pub traceback: String,
}

/// Every sandbox's interpreter slot, by sandbox id.
#[derive(Default)]
pub(super) struct Interpreters {
    slots: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl Interpreters {
    /// The slot of sandbox `id` (created if missing, for `target`'s VM); drops the slots of
    /// sandboxes the node has forgotten.
    fn slot(&self, id: &str, target: &Target) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = lock_ignoring_poison(&self.slots);
        // A slot in use is kept; an idle one goes with its sandbox's record.
        slots.retain(|_, slot| {
            slot.try_lock()
                .map_or(true, |s| s.record.strong_count() > 0)
        });
        slots
            .entry(id.to_owned())
            .or_insert_with(|| {
                let slot = Slot::new(&target.sandbox, &target.activity, None);
                Arc::new(tokio::sync::Mutex::new(slot))
            })
            .clone()
    }

    fn existing(&self, id: &str) -> Option<Arc<tokio::sync::Mutex<Slot>>> {
        lock_ignoring_poison(&self.slots).get(id).cloned()
    }

    /// After sandbox `id` was saved by a pause into `snapshot`: its interpreter (unless a call was
    /// using it: a forced pause, whose call fails) is parked in the saved guest, to be attached
    /// after the resume, and named in the snapshot; the handle on the old VM's channel goes.
    pub(super) fn park(&self, id: &str, snapshot: &Path) {
        let Some(slot) = self.existing(id) else {
            return;
        };
        let Ok(mut slot) = slot.try_lock() else {
            return;
        };
        slot.parked = slot.live.take().map(Live::park).or(slot.parked.take());
        if let Some(parked) = &slot.parked {
            let json = serde_json::to_vec(parked).expect("serializes");
            if let Err(e) = std::fs::write(snapshot.join(SAVED), json) {
                tracing::warn!(sandbox = %id, "naming the code interpreter in the snapshot: {e}");
            }
        }
    }

    /// The interpreter a paused sandbox's `snapshot` was saved with, read before the resume
    /// removes the snapshot (a damaged file names none: the next call starts afresh).
    pub(super) fn saved(snapshot: &Path) -> Option<Parked> {
        let json = std::fs::read(snapshot.join(SAVED)).ok()?;
        serde_json::from_slice(&json).ok()
    }

    /// Holds sandbox `id`'s interpreter still while a fork saves its VM (no call can start
    /// meanwhile); `None` while a call runs, or without an interpreter.
    pub(super) fn hold(&self, id: &str) -> Option<HeldForFork> {
        let slot = self.existing(id)?.try_lock_owned().ok()?;
        slot.live.is_some().then_some(HeldForFork(slot))
    }

    /// Gives sandbox `id` (`target`: a fork's child, or a sandbox resumed or re-attached by a
    /// daemon that did not start its interpreter) the interpreter `held` in its VM, to be attached
    /// by [`Node::reattach_code`], unless a call got there first and gave it a slot of its own (a
    /// fresh interpreter, which the caller was told of with `restarted`; the held one is left to
    /// the agent's grace).
    pub(super) fn adopt(&self, id: &str, target: &Target, held: &Parked) {
        self.adopt_restored(id, &target.sandbox, &target.activity, held);
    }

    /// [`Interpreters::adopt`] for a sandbox whose record (`activity`) is being made running with
    /// `sandbox` (under the table lock: the table's lock goes before this one).
    pub(super) fn adopt_restored(
        &self,
        id: &str,
        sandbox: &Arc<Sandbox>,
        activity: &Arc<Activity>,
        held: &Parked,
    ) {
        lock_ignoring_poison(&self.slots)
            .entry(id.to_owned())
            .or_insert_with(|| {
                let slot = Slot::new(sandbox, activity, Some(held.clone()));
                Arc::new(tokio::sync::Mutex::new(slot))
            });
    }

    /// Forgets every interpreter (daemon shutdown): their agent connections end without a reset of
    /// the interpreters' streams, so the agents keep them waiting for the next daemon. One in a
    /// call goes with the call.
    pub(super) fn clear(&self) {
        let slots: Vec<_> = lock_ignoring_poison(&self.slots).drain().collect();
        for (_, slot) in slots {
            if let Ok(mut slot) = slot.try_lock() {
                if let Some(live) = slot.live.take() {
                    live.handle.disconnect();
                }
            }
        }
    }
}

/// A parent's interpreter held while a fork saves its VM ([`Interpreters::hold`]).
pub(super) struct HeldForFork(tokio::sync::OwnedMutexGuard<Slot>);

impl HeldForFork {
    /// What the children get: the interpreter as it is in the saved state.
    pub(super) fn parked(&self) -> Option<Parked> {
        self.0.live.as_ref().map(Live::parked)
    }
}

struct Slot {
    /// The VM the interpreter runs in; a resumed or re-attached sandbox is another one.
    sandbox: Weak<Sandbox>,
    /// The sandbox's record (its activity): the slot is dropped once the node forgets it.
    record: Weak<Activity>,
    live: Option<Live>,
    /// An interpreter saved with the VM (paused, or a fork's parent's), attached by the next use
    /// of the VM restored from that state.
    parked: Option<Parked>,
    /// The last interpreter was lost: the next one says `restarted`.
    lost: bool,
    /// The last one was ended by a reset: the guest's marker of an earlier one does not count.
    fresh: bool,
}

impl Slot {
    /// The slot of `sandbox` (its record's `activity`), with `parked` to attach to, if any.
    fn new(sandbox: &Arc<Sandbox>, activity: &Arc<Activity>, parked: Option<Parked>) -> Slot {
        Slot {
            sandbox: Arc::downgrade(sandbox),
            record: Arc::downgrade(activity),
            live: None,
            parked,
            lost: false,
            fresh: false,
        }
    }
}

impl Node {
    /// Runs `code` in the sandbox's interpreter (started if there is none), after the calls queued
    /// before it; `timeout` bounds the code's run, not the wait in the queue.
    pub async fn run_code(
        &self,
        tenant: &str,
        id: &str,
        code: String,
        timeout: Duration,
    ) -> Result<CodeOutcome, NodeError> {
        if timeout.is_zero() || timeout > MAX_CODE_TIMEOUT {
            return Err(NodeError::Invalid(format!(
                "timeout_seconds: give 1 to {}",
                MAX_CODE_TIMEOUT.as_secs()
            )));
        }
        let target = self.target(tenant, id)?;
        let slot = self.interpreters.slot(id, &target);
        drop(target);
        let node = self.me.upgrade().ok_or(NodeError::ShuttingDown)?;
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        let call = tokio::spawn(async move {
            let mut slot = slot.lock_owned().await;
            // Checked again: the sandbox may have been paused or deleted while this call queued.
            let target = node.target(&tenant, &id)?;
            let _active = ActivityGuard::new(target.activity.clone());
            slot.call(&node, &tenant, &id, &target.sandbox, &code, timeout)
                .await
        });
        call.await.map_err(|e| NodeError::Io {
            what: "running code".into(),
            source: std::io::Error::other(e),
        })?
    }

    /// Ends the sandbox's interpreter, after the calls queued before; the next call starts a fresh
    /// one (and does not say `restarted`).
    pub async fn reset_code(&self, tenant: &str, id: &str) -> Result<(), NodeError> {
        let target = self.target(tenant, id)?;
        let slot = self.interpreters.slot(id, &target);
        let mut slot = slot.lock().await;
        // Dropped: the agent kills the interpreter's process tree (a parked one, the agent once no
        // one attaches to it).
        (slot.live, slot.parked) = (None, None);
        slot.lost = false;
        slot.fresh = true;
        Ok(())
    }

    /// After a restart, for sandbox `id` whose running VM this node re-attached, before any call
    /// can reach it: takes over `listed`, the interpreter an earlier daemon started there
    /// ([`listed_code`]), attached in the background.
    pub(super) fn adopt_listed_code(&self, tenant: &str, id: &str, listed: Parked) {
        if let Ok(target) = self.target(tenant, id) {
            self.interpreters.adopt(id, &target, &listed);
            self.reattach_code(tenant, id);
        }
    }

    /// Attaches, in the background, to the interpreter that sandbox `id`'s VM was restored with
    /// (after a resume, or as a fork's child), so that it does not outlive the agent's wait for
    /// its new host (the next call would otherwise find it killed). A call that comes first does
    /// the same itself.
    pub(super) fn reattach_code(&self, tenant: &str, id: &str) {
        let Some(slot) = self.interpreters.existing(id) else {
            return;
        };
        let Some(node) = self.me.upgrade() else {
            return;
        };
        let (tenant, id) = (tenant.to_owned(), id.to_owned());
        tokio::spawn(async move {
            let mut slot = slot.lock().await;
            if let Ok(target) = node.target(&tenant, &id) {
                slot.follow(&id, &target.sandbox).await;
            }
        });
    }
}

/// The code interpreter an earlier daemon started in `sandbox`, found in its agent's exec list by
/// its label (the agent keeps it waiting for a host for a while); asked for at most 5 s.
pub(super) async fn listed_code(id: &str, sandbox: &Sandbox) -> Option<Parked> {
    let listing = tokio::time::timeout(Duration::from_secs(5), sandbox.client().execs()).await;
    match listing {
        Ok(Ok(execs)) => Parked::listed(&execs),
        Ok(Err(e)) => {
            tracing::info!(sandbox = %id, "listing the guest's execs: {e}");
            None
        }
        Err(_) => {
            tracing::info!(sandbox = %id, "listing the guest's execs: no answer within 5 s");
            None
        }
    }
}

impl Slot {
    /// Makes the slot `sandbox`'s: a VM other than the interpreter's (resumed, a fork's child)
    /// was restored with it parked, and is attached to it; if that fails, it is lost.
    async fn follow(&mut self, id: &str, sandbox: &Arc<Sandbox>) {
        if !Weak::ptr_eq(&self.sandbox, &Arc::downgrade(sandbox)) {
            if let Some(live) = self.live.take() {
                self.parked = Some(live.park());
            }
            self.sandbox = Arc::downgrade(sandbox);
        }
        if self.live.is_some() {
            return;
        }
        let Some(parked) = self.parked.take() else {
            return;
        };
        match Live::attach(sandbox, &parked).await {
            Ok(live) => self.live = Some(live),
            Err(e) => {
                tracing::info!(sandbox = %id, "the code interpreter saved with the VM is gone: {e}");
                self.lost = true;
            }
        }
    }

    async fn call(
        &mut self,
        node: &Node,
        tenant: &str,
        id: &str,
        sandbox: &Arc<Sandbox>,
        code: &str,
        limit: Duration,
    ) -> Result<CodeOutcome, NodeError> {
        self.follow(id, sandbox).await;
        let mut restarted = false;
        if self.live.is_none() {
            let (live, previous) = Live::start(node, tenant, id, self.fresh).await?;
            restarted = self.lost || (previous && !self.fresh);
            (self.lost, self.fresh) = (false, false);
            self.live = Some(live);
        }
        let live = self.live.as_mut().expect("started above");
        let end = live.call(code, limit).await;
        let count = live.count + 1;
        let lost = |name: &str, message: String| CodeOutcome {
            error: Some(CodeError {
                name: name.to_owned(),
                message: format!(
                    "{message}; its state is lost and the next call starts a fresh interpreter"
                ),
                traceback: String::new(),
            }),
            execution_count: count,
            restarted,
            ..Default::default()
        };
        let outcome = match end {
            CallEnd::Answered(answer, interrupted) => {
                live.count = answer.execution_count;
                return Ok(answer.into_outcome(interrupted, restarted));
            }
            CallEnd::Exited(how) => lost("InterpreterExited", format!("the interpreter {how}")),
            CallEnd::Killed => CodeOutcome {
                timed_out: true,
                ..lost(
                    "TimeoutError",
                    format!(
                        "the code ran past its {} s timeout and did not stop on SIGINT within {} \
                         s, so the interpreter was killed",
                        limit.as_secs(),
                        INTERRUPT_GRACE.as_secs()
                    ),
                )
            },
            CallEnd::Broken(e) => {
                self.live = None;
                self.lost = true;
                return Err(e);
            }
        };
        // Dropped: the agent kills whatever is left of its process tree.
        self.live = None;
        self.lost = true;
        Ok(outcome)
    }
}
