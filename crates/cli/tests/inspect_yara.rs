//! End to end: `ferry image scan --rules FILE.yar` (YARA-X) over snapshots of
//! the test guest. The guest runs `dirty fill=word`: every page of its 4 MiB
//! region holds one marker word (`(generation << 32) | pfn` at offset 0) and
//! is otherwise zero, the first 1 MiB (the working set) is rewritten all the
//! time, and the bytes planted at the region's last 32 bytes survive (marking
//! writes only word 0 of a page). An incremental child image then holds the
//! working set's pages while its parent holds the rest, so rules find matches
//! across an image and chunk boundary (working-set end), across a zero gap and
//! data (region start), across data and a zero gap (region end), and rules
//! that are refused or malformed fail with clear messages.

mod common;
use common::*;
use serde_json::Value;
use std::path::PathBuf;

/// The planted bytes, at the last 32 bytes of the region's last page.
const PLANT: &[u8; 32] = b"FERRY-YARA-TEXT-0123456789abcdef";
const REGION: u64 = 0x200000;
const PLANT_AT: u64 = REGION + (4 << 20) - 32;
/// The working set's last page (rewritten, so in the child image) and the next one (parent only).
const WSS_END: u64 = REGION + (1 << 20);

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x} ")).collect()
}

fn run(args: &[&str]) -> std::process::Output {
    let o = ferry_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("panicked"), "ferry {args:?}: {err}");
    o
}

