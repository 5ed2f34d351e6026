//! Redaction: a copy of an image with chosen bytes overwritten, so an image
//! can be shared without what is private in it.
//!
//! What to overwrite comes from physical ranges and from matches of literal
//! strings and hex patterns ([`scan`]) and of a YARA rule set
//! ([`scan_yara`]: the matches of the rules whose conditions hold), found
//! over the input's final contents. The input may be a
//! chain; the output is always a *full* image (no parent: a child of the
//! unredacted parent would still reveal the parent's bytes, and a reader
//! would need the parent) with the leaf's VM configuration, RAM layout,
//! codec, chunk size, VM state and vCPU registers, and a new image id and
//! root hash. Every page is copied unchanged except the bytes redacted, so
//! the redacted image restores like the original. An encrypted input is
//! re-encrypted with the same key under a fresh data key.
//!
//! The input chain is verified first (every chunk and section hash, the
//! root), so a corrupt image is never laundered into a validly hashed copy.
//! The output is checked before it gets its name: it is reopened, verified
//! (every chunk hash and the root), and scanned again with the same patterns and rules;
//! a match left (e.g. a pattern made of the fill byte) fails the redaction.
//! The [`RedactReport`] (what was overwritten: addresses, lengths and which
//! range, pattern index or rule caused it, never the bytes) is written next
//! to the image as `<image>.redaction.json`, and both appear under their
//! final names only when everything succeeded (temp names in the same
//! directory, fsync, rename, fsync of the directory).

use std::ffi::OsString;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Instant;

use ferry_image::{
    check_output_path, Hash32, ImageHeaderInput, ImageSummary, ImageWriter, UserKey, WriteOptions, PAGE_SIZE,
};
use serde::Serialize;

use crate::error::{Error, Result};
use crate::mem::{ImageMem, PhysMem};
use crate::scan::{scan, Literals, Match, Pattern, ScanOptions, ScanReport};
use crate::yara::{scan_yara, YaraRules};

/// Most matches one redaction overwrites; beyond it the redaction fails
/// (rather than leave matches behind) and the patterns need narrowing.
pub const MAX_REDACTIONS: usize = 1 << 20;
/// Bytes copied per block while writing the redacted image.
const BLOCK: usize = 8 << 20;
/// Version tag of the report's JSON, for tools that read it.
pub const REPORT_FORMAT: &str = "ferry-redaction/1";

/// A guest-physical byte range to overwrite, `start..end` (end exclusive).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PhysRange {
    /// First byte.
    pub start: u64,
    /// One past the last byte.
    pub end: u64,
}

impl FromStr for PhysRange {
    type Err = Error;

    /// `START..END` (end exclusive) or `START+LEN`; numbers in decimal or `0x` hex.
    fn from_str(s: &str) -> Result<Self> {
        let bad = |reason: &str| Error::BadRange { range: s.to_string(), reason: reason.to_string() };
        let num = |t: &str| -> Result<u64> {
            let t = t.trim().replace('_', "");
            let v = match t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
                Some(h) => u64::from_str_radix(h, 16),
                None => t.parse(),
            };
            v.map_err(|_| bad("addresses are decimal or 0x-prefixed hex"))
        };
        let (start, end) = if let Some((a, b)) = s.split_once("..") {
            (num(a)?, num(b)?)
        } else if let Some((a, n)) = s.split_once('+') {
            let a = num(a)?;
            (a, a.checked_add(num(n)?).ok_or_else(|| bad("START+LEN overflows"))?)
        } else {
            return Err(bad("write START..END (end exclusive) or START+LEN"));
        };
        if end <= start {
            return Err(bad("the range is empty (END must be above START)"));
        }
        Ok(PhysRange { start, end })
    }
}

/// What to redact and how.
#[derive(Default)]
pub struct RedactSpec<'a> {
    /// Physical ranges overwritten whole.
    pub ranges: Vec<PhysRange>,
    /// Literal patterns (`--string`, `--hex`); every match is overwritten. Reported by
    /// index and kind only: their names hold the secret.
    pub patterns: Vec<Pattern>,
    /// A YARA rule set: the matches of the rules whose conditions hold are overwritten,
    /// reported by rule name.
    pub rules: Option<&'a YaraRules>,
    /// The byte written over redacted bytes.
    pub fill: u8,
    /// Threads scanning for matches (0: the CPUs, at most 8).
    pub threads: usize,
    /// Called at the start of each step and, while writing, now and then with
    /// (step, bytes written, bytes to write), for a progress line.
    pub progress: Option<&'a dyn Fn(RedactStep, u64, u64)>,
}

