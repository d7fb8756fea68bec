//! Per-VM run directories (`$HEARTH_HOME/run/<id>/` by convention): sockets, VMM log, pid file, and
//! the cleanup of directories left behind by a hearth process that died (`kill -9`, power loss).
//! Touches only the run directories it is given.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::VmError;
use crate::process::{ForeignProcess, ProcessIdentity};

/// The VMM's stdout and stderr.
pub(crate) const VMM_LOG: &str = "vmm.log";
/// The VMM's pid, for recognising live run directories after a crash.
const PID_FILE: &str = "vmm.pid";
/// A run dir without a pid file is being set up; only this old it counts as abandoned.
const SETUP_GRACE: Duration = Duration::from_secs(60);

/// How much of a log a failure report quotes.
const LOG_TAIL: usize = 4096;

/// The last few KiB ([`LOG_TAIL`]) of a log file, lossily decoded; empty if it does not exist.
pub(crate) fn read_tail(path: &Path) -> String {
    read_log_tail(path, LOG_TAIL as u64)
}

/// The last `max` bytes of a log file (a guest's console, a VMM's log), lossily decoded; empty if it
/// does not exist. Reads only those bytes (seeks from the end), so a guest that floods its console
/// to gigabytes costs the host no more memory or time than a quiet one.
pub fn read_log_tail(path: &Path, max: u64) -> String {
    use std::io::{Read, Seek, SeekFrom};
    let Ok(mut file) = std::fs::File::open(path) else {
        return String::new();
    };
    let len = file.metadata().map(|m| m.len()).unwrap_or(0);
    let mut bytes = Vec::with_capacity(max.min(1 << 20) as usize);
    if file.seek(SeekFrom::Start(len.saturating_sub(max))).is_ok() {
        // `take`: the file may still grow while it is read.
        let _ = file.take(max).read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Keeps a log a guest can write to (its serial console) from filling the host disk: once the file
/// holds more than `2 * keep` bytes on disk, the disk blocks of everything before its last `keep`
/// bytes are freed (`FALLOC_FL_PUNCH_HOLE`, block-aligned). The VMM keeps writing at its own offset:
/// the file's apparent size keeps growing, but what it occupies on disk stays under about
/// `2 * keep`, and the tail ([`read_log_tail`]) reads as before. Returns the bytes freed.
pub fn trim_log(path: &Path, keep: u64) -> std::io::Result<u64> {
    use std::os::fd::AsRawFd;
    use std::os::unix::fs::MetadataExt;
    const BLOCK: u64 = 4096;
    let file = std::fs::OpenOptions::new().write(true).open(path)?;
    let meta = file.metadata()?;
    let on_disk = meta.blocks() * 512;
    if on_disk <= keep.saturating_mul(2) {
        return Ok(0);
    }
    let end = meta.len().saturating_sub(keep) / BLOCK * BLOCK;
    if end == 0 {
        return Ok(0);
    }
    // SAFETY: fallocate on a descriptor we own, with a range inside the file.
    let done = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            0,
            end as libc::off_t,
        )
    };
    if done != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let after = file.metadata()?.blocks() * 512;
    Ok(on_disk.saturating_sub(after))
}

pub(crate) fn create(dir: &Path) -> Result<(), VmError> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| VmError::Io {
            what: "creating run directory",
            path: dir.to_owned(),
            source,
        })
}

pub(crate) fn write_pid(dir: &Path, pid: u32) -> Result<(), VmError> {
    let path = dir.join(PID_FILE);
    std::fs::write(&path, format!("{pid}\n")).map_err(|source| VmError::Io {
        what: "writing",
        path,
        source,
    })
}

/// Removes every run directory under `parent` whose VMM is gone (it died with its hearth process, or
/// its pid now belongs to an unrelated process). Returns what was removed.
pub fn remove_stale_run_dirs(parent: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut removed = Vec::new();
    let entries = match std::fs::read_dir(parent) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(removed),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let dir = entry?.path();
        if dir.is_dir() && is_stale(&dir) {
            std::fs::remove_dir_all(&dir)?;
            removed.push(dir);
        }
    }
    Ok(removed)
}

