//! End-to-end tests: write images in rounds, read them back, corrupt them,
//! chain them and export them.

use std::path::{Path, PathBuf};

use crate::export::{CpuRegs, Segment};
use crate::footer::{Footer, Trailer, TRAILER_LEN};
use crate::hash::Hash32;
use crate::header::PREAMBLE_LEN;
use crate::*;

const PAGE: usize = 4096;
/// Guest-physical space covered by the test layout.
const SPACE: usize = 0x30_0000;

fn ranges() -> Vec<RamRange> {
    vec![RamRange::new(0, 0xa0000), RamRange::new(0x10_0000, 0x20_0000)]
}

fn input(parent: Option<ParentRef>) -> ImageHeaderInput {
    ImageHeaderInput { vm_config: serde_json::json!({"vcpus": 2, "mem_mib": 2}), ranges: ranges(), parent }
}

/// A page with recognisable, semi-compressible contents.
fn page(gpa: u64, round: u8) -> Vec<u8> {
    let mut p = vec![0u8; PAGE];
    for (i, b) in p.iter_mut().enumerate() {
        *b = ((i / 16) as u8).wrapping_mul(round).wrapping_add((gpa >> 12) as u8) | 1;
    }
    p[..8].copy_from_slice(&gpa.to_le_bytes());
    p
}

fn cpus() -> Vec<CpuRegs> {
    (0..2)
        .map(|i| CpuRegs {
            rax: 0x1111 * (i + 1),
            rip: 0xffff_ffff_8100_0000 + i,
            rsp: 0x8000,
            cr3: 0x1000,
            cs: Segment { selector: 0x10, base: 0, limit: 0xffff_ffff, attrs: 0xa09b },
            kernel_gs_base: 0xabc,
            apic_id: i as u32,
            ..Default::default()
        })
        .collect()
}

/// Guest memory model: what the image should read back as.
struct Model(Vec<u8>);

impl Model {
    fn new() -> Self {
        Model(vec![0; SPACE])
    }
    fn set(&mut self, gpa: u64, data: &[u8]) {
        self.0[gpa as usize..gpa as usize + data.len()].copy_from_slice(data);
    }
}

/// Writes an image in three rounds and returns the expected memory.
fn write_rounds(
    path: &Path,
    opts: WriteOptions,
    parent: Option<ParentRef>,
    base: Option<&Model>,
) -> (ImageSummary, Model) {
    let mut m = Model::new();
    if let Some(b) = base {
        m.0.copy_from_slice(&b.0);
    }
    let mut w = ImageWriter::create(path, input(parent.clone()), opts).unwrap();
    let full = parent.is_none();
    // Round 1: everything (full image) or a band (incremental), every 5th page zero.
    for r in ranges() {
        let mut gpa = r.start;
        while gpa < r.end() {
            let n = ((r.end() - gpa) / 4096).min(37);
            let mut buf = Vec::new();
            for k in 0..n {
                let g = gpa + k * 4096;
                let p = if (g >> 12) % 5 == 0 { vec![0; PAGE] } else { page(g, 1) };
                buf.extend_from_slice(&p);
            }
            if full || (0x10_0000..0x18_0000).contains(&gpa) {
                w.write_pages(gpa, &buf).unwrap();
                m.set(gpa, &buf);
            }
            gpa += n * 4096;
        }
    }
    // Round 2: re-dirty some pages, zero some that had data.
    for g in (0x10_0000u64..0x20_0000).step_by(4096 * 3) {
        let p = page(g, 2);
        w.write_pages(g, &p).unwrap();
        m.set(g, &p);
    }
    w.write_pages(0x11_1000, &[0u8; 4096 * 2]).unwrap();
    m.set(0x11_1000, &[0u8; 4096 * 2]);
    // Round 3: an explicit zero range and a final rewrite.
    w.write_zero(0x2000, 3).unwrap();
    m.set(0x2000, &[0u8; 4096 * 3]);
    let p = page(0x2000, 3);
    w.write_pages(0x2000, &p).unwrap();
    m.set(0x2000, &p);
    let s = w.finish(b"device state bytes", &cpus()).unwrap();
    (s, m)
}

fn read_all_runs(r: &mut ImageReader, m: &mut Model) {
    r.read_memory(|gpa, d| {
        m.set(gpa, d);
        Ok(())
    })
    .unwrap();
}

fn opts(codec: Codec, key: Option<UserKey>) -> WriteOptions {
    WriteOptions { codec, chunk_size: 64 << 10, key, threads: 2 }
}

fn key() -> UserKey {
    UserKey::from_bytes(b"0123456789abcdef0123456789abcdef").unwrap()
}

/// A written test image and its expected memory.
fn sample(dir: &Path, encrypted: bool) -> (PathBuf, Model, ImageSummary) {
    let path = dir.join("img.ferry");
    let (s, m) = write_rounds(&path, opts(Codec::Lz4, encrypted.then(key)), None, None);
    (path, m, s)
}

