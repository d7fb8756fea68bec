//! The test OCI registry: Debian's `docker-registry` on a free 127.0.0.1 port with temp storage,
//! holding the project's test images as `hearth-test/<name>:latest`.
//!
//! `scripts/test.sh` starts one registry for the whole run and exports `HEARTH_TEST_REGISTRY`; a test
//! process run without it (plain `cargo test`) starts its own here. That private registry gets
//! `PR_SET_PDEATHSIG` from a thread that lives as long as the process (the signal follows the *thread*
//! that forked), and an `atexit` hook stops it and removes its storage: nothing outlives the test.

use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, OnceLock};

use anyhow::{bail, Context};

/// A running registry speaking plain HTTP.
pub struct Registry {
    /// `127.0.0.1:PORT`.
    pub addr: String,
}

/// The private registry of this process, stopped by [`stop_at_exit`].
static OWNED: Mutex<Option<OwnedRegistry>> = Mutex::new(None);

struct OwnedRegistry {
    child: Child,
    _state: tempfile::TempDir,
}

impl Drop for OwnedRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The registry for this test process (shared by every test in it).
pub fn registry() -> anyhow::Result<&'static Registry> {
    static REGISTRY: OnceLock<Registry> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    start_once(&REGISTRY, &STARTING, || {
        match std::env::var("HEARTH_TEST_REGISTRY") {
            Ok(addr) if !addr.is_empty() => Ok(Registry { addr }),
            _ => start_private(),
        }
    })
}

/// The value in `cell`, started by `start` if there is none yet. Tests of one process ask
/// concurrently: `starting` lets exactly one of them start it while the others wait; a failed start
/// stores nothing, so the next caller tries again.
pub(crate) fn start_once<T>(
    cell: &'static OnceLock<T>,
    starting: &Mutex<()>,
    start: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<&'static T> {
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let _starting = starting.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(value) = cell.get() {
        return Ok(value);
    }
    let value = start()?;
    Ok(cell.get_or_init(|| value))
}

fn start_private() -> anyhow::Result<Registry> {
    let script = crate::repo_root().join("scripts/test-registry.sh");
    let state = tempfile::Builder::new()
        .prefix("hearth-test-registry")
        .tempdir()?;
    let out = Command::new(&script)
        .arg("config")
        .arg(state.path())
        .output()?;
    if !out.status.success() {
        bail!(
            "{} config failed: {}",
            script.display(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let addr = String::from_utf8(out.stdout)?.trim().to_string();
    let log = std::fs::File::create(state.path().join("registry.log"))?;
    let mut cmd = Command::new("docker-registry");
    cmd.arg("serve")
        .arg(state.path().join("config.yml"))
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    // SAFETY: prctl is async-signal-safe; the closure touches no shared state.
    unsafe {
        cmd.pre_exec(|| {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let child = spawn_from_lasting_thread(cmd).context(
        "starting docker-registry (apt-get install docker-registry, or run scripts/provision.sh)",
    )?;
    let state_path = state.path().to_path_buf();
    *OWNED.lock().unwrap() = Some(OwnedRegistry {
        child,
        _state: state,
    });
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(stop_at_exit) };
    let push = Command::new(&script)
        .arg("push")
        .arg(&state_path)
        .arg(&addr)
        .output()?;
    if !push.status.success() {
        bail!(
            "pushing test images to {addr} failed: {}",
            String::from_utf8_lossy(&push.stderr)
        );
    }
    Ok(Registry { addr })
}

extern "C" fn stop_at_exit() {
    if let Ok(mut owned) = OWNED.lock() {
        owned.take();
    }
}

/// Spawns `cmd` from a thread that parks forever, so PDEATHSIG fires only when the process dies.
pub(crate) fn spawn_from_lasting_thread(mut cmd: Command) -> std::io::Result<Child> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(cmd.spawn());
        loop {
            std::thread::park();
        }
    });
    rx.recv().expect("spawner thread")
}
