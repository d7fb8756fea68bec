//! VMM confinement, tried as an attacker who has taken over QEMU would (issue #12, item 10). TCG
//! is no security boundary: a guest that escapes into its VMM holds whatever QEMU holds. Real QEMU
//! under TCG, booted as `hearth` boots it; the attacker's moves are made through QMP, whose
//! commands make QEMU open host files and spawn programs exactly as injected code would:
//! - QEMU runs as a uid of its own, not root, with no capabilities, under seccomp (`Seccomp: 2`),
//!   chrooted into an empty directory inside its run directory, in a cgroup of its own whose memory
//!   and task limits are set; two VMs never share a uid.
//! - Opening a file outside its run directory fails: `blockdev-add` of a 0600 file of
//!   `$HEARTH_HOME` and of the world-readable `/etc/passwd` (only the chroot stops that one); the
//!   uid could not read the 0600 file anyway.
//! - QEMU's environment is empty: a secret in its starter's is not there to read.
//! - Spawning a program fails: `migrate` to `exec:...` kills QEMU (seccomp `spawn=deny`) and the
//!   program never runs.
//! - When the VM ends, its cgroup and its uid lease are gone.
//!
//! A VM whose network interface names a network namespace gets its VMM started inside it: the
//! tap that exists only there is the one QEMU holds, and no tap of that name appears on the host.
//!
//! And Firecracker through the jailer with a uid per VM (`--jailer auto`, the default as root):
//! two jailed VMs run as two different uids of the range, a per-VM configuration refuses a second
//! VM, and the leases end with the VMs. Firecracker cannot boot a guest here: that test
//! goes as far as InstanceStart (see firecracker_binary.rs) and skips without the binaries.
//!
//! Needs root (the confinement is root's to set up); skipped with a reason otherwise.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context};
use hearth_vm::confine::VMM_OVERHEAD_MIB;
use hearth_vm::confine::{pids_max, CGROUP_PARENT, CHROOT_DIR, FIRST_UID, LEASE_DIR, UID_COUNT};
use hearth_vm::initramfs::InitramfsBuilder;
use hearth_vm::kernel::KernelDir;
use hearth_vm::qemu::{QemuVmm, RunningQemu};
use hearth_vm::{Accel, RunningVm, VmSpec};
use serde_json::json;

/// A guest that idles: the attacks come from the VMM side.
const IDLE_SCRIPT: &str = "#!/bin/busybox sh\nexec /bin/busybox sleep 600\n";
const MEMORY_MIB: u32 = 256;

struct Fixture {
    home: tempfile::TempDir,
    vmlinux: PathBuf,
    initramfs: PathBuf,
    qemu: QemuVmm,
}

fn fixture() -> anyhow::Result<Option<Fixture>> {
    if !hearth_testkit::is_root() {
        hearth_testkit::skip("VMM confinement is set up by root only");
        return Ok(None);
    }
    let home = tempfile::tempdir()?;
    std::fs::set_permissions(home.path(), std::fs::Permissions::from_mode(0o700))?;
    let kernel = KernelDir::open(hearth_testkit::kernel_dir())?;
    let vmlinux = kernel.vmlinux()?;
    let (qemu, _) = QemuVmm::for_host(home.path(), Accel::Tcg, &vmlinux)?;
    let mut builder = InitramfsBuilder::new();
    builder.file("init", 0o755, IDLE_SCRIPT.as_bytes().to_vec());
    builder.file(
        "bin/busybox",
        0o755,
        std::fs::read("/bin/busybox").context("busybox-static")?,
    );
    let initramfs = builder.write_cached(home.path())?;
    Ok(Some(Fixture {
        home,
        vmlinux,
        initramfs,
        qemu,
    }))
}

impl Fixture {
    fn start(&self, name: &str) -> anyhow::Result<RunningQemu> {
        let mut spec = VmSpec::new(
            &self.vmlinux,
            &self.initramfs,
            self.home.path().join("run").join(name),
        );
        spec.memory_mib = MEMORY_MIB;
        Ok(self.qemu.start_qemu(&spec)?)
    }
}

