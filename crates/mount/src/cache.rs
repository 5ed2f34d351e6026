//! `CachedMemory`: guest memory of an image chain read in fixed windows,
//! with a small least-recently-used cache of decoded windows.
//!
//! A FUSE read asks for at most a few hundred KiB; decoding a chunk costs
//! a whole chunk (1 MiB by default). Keeping the last few windows decoded
//! makes sequential and nearby random reads cheap while memory stays bounded
//! (`windows × window_bytes`), whatever the image size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ferry_image::{CpuRegs, MemorySource, RamRange, PAGE_SIZE};
use serde::Serialize;

/// Cache counters, shared with the statistics of the mount.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Window lookups served from the cache.
    pub hits: AtomicU64,
    /// Windows decoded from the image.
    pub misses: AtomicU64,
    /// Window decodes that failed (a corrupt chunk in the window); the read was retried
    /// for exactly the requested bytes.
    pub window_failures: AtomicU64,
}

/// A snapshot of [`CacheCounters`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    /// Window lookups served from the cache.
    pub hits: u64,
    /// Windows decoded from the image.
    pub misses: u64,
    /// Window decodes that failed and were retried for the requested bytes only.
    pub window_failures: u64,
}

impl CacheCounters {
    /// The current values.
    pub fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            window_failures: self.window_failures.load(Ordering::Relaxed),
        }
    }
}

/// One decoded window.
struct Window {
    start: u64,
    data: Vec<u8>,
    last_use: u64,
}

/// A [`MemorySource`] that reads `inner` in windows and keeps up to `capacity` of them.
pub struct CachedMemory<S> {
    inner: S,
    ranges: Vec<RamRange>,
    window_bytes: u64,
    capacity: usize,
    windows: Vec<Window>,
    tick: u64,
    counters: Arc<CacheCounters>,
}

impl<S: MemorySource> CachedMemory<S> {
    /// Wraps `inner`. `window_bytes` is rounded up to whole pages (at least one);
    /// `capacity` 0 disables caching (every read goes to `inner`).
    pub fn new(inner: S, window_bytes: u64, capacity: usize) -> Self {
        let ranges = inner.ram_ranges();
        CachedMemory {
            inner,
            ranges,
            window_bytes: window_bytes.max(PAGE_SIZE).next_multiple_of(PAGE_SIZE),
            capacity,
            windows: Vec::with_capacity(capacity),
            tick: 0,
            counters: Arc::default(),
        }
    }

    /// The counters (shared, live).
    pub fn counters(&self) -> Arc<CacheCounters> {
        Arc::clone(&self.counters)
    }

    /// The wrapped source.
    pub fn inner_mut(&mut self) -> &mut S {
        &mut self.inner
    }

    /// The window holding `gpa`: window-aligned, clipped to the RAM range containing `gpa`.
    fn window_of(&self, gpa: u64) -> Option<(u64, u64)> {
        let r = self.ranges.iter().find(|r| r.start <= gpa && gpa < r.end())?;
        let start = (gpa - gpa % self.window_bytes).max(r.start);
        let end = (gpa - gpa % self.window_bytes).saturating_add(self.window_bytes).min(r.end());
        Some((start, end))
    }

    /// Index of the cached window starting at `start`, decoding it (and evicting the least
    /// recently used one) if needed.
    fn window(&mut self, start: u64, end: u64) -> ferry_image::Result<usize> {
        self.tick += 1;
        if let Some(i) = self.windows.iter().position(|w| w.start == start) {
            self.windows[i].last_use = self.tick;
            self.counters.hits.fetch_add(1, Ordering::Relaxed);
            return Ok(i);
        }
        let mut data = if self.windows.len() >= self.capacity {
            let lru = (0..self.windows.len()).min_by_key(|&i| self.windows[i].last_use).unwrap_or(0);
            std::mem::take(&mut self.windows.swap_remove(lru).data)
        } else {
            Vec::new()
        };
        data.resize((end - start) as usize, 0);
        self.inner.read_into(start, &mut data)?;
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        self.windows.push(Window { start, data, last_use: self.tick });
        Ok(self.windows.len() - 1)
    }
}

impl<S: MemorySource> MemorySource for CachedMemory<S> {
    fn ram_ranges(&self) -> Vec<RamRange> {
        self.ranges.clone()
    }

