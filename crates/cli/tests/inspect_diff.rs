//! End to end: `ferry image diff` and `ferry image stats` on snapshots of the
//! test guest, checked against the raw memory that `ferry image export`
//! writes (an independent reader): a full snapshot, then while the `dirty`
//! workload rewrites its working set an incremental one (`--parent`) and a
//! full one of the same paused memory; both diff modes must find exactly the
//! pages the raw exports differ in. Bad input gives clear errors.

mod common;
use common::*;
use serde_json::Value;
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const PG: usize = 4096;

fn fails(args: &[&str], expect: &[&str]) {
    let o = ferry_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ferry {args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    for e in expect {
        assert!(err.contains(e), "ferry {args:?}: expected {e:?} in {err}");
    }
}

/// Guest memory as `ferry image export --format raw` writes it (from guest-physical 0).
fn raw(img: &Path) -> Vec<u8> {
    let out = img.with_extension("raw");
    let o = ferry_cmd(&["image", "export", s(img), "--format", "raw", "--out", s(&out)]);
    assert!(o.status.success(), "export: {}", String::from_utf8_lossy(&o.stderr));
    let b = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    b
}

/// Changed pages between two raw memories, as [start, end) runs.
fn raw_runs(x: &[u8], y: &[u8]) -> Vec<(u64, u64)> {
    assert_eq!(x.len(), y.len());
    let mut runs: Vec<(u64, u64)> = vec![];
    for (i, (a, b)) in x.chunks(PG).zip(y.chunks(PG)).enumerate() {
        if a != b {
            let p = (i * PG) as u64;
            match runs.last_mut() {
                Some(r) if r.1 == p => r.1 += PG as u64,
                _ => runs.push((p, p + PG as u64)),
            }
        }
    }
    runs
}

fn runs_of(v: &Value) -> Vec<(u64, u64)> {
    v["runs"].as_array().unwrap().iter().map(|r| (r["start"].as_u64().unwrap(), r["end"].as_u64().unwrap())).collect()
}

/// Three snapshots of one `dirty` guest: A full, then (paused) B incremental on A and C full.
fn dirty_snapshots() -> (tempfile::TempDir, PathBuf, PathBuf, PathBuf) {
    let (g, sock) = running_guest("dirty wss=2 report=100", "64M");
    let dir = tempfile::tempdir().unwrap();
    let (a, b, c) = (dir.path().join("a.img"), dir.path().join("b.img"), dir.path().join("c.img"));
    snapshot_ok(&sock, &a, &[]);
    std::thread::sleep(std::time::Duration::from_millis(300));
    let o = ferry_cmd(&["pause", "--api-sock", s(&sock)]);
    assert!(o.status.success(), "pause: {}", String::from_utf8_lossy(&o.stderr));
    snapshot_ok(&sock, &b, &["--parent", s(&a)]);
    snapshot_ok(&sock, &c, &[]);
    drop(g); // kills and reaps the VMM
    (dir, a, b, c)
}

#[test]
fn diff_finds_exactly_the_changed_pages_in_chain_and_full_mode() {
    let (dir, a, b, c) = dirty_snapshots();
    let (ra, rc) = (raw(&a), raw(&c));
    assert_eq!(raw(&b), rc, "B (incremental) and C (full) hold the same paused memory");
    let want = raw_runs(&ra, &rc);
    let want_pages: u64 = want.iter().map(|r| (r.1 - r.0) / PG as u64).sum();
    assert!(want_pages > 0, "the dirty workload changed nothing?");

    let chain = ok_json(&["image", "diff", s(&a), s(&b), "--json"]);
    assert_eq!(chain["mode"], "chain");
    assert_eq!(runs_of(&chain), want, "chain mode");
    assert_eq!(chain["changed_pages"], want_pages);
    let written = chain["written_pages"].as_u64().unwrap();
    assert!(written >= want_pages);
    assert_eq!(chain["identical_rewrites"].as_u64().unwrap(), written - want_pages);
    assert_eq!(chain["pages_compared"].as_u64().unwrap(), written, "chain mode reads only B's records");
    eprintln!("diff: {want_pages} changed pages in {} runs; B recorded {written}", want.len());

    let full = ok_json(&["image", "diff", s(&a), s(&b), "--full", "--json"]);
    assert_eq!(full["mode"], "full");
    assert_eq!(runs_of(&full), want, "forced full mode");
    assert!(full["pages_compared"].as_u64().unwrap() > written);
    let other = ok_json(&["image", "diff", s(&a), s(&c), "--json", "--threads", "1"]);
    assert_eq!(other["mode"], "full", "C is not A's descendant");
    assert_eq!(runs_of(&other), want, "full images");

    // Ranges cover the runs and count their pages; the identity-mapped guest
    // attributes every changed page to a virtual run of vCPU 0's tables.
    let ranges = chain["ranges"].as_array().unwrap();
    let in_ranges: u64 = ranges.iter().map(|r| r["pages"].as_u64().unwrap()).sum();
    assert_eq!(in_ranges, want_pages);
    let v = &chain["virt"];
    let attributed: u64 = v["regions"].as_array().unwrap().iter().map(|r| r["pages"].as_u64().unwrap()).sum();
    assert!(attributed >= want_pages - v["unmapped_pages"].as_u64().unwrap(), "{v}");
    assert_eq!(v["unmapped_pages"], 0, "everything is identity mapped: {v}");
    let text = ferry_cmd(&["image", "diff", s(&a), s(&b)]);
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("Chain comparison") && text.contains("changed:") && text.contains("by virtual range"),
        "{text}"
    );

    // Bad input.
    fails(&["image", "diff", s(&a), s(&dir.path().join("missing.img"))], &["missing.img"]);
    let mut bytes = std::fs::read(&c).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    let bad = dir.path().join("bad.img");
    std::fs::write(&bad, &bytes).unwrap();
    fails(&["image", "diff", s(&a), s(&bad)], &["bad.img", "chunk"]);
    fails(&["image", "stats", s(&bad)], &["bad.img", "chunk"]);
}

