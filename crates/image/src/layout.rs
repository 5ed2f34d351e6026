//! Guest RAM layout helpers: which pages exist, and a page bitmap.

use crate::error::{Error, Result};
use crate::header::{RamRange, PAGE_SIZE};

/// The RAM ranges with a running page index, so any guest page maps to a dense index.
#[derive(Clone, Debug)]
pub(crate) struct Layout {
    ranges: Vec<RamRange>,
    /// Dense page index of each range's first page.
    first: Vec<u64>,
    total: u64,
}

/// A piece of a guest-physical run that lies inside one RAM range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Segment {
    /// Guest-physical start.
    pub gpa: u64,
    /// Pages in this piece.
    pub npages: u64,
    /// Dense index of the first page.
    pub index: u64,
}

impl Layout {
    /// Builds the layout; the ranges must already be validated.
    pub(crate) fn new(ranges: &[RamRange]) -> Self {
        let mut first = Vec::with_capacity(ranges.len());
        let mut total = 0;
        for r in ranges {
            first.push(total);
            total += r.len / PAGE_SIZE;
        }
        Layout { ranges: ranges.to_vec(), first, total }
    }

    /// Total pages.
    pub(crate) fn total_pages(&self) -> u64 {
        self.total
    }

    /// Splits `gpa..gpa+npages*4096` into per-range segments; errors if any page is outside RAM.
    pub(crate) fn segments(&self, gpa: u64, npages: u64) -> Result<Vec<Segment>> {
        let outside = || Error::OutsideRam { gpa, end: gpa.saturating_add(npages.saturating_mul(PAGE_SIZE)) };
        let mut out = Vec::new();
        let mut cur = gpa;
        let mut left = npages;
        while left > 0 {
            let i = self.ranges.partition_point(|r| r.start <= cur);
            if i == 0 {
                return Err(outside());
            }
            let r = &self.ranges[i - 1];
            if cur >= r.end() {
                return Err(outside());
            }
            let n = ((r.end() - cur) / PAGE_SIZE).min(left);
            out.push(Segment { gpa: cur, npages: n, index: self.first[i - 1] + (cur - r.start) / PAGE_SIZE });
            cur += n * PAGE_SIZE;
            left -= n;
        }
        Ok(out)
    }
}

/// One bit per guest page.
#[derive(Clone, Debug)]
pub(crate) struct Bitmap {
    words: Vec<u64>,
}

impl Bitmap {
    /// An all-clear bitmap of `n` bits.
    pub(crate) fn new(n: u64) -> Self {
        Bitmap { words: vec![0; n.div_ceil(64) as usize] }
    }

    /// Whether bit `i` is set.
    pub(crate) fn get(&self, i: u64) -> bool {
        self.words[(i / 64) as usize] >> (i % 64) & 1 == 1
    }

    /// Sets or clears bits `start..start+n`.
    pub(crate) fn set_range(&mut self, start: u64, n: u64, value: bool) {
        let mut i = start;
        let end = start + n;
        while i < end {
            let w = (i / 64) as usize;
            let bit = i % 64;
            let take = (64 - bit).min(end - i);
            let mask = if take == 64 { u64::MAX } else { ((1u64 << take) - 1) << bit };
            if value {
                self.words[w] |= mask;
            } else {
                self.words[w] &= !mask;
            }
            i += take;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_at_range_boundaries() {
        let l = Layout::new(&[RamRange::new(0, 0x2000), RamRange::new(0x2000, 0x1000), RamRange::new(0x10000, 0x1000)]);
        assert_eq!(l.total_pages(), 4);
        let s = l.segments(0x1000, 2).unwrap();
        assert_eq!(s, vec![Segment { gpa: 0x1000, npages: 1, index: 1 }, Segment { gpa: 0x2000, npages: 1, index: 2 }]);
        assert_eq!(l.segments(0x10000, 1).unwrap()[0].index, 3);
        assert!(l.segments(0x3000, 1).is_err());
        assert!(l.segments(0x2000, 2).is_err());
        assert!(l.segments(0x20000, 1).is_err());
    }

    #[test]
    fn bitmap_ranges() {
        let mut b = Bitmap::new(200);
        b.set_range(3, 130, true);
        assert!(!b.get(2) && b.get(3) && b.get(132) && !b.get(133));
        b.set_range(64, 64, false);
        assert!(b.get(63) && !b.get(64) && !b.get(127) && b.get(128));
    }
}
