//! A sandbox's life on the node: [`Node::create`] (admission under the table lock, then a background
//! boot bounded by the boot semaphore), the boot's outcome, ending a sandbox (TTL, idle, a dead VM,
//! [`Node::delete`]) and [`Node::shutdown`]. Every state change is written to the store before it
//! is announced.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use hearth_image::PulledImage;

use super::record::Record;
use super::{
    admission, lock_ignoring_poison, now_ms, CreateSpec, Histogram, Node, NodeError, SandboxInfo,
    State, Tenant, BOOT_BUCKETS,
};
use crate::boot::new_id;
use crate::Sandbox;

impl Node {
    /// Validates and admits `spec` for `tenant` (a refusal is an error and records nothing),
    /// records the sandbox `Creating`, starts its boot in the background (at most
    /// `max_concurrent_boots` at once, tenants taking turns; the rest wait in `Creating`) and
    /// returns the record.
    pub async fn create(
        &self,
        tenant: &Tenant,
        spec: CreateSpec,
    ) -> Result<SandboxInfo, NodeError> {
        self.check_open()?;
        let want = admission::size(&spec, &self.config.defaults, &self.config.limits)?;
        super::local_images::check_local_image(&spec.image, &self.config.allow_local_images)?;
        let mut spec = spec;
        let asked_network = spec.network.is_some();
        spec.network = self.network_for(tenant, spec.network.take())?;
        if !asked_network {
            if let Some(info) = self.claim_warm(tenant, &spec, &want)? {
                return Ok(info);
            }
        }
        let id = new_id();
        let record = Record::new(id.clone(), &tenant.name, spec, &want, now_ms());
        let info = {
            let mut table = self.table();
            let entry = table.admit(tenant, &want, &self.config.capacity, record)?;
            // Spawned under the lock: the boot task's first look at the table waits for the entry.
            let node = self
                .me
                .upgrade()
                .expect("a node method runs on a live node");
            entry.boot =
                Some(tokio::spawn(node.boot(id.clone(), tenant.name.clone())).abort_handle());
            entry.record.info.clone()
        };
        tracing::info!(sandbox = %id, tenant = %tenant.name, image = %info.image, "sandbox admitted");
        self.bump();
        Ok(info)
    }

    /// Stops the VM (clean shutdown, then kill) and forgets the sandbox: it disappears from `get`
    /// and `list` at once, and its resources are free once the VM is gone.
    pub async fn delete(&self, tenant: &str, id: &str) -> Result<(), NodeError> {
        self.table().visible(tenant, id)?;
        self.end(id, State::Stopped, "deleted", true).await;
        Ok(())
    }

