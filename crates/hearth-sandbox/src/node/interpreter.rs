//! The code interpreter ([`Node::run_code`]): one Python interpreter per running sandbox, kept
//! alive between calls so that what one call defines the next one sees, like a notebook kernel.
//!
//! The interpreter is an exec like any other (`python3 -u -c <interpreter.py>`, the sandbox's
//! environment, user and working directory), started lazily by the first call and then kept as a
//! bare `ExecHandle`: between calls it does not count as a running exec (the sandbox can go idle,
//! be paused, the daemon can shut down); each call counts as activity while it runs.
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
//! within the grace period after it is killed. A lost interpreter (killed, crashed, exited, killed
//! before a pause, its VM re-attached by a new daemon) is started afresh by the next call, which
//! says `restarted`; the driver leaves a marker file in the guest's /tmp so that a new daemon
//! learns that one ran before. [`Node::reset_code`] ends it on request (the next is not a restart).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use serde::Deserialize;
use tokio::time::timeout;

use super::exec::ActivityGuard;
use super::{lock_ignoring_poison, Node, NodeError};
use crate::Sandbox;
use driver::{CallEnd, Live, INTERRUPT_GRACE};

mod driver;

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
    /// The slot of `sandbox` (created if missing); drops slots of sandboxes that are gone.
    fn slot(&self, id: &str, sandbox: &Arc<Sandbox>) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = lock_ignoring_poison(&self.slots);
        // A slot in use is kept; an idle one whose VM is gone goes with its dead interpreter.
        slots.retain(|_, slot| {
            slot.try_lock()
                .map_or(true, |s| s.sandbox.strong_count() > 0)
        });
        slots
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(tokio::sync::Mutex::new(Slot {
                    sandbox: Arc::downgrade(sandbox),
                    live: None,
                    lost: false,
                    fresh: false,
                }))
            })
            .clone()
    }

    /// Kills the sandbox's interpreter before its VM is saved, unless a call is using it (a forced
    /// pause: that call's stream breaks). Waits for the kill so that the saved guest has none.
    pub(super) async fn end_for_pause(&self, id: &str) {
        let Some(slot) = lock_ignoring_poison(&self.slots).get(id).cloned() else {
            return;
        };
        let Ok(mut slot) = slot.try_lock() else {
            return;
        };
        if let Some(live) = slot.live.take() {
            slot.lost = true;
            let _ = timeout(INTERRUPT_GRACE, live.handle.signal(libc::SIGKILL)).await;
        }
    }

    /// Forgets every interpreter (daemon shutdown: their agent connections close).
    pub(super) fn clear(&self) {
        lock_ignoring_poison(&self.slots).clear();
    }
}

struct Slot {
    /// The VM the interpreter runs in; a resumed or re-attached sandbox is another one.
    sandbox: Weak<Sandbox>,
    live: Option<Live>,
    /// The last interpreter was lost: the next one says `restarted`.
    lost: bool,
    /// The last one was ended by a reset: the guest's marker of an earlier one does not count.
    fresh: bool,
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
        let slot = self.interpreters.slot(id, &target.sandbox);
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
        let slot = self.interpreters.slot(id, &target.sandbox);
        let mut slot = slot.lock().await;
        // Dropped: the agent kills the interpreter's process tree.
        slot.live = None;
        slot.lost = false;
        slot.fresh = true;
        Ok(())
    }
}

impl Slot {
    async fn call(
        &mut self,
        node: &Node,
        tenant: &str,
        id: &str,
        sandbox: &Arc<Sandbox>,
        code: &str,
        limit: Duration,
    ) -> Result<CodeOutcome, NodeError> {
        if !Weak::ptr_eq(&self.sandbox, &Arc::downgrade(sandbox)) {
            // Paused and resumed, or re-attached: the interpreter went with the old VM.
            self.lost |= self.live.take().is_some();
            self.sandbox = Arc::downgrade(sandbox);
        }
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
