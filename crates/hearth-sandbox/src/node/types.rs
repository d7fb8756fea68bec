//! The node manager's public vocabulary: its configuration ([`NodeConfig`], [`Capacity`], [`Limits`]),
//! tenants and their [`Quota`], what a caller asks for ([`CreateSpec`], [`ExecSpec`]) and what it gets
//! back ([`SandboxInfo`], [`State`], [`NodeMetrics`]). Pure data; no I/O except reading host facts in
//! [`Capacity::from_host`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::SandboxConfig;

/// What a node runs with.
#[derive(Clone)]
pub struct NodeConfig {
    /// `HEARTH_HOME`: the node keeps its state in `state/` and its VMs' run directories in
    /// `sandboxes/`, next to the image cache.
    pub home: PathBuf,
    /// What this node may hand out in total, counted over creating and running sandboxes.
    pub capacity: Capacity,
    /// Boots that run at once; further sandboxes wait in `Creating`.
    pub max_concurrent_boots: usize,
    /// VMM, accelerator, kernel, agent, and the default vCPUs, memory and disk of a sandbox.
    pub defaults: SandboxConfig,
    /// Per-sandbox maxima.
    pub limits: Limits,
    /// Insecure registries and credentials for pulls.
    pub pull: hearth_image::PullOptions,
    /// Directories whose OCI layouts and archives (`oci-layout:PATH`, `oci-archive:FILE`) callers
    /// may boot, canonical (`hearth serve` canonicalizes them at start). Empty (the default):
    /// registry references only, so a caller cannot make the node read a host path.
    pub allow_local_images: Vec<PathBuf>,
    /// The egress policy of a sandbox created without one (`--network-default`); default `none`.
    /// Applies when `defaults.network` gives sandboxes a network.
    pub network_default: hearth_net::policy::NetworkPolicy,
    /// A running sandbox whose agent has not answered for this long is failed and its VM killed
    /// (`watchdog.rs`); default 60 s.
    pub unresponsive_after: Duration,
    /// A sandbox paused for longer than this is deleted with its snapshot (`reaper.rs`);
    /// default 7 days (`--max-paused`).
    pub max_paused: Duration,
    /// Sandboxes kept booted ahead of demand for creates that match (`pool.rs`); default none.
    pub warm_pools: Vec<super::pool::WarmPool>,
}

impl NodeConfig {
    /// A node on `home` with the host's CPUs, memory and free disk as capacity, two concurrent boots, default
    /// sandbox settings and limits, and pull options from the environment's defaults.
    pub fn new(home: impl Into<PathBuf>) -> NodeConfig {
        let home = home.into();
        NodeConfig {
            defaults: SandboxConfig::new(&home),
            capacity: Capacity::from_host(&home),
            home,
            max_concurrent_boots: 2,
            limits: Limits::default(),
            pull: hearth_image::PullOptions::default(),
            allow_local_images: Vec::new(),
            network_default: hearth_net::policy::NetworkPolicy::none(),
            unresponsive_after: Duration::from_secs(60),
            max_paused: Duration::from_secs(7 * 24 * 3600),
            warm_pools: Vec::new(),
        }
    }
}

/// Resources a node hands out.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capacity {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Writable disk handed out, counted at each sandbox's full (sparse) size so a node never
    /// promises more than its filesystem holds. Absent in an older peer's record: unlimited.
    #[serde(default = "unlimited")]
    pub disk_bytes: u64,
}

fn unlimited() -> u64 {
    u64::MAX
}

impl Capacity {
    /// The host's online CPUs and total memory (no overcommit), and the space free now on the
    /// filesystem holding `home` (where scratch disks live).
    pub fn from_host(home: &std::path::Path) -> Capacity {
        let vcpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|text| {
                text.lines()
                    .find_map(|l| l.strip_prefix("MemTotal:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
            })
            .map_or(1024, |kib| kib / 1024);
        Capacity {
            vcpus,
            memory_mib,
            disk_bytes: free_disk_bytes(home).unwrap_or(u64::MAX),
        }
    }
}

/// Bytes available to an unprivileged writer on the filesystem of `path` (or of its nearest
/// existing ancestor).
pub(crate) fn free_disk_bytes(path: &std::path::Path) -> Option<u64> {
    use std::os::unix::ffi::OsStrExt;
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_bytes()).ok()?;
    // SAFETY: statvfs writes one struct statvfs into `stat` and reads the NUL-terminated path.
    let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c_path.as_ptr(), &mut stat) } != 0 {
        return None;
    }
    Some((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
}

/// Per-sandbox maxima; a request above one is refused as invalid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_vcpus: u32,
    pub max_memory_mib: u32,
    pub max_disk_bytes: u64,
    /// Also the lifetime of a sandbox created without a TTL: every sandbox ends on time.
    pub max_ttl: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_vcpus: 8,
            max_memory_mib: 16 * 1024,
            max_disk_bytes: 64 << 30,
            max_ttl: Duration::from_secs(24 * 3600),
        }
    }
}

