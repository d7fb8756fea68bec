//! The boot "floor": builds the floor initramfs (a 200-byte /init that powers off at once) and
//! optionally boots it with the QEMU backend, printing each boot's wall time. The run benchmark
//! compares `hearth run` against these numbers.
//!
//! ```text
//! cargo run --release -p hearth-vm --example floor -- [--home DIR] [--kernel DIR] [--out FILE]
//!     [--boot N] [--accel tcg|kvm|auto] [--print-command]
//! ```
//! `--home` defaults to a temp dir; `--kernel` to /var/cache/hearth-test/kernel. Prints one line
//! per boot (`floor boot <i>: <seconds>`) and the median.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{bail, Context};
use hearth_vm::initramfs::floor::{floor_initramfs, FLOOR_MARKER};
use hearth_vm::kernel::KernelDir;
use hearth_vm::qemu::QemuVmm;
use hearth_vm::{Accel, VmSpec, Vmm};

fn main() -> anyhow::Result<()> {
    let mut home: Option<PathBuf> = None;
    let mut kernel = PathBuf::from("/var/cache/hearth-test/kernel");
    let mut out: Option<PathBuf> = None;
    let mut boots = 0usize;
    let mut accel = Accel::Tcg;
    let mut print_command = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().with_context(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--home" => home = Some(value()?.into()),
            "--kernel" => kernel = value()?.into(),
            "--out" => out = Some(value()?.into()),
            "--boot" => boots = value()?.parse()?,
            "--accel" => accel = value()?.parse().map_err(anyhow::Error::msg)?,
            "--print-command" => print_command = true,
            other => bail!("unknown argument {other}; see the doc comment of examples/floor.rs"),
        }
    }
    let temp_home = tempfile::tempdir()?;
    let home = home.unwrap_or_else(|| temp_home.path().to_owned());

    let initramfs = floor_initramfs(&home)?;
    if let Some(out) = &out {
        std::fs::copy(&initramfs, out).with_context(|| format!("copying to {}", out.display()))?;
        println!("floor initramfs: {}", out.display());
    }
    let kernel = KernelDir::open(&kernel)?;
    let vmlinux = kernel.vmlinux()?;
    let (qemu, selection) = QemuVmm::for_host(&home, accel, &vmlinux)?;
    eprintln!("accelerator: {} ({})", selection.accel, selection.reason);

    let mut times = Vec::new();
    for i in 0..boots {
        let run = home.join("run").join(format!("floor-{i}"));
        let mut spec = VmSpec::new(&vmlinux, &initramfs, &run);
        spec.console_log = home.join(format!("floor-{i}.console"));
        if print_command && i == 0 {
            println!("{}", qemu.dry_run(&spec)?);
        }
        let started = Instant::now();
        let mut vm = qemu.start(&spec)?;
        let exit = vm.wait()?;
        let wall = started.elapsed().as_secs_f64();
        let console = std::fs::read_to_string(&spec.console_log).unwrap_or_default();
        if !exit.status.success() || !console.contains(FLOOR_MARKER) {
            bail!(
                "floor boot {i} failed ({}): console:\n{console}",
                exit.status
            );
        }
        println!("floor boot {i}: {wall:.3}");
        times.push(wall);
    }
    if !times.is_empty() {
        times.sort_by(f64::total_cmp);
        println!(
            "floor median over {} boots: {:.3} s",
            times.len(),
            times[times.len() / 2]
        );
    }
    Ok(())
}
