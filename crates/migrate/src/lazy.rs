//! Lazy restore: the guest runs at once on empty memory registered with
//! userfaultfd (missing-page mode); its first touch of a page is served from
//! the image, and a background thread prefetches the rest.
//!
//! - The **fault handler** reads each fault, takes the aligned window around
//!   it (`FAULT_WINDOW`), reads the window's *final* contents with
//!   [`ImageChain::read_at`] (so a chain's parent and child records are never
//!   applied one over the other: a populated page cannot be overwritten) and
//!   fills it with `UFFDIO_COPY`, all-zero pages with `UFFDIO_ZEROPAGE`.
//! - The **prefetcher** walks the chain chunk by chunk with its own handle
//!   ([`ImageChain::read_final_chunk`]: each page's final contents, once) and
//!   copies in the non-zero pages; all-zero pages are left alone.
//! - Both claim pages in a shared bitmap before filling them, so no page is
//!   filled twice. A fault on a page the other thread has claimed is woken by
//!   that thread's copy.
//! - When the prefetch is done every non-zero page is in place, so the
//!   handler unregisters guest RAM: the pages still missing are zero in the
//!   image and the kernel's ordinary zero fill is right for them. Both
//!   threads are then gone and memory is ordinary.
//! - When the VM stops first, both threads stop (the handler serves faults
//!   until the prefetcher is out, then unregisters so nothing waits forever).
//! - A chunk that fails its check (hash, decryption, decompression) stops
//!   the VM with that error: the guest never sees a page it should not.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_image::{Hash32, ImageChain, UserKey};
use ferry_vmm::memory::GuestRam;
use ferry_vmm::uffd::{self, Uffd};
use ferry_vmm::vm::ExitReason;
use ferry_vmm::Vm;
use serde::Serialize;

use crate::restore::open_twin;
use crate::{Error, Result};

const PAGE: u64 = 4096;
const PAGE_USIZE: usize = PAGE as usize;
/// Bytes filled per fault: the aligned window around the faulting page.
pub const FAULT_WINDOW: u64 = 256 << 10;
/// Zeros for filling all-zero pages that are about to be written.
static ZEROS: [u8; FAULT_WINDOW as usize] = [0; FAULT_WINDOW as usize];
/// How often the fault handler checks whether the VM has stopped.
const STOP_POLL: Duration = Duration::from_millis(50);

/// What a lazy restore did so far.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LazyStats {
    /// Pages whose final contents in the image are data (the rest are zero);
    /// known once the prefetch has started.
    pub data_pages: u64,
    /// Fault events served.
    pub faults: u64,
    /// Pages copied in by the fault handler.
    pub pages_faulted: u64,
    /// Pages mapped as zero by the fault handler.
    pub zero_pages_faulted: u64,
    /// Pages copied in by the prefetcher.
    pub pages_prefetched: u64,
    /// Process start to the first fault being served.
    pub first_fault_ms: Option<f64>,
    /// Mean time to serve a fault (read, decode, copy).
    pub mean_fault_ms: f64,
    /// Longest time to serve a fault.
    pub max_fault_ms: f64,
    /// Prefetch duration, once it is complete.
    pub prefetch_ms: Option<f64>,
    /// Prefetch rate over the bytes it copied, once complete.
    pub prefetch_gb_per_s: Option<f64>,
    /// Process start to all memory being in place and userfaultfd released.
    pub complete_ms: Option<f64>,
    /// Why the lazy restore stopped the VM, if it did.
    pub error: Option<String>,
}

/// One RAM region as the threads see it.
struct Region {
    gpa: u64,
    len: u64,
    host: u64,
    /// Index of the region's first page in the bitmaps.
    first: usize,
}

/// A bitmap that threads set bits in.
pub(crate) struct Bits(Vec<AtomicU64>);