#[test]
fn round_trip_every_codec_with_and_without_encryption() {
    let dir = tempfile::tempdir().unwrap();
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
        for enc in [false, true] {
            let path = dir.path().join(format!("{codec:?}-{enc}.img"));
            let (s, want) = write_rounds(&path, opts(codec, enc.then(key)), None, None);
            assert!(s.chunks > 1);
            assert_eq!(s.encrypted, enc);
            let k = key();
            let mut r = ImageReader::open(&path, enc.then_some(&k)).unwrap();
            assert_eq!(r.root_hash(), s.root_hash);
            assert_eq!(r.header().vm_config["vcpus"], 2);
            let mut got = Model::new();
            read_all_runs(&mut r, &mut got);
            assert!(got.0 == want.0, "{codec:?} enc={enc}: replayed memory differs");
            assert_eq!(r.state().unwrap(), b"device state bytes");
            assert_eq!(r.cpus().unwrap(), cpus());
            for g in [0u64, 0x2000, 0x5000, 0x10_0000, 0x11_1000, 0x11_2000, 0x1f_f000] {
                assert_eq!(r.read_page(g).unwrap(), &want.0[g as usize..g as usize + PAGE], "page {g:#x}");
            }
            let v = r.verify().unwrap();
            assert!(v.decoded);
            assert_eq!(v.authenticated, enc);
            assert_eq!(v.root_hash, s.root_hash);
            assert_eq!(v.chunks, s.chunks);
            if codec != Codec::None {
                assert!(s.stored_bytes < s.raw_bytes, "{codec:?} did not compress");
            }
        }
    }
}

#[test]
fn zero_pages_are_skipped_or_recorded() {
    let dir = tempfile::tempdir().unwrap();
    let (_, _, s) = sample(dir.path(), false);
    // Every 5th page in round 1 was zero and never held data: skipped.
    assert!(s.zero_pages_skipped > 100);
    // The two pages zeroed in round 2 and the 3 zeroed in round 3 held data: recorded
    // (0x2000 is a multiple of 5 pages? page 2 is not, 3 and 4 are not, so all 3 held data).
    assert_eq!(s.zero_pages_recorded, 5);
    assert_eq!(s.raw_bytes, s.pages_stored * 4096);
}

#[test]
fn incremental_image_always_records_zero_pages() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("c.img");
    let parent = ParentRef { root_hash: Hash32::of(b"p"), path_hint: "p.img".into() };
    let mut w = ImageWriter::create(&path, input(Some(parent)), WriteOptions::default()).unwrap();
    w.write_pages(0x10_0000, &[0u8; 4096 * 4]).unwrap();
    w.write_zero(0x0, 2).unwrap();
    let s = w.finish(b"", &[]).unwrap();
    assert_eq!((s.zero_pages_recorded, s.zero_pages_skipped, s.pages_stored), (6, 0, 0));
}

#[test]
fn many_runs_split_into_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("runs.img");
    let parent = ParentRef { root_hash: Hash32::of(b"p"), path_hint: "p.img".into() };
    let mut w = ImageWriter::create(&path, input(Some(parent)), WriteOptions::default()).unwrap();
    // Every other page zeroed: one run each, more than MAX_RUNS_PER_CHUNK in total? Use all
    // pages of the big range (512 pages) several times over with distinct gaps.
    let mut n = 0;
    for round in 0..80u64 {
        for p in (0..512u64).filter(|p| p % 2 == round % 2) {
            w.write_zero(0x10_0000 + p * 4096, 1).unwrap();
            n += 1;
        }
    }
    assert!(n > MAX_RUNS_PER_CHUNK);
    let s = w.finish(b"", &[]).unwrap();
    assert!(s.chunks >= 2, "{} chunks", s.chunks);
    let mut r = ImageReader::open(&path, None).unwrap();
    let mut zero_pages = 0;
    r.read_runs(|_, d| {
        if let RunData::Zero { npages } = d {
            zero_pages += npages;
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(zero_pages, n as u64);
}

#[test]
fn bad_writes_are_rejected() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.img");
    let mut w = ImageWriter::create(&path, input(None), WriteOptions::default()).unwrap();
    assert!(matches!(w.write_pages(0x1001, &[1u8; 4096]), Err(Error::InvalidArgument(_))));
    assert!(matches!(w.write_pages(0x1000, &[1u8; 100]), Err(Error::InvalidArgument(_))));
    assert!(matches!(w.write_pages(0xa0000, &[1u8; 4096]), Err(Error::OutsideRam { gpa: 0xa0000, .. })));
    assert!(matches!(w.write_pages(0x9f000, &[1u8; 8192]), Err(Error::OutsideRam { .. })));
    assert!(matches!(w.write_zero(0x30_0000, 1), Err(Error::OutsideRam { .. })));
    let bad_ranges = ImageHeaderInput { ranges: vec![RamRange::new(0, 100)], ..input(None) };
    assert!(ImageWriter::create(&dir.path().join("x"), bad_ranges, WriteOptions::default()).is_err());
    let bad_chunk = WriteOptions { chunk_size: 1000, ..WriteOptions::default() };
    assert!(ImageWriter::create(&dir.path().join("y"), input(None), bad_chunk).is_err());
}

fn dir_entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    v.sort();
    v
}

