//! Token buckets on virtual time, used to bound handshake work: one for all sources, and
//! one per source address in a bounded table.

use std::collections::HashMap;
use std::net::IpAddr;
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

    /// Whether the bucket is full again (its owner has been quiet long enough to forget).
    fn is_full(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.micro_tokens == self.burst * SCALE
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

/// Per-source-address token buckets, at most `capacity` of them. A source whose bucket has
/// refilled completely is forgotten when room is needed; while the table is full of active
/// sources, new sources are refused (a flood from many addresses then cannot grow memory,
/// and sources already known keep their own allowance).
#[derive(Clone, Debug)]
pub(crate) struct SourceLimiter {
    buckets: HashMap<IpAddr, TokenBucket>,
    rate_per_sec: u32,
    burst: u32,
    capacity: usize,
}

impl SourceLimiter {
    pub(crate) fn new(rate_per_sec: u32, burst: u32, capacity: usize) -> SourceLimiter {
        SourceLimiter {
            buckets: HashMap::new(),
            rate_per_sec,
            burst,
            capacity: capacity.max(1),
        }
    }

    /// Takes one token from `source`'s bucket if it has one.
    pub(crate) fn try_take(&mut self, source: IpAddr, now: Instant) -> bool {
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.try_take(now);
        }
        if self.buckets.len() >= self.capacity {
            self.buckets.retain(|_, b| !b.is_full(now));
            if self.buckets.len() >= self.capacity {
                return false;
            }
        }
        let mut b = TokenBucket::new(self.rate_per_sec, self.burst, now);
        let ok = b.try_take(now);
        self.buckets.insert(source, b);
        ok
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.buckets.len()
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

    #[test]
    fn per_source_buckets_are_independent_and_bounded() {
        let t0 = Instant::from_secs(10);
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
        let mut l = SourceLimiter::new(1, 2, 3);
        assert!(l.try_take(ip(1), t0));
        assert!(l.try_take(ip(1), t0));
        assert!(!l.try_take(ip(1), t0), "source 1 spent its burst");
        assert!(l.try_take(ip(2), t0), "source 2 has its own");
        assert!(l.try_take(ip(3), t0));
        // Full of active sources: a new one is refused, the known ones keep their allowance.
        assert!(!l.try_take(ip(4), t0));
        assert!(l.try_take(ip(2), t0));
        assert_eq!(l.len(), 3);
        // Once sources have been quiet long enough to refill, they are forgotten for room.
        let later = t0 + Duration::from_secs(5);
        assert!(l.try_take(ip(4), later));
        assert!(l.len() <= 3);
    }
}
