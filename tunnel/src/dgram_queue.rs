//! The queue of unreliable datagrams waiting for a peer's next records.
//!
//! A relayed bulk transfer queues tens of thousands of datagrams a second; one heap block
//! each (allocated by the thread that queues, freed when sealed) was a tenth of the tunnel
//! thread's time. Here the datagrams lie end to end in one buffer that is reused: queueing
//! copies the bytes in (the copy the per-datagram block made anyway), taking one off the
//! front moves an offset, and the buffer starts over when the queue empties — which a
//! sender that keeps up does at every turn.

use std::collections::VecDeque;

/// Capacity kept across an emptying; a larger buffer (a burst) is given back then.
const KEEP_BYTES: usize = 1 << 20;

/// Datagrams in order, stored contiguously.
#[derive(Debug, Default)]
pub(crate) struct DatagramQueue {
    bytes: Vec<u8>,
    /// Where the front datagram starts in `bytes`.
    head: usize,
    /// Each queued datagram's length, front first.
    lens: VecDeque<usize>,
}

impl DatagramQueue {
    pub(crate) fn len(&self) -> usize {
        self.lens.len()
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.lens.is_empty()
    }

    pub(crate) fn push_back(&mut self, data: &[u8]) {
        // The bytes before `head` are dead: once they are the larger part of a buffer that
        // must grow, moving the live rest down is cheaper than growing (amortised O(1)).
        if self.bytes.len() + data.len() > self.bytes.capacity() && self.head > self.live() {
            self.bytes.copy_within(self.head.., 0);
            self.bytes.truncate(self.bytes.len() - self.head);
            self.head = 0;
        }
        self.bytes.extend_from_slice(data);
        self.lens.push_back(data.len());
    }

    pub(crate) fn front(&self) -> Option<&[u8]> {
        let len = *self.lens.front()?;
        Some(&self.bytes[self.head..self.head + len])
    }

    pub(crate) fn pop_front(&mut self) {
        let Some(len) = self.lens.pop_front() else {
            return;
        };
        self.head += len;
        if self.lens.is_empty() {
            self.head = 0;
            self.bytes.clear();
            if self.bytes.capacity() > KEEP_BYTES {
                self.bytes = Vec::new();
            }
        }
    }

    /// Bytes of the datagrams still queued.
    fn live(&self) -> usize {
        self.bytes.len() - self.head
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Against a model (a deque of owned datagrams) through pushes and pops in every
    /// interleaving a seeded generator makes, including the compaction and the emptying.
    #[test]
    fn keeps_order_and_bytes_like_a_queue_of_vectors() {
        let mut q = DatagramQueue::default();
        let mut model: VecDeque<Vec<u8>> = VecDeque::new();
        let mut max_live = 0;
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for step in 0..20_000u32 {
            let r = next();
            if r % 5 < 3 {
                let len = (r >> 8) as usize % 1_500;
                let d: Vec<u8> = (0..len).map(|i| (i as u32 ^ step) as u8).collect();
                q.push_back(&d);
                model.push_back(d);
            } else {
                assert_eq!(q.front(), model.front().map(Vec::as_slice), "step {step}");
                q.pop_front();
                model.pop_front();
            }
            assert_eq!(q.len(), model.len());
            assert_eq!(q.is_empty(), model.is_empty());
            // Dead space is reclaimed before the buffer grows: it never holds more than
            // about four times the most that was ever queued at once.
            max_live = max_live.max(q.live());
            assert!(
                q.bytes.capacity() <= 4 * max_live + 4 * 1_500,
                "step {step}: capacity {} for at most {max_live} live bytes",
                q.bytes.capacity()
            );
        }
        while let Some(d) = model.pop_front() {
            assert_eq!(q.front(), Some(d.as_slice()));
            q.pop_front();
        }
        assert_eq!(q.front(), None);
        assert_eq!((q.head, q.bytes.len()), (0, 0));
    }

    #[test]
    fn an_emptied_queue_starts_over_and_gives_back_a_burst() {
        let mut q = DatagramQueue::default();
        q.push_back(b"one");
        q.push_back(b"");
        q.push_back(b"three");
        assert_eq!(q.front(), Some(&b"one"[..]));
        q.pop_front();
        assert_eq!(q.front(), Some(&b""[..]));
        q.pop_front();
        assert_eq!(q.front(), Some(&b"three"[..]));
        q.pop_front();
        assert!(q.is_empty());
        assert_eq!(q.head, 0);
        q.pop_front(); // popping an empty queue does nothing
        for _ in 0..1_000 {
            q.push_back(&[7u8; 1_400]);
        }
        assert!(q.bytes.capacity() > KEEP_BYTES);
        for _ in 0..1_000 {
            q.pop_front();
        }
        assert_eq!(q.bytes.capacity(), 0, "a burst's buffer is kept");
    }
}
