//! End to end: plant a pattern in the test guest through its command line,
//! snapshot it, and find it again with `ferry image read --phys/--virt`,
//! `ferry image maps` and `ferry image scan`; bad addresses and bad images
//! give clear errors.

mod common;
use common::*;
use std::path::PathBuf;

/// The planted bytes: crosses the 4 KiB page boundary at 0x401000.
const PLANT: &[u8] = b"FERRY-INSPECT-7f3a9c";
const AT: u64 = 0x401000 - 10;

fn ok_text(args: &[&str]) -> String {
    let o = ferry_cmd(args);
    assert!(o.status.success(), "ferry {args:?} failed: {}", String::from_utf8_lossy(&o.stderr));
    String::from_utf8(o.stdout).unwrap()
}

fn fails(args: &[&str], expect: &[&str]) {
    let o = ferry_cmd(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "ferry {args:?} should fail");
    assert!(!err.contains("panicked"), "{err}");
    for e in expect {
        assert!(err.contains(e), "ferry {args:?}: expected {e:?} in {err}");
    }
}

/// One guest, one snapshot, shared by the checks below (booting is the slow part).
fn planted_snapshot() -> (tempfile::TempDir, PathBuf) {
    let cmdline = format!("idle report=1000 plant={}@{AT:#x}", hex(PLANT));
    let (g, sock) = running_guest(&cmdline, "64M");
    assert!(g.seen.iter().any(|l| l.starts_with(&format!("PLANTED gpa={AT:#x} len={}", PLANT.len()))), "{:?}", g.seen);
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("planted.img");
    snapshot_ok(&sock, &img, &[]);
    drop(g); // kills and reaps the VMM
    (dir, img)
}

