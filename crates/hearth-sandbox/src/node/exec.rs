//! Using a running sandbox: [`Node::exec`] resolves a command against the image config and the
//! sandbox's defaults (`crate::command::resolve`) and starts it; the file calls move files. Each use
//! marks the sandbox active, and a running exec keeps it from counting as idle ([`Activity`]).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use hearth_vm::channel::{ExecHandle, ExecOutput, ExecResult, ExecStdin, ExitStatus, TtySize};
use tokio::io::AsyncRead;

use super::record::ExecDefaults;
use super::{admission, lock_ignoring_poison, now_ms, ExecSpec, Node, NodeError, State};
use crate::command::{resolve, CommandOverrides, ImageDefaults};
use crate::Sandbox;

/// When a sandbox was last used and how many of its execs run now.
#[derive(Debug)]
pub(crate) struct Activity {
    execs: AtomicUsize,
    last_active_ms: AtomicU64,
}

impl Activity {
    pub fn new(last_active_ms: u64) -> Activity {
        Activity {
            execs: AtomicUsize::new(0),
            last_active_ms: AtomicU64::new(last_active_ms),
        }
    }

    pub fn touch(&self) {
        self.last_active_ms.fetch_max(now_ms(), Ordering::SeqCst);
    }

    pub fn last_active(&self) -> u64 {
        self.last_active_ms.load(Ordering::SeqCst)
    }

    pub fn running_execs(&self) -> usize {
        self.execs.load(Ordering::SeqCst)
    }
}

/// Counts one running exec (or forwarded port) for as long as it lives.
pub(super) struct ActivityGuard(Arc<Activity>);

