//! Searching guest memory for byte patterns.
//!
//! The scanner streams over guest-physical memory in blocks (never the whole
//! image at once) and reads only the extents that hold data, each widened by
//! the longest pattern minus one so that a match reaching into a zero page is
//! still seen. Each block also re-reads the longest pattern minus one
//! (rounded up to a page) before its start, so consecutive blocks overlap and
//! a match across any boundary (block, chunk, run, zero gap, adjacent RAM
//! ranges) is found, exactly once: by the block that holds its last byte.
//! Blocks are independent, so several threads (each with its own handle on
//! the image) take them in turn. What is searched for is behind the
//! [`Matcher`] trait ([`Literals`]); YARA-X rule sets, whose conditions need
//! every block in one place, are fed the same blocks by `crate::feed`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use memchr::memmem::Finder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::maps::{maps, MapRun};
use crate::mem::PhysMem;
use crate::paging::PagingContext;

/// Longest literal pattern (bytes); it bounds the block overlap.
pub const MAX_PATTERN: usize = 4096;
/// Hits [`Literals`] reports per block at most (the rest are neither listed nor counted).
pub const MAX_BLOCK_HITS: usize = 1 << 20;
/// Virtual addresses reported per match (aliases beyond are counted only).
const MAX_VAS: usize = 8;

/// One hit inside a block, as a [`Matcher`] reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Hit {
    /// Offset in the block.
    pub offset: usize,
    /// Which pattern (index into the matcher's names).
    pub pattern: usize,
    /// Length of the matched bytes.
    pub len: usize,
}

/// Something that finds matches in a block of bytes. The scanner guarantees
/// that every stretch of memory up to `max_len` bytes long lies whole in some
/// block (each block starts at least `max_len - 1` bytes before the part it
/// owns) and keeps a hit only in the block that owns its last byte. `Sync`,
/// so several threads can search with one matcher.
pub trait Matcher {
    /// Longest match this matcher can report (sets the block overlap).
    fn max_len(&self) -> usize;
    /// Whether all-zero memory can match (then zero memory is scanned too).
    fn matches_zeros(&self) -> bool;
    /// Appends every match in `block` to `out`.
    fn find(&self, block: &[u8], out: &mut Vec<Hit>);
    /// A printable name for pattern `id`.
    fn name(&self, id: usize) -> &str;
}

/// A literal byte pattern with a name for reports.
#[derive(Clone, Debug)]
pub struct Pattern {
    /// How the user wrote it (`string "..."`, `hex ...`).
    pub name: String,
    /// The bytes searched for.
    pub bytes: Vec<u8>,
}

impl Pattern {
    /// The UTF-8 bytes of `s`.
    pub fn string(s: &str) -> Result<Self> {
        Self::checked(format!("string {s:?}"), s.as_bytes().to_vec())
    }

    /// Hex digits, optionally with a `0x` prefix and spaces (`"de ad be ef"`).
    pub fn hex(h: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadPattern { pattern: h.to_string(), reason: reason.to_string() };
        let t = h.trim();
        let t = t.strip_prefix("0x").unwrap_or(t);
        let digits: Vec<u8> = t.bytes().filter(|b| !b.is_ascii_whitespace()).collect();
        if !digits.len().is_multiple_of(2) {
            return Err(bad("odd number of hex digits"));
        }
        let val = |d: u8| (d as char).to_digit(16).map(|v| v as u8);
        let mut bytes = Vec::with_capacity(digits.len() / 2);
        for pair in digits.chunks_exact(2) {
            match (val(pair[0]), val(pair[1])) {
                (Some(a), Some(b)) => bytes.push(a << 4 | b),
                _ => return Err(bad("not a hex digit")),
            }
        }
        Self::checked(format!("hex {}", crate::read::hex(&bytes)), bytes)
    }

    fn checked(name: String, bytes: Vec<u8>) -> Result<Self> {
        if bytes.is_empty() || bytes.len() > MAX_PATTERN {
            return Err(Error::BadPattern { pattern: name, reason: format!("must be 1..={MAX_PATTERN} bytes") });
        }
        Ok(Pattern { name, bytes })
    }
}

/// A set of literal patterns, each searched with a SIMD substring finder.
pub struct Literals {
    pats: Vec<(Pattern, Finder<'static>)>,
}

impl Literals {
    /// The matcher for `patterns` (at least one).
    pub fn new(patterns: Vec<Pattern>) -> Result<Self> {
        if patterns.is_empty() {
            return Err(Error::BadPattern { pattern: String::new(), reason: "no pattern given".into() });
        }
        let pats = patterns
            .into_iter()
            .map(|p| {
                let f = Finder::new(&p.bytes).into_owned();
                (p, f)
            })
            .collect();
        Ok(Literals { pats })
    }
}

impl Matcher for Literals {
    fn max_len(&self) -> usize {
        self.pats.iter().map(|(p, _)| p.bytes.len()).max().unwrap_or(1)
    }

    fn matches_zeros(&self) -> bool {
        self.pats.iter().any(|(p, _)| p.bytes.iter().all(|&b| b == 0))
    }

