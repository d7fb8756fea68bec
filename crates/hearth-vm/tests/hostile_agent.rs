//! Attack tests for the host end of the agent channel: a compromised guest agent (see
//! `support::hostile_agent`) completes the real handshake and then tries to hang the host or make
//! it buffer without bound. The host's `AgentClient` is the real one, on a real Unix socket pair.
//! Every bound asserted here is documented in `channel/mod.rs` and PROTOCOL.md ("Host limits").

mod support;

use std::time::{Duration, Instant};

use hearth_vm::channel::{
    AgentClient, ChannelError, ExecRequest, ANSWER_DEADLINE, MAX_CONCURRENT_REQUESTS,
    MAX_JSON_BODY, SHUTDOWN_DEADLINE,
};
use support::hostile_agent::{peak_rss, spawn_h2, spawn_raw, H2Attack, RawAttack};
use tokio::net::UnixStream;

const MIB: u64 = 1024 * 1024;

async fn connect_to(attack: H2Attack) -> AgentClient {
    let (host, guest) = UnixStream::pair().unwrap();
    spawn_h2(guest, attack);
    AgentClient::connect(host).await.unwrap()
}

fn sleep_request() -> ExecRequest {
    ExecRequest {
        argv: vec!["sleep".into(), "1".into()],
        ..ExecRequest::default()
    }
}

/// Attack: the agent accepts the shutdown request and never answers, which used to leave
/// `Sandbox::stop` (and so DELETE) waiting for ever. The request now fails within
/// `SHUTDOWN_DEADLINE`, and the caller kills the VM.
#[tokio::test]
async fn shutdown_to_a_silent_agent_gives_up_within_its_deadline() {
    let client = connect_to(H2Attack::NeverAnswer).await;
    let started = Instant::now();
    let err = client
        .shutdown()
        .await
        .expect_err("a silent agent cannot confirm");
    assert!(
        started.elapsed() < SHUTDOWN_DEADLINE + Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    assert!(
        matches!(err, ChannelError::Unresponsive { .. }),
        "unexpected error: {err}"
    );
}

/// Attack: the agent accepts requests and never answers them: no `Started` for an exec, no
/// answer to info or a download, no window (and no answer) for an upload. Each used to hang its
/// caller for ever (exec, uploads); each now fails with a clear error within `ANSWER_DEADLINE`.
#[tokio::test]
async fn requests_to_a_silent_agent_give_up_within_their_deadline() {
    let client = connect_to(H2Attack::NeverAnswer).await;
    let started = Instant::now();
    let big = vec![0u8; 4 * MIB as usize]; // more than the agent's window: the upload stalls
    let (exec, info, small_put, big_put, get) = tokio::join!(
        client.exec(sleep_request()),
        client.info(),
        client.put_file("/small", 0o644, &b"hello"[..]),
        client.put_file("/big", 0o644, &big[..]),
        client.get_file("/etc/hostname"),
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed < ANSWER_DEADLINE + Duration::from_secs(2),
        "took {elapsed:?}"
    );
    let errors = [
        exec.err().expect("no Started, no exec"),
        info.expect_err("no answer, no info"),
        small_put.expect_err("no answer, no upload"),
        big_put.expect_err("no window, no upload"),
        get.err().expect("no answer, no download"),
    ];
    for err in errors {
        assert!(
            matches!(err, ChannelError::Unresponsive { .. }),
            "unexpected error: {err}"
        );
    }
}

/// Attack: the "agent" accepts the connection and never answers the handshake. Connecting fails
/// at the caller's deadline.
#[tokio::test]
async fn an_agent_that_never_answers_the_handshake_times_out() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&path).unwrap();
    let _hold = tokio::spawn(async move {
        let (stream, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(60)).await;
        drop(stream);
    });
    let started = Instant::now();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
    let err = AgentClient::connect_unix(&path, deadline)
        .await
        .err()
        .expect("no handshake, no client");
    assert!(
        matches!(err, ChannelError::HandshakeTimeout(_)),
        "unexpected error: {err}"
    );
    assert!(started.elapsed() < Duration::from_secs(3));
}

/// Attack: the agent answers a request with an endless stream of PUSH_PROMISE frames, each
/// opening a stream the host would have to track. Push is disabled, so the first one is a
/// connection error: the request fails at once and host memory does not grow.
#[tokio::test]
async fn a_push_promise_flood_is_refused() {
    let (host, guest) = UnixStream::pair().unwrap();
    let attacker = spawn_raw(guest, RawAttack::PushPromiseFlood);
    let client = AgentClient::connect(host).await.unwrap();
    let before = peak_rss();
    let started = Instant::now();
    let err = client
        .info()
        .await
        .expect_err("a pushing agent gets no answer through");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        matches!(err, ChannelError::Closed | ChannelError::Http2(_)),
        "unexpected error: {err}"
    );
    let written = tokio::time::timeout(Duration::from_secs(10), attacker)
        .await
        .expect("the host closed the connection")
        .unwrap();
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 8 * MIB, "host memory grew {grown} bytes");
    // Only what fit in the socket buffers before the host hung up.
    assert!(
        written < 8 * MIB,
        "the host took {written} bytes of promises"
    );
    // The connection is gone for good: later requests fail too instead of hanging.
    assert!(client.info().await.is_err());
}

