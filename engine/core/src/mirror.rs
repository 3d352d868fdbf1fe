//! The send mirror: the last bytes an app wrote to its socket, for smoltcp cannot give them back.
//!
//! A move or a compaction needs the bytes smoltcp holds unacknowledged or unsent: the last
//! `send_queue()` bytes the app wrote. The mirror keeps the last `capacity` bytes written
//! (the socket's send buffer size) as a log of extents. Bytes the app marked as the
//! [counting stream](crate::app::counting) ([`App::poll_send_marked`]) are kept as their stream
//! offset and regenerated when read; every other byte is copied into a ring. So a `source`
//! connection, or an `http` one sending `/bytes/N` bodies, costs no copy per byte and almost
//! no memory here.
//!
//! Memory stays bounded whatever the app writes: extents older than the last `capacity` bytes
//! are dropped; the log holds at most [`MAX_EXTENTS`] extents, and while it is full, marked
//! bytes are copied like any others (many tiny responses in a row); the ring holds at most
//! `capacity` bytes, taken as they are written.
//!
//! [`App::poll_send_marked`]: crate::app::App::poll_send_marked

use std::collections::VecDeque;

use crate::app::counting;

/// Most extents a mirror logs.
pub const MAX_EXTENTS: usize = 32;

/// Bytes the ring holds in a small block before it takes its whole capacity.
const RING_SMALL: usize = 4096;

/// Bytes of each end of a marked run checked against the counting stream before the run is
/// logged as such (a cheap guard against an app marking the wrong offset).
const SPOT_CHECK: usize = 16;

/// The bytes written to a socket's send buffer, as far back as its capacity.
///
/// [`copy_last(n)`](Self::copy_last) gives the last `n` bytes written, for every `n` up to the
/// capacity and up to what was written since the mirror was made or
/// [emptied](Self::emptied).
#[derive(Debug, Default)]
pub struct SendMirror {
    /// In stream order, each running to the next one's start, the last to `total`. Together
    /// they cover every byte held: from the first one's start (or `total - capacity`, if
    /// later) to `total`. Only the first may start before `total - capacity`. At most
    /// [`MAX_EXTENTS`]; empty when nothing is held.
    extents: VecDeque<Extent>,
    /// The bytes of the literal extents.
    literal: Ring,
    /// Bytes held at most: the socket's send buffer size.
    capacity: usize,
    /// Bytes written since the connection opened.
    total: u64,
}

/// Bytes written in a row that are held the same way.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Extent {
    /// Stream position (bytes written before it) of its first byte.
    start: u64,
    /// Where its bytes are.
    source: Source,
}

/// Where an extent's bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Source {
    /// The counting stream, from this offset on.
    Counting(u64),
    /// In the ring, from this ring position on.
    Literal(u64),
}

impl SendMirror {
    /// A mirror for a send buffer of `capacity` bytes.
    pub fn new(capacity: usize) -> Self {
        Self {
            extents: VecDeque::new(),
            literal: Ring::new(capacity),
            capacity,
            total: 0,
        }
    }

    /// The same mirror with its bytes dropped and its memory freed, still counting: for a
    /// connection with nothing unacknowledged (see `Stack`'s compaction). Memory is taken
    /// again by the next write.
    pub fn emptied(&self) -> Self {
        self.emptied_to(self.capacity)
    }

    /// Like [`emptied`](Self::emptied), for a send buffer of `capacity` bytes.
    pub fn emptied_to(&self, capacity: usize) -> Self {
        Self {
            total: self.total,
            ..Self::new(capacity)
        }
    }

    /// Bytes written since the connection opened.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Records `data` as written, copied.
    pub fn push(&mut self, data: &[u8]) {
        if data.is_empty() {
            return;
        }
        let start = self.total;
        self.total += data.len() as u64;
        if self.capacity == 0 {
            return;
        }
        // Literal bytes follow each other in the ring, so a literal extent just grows.
        if !matches!(
            self.extents.back(),
            Some(Extent {
                source: Source::Literal(_),
                ..
            })
        ) {
            // Room is always left for it: see `push_counting`.
            self.extents.push_back(Extent {
                start,
                source: Source::Literal(self.literal.total),
            });
        }
        self.literal.push(data);
        self.trim();
    }

