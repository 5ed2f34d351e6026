//! Resolved page map: for every guest page, where its latest contents live.
//!
//! Built from the footer's run lists (in chunk order, then over a chain's
//! images root first), it gives random access without replaying chunks.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::header::PAGE_SIZE;
use crate::reader::ChunkDecoder;
use crate::record::{PageRun, RunKind};

const PAGE: usize = PAGE_SIZE as usize;

/// Where a page's latest contents are.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Src {
    /// Recorded as zero.
    Zero,
    /// Page `page` of the decoded data of chunk `chunk` in chain member `image`.
    Data { image: u16, chunk: u32, page: u32 },
}

impl Src {
    /// The source of the page `k` pages further on.
    fn advance(self, k: u64) -> Self {
        match self {
            Src::Zero => Src::Zero,
            Src::Data { image, chunk, page } => Src::Data { image, chunk, page: page + k as u32 },
        }
    }
}

/// Non-overlapping extents keyed by first page number (gpa / 4096).
#[derive(Clone, Debug, Default)]
pub(crate) struct PageMap {
    map: BTreeMap<u64, (u64, Src)>,
}

impl PageMap {
    /// Number of extents (for tests and statistics).
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// Makes pages `start..start+n` come from `src`, overriding whatever was there.
    pub(crate) fn insert(&mut self, start: u64, n: u64, src: Src) {
        let end = start + n;
        if let Some((&s, &(len, old))) = self.map.range(..start).next_back() {
            if s + len > start {
                self.map.insert(s, (start - s, old));
                if s + len > end {
                    self.map.insert(end, (s + len - end, old.advance(end - s)));
                }
            }
        }
        let inside: Vec<u64> = self.map.range(start..end).map(|(k, _)| *k).collect();
        for k in inside {
            if let Some((len, old)) = self.map.remove(&k) {
                if k + len > end {
                    self.map.insert(end, (k + len - end, old.advance(end - k)));
                }
            }
        }
        self.map.insert(start, (n, src));
    }

    /// Applies one chunk's runs in order.
    pub(crate) fn apply_chunk(&mut self, image: u16, chunk: u32, runs: &[PageRun]) {
        let mut page = 0u32;
        for r in runs {
            let n = u64::from(r.npages);
            let src = match r.kind {
                RunKind::Zero => Src::Zero,
                RunKind::Data => {
                    let s = Src::Data { image, chunk, page };
                    page += r.npages;
                    s
                }
            };
            self.insert(r.gpa / PAGE_SIZE, n, src);
        }
    }

    /// Extents overlapping pages `start..start+n`, clipped to it: (first page, pages, source).
    pub(crate) fn query(&self, start: u64, n: u64) -> Vec<(u64, u64, Src)> {
        let end = start + n;
        let mut out = Vec::new();
        if let Some((&s, &(len, src))) = self.map.range(..start).next_back() {
            if s + len > start {
                out.push((start, (s + len).min(end) - start, src.advance(start - s)));
            }
        }
        for (&s, &(len, src)) in self.map.range(start..end) {
            out.push((s, (s + len).min(end) - s, src));
        }
        out
    }
}

/// Fills `buf` with guest memory from `gpa` (both page aligned), decoding each
/// needed chunk once; pages without any record read as zero.
pub(crate) fn fill(map: &PageMap, decs: &mut [&mut ChunkDecoder], gpa: u64, buf: &mut [u8]) -> Result<()> {
    if gpa % PAGE_SIZE != 0 || buf.len() % PAGE != 0 {
        return Err(Error::InvalidArgument(format!(
            "read at {gpa:#x} of {} bytes: address and length must be multiples of 4096",
            buf.len()
        )));
    }
    let first = gpa / PAGE_SIZE;
    let mut pieces: Vec<(u16, u32, u32, u64, u64)> = map
        .query(first, (buf.len() / PAGE) as u64)
        .into_iter()
        .filter_map(|(p, n, src)| match src {
            Src::Zero => None,
            Src::Data { image, chunk, page } => Some((image, chunk, page, p - first, n)),
        })
        .collect();
    // Zero only what no data piece covers (holes and zero runs): the rest is overwritten.
    let mut covered: Vec<(u64, u64)> = pieces.iter().map(|p| (p.3, p.4)).collect();
    covered.sort_unstable();
    let mut at = 0u64;
    for (dst, n) in covered.into_iter().chain(std::iter::once(((buf.len() / PAGE) as u64, 0))) {
        if dst > at {
            buf[at as usize * PAGE..dst as usize * PAGE].fill(0);
        }
        at = at.max(dst + n);
    }
    pieces.sort_unstable();
    for (image, chunk, page, dst, n) in pieces {
        let dec =
            decs.get_mut(image as usize).ok_or_else(|| Error::InvalidArgument(format!("no chain member {image}")))?;
        let from = page as usize * PAGE;
        let len = n as usize * PAGE;
        let data = dec.load(chunk)?;
        match data.get(from..from + len) {
            Some(src) => buf[dst as usize * PAGE..dst as usize * PAGE + len].copy_from_slice(src),
            None => return Err(dec.corrupt(chunk, "run extends past the chunk's data")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn d(chunk: u32, page: u32) -> Src {
        Src::Data { image: 0, chunk, page }
    }

    #[test]
    fn later_writes_override_and_split() {
        let mut m = PageMap::default();
        m.insert(0, 10, d(0, 0));
        m.insert(3, 2, Src::Zero);
        m.insert(8, 4, d(1, 0));
        let q = m.query(0, 12);
        assert_eq!(q, vec![(0, 3, d(0, 0)), (3, 2, Src::Zero), (5, 3, d(0, 5)), (8, 4, d(1, 0))]);
        // Query starting inside an extent advances the page offset.
        assert_eq!(m.query(6, 1), vec![(6, 1, d(0, 6))]);
        // Overwrite covering several extents.
        m.insert(2, 9, d(2, 0));
        assert_eq!(m.query(0, 12), vec![(0, 2, d(0, 0)), (2, 9, d(2, 0)), (11, 1, d(1, 3))]);
        assert_eq!(m.len(), 3);
    }

    #[test]
    fn apply_chunk_counts_data_pages_only() {
        let mut m = PageMap::default();
        let runs = [
            PageRun { gpa: 0x1000, npages: 2, kind: RunKind::Data },
            PageRun { gpa: 0x5000, npages: 1, kind: RunKind::Zero },
            PageRun { gpa: 0x8000, npages: 1, kind: RunKind::Data },
        ];
        m.apply_chunk(0, 4, &runs);
        assert_eq!(m.query(8, 1), vec![(8, 1, d(4, 2))]);
        assert_eq!(m.query(5, 1), vec![(5, 1, Src::Zero)]);
        assert!(m.query(6, 2).is_empty());
    }
}
