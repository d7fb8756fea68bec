//! Real boots of the guest kernel with the QEMU backend under TCG (each costs a few seconds of CPU, so
//! there are few): a busybox initramfs that loads hearth's module set and writes a line into the
//! agent port; the floor initramfs; start-up failure; graceful stop (after which a pause or resume
//! says the VM is gone); saving a running VM to a file
//! and restoring it; `kill -9` of the process that started QEMU; and the KVM probe's verdict on
//! this host.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context};
use hearth_vm::accel::KvmProbe;
use hearth_vm::initramfs::floor::{floor_initramfs, FLOOR_MARKER};
use hearth_vm::initramfs::InitramfsBuilder;
use hearth_vm::kernel::{resolve_modules, KernelDir};
use hearth_vm::qemu::KvmBootProbe;
use hearth_vm::qemu::{QemuVmm, GUEST_MODULES};
use hearth_vm::{remove_stale_run_dirs, Accel, RunningVm, VmError, VmSpec, Vmm};
use support::tap::Tap;

mod support;

const HELPER_HOME: &str = "HEARTH_VM_TEST_HELPER_HOME";
const HELPER_INITRAMFS: &str = "HEARTH_VM_TEST_HELPER_INITRAMFS";

/// Loads the modules the way the agent will, finds the `hearth.agent` port by name and writes a line.
const HELLO_SCRIPT: &str = r#"#!/bin/busybox sh
bb=/bin/busybox
$bb mount -t proc proc /proc
$bb mount -t sysfs sys /sys
$bb mount -t devtmpfs dev /dev
while read -r module; do $bb insmod "$module" || echo "insmod $module failed"; done < /etc/hearth/modules
for p in /sys/class/virtio-ports/*; do
  if [ "$($bb cat "$p/name")" = hearth.agent ]; then port=/dev/${p##*/}; fi
done
echo "hearth-test: hello from $($bb uname -r)" > "$port"
$bb reboot -f
"#;

/// A guest whose memory changes visibly: a counter printed to the console five times a second.
const TICK_SCRIPT: &str = "#!/bin/busybox sh\ni=0\nwhile :; do i=$((i+1)); echo \"tick $i\"; /bin/busybox usleep 200000; done\n";

/// A guest that idles, for tests that end the VM from the host.
const IDLE_SCRIPT: &str = "#!/bin/busybox sh\nexec /bin/busybox sleep 600\n";

struct Fixture {
    home: tempfile::TempDir,
    kernel: KernelDir,
    vmlinux: PathBuf,
    qemu: QemuVmm,
}

fn fixture() -> anyhow::Result<Fixture> {
    let home = tempfile::tempdir()?;
    let kernel = KernelDir::open(hearth_testkit::kernel_dir())?;
    let vmlinux = kernel.vmlinux()?;
    let (qemu, selection) = QemuVmm::for_host(home.path(), Accel::Tcg, &vmlinux)?;
    ensure!(selection.accel == Accel::Tcg);
    Ok(Fixture {
        home,
        kernel,
        vmlinux,
        qemu,
    })
}

impl Fixture {
    fn busybox_initramfs(&self, script: &str) -> anyhow::Result<PathBuf> {
        let modules_dir = self
            .kernel
            .modules_dir()
            .context("kernel dir has no modules/")?;
        let modules = resolve_modules(&modules_dir, GUEST_MODULES)?;
        let mut builder = InitramfsBuilder::new();
        builder.file("init", 0o755, script.as_bytes().to_vec());
        builder.file(
            "bin/busybox",
            0o755,
            std::fs::read("/bin/busybox").context("busybox-static")?,
        );
        builder.modules(&modules)?;
        Ok(builder.write_cached(self.home.path())?)
    }

    /// Console logs default to the run dir, which is removed on exit; tests keep theirs outside it.
    fn spec(&self, initramfs: &Path, name: &str) -> VmSpec {
        let mut spec = VmSpec::new(
            &self.vmlinux,
            initramfs,
            self.home.path().join("run").join(name),
        );
        spec.console_log = self.home.path().join(format!("{name}.console"));
        spec
    }
}

