//! Teardown when hearth itself is stopped: SIGTERM tears the VM down and removes its files; after
//! `kill -9` the VMM dies with hearth (parent-death signal) and the next hearth command removes what
//! the dead run left. Real boots under QEMU.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn hearth(home: &Path) -> Command {
    let registry = hearth_testkit::registry().expect("test registry");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    cmd.env("HEARTH_HOME", home)
        .env("HEARTH_KERNEL", hearth_testkit::kernel_dir())
        .env("HEARTH_AGENT", hearth_testkit::agent_bin())
        .env("HEARTH_INSECURE_REGISTRIES", &registry.addr);
    cmd
}

/// A per-test home (these tests inspect `run/`), seeded from nothing: the first boot also pulls.
fn fresh_home(name: &str) -> PathBuf {
    let home = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&home);
    home
}

/// Starts `hearth run busybox sh -c 'echo started; sleep 100'` and waits for "started".
fn start_sleeper(home: &Path) -> Child {
    let image = hearth_testkit::image_ref("busybox").unwrap();
    let mut child = hearth(home)
        .args(["run", &image, "sh", "-c", "echo started; sleep 100"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let mut line = String::new();
    BufReader::new(child.stdout.as_mut().unwrap())
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line, "started\n", "the command is running in the guest");
    child
}

/// Live (non-zombie) processes whose parent is `parent`.
fn live_children(parent: u32) -> Vec<u32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..]
            .split_whitespace()
            .collect();
        if fields[1].parse::<u32>() == Ok(parent) && fields[0] != "Z" {
            found.push(pid);
        }
    }
    found
}

fn is_live(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| s[s.rfind(')').unwrap() + 2..].split_whitespace().next() != Some("Z"))
        .unwrap_or(false)
}

fn run_dirs(home: &Path) -> Vec<PathBuf> {
    std::fs::read_dir(home.join("run"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default()
}

#[test]
fn sigterm_tears_down_the_vm_and_removes_its_files() {
    let home = fresh_home("teardown-sigterm");
    let mut child = start_sleeper(&home);
    let vmms = live_children(child.id());
    assert_eq!(vmms.len(), 1, "one VMM process runs under hearth");
    assert_eq!(run_dirs(&home).len(), 1);
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(128 + libc::SIGTERM));
    assert!(!is_live(vmms[0]), "the VMM is gone");
    assert!(
        run_dirs(&home).is_empty(),
        "run directory removed: {:?}",
        run_dirs(&home)
    );
    let _ = std::fs::remove_dir_all(&home);
}

#[test]
fn kill_9_takes_the_vmm_down_and_the_next_command_cleans_up() {
    let home = fresh_home("teardown-kill9");
    let mut child = start_sleeper(&home);
    let vmms = live_children(child.id());
    assert_eq!(vmms.len(), 1, "one VMM process runs under hearth");
    child.kill().unwrap(); // SIGKILL: hearth gets no chance to clean up
    child.wait().unwrap();
    let killed = Instant::now();
    while is_live(vmms[0]) && killed.elapsed() < Duration::from_secs(1) {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(
        !is_live(vmms[0]),
        "the VMM died within a second of hearth (parent-death signal)"
    );
    assert_eq!(run_dirs(&home).len(), 1, "the dead run left its directory");

    let out = hearth(&home).args(["images"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        run_dirs(&home).is_empty(),
        "the next command removed it: {:?}",
        run_dirs(&home)
    );
    let nets: Vec<_> = std::fs::read_dir(home.join("net"))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    assert!(nets.is_empty(), "and its network namespace: {nets:?}");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(
        !mounts.contains(&home.display().to_string()),
        "a mount under the home is left"
    );
    let _ = std::fs::remove_dir_all(&home);
}
