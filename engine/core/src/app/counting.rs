//! The counting stream: a byte stream that every offset can check on its own.
//!
//! The byte at offset `i` is byte `i % 8` of the little-endian `u64` value `i / 8`, so offsets 0..16
//! read `00 00 00 00 00 00 00 00 01 00 00 00 00 00 00 00`. A receiver that knows where a piece of
//! the stream starts can verify it without having seen what came before, which makes lost,
//! duplicated or reordered bytes visible after a connection moves between nodes.
//!
//! [`fill`] runs on the data path, so it works a whole `u64` at a time.

/// Length of the stream's period: one little-endian `u64` counter value.
const WORD: u64 = 8;

/// The byte at `offset` in the counting stream.
pub fn byte_at(offset: u64) -> u8 {
    // `offset % WORD` is below 8, so the index is in bounds.
    (offset / WORD).to_le_bytes()[(offset % WORD) as usize]
}

/// Writes the counting stream from `offset` on into `buf` (all of it).
pub fn fill(offset: u64, buf: &mut [u8]) {
    let mut word = offset / WORD;
    let skip = (offset % WORD) as usize;
    let mut rest = buf;
    if skip != 0 {
        let first = word.to_le_bytes();
        let n = rest.len().min(first.len() - skip);
        let (head, tail) = rest.split_at_mut(n);
        head.copy_from_slice(&first[skip..skip + n]);
        rest = tail;
        word = word.wrapping_add(1);
    }
    let mut chunks = rest.chunks_exact_mut(WORD as usize);
    for chunk in &mut chunks {
        chunk.copy_from_slice(&word.to_le_bytes());
        word = word.wrapping_add(1);
    }
    let tail = chunks.into_remainder();
    let n = tail.len();
    tail.copy_from_slice(&word.to_le_bytes()[..n]);
}

/// Most runs one [`Runs`] holds.
pub const MAX_RUNS: usize = 4;

/// A piece of a write that is the counting stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Run {
    /// Where it starts in the buffer written.
    pub at: usize,
    /// Its length in bytes (never 0).
    pub len: usize,
    /// The stream offset of its first byte.
    pub offset: u64,
}

/// The pieces of one write that are the counting stream, in buffer order: what
/// [`App::poll_send_marked`](super::App::poll_send_marked) marks so that the engine keeps a
/// description of those bytes instead of a copy. At most [`MAX_RUNS`]: further runs are not
/// kept (their bytes count as unmarked).
#[derive(Debug, Clone, Default)]
pub struct Runs {
    /// `runs[..len]` are the runs marked.
    runs: [Run; MAX_RUNS],
    /// Runs marked; at most [`MAX_RUNS`].
    len: usize,
}

impl Runs {
    /// Marks `len` bytes from `at` in the buffer as the stream from `offset` on. An empty run,
    /// or one past [`MAX_RUNS`], is not kept.
    pub fn mark(&mut self, at: usize, len: usize, offset: u64) {
        if len == 0 {
            return;
        }
        if let Some(run) = self.runs.get_mut(self.len) {
            *run = Run { at, len, offset };
            self.len += 1;
        }
    }

    /// The runs marked, in the order marked.
    pub fn as_slice(&self) -> &[Run] {
        self.runs.get(..self.len).unwrap_or_default()
    }

    /// Checks the runs against `written`, the bytes of the write they mark: in order, without
    /// overlap, within it, and each exactly the counting stream from its offset. Every byte is
    /// compared (the send mirror only spot-checks the ends): for tests and fuzzing.
    pub fn check(&self, written: &[u8]) -> Result<(), MarkError> {
        let mut end = 0;
        for run in self.as_slice() {
            if run.at < end {
                return Err(MarkError::Order);
            }
            end = run.at.checked_add(run.len).ok_or(MarkError::Beyond)?;
            let piece = written.get(run.at..end).ok_or(MarkError::Beyond)?;
            if let Some(at) = verify(run.offset, piece) {
                return Err(MarkError::Differ(at));
            }
        }
        Ok(())
    }
}

/// What is wrong with the runs an app marked ([`Runs::check`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MarkError {
    /// A run starts before the end of the one before it.
    #[error("marked runs overlap or are out of order")]
    Order,
    /// A run ends past the bytes written.
    #[error("a marked run lies beyond the bytes written")]
    Beyond,
    /// A run's bytes are not the counting stream from its offset.
    #[error("marked bytes differ from the counting stream at stream offset {0}")]
    Differ(u64),
}

