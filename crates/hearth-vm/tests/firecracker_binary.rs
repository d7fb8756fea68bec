//! The real Firecracker and jailer (built by `scripts/provision-firecracker.sh` into the test cache,
//! or `HEARTH_FIRECRACKER_BIN` / `HEARTH_JAILER_BIN`): hearth's whole configuration, in API mode, as
//! a `--config-file` and through the jailer, up to and including InstanceStart; what Firecracker
//! then holds (`GET /vm/config`); nothing left behind after stop; and the resource-id rule the
//! swagger file does not state but the binary enforces. Skipped with the reason when the binaries
//! are absent. Where KVM boots guests (`HEARTH_TEST_KVM=1`) the guest must be running; elsewhere
//! (nested PVM) Firecracker may die of a KVM internal error after InstanceStart, and then the test
//! requires that failure to be reported rather than hidden behind exit status 0.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use hearth_vm::firecracker::config::{ActionType, ApiRequest};
use hearth_vm::firecracker::jailer::CgroupLayout;
use hearth_vm::firecracker::{
    ConfigMode, FirecrackerApi, FirecrackerError, FirecrackerVmm, JailerConfig, Layout,
    RunningFirecracker, GUEST_MODULES,
};
use hearth_vm::initramfs::InitramfsBuilder;
use hearth_vm::kernel::{resolve_modules, KernelDir};
use hearth_vm::{Drive, RunningVm, VmSpec, Vmm};
use serde_json::{json, Value};
use support::tap::Tap;

mod support;

const IDLE_SCRIPT: &str = "#!/bin/busybox sh\nexec /bin/busybox sleep 600\n";
/// The jailed user and group: `nobody` / `nogroup`.
const NOBODY: u32 = 65534;

fn firecracker() -> Option<PathBuf> {
    hearth_testkit::firecracker_bin()
        .inspect_err(|reason| hearth_testkit::skip(reason))
        .ok()
}

/// The real Firecracker and jailer, when present and when this runs as root (chroot, cgroups, uid
/// drop); `None`, said as a skip, otherwise.
fn jail_binaries() -> Option<(PathBuf, PathBuf)> {
    let bins = hearth_testkit::firecracker_bins()
        .inspect_err(|reason| hearth_testkit::skip(reason))
        .ok()?;
    if !hearth_testkit::is_root() {
        hearth_testkit::skip("the jailer needs root (chroot, cgroups, uid drop)");
        return None;
    }
    Some(bins)
}

/// Points `spec` at copies of its kernel and initramfs in `home` that a jailed user can read: they
/// are hard-linked into the jail, which must share their filesystem, and hearth's cached vmlinux
/// and initramfs are written 0600.
fn jail_readable_inputs(spec: &mut VmSpec, home: &Path) -> anyhow::Result<()> {
    for input in [&mut spec.kernel, &mut spec.initramfs] {
        let copy = home.join(input.file_name().unwrap());
        if !copy.exists() {
            std::fs::copy(&*input, &copy)?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644))?;
        }
        *input = copy;
    }
    Ok(())
}

fn kvm_boots_guests() -> bool {
    std::env::var("HEARTH_TEST_KVM").as_deref() == Ok("1")
}

/// An idle guest (busybox as /init plus the backend's modules) with hearth's two drives.
fn idle_spec(home: &Path, name: &str) -> anyhow::Result<VmSpec> {
    let kernel = KernelDir::open(hearth_testkit::kernel_dir())?;
    let modules = resolve_modules(&kernel.modules_dir().expect("modules/"), GUEST_MODULES)?;
    let mut builder = InitramfsBuilder::new();
    builder.file("init", 0o755, IDLE_SCRIPT.as_bytes().to_vec());
    builder.file("bin/busybox", 0o755, std::fs::read("/bin/busybox")?);
    builder.modules(&modules)?;
    let initramfs = builder.write_cached(home)?;
    let mut spec = VmSpec::new(kernel.vmlinux()?, initramfs, home.join("run").join(name));
    spec.console_log = home.join(format!("{name}.console"));
    // Sparse 8 MiB disks: the guest never reads them; Firecracker opens and sizes them.
    let disk = |file: &str| -> anyhow::Result<PathBuf> {
        let path = home.join(format!("{name}-{file}"));
        std::fs::File::create(&path)?.set_len(8 << 20)?;
        Ok(path)
    };
    spec.drives = vec![
        Drive::rootfs(disk("rootfs.ext4")?),
        Drive::scratch(disk("scratch.ext4")?),
    ];
    Ok(spec)
}

