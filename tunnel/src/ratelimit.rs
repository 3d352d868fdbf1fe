//! Token bucket on virtual time, used to bound handshake work.

use std::time::Duration;

use crate::time::{Instant, duration_micros};

const SCALE: u64 = 1_000_000;

/// A token bucket: `rate` tokens per second, at most `burst` saved up.
#[derive(Clone, Debug)]
pub(crate) struct TokenBucket {
    /// Tokens in millionths; never above `burst * SCALE`.
    micro_tokens: u64,
    rate_per_sec: u64,
    burst: u64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket.
    pub(crate) fn new(rate_per_sec: u32, burst: u32, now: Instant) -> TokenBucket {
        let burst = u64::from(burst.max(1));
        TokenBucket {
            micro_tokens: burst * SCALE,
            rate_per_sec: u64::from(rate_per_sec),
            burst,
            last: now,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed: Duration = now - self.last;
        self.last = self.last.max(now);
        let add = duration_micros(elapsed).saturating_mul(self.rate_per_sec);
        self.micro_tokens = self
            .micro_tokens
            .saturating_add(add)
            .min(self.burst * SCALE);
    }

    /// Takes one token if there is one.
    pub(crate) fn try_take(&mut self, now: Instant) -> bool {
        self.refill(now);
        if self.micro_tokens >= SCALE {
            self.micro_tokens -= SCALE;
            true
        } else {
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::from_secs(10);
        let mut b = TokenBucket::new(10, 5, t0);
        for _ in 0..5 {
            assert!(b.try_take(t0));
        }
        assert!(!b.try_take(t0));
        // 10 per second: one token every 100 ms.
        assert!(!b.try_take(t0 + Duration::from_millis(99)));
        assert!(b.try_take(t0 + Duration::from_millis(100)));
        assert!(!b.try_take(t0 + Duration::from_millis(150)));
        // Long idle refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..5 {
            assert!(b.try_take(later));
        }
        assert!(!b.try_take(later));
        // Time going backwards does not mint tokens.
        assert!(!b.try_take(t0));
    }
}
