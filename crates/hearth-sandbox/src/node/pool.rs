//! Warm pools (`hearth serve --warm-pool IMAGE=N[,cpus=C,memory=M]`): sandboxes booted ahead of
//! demand, handed out by [`Node::create`] so that a create answers without a boot.
//!
//! A pool VM is an ordinary table entry that no tenant can see: its record belongs to the tenant
//! named "" (tenant names are never empty) and is marked deleted, so `get`, `list`, the state
//! counts in `/metrics` and every tenant's quota leave it out, while the node's capacity counts it
//! like any VM (creates see the node that much fuller). It boots through the same boot task as a
//! create (boot slots, pull, template restore) and expires never; a pool VM that dies is
//! forgotten and replaced, one that fails to boot after 30 s (its pool waits meanwhile). The reaper refills every pool at each tick ([`Node::refill_pools`]),
//! as far as the node's capacity allows.
//!
//! A create takes a pool VM ([`Node::claim_warm`]) when the pool's image is the one asked for, the
//! size (vCPUs, memory, the default disk) is the one the create comes to, and the create gives no
//! env, workdir, user or network policy: those are fixed when a VM boots (the network policy the
//! node's default, which a tenant ceiling may narrow: then the create boots cold). TTL, idle
//! timeout and labels are the record's and apply to a claimed VM as to any. The claim happens
//! under the table lock, with admission, in one critical section: one pool VM is never handed to
//! two creates, and a refused create (quota, capacity) leaves the VM in the pool. A claimed
//! sandbox keeps the pool VM's id (its hostname and network namespace were made for that id) and
//! says `warm: true`.
//!
//! Pool VMs do not outlive their daemon: a restart finds their run directories owned by no record
//! and removes them (`recovery.rs`), and the new daemon boots its pools afresh.

use super::admission::{self, Resources, Usage};
use super::record::Record;
use super::table::{Entry, Table};
use super::{now_ms, CreateSpec, Node, NodeError, Quota, SandboxInfo, State, Tenant};
use crate::boot::new_id;

/// The tenant pool VMs belong to until claimed: no tenant has this name.
const POOL_TENANT: &str = "";
/// How long a pool whose VM failed to boot waits before it boots another.
const RETRY_AFTER_MS: u64 = 30_000;

/// Sandboxes of one image and size kept booted and ready.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WarmPool {
    /// An image reference, as creates name it.
    pub image: String,
    /// How many to keep ready (booting ones count).
    pub size: usize,
    /// `None`: the node's default.
    pub vcpus: Option<u32>,
    /// `None`: the node's default.
    pub memory_mib: Option<u32>,
}

impl WarmPool {
    fn spec(&self) -> CreateSpec {
        CreateSpec {
            image: self.image.clone(),
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            ..CreateSpec::default()
        }
    }
}

/// Whether `entry` is a pool VM (booting, ready, or failed).
fn is_pool_vm(entry: &Entry) -> bool {
    entry.record.info.tenant == POOL_TENANT && entry.record.deleted
}

/// Whether pool VM `entry` is of `pool`'s image and of size `want`.
fn of_pool(entry: &Entry, pool: &WarmPool, want: &Resources) -> bool {
    let info = &entry.record.info;
    info.image == pool.image
        && (info.vcpus, info.memory_mib, info.disk_bytes)
            == (want.vcpus, want.memory_mib, want.disk_bytes)
}

/// Pool VMs booted and ready to be claimed, over all pools (`/metrics`).
pub(super) fn ready(table: &Table) -> u64 {
    table
        .entries()
        .filter(|e| is_pool_vm(e) && e.record.info.state == State::Running && e.live.is_some())
        .count() as u64
}