#[test]
fn dropped_writer_removes_its_temp_file_and_finish_renames() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("a.img");
    let mut w = ImageWriter::create(&path, input(None), WriteOptions::default()).unwrap();
    w.write_pages(0, &page(0, 1)).unwrap();
    let entries = dir_entries(dir.path());
    assert_eq!(entries.len(), 1);
    assert!(entries[0].starts_with("a.img.tmp-"), "{entries:?}");
    drop(w);
    assert!(dir_entries(dir.path()).is_empty());
    let w = ImageWriter::create(&path, input(None), WriteOptions::default()).unwrap();
    w.finish(b"", &[]).unwrap();
    assert_eq!(dir_entries(dir.path()), vec!["a.img"]);
}

#[test]
fn writer_can_be_fed_from_another_thread() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.img");
    let mut w = ImageWriter::create(&path, input(None), WriteOptions::default()).unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<(u64, Vec<u8>)>();
    let feeder = std::thread::spawn(move || {
        for (gpa, data) in rx {
            w.write_pages(gpa, &data).unwrap();
        }
        w.finish(b"s", &[]).unwrap()
    });
    for g in (0x10_0000u64..0x30_0000).step_by(4096 * 16) {
        let mut d = Vec::new();
        for k in 0..16 {
            d.extend_from_slice(&page(g + k * 4096, 1));
        }
        tx.send((g, d)).unwrap();
    }
    drop(tx);
    let s = feeder.join().unwrap();
    assert_eq!(s.pages_stored, 512);
    let mut r = ImageReader::open(&path, None).unwrap();
    assert_eq!(r.read_page(0x1f_0000).unwrap(), page(0x1f_0000, 1));
}

/// Mounts a 1 MiB tmpfs to provoke ENOSPC; `None` when mounting is not permitted here.
fn small_tmpfs(dir: &Path) -> Option<impl Drop> {
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=1m", "tmpfs"])
        .arg(dir)
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    ok.then(|| Unmount(dir.to_path_buf()))
}

#[test]
fn enospc_returns_error_naming_path_and_keeps_previous_image() {
    let outer = tempfile::tempdir().unwrap();
    let mnt = outer.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let Some(_guard) = small_tmpfs(&mnt) else {
        eprintln!("skipping: cannot mount a tmpfs here");
        return;
    };
    let path = mnt.join("img.ferry");
    // A small valid previous image.
    let w = ImageWriter::create(&path, input(None), WriteOptions::default()).unwrap();
    let prev = w.finish(b"old", &[]).unwrap();
    let before = std::fs::read(&path).unwrap();
    // Now an incompressible image larger than the filesystem.
    let mut w = ImageWriter::create(&path, input(None), opts(Codec::None, None)).unwrap();
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut noise = vec![0u8; 0x20_0000];
    for b in noise.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8 | 1;
    }
    let err = w
        .write_pages(0x10_0000, &noise)
        .err()
        .or_else(|| w.finish(b"new", &[]).err())
        .expect("writing 2 MiB to a 1 MiB filesystem must fail");
    let msg = err.to_string();
    assert!(matches!(err, Error::Io { .. }), "{msg}");
    assert!(msg.contains("img.ferry.tmp-"), "{msg}");
    assert_eq!(std::fs::read(&path).unwrap(), before);
    assert_eq!(ImageReader::open(&path, None).unwrap().root_hash(), prev.root_hash);
    assert_eq!(dir_entries(&mnt), vec!["img.ferry"]);
}

// ---- bad input ----------------------------------------------------------

fn flip(path: &Path, offset: u64) {
    let mut b = std::fs::read(path).unwrap();
    b[offset as usize] ^= 0x10;
    std::fs::write(path, b).unwrap();
}

fn reopen_err(path: &Path, key: Option<&UserKey>) -> Error {
    ImageReader::open(path, key).err().expect("open must fail")
}

/// Offsets of the first chunk record, the state record and the footer, from the trailer.
fn layout_of(path: &Path) -> (u64, Footer, u64) {
    let b = std::fs::read(path).unwrap();
    let t: [u8; TRAILER_LEN] = b[b.len() - TRAILER_LEN..].try_into().unwrap();
    let t = Trailer::decode(path, &t, (b.len() - TRAILER_LEN) as u64, 0, b.len() as u64).unwrap();
    let f = Footer::decode(path, &b[t.footer_offset as usize..b.len() - TRAILER_LEN], t.footer_offset, 0).unwrap();
    (f.chunks[0].offset, f, t.footer_offset)
}

#[test]
fn truncated_image_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let full = std::fs::read(&path).unwrap();
    for cut in [full.len() - 1, full.len() / 2, 1000] {
        std::fs::write(&path, &full[..cut]).unwrap();
        let e = reopen_err(&path, None);
        assert!(matches!(e, Error::MissingTrailer { size, .. } if size == cut as u64), "cut {cut}: {e}");
        assert!(e.to_string().contains("truncated"));
    }
    // Cut right after the header: no room for a trailer at all.
    std::fs::write(&path, &full[..400]).unwrap();
    assert!(matches!(reopen_err(&path, None), Error::Truncated { what: "trailer", size: 400, .. }));
    std::fs::write(&path, &full[..30]).unwrap();
    assert!(matches!(reopen_err(&path, None), Error::Truncated { what: "preamble", .. }));
    std::fs::write(&path, &full[..200]).unwrap();
    assert!(matches!(reopen_err(&path, None), Error::SizeExceedsFile { what: "header", .. }));
}

