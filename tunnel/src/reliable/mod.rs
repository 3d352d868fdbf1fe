//! The reliable, ordered message channel: packet numbers, selective ACKs, RTO (RFC 6298),
//! fast retransmit, flow control and NewReno congestion control.
//!
//! Each record carries a packet number from one space per peer connection (it survives
//! rekeys). Packets that carry STREAM, WINDOW or PING frames are *ack-eliciting*: the
//! receiver acknowledges them with ACK ranges, and the sender tracks them until they are
//! acknowledged or declared lost:
//!
//! * **fast retransmit** (RFC 9002 section 6.1): once a later packet is acknowledged, a
//!   tracked packet is lost if it is [`PACKET_THRESHOLD`] or more packet numbers older (the
//!   analogue of three duplicate ACKs), or was sent more than 9/8 RTT before now (the time
//!   threshold, armed as a timer when neither holds yet);
//! * **retransmission timeout**: the RTO timer (RFC 6298's formula from RTT samples; started
//!   when an ack-eliciting packet is sent and none is outstanding, restarted on every ACK
//!   that acknowledges something, doubled on each expiry) first sends probes: two
//!   ack-eliciting packets allowed beyond the congestion window, new data or a PING, whose
//!   acknowledgements reveal what was lost (RFC 9002's probe timeout; this is what repairs a
//!   lost tail without waiting for a collapse). After [`PERSISTENT_TIMEOUTS`] expiries in a
//!   row, every outstanding packet is declared lost and the window drops to one segment;
//! * **immediate ACKs**: a packet that carries a PING is acknowledged at once. The sender
//!   adds one when the packet is its last for now (the window is full or nothing is left to
//!   send) or a probe, so a window-limited sender never waits out the delayed-ACK timer.
//!
//! Lost packets are never resent as such: their stream ranges (minus what was acknowledged
//! meanwhile) are queued and sent again in new packets with new numbers, as in QUIC, so RTT
//! samples are never ambiguous (no need for Karn's algorithm). ACK-only, DATAGRAM and
//! HEARTBEAT packets are not tracked and not congestion-controlled (forwarded IP packets
//! carry their own end-to-end congestion control).

pub(crate) mod congestion;
pub(crate) mod ranges;
pub(crate) mod recv;
pub(crate) mod rtt;
pub(crate) mod send;

use std::collections::BTreeMap;
use std::ops::Range;
use std::time::Duration;

use congestion::NewReno;
use ranges::RangeSet;
use recv::{RecvStream, StreamRefused};
use rtt::RttEstimator;
use send::SendStream;

use crate::time::{Instant, duration_micros};
use crate::wire::AckFrame;

/// Stream window every connection starts with, before any WINDOW frame.
pub(crate) const INITIAL_STREAM_WINDOW: u64 = 64 * 1024;
/// Packet-number distance after which an unacknowledged packet counts as lost.
pub(crate) const PACKET_THRESHOLD: u64 = 3;
/// Consecutive retransmission timeouts (probes unanswered) after which every outstanding
/// packet counts as lost and the congestion window collapses.
pub(crate) const PERSISTENT_TIMEOUTS: u32 = 3;
/// Ack-eliciting probe packets sent on each retransmission timeout.
const PROBES_PER_TIMEOUT: u8 = 2;
/// Received packet-number ranges remembered for ACKs (older ones are forgotten).
const MAX_TRACKED_RANGES: usize = 64;
/// ACK-eliciting packets received before an ACK is sent at once.
const ACK_EVERY: u32 = 2;

/// Parameters of the channel (from [`Config`](crate::Config)).
#[derive(Clone, Debug)]
pub(crate) struct ReliableParams {
    pub(crate) initial_rto: Duration,
    pub(crate) min_rto: Duration,
    pub(crate) max_rto: Duration,
    pub(crate) max_ack_delay: Duration,
    pub(crate) mss: u64,
    pub(crate) initial_window_packets: u64,
    pub(crate) stream_window: u64,
    pub(crate) send_buffer_limit: usize,
    pub(crate) max_message_size: usize,
}

/// A tracked (ack-eliciting) packet.
#[derive(Debug)]
struct SentPacket {
    time: Instant,
    size: u64,
    stream: Vec<Range<u64>>,
    window: bool,
}

/// Counters the peer folds into [`Stats`](crate::Stats).
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Counters {
    /// Ack-eliciting packets sent (the ones tracked for loss).
    pub(crate) packets_sent: u64,
    pub(crate) packets_lost: u64,
    pub(crate) rto_expirations: u64,
    pub(crate) stream_bytes_retransmitted: u64,
    pub(crate) stream_frames_refused: u64,
}

