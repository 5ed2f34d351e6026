//! `CachedMemory`: guest memory of an image chain read in fixed windows,
//! with a small least-recently-used cache of decoded windows.
//!
//! A FUSE read asks for at most a few hundred KiB; decoding a chunk costs
//! a whole chunk (1 MiB by default). Keeping the last few windows decoded
//! makes sequential and nearby random reads cheap while memory stays bounded
//! (`windows × window_bytes`), whatever the image size.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;

use ferry_image::{CpuRegs, MemorySource, RamRange, PAGE_SIZE};
use serde::Serialize;

/// Cache counters, shared with the statistics of the mount.
#[derive(Debug, Default)]
pub struct CacheCounters {
    /// Window lookups served from the cache.
    pub hits: AtomicU64,
    /// Windows decoded from the image on the reading thread.
    pub misses: AtomicU64,
    /// Windows decoded ahead by the prefetch thread.
    pub prefetched: AtomicU64,
    /// Window decodes that failed (a corrupt chunk in the window); the read was retried
    /// for exactly the requested bytes.
    pub window_failures: AtomicU64,
}

/// A snapshot of [`CacheCounters`].
#[derive(Clone, Copy, Debug, Default, Serialize, PartialEq, Eq)]
pub struct CacheStats {
    /// Window lookups served from the cache.
    pub hits: u64,
    /// Windows decoded from the image on the reading thread.
    pub misses: u64,
    /// Windows decoded ahead by the prefetch thread.
    pub prefetched: u64,
    /// Window decodes that failed and were retried for the requested bytes only.
    pub window_failures: u64,
}

impl CacheCounters {
    /// The current values.
    pub fn snapshot(&self) -> CacheStats {
        CacheStats {
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            prefetched: self.prefetched.load(Ordering::Relaxed),
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

/// The decoded windows, shared by the reading thread and the prefetch thread.
struct Store {
    windows: Vec<Window>,
    tick: u64,
    capacity: usize,
    /// The window the prefetch thread is decoding, so the reader waits for it instead of
    /// decoding it a second time.
    in_flight: Option<u64>,
}

impl Store {
    fn contains(&self, start: u64) -> bool {
        self.windows.iter().any(|w| w.start == start)
    }

    /// Copies `dst.len()` bytes at `from` within the window starting at `start`, if cached.
    fn copy_out(&mut self, start: u64, from: usize, dst: &mut [u8]) -> bool {
        self.tick += 1;
        match self.windows.iter_mut().find(|w| w.start == start) {
            Some(w) => {
                w.last_use = self.tick;
                dst.copy_from_slice(&w.data[from..from + dst.len()]);
                true
            }
            None => false,
        }
    }

    /// A buffer for a new window: the least recently used one's when the cache is full.
    fn take_buffer(&mut self) -> Vec<u8> {
        if self.windows.len() >= self.capacity && !self.windows.is_empty() {
            let lru = (0..self.windows.len()).min_by_key(|&i| self.windows[i].last_use).unwrap_or(0);
            std::mem::take(&mut self.windows.swap_remove(lru).data)
        } else {
            Vec::new()
        }
    }

    /// Adds a decoded window (unless another thread already did).
    fn insert(&mut self, start: u64, data: Vec<u8>) {
        if self.capacity == 0 || self.contains(start) {
            return;
        }
        if self.windows.len() >= self.capacity {
            drop(self.take_buffer());
        }
        self.tick += 1;
        self.windows.push(Window { start, data, last_use: self.tick });
    }
}

/// A [`MemorySource`] that reads `inner` in windows and keeps up to `capacity` of them;
/// optionally a second source on its own thread decodes the next window ahead of a
/// sequential reader.
pub struct CachedMemory<S> {
    inner: S,
    ranges: Vec<RamRange>,
    window_bytes: u64,
    capacity: usize,
    store: Arc<(Mutex<Store>, Condvar)>,
    counters: Arc<CacheCounters>,
    /// The window served last (to recognise sequential reading).
    last_window: Option<u64>,
    prefetch: Option<SyncSender<(u64, u64)>>,
    worker: Option<JoinHandle<()>>,
}

fn lock(store: &(Mutex<Store>, Condvar)) -> std::sync::MutexGuard<'_, Store> {
    store.0.lock().unwrap_or_else(|p| p.into_inner())
}

/// Longest a reader waits for the prefetch thread to finish a window it is decoding.
const IN_FLIGHT_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

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
            store: Arc::new((
                Mutex::new(Store { windows: Vec::with_capacity(capacity), tick: 0, capacity, in_flight: None }),
                Condvar::new(),
            )),
            counters: Arc::default(),
            last_window: None,
            prefetch: None,
            worker: None,
        }
    }

    /// Decodes ahead with `other` (a second handle on the same memory) on a thread of its
    /// own: when reads go from one window to the next, the window after is decoded while
    /// the caller is busy with this one. A failed prefetch is dropped silently; the read
    /// that needs the window then decodes it and reports the error.
    pub fn with_prefetch<P: MemorySource + Send + 'static>(mut self, mut other: P) -> std::io::Result<Self> {
        if self.capacity < 2 {
            return Ok(self);
        }
        let (tx, rx) = sync_channel::<(u64, u64)>(2);
        let (store, counters) = (Arc::clone(&self.store), Arc::clone(&self.counters));
        let worker = std::thread::Builder::new().name("ferry-prefetch".into()).spawn(move || {
            for (start, end) in rx {
                let mut buf = {
                    let mut st = lock(&store);
                    if st.contains(start) {
                        continue;
                    }
                    st.in_flight = Some(start);
                    st.take_buffer()
                };
                buf.resize((end - start) as usize, 0);
                let ok = other.read_into(start, &mut buf).is_ok();
                let mut st = lock(&store);
                st.in_flight = None;
                if ok && !st.contains(start) {
                    st.insert(start, buf);
                    counters.prefetched.fetch_add(1, Ordering::Relaxed);
                }
                drop(st);
                store.1.notify_all();
            }
        })?;
        self.prefetch = Some(tx);
        self.worker = Some(worker);
        Ok(self)
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

    /// Fills `dst` from the window `start..end` at `at`, decoding the window on a miss.
    fn read_window(&mut self, start: u64, end: u64, at: u64, dst: &mut [u8]) -> ferry_image::Result<()> {
        let from = (at - start) as usize;
        let mut data = {
            let mut st = lock(&self.store);
            let deadline = std::time::Instant::now() + IN_FLIGHT_WAIT;
            while st.in_flight == Some(start) {
                let left = deadline.saturating_duration_since(std::time::Instant::now());
                if left.is_zero() {
                    break;
                }
                st = self.store.1.wait_timeout(st, left).unwrap_or_else(|p| p.into_inner()).0;
            }
            if st.copy_out(start, from, dst) {
                self.counters.hits.fetch_add(1, Ordering::Relaxed);
                return Ok(());
            }
            st.take_buffer()
        };
        data.resize((end - start) as usize, 0);
        self.inner.read_into(start, &mut data)?;
        self.counters.misses.fetch_add(1, Ordering::Relaxed);
        dst.copy_from_slice(&data[from..from + dst.len()]);
        lock(&self.store).insert(start, data);
        Ok(())
    }

    /// Asks the prefetch thread for the window after `start..end` when reading is sequential.
    fn maybe_prefetch(&mut self, start: u64, end: u64) {
        let sequential =
            self.last_window.is_some_and(|prev| prev < start && self.window_of(start - 1).map(|w| w.0) == Some(prev));
        if self.last_window != Some(start) {
            self.last_window = Some(start);
            if sequential {
                // Two windows ahead; never wait: a full queue means the thread is behind.
                let next = self.window_of(end);
                let after = next.and_then(|n| self.window_of(n.1));
                if let Some(tx) = &self.prefetch {
                    for w in [next, after].into_iter().flatten() {
                        let _ = tx.try_send(w);
                    }
                }
            }
        }
    }
}

