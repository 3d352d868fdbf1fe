//! Granularity: connection classes with a resource allocation each, and per-connection segment
//! statistics.
//!
//! A connection's class comes from its forecast bandwidth (bytes/s both ways) and the three
//! [`ClassConfig::bounds`]. It changes with hysteresis: up only when the forecast exceeds the
//! class's upper bound by [`ClassConfig::margin`] (20 %), down only when it falls below the lower
//! bound by the same margin, so a connection hovering at a boundary keeps its class.
//!
//! [`Segments`] splits a connection's stream into byte ranges, each with the bytes, packets and
//! last activity seen in it (what the load reports carry). A segment that received
//! [`ClassConfig::split_bytes`] is split: it keeps its figures for the range up to the split
//! point and a fresh segment counts from there (for the open-ended tail, the split point is the
//! current end of the stream; otherwise the middle of the range). Adjacent segments idle for
//! [`ClassConfig::idle`] are merged. There are never more than [`ClassConfig::max_segments`]:
//! at the cap, the adjacent pair idle the longest is merged before a split.

use smoltcp::time::{Duration, Instant};

use super::config::{ConfigError, count_in, duration_in, in_range};

/// A connection's size class, smallest first.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Class {
    /// Below `bounds[0]`.
    Micro,
    /// `bounds[0]..bounds[1]`.
    Small,
    /// `bounds[1]..bounds[2]`.
    Medium,
    /// From `bounds[2]`.
    Large,
}

impl Class {
    /// Every class, smallest first.
    pub const ALL: [Class; 4] = [Class::Micro, Class::Small, Class::Medium, Class::Large];

    /// The name `ctl` shows.
    pub fn as_str(self) -> &'static str {
        match self {
            Class::Micro => "micro",
            Class::Small => "small",
            Class::Medium => "medium",
            Class::Large => "large",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// The resources a class gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Allocation {
    /// Rate limit in bytes/s both ways; `None` for none.
    pub rate_limit: Option<u64>,
    /// Socket buffer budget in bytes.
    pub buffer_budget: u32,
    /// Scheduling priority, 0 first.
    pub priority: u8,
}

/// Settings of classes and segments.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ClassConfig {
    /// Class boundaries in bytes/s, increasing. Default 1 kB/s, 100 kB/s, 10 MB/s.
    pub bounds: [f64; 3],
    /// Hysteresis margin as a fraction of the boundary. Default 0.2.
    pub margin: f64,
    /// Allocation per class, micro to large. Defaults: micro 1 MB/s, 16 KiB, priority 0; small
    /// 10 MB/s, 64 KiB, 1; medium 100 MB/s, 256 KiB, 2; large unlimited, 1 MiB, 3 — small flows
    /// are scheduled first, large ones get the buffers.
    pub allocations: [Allocation; 4],
    /// Most segments per connection. Default 16.
    pub max_segments: usize,
    /// Bytes that make a segment hot enough to split. Default 1 MiB.
    pub split_bytes: u64,
    /// Inactivity after which adjacent segments merge. Default 10 s.
    pub idle: Duration,
}

impl Default for ClassConfig {
    fn default() -> Self {
        let a = |rate_limit, buffer_budget, priority| Allocation {
            rate_limit,
            buffer_budget,
            priority,
        };
        Self {
            bounds: [1e3, 1e5, 1e7],
            margin: 0.2,
            allocations: [
                a(Some(1_000_000), 16 << 10, 0),
                a(Some(10_000_000), 64 << 10, 1),
                a(Some(100_000_000), 256 << 10, 2),
                a(None, 1 << 20, 3),
            ],
            max_segments: 16,
            split_bytes: 1 << 20,
            idle: Duration::from_secs(10),
        }
    }
}

impl ClassConfig {
    /// Checks every setting.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let mut prev = 0.0;
        for b in self.bounds {
            in_range("class.bounds", b, 0.0, 1e15)?;
            if b <= prev {
                return Err(ConfigError::Order {
                    low: "class.bounds[i]",
                    high: "class.bounds[i + 1]",
                });
            }
            prev = b;
        }
        in_range("class.margin", self.margin, 0.0, 0.9)?;
        count_in("class.max_segments", self.max_segments, 2, 1 << 12)?;
        in_range("class.split_bytes", self.split_bytes as f64, 1.0, 1e15)?;
        duration_in(
            "class.idle",
            self.idle,
            Duration::ZERO,
            Duration::from_secs(86_400),
        )
    }

    /// A class's allocation.
    pub fn allocation(&self, class: Class) -> Allocation {
        self.allocations[class.index()]
    }

    /// The class for a forecast of `bandwidth` bytes/s, given the current class (`None` for a
    /// new connection: no hysteresis). A non-finite forecast keeps the current class (micro for
    /// a new connection).
    pub fn classify(&self, current: Option<Class>, bandwidth: f64) -> Class {
        if !bandwidth.is_finite() {
            return current.unwrap_or(Class::Micro);
        }
        let Some(mut c) = current.map(Class::index) else {
            return Class::ALL[self.bounds.iter().filter(|b| bandwidth >= **b).count()];
        };
        while c < 3 && bandwidth > self.bounds[c] * (1.0 + self.margin) {
            c += 1;
        }
        while c > 0 && bandwidth < self.bounds[c - 1] * (1.0 - self.margin) {
            c -= 1;
        }
        Class::ALL[c]
    }
}