/// The steps of a redaction, as progress reports them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RedactStep {
    /// Verifying the input chain.
    VerifyInput,
    /// Searching the input for matches.
    Scan,
    /// Writing the copy.
    Write,
    /// Verifying and searching the copy.
    Check,
}

impl std::fmt::Display for RedactStep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            RedactStep::VerifyInput => "verifying the input",
            RedactStep::Scan => "searching for matches",
            RedactStep::Write => "writing the copy",
            RedactStep::Check => "checking the copy",
        })
    }
}

/// Why some bytes were redacted.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Cause {
    /// The `index`-th `--range`.
    Range {
        /// Index among the ranges given.
        index: usize,
    },
    /// A match of the `index`-th literal pattern (`--string`/`--hex`, in that order).
    Pattern {
        /// Index among the patterns given.
        index: usize,
    },
    /// A match of a rule.
    Rule {
        /// The rule's name.
        rule: String,
    },
}

/// One stretch of overwritten bytes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Redaction {
    /// Physical address of the first byte.
    pub start: u64,
    /// Bytes overwritten.
    pub len: u64,
    /// What asked for it (flattened: `kind` and `index` or `rule`).
    #[serde(flatten)]
    pub cause: Cause,
}

/// A literal pattern as the report shows it: never its bytes.
#[derive(Clone, Debug, Serialize)]
pub struct PatternInfo {
    /// Index, as in [`Cause::Pattern`].
    pub index: usize,
    /// `string` or `hex`.
    pub kind: String,
    /// Length in bytes.
    pub len: usize,
    /// Matches found and overwritten.
    pub matches: u64,
}

/// A rule of a rule set whose matches were redacted.
#[derive(Clone, Debug, Serialize)]
pub struct RuleInfo {
    /// `namespace:rule`, or the rule's name.
    pub rule: String,
    /// Matches overwritten.
    pub matches: u64,
}

/// One member of the input chain.
#[derive(Clone, Debug, Serialize)]
pub struct SourceImage {
    /// The file.
    pub path: PathBuf,
    /// Its root hash.
    pub root_hash: Hash32,
}

/// What a redaction did: written next to the image and printed by `--json`.
/// Holds addresses, lengths and causes, never redacted bytes.
#[derive(Clone, Debug, Serialize)]
pub struct RedactReport {
    /// [`REPORT_FORMAT`].
    pub format: &'static str,
    /// The redacted image.
    pub output: PathBuf,
    /// Where this report is kept.
    pub report_path: PathBuf,
    /// Root hash of the redacted image.
    pub output_root_hash: Hash32,
    /// The input chain, full image first, the image given last.
    pub source: Vec<SourceImage>,
    /// Whether the output is encrypted (exactly when the input is).
    pub encrypted: bool,
    /// The fill byte.
    pub fill: u8,
    /// The ranges given.
    pub ranges: Vec<PhysRange>,
    /// The literal patterns given (kind and length only).
    pub patterns: Vec<PatternInfo>,
    /// Matches per rule, for a rule set.
    pub rules: Vec<RuleInfo>,
    /// Every range and match, in address order (overlaps are listed per cause).
    pub redactions: Vec<Redaction>,
    /// Distinct bytes overwritten (overlaps counted once).
    pub bytes_redacted: u64,
    /// Pages holding at least one redacted byte.
    pub pages_touched: u64,
    /// Matches found when the written image was scanned again (always 0 in a report that exists).
    pub matches_after: u64,
    /// Figures of the image write.
    pub image: ImageSummary,
    /// Bytes of guest memory searched for matches.
    pub bytes_scanned: u64,
    /// Where the time went.
    pub phases: Phases,
    /// Wall time of the whole redaction (scan, write, check).
    pub elapsed_secs: f64,
}

/// Wall time of each step of a redaction, in seconds.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Phases {
    /// Verifying the input chain (every chunk and section hash).
    pub verify_input_secs: f64,
    /// Searching the input for matches.
    pub scan_secs: f64,
    /// Reading, overwriting and writing the copy (compression, encryption, hashing).
    pub write_secs: f64,
    /// Verifying the copy and searching it again.
    pub check_secs: f64,
}