/// One peer connection's reliable channel.
#[derive(Debug)]
pub(crate) struct Reliable {
    next_pn: u64,
    sent: BTreeMap<u64, SentPacket>,
    largest_acked: Option<u64>,
    rtt: RttEstimator,
    cc: NewReno,
    rto_deadline: Option<Instant>,
    rto_backoff: u32,
    /// When the oldest packet not yet lost by the time threshold becomes lost.
    loss_deadline: Option<Instant>,
    /// Probe packets still owed after a retransmission timeout.
    probes: u8,
    pub(crate) send: SendStream,
    recv: RecvStream,
    /// Packet numbers received (for ACK ranges).
    received: RangeSet,
    largest_received: Option<(u64, Instant)>,
    /// Something arrived since the last ACK we sent.
    ack_pending: bool,
    eliciting_since_ack: u32,
    ack_deadline: Option<Instant>,
    ack_now: bool,
    /// A WINDOW frame must be (re)sent.
    window_pending: bool,
    /// How long we may hold an ACK for an ack-eliciting packet (both sides share it).
    max_ack_delay: Duration,
    pub(crate) counters: Counters,
}

impl Reliable {
    pub(crate) fn new(p: &ReliableParams) -> Reliable {
        Reliable {
            next_pn: 0,
            sent: BTreeMap::new(),
            largest_acked: None,
            rtt: RttEstimator::new(p.initial_rto, p.min_rto, p.max_rto, p.max_ack_delay),
            cc: NewReno::new(p.mss, p.initial_window_packets),
            rto_deadline: None,
            rto_backoff: 0,
            loss_deadline: None,
            probes: 0,
            send: SendStream::new(INITIAL_STREAM_WINDOW, p.send_buffer_limit),
            recv: RecvStream::new(INITIAL_STREAM_WINDOW, p.stream_window, p.max_message_size),
            received: RangeSet::new(),
            largest_received: None,
            ack_pending: false,
            eliciting_since_ack: 0,
            ack_deadline: None,
            ack_now: false,
            window_pending: p.stream_window > INITIAL_STREAM_WINDOW,
            max_ack_delay: p.max_ack_delay,
            counters: Counters::default(),
        }
    }

    // ---- getters ----

    pub(crate) fn next_pn(&self) -> u64 {
        self.next_pn
    }

    pub(crate) fn srtt(&self) -> Option<Duration> {
        self.rtt.srtt()
    }

    pub(crate) fn rto(&self) -> Duration {
        self.rtt.backed_off_rto(self.rto_backoff)
    }

    pub(crate) fn cwnd(&self) -> u64 {
        self.cc.window()
    }

    pub(crate) fn bytes_in_flight(&self) -> u64 {
        self.cc.bytes_in_flight()
    }

    pub(crate) fn skipped_messages(&self) -> u64 {
        self.recv.skipped
    }

    /// Whether an ACK must go out now (not just piggyback).
    pub(crate) fn ack_due(&self, now: Instant) -> bool {
        self.ack_pending && (self.ack_now || self.ack_deadline.is_some_and(|d| d <= now))
    }

    /// Whether a WINDOW frame must be sent.
    pub(crate) fn window_due(&self) -> bool {
        self.window_pending || self.recv.window_update().is_some()
    }

    /// Whether stream data may be sent now (something to send, and congestion window room
    /// or a probe owed).
    pub(crate) fn can_send_stream(&self) -> bool {
        (self.cc.can_send() || self.probes > 0) && self.send.has_sendable()
    }

    /// Whether probe packets are owed after a retransmission timeout.
    pub(crate) fn probe_due(&self) -> bool {
        self.probes > 0
    }

    /// Whether a packet about to be sent, `size` bytes and carrying stream data, should ask
    /// for an immediate ACK: it is a probe, or the last packet the sender can send before an
    /// ACK arrives (window full after it, or nothing more to send).
    pub(crate) fn wants_immediate_ack(&self, size: u64) -> bool {
        self.probes > 0
            || !self.send.has_sendable()
            || self.cc.bytes_in_flight() + size >= self.cc.window()
    }