/// What one tenant may hold at once (creating and running sandboxes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quota {
    pub max_sandboxes: u32,
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Writable disk over the tenant's sandboxes, at their full sizes.
    #[serde(default = "unlimited")]
    pub disk_bytes: u64,
}

impl Quota {
    /// No limit: the node's capacity is the only bound (pool VMs, the Kubernetes tenant).
    pub fn unlimited() -> Quota {
        Quota {
            max_sandboxes: u32::MAX,
            vcpus: u32::MAX,
            memory_mib: u64::MAX,
            disk_bytes: u64::MAX,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant {
    pub name: String,
    pub quota: Quota,
    /// The widest egress policy this tenant's sandboxes may have (`hearth_net::ceiling`).
    pub network_ceiling: hearth_net::policy::NetworkPolicy,
}

/// The network ceiling of a tenant the operator set none for: `open`, which still keeps the
/// private ranges closed (see `hearth_net::ceiling`).
pub fn default_network_ceiling() -> hearth_net::policy::NetworkPolicy {
    hearth_net::policy::NetworkPolicy {
        mode: hearth_net::policy::Mode::Open,
        ..Default::default()
    }
}

/// A sandbox to create. Unset sizes come from [`NodeConfig::defaults`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CreateSpec {
    pub image: String,
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u32>,
    pub disk_bytes: Option<u64>,
    /// Hard lifetime from creation; `None` = [`Limits::max_ttl`].
    pub ttl: Option<Duration>,
    /// Stopped (or paused, see `on_idle`) after this long with no exec running and no exec or
    /// file request.
    pub idle_timeout: Option<Duration>,
    /// What the idle timeout does.
    pub on_idle: OnIdle,
    /// Defaults for every exec: image Env < these < the exec's own.
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// Opaque to the node.
    pub labels: BTreeMap<String, String>,
    /// The egress policy; `None` = [`NodeConfig::network_default`]. Must be within the tenant's
    /// ceiling.
    pub network: Option<hearth_net::policy::NetworkPolicy>,
}

/// What the idle timeout does to a running sandbox.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OnIdle {
    /// Ends it: `Stopped` with reason "idle", its VM and disk gone.
    #[default]
    Stop,
    /// Pauses it (`Paused` with reason "idle": saved to disk, its vCPUs and memory given back);
    /// its next use (exec, file, code, port) resumes it first ([`super::Node::wake`]).
    Pause,
}

impl OnIdle {
    pub fn as_str(self) -> &'static str {
        match self {
            OnIdle::Stop => "stop",
            OnIdle::Pause => "pause",
        }
    }

    pub fn parse(text: &str) -> Option<OnIdle> {
        match text {
            "stop" => Some(OnIdle::Stop),
            "pause" => Some(OnIdle::Pause),
            _ => None,
        }
    }
}

/// A sandbox's life: `Creating -> Running -> Stopped | Failed`; `Creating -> Failed | Stopped`;
/// `Running <-> Paused` ([`super::Node::pause`], [`super::Node::resume`]); `Paused -> Stopped`
/// (deleted, TTL expired).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Creating,
    Running,
    Stopped,
    Failed,
    /// Saved to disk with no VMM running: holds its disk, not its vCPUs and memory.
    Paused,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Creating => "creating",
            State::Running => "running",
            State::Stopped => "stopped",
            State::Failed => "failed",
            State::Paused => "paused",
        }
    }

    pub fn parse(s: &str) -> Option<State> {
        [
            State::Creating,
            State::Running,
            State::Stopped,
            State::Failed,
            State::Paused,
        ]
        .into_iter()
        .find(|state| state.as_str() == s)
    }

    /// Whether the sandbox has not ended: it holds (or is about to hold) node resources, all of
    /// them while creating or running, its disk while paused.
    pub fn is_live(self) -> bool {
        matches!(self, State::Creating | State::Running | State::Paused)
    }
}

impl std::fmt::Display for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A sandbox as callers see it. Times are Unix milliseconds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxInfo {
    pub id: String,
    pub tenant: String,
    pub image: String,
    /// The manifest digest, once the image is pulled.
    pub image_digest: Option<String>,
    pub state: State,
    /// Why the sandbox is stopped or failed: "ttl expired", "idle", "VM exited: ..."; or, paused,
    /// "idle" when its idle timeout paused it ([`OnIdle::Pause`]).
    pub reason: Option<String>,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub disk_bytes: u64,
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    pub ready_at: Option<u64>,
    pub finished_at: Option<u64>,
    pub expires_at: Option<u64>,
    pub last_active_at: u64,
    /// Creation to agent ready, including the image pull and the wait for a boot slot.
    pub boot_ms: Option<u64>,
    /// The egress policy in force; `None` when the node gives sandboxes no network.
    #[serde(default)]
    pub network: Option<hearth_net::policy::NetworkPolicy>,
    /// Taken from a warm pool, booted before it was asked for (`pool.rs`).
    #[serde(default)]
    pub warm: bool,
    /// What its idle timeout does.
    #[serde(default)]
    pub on_idle: OnIdle,
    /// Ended (`state` and `reason` say how) while its VM is still being stopped: it holds its
    /// resources until that is done. Set only in what callers are shown, never recorded.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub stopping: bool,
}