impl ActivityGuard {
    pub(super) fn new(activity: Arc<Activity>) -> ActivityGuard {
        activity.execs.fetch_add(1, Ordering::SeqCst);
        activity.touch();
        ActivityGuard(activity)
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.0.touch();
        self.0.execs.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A running command. The sandbox counts as active until this is finished or dropped; dropping it
/// early cancels the command (the agent kills its process tree).
pub struct NodeExec {
    handle: ExecHandle,
    _active: ActivityGuard,
}

impl NodeExec {
    /// The agent's id of this exec.
    pub fn id(&self) -> u64 {
        self.handle.id()
    }

    /// The next chunk of output, in order; `None` once the command has exited (then [`NodeExec::wait`]
    /// returns at once).
    pub async fn next_output(&mut self) -> Result<Option<ExecOutput>, NodeError> {
        Ok(self.handle.next_output().await?)
    }

    /// The command's stdin, once, if the exec asked for it.
    pub fn take_stdin(&mut self) -> Option<ExecStdin> {
        self.handle.take_stdin()
    }

    /// Sends `signal` to the command.
    pub async fn signal(&self, signal: i32) -> Result<(), NodeError> {
        Ok(self.handle.signal(signal).await?)
    }

    /// Sets the size of the command's terminal (the exec must have been started with a `tty`).
    pub async fn resize(&self, size: TtySize) -> Result<(), NodeError> {
        Ok(self.handle.resize(size).await?)
    }

    /// How the command ended, once known (after `next_output` returned `None`).
    pub fn status(&self) -> Option<ExitStatus> {
        self.handle.status()
    }

    /// Discards remaining output and returns how the command ended.
    pub async fn wait(self) -> Result<ExitStatus, NodeError> {
        Ok(self.handle.wait().await?)
    }

    /// Collects all output and the exit status.
    pub async fn output(self) -> Result<ExecResult, NodeError> {
        Ok(self.handle.output().await?)
    }

    /// The agent's handle, no longer counted as a running exec: for a process that lives on
    /// between uses (the code interpreter), each of which counts instead.
    pub(super) fn into_idle_handle(self) -> ExecHandle {
        self.handle
    }
}

/// What an exec needs from a running sandbox.
pub(super) struct Target {
    pub(super) sandbox: Arc<Sandbox>,
    pub(super) activity: Arc<Activity>,
    defaults: ExecDefaults,
    image: hearth_image::ImageConfig,
}

impl Node {
    /// Runs a command in a running sandbox: `argv` as given (`docker exec`), environment image Env <
    /// the sandbox's env < the exec's, working directory and user the exec's, else the sandbox's,
    /// else the image's. The sandbox counts as active until the returned handle is done.
    pub async fn exec(&self, tenant: &str, id: &str, req: ExecSpec) -> Result<NodeExec, NodeError> {
        let target = self.target(tenant, id)?;
        check(&req)?;
        let (stdin, timeout, tty, attachable) = (req.stdin, req.timeout, req.tty, req.attachable);
        let label = req.label;
        let overrides = CommandOverrides {
            command: req.argv,
            // Cleared: an exec names its whole command, as `docker exec` does.
            entrypoint: Some(String::new()),
            env: target
                .defaults
                .env
                .iter()
                .chain(&req.env)
                .map(|(k, v)| format!("{k}={v}"))
                .collect(),
            working_dir: req.workdir.or(target.defaults.workdir.clone()),
            user: req.user.or(target.defaults.user.clone()),
        };
        // Never the daemon's environment: a sandbox sees only what it was given.
        let command = resolve(&ImageDefaults::from(&target.image), &overrides, |_| None)
            .map_err(|e| NodeError::Invalid(e.to_string()))?;
        let active = ActivityGuard::new(target.activity);
        let mut request = command.into_request(stdin, timeout);
        request.tty = tty;
        request.attachable = attachable;
        request.label = label;
        let handle = target.sandbox.client().exec(request).await?;
        lock_ignoring_poison(&self.counters).execs_total += 1;
        Ok(NodeExec {
            handle,
            _active: active,
        })
    }

    /// Writes `body` to `path` (absolute) in the sandbox with `mode`; returns the bytes written.
    pub async fn put_file(
        &self,
        tenant: &str,
        id: &str,
        path: &str,
        mode: u32,
        body: impl AsyncRead + Unpin + Send,
    ) -> Result<u64, NodeError> {
        check_path(path)?;
        if mode > 0o7777 {
            return Err(NodeError::Invalid(format!(
                "mode {mode:o}: give permission bits (at most 7777 octal)"
            )));
        }
        let target = self.target(tenant, id)?;
        let _active = ActivityGuard::new(target.activity);
        let stat = target.sandbox.client().put_file(path, mode, body).await?;
        Ok(stat.size)
    }

    /// Streams the file at `path` (absolute) out of the sandbox.
    pub async fn get_file(
        &self,
        tenant: &str,
        id: &str,
        path: &str,
    ) -> Result<hearth_vm::channel::FileDownload, NodeError> {
        check_path(path)?;
        let target = self.target(tenant, id)?;
        target.activity.touch();
        Ok(target.sandbox.client().get_file(path).await?)
    }

    /// Lists the directory at `path` (absolute) in the sandbox.
    pub async fn list_dir(
        &self,
        tenant: &str,
        id: &str,
        path: &str,
    ) -> Result<hearth_proto::DirListing, NodeError> {
        check_path(path)?;
        let target = self.target(tenant, id)?;
        let _active = ActivityGuard::new(target.activity);
        Ok(target.sandbox.client().list(path).await?)
    }

    /// The tenant's running sandbox `id`, marked active.
    pub(super) fn target(&self, tenant: &str, id: &str) -> Result<Target, NodeError> {
        self.check_open()?;
        let table = self.table();
        let entry = table.visible(tenant, id)?;
        let state = entry.record.info.state;
        let (Some(sandbox), Some(image), State::Running) =
            (&entry.live, &entry.record.image, state)
        else {
            return Err(NodeError::NotRunning {
                id: id.to_owned(),
                state,
                detail: None,
            });
        };
        entry.activity.touch();
        Ok(Target {
            sandbox: sandbox.clone(),
            activity: entry.activity.clone(),
            defaults: entry.record.defaults.clone(),
            image: image.config.clone(),
        })
    }
}

/// What can be checked of an exec before its sandbox is known: a command, well-formed environment
/// and working directory.
pub(super) fn check(spec: &ExecSpec) -> Result<(), NodeError> {
    admission::check_env(&spec.env)?;
    admission::check_workdir(spec.workdir.as_deref())?;
    if spec.argv.first().is_none_or(|cmd| cmd.is_empty()) {
        return Err(NodeError::Invalid(
            "argv: give the command to run, e.g. [\"sh\", \"-c\", \"echo hi\"]".into(),
        ));
    }
    Ok(())
}

fn check_path(path: &str) -> Result<(), NodeError> {
    if !path.starts_with('/') || path.contains('\0') {
        return Err(NodeError::Invalid(format!(
            "path {path:?}: give an absolute path inside the sandbox"
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activity_counts_running_execs_and_touches_on_both_ends() {
        let activity = Arc::new(Activity::new(0));
        let guard = ActivityGuard::new(activity.clone());
        assert_eq!(activity.running_execs(), 1);
        let started = activity.last_active();
        assert!(started > 0);
        drop(guard);
        assert_eq!(activity.running_execs(), 0);
        assert!(activity.last_active() >= started);
    }

    #[test]
    fn paths_must_be_absolute() {
        assert!(check_path("/tmp/x").is_ok());
        for bad in ["tmp/x", "", "/a\0b"] {
            assert!(
                matches!(check_path(bad), Err(NodeError::Invalid(_))),
                "{bad:?}"
            );
        }
    }
}
