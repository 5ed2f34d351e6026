//! End to end: plant secrets in the test guest's scratch region, snapshot it
//! (full and incremental), redact by string, hex and range with
//! `ferry image redact`, and show that the secrets are gone, every other byte
//! is unchanged, the copy verifies and restores (and the guest's own
//! `verify` passes), encrypted inputs stay encrypted, YARA rules redact
//! their matches, and bad requests fail
//! clearly without leaving a file behind.

mod common;
use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// Text secret, planted across the page boundary at 0x201000.
const S1: &[u8] = b"hunter2-PASSWORD-s3cr3t";
const S1_AT: u64 = 0x201000 - 9;
/// Binary secret, found by `--hex`.
const S2: &[u8] = &[0xc0, 0xff, 0xee, 0x00, 0xde, 0xad, 0xbe, 0xef, 0x5e, 0xc2, 0xe7];
const S2_AT: u64 = 0x280123;
/// A range of scratch data (random bytes) to redact whole, over three pages.
const RANGE: (u64, u64) = (0x300800, 0x302100);
const FILL: u8 = 0x2a;
const PAGE: usize = 4096;

/// Runs ferry expecting failure; returns stderr after checking it names every `expect`.
fn fails(args: &[&str], expect: &[&str]) -> String {
    let o = ferry_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "ferry {args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    for e in expect {
        assert!(err.contains(e), "ferry {args:?}: expected {e:?} in {err}");
    }
    err
}

/// The secrets planted in 2 MiB of scratch (at 0x200000, the documented start for RAM below 4 GiB).
fn cmdline(mode: &str) -> String {
    format!("{mode} scratch=2 plant={}@{S1_AT:#x} plant={}@{S2_AT:#x}", hex(S1), hex(S2))
}

fn check_boot_lines(g: &Guest) {
    let scratch = g.seen.iter().find(|l| l.starts_with("SCRATCH")).unwrap_or_else(|| panic!("{:?}", g.seen));
    assert!(scratch.starts_with("SCRATCH gpa=0x200000 end=0x400000 pages=512"), "{scratch}");
    assert_eq!(g.seen.iter().filter(|l| l.starts_with("PLANTED")).count(), 2, "{:?}", g.seen);
}

/// Files in `dir` whose name starts with `prefix` (outputs, reports and their temp files).
fn left(dir: &Path, prefix: &str) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(prefix))
        .collect()
}

fn scan_count(img: &Path, key: Option<&Path>) -> u64 {
    scan(img, key)["total_matches"].as_u64().unwrap()
}

/// `ferry image scan` for both secrets, as JSON.
fn scan(img: &Path, key: Option<&Path>) -> Value {
    let mut args = vec!["image", "scan", s(img), "--string", "hunter2-PASSWORD-s3cr3t", "--hex"];
    let h = hex(S2);
    args.push(&h);
    args.push("--json");
    if let Some(k) = key {
        args.extend(["--key-file", s(k)]);
    }
    ok_json(&args)
}

fn export_raw(img: &Path, out: &Path) -> Vec<u8> {
    let o = ferry_cmd(&["image", "export", s(img), "--format", "raw", "--out", s(out)]);
    assert!(o.status.success(), "export: {}", String::from_utf8_lossy(&o.stderr));
    std::fs::read(out).unwrap()
}