/// The literal patterns renamed by a tag holding their index (their names hold the secret,
/// and a match's name is how [`cause`] finds its pattern again).
fn literals(patterns: &[Pattern]) -> Result<Option<Literals>> {
    if patterns.is_empty() {
        return Ok(None);
    }
    let tagged =
        patterns.iter().enumerate().map(|(i, p)| Pattern { name: format!("#{i}"), bytes: p.bytes.clone() }).collect();
    Ok(Some(Literals::new(tagged)?))
}

/// Why a match is redacted: its rule, or the literal pattern its tag names.
fn cause(m: &Match) -> Cause {
    match (&m.rule, m.pattern.strip_prefix('#').and_then(|i| i.parse().ok())) {
        (Some(rule), _) => Cause::Rule { rule: rule.clone() },
        (None, Some(index)) => Cause::Pattern { index },
        (None, None) => Cause::Rule { rule: m.pattern.clone() },
    }
}

/// Searches `mem` with the literal patterns and the rules, one report each.
fn find(
    mem: &mut ImageMem,
    lits: Option<&Literals>,
    rules: Option<&YaraRules>,
    opts: &ScanOptions,
) -> Result<Vec<ScanReport>> {
    let mut out = Vec::new();
    if let Some(l) = lits {
        out.push(scan(mem, l, opts)?);
    }
    if let Some(r) = rules {
        out.push(scan_yara(mem, r, opts, &mut |_, _| {})?);
    }
    Ok(out)
}

/// Canonical form of a path that may not exist yet (its directory must).
fn canonical(p: &Path) -> Option<PathBuf> {
    if let Ok(c) = p.canonicalize() {
        return Some(c);
    }
    let dir = match p.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    Some(dir.canonicalize().ok()?.join(p.file_name()?))
}

/// `<name><suffix>` beside `p`.
fn with_suffix(p: &Path, suffix: &str) -> PathBuf {
    let mut n: OsString = p.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    n.push(suffix);
    p.with_file_name(n)
}

/// What temp files of a redaction are called: `<out>.redact-tmp-<pid>` and
/// `<out>.redaction.json.redact-tmp-<pid>`.
const TMP_MARK: &str = ".redact-tmp-";

