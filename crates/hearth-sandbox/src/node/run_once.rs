//! One command in a fresh sandbox, start to end: the one-shot run behind `POST /v1/runs` and the
//! Kubernetes node agent. [`Node::run_once`] creates the sandbox (retrying a capacity refusal for
//! [`RunSpec::capacity_wait`]), waits for its boot, runs the command (feeding it the given stdin),
//! hands every chunk of output to the caller's sink as it arrives, and deletes the sandbox however
//! the run ends: awaited before it returns, and by a drop guard when the future is dropped (a client
//! that went away, an aborted task). The caller keeps what it wants of the output (the first bytes
//! up to a limit, the last few KiB); the lifecycle lives only here.
//!
//! Unless the spec sets a TTL, the sandbox's TTL is the command's timeout plus the boot wait plus a
//! margin, so the node's reaper ends it even if the caller's process dies mid-run.

use std::sync::Arc;
use std::time::Duration;

use hearth_vm::channel::{ExecOutput, ExecStdin, ExitStatus};

use super::{exec, CreateSpec, ExecSpec, Node, NodeError, State, Tenant};

/// How often a capacity refusal is retried while [`RunSpec::capacity_wait`] lasts.
const CAPACITY_RETRY: Duration = Duration::from_millis(500);
/// Added to the command's timeout and the boot wait for the sandbox's TTL.
const TTL_MARGIN: Duration = Duration::from_secs(60);

/// One run: the sandbox, the command, and how long to wait for each.
#[derive(Debug, Clone, Default)]
pub struct RunSpec {
    pub create: CreateSpec,
    /// The command. Its `stdin` flag is set from [`RunSpec::stdin`].
    pub exec: ExecSpec,
    /// Written to the command's stdin, which is then closed; `None`: stdin is `/dev/null`.
    pub stdin: Option<Vec<u8>>,
    /// The longest wait for the sandbox to be running (image pull and boot slot included).
    pub boot_timeout: Duration,
    /// How long a refusal for node capacity is retried before the run fails; zero: not retried.
    pub capacity_wait: Duration,
}

/// How a run ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RunOutcome {
    pub status: ExitStatus,
    /// Creation to agent ready, including the image pull and the wait for a boot slot.
    pub boot_ms: u64,
}

