//! The agent as the guest's PID 1: mounts, kernel modules, disks, the workload root, hostname,
//! loopback and the NIC ([`crate::net`]), then serving the host on the virtio-serial port (and vsock when present). Any failure
//! before serving prints one `hearth-agent: FATAL:` line on the console and reboots, which ends the
//! VM (QEMU runs with -no-reboot; Firecracker exits on reboot).
//!
//! A **template** VM (booted once, then saved and restored many times) does only the early init:
//! mounts, every module but the deferred ones ([`modules::DEFERRED_IN_TEMPLATE`]), loopback, the
//! agent port. Its agent then answers no HELLO until a RESUME line brings the late init
//! ([`resume::TemplateResume`]): clock, entropy, hostname, deferred modules, disks, workload root.
//! A RESUME line to an agent already running (any VM restored from its own saved state: a paused
//! sandbox resumed) sets the clock and reseeds the CRNG ([`resume::LiveResume`]).
//!
//! Kernel command line parameters read here:
//! - `hearth.hostname=NAME`: the guest's hostname (default `hearth`; a template's comes with RESUME).
//! - `hearth.template=1`: template mode.

mod disks;
mod modules;
mod mounts;
mod reaper;
mod resume;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::resume::ResumeGate;
use crate::{log, Agent, AgentConfig, PowerControl};

pub use mounts::ROOT;

/// How long to wait for disks and the agent port to appear (slow under TCG).
const DEVICE_TIMEOUT: Duration = Duration::from_secs(10);

/// Runs PID 1 for the guest's whole life.
pub fn run() -> ! {
    let booted = match boot() {
        Ok(booted) => booted,
        Err(e) => fatal(&e),
    };
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => fatal(&format!("starting the async runtime: {e}")),
    };
    let error = runtime.block_on(serve(booted));
    fatal(&error)
}

/// How far [`boot`] got.
enum Booted {
    /// Everything is set up; the guest is called `hostname`.
    Cold { hostname: String },
    /// Early init only; the rest waits for RESUME.
    Template { deferred_modules: Vec<PathBuf> },
}

/// Everything before serving.
fn boot() -> Result<Booted, String> {
    mounts::mount_early()?;
    redirect_stdio_to_console();
    INIT_MS.store(uptime_ms(), std::sync::atomic::Ordering::Relaxed);
    log!(
        "starting (version {}, uptime {})",
        crate::AGENT_VERSION,
        uptime()
    );
    if let Err(e) = crate::workload_cgroup::setup() {
        log!("{e}; execs run without a process limit");
    }
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let listed = modules::read_list(Path::new(modules::MODULE_LIST)).map_err(|e| e.to_string())?;
    if is_template(&cmdline) {
        return template_boot(listed);
    }
    let hostname = kernel_param(&cmdline, "hearth.hostname")
        .unwrap_or("hearth")
        .to_string();
    let loaded = modules::load_all(&listed).map_err(|e| e.to_string())?;
    nix::unistd::sethostname(&hostname)
        .map_err(|e| format!("setting hostname {hostname:?}: {e}"))?;
    if let Err(e) = loopback_up() {
        log!("bringing up lo: {e} (continuing without loopback)");
    }
    let (rootfs, scratch) = disks::wait_for_disks(DEVICE_TIMEOUT)?;
    mounts::mount_workload_root(&rootfs, &scratch, &hostname)?;
    crate::net::boot_step(true, Some((Path::new(mounts::ROOT), &hostname)));
    log!(
        "{loaded} modules loaded, workload root mounted (uptime {})",
        uptime()
    );
    Ok(Booted::Cold { hostname })
}

/// Whether the kernel command line asks for a template VM.
fn is_template(cmdline: &str) -> bool {
    kernel_param(cmdline, "hearth.template") == Some("1")
}

/// A template's early init: nothing that depends on the disks or on the VM's identity.
fn template_boot(listed: Vec<PathBuf>) -> Result<Booted, String> {
    let (now, deferred_modules) = modules::split_deferred(listed, modules::DEFERRED_IN_TEMPLATE);
    if deferred_modules.is_empty() {
        log!(
            "template: no {:?} module in the list (built into the kernel?): the snapshot may hold disk state",
            modules::DEFERRED_IN_TEMPLATE
        );
    }
    let loaded = modules::load_all(&now).map_err(|e| e.to_string())?;
    crate::net::boot_step(true, None);
    if let Err(e) = loopback_up() {
        log!("bringing up lo: {e} (continuing without loopback)");
    }
    log!(
        "template: {loaded} modules loaded, {} deferred until RESUME (uptime {})",
        deferred_modules.len(),
        uptime()
    );
    Ok(Booted::Template { deferred_modules })
}

