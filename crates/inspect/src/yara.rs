//! YARA-X rules over guest memory.
//!
//! One `yara_x::blocks::Scanner` sees every block of memory (read and
//! decoded on worker threads by [`crate::feed`]) with its guest-physical
//! address as the block's base, so rule conditions (`and`, `of`, `#a > 2`)
//! are evaluated once over all of memory and a match found twice in two
//! overlapping blocks is one match (YARA keeps one match per pattern and
//! start). The block scanner does not match across block edges, so blocks
//! overlap by the longest match a rule set can report, which is worked out
//! from the rules' syntax before compiling: text patterns (with `wide` and
//! `base64` growth), hex patterns (jumps and alternatives) and regexps
//! (regex-syntax's maximum length). Patterns without a bound (`.*`, `+`,
//! `[n-]`) are refused, naming the rule, as are features that need a whole
//! file, which memory is not: modules (`import`), `filesize`, `entrypoint`,
//! match offsets (`@a`, `at`, `in`), `uintN()` reads and `^`/`$` anchors.

use std::path::Path;
use std::time::Instant;

use regex_syntax::hir::Look;
use serde::Serialize;
use yara_x_parser::ast::dfs::{DFSEvent, DFSIter};
use yara_x_parser::ast::{self, Expr, HexSubPattern, HexToken, Item, WithSpan, AST};

use crate::error::{Error, Result};
use crate::feed::{feed, BlockFilter, FeedPlan, FeedStats};
use crate::mem::PhysMem;
use crate::prefilter::Prefilter;
use crate::scan::{spans, with_virtual_addresses, Match, ScanOptions, ScanReport};

/// Largest rule file read (bytes).
pub const MAX_RULES_FILE: u64 = 16 << 20;
/// Longest match a pattern may have (bytes): it sets how much consecutive blocks overlap.
pub const MAX_YARA_PATTERN: usize = 64 << 10;
/// Matches YARA-X keeps per pattern (more are not seen by conditions nor reported).
pub const MAX_MATCHES_PER_PATTERN: usize = 1_000_000;

/// Functions that read the scanned data at an offset (whole-file features).
const DATA_READERS: &[&str] = &[
    "uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "uint8be", "uint16be", "uint32be",
    "uint64be", "int8be", "int16be", "int32be", "int64be",
];

/// A compiled rule set and what scanning memory with it needs.
pub struct YaraRules {
    rules: yara_x::Rules,
    origin: String,
    max_len: usize,
    word_edges: bool,
    matches_zeros: bool,
    rule_count: usize,
    pattern_count: usize,
    /// The literal prefilter, or why there is none / it is off.
    prefilter: std::result::Result<Prefilter, String>,
}

/// What a YARA scan found beyond the matches: for reports.
#[derive(Clone, Debug, Serialize)]
pub struct YaraSummary {
    /// The rule file.
    pub origin: String,
    /// Rules in it.
    pub rules: usize,
    /// Patterns in it.
    pub patterns: usize,
    /// Rules whose condition held over all of memory (a rule may match without a pattern match).
    pub matching_rules: Vec<String>,
    /// Longest match the rules can report: the overlap between blocks is this minus one.
    pub max_pattern_len: usize,
    /// Whether a pattern can match all-zero memory (then zero memory is scanned too).
    pub matches_zeros: bool,
    /// Whether blocks without any of the patterns' literals were skipped (see `feed.blocks_skipped`).
    pub prefilter: bool,
    /// Byte strings the prefilter searches for (0 without one).
    pub prefilter_needles: usize,
    /// Why there was no prefilter (a regexp, `xor`, `base64`, too few fixed bytes, turned off).
    pub prefilter_note: Option<String>,
    /// Reading and feeding figures.
    pub feed: FeedStats,
}

