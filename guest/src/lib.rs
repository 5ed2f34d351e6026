//! ferry's test guest, built by `build.rs` from `payload/` and embedded here.
//!
//! The guest is a PVH ELF that boots in a few dozen (emulated) ring-0
//! instructions and does all its work in ring 3. Its command line, output
//! lines, ports and memory pattern are documented in `guest/README.md`; the
//! parsers and the pattern arithmetic are shared with the guest through the
//! modules below, so host-side tests use exactly the guest's rules.

/// The finished PVH ELF (load at physical 1 MiB, entry in the Xen
/// PHYS32_ENTRY note).
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// Physical address the ELF's single load segment starts at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Port of the exit device: a byte written here is the VM's exit status.
pub const EXIT_PORT: u16 = 0xf4;

/// Port the guest's very first instruction writes to (`out 0x80, al`).
pub const FIRST_INSN_PORT: u16 = 0x80;

/// Physical page the AP trampoline occupies (SIPI vector 0x09).
pub const AP_TRAMPOLINE: u64 = 0x9000;

#[path = "../payload/cmdline.rs"]
pub mod cmdline;

#[path = "../payload/pattern.rs"]
pub mod pattern;

#[path = "../payload/mptable.rs"]
pub mod mptable;

#[cfg(test)]
mod tests {
    use super::cmdline::*;
    use super::mptable;
    use super::pattern::*;

    #[test]
    fn cmdline_defaults_and_modes() {
        assert_eq!(parse("").unwrap(), Config::default());
        assert_eq!(parse("  ").unwrap().mode, Mode::Idle);
        let c = parse("dirty mem=64 wss=16 rate=max passes=200").unwrap();
        assert_eq!(c.mode, Mode::Dirty);
        assert_eq!((c.mem_mib, c.wss_mib, c.rate, c.passes), (Some(64), Some(16), Rate::Max, Some(200)));
        let c = parse("dirty rate=1000 report=0 cpus=2 tsc_khz=2600000 verify").unwrap();
        assert_eq!(c.rate, Rate::PagesPerSec(1000));
        assert_eq!((c.report_ms, c.cpus, c.tsc_khz, c.verify), (Some(0), Some(2), Some(2_600_000), true));
        assert_eq!(parse("crash=triple").unwrap().crash, Some(Crash::Triple));
        assert_eq!(parse("crash=mmio-exec").unwrap().crash, Some(Crash::MmioExec));
        assert_eq!(parse("exit=255").unwrap().exit, Some(255));
        assert_eq!(parse("dirty idle").unwrap().mode, Mode::Idle);
        assert_eq!(parse("dirty").unwrap().fill, Fill::Word);
        assert_eq!(parse("dirty fill=random").unwrap().fill, Fill::Random);
        assert_eq!(parse("dirty fill=random fill=word").unwrap().fill, Fill::Word);
    }

    #[test]
    fn cmdline_rejects_unknown_and_malformed_words() {
        for bad in [
            "console=ttyS0",
            "mem=",
            "mem=1x",
            "mem=-1",
            "rate=0",
            "rate=fast",
            "cpus=0",
            "exit=256",
            "crash=soft",
            "idle=1",
            "verify=yes",
            "tsc_khz=0",
            "fill",
            "fill=",
            "fill=zero",
            "fill=Random",
        ] {
            assert_eq!(parse(&format!("dirty {bad} passes=1")), Err(bad), "{bad}");
        }
    }

    #[test]
    fn plant_word() {
        let p = parse("idle plant=46455252@0x400ffe").unwrap().plants.last().unwrap();
        assert_eq!((p.gpa, p.bytes()), (0x400ffe, &b"FERR"[..]));
        assert_eq!(parse("plant=00@400000").unwrap().plants.last().unwrap().gpa, 0x400000);
        for bad in ["plant=", "plant=4@1000", "plant=zz@1000", "plant=41@", "plant=41", "plant=41@0xg", "plant=@1000"] {
            assert_eq!(parse(bad), Err(bad), "{bad}");
        }
        assert!(parse(&format!("plant={}@1000", "41".repeat(MAX_PLANT + 1))).is_err());
        assert_eq!(parse("plant=41@400000 plant_after=1500").unwrap().plant_after_ms, Some(1500));
        assert!(parse("plant_after=x").is_err() && parse("plant_after").is_err());
    }