/// QEMU's own pid: a confined QEMU is the only child of its guard process.
fn qemu_pid(vm: &RunningQemu) -> anyhow::Result<u32> {
    let guard = vm.pid();
    let children = std::fs::read_to_string(format!("/proc/{guard}/task/{guard}/children"))?;
    let pids: Vec<u32> = children
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(pids.len() == 1, "guard {guard} has children {pids:?}");
    Ok(pids[0])
}

fn status_field(pid: u32, field: &str) -> anyhow::Result<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(&format!("{field}:")))
        .map(|v| v.trim().to_owned())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// The uid all four of QEMU's uids (real, effective, saved, filesystem) are.
fn vmm_uid(pid: u32) -> anyhow::Result<u32> {
    let uids: Vec<u32> = status_field(pid, "Uid")?
        .split_whitespace()
        .map(str::parse)
        .collect::<Result<_, _>>()?;
    ensure!(
        uids.len() == 4 && uids.iter().all(|&u| u == uids[0]),
        "uids {uids:?}"
    );
    Ok(uids[0])
}

/// The VMM's cgroup directories (with the limit file each must hold), from `/proc/PID/cgroup`.
fn cgroup_limits(pid: u32) -> anyhow::Result<Vec<(PathBuf, &'static str)>> {
    let cgroups = std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?;
    let mut found = Vec::new();
    for line in cgroups.lines() {
        // "<id>:<controllers>:<path>"
        let mut fields = line.splitn(3, ':');
        let (_, controllers, path) = (fields.next(), fields.next(), fields.next());
        let (Some(controllers), Some(path)) = (controllers, path) else {
            continue;
        };
        let relative = path.trim_start_matches('/');
        let in_hearth = relative.starts_with(&format!("{CGROUP_PARENT}/vmm-"));
        match controllers {
            "memory" if in_hearth => found.push((
                Path::new("/sys/fs/cgroup/memory").join(relative),
                "memory.limit_in_bytes",
            )),
            "pids" if in_hearth => {
                found.push((Path::new("/sys/fs/cgroup/pids").join(relative), "pids.max"))
            }
            // All VMMs weigh as one group against the daemon: in the cpu hierarchy under hearth.
            "cpu" if in_hearth => {
                found.push((Path::new("/sys/fs/cgroup/cpu").join(relative), "cpu.shares"))
            }
            "" if in_hearth => {
                let dir = Path::new("/sys/fs/cgroup").join(relative);
                found.push((dir.clone(), "memory.max"));
                found.push((dir, "pids.max"));
            }
            _ => {}
        }
    }
    Ok(found)
}

fn read_trimmed(path: &Path) -> anyhow::Result<String> {
    Ok(std::fs::read_to_string(path)
        .with_context(|| format!("reading {}", path.display()))?
        .trim()
        .to_owned())
}