/// Removes the temp files of earlier redactions to `out` by processes that no longer
/// exist (killed: nothing ran their cleanup). Those of live processes are left alone.
fn remove_stale_temps(out: &Path) {
    let (Some(dir), Some(name)) = (out.parent(), out.file_name().and_then(|n| n.to_str())) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    let report = format!("{name}.redaction.json");
    for e in entries.flatten() {
        let file = e.file_name();
        let Some(f) = file.to_str() else { continue };
        let pid = [name, report.as_str()].iter().find_map(|base| f.strip_prefix(base)?.strip_prefix(TMP_MARK));
        let Some(Ok(pid)) = pid.map(|p| p.parse::<u32>()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Where the report of a redacted image `out` is kept: `<out>.redaction.json`.
pub fn report_path(out: &Path) -> PathBuf {
    with_suffix(out, ".redaction.json")
}

/// Removes the temp files on every path out unless disarmed.
struct Temps(Vec<PathBuf>);

impl Drop for Temps {
    fn drop(&mut self) {
        for p in &self.0 {
            let _ = std::fs::remove_file(p);
        }
    }
}

fn io<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(std::io::Error) -> Error + 'a {
    move |source| Error::Io { what, path: path.to_path_buf(), source }
}

/// Sorted, merged (start, end) byte extents of `reds`.
fn merge(reds: &[Redaction]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = reds.iter().map(|r| (r.start, r.start + r.len)).collect();
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Page-aligned (start, end) stretches to copy: the data extents and the redacted pages, merged.
fn stretches(data: &[(u64, u64)], redacted: &[(u64, u64)]) -> Vec<(u64, u64)> {
    let mut v: Vec<(u64, u64)> = data.iter().map(|&(s, l)| (s, s + l)).collect();
    v.extend(redacted.iter().map(|&(s, e)| (s / PAGE_SIZE * PAGE_SIZE, e.div_ceil(PAGE_SIZE) * PAGE_SIZE)));
    v.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(v.len());
    for (s, e) in v {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out
}

/// Overwrites the redacted bytes that fall into `buf` (guest memory from `at`) with `fill`.
fn apply(buf: &mut [u8], at: u64, redacted: &[(u64, u64)], fill: u8) {
    let end = at + buf.len() as u64;
    let first = redacted.partition_point(|&(_, e)| e <= at);
    for &(s, e) in redacted[first..].iter().take_while(|&&(s, _)| s < end) {
        let (a, b) = (s.max(at) - at, e.min(end) - at);
        buf[a as usize..b as usize].fill(fill);
    }
}

/// Writes a redacted copy of the image at `input` (and its parents) to `out`, and its report
/// to [`report_path`]`(out)`. `key` opens an encrypted input and encrypts the output.
pub fn redact(input: &Path, out: &Path, key: Option<&UserKey>, spec: &RedactSpec<'_>) -> Result<RedactReport> {
    let t0 = Instant::now();
    if spec.ranges.is_empty() && spec.patterns.is_empty() && spec.rules.is_none() {
        return Err(Error::NothingToRedact);
    }
    check_output_path(out)?;
    let report_at = report_path(out);
    check_output_path(&report_at)?;
    let mut mem = ImageMem::open(input, key)?;
    let source: Vec<SourceImage> = mem
        .chain()
        .images()
        .iter()
        .map(|i| SourceImage {
            path: i.path().canonicalize().unwrap_or_else(|_| i.path().to_path_buf()),
            root_hash: i.root_hash(),
        })
        .collect();
    // Never write over any member of the chain being read (nor its report over one).
    let out_c = canonical(out);
    let rep_c = canonical(&report_at);
    for s in &source {
        let c = canonical(&s.path);
        if c.is_some() && (c == out_c || c == rep_c) {
            return Err(Error::OutputIsInput { output: out.to_path_buf(), input: s.path.clone() });
        }
    }
    let leaf = mem.chain().leaf();
    let header = leaf.header().clone();
    if leaf.is_encrypted() && key.is_none() {
        return Err(ferry_image::Error::KeyRequired { path: leaf.path().to_path_buf(), what: "redaction" }.into());
    }
    for r in &spec.ranges {
        if !mem.contains(r.start, r.end - r.start) {
            return Err(crate::mem::outside(mem.ranges(), r.start, r.end - r.start));
        }
    }
    // A corrupt input must not come out re-hashed as a valid image: check every member first.
    let mut phases = Phases::default();
    let t = Instant::now();
    let step = |s: RedactStep| {
        if let Some(p) = spec.progress {
            p(s, 0, 0);
        }
    };
    step(RedactStep::VerifyInput);
    mem.chain().verify()?;
    phases.verify_input_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    step(RedactStep::Scan);

    // 1. Where: the ranges, then every match.
    let mut reds: Vec<Redaction> = spec
        .ranges
        .iter()
        .enumerate()
        .map(|(index, r)| Redaction { start: r.start, len: r.end - r.start, cause: Cause::Range { index } })
        .collect();
    let mut pinfo: Vec<PatternInfo> = spec
        .patterns
        .iter()
        .enumerate()
        .map(|(index, p)| PatternInfo {
            index,
            kind: p.name.split(' ').next().unwrap_or("pattern").to_string(),
            len: p.bytes.len(),
            matches: 0,
        })
        .collect();
    let mut rules: Vec<RuleInfo> = Vec::new();
    let threads = if spec.threads == 0 { ScanOptions::default().threads } else { spec.threads };
    let opts = ScanOptions { max_matches: MAX_REDACTIONS, paging: None, threads, ..ScanOptions::default() };
    let lits = literals(&spec.patterns)?;
    let mut bytes_scanned = 0;
    for r in find(&mut mem, lits.as_ref(), spec.rules, &opts)? {
        if r.truncated {
            return Err(Error::TooManyMatches { found: r.total_matches, max: MAX_REDACTIONS });
        }
        bytes_scanned += r.bytes_scanned;
        for m in r.matches {
            let cause = cause(&m);
            match &cause {
                Cause::Pattern { index } => {
                    if let Some(p) = pinfo.get_mut(*index) {
                        p.matches += 1;
                    }
                }
                Cause::Rule { rule } => match rules.iter_mut().find(|r| r.rule == *rule) {
                    Some(e) => e.matches += 1,
                    None => rules.push(RuleInfo { rule: rule.clone(), matches: 1 }),
                },
                Cause::Range { .. } => {}
            }
            reds.push(Redaction { start: m.pa, len: m.len, cause });
        }
    }
    phases.scan_secs = t.elapsed().as_secs_f64();
    reds.sort_by_key(|r| (r.start, r.len));
    let redacted = merge(&reds);
    let bytes_redacted = redacted.iter().map(|(s, e)| e - s).sum();
    let mut pages: Vec<u64> = Vec::new();
    for &(s, e) in &redacted {
        for p in s / PAGE_SIZE..e.div_ceil(PAGE_SIZE) {
            if pages.last() != Some(&p) {
                pages.push(p);
            }
        }
    }

    // 2. Write the copy under a temp name (the writer itself writes a temp file and renames
    // it to this one), so nothing appears under `out` before the check below.
    remove_stale_temps(out);
    let tmp_img = with_suffix(out, &format!("{TMP_MARK}{}", std::process::id()));
    let tmp_rep = with_suffix(&report_at, &format!("{TMP_MARK}{}", std::process::id()));
    let mut temps = Temps(vec![tmp_img.clone(), tmp_rep.clone()]);
    let wopts = WriteOptions {
        codec: header.codec,
        chunk_size: header.chunk_size,
        key: if header.encryption.is_some() { key.cloned() } else { None },
        threads: 0,
    };
    let input_hdr =
        ImageHeaderInput { vm_config: header.vm_config.clone(), ranges: header.ranges.clone(), parent: None };
    let t = Instant::now();
    step(RedactStep::Write);
    let chain = mem.chain();
    let todo = stretches(&chain.data_extents(), &redacted);
    let total: u64 = todo.iter().map(|(s, e)| e - s).sum();
    let mut w = ImageWriter::create(&tmp_img, input_hdr, wopts)?;
    let mut buf = vec![0u8; BLOCK];
    let mut done = 0u64;
    for &(s, e) in &todo {
        let mut at = s;
        while at < e {
            let n = ((e - at) as usize).min(BLOCK);
            let b = &mut buf[..n];
            chain.read_at(at, b)?;
            apply(b, at, &redacted, spec.fill);
            w.write_pages(at, b)?;
            at += n as u64;
            done += n as u64;
            if let Some(p) = spec.progress {
                p(RedactStep::Write, done, total);
            }
        }
    }
    let state = chain.state()?;
    let cpus = chain.cpus()?;
    let summary = w.finish(&state, &cpus)?;
    drop(mem);
    phases.write_secs = t.elapsed().as_secs_f64();
    let t = Instant::now();
    step(RedactStep::Check);

    // 3. Check the copy: every hash, and no match left.
    let mut check = ImageMem::open(&tmp_img, key)?;
    check.chain().verify()?;
    let mut matches_after = 0;
    let few = ScanOptions { max_matches: 16, ..opts };
    for left in find(&mut check, lits.as_ref(), spec.rules, &few)? {
        matches_after += left.total_matches;
        if left.total_matches > 0 {
            let at = left.matches.first().map_or(0, |m| m.pa);
            return Err(Error::RedactionIncomplete { matches: left.total_matches, first: at, fill: spec.fill });
        }
    }
    drop(check);
    phases.check_secs = t.elapsed().as_secs_f64();

    let report = RedactReport {
        format: REPORT_FORMAT,
        output: out_c.clone().unwrap_or_else(|| out.to_path_buf()),
        report_path: rep_c.clone().unwrap_or_else(|| report_at.clone()),
        output_root_hash: summary.root_hash,
        source,
        encrypted: summary.encrypted,
        fill: spec.fill,
        ranges: spec.ranges.clone(),
        patterns: pinfo,
        rules,
        redactions: reds,
        bytes_redacted,
        pages_touched: pages.len() as u64,
        matches_after,
        image: ImageSummary { path: Some(out.to_path_buf()), ..summary },
        bytes_scanned,
        phases,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    };

    // 4. The report, then both renames, then the directory.
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Io {
        what: "encode report",
        path: tmp_rep.clone(),
        source: e.into(),
    })?;
    let mut f = OpenOptions::new().write(true).create_new(true).open(&tmp_rep).map_err(io("create", &tmp_rep))?;
    f.write_all(&json).map_err(io("write", &tmp_rep))?;
    f.sync_all().map_err(io("fsync", &tmp_rep))?;
    drop(f);
    std::fs::rename(&tmp_rep, &report_at).map_err(io("rename report into place", &tmp_rep))?;
    if let Err(e) = std::fs::rename(&tmp_img, out) {
        // An image without its report never appears; a report without its image says nothing.
        let _ = std::fs::remove_file(&report_at);
        return Err(Error::Io { what: "rename image into place", path: tmp_img, source: e });
    }
    temps.0.clear();
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    File::open(dir).and_then(|d| d.sync_all()).map_err(io("fsync directory", dir))?;
    Ok(report)
}
