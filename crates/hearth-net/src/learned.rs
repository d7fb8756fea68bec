//! One sandbox's ledger of the addresses its resolver handed out: address -> the allowed names it
//! was handed out for, each until its TTL runs out. The proxy asks it which names a destination
//! stands for. Bounded (oldest expiry evicted first) so a guest resolving without end cannot grow
//! it; every method has an `_at` twin taking the time, so tests control the clock.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Most addresses remembered at once.
pub const DEFAULT_MAX_ADDRESSES: usize = 4096;
/// Most names remembered for one address (a CDN address serves many).
pub const MAX_NAMES_PER_ADDRESS: usize = 16;

/// The ledger. Internally locked: share it as `Arc<LearnedAddrs>`.
#[derive(Debug)]
pub struct LearnedAddrs {
    max_addresses: usize,
    entries: Mutex<HashMap<IpAddr, Vec<(String, Instant)>>>,
}

impl Default for LearnedAddrs {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_ADDRESSES)
    }
}

impl LearnedAddrs {
    /// A ledger holding at most `max_addresses` addresses (at least one).
    pub fn new(max_addresses: usize) -> Self {
        LearnedAddrs {
            max_addresses: max_addresses.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// Remember that `ip` was handed out for `name` until `ttl` from now.
    pub fn record(&self, ip: IpAddr, name: &str, ttl: Duration) {
        self.record_at(ip, name, ttl, Instant::now())
    }

    /// [`LearnedAddrs::record`] at time `now`.
    pub fn record_at(&self, ip: IpAddr, name: &str, ttl: Duration, now: Instant) {
        let ip = ip.to_canonical();
        let expiry = now + ttl;
        let mut entries = self.lock();
        if !entries.contains_key(&ip) && entries.len() >= self.max_addresses {
            entries.retain(|_, names| {
                names.retain(|(_, e)| *e > now);
                !names.is_empty()
            });
            if entries.len() >= self.max_addresses {
                let oldest = entries
                    .iter()
                    .map(|(ip, names)| (*ip, names.iter().map(|(_, e)| *e).max()))
                    .min_by_key(|(_, latest)| *latest)
                    .map(|(ip, _)| ip);
                if let Some(oldest) = oldest {
                    entries.remove(&oldest);
                }
            }
        }
        let names = entries.entry(ip).or_default();
        names.retain(|(_, e)| *e > now);
        if let Some(slot) = names.iter_mut().find(|(n, _)| n == name) {
            slot.1 = slot.1.max(expiry);
            return;
        }
        if names.len() >= MAX_NAMES_PER_ADDRESS {
            if let Some(i) = (0..names.len()).min_by_key(|&i| names[i].1) {
                names.swap_remove(i);
            }
        }
        names.push((name.to_string(), expiry));
    }

    /// The names `ip` was handed out for that have not expired.
    pub fn names_for(&self, ip: IpAddr) -> Vec<String> {
        self.names_for_at(ip, Instant::now())
    }

    /// [`LearnedAddrs::names_for`] at time `now`.
    pub fn names_for_at(&self, ip: IpAddr, now: Instant) -> Vec<String> {
        let entries = self.lock();
        entries
            .get(&ip.to_canonical())
            .map(|names| {
                names
                    .iter()
                    .filter(|(_, e)| *e > now)
                    .map(|(n, _)| n.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// How many addresses are held (expired ones included until they are swept).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Forget whatever expired by `now`.
    pub fn sweep_at(&self, now: Instant) {
        self.lock().retain(|_, names| {
            names.retain(|(_, e)| *e > now);
            !names.is_empty()
        });
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Vec<(String, Instant)>>> {
        // A panic while holding the lock leaves a consistent map: every update is one call.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([198, 51, 100, last])
    }

    #[test]
    fn names_expire_with_their_ttl() {
        let l = LearnedAddrs::default();
        let t0 = Instant::now();
        l.record_at(ip(1), "a.test", 10 * S, t0);
        l.record_at(ip(1), "b.test", 30 * S, t0);
        assert_eq!(l.names_for_at(ip(1), t0 + 5 * S), ["a.test", "b.test"]);
        assert_eq!(l.names_for_at(ip(1), t0 + 10 * S), ["b.test"]);
        assert!(l.names_for_at(ip(1), t0 + 31 * S).is_empty());
        assert!(l.names_for_at(ip(2), t0).is_empty());
        // A renewal extends, never shortens.
        l.record_at(ip(1), "b.test", S, t0 + 2 * S);
        assert_eq!(l.names_for_at(ip(1), t0 + 20 * S), ["b.test"]);
        l.sweep_at(t0 + 31 * S);
        assert!(l.is_empty());
    }

    #[test]
    fn mapped_addresses_are_the_same_address() {
        let l = LearnedAddrs::default();
        l.record(ip(7), "a.test", 10 * S);
        let mapped: IpAddr = "::ffff:198.51.100.7".parse().unwrap();
        assert_eq!(l.names_for(mapped), ["a.test"]);
    }

    #[test]
    fn bounded_with_the_oldest_evicted() {
        let l = LearnedAddrs::new(3);
        let t0 = Instant::now();
        for i in 0..3u8 {
            l.record_at(ip(i), "a.test", Duration::from_secs(10 + u64::from(i)), t0);
        }
        l.record_at(ip(9), "a.test", 60 * S, t0);
        assert_eq!(l.len(), 3);
        assert!(
            l.names_for_at(ip(0), t0).is_empty(),
            "the earliest expiry goes first"
        );
        assert_eq!(l.names_for_at(ip(9), t0), ["a.test"]);
        // Expired entries make room before live ones are evicted.
        l.record_at(ip(20), "b.test", 60 * S, t0 + 11 * S);
        assert_eq!(l.names_for_at(ip(2), t0 + 11 * S), ["a.test"]);
        assert_eq!(l.names_for_at(ip(9), t0 + 11 * S), ["a.test"]);
        for n in 0..(MAX_NAMES_PER_ADDRESS as u64 + 5) {
            l.record_at(
                ip(9),
                &format!("n{n}.test"),
                Duration::from_secs(100 + n),
                t0,
            );
        }
        assert_eq!(l.names_for_at(ip(9), t0).len(), MAX_NAMES_PER_ADDRESS);
    }
}
