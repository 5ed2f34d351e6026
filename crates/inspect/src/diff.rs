//! Which guest pages differ between two images, by final contents.
//!
//! When B descends from A (A's root hash is in B's chain), only the pages that
//! B's own images record after A can differ, so only those are read, from both
//! sides: a page rewritten with the same bytes is not a change. Otherwise both
//! memories are compared block by block over the extents where either may hold
//! data (zero in both is equal without reading), on several threads, each with
//! its own chain handles, so no image is ever loaded whole.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_image::{ImageChain, RunData, UserKey, PAGE_SIZE};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::maps::maps;
use crate::mem::ImageMem;
use crate::paging::PagingContext;

const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];
/// Bytes compared per read from each side.
const BLOCK: u64 = 1 << 20;
/// Page-table runs above which the virtual attribution is skipped (its cost is runs x changes).
const MAX_ATTRIBUTED_MAP_RUNS: usize = 1 << 16;

/// How [`diff`] compares.
#[derive(Clone, Debug)]
pub struct DiffOptions {
    /// Compare all memory even when B descends from A (to check the chain shortcut).
    pub force_full: bool,
    /// Changed runs at most this many unchanged pages apart join one range.
    pub gap_pages: u64,
    /// Worker threads (each opens its own handles on both chains).
    pub threads: usize,
    /// Attribute changes to virtual ranges through B's vCPU 0 page tables.
    pub virt: bool,
}

impl Default for DiffOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).min(8);
        DiffOptions { force_full: false, gap_pages: 16, threads, virt: true }
    }
}

/// How the pages to compare were chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum DiffMode {
    /// B descends from A: only the pages B's images record after A were compared.
    Chain,
    /// Every extent where either image may hold data was compared.
    Full,
}

/// Contiguous changed pages.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChangedRun {
    /// First guest-physical address.
    pub start: u64,
    /// End (exclusive).
    pub end: u64,
}

/// Changed runs merged across small gaps: where the changes are, with how many.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ChangedRange {
    /// First changed byte's page.
    pub start: u64,
    /// End of the last changed page (exclusive).
    pub end: u64,
    /// Changed pages inside.
    pub pages: u64,
}

/// Changed pages seen through one virtual run of B's page tables.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VirtRegion {
    /// First virtual address of the mapping run.
    pub va_start: u64,
    /// End of the run (exclusive).
    pub va_end: u64,
    /// Physical address `va_start` maps.
    pub pa_start: u64,
    /// Changed 4 KiB pages the run maps.
    pub pages: u64,
}

/// Changes attributed to virtual ranges.
#[derive(Clone, Debug, Serialize)]
pub struct VirtDiff {
    /// The page tables used (B's vCPU 0).
    pub context: PagingContext,
    /// Mapping runs that map at least one changed page, in virtual order.
    pub regions: Vec<VirtRegion>,
    /// Changed pages that no mapping run maps.
    pub unmapped_pages: u64,
}

/// What [`diff`] found.
#[derive(Clone, Debug, Serialize)]
pub struct DiffReport {
    /// The older image.
    pub a: PathBuf,
    /// The newer image.
    pub b: PathBuf,
    /// Chain shortcut or full comparison.
    pub mode: DiffMode,
    /// Guest RAM bytes (same in both).
    pub ram_bytes: u64,
    /// Chain mode: pages B's images record after A (written, maybe with the same bytes).
    pub written_pages: Option<u64>,
    /// Chain mode: written pages whose final contents equal A's (not counted as changes).
    pub identical_rewrites: Option<u64>,
    /// Pages read and compared on each side.
    pub pages_compared: u64,
    /// Pages whose final contents differ.
    pub changed_pages: u64,
    /// Exact runs of changed pages, in address order.
    pub runs: Vec<ChangedRun>,
    /// Runs merged across gaps of at most `gap_pages` pages.
    pub ranges: Vec<ChangedRange>,
    /// The merge gap used.
    pub gap_pages: u64,
    /// Changes by virtual range, or why there is none (`virt_error`).
    pub virt: Option<VirtDiff>,
    /// Why the virtual attribution is missing (paging off, tables unreadable, too many runs).
    pub virt_error: Option<String>,
    /// Wall time.
    pub elapsed_secs: f64,
}

fn ram_string(c: &ImageChain) -> String {
    c.ranges().iter().map(|r| format!("{:#x}..{:#x}", r.start, r.start + r.len)).collect::<Vec<_>>().join(", ")
}