    /// Daemon shutdown: refuses new work ([`NodeError::ShuttingDown`]), waits up to `grace` for
    /// running execs, stops the reaper and persists state. Running VMs keep running and boots in
    /// flight are abandoned (the next `open` re-attaches the former and fails the latter).
    pub async fn shutdown(&self, grace: Duration) {
        self.shutting_down.store(true, Ordering::SeqCst);
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let running: usize = self
                .table()
                .entries()
                .map(|e| e.activity.running_execs())
                .sum();
            if running == 0 || tokio::time::Instant::now() >= deadline {
                if running > 0 {
                    tracing::warn!(running, "shutting down with execs still running");
                }
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Idle code interpreters do not count as running execs; their connections close below.
        self.interpreters.clear();
        // So are background processes: left to their agents, parked for the next daemon.
        self.processes.clear();
        if let Some(reaper) = lock_ignoring_poison(&self.reaper).take() {
            reaper.abort();
        }
        let mut released = Vec::new();
        {
            let mut table = self.table();
            for entry in table.entries_mut() {
                if let Some(boot) = entry.boot.take() {
                    boot.abort();
                }
                entry.record.info.last_active_at = entry.info().last_active_at;
                if let Some(sandbox) = entry.live.take() {
                    sandbox.release();
                    released.push(sandbox);
                }
            }
            table.save_all();
        }
        // Dropping the clients closes the agent connections; the VMs stay up.
        drop(released);
        self.bump();
        tracing::info!("node shut down; running VMs left for the next start to re-attach");
    }

    /// The boot task: waits for a boot slot (tenants take turns: `boot_slots.rs`), pulls, boots,
    /// and records the outcome. Until the VM may start, ending the sandbox aborts this task.
    pub(super) async fn boot(self: Arc<Node>, id: String, tenant: String) {
        let _slot = self.boots.acquire(&tenant).await;
        let Some(image) = self.still_creating(&id, false).map(|info| info.image) else {
            return;
        };
        let image = match self.images.ensure(&image, &self.config.pull).await {
            Ok(image) => image,
            Err(e) => return self.booted(&id, Err(e.into())).await,
        };
        let Some(info) = self.still_creating(&id, true) else {
            return;
        };
        let outcome = self.start_vm(&id, image, &info).await;
        self.booted(&id, outcome).await;
    }

    /// The sandbox's record if it is still `Creating`; with `start`, marks its VM as starting.
    fn still_creating(&self, id: &str, start: bool) -> Option<SandboxInfo> {
        let mut table = self.table();
        let entry = table.get_mut(id)?;
        if entry.record.info.state != State::Creating {
            entry.boot = None;
            return None;
        }
        entry.vm_starting |= start;
        Some(entry.record.info.clone())
    }

    async fn start_vm(
        &self,
        id: &str,
        image: PulledImage,
        info: &SandboxInfo,
    ) -> Result<(Sandbox, PulledImage), NodeError> {
        let config = self.sandbox_config(info);
        let sandbox = Sandbox::create_detached(&config, image.clone(), id, &self.run_dir(id))
            .await
            .map_err(|e| NodeError::of(id, e))?;
        Ok((sandbox, image))
    }

    /// The sandbox configuration of the sandbox `info` describes (its size, its network policy).
    pub(super) fn sandbox_config(&self, info: &SandboxInfo) -> crate::SandboxConfig {
        let mut config = self.config.defaults.clone();
        config.home = self.config.home.clone();
        config.vcpus = info.vcpus;
        config.memory_mib = info.memory_mib;
        config.scratch_bytes = info.disk_bytes;
        config.network_policy = info.network.clone().unwrap_or_default();
        if let Some(networking) = &mut config.network {
            networking.home = self.net_home();
        }
        let node = self.me.clone();
        config.template_memory_room =
            crate::MemoryRoom::new(move |mib| node.upgrade()?.reserve_template_memory(mib));
        config
    }

    /// Room in the node's capacity for `mib` more, a new copy of a boot template's memory, on
    /// top of its sandboxes (this one already admitted), the copies it holds and those granted
    /// to other restores: reserved until the grant is dropped. Copies no VM uses are given back
    /// first if that makes the room. `None`: no room.
    pub(super) fn reserve_template_memory(&self, mib: u64) -> Option<crate::RoomGrant> {
        let capacity = self.config.capacity.memory_mib;
        let mut table = self.table();
        let room = super::table::with_template_memory_released(|| {
            let usage = table.node_usage();
            match usage.memory_mib + usage.reserved_mib + mib <= capacity {
                true => Ok(()),
                false => Err(NodeError::Capacity {
                    message: String::new(),
                }),
            }
        });
        if room.is_err() {
            tracing::info!(
                mib,
                capacity,
                "no room for a new copy of boot template memory: the VM boots cold"
            );
            return None;
        }
        table.reserve_copy(mib);
        let node = self.me.clone();
        Some(crate::RoomGrant::new(move || {
            if let Some(node) = node.upgrade() {
                node.table().release_copy(mib);
            }
        }))
    }

    /// Records a finished boot. A sandbox that ended while it booted gets its VM stopped now.
    pub(super) async fn booted(
        &self,
        id: &str,
        outcome: Result<(Sandbox, PulledImage), NodeError>,
    ) {
        let now = now_ms();
        let leftover = {
            let mut table = self.table();
            let Some(entry) = table.get_mut(id) else {
                // Unreachable while `vm_starting` keeps the entry; never leak a VM regardless.
                return drop(outcome);
            };
            entry.boot = None;
            entry.vm_starting = false;
            let wanted = entry.record.info.state == State::Creating;
            let mut counters = lock_ignoring_poison(&self.counters);
            counters.boots_total += 1;
            let leftover = match outcome {
                Ok((sandbox, image)) if wanted => {
                    let vmm = hearth_vm::ProcessIdentity::of(sandbox.vmm_pid());
                    let boot_ms = entry.record.running(&image, vmm, now);
                    counters
                        .boot_seconds
                        .get_or_insert_with(|| Histogram::with_bounds(BOOT_BUCKETS))
                        .observe(boot_ms as f64 / 1000.0);
                    entry.live = Some(Arc::new(sandbox));
                    entry.activity.touch();
                    tracing::info!(sandbox = %id, boot_ms, "sandbox running");
                    None
                }
                Err(e) if wanted => {
                    counters.boot_failures_total += 1;
                    tracing::warn!(sandbox = %id, "boot failed: {e}");
                    entry.record.fail(format!("boot failed: {e}"), now);
                    let _ = std::fs::remove_dir_all(self.run_dir(id));
                    None
                }
                // Ended (deleted, expired, shut down) while booting.
                Ok((sandbox, _)) => Some(Some(sandbox)),
                Err(_) => Some(None),
            };
            if leftover.is_none() {
                table.save(id);
            }
            leftover
        };
        self.bump();
        if let Some(sandbox) = leftover {
            if let Some(sandbox) = sandbox {
                if let Err(e) = sandbox.discard().await {
                    tracing::warn!(sandbox = %id, "stopping a VM whose sandbox ended during boot: {e}");
                }
            }
            self.released(id);
        }
    }

    /// Ends sandbox `id` as `state` ("stopped" or "failed") with `reason` if it is still creating,
    /// running or paused (an ended one keeps its first reason), and with `delete` forgets it. Its
    /// VM is stopped (clean shutdown, then kill) before this returns, unless a boot is still in
    /// flight: then the boot's end stops it. A paused sandbox's snapshot is removed (unless a pause
    /// or resume is under way: its end removes it).
    pub(super) async fn end(&self, id: &str, state: State, reason: &str, delete: bool) {
        let live = {
            let mut table = self.table();
            let Some(entry) = table.get_mut(id) else {
                return;
            };
            entry.record.deleted |= delete;
            if entry.record.info.state == State::Paused && !entry.releasing {
                let _ = std::fs::remove_dir_all(self.paused_dir(id));
            }
            if entry.record.end(state, reason, now_ms()) {
                tracing::info!(sandbox = %id, %state, reason, "sandbox ended");
            }
            if let Some(boot) = entry.boot.take_if(|_| !entry.vm_starting) {
                boot.abort(); // waiting for a slot or pulling: no VM to leak
            }
            let live = entry.live.take();
            // A pause or resume under way holds the VM (`releasing` already): the sandbox shows
            // `stopping` until that ends it, not `stopped` while its VMM still runs.
            entry.releasing |= live.is_some() || entry.vm_starting;
            if entry.record.deleted && !entry.releasing {
                table.forget(id);
                let _ = std::fs::remove_dir_all(self.run_dir(id));
            } else {
                table.save(id);
            }
            live
        };
        let why = format!("its sandbox ended ({state}: {reason}) while it ran");
        self.processes.ended(id, &why);
        self.bump();
        if let Some(sandbox) = live {
            if let Err(e) = sandbox.stop().await {
                tracing::warn!(sandbox = %id, "stopping the VM: {e}");
            }
            self.released(id);
        }
    }

    /// The VM of an ended sandbox is gone: its resources are free, its run directory removed, and a
    /// deleted sandbox forgotten.
    pub(super) fn released(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.run_dir(id));
        {
            let mut table = self.table();
            if let Some(entry) = table.get_mut(id) {
                entry.releasing = false;
                if entry.record.deleted {
                    table.forget(id);
                }
            }
        }
        self.bump();
    }
}

#[cfg(test)]
mod tests {
    use super::super::NodeConfig;
    use super::*;

    /// Two restores asking for a template memory copy at the same moment (each before the other's
    /// copy exists) are not both granted room the node has once; a create meanwhile sees the
    /// reserved room as held.
    #[tokio::test]
    async fn room_for_a_template_copy_is_reserved_until_the_grant_goes() {
        let home = tempfile::tempdir().unwrap();
        let mut config = NodeConfig::new(home.path());
        config.capacity.memory_mib = 1024;
        let node = Node::open(config).await.unwrap();
        let first = node.reserve_template_memory(600);
        assert!(first.is_some(), "600 of 1024 MiB free");
        assert!(
            node.reserve_template_memory(600).is_none(),
            "a second 600 MiB copy was granted beside the first"
        );
        assert_eq!(node.table().node_usage().reserved_mib, 600);
        drop(first);
        assert_eq!(node.table().node_usage().reserved_mib, 0);
        assert!(node.reserve_template_memory(600).is_some());
    }
}