fn ok_json(args: &[&str]) -> Value {
    let o = run(args);
    assert!(o.status.success(), "ferry {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    serde_json::from_slice(&o.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&o.stdout)))
}

fn fails(args: &[&str], expect: &[&str]) -> String {
    let o = run(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "ferry {args:?} should fail");
    for e in expect {
        assert!(err.contains(e), "ferry {args:?}: expected {e:?} in {err}");
    }
    err
}

/// A parent snapshot and an incremental child of the planted `dirty` guest.
fn planted_chain() -> (tempfile::TempDir, PathBuf, PathBuf) {
    let cmdline =
        format!("dirty fill=word mem=4 wss=1 rate=max report=200 plant={}@{PLANT_AT:#x}", hex(PLANT).replace(' ', ""));
    let (mut g, sock) = running_guest(&cmdline, "64M");
    let info = g.seen.iter().find(|l| l.starts_with("INFO")).cloned().unwrap_or_default();
    let reserved_end = info
        .split_whitespace()
        .find_map(|w| w.strip_prefix("reserved_end=0x"))
        .and_then(|h| u64::from_str_radix(h, 16).ok())
        .unwrap_or_else(|| panic!("no reserved_end in {info:?}"));
    assert!(reserved_end < REGION - 4096, "the region must start at {REGION:#x} after a zero page: {info}");
    assert!(g.seen.iter().any(|l| l.starts_with(&format!("PLANTED gpa={PLANT_AT:#x} len=32"))), "{:?}", g.seen);
    // Let the working set be rewritten between the two snapshots.
    g.wait_line("PROGRESS", secs(30));
    let dir = tempfile::tempdir().unwrap();
    let parent = dir.path().join("parent.img");
    let child = dir.path().join("child.img");
    snapshot_ok(&sock, &parent, &[]);
    g.wait_line("PROGRESS", secs(30));
    g.wait_line("PROGRESS", secs(30));
    snapshot_ok(&sock, &child, &["--parent", s(&parent)]);
    drop(g);
    (dir, parent, child)
}

const RULES: &str = r#"
rule text_plant {
  strings:
    $t = "FERRY-YARA-TEXT-"
  condition:
    $t
}

rule hex_jump {
  strings:
    // wildcards, a nibble wildcard and a jump
    $h = { 46 45 52 52 59 ?? 59 41 [2-6] 54 4? 58 54 2D }
  condition:
    $h
}

rule bounded_regexp {
  strings:
    $r = /TEXT-[0-9]{4,10}[a-f]{1,6}/
  condition:
    $r
}

rule data_then_zero_gap {
  strings:
    // the plant's last 8 bytes, then the never-written page after the region
    $z = { 38 39 61 62 63 64 65 66 00 00 00 00 00 00 00 00 }
  condition:
    $z
}

rule zero_gap_then_data {
  strings:
    // the never-written page before the region, then the first page's marker (pfn 0x200)
    $g = { 00 00 00 00 00 00 00 00 00 02 00 00 }
  condition:
    $g
}

rule across_images {
  strings:
    // zeros ending the working set's last page (child image), then the next page's
    // generation-0 marker (pfn 0x300, parent image)
    $c = { 00 00 00 00 00 03 00 00 00 00 00 00 }
  condition:
    $c
}

rule and_of {
  strings:
    $a = "FERRY-YARA"
    $b = { 00 00 00 00 00 03 00 00 00 00 00 00 }
    $x = "absent-Q9Z-never"
  condition:
    2 of them and $a and not $x
}

rule absent {
  strings:
    $x = "absent-Q9Z-never"
  condition:
    $x
}

rule count_all {
  strings:
    $m = "ERRY-YA"
  condition:
    #m >= 1 and #m < 10 and !m[1] == 7
}
"#;

fn pas(report: &Value, rule: &str, pattern: &str) -> Vec<u64> {
    report["matches"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["rule"] == rule && m["pattern"] == pattern)
        .map(|m| m["pa"].as_u64().unwrap())
        .collect()
}

#[test]
fn yara_rules_find_planted_patterns_across_image_chunk_and_zero_gap_boundaries() {
    let (dir, parent, child) = planted_chain();
    // The child holds the working set's last page, the parent the page after it.
    let d = ok_json(&["image", "diff", s(&parent), s(&child), "--json"]);
    let changed = |pa: u64| {
        d["runs"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["start"].as_u64().unwrap() <= pa && pa < r["end"].as_u64().unwrap())
    };
    assert!(changed(WSS_END - 4096) && !changed(WSS_END), "working-set end must be a child|parent boundary: {d}");

    let rules = dir.path().join("plant.yar");
    std::fs::write(&rules, RULES).unwrap();
    let r = ok_json(&["image", "scan", s(&child), "--rules", s(&rules), "--json"]);
    let y = &r["yara"];
    let mut matching: Vec<&str> = y["matching_rules"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    matching.sort_unstable();
    assert_eq!(
        matching,
        [
            "across_images",
            "and_of",
            "bounded_regexp",
            "count_all",
            "data_then_zero_gap",
            "hex_jump",
            "text_plant",
            "zero_gap_then_data"
        ],
        "{r}"
    );
    // (The guest's parsed command line may hold another copy of the plant: `contains`.)
    for (rule, pat, at) in [
        ("text_plant", "$t", PLANT_AT),
        ("hex_jump", "$h", PLANT_AT),
        ("bounded_regexp", "$r", PLANT_AT + 11),
        ("data_then_zero_gap", "$z", PLANT_AT + 24),
        ("zero_gap_then_data", "$g", REGION - 8),
        ("across_images", "$c", WSS_END - 4),
        ("and_of", "$a", PLANT_AT),
        ("and_of", "$b", WSS_END - 4),
        ("count_all", "$m", PLANT_AT + 1),
    ] {
        assert!(pas(&r, rule, pat).contains(&at), "{rule} {pat} not at {at:#x}: {r}");
    }
    assert!(pas(&r, "and_of", "$x").is_empty());
    // Lengths: the regexp's greedy match, and the hex pattern's jump.
    let m = r["matches"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["rule"] == "bounded_regexp" && m["pa"] == PLANT_AT + 11)
        .unwrap();
    assert_eq!(m["len"], 5 + 10 + 6, "{m}");
    // Identity-mapped: the virtual address is the physical one.
    let m = r["matches"].as_array().unwrap().iter().find(|m| m["rule"] == "text_plant" && m["pa"] == PLANT_AT).unwrap();
    assert!(m["va"].as_array().unwrap().iter().any(|v| v == PLANT_AT), "{m}");
    assert!(r["bytes_scanned"].as_u64().unwrap() < r["ram_bytes"].as_u64().unwrap() / 4, "zero memory is skipped: {r}");
    assert_eq!(y["matches_zeros"], false);
    assert_eq!(y["max_pattern_len"], 21, "the regexp is the longest: {y}");

    // The parent alone: the working set's pages hold older generations, the rest is the same.
    let p = ok_json(&["image", "scan", s(&parent), "--rules", s(&rules), "--json", "--threads", "1"]);
    assert!(pas(&p, "text_plant", "$t").contains(&PLANT_AT), "{p}");
    let h = p["matches"].as_array().unwrap().iter().find(|m| m["rule"] == "hex_jump" && m["pa"] == PLANT_AT).unwrap();
    assert_eq!(h["len"], 16, "{h}");
    assert_eq!(p["threads"], 1);

    // Human output: address, rule:pattern, virtual address, and the rules that matched.
    let o = run(&["image", "scan", s(&child), "--rules", s(&rules)]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains(&format!("{PLANT_AT:#014x}  text_plant:$t  va {PLANT_AT:#x}")), "{text}");
    assert!(text.contains("8 of 9 rule(s) matched"), "{text}");

    // A rule that matches zeros scans never-written memory too.
    let zeros = dir.path().join("zeros.yar");
    std::fs::write(&zeros, "rule zeros { strings: $z = { 00 00 00 00 00 00 00 00 } condition: #z > 1000 }").unwrap();
    let z = ok_json(&["image", "scan", s(&child), "--rules", s(&zeros), "--json", "--max-matches", "3"]);
    assert_eq!(z["yara"]["matches_zeros"], true);
    assert_eq!(z["yara"]["matching_rules"][0], "zeros");
    assert_eq!(z["bytes_scanned"], z["ram_bytes"], "{z}");
    assert_eq!(z["matches"].as_array().unwrap().len(), 3);
    assert_eq!(z["truncated"], true);
    // Nothing in the image: no match, no matching rule.
    let none = dir.path().join("none.yar");
    std::fs::write(&none, "rule nothing { strings: $b = { 01 02 03 04 05 06 07 08 } condition: $b }").unwrap();
    let n = ok_json(&["image", "scan", s(&child), "--rules", s(&none), "--json"]);
    assert_eq!(n["total_matches"], 0, "{n}");
    assert_eq!(n["yara"]["matching_rules"].as_array().unwrap().len(), 0);

    // Refused and malformed rules: what, where, and which rule.
    let bad = |name: &str, src: &str, expect: &[&str]| {
        let f = dir.path().join(name);
        std::fs::write(&f, src).unwrap();
        fails(&["image", "scan", s(&child), "--rules", s(&f)], expect);
    };
    bad(
        "syntax.yar",
        "rule broken {\n  strings:\n    $a = \"x\"\n  condition:\n    $a and\n}\n",
        &["syntax.yar:", "error"],
    );
    bad(
        "module.yar",
        "import \"pe\"\nrule uses_pe { condition: pe.is_dll() }\n",
        &["module.yar:1", "uses_pe", "import \"pe\"", "whole files"],
    );
    bad(
        "filesize.yar",
        "rule small {\n  strings: $a = \"x\"\n  condition: $a and filesize < 100\n}\n",
        &["filesize.yar:3", "rule small", "filesize"],
    );
    bad("offset.yar", "rule at0 { strings: $a = \"x\" condition: @a[1] == 0 }", &["rule at0", "offset `@a`"]);
    bad("at.yar", "rule at1 { strings: $a = \"x\" condition: $a at 100 }", &["rule at1", "at/in"]);
    bad("uint.yar", "rule mz { condition: uint16(0) == 0x5a4d }", &["rule mz", "uint16()"]);
    bad(
        "star.yar",
        "rule star {\n strings:\n  $r = /abc.*def/\n condition: $r\n}",
        &["star.yar:3", "rule star", "no longest match"],
    );
    bad("jump.yar", "rule jump { strings: $h = { 41 42 [4-] 43 } condition: $h }", &["rule jump", "unbounded jump"]);
    bad("anchor.yar", "rule anch { strings: $r = /^MZ/ condition: $r }", &["rule anch", "anchor"]);
    fails(&["image", "scan", s(&child), "--rules", "/nonexistent/rules.yar"], &["/nonexistent/rules.yar"]);
    fails(&["image", "scan", s(&child), "--rules", s(&rules), "--string", "x"], &["cannot be used with"]);
}
