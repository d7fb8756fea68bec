//! Exec through the real agent and the real host client (no VM): exit codes, signals, stdin, env,
//! cwd, user, stderr, command-not-found, timeouts that kill the whole process tree, concurrency.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use common::*;
use hearth_vm::channel::{ExecOutput, ExecRequest};

#[tokio::test]
async fn exit_codes_and_separate_stdout_stderr() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let result = sh(&client, "echo out; echo err >&2; exit 42").await;
    assert_eq!(text(&result.stdout), "out\n");
    assert_eq!(text(&result.stderr), "err\n");
    assert_eq!(
        (
            result.status.code,
            result.status.signal,
            result.status.timed_out
        ),
        (Some(42), None, false)
    );
    assert_eq!(sh(&client, "true").await.status.code, Some(0));
}

#[tokio::test]
async fn env_cwd_and_defaults() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&["sh", "-c", "echo \"$GREETING|$(pwd)|$HOME|$PATH\""]);
    request.env = vec!["GREETING=hi there".into(), "GREETING=hello".into()];
    let workdir = tempfile::tempdir().unwrap();
    let missing_dir = workdir.path().join("made/by/agent");
    request.cwd = Some(missing_dir.to_str().unwrap().into());
    let result = run(&client, request).await;
    let expected = format!(
        "hello|{}|/root|/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n",
        missing_dir.display()
    );
    assert_eq!(
        text(&result.stdout),
        expected,
        "stderr: {}",
        text(&result.stderr)
    );
    assert!(
        missing_dir.is_dir(),
        "a missing working directory is created, as docker does"
    );
}

#[tokio::test]
async fn user_and_group_by_name_and_number() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    for (user, expected) in [
        ("nobody", "65534:"),
        ("1234:5678", "1234:5678"),
        ("0", "0:0"),
    ] {
        let mut request = request(&["sh", "-c", "echo $(id -u):$(id -g)"]);
        request.user = Some(user.into());
        let result = run(&client, request).await;
        let out = text(&result.stdout);
        assert!(
            out.starts_with(expected),
            "user {user}: {out} {}",
            text(&result.stderr)
        );
    }
    let mut request = request(&["id"]);
    request.user = Some("no-such-user".into());
    let result = run(&client, request).await;
    assert_eq!(result.status.code, Some(126));
    assert!(
        text(&result.stderr).contains("unable to find user no-such-user"),
        "{}",
        text(&result.stderr)
    );
}

/// A root like an image built `FROM scratch` around a static binary: `/bin/busybox` and no `/etc`.
#[tokio::test]
async fn a_root_without_etc_runs_root_and_numeric_users_and_names_what_is_missing() {
    if skip_unless_root() {
        return;
    }
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::create_dir(root.path().join("bin")).unwrap();
    std::fs::copy("/bin/busybox", root.path().join("bin/busybox"))
        .expect("copying the static /bin/busybox (Debian's busybox-static)");
    let agent = AgentProcess::listening_in(root.path());
    let client = agent.connect().await;
    let as_user = |user: Option<&str>| {
        let mut request = request(&[
            "/bin/busybox",
            "sh",
            "-c",
            "/bin/busybox id; echo \"HOME=$HOME\"",
        ]);
        request.user = user.map(str::to_string);
        request
    };

    // No user (the agent's default) and "root" (what hearth sends for an image without User).
    for user in [None, Some("root"), Some("0")] {
        let result = run(&client, as_user(user)).await;
        assert_eq!(
            (text(&result.stdout).as_str(), result.status.code),
            ("uid=0 gid=0\nHOME=/\n", Some(0)),
            "user {user:?}, stderr: {}",
            text(&result.stderr)
        );
    }
    let result = run(&client, as_user(Some("1234:5678"))).await;
    assert!(
        text(&result.stdout).starts_with("uid=1234 gid=5678"),
        "{} {}",
        text(&result.stdout),
        text(&result.stderr)
    );

    for (user, names) in [
        ("nobody", ["nobody", "/etc/passwd"]),
        ("root:wheel", ["wheel", "/etc/group"]),
    ] {
        let result = run(&client, as_user(Some(user))).await;
        let stderr = text(&result.stderr);
        assert_eq!(result.status.code, Some(126), "user {user}: {stderr}");
        assert!(
            names.iter().all(|n| stderr.contains(n)),
            "user {user}: {stderr}"
        );
    }
    assert!(
        !root.path().join("etc").exists(),
        "the agent left the root without /etc"
    );
}

#[tokio::test]
async fn missing_and_non_executable_commands_exit_127_and_126() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let result = run(&client, request(&["no-such-command-hearth"])).await;
    assert_eq!(result.status.code, Some(127));
    assert!(
        text(&result.stderr)
            .contains("\"no-such-command-hearth\": executable file not found in $PATH"),
        "{}",
        text(&result.stderr)
    );
    let result = run(&client, request(&["/no/such/file"])).await;
    assert_eq!(result.status.code, Some(127), "{}", text(&result.stderr));
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("not-executable");
    std::fs::write(&script, "#!/bin/sh\necho hi\n").unwrap();
    let result = run(&client, request(&[script.to_str().unwrap()])).await;
    assert_eq!(result.status.code, Some(126));
    assert!(
        text(&result.stderr).contains("permission denied"),
        "{}",
        text(&result.stderr)
    );
}

