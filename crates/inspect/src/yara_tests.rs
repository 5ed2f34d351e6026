//! YARA-X scans of real images planted across every kind of boundary (the
//! same image as the literal scan's tests), conditions over all blocks,
//! block edges inside words, and what is refused.

use ferry_image::{CpuRegs, ImageHeaderInput, ImageWriter, RamRange, WriteOptions};

use crate::tests::{naive, planted_image, scan_ranges};
use crate::*;

/// Scans with the literal prefilter (where the rules allow one) and without it, checks that
/// both find the same, and returns the prefiltered report.
fn yara(mem: &mut dyn PhysMem, src: &str, block: usize, threads: usize) -> ScanReport {
    let rules = YaraRules::compile(src, "test.yar").unwrap();
    let opts = ScanOptions { block_size: block, threads, max_matches: 100_000, ..ScanOptions::default() };
    let r = scan_yara(mem, &rules, &opts, &mut |_, _| {}).unwrap();
    let plain = scan_yara(mem, &rules.without_prefilter(), &opts, &mut |_, _| {}).unwrap();
    assert_eq!(r.matches, plain.matches, "{src}: the prefilter changed the matches");
    assert_eq!(r.total_matches, plain.total_matches);
    let (y, p) = (r.yara.as_ref().unwrap(), plain.yara.as_ref().unwrap());
    assert_eq!(y.matching_rules, p.matching_rules, "{src}: the prefilter changed the matching rules");
    assert_eq!(y.feed.bytes_scanned, p.feed.bytes_scanned);
    assert!(!p.prefilter && p.feed.blocks_skipped == 0 && p.feed.bytes_fed >= p.feed.bytes_scanned);
    r
}

fn pas(r: &ScanReport, pattern: &str) -> Vec<u64> {
    r.matches.iter().filter(|m| m.pattern == pattern).map(|m| m.pa).collect()
}

fn hexs(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x} ")).collect()
}

#[test]
fn yara_finds_each_match_once_across_every_boundary() {
    let dir = tempfile::tempdir().unwrap();
    let pat = b"FERRY-PLANT-0123".to_vec();
    let (path, model) = planted_image(dir.path(), &pat);
    let want = naive(&model, &pat);
    assert_eq!(want.len(), 4);
    let mut gap = pat[..8].to_vec();
    gap.extend_from_slice(&[0; 8]);
    let mut lead = vec![0u8; 8];
    lead.extend_from_slice(&pat[8..]);
    let src = format!(
        "rule p {{ strings: $a = \"FERRY-PLANT-0123\" $g = {{ {} }} $l = {{ {} }} $s = \"stale\" condition: any of them }}",
        hexs(&gap),
        hexs(&lead)
    );
    for (block, threads) in [(4096usize, 1), (4096, 3), (3 * 4096, 2), (1 << 20, 1)] {
        let mut m = ImageMem::open(&path, None).unwrap();
        let r = yara(&mut m, &src, block, threads);
        assert_eq!(pas(&r, "$a"), want, "block {block} threads {threads}");
        assert_eq!(pas(&r, "$g"), naive(&model, &gap), "data | zero gap, block {block}");
        assert_eq!(pas(&r, "$l"), naive(&model, &lead), "zero gap | data, block {block}");
        assert!(pas(&r, "$s").is_empty(), "the stale copy is gone");
        assert!(!pas(&r, "$g").is_empty() && !pas(&r, "$l").is_empty());
        assert_eq!(r.threads, threads);
        assert!(r.matches.iter().all(|m| m.rule.as_deref() == Some("p")));
        assert!(r.bytes_scanned < r.ram_bytes, "zero memory is not read");
        let y = r.yara.as_ref().unwrap();
        assert_eq!((y.max_pattern_len, y.matches_zeros, y.rules, y.patterns), (16, false, 1, 4));
        assert!(y.prefilter, "text and hex patterns with fixed bytes are prefiltered");
        assert!(y.feed.blocks_skipped > 0, "blocks without a literal are not searched");
    }
}

