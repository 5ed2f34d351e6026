//! What guest memory is made of: zero pages, duplicate pages (within an image
//! and across images, i.e. what a host sharing identical pages would save),
//! byte entropy and how well pages compress.
//!
//! Each image's final pages are streamed chunk by chunk
//! ([`ImageChain::read_final_chunk`]) on several threads, each with its own
//! chain handle; only a 16-byte hash per non-zero page is kept, never the pages.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_image::{ImageChain, UserKey, PAGE_SIZE};
use serde::Serialize;

use crate::error::{Error, Result};

const PAGE: usize = PAGE_SIZE as usize;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// How [`stats`] samples and runs.
#[derive(Clone, Debug)]
pub struct StatsOptions {
    /// Compress every n-th non-zero page (by page number) with lz4 and zstd; 1 = all.
    pub compress_every: u64,
    /// zstd level for the compressibility estimate.
    pub zstd_level: i32,
    /// Worker threads per image.
    pub threads: usize,
}

impl Default for StatsOptions {
    fn default() -> Self {
        let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).min(8);
        StatsOptions { compress_every: 16, zstd_level: 3, threads }
    }
}

/// Compressibility of the sampled pages, each compressed alone (4 KiB blocks,
/// as a page-granular store or a page-by-page transfer would).
#[derive(Clone, Debug, Default, Serialize)]
pub struct Compressibility {
    /// Non-zero pages compressed.
    pub sampled_pages: u64,
    /// Their bytes.
    pub raw_bytes: u64,
    /// Bytes after lz4 (block format).
    pub lz4_bytes: u64,
    /// Bytes after zstd at `zstd_level`.
    pub zstd_bytes: u64,
    /// raw / lz4 (1.0 when nothing was sampled).
    pub lz4_ratio: f64,
    /// raw / zstd.
    pub zstd_ratio: f64,
}

/// One image's page statistics.
#[derive(Clone, Debug, Serialize)]
pub struct ImageStats {
    /// The image (with its chain).
    pub path: PathBuf,
    /// Pages of guest RAM.
    pub ram_pages: u64,
    /// Pages that are all zero (recorded as zero, never recorded, or zero bytes).
    pub zero_pages: u64,
    /// Non-zero pages.
    pub nonzero_pages: u64,
    /// Distinct contents among the non-zero pages.
    pub unique_nonzero_pages: u64,
    /// Non-zero pages equal to another page of this image (`nonzero - unique`).
    pub duplicate_pages: u64,
    /// Non-zero pages by Shannon entropy of their bytes: bucket i holds i..i+1 bits per byte.
    pub entropy_histogram: [u64; 8],
    /// lz4 and zstd on a sample.
    pub compress: Compressibility,
    /// Non-zero bytes read and analysed.
    pub bytes_analysed: u64,
    /// Wall time for this image.
    pub elapsed_secs: f64,
}

/// Sharing across all the images given: what identical-page merging on one host saves.
#[derive(Clone, Debug, Serialize)]
pub struct Sharing {
    /// Pages over all images.
    pub total_pages: u64,
    /// Distinct page contents over all images (the zero page counts once).
    pub unique_pages: u64,
    /// `total - unique`: pages a host would not need to hold.
    pub pages_saved: u64,
    /// The same in bytes.
    pub bytes_saved: u64,
}

/// What [`stats`] found.
#[derive(Clone, Debug, Serialize)]
pub struct StatsReport {
    /// Per image, in the order given.
    pub images: Vec<ImageStats>,
    /// Across all of them.
    pub sharing: Sharing,
    /// The compression sample step used.
    pub compress_every: u64,
    /// zstd level used.
    pub zstd_level: i32,
    /// Wall time.
    pub elapsed_secs: f64,
}

/// Shannon entropy of `b` in bits per byte.
pub fn entropy(b: &[u8]) -> f64 {
    if b.is_empty() {
        return 0.0;
    }
    // Four tables break the store-to-load dependency of repeated bytes.
    let mut h = [[0u16; 256]; 4];
    let mut it = b.chunks_exact(4);
    let mut tail = [0u32; 256];
    if b.len() <= 4 * usize::from(u16::MAX) {
        for c in &mut it {
            h[0][c[0] as usize] += 1;
            h[1][c[1] as usize] += 1;
            h[2][c[2] as usize] += 1;
            h[3][c[3] as usize] += 1;
        }
        for &x in it.remainder() {
            tail[x as usize] += 1;
        }
    } else {
        for &x in b {
            tail[x as usize] += 1;
        }
    }
    // H = log2(n) - sum(c log2 c) / n; for a page, c log2 c comes from a table.
    let table = (b.len() == PAGE).then(clog_table);
    let mut sum = 0.0;
    for (i, t) in tail.iter().enumerate() {
        let c = t + u32::from(h[0][i]) + u32::from(h[1][i]) + u32::from(h[2][i]) + u32::from(h[3][i]);
        if c > 1 {
            sum += match table {
                Some(t) => t[c as usize],
                None => f64::from(c) * f64::from(c).log2(),
            };
        }
    }
    let n = b.len() as f64;
    (n.log2() - sum / n).max(0.0)
}

/// `c * log2(c)` for every count a page can have.
fn clog_table() -> &'static [f64; PAGE + 1] {
    static T: std::sync::OnceLock<Box<[f64; PAGE + 1]>> = std::sync::OnceLock::new();
    T.get_or_init(|| {
        let mut t = Box::new([0.0; PAGE + 1]);
        for (c, v) in t.iter_mut().enumerate().skip(1) {
            *v = c as f64 * (c as f64).log2();
        }
        t
    })
}