#[tokio::test]
async fn signals_are_reported_and_forwarded() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    // The command kills itself.
    let result = sh(&client, "kill -TERM $$").await;
    assert_eq!(
        (result.status.code, result.status.signal),
        (None, Some(libc::SIGTERM))
    );

    // A signal from the host reaches the command, whose trap handles it.
    let mut handle = client
        .exec(request(&[
            "sh",
            "-c",
            "trap 'echo got-term; exit 7' TERM; echo ready; while :; do sleep 0.05; done",
        ]))
        .await
        .unwrap();
    assert_eq!(
        handle.next_output().await.unwrap(),
        Some(ExecOutput::Stdout("ready\n".into()))
    );
    handle.signal(libc::SIGTERM).await.unwrap();
    let result = handle.output().await.unwrap();
    assert_eq!(text(&result.stdout), "got-term\n");
    assert_eq!(result.status.code, Some(7));

    // An untrapped signal from the host kills it.
    let mut handle = client
        .exec(request(&["sh", "-c", "echo ready; exec sleep 1000.25"]))
        .await
        .unwrap();
    handle.next_output().await.unwrap();
    handle.signal(libc::SIGINT).await.unwrap();
    let status = handle.wait().await.unwrap();
    assert_eq!((status.code, status.signal), (None, Some(libc::SIGINT)));

    // A signal sent the moment the exec has started is not lost: the exec-init, the init of its
    // PID namespace, starts with every signal blocked (a namespace's init that has no handler
    // drops a signal that arrives before it blocks them).
    for _ in 0..10 {
        let handle = client
            .exec(request(&["sh", "-c", "while :; do sleep 0.05; done"]))
            .await
            .unwrap();
        handle.signal(libc::SIGTERM).await.unwrap();
        let status = tokio::time::timeout(Duration::from_secs(10), handle.wait())
            .await
            .expect("SIGTERM sent right after the start was lost")
            .unwrap();
        assert_eq!((status.code, status.signal), (None, Some(libc::SIGTERM)));
    }

    // Signalling an exec that is over is a clear error.
    let err = client.signal(987_654, libc::SIGTERM).await.unwrap_err();
    assert!(
        err.to_string().contains("exec 987654 is not running"),
        "{err}"
    );
}

#[tokio::test]
async fn stdin_is_streamed_and_closed() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&["sh", "-c", "wc -c; echo done >&2"]);
    request.stdin = true;
    let mut handle = client.exec(request).await.unwrap();
    let mut stdin = handle.take_stdin().unwrap();
    // 20 MiB: far more than the HTTP/2 window and the pipe buffer, so the writer must wait.
    let block = vec![b'x'; 1024 * 1024];
    let writer = tokio::spawn(async move {
        for _ in 0..20 {
            stdin.write(&block).await.unwrap();
        }
        stdin.close().await.unwrap();
    });
    let result = handle.output().await.unwrap();
    writer.await.unwrap();
    assert_eq!(text(&result.stdout).trim(), (20 * 1024 * 1024).to_string());
    assert_eq!(text(&result.stderr), "done\n");
    assert!(result.status.success());

    // Without stdin the command reads end of file at once.
    let result = run(&client, self::request(&["cat"])).await;
    assert!(result.stdout.is_empty() && result.status.success());
}

#[tokio::test]
async fn timeout_kills_the_whole_process_tree() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&[
        "sh",
        "-c",
        "sleep 1000.5 & sleep 1000.5 & echo started; sleep 1000.5",
    ]);
    request.timeout_ms = Some(700);
    let started = std::time::Instant::now();
    let result = run(&client, request).await;
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(text(&result.stdout), "started\n");
    assert!(result.status.timed_out);
    assert_eq!(result.status.signal, Some(libc::SIGKILL));
    let survivors = wait_until_gone(&["sleep", "1000.5"], Duration::from_secs(2)).await;
    assert!(
        survivors.is_empty(),
        "sleep processes survived the timeout: {survivors:?}"
    );
}

/// Thaws and removes a cgroup v1 freezer group, whatever the test's outcome.
struct Frozen(std::path::PathBuf);

impl Frozen {
    fn thaw(&self) {
        let _ = std::fs::write(self.0.join("freezer.state"), "THAWED");
    }
}

