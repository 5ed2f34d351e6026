//! Incremental scanning of a running guest ("watches").
//!
//! A watch holds its own [`DirtyView`] of the VM's dirty log (consumer
//! `watch`), so reading it never takes pages from the snapshot lineage or a
//! migration: an incremental snapshot taken while a watch runs stays
//! complete. The first pass scans all of RAM; each later pass takes the
//! view (the pages written since the previous pass) and scans only those,
//! each widened by the longest pattern on both sides (the scanner's margin),
//! so a match across a dirty/clean page boundary is still found. A pass
//! reports the matches that are new: not there at the end of the previous
//! pass (a known match in a rewritten page that is gone is forgotten, so it
//! is new again if it comes back).
//!
//! Watches are bounded in number ([`Watches::new`]) and expire when nobody
//! asked for a pass for a while, so a client that went away does not keep
//! a dirty view (and its bitmap) alive forever.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ferry_vmm::dirty::Bitmap;
use ferry_vmm::{DirtyConsumer, DirtyView, Vm};
use serde::{Deserialize, Serialize};

use crate::live::LiveMem;
use crate::paging::PagingContext;
use crate::scan::{scan, with_virtual_addresses, Literals, Match, Matcher, Pattern, ScanOptions, ScanReport};
use crate::yara::{scan_yara, YaraRules, MAX_RULES_FILE};
use crate::yara_watch::{clean_hits, yara_pass, MAX_KNOWN_HITS};

const PAGE: u64 = 4096;
/// Matches a watch remembers (to tell new ones from old); beyond, new
/// matches are still reported but the oldest are not remembered.
pub const MAX_KNOWN: usize = 100_000;
/// Patterns in one request.
pub const MAX_PATTERNS: usize = 256;
/// Matches one pass or scan lists at most.
pub const MAX_LISTED: usize = 10_000;
/// Longest idle time a watch may ask for (two days).
pub const MAX_WATCH_IDLE_S: u64 = 2 * 86_400;
/// Longest name a request may give its rules (it is repeated in messages).
pub const MAX_RULES_ORIGIN: usize = 256;

/// What to look for in a live scan or watch (the body of `PUT /vm/scan` and
/// `PUT /vm/scan/watch`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ScanRequest {
    /// Text patterns (their UTF-8 bytes).
    #[serde(default)]
    pub strings: Vec<String>,
    /// Hex byte patterns (`"deadbeef"`, `"0xde ad"`).
    #[serde(default)]
    pub hex: Vec<String>,
    /// YARA rules as source text (what a `.yar` file holds), instead of `strings`/`hex`:
    /// the client sends the text, so the VMM never opens a file a client names.
    #[serde(default)]
    pub rules: Option<String>,
    /// A name for `rules` in messages (the CLI sends the file's name).
    #[serde(default)]
    pub rules_origin: Option<String>,
    /// Name virtual addresses through this vCPU's page tables (read during a short pause).
    #[serde(default)]
    pub vcpu: Option<usize>,
    /// Matches listed (all are counted); default and maximum [`MAX_LISTED`].
    #[serde(default)]
    pub max_matches: Option<usize>,
    /// A watch: end it after this many seconds without a pass (1..=[`MAX_WATCH_IDLE_S`];
    /// default the VMM's). A client that passes every 10 minutes asks for more than that.
    #[serde(default)]
    pub idle_s: Option<u64>,
}

/// What a live scan or watch looks for: literal patterns or YARA rules.
pub enum LiveMatcher {
    /// `strings` and `hex`.
    Literals(Literals),
    /// `rules`, compiled.
    Yara(Box<YaraRules>),
}

impl LiveMatcher {
    /// Whether it matches all-zero memory (then every free page matches, and a watch is refused).
    pub fn matches_zeros(&self) -> bool {
        match self {
            LiveMatcher::Literals(m) => m.matches_zeros(),
            LiveMatcher::Yara(r) => r.matches_zeros(),
        }
    }

    /// One scan of all of `mem`.
    pub fn scan(&self, mem: &mut dyn crate::PhysMem, opts: &ScanOptions) -> crate::Result<ScanReport> {
        match self {
            LiveMatcher::Literals(m) => scan(mem, m, opts),
            LiveMatcher::Yara(r) => scan_yara(mem, r, opts, &mut |_, _| {}),
        }
    }
}

