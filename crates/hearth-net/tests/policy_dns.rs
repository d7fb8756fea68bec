//! The per-sandbox resolver against a real upstream: a small DNS server built with hickory-proto
//! in this test, on 127.0.0.1, answering a fixed zone. The resolver's own sockets are plain
//! loopback sockets here (in production they are bound inside the sandbox's namespace).

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hearth_net::dns::{Resolver, ResolverConfig, ResolverTask};
use hearth_net::learned::LearnedAddrs;
use hearth_net::policy::{Blocked, Mode, NetworkPolicy, Reason};
use hearth_net::proxy::{EgressProxy, ProxyConfig, Refusal};
use hearth_net::rules::AddressLearner;
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME};
use hickory_proto::rr::{Name, RData, Record, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;

/// The upstream's zone: name -> records (type, data), all with TTL 1 so the clamp shows.
fn zone() -> HashMap<&'static str, Vec<RData>> {
    let a = |s: &str| RData::A(A(s.parse().unwrap()));
    let mut z = HashMap::new();
    z.insert("api.test.", vec![a("198.51.100.10")]);
    z.insert("other.test.", vec![a("198.51.100.20")]);
    z.insert(
        "cdn.test.",
        vec![
            RData::CNAME(CNAME(Name::from_ascii("edge.cdn-provider.test.").unwrap())),
            a("203.0.113.5"),
        ],
    );
    // DNS rebinding: an allowed name pointing at the host, the metadata service, a private
    // range and the cloud metadata IPv6 address, plus one public address.
    z.insert(
        "rebind.test.",
        vec![
            a("127.0.0.1"),
            a("169.254.169.254"),
            a("10.0.0.1"),
            RData::AAAA(AAAA("fd00:ec2::254".parse().unwrap())),
            a("198.51.100.9"),
        ],
    );
    z.insert("loopback.test.", vec![a("127.0.0.1")]);
    // More addresses than fit in a 512-byte UDP answer.
    z.insert(
        "many.test.",
        (1..=60).map(|i| a(&format!("203.0.113.{i}"))).collect(),
    );
    z
}

/// A real DNS server on 127.0.0.1 (UDP) answering [`zone`]; `slow.test` never gets an answer.
/// Counts the queries it sees.
async fn start_upstream() -> (SocketAddr, Arc<AtomicUsize>) {
    start_upstream_with(vec![]).await
}

/// [`start_upstream`] with extra A records.
async fn start_upstream_with(
    extra: Vec<(&'static str, Ipv4Addr)>,
) -> (SocketAddr, Arc<AtomicUsize>) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    let addr = sock.local_addr().unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let counter = seen.clone();
    tokio::spawn(async move {
        let mut zone = zone();
        for (name, ip) in extra {
            zone.entry(name).or_default().push(RData::A(A(ip)));
        }
        let mut buf = vec![0u8; 4096];
        loop {
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            counter.fetch_add(1, Ordering::SeqCst);
            let req = Message::from_vec(&buf[..n]).unwrap();
            let q = req.queries()[0].clone();
            let name = q.name().to_ascii().to_ascii_lowercase();
            if name == "slow.test." {
                continue;
            }
            let mut resp = Message::new();
            resp.set_id(req.id())
                .set_message_type(MessageType::Response)
                .set_op_code(OpCode::Query)
                .set_recursion_desired(true)
                .set_recursion_available(true)
                .add_query(q.clone());
            match zone.get(name.as_str()) {
                None => {
                    resp.set_response_code(ResponseCode::NXDomain);
                }
                Some(rdatas) => {
                    for rdata in rdatas {
                        let wanted = match rdata.record_type() {
                            RecordType::CNAME => true,
                            t => t == q.query_type(),
                        };
                        if wanted {
                            resp.add_answer(Record::from_rdata(q.name().clone(), 1, rdata.clone()));
                        }
                    }
                }
            }
            sock.send_to(&resp.to_vec().unwrap(), peer).await.unwrap();
        }
    });
    (addr, seen)
}

/// Records what the resolver made reachable, and when.
#[derive(Default)]
struct Learner {
    calls: Mutex<Vec<(Vec<IpAddr>, Duration, Instant)>>,
    /// Fail every call, as a firewall that cannot be updated would.
    fail: std::sync::atomic::AtomicBool,
}

impl AddressLearner for Learner {
    fn learn(&self, addrs: &[IpAddr], ttl: Duration) -> std::io::Result<()> {
        if self.fail.load(Ordering::SeqCst) {
            return Err(std::io::Error::other("firewall unavailable"));
        }
        self.calls
            .lock()
            .unwrap()
            .push((addrs.to_vec(), ttl, Instant::now()));
        Ok(())
    }
}