fn same_image(a: &str, b: &str) -> bool {
    let parse = |s: &str| hearth_image::Reference::parse(s.trim()).map(|r| r.to_string());
    match (parse(a), parse(b)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

impl Node {
    /// Validates the configured pools (an image reference and a size this node allows): a bad
    /// one is an error at start, not a pool that silently never fills.
    pub(super) fn check_pools(&self) -> Result<(), NodeError> {
        for pool in &self.config.warm_pools {
            admission::size(&pool.spec(), &self.config.defaults, &self.config.limits)
                .map_err(|e| NodeError::Invalid(format!("warm pool {}: {e}", pool.image)))?;
        }
        Ok(())
    }

    /// Boots pool VMs until every pool has its size (booting and ready ones), as far as the
    /// node's capacity allows, and forgets pool VMs that failed or died. Called by the reaper.
    pub(super) fn refill_pools(&self) {
        if self.config.warm_pools.is_empty() || self.check_open().is_err() {
            return;
        }
        let Some(node) = self.me.upgrade() else {
            return;
        };
        let network = self
            .config
            .defaults
            .network
            .as_ref()
            .map(|_| self.config.network_default.clone());
        let unlimited = Quota::unlimited();
        let mut started = 0;
        {
            let mut table = self.table();
            let now = now_ms();
            let dead: Vec<String> = table
                .entries()
                .filter(|e| is_pool_vm(e) && !e.record.info.state.is_live() && !e.releasing)
                .filter(|e| {
                    let ended = e.record.info.finished_at.unwrap_or_default();
                    now.saturating_sub(ended) >= RETRY_AFTER_MS
                })
                .map(|e| e.record.info.id.clone())
                .collect();
            for id in dead {
                table.forget(&id);
            }
            for pool in &self.config.warm_pools {
                let spec = pool.spec();
                let Ok(want) = admission::size(&spec, &self.config.defaults, &self.config.limits)
                else {
                    continue;
                };
                let mine = || {
                    table
                        .entries()
                        .filter(|e| is_pool_vm(e) && of_pool(e, pool, &want))
                };
                // A boot that failed (a bad image, a registry down) is kept for a while, and
                // the pool waits with it instead of retrying every tick.
                if mine().any(|e| e.record.info.state == State::Failed) {
                    continue;
                }
                let have = mine().filter(|e| e.record.info.state.is_live()).count();
                for _ in have..pool.size {
                    let fits = super::table::with_template_memory_released(|| {
                        admission::admit(
                            &want,
                            "warm pool",
                            &unlimited,
                            Usage::default(),
                            &self.config.capacity,
                            table.node_usage(),
                        )
                    });
                    if fits.is_err() {
                        break;
                    }
                    let id = new_id();
                    let mut record =
                        Record::new(id.clone(), POOL_TENANT, spec.clone(), &want, now_ms());
                    record.info.expires_at = None;
                    record.info.network = network.clone();
                    record.deleted = true;
                    let mut entry = Entry::new(record);
                    // Spawned under the lock: the boot task's first look waits for the entry.
                    let boot = node.clone().boot(id, POOL_TENANT.to_owned());
                    entry.boot = Some(tokio::spawn(boot).abort_handle());
                    table.insert(entry);
                    started += 1;
                }
            }
        }
        if started > 0 {
            tracing::info!(started, "refilling warm pools");
            self.bump();
        }
    }

    /// For a create of `spec` (sized `want`, its network policy already the one it gets) that
    /// asked for no network policy: a ready pool VM of the same image and size, now the tenant's
    /// `Running` sandbox with `warm: true`. `None`: no pool matches, or none has a VM ready.
    /// A refusal (quota, capacity) leaves the VM in its pool.
    pub(super) fn claim_warm(
        &self,
        tenant: &Tenant,
        spec: &CreateSpec,
        want: &Resources,
    ) -> Result<Option<SandboxInfo>, NodeError> {
        let plain = spec.env.is_empty() && spec.workdir.is_none() && spec.user.is_none();
        let pool = self
            .config
            .warm_pools
            .iter()
            .filter(|_| plain)
            .find(|p| same_image(&p.image, &spec.image));
        let Some(pool) = pool else {
            return Ok(None);
        };
        let now = now_ms();
        let mut table = self.table();
        let ready = table.entries().find(|e| {
            is_pool_vm(e)
                && of_pool(e, pool, want)
                && e.record.info.state == State::Running
                && e.live.is_some()
                && !e.releasing
                && e.record.info.network == spec.network
        });
        let Some(id) = ready.map(|e| e.record.info.id.clone()) else {
            return Ok(None);
        };
        let pooled = table.forget(&id).expect("just found");
        let mut record = Record::new(id.clone(), &tenant.name, spec.clone(), want, now);
        let booted = &pooled.record;
        record.info.state = State::Running;
        record.info.image_digest = booted.info.image_digest.clone();
        record.info.ready_at = Some(now);
        record.info.boot_ms = Some(0);
        record.info.warm = true;
        record.image = booted.image.clone();
        record.vmm = booted.vmm;
        match table.admit(tenant, want, &self.config.capacity, record) {
            Ok(entry) => {
                entry.live = pooled.live.clone();
                entry.activity.touch();
                let info = entry.info();
                drop(table);
                tracing::info!(sandbox = %id, tenant = %tenant.name, image = %info.image, "warm pool VM claimed");
                self.bump();
                Ok(Some(info))
            }
            Err(e) => {
                table.insert(pooled);
                Err(e)
            }
        }
    }
}