impl ScanRequest {
    /// The matcher for the request: its rules, compiled, or its patterns; errors name the
    /// bad pattern or rule (file, line).
    pub fn matcher(&self) -> crate::Result<LiveMatcher> {
        let Some(src) = &self.rules else { return self.literals().map(LiveMatcher::Literals) };
        let refuse = |reason: String| crate::Error::BadPattern { pattern: String::new(), reason };
        if !self.strings.is_empty() || !self.hex.is_empty() {
            return Err(refuse("give YARA rules or strings/hex patterns, not both".into()));
        }
        if src.len() as u64 > MAX_RULES_FILE {
            return Err(refuse(format!("rules of {} bytes, more than the {MAX_RULES_FILE} allowed", src.len())));
        }
        let origin = match &self.rules_origin {
            Some(o) if o.len() > MAX_RULES_ORIGIN || o.chars().any(char::is_control) => {
                return Err(refuse(format!(
                    "rules_origin must be at most {MAX_RULES_ORIGIN} bytes without control characters"
                )))
            }
            Some(o) => o.as_str(),
            None => "rules",
        };
        Ok(LiveMatcher::Yara(Box::new(YaraRules::compile(src, origin)?)))
    }

    /// The literal patterns of the request.
    fn literals(&self) -> crate::Result<Literals> {
        if self.strings.len() + self.hex.len() > MAX_PATTERNS {
            return Err(crate::Error::BadPattern {
                pattern: String::new(),
                reason: format!("at most {MAX_PATTERNS} patterns per request"),
            });
        }
        let mut pats = Vec::new();
        for s in &self.strings {
            pats.push(Pattern::string(s)?);
        }
        for h in &self.hex {
            pats.push(Pattern::hex(h)?);
        }
        Literals::new(pats)
    }

    /// Matches to list: the request's, at most [`MAX_LISTED`].
    pub fn listed(&self) -> usize {
        self.max_matches.unwrap_or(MAX_LISTED).min(MAX_LISTED)
    }
}

