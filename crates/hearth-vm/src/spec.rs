//! What to boot: the backend-neutral description of one microVM ([`VmSpec`]), its drives and its kernel
//! command line. Pure data plus validation; no I/O.

use std::path::PathBuf;

/// virtio-blk serial of the shared read-only image; the guest agent finds its disk by this name.
pub const ROOTFS_SERIAL: &str = "hearth-rootfs";
/// virtio-blk serial of the per-sandbox writable disk (overlay upper dir).
pub const SCRATCH_SERIAL: &str = "hearth-scratch";
/// Kernel parameter carrying a cold-booted guest's hostname (the agent sets it); a guest restored
/// from a boot template gets its hostname in RESUME instead.
pub const HOSTNAME_PARAM: &str = "hearth.hostname";

/// virtio-blk serials are at most 20 bytes (VIRTIO_BLK_ID_BYTES); longer ones are silently cut.
const MAX_SERIAL_LEN: usize = 20;
/// `sun_path` holds 108 bytes including the terminating NUL.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// One microVM to boot. Backends turn it into a command line or API calls; see [`crate::Vmm`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmSpec {
    /// ELF vmlinux (preferred: PVH entry, no decompression in the guest) or bzImage.
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// Backend-neutral parameters; a backend appends what it needs (e.g. `tsc_early_khz` under TCG).
    pub cmdline: KernelCmdline,
    pub vcpus: u32,
    pub memory_mib: u32,
    pub drives: Vec<Drive>,
    /// Per-VM directory for sockets, pid file and logs; created by `start`, removed once the VMM has
    /// exited and been reaped.
    pub run_dir: PathBuf,
    /// Host end of the agent channel (a Unix socket path).
    pub agent_socket: PathBuf,
    /// Where the guest's serial console is written.
    pub console_log: PathBuf,
    /// `false` (the default, `hearth run`): the VMM dies with the process that started it
    /// (parent-death signal). `true` (the node daemon): the VMM gets its own session and no
    /// parent-death signal, so it outlives its starter, and the run directory holds a
    /// [`crate::DetachedRecord`] from which a later process can [`crate::adopt`] it.
    pub detached: bool,
    /// Start from this saved state instead of booting the kernel: a boot template
    /// ([`crate::BootTemplates`]) or a running VM saved by [`crate::RunningVm::save_state`]. The
    /// spec must describe the same devices and command line as the VM that was saved. Needs
    /// [`crate::Capabilities::save_state`] or `boot_templates`.
    pub restore_from: Option<PathBuf>,
    /// A virtio-net interface on a host tap device; `None` (the default) gives the guest no network
    /// device at all. Needs [`crate::Capabilities::network`].
    pub network: Option<NetworkInterface>,
    /// Where guest memory lives (QEMU): private anonymous memory (the default), or a boot template's
    /// memory file, written by the template VM and mapped copy-on-write by the VMs restored from it.
    pub memory: GuestMemory,
    /// The machine the VM runs on: [`MachineRevision::CURRENT`] for a new VM, the recorded one for
    /// a saved VM started again.
    pub machine: MachineRevision,
}

/// Which revision of hearth's virtual machine a VM runs on: the VMM's machine options and devices.
/// A saved VM (a paused sandbox, a fork's snapshot) can only be started again on the machine it was
/// saved on (QEMU refuses a saved state for a device its machine lacks), so the VM's record keeps
/// its revision and a snapshot saved by an older hearth starts on its own, older machine, while new
/// VMs get [`MachineRevision::CURRENT`]. Firecracker's machine is fixed; only QEMU renders it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct MachineRevision(pub u32);

impl MachineRevision {
    /// QEMU's `microvm` with its i8254 PIT: every VM before revisions were recorded.
    pub const WITH_PIT: MachineRevision = MachineRevision(1);
    /// `microvm` without the PIT: the guest keeps time with the TSC (`tsc_early_khz`,
    /// `tsc=reliable` under TCG) and its local APIC timer, and an idle guest no longer costs the
    /// host the PIT's ticks (1.49/1.72% of a core per idle VM before, 1.23/1.19% after: 10 VMs,
    /// 60 s, two runs each).
    pub const NO_PIT: MachineRevision = MachineRevision(2);
    /// What new VMs get.
    pub const CURRENT: MachineRevision = MachineRevision::NO_PIT;

    /// Whether this hearth can run the machine (a revision from a newer hearth it cannot).
    pub fn is_known(self) -> bool {
        (MachineRevision::WITH_PIT..=MachineRevision::CURRENT).contains(&self)
    }
}

