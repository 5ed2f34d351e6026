//! Redaction against real image files: chains, encryption, refusals.

use std::path::{Path, PathBuf};

use ferry_image::{CpuRegs, ImageChain, ImageHeaderInput, ImageWriter, ParentRef, RamRange, UserKey, WriteOptions};

use crate::{redact, report_path, Cause, Error, Pattern, PhysRange, RedactSpec};

const SECRET: &[u8] = b"TOP-SECRET-42";

fn ranges() -> Vec<RamRange> {
    vec![RamRange::new(0, 0x100000), RamRange::new(0x100000, 0x40000)]
}

/// A parent with data everywhere, then a child that plants the secret across a chunk
/// boundary and across the two adjacent RAM ranges. Returns the child and the final memory.
fn chain(dir: &Path, key: Option<&UserKey>) -> (PathBuf, Vec<u8>) {
    let opts = || WriteOptions { chunk_size: 4 * 4096, key: key.cloned(), ..WriteOptions::default() };
    let mut mem = vec![0u8; 0x140000];
    for p in 0..mem.len() / 4096 {
        mem[p * 4096 + 8] = (p as u8) | 1;
    }
    let parent = dir.join("base.img");
    let input = ImageHeaderInput { vm_config: serde_json::json!({"vcpus": 1}), ranges: ranges(), parent: None };
    let mut w = ImageWriter::create(&parent, input, opts()).unwrap();
    w.write_pages(0, &mem).unwrap();
    let base = w.finish(b"old state", &[CpuRegs::default()]).unwrap();
    let h = SECRET.len() / 2;
    mem[0x4000 - h..0x4000 - h + SECRET.len()].copy_from_slice(SECRET);
    mem[0x100000 - h..0x100000 - h + SECRET.len()].copy_from_slice(SECRET);
    let child = dir.join("child.img");
    let parent_ref = ParentRef { root_hash: base.root_hash, path_hint: "base.img".into() };
    let input =
        ImageHeaderInput { vm_config: serde_json::json!({"vcpus": 1}), ranges: ranges(), parent: Some(parent_ref) };
    let mut w = ImageWriter::create(&child, input, opts()).unwrap();
    w.write_pages(0x3000, &mem[0x3000..0x5000]).unwrap();
    w.write_pages(0xff000, &mem[0xff000..0x101000]).unwrap();
    let regs = CpuRegs { rax: 7, ..CpuRegs::default() };
    w.finish(b"new state", &[regs]).unwrap();
    (child, mem)
}

fn memory(img: &Path, key: Option<&UserKey>) -> Vec<u8> {
    let mut c = ImageChain::open(img, key).unwrap();
    let mut buf = vec![0u8; 0x140000];
    c.read_at(0, &mut buf).unwrap();
    buf
}

fn leftovers(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "base.img" && n != "child.img")
        .collect();
    v.sort();
    v
}

#[test]
fn ranges_parse_and_bad_ones_say_why() {
    assert_eq!("0x1000..0x2000".parse::<PhysRange>().unwrap(), PhysRange { start: 0x1000, end: 0x2000 });
    assert_eq!("4096+16".parse::<PhysRange>().unwrap(), PhysRange { start: 4096, end: 4112 });
    for (bad, why) in [
        ("0x2000..0x1000", "empty"),
        ("0x1000", "START..END"),
        ("zz..0x10", "hex"),
        ("0x10+", "hex"),
        ("0xffffffffffffffff+2", "overflows"),
    ] {
        let e = bad.parse::<PhysRange>().unwrap_err().to_string();
        assert!(e.contains(why) && e.contains(bad), "{bad}: {e}");
    }
}

#[test]
fn a_chain_is_redacted_into_a_full_image_that_differs_only_where_redacted() {
    let dir = tempfile::tempdir().unwrap();
    let (child, model) = chain(dir.path(), None);
    let out = dir.path().join("red.img");
    let spec = RedactSpec {
        patterns: vec![Pattern::string("TOP-SECRET-42").unwrap()],
        ranges: vec![PhysRange { start: 0x20010, end: 0x21020 }],
        fill: 0xaa,
        ..RedactSpec::default()
    };
    let r = redact(&child, &out, None, &spec).unwrap();
    let got = memory(&out, None);
    let mut want = model.clone();
    let h = SECRET.len() / 2;
    for at in [0x4000 - h, 0x100000 - h] {
        want[at..at + SECRET.len()].fill(0xaa);
    }
    want[0x20010..0x21020].fill(0xaa);
    assert!(got == want, "memory differs from the model outside/inside the redactions");
    assert_ne!(got, model);

    // A full image with the leaf's state and registers, checked, and its report beside it.
    let mut c = ImageChain::open(&out, None).unwrap();
    assert_eq!(c.images().len(), 1);
    assert!(c.images()[0].header().parent.is_none());
    assert_eq!(c.state().unwrap(), b"new state");
    assert_eq!(c.cpus().unwrap()[0].rax, 7);
    c.verify().unwrap();
    assert_eq!(r.output_root_hash, c.root_hash());
    assert_eq!(r.source.len(), 2);
    assert_eq!(r.patterns[0].matches, 2);
    assert_eq!(r.redactions.len(), 3);
    assert_eq!(
        r.redactions[0],
        crate::Redaction { start: (0x4000 - h) as u64, len: 13, cause: Cause::Pattern { index: 0 } }
    );
    assert_eq!(r.bytes_redacted, 26 + 0x1010);
    assert_eq!(r.pages_touched, 2 + 2 + 2);
    let json = std::fs::read(report_path(&out)).unwrap();
    let text = String::from_utf8(json).unwrap();
    assert!(!text.contains("TOP-SECRET"), "the report holds no secret: {text}");
    assert!(text.contains("\"kind\": \"pattern\""), "{text}");
    assert_eq!(leftovers(dir.path()), vec!["red.img", "red.img.redaction.json"]);
}