/// Why a watch request failed.
#[derive(Debug, thiserror::Error)]
pub enum WatchError {
    /// The limit on watches is reached.
    #[error("too many watches: {max} are running (end one with DELETE /vm/scan/watch/ID, or wait for an idle one to expire)")]
    TooMany {
        /// The limit.
        max: usize,
    },
    /// No watch has this id (never made, ended, or expired).
    #[error("no watch {id}: it never existed, was ended, or expired after {idle_s} s without a pass (see idle_s)")]
    NoSuchWatch {
        /// The id asked for.
        id: u64,
        /// The expiry time.
        idle_s: u64,
    },
    /// Another client runs a pass of this watch now.
    #[error("watch {id} is running a pass for another client; try again when it ends")]
    PassRunning {
        /// The watch.
        id: u64,
    },
    /// The patterns cannot be watched.
    #[error("{0}")]
    Request(String),
    /// Scanning failed (a bad pattern, a page-table problem).
    #[error(transparent)]
    Inspect(#[from] crate::Error),
    /// The VMM failed (the dirty log).
    #[error("dirty log: {0}")]
    Vmm(#[from] ferry_vmm::Error),
}

impl WatchError {
    /// The HTTP status that fits: 400 bad request, 404 unknown watch, 409 busy, 500 VMM.
    pub fn status(&self) -> u16 {
        match self {
            WatchError::Request(_) | WatchError::Inspect(_) => 400,
            WatchError::NoSuchWatch { .. } => 404,
            WatchError::TooMany { .. } | WatchError::PassRunning { .. } => 409,
            WatchError::Vmm(_) => 500,
        }
    }
}

/// A match a pass reports as new.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct WatchMatch {
    /// The YARA rule whose pattern matched (absent for strings and hex).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The pattern's name.
    pub pattern: String,
    /// Physical address of the first byte.
    pub pa: u64,
    /// Matched bytes.
    pub len: u64,
    /// Virtual addresses mapping `pa` in the watch's page tables (at most 8).
    pub va: Vec<u64>,
    /// The pass that found it (1 = the first, full pass).
    pub pass: u64,
    /// When the pass that found it started (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
}

/// One pass of a watch: what it looked at, what it cost, what is new.
#[derive(Clone, Debug, Serialize)]
pub struct PassReport {
    /// The watch.
    pub watch: u64,
    /// Pass number (1 = the first, full pass).
    pub pass: u64,
    /// Whether this pass scanned all of RAM.
    pub full: bool,
    /// When the pass started (milliseconds since the Unix epoch).
    pub time_unix_ms: u64,
    /// Pages the guest wrote since the previous pass (all of RAM for the first).
    pub dirty_pages: u64,
    /// Pages read (the dirty ones and their margins).
    pub pages_scanned: u64,
    /// Bytes read.
    pub bytes_scanned: u64,
    /// Guest RAM.
    pub ram_bytes: u64,
    /// Time of the pass (taking the dirty view and scanning).
    pub scan_ms: f64,
    /// Matches not seen before (at most the request's `max_matches`).
    pub new_matches: Vec<WatchMatch>,
    /// New matches in all, including those not listed.
    pub new_total: u64,
    /// Matches the watch knows of after this pass.
    pub known_matches: u64,
    /// The page tables used for virtual addresses, if any.
    pub paging: Option<PagingContext>,
    /// YARA: the rules whose condition holds over all of memory after this pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub matching_rules: Option<Vec<String>>,
    /// YARA: rules that hold now and did not after the previous pass.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub new_rules: Option<Vec<String>>,
    /// YARA: known pattern matches in pages not written since, re-read so that conditions
    /// see all of memory (0 on a full pass).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refed_matches: Option<u64>,
}

/// A watch as listed or ended.
#[derive(Clone, Debug, Serialize)]
pub struct WatchInfo {
    /// Its id.
    pub watch: u64,
    /// Passes run.
    pub passes: u64,
    /// Matches it knows of.
    pub known_matches: u64,
    /// Seconds since its last pass.
    pub idle_s: f64,
    /// It ends after this many seconds without a pass.
    pub expires_after_s: u64,
}

/// One watch's state.
struct Watch {
    id: u64,
    view: DirtyView,
    matcher: LiveMatcher,
    /// YARA: every pattern match known over all of memory (address, length), to re-feed.
    hits: BTreeSet<(u64, u64)>,
    /// YARA: more matches than [`MAX_KNOWN_HITS`]; passes scan all of memory.
    hits_overflow: bool,
    /// YARA: the rules that held after the previous pass.
    rules_held: BTreeSet<String>,
    mem: LiveMem,
    vcpu: Option<usize>,
    paging: Option<PagingContext>,
    listed: usize,
    passes: u64,
    /// (address, pattern, length) of the matches seen and not rewritten since.
    known: BTreeSet<(u64, String, u64)>,
    last_poll: Instant,
    /// Ended after this long without a pass.
    idle: Duration,
}

fn unix_ms() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// Dirty bitmaps (one per region, region order) as sorted (start, bytes) runs of pages.
pub fn dirty_extents(regions: &[(u64, u64)], bits: &[Bitmap]) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (&(gpa, len), map) in regions.iter().zip(bits) {
        let pages = len / PAGE;
        for (w, &word) in map.iter().enumerate() {
            let mut word = word;
            while word != 0 {
                let b = word.trailing_zeros() as u64;
                word &= word - 1;
                let page = w as u64 * 64 + b;
                if page >= pages {
                    break;
                }
                let at = gpa + page * PAGE;
                match out.last_mut() {
                    Some(last) if last.0 + last.1 == at => last.1 += PAGE,
                    _ => out.push((at, PAGE)),
                }
            }
        }
    }
    out
}

/// Whether `pa..pa+len` touches one of the sorted, disjoint `extents`.
pub(crate) fn touches(extents: &[(u64, u64)], pa: u64, len: u64) -> bool {
    let end = pa.saturating_add(len.max(1));
    let i = extents.partition_point(|&(s, l)| s + l <= pa);
    extents.get(i).is_some_and(|&(s, _)| s < end)
}

/// What a pass's scan found, before the watch tells new from known.
struct Found {
    /// Reportable matches in what was scanned (all of memory when `complete`).
    matches: Vec<Match>,
    /// Whether `matches` covers all of memory (YARA passes), not only the scanned pages.
    complete: bool,
    /// Bytes read.
    bytes_scanned: u64,
    /// YARA: rules holding, and known matches re-read.
    rules: Option<(Vec<String>, u64)>,
}

/// A match's identity in a watch: (address, `rule:$pattern` or pattern, length).
fn key(m: &Match) -> (u64, String, u64) {
    let name = match &m.rule {
        Some(r) => format!("{r}:{}", m.pattern),
        None => m.pattern.clone(),
    };
    (m.pa, name, m.len)
}

