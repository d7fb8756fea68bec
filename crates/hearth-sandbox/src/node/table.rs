//! The node's sandbox table: every sandbox the node knows ([`Entry`]: its [`Record`] plus the live
//! VM, activity and boot task) and the [`Store`] that persists the records, behind one mutex.
//!
//! The lock order "table before store" is built in rather than kept by convention: the store lives
//! inside the guarded [`Table`], so the only way to write a record is through a locked table, and no
//! code can hold the store while it waits for the table. Holding the lock a caller looks sandboxes
//! up ([`Table::visible`]: the tenant's own, not deleted), admits a new one against what the node
//! and the tenant already hold ([`Table::admit`]: usage summed, quota and capacity checked, record
//! saved and entry inserted in one critical section, so concurrent creates never overcommit) and
//! saves or forgets records. The lock is a std mutex: never held across an `.await`. The code
//! interpreters' slot map (`interpreter.rs`) is the one other node lock taken while it is held
//! (a resume gives the restored VM its saved interpreter before any call can see it running);
//! nothing takes the table while holding that map.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use super::admission::{self, Resources, Usage};
use super::exec::Activity;
use super::record::Record;
use super::store::Store;
use super::{Capacity, NodeError, SandboxInfo, State, StateCounts, Tenant};
use crate::Sandbox;

/// The table and its store behind one lock; [`SandboxTable::lock`] is the only way in.
pub(super) struct SandboxTable {
    state: Mutex<Table>,
}

impl SandboxTable {
    pub fn new(store: Store) -> SandboxTable {
        SandboxTable {
            state: Mutex::new(Table {
                entries: BTreeMap::new(),
                store,
                copies_reserved_mib: 0,
            }),
        }
    }

    /// Locks the table (and with it the store). A panic while it was held poisons nothing: every
    /// update leaves the table consistent before anything that can fail.
    pub fn lock(&self) -> MutexGuard<'_, Table> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sandboxes by id, and the store their records are saved to.
pub(super) struct Table {
    entries: BTreeMap<String, Entry>,
    store: Store,
    /// Room granted to restores for template memory copies they are about to make (see
    /// [`Table::reserve_copy`]).
    copies_reserved_mib: u64,
}

/// One sandbox as the node holds it.
pub(super) struct Entry {
    pub record: Record,
    /// The VM and its agent, while running.
    pub live: Option<Arc<Sandbox>>,
    pub activity: Arc<Activity>,
    /// The boot task, while creating.
    pub boot: Option<tokio::task::AbortHandle>,
    /// The boot task has its image and may be starting a VM: aborting it now could leak one, so
    /// it is left to finish (and its VM stopped). Before this, aborting it is safe.
    pub vm_starting: bool,
    /// A VM is still being stopped after the sandbox ended, or being saved or restored by a pause
    /// or resume: its resources still count as held in full.
    pub releasing: bool,
}

impl Entry {
    pub fn new(record: Record) -> Entry {
        let activity = Arc::new(Activity::new(record.info.last_active_at));
        Entry {
            record,
            live: None,
            activity,
            boot: None,
            vm_starting: false,
            releasing: false,
        }
    }

    /// The record as callers see it, with the latest activity time, and `stopping` while an
    /// ended sandbox's VM is still going.
    pub fn info(&self) -> SandboxInfo {
        let mut info = self.record.info.clone();
        info.last_active_at = info.last_active_at.max(self.activity.last_active());
        info.stopping = self.releasing && !info.state.is_live();
        info
    }

    /// Whether node resources are held for it (a paused one's disk only: [`Entry::holds_vm`]).
    pub fn holds_resources(&self) -> bool {
        self.record.info.state.is_live() || self.releasing
    }

    /// Whether its vCPUs and memory are held: a VM runs or is about to, or is being stopped,
    /// saved or restored.
    pub fn holds_vm(&self) -> bool {
        matches!(self.record.info.state, State::Creating | State::Running) || self.releasing
    }
}

impl Table {
    /// The tenant's own, not deleted, sandbox `id`; [`NodeError::NotFound`] otherwise, also for
    /// another tenant's id.
    pub fn visible(&self, tenant: &str, id: &str) -> Result<&Entry, NodeError> {
        self.entries
            .get(id)
            .filter(|e| e.record.info.tenant == tenant && !e.record.deleted)
            .ok_or_else(|| NodeError::NotFound { id: id.to_owned() })
    }

