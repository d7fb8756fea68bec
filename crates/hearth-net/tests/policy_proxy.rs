//! The per-sandbox egress proxy on loopback, with real TCP servers as destinations and a fixed
//! destination in place of `SO_ORIGINAL_DST` (the seam the proxy takes). On loopback every
//! destination is one of the host's own addresses, which the standard blocked set refuses; these
//! tests therefore give the proxy an empty blocked set ([`Blocked::default`]): what they check is
//! the rest of the decision (addresses, ports, names, SNI / Host), the relaying, the live cut and
//! the limits. Servers on ports 80/443 (where the name checks apply) listen on their own
//! 127.x.y.z address, which needs root to bind.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_net::learned::LearnedAddrs;
use hearth_net::policy::{Blocked, Mode, NetworkPolicy, Reason};
use hearth_net::proxy::{EgressProxy, ProxyConfig, ProxyTask, Refusal};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// A loopback address of its own for each server on a fixed port, so parallel test processes
/// do not collide.
fn own_loopback() -> Ipv4Addr {
    static NEXT: AtomicU8 = AtomicU8::new(1);
    let pid = std::process::id();
    Ipv4Addr::new(
        127,
        100 + (pid % 100) as u8,
        (pid / 100 % 250) as u8,
        NEXT.fetch_add(1, Ordering::Relaxed),
    )
}

/// An echo server; returns its address.
async fn echo_server(addr: SocketAddr) -> SocketAddr {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
            });
        }
    });
    addr
}

/// A server that keeps the first bytes of every connection and answers `ok`.
async fn recording_server(addr: SocketAddr) -> (SocketAddr, Arc<Mutex<Vec<Vec<u8>>>>) {
    let listener = TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let record = seen.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = listener.accept().await.unwrap();
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 16384];
                let n = s.read(&mut buf).await.unwrap_or(0);
                record.lock().unwrap().push(buf[..n].to_vec());
                let _ = s.write_all(b"ok").await;
            });
        }
    });
    (addr, seen)
}

struct Proxy {
    proxy: EgressProxy,
    addr: SocketAddr,
    ledger: Arc<LearnedAddrs>,
    _task: ProxyTask,
}

fn start_proxy(policy: NetworkPolicy, dst: SocketAddr, config: ProxyConfig) -> Proxy {
    let ledger = Arc::new(LearnedAddrs::default());
    let proxy = EgressProxy::new(
        config,
        policy,
        Blocked::default(),
        ledger.clone(),
        Arc::new(move |_: &std::net::TcpStream| Ok(dst)),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let task = proxy.spawn(listener).unwrap();
    Proxy {
        proxy,
        addr,
        ledger,
        _task: task,
    }
}

fn policy(mode: Mode, allow: &[String], deny: &[String]) -> NetworkPolicy {
    let parse = |v: &[String]| v.iter().map(|s| s.parse().unwrap()).collect();
    NetworkPolicy::new(mode, parse(allow), parse(deny)).unwrap()
}

/// Reads until the peer closes or resets; `Err` means reset.
async fn read_to_end_or_reset(s: &mut TcpStream) -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut out))
        .await
        .expect("the connection ends")?;
    Ok(out)
}

/// Asserts the proxy refused the connection: reset (or closed) promptly, nothing relayed.
async fn assert_refused(s: &mut TcpStream) {
    let start = Instant::now();
    let got = read_to_end_or_reset(s).await;
    assert!(
        matches!(&got, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset)
            || matches!(&got, Ok(v) if v.is_empty()),
        "{got:?}"
    );
    assert!(start.elapsed() < Duration::from_secs(1));
}

/// A client hello from a real TLS client (rustls) asking for `server_name`.
fn client_hello(server_name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(rustls::RootCertStore::empty())
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from(server_name.to_string()).unwrap();
    let mut conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
    let mut hello = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut hello).unwrap();
    }
    hello
}