    #[test]
    fn several_plants_and_scratch() {
        let c = parse("dirty scratch=4 plant=41@200000 plant=4243@0x201000").unwrap();
        assert_eq!(c.scratch_mib, Some(4));
        let all: Vec<_> = c.plants.iter().map(|p| (p.gpa, p.bytes().to_vec())).collect();
        assert_eq!(all, vec![(0x200000, b"A".to_vec()), (0x201000, b"BC".to_vec())]);
        assert_eq!(parse("idle").unwrap().plants.iter().count(), 0);
        let nine = (0..=MAX_PLANTS).map(|i| format!("plant=41@{:x}", 0x200000 + i)).collect::<Vec<_>>().join(" ");
        assert!(parse(&nine).is_err(), "more than MAX_PLANTS plants");
        for bad in ["scratch=0", "scratch=", "scratch=x", "scratch=1025", "scratch"] {
            assert_eq!(parse(bad), Err(bad), "{bad}");
        }
    }

    #[test]
    fn host_commands() {
        assert_eq!(parse_command("verify"), Some(Ok(Command::Verify)));
        assert_eq!(parse_command(" status \r"), Some(Ok(Command::Status)));
        assert_eq!(parse_command("exit 3"), Some(Ok(Command::Exit(3))));
        assert_eq!(parse_command(""), None);
        assert_eq!(parse_command("exit"), Some(Err("exit")));
        assert_eq!(parse_command("exit 300"), Some(Err("exit 300")));
        assert_eq!(parse_command("verify now"), Some(Err("verify now")));
    }

    #[test]
    fn line_buffer() {
        let mut lb = LineBuf::new();
        let mut lines = Vec::new();
        for &b in b"ver\rify\r\n\nexit 4\n" {
            if let Some(l) = lb.push(b) {
                lines.push(l.to_string());
            }
        }
        assert_eq!(lines, ["ver", "ify", "exit 4"]);
        // An overlong line is dropped whole, the next one is fine.
        for _ in 0..100 {
            assert!(lb.push(b'x').is_none());
        }
        assert!(lb.push(b'\n').is_none());
        for &b in b"status" {
            assert!(lb.push(b).is_none());
        }
        assert_eq!(lb.push(b'\n'), Some("status"));
    }

    fn feed(bytes: &[u8]) -> usize {
        let mut d = CtrlAltDel::new();
        bytes.iter().filter(|&&b| d.feed(b)).count()
    }

    #[test]
    fn ctrl_alt_del_set1_and_set2() {
        assert_eq!(feed(&[0x1d, 0x38, 0x53]), 1);
        assert_eq!(feed(&[0x1d, 0x38, 0xe0, 0x53, 0xe0, 0xd3, 0xb8, 0x9d]), 1);
        assert_eq!(feed(&[0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]), 1);
        // Released modifiers do not count.
        assert_eq!(feed(&[0x1d, 0x9d, 0x38, 0x53]), 0);
        assert_eq!(feed(&[0x14, 0xf0, 0x14, 0x11, 0xe0, 0x71]), 0);
        assert_eq!(feed(&[0x53, 0x38, 0x1d]), 0);
    }

    #[test]
    fn page_words_and_generations() {
        assert_eq!(page_word(0, 0x200), 0x200);
        assert_eq!(page_word(7, 0x1_2345_6789), (7 << 32) | 0x2345_6789);
        assert_eq!(expected_gen(3, 10, 9), 4);
        assert_eq!(expected_gen(3, 10, 10), 3);
        assert_eq!(expected_gen(0, 0, 0), 0);
    }