    /// Records `data` as written, where `runs` marks which parts are the counting stream (as
    /// [`App::poll_send_marked`](crate::app::App::poll_send_marked) marks them): those are
    /// logged as offsets, the rest copied. A run out of order, beyond `data` or whose ends
    /// are not the counting stream at its offset is copied too.
    pub fn record(&mut self, data: &[u8], runs: &counting::Runs) {
        let mut copied_to = 0;
        for run in runs.as_slice() {
            let Some(piece) = run
                .at
                .checked_add(run.len)
                .and_then(|end| data.get(run.at..end))
            else {
                continue;
            };
            if run.at < copied_to || !Self::spot_check(run.offset, piece) {
                continue;
            }
            debug_assert_eq!(counting::verify(run.offset, piece), None, "mismarked run");
            self.push(&data[copied_to..run.at]);
            if !self.push_counting(run.offset, run.len) {
                self.push(piece);
            }
            copied_to = run.at + run.len;
        }
        self.push(data.get(copied_to..).unwrap_or_default());
    }

    /// True when the first and last bytes of `piece` are the counting stream from `offset`.
    fn spot_check(offset: u64, piece: &[u8]) -> bool {
        let head = piece.len().min(SPOT_CHECK);
        let tail = piece.len().saturating_sub(SPOT_CHECK);
        counting::verify(offset, &piece[..head]).is_none()
            && counting::verify(offset.wrapping_add(tail as u64), &piece[tail..]).is_none()
    }

    /// Logs `len` bytes written as the counting stream from `offset`, unless the log is too
    /// full: false then, and nothing is recorded.
    fn push_counting(&mut self, offset: u64, len: usize) -> bool {
        if len == 0 {
            return true;
        }
        let start = self.total;
        if self.capacity != 0 {
            match self.extents.back() {
                // The stream goes on where the last extent leaves it.
                Some(&Extent {
                    start: last,
                    source: Source::Counting(from),
                }) if from.wrapping_add(start - last) == offset => {}
                // A new extent, if one is left for a literal extent after it (so `push`
                // always finds room).
                _ if self.extents.len() + 2 <= MAX_EXTENTS => self.extents.push_back(Extent {
                    start,
                    source: Source::Counting(offset),
                }),
                _ => return false,
            }
        }
        self.total += len as u64;
        self.trim();
        true
    }

    /// Drops the extents wholly older than the last `capacity` bytes.
    fn trim(&mut self) {
        let Some(oldest) = self.total.checked_sub(self.capacity as u64) else {
            return;
        };
        while self.extents.get(1).is_some_and(|next| next.start <= oldest) {
            self.extents.pop_front();
        }
    }

    /// Copies the last `n` bytes written into `out` (appending). `None`, with `out` as it was,
    /// if fewer than `n` bytes are held.
    pub fn copy_last(&self, n: usize, out: &mut Vec<u8>) -> Option<()> {
        let len = out.len();
        let copied = self.copy_last_inner(n, out);
        if copied.is_none() {
            out.truncate(len);
        }
        copied
    }

    /// [`copy_last`](Self::copy_last), leaving what it appended on failure.
    fn copy_last_inner(&self, n: usize, out: &mut Vec<u8>) -> Option<()> {
        if n == 0 {
            return Some(());
        }
        let from = self.total.checked_sub(n as u64)?;
        if n > self.capacity || self.extents.front()?.start > from {
            return None;
        }
        out.reserve(n);
        for (i, extent) in self.extents.iter().enumerate() {
            let end = self
                .extents
                .get(i + 1)
                .map_or(self.total, |next| next.start);
            if end <= from {
                continue;
            }
            let skip = from.saturating_sub(extent.start);
            let len = usize::try_from(end - extent.start - skip).ok()?;
            match extent.source {
                Source::Counting(offset) => {
                    let at = out.len();
                    out.resize(at + len, 0);
                    counting::fill(offset.wrapping_add(skip), &mut out[at..]);
                }
                Source::Literal(at) => self.literal.read(at + skip, len, out)?,
            }
        }
        Some(())
    }
}

/// A ring of the last `capacity` bytes pushed, taken as they are pushed.
#[derive(Debug, Default)]
struct Ring {
    /// Ring position `p` is at `buf[p % capacity]`. Shorter than `capacity` while still
    /// growing: it then holds every byte pushed.
    buf: Vec<u8>,
    /// Bytes held at most.
    capacity: usize,
    /// Bytes pushed.
    total: u64,
}

impl Ring {
    /// An empty ring of `capacity` bytes; no memory is taken yet.
    fn new(capacity: usize) -> Self {
        Self {
            buf: Vec::new(),
            capacity,
            total: 0,
        }
    }

