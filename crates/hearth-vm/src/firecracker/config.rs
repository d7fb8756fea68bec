//! Firecracker's VM configuration as typed values: one type per API resource (the bodies of
//! `PUT /machine-config`, `/boot-source`, `/drives/{id}`, `/vsock`, `/logger`, `/metrics`, `/actions`,
//! `PATCH /vm`, `/snapshot/create`, `/snapshot/load`, `PATCH /drives/{id}`) and [`VmConfig`], which
//! is both the `--config-file` document and the source of the API request sequences (a cold boot's
//! and a restore's). Ids of resources are [`ResourceId`]s (`resource_id.rs`). Pure data: no
//! I/O. Field names follow Firecracker's swagger definitions; `tests/firecracker_schema.rs`
//! validates every body against that schema.

use serde::Serialize;

use super::layout::Layout;
pub use super::resource_id::{drive_ids, InvalidResourceId, ResourceId};
use crate::spec::VmSpec;

/// Guest CID of the vsock device; 0-2 are reserved (hypervisor, local, host).
pub const GUEST_CID: u32 = 3;

/// Kernel parameters Firecracker guests need: the console on the emulated UART (Firecracker wires
/// ttyS0 to its stdout), `reboot=k` so a guest reboot goes through the keyboard controller, which
/// Firecracker turns into a VMM exit, `panic=1` to reboot (hence exit) one second after a panic
/// instead of hanging, `pci=off` because Firecracker has no PCI bus and probing it wastes boot time.
pub const FIRECRACKER_BOOT_PARAMS: &[&str] = &["console=ttyS0", "reboot=k", "panic=1", "pci=off"];

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MachineConfig {
    pub vcpu_count: u32,
    pub mem_size_mib: u32,
    pub smt: bool,
    pub track_dirty_pages: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BootSource {
    pub kernel_image_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
    pub boot_args: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CacheType {
    /// Flushes from the guest are ignored.
    Unsafe,
    /// Flushes from the guest reach the host disk.
    Writeback,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum IoEngine {
    Sync,
    Async,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct DriveConfig {
    /// Derived from the drive's serial by [`drive_ids`] (`hearth-rootfs` becomes `hearth_rootfs`).
    pub drive_id: ResourceId,
    pub path_on_host: String,
    pub is_root_device: bool,
    pub is_read_only: bool,
    pub cache_type: CacheType,
    pub io_engine: IoEngine,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// Independent bandwidth (bytes) and operations token buckets.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Default)]
pub struct RateLimiter {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenBucket {
    /// Tokens the bucket holds.
    pub size: u64,
    /// Extra tokens available once, at start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill `size` tokens.
    pub refill_time: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockConfig {
    pub guest_cid: u32,
    /// Firecracker listens here for host-initiated connections (`CONNECT <port>\n`).
    pub uds_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    Error,
    Warning,
    Info,
    Debug,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LoggerConfig {
    pub log_path: String,
    pub level: LogLevel,
    pub show_level: bool,
    pub show_log_origin: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MetricsConfig {
    pub metrics_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ActionType {
    InstanceStart,
    SendCtrlAltDel,
    FlushMetrics,
}

/// Body of `PUT /actions`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct InstanceAction {
    pub action_type: ActionType,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum RunState {
    Paused,
    Resumed,
}

/// Body of `PATCH /vm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct VmState {
    pub state: RunState,
}

/// Which snapshot `PUT /snapshot/create` writes: the whole guest memory (a diff snapshot needs
/// dirty-page tracking from boot, which hearth leaves off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum SnapshotType {
    Full,
}

/// Body of `PUT /snapshot/create` (paths as Firecracker sees them; the VM must be paused).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotCreate {
    pub snapshot_type: SnapshotType,
    /// Device and vCPU state.
    pub snapshot_path: String,
    /// Guest memory.
    pub mem_file_path: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum MemoryBackendType {
    /// Memory mapped privately from a file: pages load on first touch.
    File,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct MemoryBackend {
    pub backend_type: MemoryBackendType,
    pub backend_path: String,
}

/// `network_overrides` entry: the NIC's tap in the restored VM.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkOverride {
    pub iface_id: ResourceId,
    pub host_dev_name: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VsockOverride {
    pub uds_path: String,
}

/// Body of `PUT /snapshot/load`, the first call to a fresh Firecracker after its logger and
/// metrics. The VM stays paused (`resume_vm: false`) so that its drives can be pointed at this
/// VM's files before a vCPU runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SnapshotLoad {
    pub snapshot_path: String,
    pub mem_backend: MemoryBackend,
    pub resume_vm: bool,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub network_overrides: Vec<NetworkOverride>,
    /// The agent's socket of this VM (a fork's child has its own; the snapshot names the parent's).
    pub vsock_override: VsockOverride,
}

/// Body of `PATCH /drives/{drive_id}`: a restored VM's drive pointed at this VM's file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct PartialDrive {
    pub drive_id: ResourceId,
    pub path_on_host: String,
}

/// The whole configuration: serialized as-is it is a `--config-file` (Firecracker's
/// `FullVmConfiguration`); [`VmConfig::requests`] turns it into the equivalent API calls.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct VmConfig {
    #[serde(rename = "machine-config")]
    pub machine_config: MachineConfig,
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    pub drives: Vec<DriveConfig>,
    pub vsock: VsockConfig,
    pub logger: LoggerConfig,
    pub metrics: MetricsConfig,
    #[serde(rename = "network-interfaces", skip_serializing_if = "Vec::is_empty")]
    pub network_interfaces: Vec<NetworkInterfaceConfig>,
}

/// `PUT /network-interfaces/{iface_id}`: a virtio-net device on an existing host tap.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NetworkInterfaceConfig {
    pub iface_id: ResourceId,
    pub host_dev_name: String,
    pub guest_mac: String,
}

/// One REST call: method, path and JSON body (`None` for GET).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiRequest {
    pub method: &'static str,
    pub path: String,
    pub body: Option<serde_json::Value>,
}

impl ApiRequest {
    pub fn put(path: impl Into<String>, body: &impl Serialize) -> Self {
        ApiRequest::with_body("PUT", path, body)
    }

    pub fn patch(path: impl Into<String>, body: &impl Serialize) -> Self {
        ApiRequest::with_body("PATCH", path, body)
    }

    pub fn get(path: impl Into<String>) -> Self {
        ApiRequest {
            method: "GET",
            path: path.into(),
            body: None,
        }
    }

    fn with_body(method: &'static str, path: impl Into<String>, body: &impl Serialize) -> Self {
        ApiRequest {
            method,
            path: path.into(),
            body: Some(serde_json::to_value(body).expect("config types serialize")),
        }
    }

    pub fn action(action_type: ActionType) -> Self {
        ApiRequest::put("/actions", &InstanceAction { action_type })
    }

    pub fn vm_state(state: RunState) -> Self {
        ApiRequest::patch("/vm", &VmState { state })
    }

    /// A full snapshot of the paused VM into `snapshot_path` and `mem_file_path` (Firecracker's
    /// view).
    pub fn snapshot_create(snapshot_path: &str, mem_file_path: &str) -> Self {
        let body = SnapshotCreate {
            snapshot_type: SnapshotType::Full,
            snapshot_path: snapshot_path.to_owned(),
            mem_file_path: mem_file_path.to_owned(),
        };
        ApiRequest::put("/snapshot/create", &body)
    }
}

impl VmConfig {
    /// The configuration for `spec`, with paths as the Firecracker process sees them (`layout`) and
    /// optional per-drive rate limiters keyed by drive serial.
    pub fn build(
        spec: &VmSpec,
        layout: &Layout,
        rate_limiters: &[(String, RateLimiter)],
    ) -> VmConfig {
        let mut cmdline = spec.cmdline.clone();
        for param in FIRECRACKER_BOOT_PARAMS {
            cmdline.set(*param);
        }
        let ids = drive_ids(spec.drives.iter().map(|d| d.serial.as_str()));
        let drives = spec
            .drives
            .iter()
            .zip(ids)
            .map(|(drive, drive_id)| DriveConfig {
                // Firecracker's virtio-blk serial is derived from the backing file's inode, not from
                // drive_id, so the guest cannot see hearth's serials; it tells the drives apart by
                // their read-only flag. The id names the drive in API calls and logs.
                drive_id,
                path_on_host: layout.vmm_drive(&drive.serial, &drive.path),
                // The guest boots from hearth's initramfs; marking a root device would only add a
                // `root=` parameter the agent does not use, and reorder the drives.
                is_root_device: false,
                is_read_only: drive.read_only,
                // The image is read-only and the scratch disk dies with the sandbox: guest flushes
                // need not reach the host disk.
                cache_type: CacheType::Unsafe,
                io_engine: IoEngine::Sync,
                rate_limiter: rate_limiters
                    .iter()
                    .find(|(serial, _)| *serial == drive.serial)
                    .map(|(_, limiter)| limiter.clone()),
            })
            .collect();
        VmConfig {
            machine_config: MachineConfig {
                vcpu_count: spec.vcpus,
                mem_size_mib: spec.memory_mib,
                smt: false,
                track_dirty_pages: false,
            },
            boot_source: BootSource {
                kernel_image_path: layout.vmm_kernel(&spec.kernel),
                initrd_path: Some(layout.vmm_initramfs(&spec.initramfs)),
                boot_args: cmdline.render(),
            },
            drives,
            vsock: VsockConfig {
                guest_cid: GUEST_CID,
                uds_path: layout.vmm_vsock(),
            },
            logger: LoggerConfig {
                log_path: layout.vmm_log(),
                level: LogLevel::Info,
                show_level: true,
                show_log_origin: false,
            },
            metrics: MetricsConfig {
                metrics_path: layout.vmm_metrics(),
            },
            network_interfaces: spec
                .network
                .iter()
                .map(|nic| NetworkInterfaceConfig {
                    iface_id: ResourceId::from_name("eth0"),
                    host_dev_name: nic.tap.clone(),
                    guest_mac: nic.mac.clone(),
                })
                .collect(),
        }
    }

    /// The calls that restore a fresh Firecracker from the snapshot at `snapshot_path` and
    /// `memory_path` (Firecracker's view) into this configuration's VM, paused: logger and
    /// metrics, the load (with this VM's vsock socket and taps), then each drive re-pointed at this
    /// VM's file. `PATCH /vm Resumed` is not included.
    pub fn restore_requests(&self, snapshot_path: &str, memory_path: &str) -> Vec<ApiRequest> {
        let load = SnapshotLoad {
            snapshot_path: snapshot_path.to_owned(),
            mem_backend: MemoryBackend {
                backend_type: MemoryBackendType::File,
                backend_path: memory_path.to_owned(),
            },
            resume_vm: false,
            network_overrides: self
                .network_interfaces
                .iter()
                .map(|nic| NetworkOverride {
                    iface_id: nic.iface_id.clone(),
                    host_dev_name: nic.host_dev_name.clone(),
                })
                .collect(),
            vsock_override: VsockOverride {
                uds_path: self.vsock.uds_path.clone(),
            },
        };
        let mut requests = vec![
            ApiRequest::put("/logger", &self.logger),
            ApiRequest::put("/metrics", &self.metrics),
            ApiRequest::put("/snapshot/load", &load),
        ];
        requests.extend(self.drives.iter().map(|drive| {
            let partial = PartialDrive {
                drive_id: drive.drive_id.clone(),
                path_on_host: drive.path_on_host.clone(),
            };
            ApiRequest::patch(format!("/drives/{}", drive.drive_id), &partial)
        }));
        requests
    }

    /// The `--config-file` document.
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("config types serialize")
    }

    /// The API calls that configure a fresh Firecracker like the config file would, in an order it
    /// accepts: logger first so later errors are logged, then machine, boot source, devices.
    /// `InstanceStart` is not included.
    pub fn requests(&self) -> Vec<ApiRequest> {
        let mut requests = vec![
            ApiRequest::put("/logger", &self.logger),
            ApiRequest::put("/metrics", &self.metrics),
            ApiRequest::put("/machine-config", &self.machine_config),
            ApiRequest::put("/boot-source", &self.boot_source),
        ];
        requests.extend(
            self.drives
                .iter()
                .map(|drive| ApiRequest::put(format!("/drives/{}", drive.drive_id), drive)),
        );
        requests.extend(
            self.network_interfaces
                .iter()
                .map(|nic| ApiRequest::put(format!("/network-interfaces/{}", nic.iface_id), nic)),
        );
        requests.push(ApiRequest::put("/vsock", &self.vsock));
        requests
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hearths_drives_get_valid_ids_in_both_the_config_file_and_the_api_paths() {
        let mut spec = crate::VmSpec::new("/k", "/i", "/h/run/vm1");
        spec.drives = vec![
            crate::Drive::rootfs("/h/rootfs.ext4"),
            crate::Drive::scratch("/h/scratch.ext4"),
        ];
        let config = VmConfig::build(&spec, &Layout::plain(&spec), &[]);
        let doc: serde_json::Value = serde_json::from_str(&config.to_json()).unwrap();
        assert_eq!(doc["drives"][0]["drive_id"], "hearth_rootfs");
        assert_eq!(doc["drives"][1]["drive_id"], "hearth_scratch");
        let paths: Vec<String> = config.requests().into_iter().map(|r| r.path).collect();
        assert!(
            paths.contains(&"/drives/hearth_rootfs".to_owned()),
            "{paths:?}"
        );
        assert!(
            paths.contains(&"/drives/hearth_scratch".to_owned()),
            "{paths:?}"
        );
    }
}