impl Watch {
    /// Scans `extents` (the dirty pages, or all of RAM when `full`).
    fn find(&mut self, extents: &[(u64, u64)], full: bool) -> crate::Result<Found> {
        let mut mem = self.mem.with_extents(extents.to_vec());
        match &self.matcher {
            LiveMatcher::Literals(m) => {
                let opts = ScanOptions { max_matches: MAX_KNOWN, paging: self.paging, ..ScanOptions::default() };
                let r = scan(&mut mem, m, &opts)?;
                Ok(Found { matches: r.matches, complete: full, bytes_scanned: r.bytes_scanned, rules: None })
            }
            LiveMatcher::Yara(rules) => {
                let refeed = if full { Vec::new() } else { clean_hits(&self.hits, extents) };
                let p = yara_pass(&mut mem, rules, ScanOptions::default().threads, &refeed)?;
                self.hits_overflow = p.hits.len() > MAX_KNOWN_HITS;
                self.hits =
                    if self.hits_overflow { BTreeSet::new() } else { p.hits.iter().map(|h| (h.pa, h.len)).collect() };
                let matches = p
                    .hits
                    .into_iter()
                    .filter(|h| h.rule_matched && !h.private)
                    .map(|h| Match { rule: Some(h.rule), pattern: h.pattern, pa: h.pa, len: h.len, va: vec![] })
                    .collect();
                Ok(Found {
                    matches,
                    complete: true,
                    bytes_scanned: p.bytes_scanned,
                    rules: Some((p.matching_rules, refeed.len() as u64)),
                })
            }
        }
    }

    /// Runs the next pass: all of RAM the first time (and, for YARA rules
    /// with too many matches to re-feed, every time), the dirty pages after.
    fn pass(&mut self, paging: Option<PagingContext>) -> Result<PassReport, WatchError> {
        let t0 = Instant::now();
        let time_unix_ms = unix_ms();
        if paging.is_some() {
            self.paging = paging;
        }
        let first = self.passes == 0;
        let full = first || self.hits_overflow;
        let regions: Vec<(u64, u64)> = crate::PhysMem::ranges(&self.mem).iter().map(|r| (r.start, r.len)).collect();
        let ram_bytes: u64 = regions.iter().map(|r| r.1).sum();
        let (bits, dirty) = if first {
            (None, regions.clone())
        } else {
            let bits = self.view.take()?;
            let ext = dirty_extents(&regions, &bits);
            (Some(bits), ext)
        };
        let dirty_pages = dirty.iter().map(|e| e.1 / PAGE).sum();
        let scanned = if full { regions.clone() } else { dirty.clone() };
        let found = match self.find(&scanned, full) {
            Ok(f) => f,
            Err(e) => {
                // The next pass must still look at these pages.
                if let Some(b) = &bits {
                    self.view.put_back(b);
                }
                return Err(e.into());
            }
        };
        self.passes += 1;
        let current: BTreeSet<(u64, String, u64)> = found.matches.iter().map(key).collect();
        if found.complete {
            // Everything the watch knows is in `current` if it is still there.
            self.known.retain(|k| current.contains(k));
        } else if !full {
            // A known match in a rewritten page that is not there any more is
            // forgotten (if it comes back, it is new again); one still there stays known.
            self.known.retain(|k| !touches(&dirty, k.0, k.2) || current.contains(k));
        }
        let mut fresh = Vec::new();
        let mut new_total = 0u64;
        for m in found.matches {
            let k = key(&m);
            if self.known.contains(&k) {
                continue;
            }
            new_total += 1;
            if self.known.len() < MAX_KNOWN {
                self.known.insert(k);
            }
            if fresh.len() < self.listed {
                fresh.push(m);
            }
        }
        if found.rules.is_some() && self.paging.is_some() {
            // YARA matches come without virtual addresses: name them for the listed ones only.
            let mut mem = self.mem.clone();
            fresh = with_virtual_addresses(&mut mem, self.paging.as_ref(), fresh)?;
        }
        let new_matches = fresh
            .into_iter()
            .map(|m| WatchMatch {
                rule: m.rule,
                pattern: m.pattern,
                pa: m.pa,
                len: m.len,
                va: m.va,
                pass: self.passes,
                time_unix_ms,
            })
            .collect();
        let (matching_rules, new_rules, refed_matches) = match found.rules {
            Some((now, refed)) => {
                let new_rules: Vec<String> = now.iter().filter(|r| !self.rules_held.contains(*r)).cloned().collect();
                self.rules_held = now.iter().cloned().collect();
                (Some(now), Some(new_rules), Some(refed))
            }
            None => (None, None, None),
        };
        self.last_poll = Instant::now();
        Ok(PassReport {
            watch: self.id,
            pass: self.passes,
            full,
            time_unix_ms,
            dirty_pages,
            pages_scanned: found.bytes_scanned.div_ceil(PAGE),
            bytes_scanned: found.bytes_scanned,
            ram_bytes,
            scan_ms: t0.elapsed().as_secs_f64() * 1e3,
            new_matches,
            new_total,
            known_matches: self.known.len() as u64,
            paging: self.paging,
            matching_rules,
            new_rules,
            refed_matches,
        })
    }