/// A command to run in a sandbox, before the image config and the sandbox's defaults are applied.
/// `argv` runs as given (`docker exec`): the image's Entrypoint and Cmd do not apply.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExecSpec {
    pub argv: Vec<String>,
    pub env: Vec<(String, String)>,
    pub workdir: Option<String>,
    pub user: Option<String>,
    /// Kills the command's process tree after this long.
    pub timeout: Option<Duration>,
    /// Whether the caller will feed stdin ([`super::NodeExec::take_stdin`]); otherwise /dev/null.
    pub stdin: bool,
    /// Run on a pseudo-terminal of this size (stdout and stderr then arrive as one stdout stream;
    /// [`super::NodeExec::resize`] changes the size).
    pub tty: Option<hearth_vm::channel::TtySize>,
    /// Kept waiting for the node when the VM is saved and restored (paused and resumed, forked),
    /// for [`hearth_vm::channel::AgentClient::attach`]; otherwise it runs on detached.
    pub attachable: bool,
    /// The exec's name in the agent's exec list (at most 64 bytes).
    pub label: Option<String>,
}

/// Sandboxes per state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct StateCounts {
    pub creating: u64,
    pub running: u64,
    pub paused: u64,
    pub stopped: u64,
    pub failed: u64,
}

impl StateCounts {
    pub fn get(&self, state: State) -> u64 {
        match state {
            State::Creating => self.creating,
            State::Running => self.running,
            State::Stopped => self.stopped,
            State::Failed => self.failed,
            State::Paused => self.paused,
        }
    }

    pub(crate) fn add(&mut self, state: State) {
        match state {
            State::Creating => self.creating += 1,
            State::Running => self.running += 1,
            State::Stopped => self.stopped += 1,
            State::Failed => self.failed += 1,
            State::Paused => self.paused += 1,
        }
    }
}

/// A Prometheus-style histogram: cumulative bucket counts by upper bound, sum and count.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Histogram {
    /// `(upper bound, observations <= bound)`, ascending; `+Inf` is `count`.
    pub buckets: Vec<(f64, u64)>,
    pub sum: f64,
    pub count: u64,
}

impl Histogram {
    pub(crate) fn with_bounds(bounds: &[f64]) -> Histogram {
        Histogram {
            buckets: bounds.iter().map(|&b| (b, 0)).collect(),
            sum: 0.0,
            count: 0,
        }
    }

    pub(crate) fn observe(&mut self, value: f64) {
        for (bound, count) in &mut self.buckets {
            if value <= *bound {
                *count += 1;
            }
        }
        self.sum += value;
        self.count += 1;
    }
}

/// A snapshot of the node's counters for `/metrics`.
#[derive(Debug, Clone, Serialize)]
pub struct NodeMetrics {
    pub sandboxes: StateCounts,
    pub boots_total: u64,
    pub boot_failures_total: u64,
    /// Creation to agent ready, seconds.
    pub boot_seconds: Histogram,
    pub execs_total: u64,
    /// Sandboxes their idle timeout paused (`on_idle: pause`), and those a use resumed.
    pub idle_pauses_total: u64,
    pub wakes_total: u64,
    /// Blobs and root filesystems in the image cache.
    pub image_cache_bytes: u64,
    /// Held by creating and running sandboxes.
    pub allocated_vcpus: u32,
    pub allocated_memory_mib: u64,
    /// Sealed copies of boot templates' memory the node keeps (counted against its capacity).
    pub template_memory_bytes: u64,
    pub capacity: Capacity,
    /// Warm pool VMs booted and ready to be claimed (`pool.rs`).
    pub warm_ready: u64,
}

/// Now, in Unix milliseconds.
pub(crate) fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_and_serialize_lowercase() {
        for state in [
            State::Creating,
            State::Running,
            State::Stopped,
            State::Failed,
            State::Paused,
        ] {
            assert_eq!(State::parse(state.as_str()), Some(state));
            assert_eq!(
                serde_json::to_string(&state).unwrap(),
                format!("\"{}\"", state.as_str())
            );
        }
        assert_eq!(State::parse("Running"), None);
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let mut h = Histogram::with_bounds(&[1.0, 5.0]);
        for v in [0.5, 3.0, 7.0] {
            h.observe(v);
        }
        assert_eq!(h.buckets, [(1.0, 1), (5.0, 2)]);
        assert_eq!((h.count, h.sum), (3, 10.5));
    }

    #[test]
    fn host_capacity_is_nonzero() {
        let c = Capacity::from_host(std::path::Path::new("/nonexistent/home"));
        assert!(c.vcpus >= 1 && c.memory_mib >= 64, "{c:?}");
        assert!(c.disk_bytes > 0 && c.disk_bytes < u64::MAX, "{c:?}");
    }
}