/// One byte range of a connection's stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Segment {
    /// First stream offset.
    pub start: u64,
    /// One past the last offset; `u64::MAX` for the open-ended tail.
    pub end: u64,
    /// Bytes seen in the range (retransmissions count again).
    pub bytes: u64,
    /// Packets seen.
    pub packets: u64,
    /// When the last of them was seen.
    pub last_activity: Instant,
}

/// A connection's segment statistics (see the module doc). The segments always cover
/// `0..u64::MAX` in order, without gaps.
#[derive(Debug, Clone)]
pub struct Segments {
    segments: Vec<Segment>,
    max: usize,
    split_bytes: u64,
    idle: Duration,
}

impl Segments {
    /// One segment covering the whole stream.
    pub fn new(config: &ClassConfig, now: Instant) -> Self {
        Self {
            segments: vec![Segment::fresh(0, u64::MAX, now)],
            max: config.max_segments.max(2),
            split_bytes: config.split_bytes.max(1),
            idle: config.idle,
        }
    }

    /// The segments, in stream order.
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// A packet carrying `len` bytes at stream `offset`.
    pub fn record(&mut self, now: Instant, offset: u64, len: u64) {
        self.record_packets(now, offset, len, 1);
    }

    /// `packets` packets carrying `len` bytes in all, from stream `offset` on (as one
    /// sample's counters tell it: the bytes the connection moved since the last one, and
    /// how many packets carried them). They count in the segment holding `offset`, which
    /// splits as [`Self::record`] says.
    pub fn record_packets(&mut self, now: Instant, offset: u64, len: u64, packets: u64) {
        let i = self.find(offset);
        let s = &mut self.segments[i];
        s.bytes = s.bytes.saturating_add(len);
        s.packets = s.packets.saturating_add(packets);
        s.last_activity = now;
        if s.bytes < self.split_bytes {
            return;
        }
        let at = if s.end == u64::MAX {
            offset.saturating_add(len)
        } else {
            s.start + (s.end - s.start) / 2
        };
        if at <= s.start || at >= s.end {
            return;
        }
        if self.segments.len() >= self.max {
            self.merge_idlest();
        }
        let i = self.find(offset);
        let end = self.segments[i].end;
        self.segments[i].end = at;
        self.segments.insert(i + 1, Segment::fresh(at, end, now));
    }

    /// At most `n` (at least 1) segments, in stream order, that cover the stream as these
    /// do: the last `n - 1` as they are, and those before them merged into one (their
    /// bytes and packets summed, their latest activity). What a load report carries.
    pub fn summary(&self, n: usize) -> impl Iterator<Item = Segment> + '_ {
        let kept = n.max(1) - 1;
        let head = self.segments.len().saturating_sub(kept);
        let merged = self.segments[..head].iter().copied().reduce(|mut a, b| {
            a.end = b.end;
            a.bytes = a.bytes.saturating_add(b.bytes);
            a.packets = a.packets.saturating_add(b.packets);
            a.last_activity = a.last_activity.max(b.last_activity);
            a
        });
        merged
            .into_iter()
            .chain(self.segments[head..].iter().copied())
    }

    /// Bytes seen over the whole stream.
    pub fn bytes(&self) -> u64 {
        self.segments
            .iter()
            .fold(0u64, |n, s| n.saturating_add(s.bytes))
    }

    /// Merges adjacent segments idle for the configured time.
    pub fn maintain(&mut self, now: Instant) {
        let after = self.idle;
        let idle = move |s: &Segment| now >= s.last_activity + after;
        let mut i = 0;
        while i + 1 < self.segments.len() {
            if idle(&self.segments[i]) && idle(&self.segments[i + 1]) {
                self.merge(i);
            } else {
                i += 1;
            }
        }
    }

    fn find(&self, offset: u64) -> usize {
        self.segments
            .partition_point(|s| s.start <= offset)
            .saturating_sub(1)
    }

    /// Merges the adjacent pair whose latest activity is the oldest.
    fn merge_idlest(&mut self) {
        let i = (0..self.segments.len().saturating_sub(1)).min_by_key(|&i| {
            let (a, b) = (&self.segments[i], &self.segments[i + 1]);
            (a.last_activity.max(b.last_activity), i)
        });
        if let Some(i) = i {
            self.merge(i);
        }
    }

    fn merge(&mut self, i: usize) {
        let b = self.segments.remove(i + 1);
        let a = &mut self.segments[i];
        a.end = b.end;
        a.bytes = a.bytes.saturating_add(b.bytes);
        a.packets = a.packets.saturating_add(b.packets);
        a.last_activity = a.last_activity.max(b.last_activity);
    }
}

