//! `hearth run` end to end: the real binary pulls from the real test registry, boots the real guest
//! kernel under QEMU (TCG here) and runs commands through the real agent. Each test costs one boot
//! (3-5 s), so assertions that can share a boot do.
//!
//! All tests share one `HEARTH_HOME` inside the build tree (`CARGO_TARGET_TMPDIR`), as concurrent
//! hearth processes on one host do: images, initramfs and host probes are cached once.
//!
//! The same suite runs on Firecracker where it can: with `HEARTH_TEST_KVM=1` (a KVM that boots
//! guests) and `HEARTH_FIRECRACKER_BIN` set, every test's `hearth` gets `HEARTH_VMM=firecracker`.

use std::io::Read;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn home() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("hearth-run-home")
}

/// Why the suite runs on QEMU, or `None` when it runs on Firecracker.
fn why_not_firecracker() -> Option<&'static str> {
    if std::env::var("HEARTH_TEST_KVM").as_deref() != Ok("1") {
        return Some(
            "HEARTH_TEST_KVM=1 is unset: no KVM that boots guests, the suite runs on QEMU",
        );
    }
    if std::env::var_os("HEARTH_FIRECRACKER_BIN").is_none_or(|v| v.is_empty()) {
        return Some("HEARTH_FIRECRACKER_BIN is unset: the suite runs on QEMU");
    }
    None
}

fn hearth() -> Command {
    let registry = hearth_testkit::registry().expect("test registry");
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hearth"));
    let vmm = match why_not_firecracker() {
        None => "firecracker",
        Some(_) => "qemu",
    };
    cmd.env("HEARTH_VMM", vmm)
        .env("HEARTH_HOME", home())
        .env("HEARTH_KERNEL", hearth_testkit::kernel_dir())
        .env("HEARTH_AGENT", hearth_testkit::agent_bin())
        .env("HEARTH_INSECURE_REGISTRIES", &registry.addr)
        .env_remove("RUST_LOG");
    cmd
}

fn image(name: &str) -> String {
    hearth_testkit::image_ref(name).expect("test registry")
}

fn run(args: &[&str]) -> Output {
    hearth()
        .arg("run")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("spawn hearth")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

#[test]
fn the_suite_runs_on_the_backend_it_names() {
    let out = hearth()
        .args(["-v", "run", &image("busybox"), "true"])
        .stdin(Stdio::null())
        .output()
        .expect("spawn hearth");
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "stderr: {stderr}");
    let line = stderr
        .lines()
        .find(|l| l.contains("starting VM"))
        .unwrap_or_else(|| panic!("no 'starting VM' log line: {stderr}"));
    match why_not_firecracker() {
        None => assert!(line.contains("firecracker"), "{line}"),
        Some(reason) => {
            assert!(line.contains("qemu"), "{line}");
            hearth_testkit::skip(&format!("Firecracker run suite: {reason}"));
        }
    }
}

#[test]
fn python_prints_42() {
    let out = run(&[&image("python"), "python3", "-c", "print(6*7)"]);
    assert_eq!(text(&out.stdout), "42\n", "stderr: {}", text(&out.stderr));
    assert_eq!(out.status.code(), Some(0));
}

#[test]
fn command_runs_in_the_guest_with_image_config_and_separate_streams() {
    let script = "uname -r; pwd; echo \"$IMAGE_VAR $FOO\"; id -u; echo to-stderr >&2; exit 3";
    let out = run(&["-e", "FOO=bar", &image("busybox"), "sh", "-c", script]);
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    let guest_release =
        std::fs::read_to_string(hearth_testkit::kernel_dir().join("release")).unwrap();
    let host_release = text(&Command::new("uname").arg("-r").output().unwrap().stdout);
    assert_eq!(
        lines.first().copied(),
        Some(guest_release.trim()),
        "stdout: {stdout}"
    );
    assert_ne!(
        guest_release.trim(),
        host_release.trim(),
        "guest and host kernels differ here"
    );
    assert_eq!(
        &lines[1..],
        ["/home", "from-image bar", "0"],
        "WorkingDir, Env, -e, user"
    );
    assert_eq!(
        text(&out.stderr),
        "to-stderr\n",
        "stderr holds only the command's stderr"
    );
    assert_eq!(out.status.code(), Some(3));
}