    /// Any sandbox `id`, deleted or not, for the node's own bookkeeping.
    pub fn get_mut(&mut self, id: &str) -> Option<&mut Entry> {
        self.entries.get_mut(id)
    }

    pub fn entries(&self) -> impl Iterator<Item = &Entry> {
        self.entries.values()
    }

    pub fn entries_mut(&mut self) -> impl Iterator<Item = &mut Entry> {
        self.entries.values_mut()
    }

    /// The tenant's sandboxes, oldest first.
    pub fn list(&self, tenant: &str) -> Vec<SandboxInfo> {
        let mut list: Vec<SandboxInfo> = self
            .entries()
            .filter(|e| e.record.info.tenant == tenant && !e.record.deleted)
            .map(Entry::info)
            .collect();
        list.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));
        list
    }

    /// Sandboxes per state, deleted ones left out.
    pub fn counts(&self) -> StateCounts {
        let mut counts = StateCounts::default();
        for entry in self.entries().filter(|e| !e.record.deleted) {
            counts.add(entry.record.info.state);
        }
        counts
    }

    /// What the node's sandboxes hold: creating and running ones, and VMs still being stopped.
    pub fn held(&self) -> Usage {
        self.held_where(|_| true)
    }

    /// [`Table::held`] with what the node holds outside its sandboxes: what admission compares
    /// with the node's capacity.
    pub fn node_usage(&self) -> Usage {
        self.node_usage_where(|_| true)
    }

    fn node_usage_where(&self, counts: impl Fn(&SandboxInfo) -> bool) -> Usage {
        Usage {
            reserved_mib: hearth_vm::qemu::template_copies_bytes().div_ceil(1 << 20)
                + self.copies_reserved_mib,
            ..self.held_where(counts)
        }
    }

    /// Counts `mib` as held by the node from now (room granted for a template memory copy about
    /// to be made) until [`Table::release_copy`]; the copy, once made, is counted as the host's
    /// own, so for a moment it counts twice (a create then may be refused, never over-admitted).
    pub fn reserve_copy(&mut self, mib: u64) {
        self.copies_reserved_mib += mib;
    }

    pub fn release_copy(&mut self, mib: u64) {
        self.copies_reserved_mib = self.copies_reserved_mib.saturating_sub(mib);
    }

    /// The part of [`Table::held`] that `tenant`'s sandboxes hold.
    pub fn held_by(&self, tenant: &str) -> Usage {
        self.held_where(|info| info.tenant == tenant)
    }

    fn held_where(&self, counts: impl Fn(&SandboxInfo) -> bool) -> Usage {
        let mut usage = Usage::default();
        for entry in self.entries() {
            let info = &entry.record.info;
            if !entry.holds_resources() || !counts(info) {
                continue;
            }
            match entry.holds_vm() {
                true => usage.add(info.vcpus, info.memory_mib, info.disk_bytes),
                false => usage.add(0, 0, info.disk_bytes),
            }
        }
        usage
    }

    /// Admits paused sandbox `id` of `tenant` (sized by its record) to run again: its vCPUs and
    /// memory must fit the tenant's quota and the node's `capacity` next to everything else held.
    pub fn readmit(
        &self,
        tenant: &Tenant,
        id: &str,
        ttl: std::time::Duration,
        capacity: &Capacity,
    ) -> Result<(), NodeError> {
        let entry = self.visible(&tenant.name, id)?;
        let info = &entry.record.info;
        let want = Resources {
            vcpus: info.vcpus,
            memory_mib: info.memory_mib,
            disk_bytes: info.disk_bytes,
            ttl,
        };
        let others = |i: &SandboxInfo| i.id != id;
        let own = self.held_where(|i| others(i) && i.tenant == tenant.name);
        with_template_memory_released(|| {
            let node = self.node_usage_where(others);
            admission::admit(&want, &tenant.name, &tenant.quota, own, capacity, node)
        })
    }

    /// Admits `record` (sized `want`) for `tenant` against the tenant's quota and the node's
    /// `capacity`, saves it and adds its entry. A refusal changes nothing.
    pub fn admit(
        &mut self,
        tenant: &Tenant,
        want: &Resources,
        capacity: &Capacity,
        record: Record,
    ) -> Result<&mut Entry, NodeError> {
        let own = self.held_by(&tenant.name);
        with_template_memory_released(|| {
            let node = self.node_usage();
            admission::admit(want, &tenant.name, &tenant.quota, own, capacity, node)
        })?;
        self.store.save(&record)?;
        let id = record.info.id.clone();
        self.entries.insert(id.clone(), Entry::new(record));
        Ok(self.entries.get_mut(&id).expect("just inserted"))
    }

    /// Adds an entry whose record is already stored (recovery).
    pub fn insert(&mut self, entry: Entry) {
        self.entries.insert(entry.record.info.id.clone(), entry);
    }

    /// Saves sandbox `id`'s record. A failure is logged: the in-memory state stays authoritative
    /// until the next successful write.
    pub fn save(&self, id: &str) {
        if let Some(entry) = self.entries.get(id) {
            save_logged(&self.store, &entry.record);
        }
    }

    /// Saves every record (shutdown).
    pub fn save_all(&self) {
        for entry in self.entries.values() {
            save_logged(&self.store, &entry.record);
        }
    }

    /// Saves a record that has no entry (recovery, before the entry exists).
    pub fn save_record(&self, record: &Record) {
        save_logged(&self.store, record);
    }

    /// Records that sandbox `id` was last active at `at` (Unix ms), in memory and in the store.
    pub fn set_last_active(&mut self, id: &str, at: u64) {
        if let Some(entry) = self.entries.get_mut(id) {
            entry.record.info.last_active_at = at;
        }
        if let Err(e) = self.store.set_last_active(id, at) {
            tracing::warn!(sandbox = %id, "saving activity time: {e}");
        }
    }

    /// Removes sandbox `id` from the table and the store.
    pub fn forget(&mut self, id: &str) -> Option<Entry> {
        if let Err(e) = self.store.delete(id) {
            tracing::error!(sandbox = %id, "deleting sandbox state: {e}");
        }
        self.entries.remove(id)
    }
}

