//! The test Kubernetes control plane: Debian's etcd and a kube-apiserver 1.20 (built and cached by
//! `scripts/provision-kube.sh`) on free 127.0.0.1 ports, with client-certificate identities signed by a
//! throwaway CA. No controller-manager or scheduler runs, so what tests see is the API alone.
//!
//! `scripts/kube-env.sh` owns the layout (certificates, kubeconfigs, command lines); this module only
//! runs it. A harness may start one control plane for a whole run (`kube-env.sh start DIR`) and export
//! `HEARTH_TEST_KUBECONFIG=DIR/admin.kubeconfig`; a test process without it starts a private one here,
//! once per process. The private processes get `PR_SET_PDEATHSIG` from a thread that lives as long as the
//! process, and an `atexit` hook stops them and removes their state: nothing outlives the test process.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::{bail, Context};

/// A running kube-apiserver and the admin identity (`O=system:masters`) to use it.
pub struct Kube {
    /// The admin kubeconfig; works with `kubectl --kubeconfig` and kube-rs's `Config::from_custom_kubeconfig`.
    pub kubeconfig: PathBuf,
    /// `https://127.0.0.1:PORT`.
    pub server: String,
    /// The `kube-env.sh` state directory: `ca.crt`, `ca.key`, `users/`.
    state: PathBuf,
}

/// The private control plane of this process, stopped by [`stop_at_exit`].
static OWNED: Mutex<Option<OwnedControlPlane>> = Mutex::new(None);

struct OwnedControlPlane {
    apiserver: Child,
    etcd: Child,
    _state: tempfile::TempDir,
}

impl Drop for OwnedControlPlane {
    fn drop(&mut self) {
        // The API server first, so it does not log a storm of etcd errors on the way down.
        for child in [&mut self.apiserver, &mut self.etcd] {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The control plane for this test process (shared by every test in it).
///
/// Fails, naming `scripts/provision-kube.sh`, when the kube-apiserver binary or etcd is not provisioned;
/// tests call [`crate::skip`] with that message.
pub fn kube() -> anyhow::Result<&'static Kube> {
    static KUBE: OnceLock<Kube> = OnceLock::new();
    static STARTING: Mutex<()> = Mutex::new(());
    crate::registry::start_once(&KUBE, &STARTING, || {
        match std::env::var_os("HEARTH_TEST_KUBECONFIG") {
            Some(path) if !path.is_empty() => shared(PathBuf::from(path)),
            _ => start_private(),
        }
    })
}

/// The `kubectl` on `PATH`, if any (`scripts/provision-kube.sh` installs one when it can).
pub fn kubectl_bin() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join("kubectl"))
        .find(|candidate| candidate.is_file())
}

