//! Port forwarding through the agent channel (`POST /v1/forward`) with the real agent binary outside
//! a VM (`hearth-agent serve`, so its "guest loopback" is this machine's) and the real host client
//! (`AgentClient::forward`): bytes both ways with half-close, a refused port failing at once with a
//! typed error, the guest socket closed when the host abandons the stream, and backpressure when
//! the host does not read. The same request in a real guest: `hearth-sandbox/tests/guest_network.rs`.

mod common;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use hearth_vm::channel::ForwardError;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A listener on 127.0.0.1 whose first connection is handed to `serve` on a thread.
fn serve_one(serve: impl FnOnce(std::net::TcpStream) + Send + 'static) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        serve(stream);
    });
    port
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bytes_flow_both_ways_and_half_close_reaches_the_guest_socket() {
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    // Echoes everything back, then says how many bytes it got once the host half-closed.
    let port = serve_one(|mut stream| {
        let mut buf = vec![0u8; 65536];
        let mut total = 0usize;
        loop {
            let n = stream.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            total += n;
            stream.write_all(&buf[..n]).unwrap();
        }
        stream.write_all(format!("got {total}").as_bytes()).unwrap();
    });
    let stream = client
        .forward(port)
        .await
        .expect("forward to a listening port");
    assert_eq!(stream.port(), port);
    let (mut read, mut write) = tokio::io::split(stream);
    // More than the stream window (1 MiB), so both directions wait for window on the way.
    let data: Vec<u8> = (0..5 * 1024 * 1024u32).map(|i| (i % 251) as u8).collect();
    let sent = data.clone();
    let writer = tokio::spawn(async move {
        write.write_all(&sent).await.unwrap();
        write.shutdown().await.unwrap();
        write
    });
    let mut received = Vec::new();
    tokio::time::timeout(Duration::from_secs(60), read.read_to_end(&mut received))
        .await
        .expect("relay within 60 s")
        .unwrap();
    writer.await.unwrap();
    let trailer = format!("got {}", data.len());
    assert_eq!(received.len(), data.len() + trailer.len());
    assert!(received[..data.len()] == data[..], "echoed bytes differ");
    assert_eq!(&received[data.len()..], trailer.as_bytes());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_port_nothing_listens_on_fails_at_once_with_a_typed_error() {
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    // A port that was just free: bind, note, close.
    let port = TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let started = Instant::now();
    let error = match client.forward(port).await {
        Ok(_) => panic!("forward to closed port {port} succeeded"),
        Err(e) => e,
    };
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
    match &error {
        ForwardError::Refused { port: p, message } => {
            assert_eq!(*p, port);
            assert!(message.contains("refused"), "{message}");
        }
        other => panic!("expected Refused, got {other:?}"),
    }
    // The channel is fine afterwards.
    client.info().await.expect("info after a refused forward");
}

/// Attack: a host (or a crashed client) abandons a forwarded connection without closing it. The
/// agent must close the guest-side socket instead of keeping it (and its relay) open for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_stream_closes_the_guest_socket() {
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let (closed_tx, closed_rx) = std::sync::mpsc::channel();
    let port = serve_one(move |mut stream| {
        stream.write_all(b"hello").unwrap();
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let mut buf = [0u8; 16];
        // End of file or a reset both mean the agent let go; a timeout means it did not.
        let outcome = match stream.read(&mut buf) {
            Ok(0) => "closed",
            Ok(_) => "data",
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => "still open",
            Err(_) => "closed",
        };
        let _ = closed_tx.send(outcome);
    });
    let mut stream = client.forward(port).await.unwrap();
    let mut hello = [0u8; 5];
    stream.read_exact(&mut hello).await.unwrap();
    assert_eq!(&hello, b"hello");
    drop(stream);
    let outcome = tokio::task::spawn_blocking(move || closed_rx.recv().unwrap())
        .await
        .unwrap();
    assert_eq!(outcome, "closed");
}

/// Attack: the guest sends without end while the host does not read. The agent must stop reading
/// the guest socket once the stream's window is used up, so the guest's writes block instead of
/// host (or agent) memory growing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_that_does_not_read_stalls_the_guest_sender() {
    let agent = AgentProcess::listening();
    let client = agent.connect().await;
    let written = Arc::new(AtomicUsize::new(0));
    let counter = written.clone();
    let port = serve_one(move |mut stream| {
        let chunk = vec![7u8; 64 * 1024];
        // Fails once the host end goes away; counts what got into the socket until then.
        while stream.write_all(&chunk).is_ok() {
            counter.fetch_add(chunk.len(), Ordering::SeqCst);
        }
    });
    let mut stream = client.forward(port).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let stalled_at = written.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(
        written.load(Ordering::SeqCst),
        stalled_at,
        "the sender kept going"
    );
    // Window (1 MiB) plus the kernel's socket buffers on both sides of loopback.
    assert!(
        stalled_at < 32 * 1024 * 1024,
        "{stalled_at} bytes in flight"
    );
    // Reading again lets it continue.
    let mut buf = vec![0u8; 4 * 1024 * 1024];
    stream.read_exact(&mut buf).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(written.load(Ordering::SeqCst) > stalled_at);
}