    #[test]
    fn random_words_are_splitmix64() {
        // Reference splitmix64 (Vigna), sequential form: state += gamma; mix.
        let mut state = 0u64;
        let mut next = || {
            state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        let seq: Vec<u64> = (0..4).map(|_| next()).collect();
        // Published first outputs for seed 0.
        assert_eq!(seq, [0xe220_a839_7b1d_cdaf, 0x6e78_9e6a_a1b9_65f4, 0x06c4_5d18_8009_454f, 0xf88b_b8a8_724c_81ec]);
        for (i, &w) in seq.iter().enumerate() {
            assert_eq!(random_word(0, i as u64 + 1), w);
        }
        // From any seed, word i is splitmix64's i-th output.
        let seed = random_seed(5, 0x1234);
        let mut state = seed;
        for i in 1..PAGE_WORDS as u64 {
            state = state.wrapping_add(SPLITMIX_GAMMA);
            assert_eq!(random_word(seed, i), mix64(state));
        }
    }

    #[test]
    fn random_pages() {
        let page = random_page(3, 0x2345);
        let word = |p: &[u8; PAGE_SIZE], i: usize| u64::from_le_bytes(p[8 * i..8 * i + 8].try_into().unwrap());
        // Word 0 is the fill=word marker, so pfn/generation stay visible.
        assert_eq!(word(&page, 0), page_word(3, 0x2345));
        let seed = random_seed(3, 0x2345);
        for i in 0..PAGE_WORDS {
            assert_eq!(word(&page, i), random_page_word(3, 0x2345, i as u64));
            if i > 0 {
                assert_eq!(word(&page, i), random_word(seed, i as u64));
            }
        }
        // Deterministic, and different for another generation or page
        // (also when only bits above the marker's 32 differ).
        assert_eq!(page, random_page(3, 0x2345));
        for (gen, pfn) in [(4, 0x2345), (3, 0x2346), (3 + (1 << 32), 0x2345), (3, 0x2345 + (1 << 32)), (0, 0)] {
            let other = random_page(gen, pfn);
            let same = (1..PAGE_WORDS).filter(|&i| word(&other, i) == word(&page, i)).count();
            assert_eq!(same, 0, "gen {gen} pfn {pfn:#x}");
        }
        // Looks random: all words distinct, every byte value about equally
        // common (64 pages = 256 KiB, expected 1024 of each).
        let mut words: Vec<u64> = (1..PAGE_WORDS).map(|i| word(&page, i)).collect();
        words.sort_unstable();
        words.dedup();
        assert_eq!(words.len(), PAGE_WORDS - 1);
        let mut hist = [0u32; 256];
        for pfn in 0x200..0x240 {
            for &b in random_page(1, pfn)[8..].iter() {
                hist[b as usize] += 1;
            }
        }
        assert!(hist.iter().all(|&n| (850..1200).contains(&n)), "{hist:?}");
    }

    #[test]
    fn slices_cover_wss_exactly() {
        for wss in [1u64, 2, 7, 4096, 4097] {
            for n in 1..=5u64 {
                let mut next = 0;
                for c in 0..n {
                    let (lo, hi) = slice_of(wss, n, c);
                    assert_eq!(lo, next);
                    assert!(hi - lo <= wss / n + 1);
                    next = hi;
                }
                assert_eq!(next, wss);
            }
        }
    }

    #[test]
    fn region_from_ram() {
        const MIB: u64 = 1 << 20;
        // QEMU -m 6G: low RAM, 1 MiB..3 GiB, 4 GiB..7 GiB; unsorted on purpose.
        let ram = [(4 << 30, 3 << 30), (0, 0x9fc00), (MIB, (3 << 30) - MIB)];
        let r = Region::from_ram(&ram, 2 * MIB, u64::MAX);
        assert_eq!(r.segs().len(), 2);
        assert_eq!(r.segs()[0], Seg { start_pfn: 0x200, pages: (3 << 18) - 0x200 });
        assert_eq!(r.segs()[1], Seg { start_pfn: 0x100000, pages: 3 << 18 });
        assert_eq!(r.pages(), (6 << 18) - 0x200);
        assert_eq!(r.pfn(0), Some(0x200));
        assert_eq!(r.pfn((3 << 18) - 0x200), Some(0x100000));
        assert_eq!(r.pfn(r.pages()), None);

        let mut runs = Vec::new();
        r.for_each_run((3 << 18) - 0x202, 4, |pfn, n, idx| runs.push((pfn, n, idx)));
        assert_eq!(runs, [(0xbffff - 1, 2, (3 << 18) - 0x202), (0x100000, 2, (3 << 18) - 0x200)]);

        // mem= limit, unaligned ranges, adjacent ranges merge.
        let r = Region::from_ram(&[(0x200800, 0x3000), (0x203000, 0x2800)], 0, 3);
        assert_eq!(r.segs(), [Seg { start_pfn: 0x201, pages: 3 }]);
        let r = Region::from_ram(&[(0x200000, 0x1000), (0x201000, 0x1000)], 0, 100);
        assert_eq!(r.segs(), [Seg { start_pfn: 0x200, pages: 2 }]);
        assert_eq!(Region::from_ram(&[], 0, 100).pages(), 0);
    }

    /// Builds a fake low 1 MiB with an MP table like Firecracker's.
    fn fake_low_mem(fp_at: usize, cpus: &[(u8, u8)]) -> Vec<u8> {
        let mut m = vec![0u8; 0x100000];
        let table = fp_at + 16;
        let mut entries = Vec::new();
        for &(id, flags) in cpus {
            let mut e = [0u8; 20];
            e[0] = 0;
            e[1] = id;
            e[2] = 0x14;
            e[3] = flags;
            entries.extend_from_slice(&e);
        }
        entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // a bus entry
        let len = 0x2c + entries.len();
        m[table..table + 4].copy_from_slice(b"PCMP");
        m[table + 4..table + 6].copy_from_slice(&(len as u16).to_le_bytes());
        m[table + 0x22..table + 0x24].copy_from_slice(&(cpus.len() as u16 + 1).to_le_bytes());
        m[table + 0x2c..table + len].copy_from_slice(&entries);
        m[fp_at..fp_at + 4].copy_from_slice(b"_MP_");
        m[fp_at + 4..fp_at + 8].copy_from_slice(&(table as u32).to_le_bytes());
        m[fp_at + 8] = 1;
        m[fp_at + 9] = 4;
        let sum = m[fp_at..fp_at + 16].iter().fold(0u8, |a, &b| a.wrapping_add(b));
        m[fp_at + 10] = 0u8.wrapping_sub(sum);
        m
    }

    #[test]
    fn mp_table_found_in_standard_places() {
        for at in [0x9fc00, 0xf5ba0] {
            let m = fake_low_mem(at, &[(0, 3), (1, 1), (2, 0), (3, 1)]);
            let c = mptable::find_cpus(&|a| m[a as usize]).unwrap();
            assert_eq!(&c.apic_ids[..c.count], &[0, 1, 3]);
            assert_eq!(&c.is_bsp[..c.count], &[true, false, false]);
        }
        // EBDA pointer at 0x40e.
        let mut m = fake_low_mem(0x9f000, &[(0, 3), (1, 1)]);
        m[0x40e..0x410].copy_from_slice(&0x9f00u16.to_le_bytes());
        assert_eq!(mptable::find_cpus(&|a| m[a as usize]).unwrap().count, 2);
        // Bad checksum: not found.
        let mut m = fake_low_mem(0x9fc00, &[(0, 3)]);
        m[0x9fc0b] ^= 1;
        assert!(mptable::find_cpus(&|a| m[a as usize]).is_none());
        let m = vec![0u8; 0x100000];
        assert!(mptable::find_cpus(&|a| m[a as usize]).is_none());
    }
}