async fn serve(booted: Booted) -> String {
    let config = AgentConfig {
        root: PathBuf::from(mounts::ROOT),
        exec_init_program: PathBuf::from("/proc/self/exe"),
        power: Arc::new(Reboot),
    };
    // Either way, a RESUME line once the agent runs means the whole VM was restored from its own
    // saved state (a paused sandbox resumed): clock and entropy are refreshed.
    let (gate, hostname) = match booted {
        Booted::Cold { hostname } => (ResumeGate::open(), Some(hostname)),
        Booted::Template { deferred_modules } => {
            let late_init = Arc::new(resume::TemplateResume { deferred_modules });
            (ResumeGate::closed(late_init), None)
        }
    };
    let agent = Agent::with_resume_gate(config, gate.with_refresh(Arc::new(resume::LiveResume)));
    tokio::spawn(reaper::reap_orphans(agent.clone()));
    if std::path::Path::new("/dev/vsock").exists() {
        match crate::port::VsockListener::bind(hearth_proto::VSOCK_PORT) {
            Ok(listener) => {
                log!("listening on vsock port {}", hearth_proto::VSOCK_PORT);
                let agent = agent.clone();
                tokio::spawn(async move {
                    if let Err(e) = crate::session::serve_listener(agent, listener).await {
                        log!("vsock listener failed: {e}");
                    }
                });
            }
            Err(e) => log!(
                "vsock present but listening on port {} failed: {e}",
                hearth_proto::VSOCK_PORT
            ),
        }
    }
    match crate::port::open_virtio_port(hearth_proto::VIRTIO_PORT_NAME, DEVICE_TIMEOUT).await {
        Ok((device, port)) => {
            match hostname {
                Some(hostname) => {
                    let _ = BOOT_MARKS.set(hearth_proto::BootMarks {
                        init_ms: INIT_MS.load(std::sync::atomic::Ordering::Relaxed),
                        ready_ms: uptime_ms(),
                        resume_ms: None,
                    });
                    log!(
                        "ready on {} as {hostname} (uptime {})",
                        device.display(),
                        uptime()
                    );
                }
                None => log!(
                    "template ready on {}: waiting for RESUME (uptime {})",
                    device.display(),
                    uptime()
                ),
            }
            crate::session::serve_port(agent, port).await
        }
        Err(e) if std::path::Path::new("/dev/vsock").exists() => {
            log!("{e}; serving on vsock only");
            std::future::pending().await
        }
        Err(e) => e.to_string(),
    }
}

/// Guest shutdown: unmount and reboot (the VMM treats the guest's reboot as its exit).
struct Reboot;

impl PowerControl for Reboot {
    fn prepare(&self) -> Result<(), String> {
        nix::unistd::sync();
        let failures = mounts::unmount_all();
        nix::unistd::sync();
        if failures.is_empty() {
            Ok(())
        } else {
            Err(failures.join("; "))
        }
    }

    fn power_off(&self) -> ! {
        let error =
            nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_AUTOBOOT).unwrap_err();
        log!("reboot failed: {error}");
        loop {
            std::thread::sleep(Duration::from_secs(3600));
        }
    }
}

/// Reports `message` on the console and ends the VM.
fn fatal(message: &str) -> ! {
    log!("FATAL: {message}");
    nix::unistd::sync();
    Reboot.power_off()
}

/// Makes fds 0-2 the console (the kernel may have started us without one).
fn redirect_stdio_to_console() {
    if let Ok(console) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..=2 {
            // SAFETY: dup2 onto the standard descriptors.
            unsafe { libc::dup2(console.as_raw_fd(), fd) };
        }
    }
}

/// The value of `name=value` on a kernel command line.
pub fn kernel_param<'a>(cmdline: &'a str, name: &str) -> Option<&'a str> {
    cmdline
        .split_whitespace()
        .filter_map(|word| word.split_once('='))
        .filter(|(key, _)| *key == name)
        .map(|(_, value)| value)
        .next_back()
}

/// When this agent, as PID 1, started and became ready (answered by `GET /v1/info`).
pub static BOOT_MARKS: std::sync::OnceLock<hearth_proto::BootMarks> = std::sync::OnceLock::new();
static INIT_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Guest uptime in milliseconds.
fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0, |secs| (secs * 1000.0) as u64)
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|u| u.split_whitespace().next().map(|s| format!("{s} s")))
        .unwrap_or_else(|| "unknown".into())
}

/// Sets the loopback interface up, as a container runtime would.
fn loopback_up() -> std::io::Result<()> {
    use std::os::fd::{FromRawFd, OwnedFd};
    // SAFETY: an ioctl pair on a fresh socket with a zeroed ifreq naming "lo".
    unsafe {
        let fd = libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0);
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let socket = OwnedFd::from_raw_fd(fd);
        use std::os::fd::AsRawFd;
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCGIFFLAGS, &mut request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
        request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
        if libc::ioctl(socket.as_raw_fd(), libc::SIOCSIFFLAGS, &request) < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kernel_params_last_one_wins() {
        let cmdline = "console=ttyS0 hearth.hostname=a quiet hearth.hostname=box\n";
        assert_eq!(kernel_param(cmdline, "hearth.hostname"), Some("box"));
        assert_eq!(kernel_param(cmdline, "hearth.other"), None);
    }

    #[test]
    fn template_mode_needs_the_exact_flag() {
        assert!(is_template("console=ttyS0 hearth.template=1 quiet"));
        assert!(!is_template("console=ttyS0 quiet"));
        assert!(!is_template("hearth.template=0"));
        assert!(!is_template("hearth.template=1 hearth.template=0"));
        assert!(!is_template("hearth.templates=1"));
    }
}