/// Compares the final memory of image `a` with image `b` (each with its chain).
pub fn diff(a: &Path, b: &Path, key: Option<&UserKey>, opts: &DiffOptions) -> Result<DiffReport> {
    let t0 = Instant::now();
    let mut ca = ImageChain::open(a, key)?;
    let mut cb = ImageChain::open(b, key)?;
    if ca.ranges() != cb.ranges() {
        return Err(Error::LayoutMismatch {
            a: a.to_path_buf(),
            b: b.to_path_buf(),
            ram_a: ram_string(&ca),
            ram_b: ram_string(&cb),
        });
    }
    let ram_bytes = ca.ranges().iter().map(|r| r.len).sum();
    let a_root = ca.root_hash();
    let member = cb.images().iter().position(|i| i.root_hash() == a_root);
    let (mode, extents, written) = match member {
        Some(k) if !opts.force_full => {
            let mut pages: Vec<(u64, u64)> = cb.images()[k + 1..]
                .iter()
                .flat_map(|img| img.runs().map(|r| (r.gpa, r.end())).collect::<Vec<_>>())
                .collect();
            let ext = merge(&mut pages);
            let written = ext.iter().map(|e| (e.1 - e.0) / PAGE_SIZE).sum();
            (DiffMode::Chain, ext, Some(written))
        }
        _ => {
            let mut all: Vec<(u64, u64)> =
                ca.data_extents().into_iter().chain(cb.data_extents()).map(|(s, l)| (s, s + l)).collect();
            (DiffMode::Full, merge(&mut all), None)
        }
    };
    drop((ca, cb));
    let (changed, compared) = compare(a, b, key, &extents, opts.threads)?;
    let runs = to_runs(&changed);
    let ranges = to_ranges(&runs, opts.gap_pages);
    let (virt, virt_error) = if opts.virt && !runs.is_empty() {
        match attribute(b, key, &runs) {
            Ok(v) => (Some(v), None),
            Err(e) => (None, Some(e)),
        }
    } else {
        (None, None)
    };
    let changed_pages = changed.len() as u64;
    Ok(DiffReport {
        a: a.to_path_buf(),
        b: b.to_path_buf(),
        mode,
        ram_bytes,
        written_pages: written,
        identical_rewrites: written.map(|w| w - changed_pages),
        pages_compared: compared,
        changed_pages,
        runs,
        ranges,
        gap_pages: opts.gap_pages,
        virt,
        virt_error,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    })
}

