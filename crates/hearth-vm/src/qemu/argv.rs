//! Renders a [`VmSpec`] into QEMU's argument vector. Pure: no I/O, so `--dry-run` prints exactly what
//! `start` runs, apart from the per-VM user and chroot of a confined VMM ([`confinement`], appended
//! at start once its uid is leased).

use std::path::Path;

use super::{QemuVmm, AGENT_PORT_NAME, TCG_CPU};
use crate::accel::Accel;
use crate::spec::{GuestMemory, MachineRevision, VmSpec};

/// `x-option-roms=off` skips the option-ROM scan (measured fastest); ACPI stays on because the guest
/// finds its virtio-mmio devices through ACPI. pic/rtc stay at their defaults. The PIT goes with
/// [`MachineRevision::NO_PIT`] (no cost to boot or restore measured: `hearth run busybox` 0.79-0.97 s
/// warm and 1.80 s cold either way).
const MACHINE: &str = "microvm,x-option-roms=off";

/// `-M` for `spec`'s machine revision, before any memory backend.
fn machine(spec: &VmSpec) -> String {
    machine_of(spec.machine)
}

fn machine_of(revision: MachineRevision) -> String {
    match revision >= MachineRevision::NO_PIT {
        true => format!("{MACHINE},pit=off"),
        false => MACHINE.to_owned(),
    }
}

/// The `-M` argument of a boot template built today (the current machine revision, guest memory in
/// the template's file): a template whose arguments lack it was made for an older machine.
pub(super) fn template_machine_option() -> String {
    format!(
        "{},memory-backend={MEMORY_BACKEND_ID}",
        machine_of(MachineRevision::CURRENT)
    )
}

/// QEMU's seccomp filter: no obsolete system calls, no fork or exec, no changing scheduling or
/// resource limits, and no set*id calls once running. `drops_uid`: QEMU drops to its own uid
/// (`-runas`, see [`confinement`]) itself, and QEMU 7.2 installs the filter *before* it drops, so
/// a filter denying set*id kills it (SIGSYS) at the drop; such a QEMU gets
/// `elevateprivileges=allow`. Nothing is lost by it: after the drop every one of its uids and gids
/// is unprivileged and its capabilities are gone, so no set*id call can gain anything, and it
/// cannot exec a setuid binary (`spawn=deny`, and the filter sets `no_new_privs`).
pub(super) fn sandbox(drops_uid: bool) -> String {
    let elevate = if drops_uid { "allow" } else { "deny" };
    format!("on,obsolete=deny,elevateprivileges={elevate},spawn=deny,resourcecontrol=deny")
}

/// The arguments that drop a started QEMU into its confinement once it has opened its files:
/// chroot into `chroot` (an empty directory), then become `uid`:`gid` (numeric, no supplementary
/// groups).
pub(super) fn confinement(uid: u32, gid: u32, chroot: &Path) -> Vec<String> {
    vec![
        "-chroot".into(),
        path(chroot),
        "-runas".into(),
        format!("{uid}:{gid}"),
    ]
}

/// The id of the memory backend of a VM with file-backed memory ([`GuestMemory`]); its presence in
/// `query-memdev` tells a save whether the RAM of shared mappings is to be left out.
pub(super) const MEMORY_BACKEND_ID: &str = "hearth-mem";

/// The command line; a VM restored from a template maps its memory from the template's file
/// (as `--dry-run` shows it). See [`render_with_memory`].
pub(super) fn render(qemu: &QemuVmm, spec: &VmSpec) -> Vec<String> {
    render_with_memory(qemu, spec, None)
}