    fn info(&self) -> WatchInfo {
        WatchInfo {
            watch: self.id,
            passes: self.passes,
            known_matches: self.known.len() as u64,
            idle_s: self.last_poll.elapsed().as_secs_f64(),
            expires_after_s: self.idle.as_secs(),
        }
    }
}

/// The watches of one VM: made, polled and ended by id.
pub struct Watches {
    inner: Mutex<Inner>,
    max: usize,
    idle: Duration,
}

struct Inner {
    next_id: u64,
    map: BTreeMap<u64, Arc<Mutex<Watch>>>,
    /// The last watches that expired, with their idle limits (bounded).
    expired: BTreeMap<u64, u64>,
}

impl Watches {
    /// At most `max` watches at once; one without a pass for `idle` is ended.
    pub fn new(max: usize, idle: Duration) -> Self {
        Watches { inner: Mutex::new(Inner { next_id: 1, map: BTreeMap::new(), expired: BTreeMap::new() }), max, idle }
    }

    /// Ends watches idle for too long (not those running a pass now), and
    /// remembers how long each ended one had been allowed (for the 404).
    fn expire(&self, inner: &mut Inner) {
        let mut ended = Vec::new();
        inner.map.retain(|&id, w| match w.try_lock() {
            Ok(w) if w.last_poll.elapsed() < w.idle => true,
            Ok(w) => {
                ended.push((id, w.idle.as_secs()));
                false
            }
            Err(_) => true,
        });
        for (id, idle_s) in ended {
            if inner.expired.len() >= 64 {
                inner.expired.pop_first();
            }
            inner.expired.insert(id, idle_s);
        }
    }

    /// The 404 for `id`, naming the idle time it had if it expired.
    fn no_such(&self, inner: &Inner, id: u64) -> WatchError {
        WatchError::NoSuchWatch { id, idle_s: inner.expired.get(&id).copied().unwrap_or(self.idle.as_secs()) }
    }

    /// Starts a watch on `vm` and runs its first (full) pass; `paging` names
    /// virtual addresses (from `req.vcpu`'s registers, read by the caller).
    /// `matcher` is `req.matcher()`, made by the caller before it paused for registers.
    pub fn create(
        &self,
        vm: &Vm,
        req: &ScanRequest,
        matcher: LiveMatcher,
        paging: Option<PagingContext>,
    ) -> Result<PassReport, WatchError> {
        if matcher.matches_zeros() {
            return Err(WatchError::Request(
                "a pattern that matches zero bytes matches all of free memory; it cannot be watched".into(),
            ));
        }
        let idle = match req.idle_s {
            None => self.idle,
            Some(s) if (1..=MAX_WATCH_IDLE_S).contains(&s) => Duration::from_secs(s),
            Some(s) => return Err(WatchError::Request(format!("idle_s {s} must be 1..={MAX_WATCH_IDLE_S}"))),
        };
        let watch = {
            let mut inner = self.inner.lock().unwrap();
            self.expire(&mut inner);
            if inner.map.len() >= self.max {
                return Err(WatchError::TooMany { max: self.max });
            }
            // The view first: every write from here on is seen by a later pass.
            let view = vm.dirty_view(DirtyConsumer::Watch)?;
            let id = inner.next_id;
            inner.next_id += 1;
            let w = Arc::new(Mutex::new(Watch {
                id,
                view,
                matcher,
                hits: BTreeSet::new(),
                hits_overflow: false,
                rules_held: BTreeSet::new(),
                mem: LiveMem::new(vm.ram().clone()),
                vcpu: req.vcpu,
                paging,
                listed: req.listed(),
                passes: 0,
                known: BTreeSet::new(),
                last_poll: Instant::now(),
                idle,
            }));
            inner.map.insert(id, w.clone());
            w
        };
        let mut w = watch.lock().unwrap();
        let r = w.pass(None);
        if r.is_err() {
            self.inner.lock().unwrap().map.remove(&w.id);
        }
        r
    }