#[test]
fn temp_files_of_dead_redactions_are_removed_and_live_ones_kept() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = chain(dir.path(), None);
    let out = dir.path().join("red.img");
    // pid_max is at most 2^22, so this process cannot exist; pid 1 always does.
    let dead = ["red.img.redact-tmp-4294967295", "red.img.redaction.json.redact-tmp-4294967295"];
    let kept = ["red.img.redact-tmp-1", "other.img.redact-tmp-4294967295", "red.img.redact-tmp-x"];
    for n in dead.iter().chain(&kept) {
        std::fs::write(dir.path().join(n), b"x").unwrap();
    }
    let spec = RedactSpec { ranges: vec![PhysRange { start: 0, end: 1 }], ..RedactSpec::default() };
    redact(&child, &out, None, &spec).unwrap();
    let mut want: Vec<String> = kept.iter().map(|s| s.to_string()).collect();
    want.extend(["red.img".to_string(), "red.img.redaction.json".to_string()]);
    want.sort();
    assert_eq!(leftovers(dir.path()), want);
}

#[test]
fn an_encrypted_chain_is_re_encrypted_with_its_key() {
    let dir = tempfile::tempdir().unwrap();
    let key = UserKey::from_bytes(b"redaction key").unwrap();
    let (child, _) = chain(dir.path(), Some(&key));
    let out = dir.path().join("red.img");
    let spec = RedactSpec { patterns: vec![Pattern::hex("544f502d").unwrap()], ..RedactSpec::default() };
    let e = redact(&child, &out, None, &spec).unwrap_err().to_string();
    assert!(e.contains("key"), "{e}");
    assert!(leftovers(dir.path()).is_empty());
    let r = redact(&child, &out, Some(&key), &spec).unwrap();
    assert!(r.encrypted);
    let mut c = ImageChain::open(&out, None).unwrap();
    assert!(c.images()[0].is_encrypted());
    assert!(c.read_page(0).is_err(), "unreadable without the key");
    let got = memory(&out, Some(&key));
    assert!(!got.windows(4).any(|w| w == b"TOP-"));
    assert!(got.windows(9).any(|w| w == b"SECRET-42"), "only the hex pattern's bytes were redacted");
}

#[test]
fn bad_requests_are_refused_and_leave_nothing_behind() {
    let dir = tempfile::tempdir().unwrap();
    let (child, _) = chain(dir.path(), None);
    let out = dir.path().join("red.img");
    let range = |s, e| RedactSpec { ranges: vec![PhysRange { start: s, end: e }], ..RedactSpec::default() };
    let e = redact(&child, &child, None, &range(0, 16)).unwrap_err();
    assert!(matches!(e, Error::OutputIsInput { .. }), "{e}");
    let e = redact(&child, &dir.path().join("base.img"), None, &range(0, 16)).unwrap_err();
    assert!(matches!(e, Error::OutputIsInput { .. }), "a parent is an input too: {e}");
    let e = redact(&child, &out, None, &range(0x13f000, 0x141000)).unwrap_err().to_string();
    assert!(e.contains("outside guest memory") && e.contains("0x13f000"), "{e}");
    let e = redact(&child, &out, None, &RedactSpec::default()).unwrap_err();
    assert!(matches!(e, Error::NothingToRedact), "{e}");
    let zeros = RedactSpec { patterns: vec![Pattern::hex("aaaa").unwrap()], fill: 0xaa, ..range(0x5000, 0x5010) };
    let e = redact(&child, &out, None, &zeros).unwrap_err();
    assert!(matches!(e, Error::RedactionIncomplete { .. }), "{e}");
    // A corrupt input: one flipped byte in a chunk of the parent.
    let base = dir.path().join("base.img");
    let mut bytes = std::fs::read(&base).unwrap();
    bytes[4096] ^= 0x40;
    std::fs::write(&base, &bytes).unwrap();
    let big = RedactSpec { patterns: vec![Pattern::string("nothing").unwrap()], ..RedactSpec::default() };
    let e = redact(&child, &out, None, &big).unwrap_err().to_string();
    assert!(e.contains("base.img"), "names the corrupt member: {e}");
    eprintln!("{e}");
    assert!(leftovers(dir.path()).is_empty(), "{:?}", leftovers(dir.path()));
}
