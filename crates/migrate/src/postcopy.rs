//! Post-copy: the guest resumes at the destination before all of its memory
//! is there; a page it touches first is fetched from the source on its own
//! stream (the fault stream), while the source pushes the rest in the
//! background on the main stream (QEMU's postcopy-preempt shape).
//!
//! **Which pages.** At the switch-over the source sends a bitmap of the
//! pages the destination must not trust (`Needed`): every populated page in
//! pure post-copy, the final dirty set in hybrid. The destination discards
//! those pages (`MADV_DONTNEED`) and registers guest RAM with userfaultfd
//! in missing mode. A fault on a needed page asks the source for its
//! aligned 64 KiB window; a fault on any other missing page is a page that
//! is zero on both sides and is mapped as zero here, without asking.
//!
//! **Who fills a page.** The push receiver and the fault-stream receiver
//! claim each page in a shared bitmap before `UFFDIO_COPY`, so a page is
//! filled once and a late duplicate is dropped; a vCPU waiting on a page
//! the other thread claimed is woken by that copy.
//!
//! **Done.** When the source says `PushDone` and every needed page is in
//! place, guest RAM is unregistered (memory is ordinary again) and the
//! destination says `Complete` with its figures; only then may the source
//! drop its copy of the guest.
//!
//! **Lost link.** The destination keeps every page it has and reports
//! `postcopy-paused`; vCPUs that touch a missing page wait. A new
//! connection with `Resume` lists the pages still missing and the source
//! pushes them (see [`crate::migration`]). A commit settled over a new
//! connection (its `Go` or `Running` was lost) starts its page streams the
//! same way.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_vmm::memory::GuestRam;
use ferry_vmm::uffd::{self, Uffd};
use serde::Serialize;

use crate::lazy::Bits;
use crate::transport::{TransportReader, TransportWriter};
use crate::wire::{check_ram_range, FrameReader, FrameWriter, Message, PostcopyFigures, MAX_NEEDED_PAGES, PAGE};

const PAGE_USIZE: usize = PAGE as usize;
/// Pages asked for per remote fault: the aligned window around the fault.
pub const FAULT_WINDOW_PAGES: u64 = 16;
/// How often the fault handler looks at its stop flag.
const POLL: Duration = Duration::from_millis(50);

/// Where the destination's post-copy is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum PostcopyPhase {
    /// Pages are arriving; the guest runs.
    Active,
    /// The link to the source was lost: pages here are kept, the guest's
    /// vCPUs wait on missing pages until a resume.
    Paused,
    /// Every page is in place.
    Completed,
    /// Post-copy failed for good (bad data from the source): the VM was stopped.
    Failed,
}

/// One RAM region as the threads see it.
struct Region {
    gpa: u64,
    len: u64,
    host: u64,
    /// Index of the region's first page in the bitmaps.
    first: usize,
}

/// The destination's post-copy state, shared by its threads.
struct Dest {
    uffd: Uffd,
    regions: Vec<Region>,
    ranges: Vec<(u64, u64)>,
    /// Pages whose contents must come from the source.
    needed: Bits,
    needed_total: u64,
    /// A thread has taken the page to fill it.
    claimed: Bits,
    /// The page is in place.
    filled: Bits,
    /// The page was asked for on the fault stream.
    requested: Bits,
    needed_filled: AtomicU64,
    /// The fault stream's sending half, while the link is up.
    fault_tx: Mutex<Option<FrameWriter<TransportWriter>>>,
    /// Remote faults not yet served: page index → when the vCPU started waiting.
    pending: Mutex<HashMap<usize, Instant>>,
    pending_n: AtomicU64,
    waits_ms: Mutex<Vec<f64>>,
    faults: AtomicU64,
    requests: AtomicU64,
    pages_requested: AtomicU64,
    pages_pushed: AtomicU64,
    phase: Mutex<(PostcopyPhase, Option<String>)>,
    phase_cv: Condvar,
    stop: AtomicBool,
    released: AtomicBool,
    resumed_at: Mutex<Option<Instant>>,
    done_ms: Mutex<Option<f64>>,
    resumes: AtomicU32,
    /// Which link the receivers belong to: a receiver of an old link that
    /// fails late must not pause the new one.
    generation: AtomicU32,
    /// The guest, once it runs here: paused while the link is lost.
    vm: Mutex<Option<std::sync::Weak<ferry_vmm::Vm>>>,
    /// This side paused the guest for a lost link (and resumes it with the link).
    paused_guest: AtomicBool,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn is_zero(p: &[u8]) -> bool {
    p.chunks(64).all(|c| c.iter().fold(0u8, |a, &b| a | b) == 0)
}

impl Dest {
    fn locate(&self, addr: u64) -> Option<(&Region, u64)> {
        self.regions.iter().find(|r| addr >= r.host && addr < r.host + r.len).map(|r| (r, (addr - r.host) / PAGE))
    }

