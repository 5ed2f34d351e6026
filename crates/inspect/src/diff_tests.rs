//! `diff` and `stats` on real images checked against a byte model of the
//! memory: chain shortcut, full comparison, rewrites with identical bytes,
//! zero runs, duplicates within and across images, and bad input.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use ferry_image::{CpuRegs, Hash32, ImageHeaderInput, ImageWriter, ParentRef, RamRange, WriteOptions};

use crate::*;

const PG: usize = 4096;

/// RAM: two ranges with a hole between them.
fn ranges() -> Vec<RamRange> {
    vec![RamRange::new(0, 0x80000), RamRange::new(0x100000, 0x40000)]
}

fn model_len() -> usize {
    0x140000
}

/// A page of pseudo-random bytes from `seed` (never zero, never equal for different seeds).
fn noise(seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..PG)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Pages an incremental image records: data, or `None` for a zero run.
type Records = [(u64, Option<Vec<u8>>)];

fn write(path: &Path, model: &[u8], parent: Option<ParentRef>, pages: Option<&Records>) -> Hash32 {
    let input = ImageHeaderInput { vm_config: serde_json::json!({}), ranges: ranges(), parent };
    let opts = WriteOptions { chunk_size: 4 * PG as u32, ..WriteOptions::default() };
    let mut w = ImageWriter::create(path, input, opts).unwrap();
    match pages {
        None => {
            for r in ranges() {
                w.write_pages(r.start, &model[r.start as usize..(r.start + r.len) as usize]).unwrap();
            }
        }
        Some(list) => {
            for (gpa, data) in list {
                match data {
                    Some(d) => w.write_pages(*gpa, d).unwrap(),
                    None => w.write_zero(*gpa, 1).unwrap(),
                }
            }
        }
    }
    w.finish(b"", &[CpuRegs::default()]).unwrap().root_hash
}

/// A (full), B (incremental on A) and C (full copy of B's memory), with their models.
struct Set {
    _dir: tempfile::TempDir,
    a: PathBuf,
    b: PathBuf,
    c: PathBuf,
    ma: Vec<u8>,
    mb: Vec<u8>,
}

fn set() -> Set {
    let dir = tempfile::tempdir().unwrap();
    let mut ma = vec![0u8; model_len()];
    for p in 0..0x80usize {
        // pages 0..0x80: data, with every 8th page equal to page 0 (duplicates), page 5 zero
        let bytes = if p % 8 == 0 { noise(1000) } else { noise(p as u64) };
        if p != 5 {
            ma[p * PG..(p + 1) * PG].copy_from_slice(&bytes);
        }
    }
    for p in 0x100..0x120usize {
        ma[p * PG..(p + 1) * PG].copy_from_slice(&noise(p as u64));
    }
    let a = dir.path().join("a.img");
    let root = write(&a, &ma, None, None);
    // B: pages 3 and 4 changed (one run), page 9 rewritten with the same bytes, page 0x10 zeroed,
    // page 0x13f (in the second range, never written in A) gets data, page 0x110 changed.
    let mut mb = ma.clone();
    let mut list: Vec<(u64, Option<Vec<u8>>)> = vec![];
    let mut set_page = |m: &mut Vec<u8>, p: usize, d: Option<Vec<u8>>| {
        match &d {
            Some(b) => m[p * PG..(p + 1) * PG].copy_from_slice(b),
            None => m[p * PG..(p + 1) * PG].fill(0),
        }
        list.push(((p * PG) as u64, d));
    };
    set_page(&mut mb, 3, Some(noise(7003)));
    set_page(&mut mb, 4, Some(noise(7004)));
    let same = ma[9 * PG..10 * PG].to_vec();
    set_page(&mut mb, 9, Some(same));
    set_page(&mut mb, 0x10, None);
    set_page(&mut mb, 0x13f, Some(noise(7013)));
    set_page(&mut mb, 0x110, Some(noise(7110)));
    let b = dir.path().join("b.img");
    write(&b, &mb, Some(ParentRef { root_hash: root, path_hint: "a.img".into() }), Some(&list));
    let c = dir.path().join("c.img");
    write(&c, &mb, None, None);
    Set { _dir: dir, a, b, c, ma, mb }
}

