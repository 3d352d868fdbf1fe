//! Sliding anti-replay window over 64-bit record counters (RFC 6479 bitmap).
//!
//! The bitmap is a ring of [`BLOCKS`] 64-bit words. Moving the window forward clears whole
//! words instead of shifting bits, so both the check and the update are O(1) (a large jump
//! clears at most [`BLOCKS`] words). One word is always the partially-filled "current" one,
//! so the guaranteed window is `(BLOCKS - 1) * 64` = [`WINDOW`] counters behind the highest
//! one seen.
//!
//! Use it in two steps: [`ReplayWindow::check`] before decrypting (cheap rejection) and
//! [`ReplayWindow::update`] only after the record authenticated, so forged records cannot
//! move the window.

const BLOCK_BITS: u64 = 64;
/// Number of 64-bit words in the ring (4096 bits).
pub const BLOCKS: usize = 64;
/// Counters at least this far behind the highest accepted one are rejected as too old.
pub const WINDOW: u64 = (BLOCKS as u64 - 1) * BLOCK_BITS;

/// Why a counter was rejected.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ReplayError {
    /// This counter was already accepted.
    #[error("replayed record")]
    Replayed,
    /// The counter is [`WINDOW`] or more behind the highest accepted one.
    #[error("record too old for the anti-replay window")]
    TooOld,
}

/// Anti-replay state of one receive key.
#[derive(Clone, Debug)]
pub struct ReplayWindow {
    /// Ring of bits; bit `c % 64` of word `(c / 64) % BLOCKS` records counter `c`.
    bitmap: [u64; BLOCKS],
    /// Highest accepted counter; meaningless while `empty`.
    top: u64,
    /// No counter accepted yet.
    empty: bool,
}

impl Default for ReplayWindow {
    fn default() -> Self {
        Self::new()
    }
}

impl ReplayWindow {
    /// A window that has accepted nothing.
    pub const fn new() -> ReplayWindow {
        ReplayWindow {
            bitmap: [0; BLOCKS],
            top: 0,
            empty: true,
        }
    }

    /// Highest accepted counter, if any.
    pub fn highest(&self) -> Option<u64> {
        (!self.empty).then_some(self.top)
    }

    fn slot(counter: u64) -> (usize, u64) {
        // `% BLOCKS` keeps the index in range, so the cast cannot truncate meaningfully.
        (
            ((counter / BLOCK_BITS) % BLOCKS as u64) as usize,
            1u64 << (counter % BLOCK_BITS),
        )
    }

    /// Whether `counter` would be accepted now. Does not change the window.
    pub fn check(&self, counter: u64) -> Result<(), ReplayError> {
        if self.empty || counter > self.top {
            return Ok(());
        }
        if self.top - counter >= WINDOW {
            return Err(ReplayError::TooOld);
        }
        let (word, bit) = Self::slot(counter);
        if self.bitmap[word] & bit != 0 {
            Err(ReplayError::Replayed)
        } else {
            Ok(())
        }
    }

    /// Accepts `counter` (call after the record authenticated).
    pub fn update(&mut self, counter: u64) -> Result<(), ReplayError> {
        self.check(counter)?;
        if self.empty || counter > self.top {
            if !self.empty {
                let current = self.top / BLOCK_BITS;
                let new = counter / BLOCK_BITS;
                let clear = (new - current).min(BLOCKS as u64);
                for i in 1..=clear {
                    self.bitmap[((current + i) % BLOCKS as u64) as usize] = 0;
                }
            }
            self.top = counter;
            self.empty = false;
        }
        let (word, bit) = Self::slot(counter);
        self.bitmap[word] |= bit;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};
    use std::collections::BTreeSet;

    #[test]
    fn in_order_and_duplicates() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.highest(), None);
        for c in 0..10_000u64 {
            assert_eq!(w.update(c), Ok(()));
            assert_eq!(w.update(c), Err(ReplayError::Replayed));
        }
        assert_eq!(w.highest(), Some(9_999));
    }

    #[test]
    fn window_edges() {
        let mut w = ReplayWindow::new();
        let top = 100_000;
        w.update(top).unwrap();
        // Exactly WINDOW - 1 behind: still inside.
        assert_eq!(w.check(top - (WINDOW - 1)), Ok(()));
        assert_eq!(w.update(top - (WINDOW - 1)), Ok(()));
        assert_eq!(w.update(top - (WINDOW - 1)), Err(ReplayError::Replayed));
        // WINDOW behind: too old.
        assert_eq!(w.check(top - WINDOW), Err(ReplayError::TooOld));
        assert_eq!(w.update(0), Err(ReplayError::TooOld));
        // Window is at least 2048 as required.
        const { assert!(WINDOW >= 2048) };
    }

    #[test]
    fn first_counter_may_be_anything_and_zero_works() {
        let mut w = ReplayWindow::new();
        assert_eq!(w.update(0), Ok(()));
        assert_eq!(w.update(0), Err(ReplayError::Replayed));
        let mut w = ReplayWindow::new();
        assert_eq!(w.update(u64::MAX - 1), Ok(()));
        assert_eq!(w.update(u64::MAX), Ok(()));
        assert_eq!(w.update(u64::MAX), Err(ReplayError::Replayed));
        assert_eq!(w.update(u64::MAX - 1), Err(ReplayError::Replayed));
        assert_eq!(w.update(u64::MAX - 2), Ok(()));
    }

    #[test]
    fn large_jump_forgets_stale_bits() {
        let mut w = ReplayWindow::new();
        for c in 0..64 {
            w.update(c).unwrap();
        }
        // Jump exactly one ring further: the words must be cleared, not reused.
        let jump = BLOCKS as u64 * 64;
        w.update(jump).unwrap();
        for c in (jump - WINDOW + 1)..jump {
            assert_eq!(w.check(c), Ok(()), "counter {c}");
        }
        w.update(10 * jump + 5).unwrap();
        assert_eq!(w.check(10 * jump + 4), Ok(()));
        assert_eq!(w.check(jump), Err(ReplayError::TooOld));
    }

    #[test]
    fn reordered_within_window() {
        let mut w = ReplayWindow::new();
        w.update(5_000).unwrap();
        for c in (1_000..5_000).rev() {
            assert_eq!(w.update(c), Ok(()));
        }
        assert_eq!(w.update(4_000), Err(ReplayError::Replayed));
    }

    /// Compare with a set-based model on random traffic.
    #[test]
    fn matches_reference_model() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut w = ReplayWindow::new();
        let mut seen = BTreeSet::new();
        let mut top: Option<u64> = None;
        let mut base = 0u64;
        for _ in 0..200_000 {
            base += rng.next_u64() % 3;
            let c = base + rng.next_u64() % 6_000;
            let c = c.saturating_sub(rng.next_u64() % 8_000);
            let expect = match top {
                Some(t) if c <= t && t - c >= WINDOW => Err(ReplayError::TooOld),
                _ if seen.contains(&c) => Err(ReplayError::Replayed),
                _ => Ok(()),
            };
            assert_eq!(w.update(c), expect, "counter {c}, top {top:?}");
            if expect.is_ok() {
                seen.insert(c);
                top = Some(top.map_or(c, |t| t.max(c)));
            }
        }
    }
}
