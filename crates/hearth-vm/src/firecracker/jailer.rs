//! Running Firecracker through its `jailer`: the jailer's argument vector (chroot, uid/gid drop,
//! cgroup v2 CPU and memory limits, optional network namespace, new PID namespace, rlimits), the
//! chroot's preparation (hard links of the kernel, initramfs and disks, files owned by the jailed
//! user) and the removal of the cgroup the jailer leaves behind. Touches only the VM's chroot (under
//! its run directory) and the VM's own cgroup directory.

use std::path::{Path, PathBuf};

use super::layout::Layout;
use crate::vmm::VmError;
use crate::VmSpec;

/// Memory the Firecracker process needs beyond guest RAM (its own heap, device queues, page
/// tables); the cgroup limit is guest memory plus this. Firecracker documents its own overhead as
/// a few MiB; the margin keeps a busy guest's VMM from being OOM-killed by its own limit.
const VMM_OVERHEAD_MIB: u64 = 64;
/// cgroup v2 `cpu.max` period in microseconds (the kernel default).
const CPU_PERIOD_US: u64 = 100_000;
const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// How to jail Firecracker.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailerConfig {
    pub binary: PathBuf,
    /// The unprivileged user and group Firecracker runs as.
    pub uid: u32,
    pub gid: u32,
    /// `--chroot-base-dir`; `None` puts the jail in `<run_dir>/jail`, removed with the run dir.
    pub chroot_base: Option<PathBuf>,
    /// `--netns`: a network namespace path such as `/var/run/netns/NAME`.
    pub netns: Option<PathBuf>,
    /// Firecracker in a new PID namespace. hearth's guard process (`crate::guard`) creates it and is
    /// its PID 1, rather than the jailer's own `--new-pid-ns`: that jailer exits after forking, and
    /// the Firecracker it leaves (its parent-death signal cleared by the uid change) would outlive
    /// a `kill -9`ed hearth. Under the guard it dies with hearth.
    pub new_pid_ns: bool,
    /// `--resource-limit no-file=N`.
    pub max_open_files: u64,
}

impl JailerConfig {
    pub fn new(binary: impl Into<PathBuf>, uid: u32, gid: u32) -> Self {
        JailerConfig {
            binary: binary.into(),
            uid,
            gid,
            chroot_base: None,
            netns: None,
            new_pid_ns: true,
            max_open_files: 2048,
        }
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
        let memory_max = (u64::from(spec.memory_mib) + VMM_OVERHEAD_MIB) * 1024 * 1024;
        let cpu_quota = u64::from(spec.vcpus) * CPU_PERIOD_US;
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
            "2",
            "--cgroup",
            &format!("cpu.max={cpu_quota} {CPU_PERIOD_US}"),
            "--cgroup",
            &format!("memory.max={memory_max}"),
            "--resource-limit",
            &format!("no-file={}", self.max_open_files),
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        if let Some(netns) = &self.netns {
            args.extend(["--netns".into(), netns.to_string_lossy().into_owned()]);
        }
        args.push("--".into());
        args.extend(firecracker_args);
        args
    }

    /// Creates the chroot root, hard-links the VM's inputs into it and hands the root, the writable
    /// disks and Firecracker's log and metrics files to the jailed user.
    pub fn prepare(&self, spec: &VmSpec, layout: &Layout) -> Result<(), VmError> {
        let Some(root) = layout.chroot_root() else {
            return Ok(());
        };
        std::fs::create_dir_all(root).map_err(io("creating the jail", root))?;
        for (source, target) in layout.jail_inputs(spec) {
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
        Ok(())
    }
}

/// The jailer's cgroup for this VM (`<root>/<exec-file-name>/<id>`), which it does not remove.
pub fn cgroup_dir(exec_file_name: &str, id: &str) -> PathBuf {
    Path::new(CGROUP_ROOT).join(exec_file_name).join(id)
}

/// The jailer `--id` for a run directory: its name reduced to `[A-Za-z0-9-]`, at most 64 bytes.
pub fn vm_id(run_dir: &Path) -> Result<String, VmError> {
    let name = run_dir
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let id: String = name
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
        .take(64)
        .collect();
    if id.trim_matches('-').is_empty() {
        return Err(VmError::Unsupported(format!(
            "cannot derive a Firecracker VM id from the run directory {}: name it with letters or digits",
            run_dir.display()
        )));
    }
    Ok(id)
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
    }

    #[test]
    fn vm_ids_are_sanitized_run_dir_names() {
        assert_eq!(vm_id(Path::new("/h/run/sb_01.x")).unwrap(), "sb-01-x");
        assert!(vm_id(Path::new("/")).is_err());
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
        let jailer = JailerConfig::new("jailer", uid, gid);
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
