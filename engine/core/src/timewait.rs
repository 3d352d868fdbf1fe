//! TIME-WAIT without a socket.
//!
//! A connection this node closed first ends in TIME-WAIT. Holding its smoltcp socket (and the
//! buffers behind it) for the whole wait would cost as much as a live connection and keep the
//! 4-tuple from being used again. Instead, once the socket reaches TIME-WAIT the flow is
//! replaced by a [`TimeWait`] record — the 4-tuple, both sequence numbers and the client's
//! last timestamp, in the client's (wire) sequence space — and the socket is dropped.
//!
//! A segment for a 4-tuple in TIME-WAIT is judged as Linux's `tcp_timewait_state_process`
//! does ([`judge`]): a SYN whose sequence number is beyond the old `rcv_nxt`, or whose
//! timestamp is newer than the old one (RFC 6191), opens a new connection at once; a
//! retransmitted FIN (our last ACK was lost) is acknowledged again; a RST ends the wait;
//! anything else is dropped.

use std::collections::{HashMap, VecDeque};

use smoltcp::time::{Duration, Instant};

use crate::app::AppKind;
use crate::flow::Remote;
use crate::packet::{FlowKey, Inbound};
use crate::translate::seq_gt;

/// How long a record stays (Linux's `TCP_TIMEWAIT_LEN`).
pub const TIME_WAIT: Duration = Duration::from_secs(60);

/// What is left of a connection in TIME-WAIT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeWait {
    /// The connection's id while it lived (for `ctl conns --all`).
    pub id: u64,
    /// Its endpoints.
    pub key: FlowKey,
    /// The app that served it.
    pub app: AppKind,
    /// When it was accepted (or restored here).
    pub created: Instant,
    /// The next sequence number expected from the client: after its FIN.
    pub rcv_nxt: u32,
    /// Our next sequence number: after our FIN.
    pub snd_nxt: u32,
    /// The client's last TSval, when the connection used timestamps.
    pub ts_recent: Option<u32>,
    /// Added to this node's timestamp clock for the TSval the client sees.
    pub ts_off: u32,
    /// The window our ACKs advertise (raw field).
    pub window: u16,
    /// Where the client's packets entered, when not here: our ACKs go back there.
    pub ingress: Option<Remote>,
    /// When the record goes.
    pub deadline: Instant,
}

/// What a segment for a 4-tuple in TIME-WAIT gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// A SYN that may open a new connection: the record goes, the SYN is served.
    NewConnection,
    /// Acknowledge (`snd_nxt`, `rcv_nxt`) again: a retransmitted FIN, or a SYN that may be
    /// an old duplicate (the client answers an unexpected ACK with a RST and tries again).
    Ack,
    /// A RST: the wait ends.
    Remove,
    /// Anything else: ignored.
    Drop,
}

/// Judges `segment` against `tw` (see the module docs).
pub fn judge(tw: &TimeWait, segment: &Inbound) -> Verdict {
    let f = segment.flags;
    if f.rst {
        return Verdict::Remove;
    }
    if f.syn && !f.ack {
        let (older, newer) = match (tw.ts_recent, segment.tsval) {
            (Some(recent), Some(tsval)) => {
                let d = tsval.wrapping_sub(recent) as i32;
                (d < 0, d > 0)
            }
            _ => (false, false),
        };
        // An older timestamp is an old duplicate (PAWS), whatever its sequence number.
        if !older && (seq_gt(segment.seq, tw.rcv_nxt) || newer) {
            return Verdict::NewConnection;
        }
        return Verdict::Ack;
    }
    if f.fin || segment.payload_len > 0 {
        return Verdict::Ack;
    }
    Verdict::Drop
}

/// The records of one stack: by 4-tuple, expiring in order of insertion (every record
/// lives [`TIME_WAIT`]), at most `cap` (the oldest goes first, as Linux's
/// `tcp_max_tw_buckets`).
#[derive(Debug)]
pub struct TimeWaitTable {
    records: HashMap<FlowKey, TimeWait>,
    /// `(deadline, key)` in insertion order; entries whose record went early are skipped.
    order: VecDeque<(Instant, FlowKey)>,
    cap: usize,
}