#[test]
fn guest_loads_modules_and_writes_to_the_agent_port_then_qemu_exits_on_reboot() -> anyhow::Result<()>
{
    let fx = fixture()?;
    let spec = fx.spec(&fx.busybox_initramfs(HELLO_SCRIPT)?, "hello");
    let started = Instant::now();
    // Started from a thread that exits at once: QEMU must outlive it (PDEATHSIG is per thread, so
    // hearth forks VMMs from its long-lived spawner thread). The guest writes its line seconds later.
    let mut vm = {
        let (qemu, spec) = (fx.qemu.clone(), spec.clone());
        std::thread::spawn(move || qemu.start_qemu(&spec))
            .join()
            .expect("start thread")?
    };
    let vmm_started = started.elapsed();

    let qmp = vm.qmp().context("QMP connected")?;
    assert_eq!(qmp.query_status()?, "running");
    vm.pause()?;
    assert_eq!(vm.qmp().unwrap().query_status()?, "paused");
    vm.resume()?;
    assert_eq!(vm.qmp().unwrap().query_status()?, "running");

    let stream = UnixStream::connect(vm.agent_socket())?;
    stream.set_read_timeout(Some(Duration::from_secs(60)))?;
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line)?;
    let to_line = started.elapsed();
    assert_eq!(
        line.trim_end(),
        format!("hearth-test: hello from {}", fx.kernel.release())
    );

    let exit = vm
        .wait_timeout(Duration::from_secs(30))?
        .context("QEMU still running after the guest rebooted")?;
    let to_exit = started.elapsed();
    assert!(exit.status.success(), "{exit:?}");
    assert_eq!(exit.failure, None);
    assert!(!spec.run_dir.exists(), "run dir left behind");
    let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
    assert!(!console.contains("failed"), "console:\n{console}");
    eprintln!("boot timing: qemu up {vmm_started:.2?}, agent line {to_line:.2?}, qemu exited {to_exit:.2?}");
    Ok(())
}

#[test]
fn floor_initramfs_reaches_init_and_powers_off() -> anyhow::Result<()> {
    let fx = fixture()?;
    let spec = fx.spec(&floor_initramfs(fx.home.path())?, "floor");
    let started = Instant::now();
    let mut vm = fx.qemu.start(&spec)?;
    let exit = vm
        .wait_timeout(Duration::from_secs(60))?
        .context("floor guest did not power off")?;
    let wall = started.elapsed();
    assert!(exit.status.success(), "{exit:?}");
    let console = std::fs::read_to_string(&spec.console_log)?;
    assert!(console.contains(FLOOR_MARKER), "console:\n{console}");
    assert!(!spec.run_dir.exists());
    eprintln!("floor boot: {wall:.2?}");
    Ok(())
}

#[test]
fn qemu_failing_at_start_up_reports_its_stderr_and_cleans_up() -> anyhow::Result<()> {
    let fx = fixture()?;
    let spec = fx.spec(Path::new("/nonexistent/initramfs.cpio"), "broken");
    let err = match fx.qemu.start(&spec) {
        Ok(_) => anyhow::bail!("QEMU started with a missing initramfs"),
        Err(e) => e,
    };
    assert!(matches!(err, VmError::EarlyExit { .. }), "{err}");
    assert!(
        err.to_string().contains("/nonexistent/initramfs.cpio"),
        "{err}"
    );
    assert!(!spec.run_dir.exists(), "run dir left behind");
    Ok(())
}

#[test]
fn stop_ends_a_running_guest_and_removes_its_run_dir() -> anyhow::Result<()> {
    let fx = fixture()?;
    let spec = fx.spec(&fx.busybox_initramfs(IDLE_SCRIPT)?, "idle");
    let mut vm = fx.qemu.start(&spec)?;
    let pid = vm.pid();
    let started = Instant::now();
    let exit = vm.stop(Duration::from_millis(200))?;
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "stop took {:?}",
        started.elapsed()
    );
    assert!(
        exit.status.success(),
        "QMP quit should end QEMU normally: {exit:?}"
    );
    assert!(
        !Path::new(&format!("/proc/{pid}")).exists(),
        "QEMU pid {pid} still exists"
    );
    assert!(!spec.run_dir.exists());
    // What is asked of it afterwards says the VM is gone (a pause racing a VMM's death is not
    // a failure of hearth's), not some other error.
    for (what, result) in [("pause", vm.pause()), ("resume", vm.resume())] {
        let e = result.expect_err(what);
        assert!(matches!(e, VmError::Gone { .. }), "{what}: {e}");
    }
    Ok(())
}