/// Sorts `(start, end)` extents and joins overlapping or adjacent ones.
pub(crate) fn merge(v: &mut [(u64, u64)]) -> Vec<(u64, u64)> {
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, e) in v.iter() {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Splits `extents` into `n` contiguous pieces of about equal bytes, page aligned.
fn split(extents: &[(u64, u64)], n: usize) -> Vec<Vec<(u64, u64)>> {
    let total: u64 = extents.iter().map(|e| e.1 - e.0).sum();
    let share = (total / n.max(1) as u64).div_ceil(PAGE_SIZE).max(1) * PAGE_SIZE;
    let mut parts = vec![Vec::new()];
    let mut left = share;
    for &(mut s, e) in extents {
        while s < e {
            let take = (e - s).min(left);
            parts.last_mut().expect("non-empty").push((s, s + take));
            s += take;
            left -= take;
            if left == 0 && parts.len() < n {
                parts.push(Vec::new());
                left = share;
            } else if left == 0 {
                left = u64::MAX;
            }
        }
    }
    parts
}

/// Reads `extents` from both chains (fresh handles per thread) and returns the
/// changed page addresses, sorted, and the number of pages compared.
fn compare(
    a: &Path,
    b: &Path,
    key: Option<&UserKey>,
    extents: &[(u64, u64)],
    threads: usize,
) -> Result<(Vec<u64>, u64)> {
    let parts = split(extents, threads.clamp(1, 64));
    let results: Vec<Result<Vec<u64>>> = std::thread::scope(|s| {
        let hs: Vec<_> = parts
            .iter()
            .map(|part| {
                s.spawn(move || {
                    let mut ca = ImageChain::open(a, key)?;
                    let mut cb = ImageChain::open(b, key)?;
                    let mut changed = Vec::new();
                    for &(start, end) in part {
                        let mut at = start;
                        while at < end {
                            let n = (end - at).min(BLOCK);
                            // Both sides straight from their decoded chunks: no copy, and
                            // memory that is zero on both sides is never touched.
                            ca.visit_range(at, n, |ga, pa| {
                                cb.visit_range(ga, run_bytes(&pa), |gb, pb| {
                                    compare_pieces(ga, &pa, gb, &pb, &mut changed);
                                    Ok(())
                                })
                            })?;
                            at += n;
                        }
                    }
                    Ok(changed)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut changed = Vec::new();
    for r in results {
        changed.extend(r?);
    }
    let compared = extents.iter().map(|e| (e.1 - e.0) / PAGE_SIZE).sum();
    Ok((changed, compared))
}

/// Bytes of memory a visited piece covers.
fn run_bytes(r: &RunData<'_>) -> u64 {
    match r {
        RunData::Data(d) => d.len() as u64,
        RunData::Zero { npages } => npages * PAGE_SIZE,
    }
}

/// The bytes of page `i` of a piece (a zero page for zero memory).
fn page_of<'a>(r: &'a RunData<'_>, i: usize) -> &'a [u8] {
    match r {
        RunData::Data(d) => &d[i * PAGE..(i + 1) * PAGE],
        RunData::Zero { .. } => &ZERO_PAGE,
    }
}

/// Appends the addresses of the pages of `b` (memory from `gb`) that differ from the same
/// pages of `a` (memory from `ga`, covering all of `b`).
fn compare_pieces(ga: u64, a: &RunData<'_>, gb: u64, b: &RunData<'_>, changed: &mut Vec<u64>) {
    if matches!((a, b), (RunData::Zero { .. }, RunData::Zero { .. })) {
        return;
    }
    let skip = ((gb - ga) / PAGE_SIZE) as usize;
    for i in 0..(run_bytes(b) / PAGE_SIZE) as usize {
        if page_of(a, skip + i) != page_of(b, i) {
            changed.push(gb + (i * PAGE) as u64);
        }
    }
}

/// Joins sorted page addresses into runs.
pub(crate) fn to_runs(pages: &[u64]) -> Vec<ChangedRun> {
    let mut out: Vec<ChangedRun> = Vec::new();
    for &p in pages {
        match out.last_mut() {
            Some(r) if r.end == p => r.end += PAGE_SIZE,
            _ => out.push(ChangedRun { start: p, end: p + PAGE_SIZE }),
        }
    }
    out
}

/// Joins runs at most `gap` pages apart, counting their pages.
pub(crate) fn to_ranges(runs: &[ChangedRun], gap: u64) -> Vec<ChangedRange> {
    let mut out: Vec<ChangedRange> = Vec::new();
    for r in runs {
        let pages = (r.end - r.start) / PAGE_SIZE;
        match out.last_mut() {
            Some(g) if r.start - g.end <= gap.saturating_mul(PAGE_SIZE) => {
                g.end = r.end;
                g.pages += pages;
            }
            _ => out.push(ChangedRange { start: r.start, end: r.end, pages }),
        }
    }
    out
}

/// Counts changed pages per mapping run of B's vCPU 0 page tables. Errors are
/// returned as text: the physical diff stands without them.
fn attribute(b: &Path, key: Option<&UserKey>, runs: &[ChangedRun]) -> std::result::Result<VirtDiff, String> {
    let mut mem = ImageMem::open(b, key).map_err(|e| e.to_string())?;
    let cpus = mem.chain().cpus().map_err(|e| e.to_string())?;
    let regs = cpus.first().ok_or_else(|| "the image has no vCPU registers".to_string())?;
    let ctx = PagingContext::from_regs(0, regs).map_err(|e| e.to_string())?;
    let m = maps(&mut mem, &ctx).map_err(|e| e.to_string())?;
    if m.runs.len() > MAX_ATTRIBUTED_MAP_RUNS {
        return Err(format!("{} mapping runs, more than the {MAX_ATTRIBUTED_MAP_RUNS} attributed", m.runs.len()));
    }
    Ok(attribute_runs(ctx, &m.runs, runs))
}

/// The attribution itself: for each mapping run, the changed pages its physical range covers.
pub(crate) fn attribute_runs(ctx: PagingContext, map: &[crate::maps::MapRun], runs: &[ChangedRun]) -> VirtDiff {
    let mut regions = Vec::new();
    for m in map {
        let (ps, pe) = (m.pa_start, m.pa_start.saturating_add(m.len()));
        // Runs are sorted and disjoint: the first that ends after `ps` starts the overlaps.
        let first = runs.partition_point(|r| r.end <= ps);
        let mut pages = 0;
        for r in runs.iter().skip(first) {
            if r.start >= pe {
                break;
            }
            let (s, e) = (r.start.max(ps), r.end.min(pe));
            pages += (e - s) / PAGE_SIZE;
        }
        if pages > 0 {
            regions.push(VirtRegion { va_start: m.va_start, va_end: m.va_end, pa_start: m.pa_start, pages });
        }
    }
    // Pages no run reaches: the changed runs minus the union of the runs' physical ranges.
    let mut cover: Vec<(u64, u64)> = map.iter().map(|m| (m.pa_start, m.pa_start.saturating_add(m.len()))).collect();
    let cover = merge(&mut cover);
    let mut covered = 0;
    for r in runs {
        let first = cover.partition_point(|c| c.1 <= r.start);
        for c in cover.iter().skip(first) {
            if c.0 >= r.end {
                break;
            }
            covered += (r.end.min(c.1) - r.start.max(c.0)) / PAGE_SIZE;
        }
    }
    let total: u64 = runs.iter().map(|r| (r.end - r.start) / PAGE_SIZE).sum();
    let unmapped_pages = total - covered;
    VirtDiff { context: ctx, regions, unmapped_pages }
}