impl TimeWaitTable {
    /// An empty table holding at most `cap` records.
    pub fn new(cap: usize) -> Self {
        Self {
            records: HashMap::new(),
            order: VecDeque::new(),
            cap: cap.max(1),
        }
    }

    /// Adds `tw`, replacing a record of the same 4-tuple. Returns true if the table was full
    /// and its oldest record was dropped to make room.
    pub fn insert(&mut self, tw: TimeWait) -> bool {
        let mut evicted = false;
        if !self.records.contains_key(&tw.key) && self.records.len() >= self.cap {
            while let Some((deadline, key)) = self.order.pop_front() {
                if self
                    .records
                    .get(&key)
                    .is_some_and(|r| r.deadline == deadline)
                {
                    self.records.remove(&key);
                    evicted = true;
                    break;
                }
            }
        }
        self.order.push_back((tw.deadline, tw.key));
        self.records.insert(tw.key, tw);
        self.compact();
        evicted
    }

    /// The record of `key`.
    pub fn get(&self, key: &FlowKey) -> Option<&TimeWait> {
        self.records.get(key)
    }

    /// Removes the record of `key`.
    pub fn remove(&mut self, key: &FlowKey) -> Option<TimeWait> {
        let r = self.records.remove(key);
        self.compact();
        r
    }

