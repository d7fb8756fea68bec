//! The guest's one cgroup for every exec's processes, with a bound on how many there may be
//! ([`PIDS_MAX`]). PID 1 makes it at boot ([`setup`]: cgroup v2 at `/sys/fs/cgroup`, the `pids`
//! controller handed down, `workload/pids.max`); each exec-init joins it between `clone` and
//! `execve` by writing `0` to the descriptor [`procs_fd`] keeps open, so everything an exec starts
//! is counted there while the agent itself (the root cgroup) is not.
//!
//! Why: a fork bomb in the guest made as many processes as the kernel allowed (~4,000 in a
//! 512 MiB guest), and killing them after the exec's timeout took the emulated kernel 13 to over
//! 30 s, during which nothing else in the sandbox could start. At the bound, `fork` fails with
//! `EAGAIN` in the workload while the agent still forks exec-inits; teardown is bounded too. The
//! workload cannot leave the cgroup: it runs without `CAP_SYS_ADMIN` and its root has no cgroup
//! filesystem. Only PID 1 sets this up; the agent outside a VM (host tests) leaves the host's
//! cgroups alone and its execs unbounded.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::OnceLock;

use nix::mount::MsFlags;

/// Processes and threads all execs of a sandbox may have at once (the exec-inits included).
pub const PIDS_MAX: u32 = 1024;

const MOUNT: &str = "/sys/fs/cgroup";
const GROUP: &str = "/sys/fs/cgroup/workload";

static PROCS: OnceLock<OwnedFd> = OnceLock::new();

/// Makes the workload cgroup. Fails (the caller logs it and execs run unbounded) on a kernel
/// without cgroup v2 or the pids controller.
pub fn setup() -> Result<(), String> {
    let step = |what: &str, e: &dyn std::fmt::Display| format!("workload cgroup: {what}: {e}");
    nix::mount::mount(
        Some("cgroup2"),
        MOUNT,
        Some("cgroup2"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )
    .map_err(|e| step("mounting cgroup2", &e))?;
    std::fs::write(format!("{MOUNT}/cgroup.subtree_control"), "+pids")
        .map_err(|e| step("enabling the pids controller", &e))?;
    match std::fs::create_dir(GROUP) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(step("creating it", &e))
        }
        _ => {}
    }
    std::fs::write(format!("{GROUP}/pids.max"), PIDS_MAX.to_string())
        .map_err(|e| step("setting pids.max", &e))?;
    let procs = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("{GROUP}/cgroup.procs"))
        .map_err(|e| step("opening cgroup.procs", &e))?;
    let _ = PROCS.set(procs.into());
    Ok(())
}

/// The workload cgroup's `cgroup.procs`, open for writing (close-on-exec), once [`setup`] made it.
pub fn procs_fd() -> Option<RawFd> {
    PROCS.get().map(|fd| fd.as_raw_fd())
}