#[test]
fn planted_pattern_is_found_by_read_maps_and_scan() {
    let (dir, img) = planted_snapshot();
    let at = format!("{AT:#x}");
    let len = PLANT.len().to_string();

    // Physical read.
    let r = ok_json(&["image", "read", s(&img), "--phys", &at, "--len", &len, "--json"]);
    assert_eq!(r["bytes"], hex(PLANT));
    let text = ok_text(&["image", "read", s(&img), "--phys", &at, "--len", &len]);
    assert!(text.contains("|FERRY-INSPECT-") && text.contains("0x0000000000400ff6"), "{text}");

    // Virtual read through vCPU 0's saved page tables (identity map with 2 MiB pages).
    let v = ok_json(&["image", "read", s(&img), "--virt", &at, "--len", &len, "--vcpu", "0", "--json"]);
    assert_eq!(v["read"]["bytes"], hex(PLANT));
    let t = &v["translation"];
    assert_eq!(t["pa"], AT);
    assert_eq!(t["page_size"], 2 << 20);
    assert_eq!(t["flags"]["user"], true);
    assert_eq!(t["flags"]["writable"], true);
    assert_eq!(t["steps"].as_array().unwrap().len(), 3, "PML4, PDPT, PD: {t}");
    let cr3 = v["read"]["context"]["root"].as_u64().unwrap();
    // The same with an explicit CR3.
    let v2 =
        ok_json(&["image", "read", s(&img), "--virt", &at, "--len", &len, "--cr3", &format!("{cr3:#x}"), "--json"]);
    assert_eq!(v2["read"]["bytes"], hex(PLANT));
    let text = ok_text(&["image", "read", s(&img), "--virt", &at, "--len", &len]);
    assert!(text.contains("PD") && text.contains("2M page") && text.contains("FERRY-INSPECT-"), "{text}");

    // The page tables map the planted address (identity) among their runs.
    let m = ok_json(&["image", "maps", s(&img), "--vcpu", "0", "--json"]);
    let runs = m["runs"].as_array().unwrap();
    let run = runs
        .iter()
        .find(|r| r["va_start"].as_u64().unwrap() <= AT && AT < r["va_end"].as_u64().unwrap())
        .unwrap_or_else(|| panic!("no run maps {AT:#x}: {runs:?}"));
    assert_eq!(run["pa_start"].as_u64().unwrap() + (AT - run["va_start"].as_u64().unwrap()), AT);
    assert!(m["pages_2m"].as_u64().unwrap() >= 2048, "0..4 GiB in 2 MiB pages: {}", m["pages_2m"]);
    assert!(m["mapped_bytes"].as_u64().unwrap() >= 4 << 30);
    assert!(ok_text(&["image", "maps", s(&img)]).contains("runs,"));

    // Scan: by string and by a hex piece across the page boundary; physical and virtual addresses.
    let sc = ok_json(&["image", "scan", s(&img), "--string", "FERRY-INSPECT-7f3a9c", "--json"]);
    let hit = sc["matches"].as_array().unwrap().iter().find(|x| x["pa"] == AT).unwrap_or_else(|| panic!("{sc}"));
    assert!(hit["va"].as_array().unwrap().iter().any(|v| v == AT), "{hit}");
    assert!(sc["bytes_scanned"].as_u64().unwrap() < sc["ram_bytes"].as_u64().unwrap(), "zero memory is skipped");
    let sc = ok_json(&["image", "scan", s(&img), "--hex", &hex(&PLANT[6..16]), "--json"]);
    assert!(sc["matches"].as_array().unwrap().iter().any(|x| x["pa"] == AT + 6), "{sc}");
    let text = ok_text(&["image", "scan", s(&img), "--string", "FERRY-INSPECT-7f3a9c"]);
    assert!(text.contains("0x000000400ff6") && text.contains("match(es)"), "{text}");
    assert_eq!(ok_json(&["image", "scan", s(&img), "--string", "not-in-this-guest-ZQ", "--json"])["total_matches"], 0);

    // Bad input: clear errors, no panics.
    fails(
        &["image", "read", s(&img), "--phys", "0x100000000", "--len", "16"],
        &["0x100000000", "outside guest memory"],
    );
    fails(&["image", "read", s(&img), "--virt", "0xffff800000000000"], &["stopped at PML4", "not present"]);
    fails(&["image", "read", s(&img), "--virt", "0x8000000000000000"], &["not canonical"]);
    fails(&["image", "read", s(&img), "--virt", &at, "--vcpu", "5"], &["vCPU 5 does not exist"]);
    fails(
        &["image", "read", s(&img), "--virt", &at, "--cr3", "0x70000000"],
        &["PML4", "0x70000000", "outside guest memory"],
    );
    fails(&["image", "maps", s(&img), "--cr3", "0x70000000"], &["CR3", "0x70000000", "outside guest memory"]);
    fails(&["image", "scan", s(&img), "--hex", "abc"], &["odd number of hex digits"]);
    fails(&["image", "scan", s(&img)], &["--string or --hex"]);
    fails(&["image", "read", s(&img), "--phys", "0", "--len", "0"], &["invalid length 0"]);

    // An image of another format version.
    let mut b = std::fs::read(&img).unwrap();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    let v2img = dir.path().join("v2.img");
    std::fs::write(&v2img, &b).unwrap();
    fails(&["image", "scan", s(&v2img), "--string", "x"], &["unsupported image format version 2"]);
    // A flipped bit in the trailer's footer length names that field.
    let mut b = std::fs::read(&img).unwrap();
    let n = b.len();
    b[n - 64 + 24] ^= 0x01;
    let flipped = dir.path().join("flipped.img");
    std::fs::write(&flipped, &b).unwrap();
    fails(&["image", "maps", s(&flipped)], &["footer length field is wrong"]);
}

/// `ferry image read IMG | head -1`: the reader going away ends ferry
/// quietly (SIGPIPE, as any filter), with no panic message.
#[test]
fn a_closed_output_pipe_ends_image_commands_quietly() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::ExitStatusExt;
    let (_dir, img) = planted_snapshot();
    let mut child = std::process::Command::new(ferry())
        .args(["image", "read", s(&img), "--phys", "0x100000", "--len", "1048576"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut first).unwrap();
    assert!(first.starts_with("0x"), "{first}");
    // The read end is dropped here: ferry's next writes find no reader.
    let out = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!err.contains("panicked"), "{err}");
    assert_eq!(out.status.signal(), Some(libc::SIGPIPE), "{:?}: {err}", out.status);
}