/// Page hashes are BLAKE3 already: their first 8 bytes are a good enough set hash.
#[derive(Default)]
struct PrefixHasher(u64);

impl std::hash::Hasher for PrefixHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        let mut w = [0u8; 8];
        let n = bytes.len().min(8);
        w[..n].copy_from_slice(&bytes[..n]);
        self.0 = self.0.rotate_left(5) ^ u64::from_le_bytes(w);
    }
    fn write_usize(&mut self, _len: usize) {
        // The slice length prefix: the same for every key.
    }
}

type HashSet16 = HashSet<[u8; 16], std::hash::BuildHasherDefault<PrefixHasher>>;

/// What one worker gathered.
#[derive(Default)]
struct Part {
    hashes: Vec<[u8; 16]>,
    hist: [u64; 8],
    comp: Compressibility,
}

fn analyse(path: &Path, key: Option<&UserKey>, opts: &StatsOptions, t: usize, n: usize) -> Result<Part> {
    let mut chain = ImageChain::open(path, key)?;
    let mut part = Part::default();
    let mut zc = zstd::bulk::Compressor::new(opts.zstd_level)
        .map_err(|e| Error::BadLength { len: opts.zstd_level as u64, reason: format!("zstd level: {e}") })?;
    let mut lz = vec![0u8; lz4_flex::block::get_maximum_output_size(PAGE)];
    let mut zs = vec![0u8; zstd::zstd_safe::compress_bound(PAGE)];
    let every = opts.compress_every.max(1);
    for i in (t..chain.chunk_count()).step_by(n) {
        chain.read_final_chunk(i, |gpa, bytes| {
            for (j, p) in bytes.chunks_exact(PAGE).enumerate() {
                if p == &ZERO_PAGE[..] {
                    continue;
                }
                let h = blake3::hash(p);
                part.hashes.push(h.as_bytes()[..16].try_into().expect("16 bytes"));
                part.hist[(entropy(p) as usize).min(7)] += 1;
                if (gpa / PAGE_SIZE + j as u64).is_multiple_of(every) {
                    let l = lz4_flex::block::compress_into(p, &mut lz).unwrap_or(PAGE);
                    let z = zc.compress_to_buffer(p, &mut zs[..]).unwrap_or(PAGE);
                    part.comp.sampled_pages += 1;
                    part.comp.raw_bytes += PAGE as u64;
                    part.comp.lz4_bytes += l as u64;
                    part.comp.zstd_bytes += z as u64;
                }
            }
            Ok(())
        })?;
    }
    Ok(part)
}

fn ratio(raw: u64, c: u64) -> f64 {
    if c == 0 {
        1.0
    } else {
        raw as f64 / c as f64
    }
}

/// Page statistics of each image in `paths` and their sharing across all of them.
pub fn stats(paths: &[PathBuf], key: Option<&UserKey>, opts: &StatsOptions) -> Result<StatsReport> {
    if paths.is_empty() {
        return Err(Error::NoImages);
    }
    let t0 = Instant::now();
    let mut all = HashSet16::default();
    let mut any_zero = false;
    let mut images = Vec::with_capacity(paths.len());
    for path in paths {
        let t1 = Instant::now();
        let chain = ImageChain::open(path, key)?;
        let ram_pages: u64 = chain.ranges().iter().map(|r| r.len / PAGE_SIZE).sum();
        let n = opts.threads.clamp(1, 64).min(chain.chunk_count().max(1));
        drop(chain);
        let parts: Vec<Result<Part>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|t| s.spawn(move || analyse(path, key, opts, t, n))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let mut mine = HashSet16::default();
        let (mut nonzero, mut hist, mut comp) = (0u64, [0u64; 8], Compressibility::default());
        for p in parts {
            let p = p?;
            nonzero += p.hashes.len() as u64;
            for (h, x) in hist.iter_mut().zip(p.hist) {
                *h += x;
            }
            comp.sampled_pages += p.comp.sampled_pages;
            comp.raw_bytes += p.comp.raw_bytes;
            comp.lz4_bytes += p.comp.lz4_bytes;
            comp.zstd_bytes += p.comp.zstd_bytes;
            for h in p.hashes {
                mine.insert(h);
                all.insert(h);
            }
        }
        comp.lz4_ratio = ratio(comp.raw_bytes, comp.lz4_bytes);
        comp.zstd_ratio = ratio(comp.raw_bytes, comp.zstd_bytes);
        let zero_pages = ram_pages.saturating_sub(nonzero);
        any_zero |= zero_pages > 0;
        let unique = mine.len() as u64;
        images.push(ImageStats {
            path: path.clone(),
            ram_pages,
            zero_pages,
            nonzero_pages: nonzero,
            unique_nonzero_pages: unique,
            duplicate_pages: nonzero - unique,
            entropy_histogram: hist,
            compress: comp,
            bytes_analysed: nonzero * PAGE_SIZE,
            elapsed_secs: t1.elapsed().as_secs_f64(),
        });
    }
    let total_pages: u64 = images.iter().map(|i| i.ram_pages).sum();
    let unique_pages = all.len() as u64 + u64::from(any_zero);
    let pages_saved = total_pages.saturating_sub(unique_pages);
    Ok(StatsReport {
        images,
        sharing: Sharing { total_pages, unique_pages, pages_saved, bytes_saved: pages_saved * PAGE_SIZE },
        compress_every: opts.compress_every.max(1),
        zstd_level: opts.zstd_level,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    })
}