#[test]
fn a_taken_over_qemu_is_unprivileged_chrooted_limited_and_cannot_reach_host_files(
) -> anyhow::Result<()> {
    // A secret in the starter's environment, as a daemon's credentials may be (nextest runs each
    // test in a process of its own, and this one has started no other thread yet).
    std::env::set_var("HEARTH_TEST_DAEMON_SECRET", "s3cr3t");
    let Some(fx) = fixture()? else {
        return Ok(());
    };
    // A secret of the tenant's home, as hearth keeps every file there: 0600, root's.
    let secret = fx.home.path().join("images.json");
    std::fs::write(&secret, "{\"secret\": true}")?;
    std::fs::set_permissions(&secret, std::fs::Permissions::from_mode(0o600))?;

    let mut first = fx.start("first")?;
    let mut second = fx.start("second")?;
    let (pid, other) = (qemu_pid(&first)?, qemu_pid(&second)?);
    let run_dir = first.process().run_dir().to_owned();

    // Who QEMU is.
    let uid = vmm_uid(pid)?;
    assert_ne!(uid, 0, "QEMU runs as root");
    assert!(
        (FIRST_UID..FIRST_UID + UID_COUNT).contains(&uid),
        "uid {uid} outside hearth's VMM range"
    );
    assert_eq!(
        status_field(pid, "Gid")?.split_whitespace().next(),
        Some(uid.to_string().as_str())
    );
    assert_eq!(
        status_field(pid, "Groups")?,
        uid.to_string(),
        "supplementary groups"
    );
    assert_eq!(status_field(pid, "Seccomp")?, "2", "no seccomp filter");
    assert_eq!(status_field(pid, "NoNewPrivs")?, "1");
    assert_eq!(status_field(pid, "CapEff")?, "0000000000000000");
    assert_eq!(status_field(pid, "CapPrm")?, "0000000000000000");
    // Nothing of the starter's environment (the secret, PATH, HOME, cargo's variables) is QEMU's.
    let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
    assert!(
        environ.is_empty(),
        "QEMU's environment: {}",
        String::from_utf8_lossy(&environ)
    );
    // An emulating QEMU asks for huge pages on its translation cache; hearth turns them off (each
    // would pin 2 MiB of host memory for a few KiB of translated code).
    assert_eq!(status_field(pid, "THP_enabled")?, "0", "huge pages left on");
    let other_uid = vmm_uid(other)?;
    assert_ne!(other_uid, uid, "two VMs share a uid");
    assert!(Path::new(LEASE_DIR).join(uid.to_string()).is_file());

    // Where QEMU is: an empty chroot inside its run directory.
    let root = std::fs::read_link(format!("/proc/{pid}/root"))?;
    assert_eq!(root, run_dir.join(CHROOT_DIR));
    let visible: Vec<_> = std::fs::read_dir(format!("/proc/{pid}/root"))?.collect();
    assert!(visible.is_empty(), "the chroot shows {visible:?}");
    assert!(!Path::new(&format!("/proc/{pid}/root/etc/passwd")).exists());

    // What QEMU may use: its cgroup's limits.
    let limits = cgroup_limits(pid)?;
    let memory_limit = (u64::from(MEMORY_MIB) + VMM_OVERHEAD_MIB) << 20;
    assert!(
        limits.iter().any(|(_, f)| f.starts_with("memory")),
        "QEMU is in no hearth memory cgroup: {}",
        std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?
    );
    assert!(
        limits.iter().any(|(_, f)| *f == "pids.max"),
        "no pids cgroup"
    );
    if Path::new("/sys/fs/cgroup/cpu/cpu.shares").exists() {
        assert!(
            limits.iter().any(|(_, f)| *f == "cpu.shares"),
            "QEMU is outside hearth's cpu cgroup: {}",
            std::fs::read_to_string(format!("/proc/{pid}/cgroup"))?
        );
    }
    for (dir, file) in &limits {
        let expected = match *file {
            "pids.max" => pids_max(1).to_string(),
            "cpu.shares" => "1024".to_owned(),
            _ => memory_limit.to_string(),
        };
        assert_eq!(
            read_trimmed(&dir.join(file))?,
            expected,
            "{}",
            dir.display()
        );
    }
    let cgroup_dirs: Vec<PathBuf> = limits.iter().map(|(d, _)| d.clone()).collect();

    // Attack: open host files through QEMU (blockdev-add opens the file in QEMU's process).
    let qmp = first.qmp().context("QMP")?;
    for (node, target) in [
        ("steal-secret", secret.as_path()),
        ("steal-passwd", Path::new("/etc/passwd")),
    ] {
        let opened = qmp.execute(
            "blockdev-add",
            Some(json!({
                "node-name": node,
                "driver": "raw",
                "read-only": true,
                "file": {"driver": "file", "filename": target.to_string_lossy()},
            })),
        );
        let error = opened.expect_err(&format!("QEMU opened {}", target.display()));
        // The chroot is an empty directory the uid cannot even search: nothing resolves in it.
        assert!(
            error.to_string().contains("Permission denied"),
            "{}: {error}",
            target.display()
        );
    }
    // And even with the path in reach, the uid could not read the secret.
    let read_as_vmm = Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={uid}"),
            "--clear-groups",
            "cat",
        ])
        .arg(&secret)
        .output()?;
    assert!(
        !read_as_vmm.status.success(),
        "the VMM's uid read {}",
        secret.display()
    );

    // Attack: spawn a program (the `exec:` migration forks a shell). Seccomp kills QEMU instead.
    let pwned = fx.home.path().join("pwned");
    let _ = qmp.execute(
        "migrate",
        Some(json!({"uri": format!("exec:touch {}", pwned.display())})),
    );
    let exit = first
        .process_mut()
        .wait_timeout(Duration::from_secs(10))?
        .context("QEMU survived spawning a program")?;
    assert!(!pwned.exists(), "QEMU ran a program");
    assert!(!exit.status.success(), "{exit:?}");

    // Gone with the VM: its cgroup, its uid lease, its run directory.
    for dir in &cgroup_dirs {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(
        !Path::new(LEASE_DIR).join(uid.to_string()).exists(),
        "uid lease left"
    );
    assert!(!run_dir.exists());

    // The other VM ran on; a clean stop also removes everything.
    let second_cgroups: Vec<PathBuf> = cgroup_limits(other)?.into_iter().map(|(d, _)| d).collect();
    let peak = second_cgroups
        .iter()
        .find_map(|d| {
            ["memory.max_usage_in_bytes", "memory.peak"]
                .iter()
                .find_map(|f| read_trimmed(&d.join(f)).ok())
        })
        .unwrap_or_default();
    eprintln!("VMM memory peak: {peak} bytes (limit {memory_limit})");
    assert!(second.qmp().context("QMP")?.query_status()? == "running");
    second.stop(Duration::ZERO)?;
    for dir in &second_cgroups {
        assert!(!dir.exists(), "cgroup {} left", dir.display());
    }
    assert!(!Path::new(LEASE_DIR).join(other_uid.to_string()).exists());
    Ok(())
}