    /// Appends `data`.
    fn push(&mut self, mut data: &[u8]) {
        let cap = self.capacity;
        self.total += data.len() as u64;
        if cap == 0 || data.is_empty() {
            return;
        }
        if self.buf.len() < cap {
            // Still growing: past the first few KiB the whole capacity is taken at once, one
            // block never reallocated again (growing by doubling would leave freed blocks of
            // every size behind in the allocator's heap). Pages not yet written stay untouched.
            if self.buf.capacity() < cap && self.buf.len() + data.len() > RING_SMALL {
                self.buf.reserve_exact(cap - self.buf.len());
            }
            if self.buf.len() + data.len() <= cap {
                self.buf.extend_from_slice(data);
                return;
            }
            if self.buf.is_empty() {
                // Overwritten whole below: a fresh zeroed block leaves its pages untouched
                // until then, where `resize` would write zeroes over all of them.
                self.buf = vec![0; cap];
            } else {
                self.buf.resize(cap, 0);
            }
        }
        if data.len() > cap {
            let skip = data.len() - cap;
            data = &data[skip..];
        }
        // Below `cap`, so the cast cannot truncate.
        let mut at = ((self.total - data.len() as u64) % cap as u64) as usize;
        while !data.is_empty() {
            let n = (cap - at).min(data.len());
            self.buf[at..at + n].copy_from_slice(&data[..n]);
            data = &data[n..];
            at = 0;
        }
    }

    /// Appends to `out` the `len` bytes from ring position `from` on; `None` unless all are
    /// held.
    fn read(&self, from: u64, len: usize, out: &mut Vec<u8>) -> Option<()> {
        let end = from.checked_add(len as u64)?;
        if end > self.total || from < self.total.saturating_sub(self.capacity as u64) {
            return None;
        }
        if len == 0 {
            return Some(());
        }
        let at = usize::try_from(from % self.capacity as u64).ok()?;
        let first = len.min(self.capacity - at);
        out.extend_from_slice(self.buf.get(at..at + first)?);
        out.extend_from_slice(self.buf.get(..len - first)?);
        Some(())
    }
}

