//! Loss probes: recovering a lost tail segment in milliseconds, not after smoltcp's one-second
//! minimum retransmission timeout.
//!
//! smoltcp 0.14 never retransmits on a timeout sooner than 1 s (`RTTE_MIN_RTO`), and repairs a
//! loss sooner only on three duplicate ACKs — which a lost *tail* (the last segments of a
//! response, of a window, or the first after a move) never produces: nothing follows it to be
//! acknowledged. Linux probes such a tail after about two round trips (RACK-TLP, RFC 8985) and
//! never waits less than 200 ms for a timeout. A [`LossProbe`] per connection gives flowshift
//! the same recovery on unmodified smoltcp:
//!
//! - it watches the connection's acknowledged point (wire `snd_una`) and the end of what was
//!   sent, and times one segment at a time for a round-trip estimate (Karn: not across a
//!   probe);
//! - when data is in flight and nothing was acknowledged for a probe timeout (PTO) —
//!   `max(2·srtt, 10 ms)`, plus the client's delayed-ACK allowance (200 ms, as Linux) when at
//!   most one segment is in flight; 250 ms before any round trip was measured — the stack
//!   makes smoltcp retransmit its earliest unacknowledged segment, through smoltcp's own fast
//!   retransmit: it hands the socket a window update and three duplicate ACKs of `snd_una`
//!   (see `Stack::probe_losses`). The segment goes out as smoltcp builds every segment
//!   (options, window, MSS, the translation to the client's numbers), and the client's answer
//!   acknowledges it as usual;
//! - a probe that brings no progress is repeated after twice the timeout, [`MAX_PROBES`] times
//!   in all; then smoltcp's own timeout (≥ 1 s) takes over.
//!
//! The cost of a probe that was not needed (the ACK was only late) is one segment sent twice
//! and the congestion window halved, as after any fast retransmit.

use smoltcp::time::{Duration, Instant};

use crate::translate::seq_gt;

/// Probes per stall (no progress in between) before smoltcp's own timeout is left to act.
pub const MAX_PROBES: u8 = 2;
/// The probe timeout before any round trip was measured (a new or restored connection).
pub const INITIAL_PTO: Duration = Duration::from_millis(250);
/// The probe timeout is never shorter than this plus the ACK allowance.
pub const MIN_PTO: Duration = Duration::from_millis(10);
/// Added to the timeout when at most one segment is in flight: the client may delay the ACK
/// of a lone segment (Linux's `TCP_DELACK_MAX`).
pub const DELAYED_ACK_ALLOWANCE: Duration = Duration::from_millis(200);
/// Added otherwise (a client acknowledges every second segment at once).
pub const ACK_ALLOWANCE: Duration = Duration::from_millis(2);

/// One connection's loss-probe state, in wire sequence numbers (see the module doc).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LossProbe {
    /// The acknowledged point last seen, and the end of what was sent (`None`: nothing sent
    /// yet that this probe saw).
    acked: Option<u32>,
    sent_end: u32,
    /// When the acknowledged point last moved, or data went out with nothing in flight.
    progress_at: Instant,
    /// Smoothed round-trip time (1/8 gain), from our own timing.
    srtt: Option<Duration>,
    /// `srtt` is a seed (from a snapshot), not yet confirmed by a sample of our own: the
    /// first sample replaces it.
    seeded: bool,
    /// The segment being timed: when it went out and where it ends.
    timing: Option<(Instant, u32)>,
    /// Probes sent since the last progress, and when the last went.
    probes: u8,
    last_probe: Option<Instant>,
    /// The deadline under which the stack's probe timer holds this connection, if it does
    /// (an entry with another deadline is stale and skipped).
    pub queued: Option<Instant>,
}

impl Default for LossProbe {
    fn default() -> Self {
        Self {
            acked: None,
            sent_end: 0,
            progress_at: Instant::ZERO,
            srtt: None,
            seeded: false,
            timing: None,
            probes: 0,
            last_probe: None,
            queued: None,
        }
    }
}

