//! End to end: the test guest's `fill=random` workload (whole pages of
//! pseudo-random words instead of one marked word per page). Memory then
//! compresses like nothing at all instead of ~200x, `verify` checks every
//! byte, and snapshot/restore carry every byte over.

mod common;
use common::*;
use ferry_guest::pattern::{page_word, random_page, random_page_word, PAGE_SIZE};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::Path;

/// Value of `key=0x...` in a serial line.
fn hex_field(line: &str, key: &str) -> Option<u64> {
    let v = line.split_whitespace().find_map(|w| w.strip_prefix(&format!("{key}=")))?;
    u64::from_str_radix(v.strip_prefix("0x")?, 16).ok()
}

/// The region as the MARKED line describes it: (first pfn, pages, wss pages).
/// With less than 3 GiB of RAM the region is one contiguous run.
fn marked(g: &Guest) -> (u64, u64, u64) {
    let m = g.seen.iter().find(|l| l.starts_with("MARKED")).expect("MARKED line");
    (hex_field(m, "first_pfn").unwrap(), field(m, "pages").unwrap(), field(m, "wss_pages").unwrap())
}

/// Waits until the guest has completed at least `n` passes.
fn wait_passes(g: &mut Guest, n: u64) {
    g.wait_for(&format!("{n} passes"), secs(60), |l| l.starts_with("PROGRESS") && field(l, "passes") >= Some(n));
}