/// An allowed destination gets the guest's bytes and the guest gets the answers, counted both
/// ways; a destination the policy does not allow is reset at once and shows in the refused log.
#[tokio::test]
async fn allowed_destination_relays_both_ways() {
    let dst = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let p = start_proxy(
        policy(Mode::Allow, &[format!("127.0.0.1:{}", dst.port())], &[]),
        dst,
        ProxyConfig::default(),
    );
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"hello through the proxy").await.unwrap();
    c.shutdown().await.unwrap();
    assert_eq!(
        read_to_end_or_reset(&mut c).await.unwrap(),
        b"hello through the proxy"
    );
    let stats = p.proxy.stats();
    assert_eq!((stats.bytes_out, stats.bytes_in), (23, 23));
    assert_eq!((stats.connections, stats.refused), (1, 0));

    p.proxy.set_policy(policy(
        Mode::Allow,
        &[format!("127.0.0.1:{}", dst.port().wrapping_add(1).max(1))],
        &[],
    ));
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_refused(&mut c).await;
    let refused = p.proxy.refused();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].destination, dst);
    assert_eq!(refused[0].reason, Refusal::Policy(Reason::NotAllowed));
    assert_eq!(p.proxy.stats().refused, 1);
}

/// The attack: a guest allowed `allowed.test` connects to that name's address on 443 but asks
/// (TLS SNI) for `evil.test`, as if an allowed CDN address could be used to reach any site it
/// hosts. The proxy resets it without ever connecting; the same client asking for
/// `allowed.test` gets through, ClientHello intact.
#[tokio::test]
async fn disallowed_tls_sni_on_an_allowed_address_is_refused() {
    let ip = own_loopback();
    let (dst, seen) = recording_server(SocketAddr::new(IpAddr::V4(ip), 443)).await;
    let p = start_proxy(
        policy(Mode::Allow, &["allowed.test".into()], &[]),
        dst,
        ProxyConfig::default(),
    );
    p.ledger
        .record(dst.ip(), "allowed.test", Duration::from_secs(60));

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(&client_hello("evil.test")).await.unwrap();
    assert_refused(&mut c).await;
    assert!(
        seen.lock().unwrap().is_empty(),
        "the destination saw nothing"
    );
    let refused = p.proxy.refused();
    assert_eq!(
        refused[0].reason,
        Refusal::Policy(Reason::ServerNameNotAllowed)
    );
    assert_eq!(refused[0].name.as_deref(), Some("evil.test"));

    let hello = client_hello("allowed.test");
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(&hello).await.unwrap();
    assert_eq!(read_to_end_or_reset(&mut c).await.unwrap(), b"ok");
    assert_eq!(seen.lock().unwrap().as_slice(), [hello]);

    // Without a learned name, even the allowed SNI does not open the address.
    p.ledger.sweep_at(Instant::now() + Duration::from_secs(61));
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(&client_hello("allowed.test")).await.unwrap();
    assert_refused(&mut c).await;
}

/// The same attack over plain HTTP on port 80 with the Host header; a connection that sends
/// nothing within the peek time is refused too (no name to check).
#[tokio::test]
async fn disallowed_http_host_on_an_allowed_address_is_refused() {
    let ip = own_loopback();
    let (dst, seen) = recording_server(SocketAddr::new(IpAddr::V4(ip), 80)).await;
    let config = ProxyConfig {
        peek_timeout: Duration::from_millis(200),
        ..ProxyConfig::default()
    };
    let p = start_proxy(
        policy(Mode::Allow, &["*.allowed.test".into()], &[]),
        dst,
        config,
    );
    p.ledger
        .record(dst.ip(), "www.allowed.test", Duration::from_secs(60));

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(b"GET / HTTP/1.1\r\nHost: evil.test\r\n\r\n")
        .await
        .unwrap();
    assert_refused(&mut c).await;

    let mut c = TcpStream::connect(p.addr).await.unwrap();
    assert_refused(&mut c).await; // silent: refused after the peek time
    assert_eq!(
        p.proxy.refused()[1].reason,
        Refusal::Policy(Reason::NoServerName)
    );

    let request = b"GET /x HTTP/1.1\r\nHost: api.allowed.test\r\n\r\n";
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    c.write_all(request).await.unwrap();
    assert_eq!(read_to_end_or_reset(&mut c).await.unwrap(), b"ok");
    assert_eq!(seen.lock().unwrap().as_slice(), [request.to_vec()]);
}