struct Setup {
    resolver: Resolver,
    udp: SocketAddr,
    tcp: SocketAddr,
    learner: Arc<Learner>,
    ledger: Arc<LearnedAddrs>,
    upstream_queries: Arc<AtomicUsize>,
    _task: ResolverTask,
}

async fn setup(policy: NetworkPolicy, timeout: Duration) -> Setup {
    let (upstream, upstream_queries) = start_upstream().await;
    let mut config = ResolverConfig::new(upstream);
    config.upstream_timeout = timeout;
    let learner = Arc::new(Learner::default());
    let ledger = Arc::new(LearnedAddrs::default());
    let resolver = Resolver::new(
        config,
        policy,
        Blocked::for_host(&[]),
        ledger.clone(),
        learner.clone(),
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let (udp_addr, tcp_addr) = (udp.local_addr().unwrap(), tcp.local_addr().unwrap());
    let task = resolver.spawn(udp, tcp).unwrap();
    Setup {
        resolver,
        udp: udp_addr,
        tcp: tcp_addr,
        learner,
        ledger,
        upstream_queries,
        _task: task,
    }
}

fn allow(entries: &[&str]) -> NetworkPolicy {
    NetworkPolicy::new(
        Mode::Allow,
        entries.iter().map(|e| e.parse().unwrap()).collect(),
        vec![],
    )
    .unwrap()
}

fn query(name: &str, qtype: RecordType) -> Message {
    let mut m = Message::new();
    m.set_id(0x4242)
        .set_message_type(MessageType::Query)
        .set_op_code(OpCode::Query)
        .set_recursion_desired(true)
        .add_query(Query::query(Name::from_ascii(name).unwrap(), qtype));
    m
}

/// Asks over UDP; returns the answer and when it arrived.
async fn ask(server: SocketAddr, name: &str, qtype: RecordType) -> (Message, Instant) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(&query(name, qtype).to_vec().unwrap(), server)
        .await
        .unwrap();
    let mut buf = vec![0u8; 4096];
    let (n, _) = tokio::time::timeout(Duration::from_secs(5), sock.recv_from(&mut buf))
        .await
        .expect("the resolver answers")
        .unwrap();
    let at = Instant::now();
    let m = Message::from_vec(&buf[..n]).unwrap();
    assert_eq!(m.id(), 0x4242);
    (m, at)
}

