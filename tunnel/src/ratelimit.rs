//! Token buckets on virtual time, used to bound handshake work: one for all sources, and
//! one per source address in a bounded table; and a bounded set of recently seen values.

use std::collections::{HashMap, HashSet, VecDeque};
use std::hash::Hash;
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

    /// Whether [`try_take`](Self::try_take) would succeed.
    pub(crate) fn has_token(&mut self, now: Instant) -> bool {
        self.refill(now);
        self.micro_tokens >= SCALE
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

/// How often a full [`SourceLimiter`] looks for sources to forget.
const SWEEP_INTERVAL: Duration = Duration::from_secs(1);

/// Per-source-address token buckets, at most `capacity` of them. A source whose bucket has
/// refilled completely is forgotten when room is needed, by a sweep of the table that runs
/// at most once per [`SWEEP_INTERVAL`] (so a flood of new sources costs a hash lookup each,
/// not a scan); while the table is full of active sources, new sources are refused (a flood
/// from many addresses then cannot grow memory, sources already known keep their own
/// allowance, and the endpoint answers the refused ones with cookie replies).
#[derive(Clone, Debug)]
pub(crate) struct SourceLimiter {
    buckets: HashMap<IpAddr, TokenBucket>,
    rate_per_sec: u32,
    burst: u32,
    capacity: usize,
    last_sweep: Option<Instant>,
}

impl SourceLimiter {
    pub(crate) fn new(rate_per_sec: u32, burst: u32, capacity: usize) -> SourceLimiter {
        SourceLimiter {
            buckets: HashMap::new(),
            rate_per_sec,
            burst,
            capacity: capacity.max(1),
            last_sweep: None,
        }
    }

    /// Takes one token from `source`'s bucket if it has one. IPv6 sources share a bucket
    /// per /64 (one host usually holds a whole /64), IPv4-mapped ones count as IPv4.
    pub(crate) fn try_take(&mut self, source: IpAddr, now: Instant) -> bool {
        let source = bucket_key(source);
        if let Some(b) = self.buckets.get_mut(&source) {
            return b.try_take(now);
        }
        if self.buckets.len() >= self.capacity {
            if self
                .last_sweep
                .is_some_and(|t| now - t < SWEEP_INTERVAL && now >= t)
            {
                return false;
            }
            self.last_sweep = Some(now);
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

/// The last `capacity` distinct values inserted (oldest forgotten first).
#[derive(Clone, Debug)]
pub(crate) struct RecentSet<T> {
    order: VecDeque<T>,
    set: HashSet<T>,
    capacity: usize,
}

impl<T: Copy + Eq + Hash> RecentSet<T> {
    pub(crate) fn new(capacity: usize) -> RecentSet<T> {
        RecentSet {
            order: VecDeque::new(),
            set: HashSet::new(),
            capacity: capacity.max(1),
        }
    }

    pub(crate) fn contains(&self, v: &T) -> bool {
        self.set.contains(v)
    }

    /// Remembers `v`; false if it was already there.
    pub(crate) fn insert(&mut self, v: T) -> bool {
        if !self.set.insert(v) {
            return false;
        }
        self.order.push_back(v);
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

/// The bucket an address draws on: IPv4 as it is, IPv6 by its /64.
pub(crate) fn bucket_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let prefix = u128::from(v6) & !((1u128 << 64) - 1);
            IpAddr::V6(std::net::Ipv6Addr::from(prefix))
        }
        v4 => v4,
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

    #[test]
    fn a_full_table_is_swept_at_most_once_per_second() {
        let t0 = Instant::from_secs(10);
        let ip = |i: u32| IpAddr::from(std::net::Ipv4Addr::from(0xc612_0000 + i));
        let mut l = SourceLimiter::new(1, 1, 2);
        assert!(l.try_take(ip(1), t0));
        assert!(l.try_take(ip(2), t0));
        // Full of active sources: the sweep finds nothing, and the next second no sweep runs,
        // even though source 1 has refilled in the meantime.
        assert!(!l.try_take(ip(3), t0));
        assert_eq!(l.last_sweep, Some(t0));
        let t1 = t0 + Duration::from_millis(999);
        assert!(!l.try_take(ip(3), t1));
        assert_eq!(l.last_sweep, Some(t0), "no second sweep within a second");
        // A second later the sweep runs again and forgets the refilled sources.
        let t2 = t0 + Duration::from_secs(1);
        assert!(l.try_take(ip(3), t2));
        assert_eq!(l.last_sweep, Some(t2));
        assert!(l.len() <= 2);
    }

    #[test]
    fn recent_set_forgets_the_oldest() {
        let mut r = RecentSet::new(2);
        assert!(r.insert(1));
        assert!(!r.insert(1));
        assert!(r.insert(2));
        assert!(r.insert(3));
        assert!(!r.contains(&1) && r.contains(&2) && r.contains(&3));
        assert!(r.insert(1));
    }

    #[test]
    fn ipv6_sources_share_a_bucket_per_64_and_mapped_v4_is_v4() {
        let t0 = Instant::from_secs(10);
        let mut l = SourceLimiter::new(1, 1, 16);
        let a: IpAddr = "2001:db8:1:2::1".parse().unwrap();
        let b: IpAddr = "2001:db8:1:2:ffff::9".parse().unwrap();
        let other: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.try_take(a, t0));
        assert!(!l.try_take(b, t0), "same /64, same bucket");
        assert!(l.try_take(other, t0));
        let v4: IpAddr = "198.18.2.2".parse().unwrap();
        let mapped: IpAddr = "::ffff:198.18.2.2".parse().unwrap();
        assert!(l.try_take(v4, t0));
        assert!(
            !l.try_take(mapped, t0),
            "an IPv4-mapped address is that IPv4 address"
        );
        assert_eq!(bucket_key(mapped), v4);
    }
}