#[test]
fn jailed_firecrackers_of_a_per_vm_configuration_run_as_distinct_uids() -> anyhow::Result<()> {
    use hearth_vm::firecracker::{FirecrackerVmm, JailerConfig, Layout};
    use hearth_vm::Drive;
    let (binary, jailer) = match hearth_testkit::firecracker_bins() {
        Ok(bins) => bins,
        Err(reason) => {
            hearth_testkit::skip(&reason);
            return Ok(());
        }
    };
    let Some(fx) = fixture()? else {
        return Ok(());
    };
    // The jail hard-links its inputs, so they must be readable by the jailed uid.
    let readable = |from: &Path, name: &str| -> anyhow::Result<PathBuf> {
        let copy = fx.home.path().join(name);
        std::fs::copy(from, &copy)?;
        std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644))?;
        Ok(copy)
    };
    let kernel = readable(&fx.vmlinux, "jail-vmlinux")?;
    let initramfs = readable(&fx.initramfs, "jail-initramfs.cpio")?;
    let exec_name = binary.file_name().unwrap().to_string_lossy().into_owned();
    let mut vms = Vec::new();
    for name in ["fc-one", "fc-two"] {
        let mut spec = VmSpec::new(&kernel, &initramfs, fx.home.path().join("run").join(name));
        let disk = fx.home.path().join(format!("{name}.ext4"));
        std::fs::File::create(&disk)?.set_len(8 << 20)?;
        spec.drives = vec![Drive::scratch(&disk)];
        let jail = JailerConfig::per_vm(&jailer)?;
        let uid = jail.uid;
        assert!((FIRST_UID..FIRST_UID + UID_COUNT).contains(&uid), "{uid}");
        assert_eq!(jail.gid, uid);
        let lease = Path::new(LEASE_DIR).join(uid.to_string());
        assert!(lease.is_file(), "uid {uid} is leased");
        let vmm = FirecrackerVmm::new(&binary).with_jailer(jail.clone());
        let vm = vmm.start_firecracker(&spec)?;
        // The jail (the chroot) belongs to the VM's own uid.
        let layout = Layout::jailed(&spec, &jail.chroot_base(&spec), &exec_name, name);
        let root = layout.chroot_root().context("a jailed layout")?;
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::metadata(root)?.uid(), uid);
        assert_eq!(
            std::fs::read(&lease)?,
            spec.run_dir.as_os_str().as_encoded_bytes(),
            "the lease passed to the VM's run directory"
        );
        // One configuration, one VM: a second VM on it would share the uid.
        let mut again = spec.clone();
        again.run_dir = fx.home.path().join("run").join(format!("{name}-again"));
        let refused = vmm
            .start_firecracker(&again)
            .err()
            .context("a second VM started")?;
        assert!(refused.to_string().contains("serves one VM"), "{refused}");
        vms.push((vm, uid, lease));
    }
    assert_ne!(vms[0].1, vms[1].1, "two jailed VMs share a uid");
    for (mut vm, uid, lease) in vms {
        vm.kill()?;
        assert!(!lease.exists(), "uid {uid}'s lease outlived its VM");
    }
    Ok(())
}

