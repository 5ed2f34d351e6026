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
    filled: u32,
    ms: f64,
    counts: Vec<u64>,
    total_ms: f64,
}

/// The windows being filled, and those finished.
pub struct Windows {
    accs: Vec<Acc>,
    all: Vec<Bitmap>,
}

fn or_into(dst: &mut [Bitmap], src: &[Bitmap]) {
    for (d, s) in dst.iter_mut().zip(src) {
        for (a, b) in d.iter_mut().zip(s) {
            *a |= *b;
        }
    }
}

fn count(bits: &[Bitmap]) -> u64 {
    bits.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

fn clear(bits: &mut [Bitmap]) {
    bits.iter_mut().for_each(|b| b.iter_mut().for_each(|w| *w = 0));
}

impl Windows {
    /// Windows for a run of `samples` intervals over RAM regions of these
    /// bitmap lengths (in words).
    pub fn new(samples: u64, words: &[usize]) -> Windows {
        let empty = || words.iter().map(|&n| vec![0u64; n]).collect::<Vec<Bitmap>>();
        let accs = window_lengths(samples)
            .into_iter()
            .map(|intervals| Acc { intervals, bits: empty(), filled: 0, ms: 0.0, counts: Vec::new(), total_ms: 0.0 })
            .collect();
        Windows { accs, all: empty() }
    }

    /// Adds one interval of `ms` with its dirty pages. Bitmaps of another
    /// shape than announced are ORed as far as they overlap.
    pub fn push(&mut self, bits: &[Bitmap], ms: f64) {
        or_into(&mut self.all, bits);
        for a in &mut self.accs {
            or_into(&mut a.bits, bits);
            a.filled += 1;
            a.ms += ms;
            if a.filled == a.intervals {
                a.counts.push(count(&a.bits));
                a.total_ms += a.ms;
                clear(&mut a.bits);
                a.filled = 0;
                a.ms = 0.0;
            }
        }
    }

    /// Distinct pages over everything pushed.
    pub fn distinct(&self) -> u64 {
        count(&self.all)
    }

    /// The finished windows, by length (lengths without a full window are left out).
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
        let mut w = Windows::new(8, &[1]);
        for i in 0..8u64 {
            let p = (i * 2) % 8;
            w.push(&[vec![0b11 << p]], 100.0);
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
}
