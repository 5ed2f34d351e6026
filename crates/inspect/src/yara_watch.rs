//! YARA rules in a watch: passes that read only what the guest wrote, while
//! rule conditions still see all of memory.
//!
//! A rule's condition is over the matches of all of memory (`$a and $b`,
//! `#a > 3`), so a pass over the dirty pages alone would forget `$a` when
//! only `$b` was written. The watch therefore keeps every pattern match it
//! knows of (of matching rules and not, private patterns included) and, in
//! a pass, hands YARA-X the dirty blocks *and* small blocks holding the
//! known matches that lie in pages not written since (their bytes are the
//! same as when they were found, so they match again). YARA-X then
//! evaluates each condition over exactly the matches a full scan would
//! have, at the cost of re-reading a few bytes per known match instead of
//! all of memory. If the known matches exceed [`MAX_KNOWN_HITS`], the pass
//! scans all of memory instead (and says so).

use std::collections::BTreeSet;

use crate::error::{Error, Result};
use crate::feed::{choose_edges, feed, FeedPlan, EDGE_SLACK};
use crate::mem::PhysMem;
use crate::scan::spans;
use crate::yara::{qualified, YaraRules, MAX_MATCHES_PER_PATTERN};

/// Pattern matches a watch keeps to re-feed; beyond, passes scan all of memory.
pub const MAX_KNOWN_HITS: usize = 100_000;
/// Known matches closer than this are re-fed in one block.
const MERGE_GAP: u64 = 4096;

/// One pattern match: where, how long, whose.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct PatternHit {
    /// Physical address of the first byte.
    pub pa: u64,
    /// Matched bytes.
    pub len: u64,
    /// `namespace:rule`.
    pub rule: String,
    /// `$name`.
    pub pattern: String,
    /// Whether the rule matched in this pass (only those are reported).
    pub rule_matched: bool,
    /// A private rule or pattern (kept for conditions, never reported).
    pub private: bool,
}

/// What one pass found.
pub(crate) struct YaraPass {
    /// Every pattern match over all of memory (known clean ones re-found, plus the scanned ones).
    pub hits: Vec<PatternHit>,
    /// Rules whose condition held (public ones).
    pub matching_rules: Vec<String>,
    /// Bytes of memory read: the scanned extents and the re-fed blocks.
    pub bytes_scanned: u64,
}

/// Merges `(start, end)` windows that overlap or lie within [`MERGE_GAP`] of each other.
fn merge(mut w: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    w.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::with_capacity(w.len());
    for (a, b) in w {
        match out.last_mut() {
            Some(last) if a <= last.1.saturating_add(MERGE_GAP) => last.1 = last.1.max(b),
            _ => out.push((a, b)),
        }
    }
    out
}

/// Splits merged windows where they would cross a hole between RAM spans.
fn clip(windows: &[(u64, u64)], spans: &[(u64, u64)]) -> Vec<((u64, u64), (u64, u64))> {
    let mut out = Vec::new();
    for &(a, b) in windows {
        for &s in spans {
            let (lo, hi) = (a.max(s.0), b.min(s.1));
            if lo < hi {
                out.push(((lo, hi), s));
            }
        }
    }
    out
}

