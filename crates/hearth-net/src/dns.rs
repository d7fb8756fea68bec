//! One sandbox's DNS resolver: the only name service its guest has. It serves a UDP socket and a
//! TCP listener bound (by the caller) inside the sandbox's namespace and forwards from the host's
//! namespace to an upstream resolver.
//!
//! - A name the policy does not allow is answered REFUSED at once (mode `none`: every name); so
//!   is a query that is not a plain one-question IN query.
//! - An allowed A/AAAA/CNAME query is forwarded; only A, AAAA and CNAME answers are kept, and
//!   addresses the sandbox may never reach (loopback, link-local and metadata, the host, private
//!   ranges not listed, denied addresses) are dropped: an allowed name resolving to 127.0.0.1 or
//!   169.254.169.254 (DNS rebinding) yields nothing reachable. Other types get an empty answer.
//! - The kept addresses go into the [`LearnedAddrs`] ledger and to the [`AddressLearner`] (the
//!   namespace's firewall) for the answer's TTL, clamped to [`ResolverConfig::min_ttl`]..
//!   [`ResolverConfig::max_ttl`] and written back into the answer, **before** the guest sees it.
//! - Bounded: message sizes, queries in flight, TCP connections and their idle time, the
//!   upstream's time to answer.
//!
//! Messages are parsed and built with `hickory-proto`.

use std::hash::{BuildHasher, RandomState};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, RData, Record, RecordType};
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::learned::LearnedAddrs;
use crate::policy::{normalize_name, Blocked, NetworkPolicy};
use crate::rules::AddressLearner;

/// Largest message accepted from the guest (queries are small; this leaves room for EDNS).
pub const MAX_QUERY_LEN: usize = 4096;
/// Largest UDP answer sent without EDNS (RFC 1035).
const CLASSIC_UDP_LEN: usize = 512;

/// How the resolver forwards and what it bounds.
#[derive(Debug, Clone)]
pub struct ResolverConfig {
    /// The upstream resolver, reached from the host's namespace.
    pub upstream: SocketAddr,
    /// How long the upstream may take to answer one query.
    pub upstream_timeout: Duration,
    /// Forwarded queries in flight at once for this sandbox; more get SERVFAIL at once.
    pub max_in_flight: usize,
    /// TCP connections from the guest at once; more are closed at once.
    pub max_tcp_connections: usize,
    /// How long a guest TCP connection may sit idle.
    pub tcp_idle_timeout: Duration,
    /// Shortest TTL handed out (and learned): shorter answers are raised to it.
    pub min_ttl: Duration,
    /// Longest TTL handed out (and learned): longer answers are lowered to it.
    pub max_ttl: Duration,
}

impl ResolverConfig {
    /// The defaults, forwarding to `upstream`.
    pub fn new(upstream: SocketAddr) -> Self {
        ResolverConfig {
            upstream,
            upstream_timeout: Duration::from_secs(3),
            max_in_flight: 64,
            max_tcp_connections: 16,
            tcp_idle_timeout: Duration::from_secs(10),
            min_ttl: Duration::from_secs(5),
            max_ttl: Duration::from_secs(3600),
        }
    }
}

/// Why the resolver could not start.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("reading {path}: {source}")]
    ResolvConf { path: String, source: io::Error },
    #[error("{path} names no nameserver; give one with --dns-upstream IP[:PORT]")]
    NoNameserver { path: String },
    #[error("setting up the resolver's sockets: {0}")]
    Socket(#[from] io::Error),
}

/// The host's first nameserver in `/etc/resolv.conf`, port 53.
pub fn host_upstream() -> Result<SocketAddr, DnsError> {
    let path = "/etc/resolv.conf";
    let text = std::fs::read_to_string(path).map_err(|source| DnsError::ResolvConf {
        path: path.into(),
        source,
    })?;
    first_nameserver(&text).ok_or_else(|| DnsError::NoNameserver { path: path.into() })
}

/// The first usable `nameserver` line of a resolv.conf text.
pub fn first_nameserver(resolv_conf: &str) -> Option<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| l.trim().strip_prefix("nameserver"))
        .filter_map(|rest| {
            // Zone ids (`fe80::1%eth0`) cannot be used from std; skip those.
            rest.trim().parse::<IpAddr>().ok()
        })
        .map(|ip| SocketAddr::new(ip, 53))
        .next()
}

