//! Workload profiles: what a node samples every interval, and the [`Sampler`] that turns its
//! cumulative counters into per-interval rates.
//!
//! The caller (a worker) calls [`Sampler::sample`] every [`super::PredictConfig::interval`] with
//! its node figures and each live connection's cumulative counters; the sampler remembers the
//! previous counters and returns the rates over the interval. A connection it has not seen before
//! (or whose counters went backwards: the id was reused) is rated over its whole life so far.
//! Connections missing from a sample are forgotten.
//!
//! A sample costs one hash-map update per connection: the previous counters are overwritten
//! in place and stamped with the sample's number, and only when the map holds more
//! connections than the sample reported is it swept of those the sample did not stamp. The
//! profiles' vector can be handed back ([`Sampler::recycle`]) for the next sample to reuse.

use std::collections::hash_map::Entry;

use smoltcp::time::{Duration, Instant};

use super::{ConnId, Priority, secs};

/// Maps and sets keyed by connection and node ids, which this node or its authenticated peers
/// assign (no client chooses them): FxHash, not SipHash, which was a fifth of a sample's cost
/// at 100,000 connections (`benches/predict.rs`).
type HashMap<K, V> = std::collections::HashMap<K, V, rustc_hash::FxBuildHasher>;

/// A connection's cumulative counters, each way, since it was accepted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConnCounters {
    /// Bytes received from the client.
    pub bytes_in: u64,
    /// Bytes sent to the client.
    pub bytes_out: u64,
    /// Packets received.
    pub packets_in: u64,
    /// Packets sent.
    pub packets_out: u64,
    /// Requests received (as the app counts them; 0 for opaque streams).
    pub requests_in: u64,
    /// Responses sent.
    pub requests_out: u64,
}

/// Per-second rates of [`ConnCounters`] over one interval.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct ConnRates {
    /// Bytes/s received.
    pub bytes_in: f64,
    /// Bytes/s sent.
    pub bytes_out: f64,
    /// Packets/s received.
    pub packets_in: f64,
    /// Packets/s sent.
    pub packets_out: f64,
    /// Requests/s received.
    pub requests_in: f64,
    /// Responses/s sent.
    pub requests_out: f64,
}

impl ConnRates {
    fn between(prev: &ConnCounters, now: &ConnCounters, elapsed: f64) -> Self {
        let r = |a: u64, b: u64| b.saturating_sub(a) as f64 / elapsed;
        Self {
            bytes_in: r(prev.bytes_in, now.bytes_in),
            bytes_out: r(prev.bytes_out, now.bytes_out),
            packets_in: r(prev.packets_in, now.packets_in),
            packets_out: r(prev.packets_out, now.packets_out),
            requests_in: r(prev.requests_in, now.requests_in),
            requests_out: r(prev.requests_out, now.requests_out),
        }
    }

    /// Bytes/s both ways.
    pub fn bandwidth(&self) -> f64 {
        self.bytes_in + self.bytes_out
    }
}

/// What the caller reports about one connection.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnReport {
    /// The connection.
    pub conn: ConnId,
    /// Its counters now.
    pub counters: ConnCounters,
    /// When it was accepted.
    pub opened_at: Instant,
    /// Its app's priority class.
    pub priority: Priority,
}

/// A connection's profile over the interval just ended.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ConnProfile {
    /// The connection.
    pub conn: ConnId,
    /// Its rates.
    pub rates: ConnRates,
    /// Its age.
    pub age: Duration,
    /// Its app's priority class.
    pub priority: Priority,
}

/// The node's own figures, as the caller measures them.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct NodeReport {
    /// Fraction of the interval the workers were busy, `0..=1` (averaged over workers).
    pub cpu_busy: f64,
    /// Fraction of the interval the data path's threads ran on a CPU (their CPU time),
    /// `0..=1` averaged over workers, when the platform tells. `cpu_busy` counts a worker's
    /// working time on the wall clock, with the time it waits for a CPU that other
    /// processes (or the hypervisor) hold; this leaves that out, and is what CPU seconds per
    /// GB measured elsewhere compare with.
    pub cpu_time: Option<f64>,
    /// Bytes of memory in use.
    pub memory: u64,
    /// Live connections.
    pub connections: u64,
    /// Packets waiting in the workers' queues.
    pub queue_depth: u64,
}

/// One interval's profile of the node and its connections.
#[derive(Debug, Clone, PartialEq)]
pub struct Interval {
    /// When it ended.
    pub at: Instant,
    /// How long it was (`None` for the first sample).
    pub elapsed: Option<Duration>,
    /// The node's figures; `cpu_busy` clamped to `0..=1` (0 when not finite).
    pub node: NodeReport,
    /// Every connection reported.
    pub conns: Vec<ConnProfile>,
}