impl YaraRules {
    /// Reads and compiles the rule file at `path`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let origin = path.display().to_string();
        let io = |e: std::io::Error| Error::RulesRead { path: origin.clone(), reason: e.to_string() };
        let meta = std::fs::metadata(path).map_err(io)?;
        if meta.len() > MAX_RULES_FILE {
            return Err(Error::RulesRead {
                path: origin,
                reason: format!("{} bytes, more than the {MAX_RULES_FILE} allowed", meta.len()),
            });
        }
        let bytes = std::fs::read(path).map_err(io)?;
        let src = String::from_utf8(bytes).map_err(|e| Error::RulesRead {
            path: origin.clone(),
            reason: format!("not UTF-8 text (byte {})", e.utf8_error().valid_up_to()),
        })?;
        Self::compile(&src, &origin)
    }

    /// Compiles rules from source text; `origin` names it in messages (a file name).
    pub fn compile(src: &str, origin: &str) -> Result<Self> {
        let ast = AST::from(src);
        if !ast.errors().is_empty() {
            // yara-x's own message says what and where (file, line, column).
            return Err(match compile_rules(src, origin) {
                Err(e) => e,
                Ok(_) => Error::Rules { origin: origin.into(), message: format!("{:?}", ast.errors()[0]) },
            });
        }
        let bounds = check(&ast, src, origin)?;
        let rules = compile_rules(src, origin)?;
        let matches_zeros = any_match(&rules, &vec![0u8; bounds.max_len.max(1) * 2])?;
        let prefilter = Prefilter::from_ast(&ast);
        Ok(YaraRules {
            prefilter,
            rules,
            origin: origin.into(),
            max_len: bounds.max_len.max(1),
            word_edges: bounds.word_edges,
            matches_zeros,
            rule_count: bounds.rules,
            pattern_count: bounds.patterns,
        })
    }

    /// Longest match these rules can report (bytes).
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Whether some pattern matches all-zero memory.
    pub fn matches_zeros(&self) -> bool {
        self.matches_zeros
    }

    /// Rules in the set.
    pub fn rule_count(&self) -> usize {
        self.rule_count
    }

    /// Where the rules came from (a file name), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// Patterns in the set.
    pub fn pattern_count(&self) -> usize {
        self.pattern_count
    }

    /// The compiled rules, for the block scanners of this crate.
    pub(crate) fn compiled(&self) -> &yara_x::Rules {
        &self.rules
    }

    /// Whether a pattern looks at word edges (`fullword`, `\b`), so block edges must move.
    pub(crate) fn word_edges(&self) -> bool {
        self.word_edges
    }

    /// Turns the literal prefilter off: every block is searched by YARA-X (to compare
    /// results and speed with it on).
    pub fn without_prefilter(mut self) -> Self {
        self.prefilter = Err("turned off".into());
        self
    }

    /// Whether blocks without any pattern's literal are skipped.
    pub fn has_prefilter(&self) -> bool {
        self.prefilter.is_ok()
    }

    /// Whether `data` may hold a match (always, without a prefilter).
    pub(crate) fn may_match(&self, data: &[u8]) -> bool {
        self.prefilter.as_ref().map_or(true, |p| p.may_match(data))
    }
}

/// Compiles with yara-x: includes off (one file is scanned as given), errors as yara-x words them.
fn compile_rules(src: &str, origin: &str) -> Result<yara_x::Rules> {
    let err = |message: String| Error::Rules { origin: origin.into(), message };
    let mut c = yara_x::Compiler::new();
    c.enable_includes(false);
    c.add_source(yara_x::SourceCode::from(src).with_origin(origin)).map_err(|e| err(e.to_string()))?;
    Ok(c.build())
}

/// Whether any pattern of `rules` matches in `data` (matching rules or not).
fn any_match(rules: &yara_x::Rules, data: &[u8]) -> Result<bool> {
    let mut s = yara_x::blocks::Scanner::new(rules);
    s.scan(0, data).map_err(|e| Error::Yara(e.to_string()))?;
    let r = s.finish().map_err(|e| Error::Yara(e.to_string()))?;
    let hit = |rule: yara_x::Rule| rule.patterns().include_private(true).any(|p| p.matches().next().is_some());
    Ok(r.matching_rules().any(hit) || r.non_matching_rules().any(hit))
}

/// What the syntax check found.
struct Bounds {
    max_len: usize,
    word_edges: bool,
    rules: usize,
    patterns: usize,
}

/// 1-based line of byte offset `at` in `src`.
fn line(src: &str, at: usize) -> usize {
    src.as_bytes()[..at.min(src.len())].iter().filter(|&&b| b == b'\n').count() + 1
}