/// A guest that says it is idle, then sleeps.
const QUIET_SCRIPT: &str = "#!/bin/busybox sh\necho quiet-now\nexec /bin/busybox sleep 600\n";

/// Context switches of every thread of process `pid` so far.
fn context_switches(pid: u32) -> anyhow::Result<u64> {
    let mut total = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let status = std::fs::read_to_string(task?.path().join("status"))?;
        for line in status.lines() {
            if let Some(n) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                total += n.trim().parse::<u64>()?;
            }
        }
    }
    Ok(total)
}

/// QEMU's own pid: the VM's pid, or its only child where a guard process runs it (as root).
fn vmm_pid(pid: u32) -> u32 {
    let children =
        std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).unwrap_or_default();
    match children.split_whitespace().collect::<Vec<_>>()[..] {
        [only] => only.parse().unwrap_or(pid),
        _ => pid,
    }
}

/// An idle guest lets its QEMU sleep: hundreds of idle sandboxes on one host are only possible if
/// each costs next to nothing while it waits. The guest kernel must stop its tick when idle, which
/// it does only if its local APIC timer is known to keep running (`+arat`); before, every idle TCG
/// guest kept the 250 Hz periodic tick and woke its QEMU ~570 times a second (~85 with it).
#[test]
fn an_idle_guest_does_not_wake_its_vmm_at_the_tick_rate() -> anyhow::Result<()> {
    let fx = fixture()?;
    let spec = fx.spec(&fx.busybox_initramfs(QUIET_SCRIPT)?, "quiet");
    let mut vm = fx.qemu.start(&spec)?;
    let deadline = Instant::now() + Duration::from_secs(60);
    while !std::fs::read_to_string(&spec.console_log)
        .unwrap_or_default()
        .contains("quiet-now")
    {
        ensure!(
            Instant::now() < deadline,
            "the guest never got to its idle loop"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_secs(1));
    let pid = vmm_pid(vm.pid());
    let window = Duration::from_secs(3);
    let before = context_switches(pid)?;
    std::thread::sleep(window);
    let per_second = (context_switches(pid)? - before) as f64 / window.as_secs_f64();
    vm.kill()?;
    eprintln!("idle guest: its QEMU switched context {per_second:.0} times a second");
    assert!(
        per_second < 200.0,
        "an idle guest's QEMU switched context {per_second:.0} times a second"
    );
    Ok(())
}

/// The highest `tick N` on a console log.
fn last_tick(console: &Path) -> u64 {
    std::fs::read_to_string(console)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .max()
        .unwrap_or(0)
}

fn wait_for_tick(console: &Path, above: u64) -> anyhow::Result<u64> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let tick = last_tick(console);
        if tick > above {
            return Ok(tick);
        }
        ensure!(
            Instant::now() < deadline,
            "no tick above {above} on {}",
            console.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The pause-to-files hook: a running guest saved with `save_state` stays paused, and a new VM
/// started from the saved file carries on where it stopped (its counter continues, no reboot).
/// The VM is saved on the machine revision before today's (with a PIT, as a hearth before
/// revisions saved every VM): started on today's machine QEMU refuses the state, started on its
/// own it carries on.
#[test]
fn a_saved_vm_is_paused_and_a_vm_restored_from_the_file_carries_on() -> anyhow::Result<()> {
    let fx = fixture()?;
    assert!(fx.qemu.capabilities().save_state);
    let initramfs = fx.busybox_initramfs(TICK_SCRIPT)?;
    let mut spec = fx.spec(&initramfs, "ticker");
    spec.machine = hearth_vm::MachineRevision::WITH_PIT;
    let mut vm = fx.qemu.start(&spec)?;
    wait_for_tick(&spec.console_log, 3)?;

    let saved_dir = fx.home.path().join("saved");
    let saved = vm.save_state(&saved_dir)?;
    assert!(
        saved.state.starts_with(&saved_dir) && saved.bytes > 1 << 20,
        "{saved:?}"
    );
    let at_save = last_tick(&spec.console_log);
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(
        last_tick(&spec.console_log),
        at_save,
        "the saved VM kept running"
    );
    vm.kill()?;

    let mut today = fx.spec(&initramfs, "ticker-today");
    today.restore_from = Some(saved.state.clone());
    let refused = match fx.qemu.start(&today) {
        Ok(mut vm) => {
            vm.kill()?;
            anyhow::bail!("a state saved with a PIT was restored on a machine without one");
        }
        Err(e) => e.to_string(),
    };
    assert!(refused.contains("i8254"), "{refused}");

    let mut restored = fx.spec(&initramfs, "ticker-restored");
    restored.machine = spec.machine;
    restored.restore_from = Some(saved.state.clone());
    let mut vm = fx.qemu.start(&restored)?;
    assert!(vm.restored_in().is_some());
    let tick = wait_for_tick(&restored.console_log, 0)?;
    assert!(
        tick > at_save,
        "the restored guest counts from {tick}, not on from {at_save}: it rebooted"
    );
    vm.kill()?;
    assert!(!restored.run_dir.exists());
    Ok(())
}

/// The network-interface hook: a VM given a tap holds it open while it runs and lets go when it ends.
#[test]
fn a_vm_with_a_network_interface_holds_its_tap_while_it_runs() -> anyhow::Result<()> {
    let Some(tap) = Tap::create("hth-q") else {
        return Ok(());
    };
    let fx = fixture()?;
    assert!(fx.qemu.capabilities().network);
    let mut spec = fx.spec(&fx.busybox_initramfs(IDLE_SCRIPT)?, "nic");
    spec.network = Some(hearth_vm::NetworkInterface {
        tap: tap.name.clone(),
        mac: "06:00:ac:10:00:02".into(),
        netns: None,
    });
    assert!(!tap.attached(), "nothing holds the tap yet");
    let mut vm = fx.qemu.start(&spec)?;
    assert!(tap.attached(), "QEMU does not hold {}", tap.name);
    vm.kill()?;
    assert!(
        !tap.attached(),
        "the tap stayed attached after the VM ended"
    );
    Ok(())
}

#[test]
fn qemu_dies_within_a_second_of_a_kill_9_of_its_parent() -> anyhow::Result<()> {
    let fx = fixture()?;
    let initramfs = fx.busybox_initramfs(IDLE_SCRIPT)?;
    let mut helper = Command::new(std::env::current_exe()?)
        .args([
            "--exact",
            "start_vm_and_wait_to_be_killed",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_HOME, fx.home.path())
        .env(HELPER_INITRAMFS, &initramfs)
        .stdout(Stdio::piped())
        .spawn()?;
    let mut lines = BufReader::new(helper.stdout.take().unwrap()).lines();
    let qemu_pid: u32 = loop {
        let line = lines
            .next()
            .context("helper exited before starting QEMU")??;
        // libtest prints "test NAME ... " without a newline before the test's own output.
        if let Some((_, pid)) = line.split_once("QEMU_PID=") {
            break pid.trim().parse()?;
        }
    };
    assert!(is_alive(qemu_pid), "QEMU not running before the kill");
    helper.kill()?; // SIGKILL
    helper.wait()?;
    let killed = Instant::now();
    while is_alive(qemu_pid) && killed.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(
        !is_alive(qemu_pid),
        "QEMU {qemu_pid} outlived its parent by more than a second"
    );
    eprintln!(
        "QEMU gone {:.0?} after kill -9 of its parent",
        killed.elapsed()
    );

    let run_parent = fx.home.path().join("run");
    let removed = remove_stale_run_dirs(&run_parent)?;
    assert_eq!(removed, [run_parent.join("orphan")]);
    Ok(())
}

/// Not a test on its own: the child process of `qemu_dies_within_a_second_of_a_kill_9_of_its_parent`.
#[test]
#[ignore = "helper process for qemu_dies_within_a_second_of_a_kill_9_of_its_parent"]
fn start_vm_and_wait_to_be_killed() -> anyhow::Result<()> {
    let (Some(home), Some(initramfs)) = (
        std::env::var_os(HELPER_HOME),
        std::env::var_os(HELPER_INITRAMFS),
    ) else {
        anyhow::bail!("run only by qemu_dies_within_a_second_of_a_kill_9_of_its_parent");
    };
    let home = PathBuf::from(home);
    let kernel = KernelDir::open(hearth_testkit::kernel_dir())?;
    let vmlinux = kernel.vmlinux()?;
    let (qemu, _) = QemuVmm::for_host(&home, Accel::Tcg, &vmlinux)?;
    let spec = VmSpec::new(
        &vmlinux,
        PathBuf::from(initramfs),
        home.join("run").join("orphan"),
    );
    let vm = qemu.start(&spec)?;
    println!("QEMU_PID={}", vm.pid());
    std::io::stdout().flush()?;
    std::thread::sleep(Duration::from_secs(120));
    Ok(())
}

#[test]
fn kvm_probe_verdict_matches_what_this_host_can_do() -> anyhow::Result<()> {
    let fx = fixture()?;
    let expect_kvm = std::env::var("HEARTH_TEST_KVM").as_deref() == Ok("1");
    let probe = KvmBootProbe::new(fx.home.path(), fx.qemu.binary(), &fx.vmlinux);
    let started = Instant::now();
    let verdict = probe.kvm_boots_guests();
    eprintln!("KVM probe ({:.1?}): {verdict:?}", started.elapsed());
    assert_eq!(
        verdict.is_ok(),
        expect_kvm,
        "HEARTH_TEST_KVM=1 declares a KVM that boots guests: {verdict:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(20));
    // The verdict is cached: asking again does not boot anything.
    let again = Instant::now();
    let cached = probe.kvm_boots_guests();
    assert_eq!(cached.is_ok(), verdict.is_ok());
    assert!(
        again.elapsed() < Duration::from_millis(500),
        "second probe took {:?}",
        again.elapsed()
    );
    Ok(())
}

fn is_alive(pid: u32) -> bool {
    // A zombie (state Z) has exited; only its parent's bookkeeping remains.
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            stat.rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next())
                != Some("Z")
        }
        Err(_) => false,
    }
}

/// A VMM frozen while its daemon restarted (the soak's `vmm_freeze` across a `kill -9` of the
/// daemon): the next daemon adopts it without a control connection. A control call then fails as
/// unresponsive (a timeout, what the API answers 504 for), not as an internal error, and once the
/// VMM runs again the next call reconnects and works.
#[test]
fn an_adopted_vmm_that_was_frozen_is_controlled_again_once_it_runs() -> anyhow::Result<()> {
    let fx = fixture()?;
    let mut spec = fx.spec(&fx.busybox_initramfs(IDLE_SCRIPT)?, "frozen");
    spec.detached = true;
    let mut vm = fx.qemu.start(&spec)?;
    let qemu = vmm_pid(vm.pid()) as i32;
    vm.release(); // the daemon goes; the VMM stays for the next one
    drop(vm);
    // SAFETY: kill has no memory-safety preconditions; the pid is this test's QEMU.
    let freeze = |signal| unsafe { libc::kill(qemu, signal) };
    ensure!(freeze(libc::SIGSTOP) == 0);

    let adopted = hearth_vm::adopt(&spec.run_dir);
    let mut vm = match adopted {
        Ok(vm) => vm,
        Err(e) => {
            freeze(libc::SIGKILL);
            anyhow::bail!("adopting a frozen VMM: {e}");
        }
    };
    let frozen = vm.pause().expect_err("a frozen VMM paused");
    let text = format!("{frozen}");
    let unresponsive = matches!(
        frozen.backend_error::<hearth_vm::qemu::QemuError>(),
        Some(e) if e.is_unresponsive()
    );
    ensure!(unresponsive, "not a timeout: {text}");

    ensure!(freeze(libc::SIGCONT) == 0);
    vm.pause().context("pausing once the VMM runs again")?;
    vm.resume()?;
    vm.kill()?;
    ensure!(!spec.run_dir.exists());
    Ok(())
}