fn addrs(m: &Message) -> Vec<IpAddr> {
    m.answers()
        .iter()
        .filter_map(|r| match r.data() {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

/// An allowed name is answered with its addresses; the learner was told about them (with the
/// TTL clamped up to 5 s) before the answer left, and the ledger knows the name.
#[tokio::test]
async fn allowed_name_is_answered_and_learned_first() {
    let s = setup(
        allow(&["api.test", "*.cdn.test", "cdn.test"]),
        Duration::from_secs(2),
    )
    .await;
    let (m, answered_at) = ask(s.udp, "API.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    let ip: IpAddr = "198.51.100.10".parse().unwrap();
    assert_eq!(addrs(&m), vec![ip]);
    assert!(
        m.answers().iter().all(|r| r.ttl() == 5),
        "TTL clamped to the minimum"
    );
    let calls = s.learner.calls.lock().unwrap().clone();
    assert_eq!(calls.len(), 1);
    assert_eq!(calls[0].0, vec![ip]);
    assert_eq!(calls[0].1, Duration::from_secs(5));
    assert!(
        calls[0].2 <= answered_at,
        "learned before the answer was sent"
    );
    assert_eq!(s.ledger.names_for(ip), ["api.test"]);

    // CNAME chains are kept; the addresses are learned for the name asked.
    let (m, _) = ask(s.udp, "cdn.test", RecordType::A).await;
    assert!(m
        .answers()
        .iter()
        .any(|r| r.record_type() == RecordType::CNAME));
    let cdn: IpAddr = "203.0.113.5".parse().unwrap();
    assert_eq!(addrs(&m), vec![cdn]);
    assert_eq!(s.ledger.names_for(cdn), ["cdn.test"]);

    // A name the upstream does not know: NXDOMAIN passes through, nothing learned.
    let (m, _) = ask(s.udp, "missing.cdn.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::NXDomain);

    // Other types are answered empty without asking the upstream (no TXT tunnel).
    let before = s.upstream_queries.load(Ordering::SeqCst);
    let (m, _) = ask(s.udp, "api.test", RecordType::TXT).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(m.answers().is_empty());
    assert_eq!(s.upstream_queries.load(Ordering::SeqCst), before);
    assert_eq!(s.learner.calls.lock().unwrap().len(), 2);
    let stats = s.resolver.stats();
    assert_eq!((stats.queries, stats.refused, stats.forwarded), (4, 0, 3));
}

/// A name the policy does not allow gets REFUSED within 100 ms and never reaches the upstream;
/// in mode `none` every name does.
#[tokio::test]
async fn disallowed_names_are_refused_at_once() {
    let s = setup(allow(&["api.test"]), Duration::from_secs(2)).await;
    for name in ["other.test", "x.api.test", "api.test.evil.test"] {
        let start = Instant::now();
        let (m, at) = ask(s.udp, name, RecordType::A).await;
        assert_eq!(m.response_code(), ResponseCode::Refused, "{name}");
        assert!(
            at - start < Duration::from_millis(100),
            "{name}: {:?}",
            at - start
        );
        assert!(m.answers().is_empty());
    }
    s.resolver.set_policy(NetworkPolicy::none());
    let (m, _) = ask(s.udp, "api.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
    assert_eq!(s.upstream_queries.load(Ordering::SeqCst), 0);
    assert!(s.learner.calls.lock().unwrap().is_empty());
    assert_eq!(s.resolver.stats().refused, 4);
}

/// DNS rebinding: an allowed name whose answer points at loopback, the metadata service, a
/// private range or fd00:ec2::254 yields only its public address; one that points only at
/// loopback yields nothing, and nothing is learned for it.
#[tokio::test]
async fn rebinding_answers_are_filtered() {
    let s = setup(
        allow(&["rebind.test", "loopback.test"]),
        Duration::from_secs(2),
    )
    .await;
    let (m, _) = ask(s.udp, "rebind.test", RecordType::A).await;
    assert_eq!(addrs(&m), vec!["198.51.100.9".parse::<IpAddr>().unwrap()]);
    let (m6, _) = ask(s.udp, "rebind.test", RecordType::AAAA).await;
    assert!(addrs(&m6).is_empty());
    let (m, _) = ask(s.udp, "loopback.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert!(addrs(&m).is_empty());
    let calls = s.learner.calls.lock().unwrap().clone();
    let learned: Vec<IpAddr> = calls.iter().flat_map(|c| c.0.clone()).collect();
    assert_eq!(learned, vec!["198.51.100.9".parse::<IpAddr>().unwrap()]);
    assert!(s.ledger.names_for("127.0.0.1".parse().unwrap()).is_empty());
    assert!(s.resolver.stats().dropped_addresses >= 5);
}

/// A policy change applies to the very next query, both ways.
#[tokio::test]
async fn policy_changes_apply_to_the_next_query() {
    let s = setup(NetworkPolicy::none(), Duration::from_secs(2)).await;
    let (m, _) = ask(s.udp, "api.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
    s.resolver.set_policy(allow(&["api.test"]));
    let (m, _) = ask(s.udp, "api.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    assert_eq!(addrs(&m).len(), 1);
    let mut denied = allow(&["*.test"]);
    denied.deny = vec!["api.test".parse().unwrap()];
    s.resolver.set_policy(denied);
    let (m, _) = ask(s.udp, "api.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::Refused, "deny wins");
    let (m, _) = ask(s.udp, "other.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::NoError);
    s.resolver.set_policy(NetworkPolicy::none());
    let (m, _) = ask(s.udp, "other.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::Refused);
}

/// An answer too long for classic UDP goes out truncated (TC, no records) so the guest retries
/// over TCP, where it comes whole.
#[tokio::test]
async fn long_answers_are_truncated_over_udp() {
    let s = setup(allow(&["many.test"]), Duration::from_secs(2)).await;
    let (m, _) = ask(s.udp, "many.test", RecordType::A).await;
    assert!(m.truncated());
    assert!(m.answers().is_empty());
    let mut stream = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
    let q = query("many.test", RecordType::A).to_vec().unwrap();
    stream.write_u16(q.len() as u16).await.unwrap();
    stream.write_all(&q).await.unwrap();
    let len = stream.read_u16().await.unwrap();
    let mut body = vec![0u8; usize::from(len)];
    stream.read_exact(&mut body).await.unwrap();
    let m = Message::from_vec(&body).unwrap();
    assert!(!m.truncated());
    assert_eq!(addrs(&m).len(), 60);
}

/// When the firewall cannot be told about the addresses, the guest gets SERVFAIL, not addresses
/// the firewall would refuse (or the ledger would vouch for) without the firewall knowing.
#[tokio::test]
async fn failing_learner_gives_servfail() {
    let s = setup(allow(&["api.test"]), Duration::from_secs(2)).await;
    s.learner.fail.store(true, Ordering::SeqCst);
    let (m, _) = ask(s.udp, "api.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(m.answers().is_empty());
    assert!(s.ledger.is_empty());
}

/// Queries over TCP are answered too, and an upstream that never answers gives SERVFAIL after
/// the upstream timeout instead of hanging the guest.
#[tokio::test]
async fn tcp_queries_and_upstream_timeout() {
    let s = setup(
        allow(&["api.test", "slow.test"]),
        Duration::from_millis(300),
    )
    .await;
    let mut stream = tokio::net::TcpStream::connect(s.tcp).await.unwrap();
    for (name, code) in [
        ("api.test", ResponseCode::NoError),
        ("other.test", ResponseCode::Refused),
    ] {
        let q = query(name, RecordType::A).to_vec().unwrap();
        stream.write_u16(q.len() as u16).await.unwrap();
        stream.write_all(&q).await.unwrap();
        let len = stream.read_u16().await.unwrap();
        let mut body = vec![0u8; usize::from(len)];
        stream.read_exact(&mut body).await.unwrap();
        assert_eq!(
            Message::from_vec(&body).unwrap().response_code(),
            code,
            "{name}"
        );
    }
    let start = Instant::now();
    let (m, at) = ask(s.udp, "slow.test", RecordType::A).await;
    assert_eq!(m.response_code(), ResponseCode::ServFail);
    assert!(at - start < Duration::from_secs(2));
    assert_eq!(s.resolver.stats().failed, 1);
}

/// Allow by name, end to end: the proxy lets a connection to an address through only after the
/// resolver handed that address out for an allowed name (the ledger they share), and on 443 only
/// with that name's SNI. The attack: connecting to the address directly, before resolving it,
/// or with another name. The destination is a loopback address of its own, so the resolver and
/// proxy get an empty blocked set here (loopback would otherwise be dropped, as tested above).
#[tokio::test]
async fn proxy_allows_by_name_what_the_resolver_handed_out() {
    let pid = std::process::id();
    let ip = Ipv4Addr::new(127, 200, (pid % 250) as u8, (pid / 250 % 250) as u8 + 1);
    let server = tokio::net::TcpListener::bind((ip, 443)).await.unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = server.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"hello").await;
            });
        }
    });
    let (upstream, _) = start_upstream_with(vec![("web.test.", ip)]).await;
    let policy = allow(&["web.test"]);
    let ledger = Arc::new(LearnedAddrs::default());
    let learner = Arc::new(Learner::default());
    let resolver = Resolver::new(
        ResolverConfig::new(upstream),
        policy.clone(),
        Blocked::default(),
        ledger.clone(),
        learner.clone(),
    );
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let tcp = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dns = udp.local_addr().unwrap();
    let _dns_task = resolver.spawn(udp, tcp).unwrap();
    let dst = SocketAddr::new(IpAddr::V4(ip), 443);
    let proxy = EgressProxy::new(
        ProxyConfig::default(),
        policy,
        Blocked::default(),
        ledger,
        Arc::new(move |_: &std::net::TcpStream| Ok(dst)),
    );
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_addr = listener.local_addr().unwrap();
    let _proxy_task = proxy.spawn(listener).unwrap();
    // Port 443 carries TLS in real life; the proxy reads a Host header there too, which keeps
    // this test free of TLS (policy_proxy.rs sends real ClientHellos).
    let hello = |name: &str| format!("GET / HTTP/1.1\r\nHost: {name}\r\n\r\n").into_bytes();
    let attempt = |name: &'static str| async move {
        let mut c = tokio::net::TcpStream::connect(proxy_addr).await.unwrap();
        c.write_all(&hello(name)).await.unwrap();
        let mut out = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(5), c.read_to_end(&mut out))
            .await
            .unwrap();
        r.map(|_| out)
    };

    // Before the name was resolved, the address is nobody's.
    let before = attempt("web.test").await;
    assert!(!matches!(&before, Ok(v) if !v.is_empty()), "{before:?}");
    assert_eq!(
        proxy.refused()[0].reason,
        Refusal::Policy(Reason::NotAllowed)
    );

    let (m, _) = ask(dns, "web.test", RecordType::A).await;
    assert_eq!(addrs(&m), vec![IpAddr::V4(ip)]);
    assert_eq!(attempt("web.test").await.unwrap(), b"hello");

    let other = attempt("evil.test").await;
    assert!(!matches!(&other, Ok(v) if !v.is_empty()), "{other:?}");
    assert_eq!(
        proxy.refused().last().unwrap().reason,
        Refusal::Policy(Reason::ServerNameNotAllowed)
    );
}
