//! Background processes ([`Node::start_process`]): commands that run on in a sandbox after the
//! call that started them has answered (a dev server, a watcher, a long build), whose output the
//! node keeps (the last [`output::KEPT`] bytes of each) for callers to read later from an offset or
//! follow, whose stdin they can write, and which they can signal or remove. What E2B calls
//! background commands and Daytona session commands.
//!
//! Each is an exec like any other, started `attachable` and labelled [`LABEL_PREFIX`]`N`, read by a
//! pump task ([`process`]) that keeps its output. It is not a use of its sandbox for the idle
//! timeout (a server waiting for requests must not keep its sandbox awake forever): a sandbox whose
//! idle timeout pauses it pauses with its processes, and they go on after the wake. Unless it was
//! started `keep_awake` (a build the caller waits for): then, while it runs, it marks its sandbox
//! used every few seconds. A caller reading a process (its list, its output, following it) uses
//! the sandbox too, so one that polls a build's output keeps it awake. They survive what
//! the code interpreter survives, the same way (the agent parks an attachable exec whose host went,
//! and the node attaches to it again): a pause and resume (the snapshot names them in [`SAVED`]), a
//! fork (each child attaches to its own copies, and starts with the output its parent had kept
//! just before the fork: what the parent printed in the instant its state was saved is missing
//! there), and a daemon
//! restart, graceful or not, while the sandbox runs or is paused (the run directory or the
//! snapshot names them in [`SAVED`]; the output the old daemon kept comes back from their
//! [`journal`]s, in `$HEARTH_HOME/node/processes/SANDBOX/`, at the same offsets). One that is gone
//! when the node attaches again is reported `lost`, its exit status unknown; so are those still
//! running when their sandbox ends (stopped, failed or deleted), and readers following them stop.
//!
//! Bounds: [`MAX_PROCESSES`] per sandbox (ended ones are forgotten, oldest first, to make room;
//! running ones are not: a start past the bound answers [`NodeError::Limit`]), 1 MiB of output kept
//! each in memory and at most 2 MiB on disk while it runs (its journal goes when it ends, is
//! forgotten or its sandbox ends); the agent's own bound on execs per sandbox counts them too.

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};

use serde::{Deserialize, Serialize};

use super::exec::{Activity, Target};
use super::{lock_ignoring_poison, now_ms, ExecSpec, Node, NodeError};
use process::{Meta, Process};

pub use output::Stream;
pub use process::{OutputEvent, OutputReader};

mod journal;
mod output;
mod process;

/// Background processes kept per sandbox, running or ended.
pub const MAX_PROCESSES: usize = 16;
/// Longest tag.
pub const MAX_TAG: usize = 64;
/// The agent's label of a background process's exec, followed by its id.
const LABEL_PREFIX: &str = "hearth-process:";
/// The file (in a paused sandbox's snapshot, in a running one's run directory) that names its
/// background processes.
const SAVED: &str = "processes.json";

/// A background process as callers see it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// The node's id of the process in its sandbox, from 1 (kept across pauses, forks and
    /// daemon restarts).
    pub id: u32,
    /// Its PID in the guest (the init of the exec's PID namespace).
    pub pid: u32,
    pub argv: Vec<String>,
    pub tag: Option<String>,
    /// Unix ms.
    pub started_at: u64,
    pub running: bool,
    /// Counts as a use of its sandbox while it runs.
    pub keep_awake: bool,
    pub exit_code: Option<i32>,
    pub signal: Option<i32>,
    /// Its timeout killed it.
    pub timed_out: bool,
    /// Why it is lost (its exit status unknown), when it is.
    pub lost: Option<String>,
    /// Bytes of output produced, stdout and stderr together.
    pub output_bytes: u64,
    /// Of those, bytes no longer kept.
    pub output_dropped: u64,
}

/// Every sandbox's background processes, by sandbox id.
pub(super) struct Processes {
    tables: Mutex<HashMap<String, Arc<Table>>>,
    /// Where each sandbox's journal directory is (`$HEARTH_HOME/node/processes`).
    journals: PathBuf,
}

/// The output a sandbox's running processes have kept, by process id.
pub(super) struct KeptOutputs(HashMap<u32, output::Output>);

struct Table {
    /// The sandbox's record: the table goes once the node forgets the sandbox.
    record: Weak<Activity>,
    /// Where [`SAVED`] is kept while the sandbox runs.
    run_dir: PathBuf,
    /// Its processes' journals.
    journal: PathBuf,
    procs: Mutex<Procs>,
    /// Held by a start across its exec, so the bound holds.
    starting: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct Procs {
    list: Vec<Arc<Process>>,
    next: u32,
}

impl Processes {
    /// Keeping journals in `journals`.
    pub(super) fn new(journals: PathBuf) -> Processes {
        Processes {
            tables: Default::default(),
            journals,
        }
    }