#[test]
fn flipped_bit_in_a_chunk_names_the_chunk() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let (_, footer, _) = layout_of(&path);
    let c = &footer.chunks[3];
    flip(&path, c.offset + c.record_len / 2);
    // Open succeeds (the footer is intact); reading or verifying finds the chunk.
    let mut r = ImageReader::open(&path, None).unwrap();
    let e = r.verify().unwrap_err();
    assert!(matches!(e, Error::ChunkHashMismatch { index: 3, offset, .. } if offset == c.offset), "{e}");
    assert!(e.to_string().contains("chunk 3"));
    let e = r.read_memory(|_, _| Ok(())).unwrap_err();
    assert!(matches!(e, Error::ChunkHashMismatch { index: 3, .. }), "{e}");
}

#[test]
fn flipped_bit_in_header_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    flip(&path, PREAMBLE_LEN as u64 + 20);
    assert!(matches!(reopen_err(&path, None), Error::HeaderHashMismatch { .. }));
    // A flip in the preamble's stored hash is caught the same way.
    flip(&path, PREAMBLE_LEN as u64 + 20);
    flip(&path, 30);
    assert!(matches!(reopen_err(&path, None), Error::HeaderHashMismatch { .. }));
    flip(&path, 30);
    flip(&path, 2);
    assert!(matches!(reopen_err(&path, None), Error::BadMagic { offset: 0, .. }));
}

#[test]
fn flipped_bit_in_state_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let (_, footer, _) = layout_of(&path);
    flip(&path, footer.state.offset + 25);
    let mut r = ImageReader::open(&path, None).unwrap();
    let e = r.state().unwrap_err();
    assert!(
        matches!(e, Error::SectionHashMismatch { section: "state", offset, .. } if offset == footer.state.offset),
        "{e}"
    );
    assert!(matches!(r.verify().unwrap_err(), Error::SectionHashMismatch { section: "state", .. }));
}

#[test]
fn flipped_bit_in_footer_or_trailer_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let (_, _, foff) = layout_of(&path);
    flip(&path, foff + 300);
    assert!(matches!(reopen_err(&path, None), Error::FooterHashMismatch { offset, .. } if offset == foff));
    flip(&path, foff + 300);
    let size = std::fs::metadata(&path).unwrap().len();
    // The footer hash stored in the trailer: the footer itself is intact, so the trailer's
    // hash field is named.
    flip(&path, size - 10);
    let e = reopen_err(&path, None);
    assert!(matches!(e, Error::TrailerFooterHashMismatch { footer_offset, .. } if footer_offset == foff), "{e}");
    assert!(e.to_string().contains("footer hash field"), "{e}");
    flip(&path, size - 10);
    // Too large a footer length in the trailer is beyond the file.
    flip(&path, size - TRAILER_LEN as u64 + 30);
    assert!(matches!(reopen_err(&path, None), Error::SizeExceedsFile { what, .. } if what.starts_with("footer")));
    flip(&path, size - TRAILER_LEN as u64 + 30);
    ImageReader::open(&path, None).unwrap();
}

#[test]
fn flipped_trailer_footer_fields_name_the_field() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let (_, _, foff) = layout_of(&path);
    let size = std::fs::metadata(&path).unwrap().len();
    let t = size - TRAILER_LEN as u64;
    // Every single-bit flip of the low bytes of both fields that keeps offset + length inside
    // the file must name the field, not claim the footer exceeds the file.
    let (mut named_len, mut named_off) = (0, 0);
    for (field_at, want) in [(t + 24, "footer length"), (t + 16, "footer offset")] {
        for byte in 0..2u64 {
            for bit in 0..8 {
                let mut b = std::fs::read(&path).unwrap();
                b[(field_at + byte) as usize] ^= 1 << bit;
                let broken = dir.path().join("broken.img");
                std::fs::write(&broken, &b).unwrap();
                let e = reopen_err(&broken, None);
                let msg = e.to_string();
                match e {
                    Error::FooterMisplaced { field, footer_offset, footer_len, .. } => {
                        assert!(footer_offset.saturating_add(footer_len) <= size, "{msg}");
                        assert_eq!(field, want, "{msg}");
                        assert!(msg.contains(want) && !msg.contains("exceeds"), "{msg}");
                        if want == "footer length" {
                            named_len += 1;
                        } else {
                            named_off += 1;
                        }
                    }
                    Error::SizeExceedsFile { offset, len, file_size, .. } => {
                        assert!(offset.saturating_add(len) > file_size, "{msg}");
                    }
                    Error::TrailerCorrupt { .. } => assert!(msg.contains("before the end of the header"), "{msg}"),
                    other => panic!("flip at {field_at}+{byte} bit {bit}: unexpected {other}"),
                }
            }
        }
    }
    assert!(named_len >= 4 && named_off >= 4, "len {named_len} off {named_off}");
    // A flip anywhere in the footer itself (offsets, lengths, runs, hashes) is the footer's
    // fault, never blamed on the trailer's hash field.
    let full = std::fs::read(&path).unwrap();
    let broken = dir.path().join("broken.img");
    for at in (foff..t).step_by(7) {
        let mut b = full.clone();
        b[at as usize] ^= 0x04;
        std::fs::write(&broken, &b).unwrap();
        let e = reopen_err(&broken, None);
        assert!(matches!(e, Error::FooterHashMismatch { .. }), "flip at footer byte {}: {e}", at - foff);
    }
}

