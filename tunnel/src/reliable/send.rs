//! Sending half of the reliable stream: buffered bytes, what to (re)transmit, acks.
//!
//! Messages are framed on the stream as `varint length || bytes`, so a message larger than
//! one datagram is split across STREAM frames and reassembled by the receiver.

use std::collections::VecDeque;
use std::ops::Range;

use super::ranges::RangeSet;
use crate::wire::coding::{Writer, varint_len};

/// The sending stream.
#[derive(Debug)]
pub(crate) struct SendStream {
    /// Bytes from `base` (inclusive) to `end()`.
    buf: VecDeque<u8>,
    /// Lowest offset not yet acknowledged; everything below was acknowledged.
    base: u64,
    /// Lowest offset never sent.
    next: u64,
    /// Acknowledged ranges above `base`.
    acked: RangeSet,
    /// Ranges declared lost and not acknowledged since: to send again.
    lost: RangeSet,
    /// The peer's flow-control limit (exclusive offset).
    max_data: u64,
    /// Most bytes `buf` may hold.
    limit: usize,
}

impl SendStream {
    pub(crate) fn new(initial_max_data: u64, limit: usize) -> Self {
        SendStream {
            buf: VecDeque::new(),
            base: 0,
            next: 0,
            acked: RangeSet::new(),
            lost: RangeSet::new(),
            max_data: initial_max_data,
            limit,
        }
    }

    fn end(&self) -> u64 {
        self.base + self.buf.len() as u64
    }

    /// Bytes buffered (unacknowledged or unsent).
    pub(crate) fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Queues one message; false if it does not fit in the buffer limit.
    pub(crate) fn write_message(&mut self, msg: &[u8]) -> bool {
        let framed = varint_len(msg.len() as u64) + msg.len();
        if self.buf.len() + framed > self.limit {
            return false;
        }
        let mut len = [0u8; 8];
        let mut w = Writer::new(&mut len);
        if w.varint(msg.len() as u64).is_err() {
            return false;
        }
        let n = w.position();
        self.buf.extend(&len[..n]);
        self.buf.extend(msg);
        true
    }

    /// Raises the peer's flow-control limit (it never shrinks).
    pub(crate) fn on_window(&mut self, max_data: u64) {
        self.max_data = self.max_data.max(max_data);
    }

    /// Whether there is something to retransmit or new data the peer's window allows.
    pub(crate) fn has_sendable(&self) -> bool {
        !self.lost.is_empty() || self.next < self.end().min(self.max_data)
    }

    /// Whether there is unacknowledged data (sent or not).
    #[cfg(test)]
    pub(crate) fn has_unacked(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Picks the next chunk of at most `max_len` bytes to send; returns its range and
    /// whether it is a retransmission.
    pub(crate) fn next_chunk(&mut self, max_len: usize) -> Option<(Range<u64>, bool)> {
        if max_len == 0 {
            return None;
        }
        if let Some(r) = self.lost.pop_front(max_len as u64) {
            return Some((r, true));
        }
        let limit = self.end().min(self.max_data);
        if self.next < limit {
            let end = limit.min(self.next + max_len as u64);
            let r = self.next..end;
            self.next = end;
            return Some((r, false));
        }
        None
    }

    /// Copies the bytes of `r` (which must lie in `[base, end)`) into `dst`.
    pub(crate) fn copy(&self, r: Range<u64>, dst: &mut [u8]) {
        let start = (r.start - self.base) as usize;
        let len = (r.end - r.start) as usize;
        let (a, b) = self.buf.as_slices();
        for (i, d) in dst[..len].iter_mut().enumerate() {
            let idx = start + i;
            *d = if idx < a.len() {
                a[idx]
            } else {
                b[idx - a.len()]
            };
        }
    }

    /// The peer acknowledged `r`.
    pub(crate) fn on_ack(&mut self, r: Range<u64>) {
        self.acked.insert(r.clone());
        self.lost.remove(r);
        while let Some(lowest) = self.acked.min() {
            if lowest > self.base {
                break;
            }
            let Some(range) = self.acked.pop_lowest() else {
                break;
            };
            if range.end > self.base {
                let n = (range.end - self.base) as usize;
                self.buf.drain(..n.min(self.buf.len()));
                self.base = range.end;
            }
        }
    }

    /// The packet carrying `r` was lost: send again whatever of it is not acknowledged.
    pub(crate) fn on_lost(&mut self, r: Range<u64>) {
        let r = r.start.max(self.base)..r.end;
        if r.is_empty() {
            return;
        }
        self.lost.insert(r.clone());
        for a in self
            .acked
            .iter()
            .filter(|a| a.start < r.end && a.end > r.start)
            .collect::<Vec<_>>()
        {
            self.lost.remove(a);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(s: &SendStream, r: Range<u64>) -> Vec<u8> {
        let mut v = vec![0; (r.end - r.start) as usize];
        s.copy(r, &mut v);
        v
    }

    #[test]
    fn chunks_acks_and_retransmits() {
        let mut s = SendStream::new(1000, 1 << 20);
        assert!(s.write_message(&[7u8; 50]));
        assert_eq!(s.buffered(), 51);
        let (a, re) = s.next_chunk(30).unwrap();
        assert_eq!((a.clone(), re), (0..30, false));
        assert_eq!(chunk(&s, 0..3), vec![50, 7, 7]);
        let (b, _) = s.next_chunk(100).unwrap();
        assert_eq!(b, 30..51);
        assert!(s.next_chunk(100).is_none());
        s.on_ack(b.clone());
        assert_eq!(s.buffered(), 51);
        s.on_lost(0..51);
        assert_eq!(s.next_chunk(1000), Some((0..30, true)));
        assert!(s.next_chunk(1000).is_none());
        s.on_ack(a);
        assert_eq!(s.buffered(), 0);
        assert!(!s.has_unacked());
    }

    #[test]
    fn flow_control_and_limit() {
        let mut s = SendStream::new(10, 30);
        assert!(s.write_message(&[1u8; 20]));
        assert!(!s.write_message(&[1u8; 20]));
        assert_eq!(s.next_chunk(100), Some((0..10, false)));
        assert!(!s.has_sendable());
        s.on_window(5);
        assert!(!s.has_sendable());
        s.on_window(100);
        assert_eq!(s.next_chunk(100), Some((10..21, false)));
    }

    #[test]
    fn wraps_in_ring_buffer() {
        let mut s = SendStream::new(u64::MAX, 64);
        for round in 0..20u8 {
            assert!(s.write_message(&[round; 30]));
            let (r, _) = s.next_chunk(1000).unwrap();
            let data = chunk(&s, r.clone());
            assert_eq!(data[0], 30);
            assert!(data[1..].iter().all(|&b| b == round));
            s.on_ack(r);
        }
    }
}
