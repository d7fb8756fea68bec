//! Running Firecracker through its `jailer`: the jailer's argument vector (chroot, uid/gid drop,
//! CPU and memory limits, optional network namespace, rlimits), the chroot's preparation (hard
//! links of the kernel, initramfs and disks, which the jailed user must be able to read; files
//! owned by the jailed user) and where the cgroups it leaves behind are. The limits follow the
//! host's cgroup layout (`jailer/cgroup.rs`): v1 keys where cpu and memory are v1 hierarchies (v2
//! keys fail there with "Controller cpu is unavailable"), v2 keys where the unified hierarchy
//! offers them. `jailer/vm_id.rs` holds the `--id` rule. Touches only the VM's chroot (under its
//! run directory).

mod cgroup;
mod vm_id;

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub use cgroup::{CgroupLayout, NoCgroupLayout};
pub use vm_id::{check_vm_id, vm_id, InvalidVmId, MAX_VM_ID_LEN};

use super::layout::Layout;
use crate::confine::PendingLease;
use crate::spec::VmSpec;
use crate::vmm::VmError;

/// Memory the Firecracker process needs beyond guest RAM (its own heap, device queues, page
/// tables); the cgroup limit is guest memory plus this. Firecracker documents its own overhead as
/// a few MiB; the margin keeps a busy guest's VMM from being OOM-killed by its own limit.
const VMM_OVERHEAD_MIB: u64 = 64;
/// CPU bandwidth period in microseconds (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;

/// How to jail Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub binary: PathBuf,
    /// The unprivileged user and group Firecracker runs as.
    pub uid: u32,
    pub gid: u32,
    /// Set by [`JailerConfig::per_vm`]: `uid` and `gid` are this VM's own, leased from
    /// `crate::confine::uid`; the lease passes to the VM's run directory in [`JailerConfig::prepare`]
    /// and ends with the VM (it is among [`JailerConfig::cgroup_dirs`]). Such a config serves one VM.
    pub uid_lease: Option<Arc<PendingLease>>,
    /// `--chroot-base-dir`; `None` puts the jail in `<run_dir>/jail`, removed with the run dir.
    pub chroot_base: Option<PathBuf>,
    /// `--netns`: a network namespace path such as `/var/run/netns/NAME`. The VM's own
    /// [`crate::NetworkInterface::netns`], when set, takes precedence: its tap lives there.
    pub netns: Option<PathBuf>,
    /// Firecracker in a new PID namespace. hearth's guard process (`crate::process::guard`) creates it and is
    /// its PID 1, rather than the jailer's own `--new-pid-ns`: that jailer exits after forking, and
    /// the Firecracker it leaves (its parent-death signal cleared by the uid change) would outlive
    /// a `kill -9`ed hearth. Under the guard it dies with hearth.
    pub new_pid_ns: bool,
    /// `--resource-limit no-file=N`.
    pub max_open_files: u64,
    /// The host's cgroup layout, detected by [`JailerConfig::new`]; `None` when the host has no
    /// usable one. Then the argv shows v2 limits (so `--dry-run` works anywhere) and
    /// [`JailerConfig::prepare`] refuses to start, saying why.
    pub cgroups: Option<CgroupLayout>,
}

impl JailerConfig {
    /// Jails as `uid`:`gid` with the defaults and the cgroup layout of this host.
    pub fn new(binary: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailerConfig {
            binary: binary.into(),
            uid,
            gid,
            uid_lease: None,
            chroot_base: None,
            netns: None,
            new_pid_ns: true,
            max_open_files: 2048,
            cgroups: CgroupLayout::detect().ok(),
        }
    }