impl LossProbe {
    /// Data went out at `now`, up to `end` (wire), with `acked` acknowledged. Returns whether
    /// data is in flight now.
    pub fn sent(&mut self, now: Instant, acked: u32, end: u32) -> bool {
        match self.acked {
            None => {
                self.acked = Some(acked);
                self.sent_end = acked;
            }
            Some(_) => {
                self.observe(now, acked);
            }
        }
        if self.in_flight() == 0 {
            // Nothing was in flight: the clock starts with this data.
            self.progress_at = now;
            self.probes = 0;
            self.last_probe = None;
        }
        // Only new data is timed: a retransmission's ACK is ambiguous (Karn).
        if seq_gt(end, self.sent_end) {
            self.sent_end = end;
            if self.timing.is_none() {
                self.timing = Some((now, end));
            }
        }
        self.in_flight() > 0
    }

    /// The acknowledged point is `acked` at `now` (a packet of the client was handled).
    /// Returns whether data is still in flight.
    pub fn observe(&mut self, now: Instant, acked: u32) -> bool {
        let Some(prev) = self.acked else {
            return false;
        };
        if seq_gt(acked, prev) {
            self.acked = Some(acked);
            self.progress_at = now;
            self.probes = 0;
            self.last_probe = None;
            if let Some((at, end)) = self.timing
                && !seq_gt(end, acked)
            {
                self.timing = None;
                let sample = now - at;
                self.srtt = Some(match self.srtt {
                    Some(s) if !self.seeded => (s * 7 + sample) / 8,
                    _ => sample,
                });
                self.seeded = false;
            }
        }
        self.in_flight() > 0
    }

    /// Bytes (and FIN) sent and not acknowledged, as last seen.
    pub fn in_flight(&self) -> u32 {
        self.acked
            .filter(|&a| seq_gt(self.sent_end, a))
            .map_or(0, |a| self.sent_end.wrapping_sub(a))
    }

    /// The smoothed round-trip time, once one was measured (or seeded).
    pub fn srtt(&self) -> Option<Duration> {
        self.srtt
    }

    /// Starts from a round-trip time measured elsewhere (a moved connection's source, on
    /// the path the connection takes here): probes are timed from it until the first
    /// round trip measured here replaces it.
    pub fn seed_srtt(&mut self, srtt: Duration) {
        if self.srtt.is_none() || self.seeded {
            self.srtt = Some(srtt);
            self.seeded = true;
        }
    }

    /// When the next probe is due, given the size of one full segment; `None` with nothing
    /// in flight or after [`MAX_PROBES`] probes without progress.
    pub fn deadline(&self, segment: u32) -> Option<Instant> {
        let in_flight = self.in_flight();
        if in_flight == 0 || self.probes >= MAX_PROBES {
            return None;
        }
        let base = self.srtt.map_or(INITIAL_PTO, |s| (s * 2).max(MIN_PTO));
        let allowance = if in_flight <= segment {
            DELAYED_ACK_ALLOWANCE
        } else {
            ACK_ALLOWANCE
        };
        let pto = (base + allowance) * (1u32 << self.probes);
        Some(self.last_probe.unwrap_or(self.progress_at) + pto)
    }

    /// A probe went out at `now`: the next waits twice as long, and the segment being timed
    /// is no longer a clean sample (Karn).
    pub fn probed(&mut self, now: Instant) {
        self.probes = self.probes.saturating_add(1);
        self.last_probe = Some(now);
        self.timing = None;
    }