#[test]
fn unsupported_version_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let mut b = std::fs::read(&path).unwrap();
    b[8..12].copy_from_slice(&2u32.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let e = reopen_err(&path, None);
    assert!(matches!(e, Error::UnsupportedVersion { found: 2, supported: 1, .. }), "{e}");
}

#[test]
fn declared_sizes_beyond_the_file_are_refused_before_allocating() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), false);
    let mut b = std::fs::read(&path).unwrap();
    b[16..24].copy_from_slice(&(u64::MAX / 2).to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    let e = reopen_err(&path, None);
    assert!(matches!(e, Error::SizeExceedsFile { what: "header", len, .. } if len == u64::MAX / 2), "{e}");
    // Footer offset pointing before the data area.
    let (path, _, _) = sample(dir.path(), false);
    let mut b = std::fs::read(&path).unwrap();
    let t = b.len() - TRAILER_LEN;
    b[t + 16..t + 24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &b).unwrap();
    assert!(matches!(reopen_err(&path, None), Error::SizeExceedsFile { .. }));
}

#[test]
fn wrong_key_is_detected_at_open() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), true);
    let wrong = UserKey::from_bytes(b"not the key").unwrap();
    let e = reopen_err(&path, Some(&wrong));
    assert!(matches!(e, Error::WrongKey { .. }), "{e}");
    assert!(e.to_string().contains("wrong key"));
}

#[test]
fn encrypted_image_without_key_shows_only_public_fields() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, s) = sample(dir.path(), true);
    let mut r = ImageReader::open(&path, None).unwrap();
    assert!(r.is_encrypted());
    assert_eq!(r.ranges(), ranges().as_slice());
    assert_eq!(r.root_hash(), s.root_hash);
    assert!(matches!(r.state().unwrap_err(), Error::KeyRequired { .. }));
    assert!(matches!(r.cpus().unwrap_err(), Error::KeyRequired { .. }));
    assert!(matches!(r.read_page(0x10_0000).unwrap_err(), Error::KeyRequired { .. }));
    // Integrity (not authenticity) can still be checked.
    let v = r.verify().unwrap();
    assert!(!v.decoded && !v.authenticated);
    // The plaintext is not in the file.
    let bytes = std::fs::read(&path).unwrap();
    assert!(!bytes.windows(18).any(|w| w == b"device state bytes"));
}

/// Rewrites one encrypted chunk byte and fixes every unkeyed hash, as an attacker could.
#[test]
fn forged_encrypted_image_fails_authentication() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _, _) = sample(dir.path(), true);
    let (_, mut footer, foff) = layout_of(&path);
    let mut b = std::fs::read(&path).unwrap();
    let c = footer.chunks[1].clone();
    let (o, l) = (c.offset as usize, c.record_len as usize);
    b[o + l - 40] ^= 1;
    let h = Hash32::of(&b[o..o + l - 32]);
    b[o + l - 32..o + l].copy_from_slice(&h.0);
    footer.chunks[1].hash = h;
    let mut root = crate::hash::RootHasher::new(&footer.header_hash);
    for c in &footer.chunks {
        root.chunk(&c.hash);
    }
    footer.root = root.finish(&footer.state.hash, &footer.cpus.hash);
    let fb = footer.encode();
    b.truncate(foff as usize);
    b.extend_from_slice(&fb);
    b.extend_from_slice(
        &Trailer { footer_offset: foff, footer_len: fb.len() as u64, footer_hash: Hash32::of(&fb) }.encode(),
    );
    std::fs::write(&path, &b).unwrap();
    // Without the key it looks consistent; with it, the keyed root tag fails.
    ImageReader::open(&path, None).unwrap().verify().unwrap();
    let k = key();
    assert!(matches!(reopen_err(&path, Some(&k)), Error::RootTagMismatch { .. }));
}

#[test]
fn chunk_aad_binds_header_and_runs() {
    // A chunk moved to another header or given other runs must not decrypt.
    let k = key();
    let (dk, _) = crate::crypto::DataKey::generate(&k).unwrap();
    let mut enc = crate::codec::Encoder::new(Codec::Lz4).unwrap();
    let hh = Hash32::of(b"header");
    let job = crate::record::ChunkJob {
        index: 0,
        runs: vec![PageRun { gpa: 0, npages: 1, kind: RunKind::Data }],
        data: page(0, 1),
    };
    let c = crate::record::encode_chunk(job, &mut enc, Some(&dk), &hh, Vec::new()).unwrap();
    let mut prefix = c.prefix.clone();
    prefix[24] = 0x10; // run gpa 0x10 pages on: a different index entry
    let mut ct = c.payload.clone();
    assert!(dk.open(crate::crypto::NonceKind::Chunk, 0, &[&hh.0, &prefix], &mut ct).is_none());
    let mut ct = c.payload.clone();
    assert!(dk
        .open(crate::crypto::NonceKind::Chunk, 0, &[&Hash32::of(b"other header").0, &c.prefix], &mut ct)
        .is_none());
    let mut ct = c.payload.clone();
    assert!(dk.open(crate::crypto::NonceKind::Chunk, 0, &[&hh.0, &c.prefix], &mut ct).is_some());
}