    fn cpu_regs(&mut self) -> ferry_image::Result<Vec<CpuRegs>> {
        self.inner.cpu_regs()
    }

    fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> ferry_image::Result<()> {
        if self.capacity == 0 {
            return self.inner.read_into(gpa, buf);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let Some((start, end)) = self.window_of(at) else {
                // Outside RAM: let the inner source report it with its own message.
                return self.inner.read_into(at, &mut buf[done..]);
            };
            let k = ((end - at) as usize).min(buf.len() - done);
            match self.window(start, end) {
                Ok(i) => {
                    let from = (at - start) as usize;
                    buf[done..done + k].copy_from_slice(&self.windows[i].data[from..from + k]);
                }
                Err(_) => {
                    // A corrupt chunk somewhere in the window: read exactly the requested
                    // pages, so that only reads touching the bad chunk fail.
                    self.counters.window_failures.fetch_add(1, Ordering::Relaxed);
                    self.inner.read_into(at, &mut buf[done..done + k])?;
                }
            }
            done += k;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Memory with a byte pattern from the address; pages in `bad` fail to read.
    struct Mem {
        bad: Vec<u64>,
        reads: u64,
    }

    impl MemorySource for Mem {
        fn ram_ranges(&self) -> Vec<RamRange> {
            vec![RamRange::new(0, 0x30000), RamRange::new(0x100000, 0x8000)]
        }
        fn cpu_regs(&mut self) -> ferry_image::Result<Vec<CpuRegs>> {
            Ok(vec![])
        }
        fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> ferry_image::Result<()> {
            self.reads += 1;
            let end = gpa + buf.len() as u64;
            if !self.ram_ranges().iter().any(|r| r.start <= gpa && end <= r.end()) {
                return Err(ferry_image::Error::InvalidArgument(format!("{gpa:#x}..{end:#x} outside RAM")));
            }
            if self.bad.iter().any(|&p| p < end && gpa < p + PAGE_SIZE) {
                return Err(ferry_image::Error::InvalidArgument(format!("bad page in {gpa:#x}..{end:#x}")));
            }
            for (i, b) in buf.iter_mut().enumerate() {
                *b = ((gpa + i as u64) >> 12) as u8 ^ (i as u8);
            }
            Ok(())
        }
    }

    fn expect(gpa: u64, len: usize) -> Vec<u8> {
        let mut m = Mem { bad: vec![], reads: 0 };
        let mut v = vec![0; len];
        m.read_into(gpa, &mut v).unwrap();
        v
    }

    #[test]
    fn reads_through_the_cache_equal_direct_reads_and_stay_bounded() {
        let mut c = CachedMemory::new(Mem { bad: vec![], reads: 0 }, 0x10000, 2);
        for (gpa, len) in [(0u64, 0x1000usize), (0x1000, 0x20000), (0xf000, 0x2000), (0x100000, 0x8000), (0, 0x30000)] {
            let mut v = vec![0; len];
            c.read_into(gpa, &mut v).unwrap();
            assert_eq!(v, expect(gpa, len), "{gpa:#x}+{len:#x}");
            assert!(c.windows.len() <= 2);
        }
        // A window in the second range is clipped to it (0x8000 bytes, not 0x10000).
        assert!(c.windows.iter().all(|w| w.data.len() <= 0x10000));
        let before = c.inner.reads;
        let mut v = vec![0; 0x1000];
        c.read_into(0x20000, &mut v).unwrap(); // last window read above: cached
        assert_eq!(c.inner.reads, before);
        assert!(c.counters.snapshot().hits > 0);
    }

    #[test]
    fn a_bad_page_fails_only_the_reads_that_touch_it() {
        let mut c = CachedMemory::new(Mem { bad: vec![0x5000], reads: 0 }, 0x10000, 4);
        let mut v = vec![0; 0x1000];
        // Same window as the bad page, but another page: served by the exact retry.
        c.read_into(0x1000, &mut v).unwrap();
        assert_eq!(v, expect(0x1000, 0x1000));
        assert!(c.read_into(0x5000, &mut v).is_err());
        assert!(c.read_into(0x4000, &mut vec![0; 0x2000]).is_err());
        assert_eq!(c.counters.snapshot().window_failures, 3);
        // Outside RAM: the inner source's error.
        assert!(c.read_into(0x40000, &mut v).is_err());
    }
}