/// Firecracker's own view of its configuration (`GET /vm/config`); `None` only where the guest
/// may already have died of a KVM error (see [`running_or_reported_dead`]).
fn firecrackers_config(api: &FirecrackerApi) -> Option<Value> {
    match api.call(&ApiRequest::get("/vm/config")) {
        Ok(response) => Some(response.body.unwrap_or(Value::Null)),
        Err(e) => {
            assert!(
                !kvm_boots_guests(),
                "GET /vm/config failed on a KVM host: {e}"
            );
            eprintln!("GET /vm/config failed, the VM may have died already: {e}");
            None
        }
    }
}

/// What hearth configured is what Firecracker holds: machine, kernel and initrd, both drives with
/// their valid ids and read-only flags, the vsock.
fn assert_holds_hearths_config(held: &Value, spec: &VmSpec, vmm: &FirecrackerVmm) {
    let sent = vmm.vm_config(spec).expect("config");
    assert_eq!(held["machine-config"]["vcpu_count"], spec.vcpus, "{held}");
    assert_eq!(held["machine-config"]["mem_size_mib"], spec.memory_mib);
    assert_eq!(
        held["boot-source"]["initrd_path"],
        json!(sent.boot_source.initrd_path),
        "{held}"
    );
    // Firecracker may list them in another order; the guest tells them apart by read-only flag.
    let mut drives: Vec<(&str, bool)> = held["drives"]
        .as_array()
        .expect("drives")
        .iter()
        .map(|d| {
            let id = d["drive_id"].as_str().unwrap_or_default();
            (id, d["is_read_only"].as_bool().unwrap_or_default())
        })
        .collect();
    drives.sort();
    assert_eq!(
        drives,
        [("hearth_rootfs", true), ("hearth_scratch", false)],
        "{held}"
    );
    assert_eq!(
        held["vsock"]["uds_path"],
        json!(sent.vsock.uds_path),
        "{held}"
    );
}

/// InstanceStart succeeded: the VM is Running, or (only without a KVM that boots guests) it has
/// already died and said why. Then stops it.
fn running_or_reported_dead(vm: &mut RunningFirecracker, id: &str) -> anyhow::Result<()> {
    match vm.api().instance_info() {
        Ok(info) => {
            assert_eq!(info.state, "Running", "{info:?}");
            assert_eq!(info.id, id);
            eprintln!("{id}: {info:?}");
            let exit = vm.stop(Duration::from_secs(1))?;
            if kvm_boots_guests() {
                assert_eq!(exit.failure, None, "{exit:?}");
            }
            Ok(())
        }
        Err(e) => {
            assert!(!kvm_boots_guests(), "GET / failed on a KVM host: {e}");
            let exit = vm.wait_timeout(Duration::from_secs(5))?.expect("exited");
            assert!(
                exit.failure.is_some(),
                "died without a reported failure: {exit:?}"
            );
            eprintln!("{id}: died after InstanceStart: {exit:?}");
            Ok(())
        }
    }
}

fn process_exists(pid: u32) -> bool {
    stat_fields(pid).is_some_and(|fields| fields.first() != Some(&"Z".to_owned()))
}

/// Fields 3.. of `/proc/PID/stat` (state first, then ppid).
fn stat_fields(pid: u32) -> Option<Vec<String>> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    Some(rest.split_whitespace().map(str::to_owned).collect())
}

fn children_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|child| stat_fields(*child).is_some_and(|f| f.get(1) == Some(&pid.to_string())))
        .collect()
}

