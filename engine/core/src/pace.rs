//! Class allocations, enforced per connection: a token bucket on the bytes the app takes and
//! gives (the class's rate limit, both ways together), a cap on the bytes queued in the send
//! buffer (the class's buffer budget: smoltcp cannot resize a live socket's buffers, so the
//! budget bounds what is queued in them), and a scheduling priority (connections of a lower
//! priority number are served first in every turn).
//!
//! The node's predictor assigns each connection a class (`predict::class`) and, with
//! `[predict.class] enforce = true`, hands its worker the class's allocation
//! (`Stack::set_allocation`).

use smoltcp::time::{Duration, Instant};

use crate::predict::class::Allocation;

/// The bucket holds at most this much time's worth of the rate (and never less than
/// [`MIN_BURST`]): short bursts pass at once, a sustained flow is held to the rate.
pub const BURST: Duration = Duration::from_millis(20);
/// The smallest burst: one TSO segment's worth would otherwise be refused for ever at a low
/// rate.
pub const MIN_BURST: u64 = 16 * 1024;

/// One connection's allocation and its token bucket.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pacer {
    alloc: Allocation,
    tokens: u64,
    at: Instant,
    /// The stack has a wake-up queued for this connection.
    pub waiting: bool,
}

impl Pacer {
    /// A pacer for `alloc` at `now`, its bucket full.
    pub fn new(alloc: Allocation, now: Instant) -> Self {
        let mut p = Self {
            alloc,
            tokens: 0,
            at: now,
            waiting: false,
        };
        p.tokens = p.capacity();
        p
    }

    /// The same bucket under a new allocation at `now`: what it held carries over, up to the
    /// new burst. A class change must not hand out a fresh burst (a connection whose class
    /// flapped would pass more than its rate).
    pub fn reallocate(mut self, alloc: Allocation, now: Instant) -> Self {
        self.refill(now);
        self.alloc = alloc;
        self.tokens = self.tokens.min(self.capacity());
        self.at = now;
        self
    }

    /// The allocation.
    pub fn allocation(&self) -> Allocation {
        self.alloc
    }

    fn capacity(&self) -> u64 {
        self.alloc.rate_limit.map_or(u64::MAX, |r| {
            (r.saturating_mul(BURST.total_micros()) / 1_000_000).max(MIN_BURST)
        })
    }

    /// Refills the bucket up to `now`.
    fn refill(&mut self, now: Instant) {
        let Some(rate) = self.alloc.rate_limit else {
            self.tokens = u64::MAX;
            return;
        };
        if now > self.at {
            let us = (now - self.at).total_micros();
            let add =
                u64::try_from(u128::from(rate) * u128::from(us) / 1_000_000).unwrap_or(u64::MAX);
            self.tokens = self.tokens.saturating_add(add).min(self.capacity());
            self.at = now;
        }
    }

    /// Bytes the connection may move now (either way).
    pub fn allowance(&mut self, now: Instant) -> u64 {
        self.refill(now);
        self.tokens
    }

    /// `n` bytes moved.
    pub fn spend(&mut self, n: u64) {
        if self.alloc.rate_limit.is_some() {
            self.tokens = self.tokens.saturating_sub(n);
        }
    }

    /// Bytes the app may add to a send buffer that holds `queued`.
    pub fn send_room(&self, queued: usize) -> usize {
        (self.alloc.buffer_budget as usize).saturating_sub(queued)
    }

    /// When `want` bytes (at most a full bucket) will be allowed, if the bucket is short now.
    pub fn ready_at(&self, want: u64) -> Option<Instant> {
        let rate = self.alloc.rate_limit?;
        let want = want.min(self.capacity());
        if self.tokens >= want || rate == 0 {
            return None;
        }
        let us = (want - self.tokens)
            .saturating_mul(1_000_000)
            .div_ceil(rate);
        Some(self.at + Duration::from_micros(us))
    }

    /// Its scheduling priority (0 first).
    pub fn priority(&self) -> u8 {
        self.alloc.priority
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn alloc(rate: Option<u64>, budget: u32) -> Allocation {
        Allocation {
            rate_limit: rate,
            buffer_budget: budget,
            priority: 1,
        }
    }

    #[test]
    fn holds_a_flow_to_its_rate_after_a_burst() {
        let t0 = Instant::from_secs(10);
        // 1 MB/s: a 20 ms burst is 20 kB.
        let mut p = Pacer::new(alloc(Some(1_000_000), 65_536), t0);
        assert_eq!(p.allowance(t0), 20_000);
        p.spend(20_000);
        assert_eq!(p.allowance(t0), 0);
        assert_eq!(p.ready_at(1000), Some(t0 + Duration::from_millis(1)));
        assert_eq!(p.allowance(t0 + Duration::from_millis(5)), 5_000);
        // Never more than the burst, however long it waited.
        assert_eq!(p.allowance(t0 + Duration::from_secs(60)), 20_000);
        // A new allocation keeps the bucket: no fresh burst on a class change.
        let mut p = Pacer::new(alloc(Some(1_000_000), 65_536), t0);
        p.spend(20_000);
        let t1 = t0 + Duration::from_millis(2);
        let mut q = p.reallocate(alloc(Some(1_000_000), 1 << 20), t1);
        assert_eq!(q.allowance(t1), 2_000);
        // Down to a smaller burst: capped by it.
        let q = Pacer::new(alloc(Some(1_000_000), 65_536), t0)
            .reallocate(alloc(Some(100_000), 65_536), t0);
        assert_eq!(q.tokens, MIN_BURST);
        // From no limit to one: a full bucket of the new one.
        let mut q =
            Pacer::new(alloc(None, 65_536), t0).reallocate(alloc(Some(1_000_000), 65_536), t0);
        assert_eq!(q.allowance(t0), 20_000);
        // A slow rate still lets a segment's worth through.
        let p = Pacer::new(alloc(Some(1_000), 65_536), t0);
        assert_eq!(p.capacity(), MIN_BURST);
    }

    #[test]
    fn no_rate_limit_and_the_send_budget() {
        let t0 = Instant::from_secs(10);
        let mut p = Pacer::new(alloc(None, 16_384), t0);
        p.spend(1 << 40);
        assert_eq!(p.allowance(t0), u64::MAX);
        assert_eq!(p.ready_at(1 << 20), None);
        assert_eq!(p.send_room(10_000), 6_384);
        assert_eq!(p.send_room(20_000), 0);
    }
}