/// Where a VM's guest memory comes from. The file-backed forms let every VM restored from one boot
/// template share the template's pages until it writes them, instead of each loading a private copy.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum GuestMemory {
    /// Private anonymous memory allocated by the VMM (cold boots, Firecracker).
    #[default]
    Anonymous,
    /// A boot template being built: guest memory is this file, mapped shared, so that the file
    /// holds the template's RAM once it is saved (the saved state then leaves the RAM out).
    TemplateFile(PathBuf),
    /// A VM restored from a template, or started again from a saved state of such a VM whose
    /// `SavedState::base` links the same memory file: a private, copy-on-write mapping of a
    /// sealed in-memory copy of the template's memory file. The VM can neither change the
    /// template nor punch holes into it; pages it never writes stay shared with its siblings. A
    /// thin saved state (`qemu/snapshot/thin.rs`) loads only the pages the VM had changed.
    FromTemplate(PathBuf),
    /// A VM started again from a state saved whole (no `base`: saved by an adopted VM whose run
    /// directory had no link to its template memory, or by a hearth from before thin states)
    /// that descends from the template whose memory file is named: private anonymous memory
    /// under the template backend's name, so that the state's RAM block matches; the template
    /// need not exist any more.
    Saved(PathBuf),
}

impl GuestMemory {
    /// Whether the VM has hearth's named memory backend (every form but [`Anonymous`]): saved
    /// states then leave a shared template file's RAM out (QEMU's `x-ignore-shared`), and loading
    /// one needs the same capability.
    ///
    /// [`Anonymous`]: GuestMemory::Anonymous
    pub fn has_memory_backend(&self) -> bool {
        !matches!(self, GuestMemory::Anonymous)
    }
}

impl VmSpec {
    /// A spec with hearth's defaults: 1 vCPU, 512 MiB, [`KernelCmdline::default`], no drives, agent
    /// socket and console log inside `run_dir`.
    pub fn new(
        kernel: impl Into<PathBuf>,
        initramfs: impl Into<PathBuf>,
        run_dir: impl Into<PathBuf>,
    ) -> Self {
        let run_dir = run_dir.into();
        VmSpec {
            kernel: kernel.into(),
            initramfs: initramfs.into(),
            cmdline: KernelCmdline::default(),
            vcpus: 1,
            memory_mib: 512,
            drives: Vec::new(),
            agent_socket: run_dir.join("agent.sock"),
            console_log: run_dir.join("console.log"),
            run_dir,
            detached: false,
            restore_from: None,
            network: None,
            memory: GuestMemory::Anonymous,
            machine: MachineRevision::CURRENT,
        }
    }

    /// Checks what every backend relies on; backends call it before rendering anything.
    pub fn validate(&self) -> Result<(), SpecError> {
        if self.vcpus == 0 || self.vcpus > 255 {
            return Err(SpecError::Vcpus(self.vcpus));
        }
        if self.memory_mib < 64 {
            return Err(SpecError::Memory(self.memory_mib));
        }
        for drive in &self.drives {
            drive.validate()?;
        }
        for (i, drive) in self.drives.iter().enumerate() {
            if self.drives[..i].iter().any(|d| d.serial == drive.serial) {
                return Err(SpecError::DuplicateSerial(drive.serial.clone()));
            }
        }
        if let Some(network) = &self.network {
            network.validate()?;
        }
        if !self.machine.is_known() {
            return Err(SpecError::Machine(self.machine.0));
        }
        for socket in [&self.agent_socket, &self.run_dir.join("qmp.sock")] {
            if socket.as_os_str().len() > MAX_UNIX_SOCKET_PATH {
                return Err(SpecError::SocketPathTooLong(socket.clone()));
            }
        }
        Ok(())
    }
}

/// The guest's network interface: a virtio-net device whose host end is an existing tap device.
/// Creating the tap (and the namespace, addresses and firewall around it) is the caller's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetworkInterface {
    /// The host tap device's name: 1 to 15 characters from `[A-Za-z0-9_.-]` (IFNAMSIZ).
    pub tap: String,
    /// The guest's MAC address, `xx:xx:xx:xx:xx:xx`, unicast.
    pub mac: String,
    /// The network namespace (a bind-mounted nsfs file, e.g. `$HEARTH_HOME/net/ID/netns`) the VMM
    /// process runs in, where `tap` lives; `None`: the VMM's own (the host's) namespace.
    pub netns: Option<PathBuf>,
}