    /// Jails one VM as a uid and gid of its own (leased now, from the range every confined VMM's
    /// uid comes from), so that no two jailed VMs share a user.
    pub fn per_vm(binary: impl Into<PathBuf>) -> Result<Self, VmError> {
        let lease = PendingLease::take().map_err(|source| VmError::Io {
            what: "leasing a uid for the jailed VMM in",
            path: PathBuf::from(crate::confine::LEASE_DIR),
            source,
        })?;
        let mut config = JailerConfig::new(binary, lease.uid(), lease.uid());
        config.uid_lease = Some(Arc::new(lease));
        Ok(config)
    }

    pub fn chroot_base(&self, spec: &VmSpec) -> PathBuf {
        self.chroot_base
            .clone()
            .unwrap_or_else(|| spec.run_dir.join("jail"))
    }

    /// The jailer's argv; `firecracker_args` follow `--` and go to Firecracker unchanged.
    pub fn render(
        &self,
        spec: &VmSpec,
        firecracker: &Path,
        id: &str,
        firecracker_args: Vec<String>,
    ) -> Vec<String> {
        debug_assert_eq!(check_vm_id(id), Ok(()), "ids come from vm_id");
        let memory = (u64::from(spec.memory_mib) + VMM_OVERHEAD_MIB) * 1024 * 1024;
        let cpu_quota = u64::from(spec.vcpus) * CPU_PERIOD_US;
        // Without a usable layout, show what a v2 host would get; `prepare` refuses to start.
        let assumed = CgroupLayout::V2 {
            root: PathBuf::from("/sys/fs/cgroup"),
        };
        let cgroups = self.cgroups.as_ref().unwrap_or(&assumed);
        let version = cgroups.version().to_string();
        let mut args: Vec<String> = [
            "--id",
            id,
            "--exec-file",
            &firecracker.to_string_lossy(),
            "--uid",
            &self.uid.to_string(),
            "--gid",
            &self.gid.to_string(),
            "--chroot-base-dir",
            &self.chroot_base(spec).to_string_lossy(),
            "--cgroup-version",
            &version,
            "--resource-limit",
            &format!("no-file={}", self.max_open_files),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        for limit in cgroups.limits(cpu_quota, CPU_PERIOD_US, memory) {
            args.extend(["--cgroup".to_owned(), limit]);
        }
        let spec_netns = spec.network.as_ref().and_then(|nic| nic.netns.as_ref());
        if let Some(netns) = spec_netns.or(self.netns.as_ref()) {
            args.extend(["--netns".into(), netns.to_string_lossy().into_owned()]);
        }
        args.push("--".into());
        args.extend(firecracker_args);
        args
    }

    /// Creates the chroot root, hard-links the VM's inputs into it and hands the root, the writable
    /// disks and Firecracker's log and metrics files to the jailed user. Fails first, saying why,
    /// if there is no cgroup layout the jailer can use.
    pub fn prepare(&self, spec: &VmSpec, layout: &Layout) -> Result<(), VmError> {
        let Some(root) = layout.chroot_root() else {
            return Ok(());
        };
        if self.cgroups.is_none() {
            let reason = CgroupLayout::detect().err().map_or_else(
                || "no cgroup layout was given".to_owned(),
                |e| e.to_string(),
            );
            return Err(VmError::Unsupported(format!(
                "the jailer cannot limit this VM: {reason}"
            )));
        }
        std::fs::create_dir_all(root).map_err(io("creating the jail", root))?;
        if let Some(state) = &spec.restore_from {
            // A snapshot is written by the uid of the VM that was saved, which is not this one's;
            // several fork children may restore it at once, so it is made readable rather than
            // given to one of them. Only processes that can reach it see it: hearth's home is
            // root's, and each jailed Firecracker sees nothing but its own chroot.
            for file in [state.clone(), super::layout::snapshot_memory(state)] {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o444))
                    .map_err(io("making the snapshot readable", &file))?;
            }
        }
        let writable_disks: Vec<&Path> = spec
            .drives
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| d.path.as_path())
            .collect();
        for (source, target) in layout.jail_inputs(spec) {
            if !writable_disks.contains(&source.as_path()) {
                self.check_readable(&source)?;
            }
            // A hard link keeps the shared rootfs image shared; a copy would cost its full size.
            std::fs::hard_link(&source, &target).map_err(|e| VmError::Io {
                what: "hard-linking into the jail (the jail must be on the same filesystem as \
                       HEARTH_HOME; set the chroot base inside it)",
                path: source.clone(),
                source: e,
            })?;
        }
        let writable = spec
            .drives
            .iter()
            .filter(|d| !d.read_only)
            .map(|d| root.join(format!("{}.img", d.serial)));
        let own_files = [layout.host_log(), layout.host_metrics()];
        for path in &own_files {
            std::fs::File::create(path).map_err(io("creating", path))?;
        }
        for path in std::iter::once(root.to_owned())
            .chain(writable)
            .chain(own_files)
        {
            std::os::unix::fs::chown(&path, Some(self.uid), Some(self.gid))
                .map_err(io("handing to the jailed user", &path))?;
        }
        if let Some(lease) = &self.uid_lease {
            // The VM's run directory keeps the uid from now on; a second VM must not share it.
            let holder = std::fs::read(lease.file()).unwrap_or_default();
            let mine = holder.is_empty() || holder.starts_with(b"/proc/");
            if !mine {
                return Err(VmError::Unsupported(format!(
                    "uid {} was leased for one jailed VM and is in use by {}: a per-VM jailer                      configuration serves one VM",
                    self.uid,
                    String::from_utf8_lossy(&holder)
                )));
            }
            lease
                .hand_over(&spec.run_dir)
                .map_err(io("handing the uid lease to the VM", lease.file()))?;
        }
        Ok(())
    }

    /// A read-only input is shared through a hard link, so its own mode decides whether the
    /// jailed Firecracker can open it; say so here rather than as Firecracker's bare "Permission
    /// denied" on `PUT /boot-source` or `/drives`.
    fn check_readable(&self, path: &Path) -> Result<(), VmError> {
        use std::os::unix::fs::MetadataExt;
        let meta = std::fs::metadata(path).map_err(io("reading the metadata of", path))?;
        if readable_by(meta.mode(), meta.uid(), meta.gid(), self.uid, self.gid) {
            return Ok(());
        }
        Err(VmError::Io {
            what: "the jailed Firecracker cannot read",
            path: path.to_owned(),
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                format!(
                    "its mode {:o} and owner {}:{} keep the jailed user {}:{} out; make it \
                     readable for that user (e.g. chmod o+r)",
                    meta.mode() & 0o7777,
                    meta.uid(),
                    meta.gid(),
                    self.uid,
                    self.gid
                ),
            ),
        })
    }

    /// The cgroup directories the jailer creates for this VM and does not remove: one per
    /// hierarchy, `<hierarchy>/<exec-file-name>/<id>` (`--parent-cgroup` defaults to the exec
    /// file's name). Empty when the host has no usable layout (the jailer never starts then).
    /// With a per-VM uid, its lease file follows them (removed the same way once the VM is gone).
    pub fn cgroup_dirs(&self, exec_file_name: &str, id: &str) -> Vec<PathBuf> {
        let mut leftovers = self
            .cgroups
            .as_ref()
            .map(|cgroups| cgroups.dirs(exec_file_name, id))
            .unwrap_or_default();
        if let Some(lease) = &self.uid_lease {
            leftovers.push(lease.file().to_owned());
        }
        leftovers
    }
}

