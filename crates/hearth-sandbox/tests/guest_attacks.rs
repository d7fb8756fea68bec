//! Attacks from inside a real guest (#12 item 11): a root workload in a real sandbox (QEMU under
//! TCG, the real kernel and agent, test images from the real registry) tries to reach the agent,
//! the hardware and the kernel, or to outgrow its process bound. One booted busybox sandbox serves
//! every workload attack; a hostile
//! image (`symlinks`: /etc -> `/`, /tmp -> `../../..`) gets a sandbox of its own.
//!
//! Needs a C compiler with static libc (Debian: gcc, libc6-dev) for the chroot-escape helper.

use std::path::Path;

use hearth_image::{ImageStore, PullOptions};
use hearth_sandbox::{Sandbox, SandboxConfig};
use hearth_vm::channel::{ExecRequest, ExitStatus};

/// docker's default capability set, as `/proc/PID/status` prints it.
const DOCKER_CAPS: &str = "00000000a80425fb";

/// Runs `script` with `sh -c`; returns its output (stderr merged into stdout, in order).
async fn sh(sandbox: &Sandbox, script: &str) -> (String, ExitStatus) {
    let request = ExecRequest {
        argv: vec!["sh".into(), "-c".into(), format!("exec 2>&1; {script}")],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        ..ExecRequest::default()
    };
    let out = sandbox
        .client()
        .exec(request)
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status,
    )
}

async fn sandbox_of(home: &Path, image: &str) -> Sandbox {
    let registry = hearth_testkit::registry().unwrap();
    let opts = PullOptions {
        insecure_registries: vec![registry.addr.clone()],
        ..Default::default()
    };
    let image = ImageStore::open(home)
        .unwrap()
        .ensure(&hearth_testkit::image_ref(image).unwrap(), &opts)
        .await
        .unwrap();
    let mut config = SandboxConfig::new(home);
    config.kernel = Some(hearth_testkit::kernel_dir());
    config.agent = Some(hearth_testkit::agent_bin());
    Sandbox::create(&config, image).await.unwrap()
}

/// The classic chroot escape as a static binary: chroot into a subdirectory while the working
/// directory stays outside it, walk `..` as far as it goes, chroot there. It then reports whether
/// it sees the agent's root (`/init`, the agent binary in the initramfs; `/run/hearth`, where the
/// agent mounts the disks) or still the workload root (`/escape-marker`).
const ESCAPE_C: &str = r#"
#include <stdio.h>
#include <sys/stat.h>
#include <unistd.h>
int main(void) {
    mkdir("/escape-x", 0755);
    if (chroot("/escape-x") != 0) { perror("chroot"); return 1; }
    for (int i = 0; i < 64; i++) chdir("..");
    if (chroot(".") != 0) { perror("chroot ."); return 1; }
    chdir("/");
    printf("init=%d run-hearth=%d marker=%d\n", access("/init", F_OK) == 0,
           access("/run/hearth", F_OK) == 0, access("/escape-marker", F_OK) == 0);
    return 0;
}
"#;