fn save_logged(store: &Store, record: &Record) {
    if let Err(e) = store.save(record) {
        tracing::error!(sandbox = %record.info.id, "saving sandbox state: {e}");
    }
}

/// `check` (an admission against the node's usage), and once more when it refused for capacity
/// and copies of boot templates' memory that no VM uses could be given back: those are released
/// first (a later restore from one makes it again), so memory kept for speed never refuses a
/// sandbox.
pub(super) fn with_template_memory_released(
    check: impl Fn() -> Result<(), NodeError>,
) -> Result<(), NodeError> {
    match check() {
        Err(NodeError::Capacity { .. })
            if hearth_vm::qemu::release_unused_template_copies(std::time::Duration::ZERO) > 0 =>
        {
            check()
        }
        result => result,
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::node::{CreateSpec, Quota, State};

    fn table(dir: &tempfile::TempDir) -> SandboxTable {
        SandboxTable::new(Store::open(&dir.path().join("node.db")).unwrap())
    }

    fn tenant(name: &str) -> Tenant {
        Tenant {
            name: name.into(),
            quota: Quota {
                max_sandboxes: 10,
                vcpus: 2,
                memory_mib: 4096,
                disk_bytes: u64::MAX,
            },
            network_ceiling: crate::node::default_network_ceiling(),
        }
    }

    fn want(vcpus: u32) -> Resources {
        Resources {
            vcpus,
            memory_mib: 256,
            disk_bytes: 16 << 20,
            ttl: Duration::from_secs(60),
        }
    }

    fn record(id: &str, tenant: &str, vcpus: u32) -> Record {
        Record::new(id.into(), tenant, CreateSpec::default(), &want(vcpus), 1)
    }

    const CAPACITY: Capacity = Capacity {
        vcpus: 3,
        memory_mib: 4096,
        disk_bytes: u64::MAX,
    };

    #[test]
    fn admission_counts_what_the_node_and_the_tenant_hold_and_a_refusal_changes_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(&dir);
        let mut t = table.lock();
        t.admit(&tenant("a"), &want(2), &CAPACITY, record("a1", "a", 2))
            .unwrap();
        // Tenant a is at its 2 vCPUs: quota, although the node has room.
        let err = t
            .admit(&tenant("a"), &want(1), &CAPACITY, record("a2", "a", 1))
            .err()
            .unwrap();
        assert!(matches!(err, NodeError::Quota { .. }), "{err}");
        t.admit(&tenant("b"), &want(1), &CAPACITY, record("b1", "b", 1))
            .unwrap();
        // The node is full now: capacity, for anyone.
        let err = t
            .admit(&tenant("c"), &want(1), &CAPACITY, record("c1", "c", 1))
            .err()
            .unwrap();
        assert!(matches!(err, NodeError::Capacity { .. }), "{err}");
        assert!(t.visible("c", "c1").is_err() && t.visible("a", "a2").is_err());
        assert_eq!((t.held().vcpus, t.held_by("a").vcpus), (3, 2));

        // An ended sandbox frees its share once its VM is gone, not before.
        let a1 = t.get_mut("a1").unwrap();
        a1.record.end(State::Stopped, "ttl expired", 2);
        a1.releasing = true;
        assert_eq!(t.held_by("a").vcpus, 2);
        // Callers see it stopping, with its reason, until then; the record says stopped.
        let shown = t.visible("a", "a1").unwrap().info();
        assert!(shown.stopping && shown.state == State::Stopped, "{shown:?}");
        assert_eq!(shown.reason.as_deref(), Some("ttl expired"));
        let recorded = serde_json::to_value(&t.visible("a", "a1").unwrap().record.info).unwrap();
        assert!(recorded.get("stopping").is_none(), "{recorded}");
        t.get_mut("a1").unwrap().releasing = false;
        assert!(!t.visible("a", "a1").unwrap().info().stopping);
        assert_eq!(t.held_by("a"), Usage::default());
        assert_eq!(t.held(), t.held_by("b"));
    }

    #[test]
    fn a_paused_sandbox_holds_only_its_disk_and_resumes_only_if_it_fits_again() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(&dir);
        let mut t = table.lock();
        t.admit(&tenant("a"), &want(2), &CAPACITY, record("a1", "a", 2))
            .unwrap();
        t.get_mut("a1").unwrap().record.info.state = State::Paused;
        // Paused: its vCPUs and memory are free for others, its disk is not.
        assert_eq!(t.held_by("a").vcpus, 0);
        assert_eq!(t.held_by("a").memory_mib, 0);
        assert_eq!(t.held_by("a").disk_bytes, 16 << 20);
        assert_eq!(t.held().sandboxes, 1);
        // Being saved or restored (`releasing`), it still holds everything.
        t.get_mut("a1").unwrap().releasing = true;
        assert_eq!(t.held().vcpus, 2);
        t.get_mut("a1").unwrap().releasing = false;
        // It fits again: resumable, and not counted twice against the tenant's sandbox count.
        let ttl = Duration::from_secs(60);
        t.readmit(&tenant("a"), "a1", ttl, &CAPACITY).unwrap();
        // The node fills up meanwhile: the resume is refused for capacity.
        t.admit(&tenant("b"), &want(2), &CAPACITY, record("b1", "b", 2))
            .unwrap();
        let err = t.readmit(&tenant("a"), "a1", ttl, &CAPACITY).unwrap_err();
        assert!(matches!(err, NodeError::Capacity { .. }), "{err}");
        assert!(matches!(
            t.readmit(&tenant("b"), "a1", ttl, &CAPACITY),
            Err(NodeError::NotFound { .. })
        ));
    }

    #[test]
    fn lookups_see_only_the_tenants_own_undeleted_sandboxes_and_saves_reach_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let table = table(&dir);
        let mut t = table.lock();
        for (id, owner) in [("x1", "a"), ("x2", "a"), ("y1", "b")] {
            t.admit(&tenant(owner), &want(1), &CAPACITY, record(id, owner, 1))
                .unwrap();
        }
        assert!(t.visible("a", "x1").is_ok());
        assert!(matches!(
            t.visible("b", "x1"),
            Err(NodeError::NotFound { .. })
        ));
        t.get_mut("x2").unwrap().record.deleted = true;
        t.save("x2");
        assert!(t.visible("a", "x2").is_err());
        let ids: Vec<String> = t.list("a").into_iter().map(|i| i.id).collect();
        assert_eq!(ids, ["x1"]);
        assert_eq!(t.counts().creating, 2);
        t.set_last_active("x1", 99);
        t.forget("y1");
        let stored = t.store.load_all().unwrap();
        let ids: Vec<(&str, bool, u64)> = stored
            .iter()
            .map(|r| (r.info.id.as_str(), r.deleted, r.info.last_active_at))
            .collect();
        assert_eq!(ids, [("x1", false, 99), ("x2", true, 1)]);
    }
}
