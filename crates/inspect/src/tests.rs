//! Page walks over hand-built page tables, a seeded random walker fuzz, and
//! scans of real images planted with matches across every kind of boundary.

use std::time::{Duration, Instant};

use ferry_image::{CpuRegs, ImageHeaderInput, ImageWriter, RamRange, WriteOptions};

use crate::*;

const P: u64 = 1; // present
const W: u64 = 2;
const U: u64 = 4;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;
const K4: u64 = 4096;
const M2: u64 = 2 << 20;
const G1: u64 = 1 << 30;

/// Page tables in a byte buffer: tables are allocated from `next` upwards.
struct Tables {
    mem: Vec<u8>,
    next: u64,
    ctx: PagingContext,
}

impl Tables {
    fn new(levels: u8) -> Self {
        let mut t = Tables { mem: vec![0; 1 << 20], next: 0x1000, ctx: PagingContext { root: 0, levels } };
        t.ctx.root = t.alloc();
        t
    }

    fn alloc(&mut self) -> u64 {
        let a = self.next;
        self.next += 0x1000;
        a
    }

    fn get(&self, addr: u64) -> u64 {
        u64::from_le_bytes(self.mem[addr as usize..addr as usize + 8].try_into().unwrap())
    }

    fn set(&mut self, addr: u64, v: u64) {
        self.mem[addr as usize..addr as usize + 8].copy_from_slice(&v.to_le_bytes());
    }

    /// Address of the entry for `va` at `level`, creating tables above it with `flags`.
    fn entry(&mut self, va: u64, level: Level, flags: u64) -> u64 {
        let mut table = self.ctx.root;
        let mut l = self.ctx.top();
        loop {
            let e = table + ((va >> l.shift()) & 0x1ff) * 8;
            if l == level {
                return e;
            }
            let mut v = self.get(e);
            if v & P == 0 {
                v = self.alloc() | flags;
                self.set(e, v);
            }
            table = v & 0x000f_ffff_ffff_f000;
            l = l.next().unwrap();
        }
    }

    fn map(&mut self, va: u64, pa: u64, size: u64, flags: u64) {
        let level = match size {
            K4 => Level::Pt,
            M2 => Level::Pd,
            _ => Level::Pdpt,
        };
        let e = self.entry(va, level, P | W | U);
        self.set(e, pa | flags | if size == K4 { 0 } else { PS });
    }

    fn mem(&self) -> BufMem {
        BufMem::flat(self.mem.clone())
    }
}

fn levels_of(levels: u8) -> Vec<Level> {
    let all = [Level::Pml5, Level::Pml4, Level::Pdpt, Level::Pd, Level::Pt];
    all[(5 - levels as usize)..].to_vec()
}

