//! What guest memory is made of: zero pages, duplicate pages (within an image
//! and across images, i.e. what a host sharing identical pages would save),
//! byte entropy and how well pages compress.
//!
//! Each image's final pages are streamed chunk by chunk
//! ([`ImageChain::read_final_chunk`]) on several threads, each with its own
//! chain handle; only a fast 64-bit hash and the address of each non-zero page are kept,
//! never the pages. Pages whose fast hashes collide are read again and told apart by BLAKE3.

use std::path::{Path, PathBuf};
use std::time::Instant;

use ferry_image::{ImageChain, UserKey, PAGE_SIZE};
use serde::Serialize;
use xxhash_rust::xxh3::xxh3_64;

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
    let counts = histogram(b);
    // H = log2(n) - sum(c log2 c) / n; for a page, c log2 c comes from a table.
    let table = (b.len() == PAGE).then(clog_table);
    let mut sum = 0.0;
    for &c in &counts {
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

/// How often each byte value occurs in `b` (up to 4 GiB).
fn histogram(b: &[u8]) -> [u32; 256] {
    // Four tables break the store-to-load dependency of repeated bytes; 8-byte loads halve
    // the loads. u32 counters: u16 ones measured a third slower here (this loop is most of
    // `stats`' own work).
    let mut h = [[0u32; 256]; 4];
    let mut it = b.chunks_exact(8);
    for c in &mut it {
        let w = u64::from_le_bytes(c.try_into().expect("8 bytes"));
        h[0][(w & 0xff) as usize] += 1;
        h[1][(w >> 8 & 0xff) as usize] += 1;
        h[2][(w >> 16 & 0xff) as usize] += 1;
        h[3][(w >> 24 & 0xff) as usize] += 1;
        h[0][(w >> 32 & 0xff) as usize] += 1;
        h[1][(w >> 40 & 0xff) as usize] += 1;
        h[2][(w >> 48 & 0xff) as usize] += 1;
        h[3][(w >> 56) as usize] += 1;
    }
    for &x in it.remainder() {
        h[0][x as usize] += 1;
    }
    let mut out = [0u32; 256];
    for (i, o) in out.iter_mut().enumerate() {
        *o = h[0][i] + h[1][i] + h[2][i] + h[3][i];
    }
    out
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

/// One non-zero page as the first pass saw it: a fast hash of its bytes and where it is.
///
/// Why not BLAKE3 of every page: it cost over a quarter of the time of `stats`. A 64-bit
/// xxh3 only proposes duplicates; pages whose xxh3 equals another page's are then read
/// again and told apart by BLAKE3 ([`confirm`]), so the counts are as exact as before
/// and the expensive hash is paid only for candidate duplicates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct PageKey {
    /// xxh3-64 of the page.
    pub hash: u64,
    /// Which image (index into the paths given).
    pub image: u32,
    /// Guest-physical address of the page.
    pub gpa: u64,
}

/// What one worker gathered.
#[derive(Default)]
struct Part {
    keys: Vec<PageKey>,
    hist: [u64; 8],
    comp: Compressibility,
}

fn analyse(path: &Path, image: u32, key: Option<&UserKey>, opts: &StatsOptions, t: usize, n: usize) -> Result<Part> {
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
                let at = gpa + (j * PAGE) as u64;
                part.keys.push(PageKey { hash: xxh3_64(p), image, gpa: at });
                part.hist[(entropy(p) as usize).min(7)] += 1;
                if (at / PAGE_SIZE).is_multiple_of(every) {
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

/// Marks the keys whose fast hash another key shares (candidate duplicates) and returns
/// their indexes; `keys` must be sorted by hash.
fn candidates(keys: &[PageKey]) -> Vec<usize> {
    let mut out = Vec::new();
    let mut i = 0;
    while i < keys.len() {
        let mut j = i + 1;
        while j < keys.len() && keys[j].hash == keys[i].hash {
            j += 1;
        }
        if j - i > 1 {
            out.extend(i..j);
        }
        i = j;
    }
    out
}

/// Longest run of consecutive pages read at once when confirming candidates.
const CONFIRM_RUN: usize = 256;

/// Reads the pages at `gpas` of image `path` again (on `threads` threads, each with its own
/// chain handle, in address order so each chunk is decoded about once) and returns their
/// BLAKE3 (first 16 bytes), in the order given.
fn confirm(path: &Path, key: Option<&UserKey>, gpas: &[u64], threads: usize) -> Result<Vec<[u8; 16]>> {
    if gpas.is_empty() {
        return Ok(Vec::new());
    }
    let mut order: Vec<usize> = (0..gpas.len()).collect();
    order.sort_unstable_by_key(|&i| gpas[i]);
    let sorted: Vec<u64> = order.iter().map(|&i| gpas[i]).collect();
    let gpas = &sorted;
    let n = threads.clamp(1, 64).min(gpas.len().div_ceil(CONFIRM_RUN));
    let per = gpas.len().div_ceil(n);
    let parts: Vec<Result<Vec<[u8; 16]>>> = std::thread::scope(|s| {
        let hs: Vec<_> = gpas
            .chunks(per)
            .map(|g| {
                s.spawn(move || -> Result<Vec<[u8; 16]>> {
                    let mut chain = ImageChain::open(path, key)?;
                    let mut buf = vec![0u8; CONFIRM_RUN * PAGE];
                    let mut out = Vec::with_capacity(g.len());
                    let mut k = 0;
                    while k < g.len() {
                        // A run of consecutive pages, read with one call.
                        let mut e = k + 1;
                        while e < g.len() && e - k < CONFIRM_RUN && g[e] == g[e - 1] + PAGE_SIZE {
                            e += 1;
                        }
                        let b = &mut buf[..(e - k) * PAGE];
                        chain.read_at(g[k], b)?;
                        for p in b.chunks_exact(PAGE) {
                            out.push(blake3::hash(p).as_bytes()[..16].try_into().expect("16 bytes"));
                        }
                        k = e;
                    }
                    Ok(out)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
    });
    let mut out = vec![[0u8; 16]; order.len()];
    let mut at = 0;
    for p in parts {
        for h in p? {
            out[order[at]] = h;
            at += 1;
        }
    }
    Ok(out)
}

/// Distinct page contents per image (`images` of them) and over all: `keys` sorted by hash,
/// `cand` the indexes of the keys that share their hash ([`candidates`]) and `strong` their
/// BLAKE3, by which they are told apart.
pub(crate) fn count_unique(keys: &[PageKey], cand: &[usize], strong: &[[u8; 16]], images: usize) -> (Vec<u64>, u64) {
    let mut per = vec![0u64; images];
    let mut all = 0u64;
    let mut i = 0;
    let mut group: Vec<([u8; 16], u32)> = Vec::new();
    while i < keys.len() {
        let mut j = i + 1;
        while j < keys.len() && keys[j].hash == keys[i].hash {
            j += 1;
        }
        if j - i == 1 {
            per[keys[i].image as usize] += 1;
            all += 1;
        } else {
            group.clear();
            let at = cand.partition_point(|&c| c < i);
            group.extend(strong[at..at + (j - i)].iter().zip(&keys[i..j]).map(|(h, k)| (*h, k.image)));
            group.sort_unstable();
            group.dedup();
            for (g, &(h, img)) in group.iter().enumerate() {
                if g == 0 || group[g - 1].0 != h {
                    all += 1;
                }
                per[img as usize] += 1;
            }
        }
        i = j;
    }
    (per, all)
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
    let mut keys: Vec<PageKey> = Vec::new();
    let mut any_zero = false;
    let mut images = Vec::with_capacity(paths.len());
    for (im, path) in paths.iter().enumerate() {
        let t1 = Instant::now();
        let chain = ImageChain::open(path, key)?;
        let ram_pages: u64 = chain.ranges().iter().map(|r| r.len / PAGE_SIZE).sum();
        let n = opts.threads.clamp(1, 64).min(chain.chunk_count().max(1));
        drop(chain);
        let image = im as u32;
        let parts: Vec<Result<Part>> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..n).map(|t| s.spawn(move || analyse(path, image, key, opts, t, n))).collect();
            hs.into_iter().map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p))).collect()
        });
        let (mut nonzero, mut hist, mut comp) = (0u64, [0u64; 8], Compressibility::default());
        for p in parts {
            let p = p?;
            nonzero += p.keys.len() as u64;
            for (h, x) in hist.iter_mut().zip(p.hist) {
                *h += x;
            }
            comp.sampled_pages += p.comp.sampled_pages;
            comp.raw_bytes += p.comp.raw_bytes;
            comp.lz4_bytes += p.comp.lz4_bytes;
            comp.zstd_bytes += p.comp.zstd_bytes;
            keys.extend(p.keys);
        }
        comp.lz4_ratio = ratio(comp.raw_bytes, comp.lz4_bytes);
        comp.zstd_ratio = ratio(comp.raw_bytes, comp.zstd_bytes);
        let zero_pages = ram_pages.saturating_sub(nonzero);
        any_zero |= zero_pages > 0;
        images.push(ImageStats {
            path: path.clone(),
            ram_pages,
            zero_pages,
            nonzero_pages: nonzero,
            unique_nonzero_pages: 0,
            duplicate_pages: 0,
            entropy_histogram: hist,
            compress: comp,
            bytes_analysed: nonzero * PAGE_SIZE,
            elapsed_secs: t1.elapsed().as_secs_f64(),
        });
    }
    // Duplicates: equal fast hashes, told apart by BLAKE3 of the pages read again.
    keys.sort_unstable_by_key(|k| k.hash);
    let cand = candidates(&keys);
    let mut strong = vec![[0u8; 16]; cand.len()];
    for (im, img) in images.iter_mut().enumerate() {
        let t1 = Instant::now();
        let mine: Vec<usize> = (0..cand.len()).filter(|&p| keys[cand[p]].image as usize == im).collect();
        let gpas: Vec<u64> = mine.iter().map(|&p| keys[cand[p]].gpa).collect();
        for (p, h) in mine.into_iter().zip(confirm(&paths[im], key, &gpas, opts.threads)?) {
            strong[p] = h;
        }
        img.elapsed_secs += t1.elapsed().as_secs_f64();
    }
    let (per, all) = count_unique(&keys, &cand, &strong, paths.len());
    for (img, unique) in images.iter_mut().zip(per) {
        img.unique_nonzero_pages = unique;
        img.duplicate_pages = img.nonzero_pages - unique;
    }
    let total_pages: u64 = images.iter().map(|i| i.ram_pages).sum();
    let unique_pages = all + u64::from(any_zero);
    let pages_saved = total_pages.saturating_sub(unique_pages);
    Ok(StatsReport {
        images,
        sharing: Sharing { total_pages, unique_pages, pages_saved, bytes_saved: pages_saved * PAGE_SIZE },
        compress_every: opts.compress_every.max(1),
        zstd_level: opts.zstd_level,
        elapsed_secs: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn k(hash: u64, image: u32, gpa: u64, strong: Option<u8>) -> (PageKey, Option<u8>) {
        (PageKey { hash, image, gpa }, strong)
    }

    /// Pages whose fast hashes collide but whose contents differ count as distinct; real
    /// duplicates count once per image and once over all images.
    #[test]
    fn fast_hash_collisions_are_told_apart_by_blake3() {
        let mut both = [
            k(7, 0, 0x1000, Some(1)),
            k(7, 0, 0x2000, Some(2)), // same xxh3, other contents
            k(7, 0, 0x3000, Some(1)), // a real duplicate of 0x1000
            k(9, 0, 0x4000, None),
            k(7, 1, 0x1000, Some(2)), // image 1 shares 0x2000's contents
            k(5, 1, 0x5000, None),
        ];
        both.sort_unstable_by_key(|k| k.0.hash);
        let keys: Vec<PageKey> = both.iter().map(|k| k.0).collect();
        let cand = candidates(&keys);
        assert_eq!(cand.len(), 4);
        let strong: Vec<[u8; 16]> = cand.iter().map(|&i| [both[i].1.expect("a candidate"); 16]).collect();
        let (per, all) = count_unique(&keys, &cand, &strong, 2);
        assert_eq!(per, vec![3, 2], "image 0: {{1, 2, 9}}; image 1: {{2, 5}}");
        assert_eq!(all, 4, "contents 1, 2 (twice), 9, 5");
    }

    #[test]
    fn histogram_matches_a_plain_count() {
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        for len in [0usize, 1, 7, 8, 4095, 4096, 4097, 70000, 300_000] {
            let b: Vec<u8> = (0..len)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    (x % 5) as u8 * 50
                })
                .collect();
            let mut want = [0u32; 256];
            for &v in &b {
                want[v as usize] += 1;
            }
            assert_eq!(histogram(&b), want, "{len} bytes");
        }
    }
}