/// Scans the data extents of `mem` with `rules`, plus the bytes at `refeed`
/// (known matches, `(pa, len)`, in pages not written since they were found),
/// and returns every pattern match and the rules that hold over all of them.
pub(crate) fn yara_pass(
    mem: &mut dyn PhysMem,
    rules: &YaraRules,
    threads: usize,
    refeed: &[(u64, u64)],
) -> Result<YaraPass> {
    let plan = FeedPlan {
        max_len: rules.max_len(),
        all_memory: false,
        word_edges: rules.word_edges(),
        block_size: 8 << 20,
        threads,
    };
    let mut scanner = yara_x::blocks::Scanner::new(rules.compiled());
    scanner.max_matches_per_pattern(MAX_MATCHES_PER_PATTERN);
    let mut blocks = 0u64;
    // Blocks holding no pattern's literal are skipped, as in a scan of an image; the re-fed
    // windows below hold known matches, so they are not filtered.
    let may_match = |d: &[u8]| rules.may_match(d);
    let filter: crate::feed::BlockFilter = if rules.has_prefilter() { Some(&may_match) } else { None };
    let stats = feed(mem, &plan, filter, &mut |base, data, may_match| {
        if !may_match {
            return Ok(());
        }
        let base = usize::try_from(base).map_err(|_| Error::Yara(format!("address {base:#x} too large")))?;
        scanner.scan(base, data).map_err(|e| Error::Yara(format!("scanning at {base:#x}: {e}")))?;
        blocks += 1;
        Ok(())
    })?;
    let mut bytes_scanned = stats.bytes_scanned;
    let windows = merge(refeed.iter().map(|&(pa, len)| (pa, pa.saturating_add(len.max(1)))).collect());
    let slack = if rules.word_edges() { EDGE_SLACK as u64 } else { 0 };
    let mut buf = Vec::new();
    for ((a, b), span) in clip(&windows, &spans(mem)) {
        // With fullword/\b patterns the block's edges move out to non-word bytes, as
        // `feed` does, so that an edge never passes for the edge of the data.
        let lo = span.0.max(a.saturating_sub(slack));
        let hi = span.1.min(b.saturating_add(slack));
        let len = usize::try_from(hi - lo).map_err(|_| Error::BadLength { len: hi - lo, reason: "window".into() })?;
        buf.resize(len, 0);
        mem.read(lo, &mut buf)?;
        let (s, e, _) = if slack == 0 {
            (0, len, 0)
        } else {
            choose_edges(&buf, (a - lo) as usize, (b - lo) as usize, lo == span.0, hi == span.1)
        };
        let base = usize::try_from(lo + s as u64).map_err(|_| Error::Yara(format!("address {lo:#x} too large")))?;
        scanner
            .scan(base, &buf[s..e])
            .map_err(|e| Error::Yara(format!("re-reading known matches at {base:#x}: {e}")))?;
        bytes_scanned += (e - s) as u64;
        blocks += 1;
    }
    if blocks == 0 {
        // yara-x 1.22 panics when a scan finishes without a block.
        scanner.scan(0, &[]).map_err(|e| Error::Yara(e.to_string()))?;
    }
    let results = scanner.finish().map_err(|e| Error::Yara(format!("evaluating conditions: {e}")))?;
    let mut hits = Vec::new();
    let mut matching_rules = Vec::new();
    let mut add = |rule: yara_x::Rule, matched: bool| {
        let name = qualified(&rule);
        let private_rule = rule.is_private();
        if matched && !private_rule {
            matching_rules.push(name.clone());
        }
        for p in rule.patterns().include_private(true) {
            for m in p.matches() {
                let r = m.range();
                hits.push(PatternHit {
                    pa: r.start as u64,
                    len: (r.end - r.start) as u64,
                    rule: name.clone(),
                    pattern: p.identifier().to_string(),
                    rule_matched: matched,
                    private: private_rule || p.is_private(),
                });
            }
        }
    };
    for r in results.matching_rules().include_private(true) {
        add(r, true);
    }
    for r in results.non_matching_rules().include_private(true) {
        add(r, false);
    }
    hits.sort_unstable();
    hits.dedup();
    Ok(YaraPass { hits, matching_rules, bytes_scanned })
}

