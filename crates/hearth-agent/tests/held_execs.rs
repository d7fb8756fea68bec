//! The execs of a session cut short on the port (as a restored VM's old session is) are held for
//! the next handshake, and only a RESUME that refreshed a running agent inside a restored VM lets
//! them run on. Outside a VM (this standalone agent has no refresh) and without a handshake they
//! are killed: a host that breaks a session cannot leave processes behind.

mod common;

use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use hearth_vm::channel::{AgentClient, ExecOutput, Resume};

/// Starts `sleep <marker>` through `client` and waits until it runs; the handle keeps its stream.
async fn start_sleep(client: &AgentClient, marker: &str) -> hearth_vm::channel::ExecHandle {
    let script = format!("echo up; exec sleep {marker}");
    let mut handle = client.exec(request(&["sh", "-c", &script])).await.unwrap();
    assert_eq!(
        handle.next_output().await.unwrap(),
        Some(ExecOutput::Stdout("up\n".into()))
    );
    wait_until_present(&["sleep", marker]).await;
    handle
}

/// What a restored VM's new host writes first: a RESUME line and a HELLO, into the old session.
fn interrupt(stream: &std::os::unix::net::UnixStream) {
    let resume = Resume {
        unix_time_ns: 1,
        seed: [7; 32],
        hostname: "held".into(),
    };
    let lines = format!(
        "{}{}",
        hearth_proto::handshake::resume_line(&resume),
        hearth_proto::handshake::hello_line("00112233")
    );
    stream
        .try_clone()
        .unwrap()
        .write_all(lines.as_bytes())
        .unwrap();
}

/// Attack: a host breaks the session with handshake bytes and never completes a handshake. The
/// held execs are killed after the grace period instead of running on with no host.
#[tokio::test]
async fn held_execs_without_a_following_handshake_are_killed_after_the_grace() {
    if skip_unless_root() {
        return;
    }
    let (agent, stream) = AgentProcess::on_stream();
    let first = connect_on(&stream).await;
    let marker = "1000.4375";
    let _handle = start_sleep(&first, marker).await;
    let cut = Instant::now();
    interrupt(&stream);
    let grace = Duration::from_secs(10);
    let left = wait_until_gone(&["sleep", marker], grace + Duration::from_secs(5)).await;
    assert!(left.is_empty(), "held exec outlived the grace: {left:?}");
    assert!(
        cut.elapsed() >= Duration::from_secs(5),
        "killed after {:?}: not held for the next handshake",
        cut.elapsed()
    );
    drop(agent);
}

/// Attack: a host sends RESUME to an agent that was not restored (here: outside any VM, no
/// refresh) to keep another session's execs alive. They are killed at the handshake.
#[tokio::test]
async fn a_resume_that_refreshes_nothing_does_not_keep_held_execs() {
    if skip_unless_root() {
        return;
    }
    let (agent, stream) = AgentProcess::on_stream();
    let first = connect_on(&stream).await;
    let marker = "1000.5625";
    let handle = start_sleep(&first, marker).await;
    interrupt(&stream);
    // The first client's connection task reads the same socket until the last handle on it is
    // gone (then it is aborted): let it stop before a second client speaks there, or it takes
    // bytes meant for the second (a harness race, not the agent's).
    drop(handle);
    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    let dup = stream.try_clone().unwrap();
    dup.set_nonblocking(true).unwrap();
    let resume = Resume {
        unix_time_ns: 1,
        seed: [9; 32],
        hostname: "held".into(),
    };
    let second = tokio::time::timeout(
        Duration::from_secs(10),
        AgentClient::connect_resuming(tokio::net::UnixStream::from_std(dup).unwrap(), Some(resume)),
    )
    .await
    .expect("handshake within 10 s")
    .expect("connecting with RESUME");
    let left = wait_until_gone(&["sleep", marker], Duration::from_secs(3)).await;
    assert!(left.is_empty(), "a RESUME kept the held exec: {left:?}");
    assert_eq!(text(&sh(&second, "echo fresh").await.stdout), "fresh\n");
    drop(agent);
}
