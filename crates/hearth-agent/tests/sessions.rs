//! Sessions: handshake and info, reconnection on a new stream and on the same stream (as on the
//! virtio-serial port, with stale bytes of the old session in it), execs killed when their session
//! ends, and shutdown.

mod common;

use std::time::Duration;

use common::*;
use hearth_vm::channel::ExecOutput;

#[tokio::test]
async fn info_reports_versions_and_kernel() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let info = client.info().await.unwrap();
    assert_eq!(info.protocol, hearth_proto::PROTOCOL_MAJOR);
    assert_eq!(info.agent_version, client.agent_version());
    let release = nix::sys::utsname::uname()
        .unwrap()
        .release()
        .to_string_lossy()
        .into_owned();
    assert_eq!(info.kernel_release, release);
}

#[tokio::test]
async fn dropping_a_client_kills_its_execs_and_a_new_connection_works() {
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut handle = client
        .exec(request(&["sh", "-c", "echo up; sleep 1000.75"]))
        .await
        .unwrap();
    assert_eq!(
        handle.next_output().await.unwrap(),
        Some(ExecOutput::Stdout("up\n".into()))
    );
    wait_until_present(&["sleep", "1000.75"]).await;
    drop(handle);
    drop(client);
    let survivors = wait_until_gone(&["sleep", "1000.75"], Duration::from_secs(3)).await;
    assert!(
        survivors.is_empty(),
        "exec survived its session: {survivors:?}"
    );
    let client = agent.connect().await;
    assert_eq!(text(&sh(&client, "echo again").await.stdout), "again\n");
}

#[tokio::test]
async fn a_new_client_takes_over_the_same_stream_mid_session() {
    if skip_unless_root() {
        return;
    }
    let (agent, stream) = AgentProcess::on_stream();
    let first = connect_on(&stream).await;
    // Leave the first session mid-flight: a running exec whose output is still arriving.
    let mut handle = first
        .exec(request(&[
            "sh",
            "-c",
            "while :; do echo spam spam spam; done & sleep 1000.875",
        ]))
        .await
        .unwrap();
    handle.next_output().await.unwrap();
    drop(handle);
    drop(first);
    // The agent never saw end of file: the new HELLO must get through the old session's bytes.
    let second = connect_on(&stream).await;
    assert_eq!(text(&sh(&second, "echo fresh").await.stdout), "fresh\n");
    let survivors = wait_until_gone(&["sleep", "1000.875"], Duration::from_secs(3)).await;
    assert!(
        survivors.is_empty(),
        "the old session's exec survived: {survivors:?}"
    );
    // And a third time, with a session that was idle.
    drop(second);
    let third = connect_on(&stream).await;
    assert!(third.info().await.is_ok());
    drop(agent);
}

#[tokio::test]
async fn shutdown_kills_execs_and_ends_the_agent() {
    if skip_unless_root() {
        return;
    }
    let mut agent = AgentProcess::listening();
    let client = agent.connect().await;
    let mut handle = client
        .exec(request(&["sh", "-c", "echo up; exec sleep 1000.625"]))
        .await
        .unwrap();
    handle.next_output().await.unwrap();
    client.shutdown().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let status = loop {
        if let Some(status) = agent.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "agent still running after shutdown"
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success());
    assert!(
        wait_until_gone(&["sleep", "1000.625"], Duration::from_secs(2))
            .await
            .is_empty()
    );
}

/// Plays Firecracker's hybrid vsock socket in front of a listening agent: refuses the first
/// `CONNECT` (as Firecracker does while nothing listens in the guest), then proxies.
#[tokio::test]
async fn hybrid_vsock_connect_retries_until_the_guest_listens() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    if skip_unless_root() {
        return;
    }
    let agent = AgentProcess::listening();
    let agent_socket = agent.socket.clone().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vsock_socket = dir.path().join("firecracker.vsock");
    let listener = tokio::net::UnixListener::bind(&vsock_socket).unwrap();
    async fn read_line(stream: &mut tokio::net::UnixStream) -> String {
        let mut line = Vec::new();
        loop {
            match stream.read_u8().await.unwrap() {
                b'\n' => return String::from_utf8(line).unwrap(),
                byte => line.push(byte),
            }
        }
    }
    let proxy = tokio::spawn(async move {
        let (mut refused, _) = listener.accept().await.unwrap();
        assert_eq!(read_line(&mut refused).await, "CONNECT 1024");
        drop(refused);
        let (mut accepted, _) = listener.accept().await.unwrap();
        assert_eq!(read_line(&mut accepted).await, "CONNECT 1024");
        accepted.write_all(b"OK 1073741824\n").await.unwrap();
        let mut upstream = tokio::net::UnixStream::connect(agent_socket).await.unwrap();
        let _ = tokio::io::copy_bidirectional(&mut accepted, &mut upstream).await;
    });
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let client =
        hearth_vm::channel::AgentClient::connect_hybrid_vsock(&vsock_socket, 1024, deadline)
            .await
            .unwrap();
    assert_eq!(
        text(&sh(&client, "echo via-vsock").await.stdout),
        "via-vsock\n"
    );
    drop(client);
    proxy.await.unwrap();
}

/// A pty stands in for the virtio-serial port: its master reports a hang-up while no slave is
/// open and recovers when one is opened again, as a port does while the host is disconnected.
/// The agent must end the session on hang-up (killing its execs) and serve the next host, also
/// when the host comes back before the agent noticed it was gone.
#[tokio::test]
async fn sessions_survive_host_hangups_on_a_port_like_stream() {
    use std::os::fd::AsRawFd;
    if skip_unless_root() {
        return;
    }
    let pty = nix::pty::openpty(None, None).unwrap();
    let slave_path =
        std::fs::read_link(format!("/proc/self/fd/{}", pty.slave.as_raw_fd())).unwrap();
    let open_host_end = || {
        let slave = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&slave_path)
            .unwrap();
        let mut termios = nix::sys::termios::tcgetattr(&slave).unwrap();
        nix::sys::termios::cfmakeraw(&mut termios);
        nix::sys::termios::tcsetattr(&slave, nix::sys::termios::SetArg::TCSANOW, &termios).unwrap();
        hearth_agent::stream::FdStream::new(slave.into()).unwrap()
    };
    let first_end = open_host_end();
    drop(pty.slave);
    let agent = AgentProcess::on_fd(pty.master);
    let connect = |stream| async move {
        tokio::time::timeout(
            Duration::from_secs(10),
            hearth_vm::channel::AgentClient::connect(stream),
        )
        .await
        .expect("handshake within 10 s")
        .expect("connecting over the pty")
    };

    let client = connect(first_end).await;
    let mut handle = client
        .exec(request(&["sh", "-c", "echo up; exec sleep 1000.9375"]))
        .await
        .unwrap();
    handle.next_output().await.unwrap();
    // The host goes away (every slave fd closed: the master reports a hang-up) and stays away.
    drop(handle);
    drop(client);
    let survivors = wait_until_gone(&["sleep", "1000.9375"], Duration::from_secs(3)).await;
    assert!(
        survivors.is_empty(),
        "exec survived the host hanging up: {survivors:?}"
    );

    let client = connect(open_host_end()).await;
    assert_eq!(text(&sh(&client, "echo second").await.stdout), "second\n");
    // Gone and back at once: the agent may see the hang-up only as a latched event.
    drop(client);
    let client = connect(open_host_end()).await;
    assert_eq!(text(&sh(&client, "echo third").await.stdout), "third\n");
    drop(agent);
}