/// The known matches to re-feed: those not touching a dirty extent (sorted, disjoint).
pub(crate) fn clean_hits(known: &BTreeSet<(u64, u64)>, dirty: &[(u64, u64)]) -> Vec<(u64, u64)> {
    known.iter().copied().filter(|&(pa, len)| !crate::watch::touches(dirty, pa, len)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::BufMem;
    use ferry_image::RamRange;

    /// Memory whose scan reads only `1` (as a watch's dirty extents).
    struct Part(BufMem, Vec<(u64, u64)>);

    impl PhysMem for Part {
        fn ranges(&self) -> &[RamRange] {
            self.0.ranges()
        }
        fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(gpa, buf)
        }
        fn data_extents(&mut self) -> Result<Vec<(u64, u64)>> {
            Ok(self.1.clone())
        }
    }

    fn rules(src: &str) -> YaraRules {
        YaraRules::compile(src, "test.yar").unwrap()
    }

    #[test]
    fn windows_merge_when_close_and_split_at_holes() {
        assert_eq!(merge(vec![(5000, 5010), (0, 10), (100, 200)]), vec![(0, 200), (5000, 5010)]);
        assert_eq!(merge(vec![(0, 10), (10 + MERGE_GAP + 1, 10 + MERGE_GAP + 5)]).len(), 2);
        let spans = [(0u64, 0x1000u64), (0x2000, 0x3000)];
        assert_eq!(clip(&[(0xff0, 0x2010)], &spans), vec![((0xff0, 0x1000), spans[0]), ((0x2000, 0x2010), spans[1])]);
    }

    /// A condition over two patterns holds when one is in memory scanned now and the other
    /// only re-fed from the known matches, as over all of memory; and fails without the re-feed.
    #[test]
    fn conditions_see_refed_matches_of_clean_memory() {
        let r = rules(
            r#"rule both { strings: $a = "ALPHA-SECRET" $b = "BRAVO-SECRET" condition: $a and $b }
               rule three { strings: $c = "CHARLIE" condition: #c >= 3 }"#,
        );
        let mut bytes = vec![0u8; 1 << 20];
        let put = |b: &mut Vec<u8>, at: usize, s: &[u8]| b[at..at + s.len()].copy_from_slice(s);
        put(&mut bytes, 0x1000, b"ALPHA-SECRET");
        put(&mut bytes, 0x80000, b"BRAVO-SECRET");
        for at in [0x3000, 0x5000, 0x90000] {
            put(&mut bytes, at, b"CHARLIE");
        }
        let ranges = vec![RamRange::new(0, 1 << 20)];
        // A full pass finds everything.
        let mut full = BufMem::new(bytes.clone(), ranges.clone());
        let p = yara_pass(&mut full, &r, 1, &[]).unwrap();
        assert_eq!(p.matching_rules, vec!["both".to_string(), "three".to_string()]);
        assert_eq!(p.hits.len(), 5);
        // Only the page with $b (and one CHARLIE) is scanned now.
        let dirty = vec![(0x80000u64, 0x20000u64)];
        let mut part = Part(BufMem::new(bytes.clone(), ranges.clone()), dirty.clone());
        let without = yara_pass(&mut part, &r, 1, &[]).unwrap();
        assert!(without.matching_rules.is_empty(), "{:?}", without.matching_rules);
        let known: BTreeSet<(u64, u64)> = p.hits.iter().map(|h| (h.pa, h.len)).collect();
        let refeed = clean_hits(&known, &dirty);
        assert_eq!(refeed.len(), 3, "{refeed:?}");
        let with = yara_pass(&mut part, &r, 1, &refeed).unwrap();
        assert_eq!(with.matching_rules, p.matching_rules);
        assert_eq!(with.hits, p.hits);
        assert!(with.bytes_scanned < 0x30000, "{}", with.bytes_scanned);
    }

    /// A re-fed block edge is not taken for a word edge: a `fullword` pattern inside a longer
    /// word does not match in the window although the window starts where its match would.
    #[test]
    fn refed_windows_keep_fullword_honest() {
        let r = rules(
            r#"rule plain { strings: $p = "TOKEN" condition: $p }
               rule word { strings: $w = "TOKEN" fullword condition: $w }"#,
        );
        let mut bytes = vec![b' '; 0x10000];
        bytes[0x2000..0x2008].copy_from_slice(b"xxTOKENy");
        let mut mem = Part(BufMem::new(bytes, vec![RamRange::new(0, 0x10000)]), vec![]);
        let p = yara_pass(&mut mem, &r, 1, &[(0x2002, 5)]).unwrap();
        assert_eq!(p.matching_rules, vec!["plain".to_string()]);
    }
}