    /// Sandbox `id`'s table, made if missing; drops the tables of sandboxes the node forgot.
    fn table(&self, id: &str, record: &Arc<Activity>, run_dir: PathBuf) -> Arc<Table> {
        let mut tables = lock_ignoring_poison(&self.tables);
        tables.retain(|_, t| t.record.strong_count() > 0);
        tables
            .entry(id.to_owned())
            .or_insert_with(|| {
                Arc::new(Table {
                    record: Arc::downgrade(record),
                    run_dir,
                    journal: self.journals.join(id),
                    procs: Mutex::new(Procs {
                        list: Vec::new(),
                        next: 1,
                    }),
                    starting: Default::default(),
                })
            })
            .clone()
    }

    fn existing(&self, id: &str) -> Option<Arc<Table>> {
        lock_ignoring_poison(&self.tables)
            .get(id)
            .filter(|t| t.record.strong_count() > 0)
            .cloned()
    }

    /// Daemon shutdown: every process is left to its agent, parked for the next daemon.
    pub(super) fn clear(&self) {
        let tables: Vec<_> = lock_ignoring_poison(&self.tables).drain().collect();
        for (_, table) in tables {
            for process in table.list() {
                process.stop(true);
            }
        }
    }

    /// Sandbox `id` ended (`why`): its processes not known to have ended are lost with it (they
    /// would otherwise be listed as running, and followed, for as long as its record stays), and
    /// their journals go (no daemon attaches to them again).
    pub(super) fn ended(&self, id: &str, why: &str) {
        let table = lock_ignoring_poison(&self.tables).get(id).cloned();
        if let Some(table) = table {
            for process in table.list() {
                process.lose(why);
            }
        }
        let _ = std::fs::remove_dir_all(self.journals.join(id));
    }