/// A connection's counters as a sample reported them.
#[derive(Debug, Clone, Copy)]
struct Stamped {
    /// The counters.
    counters: ConnCounters,
    /// The number of the sample that reported them (the sampler's `samples`).
    sample: u64,
}

/// Remembers the last counters and turns the next ones into rates.
#[derive(Debug, Clone)]
pub struct Sampler {
    interval: Duration,
    last_at: Option<Instant>,
    /// Samples taken: the number of the last one.
    samples: u64,
    /// Every connection of the last sample, with its counters then (each stamped with that
    /// sample's number; while a sample is under way, those it reported so far carry its own).
    prev: HashMap<ConnId, Stamped>,
    /// An allocation for the next interval's profiles (see [`Self::recycle`]).
    spare: Vec<ConnProfile>,
}

impl Sampler {
    /// A sampler meant to be fed every `interval`.
    pub fn new(interval: Duration) -> Self {
        Self {
            interval,
            last_at: None,
            samples: 0,
            prev: HashMap::default(),
            spare: Vec::new(),
        }
    }

    /// Hands back an interval's profiles ([`Interval::conns`]) once read: the next sample
    /// reuses their allocation instead of making a new one.
    pub fn recycle(&mut self, conns: Vec<ConnProfile>) {
        self.spare = conns;
    }

    /// When the next sample is due (`None`: now).
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.last_at.map(|t| t + self.interval)
    }

    /// Records a sample at `now`. A sample not later than the previous one is ignored (`None`).
    pub fn sample(
        &mut self,
        now: Instant,
        node: NodeReport,
        conns: impl IntoIterator<Item = ConnReport>,
    ) -> Option<Interval> {
        if self.last_at.is_some_and(|t| now <= t) {
            return None;
        }
        let elapsed = self.last_at.map(|t| now - t);
        self.last_at = Some(now);
        self.samples += 1;
        let sample = self.samples;
        // Connections of this sample so far (each counted once).
        let mut reported = 0;
        let prev = &mut self.prev;
        let mut profiles = std::mem::take(&mut self.spare);
        profiles.clear();
        profiles.extend(conns.into_iter().map(|r| {
            let age = if now > r.opened_at {
                now - r.opened_at
            } else {
                Duration::ZERO
            };
            let now_stamped = Stamped {
                counters: r.counters,
                sample,
            };
            // Its counters in the last sample; none when this sample reported it already
            // (the first report of an id is rated against the last sample, a repeat as new).
            let last = match prev.entry(r.conn) {
                Entry::Occupied(mut e) => {
                    let last = std::mem::replace(e.get_mut(), now_stamped);
                    if last.sample == sample {
                        None
                    } else {
                        reported += 1;
                        Some(last.counters)
                    }
                }
                Entry::Vacant(e) => {
                    reported += 1;
                    e.insert(now_stamped);
                    None
                }
            };
            let rates = match (last, elapsed) {
                (Some(p), Some(e)) if counters_le(&p, &r.counters) => {
                    ConnRates::between(&p, &r.counters, secs(e))
                }
                _ if age > Duration::ZERO => {
                    ConnRates::between(&ConnCounters::default(), &r.counters, secs(age))
                }
                _ => ConnRates::default(),
            };
            ConnProfile {
                conn: r.conn,
                rates,
                age,
                priority: r.priority,
            }
        }));
        // Forget the connections this sample did not report: those not stamped with it. When
        // the map holds no more connections than the sample reported, there are none.
        if prev.len() > reported {
            prev.retain(|_, p| p.sample == sample);
        }
        let cpu_busy = if node.cpu_busy.is_finite() {
            node.cpu_busy.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let cpu_time = node
            .cpu_time
            .filter(|t| t.is_finite())
            .map(|t| t.clamp(0.0, 1.0));
        Some(Interval {
            at: now,
            elapsed,
            node: NodeReport {
                cpu_busy,
                cpu_time,
                ..node
            },
            conns: profiles,
        })
    }
}