/// Changed pages by the model, as runs.
fn oracle(x: &[u8], y: &[u8]) -> Vec<ChangedRun> {
    let mut pages = vec![];
    for r in ranges() {
        for p in (r.start..r.start + r.len).step_by(PG) {
            let (s, e) = (p as usize, p as usize + PG);
            if x[s..e] != y[s..e] {
                pages.push(p);
            }
        }
    }
    crate::diff::to_runs(&pages)
}

fn opts(full: bool, threads: usize) -> DiffOptions {
    DiffOptions { force_full: full, gap_pages: 16, threads, virt: true }
}

#[test]
fn diff_finds_exactly_the_changed_pages_in_chain_and_full_mode() {
    let s = set();
    let want = oracle(&s.ma, &s.mb);
    assert_eq!(want.len(), 4, "{want:?}");
    for threads in [1, 3] {
        let chain = diff(&s.a, &s.b, None, &opts(false, threads)).unwrap();
        assert_eq!(chain.mode, DiffMode::Chain);
        assert_eq!(chain.runs, want);
        assert_eq!(chain.changed_pages, 5);
        assert_eq!(chain.written_pages, Some(6), "B records 6 pages");
        assert_eq!(chain.identical_rewrites, Some(1), "page 9 was rewritten with A's bytes");
        assert_eq!(chain.pages_compared, 6, "only B's own records are read");
        let full = diff(&s.a, &s.b, None, &opts(true, threads)).unwrap();
        assert_eq!(full.mode, DiffMode::Full);
        assert_eq!(full.runs, want);
        assert!(full.pages_compared > 0x80, "{}", full.pages_compared);
        let other = diff(&s.a, &s.c, None, &opts(false, threads)).unwrap();
        assert_eq!(other.mode, DiffMode::Full, "C does not descend from A");
        assert_eq!(other.runs, want);
    }
    // Same image: nothing changed, whatever the mode.
    assert_eq!(diff(&s.b, &s.c, None, &opts(false, 2)).unwrap().changed_pages, 0);
    assert_eq!(diff(&s.a, &s.a, None, &opts(false, 2)).unwrap().changed_pages, 0);
    // Reversed: A does not descend from B, so a full compare.
    let rev = diff(&s.b, &s.a, None, &opts(false, 2)).unwrap();
    assert_eq!((rev.mode, rev.runs), (DiffMode::Full, want));
    // Ranges merge runs across small gaps and count the pages.
    let r = diff(&s.a, &s.b, None, &DiffOptions { gap_pages: 16, ..opts(false, 1) }).unwrap();
    assert_eq!(
        r.ranges,
        vec![
            ChangedRange { start: 0x3000, end: 0x11000, pages: 3 },
            ChangedRange { start: 0x110000, end: 0x111000, pages: 1 },
            ChangedRange { start: 0x13f000, end: 0x140000, pages: 1 },
        ]
    );
}

#[test]
fn diff_refuses_other_layouts_missing_files_and_corrupt_chunks() {
    let s = set();
    let dir = tempfile::tempdir().unwrap();
    let other = dir.path().join("other.img");
    let input =
        ImageHeaderInput { vm_config: serde_json::json!({}), ranges: vec![RamRange::new(0, 0x80000)], parent: None };
    let w = ImageWriter::create(&other, input, WriteOptions::default()).unwrap();
    w.finish(b"", &[]).unwrap();
    let e = diff(&s.a, &other, None, &opts(false, 1)).unwrap_err().to_string();
    assert!(e.contains("different RAM layouts") && e.contains("other.img") && e.contains("0x100000..0x140000"), "{e}");
    let e = diff(&s.a, &dir.path().join("nope.img"), None, &opts(false, 1)).unwrap_err().to_string();
    assert!(e.contains("nope.img"), "{e}");
    let e = stats(&[dir.path().join("nope.img")], None, &StatsOptions::default()).unwrap_err().to_string();
    assert!(e.contains("nope.img"), "{e}");
    // A flipped byte inside a chunk record of A: both commands name the chunk and the file.
    let mut bytes = std::fs::read(&s.c).unwrap();
    let at = bytes.len() / 3;
    bytes[at] ^= 0x40;
    let bad = dir.path().join("bad.img");
    std::fs::write(&bad, &bytes).unwrap();
    let e = diff(&s.a, &bad, None, &opts(false, 2)).unwrap_err().to_string();
    assert!(e.contains("bad.img") && e.contains("chunk"), "{e}");
    let e = stats(std::slice::from_ref(&bad), None, &StatsOptions::default()).unwrap_err().to_string();
    assert!(e.contains("bad.img") && e.contains("chunk"), "{e}");
}