fn build_escape_helper(dir: &Path) -> Vec<u8> {
    let source = dir.join("escape.c");
    let binary = dir.join("escape");
    std::fs::write(&source, ESCAPE_C).unwrap();
    let status = std::process::Command::new("cc")
        .args(["-static", "-Os", "-o"])
        .arg(&binary)
        .arg(&source)
        .status()
        .expect("a C compiler (apt-get install gcc libc6-dev)");
    assert!(status.success(), "compiling the escape helper");
    std::fs::read(&binary).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_root_workload_cannot_reach_the_agent_the_hardware_or_the_kernel() {
    let home = tempfile::tempdir().unwrap();
    let escape = build_escape_helper(home.path());
    let sandbox = sandbox_of(home.path(), "busybox").await;

    // Attack: use every capability root has. It gets docker's set only, and no_new_privs.
    let (status, _) = sh(&sandbox, "grep -E '^(Cap|NoNewPrivs)' /proc/self/status").await;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(str::trim)
            .unwrap_or_default()
            .to_string()
    };
    assert_eq!(field("CapEff:"), DOCKER_CAPS, "{status}");
    assert_eq!(field("CapPrm:"), DOCKER_CAPS, "{status}");
    assert_eq!(field("CapBnd:"), DOCKER_CAPS, "{status}");
    assert_eq!(field("CapInh:"), "0000000000000000", "{status}");
    assert_eq!(field("CapAmb:"), "0000000000000000", "{status}");
    assert_eq!(field("NoNewPrivs:"), "1", "{status}");

    // Attack: open the agent's channel, the disks, memory, the console, the kernel log, vsock.
    // None of them is in the workload's /dev.
    let (out, _) = sh(
        &sandbox,
        "for d in /dev/vport0p1 /dev/vport1p1 /dev/hvc0 /dev/ttyS0 /dev/vda /dev/vdb /dev/mem \
         /dev/kmem /dev/port /dev/kmsg /dev/vsock /dev/console; do [ -e $d ] && echo present $d; \
         done; ls /dev",
    )
    .await;
    assert!(!out.contains("present"), "{out}");
    for name in [
        "null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm", "fd", "stdin",
    ] {
        assert!(out.lines().any(|l| l == name), "/dev/{name} missing: {out}");
    }
    let (out, status) = sh(
        &sandbox,
        "echo x > /dev/null && head -c 4 /dev/zero | wc -c && head -c 4 /dev/urandom | wc -c",
    )
    .await;
    assert!(status.success() && out == "4\n4\n", "{out}");

    // Attack: the workload keeps CAP_MKNOD, so it makes its own nodes for the agent's virtio port
    // and the image disk (numbers read from the read-only /sys). Creating them works; opening them
    // does not (every filesystem the workload can write is nodev).
    let (out, _) = sh(
        &sandbox,
        "n=0; for f in /sys/class/virtio-ports/*/dev /sys/block/vda/dev; do [ -e $f ] || continue; \
         n=$((n+1)); mm=$(cat $f); kind=c; case $f in /sys/block/*) kind=b;; esac; \
         mknod /tmp/node$n $kind ${mm%:*} ${mm#*:} && echo made $f; \
         (exec 3<>/tmp/node$n) && echo OPENED $f; done; echo nodes=$n",
    )
    .await;
    assert!(out.contains("made /sys/block/vda/dev"), "{out}");
    assert!(out.contains("made /sys/class/virtio-ports/"), "{out}");
    assert!(!out.contains("OPENED"), "a device node opened: {out}");
    assert!(out.contains("Permission denied"), "{out}");

    // Attack: load a kernel module (init_module), and make the kernel run a program as full root
    // through a usermode-helper sysctl (core_pattern, modprobe).
    let (out, _) = sh(
        &sandbox,
        "echo junk > /tmp/m.ko; insmod /tmp/m.ko; \
         echo '|/tmp/evil' > /proc/sys/kernel/core_pattern; \
         echo /tmp/evil > /proc/sys/kernel/modprobe; \
         echo c > /proc/sysrq-trigger; \
         cat /proc/sys/kernel/modules_disabled",
    )
    .await;
    assert!(out.contains("Operation not permitted"), "insmod: {out}");
    assert!(
        !out.contains("Invalid module format"),
        "insmod reached the loader: {out}"
    );
    assert_eq!(
        out.matches("Read-only file system").count(),
        3,
        "sysctls and sysrq must be read-only: {out}"
    );
    assert!(out.ends_with("1\n"), "modules_disabled: {out}");
    let (core, _) = sh(&sandbox, "cat /proc/sys/kernel/core_pattern").await;
    assert!(!core.contains("evil"), "{core}");

    // Attack: the chroot escape, from a root process with CAP_SYS_CHROOT.
    sandbox
        .client()
        .put_file("/escape", 0o755, &escape[..])
        .await
        .unwrap();
    let (out, status) = sh(&sandbox, "touch /escape-marker && /escape").await;
    assert!(status.success(), "{out}");
    assert_eq!(out, "init=0 run-hearth=0 marker=1\n", "escaped the root");
    // The same from the mount side: nothing of the agent's tree is mounted in the workload's view.
    let (mounts, _) = sh(&sandbox, "cat /proc/self/mountinfo").await;
    let points: Vec<&str> = mounts.lines().filter_map(|l| l.split(' ').nth(4)).collect();
    assert!(
        points.iter().all(|p| ["/", "/proc", "/sys", "/dev"]
            .iter()
            .any(|top| p == top || p.starts_with(&format!("{top}/")))),
        "{mounts}"
    );
    assert!(!points.iter().any(|p| p.contains("hearth")), "{mounts}");

    // Attack: kill everything (`kill -9 -1`). The agent is out of reach: the next exec works.
    let (_, _) = sh(&sandbox, "sleep 100 & kill -9 -1; wait").await;
    let (alive, status) = sh(&sandbox, "echo still-serving").await;
    assert!(status.success() && alive == "still-serving\n", "{alive}");

    // Attack: more processes than the guest can tear down in time. All execs share one bound
    // (`hearth_agent::workload_cgroup::PIDS_MAX`, 1024 with their exec-inits): forks past it fail.
    // (Forked by a child shell, which gives up at the first failed fork; counted with builtins:
    // at the bound, no `ps` can start.)
    let (count, _) = sh(
        &sandbox,
        "sh -c 'for i in $(seq 1500); do sleep 1000 & done' 2>/dev/null; \
         set -- /proc/[0-9]*; echo $#",
    )
    .await;
    let processes: u32 = count.trim().parse().unwrap_or_else(|_| panic!("{count}"));
    assert!(
        (900..=1024).contains(&processes),
        "the exec's namespace held {processes} processes after forking 1500 sleeps"
    );
    // A fork bomb killed by its timeout is answered at once (its processes die after), and the
    // sandbox serves the next exec. Unbounded, the guest made ~4,000 processes and took it 13 to
    // over 30 s to kill them, and the exec was answered only then.
    let bomb = ExecRequest {
        argv: vec![
            "sh".into(),
            "-c".into(),
            "b() { b | b & }; b; sleep 1000".into(),
        ],
        timeout_ms: Some(5000),
        ..ExecRequest::default()
    };
    let started = std::time::Instant::now();
    let out = sandbox
        .client()
        .exec(bomb)
        .await
        .unwrap()
        .output()
        .await
        .unwrap();
    let took = started.elapsed();
    eprintln!("{processes} processes at the bound; the fork bomb answered after {took:?}");
    assert!(out.status.timed_out, "{:?}", out.status);
    assert!(
        took < std::time::Duration::from_secs(12),
        "the fork bomb's exec was answered after {took:?} (timeout 5 s)"
    );
    let (alive, status) = sh(&sandbox, "echo still-serving").await;
    assert!(status.success() && alive == "still-serving\n", "{alive}");

    let exit = sandbox.destroy().await.unwrap();
    assert!(exit.failure.is_none(), "clean shutdown: {exit:?}");
}

/// Attack: an image whose /etc is a symlink to `/` and /tmp a symlink to `../../..`. The agent
/// writes /etc/hosts and /etc/hostname and creates /tmp at boot; followed naively, those writes
/// land in the agent's own root. Resolved inside the workload root they land in the image's `/`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_with_escaping_symlinks_cannot_redirect_the_agents_writes() {
    let home = tempfile::tempdir().unwrap();
    let sandbox = sandbox_of(home.path(), "symlinks").await;
    let (out, status) = sh(
        &sandbox,
        "busybox readlink /etc; busybox readlink /tmp; busybox cat /hostname; busybox hostname; busybox head -1 /hosts",
    )
    .await;
    assert!(status.success(), "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["/", "../../.."], "{out}");
    assert_eq!(
        lines[2], lines[3],
        "/etc/hostname landed inside the root: {out}"
    );
    assert!(
        lines[4].starts_with("127.0.0.1"),
        "/etc/hosts landed inside the root: {out}"
    );
    let exit = sandbox.destroy().await.unwrap();
    assert!(exit.failure.is_none(), "clean shutdown: {exit:?}");
}
