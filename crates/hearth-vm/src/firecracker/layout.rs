//! Where a Firecracker VM's files live, as the host sees them and as the Firecracker process sees
//! them. Without the jailer both views are the same paths in the run directory; under the jailer
//! Firecracker is chrooted into `<chroot-base>/<exec-name>/<id>/root`, so its config names
//! chroot-relative paths (`/kernel`, `/api.sock`) and the host reaches them under the chroot root.
//! Pure path arithmetic: no I/O.

use std::path::{Path, PathBuf};

use crate::spec::VmSpec;

/// The API socket (host view) of a plain Firecracker.
const API_SOCKET: &str = "firecracker.sock";
const LOG: &str = "firecracker.log";
const METRICS: &str = "metrics.json";
const CONFIG: &str = "vm_config.json";
/// Vsock socket name inside a jail (short: it lives deep under the chroot base).
const JAILED_VSOCK: &str = "v.sock";
/// What `PUT /snapshot/create` writes: device state and guest memory (also their names in the
/// directory a saved VM is moved to, see [`snapshot_memory`]).
pub const SNAPSHOT: &str = "vmstate";
pub const SNAPSHOT_MEMORY: &str = "memory";
/// A restore's inputs inside a jail: not the names a save writes, so that pausing a restored VM
/// never truncates the (hard-linked) snapshot it came from.
const RESTORE_SNAPSHOT: &str = "restore.vmstate";
const RESTORE_MEMORY: &str = "restore.memory";

/// The guest memory file saved beside the snapshot `state`.
pub fn snapshot_memory(state: &Path) -> PathBuf {
    state.with_file_name(SNAPSHOT_MEMORY)
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    run_dir: PathBuf,
    agent_socket: PathBuf,
    /// The chroot root when jailed.
    chroot_root: Option<PathBuf>,
}

impl Layout {
    pub fn plain(spec: &VmSpec) -> Self {
        Layout {
            run_dir: spec.run_dir.clone(),
            agent_socket: spec.agent_socket.clone(),
            chroot_root: None,
        }
    }

    /// The jailer builds the chroot root from its base dir, the exec file's name and the VM id.
    pub fn jailed(spec: &VmSpec, chroot_base: &Path, exec_file_name: &str, id: &str) -> Self {
        Layout {
            run_dir: spec.run_dir.clone(),
            agent_socket: spec.agent_socket.clone(),
            chroot_root: Some(chroot_base.join(exec_file_name).join(id).join("root")),
        }
    }

    /// The layout of a running VM found by its run directory and API socket (an adopted VM):
    /// jailed when the socket is not directly in the run directory.
    pub fn found(run_dir: &Path, api_socket: &Path, agent_socket: &Path) -> Self {
        let own_dir = api_socket.parent().unwrap_or(run_dir);
        Layout {
            run_dir: run_dir.to_owned(),
            agent_socket: agent_socket.to_owned(),
            chroot_root: (own_dir != run_dir).then(|| own_dir.to_owned()),
        }
    }

    pub fn chroot_root(&self) -> Option<&Path> {
        self.chroot_root.as_deref()
    }

    /// A file Firecracker creates or opens itself, in both views.
    fn own_file(&self, name: &str) -> (PathBuf, String) {
        match &self.chroot_root {
            Some(root) => (root.join(name), format!("/{name}")),
            None => {
                let path = self.run_dir.join(name);
                let view = path.to_string_lossy().into_owned();
                (path, view)
            }
        }
    }

    /// An input file (kernel, disk): as-is when plain; linked into the chroot under `name` when jailed.
    fn input(&self, name: &str, source: &Path) -> String {
        match &self.chroot_root {
            Some(_) => format!("/{name}"),
            None => source.to_string_lossy().into_owned(),
        }
    }

    pub fn host_api_socket(&self) -> PathBuf {
        self.own_file(API_SOCKET).0
    }

    pub fn vmm_api_socket(&self) -> String {
        self.own_file(API_SOCKET).1
    }

    pub fn host_log(&self) -> PathBuf {
        self.own_file(LOG).0
    }

    pub fn vmm_log(&self) -> String {
        self.own_file(LOG).1
    }

    pub fn host_metrics(&self) -> PathBuf {
        self.own_file(METRICS).0
    }

    pub fn vmm_metrics(&self) -> String {
        self.own_file(METRICS).1
    }

    pub fn host_config(&self) -> PathBuf {
        self.own_file(CONFIG).0
    }

    pub fn vmm_config(&self) -> String {
        self.own_file(CONFIG).1
    }

    /// The hybrid vsock socket: the spec's agent socket when plain, inside the chroot when jailed.
    pub fn host_vsock(&self) -> PathBuf {
        match &self.chroot_root {
            Some(root) => root.join(JAILED_VSOCK),
            None => self.agent_socket.clone(),
        }
    }

    pub fn vmm_vsock(&self) -> String {
        match &self.chroot_root {
            Some(_) => format!("/{JAILED_VSOCK}"),
            None => self.agent_socket.to_string_lossy().into_owned(),
        }
    }

    /// Where a save writes the snapshot and the memory: (host paths, Firecracker's view).
    pub fn saved(&self) -> ([PathBuf; 2], [String; 2]) {
        let (state, memory) = (self.own_file(SNAPSHOT), self.own_file(SNAPSHOT_MEMORY));
        ([state.0, memory.0], [state.1, memory.1])
    }