#[test]
fn every_page_size_translates_with_its_flags_in_4_and_5_levels() {
    for levels in [4u8, 5] {
        let mut t = Tables::new(levels);
        let hi = if levels == 5 { 0xff00_0000_0000_0000 } else { 0xffff_8000_0000_0000 };
        t.map(0x40_1000, 0x8_5000, K4, P | W | U);
        t.map(hi | 0x20_0000, 0x40_0000, M2, P | U | NX);
        t.map(0x80_0000_0000, 0x1_4000_0000, G1, P | W);
        let mut m = t.mem();
        let a = translate(&mut m, &t.ctx, 0x40_1234).unwrap();
        assert_eq!((a.pa, a.page_size, a.page_pa), (0x8_5234, K4, 0x8_5000));
        assert_eq!(a.flags, PageFlags { writable: true, user: true, nx: false });
        assert_eq!(a.steps.iter().map(|s| s.level).collect::<Vec<_>>(), levels_of(levels));
        let b = translate(&mut m, &t.ctx, hi | 0x2f_fff0).unwrap();
        assert_eq!((b.pa, b.page_size), (0x4f_fff0, M2));
        assert_eq!(b.flags, PageFlags { writable: false, user: true, nx: true });
        let c = translate(&mut m, &t.ctx, 0x80_1234_5678).unwrap();
        assert_eq!((c.pa, c.page_size), (0x1_5234_5678, G1));
        assert_eq!(c.flags, PageFlags { writable: true, user: false, nx: false });
        // A user bit cleared in an upper level removes user access for the whole path.
        let e = t.entry(0x40_1000, Level::Pd, 0);
        let v = t.get(e);
        t.set(e, v & !U);
        assert!(!translate(&mut t.mem(), &t.ctx, 0x40_1000).unwrap().flags.user);
        // Reading through the tables.
        let mut m = t.mem();
        m.bytes_mut()[0x8_5ffe..0x8_6000].copy_from_slice(b"AB");
        t.map(0x40_2000, 0x9_0000, K4, P);
        let mut m2 = t.mem();
        m2.bytes_mut()[0x8_5ffe..0x8_6000].copy_from_slice(b"AB");
        m2.bytes_mut()[0x9_0000..0x9_0002].copy_from_slice(b"CD");
        let r = read_virt(&mut m2, &t.ctx, 0x40_1ffe, 4).unwrap();
        assert_eq!(r.bytes, b"ABCD");
        assert_eq!(r.pieces.len(), 2);
        assert_eq!((r.pieces[1].va, r.pieces[1].pa), (0x40_2000, 0x9_0000));
        let _ = m;
        // maps lists all three, merged into runs.
        let rep = maps(&mut m2, &t.ctx).unwrap();
        assert_eq!((rep.pages_4k, rep.pages_2m, rep.pages_1g), (2, 1, 1));
        assert_eq!(rep.runs.len(), 4, "{:#x?}", rep.runs);
        assert!(rep.runs.iter().any(|r| r.va_start == hi | 0x20_0000 && r.len() == M2 && r.flags.nx));
    }
}

#[test]
fn a_walk_stops_at_every_level_and_says_why() {
    for levels in [4u8, 5] {
        let va = 0x12_3456_7000u64;
        for (i, &level) in levels_of(levels).iter().enumerate() {
            // Not present: build the path down to `level`, leave its entry empty.
            let mut t = Tables::new(levels);
            t.entry(va, level, P | W | U);
            let s = walk(&mut t.mem(), &t.ctx, va).unwrap().unwrap_err();
            assert_eq!((s.level, s.reason), (level, StopReason::NotPresent), "{levels}-level {level}");
            assert!(s.to_string().contains(&format!("stopped at {level}")), "{s}");
            assert_eq!(s.steps.len(), i + 1);

            // Outside memory: the table of `level` lies beyond RAM.
            let mut t = Tables::new(levels);
            if i == 0 {
                t.ctx.root = 0x4000_0000;
            } else {
                let up = levels_of(levels)[i - 1];
                let e = t.entry(va, up, P | W | U);
                t.set(e, 0x7_0000_0000 | P | W | U);
            }
            let s = walk(&mut t.mem(), &t.ctx, va).unwrap().unwrap_err();
            assert_eq!(s.level, level);
            assert!(matches!(s.reason, StopReason::OutsideMemory { .. }), "{levels}-level {level}: {s}");
            assert!(s.to_string().contains("outside guest memory"), "{s}");

            // Loop: the entry at `level` points back to the root table.
            if level != Level::Pt {
                let mut t = Tables::new(levels);
                let e = t.entry(va, level, P | W | U);
                t.set(e, t.ctx.root | P | W | U);
                let s = walk(&mut t.mem(), &t.ctx, va).unwrap().unwrap_err();
                assert_eq!(s.level, level, "{levels}-level {level}: {s}");
                assert!(matches!(s.reason, StopReason::Loop { first_level, .. } if first_level == t.ctx.top()), "{s}");
                // maps does not hang on it either, and reports the loop.
                let r = maps(&mut t.mem(), &t.ctx).unwrap();
                assert!(r.stops.iter().any(|s| matches!(s.reason, StopReason::Loop { .. })), "{:?}", r.stops);
            }
        }
        // PS in the top level is reserved; a non-canonical address stops before any read.
        let mut t = Tables::new(levels);
        let e = t.entry(va, t.ctx.top(), 0);
        t.set(e, 0x5000 | P | PS);
        let s = walk(&mut t.mem(), &t.ctx, va).unwrap().unwrap_err();
        assert!(matches!(s.reason, StopReason::Reserved { .. }), "{s}");
        let s = walk(&mut t.mem(), &t.ctx, 0x8000_0000_0000_0000).unwrap().unwrap_err();
        assert_eq!((s.reason, s.steps.len()), (StopReason::NonCanonical, 0));
    }
}

