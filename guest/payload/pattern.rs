//! The memory pattern: which pages form the workload region, how the working
//! set is split among CPUs, and what each page must hold (one marked word
//! with `fill=word`, a whole page of pseudo-random words with `fill=random`).
//!
//! Shared (via `#[path]`) between the no_std guest and the host crate, so
//! ferry's tests can compute the same expected words and pages. Uses `core`
//! only.

/// Maximum number of RAM ranges the region can be made of.
pub const MAX_SEGS: usize = 32;

/// Bytes per workload page.
pub const PAGE_SIZE: usize = 4096;

/// 8-byte words per workload page.
pub const PAGE_WORDS: usize = PAGE_SIZE / 8;

/// Generation of the `scratch=` region's pages: each holds
/// `random_page(SCRATCH_GEN, pfn)`, a value no workload pass reaches.
pub const SCRATCH_GEN: u64 = 0x5c7a_0000;

/// The word at offset 0 of a workload page: generation in the high half, the
/// low 32 bits of the page frame number in the low half.
pub const fn page_word(gen: u64, pfn: u64) -> u64 {
    (gen << 32) | (pfn & 0xffff_ffff)
}

/// splitmix64's state increment (2^64 / golden ratio).
pub const SPLITMIX_GAMMA: u64 = 0x9e37_79b9_7f4a_7c15;

/// splitmix64's output function: a bijective, fast 64-bit mixer.
#[inline(always)]
pub const fn mix64(z: u64) -> u64 {
    let z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    let z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// splitmix64 state a `fill=random` page's words are drawn from, derived
/// from the page frame number and the generation (all 64 bits of both).
#[inline(always)]
pub const fn random_seed(gen: u64, pfn: u64) -> u64 {
    mix64(pfn ^ mix64(gen.wrapping_add(SPLITMIX_GAMMA)))
}

/// Word `i` (1..[`PAGE_WORDS`]) of a `fill=random` page whose seed is
/// `seed`: the i-th output of splitmix64 started at `seed`. Each word is
/// computed on its own, so a page can be written or checked in any order.
#[inline(always)]
pub const fn random_word(seed: u64, i: u64) -> u64 {
    mix64(seed.wrapping_add(i.wrapping_mul(SPLITMIX_GAMMA)))
}

/// Word `i` (0..[`PAGE_WORDS`]) of the `fill=random` page of `pfn` at
/// generation `gen`: word 0 is the same marker as with `fill=word`
/// ([`page_word`]), the other 511 are [`random_word`]s.
#[allow(dead_code)] // host side only
pub const fn random_page_word(gen: u64, pfn: u64, i: u64) -> u64 {
    if i == 0 {
        page_word(gen, pfn)
    } else {
        random_word(random_seed(gen, pfn), i)
    }
}

/// The whole `fill=random` page of `pfn` at generation `gen`, as the guest
/// stores it (little-endian words); for host-side checks.
#[allow(dead_code)] // host side only
pub fn random_page(gen: u64, pfn: u64) -> [u8; PAGE_SIZE] {
    let mut page = [0u8; PAGE_SIZE];
    let seed = random_seed(gen, pfn);
    for (i, w) in page.chunks_exact_mut(8).enumerate() {
        let word = if i == 0 { page_word(gen, pfn) } else { random_word(seed, i as u64) };
        w.copy_from_slice(&word.to_le_bytes());
    }
    page
}

/// Generation a working-set page must hold: `passes` passes of its CPU are
/// complete and `cursor` pages of the current pass are written; `j` is the
/// page's index within that CPU's slice. Marking is generation 0.
pub const fn expected_gen(passes: u64, cursor: u64, j: u64) -> u64 {
    if j < cursor {
        passes + 1
    } else {
        passes
    }
}

/// Page-index range `[start, end)` of the working set that `cpu` of `ncpus`
/// rewrites (contiguous, sizes differ by at most one page).
pub const fn slice_of(wss_pages: u64, ncpus: u64, cpu: u64) -> (u64, u64) {
    (wss_pages * cpu / ncpus, wss_pages * (cpu + 1) / ncpus)
}

/// One contiguous run of RAM pages in the region.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Seg {
    /// First page frame number.
    pub start_pfn: u64,
    /// Number of pages.
    pub pages: u64,
}

/// The workload region: RAM pages from the end of the guest's reserved area
/// upwards, in address order, indexed 0..pages().
#[derive(Clone, Copy, Debug)]
pub struct Region {
    segs: [Seg; MAX_SEGS],
    nsegs: usize,
    pages: u64,
}

impl Default for Region {
    fn default() -> Self {
        Self::new()
    }
}

impl Region {
    /// An empty region.
    pub const fn new() -> Self {
        Region { segs: [Seg { start_pfn: 0, pages: 0 }; MAX_SEGS], nsegs: 0, pages: 0 }
    }

    /// Builds the region from RAM ranges `(addr, len)` (any order): the whole
    /// pages at or above `min_addr`, lowest first, at most `max_pages`.
    pub fn from_ram(ram: &[(u64, u64)], min_addr: u64, max_pages: u64) -> Self {
        let mut r = Region::new();
        let mut cursor = min_addr;
        // Repeatedly take the lowest range that still has pages above cursor.
        loop {
            let mut best: Option<(u64, u64)> = None;
            for &(addr, len) in ram {
                let start = addr.max(cursor).div_ceil(4096) * 4096;
                let end = (addr.saturating_add(len)) & !4095;
                if end > start && best.is_none_or(|(s, _)| start < s) {
                    best = Some((start, end));
                }
            }
            let Some((start, end)) = best else { break };
            let left = max_pages - r.pages;
            let pages = ((end - start) / 4096).min(left);
            if pages == 0 || r.nsegs == MAX_SEGS {
                break;
            }
            let pfn = start / 4096;
            let last = r.nsegs.checked_sub(1).map(|i| r.segs[i]);
            match last {
                Some(s) if s.start_pfn + s.pages == pfn => r.segs[r.nsegs - 1].pages += pages,
                _ => {
                    r.segs[r.nsegs] = Seg { start_pfn: pfn, pages };
                    r.nsegs += 1;
                }
            }
            r.pages += pages;
            cursor = end;
        }
        r
    }

    /// Number of pages in the region.
    pub const fn pages(&self) -> u64 {
        self.pages
    }

    /// The runs of RAM the region consists of.
    pub fn segs(&self) -> &[Seg] {
        &self.segs[..self.nsegs]
    }

    /// Page frame number of region page `idx`.
    pub fn pfn(&self, idx: u64) -> Option<u64> {
        let mut first = 0;
        for s in self.segs() {
            if idx < first + s.pages {
                return Some(s.start_pfn + idx - first);
            }
            first += s.pages;
        }
        None
    }

    /// Calls `f(first_pfn, n, first_idx)` for each contiguous run of the
    /// region pages `[start, start + count)`.
    #[inline]
    pub fn for_each_run(&self, start: u64, count: u64, mut f: impl FnMut(u64, u64, u64)) {
        let end = start.saturating_add(count).min(self.pages);
        let mut first = 0;
        for s in self.segs() {
            let (lo, hi) = (start.max(first), end.min(first + s.pages));
            if lo < hi {
                f(s.start_pfn + (lo - first), hi - lo, lo);
            }
            first += s.pages;
            if first >= end {
                break;
            }
        }
    }
}