impl NetworkInterface {
    fn validate(&self) -> Result<(), SpecError> {
        let tap_ok = (1..=15).contains(&self.tap.len())
            && self
                .tap
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b));
        if !tap_ok {
            return Err(SpecError::Tap(self.tap.clone()));
        }
        let octets: Vec<Option<u8>> = self
            .mac
            .split(':')
            .map(|o| {
                (o.len() == 2)
                    .then(|| u8::from_str_radix(o, 16).ok())
                    .flatten()
            })
            .collect();
        let unicast = matches!(octets.first(), Some(Some(first)) if first & 1 == 0);
        if octets.len() != 6 || octets.iter().any(Option::is_none) || !unicast {
            return Err(SpecError::Mac(self.mac.clone()));
        }
        Ok(())
    }
}

/// One virtio-blk disk.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drive {
    /// virtio-blk serial, also the drive id: `[A-Za-z0-9_-]`, at most 20 bytes.
    pub serial: String,
    pub path: PathBuf,
    pub read_only: bool,
}

impl Drive {
    pub fn new(serial: impl Into<String>, path: impl Into<PathBuf>, read_only: bool) -> Self {
        Drive {
            serial: serial.into(),
            path: path.into(),
            read_only,
        }
    }

    /// The shared read-only root filesystem image.
    pub fn rootfs(path: impl Into<PathBuf>) -> Self {
        Drive::new(ROOTFS_SERIAL, path, true)
    }

    /// The per-sandbox writable disk.
    pub fn scratch(path: impl Into<PathBuf>) -> Self {
        Drive::new(SCRATCH_SERIAL, path, false)
    }

    fn validate(&self) -> Result<(), SpecError> {
        let ok_chars = self
            .serial
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
        if self.serial.is_empty() || self.serial.len() > MAX_SERIAL_LEN || !ok_chars {
            return Err(SpecError::Serial(self.serial.clone()));
        }
        Ok(())
    }
}

/// A kernel command line as an ordered list of parameters.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KernelCmdline {
    params: Vec<String>,
}

impl Default for KernelCmdline {
    /// `console=ttyS0` keeps the console log useful for failure reports; `quiet` because every console
    /// byte is an emulated UART write; `panic=-1` turns a guest panic (e.g. PID 1 dying) into a reset,
    /// which ends the VMM (it runs with no-reboot semantics) instead of leaving a hung guest;
    /// `cryptomgr.notests` skips the crypto self-tests, measured at ~0.4 s of a ~1.8 s TCG floor boot
    /// (a sandbox guest is no FIPS target).
    fn default() -> Self {
        KernelCmdline::from_params(["console=ttyS0", "quiet", "panic=-1", "cryptomgr.notests"])
    }
}

impl KernelCmdline {
    pub fn empty() -> Self {
        KernelCmdline { params: Vec::new() }
    }

    pub fn from_params<S: Into<String>>(params: impl IntoIterator<Item = S>) -> Self {
        KernelCmdline {
            params: params.into_iter().map(Into::into).collect(),
        }
    }

    /// Sets `param`, replacing in place an earlier one with the same key (`key=...` or bare `key`),
    /// so a backend or user setting wins over a default instead of both reaching the kernel.
    pub fn set(&mut self, param: impl Into<String>) -> &mut Self {
        let param = param.into();
        let key = Self::key(&param).to_owned();
        match self.params.iter().position(|p| Self::key(p) == key) {
            Some(i) => {
                self.params[i] = param;
                self.params.retain_mut({
                    let mut seen = false;
                    move |p| Self::key(p) != key || !std::mem::replace(&mut seen, true)
                });
            }
            None => self.params.push(param),
        }
        self
    }

    /// Removes every parameter with this key (`key=...` or bare `key`).
    pub fn remove(&mut self, key: &str) -> &mut Self {
        self.params.retain(|p| Self::key(p) != key);
        self
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|p| Self::key(p) == key)
            .map(String::as_str)
    }

    pub fn params(&self) -> &[String] {
        &self.params
    }

    pub fn render(&self) -> String {
        self.params.join(" ")
    }

    fn key(param: &str) -> &str {
        param.split_once('=').map_or(param, |(k, _)| k)
    }
}

