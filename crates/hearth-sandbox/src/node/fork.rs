//! Forking a node's running sandbox ([`Node::fork`]) on top of [`crate::Sandbox::snapshot`] and
//! [`crate::PausedSandbox::start_copy`]: N new sandboxes from the running one's state at one
//! instant, the parent running on. The snapshot lives in `$HOME/node/forks/<parent>-<random>/`
//! while the children start and is removed afterwards; each child's run directory and network are
//! those of any sandbox with its id.
//!
//! Choices, as callers see them:
//! - `count` is 1 to [`MAX_FORK`] (400 otherwise); the parent must be `Running` and not being
//!   paused or resumed (409 otherwise).
//! - The children are admitted like creates, all together under the table lock before anything
//!   starts: one over the tenant's quota (429) or the node's capacity (503) and none is created.
//! - A child is its parent's record again under a new id: image, size, labels, exec defaults,
//!   idle timeout and network policy; created now, with the parent's TTL length from now; its own
//!   hostname, entropy, clock and network namespace (see `crate::fork`). It is `Creating` until
//!   its VM answers, then an ordinary sandbox (the store and recovery treat it like any other);
//!   its start is a boot: it waits for one of the node's boot slots (`--max-boots`, shared with
//!   creates, tenants taking turns) and counts in `/metrics`.
//! - All or nothing: if the snapshot fails, or any child fails to come up, every child of the
//!   call is deleted and the call fails, naming the child and the cause.
//! - The parent's execs stall while its state is saved and its disk copied, then run on; they
//!   are not the children's (a child's processes from them run on detached, output discarded).
//!   The code interpreter is: each child has its own copy of the parent's, state and execution
//!   count, unless a code call was running in the parent at the fork.

use std::sync::Arc;

use super::record::Record;
use super::{now_ms, Node, NodeError, SandboxInfo, State, Tenant};
use crate::boot::new_id;

/// Most children one fork makes.
pub const MAX_FORK: u32 = 64;

/// A child's record: the parent's under `id`, `Creating` at `now`, living `ttl_ms`.
fn child_record(parent: &Record, id: String, ttl_ms: u64, now: u64) -> Record {
    let mut record = parent.clone();
    let info = &mut record.info;
    info.id = id;
    info.state = State::Creating;
    info.reason = None;
    info.created_at = now;
    info.ready_at = None;
    info.finished_at = None;
    info.expires_at = Some(now.saturating_add(ttl_ms));
    info.last_active_at = now;
    info.boot_ms = None;
    record.vmm = None;
    record.deleted = false;
    record
}