#[test]
fn redacted_chain_loses_its_secrets_keeps_every_other_byte_and_still_restores_and_verifies() {
    let (mut g, sock) = running_guest(&cmdline("dirty fill=random mem=16 wss=1 rate=max"), "64M");
    check_boot_lines(&g);
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let img = dir.path().join("incr.img");
    snapshot_ok(&sock, &base, &[]);
    snapshot_ok(&sock, &img, &["--parent", s(&base)]);
    g.send_line("verify");
    assert!(g.wait_line("VERIFY", secs(60)).starts_with("VERIFY OK"));
    drop(g);
    // Both secrets are in the chain: in the scratch region, and also in the guest's own
    // parsed command line (its plant bytes), which is redacted as well.
    let before = scan(&img, None);
    let pas: Vec<u64> = before["matches"].as_array().unwrap().iter().map(|m| m["pa"].as_u64().unwrap()).collect();
    assert!(pas.contains(&S1_AT) && pas.contains(&S2_AT), "{before}");

    let red = dir.path().join("red.img");
    let range = format!("{:#x}..{:#x}", RANGE.0, RANGE.1);
    let fill = format!("{FILL:#x}");
    let h = hex(S2);
    let args = [
        "image",
        "redact",
        s(&img),
        "--out",
        s(&red),
        "--string",
        "hunter2-PASSWORD-s3cr3t",
        "--hex",
        &h,
        "--range",
        &range,
        "--fill",
        &fill,
        "--json",
    ];
    let o = ferry_cmd(&args);
    assert!(o.status.success(), "redact failed: {}", String::from_utf8_lossy(&o.stderr));
    let stdout = String::from_utf8(o.stdout).unwrap();
    let r: Value = serde_json::from_str(&stdout).unwrap();

    // The report: addresses, lengths and causes; the chain it came from; never the secrets.
    let reds = r["redactions"].as_array().unwrap();
    let got: Vec<(u64, u64, String)> = reds
        .iter()
        .map(|d| (d["start"].as_u64().unwrap(), d["len"].as_u64().unwrap(), d["kind"].as_str().unwrap().to_string()))
        .collect();
    for want in [
        (S1_AT, S1.len() as u64, "pattern".to_string()),
        (S2_AT, S2.len() as u64, "pattern".to_string()),
        (RANGE.0, RANGE.1 - RANGE.0, "range".to_string()),
    ] {
        assert!(got.contains(&want), "{want:?} not in {r}");
    }
    assert_eq!(got.len() as u64, before["total_matches"].as_u64().unwrap() + 1, "every match and the range: {r}");
    for d in reds.iter().filter(|d| d["kind"] == "pattern") {
        let len = if d["index"] == 0 { S1.len() } else { S2.len() };
        assert_eq!(d["len"], len as u64, "{d}");
    }
    let at_s2 = reds.iter().find(|d| d["start"] == S2_AT).unwrap();
    assert_eq!(at_s2["index"], 1, "the hex pattern is pattern 1: {r}");
    let mut touched: Vec<u64> =
        got.iter().flat_map(|&(s, l, _)| (s / 4096..(s + l).div_ceil(4096)).map(|p| p * 4096)).collect();
    touched.sort_unstable();
    touched.dedup();
    assert!(touched.len() >= 6, "{touched:x?}");
    assert_eq!(r["source"].as_array().unwrap().len(), 2, "both chain members are named: {r}");
    assert_eq!(r["pages_touched"], touched.len() as u64);
    assert_eq!(r["matches_after"], 0);
    let report_file = dir.path().join("red.img.redaction.json");
    assert_eq!(r["report_path"], s(&report_file));
    let stored: Value = serde_json::from_slice(&std::fs::read(&report_file).unwrap()).unwrap();
    assert_eq!(stored, r, "the report beside the image is the one printed");
    for text in [stdout.as_str(), &std::fs::read_to_string(&report_file).unwrap()] {
        assert!(!text.contains("hunter2") && !text.contains("s3cr3t") && !text.contains(&h), "secret in {text}");
        assert!(!text.as_bytes().windows(S2.len()).any(|w| w == S2));
    }
    let inspect = ok_json(&["image", "inspect", s(&red), "--json"]);
    assert!(inspect["header"]["parent"].is_null(), "the copy is a full image: {inspect}");
    assert_eq!(inspect["root_hash"], r["output_root_hash"]);

    // The secrets are gone; the image verifies.
    assert_eq!(scan_count(&red, None), 0);
    let o = ferry_cmd(&["image", "verify", s(&red)]);
    assert!(o.status.success(), "verify: {}", String::from_utf8_lossy(&o.stderr));

    // Page by page: only the touched pages differ, and there only the redacted bytes.
    let a = export_raw(&img, &dir.path().join("a.raw"));
    let b = export_raw(&red, &dir.path().join("b.raw"));
    assert_eq!(a.len(), b.len());
    let inside = |x: u64| got.iter().any(|&(s, l, _)| s <= x && x < s + l);
    let mut changed_pages = vec![];
    for (p, (pa, pb)) in a.chunks(PAGE).zip(b.chunks(PAGE)).enumerate() {
        if blake3::hash(pa) == blake3::hash(pb) {
            continue;
        }
        changed_pages.push(p as u64 * PAGE as u64);
        for (i, (&x, &y)) in pa.iter().zip(pb).enumerate() {
            let at = (p * PAGE + i) as u64;
            if inside(at) {
                assert_eq!(y, FILL, "redacted byte at {at:#x}");
            } else {
                assert_eq!(x, y, "byte at {at:#x} outside the redactions changed");
            }
        }
    }
    assert_eq!(changed_pages, touched, "exactly the pages the report names changed");
    // The range held random scratch data before, so its redaction was a real change.
    assert!(a[RANGE.0 as usize..RANGE.1 as usize].iter().any(|&x| x != FILL));

    // It restores, and the guest's own check of its workload passes.
    let rdir = tempfile::tempdir().unwrap();
    let rsock = rdir.path().join("r.sock");
    let mut rg = Guest::start_restore(rdir, &[s(&red), "--api-sock", s(&rsock)]);
    wait_sock(&rsock);
    rg.wait_line("PROGRESS", secs(60));
    rg.send_line("verify");
    let v = rg.wait_line("VERIFY", secs(60));
    assert!(v.starts_with("VERIFY OK pages=4096"), "{v}");
}