impl<S> Drop for CachedMemory<S> {
    fn drop(&mut self) {
        // Closing the channel ends the prefetch thread after at most one window.
        self.prefetch = None;
        if let Some(w) = self.worker.take() {
            let _ = w.join();
        }
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
            if self.read_window(start, end, at, &mut buf[done..done + k]).is_err() {
                // A corrupt chunk somewhere in the window: read exactly the requested
                // pages, so that only reads touching the bad chunk fail.
                self.counters.window_failures.fetch_add(1, Ordering::Relaxed);
                self.inner.read_into(at, &mut buf[done..done + k])?;
            }
            self.maybe_prefetch(start, end);
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
            assert!(lock(&c.store).windows.len() <= 2);
        }
        // A window in the second range is clipped to it (0x8000 bytes, not 0x10000).
        assert!(lock(&c.store).windows.iter().all(|w| w.data.len() <= 0x10000));
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

    #[test]
    fn sequential_reads_are_decoded_ahead_on_the_prefetch_thread() {
        let c = CachedMemory::new(Mem { bad: vec![], reads: 0 }, 0x10000, 4);
        let mut c = c.with_prefetch(Mem { bad: vec![], reads: 0 }).unwrap();
        let mut v = vec![0; 0x8000];
        for gpa in [0u64, 0x8000, 0x10000] {
            c.read_into(gpa, &mut v).unwrap();
            assert_eq!(v, expect(gpa, 0x8000));
        }
        // Going from window 0 to window 1 asked for window 2; wait (bounded) for it.
        let t = std::time::Instant::now();
        while c.counters.snapshot().prefetched == 0 {
            assert!(t.elapsed() < std::time::Duration::from_secs(10), "nothing prefetched");
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let before = c.inner.reads;
        c.read_into(0x20000, &mut v).unwrap();
        assert_eq!(v, expect(0x20000, 0x8000));
        assert_eq!(c.inner.reads, before, "window 2 came from the prefetch thread");
        // Random access does not prefetch: 0x100000's window is not followed by a request.
        let n = c.counters.snapshot().prefetched;
        c.read_into(0x100000, &mut v).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        assert_eq!(c.counters.snapshot().prefetched, n);
    }
}