#[test]
fn reads_outside_memory_are_errors_naming_the_range() {
    let mut m = BufMem::new(vec![0; 0x20000], vec![RamRange::new(0, 0x10000)]);
    let e = read_phys(&mut m, 0xfff0, 0x20).unwrap_err().to_string();
    assert!(e.contains("0xfff0..0x10010") && e.contains("outside guest memory"), "{e}");
    assert!(read_phys(&mut m, u64::MAX - 4, 8).is_err());
    assert!(read_phys(&mut m, 0, 0).is_err());
    assert_eq!(read_phys(&mut m, 0xfff8, 8).unwrap().bytes, vec![0; 8]);
}

/// xorshift64*: a seeded generator, so a failing case can be replayed.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Random page tables (entries mostly pointing into the 64 KiB of memory, sometimes
/// outside, at themselves, with random flag bits): walks and enumeration never panic,
/// and they agree with each other.
#[test]
fn fuzz_walker_against_random_tables() {
    let seed = std::env::var("FERRY_FUZZ_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_f00d_u64);
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(5);
    let (mut cases, mut mapped, mut stops) = (0u32, 0u32, std::collections::BTreeMap::<String, u32>::new());
    while cases < 2000 && Instant::now() < deadline {
        cases += 1;
        let mut mem = vec![0u8; 16 * 4096];
        let density = 1 + rng.next() % 6;
        for e in mem.chunks_exact_mut(8) {
            let r = rng.next();
            // 1.5-12% of entries point into (or just past) the memory with random flag bits, 1.5% are
            // random words; denser tables make the enumeration explode combinatorially (then
            // it stops at MAX_TABLES, which is checked too).
            let v = match r % 64 {
                x if x < density => ((r >> 8) % 20 * 4096) | ((r >> 40) & 0x87) | (r & (1 << 63)),
                x if x == density => r,
                _ => 0,
            };
            e.copy_from_slice(&v.to_le_bytes());
        }
        let levels = if rng.next().is_multiple_of(2) { 4 } else { 5 };
        let ctx = PagingContext::from_cr3((rng.next() % 18 * 4096) | (rng.next() & 0xfff), levels == 5);
        let mut m = BufMem::flat(mem);
        let rep = match maps(&mut m, &ctx) {
            Ok(r) => r,
            Err(Error::RootOutsideMemory { root, .. }) => {
                let s = walk(&mut m, &ctx, 0).unwrap().unwrap_err();
                assert_eq!((s.level, s.reason), (ctx.top(), StopReason::OutsideMemory { addr: root }));
                *stops.entry("RootOutsideMemory".into()).or_default() += 1;
                continue;
            }
            Err(e) => panic!("seed {seed} case {cases}: {e}"),
        };
        if rep.truncated {
            *stops.entry("truncated".into()).or_default() += 1;
            continue;
        }
        for r in rep.runs.iter().take(64) {
            let t = translate(&mut m, &ctx, r.va_start).unwrap_or_else(|e| panic!("seed {seed} case {cases}: {e}"));
            assert_eq!((t.pa, t.flags, t.page_size), (r.pa_start, r.flags, r.page_size), "seed {seed} case {cases}");
        }
        for k in 0..16 {
            // Half inside a listed run (the walk must agree), half anywhere.
            let va = match rep.runs.get(rng.next() as usize % rep.runs.len().max(1)) {
                Some(r) if k % 2 == 0 => r.va_start.wrapping_add(rng.next() % r.len()),
                _ => ctx.sign_extend(rng.next()),
            };
            match walk(&mut m, &ctx, va).unwrap() {
                Ok(t) => {
                    mapped += 1;
                    let run = rep.runs.iter().find(|r| va.wrapping_sub(r.va_start) < r.len());
                    let run = run.unwrap_or_else(|| panic!("seed {seed} case {cases}: {va:#x} maps but no run has it"));
                    assert_eq!(run.pa_start + (va - run.va_start), t.pa);
                }
                Err(s) => {
                    *stops.entry(format!("{:?}", s.reason).split([' ', '{']).next().unwrap().into()).or_default() += 1
                }
            }
        }
    }
    eprintln!("walker fuzz: seed {seed:#x}, {cases} table sets, {mapped} translations, stops {stops:?}");
    assert!(cases >= 100 && mapped > 0 && stops.len() >= 3, "{cases} {mapped} {stops:?}");
}

// ---- scanning real images --------------------------------------------------

/// RAM: two adjacent ranges (a match may cross between them), then a hole.
pub(crate) fn scan_ranges() -> Vec<RamRange> {
    vec![RamRange::new(0, 0x40000), RamRange::new(0x40000, 0x20000), RamRange::new(0x100000, 0x40000)]
}

/// Writes an image in two rounds with 4-page chunks, planting `pat` across a chunk boundary,
/// a data/zero-gap boundary, a zero-gap/data boundary, an explicit zero-run boundary, a round-2
/// override and the two adjacent RAM ranges; one stale copy is overwritten in round 2 and one
/// straddles the hole (neither may be found). Returns the image and the final memory.
pub(crate) fn planted_image(dir: &std::path::Path, pat: &[u8]) -> (std::path::PathBuf, Vec<u8>) {
    let mut model = vec![0u8; 0x140000];
    let h = pat.len() / 2;
    let put = |m: &mut Vec<u8>, at: usize, b: &[u8]| m[at..at + b.len()].copy_from_slice(b);
    let mut r1 = model.clone();
    for p in 0..8usize {
        r1[p * 4096 + 100] = 0x11; // pages 0..8 hold data: chunks 0 and 1 (4 pages each)
    }
    put(&mut r1, 0x4000 - h, pat); // across chunk 0 | chunk 1
    r1[0x9000 + 5] = 0x22; // page 9 data, page 10 never written (zero gap)
    put(&mut r1, 0xa000 - h, &pat[..h]); // data | zero gap: the rest of the pattern must be zeros
    r1[0xc000 + 9] = 0x33;
    put(&mut r1, 0x10000 + 8, b"stale"); // page 16, overwritten in round 2
    put(&mut r1, 0x12000 - h, pat); // page 17 | page 18 in round 1 ...
    r1[0x14000 + 1] = 0x44;
    put(&mut r1, 0x3f000 + 7, b"x");
    put(&mut r1, 0x40000 - h, pat); // across the adjacent ranges 0 | 1
    put(&mut r1, 0x60000 - h, pat); // across the hole: 0x60000 is not RAM
    put(&mut r1, 0x100000, &pat[h..]);
    let tail: Vec<u8> = pat.to_vec();
    put(&mut r1, 0x10a000 - tail.len(), &tail[..]); // whole pattern at the end of a page
    let input = ImageHeaderInput { vm_config: serde_json::json!({}), ranges: scan_ranges(), parent: None };
    let path = dir.join("planted.img");
    let opts = WriteOptions { chunk_size: 4 * 4096, ..WriteOptions::default() };
    let mut w = ImageWriter::create(&path, input, opts).unwrap();
    for r in scan_ranges() {
        let (s, e) = (r.start as usize, (r.start + r.len) as usize);
        w.write_pages(r.start, &r1[s..e]).unwrap();
    }
    // Round 2: page 18 rewritten (the pattern's second half now comes from a later chunk,
    // with different bytes first), page 16 zeroed (a recorded zero run), page 12 rewritten.
    let mut p18 = r1[0x12000..0x13000].to_vec();
    p18[h..h + 3].copy_from_slice(b"new");
    w.write_pages(0x12000, &p18).unwrap();
    w.write_zero(0x10000, 1).unwrap();
    let mut p15 = vec![0u8; 4096];
    p15[4096 - h..].copy_from_slice(&pat[..h]); // page 15 | page 16 (now a zero run)
    w.write_pages(0xf000, &p15).unwrap();
    let mut p14 = vec![0u8; 4096];
    put(&mut p14, 0, &pat[h..]); // zero gap (page 13 is never written) | page 14
    p14[4000] = 1;
    w.write_pages(0xe000, &p14).unwrap();
    w.finish(b"", &[CpuRegs::default()]).unwrap();
    put(&mut model, 0, &r1);
    model[0x12000..0x13000].copy_from_slice(&p18);
    model[0x10000..0x11000].fill(0);
    model[0xf000..0x10000].copy_from_slice(&p15);
    model[0xe000..0xf000].copy_from_slice(&p14);
    (path, model)
}

/// Every match of `pat` in the model's RAM, never across the hole.
pub(crate) fn naive(model: &[u8], pat: &[u8]) -> Vec<u64> {
    let mut out = vec![];
    for (a, b) in [(0usize, 0x60000usize), (0x100000, 0x140000)] {
        for i in a..=b - pat.len() {
            if &model[i..i + pat.len()] == pat {
                out.push(i as u64);
            }
        }
    }
    out
}

#[test]
fn scan_finds_matches_across_every_boundary_and_nothing_stale() {
    let dir = tempfile::tempdir().unwrap();
    let pat = b"FERRY-PLANT-0123".to_vec();
    let (path, model) = planted_image(dir.path(), &pat);
    let want = naive(&model, &pat);
    assert_eq!(want.len(), 4, "{want:#x?}");
    for (block, threads) in [(4096usize, 1), (4096, 3), (3 * 4096, 2), (1 << 20, 1)] {
        let mut m = ImageMem::open(&path, None).unwrap();
        let opts = ScanOptions { block_size: block, threads, ..ScanOptions::default() };
        let lit = Literals::new(vec![Pattern::string("FERRY-PLANT-0123").unwrap()]).unwrap();
        let rep = scan(&mut m, &lit, &opts).unwrap();
        let got: Vec<u64> = rep.matches.iter().map(|x| x.pa).collect();
        assert_eq!(got, want, "block {block} threads {threads}");
        assert_eq!(rep.threads, threads);
        for at in [0x4000 - 8, 0x12000 - 8, 0x40000 - 8, 0x10a000 - 16] {
            assert!(got.contains(&at), "block {block}: {at:#x} missing from {got:#x?}");
        }
        assert!(!got.contains(&(0x60000 - 8)), "a match across the hole");
        assert!(rep.bytes_scanned < rep.ram_bytes, "zero memory is not read");
    }
    // Patterns reaching into zero pages: data | never-written gap, data | recorded zero run,
    // zero gap | data.
    let mut gap = pat[..8].to_vec();
    gap.extend_from_slice(&[0; 8]);
    let mut lead = vec![0u8; 8];
    lead.extend_from_slice(&pat[8..]);
    for p in [gap, lead] {
        let want = naive(&model, &p);
        let mut m = ImageMem::open(&path, None).unwrap();
        let lit = Literals::new(vec![Pattern::hex(&crate::read::hex(&p)).unwrap()]).unwrap();
        let rep = scan(&mut m, &lit, &ScanOptions { block_size: 4096, ..ScanOptions::default() }).unwrap();
        let got: Vec<u64> = rep.matches.iter().map(|x| x.pa).collect();
        assert_eq!(got, want);
        assert!(!got.is_empty());
    }
    let want_gap = naive(&model, &[&pat[..8], &[0u8; 8][..]].concat());
    assert!(want_gap.contains(&(0xa000 - 8)) && want_gap.contains(&(0x10000 - 8)), "{want_gap:#x?}");
    let want_lead = naive(&model, &[&[0u8; 8][..], &pat[8..]].concat());
    assert!(want_lead.contains(&(0xe000 - 8)), "{want_lead:#x?}");
    // The stale round-1 bytes are gone.
    let mut m = ImageMem::open(&path, None).unwrap();
    let lit = Literals::new(vec![Pattern::string("stale").unwrap()]).unwrap();
    assert_eq!(scan(&mut m, &lit, &ScanOptions::default()).unwrap().total_matches, 0);
}

#[test]
fn bad_patterns_are_refused() {
    assert!(Pattern::hex("abc").unwrap_err().to_string().contains("odd"));
    assert!(Pattern::hex("zz").unwrap_err().to_string().contains("hex digit"));
    assert!(Pattern::string("").is_err());
    assert!(Pattern::string(&"x".repeat(MAX_PATTERN + 1)).is_err());
    assert_eq!(Pattern::hex("0xDE ad").unwrap().bytes, vec![0xde, 0xad]);
    assert!(Literals::new(vec![]).is_err());
}

#[test]
fn scan_names_virtual_addresses_from_the_page_tables() {
    let mut t = Tables::new(4);
    t.map(0x7000_0000_0000, 0x8_0000, K4, P | W | U);
    t.map(0xffff_8000_0008_0000, 0x8_0000, K4, P);
    t.mem[0x8_0010..0x8_0018].copy_from_slice(b"NEEDLE!!");
    let mut m = t.mem();
    let opts = ScanOptions { paging: Some(t.ctx), ..ScanOptions::default() };
    let rep = scan(&mut m, &Literals::new(vec![Pattern::string("NEEDLE!!").unwrap()]).unwrap(), &opts).unwrap();
    assert_eq!(rep.matches.len(), 1);
    assert_eq!(rep.matches[0].pa, 0x8_0010);
    assert_eq!(rep.matches[0].va, vec![0x7000_0000_0010, 0xffff_8000_0008_0010]);
}

#[test]
fn encrypted_image_scans_on_several_threads_with_its_key_and_refuses_without() {
    let dir = tempfile::tempdir().unwrap();
    let key = ferry_image::UserKey::from_bytes(b"inspect test key").unwrap();
    let path = dir.path().join("enc.img");
    let ranges = vec![RamRange::new(0, 0x100000)];
    let input = ImageHeaderInput { vm_config: serde_json::json!({}), ranges, parent: None };
    let opts = WriteOptions { chunk_size: 4 * 4096, key: Some(key.clone()), ..WriteOptions::default() };
    let mut w = ImageWriter::create(&path, input, opts).unwrap();
    let mut mem = vec![0u8; 0x100000];
    for p in 0..64 {
        mem[p * 4096 + 1] = p as u8 | 1;
    }
    mem[0x7ff8..0x8008].copy_from_slice(b"SECRET-ACROSS-PG");
    w.write_pages(0, &mem).unwrap();
    w.finish(b"", &[CpuRegs::default()]).unwrap();
    let lit = Literals::new(vec![Pattern::string("SECRET-ACROSS-PG").unwrap()]).unwrap();
    let mut m = ImageMem::open(&path, Some(&key)).unwrap();
    let opts = ScanOptions { block_size: 4096, threads: 2, ..ScanOptions::default() };
    let rep = scan(&mut m, &lit, &opts).unwrap();
    assert_eq!(rep.threads, 2);
    assert_eq!(rep.matches.iter().map(|x| x.pa).collect::<Vec<_>>(), vec![0x7ff8]);
    let mut m = ImageMem::open(&path, None).unwrap();
    let e = scan(&mut m, &lit, &opts).unwrap_err().to_string();
    assert!(e.contains("key"), "{e}");
}

#[test]
fn paging_mode_comes_from_the_vcpu_registers() {
    let mut r = CpuRegs::default();
    let e = PagingContext::from_regs(1, &r).unwrap_err().to_string();
    assert!(e.contains("vCPU 1") && e.contains("CR0.PG"), "{e}");
    r.cr0 = 1 << 31;
    assert!(PagingContext::from_regs(0, &r).unwrap_err().to_string().contains("CR4.PAE"));
    r.cr4 = 1 << 5;
    assert!(PagingContext::from_regs(0, &r).unwrap_err().to_string().contains("EFER.LMA"));
    r.efer = 1 << 10 | 1 << 8;
    r.cr3 = 0x1234_5000 | 0x18 | 0x7; // flag and PCID bits are masked off
    assert_eq!(PagingContext::from_regs(0, &r).unwrap(), PagingContext { root: 0x1234_5000, levels: 4 });
    r.cr4 |= 1 << 12;
    assert_eq!(PagingContext::from_regs(0, &r).unwrap().levels, 5);
}
