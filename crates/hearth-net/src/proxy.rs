//! One sandbox's egress proxy: every guest TCP connection the namespace's firewall lets out is
//! redirected here, and this is where the full policy is applied. For each connection:
//!
//! 1. its original destination (`SO_ORIGINAL_DST`, through the [`OriginalDestination`] seam);
//! 2. for ports 80/443, its TLS SNI / HTTP Host, read from its first bytes ([`crate::sni`]) within
//!    [`ProxyConfig::peek_timeout`];
//! 3. [`NetworkPolicy::decide`] with the names the resolver handed the address out for;
//! 4. refused: the guest gets a TCP reset at once, and the attempt is counted, logged and kept in
//!    a bounded ring ([`EgressProxy::refused`]); allowed: a connection from the host's namespace
//!    (within [`ProxyConfig::connect_timeout`]) and bytes copied both ways, counted, optionally
//!    rate limited.
//!
//! [`EgressProxy::set_policy`] re-decides every live connection at once and resets those the new
//! policy refuses. Connections beyond [`ProxyConfig::max_connections`] are reset.

use std::collections::VecDeque;
use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use crate::learned::LearnedAddrs;
use crate::policy::{Blocked, Decision, NetworkPolicy, Reason, NAME_CHECKED_PORTS};
use crate::sni::{self, ServerName};

/// Finds where an accepted connection was going before the firewall redirected it (in
/// production `crate::nft::original_destination`, i.e. `SO_ORIGINAL_DST`).
pub type OriginalDestination =
    Arc<dyn Fn(&std::net::TcpStream) -> io::Result<SocketAddr> + Send + Sync>;

/// The production [`OriginalDestination`]: `SO_ORIGINAL_DST` from the namespace's conntrack.
pub fn redirected_destination() -> OriginalDestination {
    Arc::new(crate::nft::original_destination)
}

/// Open connections a sandbox may have at once unless configured otherwise (`--net-conns`).
pub const DEFAULT_MAX_CONNECTIONS: usize = 256;

/// Limits and timeouts of one sandbox's proxy.
#[derive(Debug, Clone)]
pub struct ProxyConfig {
    /// How long the guest has to send the first bytes naming the server (80/443).
    pub peek_timeout: Duration,
    /// How long connecting to the destination may take.
    pub connect_timeout: Duration,
    /// Open connections at once; more are reset.
    pub max_connections: usize,
    /// Bytes per second in each direction, over all the sandbox's connections.
    pub rate_limit: Option<u64>,
    /// Refused attempts remembered for the API.
    pub refused_log_len: usize,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            peek_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(10),
            max_connections: DEFAULT_MAX_CONNECTIONS,
            rate_limit: None,
            refused_log_len: 256,
        }
    }
}

/// Why the proxy refused or cut a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The policy refused the connection.
    Policy(Reason),
    /// An open connection the policy refuses since a change.
    CutByPolicyChange(Reason),
    /// The sandbox has [`ProxyConfig::max_connections`] open already.
    ConnectionLimit,
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Refusal::Policy(r) => write!(f, "{r}"),
            Refusal::CutByPolicyChange(r) => write!(f, "cut by a policy change: {r}"),
            Refusal::ConnectionLimit => f.write_str("too many open connections"),
        }
    }
}

/// One refused attempt, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RefusedAttempt {
    pub destination: SocketAddr,
    /// The TLS SNI / HTTP Host, else the first name the address was learned for.
    pub name: Option<String>,
    /// When, in milliseconds since the Unix epoch.
    pub at_unix_ms: u64,
    pub reason: Refusal,
}

/// Counters, for the sandbox record and `/metrics`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ProxyStats {
    /// Bytes from the guest to its destinations.
    pub bytes_out: u64,
    /// Bytes from destinations to the guest.
    pub bytes_in: u64,
    /// Connections relayed (allowed and connected).
    pub connections: u64,
    /// Connections open now.
    pub active: u64,
    /// Connections refused or cut.
    pub refused: u64,
    /// Allowed connections whose destination could not be reached.
    pub failed: u64,
}

