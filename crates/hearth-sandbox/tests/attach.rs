//! Attachable execs across a pause and resume, with real QEMU under TCG, the real kernel and agent
//! and the test registry's busybox image: an exec started `attachable` is parked in the restored
//! guest and its new host takes it over, stdin and output; one that no host attaches is killed once
//! the agent's grace (60 s) is over, while an exec not started attachable runs on, detached, as
//! before. Attack: a host that never comes back for a parked exec cannot leave it running for ever.

use std::time::{Duration, Instant};

use hearth_sandbox::{ExecOutput, ExecRequest, Sandbox};

mod support;
use support::{config, ok, pull};

fn request(script: &str, attachable: bool) -> ExecRequest {
    ExecRequest {
        argv: vec!["sh".into(), "-c".into(), script.into()],
        env: vec!["PATH=/bin:/usr/bin:/sbin:/usr/sbin".into()],
        stdin: true,
        attachable,
        ..ExecRequest::default()
    }
}

/// A loop that writes the time to `/dev/shm/<name>` every second (its own output is none, so a
/// parked exec's unread pipes never stop it).
fn heartbeat(name: &str) -> String {
    format!("while true; do date +%s%N > /dev/shm/{name}; sleep 1; done")
}

/// Whether `/dev/shm/<name>` changes within 3 s (once it exists: a heartbeat just started may not
/// have written it yet, under load).
async fn beats(sandbox: &Sandbox, name: &str) -> bool {
    let wait = format!(
        "i=0; until [ -e /dev/shm/{name} ] || [ $i -ge 100 ]; do sleep 0.1; i=$((i+1)); done"
    );
    ok(sandbox, &wait).await;
    let read = format!("cat /dev/shm/{name}");
    let before = ok(sandbox, &read).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    ok(sandbox, &read).await != before
}

async fn stdout(handle: &mut hearth_sandbox::ExecHandle) -> String {
    let next = tokio::time::timeout(Duration::from_secs(30), handle.next_output()).await;
    match next.expect("output within 30 s").expect("output") {
        Some(ExecOutput::Stdout(data)) => String::from_utf8_lossy(&data).into_owned(),
        other => panic!("expected stdout, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_parked_exec_is_taken_over_after_a_resume_and_one_never_attached_is_killed() {
    let home = tempfile::tempdir().unwrap();
    let busybox = pull(home.path(), "busybox").await;
    let config = config(home.path());
    let sandbox = Sandbox::create(&config, busybox).await.unwrap();
    let run_dir = sandbox.run_dir();
    let snapshot = home.path().join("paused").join(sandbox.id());

    let script = "echo up; while read l; do echo \"got $l\"; done";
    let mut talker = sandbox.client().exec(request(script, true)).await.unwrap();
    assert_eq!(stdout(&mut talker).await, "up\n");
    let talker_id = talker.id();
    let unclaimed = sandbox.client().exec(request(&heartbeat("parked"), true));
    let unclaimed = unclaimed.await.unwrap();
    let detached = sandbox
        .client()
        .exec(request(&heartbeat("detached"), false));
    let detached = detached.await.unwrap();
    assert!(beats(&sandbox, "parked").await && beats(&sandbox, "detached").await);

    let paused = sandbox.pause(&snapshot).await.unwrap();
    // The old VM's streams go with it.
    drop((talker, unclaimed, detached));
    let sandbox = paused.resume(&config, &run_dir, false).await.unwrap();
    let resumed = Instant::now();

    // Taken over: the same process, its stdin and output through the new stream.
    let mut talker = sandbox.client().attach(talker_id, true).await.unwrap();
    let mut stdin = talker.take_stdin().unwrap();
    stdin.write(b"again\n").await.unwrap();
    assert_eq!(stdout(&mut talker).await, "got again\n");
    stdin.close().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(30), talker.wait())
        .await
        .expect("exit within 30 s")
        .unwrap();
    assert_eq!(status.code, Some(0), "{status:?}");
    // A second takeover of an exec that has ended is refused.
    assert!(sandbox.client().attach(talker_id, true).await.is_err());

    // Never attached: runs on while parked, killed once the grace is over; the detached one runs
    // on regardless.
    assert!(
        beats(&sandbox, "parked").await,
        "the parked exec stopped at once"
    );
    loop {
        let waited = resumed.elapsed();
        assert!(
            waited < Duration::from_secs(120),
            "a parked exec no host attached to still runs {waited:?} after the resume"
        );
        if !beats(&sandbox, "parked").await {
            assert!(
                waited >= Duration::from_secs(50),
                "the parked exec was killed after only {waited:?}"
            );
            break;
        }
    }
    assert!(beats(&sandbox, "detached").await, "the detached exec died");
    sandbox.discard().await.unwrap();
}