fn is_stale(dir: &Path) -> bool {
    let Ok(text) = std::fs::read_to_string(dir.join(PID_FILE)) else {
        let age = std::fs::metadata(dir)
            .and_then(|m| m.modified())
            .ok()
            .and_then(|t| t.elapsed().ok());
        return age.is_some_and(|age| age > SETUP_GRACE);
    };
    let Ok(pid) = text.trim().parse::<u32>() else {
        return true;
    };
    // A zombie has exited; with no reaper around it may linger, but its VM is gone.
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return true;
    };
    if stat
        .rsplit(')')
        .next()
        .and_then(|rest| rest.split_whitespace().next())
        == Some("Z")
    {
        return true;
    }
    // A live VMM names its run dir in its arguments (socket paths); a recycled pid does not. A
    // confined VMM's recorded pid is its guard's (`crate::process::guard`, a fork of hearth whose
    // arguments are hearth's): the VMM is the guard's child. Judged stale, a live VM's sockets
    // were removed under it by the next `hearth run`'s sweep (seen as "connecting to the agent
    // socket before restoring: No such file or directory" with tests running in parallel).
    std::iter::once(pid)
        .chain(children(pid))
        .all(|p| vmm_stale(p, dir))
}

/// Whether process `pid` is not a VMM of `dir`: it names `dir` in no argument and is not chrooted
/// inside it. A process mid-exec (no arguments yet) is not judged stale: the next pass decides.
fn vmm_stale(pid: u32, dir: &Path) -> bool {
    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    if cmdline.is_empty() {
        return false;
    }
    !names(&cmdline, dir.as_os_str().as_encoded_bytes()) && !rooted_inside(pid, dir)
}

/// Whether a process's arguments (`/proc/PID/cmdline`) hold `needle` anywhere.
fn names(cmdline: &[u8], needle: &[u8]) -> bool {
    cmdline.windows(needle.len()).any(|w| w == needle)
}

/// Kills (SIGKILL, through a pidfd) every process whose arguments name a path inside `dir`: a VMM
/// of that run directory whatever became of its record (its sockets are there). For a daemon
/// recovering a run directory no sandbox owns, after the recorded VMM was adopted and killed, so
/// that a VMM the record does not lead to (the e2e suite once found one left running) is not
/// orphaned. Returns the pids signalled.
pub fn kill_processes_naming(dir: &Path) -> Vec<u32> {
    let mut needle = dir.as_os_str().as_encoded_bytes().to_vec();
    needle.push(b'/');
    let me = std::process::id();
    let mut killed = Vec::new();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return killed;
    };
    for pid in entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
    {
        if pid == me {
            continue;
        }
        // Opened before its arguments are read: the pidfd pins the process they are about, so a
        // pid recycled meanwhile is never signalled.
        let Some(mut process) = ProcessIdentity::of(pid).and_then(ForeignProcess::open) else {
            continue;
        };
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if names(&cmdline, &needle) {
            process.kill();
            killed.push(pid);
        }
    }
    killed
}