/// Every counter of `a` at most that of `b` (counters only grow on one connection).
fn counters_le(a: &ConnCounters, b: &ConnCounters) -> bool {
    a.bytes_in <= b.bytes_in
        && a.bytes_out <= b.bytes_out
        && a.packets_in <= b.packets_in
        && a.packets_out <= b.packets_out
        && a.requests_in <= b.requests_in
        && a.requests_out <= b.requests_out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(conn: ConnId, bytes_in: u64, opened_ms: i64) -> ConnReport {
        ConnReport {
            conn,
            counters: ConnCounters {
                bytes_in,
                packets_in: bytes_in / 1000,
                ..ConnCounters::default()
            },
            opened_at: Instant::from_millis(opened_ms),
            priority: Priority::Normal,
        }
    }

    #[test]
    fn counters_become_rates_per_interval() {
        let mut s = Sampler::new(Duration::from_millis(100));
        assert_eq!(s.poll_timeout(), None);
        let node = NodeReport {
            cpu_busy: 1.5,
            ..NodeReport::default()
        };
        let t1 = Instant::from_millis(1000);
        let first = s.sample(t1, node, [report(1, 10_000, 500)]).unwrap();
        // First sight: rated over its 0.5 s life.
        assert_eq!(first.conns[0].rates.bytes_in, 20_000.0);
        assert_eq!(first.conns[0].age, Duration::from_millis(500));
        assert_eq!(first.node.cpu_busy, 1.0);
        assert_eq!(s.poll_timeout(), Some(Instant::from_millis(1100)));

        let t2 = Instant::from_millis(1100);
        let second = s
            .sample(t2, node, [report(1, 15_000, 500), report(2, 1_000, 1050)])
            .unwrap();
        assert_eq!(second.elapsed, Some(Duration::from_millis(100)));
        assert_eq!(second.conns[0].rates.bytes_in, 50_000.0);
        assert_eq!(second.conns[0].rates.packets_in, 50.0);
        assert_eq!(second.conns[1].rates.bytes_in, 20_000.0);

        // The clock going backwards is ignored; a reset counter is rated from its opening.
        assert_eq!(s.sample(t2, node, []), None);
        let t3 = Instant::from_millis(1200);
        let third = s.sample(t3, node, [report(1, 700, 1100)]).unwrap();
        assert_eq!(third.conns[0].rates.bytes_in, 7_000.0);
    }

    /// The sampler updates its map in place; it rates as one that takes and rebuilds it every
    /// sample would, also with connections that come and go, repeated ids in one sample,
    /// counters that go backwards and samples not later than the last.
    #[test]
    fn in_place_update_rates_as_a_rebuild() {
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let node = NodeReport::default();
        let mut s = Sampler::new(Duration::from_millis(100));
        // The reference: the previous counters taken and rebuilt.
        let mut last_at: Option<Instant> = None;
        let mut prev: HashMap<ConnId, ConnCounters> = HashMap::default();
        let mut bytes: HashMap<ConnId, u64> = HashMap::default();
        let mut now = 1_000i64;
        for _ in 0..500 {
            now += [100, 100, 100, 0, -50, 250][next(6) as usize];
            let t = Instant::from_millis(now);
            let reports: Vec<ConnReport> = (0..next(40))
                .map(|_| {
                    let conn = next(30) + 1;
                    let b = bytes.entry(conn).or_insert(0);
                    *b = if next(20) == 0 {
                        next(1000)
                    } else {
                        *b + next(5000)
                    };
                    report(conn, *b, now - next(3000) as i64)
                })
                .collect();
            let got = s.sample(t, node, reports.iter().copied());
            let want = if last_at.is_some_and(|l| t <= l) {
                None
            } else {
                let elapsed = last_at.map(|l| t - l);
                last_at = Some(t);
                let mut old = std::mem::take(&mut prev);
                let conns: Vec<ConnProfile> = reports
                    .iter()
                    .map(|r| {
                        let age = if t > r.opened_at {
                            t - r.opened_at
                        } else {
                            Duration::ZERO
                        };
                        let rates = match (old.remove(&r.conn), elapsed) {
                            (Some(p), Some(e)) if counters_le(&p, &r.counters) => {
                                ConnRates::between(&p, &r.counters, secs(e))
                            }
                            _ if age > Duration::ZERO => {
                                ConnRates::between(&ConnCounters::default(), &r.counters, secs(age))
                            }
                            _ => ConnRates::default(),
                        };
                        prev.insert(r.conn, r.counters);
                        ConnProfile {
                            conn: r.conn,
                            rates,
                            age,
                            priority: r.priority,
                        }
                    })
                    .collect();
                Some(conns)
            };
            assert_eq!(got.as_ref().map(|i| &i.conns), want.as_ref());
            if let Some(i) = got
                && next(2) == 0
            {
                s.recycle(i.conns);
            }
            let mut remembered: Vec<_> = s.prev.iter().map(|(id, p)| (*id, p.counters)).collect();
            let mut expected: Vec<_> = prev.iter().map(|(id, c)| (*id, *c)).collect();
            remembered.sort_by_key(|(id, _)| *id);
            expected.sort_by_key(|(id, _)| *id);
            assert_eq!(remembered, expected);
        }
    }
}