/// The command line, with `memory_source` (when set) as the file a [`GuestMemory::FromTemplate`]
/// VM maps instead of the template's own file: the sealed copy that `start` makes
/// (`super::memory`).
pub(super) fn render_with_memory(
    qemu: &QemuVmm,
    spec: &VmSpec,
    memory_source: Option<&Path>,
) -> Vec<String> {
    let mut args: Vec<String> = Vec::new();
    let mut push = |items: &[&str]| args.extend(items.iter().map(|s| s.to_string()));
    let machine = machine(spec);
    let (machine, backend) = match &spec.memory {
        GuestMemory::Anonymous => (machine, None),
        GuestMemory::TemplateFile(file) => (
            format!("{machine},memory-backend={MEMORY_BACKEND_ID}"),
            Some(memory_backend(spec.memory_mib, file, true)),
        ),
        GuestMemory::Saved(_) => (
            format!("{machine},memory-backend={MEMORY_BACKEND_ID}"),
            Some(format!(
                "memory-backend-ram,id={MEMORY_BACKEND_ID},size={}M",
                spec.memory_mib
            )),
        ),
        GuestMemory::FromTemplate(file) => (
            format!("{machine},memory-backend={MEMORY_BACKEND_ID}"),
            Some(memory_backend(
                spec.memory_mib,
                memory_source.unwrap_or(file),
                false,
            )),
        ),
    };
    push(&[
        "-M",
        &machine,
        "-nodefaults",
        "-no-user-config",
        "-nographic",
        "-no-reboot",
    ]);
    push(&["-sandbox", &sandbox(crate::confine::enabled())]);

    let mut cmdline = spec.cmdline.clone();
    match qemu.accel {
        Accel::Kvm => push(&["-accel", "kvm", "-cpu", "host"]),
        _ => {
            let tcg = format!("tcg,tb-size={}", qemu.tcg_cache_mib);
            push(&["-accel", &tcg, "-cpu", TCG_CPU]);
            if let Some(khz) = qemu.tsc_khz {
                cmdline.set(format!("tsc_early_khz={khz}"));
            }
            // The TCG guest's TSC is the host's (invariant) TSC, but its kernel checks it against
            // the only other clock `microvm` has, the jiffies, which fall behind whenever the host
            // is busy: the watchdog then marks the TSC unstable and the guest's clock drops to
            // `refined-jiffies` for good (4 ms resolution). Seen in loaded test runs, where the guest's
            // resolver then failed lookups of allowed names (most likely two queries made in one
            // jiffy got the same time-derived id).
            cmdline.set("tsc=reliable");
        }
    }
    push(&[
        "-m",
        &format!("{}M", spec.memory_mib),
        "-smp",
        &spec.vcpus.to_string(),
    ]);
    if let Some(backend) = &backend {
        push(&["-object", backend]);
    }
    push(&[
        "-kernel",
        &path(&spec.kernel),
        "-initrd",
        &path(&spec.initramfs),
    ]);
    push(&["-append", &cmdline.render()]);

    push(&[
        "-chardev",
        &format!("file,id=console,path={}", opt_path(&spec.console_log)),
    ]);
    push(&["-serial", "chardev:console"]);
    let qmp = spec.run_dir.join("qmp.sock");
    push(&[
        "-qmp",
        &format!("unix:{},server=on,wait=off", opt_path(&qmp)),
    ]);

    for drive in &spec.drives {
        let mut options = format!(
            "id={id},file={file},format=raw,if=none,read-only={ro}",
            id = drive.serial,
            file = opt_path(&drive.path),
            ro = if drive.read_only { "on" } else { "off" },
        );
        if !drive.read_only {
            // The writable disk is per-sandbox and thrown away with it: guest flushes need not
            // reach the host disk, and freed blocks should be returned to the sparse file.
            // `auto-read-only=off`: with it on (the -drive default) QEMU reopens the image by path
            // to drop write access when a migration pauses the disks, which a chrooted QEMU
            // cannot: saving a template or a running VM then fails in bdrv_inactivate_all.
            // `werror=report`: a full host disk is an I/O error inside the guest; QEMU's default
            // (`enospc`) would stop the whole VM, leaving a sandbox that never answers again (the
            // soak found one).
            options.push_str(",cache=unsafe,discard=unmap,auto-read-only=off,werror=report");
        }
        push(&["-drive", &options]);
        push(&[
            "-device",
            &format!(
                "virtio-blk-device,drive={id},serial={id}",
                id = drive.serial
            ),
        ]);
    }

    if let Some(nic) = &spec.network {
        // The tap exists already (the caller made it, with its namespace and firewall); QEMU only
        // opens it and never runs ifup scripts.
        push(&[
            "-netdev",
            &format!("tap,id=net0,ifname={},script=no,downscript=no", nic.tap),
        ]);
        push(&[
            "-device",
            &format!("virtio-net-device,netdev=net0,mac={}", nic.mac),
        ]);
    }

    push(&["-device", "virtio-serial-device,max_ports=2"]);
    let agent = opt_path(&spec.agent_socket);
    push(&[
        "-chardev",
        &format!("socket,id=agent,path={agent},server=on,wait=off"),
    ]);
    push(&[
        "-device",
        &format!("virtserialport,chardev=agent,name={AGENT_PORT_NAME}"),
    ]);
    if spec.restore_from.is_some() {
        // The state is fed in over QMP (`migrate-incoming`) once QEMU runs: see snapshot::restore.
        push(&["-incoming", "defer"]);
    }
    args
}

/// A file-backed memory backend: `share=on` for a template being built (its RAM goes into the
/// file), `share=off` for a restored VM (a private copy-on-write mapping of it).
fn memory_backend(memory_mib: u32, file: &Path, shared: bool) -> String {
    format!(
        "memory-backend-file,id={MEMORY_BACKEND_ID},size={memory_mib}M,mem-path={},share={}",
        opt_path(file),
        if shared { "on" } else { "off" }
    )
}

