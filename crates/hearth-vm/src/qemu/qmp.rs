//! A small synchronous QMP (QEMU Machine Protocol) client over QEMU's Unix socket: greeting and
//! capabilities negotiation, commands with their replies, asynchronous events (queued while a
//! command waits for its reply), and handing QEMU a file descriptor (`getfd`, the descriptor sent
//! with SCM_RIGHTS alongside the command) for a confined QEMU that can no longer open host paths.
//! Touches only the socket it is given.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, ErrorKind, IoSlice, Write};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// How long a command may take to answer; QEMU answers control commands in microseconds unless the
/// main loop is wedged, which is itself worth an error.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// An asynchronous QMP event (`SHUTDOWN`, `STOP`, `RESUME`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct QmpEvent {
    pub name: String,
    pub data: Value,
}

pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    line: String,
    events: VecDeque<QmpEvent>,
    next_id: u64,
}

impl Qmp {
    /// Connects, reads the greeting and leaves capabilities negotiation mode.
    pub fn connect(path: &Path) -> Result<Self, QmpError> {
        let stream = UnixStream::connect(path)?;
        let writer = stream.try_clone()?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            line: String::new(),
            events: VecDeque::new(),
            next_id: 0,
        };
        let greeting = qmp
            .read_message(COMMAND_TIMEOUT)?
            .ok_or(QmpError::Timeout("greeting"))?;
        if greeting.get("QMP").is_none() {
            return Err(QmpError::Protocol(format!(
                "expected a QMP greeting, got {greeting}"
            )));
        }
        qmp.execute("qmp_capabilities", None)?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub fn execute(&mut self, command: &str, arguments: Option<Value>) -> Result<Value, QmpError> {
        self.execute_passing(command, arguments, None)
    }

    /// Hands QEMU a duplicate of `fd` under `name` (`getfd`), for commands that take `fd:NAME`
    /// (`migrate`, `migrate-incoming`). QEMU closes its copy when the command using it is done.
    pub fn send_fd(&mut self, name: &str, fd: BorrowedFd<'_>) -> Result<(), QmpError> {
        self.execute_passing("getfd", Some(json!({ "fdname": name })), Some(fd))
            .map(drop)
    }

    fn execute_passing(
        &mut self,
        command: &str,
        arguments: Option<Value>,
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<Value, QmpError> {
        self.next_id += 1;
        let id = self.next_id;
        let mut request = json!({ "execute": command, "id": id });
        if let Some(arguments) = arguments {
            request["arguments"] = arguments;
        }
        let mut bytes = serde_json::to_vec(&request).expect("JSON value serializes");
        bytes.push(b'\n');
        match fd {
            None => self.writer.write_all(&bytes)?,
            Some(fd) => send_with_fd(&self.writer, &bytes, fd)?,
        }
        let deadline = Instant::now() + COMMAND_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let message = self
                .read_message(left)?
                .ok_or(QmpError::Timeout("reply to the command"))?;
            if let Some(event) = as_event(&message) {
                self.events.push_back(event);
                continue;
            }
            if message.get("id").and_then(Value::as_u64) != Some(id) {
                continue; // a late reply to an earlier command that timed out
            }
            if let Some(value) = message.get("return") {
                return Ok(value.clone());
            }
            if let Some(error) = message.get("error") {
                let field = |k: &str| {
                    error
                        .get(k)
                        .and_then(Value::as_str)
                        .unwrap_or("?")
                        .to_owned()
                };
                return Err(QmpError::Command {
                    command: command.to_owned(),
                    class: field("class"),
                    desc: field("desc"),
                });
            }
            return Err(QmpError::Protocol(format!("unexpected message {message}")));
        }
    }

