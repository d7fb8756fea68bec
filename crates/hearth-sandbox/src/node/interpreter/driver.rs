//! One running interpreter process and the host's half of the driver protocol (`interpreter.py`):
//! starting it and waiting for its ready line, sending a call and picking its answer out of the
//! interpreter's stdout by nonce, interrupting it at the deadline, attaching to it again in a VM
//! restored with it (resumed, forked). Bounds everything the guest
//! sends: a line at [`MAX_ANSWER_LINE`], the start at [`START_DEADLINE`], an interrupted call's
//! answer at [`INTERRUPT_GRACE`].

use std::time::Duration;

use hearth_proto::ErrorKind;
use hearth_vm::channel::{ChannelError, ExecHandle, ExecOutput, ExecStdin, ExitStatus};
use serde::Deserialize;
use tokio::time::{timeout, timeout_at, Instant};

use super::CodeOutcome;
use crate::node::{ExecSpec, Node, NodeError};
use crate::Sandbox;

/// The interpreter exec's label in the agent's exec list (`GET /v1/execs`): how a daemon that
/// re-attached a running sandbox finds the interpreter an earlier daemon started.
pub(super) const LABEL: &str = "hearth-code-interpreter";

/// The driver program, run with `python3 -u -c`.
const DRIVER: &str = include_str!("../interpreter.py");
/// How long a new interpreter may take to say it is ready (a cold python3 under TCG: ~0.5 s).
const START_DEADLINE: Duration = Duration::from_secs(60);
/// How long an interrupted call may take to answer before its interpreter is killed.
pub(super) const INTERRUPT_GRACE: Duration = Duration::from_secs(5);
/// Longest line taken from the interpreter (the driver keeps its answers well below: 1 MiB per
/// output stream and result, escaped).
const MAX_ANSWER_LINE: usize = 24 << 20;
/// Bytes of the interpreter's own stderr kept to explain its death.
const STDERR_TAIL: usize = 4096;

/// A running interpreter.
pub(super) struct Live {
    pub(super) handle: ExecHandle,
    stdin: ExecStdin,
    lines: Lines,
    stderr_tail: Vec<u8>,
    pub(super) count: u64,
}

/// An interpreter in a saved VM: what attaching to it in a VM restored from that state needs.
#[derive(Clone, serde::Serialize, Deserialize)]
pub(in crate::node) struct Parked {
    /// Its exec id, the same in every VM restored from the state.
    exec: u64,
    count: u64,
}

impl Parked {
    /// The interpreter in the agent's exec list of a VM this node did not start it in: the newest
    /// (older ones are leftovers that [`Live::start`] kills; its execution count comes with its
    /// next answer).
    pub(super) fn listed(execs: &hearth_vm::channel::ExecList) -> Option<Parked> {
        let listed = execs
            .execs
            .iter()
            .filter(|e| e.attachable && e.label.as_deref() == Some(LABEL))
            .max_by_key(|e| e.id)?;
        Some(Parked {
            exec: listed.id,
            count: 0,
        })
    }
}

/// How a call ended.
pub(super) enum CallEnd {
    /// The driver answered; `true`: after a SIGINT.
    Answered(Answer, bool),
    /// The interpreter ended (how, for the message).
    Exited(String),
    /// Timed out and did not answer after SIGINT: killed.
    Killed,
    /// The agent channel failed.
    Broken(NodeError),
}

#[derive(Deserialize)]
struct Ready {
    previous: bool,
}

#[derive(Deserialize)]
pub(super) struct Answer {
    stdout: String,
    stderr: String,
    result: Option<String>,
    error: Option<super::CodeError>,
    interrupted: bool,
    pub(super) execution_count: u64,
    #[serde(default)]
    truncated: bool,
}

impl Answer {
    pub(super) fn into_outcome(self, sigint_sent: bool, restarted: bool) -> CodeOutcome {
        CodeOutcome {
            stdout: self.stdout,
            stderr: self.stderr,
            result: self.result,
            error: self.error,
            timed_out: sigint_sent && self.interrupted,
            restarted,
            execution_count: self.execution_count,
            truncated: self.truncated,
        }
    }
}