/// The attack: a connection opened while a destination was allowed stays open after the policy
/// denies it. `set_policy` must cut it (reset) within a second; a change that still allows it
/// leaves it alone.
#[tokio::test]
async fn policy_change_cuts_open_connections() {
    let dst = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let entry = format!("127.0.0.1:{}", dst.port());
    let p = start_proxy(
        policy(Mode::Allow, std::slice::from_ref(&entry), &[]),
        dst,
        ProxyConfig::default(),
    );
    let mut c = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 4];
    c.write_all(b"ping").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();

    p.proxy.set_policy(policy(Mode::Open, &[], &[]));
    c.write_all(b"pong").await.unwrap();
    c.read_exact(&mut buf).await.unwrap();
    assert_eq!(&buf, b"pong", "still allowed: not cut");

    let cut_at = Instant::now();
    p.proxy
        .set_policy(policy(Mode::Open, &[], std::slice::from_ref(&entry)));
    let got = read_to_end_or_reset(&mut c).await;
    assert!(cut_at.elapsed() < Duration::from_secs(1));
    assert!(got.is_err() || got.as_ref().unwrap().is_empty(), "{got:?}");
    let refused = p.proxy.refused();
    assert_eq!(
        refused.last().unwrap().reason,
        Refusal::CutByPolicyChange(Reason::Denied)
    );
    assert_eq!(p.proxy.stats().active, 0);
}

/// The attack: a guest opening connections without end to exhaust the host. Beyond the limit
/// connections are reset; closing one makes room again.
#[tokio::test]
async fn connection_limit() {
    let dst = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let config = ProxyConfig {
        max_connections: 2,
        ..ProxyConfig::default()
    };
    let p = start_proxy(policy(Mode::Open, &[], &[]), dst, config);
    let mut open = Vec::new();
    for _ in 0..2 {
        let mut c = TcpStream::connect(p.addr).await.unwrap();
        let mut buf = [0u8; 2];
        c.write_all(b"hi").await.unwrap();
        c.read_exact(&mut buf).await.unwrap();
        open.push(c);
    }
    let mut third = TcpStream::connect(p.addr).await.unwrap();
    assert_refused(&mut third).await;
    assert_eq!(p.proxy.refused()[0].reason, Refusal::ConnectionLimit);

    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(2);
    while p.proxy.stats().active > 1 {
        assert!(
            Instant::now() < deadline,
            "the closed connection frees its slot"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let mut again = TcpStream::connect(p.addr).await.unwrap();
    let mut buf = [0u8; 2];
    again.write_all(b"ok").await.unwrap();
    again.read_exact(&mut buf).await.unwrap();
}

/// With a rate limit, a transfer takes as long as the limit says.
#[tokio::test]
async fn rate_limit_holds() {
    let dst = echo_server("127.0.0.1:0".parse().unwrap()).await;
    let config = ProxyConfig {
        rate_limit: Some(64 * 1024),
        ..ProxyConfig::default()
    };
    let p = start_proxy(policy(Mode::Open, &[], &[]), dst, config);
    let c = TcpStream::connect(p.addr).await.unwrap();
    let (mut r, mut w) = c.into_split();
    let payload = vec![7u8; 192 * 1024];
    let start = Instant::now();
    let writer = tokio::spawn(async move {
        w.write_all(&payload).await.unwrap();
        w.shutdown().await.unwrap();
    });
    let mut back = Vec::new();
    r.read_to_end(&mut back).await.unwrap();
    writer.await.unwrap();
    let took = start.elapsed();
    assert_eq!(back.len(), 192 * 1024);
    // 64 KiB of burst, then 128 KiB at 64 KiB/s.
    assert!(took >= Duration::from_millis(1800), "{took:?}");
    assert!(took < Duration::from_secs(10), "{took:?}");
}
