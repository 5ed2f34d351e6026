//! The codec: lz4 on pages like the test guest's, the other bound of a
//! snapshot's throughput.

use std::time::Instant;

use crate::util::PAGE;

/// LZ4 block compression (as the image writer does it, one chunk at a time) of
/// pages like the test guest's (one 8-byte word per page, the rest zero), on
/// `threads` threads. Returns (input GB/s, compression ratio).
pub(crate) fn lz4_gb_s(threads: usize) -> (f64, f64) {
    let chunk = ferry_image::DEFAULT_CHUNK_SIZE as usize;
    let buf_len = 64usize << 20;
    let mut buf = vec![0u8; buf_len];
    for (i, p) in buf.chunks_mut(PAGE as usize).enumerate() {
        let word = (7u64 << 32) | (0x200 + i as u64);
        p[..8].copy_from_slice(&word.to_le_bytes());
    }
    let per_thread: usize = 1 << 30; // bytes each thread compresses
    let t = Instant::now();
    let out_total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|ti| {
                let buf = &buf;
                s.spawn(move || {
                    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(chunk)];
                    let mut total = 0usize;
                    let chunks = buf_len / chunk;
                    for k in 0..per_thread / chunk {
                        let c = (k + ti * 7) % chunks;
                        total +=
                            lz4_flex::block::compress_into(&buf[c * chunk..(c + 1) * chunk], &mut out).unwrap_or(0);
                    }
                    std::hint::black_box(total)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = t.elapsed().as_secs_f64();
    let input = (per_thread * threads) as f64;
    (input / secs / 1e9, input / out_total.max(1) as f64)
}
