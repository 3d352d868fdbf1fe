//! NewReno congestion control, in the form RFC 9002 section 7 gives it: slow start,
//! congestion avoidance, and one multiplicative decrease per recovery period (a loss of a
//! packet sent before the period began does not reduce the window again).

use crate::time::Instant;

/// Congestion window state.
#[derive(Clone, Debug)]
pub(crate) struct NewReno {
    mss: u64,
    cwnd: u64,
    ssthresh: u64,
    bytes_in_flight: u64,
    /// Bytes acknowledged in congestion avoidance since the last window increase.
    acked_accumulator: u64,
    recovery_start: Option<Instant>,
}

impl NewReno {
    pub(crate) fn new(mss: u64, initial_packets: u64) -> Self {
        NewReno {
            mss,
            cwnd: mss * initial_packets.max(2),
            ssthresh: u64::MAX,
            bytes_in_flight: 0,
            acked_accumulator: 0,
            recovery_start: None,
        }
    }

    fn min_window(&self) -> u64 {
        2 * self.mss
    }

    pub(crate) fn window(&self) -> u64 {
        self.cwnd
    }

    pub(crate) fn bytes_in_flight(&self) -> u64 {
        self.bytes_in_flight
    }

    /// Whether another packet may be sent now.
    pub(crate) fn can_send(&self) -> bool {
        self.bytes_in_flight < self.cwnd
    }

    fn in_recovery(&self, sent: Instant) -> bool {
        self.recovery_start.is_some_and(|start| sent <= start)
    }

    pub(crate) fn on_sent(&mut self, bytes: u64) {
        self.bytes_in_flight += bytes;
    }

    pub(crate) fn on_ack(&mut self, sent: Instant, bytes: u64) {
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(bytes);
        if self.in_recovery(sent) {
            return;
        }
        if self.cwnd < self.ssthresh {
            self.cwnd += bytes;
        } else {
            self.acked_accumulator += bytes;
            if self.acked_accumulator >= self.cwnd {
                self.acked_accumulator -= self.cwnd;
                self.cwnd += self.mss;
            }
        }
    }

    /// A packet sent at `sent` was declared lost (not via RTO).
    pub(crate) fn on_loss(&mut self, sent: Instant, bytes: u64, now: Instant) {
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(bytes);
        if self.in_recovery(sent) {
            return;
        }
        self.recovery_start = Some(now);
        self.ssthresh = (self.cwnd / 2).max(self.min_window());
        self.cwnd = self.ssthresh;
        self.acked_accumulator = 0;
    }

    /// Packets removed from flight by a retransmission timeout (no window reaction here).
    pub(crate) fn on_discard(&mut self, bytes: u64) {
        self.bytes_in_flight = self.bytes_in_flight.saturating_sub(bytes);
    }

    /// Retransmission timeout: RFC 5681 loss window of one segment.
    pub(crate) fn on_rto(&mut self, now: Instant) {
        if self.recovery_start.is_none_or(|s| s < now) {
            self.ssthresh = (self.cwnd / 2).max(self.min_window());
        }
        self.cwnd = self.mss;
        self.acked_accumulator = 0;
        self.recovery_start = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slow_start_avoidance_and_recovery() {
        let t = |ms: u64| Instant::from_millis(ms);
        let mut cc = NewReno::new(1000, 10);
        assert_eq!(cc.window(), 10_000);
        cc.on_sent(10_000);
        assert!(!cc.can_send());
        cc.on_ack(t(1), 1000);
        assert_eq!(cc.window(), 11_000); // slow start: +acked
        cc.on_loss(t(2), 1000, t(10));
        assert_eq!(cc.window(), 5_500);
        // Another loss of a packet sent before recovery began: no second decrease.
        cc.on_loss(t(3), 1000, t(11));
        assert_eq!(cc.window(), 5_500);
        // Acks of packets sent before recovery do not grow the window.
        cc.on_ack(t(4), 1000);
        assert_eq!(cc.window(), 5_500);
        // Congestion avoidance: +1 MSS per window of acked bytes.
        for _ in 0..5 {
            cc.on_ack(t(20), 1000);
        }
        assert_eq!(cc.window(), 5_500);
        cc.on_ack(t(20), 1000);
        assert_eq!(cc.window(), 6_500);
        cc.on_rto(t(30));
        assert_eq!(cc.window(), 1000);
        assert_eq!(cc.bytes_in_flight(), 0);
    }
}