/// `ip ARGS...`, failing with its stderr.
fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output()?;
    ensure!(
        out.status.success(),
        "ip {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// A named network namespace with one tap in it, removed on drop.
struct NetnsWithTap {
    name: String,
    tap: String,
}

impl NetnsWithTap {
    fn create() -> anyhow::Result<NetnsWithTap> {
        let name = format!("hearth-confine-{}", std::process::id());
        let tap = format!("hcf{}", std::process::id() % 100_000);
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let made = NetnsWithTap { name, tap };
        made.ip(&["tuntap", "add", "dev", &made.tap, "mode", "tap"])?;
        made.ip(&["link", "set", &made.tap, "up"])?;
        Ok(made)
    }

    fn ip(&self, args: &[&str]) -> anyhow::Result<()> {
        let mut all = vec!["-n", self.name.as_str()];
        all.extend_from_slice(args);
        ip(&all)
    }

    fn path(&self) -> PathBuf {
        Path::new("/var/run/netns").join(&self.name)
    }

    /// The tap's carrier inside the namespace: up exactly while a VMM holds it.
    fn attached(&self) -> anyhow::Result<bool> {
        let out = Command::new("ip")
            .args(["-n", &self.name, "-o", "link", "show", &self.tap])
            .output()?;
        let line = String::from_utf8_lossy(&out.stdout).into_owned();
        Ok(!line.contains("NO-CARRIER") && line.contains("LOWER_UP"))
    }
}

impl Drop for NetnsWithTap {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

#[test]
fn a_vmm_runs_in_its_vms_network_namespace_and_finds_its_tap_there() -> anyhow::Result<()> {
    let Some(fx) = fixture()? else {
        return Ok(());
    };
    let netns = NetnsWithTap::create()?;
    let mut spec = VmSpec::new(
        &fx.vmlinux,
        &fx.initramfs,
        fx.home.path().join("run").join("netns"),
    );
    spec.network = Some(hearth_vm::NetworkInterface {
        tap: netns.tap.clone(),
        mac: "06:00:ac:10:00:02".into(),
        netns: Some(netns.path()),
    });
    assert!(!netns.attached()?, "nothing holds the tap yet");
    let mut vm = fx.qemu.start_qemu(&spec)?;
    let pid = qemu_pid(&vm)?;
    let inside = std::fs::read_link(format!("/proc/{pid}/ns/net"))?;
    let ns_file = std::fs::metadata(netns.path())?;
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        inside,
        PathBuf::from(format!("net:[{}]", ns_file.ino())),
        "QEMU is not in the VM's namespace"
    );
    assert!(netns.attached()?, "QEMU does not hold the namespace's tap");
    assert!(
        !Path::new("/sys/class/net").join(&netns.tap).exists(),
        "QEMU made a tap of that name on the host"
    );
    vm.kill()?;
    assert!(
        !netns.attached()?,
        "the tap stayed attached after the VM ended"
    );
    Ok(())
}