impl Bits {
    pub(crate) fn new(n: usize) -> Self {
        Bits((0..n.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    /// Sets bit `i`; true if this call set it.
    pub(crate) fn claim(&self, i: usize) -> bool {
        let m = 1u64 << (i % 64);
        self.0[i / 64].fetch_or(m, Ordering::AcqRel) & m == 0
    }
    pub(crate) fn get(&self, i: usize) -> bool {
        self.0[i / 64].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }
    /// Sets bits `64*word..64*word+64` to `bits` (ORed in).
    pub(crate) fn or_word(&self, word: usize, bits: u64) {
        self.0[word].fetch_or(bits, Ordering::AcqRel);
    }
    /// Clears bit `i`.
    pub(crate) fn clear(&self, i: usize) {
        self.0[i / 64].fetch_and(!(1u64 << (i % 64)), Ordering::AcqRel);
    }
}

struct FailState {
    vm: Option<Weak<Vm>>,
    error: Option<String>,
}

struct Shared {
    uffd: Uffd,
    /// Set (and notified) when the prefetcher may start: once the VM runs,
    /// so that it does not compete with building it for the CPU.
    go: (Mutex<bool>, std::sync::Condvar),
    path: PathBuf,
    regions: Vec<Region>,
    /// A thread has taken the page to fill.
    claimed: Bits,
    /// The page has been filled.
    filled: Bits,
    stop: AtomicBool,
    prefetch_exited: AtomicBool,
    prefetch_complete: AtomicBool,
    released: AtomicBool,
    fail: Mutex<FailState>,
    process_start: Instant,
    data_pages: AtomicU64,
    faults: AtomicU64,
    pages_faulted: AtomicU64,
    zero_pages_faulted: AtomicU64,
    pages_prefetched: AtomicU64,
    fault_ns: AtomicU64,
    max_fault_ns: AtomicU64,
    first_fault_ns: AtomicU64,
    prefetch_ns: AtomicU64,
    complete_ns: AtomicU64,
}

fn is_zero(p: &[u8]) -> bool {
    p.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

fn nanos(d: Duration) -> u64 {
    d.as_nanos().min(u128::from(u64::MAX)) as u64
}

impl Shared {
    fn since_start(&self) -> u64 {
        nanos(self.process_start.elapsed()).max(1)
    }

    /// Lets the prefetcher start.
    fn go(&self) {
        *self.go.0.lock().unwrap() = true;
        self.go.1.notify_all();
    }

    /// Waits until the prefetcher may start; false if told to stop first.
    fn wait_go(&self) -> bool {
        let mut g = self.go.0.lock().unwrap();
        while !*g {
            if self.stop.load(Ordering::SeqCst) {
                return false;
            }
            g = self.go.1.wait_timeout(g, STOP_POLL).unwrap().0;
        }
        !self.stop.load(Ordering::SeqCst)
    }

    /// Records the first error, stops the VM (if there is one yet) and both threads.
    fn fail(&self, what: String) {
        let mut f = self.fail.lock().unwrap();
        if f.error.is_none() {
            f.error = Some(what.clone());
            if let Some(vm) = f.vm.as_ref().and_then(Weak::upgrade) {
                vm.stop(crash(&what));
            }
        }
        self.stop.store(true, Ordering::SeqCst);
    }

    fn vm_stopped(&self) -> bool {
        let vm = match &self.fail.lock().unwrap().vm {
            None => return false,
            Some(w) => w.upgrade(),
        };
        vm.is_none_or(|vm| vm.status().state == ferry_vmm::RunState::Stopped)
    }

    /// The region and page index of a host address.
    fn locate(&self, addr: u64) -> Option<(&Region, u64)> {
        self.regions.iter().find(|r| addr >= r.host && addr < r.host + r.len).map(|r| (r, (addr - r.host) / PAGE))
    }

    /// Fills pages `first..first+n` of `r` (all claimed by the caller) from `data` or with zeros.
    fn fill(&self, r: &Region, first: u64, n: u64, data: Option<&[u8]>) -> std::io::Result<()> {
        let host = r.host + first * PAGE;
        match data {
            Some(d) => self.uffd.copy(host, d)?,
            None => self.uffd.zeropage(host, n * PAGE)?,
        }
        for p in first..first + n {
            self.filled.claim(r.first + p as usize);
        }
        Ok(())
    }

    /// Unregisters guest RAM: waiting faults retry as ordinary faults.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host, r.len);
        }
        if self.prefetch_complete.load(Ordering::SeqCst) {
            self.complete_ns.store(self.since_start(), Ordering::SeqCst);
        }
    }
}

fn crash(what: &str) -> ExitReason {
    ExitReason::Crash {
        vcpu: 0,
        what: format!("lazy restore could not supply guest memory, so the VM was stopped: {what}"),
        rip: 0,
        insn: vec![],
    }
}

/// Shareable view of whether guest memory is complete: a lazy restore's
/// prefetch or a post-copy's last page. A snapshot or a migration must not
/// start before (unpopulated pages are not yet what the guest sees).
#[derive(Clone)]
pub struct LazyCompletion {
    /// `Some(true)` complete, `Some(false)` it never will be, `None` not yet.
    state: Arc<dyn Fn() -> Option<bool> + Send + Sync>,
}

impl LazyCompletion {
    pub(crate) fn from_fn(state: Arc<dyn Fn() -> Option<bool> + Send + Sync>) -> Self {
        LazyCompletion { state }
    }

    /// Waits up to `timeout` for every page to be in place; true if it is.
    pub fn wait(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(done) = (self.state)() {
                return done;
            }
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }
}

/// The fault handler and prefetcher of a lazily restored VM.
pub struct LazyRestore {
    sh: Arc<Shared>,
    threads: Vec<JoinHandle<()>>,
}

impl LazyRestore {
    /// Registers all of `ram` for missing-page faults and starts the fault
    /// handler (which takes `chain`) and the prefetcher (which opens its own
    /// handle on `path`). Call before any vCPU exists.
    pub(crate) fn start(
        chain: ImageChain,
        path: &Path,
        key: Option<&UserKey>,
        ram: &GuestRam,
        process_start: Instant,
    ) -> Result<LazyRestore> {
        let lazy_err = |what: String| Error::Lazy { path: path.display().to_string(), what };
        let uffd =
            Uffd::new(0).map_err(|e| lazy_err(format!("userfaultfd is needed for lazy memory and failed: {e}")))?;
        let mut regions = Vec::new();
        let mut pages = 0usize;
        for r in ram.regions() {
            uffd.register(r.host as u64, r.len, uffd::MODE_MISSING).map_err(|e| {
                lazy_err(format!("registering guest RAM {:#x}+{:#x} with userfaultfd: {e}", r.gpa, r.len))
            })?;
            regions.push(Region { gpa: r.gpa, len: r.len, host: r.host as u64, first: pages });
            pages += (r.len / PAGE) as usize;
        }
        let root = chain.root_hash();
        let sh = Arc::new(Shared {
            uffd,
            go: (Mutex::new(false), std::sync::Condvar::new()),
            path: path.to_path_buf(),
            regions,
            claimed: Bits::new(pages),
            filled: Bits::new(pages),
            stop: AtomicBool::new(false),
            prefetch_exited: AtomicBool::new(false),
            prefetch_complete: AtomicBool::new(false),
            released: AtomicBool::new(false),
            fail: Mutex::new(FailState { vm: None, error: None }),
            process_start,
            data_pages: AtomicU64::new(0),
            faults: AtomicU64::new(0),
            pages_faulted: AtomicU64::new(0),
            zero_pages_faulted: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            fault_ns: AtomicU64::new(0),
            max_fault_ns: AtomicU64::new(0),
            first_fault_ns: AtomicU64::new(0),
            prefetch_ns: AtomicU64::new(0),
            complete_ns: AtomicU64::new(0),
        });
        let mut me = LazyRestore { sh: sh.clone(), threads: Vec::new() };
        let spawn_err = |e: std::io::Error| lazy_err(format!("starting a thread: {e}"));
        let s = sh.clone();
        me.threads.push(
            std::thread::Builder::new()
                .name("lazy-faults".into())
                .spawn(move || handler(s, chain))
                .map_err(spawn_err)?,
        );
        let s = sh.clone();
        let key = key.cloned();
        let p = path.to_path_buf();
        let prefetch = std::thread::Builder::new()
            .name("lazy-prefetch".into())
            .spawn(move || prefetcher(s, &p, key.as_ref(), root));
        match prefetch {
            Ok(h) => me.threads.push(h),
            Err(e) => {
                // The handler must not wait for a prefetcher that never ran.
                sh.prefetch_exited.store(true, Ordering::SeqCst);
                return Err(spawn_err(e));
            }
        }
        Ok(me)
    }

    /// Hands over the VM, so that a failure can stop it and the threads end
    /// when it stops. The prefetch starts with `start_prefetch`.
    pub(crate) fn attach(&self, vm: &Arc<Vm>) {
        let mut f = self.sh.fail.lock().unwrap();
        f.vm = Some(Arc::downgrade(vm));
        if let Some(e) = &f.error {
            vm.stop(crash(e));
        }
    }

    /// Lets the prefetcher start. Restore does this once the vCPUs are let
    /// go, so that the prefetch does not compete with building the VM.
    pub(crate) fn start_prefetch(&self) {
        self.sh.go();
    }

    /// The error that stopped the lazy restore, if any.
    pub fn error(&self) -> Option<String> {
        self.sh.fail.lock().unwrap().error.clone()
    }

    /// True once every page is in place and userfaultfd is released.
    pub fn is_complete(&self) -> bool {
        self.sh.complete_ns.load(Ordering::SeqCst) != 0
    }

    /// Waits up to `timeout` for every page to be in place; true if it is.
    /// (Until then guest RAM is registered with this restore's userfaultfd,
    /// so e.g. a copy-on-write snapshot cannot register it.)
    pub fn wait_complete(&self, timeout: Duration) -> bool {
        self.completion().wait(timeout)
    }

    /// A handle other threads can keep to wait for the memory to be complete
    /// (a snapshot must not start before: unpopulated pages are not yet zero).
    pub fn completion(&self) -> LazyCompletion {
        let sh = self.sh.clone();
        LazyCompletion::from_fn(Arc::new(move || {
            if sh.complete_ns.load(Ordering::SeqCst) != 0 {
                Some(true)
            } else if sh.stop.load(Ordering::SeqCst) {
                Some(false)
            } else {
                None
            }
        }))
    }

    /// Figures so far.
    pub fn stats(&self) -> LazyStats {
        let s = &self.sh;
        let ms = |ns: u64| ns as f64 / 1e6;
        let opt = |ns: u64| (ns != 0).then(|| ms(ns));
        let faults = s.faults.load(Ordering::Relaxed);
        let prefetch_ns = s.prefetch_ns.load(Ordering::SeqCst);
        let prefetched = s.pages_prefetched.load(Ordering::Relaxed);
        LazyStats {
            data_pages: s.data_pages.load(Ordering::Relaxed),
            faults,
            pages_faulted: s.pages_faulted.load(Ordering::Relaxed),
            zero_pages_faulted: s.zero_pages_faulted.load(Ordering::Relaxed),
            pages_prefetched: prefetched,
            first_fault_ms: opt(s.first_fault_ns.load(Ordering::Relaxed)),
            mean_fault_ms: if faults == 0 { 0.0 } else { ms(s.fault_ns.load(Ordering::Relaxed)) / faults as f64 },
            max_fault_ms: ms(s.max_fault_ns.load(Ordering::Relaxed)),
            prefetch_ms: opt(prefetch_ns),
            prefetch_gb_per_s: (prefetch_ns != 0).then(|| (prefetched * PAGE) as f64 / prefetch_ns as f64),
            complete_ms: opt(s.complete_ns.load(Ordering::SeqCst)),
            error: s.fail.lock().unwrap().error.clone(),
        }
    }

    /// Stops both threads (call after the VM has stopped) and returns the figures.
    pub fn finish(mut self) -> LazyStats {
        self.shutdown();
        self.stats()
    }

    fn shutdown(&mut self) {
        if self.threads.is_empty() {
            return;
        }
        if !self.sh.prefetch_complete.load(Ordering::SeqCst) {
            // Memory is not all in place: a VM still running must not go on without it.
            let vm = self.sh.fail.lock().unwrap().vm.as_ref().and_then(Weak::upgrade);
            if let Some(vm) = vm {
                if vm.status().state != ferry_vmm::RunState::Stopped {
                    vm.stop(crash("the lazy restore was ended while the VM was running"));
                }
            }
        }
        self.sh.stop.store(true, Ordering::SeqCst);
        self.sh.go();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

impl Drop for LazyRestore {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Serves faults until the prefetch is complete (then releases guest RAM)
/// or until told to stop and the prefetcher is out.
fn handler(sh: Arc<Shared>, mut chain: ImageChain) {
    let window = (FAULT_WINDOW / PAGE).max(1);
    let mut buf = vec![0u8; (window * PAGE) as usize];
    // Build the chain's page index now, while the VM is being built, rather
    // than at the first fault (a failure here shows again at that fault).
    if let Some(r) = sh.regions.first() {
        let _ = chain.read_at(r.gpa, &mut buf[..PAGE_USIZE]);
    }
    let mut last_poll = Instant::now();
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            if sh.prefetch_exited.load(Ordering::SeqCst) {
                break;
            }
        } else if sh.prefetch_complete.load(Ordering::SeqCst) {
            break;
        }
        match sh.uffd.next_fault(STOP_POLL.as_millis() as i32) {
            Ok(Some(f)) => {
                let t = Instant::now();
                let write = f.flags & uffd::FLAG_WRITE != 0;
                if let Err(e) = serve(&sh, &mut chain, &mut buf, window, f.address, write) {
                    sh.fail(e);
                }
                let ns = nanos(t.elapsed());
                sh.faults.fetch_add(1, Ordering::Relaxed);
                sh.fault_ns.fetch_add(ns, Ordering::Relaxed);
                sh.max_fault_ns.fetch_max(ns, Ordering::Relaxed);
                let _ = sh.first_fault_ns.compare_exchange(0, sh.since_start(), Ordering::Relaxed, Ordering::Relaxed);
            }
            Ok(None) => {}
            Err(e) => sh.fail(format!("reading userfaultfd events: {e}")),
        }
        if last_poll.elapsed() >= STOP_POLL {
            last_poll = Instant::now();
            if sh.vm_stopped() {
                sh.stop.store(true, Ordering::SeqCst);
            }
        }
    }
    sh.release();
}

/// Fills the window around the faulting address `addr`, the faulting page
/// first. All-zero pages are mapped to the zero page on a read fault, and
/// allocated (copied from zeros) on a write fault, which would otherwise
/// fault again at once to break the zero page's sharing.
fn serve(
    sh: &Shared,
    chain: &mut ImageChain,
    buf: &mut [u8],
    window: u64,
    addr: u64,
    write: bool,
) -> std::result::Result<(), String> {
    let (r, page) = sh.locate(addr).ok_or_else(|| format!("fault at host address {addr:#x}, outside guest RAM"))?;
    let at = |p: u64| format!("guest page {:#x} of {}", r.gpa + p * PAGE, sh.path.display());
    let gi = r.first + page as usize;
    if sh.claimed.get(gi) {
        if !sh.filled.get(gi) {
            // The prefetcher is filling it; its copy wakes the fault.
            return Ok(());
        }
        // Filled already, yet faulting (an earlier fill of its run stopped short):
        // supply it again; a page that is in place stays as it is.
        let b = &mut buf[..PAGE_USIZE];
        chain.read_at(r.gpa + page * PAGE, b).map_err(|e| format!("image: {e}"))?;
        let data = (!is_zero(b)).then_some(&b[..]);
        sh.fill(r, page, 1, data).map_err(|e| format!("{}: {e}", at(page)))?;
        // A fill that finds the page in place does not wake anyone.
        return sh.uffd.wake(r.host + page * PAGE, PAGE).map_err(|e| format!("{}: {e}", at(page)));
    }
    let start = page / window * window;
    let end = (start + window).min(r.len / PAGE);
    let len = ((end - start) * PAGE) as usize;
    chain.read_at(r.gpa + start * PAGE, &mut buf[..len]).map_err(|e| format!("image: {e}"))?;
    let bytes = |p: u64, n: u64| &buf[((p - start) * PAGE) as usize..((p - start + n) * PAGE) as usize];
    // Runs of pages this thread claimed, all zero or all data: (first, count, zero).
    let mut run: Option<(u64, u64, bool)> = None;
    let flush = |run: Option<(u64, u64, bool)>| -> std::result::Result<(), String> {
        let Some((f, n, zero)) = run else { return Ok(()) };
        let data = if zero { write.then(|| &ZEROS[..(n * PAGE) as usize]) } else { Some(bytes(f, n)) };
        sh.fill(r, f, n, data).map_err(|e| format!("{}: {e}", at(f)))?;
        let counter = if zero { &sh.zero_pages_faulted } else { &sh.pages_faulted };
        counter.fetch_add(n, Ordering::Relaxed);
        Ok(())
    };
    for p in (page..end).chain(start..page) {
        if !sh.claimed.claim(r.first + p as usize) {
            flush(run.take())?;
            continue;
        }
        let zero = is_zero(bytes(p, 1));
        run = match run {
            Some((f, n, z)) if z == zero && f + n == p => Some((f, n + 1, z)),
            other => {
                flush(other)?;
                Some((p, 1, zero))
            }
        };
    }
    flush(run)
}

/// Copies in every non-zero page not yet there, chunk by chunk.
fn prefetcher(sh: Arc<Shared>, path: &Path, key: Option<&UserKey>, root: Hash32) {
    // Open now (the image must not change under a running guest), start when the VM is built.
    let r = match open_twin(path, key, root) {
        Ok(chain) if sh.wait_go() => prefetch(&sh, chain),
        Ok(_) => Ok(None),
        Err(e) => Err(e.to_string()),
    };
    match r {
        Ok(Some(t)) => {
            sh.prefetch_ns.store(nanos(t).max(1), Ordering::SeqCst);
            sh.prefetch_complete.store(true, Ordering::SeqCst);
        }
        Ok(None) => {}
        Err(e) => sh.fail(e),
    }
    sh.prefetch_exited.store(true, Ordering::SeqCst);
}

/// How long it took when every chunk was done, `None` when stopped early.
fn prefetch(sh: &Shared, mut chain: ImageChain) -> std::result::Result<Option<Duration>, String> {
    let t = Instant::now();
    sh.data_pages.store(chain.final_data_pages(), Ordering::Relaxed);
    let mut copy_error: Option<String> = None;
    for i in 0..chain.chunk_count() {
        if sh.stop.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let r = chain.read_final_chunk(i, |gpa, d| {
            if let Err(e) = prefetch_extent(sh, gpa, d) {
                copy_error = Some(e);
                return Err(ferry_image::Error::InvalidArgument("stopped".into()));
            }
            Ok(())
        });
        if let Some(e) = copy_error.take() {
            return Err(e);
        }
        r.map_err(|e| format!("image: {e}"))?;
    }
    Ok(Some(t.elapsed()))
}

/// Copies the non-zero pages of one extent that no one has claimed.
fn prefetch_extent(sh: &Shared, gpa: u64, d: &[u8]) -> std::result::Result<(), String> {
    let r = sh
        .regions
        .iter()
        .find(|r| gpa >= r.gpa && gpa + d.len() as u64 <= r.gpa + r.len)
        .ok_or_else(|| format!("image data at {gpa:#x}+{:#x} lies outside guest RAM", d.len()))?;
    let first = (gpa - r.gpa) / PAGE;
    let n = d.len() as u64 / PAGE;
    let mut run: Option<(u64, u64)> = None;
    let flush = |run: Option<(u64, u64)>| -> std::result::Result<(), String> {
        let Some((f, k)) = run else { return Ok(()) };
        let off = ((f - first) * PAGE) as usize;
        sh.fill(r, f, k, Some(&d[off..off + (k * PAGE) as usize]))
            .map_err(|e| format!("guest page {:#x} of {}: {e}", r.gpa + f * PAGE, sh.path.display()))?;
        sh.pages_prefetched.fetch_add(k, Ordering::Relaxed);
        Ok(())
    };
    for p in first..first + n {
        let off = ((p - first) * PAGE) as usize;
        if is_zero(&d[off..off + PAGE_USIZE]) || !sh.claimed.claim(r.first + p as usize) {
            flush(run.take())?;
            continue;
        }
        run = match run {
            Some((f, k)) if f + k == p => Some((f, k + 1)),
            other => {
                flush(other)?;
                Some((p, 1))
            }
        };
    }
    flush(run)
}

#[cfg(test)]
mod tests {
    //! The fault handler and prefetcher against real guest RAM mappings and
    //! real images, without a VM: this thread's reads of guest RAM fault like
    //! a vCPU's would.

    use super::*;
    use ferry_image::{CpuRegs, ImageHeaderInput, ImageWriter, RamRange, WriteOptions};

    const MEM: u64 = 32 << 20;

    /// A test page: its address in the first word, a pattern after it.
    fn page(gpa: u64, round: u8) -> Vec<u8> {
        let mut p = vec![round; PAGE_USIZE];
        p[..8].copy_from_slice(&gpa.to_le_bytes());
        p
    }

    /// Writes an image in two rounds (the second overrides some pages) and
    /// returns its path and the memory it describes.
    fn image(name: &str) -> (PathBuf, Vec<u8>) {
        let path = std::env::temp_dir().join(format!("ferry-lazy-{}-{name}.img", std::process::id()));
        let ranges = ferry_vmm::layout::ram_ranges(MEM).into_iter().map(|(s, l)| RamRange::new(s, l)).collect();
        let input = ImageHeaderInput { vm_config: serde_json::json!({}), ranges, parent: None };
        let opts = WriteOptions { chunk_size: 256 << 10, threads: 1, ..Default::default() };
        let mut w = ImageWriter::create(&path, input, opts).unwrap();
        let mut model = vec![0u8; MEM as usize];
        // Round 1: 8 MiB from 1 MiB on, every third page left zero.
        for g in (0x10_0000..0x90_0000u64).step_by(PAGE_USIZE) {
            if !(g / PAGE).is_multiple_of(3) {
                let p = page(g, 1);
                w.write_pages(g, &p).unwrap();
                model[g as usize..][..PAGE_USIZE].copy_from_slice(&p);
            }
        }
        // Round 2: rewrite every 7th page, and zero a run that had data.
        for g in (0x10_0000..0x90_0000u64).step_by(PAGE_USIZE * 7) {
            let p = page(g, 2);
            w.write_pages(g, &p).unwrap();
            model[g as usize..][..PAGE_USIZE].copy_from_slice(&p);
        }
        w.write_pages(0x20_0000, &vec![0u8; 4 * PAGE_USIZE]).unwrap();
        model[0x20_0000..0x20_4000].fill(0);
        w.finish(b"{}", &[CpuRegs::default()]).unwrap();
        (path, model)
    }

    fn nonzero_pages(model: &[u8]) -> u64 {
        model.chunks(PAGE_USIZE).filter(|p| !is_zero(p)).count() as u64
    }

    fn start(path: &Path, ram: &GuestRam) -> Option<LazyRestore> {
        if Uffd::new(0).is_err() {
            eprintln!("userfaultfd unavailable; skipping");
            return None;
        }
        let chain = ImageChain::open(path, None).unwrap();
        Some(LazyRestore::start(chain, path, None, ram, Instant::now()).unwrap())
    }

    #[test]
    fn faults_alone_bring_in_the_final_contents() {
        let (path, model) = image("faults");
        let ram = GuestRam::new(MEM).unwrap();
        let Some(lazy) = start(&path, &ram) else { return };
        // No prefetch: every page read below is served by the fault handler.
        for r in ram.regions() {
            let got = r.as_slice();
            let want = &model[r.gpa as usize..(r.gpa + r.len) as usize];
            assert!(got == want, "region {:#x}: memory differs from the image", r.gpa);
        }
        // (The counters are final once the handler has stopped: a copy wakes the reader before it counts.)
        let s = lazy.finish();
        assert!(s.faults > 0 && s.faults <= MEM / FAULT_WINDOW, "{s:?}");
        assert_eq!(s.pages_faulted, nonzero_pages(&model), "{s:?}");
        assert_eq!(s.pages_faulted + s.zero_pages_faulted, MEM / PAGE, "{s:?}");
        assert_eq!(s.pages_prefetched, 0);
        assert!(s.error.is_none() && s.complete_ms.is_none(), "{s:?}");
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn prefetch_completes_and_releases_memory() {
        let (path, model) = image("prefetch");
        let ram = GuestRam::new(MEM).unwrap();
        let Some(lazy) = start(&path, &ram) else { return };
        // A few faults race the prefetcher.
        let first = ram.regions()[0];
        assert_eq!(first.as_slice()[0x40_1000..0x40_1008], model[0x40_1000..0x40_1008]);
        lazy.start_prefetch();
        assert!(lazy.wait_complete(Duration::from_secs(30)), "{:?}", lazy.stats());
        let s = lazy.finish();
        assert!(s.error.is_none(), "{s:?}");
        assert_eq!(s.pages_prefetched + s.pages_faulted, nonzero_pages(&model), "each non-zero page once: {s:?}");
        assert!(s.prefetch_ms.is_some() && s.complete_ms.is_some(), "{s:?}");
        // Userfaultfd is gone: the rest reads as ordinary memory.
        for r in ram.regions() {
            assert!(r.as_slice() == &model[r.gpa as usize..(r.gpa + r.len) as usize]);
        }
        let _ = std::fs::remove_file(path);
    }

    #[test]
    fn corrupt_chunk_is_reported_and_nothing_waits_forever() {
        let (path, _) = image("corrupt");
        let mut b = std::fs::read(&path).unwrap();
        // Inside the third chunk record.
        let at = b.windows(4).enumerate().filter(|(_, w)| w == b"FCHK").nth(2).unwrap().0 + 40;
        b[at] ^= 0x10;
        std::fs::write(&path, b).unwrap();
        let ram = GuestRam::new(MEM).unwrap();
        let Some(lazy) = start(&path, &ram) else { return };
        lazy.start_prefetch();
        // Reading everything must end: pages come in, or userfaultfd is released after the failure.
        for r in ram.regions() {
            for p in r.as_slice().chunks(PAGE_USIZE) {
                std::hint::black_box(p[0]);
            }
        }
        let s = lazy.finish();
        let e = s.error.expect("the corrupt chunk is reported");
        assert!(e.contains("chunk") && e.contains(path.to_str().unwrap()), "{e}");
        assert!(s.complete_ms.is_none());
        let _ = std::fs::remove_file(path);
    }
}