    fn set_phase(&self, phase: PostcopyPhase, why: Option<String>) {
        if phase == PostcopyPhase::Failed {
            eprintln!("ferry: post-copy failed: {}", why.as_deref().unwrap_or("?"));
        }
        let mut p = self.phase.lock().unwrap();
        // Completed and Failed are final.
        if matches!(p.0, PostcopyPhase::Completed | PostcopyPhase::Failed) {
            return;
        }
        *p = (phase, why);
        self.phase_cv.notify_all();
    }

    fn phase(&self) -> PostcopyPhase {
        self.phase.lock().unwrap().0
    }

    /// Serves one fault event.
    fn on_fault(&self, addr: u64) -> Result<(), String> {
        let (r, page) =
            self.locate(addr).ok_or_else(|| format!("fault at host address {addr:#x}, outside guest RAM"))?;
        let gi = r.first + page as usize;
        let host = r.host + page * PAGE;
        if self.filled.get(gi) {
            return self.uffd.wake(host, PAGE).map_err(|e| e.to_string());
        }
        if !self.needed.get(gi) {
            // Zero on both sides: map it here without asking.
            if self.claimed.claim(gi) {
                self.uffd.zeropage(host, PAGE).map_err(|e| format!("guest page {:#x}: {e}", r.gpa + page * PAGE))?;
                self.filled.claim(gi);
            }
            return Ok(());
        }
        self.faults.fetch_add(1, Ordering::Relaxed);
        {
            let mut p = self.pending.lock().unwrap();
            if let std::collections::hash_map::Entry::Vacant(v) = p.entry(gi) {
                v.insert(Instant::now());
                self.pending_n.fetch_add(1, Ordering::SeqCst);
            }
        }
        if self.requested.claim(gi) {
            let start = page / FAULT_WINDOW_PAGES * FAULT_WINDOW_PAGES;
            let end = (start + FAULT_WINDOW_PAGES).min(r.len / PAGE);
            for p in start..end {
                if self.needed.get(r.first + p as usize) {
                    self.requested.claim(r.first + p as usize);
                }
            }
            self.request(r.gpa + start * PAGE, (end - start) as u32);
        }
        // Filled between the first look and the pending entry: nobody else will wake it.
        if self.filled.get(gi) {
            self.settle(gi);
            self.uffd.wake(host, PAGE).map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    /// Asks the source for pages; a request lost with the link is asked again on resume.
    fn request(&self, gpa: u64, npages: u32) {
        let mut tx = self.fault_tx.lock().unwrap();
        if let Some(w) = tx.as_mut() {
            let ok = w.send(&Message::PageRequest { gpa, npages }).and_then(|_| w.flush());
            if ok.is_ok() {
                self.requests.fetch_add(1, Ordering::Relaxed);
            } else {
                *tx = None;
            }
        }
    }

    /// Records the wait of a remote fault on page `gi` that is now served.
    fn settle(&self, gi: usize) {
        if self.pending_n.load(Ordering::SeqCst) == 0 {
            return;
        }
        if let Some(t) = self.pending.lock().unwrap().remove(&gi) {
            self.pending_n.fetch_sub(1, Ordering::SeqCst);
            self.waits_ms.lock().unwrap().push(ms(t.elapsed()));
        }
    }

    /// Places pages that arrived (`data` None: zero pages), skipping any
    /// another thread has claimed. `pushed` says which stream they came on.
    fn place(&self, gpa: u64, npages: u64, data: Option<&[u8]>, pushed: bool) -> Result<(), String> {
        let len = npages.checked_mul(PAGE).ok_or("page count overflows")?;
        let (idx, off) = check_ram_range(&self.ranges, gpa, len)
            .ok_or_else(|| format!("pages {gpa:#x}+{len:#x} lie outside guest RAM"))?;
        let r = &self.regions[idx];
        let first = off / PAGE;
        let mut run: Option<(u64, u64)> = None;
        let flush = |run: Option<(u64, u64)>| -> Result<(), String> {
            let Some((f, n)) = run else { return Ok(()) };
            let host = r.host + f * PAGE;
            let fill = |at: u64, k: u64| match data {
                Some(d) => {
                    let o = ((at - first) * PAGE) as usize;
                    self.uffd.copy(r.host + at * PAGE, &d[o..o + (k * PAGE) as usize])
                }
                None => self.uffd.zeropage(r.host + at * PAGE, k * PAGE),
            };
            let res = match fill(f, n) {
                // A short fill (a page of the run is there already): page by page.
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => (f..f + n).try_for_each(|p| fill(p, 1)),
                other => other,
            };
            let _ = host;
            res.map_err(|e| format!("guest page {:#x}: {e}", r.gpa + f * PAGE))?;
            let mut needed = 0;
            for p in f..f + n {
                let gi = r.first + p as usize;
                // Counted by whoever marks it first, so a page filled twice
                // (after a resume) cannot make the count run ahead.
                if self.filled.claim(gi) && self.needed.get(gi) {
                    needed += 1;
                }
                self.settle(gi);
            }
            self.needed_filled.fetch_add(needed, Ordering::SeqCst);
            let counter = if pushed { &self.pages_pushed } else { &self.pages_requested };
            counter.fetch_add(n, Ordering::Relaxed);
            Ok(())
        };
        for p in first..first + npages {
            // Only needed pages come from the source; the others are right here
            // already (or zero, mapped on their first fault).
            let gi = r.first + p as usize;
            if !self.needed.get(gi) || !self.claimed.claim(gi) {
                flush(run.take())?;
                continue;
            }
            run = match run {
                Some((f, n)) if f + n == p => Some((f, n + 1)),
                other => {
                    flush(other)?;
                    Some((p, 1))
                }
            };
        }
        flush(run)
    }

    /// Unregisters guest RAM: memory is ordinary from here on.
    fn release(&self) {
        if self.released.swap(true, Ordering::SeqCst) {
            return;
        }
        for r in &self.regions {
            let _ = self.uffd.unregister(r.host, r.len);
        }
    }

    fn complete(&self) -> bool {
        self.needed_filled.load(Ordering::SeqCst) >= self.needed_total
    }

    fn figures(&self) -> PostcopyFigures {
        let mut w = self.waits_ms.lock().unwrap().clone();
        w.sort_by(|a, b| a.total_cmp(b));
        let q = |f: f64| if w.is_empty() { 0.0 } else { w[((w.len() - 1) as f64 * f).round() as usize] };
        let pushed = self.pages_pushed.load(Ordering::Relaxed);
        let resumed = *self.resumed_at.lock().unwrap();
        let done = *self.done_ms.lock().unwrap();
        let span_ms = done.or_else(|| resumed.map(|t| ms(t.elapsed()))).unwrap_or(0.0);
        PostcopyFigures {
            faults: self.faults.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            pages_requested: self.pages_requested.load(Ordering::Relaxed),
            pages_pushed: pushed,
            blocked_ms_total: w.iter().sum(),
            blocked_ms_median: q(0.5),
            blocked_ms_p99: q(0.99),
            blocked_ms_max: w.last().copied().unwrap_or(0.0),
            postcopy_ms: span_ms,
            push_mb_per_s: if span_ms > 0.0 { (pushed * PAGE) as f64 / span_ms / 1e3 } else { 0.0 },
            resumes: self.resumes.load(Ordering::Relaxed),
        }
    }
}

/// The destination side of a post-copy: its fault handler and receivers.
pub struct PostcopyIncoming {
    sh: Arc<Dest>,
    threads: Mutex<Vec<JoinHandle<()>>>,
}

/// What the destination's post-copy has done so far.
#[derive(Clone, Debug, Serialize)]
pub struct PostcopyIncomingStats {
    /// Where it is.
    pub phase: PostcopyPhase,
    /// Why it paused or failed.
    pub error: Option<String>,
    /// Pages the source said this side must fetch.
    pub needed_pages: u64,
    /// Of those, in place.
    pub needed_pages_in_place: u64,
    /// Faults, requests, blocked time, push rate.
    #[serde(flatten)]
    pub figures: PostcopyFigures,
}

impl PostcopyIncoming {
    /// Discards the needed pages of `ram` (they may hold stale data from
    /// pre-copy rounds), registers guest RAM with userfaultfd and starts the
    /// fault handler. `needed` has one bitmap per RAM region. Call before
    /// any vCPU runs.
    pub(crate) fn prepare(ram: &GuestRam, needed: &[Vec<u64>]) -> Result<PostcopyIncoming, String> {
        let uffd = Uffd::new(0).map_err(|e| format!("post-copy needs userfaultfd, which failed: {e}"))?;
        let mut regions = Vec::new();
        let mut pages = 0usize;
        for r in ram.regions() {
            regions.push(Region { gpa: r.gpa, len: r.len, host: r.host as u64, first: pages });
            pages += (r.len / PAGE) as usize;
        }
        let bits = Bits::new(pages);
        let mut total = 0u64;
        for (r, bm) in regions.iter().zip(needed) {
            let n = (r.len / PAGE) as usize;
            let bit = |p: usize| bm.get(p / 64).is_some_and(|w| w & (1 << (p % 64)) != 0);
            // Regions are whole multiples of 2 MiB, so each starts on a bitmap word.
            debug_assert!(r.first.is_multiple_of(64));
            for (i, &w) in bm.iter().enumerate().take(n.div_ceil(64)) {
                if w != 0 {
                    bits.or_word(r.first / 64 + i, w);
                    total += w.count_ones() as u64;
                }
            }
            // Drop the needed pages, run by run, skipping empty words fast.
            let mut p = 0usize;
            while p < n {
                if p.is_multiple_of(64) && bm.get(p / 64).is_none_or(|w| *w == 0) {
                    p += 64;
                    continue;
                }
                if !bit(p) {
                    p += 1;
                    continue;
                }
                let s = p;
                while p < n && bit(p) {
                    p += 1;
                }
                ram.discard(r.gpa + s as u64 * PAGE, (p - s) as u64 * PAGE).map_err(|e| e.to_string())?;
            }
        }
        for r in &regions {
            uffd.register(r.host, r.len, uffd::MODE_MISSING)
                .map_err(|e| format!("registering guest RAM {:#x}+{:#x} with userfaultfd: {e}", r.gpa, r.len))?;
        }
        let sh = Arc::new(Dest {
            uffd,
            ranges: regions.iter().map(|r| (r.gpa, r.len)).collect(),
            regions,
            needed: bits,
            needed_total: total,
            claimed: Bits::new(pages),
            filled: Bits::new(pages),
            requested: Bits::new(pages),
            needed_filled: AtomicU64::new(0),
            fault_tx: Mutex::new(None),
            pending: Mutex::new(HashMap::new()),
            pending_n: AtomicU64::new(0),
            waits_ms: Mutex::new(Vec::new()),
            faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            pages_requested: AtomicU64::new(0),
            pages_pushed: AtomicU64::new(0),
            phase: Mutex::new((PostcopyPhase::Active, None)),
            phase_cv: Condvar::new(),
            stop: AtomicBool::new(false),
            released: AtomicBool::new(false),
            resumed_at: Mutex::new(None),
            done_ms: Mutex::new(None),
            resumes: AtomicU32::new(0),
            generation: AtomicU32::new(0),
            vm: Mutex::new(None),
            paused_guest: AtomicBool::new(false),
        });
        let s = sh.clone();
        let h = std::thread::Builder::new()
            .name("postcopy-faults".into())
            .spawn(move || fault_handler(s))
            .map_err(|e| format!("starting the fault handler: {e}"))?;
        Ok(PostcopyIncoming { sh, threads: Mutex::new(vec![h]) })
    }

    /// The guest these pages are for, so that a lost link pauses it (the
    /// issue's "the destination pauses the guest") and a resume runs it on.
    pub(crate) fn attach_vm(&self, vm: &Arc<ferry_vmm::Vm>) {
        *self.sh.vm.lock().unwrap() = Some(Arc::downgrade(vm));
    }

    /// Marks the post-copy as waiting for its page streams (a settle
    /// brought `Go` over a new connection after the old streams were lost):
    /// vCPUs that touch a missing page wait until a resume starts the
    /// receivers, which asks for their pages again.
    pub(crate) fn await_resume(&self, why: String) {
        self.sh.set_phase(PostcopyPhase::Paused, Some(why));
    }

    /// Starts the receivers once the guest runs: pushed pages on `main`,
    /// requested pages on `fault`. `Complete` goes out on `main_tx`.
    pub(crate) fn start(
        &self,
        main: FrameReader<TransportReader>,
        main_tx: FrameWriter<TransportWriter>,
        fault: FrameReader<TransportReader>,
        fault_tx: FrameWriter<TransportWriter>,
        peer_timeout: Duration,
    ) -> Result<(), String> {
        {
            let mut t = self.sh.resumed_at.lock().unwrap();
            if t.is_none() {
                *t = Some(Instant::now());
            }
        }
        let generation = self.sh.generation.fetch_add(1, Ordering::SeqCst) + 1;
        *self.sh.fault_tx.lock().unwrap() = Some(fault_tx);
        {
            let mut p = self.sh.phase.lock().unwrap();
            if p.0 == PostcopyPhase::Paused {
                *p = (PostcopyPhase::Active, None);
            }
        }
        if self.sh.paused_guest.swap(false, Ordering::SeqCst) {
            if let Some(vm) = self.sh.vm.lock().unwrap().as_ref().and_then(|v| v.upgrade()) {
                let _ = vm.resume();
            }
        }
        // Faults that waited through a lost link ask again.
        let waiting: Vec<usize> = self.sh.pending.lock().unwrap().keys().copied().collect();
        for gi in waiting {
            if let Some(r) = self.sh.regions.iter().find(|r| gi >= r.first && gi < r.first + (r.len / PAGE) as usize) {
                if !self.sh.filled.get(gi) {
                    self.sh.request(r.gpa + (gi - r.first) as u64 * PAGE, 1);
                }
            }
        }
        let s = self.sh.clone();
        let push = std::thread::Builder::new()
            .name("postcopy-push".into())
            .spawn(move || push_receiver(s, generation, main, main_tx, peer_timeout))
            .map_err(|e| format!("starting the push receiver: {e}"))?;
        let s = self.sh.clone();
        let faults = std::thread::Builder::new()
            .name("postcopy-requests".into())
            .spawn(move || request_receiver(s, generation, fault))
            .map_err(|e| format!("starting the fault-stream receiver: {e}"))?;
        let mut t = self.threads.lock().unwrap();
        t.push(push);
        t.push(faults);
        Ok(())
    }

    /// Where it is.
    pub fn phase(&self) -> PostcopyPhase {
        self.sh.phase()
    }

    /// Waits up to `timeout` for the phase to leave `Active`; returns it.
    pub fn wait_settled(&self, timeout: Duration) -> PostcopyPhase {
        let deadline = Instant::now() + timeout;
        let mut p = self.sh.phase.lock().unwrap();
        while p.0 == PostcopyPhase::Active {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            p = self.sh.phase_cv.wait_timeout(p, deadline - now).unwrap().0;
        }
        p.0
    }

    /// Guest RAM ranges (start, length), in region order.
    pub(crate) fn ranges(&self) -> Vec<(u64, u64)> {
        self.sh.ranges.clone()
    }

    /// Pages still missing, one bitmap per region (for a resume).
    pub(crate) fn missing(&self) -> Vec<Vec<u64>> {
        self.sh
            .regions
            .iter()
            .map(|r| {
                let n = (r.len / PAGE) as usize;
                let mut bm = vec![0u64; n.div_ceil(64)];
                for p in 0..n {
                    let gi = r.first + p;
                    if self.sh.needed.get(gi) && !self.sh.filled.get(gi) {
                        bm[p / 64] |= 1 << (p % 64);
                    }
                }
                bm
            })
            .collect()
    }

    /// Marks the current link as lost (a resume arrived before this side
    /// noticed), so its receivers' late failures are ignored.
    pub(crate) fn supersede_link(&self) {
        let g = self.sh.generation.load(Ordering::SeqCst);
        link_lost(&self.sh, g, "the source reconnected to resume".into());
        self.sh.generation.fetch_add(1, Ordering::SeqCst);
    }

    /// Lets pages claimed by a receiver that died with the link be filled again.
    pub(crate) fn forget_unfilled_claims(&self) {
        for r in &self.sh.regions {
            for p in 0..(r.len / PAGE) as usize {
                let gi = r.first + p;
                if !self.sh.filled.get(gi) {
                    self.sh.claimed.clear(gi);
                    self.sh.requested.clear(gi);
                }
            }
        }
        self.sh.resumes.fetch_add(1, Ordering::Relaxed);
    }

    /// Joins the receivers of a link that was lost (they have exited).
    pub(crate) fn reap_receivers(&self) {
        let mut t = self.threads.lock().unwrap();
        let (done, live): (Vec<_>, Vec<_>) = t.drain(..).partition(|h| h.is_finished());
        *t = live;
        for h in done {
            let _ = h.join();
        }
    }

    /// A handle that says when every page is in place.
    pub fn completion(&self) -> crate::LazyCompletion {
        let sh = self.sh.clone();
        crate::LazyCompletion::from_fn(Arc::new(move || match sh.phase() {
            PostcopyPhase::Completed => Some(true),
            PostcopyPhase::Failed => Some(false),
            _ => None,
        }))
    }

    /// Figures so far.
    pub fn stats(&self) -> PostcopyIncomingStats {
        let (phase, error) = self.sh.phase.lock().unwrap().clone();
        PostcopyIncomingStats {
            phase,
            error,
            needed_pages: self.sh.needed_total,
            needed_pages_in_place: self.sh.needed_filled.load(Ordering::SeqCst),
            figures: self.sh.figures(),
        }
    }
}

impl Drop for PostcopyIncoming {
    fn drop(&mut self) {
        self.sh.stop.store(true, Ordering::SeqCst);
        // Nothing may wait forever on a page that will not come.
        self.sh.release();
        if let Some(mut w) = self.sh.fault_tx.lock().unwrap().take() {
            let _ = w.get_mut().shutdown();
        }
        for h in self.threads.lock().unwrap().drain(..) {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}

fn fault_handler(sh: Arc<Dest>) {
    while !sh.stop.load(Ordering::SeqCst) && !sh.released.load(Ordering::SeqCst) {
        match sh.uffd.next_fault(POLL.as_millis() as i32) {
            Ok(Some(f)) => {
                if let Err(e) = sh.on_fault(f.address) {
                    sh.set_phase(PostcopyPhase::Failed, Some(e));
                    sh.release();
                }
            }
            Ok(None) => {}
            Err(e) => {
                sh.set_phase(PostcopyPhase::Failed, Some(format!("reading userfaultfd events: {e}")));
                sh.release();
            }
        }
    }
}

/// The link to the source is gone: keep what is here and wait for a resume.
fn link_lost(sh: &Dest, generation: u32, why: String) {
    if sh.phase() == PostcopyPhase::Completed
        || sh.stop.load(Ordering::SeqCst)
        || sh.generation.load(Ordering::SeqCst) != generation
    {
        return;
    }
    if let Some(mut w) = sh.fault_tx.lock().unwrap().take() {
        let _ = w.get_mut().shutdown();
    }
    // Pause the guest: a vCPU on a missing page is stuck anyway, the others
    // should not run on while part of memory is away. Only if it ran (a
    // user's pause stays the user's).
    if let Some(vm) = sh.vm.lock().unwrap().as_ref().and_then(|v| v.upgrade()) {
        if !vm.is_paused() && vm.request_pause().is_ok() {
            sh.paused_guest.store(true, Ordering::SeqCst);
        }
    }
    eprintln!(
        "ferry: post-copy link lost ({why}); the guest is paused here with the pages it has, until the source resumes"
    );
    sh.set_phase(PostcopyPhase::Paused, Some(why));
}

fn push_receiver(
    sh: Arc<Dest>,
    generation: u32,
    mut r: FrameReader<TransportReader>,
    mut w: FrameWriter<TransportWriter>,
    peer_timeout: Duration,
) {
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let m = match r.recv() {
            Ok(m) => m,
            Err(e) => return link_lost(&sh, generation, e.to_string()),
        };
        let placed = match m {
            Message::Pages { gpa, data } => sh.place(gpa, data.len() as u64 / PAGE, Some(&data), true),
            Message::Zero { gpa, npages } => sh.place(gpa, npages, None, true),
            Message::PushDone { .. } => {
                // Requested pages may still be in flight on the other stream.
                let deadline = Instant::now() + peer_timeout;
                while !sh.complete() && Instant::now() < deadline && sh.phase() == PostcopyPhase::Active {
                    std::thread::sleep(Duration::from_millis(1));
                }
                if !sh.complete() {
                    let missing = sh.needed_total - sh.needed_filled.load(Ordering::SeqCst);
                    return link_lost(
                        &sh,
                        generation,
                        format!("the source finished its push but {missing} needed pages are missing"),
                    );
                }
                sh.release();
                let t = sh.resumed_at.lock().unwrap().map(|t| ms(t.elapsed()));
                *sh.done_ms.lock().unwrap() = t;
                // Completed before the source hears it, so that its closing the
                // streams is not taken for a lost link.
                sh.set_phase(PostcopyPhase::Completed, None);
                let _ = w.send(&Message::Complete(sh.figures())).and_then(|_| w.flush());
                let _ = w.get_mut().shutdown();
                if let Some(mut f) = sh.fault_tx.lock().unwrap().take() {
                    let _ = f.get_mut().shutdown();
                }
                // Read to the end, so the socket does not close with unread data (a reset).
                let _ = r.get_mut().set_read_timeout(Some(Duration::from_secs(2)));
                while r.recv().is_ok() {}
                return;
            }
            Message::Abort(why) => return link_lost(&sh, generation, format!("the source aborted: {}", why.reason)),
            other => Err(format!("unexpected {:?} frame during post-copy", other.kind())),
        };
        if let Err(e) = placed {
            // Bad data from the source: the guest must not see it.
            sh.set_phase(PostcopyPhase::Failed, Some(format!("post-copy: {e}")));
            sh.release();
            return;
        }
    }
}

fn request_receiver(sh: Arc<Dest>, generation: u32, mut r: FrameReader<TransportReader>) {
    loop {
        if sh.stop.load(Ordering::SeqCst) {
            return;
        }
        let m = match r.recv() {
            Ok(m) => m,
            Err(e) => return link_lost(&sh, generation, format!("fault stream: {e}")),
        };
        let placed = match m {
            Message::Pages { gpa, data } => sh.place(gpa, data.len() as u64 / PAGE, Some(&data), false),
            Message::Zero { gpa, npages } => sh.place(gpa, npages, None, false),
            other => Err(format!("unexpected {:?} frame on the fault stream", other.kind())),
        };
        if let Err(e) = placed {
            sh.set_phase(PostcopyPhase::Failed, Some(format!("post-copy: {e}")));
            sh.release();
            return;
        }
    }
}

/// Encodes a set of page bitmaps (one per region) as `Needed` frames.
pub(crate) fn needed_frames(ranges: &[(u64, u64)], set: &[Vec<u64>]) -> Vec<Message> {
    let mut out = Vec::new();
    for (&(gpa, len), bm) in ranges.iter().zip(set) {
        let pages = len / PAGE;
        let mut p = 0u64;
        while p < pages {
            // MAX_NEEDED_PAGES is a multiple of 64, so every frame starts on a word;
            // little-endian words are the wire's LSB-first bytes.
            let n = (pages - p).min(MAX_NEEDED_PAGES);
            let words = &bm[(p / 64) as usize..((p + n).div_ceil(64) as usize).min(bm.len())];
            if words.iter().any(|w| *w != 0) {
                let mut bitmap: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
                bitmap.resize(n.div_ceil(8) as usize, 0);
                // Bits past the region's end are never set; clear them anyway.
                if !n.is_multiple_of(8) {
                    if let Some(last) = bitmap.last_mut() {
                        *last &= (1u8 << (n % 8)) - 1;
                    }
                }
                out.push(Message::Needed { gpa: gpa + p * PAGE, npages: n, bitmap });
            }
            p += n;
        }
    }
    out
}

/// Merges a `Needed` frame into per-region bitmaps, after checking its range.
pub(crate) fn merge_needed(
    ranges: &[(u64, u64)],
    set: &mut [Vec<u64>],
    gpa: u64,
    npages: u64,
    bitmap: &[u8],
) -> Result<u64, String> {
    let len = npages.checked_mul(PAGE).ok_or("page count overflows")?;
    let (idx, off) =
        check_ram_range(ranges, gpa, len).ok_or_else(|| format!("bitmap {gpa:#x}+{len:#x} lies outside guest RAM"))?;
    let first = (off / PAGE) as usize;
    let bm = &mut set[idx];
    let mut n = 0;
    if first.is_multiple_of(64) {
        // Word at a time: the bytes are little-endian words.
        for (k, chunk) in bitmap.chunks(8).enumerate() {
            let mut b = [0u8; 8];
            b[..chunk.len()].copy_from_slice(chunk);
            let mut w = u64::from_le_bytes(b);
            let valid = (npages as usize).saturating_sub(k * 64).min(64);
            if valid < 64 {
                w &= (1u64 << valid) - 1;
            }
            if w != 0 {
                bm[first / 64 + k] |= w;
                n += w.count_ones() as u64;
            }
        }
        return Ok(n);
    }
    for i in 0..npages as usize {
        if bitmap.get(i / 8).is_some_and(|b| b & (1 << (i % 8)) != 0) {
            let q = first + i;
            bm[q / 64] |= 1 << (q % 64);
            n += 1;
        }
    }
    Ok(n)
}

/// Empty per-region bitmaps for `ranges`.
pub(crate) fn empty_set(ranges: &[(u64, u64)]) -> Vec<Vec<u64>> {
    ranges.iter().map(|&(_, len)| vec![0u64; ((len / PAGE) as usize).div_ceil(64)]).collect()
}

/// Sends the pages of `[gpa, gpa + npages)` from the source's RAM, data
/// runs as `Pages` and zero runs as `Zero` (a page request's answer).
pub(crate) fn send_window(
    ram: &GuestRam,
    gpa: u64,
    npages: u32,
    codec: crate::wire::WireCodec,
    w: &mut FrameWriter<TransportWriter>,
    buf: &mut Vec<u8>,
) -> std::io::Result<()> {
    let Some(mem) = ram.slice(gpa, npages as u64 * PAGE) else {
        return Err(std::io::Error::other(format!("page request {gpa:#x}+{npages} pages is outside guest RAM")));
    };
    let mut p = 0usize;
    let n = npages as usize;
    while p < n {
        let zero = is_zero(&mem[p * PAGE_USIZE..(p + 1) * PAGE_USIZE]);
        let s = p;
        p += 1;
        while p < n && is_zero(&mem[p * PAGE_USIZE..(p + 1) * PAGE_USIZE]) == zero {
            p += 1;
        }
        let at = gpa + (s * PAGE_USIZE) as u64;
        if zero {
            w.send(&Message::Zero { gpa: at, npages: (p - s) as u64 })?;
        } else {
            crate::wire::encode_pages(at, &mem[s * PAGE_USIZE..p * PAGE_USIZE], codec, buf);
            w.write_raw(crate::wire::Kind::Pages, buf)?;
        }
    }
    w.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn needed_bitmaps_round_trip_through_frames() {
        let ranges = [(0u64, 64 * PAGE), (0x10_0000, 200 * PAGE)];
        let mut set = empty_set(&ranges);
        for p in [0usize, 5, 63] {
            set[0][p / 64] |= 1 << (p % 64);
        }
        for p in [1usize, 64, 199] {
            set[1][p / 64] |= 1 << (p % 64);
        }
        let frames = needed_frames(&ranges, &set);
        assert_eq!(frames.len(), 2);
        let mut back = empty_set(&ranges);
        let mut n = 0;
        for f in &frames {
            let Message::Needed { gpa, npages, bitmap } = f else { panic!() };
            n += merge_needed(&ranges, &mut back, *gpa, *npages, bitmap).unwrap();
        }
        assert_eq!(n, 6);
        assert_eq!(back, set);
        // A bitmap reaching past guest RAM is refused.
        assert!(merge_needed(&ranges, &mut back, 0x10_0000, 201, &[0xff; 26]).is_err());
        assert!(merge_needed(&ranges, &mut back, 60 * PAGE, 8, &[0xff]).is_err());
    }
}