/// The pids of process `pid`'s children (none when it is gone).
pub(crate) fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Whether the process's root directory is a directory inside `dir`: a jailed Firecracker names
/// only chroot-relative paths, but its chroot lives in its run dir. Compared by device and inode,
/// because the jailer pivots into its own mount namespace, where `/proc/PID/root` reads as `/`.
fn rooted_inside(pid: u32, dir: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let Ok(root) = std::fs::metadata(format!("/proc/{pid}/root")) else {
        return false;
    };
    // The jail's root is `jail/<exec-name>/<id>/root`: four levels down.
    let mut level = vec![dir.to_owned()];
    for _ in 0..4 {
        level = level
            .iter()
            .filter_map(|d| std::fs::read_dir(d).ok())
            .flatten()
            .filter_map(|e| e.ok())
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .map(|e| e.path())
            .collect();
        if level.iter().any(|d| {
            std::fs::metadata(d).is_ok_and(|m| (m.dev(), m.ino()) == (root.dev(), root.ino()))
        }) {
            return true;
        }
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A flooded log is cut back to about its tail on disk; the tail stays readable.
    #[test]
    fn a_flooded_log_is_trimmed_on_disk_and_keeps_its_tail() {
        use std::io::Write;
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("console.log");
        let mut file = std::fs::File::create(&log).unwrap();
        for _ in 0..10 {
            file.write_all(&vec![b'x'; 1 << 20]).unwrap();
        }
        file.write_all(b"\nlast words\n").unwrap();
        file.sync_all().unwrap();
        assert_eq!(
            trim_log(&log, 8 << 20).unwrap(),
            0,
            "under 2 * keep on disk: left alone"
        );
        let freed = trim_log(&log, 1 << 20).unwrap();
        let meta = std::fs::metadata(&log).unwrap();
        assert!(freed >= 8 << 20, "freed {freed}");
        assert!(
            meta.blocks() * 512 <= (1 << 20) + 8192,
            "{} on disk",
            meta.blocks() * 512
        );
        assert_eq!(meta.len(), (10 << 20) + 12, "the apparent size is kept");
        assert!(read_tail(&log).ends_with("last words\n"));
        // The VMM writes on at its offset.
        file.write_all(b"more\n").unwrap();
        assert!(read_tail(&log).ends_with("last words\nmore\n"));
    }

    #[test]
    fn processes_naming_a_run_dir_are_killed_and_others_left_alone() {
        let parent = tempfile::tempdir().unwrap();
        let spawn = |socket: PathBuf| {
            std::process::Command::new("sh")
                .args(["-c", "read line"])
                .arg(socket)
                .stdin(std::process::Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut orphan = spawn(parent.path().join("vm-1/agent.sock"));
        // A sibling whose name starts with the same characters is another run directory.
        let mut sibling = spawn(parent.path().join("vm-10/agent.sock"));
        let killed = kill_processes_naming(&parent.path().join("vm-1"));
        assert_eq!(killed, [orphan.id()]);
        assert_eq!(
            std::os::unix::process::ExitStatusExt::signal(&orphan.wait().unwrap()),
            Some(libc::SIGKILL)
        );
        assert!(
            sibling.try_wait().unwrap().is_none(),
            "the sibling was killed"
        );
        sibling.kill().unwrap();
        sibling.wait().unwrap();
    }

    #[test]
    fn removes_dirs_of_dead_or_unrelated_pids_and_keeps_live_ones() {
        let parent = tempfile::tempdir().unwrap();
        let dead = parent.path().join("dead");
        let recycled = parent.path().join("recycled");
        let live = parent.path().join("live");
        let fresh = parent.path().join("being-set-up");
        for dir in [&dead, &recycled, &live, &fresh] {
            create(dir).unwrap();
        }
        write_pid(&dead, u32::MAX - 1).unwrap();
        // Our own pid is alive, but our cmdline does not name the dir: a recycled pid.
        write_pid(&recycled, std::process::id()).unwrap();
        // `sh -c SCRIPT NAME`: NAME stands in for a VMM's socket argument. The shell blocks in
        // its `read` builtin (no child process to leak) until we kill it.
        let mut sleeper = std::process::Command::new("sh")
            .args(["-c", "read line"])
            .arg(live.join("agent.sock"))
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        write_pid(&live, sleeper.id()).unwrap();
        // A confined VMM runs under a guard whose own arguments name nothing: the VMM (here the
        // inner shell, whose $0 is the socket) is its child.
        let guarded = parent.path().join("guarded");
        create(&guarded).unwrap();
        let mut guard = std::process::Command::new("sh")
            .args(["-c", "sh -c 'read line' \"$VMM_SOCKET\"; :"])
            .env("VMM_SOCKET", guarded.join("agent.sock"))
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while children(guard.id()).is_empty() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        write_pid(&guarded, guard.id()).unwrap();
        // A chrooted VMM (as under the jailer) names no host path in its arguments.
        let jailed = parent.path().join("jailed");
        let jail_root = jailed.join("jail/firecracker/jailed/root");
        std::fs::create_dir_all(jail_root.join("bin")).unwrap();
        std::fs::copy("/bin/busybox", jail_root.join("bin/busybox")).unwrap();
        let mut prisoner = std::process::Command::new("chroot")
            .args([
                jail_root.as_os_str(),
                "/bin/busybox".as_ref(),
                "sh".as_ref(),
            ])
            .args(["-c", "read line"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // Wait until chroot has exec'd busybox inside the jail.
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while std::fs::read_link(format!("/proc/{}/exe", prisoner.id()))
            .is_ok_and(|exe| !exe.starts_with(&jail_root))
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        write_pid(&jailed, prisoner.id()).unwrap();
        let mut removed = remove_stale_run_dirs(parent.path()).unwrap();
        removed.sort();
        drop(guard.stdin.take()); // the inner shell's `read` ends
        for child in [&mut sleeper, &mut prisoner, &mut guard] {
            child.kill().unwrap();
            child.wait().unwrap();
        }
        assert_eq!(removed, [dead.clone(), recycled.clone()]);
        assert!(live.is_dir() && fresh.is_dir() && jailed.is_dir() && guarded.is_dir());
        assert!(remove_stale_run_dirs(&parent.path().join("absent"))
            .unwrap()
            .is_empty());
    }
}