/// The step at which a run failed. Each keeps what callers need to answer in their own terms (an
/// HTTP status, a Kubernetes reason); the sandbox is deleted in every case.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// The node refused the run before anything started: an invalid spec, the tenant's quota, the
    /// node's capacity (still full after `capacity_wait`), a node shutting down.
    #[error("the node refused the sandbox")]
    Refused(#[source] NodeError),
    /// The sandbox did not reach `Running`: its boot failed (`reason` says why), it was still
    /// creating after `boot_timeout`, or it was ended (deleted, expired) meanwhile.
    #[error("the sandbox did not start ({state}): {reason}")]
    NotStarted { state: State, reason: String },
    /// The sandbox ran but the command could not be started.
    #[error("starting the command")]
    Exec(#[source] NodeError),
    /// The command started, but its output or exit status did not arrive (the VM or its agent went
    /// away).
    #[error("lost the command's output")]
    OutputLost(#[source] NodeError),
}

impl Node {
    /// Runs `spec.exec` in a fresh sandbox of `spec.create` for `tenant`, passing each chunk of
    /// output to `sink` in order, and deletes the sandbox before returning, or, if this future is
    /// dropped first, in the background. See the module doc.
    pub async fn run_once(
        &self,
        tenant: &Tenant,
        spec: RunSpec,
        mut sink: impl FnMut(ExecOutput) + Send,
    ) -> Result<RunOutcome, RunError> {
        let RunSpec {
            mut create,
            mut exec,
            stdin,
            boot_timeout,
            capacity_wait,
        } = spec;
        exec.stdin = stdin.is_some();
        // Before anything boots: a malformed command would only be refused after the boot.
        exec::check(&exec).map_err(RunError::Refused)?;
        if create.ttl.is_none() {
            create.ttl = exec.timeout.map(|t| t + boot_timeout + TTL_MARGIN);
        }
        let id = self
            .create_retrying(tenant, create, capacity_wait)
            .await
            .map_err(RunError::Refused)?;
        // No await between the create and the guard: a dropped future cannot leak the sandbox.
        let mut sandbox = DeleteOnDrop {
            node: self
                .me
                .upgrade()
                .expect("a node method runs on a live node"),
            tenant: tenant.name.clone(),
            id: Some(id.clone()),
        };
        let outcome = self
            .run_in(&tenant.name, &id, exec, stdin, boot_timeout, &mut sink)
            .await;
        sandbox.delete_now().await;
        outcome
    }

    /// Creates the sandbox, retrying a capacity refusal until `wait` has passed; its id.
    async fn create_retrying(
        &self,
        tenant: &Tenant,
        spec: CreateSpec,
        wait: Duration,
    ) -> Result<String, NodeError> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            match self.create(tenant, spec.clone()).await {
                Ok(info) => return Ok(info.id),
                Err(NodeError::Capacity { .. }) if tokio::time::Instant::now() < deadline => {
                    tokio::time::sleep(CAPACITY_RETRY).await;
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Waits for sandbox `id` to run, runs the command in it and drains its output into `sink`.
    async fn run_in(
        &self,
        tenant: &str,
        id: &str,
        exec: ExecSpec,
        stdin: Option<Vec<u8>>,
        boot_timeout: Duration,
        sink: &mut (impl FnMut(ExecOutput) + Send),
    ) -> Result<RunOutcome, RunError> {
        let ready = match self.wait_ready(tenant, id, boot_timeout).await {
            Ok(info) => info,
            // Only a deleted sandbox disappears; its record said "deleted".
            Err(_) => {
                return Err(RunError::NotStarted {
                    state: State::Stopped,
                    reason: "deleted while it booted".into(),
                })
            }
        };
        if ready.state != State::Running {
            let reason = ready
                .reason
                .unwrap_or_else(|| format!("still creating after {}s", boot_timeout.as_secs_f64()));
            return Err(RunError::NotStarted {
                state: ready.state,
                reason,
            });
        }
        let mut handle = self.exec(tenant, id, exec).await.map_err(RunError::Exec)?;
        let feed = feed(handle.take_stdin(), stdin);
        let drain = async {
            while let Some(chunk) = handle.next_output().await? {
                sink(chunk);
            }
            Ok::<_, NodeError>(())
        };
        // The output decides when the run is over: a command that exits without reading all its
        // stdin leaves the feed waiting, and the feed is then dropped.
        let drained = {
            tokio::pin!(drain, feed);
            let mut feeding = true;
            loop {
                tokio::select! {
                    drained = &mut drain => break drained,
                    () = &mut feed, if feeding => feeding = false,
                }
            }
        };
        drained.map_err(RunError::OutputLost)?;
        let status = handle.wait().await.map_err(RunError::OutputLost)?;
        Ok(RunOutcome {
            status,
            boot_ms: ready.boot_ms.unwrap_or_default(),
        })
    }
}

/// Writes `data` to the command's stdin and closes it. A failed write ends the feed quietly: the
/// command has exited, and its output and status say how.
async fn feed(writer: Option<ExecStdin>, data: Option<Vec<u8>>) {
    if let (Some(mut writer), Some(data)) = (writer, data) {
        if writer.write(&data).await.is_ok() {
            let _ = writer.close().await;
        }
    }
}

/// Deletes a run's sandbox however the run ends. The delete always runs as its own task, so that
/// dropping the run while the VM is being stopped cannot cut the stop short; the normal path
/// awaits that task, a drop leaves it running.
struct DeleteOnDrop {
    node: Arc<Node>,
    tenant: String,
    id: Option<String>,
}

impl DeleteOnDrop {
    async fn delete_now(&mut self) {
        if let Some(task) = self.spawn_delete() {
            let _ = task.await;
        }
    }

    fn spawn_delete(&mut self) -> Option<tokio::task::JoinHandle<()>> {
        let id = self.id.take()?;
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            // No runtime left (the process is ending): the TTL or the next start ends it.
            tracing::warn!(sandbox = %id, "left a run's sandbox to its TTL: no runtime to delete it");
            return None;
        };
        let (node, tenant) = (self.node.clone(), self.tenant.clone());
        Some(runtime.spawn(async move {
            match node.delete(&tenant, &id).await {
                // Someone else deleted it first (the tenant, the Kubernetes agent).
                Ok(()) | Err(NodeError::NotFound { .. }) => {}
                Err(e) => tracing::warn!(sandbox = %id, "deleting the sandbox of a run: {e}"),
            }
        }))
    }
}

impl Drop for DeleteOnDrop {
    fn drop(&mut self) {
        self.spawn_delete();
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Instant;

    use super::*;
    use crate::node::{Capacity, NodeConfig, Quota};

    fn tenant() -> Tenant {
        Tenant {
            name: "t".into(),
            quota: Quota {
                max_sandboxes: 10,
                vcpus: 16,
                memory_mib: 64 * 1024,
                disk_bytes: u64::MAX,
            },
            network_ceiling: crate::node::default_network_ceiling(),
        }
    }

    async fn node(home: &Path, capacity_vcpus: u32) -> Arc<Node> {
        let mut config = NodeConfig::new(home);
        config.capacity = Capacity {
            vcpus: capacity_vcpus,
            memory_mib: 64 * 1024,
            disk_bytes: u64::MAX,
        };
        config.defaults.memory_mib = 256;
        config.defaults.scratch_bytes = 64 << 20;
        Node::open(config).await.unwrap()
    }

    fn spec(image: String) -> RunSpec {
        RunSpec {
            create: CreateSpec {
                image,
                ..CreateSpec::default()
            },
            exec: ExecSpec {
                argv: vec!["true".into()],
                timeout: Some(Duration::from_secs(5)),
                ..ExecSpec::default()
            },
            boot_timeout: Duration::from_secs(30),
            ..RunSpec::default()
        }
    }

    /// An address that accepts connections and never answers: a pull from it hangs, so its sandbox
    /// stays `Creating` without a VM.
    async fn stalled_registry() -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = listener.accept().await {
                held.push(socket);
            }
        });
        addr
    }

    /// An address nothing listens on: a pull from it fails at once.
    fn closed_registry() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.local_addr().unwrap().to_string()
    }

    async fn wait_until_empty(node: &Node) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !node.list("t").is_empty() || node.metrics().allocated_vcpus != 0 {
            assert!(
                Instant::now() < deadline,
                "the run's sandbox stayed: {:?}",
                node.list("t")
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    #[tokio::test]
    async fn a_malformed_command_is_refused_before_anything_is_created() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 4).await;
        let mut run = spec(stalled_registry().await + "/x:1");
        run.exec.argv.clear();
        let err = node.run_once(&tenant(), run, |_| {}).await.unwrap_err();
        assert!(
            matches!(&err, RunError::Refused(NodeError::Invalid(m)) if m.contains("argv")),
            "{err:?}"
        );
        assert_eq!(node.metrics().sandboxes.creating, 0);
    }

    #[tokio::test]
    async fn a_capacity_refusal_is_retried_for_the_wait_given_and_only_then() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 1).await;
        let image = stalled_registry().await + "/x:1";
        let holder = node
            .create(
                &tenant(),
                CreateSpec {
                    image: image.clone(),
                    ..CreateSpec::default()
                },
            )
            .await
            .unwrap();

        let started = Instant::now();
        let err = node.run_once(&tenant(), spec(image.clone()), |_| {}).await;
        assert!(
            matches!(err, Err(RunError::Refused(NodeError::Capacity { .. }))),
            "{err:?}"
        );
        assert!(
            started.elapsed() < Duration::from_millis(400),
            "no wait: no retry"
        );

        let mut run = spec(image);
        run.capacity_wait = Duration::from_millis(1200);
        let started = Instant::now();
        let err = node.run_once(&tenant(), run, |_| {}).await;
        assert!(
            matches!(err, Err(RunError::Refused(NodeError::Capacity { .. }))),
            "{err:?}"
        );
        assert!(
            started.elapsed() >= Duration::from_millis(1200),
            "retried for the wait"
        );
        node.delete("t", &holder.id).await.unwrap();
    }

    #[tokio::test]
    async fn a_failed_boot_says_why_and_the_sandbox_is_gone() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 4).await;
        let err = node
            .run_once(&tenant(), spec(closed_registry() + "/x:1"), |_| {})
            .await
            .unwrap_err();
        match &err {
            RunError::NotStarted { state, reason } => {
                assert_eq!(*state, State::Failed);
                assert!(reason.starts_with("boot failed"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
        wait_until_empty(&node).await;
    }

    #[tokio::test]
    async fn a_boot_past_its_timeout_fails_and_the_sandbox_is_gone() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 4).await;
        let mut run = spec(stalled_registry().await + "/x:1");
        run.boot_timeout = Duration::from_millis(300);
        let err = node.run_once(&tenant(), run, |_| {}).await.unwrap_err();
        assert!(
            matches!(&err, RunError::NotStarted { state: State::Creating, reason } if reason.contains("still creating")),
            "{err:?}"
        );
        wait_until_empty(&node).await;
    }

    #[tokio::test]
    async fn a_dropped_run_deletes_its_sandbox() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 4).await;
        let tenant = tenant();
        let run = node.run_once(&tenant, spec(stalled_registry().await + "/x:1"), |_| {});
        // Dropped while it waits for the (never ending) boot.
        let cut = tokio::time::timeout(Duration::from_millis(300), run).await;
        assert!(cut.is_err(), "the run cannot have finished: {cut:?}");
        wait_until_empty(&node).await;
    }

    #[tokio::test]
    async fn the_ttl_covers_the_command_and_the_boot_wait() {
        let home = tempfile::tempdir().unwrap();
        let node = node(home.path(), 4).await;
        let tenant = tenant();
        let run = node.run_once(&tenant, spec(stalled_registry().await + "/x:1"), |_| {});
        let observe = async {
            loop {
                if let Some(info) = node.list("t").pop() {
                    return info;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        let info = tokio::select! {
            info = observe => info,
            _ = run => panic!("the run cannot finish"),
        };
        // 5 s command + 30 s boot wait + the margin.
        let ttl = info.expires_at.unwrap() - info.created_at;
        assert_eq!(ttl, (5 + 30 + TTL_MARGIN.as_secs()) * 1000);
        wait_until_empty(&node).await;
    }
}
