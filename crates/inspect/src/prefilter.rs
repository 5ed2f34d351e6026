//! A literal prefilter for YARA rule sets: blocks of memory that cannot hold a
//! match of any pattern are not handed to YARA-X at all.
//!
//! Why: with many string rules, YARA-X's own search (one Aho-Corasick
//! automaton stepped byte by byte) costs about a CPU second per GiB, most of a
//! scan. Every match of a text pattern contains one of a few byte strings (the
//! text, its UTF-16 form for `wide`, in any letter case for `nocase`), and
//! every match of a hex pattern contains its longest run of fixed bytes. A
//! multi-literal search for those (SIMD where it can) tells the blocks that
//! hold none of them, and a block without any cannot add a match: conditions
//! are evaluated over the matches of all blocks, so skipping such a block
//! changes nothing in the result. The prefilter is a superset test (it may
//! pass a block without a real match, never the reverse); rule sets it cannot
//! bound (regexps, `xor`, `base64`, hex patterns without three fixed bytes in
//! a row, needles shorter than three bytes) are scanned block by block as
//! before.

use aho_corasick::packed;
use yara_x_parser::ast::{self, HexSubPattern, HexToken, AST};

/// Shortest needle worth prefiltering on: shorter ones occur in nearly every block.
const MIN_NEEDLE: usize = 3;
/// Needles per SIMD (Teddy) searcher; it takes at most 64.
const PER_SEARCHER: usize = 64;
/// Letters of a `nocase` text that are expanded into all their case forms (2^6 = 64).
const MAX_NOCASE_LETTERS: usize = 6;
/// Searchers at most: each is a pass over the block, and past two passes YARA-X's own
/// automaton (one pass for any number of patterns) is cheaper than prefiltering.
const MAX_SEARCHERS: usize = 2;

/// The literal search over all patterns' needles.
pub(crate) struct Prefilter {
    searchers: Vec<packed::Searcher>,
    needles: usize,
}

impl Prefilter {
    /// The prefilter of a rule set, or why there is none.
    pub(crate) fn from_ast(ast: &AST) -> Result<Self, String> {
        let mut needles: Vec<Vec<u8>> = Vec::new();
        for rule in ast.rules() {
            for p in rule.patterns.iter().flatten() {
                let id = p.identifier().name;
                let mods = p.modifiers();
                if mods.xor().is_some() || mods.base64().is_some() || mods.base64wide().is_some() {
                    return Err(format!("pattern {id} of rule {} uses xor or base64", rule.identifier.name));
                }
                match p {
                    ast::Pattern::Text(t) => {
                        let v: &[u8] = &t.text.value;
                        let wide = mods.wide().is_some();
                        let mut forms = vec![v.to_vec()];
                        if mods.nocase().is_some() {
                            // Every letter case of the text: 2^letters forms.
                            if v.iter().filter(|b| b.is_ascii_alphabetic()).count() > MAX_NOCASE_LETTERS {
                                return Err(format!(
                                    "nocase pattern {id} of rule {} has more than {MAX_NOCASE_LETTERS} letters",
                                    rule.identifier.name
                                ));
                            }
                            forms = case_forms(v);
                        }
                        for f in forms {
                            if wide {
                                needles.push(f.iter().flat_map(|&b| [b, 0]).collect());
                            }
                            if mods.ascii().is_some() || !wide {
                                needles.push(f);
                            }
                        }
                    }
                    ast::Pattern::Hex(h) => needles.push(fixed_run(&h.sub_patterns)),
                    ast::Pattern::Regexp(_) => {
                        return Err(format!("pattern {id} of rule {} is a regexp", rule.identifier.name));
                    }
                }
            }
        }
        if let Some(n) = needles.iter().find(|n| n.len() < MIN_NEEDLE) {
            return Err(format!("a pattern has only {} fixed bytes in a row", n.len()));
        }
        needles.sort();
        needles.dedup();
        if needles.len() > PER_SEARCHER * MAX_SEARCHERS {
            return Err(format!(
                "{} literals, more than the {} prefiltered",
                needles.len(),
                PER_SEARCHER * MAX_SEARCHERS
            ));
        }
        let searchers = needles
            .chunks(PER_SEARCHER)
            .map(|c| packed::Config::new().builder().extend(c).build())
            .collect::<Option<Vec<_>>>()
            .ok_or("no SIMD literal search on this CPU")?;
        Ok(Prefilter { searchers, needles: needles.len() })
    }