    /// Earliest timer.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let ack = if self.ack_pending {
            self.ack_deadline
        } else {
            None
        };
        [ack, self.rto_deadline, self.loss_deadline]
            .into_iter()
            .flatten()
            .min()
    }

    // ---- sending ----

    /// The ACK frame to piggyback or send, if anything arrived since the last one.
    pub(crate) fn ack_frame(&self, now: Instant) -> Option<AckFrame> {
        if !self.ack_pending {
            return None;
        }
        let (_, at) = self.largest_received?;
        let delay = duration_micros(now - at);
        AckFrame::new(
            delay,
            self.received.iter().rev().map(|r| r.start..=r.end - 1),
        )
    }

    pub(crate) fn on_ack_sent(&mut self) {
        self.ack_pending = false;
        self.ack_now = false;
        self.eliciting_since_ack = 0;
        self.ack_deadline = None;
    }

    /// The limit to put in a WINDOW frame.
    pub(crate) fn window_limit(&self) -> u64 {
        self.recv.current_limit()
    }

    pub(crate) fn next_chunk(&mut self, max_len: usize) -> Option<(Range<u64>, bool)> {
        let chunk = self.send.next_chunk(max_len)?;
        if chunk.1 {
            self.counters.stream_bytes_retransmitted += chunk.0.end - chunk.0.start;
        }
        Some(chunk)
    }

    /// Records a sent packet (every record consumes a packet number).
    pub(crate) fn on_packet_sent(
        &mut self,
        now: Instant,
        size: u64,
        stream: Vec<Range<u64>>,
        window: Option<u64>,
        ack_eliciting: bool,
    ) {
        let pn = self.next_pn;
        self.next_pn += 1;
        if let Some(limit) = window {
            self.recv.on_window_sent(limit);
            self.window_pending = false;
        }
        if !ack_eliciting {
            return;
        }
        self.counters.packets_sent += 1;
        self.probes = self.probes.saturating_sub(1);
        self.cc.on_sent(size);
        self.sent.insert(
            pn,
            SentPacket {
                time: now,
                size,
                stream,
                window: window.is_some(),
            },
        );
        if self.rto_deadline.is_none() {
            self.rto_deadline = Some(now + self.rto());
        }
    }

    // ---- receiving ----

    /// Records a received packet number; `ack_eliciting` if it carried such frames,
    /// `immediate` if it asked for an ACK at once (a PING).
    pub(crate) fn on_packet_received(
        &mut self,
        pn: u64,
        ack_eliciting: bool,
        immediate: bool,
        now: Instant,
    ) {
        let in_order = self.largest_received.is_none_or(|(l, _)| pn == l + 1);
        if !self.received.insert(pn..pn + 1) {
            return;
        }
        while self.received.range_count() > MAX_TRACKED_RANGES {
            self.received.pop_lowest();
        }
        if self.largest_received.is_none_or(|(l, _)| pn > l) {
            self.largest_received = Some((pn, now));
        }
        self.ack_pending = true;
        if ack_eliciting {
            self.eliciting_since_ack += 1;
            if self.ack_deadline.is_none() {
                self.ack_deadline = Some(now + self.max_ack_delay);
            }
            if self.eliciting_since_ack >= ACK_EVERY || !in_order || immediate {
                self.ack_now = true;
            }
        }
    }

    /// Handles a STREAM frame.
    pub(crate) fn on_stream(
        &mut self,
        offset: u64,
        data: &[u8],
        out: &mut Vec<Vec<u8>>,
    ) -> Result<(), StreamRefused> {
        let r = self.recv.on_stream(offset, data, out);
        if r.is_err() {
            self.counters.stream_frames_refused += 1;
        }
        r
    }

    /// Handles an ACK frame.
    pub(crate) fn on_ack(&mut self, ack: &AckFrame, now: Instant) {
        let mut newly: Vec<(u64, SentPacket)> = Vec::new();
        for r in ack.ranges() {
            let pns: Vec<u64> = self.sent.range(r).map(|(&pn, _)| pn).collect();
            for pn in pns {
                if let Some(p) = self.sent.remove(&pn) {
                    newly.push((pn, p));
                }
            }
        }
        if newly.is_empty() {
            return;
        }
        let largest = ack.largest();
        self.largest_acked = Some(self.largest_acked.map_or(largest, |l| l.max(largest)));
        if let Some((_, p)) = newly.iter().find(|(pn, _)| *pn == largest) {
            self.rtt
                .on_sample(now - p.time, Duration::from_micros(ack.delay_micros()));
        }
        for (_, p) in newly {
            self.cc.on_ack(p.time, p.size);
            for r in p.stream {
                self.send.on_ack(r);
            }
        }
        self.rto_backoff = 0;
        self.probes = 0;
        self.detect_lost(now);
        self.rearm_rto(now);
    }

    fn rearm_rto(&mut self, now: Instant) {
        self.rto_deadline = if self.sent.is_empty() {
            None
        } else {
            Some(now + self.rto())
        };
    }

    /// Declares lost every packet older than the largest acknowledged one by the packet or
    /// the time threshold, and arms the loss timer for the first that is neither yet.
    fn detect_lost(&mut self, now: Instant) {
        self.loss_deadline = None;
        let Some(largest) = self.largest_acked else {
            return;
        };
        let loss_delay = self.rtt.loss_delay();
        let mut lost = Vec::new();
        // Packet numbers grow with send time, so the first packet lost by neither
        // threshold ends the scan: every later one is younger and closer to `largest`.
        for (&pn, p) in self.sent.range(..largest) {
            if pn + PACKET_THRESHOLD <= largest || p.time + loss_delay <= now {
                lost.push(pn);
            } else {
                self.loss_deadline = Some(p.time + loss_delay);
                break;
            }
        }
        for pn in lost {
            if let Some(p) = self.sent.remove(&pn) {
                self.cc.on_loss(p.time, p.size, now);
                self.requeue(p);
            }
        }
    }

    fn requeue(&mut self, p: SentPacket) {
        self.counters.packets_lost += 1;
        for r in p.stream {
            self.send.on_lost(r);
        }
        if p.window {
            self.window_pending = true;
        }
    }

    /// Handles timer expiry.
    pub(crate) fn on_timeout(&mut self, now: Instant) {
        if self.ack_deadline.is_some_and(|d| d <= now) {
            self.ack_deadline = None;
            self.ack_now = true;
        }
        if self.loss_deadline.is_some_and(|d| d <= now) {
            self.detect_lost(now);
            if self.sent.is_empty() {
                self.rto_deadline = None;
            }
        }
        if self.rto_deadline.is_some_and(|d| d <= now) {
            self.counters.rto_expirations += 1;
            self.rto_backoff = self.rto_backoff.saturating_add(1);
            if self.rto_backoff >= PERSISTENT_TIMEOUTS {
                // Persistent congestion: probes went unanswered too.
                let all = std::mem::take(&mut self.sent);
                for (_, p) in all {
                    self.cc.on_discard(p.size);
                    self.requeue(p);
                }
                self.cc.on_rto(now);
                self.probes = 0;
                self.loss_deadline = None;
            } else {
                self.probes = PROBES_PER_TIMEOUT;
            }
            self.rearm_rto(now);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::ops::RangeInclusive;

    use super::*;

    const MSS: u64 = 1000;

    fn params() -> ReliableParams {
        ReliableParams {
            initial_rto: Duration::from_secs(1),
            min_rto: Duration::from_millis(10),
            max_rto: Duration::from_secs(60),
            max_ack_delay: Duration::from_millis(10),
            mss: MSS,
            initial_window_packets: 4,
            stream_window: INITIAL_STREAM_WINDOW,
            send_buffer_limit: 1 << 20,
            max_message_size: 1 << 20,
        }
    }

    fn ms(v: u64) -> Instant {
        Instant::from_millis(v)
    }

    /// Sends one ack-eliciting packet carrying the next stream chunk; returns its number.
    fn send(r: &mut Reliable, now: Instant) -> u64 {
        let pn = r.next_pn();
        let chunk = r.next_chunk(MSS as usize - 20).map(|(c, _)| c);
        r.on_packet_sent(now, MSS, chunk.into_iter().collect(), None, true);
        pn
    }

    fn ack(r: &mut Reliable, ranges: &[RangeInclusive<u64>], now: Instant) {
        let f = AckFrame::new(0, ranges.iter().rev().cloned()).unwrap();
        r.on_ack(&f, now);
    }

    #[test]
    fn a_packet_older_than_the_time_threshold_is_lost_without_three_later_acks() {
        let mut r = Reliable::new(&params());
        assert!(r.send.write_message(&[7; 4000]));
        for t in 0..3 {
            send(&mut r, ms(t));
        }
        // Packet 1 acknowledged at 10 ms: RTT sample 9 ms. Packet 0 is only one number
        // older, so the packet threshold does not hold; the time threshold (9/8 RTT) arms.
        ack(&mut r, &[1..=1], ms(10));
        assert_eq!(r.counters.packets_lost, 0);
        let deadline = r.poll_timeout().unwrap();
        assert!(deadline < ms(11), "loss timer at {deadline:?}");
        r.on_timeout(deadline);
        assert_eq!(r.counters.packets_lost, 1);
        assert_eq!(r.counters.rto_expirations, 0);
        // Its bytes go out again in a new packet.
        assert!(r.send.has_sendable());
    }

    #[test]
    fn a_timeout_sends_probes_first_and_collapses_the_window_only_when_they_go_unanswered() {
        let mut r = Reliable::new(&params());
        assert!(r.send.write_message(&[7; 20_000]));
        let first = send(&mut r, ms(0));
        ack(&mut r, &[first..=first], ms(5));
        while r.can_send_stream() {
            send(&mut r, ms(6));
        }
        let window = r.cwnd();
        assert!(window > MSS);
        assert!(!r.probe_due());

        // The whole flight is lost: the timer fires and owes two probes beyond the window.
        let t1 = r.poll_timeout().unwrap();
        r.on_timeout(t1);
        assert_eq!(r.counters.rto_expirations, 1);
        assert_eq!(r.counters.packets_lost, 0, "nothing declared lost yet");
        assert_eq!(r.cwnd(), window, "no collapse on the first timeout");
        assert!(r.can_send_stream() && r.probe_due());
        assert!(
            r.wants_immediate_ack(MSS),
            "a probe asks for an immediate ACK"
        );
        send(&mut r, t1);
        send(&mut r, t1);
        assert!(!r.probe_due() && !r.can_send_stream());

        // Probes unanswered twice more: persistent congestion.
        let t2 = r.poll_timeout().unwrap();
        assert!(t2 > t1);
        r.on_timeout(t2);
        assert_eq!(r.cwnd(), window, "second timeout: probes again");
        send(&mut r, t2);
        let t3 = r.poll_timeout().unwrap();
        assert!(t3 - t2 > t2 - t1, "the timer backs off");
        r.on_timeout(t3);
        assert_eq!(
            r.cwnd(),
            MSS,
            "window collapses after {PERSISTENT_TIMEOUTS} timeouts"
        );
        assert_eq!(r.bytes_in_flight(), 0);
        assert!(r.counters.packets_lost > 0);
    }

    #[test]
    fn an_answered_probe_reveals_the_lost_tail() {
        let mut r = Reliable::new(&params());
        assert!(r.send.write_message(&[7; 1500]));
        let a = send(&mut r, ms(0));
        send(&mut r, ms(0)); // lost
        // Everything sent; b is lost. a is acknowledged; b's timer runs out.
        ack(&mut r, &[a..=a], ms(2));
        assert!(!r.send.has_sendable());
        let t = r.poll_timeout().unwrap();
        r.on_timeout(t);
        // Nothing new to send: the probe is a PING-only packet.
        assert!(r.probe_due() && !r.can_send_stream());
        r.on_packet_sent(t, 30, Vec::new(), None, true);
        let p = r.next_pn() - 1;
        ack(&mut r, &[a..=a, p..=p], t + Duration::from_millis(2));
        // b was sent long before the probe's ACK: lost by the time threshold, resent.
        assert_eq!(r.counters.packets_lost, 1);
        assert!(r.send.has_sendable());
    }

    #[test]
    fn a_ping_is_acknowledged_at_once_other_packets_may_wait() {
        let mut r = Reliable::new(&params());
        r.on_packet_received(0, true, false, ms(0));
        assert!(!r.ack_due(ms(0)), "one in-order packet: the ACK may wait");
        assert!(r.ack_due(ms(10)), "until max_ack_delay");
        r.on_ack_sent();
        r.on_packet_received(1, true, true, ms(11));
        assert!(r.ack_due(ms(11)), "a PING is acknowledged immediately");
    }

    #[test]
    fn the_last_packet_the_window_allows_asks_for_an_immediate_ack() {
        let mut r = Reliable::new(&params());
        assert!(r.send.write_message(&[7; 20_000]));
        assert!(!r.wants_immediate_ack(MSS), "window open, more to send");
        send(&mut r, ms(0));
        send(&mut r, ms(0));
        assert!(
            r.wants_immediate_ack(2 * MSS),
            "the window is full after this one"
        );
        let mut r = Reliable::new(&params());
        assert!(r.send.write_message(&[7; 500]));
        send(&mut r, ms(0));
        assert!(r.wants_immediate_ack(MSS), "nothing left to send");
    }
}