/// The `Uid:` or `Gid:` line of `/proc/PID/status`: real, effective, saved, filesystem.
fn ids(pid: u32, key: &str) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .map(|v| {
            v.split_whitespace()
                .filter_map(|n| n.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn api_mode_applies_hearths_whole_configuration_and_starts_the_instance() -> anyhow::Result<()> {
    let Some(binary) = firecracker() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let mut spec = idle_spec(home.path(), "api")?;
    // A real tap: Firecracker opens it when the interface is configured.
    let tap = Tap::create("hth-f");
    spec.network = tap.as_ref().map(|tap| hearth_vm::NetworkInterface {
        tap: tap.name.clone(),
        mac: "06:00:ac:10:00:03".into(),
        netns: None,
    });
    let vmm = FirecrackerVmm::new(binary);
    // start() sends logger, metrics, machine-config, boot-source, both drives, the network
    // interface and the vsock, then InstanceStart; any refusal fails it.
    let mut vm = vmm.start_firecracker(&spec)?;
    let pid = vm.pid();
    assert!(matches!(
        vm.agent_endpoint(),
        hearth_vm::AgentEndpoint::HybridVsock { port: 1024, .. }
    ));
    if let Some(held) = firecrackers_config(vm.api()) {
        assert_holds_hearths_config(&held, &spec, &vmm);
        // Started with an empty environment: nothing of this test's (or a daemon's) to read. (A
        // jailed Firecracker's jailer empties its own as well.)
        assert!(std::env::vars_os().next().is_some());
        let environ = std::fs::read(format!("/proc/{pid}/environ"))?;
        assert!(
            environ.is_empty(),
            "Firecracker's environment: {}",
            String::from_utf8_lossy(&environ)
        );
        if let Some(tap) = &tap {
            let nic = &held["network-interfaces"][0];
            assert_eq!(nic["iface_id"], "eth0", "{held}");
            assert_eq!(nic["host_dev_name"], tap.name.as_str(), "{held}");
            assert_eq!(nic["guest_mac"], "06:00:ac:10:00:03", "{held}");
        }
        // The logger and the metrics took: Firecracker writes both files.
        let layout = Layout::plain(&spec);
        vm.api()
            .call(&ApiRequest::action(ActionType::FlushMetrics))?;
        let metrics = std::fs::read_to_string(layout.host_metrics())?;
        assert!(metrics.contains("\"api_server\""), "{metrics}");
        let log = std::fs::read_to_string(layout.host_log())?;
        assert!(log.contains("InstanceStart"), "{log}");
    }
    running_or_reported_dead(&mut vm, "api")?;
    assert!(!spec.run_dir.exists(), "run dir left behind");
    assert!(!process_exists(pid), "firecracker pid {pid} still alive");
    Ok(())
}

/// Firecracker's own snapshots, with the real binary, as far as this machine lets them go: a
/// started VM is paused and saved (a full snapshot: device state and guest memory, moved into the
/// save directory), and a fresh Firecracker restores it into another run directory (the load with
/// that VM's vsock socket, both drives re-pointed at its files, resumed), which Firecracker's own
/// `GET /vm/config` must then show. Where the guest may already have died of a KVM internal error
/// (nested PVM) and the save is refused, the VM must have reported that death.
#[test]
fn a_started_vm_saves_a_full_snapshot_that_a_fresh_firecracker_restores_elsewhere(
) -> anyhow::Result<()> {
    let Some(binary) = firecracker() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let spec = idle_spec(home.path(), "saved")?;
    let vmm = FirecrackerVmm::new(binary);
    let mut vm = vmm.start_firecracker(&spec)?;
    let dir = home.path().join("snapshot");
    let saved = match vm.save_state(&dir) {
        Ok(saved) => saved,
        Err(e) => {
            assert!(!kvm_boots_guests(), "saving failed on a KVM host: {e}");
            let exit = vm.wait_timeout(Duration::from_secs(5))?.expect("exited");
            assert!(
                exit.failure.is_some(),
                "save refused ({e}) but no failure: {exit:?}"
            );
            hearth_testkit::skip(&format!(
                "the guest died before it could be saved ({:?}); the save said: {e}",
                exit.failure
            ));
            return Ok(());
        }
    };
    assert_eq!(saved.state, dir.join("vmstate"));
    let memory = std::fs::metadata(dir.join("memory"))?.len();
    assert_eq!(
        memory,
        u64::from(spec.memory_mib) << 20,
        "the memory file holds all of it"
    );
    assert!(saved.bytes > memory, "{saved:?}");
    assert_eq!(
        vm.api().instance_info()?.state,
        "Paused",
        "a saved VM stays paused"
    );
    drop(vm);

    let mut restored = idle_spec(home.path(), "restored")?;
    restored.restore_from = Some(saved.state.clone());
    let mut vm = vmm.start_firecracker(&restored)?;
    eprintln!(
        "firecracker save of {} MiB: {:?}; restore (load, drives, resume): {:?}",
        spec.memory_mib,
        saved.took,
        vm.restored_in()
    );
    assert!(vm.restored_in().is_some());
    if let Some(held) = firecrackers_config(vm.api()) {
        let scratch = held["drives"]
            .as_array()
            .expect("drives")
            .iter()
            .find(|d| d["drive_id"] == "hearth_scratch")
            .cloned()
            .unwrap_or_default();
        assert_eq!(
            scratch["path_on_host"],
            json!(restored.drives[1].path.to_string_lossy()),
            "the restored VM writes its own scratch disk, not the saved VM's: {held}"
        );
        assert_eq!(
            held["vsock"]["uds_path"],
            json!(restored.agent_socket.to_string_lossy()),
            "{held}"
        );
    }
    running_or_reported_dead(&mut vm, "restored")?;
    assert!(
        dir.join("vmstate").is_file() && dir.join("memory").is_file(),
        "the snapshot stays"
    );
    Ok(())
}

/// The same through the jailer, restored by a VM of another uid (hearth gives each VM its own):
/// the snapshot is written inside the saving VM's chroot, moved out, and linked into the
/// restoring VM's chroot under names a later save of that VM cannot overwrite.
#[test]
fn a_jailed_vm_saves_and_a_jailed_vm_of_another_uid_restores_it() -> anyhow::Result<()> {
    let Some((binary, jailer)) = jail_binaries() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let jailed_spec = |name: &str| -> anyhow::Result<VmSpec> {
        let mut spec = idle_spec(home.path(), name)?;
        jail_readable_inputs(&mut spec, home.path())?;
        Ok(spec)
    };
    let spec = jailed_spec("jsaved")?;
    let saver =
        FirecrackerVmm::new(&binary).with_jailer(JailerConfig::new(&jailer, NOBODY, NOBODY));
    let mut vm = saver.start_firecracker(&spec)?;
    let dir = home.path().join("jsnapshot");
    let saved = match vm.save_state(&dir) {
        Ok(saved) => saved,
        Err(e) => {
            assert!(!kvm_boots_guests(), "saving failed on a KVM host: {e}");
            hearth_testkit::skip(&format!("the jailed guest could not be saved here: {e}"));
            return Ok(());
        }
    };
    drop(vm);
    let mut restored = jailed_spec("jrestored")?;
    restored.restore_from = Some(saved.state.clone());
    let other = NOBODY - 1;
    let restorer =
        FirecrackerVmm::new(&binary).with_jailer(JailerConfig::new(&jailer, other, other));
    let mut vm = restorer.start_firecracker(&restored)?;
    assert!(vm.restored_in().is_some());
    let exec_name = binary.file_name().unwrap().to_string_lossy().into_owned();
    let chroot = Layout::jailed(
        &restored,
        &JailerConfig::new(&jailer, other, other).chroot_base(&restored),
        &exec_name,
        "jrestored",
    );
    let root = chroot.chroot_root().unwrap().to_owned();
    assert!(root.join("restore.vmstate").is_file() && root.join("restore.memory").is_file());
    // A save of the restored VM writes `vmstate`/`memory` in its chroot, never its inputs.
    let again = home.path().join("jsnapshot-again");
    if vm.save_state(&again).is_ok() {
        assert!(again.join("vmstate").is_file());
        assert_eq!(
            std::fs::read(dir.join("vmstate"))?.len() as u64,
            std::fs::metadata(&saved.state)?.len()
        );
    }
    drop(vm);
    assert!(
        dir.join("vmstate").is_file() && dir.join("memory").is_file(),
        "the snapshot stays"
    );
    assert!(!restored.run_dir.exists(), "run dir left behind");
    Ok(())
}

#[test]
fn a_config_file_start_matches_its_dry_run_starts_and_cleans_up() -> anyhow::Result<()> {
    let Some(binary) = firecracker() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let spec = idle_spec(home.path(), "file")?;
    let vmm = FirecrackerVmm::new(binary).with_config_mode(ConfigMode::ConfigFile);
    let plan = vmm.dry_run(&spec)?;
    let mut vm = vmm.start_firecracker(&spec)?;
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", vm.pid()))?;
    let args: Vec<String> = cmdline
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    assert_eq!(
        args[1..],
        plan.args[..],
        "started with other arguments than dry_run showed"
    );
    let written = std::fs::read_to_string(&plan.files[0].0)?;
    assert_eq!(written, plan.files[0].1);
    if let Some(held) = firecrackers_config(vm.api()) {
        assert_holds_hearths_config(&held, &spec, &vmm);
    }
    running_or_reported_dead(&mut vm, "file")?;
    assert!(!spec.run_dir.exists());
    Ok(())
}

#[test]
fn the_real_binary_refuses_resource_ids_outside_its_rule() -> anyhow::Result<()> {
    let Some(binary) = firecracker() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let socket = home.path().join("fc.sock");
    let mut firecracker = Killed(
        Command::new(&binary)
            .args(["--api-sock".as_ref(), socket.as_os_str()])
            .args(["--id", "idrule"])
            .stdout(std::fs::File::create(home.path().join("stdout"))?)
            .stderr(std::fs::File::create(home.path().join("stderr"))?)
            .spawn()?,
    );
    let api = FirecrackerApi::new(&socket);
    let started = Instant::now();
    while api.instance_info().is_err() {
        assert!(firecracker.0.try_wait()?.is_none(), "firecracker exited");
        assert!(started.elapsed() < Duration::from_secs(10), "no API socket");
        std::thread::sleep(Duration::from_millis(10));
    }
    let disk = home.path().join("disk");
    std::fs::File::create(&disk)?.set_len(1 << 20)?;
    let drive = |id: &str| json!({"drive_id": id, "path_on_host": disk, "is_root_device": false, "is_read_only": true});
    // The serial hearth once sent as drive_id.
    let refused = api.send(&ApiRequest::put(
        "/drives/hearth-rootfs",
        &drive("hearth-rootfs"),
    ))?;
    assert_eq!(refused.status, 400, "{refused:?}");
    assert_eq!(
        refused.body.as_ref().unwrap()["fault_message"],
        "API Resource IDs can only contain alphanumeric characters and underscores.",
    );
    // The ids hearth sends now, from the same serials.
    for serial in [hearth_vm::ROOTFS_SERIAL, hearth_vm::SCRATCH_SERIAL] {
        let id = hearth_vm::firecracker::config::ResourceId::from_name(serial);
        let accepted = api.send(&ApiRequest::put(
            format!("/drives/{id}"),
            &drive(id.as_str()),
        ))?;
        assert_eq!(accepted.status, 204, "{id}: {accepted:?}");
    }
    Ok(())
}

/// A child killed and reaped when the test ends, however it ends.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_missing_kernel_is_rejected_with_firecrackers_reason_and_nothing_remains() -> anyhow::Result<()>
{
    let Some(binary) = firecracker() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let mut spec = idle_spec(home.path(), "nokernel")?;
    spec.kernel = home.path().join("no-such-vmlinux");
    let error = FirecrackerVmm::new(binary)
        .start(&spec)
        .err()
        .expect("start must fail");
    assert!(
        matches!(
            error.backend_error::<FirecrackerError>(),
            Some(FirecrackerError::Config { .. })
        ),
        "{error}"
    );
    assert!(error.to_string().contains("/boot-source"), "{error}");
    assert!(!spec.run_dir.exists(), "run dir left behind");
    Ok(())
}

#[test]
fn a_jailed_vm_runs_as_nobody_in_its_chroot_and_leaves_no_run_dir_or_cgroup_behind(
) -> anyhow::Result<()> {
    let Some((binary, jailer)) = jail_binaries() else {
        return Ok(());
    };
    let home = tempfile::tempdir()?;
    let mut spec = idle_spec(home.path(), "jailed")?;
    spec.vcpus = 2;
    spec.memory_mib = 256;
    jail_readable_inputs(&mut spec, home.path())?;
    let jail = JailerConfig::new(jailer, NOBODY, NOBODY);
    let layout = CgroupLayout::detect()?;
    assert_eq!(jail.cgroups.as_ref(), Some(&layout));
    let vmm = FirecrackerVmm::new(&binary).with_jailer(jail.clone());
    let plan = vmm.dry_run(&spec)?;
    let version = layout.version().to_string();
    assert!(
        plan.args
            .windows(2)
            .any(|w| w == ["--cgroup-version", &version]),
        "{plan}"
    );
    let mut vm = vmm.start_firecracker(&spec)?;
    let guard = vm.pid();
    let exec_name = binary.file_name().unwrap().to_string_lossy().into_owned();
    let cgroups = jail.cgroup_dirs(&exec_name, "jailed");
    assert!(!cgroups.is_empty());
    let mut firecracker = None;
    if let Some(held) = firecrackers_config(vm.api()) {
        assert_holds_hearths_config(&held, &spec, &vmm);
        // The guard's one child is Firecracker (the jailer execs it): nobody, chrooted, limited.
        let fc = *children_of(guard)
            .first()
            .expect("firecracker under the guard");
        firecracker = Some(fc);
        assert_eq!(ids(fc, "Uid:"), [NOBODY; 4]);
        assert_eq!(ids(fc, "Gid:"), [NOBODY; 4]);
        let exe = std::fs::read_link(format!("/proc/{fc}/exe"))?;
        assert_eq!(
            exe,
            Path::new("/").join(&exec_name),
            "runs the copy in its chroot"
        );
        let chroot = Layout::jailed(&spec, &jail.chroot_base(&spec), &exec_name, "jailed");
        let root = chroot.chroot_root().unwrap();
        assert!(
            root.join("firecracker.sock").exists(),
            "API socket in the chroot"
        );
        assert!(
            root.join(&exec_name).exists(),
            "the jailer copies Firecracker into the chroot"
        );
        for dir in &cgroups {
            let tasks = std::fs::read_to_string(dir.join(match layout {
                CgroupLayout::V1 { .. } => "tasks",
                CgroupLayout::V2 { .. } => "cgroup.procs",
            }))?;
            assert!(
                tasks.lines().any(|t| t == fc.to_string()),
                "{} holds {tasks}",
                dir.display()
            );
        }
        let memory = (256 + 64) << 20;
        // 2 vCPUs of CPU time per period; guest memory plus the VMM's overhead.
        let read = |dir: &Path, file: &str| std::fs::read_to_string(dir.join(file));
        let (first, last) = (&cgroups[0], cgroups.last().unwrap());
        match &layout {
            CgroupLayout::V1 { .. } => {
                assert_eq!(read(first, "cpu.cfs_quota_us")?.trim(), "200000");
                assert_eq!(read(first, "cpu.cfs_period_us")?.trim(), "100000");
                let limit = read(last, "memory.limit_in_bytes")?;
                assert_eq!(limit.trim(), memory.to_string());
            }
            CgroupLayout::V2 { .. } => {
                assert_eq!(read(first, "cpu.max")?.trim(), "200000 100000");
                assert_eq!(read(first, "memory.max")?.trim(), memory.to_string());
            }
        }
    }
    running_or_reported_dead(&mut vm, "jailed")?;
    for dir in &cgroups {
        assert!(!dir.exists(), "cgroup {} left behind", dir.display());
    }
    assert!(!spec.run_dir.exists(), "run dir left behind");
    assert!(!process_exists(guard), "guard pid {guard} still alive");
    if let Some(fc) = firecracker {
        assert!(!process_exists(fc), "firecracker pid {fc} still alive");
    }
    Ok(())
}