    /// Probes sent since the last progress.
    pub fn probes(&self) -> u8 {
        self.probes
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MSS: u32 = 1448;

    fn at(ms: i64) -> Instant {
        Instant::from_millis(ms)
    }

    #[test]
    fn a_seeded_round_trip_times_the_first_probe_and_the_first_sample_replaces_it() {
        let mut p = LossProbe::default();
        p.seed_srtt(Duration::from_millis(30));
        assert_eq!(p.srtt(), Some(Duration::from_millis(30)));
        // Without the seed the first probe would wait INITIAL_PTO (250 ms) + 2 ms.
        assert!(p.sent(at(0), 1000, 1000 + 10 * MSS));
        assert_eq!(p.deadline(MSS), Some(at(62)));
        // The first sample here (4 ms) replaces the seed, then the usual 1/8 gain.
        assert!(!p.observe(at(4), 1000 + 10 * MSS));
        assert_eq!(p.srtt(), Some(Duration::from_millis(4)));
        assert!(p.sent(at(10), 1000 + 10 * MSS, 1000 + 20 * MSS));
        assert!(!p.observe(at(22), 1000 + 20 * MSS));
        assert_eq!(p.srtt(), Some(Duration::from_millis(5)));
        // A later seed does not override a measurement.
        p.seed_srtt(Duration::from_millis(100));
        assert_eq!(p.srtt(), Some(Duration::from_millis(5)));
    }

    #[test]
    fn times_a_segment_and_probes_after_two_round_trips() {
        let mut p = LossProbe::default();
        assert_eq!(p.deadline(MSS), None);
        // 10 segments out at 0 ms, all acknowledged at 4 ms: srtt 4 ms.
        assert!(p.sent(at(0), 1000, 1000 + 10 * MSS));
        assert!(!p.observe(at(4), 1000 + 10 * MSS));
        assert_eq!(p.srtt(), Some(Duration::from_millis(4)));
        assert_eq!(p.in_flight(), 0);
        assert_eq!(p.deadline(MSS), None);
        // More out at 10 ms; nothing comes back: probe at 10 + max(8, 10) + 2 ms.
        assert!(p.sent(at(10), 1000 + 10 * MSS, 1000 + 20 * MSS));
        assert_eq!(p.deadline(MSS), Some(at(22)));
        p.probed(at(22));
        // The second waits twice as long; then smoltcp's own timeout.
        assert_eq!(p.deadline(MSS), Some(at(22 + 24)));
        p.probed(at(46));
        assert_eq!(p.deadline(MSS), None);
        // Progress starts over, and the timing taken across the probe was dropped (Karn).
        assert!(p.observe(at(60), 1000 + 19 * MSS));
        assert_eq!(p.srtt(), Some(Duration::from_millis(4)));
        assert_eq!(p.probes(), 0);
        // One segment left in flight: the delayed-ACK allowance.
        assert_eq!(p.deadline(MSS), Some(at(60 + 10 + 200)));
    }

    #[test]
    fn without_a_round_trip_the_initial_timeout_and_data_after_idle_restarts_the_clock() {
        let mut p = LossProbe::default();
        assert!(p.sent(at(1000), 5, 5 + 3 * MSS));
        assert_eq!(p.deadline(MSS), Some(at(1000 + 250 + 2)));
        assert!(!p.observe(at(1001), 5 + 3 * MSS));
        // Idle for a minute, then a response: the clock runs from the response.
        assert!(p.sent(at(61_000), 5 + 3 * MSS, 5 + 4 * MSS));
        assert_eq!(p.deadline(MSS), Some(at(61_000 + 10 + 200)));
    }

    #[test]
    fn sequence_numbers_wrap() {
        let mut p = LossProbe::default();
        let start = u32::MAX - 100;
        assert!(p.sent(at(0), start, start.wrapping_add(3000)));
        assert_eq!(p.in_flight(), 3000);
        assert!(p.observe(at(5), start.wrapping_add(1000)));
        assert_eq!(p.in_flight(), 2000);
        assert!(!p.observe(at(6), start.wrapping_add(3000)));
        // An old acknowledgement does not move anything back.
        assert!(!p.observe(at(7), start));
        assert_eq!(p.in_flight(), 0);
    }
}
