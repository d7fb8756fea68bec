//! Booting and saving a template: placeholder disks, a cold boot with `hearth.template=1`, wait for
//! the agent's `WAITING` line (early init done, port open), QMP `stop` + `migrate` to `state.tmp`,
//! `quit`, rename to `state`, then `meta.json`. The host stays connected to the agent port until
//! QEMU has quit: the saved guest then waits in a session opened while a host was connected, and a
//! restore connects its host before loading the state (see `running.rs`), so the restored guest
//! never sees its host go away. (An agent session opened while no host was connected ends as soon
//! as one connects, which would strand lines sent into it.) Writes only the template directory and
//! the template VM's run directory.

use std::io::{ErrorKind, Read};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use hearth_proto::handshake::{parse_line, HandshakeLine, LineBuffer};

use super::{save, SnapshotError, Template, TemplateMeta, META, STATE};
use crate::qemu::{QemuVmm, RunningQemu};
use crate::rundir::read_tail;
use crate::spec::VmSpec;
use crate::vmm::RunningVm;

/// A TCG cold boot takes 2-5 s here; a loaded machine may take much longer.
const AGENT_DEADLINE: Duration = Duration::from_secs(90);
/// Placeholder disk size. Never read by the template (virtio_blk is loaded only after RESUME), and
/// not a filesystem, so an agent that ignores template mode fails the build instead of saving a
/// half-booted guest.
const PLACEHOLDER_BYTES: u64 = 1 << 20;

pub(super) fn build(
    qemu: &QemuVmm,
    template: &Template,
    spec: &VmSpec,
) -> Result<TemplateMeta, SnapshotError> {
    let started = Instant::now();
    let dir = &template.dir;
    create_dir(dir)?;
    // The template VM writes its memory into this file; one left by an earlier build may be
    // linked as the base of saved states (`thin.rs`), which must keep what it held: the new
    // template gets a new file.
    let memory = template.memory();
    match std::fs::remove_file(&memory) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(io("removing", &memory, e)),
        _ => {}
    }
    for drive in &spec.drives {
        let file = std::fs::File::create(&drive.path).and_then(|f| f.set_len(PLACEHOLDER_BYTES));
        file.map_err(|source| io("creating", &drive.path, source))?;
    }
    let failed = |detail: String| SnapshotError::Build {
        dir: dir.clone(),
        detail,
        console: read_tail(&spec.console_log),
    };

    let mut vm = RunningQemu::start(qemu, spec).map_err(|e| SnapshotError::Boot(Box::new(e)))?;
    let agent = wait_for_agent(&mut vm, &spec.agent_socket).map_err(failed)?;

    let tmp = dir.join("state.tmp");
    let saved = match vm.qmp() {
        Some(qmp) => save::save(qmp, &tmp).map_err(|e| e.to_string()),
        None => Err("the template VM has no QMP connection".to_owned()),
    };
    let _ = vm.stop(Duration::ZERO); // QMP quit; the run directory goes with it
    drop(agent);
    saved.map_err(failed)?;

    let state = dir.join(STATE);
    std::fs::rename(&tmp, &state).map_err(|source| io("renaming", &tmp, source))?;
    let state_bytes = std::fs::metadata(&state)
        .map_err(|source| io("reading", &state, source))?
        .len();
    let meta = TemplateMeta {
        id: template.key.id.clone(),
        inputs: template.key.inputs.clone(),
        state_bytes,
        build_ms: started.elapsed().as_millis() as u64,
        built_unix: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
    };
    let json = serde_json::to_vec_pretty(&meta).expect("meta serializes");
    let path = dir.join(META);
    crate::fsutil::write_atomic(&path, &json).map_err(|source| io("writing", &path, source))?;
    Ok(meta)
}

/// Connects to the agent port and reads until the agent says `WAITING`: its early init is done.
/// A template-mode agent answers nothing else before RESUME, so nothing is sent. Returns the
/// connection, which must stay open while the state is saved.
fn wait_for_agent(vm: &mut RunningQemu, socket: &Path) -> Result<UnixStream, String> {
    let deadline = Instant::now() + AGENT_DEADLINE;
    let exited = |vm: &mut RunningQemu| -> Option<String> {
        match vm.wait_timeout(Duration::ZERO) {
            Ok(Some(exit)) => Some(format!(
                "the template VM exited before its agent was ready ({:?}{})",
                exit.status,
                exit.failure.map(|f| format!(", {f}")).unwrap_or_default()
            )),
            Ok(None) => None,
            Err(e) => Some(e.to_string()),
        }
    };
    let mut stream = loop {
        if let Some(why) = exited(vm) {
            return Err(why);
        }
        match UnixStream::connect(socket) {
            Ok(stream) => break stream,
            Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {}
            Err(e) => return Err(format!("connecting to {}: {e}", socket.display())),
        }
        if Instant::now() > deadline {
            return Err(format!("no agent socket {} appeared", socket.display()));
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let timeout = Some(Duration::from_millis(100));
    stream
        .set_read_timeout(timeout)
        .map_err(|e| format!("agent socket: {e}"))?;
    let mut lines = LineBuffer::new();
    let mut chunk = [0u8; 4096];
    loop {
        while let Some(line) = lines.next_line() {
            if let Some(HandshakeLine::Waiting { .. }) = parse_line(&line) {
                return Ok(stream);
            }
        }
        match stream.read(&mut chunk) {
            Ok(0) => return Err("the agent port closed before the agent was ready".into()),
            Ok(n) => lines.push(&chunk[..n]),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(e) => return Err(format!("reading the agent port: {e}")),
        }
        if let Some(why) = exited(vm) {
            return Err(why);
        }
        if Instant::now() > deadline {
            return Err(format!(
                "the agent did not report WAITING within {AGENT_DEADLINE:?}; \
                 does the agent support template mode (hearth.template=1)?"
            ));
        }
    }
}

fn create_dir(dir: &Path) -> Result<(), SnapshotError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| io("creating", dir, source))
}

fn io(what: &'static str, path: &Path, source: std::io::Error) -> SnapshotError {
    SnapshotError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}