impl Segment {
    fn fresh(start: u64, end: u64, now: Instant) -> Self {
        Self {
            start,
            end,
            bytes: 0,
            packets: 0,
            last_activity: now,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn class_from_forecast_with_hysteresis() {
        let c = ClassConfig::default();
        assert_eq!(c.classify(None, 500.0), Class::Micro);
        assert_eq!(c.classify(None, 1e3), Class::Small);
        assert_eq!(c.classify(None, 5e7), Class::Large);
        // Up from small: 110 kB/s is over the 100 kB/s boundary but inside the margin.
        assert_eq!(c.classify(Some(Class::Small), 110e3), Class::Small);
        assert_eq!(c.classify(Some(Class::Small), 121e3), Class::Medium);
        // Down from medium: 90 kB/s is not 20 % below.
        assert_eq!(c.classify(Some(Class::Medium), 90e3), Class::Medium);
        assert_eq!(c.classify(Some(Class::Medium), 79e3), Class::Small);
        // A jump crosses several classes at once.
        assert_eq!(c.classify(Some(Class::Micro), 2e7), Class::Large);
        assert_eq!(c.classify(Some(Class::Large), 0.0), Class::Micro);
        assert_eq!(c.classify(Some(Class::Medium), f64::NAN), Class::Medium);
        assert_eq!(c.allocation(Class::Large).rate_limit, None);
    }

    fn covers_stream(s: &Segments) -> bool {
        let segs = s.segments();
        segs.first().map(|s| s.start) == Some(0)
            && segs.last().map(|s| s.end) == Some(u64::MAX)
            && segs
                .windows(2)
                .all(|w| w[0].end == w[1].start && w[0].start < w[0].end)
    }

    #[test]
    fn hot_tail_splits_idle_segments_merge() {
        let config = ClassConfig {
            split_bytes: 1000,
            max_segments: 4,
            ..ClassConfig::default()
        };
        let t0 = Instant::from_secs(1);
        let mut s = Segments::new(&config, t0);
        s.record(t0, 0, 600);
        assert_eq!(s.segments().len(), 1);
        s.record(t0, 600, 600);
        assert_eq!(
            s.segments(),
            [
                Segment {
                    start: 0,
                    end: 1200,
                    bytes: 1200,
                    packets: 2,
                    last_activity: t0
                },
                Segment::fresh(1200, u64::MAX, t0)
            ]
        );
        // Stream on, one second per 1000 bytes: never more than 4 segments.
        for k in 0..20u64 {
            let now = t0 + Duration::from_secs(k + 1);
            s.record(now, 1200 + 1000 * k, 1000);
            assert!(s.segments().len() <= 4);
            assert!(covers_stream(&s));
        }
        let total: u64 = s.segments().iter().map(|x| x.bytes).sum();
        assert_eq!(total, 1200 + 20_000);
        // A retransmission into the first range is counted there.
        s.record(t0 + Duration::from_secs(21), 10, 100);
        assert_eq!(s.segments()[0].bytes % 1000, 300);
        // Idle for 10 s: everything merges back into one.
        s.maintain(t0 + Duration::from_secs(31));
        assert_eq!(s.segments().len(), 1);
        assert_eq!(s.segments()[0].bytes, 21_300);
        assert_eq!(s.segments()[0].packets, 23);
    }

    #[test]
    fn several_packets_at_once_and_a_summary_that_keeps_the_tail() {
        let config = ClassConfig {
            split_bytes: 1000,
            ..ClassConfig::default()
        };
        let t0 = Instant::from_secs(1);
        let mut s = Segments::new(&config, t0);
        // Five samples of 1,000 bytes in 3 packets each: a split after each.
        for k in 0..5u64 {
            s.record_packets(t0 + Duration::from_secs(k), 1000 * k, 1000, 3);
        }
        assert_eq!(s.segments().len(), 6);
        assert_eq!(s.bytes(), 5000);
        assert!(covers_stream(&s));
        let all: Vec<Segment> = s.summary(10).collect();
        assert_eq!(all, s.segments());
        // Three: the first four merged, then the last closed range and the tail.
        let three: Vec<Segment> = s.summary(3).collect();
        assert_eq!(three.len(), 3);
        assert_eq!(
            three[0],
            Segment {
                start: 0,
                end: 4000,
                bytes: 4000,
                packets: 12,
                last_activity: t0 + Duration::from_secs(3),
            }
        );
        assert_eq!(&three[1..], &s.segments()[4..]);
        // One (or none asked): everything in one.
        let one: Vec<Segment> = s.summary(0).collect();
        assert_eq!(
            (
                one.len(),
                one[0].start,
                one[0].end,
                one[0].bytes,
                one[0].packets
            ),
            (1, 0, u64::MAX, 5000, 15)
        );
    }
}