// ---- chains -------------------------------------------------------------

#[test]
fn chain_applies_children_over_parent() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    for enc in [false, true] {
        let base = dir.path().join(format!("base-{enc}.img"));
        let (s0, m0) = write_rounds(&base, opts(Codec::Lz4, enc.then(key)), None, None);
        let mid = dir.path().join(format!("mid-{enc}.img"));
        let parent =
            ParentRef { root_hash: s0.root_hash, path_hint: base.file_name().unwrap().to_string_lossy().into() };
        let (s1, m1) = write_rounds(&mid, opts(Codec::Zstd { level: 1 }, enc.then(key)), Some(parent), Some(&m0));
        let top = dir.path().join(format!("top-{enc}.img"));
        let parent = ParentRef { root_hash: s1.root_hash, path_hint: mid.to_string_lossy().into() };
        let mut w = ImageWriter::create(&top, input(Some(parent)), opts(Codec::Lz4, enc.then(key))).unwrap();
        let mut m2 = Model(m1.0.clone());
        w.write_zero(0x10_3000, 2).unwrap();
        m2.set(0x10_3000, &[0u8; 8192]);
        w.write_pages(0x4000, &page(0x4000, 9)).unwrap();
        m2.set(0x4000, &page(0x4000, 9));
        w.finish(b"top state", &cpus()).unwrap();

        let mut ch = open_chain(&top, enc.then_some(&k)).unwrap();
        assert_eq!(ch.images().len(), 3);
        assert_eq!(ch.state().unwrap(), b"top state");
        let mut got = Model::new();
        ch.read_memory(|g, d| {
            got.set(g, d);
            Ok(())
        })
        .unwrap();
        assert!(got.0 == m2.0, "chain replay differs (enc={enc})");
        for g in [0x4000u64, 0x10_3000, 0x10_0000, 0x11_1000, 0x1f_f000, 0x9f000] {
            assert_eq!(ch.read_page(g).unwrap(), &m2.0[g as usize..g as usize + PAGE], "page {g:#x}");
        }
        assert_eq!(ch.verify().unwrap().len(), 3);
    }
}

#[test]
fn chain_with_missing_parent_names_the_path() {
    let dir = tempfile::tempdir().unwrap();
    let child = dir.path().join("child.img");
    let parent = ParentRef { root_hash: Hash32::of(b"x"), path_hint: "gone.img".into() };
    ImageWriter::create(&child, input(Some(parent)), WriteOptions::default()).unwrap().finish(b"", &[]).unwrap();
    let e = open_chain(&child, None).err().unwrap();
    assert!(matches!(&e, Error::MissingParent { parent, .. } if parent == &dir.path().join("gone.img")), "{e}");
    assert!(e.to_string().contains("gone.img"));
}

#[test]
fn chain_with_mismatched_parent_shows_both_hashes() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, s) = sample(dir.path(), false);
    let child = dir.path().join("child.img");
    let wrong = Hash32::of(b"some other image");
    let parent = ParentRef { root_hash: wrong, path_hint: base.file_name().unwrap().to_string_lossy().into() };
    ImageWriter::create(&child, input(Some(parent)), WriteOptions::default()).unwrap().finish(b"", &[]).unwrap();
    let e = open_chain(&child, None).err().unwrap();
    assert!(
        matches!(&e, Error::ParentMismatch { expected, found, .. } if *expected == wrong && *found == s.root_hash),
        "{e}"
    );
    let msg = e.to_string();
    assert!(msg.contains(&wrong.to_string()) && msg.contains(&s.root_hash.to_string()), "{msg}");
}

#[test]
fn chain_with_different_layout_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _, s) = sample(dir.path(), false);
    let child = dir.path().join("child.img");
    let parent = ParentRef { root_hash: s.root_hash, path_hint: base.to_string_lossy().into() };
    let inp = ImageHeaderInput { ranges: vec![RamRange::new(0, 0x1000)], ..input(Some(parent)) };
    ImageWriter::create(&child, inp, WriteOptions::default()).unwrap().finish(b"", &[]).unwrap();
    assert!(matches!(open_chain(&child, None).err().unwrap(), Error::ParentLayoutMismatch { .. }));
}

// ---- exports ------------------------------------------------------------

#[test]
fn lime_export_has_a_header_per_range_and_the_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (path, m, _) = sample(dir.path(), false);
    let mut r = ImageReader::open(&path, None).unwrap();
    let mut out = Vec::new();
    let n = write_lime(&mut r, &mut out).unwrap();
    assert_eq!(n as usize, out.len());
    let mut at = 0;
    for rg in ranges() {
        let h = &out[at..at + 32];
        assert_eq!(u32::from_le_bytes(h[0..4].try_into().unwrap()), 0x4C69_4D45);
        assert_eq!(&h[0..4], b"EMiL");
        assert_eq!(u32::from_le_bytes(h[4..8].try_into().unwrap()), 1);
        assert_eq!(u64::from_le_bytes(h[8..16].try_into().unwrap()), rg.start);
        assert_eq!(u64::from_le_bytes(h[16..24].try_into().unwrap()), rg.end() - 1);
        assert_eq!(&h[24..32], &[0u8; 8]);
        at += 32;
        assert!(out[at..at + rg.len as usize] == m.0[rg.start as usize..rg.end() as usize]);
        at += rg.len as usize;
    }
    assert_eq!(at, out.len());
}

