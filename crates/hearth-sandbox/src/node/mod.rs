//! The node manager: many long-lived sandboxes on one host, as `hearth serve` and the Kubernetes node
//! agent run them. [`Node::open`] takes the home's state lock, recovers what a previous daemon left
//! and starts the reaper; [`Node::create`] admits and boots; [`Node::exec`] and the file calls use a
//! running sandbox; [`Node::pause`] saves one to disk (no VM left) and [`Node::resume`] brings it
//! back; [`Node::fork`] makes new sandboxes from a running one's state; [`Node::delete`] and the reaper end them; [`Node::shutdown`] lets go of the VMs
//! so that the next `open` re-attaches them.
//!
//! [`Node::run_once`] is the one-shot run (create, boot, one command, delete) behind `POST /v1/runs`
//! and the Kubernetes node agent.
//!
//! Files: `types.rs` (public vocabulary), `error.rs`, `table.rs` (the sandboxes in memory, their
//! lookup and usage, and the lock that also guards the store), `record.rs` (what is remembered per
//! sandbox, and its state transitions), `store.rs` (SQLite state), `admission.rs` (sizes, maxima,
//! quota, capacity), `lifecycle.rs` (create, boot, stop, delete, shutdown), `recovery.rs` (what
//! `open` does with what a previous daemon left), `reaper.rs` (TTL, idle, dead VMs), `watchdog.rs` (hung guests), `exec.rs`
//! (commands and files), `interpreter.rs` (a Python interpreter kept per sandbox for code runs),
//! `network.rs` (a sandbox's egress policy: default, tenant ceiling, live changes), `ports.rs` (a
//! guest port through the agent channel), `pause.rs` (pause to disk and resume),
//! `fork.rs` (copies of a running sandbox), `idle.rs` (idle sandboxes paused and woken on use),
//! `run_once.rs` (one command in a fresh sandbox).
//!
//! Writes only under `$HEARTH_HOME/state/` (database, lock), `$HEARTH_HOME/sandboxes/<id>/` (each
//! VM's run directory: sockets, scratch disk, console log) and `$HEARTH_HOME/node/net/<id>/` (each
//! sandbox's network namespace) and `$HEARTH_HOME/node/paused/<id>/` (a paused sandbox's
//! snapshot) and `$HEARTH_HOME/node/forks/` (a fork's snapshot while its children start), plus the image cache through `hearth-image`. VMs are detached: they survive the
//! daemon, and only `open` decides their fate.

mod admission;
mod boot_slots;
mod error;
mod exec;
mod fork;
mod idle;
mod interpreter;
mod lifecycle;
mod local_images;
mod network;
mod pause;
mod pool;
mod ports;
mod processes;
mod reaper;
mod record;
mod recovery;
mod run_once;
mod store;
mod table;
mod types;
mod watchdog;

use std::collections::BTreeMap;
use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use tokio::sync::watch;

pub use error::NodeError;
pub use exec::NodeExec;
pub use fork::MAX_FORK;
pub use idle::IDLE as IDLE_REASON;
pub use interpreter::{CodeError, CodeOutcome, MAX_CODE_TIMEOUT};
pub use network::{NetworkView, SandboxNetworkStats};
pub use pool::WarmPool;
pub use ports::NodePort;
pub use processes::{OutputEvent, OutputReader, ProcessInfo, Stream, MAX_PROCESSES, MAX_TAG};
pub use run_once::{RunError, RunOutcome, RunSpec};
pub use types::{
    default_network_ceiling, Capacity, CreateSpec, ExecSpec, Histogram, Limits, NodeConfig,
    NodeMetrics, OnIdle, Quota, SandboxInfo, State, StateCounts, Tenant,
};

use boot_slots::BootSlots;
use store::Store;
use table::{SandboxTable, Table};
use types::now_ms;

/// Upper bounds (seconds) of the boot-latency histogram: TCG boots take 3-5 s, queued ones longer.
const BOOT_BUCKETS: &[f64] = &[0.5, 1.0, 2.0, 3.0, 5.0, 8.0, 13.0, 20.0, 30.0, 60.0, 120.0];

/// A node's sandboxes. Share it as `Arc<Node>`.
pub struct Node {
    /// For background tasks started from `&self` methods.
    me: Weak<Node>,
    config: NodeConfig,
    /// Every sandbox, and the store their records are saved to (see `table.rs`).
    sandboxes: SandboxTable,
    /// Boot slots, shared round-robin between tenants.
    boots: BootSlots,
    images: hearth_image::ImageStore,
    shutting_down: AtomicBool,
    /// Bumped on every state change; `wait_ready` watches it.
    changed: watch::Sender<u64>,
    counters: Mutex<Counters>,
    reaper: Mutex<Option<tokio::task::JoinHandle<()>>>,
    /// Each sandbox's code interpreter (see `interpreter.rs`).
    interpreters: interpreter::Interpreters,
    processes: processes::Processes,
    /// The flock on `state/node.lock`, held for the node's life.
    _lock: File,
}

#[derive(Default)]
struct Counters {
    boots_total: u64,
    boot_failures_total: u64,
    boot_seconds: Option<Histogram>,
    execs_total: u64,
    idle_pauses_total: u64,
    wakes_total: u64,
}

