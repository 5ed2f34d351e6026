//! Distinct pages dirtied over windows of 1, 2, 3, 5, 7, 10, 15, 20, ...
//! intervals, computed as the samples arrive: one accumulator bitmap per
//! window length (consecutive windows, not sliding ones), so memory stays a
//! few bitmaps however long the run, instead of one bitmap per sample.

use ferry_vmm::dirty::Bitmap;

use super::WssWindow;

/// Window lengths, in intervals, up to `samples`: 1, 2, 3, 5, 7 times the
/// powers of ten, and `samples` itself (the whole run).
pub fn window_lengths(samples: u64) -> Vec<u32> {
    let mut out = Vec::new();
    let mut decade: u64 = 1;
    'outer: loop {
        for m in [1u64, 2, 3, 5, 7] {
            let k = m * decade;
            if k > samples {
                break 'outer;
            }
            out.push(k as u32);
        }
        decade = match decade.checked_mul(10) {
            Some(d) => d,
            None => break,
        };
    }
    if samples > 0 && out.last().copied() != Some(samples as u32) {
        out.push(samples as u32);
    }
    out
}

struct Acc {
    intervals: u32,
    bits: Vec<Bitmap>,
    /// The sample density of what `bits` holds (one page in this many).
    one_in: u64,
    filled: u32,
    ms: f64,
    /// Finished windows, each already scaled by its density.
    counts: Vec<u64>,
    total_ms: f64,
}

/// The windows being filled, and those finished.
///
/// Intervals may come at different sample densities (a sampler thins its
/// sample to stay within its fault budget): a window that spans a change
/// keeps only the pages of the sparser sample, from all of its intervals,
/// and scales by that, so its count estimates the same thing throughout.
pub struct Windows {
    accs: Vec<Acc>,
    all: Acc,
    /// Each RAM region's first page frame and page count (for sample masks).
    regions: Vec<(u64, u64)>,
    /// Sample masks made so far, by density.
    masks: Vec<(u64, Vec<Bitmap>)>,
}

fn or_into(dst: &mut [Bitmap], src: &[Bitmap], mask: Option<&[Bitmap]>) {
    for (i, (d, s)) in dst.iter_mut().zip(src).enumerate() {
        let m = mask.and_then(|m| m.get(i));
        for (j, (a, b)) in d.iter_mut().zip(s).enumerate() {
            *a |= *b & m.and_then(|m| m.get(j)).copied().unwrap_or(!0);
        }
    }
}

fn and_into(dst: &mut [Bitmap], mask: &[Bitmap]) {
    for (d, m) in dst.iter_mut().zip(mask) {
        for (a, b) in d.iter_mut().zip(m) {
            *a &= *b;
        }
    }
}