#[test]
fn encrypted_images_stay_encrypted_and_bad_requests_fail_without_leaving_files() {
    let (g, sock) = running_guest(&cmdline("idle report=1000"), "64M");
    check_boot_lines(&g);
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("key");
    std::fs::write(&key, b"redaction test key").unwrap();
    let plain = dir.path().join("plain.img");
    snapshot_ok(&sock, &plain, &[]);
    let enc = dir.path().join("enc.img");
    snapshot_ok(&sock, &enc, &["--encrypt", "--key-file", s(&key)]);
    drop(g);
    let red = dir.path().join("red.img");

    // Without the key nothing is written.
    fails(&["image", "redact", s(&enc), "--out", s(&red), "--string", "hunter2"], &["key"]);
    assert!(left(dir.path(), "red.img").is_empty());
    let h = hex(S2);
    let r = ok_json(&[
        "image",
        "redact",
        s(&enc),
        "--out",
        s(&red),
        "--string",
        "hunter2",
        "--hex",
        &h,
        "--key-file",
        s(&key),
        "--json",
    ]);
    assert_eq!(r["encrypted"], true);
    let hunter = r["patterns"][0]["matches"].as_u64().unwrap();
    assert!(hunter >= 1 && r["patterns"][1]["matches"].as_u64().unwrap() >= 1, "{r}");
    let inspect = ok_json(&["image", "inspect", s(&red), "--json"]);
    assert!(inspect["header"]["encryption"].is_object(), "re-encrypted: {inspect}");
    fails(&["image", "scan", s(&red), "--string", "PASSWORD"], &["key"]);
    fails(&["image", "read", s(&red), "--phys", "0x200000"], &["key"]);
    // With the key: readable, the string's match is gone, the rest of the secret is not.
    assert_eq!(scan_count(&red, Some(&key)), 0);
    let rest = ok_json(&["image", "scan", s(&red), "--string", "PASSWORD-s3cr3t", "--key-file", s(&key), "--json"]);
    assert_eq!(rest["total_matches"], hunter, "only the matched bytes are overwritten");
    let o = ferry_cmd(&["image", "verify", s(&red), "--key-file", s(&key)]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));

    // A YARA rule set: the matches of the rules that hold go, reported by rule name.
    let rules = dir.path().join("secrets.yar");
    std::fs::write(
        &rules,
        "rule planted_secret {\n strings:\n  $a = \"hunter2-PASSWORD\"\n  $b = { c0 ff ee 00 de ad }\n \
         condition:\n  any of them\n}\nrule absent {\n strings:\n  $n = \"no-such-bytes-here\"\n condition:\n  $n\n}\n",
    )
    .unwrap();
    let yred = dir.path().join("yara.img");
    let r = ok_json(&["image", "redact", s(&plain), "--out", s(&yred), "--rules", s(&rules), "--json"]);
    let reds = r["redactions"].as_array().unwrap();
    assert!(reds.iter().all(|d| d["kind"] == "rule" && d["rule"] == "planted_secret"), "{r}");
    assert!(reds.iter().any(|d| d["start"] == S1_AT && d["len"] == 16), "{r}");
    assert!(reds.iter().any(|d| d["start"] == S2_AT && d["len"] == 6), "{r}");
    assert_eq!(r["rules"][0]["rule"], "planted_secret", "{r}");
    assert_eq!(r["rules"].as_array().unwrap().len(), 1, "a rule that does not hold redacts nothing: {r}");
    assert_eq!(scan_count(&yred, None), 0);
    let o = ferry_cmd(&["image", "scan", s(&yred), "--rules", s(&rules), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["total_matches"], 0, "{v}");

    // Bad requests: clear errors, no output, no report, no temp file.
    let bad = dir.path().join("bad.img");
    let redact = |extra: &[&str], expect: &[&str]| {
        let mut args = vec!["image", "redact", s(&plain), "--out", s(&bad)];
        args.extend_from_slice(extra);
        fails(&args, expect);
        assert!(left(dir.path(), "bad.img").is_empty(), "{:?}", left(dir.path(), "bad.img"));
    };
    redact(&["--range", "0x8000000..0x8001000"], &["outside guest memory", "0x8000000"]);
    redact(&["--range", "0x300000-0x301000"], &["0x300000-0x301000", "START..END"]);
    redact(&["--range", "0x301000..0x300000"], &["empty"]);
    redact(&["--fill", "256", "--string", "x"], &["--fill"]);
    redact(&[], &["nothing to redact"]);
    let bad_rules = dir.path().join("whole-file.yar");
    std::fs::write(&bad_rules, "rule big { condition: filesize > 100 }\n").unwrap();
    redact(&["--rules", s(&bad_rules)], &["whole-file.yar", "filesize"]);
    redact(&["--rules", s(&dir.path().join("missing.yar"))], &["missing.yar"]);
    redact(&["--hex", "2a2a2a2a", "--fill", "0x2a", "--range", "0x300000..0x300010"], &["still has", "--fill"]);
    let same = fails(&["image", "redact", s(&plain), "--out", s(&plain), "--string", "hunter2"], &["is the input"]);
    assert!(same.contains("plain.img"), "{same}");
    let spelled = dir.path().join(".").join("plain.img");
    fails(&["image", "redact", s(&plain), "--out", s(&spelled), "--string", "hunter2"], &["is the input"]);
    assert!(std::fs::metadata(&plain).unwrap().len() > 0);
    // A corrupt input: one flipped byte in the middle of the file (inside a chunk).
    let corrupt = dir.path().join("corrupt.img");
    let mut bytes = std::fs::read(&plain).unwrap();
    let mid = bytes.len() / 3;
    bytes[mid] ^= 0x10;
    std::fs::write(&corrupt, &bytes).unwrap();
    fails(
        &["image", "redact", s(&corrupt), "--out", s(&bad), "--range", "0x300000..0x301000"],
        &["corrupt.img", "corrupt"],
    );
    assert!(left(dir.path(), "bad.img").is_empty());
    let _: PathBuf = bad;
}
