//! The reliable, ordered message channel: packet numbers, selective ACKs, RTO (RFC 6298),
//! fast retransmit, flow control and NewReno congestion control.
//!
//! Each record carries a packet number from one space per peer connection (it survives
//! rekeys). Packets that carry STREAM, WINDOW or PING frames are *ack-eliciting*: the
//! receiver acknowledges them with ACK ranges, and the sender tracks them until they are
//! acknowledged or declared lost:
//!
//! * **fast retransmit**: a tracked packet is lost once a packet sent [`PACKET_THRESHOLD`]
//!   or more packet numbers later is acknowledged (the analogue of three duplicate ACKs);
//! * **retransmission timeout**: when the RTO timer (RFC 6298: started when an
//!   ack-eliciting packet is sent and none is outstanding, restarted on every ACK that
//!   acknowledges something, doubled on each expiry) fires, every outstanding packet is
//!   declared lost and the congestion window drops to one segment.
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

    /// Whether stream data may be sent now (something to send and congestion window room).
    pub(crate) fn can_send_stream(&self) -> bool {
        self.cc.can_send() && self.send.has_sendable()
    }

    /// Earliest timer.
    pub(crate) fn poll_timeout(&self) -> Option<Instant> {
        let ack = if self.ack_pending {
            self.ack_deadline
        } else {
            None
        };
        match (ack, self.rto_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
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

    /// Records a received packet number; `ack_eliciting` if it carried such frames.
    pub(crate) fn on_packet_received(&mut self, pn: u64, ack_eliciting: bool, now: Instant) {
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
            if self.eliciting_since_ack >= ACK_EVERY || !in_order {
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
        self.detect_lost(now);
        self.rto_backoff = 0;
        self.rto_deadline = if self.sent.is_empty() {
            None
        } else {
            Some(now + self.rto())
        };
    }

    fn detect_lost(&mut self, now: Instant) {
        let Some(largest) = self.largest_acked else {
            return;
        };
        let Some(cutoff) = largest.checked_sub(PACKET_THRESHOLD) else {
            return;
        };
        let lost: Vec<u64> = self.sent.range(..=cutoff).map(|(&pn, _)| pn).collect();
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
        if self.rto_deadline.is_some_and(|d| d <= now) {
            self.rto_deadline = None;
            self.counters.rto_expirations += 1;
            let all = std::mem::take(&mut self.sent);
            for (_, p) in all {
                self.cc.on_discard(p.size);
                self.requeue(p);
            }
            self.cc.on_rto(now);
            self.rto_backoff = self.rto_backoff.saturating_add(1);
        }
    }
}