/// Whether a file of `mode` owned by `owner`:`group` is readable by `uid`:`gid` without
/// supplementary groups (the jailer's `Command::uid` drops them). Only the first matching class
/// counts, as in the kernel: an owner without read permission cannot read even if others can.
fn readable_by(mode: u32, owner: u32, group: u32, uid: u32, gid: u32) -> bool {
    if uid == 0 {
        return true;
    }
    let bits = if uid == owner {
        mode >> 6
    } else if gid == group {
        mode >> 3
    } else {
        mode
    };
    bits & 0o4 != 0
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> VmError + 'a {
    move |source| VmError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_support::values;

    #[test]
    fn renders_limits_from_the_spec_and_passes_firecracker_args_after_the_separator() {
        let mut spec = VmSpec::new("/k", "/i", "/h/run/vm_1");
        spec.vcpus = 2;
        spec.memory_mib = 512;
        let mut jailer = JailerConfig::new("/usr/bin/jailer", 1234, 1235);
        jailer.cgroups = Some(CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        });
        jailer.netns = Some("/var/run/netns/hearth".into());
        let args = jailer.render(
            &spec,
            Path::new("/usr/bin/firecracker"),
            "vm-1",
            vec!["--api-sock".into(), "/firecracker.sock".into()],
        );
        assert_eq!(values(&args, "--id"), ["vm-1"]);
        assert_eq!(values(&args, "--exec-file"), ["/usr/bin/firecracker"]);
        assert_eq!(values(&args, "--uid"), ["1234"]);
        assert_eq!(values(&args, "--gid"), ["1235"]);
        assert_eq!(values(&args, "--chroot-base-dir"), ["/h/run/vm_1/jail"]);
        assert_eq!(values(&args, "--cgroup-version"), ["2"]);
        assert_eq!(
            values(&args, "--cgroup"),
            ["cpu.max=200000 100000", "memory.max=603979776"]
        );
        assert_eq!(values(&args, "--netns"), ["/var/run/netns/hearth"]);
        assert_eq!(values(&args, "--resource-limit"), ["no-file=2048"]);
        // The PID namespace comes from hearth's guard, not the jailer (see `new_pid_ns`).
        assert!(!args.contains(&"--new-pid-ns".to_string()));
        let separator = args.iter().position(|a| a == "--").unwrap();
        assert_eq!(args[separator + 1..], ["--api-sock", "/firecracker.sock"]);
        // The VM's own namespace, where its tap is, wins over the configured one.
        let mut networked = spec.clone();
        networked.network = Some(crate::NetworkInterface {
            tap: "tap0".into(),
            mac: "06:00:00:00:00:01".into(),
            netns: Some("/h/net/vm/netns".into()),
        });
        let own = jailer.render(
            &networked,
            Path::new("/usr/bin/firecracker"),
            "vm-1",
            vec![],
        );
        assert_eq!(values(&own, "--netns"), ["/h/net/vm/netns"]);
    }

    #[test]
    fn v1_hosts_get_v1_keys_and_a_cgroup_per_hierarchy() {
        let mut spec = VmSpec::new("/k", "/i", "/h/run/vm1");
        spec.vcpus = 2;
        spec.memory_mib = 512;
        let mut jailer = JailerConfig::new("/usr/bin/jailer", 1, 1);
        jailer.cgroups = Some(CgroupLayout::V1 {
            cpu: "/sys/fs/cgroup/cpu".into(),
            memory: "/sys/fs/cgroup/memory".into(),
            pids: None,
        });
        let args = jailer.render(&spec, Path::new("/usr/bin/firecracker"), "vm1", vec![]);
        assert_eq!(values(&args, "--cgroup-version"), ["1"]);
        assert_eq!(
            values(&args, "--cgroup"),
            [
                "cpu.cfs_quota_us=200000",
                "cpu.cfs_period_us=100000",
                "memory.limit_in_bytes=603979776"
            ]
        );
        assert_eq!(
            jailer.cgroup_dirs("firecracker", "vm1"),
            [
                PathBuf::from("/sys/fs/cgroup/cpu/firecracker/vm1"),
                PathBuf::from("/sys/fs/cgroup/memory/firecracker/vm1"),
            ]
        );
        jailer.cgroups = Some(CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        });
        assert_eq!(
            jailer.cgroup_dirs("firecracker", "vm1"),
            [PathBuf::from("/sys/fs/cgroup/firecracker/vm1")]
        );
    }

    #[test]
    fn without_a_usable_layout_the_argv_still_renders_but_the_start_is_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let spec = VmSpec::new("/k", "/i", tmp.path().join("run"));
        let mut jailer = JailerConfig::new("jailer", 1, 1);
        jailer.cgroups = None;
        let args = jailer.render(&spec, Path::new("firecracker"), "run", vec![]);
        assert_eq!(values(&args, "--cgroup-version"), ["2"]);
        assert!(jailer.cgroup_dirs("firecracker", "run").is_empty());
        let layout = Layout::jailed(&spec, &jailer.chroot_base(&spec), "firecracker", "run");
        let error = jailer.prepare(&spec, &layout).unwrap_err();
        assert!(error.to_string().contains("cannot limit"), "{error}");
    }

    #[test]
    fn readability_follows_the_first_matching_class() {
        assert!(readable_by(0o644, 0, 0, 65534, 65534));
        assert!(!readable_by(0o600, 0, 0, 65534, 65534));
        assert!(readable_by(0o640, 0, 65534, 65534, 65534));
        assert!(readable_by(0o400, 65534, 0, 65534, 65534));
        assert!(!readable_by(0o044, 65534, 0, 65534, 65534));
        assert!(readable_by(0o000, 5, 5, 0, 0));
    }

    #[test]
    fn inputs_the_jailed_user_cannot_read_are_refused_with_the_reason() {
        use std::os::unix::fs::PermissionsExt;
        if !crate::test_support::is_root() {
            return; // files of another owner need root
        }
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        let initrd = tmp.path().join("initrd");
        for file in [&kernel, &initrd] {
            std::fs::write(file, b"x").unwrap();
        }
        std::fs::set_permissions(&kernel, std::fs::Permissions::from_mode(0o600)).unwrap();
        let spec = VmSpec::new(&kernel, &initrd, tmp.path().join("run"));
        let mut jailer = JailerConfig::new("jailer", 65534, 65534);
        jailer.cgroups = Some(CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        });
        let layout = Layout::jailed(&spec, &jailer.chroot_base(&spec), "firecracker", "run");
        let error = jailer.prepare(&spec, &layout).unwrap_err().to_string();
        assert!(error.contains("vmlinux"), "{error}");
        assert!(error.contains("mode 600"), "{error}");
        assert!(error.contains("65534:65534"), "{error}");
    }

    #[test]
    fn prepare_links_inputs_and_creates_log_files() {
        let tmp = tempfile::tempdir().unwrap();
        let kernel = tmp.path().join("vmlinux");
        let initrd = tmp.path().join("initrd");
        let scratch = tmp.path().join("scratch.ext4");
        for file in [&kernel, &initrd, &scratch] {
            std::fs::write(file, b"x").unwrap();
        }
        let mut spec = VmSpec::new(&kernel, &initrd, tmp.path().join("run"));
        spec.drives = vec![crate::Drive::scratch(&scratch)];
        let (uid, gid) = (
            nix::unistd::getuid().as_raw(),
            nix::unistd::getgid().as_raw(),
        );
        let mut jailer = JailerConfig::new("jailer", uid, gid);
        jailer.cgroups = Some(CgroupLayout::V2 {
            root: "/sys/fs/cgroup".into(),
        });
        let layout = Layout::jailed(&spec, &jailer.chroot_base(&spec), "firecracker", "run");
        jailer.prepare(&spec, &layout).unwrap();
        let root = layout.chroot_root().unwrap();
        use std::os::unix::fs::MetadataExt;
        let linked = std::fs::metadata(root.join("hearth-scratch.img")).unwrap();
        assert_eq!(linked.ino(), std::fs::metadata(&scratch).unwrap().ino());
        assert!(root.join("kernel").is_file() && root.join("initrd").is_file());
        assert!(layout.host_log().is_file() && layout.host_metrics().is_file());
    }
}