/// Refuses what a memory scan cannot do and bounds every pattern's match length.
fn check(ast: &AST, src: &str, origin: &str) -> Result<Bounds> {
    let refuse = |rule: &str, at: usize, reason: String| Error::RuleRefused {
        origin: origin.into(),
        line: line(src, at),
        rule: rule.into(),
        reason,
    };
    let mut b = Bounds { max_len: 1, word_edges: false, rules: 0, patterns: 0 };
    let modules: Vec<&ast::Import> = ast.imports().collect();
    for item in ast.items() {
        if let Item::Include(i) = item {
            return Err(refuse(
                "-",
                i.span().start(),
                format!("include \"{}\": includes are not followed; give one file", i.file_name),
            ));
        }
    }
    if let Some(m) = modules.first() {
        let users: Vec<&str> = ast
            .rules()
            .filter(|r| {
                DFSIter::new(&r.condition)
                    .any(|e| matches!(e, DFSEvent::Enter(Expr::Ident(i)) if i.name == m.module_name))
            })
            .map(|r| r.identifier.name)
            .collect();
        let who =
            if users.is_empty() { "no rule uses it".to_string() } else { format!("used by {}", users.join(", ")) };
        return Err(refuse(
            users.first().copied().unwrap_or("-"),
            m.span().start(),
            format!(
                "import \"{}\" ({who}): modules parse whole files (PE, ELF, ...), and guest memory is not one",
                m.module_name
            ),
        ));
    }
    for rule in ast.rules() {
        b.rules += 1;
        let name = rule.identifier.name;
        for ev in DFSIter::new(&rule.condition) {
            let DFSEvent::Enter(e) = ev else { continue };
            let what = match e {
                Expr::Filesize { .. } => Some("`filesize`".to_string()),
                Expr::Entrypoint { .. } => Some("`entrypoint`".to_string()),
                Expr::PatternOffset(i) => Some(format!("the offset `@{}`", i.identifier.name.trim_start_matches('@'))),
                Expr::PatternMatch(m) if m.anchor.is_some() => {
                    Some(format!("`{} at/in` (a position in a file)", m.identifier.name))
                }
                Expr::PatternCount(c) if c.range.is_some() => {
                    Some(format!("`{} in (range)` (positions in a file)", c.identifier.name))
                }
                Expr::Of(o) if o.anchor.is_some() => Some("`of ... at/in` (a position in a file)".to_string()),
                Expr::FuncCall(f) if f.object.is_none() && DATA_READERS.contains(&f.identifier.name) => {
                    Some(format!("`{}()` (reads the file at an offset)", f.identifier.name))
                }
                _ => None,
            };
            if let Some(what) = what {
                return Err(refuse(
                    name,
                    e.span().start(),
                    format!("uses {what}: a memory scan has no file, so whole-file features are refused"),
                ));
            }
        }
        for p in rule.patterns.iter().flatten() {
            b.patterns += 1;
            let id = p.identifier().name;
            let at = p.span().start();
            let mods = p.modifiers();
            b.word_edges |= mods.fullword().is_some();
            let wide = mods.wide().is_some();
            let ascii = mods.ascii().is_some() || !wide;
            let grow = |n: usize| if wide { n.saturating_mul(2) } else { n };
            let len = match p {
                ast::Pattern::Text(t) => {
                    let n = t.text.value.len();
                    let b64 = (n / 3 + 1) * 4 + 4;
                    let mut len = 0;
                    if ascii {
                        len = n;
                    }
                    if wide {
                        len = len.max(2 * n);
                    }
                    if mods.base64().is_some() {
                        len = len.max(b64);
                    }
                    if mods.base64wide().is_some() {
                        len = len.max(2 * b64);
                    }
                    len
                }
                ast::Pattern::Hex(h) => grow(hex_len(&h.sub_patterns).ok_or_else(|| {
                    refuse(
                        name,
                        at,
                        format!("hex pattern {id} has an unbounded jump ([n-] or [-]); give an upper bound"),
                    )
                })?),
                ast::Pattern::Regexp(r) => {
                    let (len, words) =
                        regexp_len(&r.regexp).map_err(|why| refuse(name, at, format!("regexp {id}: {why}")))?;
                    b.word_edges |= words;
                    grow(len)
                }
            };
            if len > MAX_YARA_PATTERN {
                return Err(refuse(
                    name,
                    at,
                    format!("pattern {id} can match up to {len} bytes, more than the {MAX_YARA_PATTERN} a block overlap covers"),
                ));
            }
            b.max_len = b.max_len.max(len);
        }
    }
    Ok(b)
}

/// Longest match of a hex pattern, or `None` if a jump has no upper bound.
fn hex_len(p: &HexSubPattern) -> Option<usize> {
    let mut n = 0usize;
    for t in p.iter() {
        n = n.saturating_add(match t {
            HexToken::Byte(_) | HexToken::NotByte(_) => 1,
            HexToken::Jump(j) => j.end? as usize,
            HexToken::Alternative(a) => {
                let mut m = 0;
                for alt in &a.alternatives {
                    m = m.max(hex_len(alt)?);
                }
                m
            }
        });
    }
    Some(n)
}

/// Longest match of a regexp and whether it looks at word boundaries; an error says why it
/// cannot be bounded or used on memory.
fn regexp_len(r: &ast::Regexp) -> std::result::Result<(usize, bool), String> {
    let hir = regex_syntax::ParserBuilder::new()
        .unicode(false)
        .utf8(false)
        .case_insensitive(r.case_insensitive)
        .dot_matches_new_line(r.dot_matches_new_line)
        .build()
        .parse(r.src)
        .map_err(|e| format!("cannot work out its longest match ({e})"))?;
    let props = hir.properties();
    let looks = props.look_set();
    if looks.contains(Look::Start) || looks.contains(Look::End) {
        return Err("`^`/`$` anchor to the start/end of a file, which memory has not".into());
    }
    let len = props.maximum_len().ok_or_else(|| {
        format!("/{}/ has no longest match (`*`, `+` or `{{n,}}`); bound it, e.g. `.{{0,64}}`", r.src)
    })?;
    let words = [Look::WordAscii, Look::WordAsciiNegate, Look::WordUnicode, Look::WordUnicodeNegate]
        .into_iter()
        .any(|l| looks.contains(l))
        || looks.contains(Look::WordStartAscii)
        || looks.contains(Look::WordEndAscii)
        || looks.contains(Look::WordStartHalfAscii)
        || looks.contains(Look::WordEndHalfAscii);
    Ok((len, words))
}