#[test]
fn raw_export_is_flat_physical_memory() {
    let dir = tempfile::tempdir().unwrap();
    let (path, m, _) = sample(dir.path(), false);
    let mut ch = open_chain(&path, None).unwrap();
    let mut out = Vec::new();
    write_raw(&mut ch, &mut out).unwrap();
    assert_eq!(out.len(), 0x30_0000);
    assert!(out == m.0);
}

#[test]
fn elf_core_export_parses_back() {
    use object::read::elf::{FileHeader, ProgramHeader};
    use object::{elf, Endianness};
    let dir = tempfile::tempdir().unwrap();
    let (path, m, _) = sample(dir.path(), false);
    let mut r = ImageReader::open(&path, None).unwrap();
    let mut out = Vec::new();
    write_elf_core(&mut r, &mut out).unwrap();

    let hdr = elf::FileHeader64::<Endianness>::parse(out.as_slice()).unwrap();
    let e = hdr.endian().unwrap();
    assert_eq!(hdr.e_type.get(e), elf::ET_CORE);
    assert_eq!(hdr.e_machine.get(e), elf::EM_X86_64);
    let phdrs = hdr.program_headers(e, out.as_slice()).unwrap();
    assert_eq!(phdrs.len(), 1 + ranges().len());
    assert_eq!(phdrs[0].p_type(e), elf::PT_NOTE);
    let mut notes = phdrs[0].notes(e, out.as_slice()).unwrap().unwrap();
    let mut seen = Vec::new();
    while let Some(n) = notes.next().unwrap() {
        seen.push((String::from_utf8_lossy(n.name()).into_owned(), n.n_type(e), n.desc().to_vec()));
    }
    assert_eq!(seen.len(), 4);
    let want = cpus();
    for (i, (name, ty, desc)) in seen[..2].iter().enumerate() {
        assert_eq!((name.as_str(), *ty), ("CORE", elf::NT_PRSTATUS));
        assert_eq!(desc.len(), 336);
        assert_eq!(u32::from_le_bytes(desc[32..36].try_into().unwrap()), i as u32 + 1);
        let reg = |k: usize| u64::from_le_bytes(desc[112 + k * 8..120 + k * 8].try_into().unwrap());
        assert_eq!(reg(10), want[i].rax);
        assert_eq!(reg(16), want[i].rip);
        assert_eq!(reg(17), 0x10);
        assert_eq!(reg(19), want[i].rsp);
    }
    for (i, (name, ty, desc)) in seen[2..].iter().enumerate() {
        assert_eq!((name.as_str(), *ty), ("QEMU", 0));
        assert_eq!(desc.len(), 440);
        assert_eq!(u32::from_le_bytes(desc[0..4].try_into().unwrap()), 1);
        assert_eq!(u32::from_le_bytes(desc[4..8].try_into().unwrap()), 440);
        assert_eq!(u64::from_le_bytes(desc[8..16].try_into().unwrap()), want[i].rax);
        assert_eq!(u64::from_le_bytes(desc[136..144].try_into().unwrap()), want[i].rip);
        // cs segment: selector, limit, flags.
        assert_eq!(u32::from_le_bytes(desc[152..156].try_into().unwrap()), 0x10);
        assert_eq!(u32::from_le_bytes(desc[160..164].try_into().unwrap()), 0x00a0_9b00);
        // cr3 is cr[3].
        assert_eq!(u64::from_le_bytes(desc[392 + 24..392 + 32].try_into().unwrap()), 0x1000);
        assert_eq!(u64::from_le_bytes(desc[432..440].try_into().unwrap()), 0xabc);
    }
    for (ph, rg) in phdrs[1..].iter().zip(ranges()) {
        assert_eq!(ph.p_type(e), elf::PT_LOAD);
        assert_eq!(ph.p_paddr(e), rg.start);
        assert_eq!(ph.p_vaddr(e), rg.start);
        assert_eq!(ph.p_filesz(e), rg.len);
        assert_eq!(ph.p_memsz(e), rg.len);
        let data = ph.data(e, out.as_slice()).unwrap();
        assert!(data == &m.0[rg.start as usize..rg.end() as usize]);
    }
}

#[test]
fn stream_output_reads_back_as_a_file() {
    #[derive(Clone, Default)]
    struct Shared(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);
    impl std::io::Write for Shared {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }
    let out = Shared::default();
    let mut w = ImageWriter::create_stream(Box::new(out.clone()), input(None), opts(Codec::Lz4, Some(key()))).unwrap();
    for g in (0x10_0000u64..0x12_0000).step_by(4096) {
        w.write_pages(g, &page(g, 1)).unwrap();
    }
    let s = w.finish(b"streamed", &cpus()).unwrap();
    assert!(s.path.is_none());
    let bytes = out.0.lock().unwrap().clone();
    assert_eq!(bytes.len() as u64, s.bytes_written);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("s.img");
    std::fs::write(&path, bytes).unwrap();
    let k = key();
    let mut r = ImageReader::open(&path, Some(&k)).unwrap();
    assert_eq!(r.root_hash(), s.root_hash);
    assert_eq!(r.state().unwrap(), b"streamed");
    assert_eq!(r.read_page(0x11_f000).unwrap(), page(0x11_f000, 1));
}