impl Node {
    /// Makes `count` new sandboxes of the tenant's running sandbox `id` from its state now (see
    /// the module docs). Returns the children's records, `Running`.
    pub async fn fork(
        &self,
        tenant: &Tenant,
        id: &str,
        count: u32,
    ) -> Result<Vec<SandboxInfo>, NodeError> {
        self.check_open()?;
        if count == 0 || count > MAX_FORK {
            return Err(NodeError::Invalid(format!(
                "count {count}: a fork makes 1 to {MAX_FORK} sandboxes"
            )));
        }
        let now = now_ms();
        let (parent, children) = {
            let mut table = self.table();
            let entry = table.visible(&tenant.name, id)?;
            let state = entry.record.info.state;
            let live = entry
                .live
                .clone()
                .filter(|_| state == State::Running && !entry.releasing);
            let Some(parent) = live else {
                let detail = match entry.releasing {
                    true => ", being paused or resumed",
                    false => ", not running",
                };
                return Err(NodeError::NotRunning {
                    id: id.to_owned(),
                    state,
                    detail: Some(detail.into()),
                });
            };
            let need = (u64::from(entry.record.info.memory_mib) << 20) + super::pause::SAVE_MARGIN;
            if let Some(free) = super::types::free_disk_bytes(&self.config.home) {
                if free < need {
                    return Err(NodeError::Capacity {
                        message: format!(
                            "no room to save this sandbox for a fork: its memory needs up to {} \
                             MiB and the node's disk has {} MiB free; retry when space is freed",
                            need >> 20,
                            free >> 20
                        ),
                    });
                }
            }
            let template = entry.record.clone();
            let info = &template.info;
            let max_ttl = self.config.limits.max_ttl.as_millis() as u64;
            let ttl_ms = info
                .expires_at
                .map_or(max_ttl, |e| e.saturating_sub(info.created_at))
                .clamp(1, max_ttl.max(1));
            let want = super::admission::Resources {
                vcpus: info.vcpus,
                memory_mib: info.memory_mib,
                disk_bytes: info.disk_bytes,
                ttl: std::time::Duration::from_millis(ttl_ms),
            };
            let mut children: Vec<SandboxInfo> = Vec::new();
            for _ in 0..count {
                let record = child_record(&template, new_id(), ttl_ms, now);
                match table.admit(tenant, &want, &self.config.capacity, record) {
                    Ok(entry) => {
                        // A VM may start any moment: an end meanwhile leaves it to this call.
                        entry.vm_starting = true;
                        children.push(entry.record.info.clone());
                    }
                    Err(e) => {
                        for child in &children {
                            table.forget(&child.id);
                        }
                        return Err(e);
                    }
                }
            }
            (parent, children)
        };
        self.bump();
        tracing::info!(sandbox = %id, tenant = %tenant.name, count, "forking");

        let dir = self
            .net_home()
            .join("forks")
            .join(format!("{id}-{}", new_id()));
        // No code call starts in the parent while its state is saved: the children get its
        // interpreter as it is between calls.
        let held = self.interpreters.hold(id);
        // The children start with the output the parent's background processes kept so far.
        let outputs = self.processes.outputs(id);
        let snapshot = match super::make_private_dir(dir.parent().expect("has a parent")) {
            Ok(()) => match parent.snapshot(&dir).await {
                Ok(snapshot) => Ok(snapshot),
                Err(e) => {
                    super::pause::settle(&parent, &e).await;
                    Err(super::pause::save_failed(id, &parent, e))
                }
            },
            Err(e) => Err(e),
        };
        let interpreter = held.and_then(|held| held.parked());
        let snapshot = match snapshot {
            Ok(snapshot) => Arc::new(snapshot),
            Err(e) => {
                for child in &children {
                    let failed = NodeError::Invalid(format!("the snapshot of {id} failed"));
                    self.booted(&child.id, Err(failed)).await;
                    self.end(&child.id, State::Failed, "fork failed", true)
                        .await;
                }
                tracing::warn!(sandbox = %id, "fork failed: {e}");
                return Err(e);
            }
        };
        let outcomes = self
            .start_children(&tenant.name, &snapshot, &children)
            .await;
        let removed = dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(removed)).await;