impl Node {
    /// Opens (creates) `$HOME/state/node.db`, takes `$HOME/state/node.lock` (a second daemon on the
    /// same home gets [`NodeError::Busy`]), recovers what a previous daemon left (see `recovery.rs`)
    /// and starts the TTL and idle reaper.
    pub async fn open(config: NodeConfig) -> Result<Arc<Node>, NodeError> {
        let state_dir = config.home.join("state");
        make_private_dir(&state_dir)?;
        make_private_dir(&config.home.join("sandboxes"))?;
        let lock = take_lock(&state_dir.join("node.lock"))?;
        let store = Store::open(&state_dir.join("node.db"))?;
        let records = store.load_all()?;
        let images = hearth_image::ImageStore::open(&config.home)?;
        let boots = BootSlots::new(config.max_concurrent_boots);
        let home = config.home.clone();
        let node = Arc::new_cyclic(|me| Node {
            me: me.clone(),
            config,
            sandboxes: SandboxTable::new(store),
            boots,
            images,
            shutting_down: AtomicBool::new(false),
            changed: watch::channel(0).0,
            counters: Mutex::new(Counters::default()),
            reaper: Mutex::new(None),
            interpreters: Default::default(),
            processes: processes::Processes::new(home.join("node").join("processes")),
            _lock: lock,
        });
        node.check_pools()?;
        node.recover(records).await?;
        *lock_ignoring_poison(&node.reaper) = Some(reaper::spawn(Arc::downgrade(&node)));
        // Ends with the node (it holds it weakly) or at shutdown.
        drop(watchdog::spawn(Arc::downgrade(&node)));
        Ok(node)
    }

    pub fn config(&self) -> &NodeConfig {
        &self.config
    }

    /// Waits until the sandbox leaves `Creating` or `timeout` passes, and returns its record (still
    /// `Creating` after a timeout).
    pub async fn wait_ready(
        &self,
        tenant: &str,
        id: &str,
        timeout: Duration,
    ) -> Result<SandboxInfo, NodeError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let mut changes = self.changed.subscribe();
        loop {
            let info = self.get(tenant, id)?;
            if info.state != State::Creating {
                return Ok(info);
            }
            if tokio::time::timeout_at(deadline, changes.changed())
                .await
                .is_err()
            {
                return Ok(info);
            }
        }
    }

    /// The sandbox's record; [`NodeError::NotFound`] also for another tenant's id.
    pub fn get(&self, tenant: &str, id: &str) -> Result<SandboxInfo, NodeError> {
        self.table().visible(tenant, id).map(|e| e.info())
    }

    /// The tenant's sandboxes, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<SandboxInfo> {
        self.table().list(tenant)
    }

    /// Counts and counters for `/metrics`.
    pub fn metrics(&self) -> NodeMetrics {
        let (sandboxes, held, warm_ready) = {
            let table = self.table();
            (table.counts(), table.held(), pool::ready(&table))
        };
        let counters = lock_ignoring_poison(&self.counters);
        NodeMetrics {
            sandboxes,
            boots_total: counters.boots_total,
            boot_failures_total: counters.boot_failures_total,
            boot_seconds: counters
                .boot_seconds
                .clone()
                .unwrap_or_else(|| Histogram::with_bounds(BOOT_BUCKETS)),
            execs_total: counters.execs_total,
            idle_pauses_total: counters.idle_pauses_total,
            wakes_total: counters.wakes_total,
            image_cache_bytes: self.image_cache_bytes(),
            allocated_vcpus: held.vcpus as u32,
            allocated_memory_mib: held.memory_mib,
            template_memory_bytes: hearth_vm::qemu::template_copies_bytes(),
            capacity: self.config.capacity,
            warm_ready,
        }
    }

    /// Blobs and root filesystems of the cached images, each image counted once.
    fn image_cache_bytes(&self) -> u64 {
        let mut by_manifest = BTreeMap::new();
        for image in self.images.list().unwrap_or_default() {
            by_manifest.insert(image.manifest_digest.to_string(), image.size());
        }
        by_manifest.values().sum()
    }

    /// The sandbox table, locked; the store is reached only through it.
    fn table(&self) -> MutexGuard<'_, Table> {
        self.sandboxes.lock()
    }

    fn bump(&self) {
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.config.home.join("sandboxes").join(id)
    }

    /// The directory whose `net/` holds the node's sandbox networks (apart from `hearth run`'s).
    fn net_home(&self) -> PathBuf {
        self.config.home.join("node")
    }

    fn check_open(&self) -> Result<(), NodeError> {
        if self.shutting_down.load(Ordering::SeqCst) {
            return Err(NodeError::ShuttingDown);
        }
        Ok(())
    }
}

fn lock_ignoring_poison<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|e| e.into_inner())
}

fn make_private_dir(dir: &Path) -> Result<(), NodeError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| NodeError::Io {
            what: format!("creating {}", dir.display()),
            source,
        })
}

/// An exclusive, non-blocking flock on `path`, with our pid written in for the next one's message.
fn take_lock(path: &Path) -> Result<File, NodeError> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    let io = |what: &str, source| NodeError::Io {
        what: format!("{what} {}", path.display()),
        source,
    };
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(path)
        .map_err(|e| io("opening", e))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
            let holder = std::fs::read_to_string(path).unwrap_or_default();
            return Err(NodeError::Busy(format!(
                "another hearth daemon (pid {}) manages this HEARTH_HOME ({}); stop it or use \
                 another home",
                holder.trim(),
                path.display()
            )));
        }
        return Err(io("locking", err));
    }
    file.set_len(0).map_err(|e| io("truncating", e))?;
    writeln!(file, "{}", std::process::id()).map_err(|e| io("writing", e))?;
    Ok(file)
}