impl std::fmt::Display for KernelCmdline {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.render())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid vCPU count {0}: use 1 to 255")]
    Vcpus(u32),
    #[error("invalid memory size {0} MiB: a guest needs at least 64 MiB")]
    Memory(u32),
    #[error("invalid drive serial {0:?}: use 1 to 20 characters from [A-Za-z0-9_-]")]
    Serial(String),
    #[error("two drives share the serial {0:?}: serials must be unique")]
    DuplicateSerial(String),
    #[error(
        "socket path {0} is longer than 107 bytes: choose a shorter HEARTH_HOME or run directory"
    )]
    SocketPathTooLong(PathBuf),
    #[error("invalid tap device name {0:?}: use 1 to 15 characters from [A-Za-z0-9_.-]")]
    Tap(String),
    #[error("invalid MAC address {0:?}: use six hex pairs like 06:00:ac:10:00:02, unicast")]
    Mac(String),
    #[error(
        "machine revision {0} is unknown to this hearth (it runs 1 to {current}): the VM was \
         saved by a newer hearth; start it with that one",
        current = MachineRevision::CURRENT.0
    )]
    Machine(u32),
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn new_vms_get_the_current_machine_and_unknown_revisions_are_refused() {
        let mut spec = VmSpec::new("/k", "/i", "/r");
        assert_eq!(spec.machine, MachineRevision::CURRENT);
        spec.machine = MachineRevision::WITH_PIT;
        spec.validate().unwrap();
        for unknown in [0, MachineRevision::CURRENT.0 + 1] {
            spec.machine = MachineRevision(unknown);
            let e = spec.validate().unwrap_err().to_string();
            assert!(e.contains("newer hearth"), "{e}");
        }
    }

    #[test]
    fn network_interfaces_need_a_tap_name_and_a_unicast_mac() {
        let mut spec = VmSpec::new("/k", "/i", "/r");
        let nic = |tap: &str, mac: &str| {
            Some(NetworkInterface {
                tap: tap.into(),
                mac: mac.into(),
                netns: None,
            })
        };
        spec.network = nic("hearth-tap0", "06:00:ac:10:00:02");
        spec.validate().unwrap();
        for (tap, mac, bad) in [
            ("", "06:00:ac:10:00:02", "tap"),
            ("a-name-far-too-long", "06:00:ac:10:00:02", "tap"),
            ("tap;rm", "06:00:ac:10:00:02", "tap"),
            ("tap0", "07:00:ac:10:00:02", "MAC"),
            ("tap0", "06:00:ac:10:00", "MAC"),
            ("tap0", "06:00:ac:10:00:zz", "MAC"),
            ("tap0", "6:00:ac:10:00:02:", "MAC"),
        ] {
            spec.network = nic(tap, mac);
            let err = spec.validate().unwrap_err().to_string();
            assert!(err.contains(bad), "{tap} {mac}: {err}");
        }
    }

    #[test]
    fn default_cmdline_has_console_and_panic_reset() {
        let line = KernelCmdline::default().render();
        assert!(line.split(' ').any(|p| p == "console=ttyS0"), "{line}");
        assert!(line.split(' ').any(|p| p == "panic=-1"), "{line}");
        assert!(
            !line.contains("acpi=off"),
            "devices are found through ACPI: {line}"
        );
    }

    #[test]
    fn set_replaces_a_parameter_with_the_same_key() {
        let mut cmdline = KernelCmdline::from_params(["console=ttyS0", "quiet", "panic=-1"]);
        cmdline
            .set("panic=5")
            .set("quiet")
            .set("tsc_early_khz=2300000");
        assert_eq!(
            cmdline.render(),
            "console=ttyS0 quiet panic=5 tsc_early_khz=2300000"
        );
        assert_eq!(cmdline.get("tsc_early_khz"), Some("tsc_early_khz=2300000"));
        assert_eq!(cmdline.get("nope"), None);
        cmdline.remove("quiet").remove("absent");
        assert_eq!(
            cmdline.render(),
            "console=ttyS0 panic=5 tsc_early_khz=2300000"
        );
    }

    #[test]
    fn spec_defaults_put_sockets_in_the_run_dir() {
        let spec = VmSpec::new("/k/vmlinux", "/k/initrd", "/home/run/vm1");
        assert_eq!(spec.agent_socket, Path::new("/home/run/vm1/agent.sock"));
        assert_eq!(spec.console_log, Path::new("/home/run/vm1/console.log"));
        spec.validate().unwrap();
    }

    #[test]
    fn validation_rejects_bad_serials_and_long_socket_paths() {
        let mut spec = VmSpec::new("/k", "/i", "/run/x");
        spec.drives = vec![Drive::new("has,comma", "/d", true)];
        assert!(matches!(spec.validate(), Err(SpecError::Serial(_))));
        spec.drives = vec![Drive::new("a-serial-that-is-too-long", "/d", true)];
        assert!(matches!(spec.validate(), Err(SpecError::Serial(_))));
        spec.drives = vec![Drive::rootfs("/a"), Drive::rootfs("/b")];
        assert!(matches!(
            spec.validate(),
            Err(SpecError::DuplicateSerial(_))
        ));
        let long = VmSpec::new("/k", "/i", format!("/{}", "r".repeat(120)));
        assert!(matches!(
            long.validate(),
            Err(SpecError::SocketPathTooLong(_))
        ));
    }
}
