//! `hearth setup`: provisions what `hearth run` needs on this host, idempotently — QEMU (Debian's
//! `qemu-system-x86`, installed with apt-get when missing), the guest kernel (Debian's
//! `linux-image-cloud-amd64`, downloaded and unpacked into `$HEARTH_HOME/kernel`, not installed) and
//! the static guest agent (copied into `$HEARTH_HOME/agent`). Then reports which VMM and
//! accelerator `hearth run` will use and why.

use std::process::{Command, ExitCode};

use anyhow::{bail, Context};
use clap::Args;
use hearth_vm::Accel;

use crate::cli::GlobalArgs;

#[derive(Args, Debug)]
pub struct SetupArgs {
    /// Do not install Debian packages (QEMU); only check for them.
    #[arg(long)]
    pub no_install: bool,
}

pub fn setup(g: &GlobalArgs, a: SetupArgs) -> anyhow::Result<ExitCode> {
    let home = &g.home;
    std::fs::create_dir_all(home).with_context(|| format!("creating {}", home.display()))?;

    let qemu = match hearth_vm::qemu::find_binary() {
        Ok(path) => path,
        Err(_) if !a.no_install => {
            eprintln!("hearth setup: installing qemu-system-x86 with apt-get");
            apt_install(&["qemu-system-x86"])?;
            hearth_vm::qemu::find_binary()?
        }
        Err(err) => return Err(err.into()),
    };
    println!("qemu:   {}", qemu.display());
    // Each sandbox namespace's firewall is an nftables table.
    if !hearth_net::nft::installed() && !a.no_install {
        eprintln!("hearth setup: installing nftables with apt-get");
        apt_install(&["nftables"])?;
    }

    let kernel = hearth_vm::kernel::provision_kernel(home)?;
    println!("kernel: {} ({})", kernel.release(), kernel.root().display());

    let installed = home.join("agent/hearth-agent");
    match hearth_sandbox::boot::locate_agent(None, home) {
        Ok(agent) if agent != installed => {
            std::fs::create_dir_all(installed.parent().unwrap())?;
            let tmp = installed.with_extension("tmp");
            std::fs::copy(&agent, &tmp)
                .with_context(|| format!("copying the agent {}", agent.display()))?;
            std::fs::rename(&tmp, &installed)?;
            println!("agent:  {} (from {})", installed.display(), agent.display());
        }
        Ok(agent) => println!("agent:  {}", agent.display()),
        Err(err) => bail!("{err}"),
    }

    let image = hearth_vm::kernel::resolve_kernel(home, None)?.image;
    let (_, selection) = hearth_vm::qemu::QemuVmm::for_host(home, Accel::Auto, &image)?;
    println!(
        "vmm:    qemu, accel {:?}: {}",
        selection.accel, selection.reason
    );
    Ok(ExitCode::SUCCESS)
}

fn apt_install(packages: &[&str]) -> anyhow::Result<()> {
    for args in [
        vec!["update", "-q"],
        [&["install", "-y", "-q"], packages].concat(),
    ] {
        let status = Command::new("apt-get")
            .args(&args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("running apt-get (hearth setup installs QEMU on Debian; install it yourself elsewhere)")?;
        if !status.success() {
            bail!("apt-get {} failed with {status}", args.join(" "));
        }
    }
    Ok(())
}