/// One sandbox's egress proxy. Cheap to clone; clones share everything.
#[derive(Clone)]
pub struct EgressProxy {
    inner: Arc<Inner>,
}

struct Inner {
    config: ProxyConfig,
    policy: watch::Sender<Arc<NetworkPolicy>>,
    blocked: Blocked,
    ledger: Arc<LearnedAddrs>,
    original_destination: OriginalDestination,
    slots: Arc<Semaphore>,
    out_limit: Option<RateLimiter>,
    in_limit: Option<RateLimiter>,
    refused_log: Mutex<VecDeque<RefusedAttempt>>,
    bytes_out: AtomicU64,
    bytes_in: AtomicU64,
    connections: AtomicU64,
    active: AtomicU64,
    refused: AtomicU64,
    failed: AtomicU64,
}

/// The proxy's serving task; dropping it stops accepting and resets every open connection.
pub struct ProxyTask {
    accept: JoinHandle<()>,
    _shutdown: watch::Sender<()>,
}

impl Drop for ProxyTask {
    fn drop(&mut self) {
        self.accept.abort();
    }
}

impl EgressProxy {
    /// A proxy enforcing `policy`; `blocked` is what it never connects to, `ledger` the
    /// sandbox's resolver's.
    pub fn new(
        config: ProxyConfig,
        policy: NetworkPolicy,
        blocked: Blocked,
        ledger: Arc<LearnedAddrs>,
        original_destination: OriginalDestination,
    ) -> Self {
        let limiter = |rate: Option<u64>| rate.map(RateLimiter::new);
        EgressProxy {
            inner: Arc::new(Inner {
                slots: Arc::new(Semaphore::new(config.max_connections)),
                out_limit: limiter(config.rate_limit),
                in_limit: limiter(config.rate_limit),
                config,
                policy: watch::Sender::new(Arc::new(policy)),
                blocked,
                ledger,
                original_destination,
                refused_log: Mutex::new(VecDeque::new()),
                bytes_out: AtomicU64::new(0),
                bytes_in: AtomicU64::new(0),
                connections: AtomicU64::new(0),
                active: AtomicU64::new(0),
                refused: AtomicU64::new(0),
                failed: AtomicU64::new(0),
            }),
        }
    }

    /// Replaces the policy: new connections are decided under it, and every open connection is
    /// re-decided at once and reset if now refused.
    pub fn set_policy(&self, policy: NetworkPolicy) {
        self.inner.policy.send_replace(Arc::new(policy));
    }

    /// The policy in force.
    pub fn policy(&self) -> Arc<NetworkPolicy> {
        self.inner.policy.borrow().clone()
    }

    /// The counters so far.
    pub fn stats(&self) -> ProxyStats {
        let i = &self.inner;
        ProxyStats {
            bytes_out: i.bytes_out.load(Ordering::Relaxed),
            bytes_in: i.bytes_in.load(Ordering::Relaxed),
            connections: i.connections.load(Ordering::Relaxed),
            active: i.active.load(Ordering::Relaxed),
            refused: i.refused.load(Ordering::Relaxed),
            failed: i.failed.load(Ordering::Relaxed),
        }
    }