    /// The VM's run state (`running`, `paused`, `shutdown`, ...).
    pub fn query_status(&mut self) -> Result<String, QmpError> {
        let status = self.execute("query-status", None)?;
        status
            .get("status")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| QmpError::Protocol(format!("query-status returned {status}")))
    }

    /// Pauses the vCPUs.
    pub fn stop(&mut self) -> Result<(), QmpError> {
        self.execute("stop", None).map(drop)
    }

    /// Resumes the vCPUs.
    pub fn cont(&mut self) -> Result<(), QmpError> {
        self.execute("cont", None).map(drop)
    }

    /// Starts an outgoing migration to `uri` (e.g. `exec:cat > FILE`); it runs in the background:
    /// poll [`Qmp::query_migrate`].
    pub fn migrate(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Feeds a QEMU started with `-incoming defer` its state from `uri` (e.g. `exec:cat FILE`).
    pub fn migrate_incoming(&mut self, uri: &str) -> Result<(), QmpError> {
        self.execute("migrate-incoming", Some(json!({ "uri": uri })))
            .map(drop)
    }

    /// Turns a migration capability on or off (before `migrate` or `migrate-incoming`).
    pub fn set_migration_capability(&mut self, name: &str, on: bool) -> Result<(), QmpError> {
        let caps = json!({ "capabilities": [{ "capability": name, "state": on }] });
        self.execute("migrate-set-capabilities", Some(caps))
            .map(drop)
    }

    /// Sets migration parameters (`migrate-set-parameters`, e.g. `{"max-bandwidth": N}`).
    pub fn set_migration_parameters(&mut self, parameters: Value) -> Result<(), QmpError> {
        self.execute("migrate-set-parameters", Some(parameters))
            .map(drop)
    }

    /// Whether the VM has a memory backend object with this id (`query-memdev`).
    pub fn has_memdev(&mut self, id: &str) -> Result<bool, QmpError> {
        let list = self.execute("query-memdev", None)?;
        Ok(list.as_array().is_some_and(|devs| {
            devs.iter()
                .any(|d| d.get("id").and_then(Value::as_str) == Some(id))
        }))
    }

    /// The outgoing migration's status (`active`, `completed`, `failed`, ...) and QEMU's error
    /// description when it failed.
    pub fn query_migrate(&mut self) -> Result<(String, Option<String>), QmpError> {
        let info = self.execute("query-migrate", None)?;
        let field = |k: &str| info.get(k).and_then(Value::as_str).map(str::to_owned);
        Ok((field("status").unwrap_or_default(), field("error-desc")))
    }

    /// Presses the ACPI power button.
    pub fn system_powerdown(&mut self) -> Result<(), QmpError> {
        self.execute("system_powerdown", None).map(drop)
    }

    /// Asks QEMU to exit. QEMU may close the socket before its reply arrives; that counts as done.
    pub fn quit(&mut self) -> Result<(), QmpError> {
        match self.execute("quit", None) {
            Ok(_) | Err(QmpError::Closed) => Ok(()),
            Err(QmpError::Io(e))
                if matches!(e.kind(), ErrorKind::BrokenPipe | ErrorKind::ConnectionReset) =>
            {
                Ok(())
            }
            Err(e) => Err(e),
        }
    }

    /// The next event, waiting up to `timeout`; `None` when none came.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<QmpEvent>, QmpError> {
        if let Some(event) = self.events.pop_front() {
            return Ok(Some(event));
        }
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let Some(message) = self.read_message(left)? else {
                return Ok(None);
            };
            if let Some(event) = as_event(&message) {
                return Ok(Some(event));
            }
        }
    }

    /// One JSON message, or `None` on timeout. A partial line survives a timeout in `self.line`.
    fn read_message(&mut self, timeout: Duration) -> Result<Option<Value>, QmpError> {
        let timeout = timeout.max(Duration::from_millis(1));
        self.reader.get_ref().set_read_timeout(Some(timeout))?;
        loop {
            match self.reader.read_line(&mut self.line) {
                Ok(0) => return Err(QmpError::Closed),
                Ok(_) if !self.line.ends_with('\n') => continue,
                Ok(_) => {
                    let line = std::mem::take(&mut self.line);
                    if line.trim().is_empty() {
                        continue;
                    }
                    let value = serde_json::from_str(&line)
                        .map_err(|e| QmpError::Protocol(format!("bad JSON {line:?}: {e}")))?;
                    return Ok(Some(value));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Ok(None)
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}

/// Sends `bytes` in one message carrying `fd` (QEMU takes the descriptor from the message that
/// holds the command's first byte, so the command must not be split before it).
fn send_with_fd(socket: &UnixStream, bytes: &[u8], fd: BorrowedFd<'_>) -> std::io::Result<()> {
    use nix::sys::socket::{sendmsg, ControlMessage, MsgFlags};
    let fds = [fd.as_raw_fd()];
    let control = [ControlMessage::ScmRights(&fds)];
    let sent = sendmsg::<()>(
        socket.as_raw_fd(),
        &[IoSlice::new(bytes)],
        &control,
        MsgFlags::empty(),
        None,
    )
    .map_err(std::io::Error::from)?;
    // The descriptor went with the first byte; the rest (rarely any) follows as plain data.
    let mut writer = socket;
    writer.write_all(&bytes[sent..])
}

fn as_event(message: &Value) -> Option<QmpEvent> {
    let name = message.get("event")?.as_str()?.to_owned();
    Some(QmpEvent {
        name,
        data: message.get("data").cloned().unwrap_or(Value::Null),
    })
}

#[derive(Debug, thiserror::Error)]
pub enum QmpError {
    #[error("socket error: {0}")]
    Io(#[from] std::io::Error),
    #[error("QEMU closed the QMP connection")]
    Closed,
    #[error("no {0} from QEMU within the timeout")]
    Timeout(&'static str),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("{command} failed: {class}: {desc}")]
    Command {
        command: String,
        class: String,
        desc: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;

    /// A scripted QMP peer: answers each request with the reply the script gives, after optional events.
    fn fake_qemu(
        path: &Path,
        script: Vec<(&'static str, Vec<Value>, Value)>,
    ) -> std::thread::JoinHandle<()> {
        let listener = UnixListener::bind(path).unwrap();
        std::thread::spawn(move || {
            let (stream, _) = listener.accept().unwrap();
            let mut writer = stream.try_clone().unwrap();
            let mut reader = BufReader::new(stream);
            writeln!(
                writer,
                r#"{{"QMP": {{"version": {{}}, "capabilities": []}}}}"#
            )
            .unwrap();
            for (expect, events, reply) in script {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                let request: Value = serde_json::from_str(&line).unwrap();
                assert_eq!(request["execute"], expect);
                for event in events {
                    writeln!(writer, "{event}").unwrap();
                }
                let mut reply = reply;
                reply["id"] = request["id"].clone();
                writeln!(writer, "{reply}").unwrap();
            }
        })
    }

    #[test]
    fn negotiates_runs_commands_and_queues_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qmp.sock");
        let stop_event =
            json!({"event": "STOP", "data": {}, "timestamp": {"seconds": 1, "microseconds": 0}});
        let peer = fake_qemu(
            &path,
            vec![
                ("qmp_capabilities", vec![], json!({"return": {}})),
                ("stop", vec![stop_event], json!({"return": {}})),
                (
                    "query-status",
                    vec![],
                    json!({"return": {"status": "paused", "running": false}}),
                ),
                (
                    "cont",
                    vec![],
                    json!({"error": {"class": "GenericError", "desc": "nope"}}),
                ),
            ],
        );
        let mut qmp = Qmp::connect(&path).unwrap();
        qmp.stop().unwrap();
        assert_eq!(qmp.query_status().unwrap(), "paused");
        let err = qmp.cont().unwrap_err();
        assert!(err.to_string().contains("GenericError: nope"), "{err}");
        let event = qmp.next_event(Duration::from_secs(1)).unwrap().unwrap();
        assert_eq!(event.name, "STOP");
        peer.join().unwrap();
        assert!(qmp
            .next_event(Duration::from_millis(50))
            .is_err_and(|e| matches!(e, QmpError::Closed)));
    }
}