impl Live {
    /// Starts an interpreter and waits for its ready line; also says whether one ran before in
    /// this guest (unless `fresh`).
    pub(super) async fn start(
        node: &Node,
        tenant: &str,
        id: &str,
        fresh: bool,
    ) -> Result<(Live, bool), NodeError> {
        // An interpreter this node lost track of (one a forced pause cut short waits, parked, for
        // the agent's grace) goes now: only the current one may answer to the label.
        let client = node.target(tenant, id)?.sandbox.client().clone();
        if let Ok(execs) = client.execs().await {
            let leftovers = execs
                .execs
                .iter()
                .filter(|e| e.label.as_deref() == Some(LABEL));
            for leftover in leftovers {
                let _ = client.signal(leftover.id, libc::SIGKILL).await;
            }
        }
        let nonce = nonce();
        let mode = if fresh { "fresh" } else { "continue" };
        let spec = ExecSpec {
            argv: ["python3", "-u", "-c", DRIVER, &nonce, mode]
                .map(str::to_owned)
                .to_vec(),
            stdin: true,
            attachable: true,
            label: Some(LABEL.to_owned()),
            ..Default::default()
        };
        let mut handle = match node.exec(tenant, id, spec).await {
            Ok(exec) => exec.into_idle_handle(),
            Err(NodeError::Channel(ChannelError::Agent(e))) if e.kind == ErrorKind::NotFound => {
                return Err(no_python(&format!("failed: {}", e.message)))
            }
            Err(e) => return Err(e),
        };
        let stdin = handle.take_stdin().expect("the exec asked for stdin");
        let mut live = Live {
            handle,
            stdin,
            lines: Lines::default(),
            stderr_tail: Vec::new(),
            count: 0,
        };
        let line = match timeout(START_DEADLINE, live.line(&nonce)).await {
            Ok(Ok(line)) => line,
            Ok(Err(CallEnd::Exited(how))) => return Err(no_python(&how)),
            Ok(Err(CallEnd::Broken(e))) => return Err(e),
            Ok(Err(_)) => unreachable!("line() ends only by exit or a broken channel"),
            Err(_) => {
                return Err(NodeError::Channel(ChannelError::Unresponsive {
                    what: "the code interpreter's start",
                    after: START_DEADLINE,
                }))
            }
        };
        let ready: Ready = serde_json::from_slice(&line).map_err(|e| {
            NodeError::Channel(ChannelError::Protocol(format!(
                "the code interpreter's ready line: {e}"
            )))
        })?;
        Ok((live, ready.previous))
    }

    /// What a VM restored from a state saved now needs to attach to this interpreter.
    pub(super) fn parked(&self) -> Parked {
        Parked {
            exec: self.handle.id(),
            count: self.count,
        }
    }

    /// This interpreter's VM was saved: the handle on its channel goes, and what remains is how
    /// to attach to it in the restored VM.
    pub(super) fn park(self) -> Parked {
        self.parked()
    }

    /// Attaches to the interpreter `parked` in `sandbox`, restored from the state it was saved in
    /// (the agent keeps it waiting for a while; a lost one is the agent's refusal).
    pub(super) async fn attach(sandbox: &Sandbox, parked: &Parked) -> Result<Live, NodeError> {
        let mut handle = sandbox.client().attach(parked.exec, true).await?;
        let stdin = handle.take_stdin().expect("attached with stdin");
        Ok(Live {
            handle,
            stdin,
            lines: Lines::default(),
            stderr_tail: Vec::new(),
            count: parked.count,
        })
    }

    /// Sends `code` and waits for its answer: until `limit`, then SIGINT and [`INTERRUPT_GRACE`].
    pub(super) async fn call(&mut self, code: &str, limit: Duration) -> CallEnd {
        let nonce = nonce();
        let mut request = serde_json::to_vec(&serde_json::json!({"nonce": nonce, "code": code}))
            .expect("a request serializes");
        request.push(b'\n');
        let deadline = Instant::now() + limit;
        // A failed write means the interpreter is gone; reading says how.
        let _ = timeout_at(deadline, self.stdin.write(&request)).await;
        if let Ok(answer) = timeout_at(deadline, self.line(&nonce)).await {
            return parse(answer, false);
        }
        let interrupted = async {
            let _ = self.handle.signal(libc::SIGINT).await;
            self.line(&nonce).await
        };
        match timeout(INTERRUPT_GRACE, interrupted).await {
            Ok(answer) => parse(answer, true),
            Err(_) => CallEnd::Killed,
        }
    }

    /// The payload of the next line that starts with `nonce`; other lines are dropped.
    async fn line(&mut self, nonce: &str) -> Result<Vec<u8>, CallEnd> {
        loop {
            while let Some(line) = self.lines.next() {
                let payload = line
                    .strip_prefix(nonce.as_bytes())
                    .and_then(|rest| rest.strip_prefix(b" "));
                if let Some(payload) = payload {
                    return Ok(payload.to_vec());
                }
            }
            match self.handle.next_output().await {
                Ok(Some(ExecOutput::Stdout(data))) => self.lines.push(&data),
                Ok(Some(ExecOutput::Stderr(data))) => {
                    self.stderr_tail.extend_from_slice(&data);
                    let excess = self.stderr_tail.len().saturating_sub(STDERR_TAIL);
                    self.stderr_tail.drain(..excess);
                }
                Ok(None) => return Err(CallEnd::Exited(self.how(self.handle.status()))),
                Err(e) => return Err(CallEnd::Broken(e.into())),
            }
        }
    }