#[test]
fn stats_counts_zero_and_shared_pages_of_an_idle_guest() {
    let (g, sock) = running_guest("idle report=1000 plant=465252592d5354415453@0x500000", "32M");
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (dir.path().join("a.img"), dir.path().join("b.img"));
    snapshot_ok(&sock, &a, &[]);
    std::thread::sleep(std::time::Duration::from_millis(200));
    snapshot_ok(&sock, &b, &[]);
    drop(g);
    let (ra, rb) = (raw(&a), raw(&b));
    let ram = ok_json(&["image", "inspect", s(&a), "--json"])["guest_memory_bytes"].as_u64().unwrap();
    let count = |m: &[u8]| {
        let mut zero = 0u64;
        let mut uniq = HashSet::new();
        for p in m.chunks(PG) {
            if p.iter().all(|&x| x == 0) {
                zero += 1;
            } else {
                uniq.insert(blake3::hash(p));
            }
        }
        (zero, uniq)
    };
    let (za, ua) = count(&ra);
    let (zb, ub) = count(&rb);
    // The raw export is flat from 0, so it may hold holes (zero) that are not RAM.
    let holes = ra.len() as u64 / PG as u64 - ram / PG as u64;
    let r = ok_json(&["image", "stats", s(&a), s(&b), "--json", "--compress-every", "1"]);
    let (sa, sb) = (&r["images"][0], &r["images"][1]);
    assert_eq!(sa["ram_pages"].as_u64().unwrap(), ram / PG as u64);
    assert_eq!(sa["zero_pages"].as_u64().unwrap(), za - holes, "{sa}");
    assert_eq!(sb["zero_pages"].as_u64().unwrap(), zb - holes);
    assert!(sa["zero_pages"].as_u64().unwrap() * 2 > sa["ram_pages"].as_u64().unwrap(), "an idle guest is mostly zero");
    assert_eq!(sa["unique_nonzero_pages"].as_u64().unwrap(), ua.len() as u64);
    let hist: u64 = sa["entropy_histogram"].as_array().unwrap().iter().map(|x| x.as_u64().unwrap()).sum();
    assert_eq!(hist, sa["nonzero_pages"].as_u64().unwrap());
    assert!(sa["compress"]["lz4_ratio"].as_f64().unwrap() > 1.0);
    // Two snapshots of the same idle guest share nearly everything.
    let all: HashSet<_> = ua.union(&ub).collect();
    let sh = &r["sharing"];
    assert_eq!(sh["total_pages"].as_u64().unwrap(), 2 * ram / PG as u64);
    assert_eq!(sh["unique_pages"].as_u64().unwrap(), all.len() as u64 + 1, "plus the zero page");
    assert!(sh["pages_saved"].as_u64().unwrap() >= ram / PG as u64, "{sh}");
    eprintln!("stats: {sa}\nsharing: {sh}");
    let text = ferry_cmd(&["image", "stats", s(&a)]);
    assert!(String::from_utf8_lossy(&text.stdout).contains("entropy (bits/byte"));

    // Images of guests with different RAM layouts cannot be compared.
    let (g2, sock2) = running_guest("idle report=1000", "48M");
    let other = dir.path().join("other.img");
    snapshot_ok(&sock2, &other, &[]);
    drop(g2);
    fails(&["image", "diff", s(&a), s(&other)], &["different RAM layouts", "a.img", "other.img"]);
    fails(&["image", "stats", s(&dir.path().join("nope.img"))], &["nope.img"]);
}