    fn get(&self, id: u64) -> Result<Arc<Mutex<Watch>>, WatchError> {
        let mut inner = self.inner.lock().unwrap();
        self.expire(&mut inner);
        inner.map.get(&id).cloned().ok_or_else(|| self.no_such(&inner, id))
    }

    /// The vCPU whose page tables watch `id` names virtual addresses with.
    pub fn vcpu_of(&self, id: u64) -> Result<Option<usize>, WatchError> {
        let w = self.get(id)?;
        let g = w.try_lock().map_err(|_| WatchError::PassRunning { id })?;
        Ok(g.vcpu)
    }

    /// Runs the next pass of watch `id`. `paging` replaces the page tables
    /// used so far (None: keep the last ones, e.g. when the registers could
    /// not be read because a snapshot held the VM).
    pub fn pass(&self, id: u64, paging: Option<PagingContext>) -> Result<PassReport, WatchError> {
        let w = self.get(id)?;
        let mut g = w.try_lock().map_err(|_| WatchError::PassRunning { id })?;
        g.pass(paging)
    }

    /// Ends watch `id` (its dirty view goes with it).
    pub fn remove(&self, id: u64) -> Result<WatchInfo, WatchError> {
        let mut inner = self.inner.lock().unwrap();
        self.expire(&mut inner);
        let Some(w) = inner.map.remove(&id) else { return Err(self.no_such(&inner, id)) };
        drop(inner);
        let info = w.lock().unwrap().info();
        Ok(info)
    }

    /// The watches running now.
    pub fn list(&self) -> Vec<WatchInfo> {
        let mut inner = self.inner.lock().unwrap();
        self.expire(&mut inner);
        inner.map.values().filter_map(|w| w.try_lock().ok().map(|w| w.info())).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::{dirty_extents, touches};

    #[test]
    fn bitmaps_become_merged_page_runs_per_region() {
        // Region 0: 0..256 KiB (64 pages); region 1 starts at 4 GiB, 130 pages.
        let regions = [(0u64, 64 * 4096), (1u64 << 32, 130 * 4096)];
        let mut b0 = vec![0u64; 1];
        b0[0] = 0b1110 | 1 << 63; // pages 1..4 and 63
        let mut b1 = vec![0u64; 3];
        b1[0] = 1 << 63; // page 63 and 64 join across the word boundary
        b1[1] = 1;
        b1[2] = 1 << 1 | 1 << 40; // page 129 is the last; bit 168 is past the region
        let e = dirty_extents(&regions, &[b0, b1]);
        assert_eq!(
            e,
            vec![
                (4096, 3 * 4096),
                (63 * 4096, 4096),
                ((1 << 32) + 63 * 4096, 2 * 4096),
                ((1 << 32) + 129 * 4096, 4096)
            ]
        );
    }

    #[test]
    fn hits_per_block_are_bounded_for_patterns_matching_everywhere() {
        // What the API fuzzer sent: 256 one-byte zero patterns over zero memory.
        use crate::{BufMem, ScanOptions};
        let req = super::ScanRequest { hex: vec!["00".into(); 256], ..Default::default() };
        let m = req.matcher().unwrap();
        let mut mem = BufMem::flat(vec![0u8; 16 << 20]);
        let opts = ScanOptions { max_matches: 10, threads: 1, ..ScanOptions::default() };
        let r = m.scan(&mut mem, &opts).unwrap();
        assert!(r.truncated);
        assert_eq!(r.matches.len(), 10);
        let blocks = (16u64 << 20).div_ceil(r.block_size);
        assert!(r.total_matches <= blocks * crate::scan::MAX_BLOCK_HITS as u64, "{}", r.total_matches);
    }

    #[test]
    fn a_match_touching_a_dirty_run_is_found() {
        let ext = [(0x1000u64, 0x1000u64), (0x5000, 0x2000)];
        assert!(touches(&ext, 0xff0, 0x20)); // crosses into the first run
        assert!(!touches(&ext, 0xfe0, 0x20)); // ends right before it
        assert!(touches(&ext, 0x6ff8, 8));
        assert!(!touches(&ext, 0x7000, 8));
        assert!(!touches(&ext, 0x3000, 0x100));
        assert!(!touches(&[], 0, 8));
    }
}