    fn how(&self, status: Option<ExitStatus>) -> String {
        let mut how = match status {
            Some(ExitStatus {
                code: Some(code), ..
            }) => format!("exited with code {code}"),
            Some(ExitStatus {
                signal: Some(signal),
                ..
            }) => format!("was killed by signal {signal}"),
            _ => "ended".to_owned(),
        };
        let tail = String::from_utf8_lossy(&self.stderr_tail);
        if !tail.trim().is_empty() {
            how.push_str(&format!(" (its stderr: {})", tail.trim()));
        }
        how
    }
}

fn parse(line: Result<Vec<u8>, CallEnd>, sigint_sent: bool) -> CallEnd {
    match line.map(|l| serde_json::from_slice::<Answer>(&l)) {
        Ok(Ok(answer)) => CallEnd::Answered(answer, sigint_sent),
        Ok(Err(e)) => CallEnd::Broken(NodeError::Channel(ChannelError::Protocol(format!(
            "the code interpreter's answer: {e}"
        )))),
        Err(end) => end,
    }
}

/// A start that failed: `how` it ended ("exited with code 127 (its stderr: ...)").
fn no_python(how: &str) -> NodeError {
    NodeError::Invalid(format!(
        "the code interpreter (python3) {how}; code runs need an image with python3 on its PATH"
    ))
}

fn nonce() -> String {
    format!("{:032x}", rand::random::<u128>())
}

/// Newline-delimited lines out of output chunks; a line longer than [`MAX_ANSWER_LINE`] is
/// dropped whole.
#[derive(Default)]
struct Lines {
    buf: Vec<u8>,
    /// In the middle of an overlong line: drop up to its end.
    skipping: bool,
}

impl Lines {
    fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
        if self.buf.len() > MAX_ANSWER_LINE && !self.buf.contains(&b'\n') {
            self.buf.clear();
            self.skipping = true;
        }
    }

    fn next(&mut self) -> Option<Vec<u8>> {
        loop {
            let end = self.buf.iter().position(|&b| b == b'\n')?;
            let mut line: Vec<u8> = self.buf.drain(..=end).collect();
            line.pop();
            if std::mem::take(&mut self.skipping) || line.len() > MAX_ANSWER_LINE {
                continue;
            }
            return Some(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_split_across_chunks_and_overlong_ones_are_dropped() {
        let mut lines = Lines::default();
        lines.push(b"ab");
        assert_eq!(lines.next(), None);
        lines.push(b"c\nd\n");
        assert_eq!(lines.next(), Some(b"abc".to_vec()));
        assert_eq!(lines.next(), Some(b"d".to_vec()));
        lines.push(&vec![b'x'; MAX_ANSWER_LINE + 1]);
        lines.push(b"xx\nnext\n");
        assert_eq!(lines.next(), Some(b"next".to_vec()));
        assert_eq!(lines.next(), None);
    }

    #[test]
    fn the_listed_interpreter_is_the_newest_attachable_one_with_the_label() {
        let entry = |id, label: Option<&str>, attachable| hearth_vm::channel::ExecEntry {
            id,
            pid: 10 + id as u32,
            label: label.map(str::to_owned),
            attachable,
            parked: true,
        };
        let execs = hearth_vm::channel::ExecList {
            execs: vec![
                entry(3, Some(LABEL), true),
                entry(9, Some(LABEL), true),
                entry(12, Some(LABEL), false),
                entry(15, Some("other"), true),
                entry(20, None, true),
            ],
        };
        assert_eq!(Parked::listed(&execs).map(|p| p.exec), Some(9));
        let none = hearth_vm::channel::ExecList {
            execs: vec![entry(4, Some("other"), true)],
        };
        assert!(Parked::listed(&none).is_none());
    }

    #[test]
    fn an_interrupt_counts_as_a_timeout_only_when_it_interrupted_the_code() {
        let answer = |interrupted| Answer {
            stdout: String::new(),
            stderr: String::new(),
            result: None,
            error: None,
            interrupted,
            execution_count: 3,
            truncated: false,
        };
        assert!(answer(true).into_outcome(true, false).timed_out);
        assert!(!answer(false).into_outcome(true, false).timed_out);
        assert!(!answer(true).into_outcome(false, false).timed_out);
    }
}