    fn find(&self, block: &[u8], out: &mut Vec<Hit>) {
        // Bounded: a short or zero pattern can match at nearly every byte
        // (256 one-byte zero patterns once took gigabytes per block).
        let start = out.len();
        for (id, (p, f)) in self.pats.iter().enumerate() {
            let room = MAX_BLOCK_HITS.saturating_sub(out.len() - start);
            out.extend(f.find_iter(block).take(room).map(|offset| Hit { offset, pattern: id, len: p.bytes.len() }));
        }
    }

    fn name(&self, id: usize) -> &str {
        self.pats.get(id).map_or("?", |(p, _)| p.name.as_str())
    }
}

/// How to scan.
#[derive(Clone, Copy, Debug)]
pub struct ScanOptions {
    /// Bytes read per block (rounded up to whole pages).
    pub block_size: usize,
    /// Matches kept in the report (all are counted).
    pub max_matches: usize,
    /// Page tables used to name the virtual addresses of each match.
    pub paging: Option<PagingContext>,
    /// Threads searching at once (each with its own handle on the memory, when it can be
    /// shared; see [`PhysMem::try_clone`]).
    pub threads: usize,
}

impl Default for ScanOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map_or(1, |n| n.get()).min(8);
        ScanOptions { block_size: 8 << 20, max_matches: 1000, paging: None, threads }
    }
}

/// One match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    /// The YARA rule whose pattern matched (`None` for `--string`/`--hex` patterns).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The pattern's name (`$a` for a YARA pattern).
    pub pattern: String,
    /// Physical address of the first matched byte.
    pub pa: u64,
    /// Matched bytes.
    pub len: u64,
    /// Virtual addresses that map `pa` in the given page tables (at most 8).
    pub va: Vec<u64>,
}

/// What [`scan`] found and what it cost.
#[derive(Clone, Debug, Serialize)]
pub struct ScanReport {
    /// Matches in physical-address order (at most `max_matches`).
    pub matches: Vec<Match>,
    /// All matches found, including those not kept.
    pub total_matches: u64,
    /// Whether matches were dropped because of `max_matches`.
    pub truncated: bool,
    /// Guest RAM in the image.
    pub ram_bytes: u64,
    /// Bytes searched (data extents and their margins; block overlaps not counted twice).
    pub bytes_scanned: u64,
    /// Block size used.
    pub block_size: u64,
    /// Threads that searched.
    pub threads: usize,
    /// Page tables used for virtual addresses, if any.
    pub paging: Option<PagingContext>,
    /// Wall time of the scan (reading, decoding and searching).
    pub elapsed_secs: f64,
    /// YARA rules that matched and what the rule set needed (only for a `--rules` scan).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub yara: Option<crate::yara::YaraSummary>,
}

/// RAM ranges joined where adjacent: memory a match may run across.
pub(crate) fn spans(mem: &dyn PhysMem) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for r in mem.ranges() {
        match out.last_mut() {
            Some(last) if last.1 == r.start => last.1 = r.start + r.len,
            _ => out.push((r.start, r.start + r.len)),
        }
    }
    out
}

/// The (start, end) stretches to read: each data extent widened by `pad` bytes both ways,
/// clipped to its span of RAM, merged where they touch.
pub(crate) fn segments(spans: &[(u64, u64)], extents: &[(u64, u64)], pad: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for &(s, len) in extents {
        let e = s.saturating_add(len);
        for &(a, b) in spans.iter().filter(|(a, b)| *a < e && s < *b) {
            let seg = (s.max(a).saturating_sub(pad).max(a), e.min(b).saturating_add(pad).min(b));
            match out.last_mut() {
                Some(last) if last.1 >= seg.0 && last.0 >= a => last.1 = last.1.max(seg.1),
                _ => out.push(seg),
            }
        }
    }
    out
}