impl Drop for Frozen {
    fn drop(&mut self) {
        self.thaw();
        for _ in 0..100 {
            if std::fs::remove_dir(&self.0).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// An exec killed for its timeout is answered at once, even while its processes cannot die yet:
/// here one is frozen (a cgroup v1 freezer holds SIGKILL until the thaw); in a guest, a fork bomb
/// of thousands takes the emulated kernel tens of seconds to tear down. The agent serves other
/// execs meanwhile and reaps the killed one once it can die.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timed_out_exec_is_answered_while_its_processes_are_still_dying() {
    if skip_unless_root() {
        return;
    }
    let freezer = std::path::Path::new("/sys/fs/cgroup/freezer");
    if !freezer.join("cgroup.procs").exists() {
        eprintln!("skipped: no cgroup v1 freezer on this host to hold a process from dying");
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut request = request(&["sh", "-c", "sleep 1000.7 & echo started; wait"]);
    request.timeout_ms = Some(1500);
    let timed = {
        let client = client.clone();
        tokio::spawn(async move {
            let started = std::time::Instant::now();
            let result = run(&client, request).await;
            (result, started.elapsed())
        })
    };
    wait_until_present(&["sleep", "1000.7"]).await;
    let sleeper = processes_with_argv(&["sleep", "1000.7"])[0];
    let group = Frozen(freezer.join(format!("hearth-agent-test-{}", std::process::id())));
    std::fs::create_dir(&group.0).unwrap();
    std::fs::write(group.0.join("cgroup.procs"), sleeper.to_string()).unwrap();
    std::fs::write(group.0.join("freezer.state"), "FROZEN").unwrap();
    // Whatever the agent does, the process is let go after 10 s.
    let (thawed, thaw_deadline) = std::sync::mpsc::channel::<()>();
    let thawer = {
        let path = group.0.clone();
        std::thread::spawn(move || {
            let _ = thaw_deadline.recv_timeout(Duration::from_secs(10));
            let _ = std::fs::write(path.join("freezer.state"), "THAWED");
        })
    };

    let (result, took) = timed.await.unwrap();
    assert!(
        took < Duration::from_secs(5),
        "the timed-out exec was answered only after {took:?} (its process was frozen for 10 s)"
    );
    assert!(result.status.timed_out, "{:?}", result.status);
    assert_eq!(result.status.signal, Some(libc::SIGKILL));
    assert_eq!(text(&result.stdout), "started\n");
    assert!(
        !processes_with_argv(&["sleep", "1000.7"]).is_empty(),
        "still dying when answered (else this test shows nothing)"
    );
    assert_eq!(text(&sh(&client, "echo next").await.stdout), "next\n");

    group.thaw();
    let _ = thawed.send(());
    let survivors = wait_until_gone(&["sleep", "1000.7"], Duration::from_secs(5)).await;
    assert!(
        survivors.is_empty(),
        "not reaped after the thaw: {survivors:?}"
    );
    thawer.join().unwrap();
}

#[tokio::test]
async fn the_workload_cannot_see_the_agent() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    // In its own PID namespace the exec-init is PID 1 and the command PID 2; /proc shows only them.
    let result = sh(
        &client,
        "echo $$; ls /proc | grep -E '^[0-9]+$' | sort -n | tr '\\n' ' '",
    )
    .await;
    let out = text(&result.stdout);
    let mut lines = out.lines();
    assert_eq!(lines.next(), Some("2"));
    let pids: Vec<u32> = lines
        .next()
        .unwrap()
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert!(
        pids.iter().all(|&p| p < 10),
        "only the exec's few processes are visible: {pids:?}"
    );
    let result = sh(&client, &format!("kill -9 {} 2>&1; echo $?", agent.pid())).await;
    assert!(
        text(&result.stdout).trim_end().ends_with('1'),
        "{}",
        text(&result.stdout)
    );
    assert!(client.info().await.is_ok(), "agent still answers");
}

#[tokio::test]
async fn concurrent_execs_share_one_channel() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let tasks: Vec<_> = (0..12)
        .map(|i| {
            let client = client.clone();
            tokio::spawn(async move {
                let script = format!(
                    "for n in $(seq 1 2000); do echo {i}-$n; done; echo e{i} >&2; exit {i}"
                );
                (i, sh(&client, &script).await)
            })
        })
        .collect();
    for task in tasks {
        let (i, result) = task.await.unwrap();
        let expected: String = (1..=2000).map(|n| format!("{i}-{n}\n")).collect();
        assert_eq!(text(&result.stdout), expected, "exec {i}");
        assert_eq!(text(&result.stderr), format!("e{i}\n"));
        assert_eq!(result.status.code, Some(i));
    }
}

#[tokio::test]
async fn bad_exec_requests_are_refused_with_a_reason() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let err = client
        .exec(ExecRequest::default())
        .await
        .err()
        .expect("empty argv is refused");
    assert!(err.to_string().contains("argv is empty"), "{err}");
    let mut request = request(&["true"]);
    request.env.push("NOT-KEY-VALUE".into());
    let result = run(&client, request).await;
    assert_eq!(result.status.code, Some(126));
    assert!(
        text(&result.stderr).contains("NOT-KEY-VALUE"),
        "{}",
        text(&result.stderr)
    );
}