#[test]
fn workdir_user_signals_and_timings() {
    let out = run(&[
        "--timings",
        "-w",
        "/tmp",
        "-u",
        "nobody",
        &image("busybox"),
        "sh",
        "-c",
        "pwd; id -u; kill -9 $$",
    ]);
    assert_eq!(
        text(&out.stdout),
        "/tmp\n65534\n",
        "stderr: {}",
        text(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(128 + 9), "killed by SIGKILL is 137");
    let stderr = text(&out.stderr);
    for phase in ["vmm-start", "guest-boot", "exec", "total"] {
        assert!(
            stderr.contains(&format!("{phase} ")),
            "--timings names {phase}: {stderr}"
        );
    }
    // A cold boot splits guest-boot into kernel boot and agent init; a VM restored from a
    // snapshot template shows the state load and the agent's RESUME handling instead.
    let cold = ["kernel-boot ", "agent-init "];
    let restored = ["restore ", "resume "];
    assert!(
        cold.iter().all(|p| stderr.contains(p)) || restored.iter().all(|p| stderr.contains(p)),
        "--timings splits the guest boot: {stderr}"
    );
}

#[test]
fn missing_command_is_127_with_a_message() {
    let out = run(&[&image("busybox"), "no-such-command"]);
    assert_eq!(out.status.code(), Some(127));
    assert!(
        text(&out.stderr).contains("no-such-command"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn stdin_is_forwarded_with_dash_i() {
    let mut child = hearth()
        .args([
            "run",
            "-i",
            &image("busybox"),
            "sh",
            "-c",
            "tr a-z A-Z; echo done",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(b"hello from the host\n")
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert_eq!(
        text(&out.stdout),
        "HELLO FROM THE HOST\ndone\n",
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn timeout_kills_the_whole_process_tree() {
    let started = Instant::now();
    let out = run(&[
        "--timeout",
        "2s",
        &image("busybox"),
        "sh",
        "-c",
        "sleep 100 & sleep 100",
    ]);
    assert_eq!(
        out.status.code(),
        Some(124),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        text(&out.stderr).contains("timed out"),
        "stderr: {}",
        text(&out.stderr)
    );
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "the timeout, not the sleeps, ended it"
    );
}

/// 200 MiB through stdout while hearth's own memory stays bounded (flow control end to end).
#[test]
fn large_output_streams_with_bounded_host_memory() {
    const SIZE: u64 = 200 << 20;
    let mut child = hearth()
        .args([
            "run",
            &image("busybox"),
            "head",
            "-c",
            &SIZE.to_string(),
            "/dev/zero",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid = child.id();
    let peak = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let sampler = {
        let peak = peak.clone();
        std::thread::spawn(move || {
            while let Ok(status) = std::fs::read_to_string(format!("/proc/{pid}/status")) {
                if let Some(kib) = status
                    .lines()
                    .find(|l| l.starts_with("VmHWM:"))
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
                {
                    peak.fetch_max(kib, std::sync::atomic::Ordering::Relaxed);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        })
    };
    let mut stdout = child.stdout.take().unwrap();
    let mut total = 0u64;
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = stdout.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        assert!(buf[..n].iter().all(|&b| b == 0));
        total += n as u64;
    }
    let status = child.wait().unwrap();
    sampler.join().unwrap();
    assert!(status.success(), "hearth run failed");
    assert_eq!(total, SIZE);
    let peak_mib = peak.load(std::sync::atomic::Ordering::Relaxed) / 1024;
    assert!(
        peak_mib > 0 && peak_mib < 64,
        "hearth peak RSS {peak_mib} MiB while streaming 200 MiB"
    );
}

#[test]
fn malformed_reference_is_a_clear_error_without_booting() {
    let out = run(&["Not A Reference!", "true"]);
    assert_eq!(out.status.code(), Some(125));
    assert!(
        text(&out.stderr).contains("Not A Reference!"),
        "stderr: {}",
        text(&out.stderr)
    );
}

#[test]
fn dry_run_prints_the_vmm_command_and_starts_nothing() {
    let out = run(&["--dry-run", &image("busybox"), "true"]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains("qemu-system-x86_64") && stdout.contains("microvm"),
        "{stdout}"
    );
    assert!(
        stdout.contains("hearth-rootfs") && stdout.contains("hearth-scratch"),
        "{stdout}"
    );
    // The NIC every run gets (default-deny policy), and none with --no-network.
    assert!(
        stdout.contains("virtio-net-device") && stdout.contains("ifname=hearth0"),
        "{stdout}"
    );
    let out = run(&["--dry-run", "--no-network", &image("busybox"), "true"]);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        !text(&out.stdout).contains("virtio-net"),
        "{}",
        text(&out.stdout)
    );
    // Firecracker's plan prints even where its binary is absent: the command and its config file
    // (unconfined here, so the paths are the run directory's).
    let out = run(&[
        "--dry-run",
        "--vmm",
        "firecracker",
        "--jailer",
        "off",
        &image("busybox"),
        "true",
    ]);
    let stdout = text(&out.stdout);
    assert!(out.status.success(), "stderr: {}", text(&out.stderr));
    assert!(
        stdout.contains("--api-sock") && stdout.contains("vm_config.json"),
        "{stdout}"
    );
    let config_start = stdout
        .find("\n{")
        .expect("the config file follows the command line");
    let config: serde_json::Value = serde_json::from_str(&stdout[config_start..]).unwrap();
    // Firecracker's resource-id rule: letters, digits and `_` only.
    assert_eq!(config["drives"][0]["drive_id"], "hearth_rootfs");
    assert_eq!(config["drives"][0]["is_read_only"], true);
    assert_eq!(config["drives"][1]["is_read_only"], false);
    assert_eq!(config["vsock"]["guest_cid"], 3);
    assert_eq!(config["network-interfaces"][0]["host_dev_name"], "hearth0");
    // Through the jailer: an unprivileged uid/gid and cgroup limits from --cpus/--memory, in the
    // cgroup version this host mounts (v1 controllers on our machines, v2 elsewhere). The jail's
    // sockets sit deep under the home and must fit in `sun_path`: a short home, wherever the
    // checkout lives.
    let short_home = tempfile::Builder::new()
        .prefix("hj")
        .tempdir_in("/tmp")
        .unwrap();
    let busybox = image("busybox");
    let jailed_plan = |args: &[&str]| {
        let out = hearth()
            .env("HEARTH_HOME", short_home.path())
            .args(["run", "--dry-run", "--vmm", "firecracker"])
            .args(args)
            .args([busybox.as_str(), "true"])
            .stdin(Stdio::null())
            .output()
            .expect("spawn hearth");
        assert!(out.status.success(), "stderr: {}", text(&out.stderr));
        text(&out.stdout)
    };
    let stdout = jailed_plan(&["--jailer", "1234:1235", "--cpus", "2", "--memory", "256m"]);
    let v1 = stdout.contains("--cgroup-version 1");
    let limits: &[&str] = match v1 {
        true => &["cpu.cfs_quota_us=200000", "memory.limit_in_bytes="],
        false => &["--cgroup-version 2", "cpu.max=200000", "memory.max="],
    };
    for expected in ["--uid 1234", "--gid 1235"].iter().chain(limits) {
        assert!(
            stdout.contains(expected),
            "jailer command has {expected}: {stdout}"
        );
    }
    // Without `--jailer`, hearth as root runs Firecracker through the jailer as a uid of the VM's
    // own (the dry run shows the range's first), as it confines QEMU: least privilege by default.
    let stdout = jailed_plan(&[]);
    // SAFETY: geteuid cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        let first = hearth_vm::confine::FIRST_UID;
        for expected in [format!("--uid {first}"), format!("--gid {first}")] {
            assert!(stdout.contains(&expected), "default jail: {stdout}");
        }
    }
    let runs = home().join("run");
    let leftover: Vec<_> = std::fs::read_dir(&runs)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name())
                .filter(|n| n == "dry-run")
                .collect()
        })
        .unwrap_or_default();
    assert!(leftover.is_empty(), "dry run created a run directory");
}

/// An image with no `/etc` at all and no `User` (the `scratch` test image: only a static
/// `/bin/busybox`, as images built `FROM scratch` around a static binary are) runs as uid 0 / gid 0
/// like `docker run`; numeric ids need no passwd file.
#[test]
fn an_image_without_etc_runs_as_root_and_numeric_ids() {
    let out = run(&[&image("scratch")]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("uid=0 gid=0\n", Some(0)),
        "stderr: {}",
        text(&out.stderr)
    );
    let out = run(&["-u", "1234:5678", &image("scratch"), "/bin/busybox", "id"]);
    assert_eq!(
        (text(&out.stdout).as_str(), out.status.code()),
        ("uid=1234 gid=5678\n", Some(0)),
        "stderr: {}",
        text(&out.stderr)
    );
}

/// A named user in an image without /etc/passwd is exit 126 with a message naming both.
#[test]
fn a_named_user_without_etc_passwd_is_126_naming_it() {
    let out = run(&["-u", "nobody", &image("scratch")]);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(126), "stderr: {stderr}");
    assert!(
        stderr.contains("nobody") && stderr.contains("/etc/passwd"),
        "stderr: {stderr}"
    );
    assert_eq!(text(&out.stdout), "");
}