    /// Whether `data` may hold a match (false: it holds none for certain).
    pub(crate) fn may_match(&self, data: &[u8]) -> bool {
        // Teddy needs a minimum haystack length; a block that short is searched by YARA-X.
        self.searchers.iter().any(|s| data.len() < s.minimum_len() || s.find(data).is_some())
    }

    /// Byte strings searched for.
    pub(crate) fn needles(&self) -> usize {
        self.needles
    }
}

/// `n` in every combination of upper and lower case letters.
fn case_forms(n: &[u8]) -> Vec<Vec<u8>> {
    let mut out = vec![Vec::with_capacity(n.len())];
    for &b in n {
        if b.is_ascii_alphabetic() {
            let mut up = out.clone();
            for v in &mut out {
                v.push(b.to_ascii_lowercase());
            }
            for v in &mut up {
                v.push(b.to_ascii_uppercase());
            }
            out.extend(up);
        } else {
            for v in &mut out {
                v.push(b);
            }
        }
    }
    out
}

/// The longest run of fixed bytes that every match of a hex pattern contains (its top-level
/// bytes with a full mask between jumps, wildcards and alternatives).
fn fixed_run(p: &HexSubPattern) -> Vec<u8> {
    let (mut best, mut cur) = (Vec::new(), Vec::new());
    for t in p.iter() {
        match t {
            HexToken::Byte(b) if b.mask == 0xff => cur.push(b.value),
            _ => {
                if cur.len() > best.len() {
                    best = std::mem::take(&mut cur);
                }
                cur.clear();
            }
        }
    }
    if cur.len() > best.len() {
        best = cur;
    }
    best
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pf(src: &str) -> Result<Prefilter, String> {
        Prefilter::from_ast(&AST::from(src))
    }

    #[test]
    fn needles_cover_text_forms_and_hex_runs() {
        let p = pf(r#"rule a { strings: $a = "Secret" nocase $b = "key" wide ascii
                       $c = { 01 02 ?? 03 04 05 [2-4] 06 } condition: any of them }"#)
        .unwrap();
        assert_eq!(p.needles(), 64 + 3, "every case form of Secret, key twice, the hex run");
        assert!(p.may_match(b"xx sEcReT yy"), "nocase");
        assert!(p.may_match(b"k\0e\0y\0"), "wide");
        assert!(p.may_match(b"..key.."), "ascii");
        assert!(p.may_match(&[9, 3, 4, 5, 9]), "the hex pattern's longest fixed run");
        assert!(!p.may_match(b"nothing to see here: k e y, S-e-c-r-e-t"));
    }

    #[test]
    fn unboundable_rule_sets_have_no_prefilter() {
        assert!(pf(r#"rule a { strings: $a = /ab+c/ condition: $a }"#).is_err());
        assert!(pf(r#"rule a { strings: $a = "abcd" xor condition: $a }"#).is_err());
        assert!(pf(r#"rule a { strings: $a = "abcd" base64 condition: $a }"#).is_err());
        assert!(pf(r#"rule a { strings: $a = { 01 ?? 02 } condition: $a }"#).is_err());
        assert!(pf(r#"rule a { strings: $a = "ab" condition: $a }"#).is_err());
        assert!(pf(r#"rule a { condition: true }"#).is_ok(), "no pattern: no block can match");
    }
}