    /// Drops the records whose deadline passed; returns how many.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(&(deadline, key)) = self.order.front() {
            if deadline > now {
                break;
            }
            self.order.pop_front();
            if self
                .records
                .get(&key)
                .is_some_and(|r| r.deadline == deadline)
            {
                self.records.remove(&key);
                n += 1;
            }
        }
        n
    }

    /// Records held.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// True when no record is held.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Every record, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = &TimeWait> {
        self.records.values()
    }

    /// Keeps the order queue from growing far beyond the records when many go early.
    fn compact(&mut self) {
        if self.order.len() > 2 * self.records.len() + 64 {
            let records = &self.records;
            self.order
                .retain(|(d, k)| records.get(k).is_some_and(|r| r.deadline == *d));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::TcpFlags;
    use std::net::{Ipv4Addr, SocketAddrV4};

    fn key(port: u16) -> FlowKey {
        FlowKey {
            client: SocketAddrV4::new(Ipv4Addr::new(198, 18, 1, 2), port),
            service: SocketAddrV4::new(Ipv4Addr::new(198, 19, 255, 1), 80),
        }
    }

    fn tw(port: u16, deadline_s: u64, ts: Option<u32>) -> TimeWait {
        TimeWait {
            id: u64::from(port),
            key: key(port),
            app: AppKind::Echo,
            created: Instant::ZERO,
            rcv_nxt: 1_000,
            snd_nxt: 5_000,
            ts_recent: ts,
            ts_off: 0,
            window: 512,
            ingress: None,
            deadline: Instant::from_secs(deadline_s as i64),
        }
    }

    fn seg(flags: TcpFlags, seq: u32, tsval: Option<u32>, payload_len: usize) -> Inbound {
        Inbound {
            key: key(1),
            flags,
            ip_len: 40,
            seq,
            window: 100,
            tsval,
            payload_len,
        }
    }

    const SYN: TcpFlags = TcpFlags {
        syn: true,
        ack: false,
        fin: false,
        rst: false,
    };

    #[test]
    fn a_syn_beyond_rcv_nxt_opens_a_new_connection() {
        let t = tw(1, 60, None);
        assert_eq!(judge(&t, &seg(SYN, 1_001, None, 0)), Verdict::NewConnection);
        // Across the wrap of the sequence space too.
        let mut wrapped = t;
        wrapped.rcv_nxt = u32::MAX - 10;
        assert_eq!(
            judge(&wrapped, &seg(SYN, 5, None, 0)),
            Verdict::NewConnection
        );
        // At or below rcv_nxt without timestamps: maybe an old duplicate.
        assert_eq!(judge(&t, &seg(SYN, 1_000, None, 0)), Verdict::Ack);
        assert_eq!(judge(&t, &seg(SYN, 10, None, 0)), Verdict::Ack);
    }

    #[test]
    fn a_syn_with_a_newer_timestamp_opens_a_new_connection_whatever_its_sequence() {
        let t = tw(1, 60, Some(7_000));
        assert_eq!(
            judge(&t, &seg(SYN, 10, Some(7_001), 0)),
            Verdict::NewConnection
        );
        // An older timestamp is an old duplicate (PAWS), even beyond rcv_nxt.
        assert_eq!(judge(&t, &seg(SYN, 2_000, Some(6_999), 0)), Verdict::Ack);
        // The same timestamp: the sequence number decides.
        assert_eq!(
            judge(&t, &seg(SYN, 2_000, Some(7_000), 0)),
            Verdict::NewConnection
        );
        assert_eq!(judge(&t, &seg(SYN, 10, Some(7_000), 0)), Verdict::Ack);
        // A SYN without timestamps: the sequence number decides.
        assert_eq!(judge(&t, &seg(SYN, 2_000, None, 0)), Verdict::NewConnection);
    }

    #[test]
    fn fin_is_acknowledged_again_rst_ends_the_wait_and_the_rest_is_dropped() {
        let t = tw(1, 60, None);
        let fin = TcpFlags {
            fin: true,
            ack: true,
            ..Default::default()
        };
        let ack = TcpFlags {
            ack: true,
            ..Default::default()
        };
        let rst = TcpFlags {
            rst: true,
            ..Default::default()
        };
        assert_eq!(judge(&t, &seg(fin, 999, None, 0)), Verdict::Ack);
        assert_eq!(judge(&t, &seg(rst, 1_000, None, 0)), Verdict::Remove);
        assert_eq!(judge(&t, &seg(ack, 1_000, None, 0)), Verdict::Drop);
        assert_eq!(judge(&t, &seg(ack, 1_000, None, 10)), Verdict::Ack);
        // A SYN-ACK is not a SYN.
        let syn_ack = TcpFlags {
            syn: true,
            ack: true,
            ..Default::default()
        };
        assert_eq!(judge(&t, &seg(syn_ack, 2_000, None, 0)), Verdict::Drop);
    }

    #[test]
    fn records_expire_in_order_and_the_oldest_goes_when_full() {
        let mut table = TimeWaitTable::new(3);
        assert!(!table.insert(tw(1, 10, None)));
        assert!(!table.insert(tw(2, 20, None)));
        assert!(!table.insert(tw(3, 30, None)));
        assert!(table.insert(tw(4, 40, None)), "full: the oldest goes");
        assert!(table.get(&key(1)).is_none());
        assert_eq!(table.len(), 3);
        // Replacing a record does not evict another.
        assert!(!table.insert(tw(2, 50, None)));
        assert_eq!(table.len(), 3);
        assert_eq!(table.expire(Instant::from_secs(29)), 0, "2 was renewed");
        assert_eq!(table.expire(Instant::from_secs(30)), 1);
        assert!(table.get(&key(3)).is_none());
        assert!(table.remove(&key(4)).is_some());
        assert_eq!(table.expire(Instant::from_secs(45)), 0, "4 went early");
        assert_eq!(table.expire(Instant::from_secs(50)), 1);
        assert!(table.is_empty());
    }

    #[test]
    fn the_order_queue_stays_bounded_when_records_go_early() {
        let mut table = TimeWaitTable::new(1_000);
        for i in 0..100_000u32 {
            let port = (i % 50_000) as u16 + 1;
            table.insert(tw(port, 60 + u64::from(i), None));
            table.remove(&key(port));
        }
        assert!(table.is_empty());
        assert!(table.order.len() <= 64 + 2, "{}", table.order.len());
    }
}
