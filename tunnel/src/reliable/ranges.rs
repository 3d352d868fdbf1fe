//! A set of `u64` values stored as disjoint half-open ranges.

use std::collections::BTreeMap;
use std::ops::Range;

/// Disjoint, non-touching half-open ranges, keyed by start.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct RangeSet {
    map: BTreeMap<u64, u64>,
}

impl RangeSet {
    pub(crate) fn new() -> RangeSet {
        RangeSet {
            map: BTreeMap::new(),
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Number of disjoint ranges.
    pub(crate) fn range_count(&self) -> usize {
        self.map.len()
    }

    #[cfg(test)]
    pub(crate) fn contains(&self, v: u64) -> bool {
        self.map
            .range(..=v)
            .next_back()
            .is_some_and(|(_, &end)| v < end)
    }

    /// Lowest value.
    pub(crate) fn min(&self) -> Option<u64> {
        self.map.keys().next().copied()
    }

    /// Ranges in ascending order.
    pub(crate) fn iter(&self) -> impl DoubleEndedIterator<Item = Range<u64>> + '_ {
        self.map.iter().map(|(&s, &e)| s..e)
    }

    /// Adds `r`; returns whether any value was new.
    pub(crate) fn insert(&mut self, r: Range<u64>) -> bool {
        if r.is_empty() {
            return false;
        }
        let (mut start, mut end) = (r.start, r.end);
        if let Some((&ps, &pe)) = self.map.range(..=start).next_back() {
            if pe >= end {
                return false;
            }
            if pe >= start {
                start = ps;
                self.map.remove(&ps);
            }
        }
        while let Some((&s, &e)) = self.map.range(start..=end).next() {
            self.map.remove(&s);
            end = end.max(e);
        }
        self.map.insert(start, end);
        true
    }

    /// Removes `r`.
    pub(crate) fn remove(&mut self, r: Range<u64>) {
        if r.is_empty() {
            return;
        }
        if let Some((&ps, &pe)) = self.map.range(..r.start).next_back()
            && pe > r.start
        {
            self.map.insert(ps, r.start);
            if pe > r.end {
                self.map.insert(r.end, pe);
                return;
            }
        }
        while let Some((&s, &e)) = self.map.range(r.start..r.end).next() {
            self.map.remove(&s);
            if e > r.end {
                self.map.insert(r.end, e);
                break;
            }
        }
    }

    /// Removes and returns at most `max_len` values from the start of the lowest range.
    pub(crate) fn pop_front(&mut self, max_len: u64) -> Option<Range<u64>> {
        let (&s, &e) = self.map.iter().next()?;
        self.map.remove(&s);
        let take_end = s.saturating_add(max_len.max(1)).min(e);
        if take_end < e {
            self.map.insert(take_end, e);
        }
        Some(s..take_end)
    }

    /// Removes the lowest range.
    pub(crate) fn pop_lowest(&mut self) -> Option<Range<u64>> {
        let (&s, &e) = self.map.iter().next()?;
        self.map.remove(&s);
        Some(s..e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand_chacha::ChaCha8Rng;
    use rand_core::{RngCore, SeedableRng};
    use std::collections::BTreeSet;

    fn ranges(s: &RangeSet) -> Vec<Range<u64>> {
        s.iter().collect()
    }

    #[test]
    fn insert_merges() {
        let mut s = RangeSet::new();
        assert!(s.insert(10..20));
        assert!(s.insert(30..40));
        assert!(!s.insert(12..18));
        assert!(s.insert(20..30));
        assert_eq!(ranges(&s), vec![10..40]);
        assert!(s.insert(0..5));
        assert!(s.insert(5..10));
        assert_eq!(ranges(&s), vec![0..40]);
        assert!(s.insert(50..60));
        assert!(s.insert(45..70));
        assert_eq!(ranges(&s), vec![0..40, 45..70]);
        assert!(s.contains(0) && s.contains(39) && !s.contains(40) && s.contains(45));
    }

    #[test]
    fn remove_splits() {
        let mut s = RangeSet::new();
        s.insert(0..100);
        s.remove(10..20);
        assert_eq!(ranges(&s), vec![0..10, 20..100]);
        s.remove(5..25);
        assert_eq!(ranges(&s), vec![0..5, 25..100]);
        s.remove(0..200);
        assert!(s.is_empty());
        s.insert(0..10);
        s.insert(20..30);
        s.insert(40..50);
        s.remove(5..45);
        assert_eq!(ranges(&s), vec![0..5, 45..50]);
        assert_eq!(s.pop_front(3), Some(0..3));
        assert_eq!(s.pop_front(3), Some(3..5));
        assert_eq!(s.pop_lowest(), Some(45..50));
        assert_eq!(s.pop_front(1), None);
    }

    #[test]
    fn matches_model() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut s = RangeSet::new();
        let mut m = BTreeSet::new();
        for _ in 0..5_000 {
            let a = rng.next_u64() % 300;
            let b = a + rng.next_u64() % 20;
            if rng.next_u32() % 3 == 0 {
                s.remove(a..b);
                for v in a..b {
                    m.remove(&v);
                }
            } else {
                let new = (a..b).any(|v| !m.contains(&v));
                assert_eq!(s.insert(a..b), new);
                m.extend(a..b);
            }
            let flat: BTreeSet<u64> = s.iter().flatten().collect();
            assert_eq!(flat, m);
            // Ranges are disjoint and not touching.
            let rs = ranges(&s);
            for w in rs.windows(2) {
                assert!(w[0].end < w[1].start);
            }
        }
    }
}
