//! PID 1's late init in a VM restored from a template: what RESUME sets up. Touches the kernel
//! (`clock_settime`, the random device's ioctls, `sethostname`, module loading) and the disks and
//! mounts of a cold boot's second half ([`super::disks`], [`super::mounts`]).
//!
//! Every clone of one template starts with the template's wall clock, CRNG state and (empty)
//! hostname, so each must get its own before anything runs in it. A VM restored from the saved
//! state of a running VM (a resumed sandbox, a fork's copy) gets the clock and entropy again, and a
//! copy its own hostname ([`LiveResume`]).

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use hearth_proto::handshake::RESUME_SEED_LEN;
use hearth_proto::Resume;

use super::{disks, modules, mounts, DEVICE_TIMEOUT};
use crate::log;
use crate::resume::LateInit;

/// The late init of a template VM: the modules it deferred, then everything of a cold boot that
/// needs the disks or the VM's identity.
pub struct TemplateResume {
    /// Module files deferred by the template's early init ([`modules::DEFERRED_IN_TEMPLATE`]).
    pub deferred_modules: Vec<PathBuf>,
}

impl LateInit for TemplateResume {
    /// Never fails: a clone that cannot finish its late init ends the VM, exactly as a failed cold
    /// boot does (a `FATAL` line on the console, then reboot).
    fn apply(&self, resume: &Resume) -> Result<(), String> {
        let started = Instant::now();
        if let Err(e) = self.late_init(resume) {
            super::fatal(&format!("resuming from the template snapshot: {e}"));
        }
        let _ = super::BOOT_MARKS.set(hearth_proto::BootMarks {
            init_ms: super::INIT_MS.load(std::sync::atomic::Ordering::Relaxed),
            ready_ms: super::uptime_ms(),
            resume_ms: Some(started.elapsed().as_millis() as u64),
        });
        Ok(())
    }
}

impl TemplateResume {
    fn late_init(&self, resume: &Resume) -> Result<(), String> {
        // The clock first: everything after it (file times on the scratch disk) should be right.
        set_realtime_clock(resume.unix_time_ns)?;
        add_entropy_and_reseed(&resume.seed)?;
        nix::unistd::sethostname(&resume.hostname)
            .map_err(|e| format!("setting hostname {:?}: {e}", resume.hostname))?;
        let loaded = modules::load_all(&self.deferred_modules).map_err(|e| e.to_string())?;
        let (rootfs, scratch) = disks::wait_for_disks(DEVICE_TIMEOUT)?;
        mounts::mount_workload_root(&rootfs, &scratch, &resume.hostname)?;
        let root = std::path::Path::new(mounts::ROOT);
        crate::net::boot_step(false, Some((root, &resume.hostname)));
        log!(
            "resumed: clock set, CRNG reseeded, {loaded} deferred modules loaded, workload root mounted (uptime {})",
            super::uptime()
        );
        Ok(())
    }
}

/// What a RESUME line does to a running agent, i.e. to a VM restored from saved state of a
/// running VM (a paused sandbox resumed, or a forked sandbox's copy): its wall clock stood still
/// while it was saved and its CRNG state is the saved one, so both are refreshed from the host.
/// A hostname that differs from the guest's is a copy's own: the guest takes it (the kernel's,
/// `/etc/hostname` and, with a network, `/etc/hosts`). A resumed sandbox's host sends the
/// hostname the guest had when it was paused, so nothing changes there.
pub struct LiveResume;

impl crate::resume::Refresh for LiveResume {
    fn refresh(&self, resume: &Resume) -> Result<(), String> {
        set_realtime_clock(resume.unix_time_ns)?;
        add_entropy_and_reseed(&resume.seed)?;
        rename_if_changed(&resume.hostname)
    }
}

/// Sets the hostname to `hostname` if the guest has another one. The workload root's files are
/// rewritten best effort (logged): the kernel's hostname is what must change.
fn rename_if_changed(hostname: &str) -> Result<(), String> {
    let current = nix::unistd::gethostname().ok();
    if current.as_deref().and_then(|h| h.to_str()) == Some(hostname) {
        return Ok(());
    }
    nix::unistd::sethostname(hostname)
        .map_err(|e| format!("setting hostname {hostname:?}: {e}"))?;
    let root = std::path::Path::new(mounts::ROOT);
    let etc_hostname = std::path::Path::new("/etc/hostname");
    if let Err(e) = crate::in_root::write_in_root(
        root,
        etc_hostname,
        format!("{hostname}\n").as_bytes(),
        0o644,
    ) {
        log!("writing /etc/hostname in the workload root: {e} (continuing)");
    }
    crate::net::boot_step(false, Some((root, hostname)));
    log!("hostname changed to {hostname}");
    Ok(())
}

