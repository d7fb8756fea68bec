//! The workload's privileges: docker's default capability set and `no_new_privs`. Applied in the
//! command's process between fork and exec (so only raw syscalls, no allocation): every other
//! capability leaves the bounding set (so no execve can bring it back), the ambient set is
//! cleared, permitted and effective become the default set, inheritable becomes empty (as in
//! docker since CVE-2022-24769), and `PR_SET_NO_NEW_PRIVS` makes setuid binaries and file
//! capabilities unable to grant anything. A non-root user then loses permitted and effective caps
//! at `setuid` as usual. Without CAP_SYS_MODULE, CAP_SYS_ADMIN, CAP_SYS_RAWIO, CAP_SYS_PTRACE... the
//! workload cannot load modules, mount, poke hardware or trace the exec-init.

use std::io;

/// docker's default capabilities, by number (linux/capability.h).
pub const DOCKER_DEFAULT: [u32; 14] = [
    0,  // CAP_CHOWN
    1,  // CAP_DAC_OVERRIDE
    3,  // CAP_FOWNER
    4,  // CAP_FSETID
    5,  // CAP_KILL
    6,  // CAP_SETGID
    7,  // CAP_SETUID
    8,  // CAP_SETPCAP
    10, // CAP_NET_BIND_SERVICE
    13, // CAP_NET_RAW
    18, // CAP_SYS_CHROOT
    27, // CAP_MKNOD
    29, // CAP_AUDIT_WRITE
    31, // CAP_SETFCAP
];

/// [`DOCKER_DEFAULT`] as a mask (bit N = capability N), as `/proc/PID/status` prints it.
pub const fn docker_default_mask() -> u64 {
    let mut mask = 0u64;
    let mut i = 0;
    while i < DOCKER_DEFAULT.len() {
        mask |= 1 << DOCKER_DEFAULT[i];
        i += 1;
    }
    mask
}

/// Capability numbers go up to 63 in the v3 ABI; the kernel knows fewer (EINVAL beyond).
const MAX_CAP: u32 = 63;

const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

#[repr(C)]
struct CapHeader {
    version: u32,
    pid: i32,
}

#[repr(C)]
#[derive(Clone, Copy)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// Restricts the calling process to [`DOCKER_DEFAULT`] (bounding, permitted, effective; empty
/// inheritable and ambient). Async-signal-safe. Call while still root, before `setuid`.
pub fn restrict_to_default() -> io::Result<()> {
    let keep = docker_default_mask();
    for cap in 0..=MAX_CAP {
        if keep & (1 << cap) != 0 {
            continue;
        }
        // SAFETY: prctl with integer arguments.
        let ret = unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap as libc::c_ulong, 0, 0, 0) };
        if ret < 0 {
            let error = io::Error::last_os_error();
            if error.raw_os_error() == Some(libc::EINVAL) {
                break; // past the kernel's last capability
            }
            return Err(error);
        }
    }
    // SAFETY: prctl with integer arguments.
    let ret = unsafe {
        libc::prctl(
            libc::PR_CAP_AMBIENT,
            libc::PR_CAP_AMBIENT_CLEAR_ALL as libc::c_ulong,
            0,
            0,
            0,
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [
        CapData {
            effective: keep as u32,
            permitted: keep as u32,
            inheritable: 0,
        },
        CapData {
            effective: (keep >> 32) as u32,
            permitted: (keep >> 32) as u32,
            inheritable: 0,
        },
    ];
    // SAFETY: capset with a v3 header and the two data words it reads.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Sets `no_new_privs`: no execve can grant privileges again. Async-signal-safe.
pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments.
    if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_set_is_dockers() {
        // `CapEff` of a root process in a default docker container.
        assert_eq!(docker_default_mask(), 0x0000_0000_a804_25fb);
        for dangerous in [
            16, /* SYS_MODULE */
            17, /* SYS_RAWIO */
            19, /* SYS_PTRACE */
            21, /* SYS_ADMIN */
            12, /* NET_ADMIN */
        ] {
            assert_eq!(
                docker_default_mask() & (1 << dangerous),
                0,
                "cap {dangerous}"
            );
        }
    }

    /// Applies the restriction in a forked child (when the test runs as root) and reads its
    /// status back: bounding, effective and permitted are the default set, NoNewPrivs is 1.
    #[test]
    fn a_restricted_process_has_only_the_default_set() {
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: needs root");
            return;
        }
        use std::os::unix::process::CommandExt;
        let mut command = std::process::Command::new("/bin/cat");
        command.arg("/proc/self/status").env_clear();
        // SAFETY: the closure only makes raw syscalls.
        unsafe {
            command.pre_exec(|| {
                restrict_to_default()?;
                set_no_new_privs()
            });
        }
        let output = command.output().unwrap();
        let status = String::from_utf8_lossy(&output.stdout);
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(str::trim)
                .unwrap_or_default()
                .to_string()
        };
        let want = format!("{:016x}", docker_default_mask());
        assert_eq!(field("CapEff:"), want, "{status}");
        assert_eq!(field("CapPrm:"), want);
        assert_eq!(field("CapBnd:"), want);
        assert_eq!(field("CapInh:"), "0000000000000000");
        assert_eq!(field("CapAmb:"), "0000000000000000");
        assert_eq!(field("NoNewPrivs:"), "1");
    }
}
