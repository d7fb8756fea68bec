//! The operator's bound on its API write rate: one token bucket shared by every write (status, finalizer,
//! delete) and every Event it publishes, so a burst of work (10,000 new Sandboxes, a node with 1,000
//! sandboxes lost) cannot flood the API server. Writes come first: Events only take a token while no
//! pass is writing ([`TokenBucket::writing`]) and at least half the burst is left, so during a storm of
//! placements Events wait instead of slowing the placements (whether the bucket or the API server is
//! the bottleneck), and catch up afterwards. No I/O besides sleeping.

use std::sync::Mutex;
use std::time::Duration;

// tokio's clock (the real one outside tests) so tests can run on a paused clock.
use tokio::time::Instant;

/// A rate and a burst, in requests.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RateLimit {
    /// Sustained requests per second.
    pub per_second: u32,
    /// Requests that may go at once after a quiet period.
    pub burst: u32,
}

/// A token bucket that lends tokens ahead (a waiter takes its token at once and sleeps until the bucket
/// would have held it), so waiters are served in arrival order and the rate holds exactly.
#[derive(Debug)]
pub struct TokenBucket {
    limit: RateLimit,
    state: Mutex<State>,
    /// Passes writing now.
    writers: tokio::sync::watch::Sender<usize>,
}

/// Marks a pass's writes as under way while it lives.
pub struct Writing<'a>(&'a TokenBucket);

impl Drop for Writing<'_> {
    fn drop(&mut self) {
        self.0.writers.send_modify(|n| *n -= 1);
    }
}

#[derive(Debug)]
struct State {
    /// May go negative: tokens lent to waiters still sleeping.
    tokens: f64,
    at: Instant,
}

impl TokenBucket {
    /// A full bucket. A rate of 0 is treated as 1/s (never unbounded by accident).
    pub fn new(limit: RateLimit) -> Self {
        let limit = RateLimit {
            per_second: limit.per_second.max(1),
            burst: limit.burst.max(1),
        };
        Self {
            state: Mutex::new(State {
                tokens: f64::from(limit.burst),
                at: Instant::now(),
            }),
            limit,
            writers: tokio::sync::watch::channel(0).0,
        }
    }

    /// Holds Events back until the returned guard drops.
    pub fn writing(&self) -> Writing<'_> {
        self.writers.send_modify(|n| *n += 1);
        Writing(self)
    }

    pub fn limit(&self) -> RateLimit {
        self.limit
    }

    /// Waits for a token (writes).
    pub async fn acquire(&self) {
        let wait = {
            let mut s = self.refill();
            s.tokens -= 1.0;
            self.time_for(-s.tokens)
        };
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }

    /// Waits until no pass is writing and a token can be taken leaving half the burst (Events).
    pub async fn acquire_spare(&self) {
        let keep = f64::from(self.limit.burst) / 2.0;
        let mut writers = self.writers.subscribe();
        loop {
            // The sender lives in `self`: this cannot fail.
            let _ = writers.wait_for(|n| *n == 0).await;
            let wait = {
                let mut s = self.refill();
                if s.tokens - 1.0 >= keep {
                    s.tokens -= 1.0;
                    return;
                }
                self.time_for(keep + 1.0 - s.tokens)
            };
            tokio::time::sleep(wait.max(Duration::from_millis(1))).await;
        }
    }

    fn refill(&self) -> std::sync::MutexGuard<'_, State> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let earned = now.duration_since(s.at).as_secs_f64() * f64::from(self.limit.per_second);
        s.tokens = (s.tokens + earned).min(f64::from(self.limit.burst));
        s.at = now;
        s
    }

    fn time_for(&self, tokens: f64) -> Duration {
        if tokens <= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(tokens / f64::from(self.limit.per_second))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_burst_goes_at_once_then_the_rate_holds() {
        let b = TokenBucket::new(RateLimit {
            per_second: 100,
            burst: 10,
        });
        let start = tokio::time::Instant::now();
        for _ in 0..10 {
            b.acquire().await;
        }
        assert!(start.elapsed() < Duration::from_millis(5), "burst waited");
        for _ in 0..100 {
            b.acquire().await;
        }
        let took = start.elapsed();
        assert!(
            took >= Duration::from_millis(990) && took < Duration::from_millis(1100),
            "100 more at 100/s took {took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn spare_requests_wait_while_a_pass_writes_even_with_tokens_left() {
        let b = TokenBucket::new(RateLimit {
            per_second: 1000,
            burst: 1000,
        });
        let writing = b.writing();
        let waited = tokio::time::timeout(Duration::from_secs(5), b.acquire_spare()).await;
        assert!(waited.is_err(), "an Event went while a pass was writing");
        drop(writing);
        tokio::time::timeout(Duration::from_millis(10), b.acquire_spare())
            .await
            .expect("an Event goes once the pass is done");
    }

    #[tokio::test(start_paused = true)]
    async fn spare_requests_wait_while_writes_use_the_bucket() {
        let b = std::sync::Arc::new(TokenBucket::new(RateLimit {
            per_second: 100,
            burst: 10,
        }));
        // 50 writes queued: they own the next 0.4 s of the bucket.
        let writes = {
            let b = b.clone();
            tokio::spawn(async move {
                for _ in 0..50 {
                    b.acquire().await;
                }
                tokio::time::Instant::now()
            })
        };
        tokio::task::yield_now().await;
        let start = tokio::time::Instant::now();
        b.acquire_spare().await;
        let event_at = tokio::time::Instant::now();
        let writes_done = writes.await.unwrap();
        assert!(event_at >= writes_done, "the event overtook writes");
        assert!(event_at - start < Duration::from_millis(600));
    }
}