    /// A restore's snapshot and memory (saved by [`Layout::saved`], moved beside each other) as
    /// Firecracker sees them.
    pub fn vmm_restore(&self, state: &Path) -> [String; 2] {
        [
            self.input(RESTORE_SNAPSHOT, state),
            self.input(RESTORE_MEMORY, &snapshot_memory(state)),
        ]
    }

    pub fn vmm_kernel(&self, kernel: &Path) -> String {
        self.input("kernel", kernel)
    }

    pub fn vmm_initramfs(&self, initramfs: &Path) -> String {
        self.input("initrd", initramfs)
    }

    pub fn vmm_drive(&self, serial: &str, path: &Path) -> String {
        self.input(&format!("{serial}.img"), path)
    }

    /// (host source, host path inside the chroot) of every input the jailed VMM must see; empty
    /// when plain.
    pub fn jail_inputs(&self, spec: &VmSpec) -> Vec<(PathBuf, PathBuf)> {
        let Some(root) = &self.chroot_root else {
            return Vec::new();
        };
        let mut inputs = vec![
            (spec.kernel.clone(), root.join("kernel")),
            (spec.initramfs.clone(), root.join("initrd")),
        ];
        inputs.extend(
            spec.drives
                .iter()
                .map(|d| (d.path.clone(), root.join(format!("{}.img", d.serial)))),
        );
        if let Some(state) = &spec.restore_from {
            inputs.push((state.clone(), root.join(RESTORE_SNAPSHOT)));
            inputs.push((snapshot_memory(state), root.join(RESTORE_MEMORY)));
        }
        inputs
    }

    /// Every Unix socket path the host uses, for the `sun_path` length check.
    pub fn host_sockets(&self) -> [PathBuf; 2] {
        [self.host_api_socket(), self.host_vsock()]
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Drive;

    fn spec() -> VmSpec {
        let mut spec = VmSpec::new("/k/vmlinux", "/k/initrd.cpio", "/h/run/vm1");
        spec.drives = vec![Drive::rootfs("/h/rootfs/a.ext4")];
        spec
    }

    #[test]
    fn saves_and_restores_use_distinct_names_so_a_restored_vm_never_overwrites_its_source() {
        let mut restored = spec();
        restored.restore_from = Some("/h/paused/vm1/vmstate".into());
        let plain = Layout::plain(&restored);
        assert_eq!(
            plain.vmm_restore(Path::new("/h/paused/vm1/vmstate")),
            ["/h/paused/vm1/vmstate", "/h/paused/vm1/memory"]
        );
        assert_eq!(plain.saved().1, ["/h/run/vm1/vmstate", "/h/run/vm1/memory"]);
        let jailed = Layout::jailed(
            &restored,
            Path::new("/h/run/vm1/jail"),
            "firecracker",
            "vm1",
        );
        let root = Path::new("/h/run/vm1/jail/firecracker/vm1/root");
        assert_eq!(
            jailed.vmm_restore(Path::new("/h/paused/vm1/vmstate")),
            ["/restore.vmstate", "/restore.memory"]
        );
        assert_eq!(
            jailed.saved().0,
            [root.join("vmstate"), root.join("memory")]
        );
        let inputs = jailed.jail_inputs(&restored);
        assert!(inputs.contains(&("/h/paused/vm1/memory".into(), root.join("restore.memory"))));
        assert!(inputs.contains(&("/h/paused/vm1/vmstate".into(), root.join("restore.vmstate"))));
    }

    #[test]
    fn plain_paths_are_host_paths_in_the_run_dir() {
        let layout = Layout::plain(&spec());
        assert_eq!(layout.vmm_api_socket(), "/h/run/vm1/firecracker.sock");
        assert_eq!(layout.host_vsock(), Path::new("/h/run/vm1/agent.sock"));
        assert_eq!(layout.vmm_kernel(Path::new("/k/vmlinux")), "/k/vmlinux");
        assert!(layout.jail_inputs(&spec()).is_empty());
    }

    #[test]
    fn jailed_paths_are_chroot_relative_and_host_paths_under_the_chroot() {
        let layout = Layout::jailed(&spec(), Path::new("/h/run/vm1/jail"), "firecracker", "vm1");
        let root = Path::new("/h/run/vm1/jail/firecracker/vm1/root");
        assert_eq!(layout.chroot_root(), Some(root));
        assert_eq!(layout.vmm_api_socket(), "/firecracker.sock");
        assert_eq!(layout.host_api_socket(), root.join("firecracker.sock"));
        assert_eq!(layout.vmm_vsock(), "/v.sock");
        assert_eq!(layout.host_vsock(), root.join("v.sock"));
        assert_eq!(
            layout.vmm_drive("hearth-rootfs", Path::new("/x")),
            "/hearth-rootfs.img"
        );
        assert_eq!(
            layout.jail_inputs(&spec()),
            [
                (PathBuf::from("/k/vmlinux"), root.join("kernel")),
                (PathBuf::from("/k/initrd.cpio"), root.join("initrd")),
                (
                    PathBuf::from("/h/rootfs/a.ext4"),
                    root.join("hearth-rootfs.img")
                ),
            ]
        );
    }
}
