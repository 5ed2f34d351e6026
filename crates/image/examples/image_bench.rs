//! Write and read throughput of ferry images, side by side for every codec,
//! with and without encryption, on semi-compressible guest-like page data.
//!
//! cargo run --release -p ferry-image --example image_bench -- [--mib 1024] [--dir /dev/shm] [--threads 0] [--data mixed|text] [--repeat N]
//!
//! `mixed` (default): 10% zero, 40% text-like, 30% structured, 20% random pages
//! (about 1.9x with lz4). `text`: only text-like pages (highly compressible).
//!
//! Write time runs from `ImageWriter::create` to the end of `finish` (which
//! fsyncs); read time from `ImageReader::open` to the end of `read_memory`
//! with a visitor copying every page into a guest-sized buffer (a restore).

use std::path::PathBuf;
use std::time::Instant;

use ferry_image::{Codec, ImageHeaderInput, ImageReader, ImageWriter, RamRange, UserKey, WriteOptions};

/// Page mix resembling a booted guest: zero, text-like, structured and random pages.
fn make_memory(bytes: usize, text_only: bool) -> Vec<u8> {
    let mut m = vec![0u8; bytes];
    let words: [&[u8]; 8] =
        [b"kernel ", b"struct ", b"page_alloc ", b"0000 ", b"task ", b"\x00\x00\x00\x01", b"ffff8880 ", b"lock "];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let mut rnd = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for (i, p) in m.chunks_mut(4096).enumerate() {
        let kind = if text_only { 1 } else { rnd() % 10 };
        match kind {
            0 => {} // zero page
            1..=4 => {
                // text-like: runs of words
                let mut o = 0;
                while o < p.len() {
                    let w = words[(rnd() % 8) as usize];
                    let n = w.len().min(p.len() - o);
                    p[o..o + n].copy_from_slice(&w[..n]);
                    o += n;
                }
            }
            5..=7 => {
                // structured: small counters and pointers
                for (k, c) in p.chunks_mut(8).enumerate() {
                    let v = if k % 4 == 0 {
                        0xffff_8880_0000_0000 | ((i as u64) << 12) | (k as u64 * 8)
                    } else {
                        (k as u64) ^ (rnd() & 0xff)
                    };
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
            _ => {
                for c in p.chunks_mut(8) {
                    c.copy_from_slice(&rnd().to_le_bytes());
                }
            }
        }
    }
    m
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut mib = 1024usize;
    let mut dir =
        if std::path::Path::new("/dev/shm").is_dir() { PathBuf::from("/dev/shm") } else { std::env::temp_dir() };
    let mut threads = 0usize;
    let mut text_only = false;
    let mut repeat = 1usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--mib" => mib = args.next().ok_or("--mib N")?.parse()?,
            "--dir" => dir = PathBuf::from(args.next().ok_or("--dir D")?),
            "--threads" => threads = args.next().ok_or("--threads N")?.parse()?,
            "--repeat" => repeat = args.next().ok_or("--repeat N")?.parse()?,
            "--data" => text_only = args.next().ok_or("--data mixed|text")? == "text",
            _ => return Err(format!("unknown argument {a}").into()),
        }
    }
    let bytes = mib << 20;
    eprintln!("generating {mib} MiB of page data...");
    let mem = make_memory(bytes, text_only);
    // Touch the restore buffer now so page faults are not charged to the first read.
    let mut restored = vec![1u8; bytes];
    restored.fill(0);
    let key = UserKey::from_bytes(b"bench key file contents")?;
    let gb = bytes as f64 / 1e9;
    println!(
        "{mib} MiB guest ({} data), dir {}, {} cores, encoder threads {}",
        if text_only { "text" } else { "mixed" },
        dir.display(),
        std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
        if threads == 0 { "auto".to_string() } else { threads.to_string() }
    );
    println!(
        "{:<8} {:<4} {:>11} {:>11} {:>10} {:>11} {:>6} {:>9}",
        "codec", "enc", "encode GB/s", "write GB/s", "read GB/s", "verify GB/s", "ratio", "file MiB"
    );
    println!("(encode: writer to a null sink; write: to a file in --dir incl. fsync+rename; read: open + read_memory into RAM; verify: full check; best of {repeat})");
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
        for enc in [false, true] {
            let path = dir.join(format!("ferry-bench-{}.img", std::process::id()));
            let input = ImageHeaderInput {
                vm_config: serde_json::json!({}),
                ranges: vec![RamRange::new(0, bytes as u64)],
                parent: None,
            };
            let opts = WriteOptions { codec, key: enc.then(|| key.clone()), threads, ..WriteOptions::default() };

            // Best of `repeat` runs per measurement: the machine may be shared.
            let (mut et, mut wt, mut rt, mut vt) = (f64::MAX, f64::MAX, f64::MAX, f64::MAX);
            let mut summary = None;
            for _ in 0..repeat {
                // The pipeline alone: the same image bytes, written to a null sink.
                let t = Instant::now();
                let mut w = ImageWriter::create_stream(Box::new(std::io::sink()), input.clone(), opts.clone())?;
                for (i, c) in mem.chunks(2 << 20).enumerate() {
                    w.write_pages((i * (2 << 20)) as u64, c)?;
                }
                w.finish(b"state", &[])?;
                et = et.min(t.elapsed().as_secs_f64());

                // To a file: temp file, fsync, rename.
                let _ = std::fs::remove_file(&path);
                let t = Instant::now();
                let mut w = ImageWriter::create(&path, input.clone(), opts.clone())?;
                for (i, c) in mem.chunks(2 << 20).enumerate() {
                    w.write_pages((i * (2 << 20)) as u64, c)?;
                }
                summary = Some(w.finish(b"state", &[])?);
                wt = wt.min(t.elapsed().as_secs_f64());

                // Restore: open and replay into a guest-sized buffer.
                let t = Instant::now();
                let mut r = ImageReader::open(&path, enc.then_some(&key))?;
                r.read_memory(|gpa, d| {
                    restored[gpa as usize..gpa as usize + d.len()].copy_from_slice(d);
                    Ok(())
                })?;
                rt = rt.min(t.elapsed().as_secs_f64());
                assert!(restored == mem, "restored memory differs");
                restored.fill(0);

                let t = Instant::now();
                ImageReader::open(&path, enc.then_some(&key))?.verify()?;
                vt = vt.min(t.elapsed().as_secs_f64());
            }
            let s = summary.ok_or("--repeat must be at least 1")?;
            std::fs::remove_file(&path)?;
            let name = match codec {
                Codec::None => "none".to_string(),
                Codec::Lz4 => "lz4".to_string(),
                Codec::Zstd { level } => format!("zstd-{level}"),
            };
            println!(
                "{:<8} {:<4} {:>11.2} {:>11.2} {:>10.2} {:>11.2} {:>6.2} {:>9.1}",
                name,
                if enc { "yes" } else { "no" },
                gb / et,
                gb / wt,
                gb / rt,
                gb / vt,
                s.raw_bytes as f64 / s.stored_bytes.max(1) as f64,
                s.bytes_written as f64 / (1 << 20) as f64
            );
        }
    }
    Ok(())
}