#[test]
fn readers_and_chains_are_send() {
    fn assert_send<T: Send>() {}
    assert_send::<ImageReader>();
    assert_send::<ImageChain>();
}

/// Flips bits all over a small image and cuts it at many lengths: every
/// operation must return an error or correct data, never panic or hang.
#[test]
fn corruption_anywhere_never_panics() {
    let dir = tempfile::tempdir().unwrap();
    let k = key();
    for enc in [false, true] {
        let path = dir.path().join(format!("small-{enc}.img"));
        let inp = ImageHeaderInput { ranges: vec![RamRange::new(0, 0x40000)], ..input(None) };
        let o = WriteOptions { chunk_size: 16 << 10, ..opts(Codec::Lz4, enc.then(key)) };
        let mut w = ImageWriter::create(&path, inp, o).unwrap();
        for g in (0..0x40000u64).step_by(4096) {
            if g % 0x3000 != 0 {
                w.write_pages(g, &page(g, 1)).unwrap();
            }
        }
        w.write_zero(0x1000, 2).unwrap();
        w.finish(b"state", &cpus()).unwrap();
        let good = std::fs::read(&path).unwrap();
        let exercise = |bytes: &[u8]| {
            std::fs::write(&path, bytes).unwrap();
            let Ok(mut r) = ImageReader::open(&path, enc.then_some(&k)) else { return false };
            let mut ok = r.verify().is_ok();
            ok &= r.read_memory(|_, _| Ok(())).is_ok();
            ok &= r.state().is_ok() && r.cpus().is_ok();
            ok &= r.read_page(0x2000).is_ok();
            ok &= write_raw(&mut r, &mut std::io::sink()).is_ok();
            ok
        };
        assert!(exercise(&good));
        let step = (good.len() / 400).max(1);
        for pos in (0..good.len()).step_by(step) {
            let mut b = good.clone();
            b[pos] ^= 0x04;
            // Any flip must be caught somewhere (no silent acceptance).
            assert!(!exercise(&b), "flip at {pos} of {} went unnoticed (enc={enc})", good.len());
        }
        for cut in (0..good.len()).step_by(step * 3) {
            assert!(!exercise(&good[..cut]), "cut at {cut} went unnoticed");
        }
    }
}

/// Writes a plain (codec none) image and its raw export for the format-doc check
/// script, when FERRY_DOC_CHECK_DIR is set.
#[test]
fn write_doc_check_sample() {
    let Ok(dir) = std::env::var("FERRY_DOC_CHECK_DIR") else { return };
    let dir = PathBuf::from(dir);
    let path = dir.join("sample.img");
    let _ = std::fs::remove_file(&path);
    let (_, m) = write_rounds(&path, opts(Codec::None, None), None, None);
    std::fs::write(dir.join("sample.raw"), &m.0).unwrap();
}

#[test]
fn final_chunks_applied_in_any_order_give_the_chain_memory() {
    let dir = tempfile::tempdir().unwrap();
    let base = dir.path().join("base.img");
    let (s0, m0) = write_rounds(&base, opts(Codec::Lz4, None), None, None);
    let top = dir.path().join("top.img");
    let parent = ParentRef { root_hash: s0.root_hash, path_hint: "base.img".into() };
    let (_, m1) = write_rounds(&top, opts(Codec::Zstd { level: 1 }, None), Some(parent), Some(&m0));
    for path in [&base, &top] {
        let want = if path == &base { &m0 } else { &m1 };
        let mut ch = open_chain(path, None).unwrap();
        let n = ch.chunk_count();
        assert!(n > 2);
        let mut got = Model::new();
        let mut written = vec![false; SPACE / PAGE];
        // Reverse order: the extents are disjoint, so order must not matter.
        for i in (0..n).rev() {
            ch.read_final_chunk(i, |gpa, d| {
                for k in 0..d.len() / PAGE {
                    let p = gpa as usize / PAGE + k;
                    assert!(!written[p], "page {p:#x} visited twice");
                    written[p] = true;
                }
                got.set(gpa, d);
                Ok(())
            })
            .unwrap();
        }
        assert!(got.0 == want.0, "final chunks differ from the chain's memory ({})", path.display());
        assert_eq!(ch.final_data_pages(), written.iter().filter(|w| **w).count() as u64);
        assert!(ch.read_final_chunk(n, |_, _| Ok(())).is_err());
    }
    // A corrupt chunk is reported even if none of its pages are final.
    let (_, footer, _) = layout_of(&base);
    flip(&base, footer.chunks[0].offset + 40);
    let mut ch = open_chain(&base, None).unwrap();
    let e = ch.read_final_chunk(0, |_, _| Ok(())).unwrap_err();
    assert!(matches!(e, Error::ChunkHashMismatch { index: 0, .. }), "{e}");
}