impl Kube {
    /// A kubeconfig for a client certificate with user `user` and `groups`, signed by this server's CA.
    /// The identity has only what RBAC grants it (plus `system:authenticated`'s discovery rights).
    pub fn kubeconfig_for(&self, user: &str, groups: &[&str]) -> anyhow::Result<PathBuf> {
        let out = script()
            .arg("user")
            .arg(&self.state)
            .arg(user)
            .args(groups)
            .output()?;
        if !out.status.success() {
            bail!(
                "kube-env.sh user {user} {groups:?} failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(PathBuf::from(String::from_utf8(out.stdout)?.trim()))
    }

    /// Creates a namespace named `<prefix>-<unique suffix>` and returns its name. Namespaces are not
    /// deleted: without a controller-manager a deleted namespace would stay Terminating anyway.
    pub fn create_namespace(&self, prefix: &str) -> anyhow::Result<String> {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        loop {
            // A shared server outlives test processes, so a pid may come back: retry on a conflict.
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = format!("{prefix}-{}-{n}", std::process::id());
            let body = format!(
                r#"{{"apiVersion":"v1","kind":"Namespace","metadata":{{"name":"{name}"}}}}"#
            );
            let (status, text) =
                self.request(&self.kubeconfig, "POST", "/api/v1/namespaces", Some(&body))?;
            match status {
                201 => return Ok(name),
                409 if n < 10_000 => continue,
                _ => bail!("creating namespace {name}: HTTP {status}: {text}"),
            }
        }
    }

    /// An HTTP request to the API server as the identity of `kubeconfig` (the admin one or one from
    /// [`Kube::kubeconfig_for`]), through curl. Returns the status code and the body.
    pub fn request(
        &self,
        kubeconfig: &Path,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> anyhow::Result<(u16, String)> {
        let mut cmd = Command::new("curl");
        cmd.args(["-sS", "-X", method, "-w", "\n%{http_code}"])
            .arg("--cacert")
            .arg(self.state.join("ca.crt"))
            .arg("--cert")
            .arg(kubeconfig.with_extension("crt"))
            .arg("--key")
            .arg(kubeconfig.with_extension("key"));
        if let Some(body) = body {
            cmd.args([
                "-H",
                "Content-Type: application/json",
                "--data-binary",
                body,
            ]);
        }
        let out = cmd
            .arg(format!("{}{path}", self.server))
            .output()
            .context("running curl (apt-get install curl)")?;
        if !out.status.success() {
            bail!(
                "curl {method} {}{path} failed: {}",
                self.server,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = String::from_utf8_lossy(&out.stdout);
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
        Ok((code.trim().parse()?, body.to_string()))
    }

    /// `kubectl --kubeconfig <admin>`; fails naming what is missing when there is no kubectl.
    pub fn kubectl(&self) -> anyhow::Result<Command> {
        let bin = kubectl_bin().context(
            "kubectl is not installed (scripts/provision-kube.sh installs Debian's kubernetes-client)",
        )?;
        let mut cmd = Command::new(bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig);
        Ok(cmd)
    }
}

fn script() -> Command {
    Command::new(crate::repo_root().join("scripts/kube-env.sh"))
}

/// A control plane started by `kube-env.sh start DIR`: its kubeconfig is `DIR/admin.kubeconfig`.
fn shared(kubeconfig: PathBuf) -> anyhow::Result<Kube> {
    let state = kubeconfig
        .parent()
        .context("HEARTH_TEST_KUBECONFIG has no parent directory")?
        .to_path_buf();
    let server = std::fs::read_to_string(state.join("server")).with_context(|| {
        format!(
            "HEARTH_TEST_KUBECONFIG={} is not in a kube-env.sh state directory (no server file)",
            kubeconfig.display()
        )
    })?;
    Ok(Kube {
        kubeconfig,
        server: server.trim().to_string(),
        state,
    })
}

fn start_private() -> anyhow::Result<Kube> {
    let started = Instant::now();
    // etcd fsyncs every write; on tmpfs that costs nothing, which the benchmarks rely on.
    let parent = if Path::new("/dev/shm").is_dir() {
        PathBuf::from("/dev/shm")
    } else {
        std::env::temp_dir()
    };
    remove_orphaned_states(&parent);
    let state = tempfile::Builder::new()
        .prefix(STATE_PREFIX)
        .tempdir_in(&parent)?;
    std::fs::write(state.path().join("owner"), std::process::id().to_string())?;
    let out = script().arg("config").arg(state.path()).output()?;
    if !out.status.success() {
        bail!(
            "scripts/kube-env.sh config failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let kubeconfig = PathBuf::from(String::from_utf8(out.stdout)?.trim());
    let etcd = spawn_logged(state.path(), "etcd")?;
    let apiserver = match spawn_logged(state.path(), "kube-apiserver") {
        Ok(child) => child,
        Err(e) => {
            let mut etcd = etcd;
            let _ = etcd.kill();
            let _ = etcd.wait();
            return Err(e);
        }
    };
    let state_path = state.path().to_path_buf();
    *OWNED.lock().unwrap_or_else(|e| e.into_inner()) = Some(OwnedControlPlane {
        apiserver,
        etcd,
        _state: state,
    });
    // SAFETY: registering a plain extern "C" function with no captured state.
    unsafe { libc::atexit(stop_at_exit) };
    let wait = script().arg("wait").arg(&state_path).output()?;
    if !wait.status.success() {
        bail!(
            "the test kube-apiserver did not become ready: {}",
            String::from_utf8_lossy(&wait.stderr)
        );
    }
    let kube = shared(kubeconfig)?;
    eprintln!(
        "hearth-testkit: kube-apiserver {} ready in {:.1} s",
        kube.server,
        started.elapsed().as_secs_f64()
    );
    Ok(kube)
}

const STATE_PREFIX: &str = "hearth-test-kube";

/// Removes the state of private control planes whose test process was killed before its `atexit` ran
/// (PDEATHSIG stopped the servers, but etcd's preallocated files stay: about 120 MiB on tmpfs each).
fn remove_orphaned_states(parent: &Path) {
    let Ok(entries) = std::fs::read_dir(parent) else {
        return;
    };
    for entry in entries.flatten() {
        if !entry
            .file_name()
            .to_string_lossy()
            .starts_with(STATE_PREFIX)
        {
            continue;
        }
        let owner = std::fs::read_to_string(entry.path().join("owner"));
        let Some(pid) = owner
            .ok()
            .and_then(|o| o.trim().parse::<libc::pid_t>().ok())
        else {
            continue; // Still being created, or not ours.
        };
        // SAFETY: signal 0 only checks that the process exists.
        let alive = unsafe { libc::kill(pid, 0) } == 0
            || std::io::Error::last_os_error().raw_os_error() == Some(libc::EPERM);
        if !alive {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}

/// Runs the command line in `state/<name>.args` (one argument a line), logging to `state/<name>.log`.
fn spawn_logged(state: &Path, name: &str) -> anyhow::Result<Child> {
    let args = std::fs::read_to_string(state.join(format!("{name}.args")))?;
    let mut args = args.lines();
    let program = args.next().context("empty command line")?;
    let log = std::fs::File::create(state.join(format!("{name}.log")))?;
    let mut cmd = Command::new(program);
    cmd.args(args)
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
    crate::registry::spawn_from_lasting_thread(cmd)
        .with_context(|| format!("starting {program} (run scripts/provision-kube.sh)"))
}

extern "C" fn stop_at_exit() {
    if let Ok(mut owned) = OWNED.lock() {
        owned.take();
    }
}