        let image = parent.image().clone();
        let mut failure = None;
        for (child, outcome) in children.iter().zip(outcomes) {
            match outcome {
                Ok(sandbox) => self.booted(&child.id, Ok((sandbox, image.clone()))).await,
                Err(e) => {
                    let failed = child_failed(id, &child.id, &e);
                    failure.get_or_insert(failed);
                    self.booted(&child.id, Err(e)).await;
                }
            }
        }
        if let Some(failure) = failure {
            for child in &children {
                self.end(&child.id, State::Failed, "fork failed", true)
                    .await;
            }
            tracing::warn!(sandbox = %id, "fork failed: {failure}");
            return Err(failure);
        }
        if let Some(interpreter) = interpreter {
            for child in &children {
                if let Ok(target) = self.target(&tenant.name, &child.id) {
                    self.interpreters.adopt(&child.id, &target, &interpreter);
                    self.reattach_code(&tenant.name, &child.id);
                }
            }
        }
        let ids: Vec<String> = children.iter().map(|c| c.id.clone()).collect();
        self.inherit_processes(&tenant.name, id, &ids, outputs)
            .await;
        tracing::info!(sandbox = %id, count, "forked");
        Ok(children
            .iter()
            .filter_map(|child| self.get(&tenant.name, &child.id).ok())
            .collect())
    }

    /// Removes every fork's snapshot: at [`Node::open`], when no fork can be running, those
    /// are what a daemon that died during a fork left.
    pub(super) fn remove_fork_snapshots(&self) {
        let dir = self.net_home().join("forks");
        let Ok(entries) = std::fs::read_dir(&dir) else {
            return;
        };
        for entry in entries.flatten() {
            tracing::info!(path = %entry.path().display(), "removing the snapshot of a fork cut short");
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }

    /// Starts every child from `snapshot`, each in one of the node's boot slots (`--max-boots`:
    /// a child's start is a boot like a create's, and shares the slots with the tenant's creates;
    /// a fork of 10 on a busy 2-core host with 8 restores at once saw a QEMU miss its 30 s start
    /// deadline). Outcomes in `children`'s order.
    async fn start_children(
        &self,
        tenant: &str,
        snapshot: &Arc<crate::PausedSandbox>,
        children: &[SandboxInfo],
    ) -> Vec<Result<crate::Sandbox, NodeError>> {
        let node = self
            .me
            .upgrade()
            .expect("a node method runs on a live node");
        let mut tasks = tokio::task::JoinSet::new();
        for (index, child) in children.iter().enumerate() {
            let config = self.sandbox_config(child);
            let run_dir = self.run_dir(&child.id);
            let (snapshot, node, id) = (snapshot.clone(), node.clone(), child.id.clone());
            let tenant = tenant.to_owned();
            tasks.spawn(async move {
                let _slot = node.boots.acquire(&tenant).await;
                let started = snapshot.start_copy(&config, &id, &run_dir, true).await;
                (index, started.map_err(|e| NodeError::of(&id, e)))
            });
        }
        let mut outcomes: Vec<Option<Result<crate::Sandbox, NodeError>>> =
            children.iter().map(|_| None).collect();
        while let Some(joined) = tasks.join_next().await {
            let (index, outcome) = joined.expect("child start task");
            outcomes[index] = Some(outcome);
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every child started"))
            .collect()
    }
}

/// The fork's answer when child `child` of `parent` did not come up: of the same kind as the
/// child's error `e` (a full disk is capacity, a VMM that did not answer the sandbox's trouble),
/// saying no child was kept.
fn child_failed(parent: &str, child: &str, e: &NodeError) -> NodeError {
    let what = format!("forking sandbox {parent} (no child kept): child {child} did not come up");
    match e {
        NodeError::Capacity { message } => NodeError::Capacity {
            message: format!("{what}: {message}"),
        },
        NodeError::Unresponsive { detail, .. } => NodeError::Unresponsive {
            id: child.to_owned(),
            detail: format!("{what}: {detail}"),
        },
        other => NodeError::Io {
            what,
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::node::admission::Resources;
    use crate::node::CreateSpec;

    #[test]
    fn a_child_is_its_parent_again_under_a_new_id_and_creating() {
        let resources = Resources {
            vcpus: 2,
            memory_mib: 512,
            disk_bytes: 1 << 30,
            ttl: Duration::from_secs(60),
        };
        let spec = CreateSpec {
            image: "python".into(),
            labels: [("k".to_string(), "v".to_string())].into(),
            idle_timeout: Some(Duration::from_secs(5)),
            ..CreateSpec::default()
        };
        let mut parent = Record::new("p".into(), "acme", spec, &resources, 1_000);
        parent.info.state = State::Running;
        parent.info.ready_at = Some(2_000);
        parent.info.boot_ms = Some(1_000);
        let child = child_record(&parent, "c".into(), 60_000, 10_000);
        assert_eq!(child.info.id, "c");
        assert_eq!(child.info.state, State::Creating);
        assert_eq!(
            (child.info.created_at, child.info.expires_at),
            (10_000, Some(70_000))
        );
        assert_eq!((child.info.ready_at, child.info.boot_ms), (None, None));
        assert_eq!((child.info.vcpus, child.info.memory_mib), (2, 512));
        assert_eq!(child.info.labels, parent.info.labels);
        assert_eq!(child.idle_timeout_ms, parent.idle_timeout_ms);
        assert!(child.vmm.is_none() && !child.deleted);
    }
}