/// Attack: the agent answers with a header block that never ends (CONTINUATION frames for ever,
/// one header value claiming 1 GiB). The host refuses it past `MAX_HEADER_LIST` (64 KiB): the
/// request fails, the connection closes, memory stays bounded.
#[tokio::test]
async fn a_huge_header_block_is_refused() {
    let (host, guest) = UnixStream::pair().unwrap();
    let attacker = spawn_raw(guest, RawAttack::HugeHeaders);
    let client = AgentClient::connect(host).await.unwrap();
    let before = peak_rss();
    let started = Instant::now();
    let err = client
        .info()
        .await
        .expect_err("no answer with a 1 GiB header");
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(!matches!(err, ChannelError::Unresponsive { .. }), "{err}");
    let written = tokio::time::timeout(Duration::from_secs(10), attacker)
        .await
        .expect("the host stopped the flood")
        .unwrap();
    // 64 KiB of header block plus what the socket buffers held when the host hung up; with
    // h2's 16 MiB default the host would take 16 MiB before refusing.
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 4 * MIB, "host memory grew {grown} bytes");
    assert!(
        written < 2 * MIB,
        "the host took {written} bytes of headers"
    );
}

/// Attack: the agent answers `info` with a JSON body that never ends. The host cuts it at
/// `MAX_JSON_BODY` (1 MiB) with a clear error instead of buffering it all.
#[tokio::test]
async fn an_endless_json_answer_is_cut_at_the_cap() {
    let client = connect_to(H2Attack::EndlessBody).await;
    let before = peak_rss();
    let started = Instant::now();
    let err = client
        .info()
        .await
        .expect_err("an endless answer is no answer");
    assert!(started.elapsed() < Duration::from_secs(10));
    assert!(
        err.to_string()
            .contains(&format!("larger than {MAX_JSON_BODY} bytes")),
        "{err}"
    );
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 8 * MIB, "host memory grew {grown} bytes");
}

/// Attack: execs print without end while the caller does not read them. Flow control bounds what
/// the host buffers: at most the stream window (1 MiB) per exec and the connection window (4 MiB)
/// for all of them; here 4 unread execs (enough to fill the connection window) for 3 s must grow the
/// process by less than 12 MiB (the 4 MiB window plus allocator and h2 overhead), where an unbounded
/// client would take gigabytes. (With the connection window full, further answers on this client
/// wait for the caller to read; `ANSWER_DEADLINE` bounds that wait.)
#[tokio::test]
async fn unread_exec_output_is_bounded_by_flow_control() {
    let client = connect_to(H2Attack::EndlessExecOutput).await;
    let before = peak_rss();
    let mut handles = Vec::new();
    for _ in 0..4 {
        handles.push(client.exec(sleep_request()).await.unwrap());
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let grown = peak_rss().saturating_sub(before);
    assert!(grown < 12 * MIB, "host memory grew {grown} bytes");
    // The output is there for whoever reads it.
    let output = handles[0].next_output().await.unwrap();
    assert!(output.is_some());
}

/// Attack: a guest that never finishes requests would let callers open streams without end. A
/// client (one per sandbox) has at most `MAX_CONCURRENT_REQUESTS` open; one more fails at once
/// with `Busy` instead of queueing.
#[tokio::test]
async fn requests_beyond_the_cap_fail_at_once() {
    let client = connect_to(H2Attack::NeverAnswer).await;
    let mut hung = Vec::new();
    for _ in 0..MAX_CONCURRENT_REQUESTS {
        let client = client.clone();
        hung.push(tokio::spawn(async move { client.info().await }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let started = Instant::now();
    let err = client.info().await.expect_err("over the cap");
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        matches!(err, ChannelError::Busy(n) if n == MAX_CONCURRENT_REQUESTS),
        "{err}"
    );
    for task in &hung {
        task.abort();
    }
    // Aborted requests give their places back.
    for task in hung {
        let _ = task.await;
    }
    let again = tokio::time::timeout(Duration::from_millis(500), client.info()).await;
    assert!(
        again.is_err(),
        "the silent agent still does not answer, but the request is accepted"
    );
}
