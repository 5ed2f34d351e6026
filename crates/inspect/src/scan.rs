//! Searching guest memory for byte patterns.
//!
//! The scanner streams over guest-physical memory in blocks (never the whole
//! image at once) and reads only the extents that hold data, each widened by
//! the longest pattern minus one so that a match reaching into a zero page is
//! still seen. Consecutive blocks overlap by the longest pattern minus one, so
//! a match across any boundary (block, chunk, run, zero gap, adjacent RAM
//! ranges) is found exactly once. What is searched for is behind the
//! [`Matcher`] trait: [`Literals`] today, a YARA-X rule set later.

use std::time::Instant;

use memchr::memmem::Finder;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::maps::{maps, MapRun};
use crate::mem::PhysMem;
use crate::paging::PagingContext;

/// Longest literal pattern (bytes); it bounds the block overlap.
pub const MAX_PATTERN: usize = 4096;
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
/// block, and drops hits that lie whole in the previous block's overlap.
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
        for (id, (p, f)) in self.pats.iter().enumerate() {
            out.extend(f.find_iter(block).map(|offset| Hit { offset, pattern: id, len: p.bytes.len() }));
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
}

impl Default for ScanOptions {
    fn default() -> Self {
        ScanOptions { block_size: 8 << 20, max_matches: 1000, paging: None }
    }
}

/// One match.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Match {
    /// The pattern's name.
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
    /// Page tables used for virtual addresses, if any.
    pub paging: Option<PagingContext>,
    /// Wall time of the scan (reading, decoding and searching).
    pub elapsed_secs: f64,
}

/// RAM ranges joined where adjacent: memory a match may run across.
fn spans(mem: &dyn PhysMem) -> Vec<(u64, u64)> {
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
fn segments(spans: &[(u64, u64)], extents: &[(u64, u64)], pad: u64) -> Vec<(u64, u64)> {
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

/// Searches all of guest memory for `matcher`'s patterns.
pub fn scan(mem: &mut dyn PhysMem, matcher: &dyn Matcher, opts: &ScanOptions) -> Result<ScanReport> {
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
    let mut found: Vec<(u64, usize, usize)> = Vec::new();
    let mut total = 0u64;
    let mut scanned = 0u64;
    let mut buf: Vec<u8> = Vec::with_capacity(overlap + block);
    let mut hits = Vec::new();
    for (start, end) in segs {
        buf.clear();
        let mut carry = 0usize;
        let mut pos = start;
        while pos < end {
            let n = block.min((end - pos) as usize);
            buf.resize(carry + n, 0);
            mem.read(pos, &mut buf[carry..])?;
            scanned += n as u64;
            hits.clear();
            matcher.find(&buf, &mut hits);
            hits.sort_unstable();
            let base = pos - carry as u64;
            for h in hits.iter().filter(|h| h.offset + h.len > carry) {
                total += 1;
                if found.len() < opts.max_matches {
                    found.push((base + h.offset as u64, h.pattern, h.len));
                }
            }
            let keep = overlap.min(buf.len());
            let from = buf.len() - keep;
            buf.copy_within(from.., 0);
            buf.truncate(keep);
            carry = keep;
            pos += n as u64;
        }
    }
    let index = match &opts.paging {
        Some(ctx) => Some(PaIndex::new(maps(mem, ctx)?.runs)),
        None => None,
    };
    let matches = found
        .into_iter()
        .map(|(pa, id, len)| Match {
            pattern: matcher.name(id).to_string(),
            pa,
            len: len as u64,
            va: index.as_ref().map(|i| i.vas(pa)).unwrap_or_default(),
        })
        .collect();
    Ok(ScanReport {
        matches,
        total_matches: total,
        truncated: total > opts.max_matches as u64,
        ram_bytes: mem.ranges().iter().map(|r| r.len).sum(),
        bytes_scanned: scanned,
        block_size: block as u64,
        paging: opts.paging,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    })
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