    /// The most recent refused attempts, oldest first.
    pub fn refused(&self) -> Vec<RefusedAttempt> {
        self.inner
            .refused_log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// Serves `listener` (already bound, e.g. inside the sandbox's namespace) on the current tokio
    /// runtime until the returned task is dropped.
    pub fn spawn(&self, listener: std::net::TcpListener) -> io::Result<ProxyTask> {
        listener.set_nonblocking(true)?;
        let listener = TcpListener::from_std(listener)?;
        let own = listener.local_addr()?;
        let (shutdown_tx, shutdown) = watch::channel(());
        let this = self.clone();
        let accept = tokio::spawn(async move {
            loop {
                let stream = match listener.accept().await {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        tracing::debug!(error = %e, "proxy: accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                };
                let (this, shutdown) = (this.clone(), shutdown.clone());
                tokio::spawn(async move { this.handle(stream, own, shutdown).await });
            }
        });
        Ok(ProxyTask {
            accept,
            _shutdown: shutdown_tx,
        })
    }

    async fn handle(&self, stream: TcpStream, own: SocketAddr, shutdown: watch::Receiver<()>) {
        let inner = &self.inner;
        let Ok((mut client, dst)) = self.original_destination(stream) else {
            return;
        };
        let Ok(permit) = inner.slots.clone().try_acquire_owned() else {
            self.log_refusal(dst, None, Refusal::ConnectionLimit);
            reset(&client);
            return;
        };
        let _permit = permit;
        let learned = inner.ledger.names_for(dst.ip());
        let (server_name, head) = if NAME_CHECKED_PORTS.contains(&dst.port()) {
            self.peek_server_name(&mut client).await
        } else {
            (None, Vec::new())
        };
        let mut policy_rx = inner.policy.subscribe();
        let policy = policy_rx.borrow_and_update().clone();
        let names: Vec<&str> = learned.iter().map(String::as_str).collect();
        let decision = if dst == own {
            Decision::Refuse(Reason::Blocked) // the proxy itself: a loop
        } else {
            policy.decide(&inner.blocked, dst, &names, server_name.as_deref())
        };
        let shown_name = server_name.clone().or_else(|| learned.first().cloned());
        if let Decision::Refuse(reason) = decision {
            self.log_refusal(dst, shown_name, Refusal::Policy(reason));
            reset(&client);
            return;
        }
        let connect = tokio::time::timeout(inner.config.connect_timeout, TcpStream::connect(dst));
        let mut upstream = match connect.await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                tracing::debug!(destination = %dst, error = %e, "proxy: connect failed");
                inner.failed.fetch_add(1, Ordering::Relaxed);
                reset(&client);
                return;
            }
            Err(_) => {
                tracing::debug!(destination = %dst, "proxy: connect timed out");
                inner.failed.fetch_add(1, Ordering::Relaxed);
                reset(&client);
                return;
            }
        };
        let _ = upstream.set_nodelay(true);
        let _ = client.set_nodelay(true);
        if upstream.write_all(&head).await.is_err() {
            reset(&client);
            return;
        }
        inner
            .bytes_out
            .fetch_add(head.len() as u64, Ordering::Relaxed);
        inner.connections.fetch_add(1, Ordering::Relaxed);
        inner.active.fetch_add(1, Ordering::Relaxed);
        let _active = ActiveGuard(&inner.active);

        let (mut cr, mut cw) = client.into_split();
        let (mut ur, mut uw) = upstream.into_split();
        let relay = async {
            tokio::try_join!(
                pump(&mut cr, &mut uw, &inner.bytes_out, inner.out_limit.as_ref()),
                pump(&mut ur, &mut cw, &inner.bytes_in, inner.in_limit.as_ref()),
            )
        };
        let watch_policy = async {
            let mut shutdown = shutdown;
            loop {
                tokio::select! {
                    changed = policy_rx.changed() => {
                        if changed.is_err() {
                            return None;
                        }
                        let policy = policy_rx.borrow_and_update().clone();
                        if let Decision::Refuse(reason) =
                            policy.decide(&inner.blocked, dst, &names, server_name.as_deref())
                        {
                            return Some(reason);
                        }
                    }
                    _ = shutdown.changed() => return None,
                }
            }
        };
        tokio::select! {
            _ = relay => {}
            cut = watch_policy => {
                if let Some(reason) = cut {
                    self.log_refusal(dst, shown_name, Refusal::CutByPolicyChange(reason));
                }
                reset(cr.as_ref());
                reset(ur.as_ref());
            }
        }
    }

    /// The accepted connection as a tokio stream, and where it was going.
    fn original_destination(&self, stream: TcpStream) -> io::Result<(TcpStream, SocketAddr)> {
        let std = stream.into_std()?;
        let dst = (self.inner.original_destination)(&std).inspect_err(|e| {
            tracing::warn!(error = %e, "proxy: no original destination");
        })?;
        Ok((TcpStream::from_std(std)?, dst))
    }

    /// Reads the first bytes until they name a server (or cannot), the peek time runs out, or the
    /// guest stops sending. Returns the name and the bytes read, which go to the destination.
    async fn peek_server_name(&self, client: &mut TcpStream) -> (Option<String>, Vec<u8>) {
        let deadline = Instant::now() + self.inner.config.peek_timeout;
        let mut head = Vec::new();
        let mut chunk = vec![0u8; 4096];
        loop {
            match sni::server_name(&head) {
                ServerName::Found(name) => return (Some(name), head),
                ServerName::Absent => return (None, head),
                ServerName::NeedMore => {}
            }
            let room = sni::MAX_PEEK - head.len();
            let read =
                tokio::time::timeout_at(deadline.into(), client.read(&mut chunk[..room.min(4096)]));
            match read.await {
                Ok(Ok(n)) if n > 0 => head.extend_from_slice(&chunk[..n]),
                _ => return (None, head),
            }
        }
    }

    fn log_refusal(&self, destination: SocketAddr, name: Option<String>, reason: Refusal) {
        let inner = &self.inner;
        inner.refused.fetch_add(1, Ordering::Relaxed);
        tracing::info!(%destination, name = name.as_deref().unwrap_or("-"), %reason, "egress refused");
        let at_unix_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let mut log = inner.refused_log.lock().unwrap_or_else(|e| e.into_inner());
        while log.len() >= inner.config.refused_log_len.max(1) {
            log.pop_front();
        }
        log.push_back(RefusedAttempt {
            destination,
            name,
            at_unix_ms,
            reason,
        });
    }
}

/// Copies `from` to `to` until `from` ends, then closes `to`'s sending side.
async fn pump(
    from: &mut OwnedReadHalf,
    to: &mut OwnedWriteHalf,
    counter: &AtomicU64,
    limit: Option<&RateLimiter>,
) -> io::Result<()> {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = from.read(&mut buf).await?;
        if n == 0 {
            return to.shutdown().await;
        }
        if let Some(limit) = limit {
            limit.take(n).await;
        }
        to.write_all(&buf[..n]).await?;
        counter.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// Closes with a TCP reset when the stream is dropped, so the other end fails at once.
fn reset(stream: &TcpStream) {
    let _ = stream.set_zero_linger();
}

struct ActiveGuard<'a>(&'a AtomicU64);

impl Drop for ActiveGuard<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A token bucket shared by all of a sandbox's connections in one direction. Takers may drive it
/// into debt; the debt is paid by sleeping, so the long-run rate holds.
struct RateLimiter {
    rate: f64,
    burst: f64,
    state: Mutex<(f64, Instant)>,
}

impl RateLimiter {
    fn new(bytes_per_second: u64) -> Self {
        let rate = bytes_per_second.max(1) as f64;
        RateLimiter {
            rate,
            burst: rate.clamp(16.0 * 1024.0, 1024.0 * 1024.0),
            state: Mutex::new((0.0, Instant::now())),
        }
    }

    async fn take(&self, n: usize) {
        let wait = {
            let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
            let now = Instant::now();
            let (tokens, last) = &mut *state;
            *tokens =
                (*tokens + now.duration_since(*last).as_secs_f64() * self.rate).min(self.burst);
            *last = now;
            *tokens -= n as f64;
            (*tokens < 0.0).then(|| Duration::from_secs_f64(-*tokens / self.rate))
        };
        if let Some(wait) = wait {
            tokio::time::sleep(wait).await;
        }
    }
}