/// Counters, for the sandbox record and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct DnsStats {
    /// Queries answered (refused ones included).
    pub queries: u64,
    /// Queries refused: name not allowed, or not a plain query.
    pub refused: u64,
    /// Queries forwarded upstream.
    pub forwarded: u64,
    /// Forwarded queries that failed (timeout, upstream error, too many in flight).
    pub failed: u64,
    /// Addresses dropped from answers because the sandbox may not reach them.
    pub dropped_addresses: u64,
}

/// One sandbox's resolver. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<Inner>,
}

struct Inner {
    config: ResolverConfig,
    policy: RwLock<Arc<NetworkPolicy>>,
    blocked: Blocked,
    ledger: Arc<LearnedAddrs>,
    learner: Arc<dyn AddressLearner>,
    in_flight: Arc<Semaphore>,
    tcp_connections: Arc<Semaphore>,
    ids: RandomState,
    next: AtomicU64,
    queries: AtomicU64,
    refused: AtomicU64,
    forwarded: AtomicU64,
    failed: AtomicU64,
    dropped: AtomicU64,
}

/// The resolver's serving tasks; dropping it stops them.
pub struct ResolverTask {
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for ResolverTask {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Transport {
    Udp,
    Tcp,
}

impl Resolver {
    /// A resolver enforcing `policy`; `blocked` is what no answer may hand out, `ledger` and
    /// `learner` get every address handed out.
    pub fn new(
        config: ResolverConfig,
        policy: NetworkPolicy,
        blocked: Blocked,
        ledger: Arc<LearnedAddrs>,
        learner: Arc<dyn AddressLearner>,
    ) -> Self {
        Resolver {
            inner: Arc::new(Inner {
                in_flight: Arc::new(Semaphore::new(config.max_in_flight)),
                tcp_connections: Arc::new(Semaphore::new(config.max_tcp_connections)),
                config,
                policy: RwLock::new(Arc::new(policy)),
                blocked,
                ledger,
                learner,
                ids: RandomState::new(),
                next: AtomicU64::new(0),
                queries: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                forwarded: AtomicU64::new(0),
                failed: AtomicU64::new(0),
                dropped: AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the policy; the next query is answered under the new one.
    pub fn set_policy(&self, policy: NetworkPolicy) {
        *self.inner.policy.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(policy);
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<NetworkPolicy> {
        self.inner
            .policy
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> DnsStats {
        let i = &self.inner;
        DnsStats {
            queries: i.queries.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
            forwarded: i.forwarded.load(Ordering::Relaxed),
            failed: i.failed.load(Ordering::Relaxed),
            dropped_addresses: i.dropped.load(Ordering::Relaxed),
        }
    }

    /// Serves `udp` and `tcp` (already bound, e.g. inside the sandbox's namespace) on the current
    /// tokio runtime until the returned task is dropped.
    pub fn spawn(
        &self,
        udp: std::net::UdpSocket,
        tcp: std::net::TcpListener,
    ) -> Result<ResolverTask, DnsError> {
        udp.set_nonblocking(true)?;
        tcp.set_nonblocking(true)?;
        let udp = Arc::new(UdpSocket::from_std(udp)?);
        let tcp = tokio::net::TcpListener::from_std(tcp)?;
        let udp_task = tokio::spawn(self.clone().serve_udp(udp));
        let tcp_task = tokio::spawn(self.clone().serve_tcp(tcp));
        Ok(ResolverTask {
            tasks: vec![udp_task, tcp_task],
        })
    }

    async fn serve_udp(self, sock: Arc<UdpSocket>) {
        let mut buf = vec![0u8; MAX_QUERY_LEN];
        loop {
            let (n, peer) = match sock.recv_from(&mut buf).await {
                Ok(x) => x,
                Err(e) => {
                    tracing::debug!(error = %e, "dns: udp receive failed");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            };
            let query = buf[..n].to_vec();
            let (this, sock) = (self.clone(), sock.clone());
            tokio::spawn(async move {
                if let Some(reply) = this.answer(&query, Transport::Udp).await {
                    let _ = sock.send_to(&reply, peer).await;
                }
            });
        }
    }

    async fn serve_tcp(self, listener: tokio::net::TcpListener) {
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            let Ok(permit) = self.inner.tcp_connections.clone().try_acquire_owned() else {
                continue; // dropping the stream closes it
            };
            let this = self.clone();
            tokio::spawn(async move {
                let _permit = permit;
                this.serve_tcp_connection(stream).await;
            });
        }
    }

    async fn serve_tcp_connection(&self, mut stream: TcpStream) {
        let idle = self.inner.config.tcp_idle_timeout;
        loop {
            let Ok(Ok(len)) = tokio::time::timeout(idle, stream.read_u16()).await else {
                return;
            };
            let len = usize::from(len);
            if len > MAX_QUERY_LEN {
                return;
            }
            let mut query = vec![0u8; len];
            if !matches!(
                tokio::time::timeout(idle, stream.read_exact(&mut query)).await,
                Ok(Ok(_))
            ) {
                return;
            }
            let Some(reply) = self.answer(&query, Transport::Tcp).await else {
                return;
            };
            let mut framed = (reply.len() as u16).to_be_bytes().to_vec();
            framed.extend_from_slice(&reply);
            if stream.write_all(&framed).await.is_err() {
                return;
            }
        }
    }

    /// The answer to one query, or nothing for what deserves none (an unparseable fragment, a
    /// response).
    async fn answer(&self, query: &[u8], transport: Transport) -> Option<Vec<u8>> {
        let inner = &self.inner;
        let Ok(req) = Message::from_vec(query) else {
            if query.len() < 12 {
                return None;
            }
            let id = u16::from_be_bytes([query[0], query[1]]);
            return Message::error_msg(id, OpCode::Query, ResponseCode::FormErr)
                .to_vec()
                .ok();
        };
        if req.message_type() != MessageType::Query {
            return None;
        }
        inner.queries.fetch_add(1, Ordering::Relaxed);
        let limit = match transport {
            Transport::Tcp => usize::from(u16::MAX),
            Transport::Udp => usize::from(req.max_payload()).clamp(CLASSIC_UDP_LEN, MAX_QUERY_LEN),
        };
        let refuse = |code| {
            inner.refused.fetch_add(1, Ordering::Relaxed);
            encode(&reply(&req, code), limit)
        };
        if req.op_code() != OpCode::Query {
            return refuse(ResponseCode::NotImp);
        }
        let [q] = req.queries() else {
            return refuse(ResponseCode::FormErr);
        };
        let name = normalize_name(&q.name().to_ascii());
        if q.query_class() != DNSClass::IN || !self.policy().allows_name(&name) {
            tracing::debug!(name = %name, qtype = %q.query_type(), "dns: refused");
            return refuse(ResponseCode::Refused);
        }
        if !matches!(
            q.query_type(),
            RecordType::A | RecordType::AAAA | RecordType::CNAME
        ) {
            return encode(&reply(&req, ResponseCode::NoError), limit);
        }
        let Ok(_permit) = inner.in_flight.try_acquire() else {
            inner.failed.fetch_add(1, Ordering::Relaxed);
            return encode(&reply(&req, ResponseCode::ServFail), limit);
        };
        inner.forwarded.fetch_add(1, Ordering::Relaxed);
        let upstream =
            match tokio::time::timeout(inner.config.upstream_timeout, self.forward(q)).await {
                Ok(Ok(m)) => m,
                Ok(Err(e)) => {
                    tracing::debug!(name = %name, error = %e, "dns: upstream failed");
                    inner.failed.fetch_add(1, Ordering::Relaxed);
                    return encode(&reply(&req, ResponseCode::ServFail), limit);
                }
                Err(_) => {
                    tracing::debug!(name = %name, "dns: upstream timed out");
                    inner.failed.fetch_add(1, Ordering::Relaxed);
                    return encode(&reply(&req, ResponseCode::ServFail), limit);
                }
            };
        // The policy may have changed while the upstream answered: decide on the current one.
        let policy = self.policy();
        if !policy.allows_name(&name) {
            return refuse(ResponseCode::Refused);
        }
        let code = match upstream.response_code() {
            ResponseCode::NoError => ResponseCode::NoError,
            ResponseCode::NXDomain => ResponseCode::NXDomain,
            _ => ResponseCode::ServFail,
        };
        let mut response = reply(&req, code);
        let mut kept: Vec<Record> = Vec::new();
        let mut addrs: Vec<IpAddr> = Vec::new();
        for record in upstream.answers() {
            if record.dns_class() != DNSClass::IN {
                continue;
            }
            let ip = match record.data() {
                RData::CNAME(_) => None,
                RData::A(a) => Some(IpAddr::V4(a.0)),
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => continue,
            };
            if let Some(ip) = ip {
                if !policy.allows_learned_address(&inner.blocked, ip) {
                    inner.dropped.fetch_add(1, Ordering::Relaxed);
                    tracing::info!(name = %name, address = %ip, "dns: dropped an address the sandbox may not reach");
                    continue;
                }
                addrs.push(ip);
            }
            kept.push(record.clone());
        }
        let ttl = kept
            .iter()
            .map(|r| Duration::from_secs(u64::from(r.ttl())))
            .min()
            .unwrap_or(inner.config.min_ttl)
            .clamp(inner.config.min_ttl, inner.config.max_ttl);
        for r in &mut kept {
            r.set_ttl(ttl.as_secs() as u32);
        }
        if !addrs.is_empty() {
            // The learner may run a program (nft): keep it off the runtime's threads.
            let (learner, to_learn) = (inner.learner.clone(), addrs.clone());
            let learned = tokio::task::spawn_blocking(move || learner.learn(&to_learn, ttl))
                .await
                .unwrap_or_else(|e| Err(io::Error::other(e)));
            if let Err(e) = learned {
                tracing::warn!(name = %name, error = %e, "dns: could not make answer reachable");
                inner.failed.fetch_add(1, Ordering::Relaxed);
                return encode(&reply(&req, ResponseCode::ServFail), limit);
            }
            for ip in &addrs {
                inner.ledger.record(*ip, &name, ttl);
            }
        }
        response.insert_answers(kept);
        encode(&response, limit)
    }

    /// Asks the upstream, over UDP, then over TCP if the answer was truncated.
    async fn forward(&self, q: &Query) -> io::Result<Message> {
        let upstream = self.inner.config.upstream;
        let id = self.random_id();
        let mut m = Message::new();
        m.set_id(id)
            .set_message_type(MessageType::Query)
            .set_op_code(OpCode::Query)
            .set_recursion_desired(true)
            .add_query(q.clone());
        let bytes = m.to_vec().map_err(io::Error::other)?;
        let local: SocketAddr = match upstream {
            SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
            SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
        };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(upstream).await?;
        sock.send(&bytes).await?;
        let mut buf = vec![0u8; 4096];
        let answer = loop {
            let n = sock.recv(&mut buf).await?;
            // Ignore anything that is not the answer to this query (spoofing attempts, strays).
            let Ok(answer) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if answer.id() == id
                && answer.message_type() == MessageType::Response
                && answer.queries() == m.queries()
            {
                break answer;
            }
        };
        if !answer.truncated() {
            return Ok(answer);
        }
        let mut stream = TcpStream::connect(upstream).await?;
        let mut framed = (bytes.len() as u16).to_be_bytes().to_vec();
        framed.extend_from_slice(&bytes);
        stream.write_all(&framed).await?;
        let len = usize::from(stream.read_u16().await?);
        let mut body = vec![0u8; len];
        stream.read_exact(&mut body).await?;
        let answer = Message::from_vec(&body).map_err(io::Error::other)?;
        if answer.id() != id || answer.queries() != m.queries() {
            return Err(io::Error::other("upstream answered another query over TCP"));
        }
        Ok(answer)
    }

    fn random_id(&self) -> u16 {
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        self.inner.ids.hash_one(n) as u16
    }
}

/// An empty response to `req` with `code`.
fn reply(req: &Message, code: ResponseCode) -> Message {
    let mut m = Message::new();
    m.set_id(req.id())
        .set_message_type(MessageType::Response)
        .set_op_code(req.op_code())
        .set_recursion_desired(req.recursion_desired())
        .set_recursion_available(true)
        .set_response_code(code);
    for q in req.queries() {
        m.add_query(q.clone());
    }
    m
}

/// The wire form of `m`, or of its truncated form (TC set, no answers) when longer than `limit`,
/// so the client retries over TCP.
fn encode(m: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = m.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let mut short = m.clone();
    short.take_answers();
    short.set_truncated(true);
    short.to_vec().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolv_conf() {
        let text = "# generated\nsearch example.com\nnameserver fe80::1%eth0\nnameserver 192.0.2.53\nnameserver 192.0.2.54\n";
        assert_eq!(
            first_nameserver(text),
            Some("192.0.2.53:53".parse().unwrap())
        );
        assert_eq!(
            first_nameserver("nameserver 2001:db8::53"),
            Some("[2001:db8::53]:53".parse().unwrap())
        );
        assert_eq!(first_nameserver("options ndots:5\n"), None);
    }
}