#[cfg(test)]
mod tests {
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};

    use super::*;

    #[test]
    fn mirror_keeps_the_last_bytes() {
        let all: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 251) as u8).collect();
        for cap in [1usize, 7, 64, 1000, 4096] {
            let mut m = SendMirror::new(cap);
            let mut written = 0usize;
            for chunk in [1usize, 3, 50, 999, 4097, 13].iter().cycle() {
                if written >= all.len() {
                    break;
                }
                let n = (*chunk).min(all.len() - written);
                m.push(&all[written..written + n]);
                written += n;
                assert_eq!(m.total(), written as u64);
                for want in [0usize, 1, cap / 2, cap] {
                    let mut out = Vec::new();
                    if want > written.min(cap) {
                        assert!(m.copy_last(want, &mut out).is_none());
                        continue;
                    }
                    m.copy_last(want, &mut out).unwrap();
                    assert_eq!(out, &all[written - want..written], "cap {cap} want {want}");
                }
            }
        }
    }

    #[test]
    fn mirror_is_lazy() {
        let m = SendMirror::new(1 << 20);
        assert_eq!(m.literal.buf.capacity(), 0);
    }

    /// What one step of the model test writes.
    fn random_write(
        rng: &mut ChaCha8Rng,
        cap: usize,
        next_offset: &mut u64,
    ) -> (Vec<u8>, counting::Runs) {
        let mut data = Vec::new();
        let mut runs = counting::Runs::default();
        let pieces = 1 + rng.next_u32() % 6;
        for _ in 0..pieces {
            // Mostly small, sometimes around or above the capacity.
            let len = match rng.next_u32() % 8 {
                0 => 0,
                1..=4 => (rng.next_u32() % 40) as usize,
                5 | 6 => (rng.next_u32() as usize) % (cap + 1),
                _ => cap + (rng.next_u32() as usize) % (2 * cap + 1),
            };
            let at = data.len();
            data.resize(at + len, 0);
            match rng.next_u32() % 5 {
                // Literal.
                0 | 1 => data[at..]
                    .iter_mut()
                    .for_each(|b| *b = rng.next_u32() as u8),
                // The counting stream where the last run left it, or anywhere.
                kind => {
                    if kind == 4 {
                        *next_offset = rng.next_u64() >> (rng.next_u32() % 64);
                    }
                    counting::fill(*next_offset, &mut data[at..]);
                    // Unmarked sometimes: the mirror must copy it then.
                    if kind != 3 || !rng.next_u32().is_multiple_of(4) {
                        runs.mark(at, len, *next_offset);
                    }
                    *next_offset = next_offset.wrapping_add(len as u64);
                }
            }
        }
        (data, runs)
    }

    /// Literal and counting writes of every size, mixed at random: `copy_last` always gives
    /// what a plain vector of every byte written says, and the log stays bounded.
    #[test]
    fn mirror_matches_a_model_of_mixed_writes() {
        for seed in 0..24u64 {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let cap = [1usize, 5, 64, 300, 4096, 5000][seed as usize % 6];
            let mut m = SendMirror::new(cap);
            let mut model: Vec<u8> = Vec::new();
            // Bytes written before the last `emptied`: not held any more.
            let mut emptied_at = 0usize;
            let mut next_offset = 0u64;
            for step in 0..600 {
                if rng.next_u32().is_multiple_of(50) {
                    m = m.emptied();
                    emptied_at = model.len();
                } else {
                    let (data, runs) = random_write(&mut rng, cap, &mut next_offset);
                    m.record(&data, &runs);
                    model.extend_from_slice(&data);
                }
                assert_eq!(m.total(), model.len() as u64);
                assert!(m.extents.len() <= MAX_EXTENTS);
                assert!(m.literal.buf.len() <= cap);
                let held = (model.len() - emptied_at).min(cap);
                let wants = [
                    0,
                    1,
                    held / 2,
                    held,
                    held + 1,
                    rng.next_u32() as usize % (cap + 2),
                ];
                for want in wants {
                    let mut out = vec![7u8; 3];
                    let got = m.copy_last(want, &mut out);
                    if want > held {
                        assert!(
                            got.is_none(),
                            "seed {seed} step {step} want {want} held {held}"
                        );
                        assert_eq!(out, [7, 7, 7]);
                        continue;
                    }
                    assert!(
                        got.is_some(),
                        "seed {seed} step {step} want {want} held {held}"
                    );
                    assert_eq!(out[..3], [7, 7, 7]);
                    assert!(
                        out[3..] == model[model.len() - want..],
                        "seed {seed} step {step} cap {cap} want {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn counting_stream_is_logged_not_copied() {
        let cap = 1 << 16;
        let mut m = SendMirror::new(cap);
        let mut buf = vec![0u8; 3000];
        let mut offset = 0u64;
        for _ in 0..100 {
            counting::fill(offset, &mut buf);
            let mut runs = counting::Runs::default();
            runs.mark(0, buf.len(), offset);
            m.record(&buf, &runs);
            offset += buf.len() as u64;
        }
        assert_eq!(m.extents.len(), 1);
        assert_eq!(m.literal.buf.capacity(), 0);
        let mut out = Vec::new();
        m.copy_last(cap, &mut out).unwrap();
        assert_eq!(counting::verify(offset - cap as u64, &out), None);
    }

    #[test]
    fn tiny_alternations_stay_bounded_and_exact() {
        // Pipelined tiny responses: a short head, then a short counting body, many times.
        let cap = 4096;
        let mut m = SendMirror::new(cap);
        let mut model = Vec::new();
        for i in 0..10_000u64 {
            let mut data = b"HTTP/1.1 200 OK\r\n\r\n".to_vec();
            let at = data.len();
            data.resize(at + 5, 0);
            counting::fill(0, &mut data[at..]);
            let mut runs = counting::Runs::default();
            runs.mark(at, 5, 0);
            m.record(&data, &runs);
            model.extend_from_slice(&data);
            assert!(m.extents.len() <= MAX_EXTENTS, "step {i}");
        }
        let mut out = Vec::new();
        m.copy_last(cap, &mut out).unwrap();
        assert!(out == model[model.len() - cap..]);
    }

    #[test]
    fn mismarked_runs_are_copied() {
        let mut m = SendMirror::new(100);
        let data: Vec<u8> = (0..50u8).map(|b| b ^ 0x5a).collect();
        let mut runs = counting::Runs::default();
        runs.mark(0, 20, 0); // not the counting stream
        runs.mark(10, 20, 0); // overlaps the previous one
        runs.mark(40, 20, 0); // beyond the data
        runs.mark(usize::MAX, 2, 0); // overflows
        m.record(&data, &runs);
        let mut out = Vec::new();
        m.copy_last(50, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zero_capacity_counts_only() {
        let mut m = SendMirror::new(0);
        m.push(b"abc");
        let mut runs = counting::Runs::default();
        runs.mark(0, 8, 0);
        m.record(&[0; 8], &runs);
        assert_eq!(m.total(), 11);
        assert!(m.extents.is_empty());
        assert_eq!(m.copy_last(0, &mut Vec::new()), Some(()));
        assert_eq!(m.copy_last(1, &mut Vec::new()), None);
    }
}
