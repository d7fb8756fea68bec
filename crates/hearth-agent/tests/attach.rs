//! Taking over an exec (`POST /v1/attach`) on the real agent: a second host connection takes a
//! running `attachable` exec with its stdin and output, the first one's stream ends, and closing
//! the first connection no longer kills it (it belongs to its new host); an attachable exec whose
//! host went (a new host broke in, as a restarted daemon does) is parked, listed by `GET
//! /v1/execs` with its label, and taken over by the new host, while the plain execs of that host
//! are killed. Execs not started attachable, and ones that do not exist, cannot be taken. (Parking
//! across a save and restore needs a real VM: `hearth-sandbox`'s `attach.rs`.)

mod common;

use std::io::Write;
use std::time::Duration;

use common::*;
use hearth_vm::channel::{AgentClient, ChannelError, ExecHandle, ExecOutput};

async fn next_stdout(handle: &mut ExecHandle) -> String {
    let output = tokio::time::timeout(Duration::from_secs(10), handle.next_output())
        .await
        .expect("output within 10 s")
        .expect("output");
    match output {
        Some(ExecOutput::Stdout(data)) => text(&data),
        other => panic!("expected stdout, got {other:?}"),
    }
}

/// Starts an attachable exec labelled `label` that echoes each stdin line back as "got LINE";
/// returns once it said "up".
async fn start_echoer(client: &AgentClient, label: &str) -> ExecHandle {
    let script = "echo up; while read l; do echo \"got $l\"; done";
    let mut started = request(&["sh", "-c", script]);
    (started.stdin, started.attachable) = (true, true);
    started.label = Some(label.to_owned());
    let mut handle = client.exec(started).await.unwrap();
    assert_eq!(next_stdout(&mut handle).await, "up\n");
    handle
}

/// Starts a plain `sleep <marker>`; returns once it runs.
async fn start_sleeper(client: &AgentClient, marker: &str) -> ExecHandle {
    let script = format!("echo up; exec sleep {marker}");
    let mut handle = client.exec(request(&["sh", "-c", &script])).await.unwrap();
    assert_eq!(next_stdout(&mut handle).await, "up\n");
    // `up` comes before the shell execs `sleep`: wait for the sleeper itself (under load the
    // checks that follow could otherwise look before it exists).
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while processes_with_argv(&["sleep", marker]).is_empty() {
        assert!(
            std::time::Instant::now() < deadline,
            "sleep {marker} never started"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    handle
}

#[tokio::test]
async fn a_new_connection_takes_over_an_attachable_exec_with_its_stdin_and_output() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let first = agent.connect().await;
    let mut old = start_echoer(&first, "echo").await;
    let mut old_stdin = old.take_stdin().unwrap();
    old_stdin.write(b"one\n").await.unwrap();
    assert_eq!(next_stdout(&mut old).await, "got one\n");

    let second = agent.connect().await;
    let mut new = second.attach(old.id(), true).await.expect("attach");
    assert_eq!((new.id(), new.pid()), (old.id(), old.pid()));
    // The old stream ends: an error, not an exit status.
    let ended = tokio::time::timeout(Duration::from_secs(10), old.next_output()).await;
    assert!(
        matches!(ended, Ok(Err(_))),
        "the old stream should fail, got {ended:?}"
    );
    drop((old, old_stdin));
    // Closing the first host's connection does not kill an exec that has moved.
    drop(first);
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut stdin = new.take_stdin().unwrap();
    stdin.write(b"two\n").await.unwrap();
    assert_eq!(next_stdout(&mut new).await, "got two\n");
    stdin.close().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), new.wait())
        .await
        .expect("exit within 10 s")
        .expect("exit status");
    assert_eq!(status.code, Some(0), "{status:?}");
}

#[tokio::test]
async fn only_a_running_attachable_exec_can_be_taken_over() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let marker = "1000.8125";
    let plain = start_sleeper(&client, marker).await;
    for (id, why) in [(plain.id(), "not attachable"), (9999, "no such exec")] {
        match client.attach(id, false).await {
            Err(ChannelError::Agent(e)) => {
                assert_eq!(e.kind, hearth_proto::ErrorKind::NotFound, "{why}: {e:?}");
                assert!(e.message.contains("attachable"), "{why}: {}", e.message);
            }
            Err(other) => panic!("{why}: expected the agent's refusal, got {other:?}"),
            Ok(_) => panic!("{why}: attached"),
        }
    }
    // The refused attach left the plain exec running, on its own stream.
    assert_eq!(processes_with_argv(&["sleep", marker]).len(), 1);
    drop(plain);
    let left = wait_until_gone(&["sleep", marker], Duration::from_secs(5)).await;
    assert!(
        left.is_empty(),
        "the plain exec outlived its stream: {left:?}"
    );
}

#[tokio::test]
async fn an_attachable_exec_outlives_its_host_and_is_listed_for_the_next() {
    if skip_unless_root() {
        return;
    }
    let (agent, stream) = AgentProcess::on_stream();
    let first = connect_on(&stream).await;
    let keeper = start_echoer(&first, "keeper").await;
    let marker = "1000.9375";
    let plain = start_sleeper(&first, marker).await;

    // A new host breaks in (a restarted daemon's HELLO, no RESUME) and takes the channel over.
    let hello = hearth_proto::handshake::hello_line("00112233");
    stream
        .try_clone()
        .unwrap()
        .write_all(hello.as_bytes())
        .unwrap();
    // Let the first client's connection task go before the second speaks (see held_execs.rs).
    drop((keeper, plain, first));
    tokio::time::sleep(Duration::from_millis(200)).await;
    let second = connect_on(&stream).await;
    let left = wait_until_gone(&["sleep", marker], Duration::from_secs(15)).await;
    assert!(
        left.is_empty(),
        "the plain exec outlived its host: {left:?}"
    );

    let listed = second.execs().await.unwrap();
    let entry = listed
        .execs
        .iter()
        .find(|e| e.label.as_deref() == Some("keeper"))
        .unwrap_or_else(|| panic!("the attachable exec is not listed: {listed:?}"));
    assert!(entry.attachable && entry.parked, "{entry:?}");
    let mut keeper = second.attach(entry.id, true).await.expect("attach");
    let mut stdin = keeper.take_stdin().unwrap();
    stdin.write(b"again\n").await.unwrap();
    assert_eq!(next_stdout(&mut keeper).await, "got again\n");
    let listed = second.execs().await.unwrap();
    assert!(
        listed.execs.iter().all(|e| !e.parked),
        "still parked once attached: {listed:?}"
    );
    stdin.close().await.unwrap();
    let status = tokio::time::timeout(Duration::from_secs(10), keeper.wait())
        .await
        .expect("exit within 10 s")
        .unwrap();
    assert_eq!(status.code, Some(0), "{status:?}");
    drop(agent);
}