    /// Removes the journals of sandboxes `keep` refuses (left by sandboxes that ended while no
    /// daemon ran, or by a daemon killed as one ended).
    pub(super) fn remove_unowned(&self, keep: impl Fn(&str) -> bool) {
        let Ok(entries) = std::fs::read_dir(&self.journals) else {
            return;
        };
        for entry in entries.flatten() {
            if !keep(&entry.file_name().to_string_lossy()) {
                tracing::info!(path = %entry.path().display(), "removing journals no sandbox owns");
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }

    /// The output sandbox `id`'s running processes have kept, by process id: taken before a fork
    /// saves the sandbox, for [`Node::inherit_processes`].
    pub(super) fn outputs(&self, id: &str) -> KeptOutputs {
        let Some(table) = self.existing(id) else {
            return KeptOutputs(HashMap::new());
        };
        KeptOutputs(
            table
                .list()
                .into_iter()
                .filter(|p| p.running())
                .map(|p| (p.meta.id, p.output()))
                .collect(),
        )
    }

    /// The processes named in `dir`'s [`SAVED`] (none when it is missing or damaged).
    pub(super) fn saved(dir: &Path) -> Vec<Meta> {
        std::fs::read(dir.join(SAVED))
            .ok()
            .and_then(|json| serde_json::from_slice(&json).ok())
            .unwrap_or_default()
    }
}

impl Table {
    fn list(&self) -> Vec<Arc<Process>> {
        lock_ignoring_poison(&self.procs).list.clone()
    }

    fn get(&self, sandbox: &str, process: u32) -> Result<Arc<Process>, NodeError> {
        self.list()
            .into_iter()
            .find(|p| p.meta.id == process)
            .ok_or_else(|| no_process(sandbox, process))
    }

    /// Adds processes known from saved metas (a resume by a daemon that did not start them, a
    /// fork's child, a restarted daemon), unless their ids are taken.
    fn restore(&self, metas: Vec<Meta>) {
        let mut procs = lock_ignoring_poison(&self.procs);
        for meta in metas {
            if procs.list.iter().all(|p| p.meta.id != meta.id) {
                procs.next = procs.next.max(meta.id.saturating_add(1));
                procs.list.push(Process::restored(
                    meta,
                    self.record.clone(),
                    self.journal.clone(),
                ));
            }
        }
    }

    /// The metas of the processes still running.
    fn running(&self) -> Vec<Meta> {
        self.list()
            .iter()
            .filter(|p| p.running())
            .map(|p| p.meta.clone())
            .collect()
    }

    /// Names the running processes in `dir` (the run directory, or a snapshot).
    fn save(&self, dir: &Path) {
        let json = serde_json::to_vec(&self.running()).expect("serializes");
        let tmp = dir.join(format!("{SAVED}.tmp"));
        // Owner-only: command lines may carry what their tenant would not show others.
        let written = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .and_then(|mut file| file.write_all(&json))
            .and_then(|()| std::fs::rename(&tmp, dir.join(SAVED)));
        if let Err(e) = written {
            tracing::warn!(dir = %dir.display(), "naming the background processes: {e}");
        }
    }
}

impl Node {
    /// Starts `spec` in the sandbox as a background process, named `tag` if given, a use of the
    /// sandbox while it runs if `keep_awake`; answers once it runs.
    pub async fn start_process(
        &self,
        tenant: &str,
        id: &str,
        mut spec: ExecSpec,
        tag: Option<String>,
        keep_awake: bool,
    ) -> Result<ProcessInfo, NodeError> {
        if let Some(tag) = &tag {
            if tag.len() > MAX_TAG || tag.chars().any(char::is_control) {
                return Err(NodeError::Invalid(format!(
                    "tag: at most {MAX_TAG} bytes without control characters"
                )));
            }
        }
        if spec.tty.is_some() {
            return Err(NodeError::Invalid(
                "a background process has no terminal".into(),
            ));
        }
        let (_, table) = self.processes_of(tenant, id)?;
        let _starting = table.starting.lock().await;
        let number = {
            let mut procs = lock_ignoring_poison(&table.procs);
            if procs.list.len() >= MAX_PROCESSES {
                match procs.list.iter().position(|p| !p.running()) {
                    Some(ended) => procs.list.remove(ended).forget(),
                    None => {
                        return Err(NodeError::Limit(format!(
                            "sandbox {id} already runs {MAX_PROCESSES} background processes; \
                             remove one first"
                        )))
                    }
                }
            }
            procs.next
        };
        spec.attachable = true;
        spec.label = Some(format!("{LABEL_PREFIX}{number}"));
        let argv = spec.argv.clone();
        let stdin = spec.stdin;
        let handle = self.exec(tenant, id, spec).await?.into_idle_handle();
        let meta = Meta {
            id: number,
            exec: handle.id(),
            pid: handle.pid(),
            argv,
            tag,
            started_at: now_ms(),
            stdin,
            keep_awake,
        };
        let process = Process::started(meta, table.record.clone(), table.journal.clone());
        process.pump(handle);
        {
            let mut procs = lock_ignoring_poison(&table.procs);
            procs.next = number + 1;
            procs.list.push(process.clone());
        }
        table.save(&table.run_dir);
        tracing::info!(sandbox = %id, process = number, "background process started");
        Ok(process.info())
    }

    /// The sandbox's background processes, oldest first. Answered from the node's memory, so a
    /// paused sandbox is not woken; a running one counts as used.
    pub fn processes(&self, tenant: &str, id: &str) -> Result<Vec<ProcessInfo>, NodeError> {
        self.table().visible(tenant, id)?.activity.touch();
        Ok(self
            .processes
            .existing(id)
            .map(|t| t.list().iter().map(|p| p.info()).collect())
            .unwrap_or_default())
    }

    /// One background process (see [`Node::processes`]).
    pub fn process(&self, tenant: &str, id: &str, process: u32) -> Result<ProcessInfo, NodeError> {
        Ok(self.known_process(tenant, id, process)?.info())
    }

    /// A reader of a background process's output from `offset` (see [`OutputReader`]); with
    /// `follow`, it waits for more until the process ends.
    pub fn process_output(
        &self,
        tenant: &str,
        id: &str,
        process: u32,
        offset: u64,
        follow: bool,
    ) -> Result<OutputReader, NodeError> {
        Ok(self
            .known_process(tenant, id, process)?
            .reader(offset, follow))
    }

    /// Writes `data` to a background process's stdin, then closes it if `close`.
    pub async fn write_process_stdin(
        &self,
        tenant: &str,
        id: &str,
        process: u32,
        data: &[u8],
        close: bool,
    ) -> Result<(), NodeError> {
        let (_, table) = self.processes_of(tenant, id)?;
        let process = table.get(id, process)?;
        let Some(stdin) = process.stdin() else {
            return Err(NodeError::NotRunning {
                id: id.to_owned(),
                state: super::State::Running,
                detail: Some(format!(
                    ", but its process {} {}",
                    process.meta.id,
                    match (process.meta.stdin, process.running()) {
                        (false, _) => "was started without `open_stdin`",
                        (true, true) => "is not attached (its sandbox is coming back)",
                        (true, false) => "has ended",
                    }
                )),
            });
        };
        let mut stdin = stdin.lock().await;
        let Some(writer) = stdin.as_mut() else {
            return Err(NodeError::NotRunning {
                id: id.to_owned(),
                state: super::State::Running,
                detail: Some(format!(
                    ", but its process {} has closed its stdin",
                    process.meta.id
                )),
            });
        };
        if !data.is_empty() {
            writer.write(data).await?;
        }
        if close {
            stdin.take().expect("checked above").close().await?;
        }
        Ok(())
    }

    /// Sends `signal` to a running background process.
    pub async fn signal_process(
        &self,
        tenant: &str,
        id: &str,
        process: u32,
        signal: i32,
    ) -> Result<(), NodeError> {
        if !(1..=64).contains(&signal) {
            return Err(NodeError::Invalid(format!(
                "signal {signal}: give a signal number from 1 to 64"
            )));
        }
        let (target, table) = self.processes_of(tenant, id)?;
        let process = table.get(id, process)?;
        if process.running() {
            target
                .sandbox
                .client()
                .signal(process.meta.exec, signal)
                .await?;
        }
        Ok(())
    }

    /// Kills a background process if it runs and forgets it.
    pub async fn remove_process(
        &self,
        tenant: &str,
        id: &str,
        process: u32,
    ) -> Result<(), NodeError> {
        let (target, table) = self.processes_of(tenant, id)?;
        let process = table.get(id, process)?;
        if process.running() {
            // Killed by the agent; an exec that ended meanwhile is no error.
            let _ = target
                .sandbox
                .client()
                .signal(process.meta.exec, libc::SIGKILL)
                .await;
        }
        process.stop(false);
        process.forget();
        lock_ignoring_poison(&table.procs)
            .list
            .retain(|p| !Arc::ptr_eq(p, &process));
        table.save(&table.run_dir);
        Ok(())
    }

    /// After a pause saved sandbox `id` into `snapshot`: names its running processes there (they
    /// wait, parked, in the saved guest). Their pumps end as the old VM's channel closes.
    pub(super) fn park_processes(&self, id: &str, snapshot: &Path) {
        if let Some(table) = self.processes.existing(id) {
            table.save(snapshot);
        }
    }

    /// After sandbox `id`'s VM was restored (resumed, or re-attached by a restarted daemon) with
    /// the processes in `saved` (read from its snapshot or run directory; those this node already
    /// knows are kept as they are): attaches to them again, in the background.
    pub(super) fn reattach_processes(&self, tenant: &str, id: &str, saved: Vec<Meta>) {
        let Ok(target) = self.target(tenant, id) else {
            return;
        };
        if saved.is_empty() && self.processes.existing(id).is_none() {
            return;
        }
        let table = self.processes.table(id, &target.activity, self.run_dir(id));
        table.restore(saved);
        let sandbox = target.sandbox.clone();
        tokio::spawn(async move {
            for process in table.list() {
                process.attach(&sandbox).await;
            }
            table.save(&table.run_dir);
        });
    }

    /// After fork children of `parent` started: each attaches to its own copy of the parent's
    /// running processes, starting with the `outputs` the parent had kept before the fork
    /// ([`Processes::outputs`]), written as the child's journals first (off the async workers:
    /// up to 2 MiB a process and child).
    pub(super) async fn inherit_processes(
        &self,
        tenant: &str,
        parent: &str,
        children: &[String],
        outputs: KeptOutputs,
    ) {
        let Some(table) = self.processes.existing(parent) else {
            return;
        };
        let running = table.running();
        if running.is_empty() {
            return;
        }
        let dirs: Vec<PathBuf> = children
            .iter()
            .map(|child| self.processes.journals.join(child))
            .collect();
        let ids: Vec<u32> = running.iter().map(|meta| meta.id).collect();
        let written = tokio::task::spawn_blocking(move || {
            for dir in dirs {
                for id in &ids {
                    if let Some(output) = outputs.0.get(id) {
                        journal::write(&dir, *id, output);
                    }
                }
            }
        });
        if let Err(e) = written.await {
            tracing::warn!(sandbox = %parent, "writing the fork children's journals: {e}");
        }
        for child in children {
            self.reattach_processes(tenant, child, running.clone());
        }
    }

    /// The tenant's running sandbox `id` and its table, from one look at the node's table.
    fn processes_of(&self, tenant: &str, id: &str) -> Result<(Target, Arc<Table>), NodeError> {
        let target = self.target(tenant, id)?;
        let table = self.processes.table(id, &target.activity, self.run_dir(id));
        Ok((target, table))
    }

    /// A process of the tenant's sandbox `id`, in any state; the sandbox counts as used (a paused
    /// one does not wake, and its paused time is not idle time anyway).
    fn known_process(
        &self,
        tenant: &str,
        id: &str,
        process: u32,
    ) -> Result<Arc<Process>, NodeError> {
        self.table().visible(tenant, id)?.activity.touch();
        self.processes
            .existing(id)
            .ok_or_else(|| no_process(id, process))?
            .get(id, process)
    }
}

fn no_process(sandbox: &str, process: u32) -> NodeError {
    NodeError::NoProcess {
        id: sandbox.to_owned(),
        process,
    }
}
