//! Retry policy for registry requests: exponential backoff with jitter on 5xx, 429, timeouts,
//! stalls and connection resets. Pure policy; the client applies it.

use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Total tries per request (1 = no retry).
    pub attempts: u32,
    /// Delay before the first retry; doubles each time up to `max_delay`.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A response body that sends nothing for this long counts as failed (and is retried).
    pub stall_timeout: Duration,
    pub connect_timeout: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 5,
            base_delay: Duration::from_millis(250),
            max_delay: Duration::from_secs(8),
            stall_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(15),
        }
    }
}

impl RetryPolicy {
    /// The delay before retry number `retry` (1-based), with up to 25% jitter.
    pub fn delay(&self, retry: u32) -> Duration {
        let exp = self
            .base_delay
            .saturating_mul(1u32 << retry.saturating_sub(1).min(16));
        let capped = exp.min(self.max_delay);
        let jitter = capped.mul_f64(rand::random::<f64>() * 0.25);
        capped + jitter
    }

    pub fn is_retryable_status(status: u16) -> bool {
        status >= 500 || status == 429 || status == 408
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_caps() {
        let p = RetryPolicy {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(350),
            ..Default::default()
        };
        assert!(
            p.delay(1) >= Duration::from_millis(100) && p.delay(1) < Duration::from_millis(126)
        );
        assert!(p.delay(2) >= Duration::from_millis(200));
        assert!(p.delay(10) <= Duration::from_millis(438));
        assert!(RetryPolicy::is_retryable_status(503) && !RetryPolicy::is_retryable_status(404));
    }
}