#[test]
fn conditions_see_all_of_memory_not_one_block() {
    let dir = tempfile::tempdir().unwrap();
    let pat = b"FERRY-PLANT-0123".to_vec();
    let (path, _) = planted_image(dir.path(), &pat);
    let src = r#"
        rule four { strings: $a = "FERRY-PLANT-0123" condition: #a == 4 }
        rule one { strings: $a = "FERRY-PLANT-0123" condition: #a == 1 }
        rule far_apart { strings: $a = "FERRY-PLANT-0123" $x = { 11 00 00 } $y = { 44 00 00 } condition: all of them }
        rule not_absent { strings: $a = "FERRY-PLANT-0123" $n = "never" condition: $a and not $n }
        rule absent { strings: $n = "never" condition: $n }
        rule no_strings { condition: true }
    "#;
    for threads in [1, 2] {
        let mut m = ImageMem::open(&path, None).unwrap();
        let r = yara(&mut m, src, 4096, threads);
        let mut got = r.yara.unwrap().matching_rules;
        got.sort();
        assert_eq!(got, ["far_apart", "four", "no_strings", "not_absent"]);
    }
}

/// Memory with `text` at `at` in an otherwise zero buffer, as one RAM range.
fn text_mem(parts: &[(usize, &[u8])]) -> BufMem {
    let mut b = vec![0u8; 0x10000];
    for (at, t) in parts {
        b[*at..at + t.len()].copy_from_slice(t);
    }
    BufMem::flat(b)
}

/// A fullword or `\b` match that a block edge would cut from its word-character neighbour is
/// not reported: block edges move to non-word bytes.
#[test]
fn block_edges_inside_words_make_no_false_fullword_match() {
    // With 4 KiB blocks and 4 KiB of overlap, blocks start at 0x1000 multiples (re-read from one
    // page before): "Xabc" puts "abc" at a block's first byte with a word byte before it.
    let mut mem = text_mem(&[(0x0fff, b"Xabc_"), (0x3ffd, b"abcd"), (0x5000, b" abc "), (0x7ffd, b"qabc")]);
    let src = r#"
        rule fw { strings: $f = "abc" fullword condition: $f }
        rule wb { strings: $w = /\babc\b/ condition: $w }
        rule plain { strings: $p = "abc" condition: $p }
    "#;
    let r = yara(&mut mem, src, 4096, 1);
    assert_eq!(pas(&r, "$f"), [0x5001]);
    assert_eq!(pas(&r, "$w"), [0x5001]);
    assert_eq!(pas(&r, "$p"), [0x1000, 0x3ffd, 0x5001, 0x7ffe]);
    assert_eq!(r.yara.unwrap().feed.unsafe_edges, 0);
}

#[test]
fn zero_memory_is_scanned_only_when_a_pattern_matches_zeros() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("empty.img");
    let input = ImageHeaderInput { vm_config: serde_json::json!({}), ranges: scan_ranges(), parent: None };
    let w = ImageWriter::create(&path, input, WriteOptions::default()).unwrap();
    w.finish(b"", &[CpuRegs::default()]).unwrap();
    // An image with no data: nothing is read, nothing matches, the condition is still evaluated.
    let mut m = ImageMem::open(&path, None).unwrap();
    let r = yara(&mut m, "rule a { strings: $a = \"x\" condition: $a } rule b { condition: true }", 4096, 2);
    assert_eq!((r.total_matches, r.bytes_scanned), (0, 0));
    assert_eq!(r.yara.unwrap().matching_rules, ["b"]);
    // A pattern of zeros: all of RAM is scanned, never across the hole.
    let mut m = ImageMem::open(&path, None).unwrap();
    let r = yara(&mut m, "rule z { strings: $z = { 00 00 00 00 00 00 00 00 } condition: $z }", 0x10000, 2);
    let ram: u64 = scan_ranges().iter().map(|r| r.len).sum();
    assert_eq!(r.bytes_scanned, ram);
    assert!(r.yara.as_ref().unwrap().matches_zeros);
    assert_eq!(r.total_matches, ram - 2 * 7, "every start but the last 7 of each span: {}", r.total_matches);
    assert!(!r.matches.iter().any(|m| m.pa < 0x100000 && m.pa + 8 > 0x60000), "a match across the hole");
}

#[test]
fn pattern_bounds_come_from_the_rules() {
    let len = |src: &str| YaraRules::compile(src, "b.yar").unwrap().max_len();
    assert_eq!(len("rule a { strings: $a = \"abcd\" condition: $a }"), 4);
    assert_eq!(len("rule a { strings: $a = \"abcd\" wide ascii condition: $a }"), 8);
    assert_eq!(len("rule a { strings: $a = \"abcdef\" base64 condition: $a }"), 16);
    assert_eq!(len("rule a { strings: $a = { 01 [2-30] 02 ( 03 04 | 05 ) } condition: $a }"), 34);
    assert_eq!(len("rule a { strings: $a = /ab(c|de){1,3}x?/ condition: $a }"), 9);
    assert_eq!(len("rule a { strings: $a = /ab.{0,100}/ wide condition: $a }"), 2 * 102);
    assert_eq!(len("rule a { condition: true }"), 1);
}

#[test]
fn refused_rules_name_the_rule_and_line() {
    let err = |src: &str| YaraRules::compile(src, "r.yar").err().map(|e| e.to_string()).unwrap_or_default();
    let e = err("rule ok { condition: true }\nrule big {\n strings: $h = { 41 [0-70000] 42 }\n condition: $h }");
    assert!(e.contains("r.yar:3") && e.contains("rule big") && e.contains("70002"), "{e}");
    let e = err("rule e { condition: entrypoint == 0 }");
    assert!(e.contains("rule e") && e.contains("entrypoint"), "{e}");
    let e = err("rule c { strings: $a = \"a\" condition: #a in (0..100) > 1 }");
    assert!(e.contains("rule c") && e.contains("in (range)"), "{e}");
    let e = err("rule o { strings: $a = \"a\" condition: any of them in (0..10) }");
    assert!(e.contains("rule o") && e.contains("of ... at/in"), "{e}");
    let e = err("include \"other.yar\"\nrule i { condition: true }");
    assert!(e.contains("include"), "{e}");
    let e = err("import \"math\"\nrule m { condition: math.entropy(0, 10) > 7 }");
    assert!(e.contains("import \"math\"") && e.contains("used by m"), "{e}");
    let e = err("rule s { strings: $a = \"abc\" condition: $a and }");
    assert!(e.contains("r.yar:1"), "{e}");
    let e = err("rule u { strings: $a = \"abc\" condition: $b }");
    assert!(e.contains("r.yar:1") && e.contains("$b"), "{e}");
    assert!(YaraRules::from_file(std::path::Path::new("/nonexistent.yar")).is_err());
}

#[test]
fn many_blocks_many_rules_match_like_one_buffer() {
    // Random memory with planted words; 100 rules; 2 threads, small blocks: the same matches as
    // a naive search of the whole buffer.
    let mut b = vec![0u8; 0x80000];
    let mut x = 0x1234_5678_9abc_def0u64;
    for c in b.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes());
    }
    let words: Vec<String> = (0..100).map(|i| format!("plant-{i:03}-word")).collect();
    for (i, w) in words.iter().enumerate() {
        let at = (i * 5227 + 4090) % (b.len() - 20);
        b[at..at + w.len()].copy_from_slice(w.as_bytes());
    }
    let src: String = words
        .iter()
        .enumerate()
        .map(|(i, w)| format!("rule r{i} {{ strings: $a = \"{w}\" condition: $a }}\n"))
        .collect();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("rand.img");
    let input = ImageHeaderInput {
        vm_config: serde_json::json!({}),
        ranges: vec![RamRange::new(0, b.len() as u64)],
        parent: None,
    };
    let mut w =
        ImageWriter::create(&path, input, WriteOptions { chunk_size: 4 * 4096, ..WriteOptions::default() }).unwrap();
    w.write_pages(0, &b).unwrap();
    w.finish(b"", &[CpuRegs::default()]).unwrap();
    let mut m = ImageMem::open(&path, None).unwrap();
    let r = yara(&mut m, &src, 8192, 2);
    let mut want: Vec<(u64, String)> = Vec::new();
    for (i, w) in words.iter().enumerate() {
        let w = w.as_bytes();
        for pa in (0..=b.len() - w.len()).filter(|&a| &b[a..a + w.len()] == w) {
            let pa = pa as u64;
            want.push((pa, format!("r{i}")));
        }
    }
    want.sort();
    let got: Vec<(u64, String)> = r.matches.iter().map(|m| (m.pa, m.rule.clone().unwrap())).collect();
    assert_eq!(got, want);
    assert_eq!(r.yara.unwrap().matching_rules.len(), 100);
}

