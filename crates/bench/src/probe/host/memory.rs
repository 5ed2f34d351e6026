//! Memory speed of this host: memcpy and the first touch of a fresh page,
//! the two costs under every restore and every incoming migration.

use std::time::Instant;

use anyhow::{bail, Result};

use crate::util::PAGE;

/// Single-thread memcpy speed between buffers that are already populated.
pub(crate) fn memcpy_gb_s() -> f64 {
    let (src, mut dst) = (vec![1u8; 256 << 20], vec![2u8; 16 << 20]);
    let t = Instant::now();
    let mut n = 0usize;
    for _ in 0..4 {
        for c in src.chunks(dst.len()) {
            dst[..c.len()].copy_from_slice(c);
            n += c.len();
            std::hint::black_box(&mut dst);
        }
    }
    n as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Microseconds per page for the first write to fresh anonymous memory: what
/// an eager restore pays for every non-zero page on top of copying it.
pub(crate) fn first_touch_us(len: usize) -> Result<f64> {
    // SAFETY: a private anonymous mapping, unmapped below; nothing else uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap of {} MiB failed: {}", len >> 20, std::io::Error::last_os_error());
    }
    let t = Instant::now();
    for off in (0..len).step_by(PAGE as usize) {
        // SAFETY: off < len, inside the mapping.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(off), 1) };
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / (len as u64 / PAGE) as f64;
    // SAFETY: p..p+len is the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(us)
}