/// Scans all of guest memory with `rules`; `progress(done, total)` is called as blocks are
/// searched (bytes of memory).
pub fn scan_yara(
    mem: &mut dyn PhysMem,
    rules: &YaraRules,
    opts: &ScanOptions,
    progress: &mut dyn FnMut(u64, u64),
) -> Result<ScanReport> {
    let t0 = Instant::now();
    let ram_bytes: u64 = mem.ranges().iter().map(|r| r.len).sum();
    let plan = FeedPlan {
        max_len: rules.max_len,
        all_memory: rules.matches_zeros,
        word_edges: rules.word_edges,
        block_size: opts.block_size,
        threads: opts.threads,
    };
    let total = if rules.matches_zeros {
        spans(mem).iter().map(|(a, b)| b - a).sum()
    } else {
        mem.data_extents()?.iter().map(|e| e.1).sum::<u64>()
    };
    let mut scanner = yara_x::blocks::Scanner::new(&rules.rules);
    scanner.max_matches_per_pattern(MAX_MATCHES_PER_PATTERN);
    let mut done = 0u64;
    let may_match = |d: &[u8]| rules.prefilter.as_ref().is_ok_and(|p| p.may_match(d));
    let filter: BlockFilter = if rules.prefilter.is_ok() { Some(&may_match) } else { None };
    let mut searched = 0u64;
    let feed_stats = feed(mem, &plan, filter, &mut |base, data, may_match| {
        let base = usize::try_from(base).map_err(|_| Error::Yara(format!("address {base:#x} too large")))?;
        if may_match {
            scanner.scan(base, data).map_err(|e| Error::Yara(format!("scanning at {base:#x}: {e}")))?;
            searched += 1;
        }
        done += data.len() as u64;
        progress(done.min(total), total);
        Ok(())
    })?;
    if searched == 0 {
        // Nothing searched (no data, no pattern matching zeros, or every block skipped by the
        // prefilter): yara-x 1.22 panics when a scan finishes without a block, so it gets an
        // empty one.
        scanner.scan(0, &[]).map_err(|e| Error::Yara(e.to_string()))?;
    }
    let results = scanner.finish().map_err(|e| Error::Yara(format!("evaluating conditions: {e}")))?;
    let mut found = Vec::new();
    let mut matching_rules = Vec::new();
    for rule in results.matching_rules() {
        matching_rules.push(qualified(&rule));
        for p in rule.patterns() {
            for m in p.matches() {
                let r = m.range();
                found.push(Match {
                    rule: Some(qualified(&rule)),
                    pattern: p.identifier().to_string(),
                    pa: r.start as u64,
                    len: (r.end - r.start) as u64,
                    va: vec![],
                });
            }
        }
    }
    let total_matches = found.len() as u64;
    found.sort_by(|a, b| (a.pa, &a.rule, &a.pattern).cmp(&(b.pa, &b.rule, &b.pattern)));
    found.truncate(opts.max_matches);
    let matches = with_virtual_addresses(mem, opts.paging.as_ref(), found)?;
    Ok(ScanReport {
        truncated: total_matches > matches.len() as u64,
        matches,
        total_matches,
        ram_bytes,
        bytes_scanned: feed_stats.bytes_scanned,
        block_size: opts.block_size as u64,
        threads: feed_stats.threads,
        paging: opts.paging,
        elapsed_secs: t0.elapsed().as_secs_f64(),
        yara: Some(YaraSummary {
            origin: rules.origin.clone(),
            rules: rules.rule_count,
            patterns: rules.pattern_count,
            matching_rules,
            max_pattern_len: rules.max_len,
            matches_zeros: rules.matches_zeros,
            prefilter: rules.prefilter.is_ok(),
            prefilter_needles: rules.prefilter.as_ref().map_or(0, |p| p.needles()),
            prefilter_note: rules.prefilter.as_ref().err().cloned(),
            feed: feed_stats,
        }),
    })
}

/// `namespace:rule`, or just `rule` in the default namespace.
pub(crate) fn qualified(r: &yara_x::Rule) -> String {
    match r.namespace() {
        "default" | "" => r.identifier().to_string(),
        ns => format!("{ns}:{}", r.identifier()),
    }
}