/// Checks that `data` is the counting stream from `offset` on.
///
/// Returns `None` when it is, else the stream offset of the first wrong byte.
pub fn verify(offset: u64, data: &[u8]) -> Option<u64> {
    /// Bytes compared per block: large enough for a fast `memcmp`, small enough for the stack.
    const BLOCK: usize = 512;
    let mut expected = [0u8; BLOCK];
    let mut at = offset;
    for block in data.chunks(BLOCK) {
        let expected = &mut expected[..block.len()];
        fill(at, expected);
        if block != expected {
            let bad = block
                .iter()
                .zip(expected.iter())
                .position(|(a, b)| a != b)
                .unwrap_or(0);
            return Some(at.wrapping_add(bad as u64));
        }
        at = at.wrapping_add(block.len() as u64);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn marked_runs_are_checked_for_order_bounds_and_every_byte() {
        // "ab" then 8 stream bytes from offset 100, then "c".
        let mut written = b"ab".to_vec();
        written.extend(naive(100, 8));
        written.push(b'c');
        let runs = |marks: &[(usize, usize, u64)]| {
            let mut r = Runs::default();
            for &(at, len, offset) in marks {
                r.mark(at, len, offset);
            }
            r
        };
        assert_eq!(runs(&[]).check(&written), Ok(()));
        assert_eq!(runs(&[(2, 8, 100)]).check(&written), Ok(()));
        assert_eq!(runs(&[(2, 4, 100), (6, 4, 104)]).check(&written), Ok(()));
        assert_eq!(
            runs(&[(6, 4, 104), (2, 4, 100)]).check(&written),
            Err(MarkError::Order)
        );
        // Into the unmarked "c": the stream's next byte is wrong there.
        assert_eq!(
            runs(&[(2, 9, 100)]).check(&written),
            Err(MarkError::Differ(108))
        );
        assert_eq!(
            runs(&[(2, 10, 100)]).check(&written),
            Err(MarkError::Beyond)
        );
        assert_eq!(
            runs(&[(2, usize::MAX, 100)]).check(&written),
            Err(MarkError::Beyond)
        );
        // A wrong middle byte is found, not only wrong ends.
        written[5] ^= 1;
        assert_eq!(
            runs(&[(2, 8, 100)]).check(&written),
            Err(MarkError::Differ(103))
        );
    }

    /// The stream as the definition states it, one byte at a time.
    fn naive(offset: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| ((offset + i) / 8).to_le_bytes()[((offset + i) % 8) as usize])
            .collect()
    }

    #[test]
    fn known_values() {
        let mut buf = [0xffu8; 16];
        fill(0, &mut buf);
        assert_eq!(buf, [0, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0]);
        let mut buf = [0u8; 8];
        fill(0x0102 * 8, &mut buf);
        assert_eq!(buf, [2, 1, 0, 0, 0, 0, 0, 0]);
        let mut buf = [0u8; 4];
        fill(8 * 0x1122_3344_5566_7788 + 5, &mut buf[..3]);
        assert_eq!(buf, [0x33, 0x22, 0x11, 0]);
        assert_eq!(byte_at(8), 1);
        assert_eq!(byte_at(8 * 256 + 1), 1);
    }

    #[test]
    fn fill_matches_naive_at_unaligned_offsets_and_lengths() {
        let bases = [0u64, 8 * 255, 8 * 65_535 + 3, 1 << 40, u64::MAX - 100];
        for base in bases {
            for start in 0..17u64 {
                for len in 0..41usize {
                    let offset = base.wrapping_add(start);
                    if offset.checked_add(len as u64).is_none() {
                        continue;
                    }
                    let mut buf = vec![0xaau8; len];
                    fill(offset, &mut buf);
                    assert_eq!(buf, naive(offset, len), "offset {offset} len {len}");
                    for (i, &b) in buf.iter().enumerate() {
                        assert_eq!(b, byte_at(offset + i as u64));
                    }
                }
            }
        }
    }

    #[test]
    fn fill_long_buffer_matches_naive() {
        let mut buf = vec![0u8; 5000];
        fill(12_345, &mut buf);
        assert_eq!(buf, naive(12_345, 5000));
    }

    #[test]
    fn runs_keep_at_most_max_runs() {
        let mut runs = Runs::default();
        assert!(runs.as_slice().is_empty());
        runs.mark(3, 0, 9);
        assert!(runs.as_slice().is_empty(), "an empty run is not kept");
        for i in 0..MAX_RUNS + 2 {
            runs.mark(i * 10, 5, i as u64);
        }
        assert_eq!(runs.as_slice().len(), MAX_RUNS);
        assert_eq!(
            runs.as_slice()[1],
            Run {
                at: 10,
                len: 5,
                offset: 1
            }
        );
    }

    #[test]
    fn verify_finds_first_bad_byte() {
        let mut buf = vec![0u8; 3000];
        fill(77, &mut buf);
        assert_eq!(verify(77, &buf), None);
        assert_eq!(verify(77, &[]), None);
        // Shifted by one: the first byte that differs is where the stream's values differ.
        let shifted = (0..buf.len())
            .find(|&i| byte_at(78 + i as u64) != buf[i])
            .unwrap();
        assert_eq!(verify(78, &buf), Some(78 + shifted as u64));
        for bad in [0usize, 1, 511, 512, 513, 2999] {
            let mut copy = buf.clone();
            copy[bad] ^= 0x40;
            copy[2999 - bad / 2] ^= 0x01; // a later error must not hide the first
            let first = bad.min(2999 - bad / 2);
            assert_eq!(verify(77, &copy), Some(77 + first as u64), "bad {bad}");
        }
    }
}