#[test]
fn stats_counts_zero_and_duplicate_pages_within_and_across_images() {
    let s = set();
    let count = |m: &[u8]| {
        let mut zero = 0u64;
        let mut nonzero = 0u64;
        let mut uniq = HashSet::new();
        for r in ranges() {
            for p in (r.start..r.start + r.len).step_by(PG) {
                let pg = &m[p as usize..p as usize + PG];
                if pg.iter().all(|&b| b == 0) {
                    zero += 1;
                } else {
                    nonzero += 1;
                    uniq.insert(pg.to_vec());
                }
            }
        }
        (zero, nonzero, uniq)
    };
    let (za, na, ua) = count(&s.ma);
    let (zb, nb, ub) = count(&s.mb);
    for threads in [1, 2] {
        let o = StatsOptions { compress_every: 1, threads, ..StatsOptions::default() };
        let r = stats(&[s.a.clone(), s.b.clone()], None, &o).unwrap();
        let (a, b) = (&r.images[0], &r.images[1]);
        assert_eq!((a.zero_pages, a.nonzero_pages, a.unique_nonzero_pages), (za, na, ua.len() as u64));
        assert_eq!((b.zero_pages, b.nonzero_pages, b.unique_nonzero_pages), (zb, nb, ub.len() as u64));
        assert_eq!(a.duplicate_pages, 15, "16 copies of one page");
        assert_eq!(a.entropy_histogram[7], na, "noise pages are near 8 bits per byte");
        assert_eq!(a.compress.sampled_pages, na);
        assert!(a.compress.lz4_ratio < 1.1 && a.compress.zstd_ratio < 1.1, "{:?}", a.compress);
        let all: HashSet<_> = ua.union(&ub).collect();
        assert_eq!(r.sharing.total_pages, 2 * 0xc0);
        assert_eq!(r.sharing.unique_pages, all.len() as u64 + 1, "plus the zero page");
        assert_eq!(r.sharing.pages_saved, r.sharing.total_pages - r.sharing.unique_pages);
    }
    assert!(stats(&[], None, &StatsOptions::default()).is_err());
}

#[test]
fn entropy_and_attribution_by_hand() {
    assert_eq!(entropy(&[0u8; 4096]), 0.0);
    let all: Vec<u8> = (0..4096).map(|i| i as u8).collect();
    assert!((entropy(&all) - 8.0).abs() < 1e-9);
    let two: Vec<u8> = (0..4096).map(|i| (i % 2) as u8).collect();
    assert!((entropy(&two) - 1.0).abs() < 1e-9);
    let runs = crate::diff::to_runs(&[0x1000, 0x2000, 0x5000, 0x9000, 0xa000]);
    assert_eq!(runs.len(), 3);
    let map = [
        MapRun {
            va_start: 0xffff_8000_0000_0000,
            va_end: 0xffff_8000_0000_3000,
            pa_start: 0x1000,
            page_size: 4096,
            flags: PageFlags::default(),
        },
        MapRun {
            va_start: 0x40_0000,
            va_end: 0x40_1000,
            pa_start: 0x5000,
            page_size: 4096,
            flags: PageFlags::default(),
        },
        MapRun {
            va_start: 0x50_0000,
            va_end: 0x50_1000,
            pa_start: 0x2000,
            page_size: 4096,
            flags: PageFlags::default(),
        },
        MapRun {
            va_start: 0x60_0000,
            va_end: 0x60_1000,
            pa_start: 0xa000,
            page_size: 4096,
            flags: PageFlags::default(),
        },
    ];
    let v = crate::diff::attribute_runs(PagingContext::from_cr3(0, false), &map, &runs);
    let pages: Vec<u64> = v.regions.iter().map(|r| r.pages).collect();
    assert_eq!(pages, vec![2, 1, 1, 1], "{v:?}");
    assert_eq!(v.unmapped_pages, 1, "0x9000 is mapped by nothing (0xa000 of its run is)");
}