fn path(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A path inside a QEMU `key=value,...` option: commas are doubled.
fn opt_path(p: &Path) -> String {
    path(p).replace(',', ",,")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::{Drive, VmSpec};

    fn spec() -> VmSpec {
        let mut spec = VmSpec::new("/k/vmlinux", "/k/init.cpio", "/h/run/vm,1");
        spec.vcpus = 2;
        spec.memory_mib = 768;
        spec.drives = vec![
            Drive::rootfs("/h/rootfs/abc.ext4"),
            Drive::scratch("/h/run/vm,1/scratch.ext4"),
        ];
        spec
    }

    use crate::test_support::values;

    #[test]
    fn template_memory_is_a_shared_file_and_restored_memory_a_private_mapping() {
        let qemu =
            QemuVmm::new("/usr/bin/qemu-system-x86_64", Accel::Tcg, Some(2_300_000)).unwrap();
        let mut template = spec();
        template.memory = GuestMemory::TemplateFile("/h/templates/t/memory".into());
        let args = render(&qemu, &template);
        assert_eq!(
            values(&args, "-M"),
            ["microvm,x-option-roms=off,pit=off,memory-backend=hearth-mem"]
        );
        assert_eq!(values(&args, "-M"), [template_machine_option()]);
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=hearth-mem,size=768M,mem-path=/h/templates/t/memory,share=on"]
        );
        let mut saved = spec();
        saved.memory = GuestMemory::Saved("/h/templates/t/memory".into());
        let args = render(&qemu, &saved);
        assert_eq!(
            values(&args, "-M"),
            ["microvm,x-option-roms=off,pit=off,memory-backend=hearth-mem"]
        );
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-ram,id=hearth-mem,size=768M"]
        );
        let mut restored = spec();
        restored.memory = GuestMemory::FromTemplate("/h/templates/t/memory".into());
        let sealed = Path::new("/proc/7/fd/9");
        let args = render_with_memory(&qemu, &restored, Some(sealed));
        assert_eq!(
            values(&args, "-object"),
            ["memory-backend-file,id=hearth-mem,size=768M,mem-path=/proc/7/fd/9,share=off"]
        );
        // Anonymous memory (cold boots, and VMs recorded before memory was file-backed) renders as
        // it always did, so their saved states still load.
        let args = render(&qemu, &spec());
        assert_eq!(values(&args, "-M"), ["microvm,x-option-roms=off,pit=off"]);
        assert!(values(&args, "-object").is_empty());
    }

    #[test]
    fn tcg_renders_machine_accel_and_tsc_frequency() {
        let qemu =
            QemuVmm::new("/usr/bin/qemu-system-x86_64", Accel::Tcg, Some(2_300_000)).unwrap();
        let args = render(&qemu, &spec());
        assert_eq!(values(&args, "-M"), ["microvm,x-option-roms=off,pit=off"]);
        // A VM saved on the machine with a PIT (by a hearth before revisions) starts on that one.
        let mut older = spec();
        older.machine = MachineRevision::WITH_PIT;
        older.memory = GuestMemory::FromTemplate("/h/templates/t/memory".into());
        assert_eq!(
            values(&render(&qemu, &older), "-M"),
            ["microvm,x-option-roms=off,memory-backend=hearth-mem"]
        );
        for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
            assert!(args.iter().any(|a| a == flag), "missing {flag}");
        }
        assert_eq!(values(&args, "-accel"), ["tcg,tb-size=128"]);
        let smaller = qemu.clone().with_tcg_cache_mib(16).unwrap();
        assert_eq!(
            values(&render(&smaller, &spec()), "-accel"),
            ["tcg,tb-size=16"]
        );
        for refused in [4, 129] {
            let err = qemu.clone().with_tcg_cache_mib(refused).unwrap_err();
            assert!(err.to_string().contains("8 to 128 MiB"), "{err}");
        }
        assert_eq!(values(&args, "-m"), ["768M"]);
        assert_eq!(values(&args, "-smp"), ["2"]);
        assert_eq!(values(&args, "-kernel"), ["/k/vmlinux"]);
        let append = values(&args, "-append")[0];
        for param in ["tsc_early_khz=2300000", "tsc=reliable", "console=ttyS0"] {
            assert!(append.split(' ').any(|p| p == param), "{param}: {append}");
        }
        assert!(!append.contains("acpi=off"));
    }

    #[test]
    fn every_qemu_runs_under_seccomp_and_a_confined_one_drops_into_its_chroot_and_uid() {
        let qemu = QemuVmm::new("qemu", Accel::Tcg, Some(1)).unwrap();
        let sandbox = values(&render(&qemu, &spec()), "-sandbox")[0].to_owned();
        assert!(sandbox.starts_with("on,obsolete=deny,"), "{sandbox}");
        assert!(
            sandbox.contains("spawn=deny,resourcecontrol=deny"),
            "{sandbox}"
        );
        assert!(super::sandbox(false).contains("elevateprivileges=deny"));
        assert!(super::sandbox(true).contains("elevateprivileges=allow"));
        let drop = confinement(0x6a00_0001, 0x6a00_0001, Path::new("/h/run/vm/vmm-root"));
        assert_eq!(values(&drop, "-chroot"), ["/h/run/vm/vmm-root"]);
        assert_eq!(values(&drop, "-runas"), ["1778384897:1778384897"]);
    }

    #[test]
    fn kvm_uses_the_host_cpu_and_no_tsc_hint() {
        let qemu = QemuVmm::new("qemu", Accel::Kvm, None).unwrap();
        let args = render(&qemu, &spec());
        assert_eq!(values(&args, "-accel"), ["kvm"]);
        assert_eq!(values(&args, "-cpu"), ["host"]);
        let append = values(&args, "-append")[0];
        assert!(
            !append.contains("tsc_early_khz") && !append.contains("tsc="),
            "{append}"
        );
    }

    #[test]
    fn drives_carry_serials_and_writability_and_paths_are_escaped() {
        let qemu = QemuVmm::new("qemu", Accel::Tcg, Some(1)).unwrap();
        let args = render(&qemu, &spec());
        let drives = values(&args, "-drive");
        assert_eq!(drives.len(), 2);
        assert!(
            drives[0].starts_with("id=hearth-rootfs,file=/h/rootfs/abc.ext4,"),
            "{}",
            drives[0]
        );
        assert!(drives[0].contains("read-only=on"));
        assert!(
            drives[1].contains("file=/h/run/vm,,1/scratch.ext4,"),
            "{}",
            drives[1]
        );
        assert!(drives[1].contains("read-only=off"));
        let devices = values(&args, "-device");
        assert!(devices.contains(&"virtio-blk-device,drive=hearth-rootfs,serial=hearth-rootfs"));
        assert!(devices.contains(&"virtio-blk-device,drive=hearth-scratch,serial=hearth-scratch"));
    }

    #[test]
    fn a_restore_waits_for_incoming_state_and_a_cold_boot_does_not() {
        let qemu = QemuVmm::new("qemu", Accel::Tcg, Some(1)).unwrap();
        let cold = render(&qemu, &spec());
        assert!(values(&cold, "-incoming").is_empty());
        let mut restore = spec();
        restore.restore_from = Some("/h/templates/abc/state".into());
        let args = render(&qemu, &restore);
        assert_eq!(values(&args, "-incoming"), ["defer"]);
        assert_eq!(
            &args[..args.len() - 2],
            &cold[..],
            "same devices in the same order"
        );
    }

    #[test]
    fn a_network_interface_is_a_virtio_net_device_on_its_tap_without_scripts() {
        let qemu = QemuVmm::new("/usr/bin/qemu", Accel::Tcg, Some(1)).unwrap();
        let mut spec = VmSpec::new("/k", "/i", "/h/run/x");
        assert!(!render(&qemu, &spec).iter().any(|a| a.contains("net")));
        spec.network = Some(crate::spec::NetworkInterface {
            tap: "hearth-tap0".into(),
            mac: "06:00:ac:10:00:02".into(),
            netns: None,
        });
        let args = render(&qemu, &spec);
        assert_eq!(
            values(&args, "-netdev"),
            ["tap,id=net0,ifname=hearth-tap0,script=no,downscript=no"]
        );
        assert!(values(&args, "-device")
            .contains(&"virtio-net-device,netdev=net0,mac=06:00:ac:10:00:02"));
    }

    #[test]
    fn agent_port_console_and_qmp_live_in_the_run_dir() {
        let qemu = QemuVmm::new("qemu", Accel::Tcg, Some(1)).unwrap();
        let args = render(&qemu, &spec());
        let chardevs = values(&args, "-chardev");
        assert!(
            chardevs.contains(&"socket,id=agent,path=/h/run/vm,,1/agent.sock,server=on,wait=off")
        );
        assert!(chardevs.contains(&"file,id=console,path=/h/run/vm,,1/console.log"));
        assert!(
            values(&args, "-device").contains(&"virtserialport,chardev=agent,name=hearth.agent")
        );
        assert_eq!(values(&args, "-serial"), ["chardev:console"]);
        assert_eq!(
            values(&args, "-qmp"),
            ["unix:/h/run/vm,,1/qmp.sock,server=on,wait=off"]
        );
    }
}