/// Sends `verify` through `ferry console` and returns the guest's VERIFY line.
fn console_verify(g: &mut Guest, sock: &Path) -> String {
    let out = ferry_cmd(&["console", "--api-sock", sock.to_str().unwrap(), "verify"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    g.wait_line("VERIFY", secs(60))
}

/// A live snapshot with `extra` flags; returns its compression ratio.
fn snapshot_ratio(sock: &Path, img: &Path, extra: &[&str]) -> (f64, serde_json::Value) {
    let s = snapshot_ok(sock, img, extra);
    (s["compression_ratio"].as_f64().unwrap(), s)
}

#[test]
fn random_fill_is_incompressible_verifies_and_survives_snapshot_and_restore() {
    // The same workload with fill=word (the default), for comparison.
    let (mut w, wsock) = running_guest("dirty wss=8 rate=max report=50", "64M");
    wait_passes(&mut w, 3);
    let (word_ratio, s) = snapshot_ratio(&wsock, &w.path("word.img"), &[]);
    eprintln!("fill=word: compression ratio {word_ratio:.1} ({} raw, {} stored)", s["raw_bytes"], s["stored_bytes"]);
    assert!(word_ratio > 20.0, "one word per page compresses very well: {s}");
    drop(w);

    let (mut g, sock) = running_guest("dirty wss=8 rate=max report=50 fill=random", "64M");
    let (first_pfn, pages, wss) = marked(&g);
    assert!(pages > 10_000 && wss == 2048, "{:?}", g.seen);
    wait_passes(&mut g, 3);
    g.send_line("verify");
    let v = g.wait_line("VERIFY", secs(60));
    assert_eq!(v, format!("VERIFY OK pages={pages}"));
    assert!(console_verify(&mut g, &sock).starts_with("VERIFY OK"));

    let img = g.path("random.img");
    let (ratio, s) = snapshot_ratio(&sock, &img, &["--digest"]);
    eprintln!("fill=random: compression ratio {ratio:.3} ({} raw, {} stored)", s["raw_bytes"], s["stored_bytes"]);
    assert!(ratio < 1.5, "random pages must not compress: {s}");
    assert!(s["stored_bytes"].as_u64().unwrap() >= pages * PAGE_SIZE as u64, "every region page stored whole: {s}");
    let (zratio, zs) = snapshot_ratio(&sock, &g.path("random-zstd.img"), &["--codec", "zstd"]);
    eprintln!("fill=random, zstd: compression ratio {zratio:.3}");
    assert!(zratio < 1.5, "not with zstd either: {zs}");
    // The source carries on and still verifies after being snapshotted.
    g.wait_line("PROGRESS", secs(30));
    assert!(console_verify(&mut g, &sock).starts_with("VERIFY OK"));

    // The image holds exactly the pages the guest's generator computes: every
    // region page is the random page of (pfn, the generation in its word 0);
    // only a page a vCPU was in the middle of writing at the final pause may
    // be partly old, partly new.
    let raw = g.path("random.raw");
    let o = ferry_cmd(&["image", "export", img.to_str().unwrap(), "--format", "raw", "--out", raw.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let mem = std::fs::read(&raw).unwrap();
    let (mut partial, mut gens) = (vec![], std::collections::BTreeSet::new());
    for pfn in first_pfn..first_pfn + pages {
        let page = &mem[pfn as usize * PAGE_SIZE..][..PAGE_SIZE];
        let word0 = u64::from_le_bytes(page[..8].try_into().unwrap());
        let gen = word0 >> 32;
        assert_eq!(word0, page_word(gen, pfn), "pfn {pfn:#x}");
        if pfn >= first_pfn + wss {
            assert_eq!(gen, 0, "pages outside the working set keep the marking generation: pfn {pfn:#x}");
        } else {
            gens.insert(gen);
        }
        if page != random_page(gen, pfn) {
            partial.push(pfn);
        }
    }
    assert!(partial.len() <= 1, "pages that are not one generation's random page: {partial:x?}");
    assert!(gens.len() <= 2 && *gens.first().unwrap() >= 3, "working set generations (one vCPU: n and n+1) {gens:?}");

    // Restore in a second ferry: same memory, and the guest verifies every byte.
    let dir = tempfile::tempdir().unwrap();
    let rsock = dir.path().join("r.sock");
    let mut r = Guest::start_restore(dir, &[img.to_str().unwrap(), "--paused", "--api-sock", rsock.to_str().unwrap()]);
    wait_sock(&rsock);
    assert_eq!(api("digest", &rsock)["digest"], s["memory_digest"], "restored memory equals memory at the final pause");
    api("resume", &rsock);
    let p = r.wait_line("PROGRESS", secs(60));
    assert!(field(&p, "seq").unwrap() >= 1, "the restored guest continues its sequence: {p}");
    assert!(!r.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "restore must not reboot: {:?}", r.seen);
    wait_passes(&mut r, field(&p, "passes").unwrap() + 2);
    assert_eq!(console_verify(&mut r, &rsock), format!("VERIFY OK pages={pages}"));
}

/// Host address range of guest-physical 0 in ferry's address space: the
/// writable mapping whose page at `pfn` holds exactly the random page the
/// guest wrote there (generation 0).
fn find_guest_ram(pid: u32, pfn: u64) -> (std::fs::File, u64) {
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    let mut mem = std::fs::OpenOptions::new().read(true).write(true).open(format!("/proc/{pid}/mem")).unwrap();
    let want = random_page(0, pfn);
    let off = pfn * PAGE_SIZE as u64;
    let mut found = vec![];
    for l in maps.lines() {
        let mut f = l.split_whitespace();
        let (range, perms) = (f.next().unwrap(), f.next().unwrap());
        let (lo, hi) = range.split_once('-').unwrap();
        let (lo, hi) = (u64::from_str_radix(lo, 16).unwrap(), u64::from_str_radix(hi, 16).unwrap());
        if !perms.starts_with("rw") || hi - lo < off + PAGE_SIZE as u64 {
            continue;
        }
        let mut page = vec![0u8; PAGE_SIZE];
        if mem.seek(SeekFrom::Start(lo + off)).is_ok() && mem.read_exact(&mut page).is_ok() && page == want {
            found.push(lo);
        }
    }
    assert_eq!(found.len(), 1, "exactly one mapping is guest RAM: {found:x?}\n{maps}");
    (mem, found[0])
}

fn xor_byte(mem: &mut std::fs::File, at: u64, x: u8) {
    let mut b = [0u8];
    mem.seek(SeekFrom::Start(at)).unwrap();
    mem.read_exact(&mut b).unwrap();
    b[0] ^= x;
    mem.seek(SeekFrom::Start(at)).unwrap();
    mem.write_all(&b).unwrap();
}

/// One byte flipped from the host (through /proc/PID/mem, in the middle of a
/// random page the workload never rewrites) makes `verify` fail on exactly
/// that page and word; flipping it back makes it pass again.
#[test]
fn verify_catches_one_corrupted_byte_in_a_random_page() {
    let (mut g, sock) = running_guest("dirty wss=4 rate=max report=100 fill=random", "64M");
    let (first_pfn, pages, wss) = marked(&g);
    let pfn = first_pfn + wss + (pages - wss) / 2; // outside the working set: generation 0 forever
    let (mut mem, base) = find_guest_ram(g.child.id(), pfn);
    let at = pfn * PAGE_SIZE as u64 + 2049; // byte 1 of word 256
    xor_byte(&mut mem, base + at, 0x5a);

    let v = console_verify(&mut g, &sock);
    assert!(v.starts_with("VERIFY FAIL"), "{v}");
    assert_eq!(field(&v, "page"), Some(pfn), "{v}");
    assert_eq!(field(&v, "bad"), Some(1), "{v}");
    assert_eq!(field(&v, "offset"), Some(2048), "the word holding the byte: {v}");
    let (found, expected) = (hex_field(&v, "found").unwrap(), hex_field(&v, "expected").unwrap());
    assert_eq!(expected, random_page_word(0, pfn, 256), "{v}");
    assert_eq!(found ^ expected, 0x5a << 8, "exactly the flipped byte differs: {v}");

    // The guest goes on, and the same page fails again until it is repaired.
    g.wait_line("PROGRESS", secs(30));
    assert!(console_verify(&mut g, &sock).starts_with(&format!("VERIFY FAIL page={pfn} ")));
    xor_byte(&mut mem, base + at, 0x5a);
    assert_eq!(console_verify(&mut g, &sock), format!("VERIFY OK pages={pages}"));
}