/// Searches all of guest memory for `matcher`'s patterns, on `opts.threads` threads.
pub fn scan(mem: &mut dyn PhysMem, matcher: &(dyn Matcher + Sync), opts: &ScanOptions) -> Result<ScanReport> {
    let t0 = Instant::now();
    let page = ferry_image::PAGE_SIZE as usize;
    let block = opts.block_size.max(1).div_ceil(page) * page;
    let overlap = matcher.max_len().saturating_sub(1);
    let spans = spans(mem);
    let segs = if matcher.matches_zeros() {
        spans.clone()
    } else {
        let pad = (overlap as u64).div_ceil(page as u64) * page as u64;
        segments(&spans, &mem.data_extents()?, pad)
    };
    // Independent blocks: each reads `pad` bytes before its start again, so blocks can be
    // searched in any order and on any thread; a hit belongs to the block holding its last byte.
    let pad = (overlap as u64).div_ceil(page as u64) * page as u64;
    let mut blocks = Vec::new();
    for (start, end) in segs {
        let mut a = start;
        while a < end {
            let b = end.min(a + block as u64);
            blocks.push(Block { from: start.max(a.saturating_sub(pad)), start: a, end: b });
            a = b;
        }
    }
    let next = AtomicUsize::new(0);
    let mut helpers: Vec<Box<dyn PhysMem + Send>> = Vec::new();
    for _ in 1..opts.threads.clamp(1, 64).min(blocks.len()) {
        match mem.try_clone()? {
            Some(m) => helpers.push(m),
            None => break,
        }
    }
    let ctx = Ctx { blocks: &blocks, next: &next, matcher, pad, block, max: opts.max_matches };
    let nthreads = helpers.len() + 1;
    let results: Vec<Result<Found>> = std::thread::scope(|s| {
        let handles: Vec<_> = helpers.into_iter().map(|mut m| s.spawn(move || ctx.work(&mut *m))).collect();
        let mut out = vec![ctx.work(mem)];
        for h in handles {
            out.push(
                h.join().unwrap_or_else(|_| Err(Error::BadLength { len: 0, reason: "scan thread failed".into() })),
            );
        }
        out
    });
    let (mut found, mut total, mut scanned) = (Vec::new(), 0u64, 0u64);
    for r in results {
        let f = r?;
        found.extend(f.hits);
        total += f.total;
        scanned += f.scanned;
    }
    found.sort_unstable();
    found.truncate(opts.max_matches);
    let matches = found
        .into_iter()
        .map(|(pa, id, len)| Match {
            rule: None,
            pattern: matcher.name(id).to_string(),
            pa,
            len: len as u64,
            va: vec![],
        })
        .collect();
    let matches = with_virtual_addresses(mem, opts.paging.as_ref(), matches)?;
    Ok(ScanReport {
        matches,
        total_matches: total,
        truncated: total > opts.max_matches as u64,
        ram_bytes: mem.ranges().iter().map(|r| r.len).sum(),
        bytes_scanned: scanned,
        block_size: block as u64,
        threads: nthreads,
        paging: opts.paging,
        elapsed_secs: t0.elapsed().as_secs_f64(),
        yara: None,
    })
}

/// Fills in the virtual addresses that map each match in the page tables `paging` (if any).
pub(crate) fn with_virtual_addresses(
    mem: &mut dyn PhysMem,
    paging: Option<&PagingContext>,
    mut matches: Vec<Match>,
) -> Result<Vec<Match>> {
    if let Some(ctx) = paging {
        let index = PaIndex::new(maps(mem, ctx)?.runs);
        for m in &mut matches {
            m.va = index.vas(m.pa);
        }
    }
    Ok(matches)
}

/// One stretch to search: bytes `from..end` are read, hits ending after `start` count.
struct Block {
    from: u64,
    start: u64,
    end: u64,
}

/// What one worker found: (physical address, pattern, length), the first `max` in address order.
struct Found {
    hits: Vec<(u64, usize, usize)>,
    total: u64,
    scanned: u64,
}

/// Shared by the scan's workers.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    blocks: &'a [Block],
    next: &'a AtomicUsize,
    matcher: &'a (dyn Matcher + Sync),
    pad: u64,
    block: usize,
    max: usize,
}

impl Ctx<'_> {
    /// Takes blocks (in address order) until none are left.
    fn work(&self, mem: &mut dyn PhysMem) -> Result<Found> {
        let mut buf = vec![0u8; self.pad as usize + self.block];
        let mut f = Found { hits: Vec::new(), total: 0, scanned: 0 };
        let mut hits = Vec::new();
        loop {
            let i = self.next.fetch_add(1, Ordering::Relaxed);
            let Some(b) = self.blocks.get(i) else {
                return Ok(f);
            };
            let len = (b.end - b.from) as usize;
            mem.read(b.from, &mut buf[..len])?;
            f.scanned += b.end - b.start;
            hits.clear();
            self.matcher.find(&buf[..len], &mut hits);
            hits.sort_unstable();
            for h in hits.iter().filter(|h| b.from + (h.offset + h.len) as u64 > b.start) {
                f.total += 1;
                if f.hits.len() < self.max {
                    f.hits.push((b.from + h.offset as u64, h.pattern, h.len));
                }
            }
        }
    }
}

/// Mapped runs sorted by physical address, for physical-to-virtual lookups.
struct PaIndex {
    runs: Vec<MapRun>,
    /// `max_end[i]` = largest physical end among `runs[..=i]`.
    max_end: Vec<u64>,
}

impl PaIndex {
    fn new(mut runs: Vec<MapRun>) -> Self {
        runs.sort_by_key(|r| (r.pa_start, r.va_start));
        let mut m = 0u64;
        let max_end = runs
            .iter()
            .map(|r| {
                m = m.max(r.pa_start.saturating_add(r.len()));
                m
            })
            .collect();
        PaIndex { runs, max_end }
    }

    /// Virtual addresses mapping `pa`, lowest first.
    fn vas(&self, pa: u64) -> Vec<u64> {
        let mut i = self.runs.partition_point(|r| r.pa_start <= pa);
        let mut out = Vec::new();
        while i > 0 && self.max_end[i - 1] > pa {
            i -= 1;
            if let Some(va) = self.runs[i].va_of(pa) {
                out.push(va);
            }
        }
        out.sort_unstable();
        out.truncate(MAX_VAS);
        out
    }
}