/// Sets `CLOCK_REALTIME` to `unix_time_ns` nanoseconds since the epoch.
fn set_realtime_clock(unix_time_ns: u64) -> Result<(), String> {
    let time = timespec_of(unix_time_ns);
    // SAFETY: clock_settime reads a fully initialised timespec.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &time) } < 0 {
        let error = std::io::Error::last_os_error();
        return Err(format!(
            "setting the wall clock to {unix_time_ns} ns since the epoch: {error}"
        ));
    }
    Ok(())
}

fn timespec_of(unix_time_ns: u64) -> libc::timespec {
    libc::timespec {
        tv_sec: (unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (unix_time_ns % 1_000_000_000) as libc::c_long,
    }
}

/// `struct rand_pool_info` of `<linux/random.h>` with room for the seed.
#[repr(C)]
struct RandPoolInfo {
    /// Bits of entropy to credit.
    entropy_count: libc::c_int,
    /// Bytes in `buf`.
    buf_size: libc::c_int,
    buf: [u8; RESUME_SEED_LEN],
}

/// `_IOC(dir, type, nr, size)` of `<asm-generic/ioctl.h>` (x86_64 and aarch64 layout).
const fn ioc(dir: u64, kind: u8, nr: u8, size: u64) -> u64 {
    (dir << 30) | (size << 16) | ((kind as u64) << 8) | nr as u64
}
/// `_IOW('R', 0x03, int[2])`: mix bytes into the input pool and credit entropy.
const RNDADDENTROPY: u64 = ioc(1, b'R', 0x03, 2 * std::mem::size_of::<libc::c_int>() as u64);
/// `_IO('R', 0x07)`: reseed the CRNG from the input pool now.
const RNDRESEEDCRNG: u64 = ioc(0, b'R', 0x07, 0);

fn rand_pool_info(seed: &[u8; RESUME_SEED_LEN]) -> RandPoolInfo {
    RandPoolInfo {
        entropy_count: (8 * RESUME_SEED_LEN) as libc::c_int,
        buf_size: RESUME_SEED_LEN as libc::c_int,
        buf: *seed,
    }
}

/// Mixes the host's seed into the input pool (credited in full: it comes from the host's CRNG)
/// and reseeds the CRNG from it, so this clone's random numbers stop being the template's.
/// Writing to /dev/urandom would mix the bytes in but neither credit nor reseed.
fn add_entropy_and_reseed(seed: &[u8; RESUME_SEED_LEN]) -> Result<(), String> {
    let random = std::fs::File::open("/dev/urandom")
        .map_err(|e| format!("opening /dev/urandom to add the host's entropy: {e}"))?;
    let input = rand_pool_info(seed);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info whose buf_size bytes follow its header.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDADDENTROPY as _, &input) } < 0 {
        let error = std::io::Error::last_os_error();
        return Err(format!(
            "adding the host's entropy (RNDADDENTROPY): {error}"
        ));
    }
    // SAFETY: RNDRESEEDCRNG takes no argument.
    if unsafe { libc::ioctl(random.as_raw_fd(), RNDRESEEDCRNG as _) } < 0 {
        let error = std::io::Error::last_os_error();
        return Err(format!(
            "reseeding the kernel CRNG (RNDRESEEDCRNG): {error}"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_ioctls_match_linux_uapi() {
        // From <linux/random.h> as compiled on x86_64 (printf("%#lx", RNDADDENTROPY)).
        assert_eq!(RNDADDENTROPY, 0x4008_5203);
        assert_eq!(RNDRESEEDCRNG, 0x5207);
    }

    #[test]
    fn entropy_input_credits_every_seed_bit_and_carries_the_seed_after_the_header() {
        let mut seed = [0u8; RESUME_SEED_LEN];
        seed[0] = 0xAA;
        seed[RESUME_SEED_LEN - 1] = 0x55;
        let input = rand_pool_info(&seed);
        assert_eq!((input.entropy_count, input.buf_size), (256, 32));
        assert_eq!(std::mem::offset_of!(RandPoolInfo, buf), 8);
        assert_eq!(std::mem::size_of::<RandPoolInfo>(), 8 + RESUME_SEED_LEN);
        assert_eq!(input.buf, seed);
    }

    #[test]
    fn clock_time_splits_into_seconds_and_nanoseconds() {
        let time = timespec_of(1_717_171_717_999_999_999);
        assert_eq!((time.tv_sec, time.tv_nsec), (1_717_171_717, 999_999_999));
        let time = timespec_of(u64::MAX);
        assert_eq!((time.tv_sec, time.tv_nsec), (18_446_744_073, 709_551_615));
    }
}