fn count(bits: &[Bitmap]) -> u64 {
    bits.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

fn clear(bits: &mut [Bitmap]) {
    bits.iter_mut().for_each(|b| b.iter_mut().for_each(|w| *w = 0));
}

impl Acc {
    fn new(intervals: u32, words: &[usize]) -> Acc {
        let bits = words.iter().map(|&n| vec![0u64; n]).collect();
        Acc { intervals, bits, one_in: 1, filled: 0, ms: 0.0, counts: Vec::new(), total_ms: 0.0 }
    }
}

impl Windows {
    /// Windows for a run of `samples` intervals over RAM regions given as
    /// (first page frame, pages).
    pub fn new(samples: u64, regions: &[(u64, u64)]) -> Windows {
        let words: Vec<usize> = regions.iter().map(|&(_, pages)| pages.div_ceil(64) as usize).collect();
        let accs = window_lengths(samples).into_iter().map(|intervals| Acc::new(intervals, &words)).collect();
        Windows { accs, all: Acc::new(u32::MAX, &words), regions: regions.to_vec(), masks: Vec::new() }
    }

    fn mask(&mut self, one_in: u64) -> Vec<Bitmap> {
        if let Some((_, m)) = self.masks.iter().find(|(n, _)| *n == one_in) {
            return m.clone();
        }
        let m: Vec<Bitmap> =
            self.regions.iter().map(|&(first, pages)| ferry_vmm::dirty::sample_bitmap(first, pages, one_in)).collect();
        self.masks.push((one_in, m.clone()));
        m
    }

    /// Adds one interval of `ms` with its dirty pages, tracked one page in
    /// `one_in`. Bitmaps of another shape than announced are ORed as far as
    /// they overlap.
    pub fn push(&mut self, bits: &[Bitmap], ms: f64, one_in: u64) {
        let one_in = one_in.max(1);
        let mut accs = std::mem::take(&mut self.accs);
        let mut all = std::mem::replace(&mut self.all, Acc::new(0, &[]));
        for a in accs.iter_mut().chain(std::iter::once(&mut all)) {
            if a.filled == 0 {
                a.one_in = one_in;
            }
            if one_in > a.one_in {
                // The sample thinned: keep only its pages from earlier intervals too.
                let m = self.mask(one_in);
                and_into(&mut a.bits, &m);
                a.one_in = one_in;
            }
            if a.one_in > one_in {
                let m = self.mask(a.one_in);
                or_into(&mut a.bits, bits, Some(&m));
            } else {
                or_into(&mut a.bits, bits, None);
            }
            a.filled = a.filled.saturating_add(1);
            a.ms += ms;
            if a.filled == a.intervals {
                a.counts.push(count(&a.bits) * a.one_in);
                a.total_ms += a.ms;
                clear(&mut a.bits);
                a.filled = 0;
                a.ms = 0.0;
            }
        }
        self.accs = accs;
        self.all = all;
    }

    /// Distinct pages over everything pushed (an estimate at the sparsest
    /// density the run used).
    pub fn distinct(&self) -> u64 {
        count(&self.all.bits) * self.all.one_in
    }

    /// The finished windows, by length (lengths without a full window are
    /// left out), page counts scaled to estimates of all pages.
    pub fn report(&self) -> Vec<WssWindow> {
        self.accs
            .iter()
            .filter(|a| !a.counts.is_empty())
            .map(|a| {
                let n = a.counts.len() as f64;
                WssWindow {
                    intervals: a.intervals,
                    ms: a.total_ms / n,
                    windows: a.counts.len() as u32,
                    mean_pages: a.counts.iter().sum::<u64>() as f64 / n,
                    max_pages: a.counts.iter().copied().max().unwrap_or(0),
                    min_pages: a.counts.iter().copied().min().unwrap_or(0),
                }
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lengths() {
        assert_eq!(window_lengths(1), vec![1]);
        assert_eq!(window_lengths(12), vec![1, 2, 3, 5, 7, 10, 12]);
        assert_eq!(window_lengths(100), vec![1, 2, 3, 5, 7, 10, 20, 30, 50, 70, 100]);
        assert!(window_lengths(0).is_empty());
    }

    /// A guest that rewrites pages 0..8 in order, two pages per interval:
    /// one interval sees 2, two see 4, four or more see all 8 once.
    #[test]
    fn a_cycling_working_set() {
        let mut w = Windows::new(8, &[(0, 64)]);
        for i in 0..8u64 {
            let p = (i * 2) % 8;
            w.push(&[vec![0b11 << p]], 100.0, 1);
        }
        let r = w.report();
        let get = |k: u32| r.iter().find(|x| x.intervals == k).unwrap();
        assert_eq!(get(1).mean_pages, 2.0);
        assert_eq!(get(1).windows, 8);
        assert_eq!(get(2).mean_pages, 4.0);
        assert_eq!(get(3).windows, 2);
        assert_eq!(get(3).max_pages, 6);
        assert_eq!(get(5).mean_pages, 8.0);
        assert_eq!(get(8).mean_pages, 8.0);
        assert_eq!(get(8).ms, 800.0);
        assert_eq!(w.distinct(), 8);
    }

    /// A sample thinned in the middle of a window: the window keeps only the
    /// sparser sample's pages of its earlier intervals and scales by it.
    #[test]
    fn a_window_across_a_thinning_counts_at_the_sparser_density() {
        let pages = 4096u64;
        let dense = ferry_vmm::dirty::sample_bitmap(0, pages, 4);
        let sparse = ferry_vmm::dirty::sample_bitmap(0, pages, 16);
        let ones = |m: &Bitmap| m.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        // The guest writes every page in each interval; the sampler sees its sample.
        let mut w = Windows::new(2, &[(0, pages)]);
        w.push(std::slice::from_ref(&dense), 100.0, 4);
        w.push(std::slice::from_ref(&sparse), 100.0, 16);
        let r = w.report();
        let one = r.iter().find(|x| x.intervals == 1).unwrap();
        assert_eq!(one.max_pages, ones(&dense) * 4);
        assert_eq!(one.min_pages, ones(&sparse) * 16);
        let two = r.iter().find(|x| x.intervals == 2).unwrap();
        assert_eq!(two.max_pages, ones(&sparse) * 16, "the dense interval's extra pages are left out");
        assert_eq!(w.distinct(), ones(&sparse) * 16);
        // Both estimate the 4096 pages within a few percent of it.
        assert!((3000..5200).contains(&two.max_pages), "{}", two.max_pages);
    }
}