/// The literal prefilter skips blocks without any needle and keeps every match: `nocase` and
/// `wide` forms, a hex pattern with a wildcard, counts and negated conditions.
#[test]
fn prefilter_skips_blocks_and_keeps_every_match() {
    let mut mem = text_mem(&[
        (0x1000, b"SeCrEt"),
        (0x3000, b"k\0e\0y\0"),
        (0x6000, b" secret "),
        (0x9000, b"other"),
        (0xfffa, b"SECRET"),
    ]);
    let src = r#"
        rule three { strings: $s = "secret" nocase condition: #s == 3 }
        rule widekey { strings: $k = "key" wide condition: $k }
        rule absent { strings: $n = "nothere" condition: not $n }
        rule hexrun { strings: $h = { 6F 74 68 ?? 72 } condition: $h }
    "#;
    for (block, threads) in [(4096usize, 1), (4096, 2), (8192, 3)] {
        let r = yara(&mut mem, src, block, threads);
        let y = r.yara.as_ref().unwrap();
        assert_eq!(y.matching_rules, ["three", "widekey", "absent", "hexrun"], "block {block}");
        assert_eq!(pas(&r, "$s"), [0x1000, 0x6001, 0xfffa]);
        assert!(y.prefilter && y.feed.blocks_skipped > 0, "{:?}", y.feed);
    }
    // A regexp cannot be bounded by literals: every block goes to YARA-X.
    let r = yara(&mut mem, "rule re { strings: $r = /sec[a-z]{3}/ condition: $r }", 4096, 1);
    let y = r.yara.as_ref().unwrap();
    assert!(!y.prefilter && y.prefilter_note.as_deref().is_some_and(|n| n.contains("regexp")));
    assert_eq!(pas(&r, "$r"), [0x6001]);
}
