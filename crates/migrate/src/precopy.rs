//! The pre-copy engine: copy all memory while the guest runs, re-copy what
//! it dirtied in rounds until the rest fits the downtime budget, then pause,
//! copy the last dirty pages, capture device and vCPU state, and resume.
//! Live snapshot uses it with a file sink; live migration with a transport.

use std::time::{Duration, Instant};

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use ferry_vmm::uffd::{self, Uffd};
use ferry_vmm::{DirtyView, RamRegion, Vm, VmState};
use serde::Serialize;

use crate::convergence;
use crate::sink::PageSink;
use crate::Result;

const PAGE: usize = 4096;

/// Share of the pause budget planned for copying the last dirty pages.
/// With the whole budget, measured pauses landed at 4-5.4 ms against a 5 ms
/// target (1 GiB, 64 MiB working set at full rate): the fixed costs around
/// the copy (vCPU kick, dirty log, state, resume) are 0.7-3 ms here.
pub const FINAL_COPY_SHARE: f64 = 0.5;

/// How a pre-copy runs.
#[derive(Clone, Debug)]
pub struct PrecopyConfig {
    /// Copy while the guest runs (false: pause first, copy, resume — "stop the world").
    pub live: bool,
    /// Most live rounds before the final pause.
    pub max_rounds: u32,
    /// Pause-time budget. Rounds go on until the dirty set can be copied in
    /// half of it ([`FINAL_COPY_SHARE`]); the other half is for stopping the
    /// vCPUs, reading the dirty log, capturing the state and resuming.
    pub downtime_target: Duration,
    /// Hash all guest memory at the final pause (adds the hash time to the pause).
    pub digest: bool,
    /// Copy only the pages dirtied since dirty logging was last read (an
    /// incremental image over the previous snapshot), instead of all memory.
    pub incremental: bool,
    /// When the last dirty set is larger than the pause budget allows to copy,
    /// write-protect it (userfaultfd) at the final pause and resume at once,
    /// copying it in the background; a guest write to a page not yet copied
    /// waits until that page is saved. Keeps the pause short when the guest
    /// dirties memory faster than it can be copied. A set that fits the
    /// budget is copied while paused either way.
    pub copy_on_write: bool,
    /// Leave the guest paused after the final copy and state capture (a
    /// migration's stop-and-copy: the guest resumes at the destination, or
    /// here only if the commit fails). Implies copying the last dirty set
    /// while paused.
    pub end_paused: bool,
    /// Auto-converge: slow the vCPUs down stepwise while the dirty set does
    /// not shrink (QEMU's cpu-throttle: start, step, cap).
    pub throttle: Option<ThrottlePolicy>,
    /// When the rounds end without the dirty set fitting the pause budget,
    /// give up (an error, the guest keeps running) instead of pausing
    /// longer than asked. A migration wants this; a snapshot has
    /// copy-on-write for that case instead.
    pub require_convergence: bool,
    /// Post-copy: do not send the final dirty set at all; return it in
    /// [`PrecopyStats::deferred`] so the destination fetches those pages
    /// after it resumes the guest. With `live` false nothing is sent before
    /// the pause (pure post-copy: every populated page is deferred).
    /// Implies `end_paused`.
    pub defer_final: bool,
}

/// How auto-converge throttles the vCPUs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct ThrottlePolicy {
    /// First step, percent of each period the vCPUs are held.
    pub initial_percent: u32,
    /// Added at each further step.
    pub step_percent: u32,
    /// Ceiling.
    pub max_percent: u32,
    /// Length of one pause/run period.
    pub period_ms: u32,
}

impl Default for ThrottlePolicy {
    fn default() -> Self {
        ThrottlePolicy { initial_percent: 20, step_percent: 10, max_percent: 99, period_ms: 20 }
    }
}

/// One throttle step.
#[derive(Clone, Debug, Serialize, serde::Deserialize)]
pub struct ThrottleStep {
    /// Round after which it was taken (1-based).
    pub round: u32,
    /// Percent of the time the vCPUs are held from then on.
    pub percent: u32,
    /// When, from the start of the pre-copy.
    pub at_ms: f64,
}

/// What auto-converge did.
#[derive(Clone, Debug, Default, Serialize, serde::Deserialize)]
pub struct ThrottleStats {
    /// Every step.
    pub steps: Vec<ThrottleStep>,
    /// The throttle in effect at the final pause.
    pub final_percent: u32,
    /// Time the vCPUs were held by the throttle in all: what it cost the guest.
    pub throttled_ms: f64,
}

/// Holds the vCPUs for `percent` of every period, from its own thread.
struct Throttle {
    percent: std::sync::Arc<std::sync::atomic::AtomicU32>,
    stop: std::sync::Arc<AtomicBool>,
    held_us: std::sync::Arc<AtomicU64>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Throttle {
    fn start(vm: &std::sync::Arc<Vm>, period_ms: u32) -> Throttle {
        use std::sync::atomic::AtomicU32;
        let percent = std::sync::Arc::new(AtomicU32::new(0));
        let stop = std::sync::Arc::new(AtomicBool::new(false));
        let held_us = std::sync::Arc::new(AtomicU64::new(0));
        let (p, st, h, vm) = (percent.clone(), stop.clone(), held_us.clone(), vm.clone());
        let period = Duration::from_millis(period_ms.max(1) as u64);
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                while !st.load(Ordering::Acquire) {
                    let pct = p.load(Ordering::Relaxed).min(99);
                    if pct == 0 {
                        std::thread::sleep(period);
                        continue;
                    }
                    let t = Instant::now();
                    if vm.pause().is_err() {
                        break;
                    }
                    std::thread::sleep(period * pct / 100);
                    let _ = vm.resume();
                    h.fetch_add(t.elapsed().as_micros() as u64, Ordering::Relaxed);
                    std::thread::sleep(period * (100 - pct) / 100);
                }
            })
            .ok();
        Throttle { percent, stop, held_us, thread }
    }

    fn set(&self, pct: u32) {
        self.percent.store(pct, Ordering::Relaxed);
    }

    /// Stops the thread; the vCPUs run (unless something else paused them).
    fn finish(&mut self) -> f64 {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        self.held_us.load(Ordering::Relaxed) as f64 / 1e3
    }
}

impl Drop for Throttle {
    fn drop(&mut self) {
        self.finish();
    }
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            live: true,
            max_rounds: 8,
            downtime_target: Duration::from_millis(5),
            digest: false,
            incremental: false,
            copy_on_write: true,
            end_paused: false,
            throttle: None,
            require_convergence: false,
            defer_final: false,
        }
    }
}

/// One round's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RoundStats {
    /// Pages looked at this round (all populated memory in round 1, the dirty set after).
    pub pages: u64,
    /// Of those, pages sent with data.
    pub data_pages: u64,
    /// Of those, all-zero pages (sent as zero runs, or skipped when never populated).
    pub zero_pages: u64,
    /// Round duration.
    pub ms: f64,
    /// Whether the guest was paused during this round.
    pub paused: bool,
}

/// Why live rounds ended and the final pause began.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// The dirty set fit the pause budget.
    Converged,
    /// The round limit was reached.
    MaxRounds,
    /// The dirty set stopped shrinking (less than 10% a round).
    NotConverging,
    /// No live rounds: the guest was paused from the start (stop-the-world,
    /// or it was paused already).
    #[default]
    Paused,
}

/// What a pre-copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrecopyStats {
    /// Whole operation.
    pub total_ms: f64,
    /// How long the guest was paused.
    pub pause_ms: f64,
    /// Of the pause, time spent hashing memory for `memory_digest`.
    pub digest_ms: f64,
    /// Of the pause, time spent capturing vCPU and device state.
    pub state_ms: f64,
    /// Rounds including the final (paused) one.
    pub rounds: Vec<RoundStats>,
    /// Pages never touched by the guest, skipped without reading them.
    pub unpopulated_pages_skipped: u64,
    /// All-zero pages found by reading them.
    pub zero_pages: u64,
    /// Pages sent with data, summed over rounds.
    pub data_pages_sent: u64,
    /// BLAKE3 memory digest at the final pause (when asked for).
    pub memory_digest: Option<String>,
    /// Why iteration stopped.
    pub stop_reason: StopReason,
    /// Copy-on-write phase, when used.
    pub cow: Option<CowStats>,
    /// Why the copy-on-write phase was not possible and the final pages were copied while paused.
    pub cow_fallback: Option<String>,
    /// Auto-converge, when it was allowed.
    pub throttle: Option<ThrottleStats>,
    /// Writable working set: pages dirtied in two rounds running, held back
    /// from the next live round (summed over rounds).
    pub wws_held_pages: u64,
    /// Of those, pages the guest dirtied again while held: sends saved,
    /// since sending them would have been undone by the next round.
    pub wws_resends_saved: u64,
    /// Post-copy: the pages not sent (one bitmap per RAM region), whose
    /// contents the destination must fetch.
    #[serde(skip)]
    pub deferred: Option<Vec<Vec<u64>>>,
}

/// The copy-on-write final phase's figures.
#[derive(Clone, Debug, Default, Serialize)]
pub struct CowStats {
    /// Pages write-protected at the final pause.
    pub protected_pages: u64,
    /// Write-protect ioctls issued during the pause (one per run).
    pub protect_calls: u64,
    /// Time spent protecting, inside the pause.
    pub protect_ms: f64,
    /// Pages the guest wrote before the background copy reached them (saved from the fault handler).
    pub faulted_pages: u64,
    /// Write-protect faults received in all (including pages already saved).
    pub write_faults: u64,
    /// Background copy time after the guest resumed.
    pub background_ms: f64,
}

/// Bitmap of pages to visit in one region (one bit per page).
type Bitmap = Vec<u64>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn zip_with(a: &[Bitmap], b: &[Bitmap], f: impl Fn(u64, u64) -> u64) -> Vec<Bitmap> {
    a.iter().zip(b).map(|(x, y)| x.iter().zip(y).map(|(p, q)| f(*p, *q)).collect()).collect()
}
fn or(a: &[Bitmap], b: &[Bitmap]) -> Vec<Bitmap> {
    zip_with(a, b, |p, q| p | q)
}
fn and(a: &[Bitmap], b: &[Bitmap]) -> Vec<Bitmap> {
    zip_with(a, b, |p, q| p & q)
}
fn andnot(a: &[Bitmap], b: &[Bitmap]) -> Vec<Bitmap> {
    zip_with(a, b, |p, q| p & !q)
}

pub(crate) fn count(bms: &[Bitmap]) -> u64 {
    bms.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

/// Pages of the region that are resident (ever touched); the others are zero.
pub(crate) fn resident(region: &RamRegion) -> Bitmap {
    let pages = region.len as usize / PAGE;
    let mut vec = vec![0u8; pages];
    let mut bm = vec![0u64; pages.div_ceil(64)];
    // SAFETY: the region is a live, page-aligned mapping of `len` bytes.
    let rc = unsafe { libc::mincore(region.host as *mut libc::c_void, region.len as usize, vec.as_mut_ptr()) };
    if rc != 0 {
        bm.iter_mut().for_each(|w| *w = u64::MAX);
    } else {
        for (i, v) in vec.iter().enumerate() {
            if v & 1 == 1 {
                bm[i / 64] |= 1 << (i % 64);
            }
        }
    }
    bm
}

pub(crate) fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128.
    let (pre, words, post) = unsafe { page.align_to::<u128>() };
    pre.iter().all(|b| *b == 0) && post.iter().all(|b| *b == 0) && words.iter().fold(0u128, |a, w| a | w) == 0
}

/// Sends the pages marked in `bms`, coalescing runs; returns (data pages, zero pages).
pub(crate) fn send(regions: &[RamRegion], bms: &[Bitmap], sink: &mut dyn PageSink) -> Result<(u64, u64)> {
    let (mut data_pages, mut zero_pages) = (0u64, 0u64);
    for (region, bm) in regions.iter().zip(bms) {
        let mem = region.as_slice();
        let pages = region.len as usize / PAGE;
        let mut p = 0usize;
        while p < pages {
            let w = bm[p / 64];
            if w == 0 && p.is_multiple_of(64) {
                p += 64;
                continue;
            }
            if w & (1 << (p % 64)) == 0 {
                p += 1;
                continue;
            }
            // A run of marked pages, split into data and zero sub-runs.
            let zero = is_zero(&mem[p * PAGE..(p + 1) * PAGE]);
            let start = p;
            p += 1;
            while p < pages && bm[p / 64] & (1 << (p % 64)) != 0 && is_zero(&mem[p * PAGE..(p + 1) * PAGE]) == zero {
                p += 1;
            }
            let gpa = region.gpa + (start * PAGE) as u64;
            let n = (p - start) as u64;
            if zero {
                sink.zero(gpa, n)?;
                zero_pages += n;
            } else {
                sink.pages(gpa, &mem[start * PAGE..p * PAGE])?;
                data_pages += n;
            }
        }
    }
    Ok((data_pages, zero_pages))
}

fn round(regions: &[RamRegion], bms: &[Bitmap], sink: &mut dyn PageSink, paused: bool) -> Result<RoundStats> {
    let t = Instant::now();
    let (data_pages, zero_pages) = send(regions, bms, sink)?;
    let pages = count(bms);
    if !paused {
        // Delivered, not just buffered: the rate below is then the real one.
        sink.sync(0, pages)?;
    }
    Ok(RoundStats { pages, data_pages, zero_pages, ms: ms(t.elapsed()), paused })
}

/// Runs of set bits: (region index, first page, page count).
fn runs(bms: &[Bitmap]) -> Vec<(usize, usize, usize)> {
    let mut out = Vec::new();
    for (ri, bm) in bms.iter().enumerate() {
        let mut start: Option<usize> = None;
        for (wi, &w) in bm.iter().enumerate() {
            if w == 0 || w == u64::MAX {
                let bit = w == u64::MAX;
                match (start, bit) {
                    (None, true) => start = Some(wi * 64),
                    (Some(s), false) => {
                        out.push((ri, s, wi * 64 - s));
                        start = None;
                    }
                    _ => {}
                }
                continue;
            }
            for b in 0..64 {
                let set = w & (1 << b) != 0;
                let p = wi * 64 + b;
                match (start, set) {
                    (None, true) => start = Some(p),
                    (Some(s), false) => {
                        out.push((ri, s, p - s));
                        start = None;
                    }
                    _ => {}
                }
            }
        }
        if let Some(s) = start {
            out.push((ri, s, bm.len() * 64 - s));
        }
    }
    out
}

/// The copy-on-write final phase: pages write-protected through userfaultfd
/// at the pause and saved after the guest resumed.
struct Cow {
    uffd: Uffd,
    protected: Vec<(u64, u64)>,
    registered: Vec<(u64, u64)>,
    stats: CowStats,
}

impl Cow {
    /// Registers guest RAM for write-protect faults and protects the runs of `set`.
    fn protect(regions: &[RamRegion], set: &[Bitmap]) -> Result<Cow> {
        let t = Instant::now();
        let io = |e: std::io::Error| crate::Error::Cow(e.to_string());
        let uffd = Uffd::new(uffd::FEATURE_PAGEFAULT_FLAG_WP).map_err(io)?;
        let all = runs(set);
        // Register only the span the protected runs cover in each region:
        // registering (and later unregistering) all of guest RAM costs time
        // in proportion to RAM size, and the vCPU waits on it.
        let mut registered = Vec::new();
        for (ri, r) in regions.iter().enumerate() {
            let mine: Vec<_> = all.iter().filter(|x| x.0 == ri).collect();
            if let (Some(a), Some(z)) = (mine.first(), mine.last()) {
                let start = r.host as u64 + (a.1 * PAGE) as u64;
                let len = ((z.1 + z.2 - a.1) * PAGE) as u64;
                uffd.register(start, len, uffd::MODE_WP).map_err(io)?;
                registered.push((start, len));
            }
        }
        let mut cow = Cow { uffd, protected: Vec::new(), registered, stats: CowStats::default() };
        for (ri, first, n) in all {
            let start = regions[ri].host as u64 + (first * PAGE) as u64;
            let len = (n * PAGE) as u64;
            if let Err(e) = cow.uffd.write_protect(start, len, true) {
                cow.release();
                return Err(io(e));
            }
            cow.protected.push((start, len));
            cow.stats.protected_pages += n as u64;
        }
        cow.stats.protect_calls = cow.protected.len() as u64;
        cow.stats.protect_ms = ms(t.elapsed());
        Ok(cow)
    }

    /// Unprotects everything still protected and unregisters, so the guest never stays blocked.
    fn release(&self) {
        for &(start, len) in &self.protected {
            let _ = self.uffd.write_protect(start, len, false);
        }
    }

    /// Saves every protected page, either in order from this thread or, when
    /// the guest writes one first, from the fault handler; unprotects as it goes.
    fn copy_in_background(
        self,
        regions: &[RamRegion],
        set: &[Bitmap],
        sink: &mut dyn PageSink,
    ) -> Result<(RoundStats, CowStats)> {
        let t = Instant::now();
        // Two locks: `saved` is held only while pages are memcpy'd out of guest
        // memory (then they may be unprotected and the guest goes on); the
        // sink lock covers the slower compress-and-write that follows.
        let saved = Mutex::new(set.iter().map(|b| vec![0u64; b.len()]).collect::<Vec<Bitmap>>());
        let out = Mutex::new((sink, 0u64, 0u64)); // sink, data pages, zero pages
        let stop = AtomicBool::new(false);
        let faulted = AtomicU64::new(0);
        let faults = AtomicU64::new(0);
        let failure: Mutex<Option<crate::Error>> = Mutex::new(None);
        let uffd = &self.uffd;
        // Copies the not-yet-saved pages of [first, end) of region ri out of guest memory.
        let grab = |ri: usize, first: usize, end: usize| -> Vec<(u64, Vec<u8>)> {
            let mut bm = saved.lock().unwrap();
            let r = &regions[ri];
            let mem = r.as_slice();
            let mut pages = Vec::new();
            for p in first..end {
                if set[ri][p / 64] & (1 << (p % 64)) != 0 && bm[ri][p / 64] & (1 << (p % 64)) == 0 {
                    pages.push((r.gpa + (p * PAGE) as u64, mem[p * PAGE..(p + 1) * PAGE].to_vec()));
                    bm[ri][p / 64] |= 1 << (p % 64);
                }
            }
            pages
        };
        let write = |pages: Vec<(u64, Vec<u8>)>| -> Result<()> {
            let mut o = out.lock().unwrap();
            for (gpa, page) in pages {
                if is_zero(&page) {
                    o.0.zero(gpa, 1)?;
                    o.2 += 1;
                } else {
                    o.0.pages(gpa, &page)?;
                    o.1 += 1;
                }
            }
            Ok(())
        };
        std::thread::scope(|s| {
            s.spawn(|| {
                while !stop.load(Ordering::Acquire) {
                    let f = match uffd.next_fault(5) {
                        Ok(Some(f)) => f,
                        Ok(None) => continue,
                        Err(e) => {
                            failure.lock().unwrap().get_or_insert(crate::Error::Cow(e.to_string()));
                            break;
                        }
                    };
                    faults.fetch_add(1, Ordering::Relaxed);
                    let addr = f.address & !(PAGE as u64 - 1);
                    let hit =
                        regions.iter().enumerate().find(|(_, r)| addr >= r.host as u64 && addr < r.host as u64 + r.len);
                    let pages = match hit {
                        Some((ri, r)) => {
                            let p = ((addr - r.host as u64) as usize) / PAGE;
                            grab(ri, p, p + 1)
                        }
                        None => vec![],
                    };
                    // The page's old contents are safe in `pages`: let the guest write.
                    let _ = uffd.write_protect(addr, PAGE as u64, false);
                    if !pages.is_empty() {
                        faulted.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = write(pages) {
                            failure.lock().unwrap().get_or_insert(e);
                        }
                    }
                }
            });
            // Background copy in batches, unprotecting each batch once copied out.
            'outer: for (ri, first, n) in runs(set) {
                let mut p = first;
                while p < first + n {
                    let end = (p + 64).min(first + n);
                    let pages = grab(ri, p, end);
                    let start = regions[ri].host as u64 + (p * PAGE) as u64;
                    let _ = uffd.write_protect(start, ((end - p) * PAGE) as u64, false);
                    if let Err(e) = write(pages) {
                        failure.lock().unwrap().get_or_insert(e);
                        break 'outer;
                    }
                    p = end;
                }
            }
            // Whatever happened, nothing may stay protected.
            self.release();
            stop.store(true, Ordering::Release);
        });
        for &(start, len) in &self.registered {
            let _ = self.uffd.unregister(start, len);
        }
        if let Some(e) = failure.into_inner().unwrap() {
            return Err(e);
        }
        let (_, data_pages, zero_pages) = out.into_inner().unwrap();
        let mut stats = self.stats;
        stats.faulted_pages = faulted.load(Ordering::Relaxed);
        stats.write_faults = faults.load(Ordering::Relaxed);
        stats.background_ms = ms(t.elapsed());
        let round = RoundStats { pages: count(set), data_pages, zero_pages, ms: stats.background_ms, paused: false };
        Ok((round, stats))
    }
}

/// Runs a pre-copy of `vm` into `sink` and returns the VM state captured at
/// the final pause. The guest is running again when this returns (unless it
/// was paused before), also on error.
pub fn precopy(
    vm: &std::sync::Arc<Vm>,
    log: &DirtyView,
    sink: &mut dyn PageSink,
    cfg: &PrecopyConfig,
) -> Result<(VmState, PrecopyStats)> {
    let t0 = Instant::now();
    let was_paused = vm.is_paused();
    let regions: Vec<RamRegion> = vm.ram().regions().to_vec();
    let mut stats = PrecopyStats::default();

    let result = (|| -> Result<VmState> {
        let live = cfg.live && !was_paused;
        let mut pause_start = None;
        let mut final_set: Option<Vec<Bitmap>> = None;
        // Pure post-copy of a running guest sends nothing before the pause, so
        // which pages are populated can be read while the guest still runs
        // (mincore costs about 1 ms per GiB): the dirty log, cleared first,
        // adds every page written after that at the pause.
        let populated_while_running = !live && cfg.defer_final && !was_paused && !cfg.incremental;
        if !live && !populated_while_running {
            pause_start = Some(Instant::now());
            vm.pause()?;
        }
        // Round 1: everything populated, or what changed since the last snapshot.
        let first: Vec<Bitmap> = if cfg.incremental {
            log.take()?
        } else {
            let _ = log.take()?; // start a clean log
            let bms: Vec<Bitmap> = regions.iter().map(resident).collect();
            let total: u64 = regions.iter().map(|r| r.len / PAGE as u64).sum();
            stats.unpopulated_pages_skipped = total - count(&bms);
            bms
        };
        if populated_while_running {
            pause_start = Some(Instant::now());
            vm.pause()?;
        }
        let mut deferred_first = None;
        let mut rate_pages_per_ms = 1.0;
        if !live && cfg.defer_final {
            // Pure post-copy: nothing moves before the pause.
            deferred_first = Some(first);
        } else {
            let r1 = round(&regions, &first, sink, !live)?;
            rate_pages_per_ms = (r1.pages as f64 / r1.ms.max(0.001)).max(1.0);
            stats.rounds.push(r1);
        }
        let budget_pages = |rate: f64| convergence::budget_pages(rate, cfg.downtime_target);
        stats.stop_reason = StopReason::Paused;
        if live {
            let mut prev = u64::MAX;
            // The writable working set held back from the last round, and that round's fresh dirty log.
            let mut held: Option<Vec<Bitmap>> = None;
            let mut prev_fresh: Option<Vec<Bitmap>> = None;
            let mut throttle = cfg.throttle.map(|p| (p, Throttle::start(vm, p.period_ms), ThrottleStats::default()));
            // Stops the throttle (the vCPUs run freely again) and keeps its figures.
            let end_throttle = |t: &mut Option<(ThrottlePolicy, Throttle, ThrottleStats)>, stats: &mut PrecopyStats| {
                if let Some((_, mut th, mut ts)) = t.take() {
                    ts.throttled_ms = th.finish();
                    stats.throttle = Some(ts);
                }
            };
            loop {
                let fresh = log.take()?;
                // Writable working set (Clark et al.): a page dirtied in this
                // round and the last is likely to be dirtied again, so it waits
                // for a later round (or the final one) instead of going now.
                // What waits is always sent later: it joins the next set.
                if let Some(h) = &held {
                    stats.wws_resends_saved += count(&and(h, &fresh));
                }
                let dirty = match held.take() {
                    Some(h) => or(&fresh, &h),
                    None => fresh.clone(),
                };
                let n = count(&dirty);
                if n <= budget_pages(rate_pages_per_ms) {
                    // Small enough: leave it for the pause. KVM has cleared
                    // these bits, so stash them for the final round.
                    stats.stop_reason = StopReason::Converged;
                    end_throttle(&mut throttle, &mut stats);
                    pause_start = Some(Instant::now());
                    vm.pause()?;
                    let rest = log.take()?;
                    let merged: Vec<Bitmap> =
                        dirty.iter().zip(&rest).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x | y).collect()).collect();
                    final_set = Some(merged);
                    break;
                }
                let hot = prev_fresh.as_ref().map(|p| and(p, &fresh));
                // Only while the rest is at least as large: a round that sent
                // (almost) nothing would be over at once, and the next log would
                // cover too short a time to tell hot pages from cold.
                let hot = hot.filter(|h| count(h) * 2 <= n);
                let send_now = match &hot {
                    Some(h) if count(h) > 0 => {
                        stats.wws_held_pages += count(h);
                        andnot(&dirty, h)
                    }
                    _ => dirty.clone(),
                };
                held = hot.filter(|h| count(h) > 0);
                prev_fresh = Some(fresh);
                let r = round(&regions, &send_now, sink, false)?;
                // A round that sent little (its pages held back) measures the
                // round trip, not the link: keep the rate measured before.
                if r.ms > 0.0 && convergence::updates_rate(r.pages) {
                    rate_pages_per_ms = (r.pages as f64 / r.ms).max(1.0);
                }
                stats.rounds.push(r);
                let rounds = stats.rounds.len() as u32;
                let not_converging = convergence::not_converging(n, prev);
                prev = n;
                // Auto-converge: a round that did not shrink the dirty set
                // tightens the throttle, while it can still be tightened.
                let mut stepped = false;
                if let Some((policy, th, ts)) = throttle.as_mut() {
                    if let Some(pct) = convergence::throttle_step(rounds, not_converging, ts.final_percent, policy) {
                        ts.final_percent = pct;
                        th.set(ts.final_percent);
                        ts.steps.push(ThrottleStep {
                            round: rounds,
                            percent: ts.final_percent,
                            at_ms: ms(t0.elapsed()),
                        });
                        stepped = true;
                    }
                }
                if let Some(reason) = convergence::stop_after_round(rounds, cfg.max_rounds, not_converging, stepped) {
                    stats.stop_reason = reason;
                    end_throttle(&mut throttle, &mut stats);
                    if cfg.require_convergence {
                        return Err(crate::Error::NotConverging {
                            rounds,
                            dirty_pages: n,
                            pages_per_s: rate_pages_per_ms * 1e3,
                            throttle_percent: stats.throttle.as_ref().map(|t| t.final_percent),
                        });
                    }
                    pause_start = Some(Instant::now());
                    vm.pause()?;
                    let rest = log.take()?;
                    final_set = Some(match held.take() {
                        Some(h) => or(&rest, &h),
                        None => rest,
                    });
                    break;
                }
            }
        } else {
            // Stop-the-world: anything written between reading the log and pausing.
            let rest = log.take()?;
            if let Some(first) = deferred_first.take() {
                final_set =
                    Some(first.iter().zip(&rest).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x | y).collect()).collect());
            } else if count(&rest) > 0 {
                stats.rounds.push(round(&regions, &rest, sink, true)?);
            }
        }
        if cfg.digest {
            let t = Instant::now();
            stats.memory_digest = Some(vm.ram().digest().to_hex().to_string());
            stats.digest_ms = ms(t.elapsed());
        }
        let t_state = Instant::now();
        let state = vm.save_state()?;
        stats.state_ms = ms(t_state.elapsed());
        match final_set {
            Some(set) if cfg.defer_final => {
                // Post-copy: the guest stays paused; the set goes to the caller.
                stats.deferred = Some(set);
                stats.pause_ms = pause_start.map(|p| ms(p.elapsed())).unwrap_or(0.0);
            }
            // Copy-on-write only pays when the last dirty set would not fit the
            // pause budget: it costs the guest write faults and the protect calls.
            Some(set) if cfg.copy_on_write && !cfg.end_paused && count(&set) > budget_pages(rate_pages_per_ms) => {
                match Cow::protect(&regions, &set) {
                    Ok(cow) => {
                        vm.resume()?;
                        stats.pause_ms = pause_start.map(|p| ms(p.elapsed())).unwrap_or(0.0);
                        let (r, cs) = cow.copy_in_background(&regions, &set, sink)?;
                        stats.rounds.push(r);
                        stats.cow = Some(cs);
                    }
                    Err(e) => {
                        // Guest RAM may already be registered with another userfaultfd
                        // (a lazy restore still prefetching): copy while paused instead.
                        stats.cow_fallback = Some(e.to_string());
                        stats.rounds.push(round(&regions, &set, sink, true)?);
                        vm.resume()?;
                        stats.pause_ms = pause_start.map(|p| ms(p.elapsed())).unwrap_or(0.0);
                    }
                }
            }
            Some(set) => {
                stats.rounds.push(round(&regions, &set, sink, true)?);
                if !was_paused && !cfg.end_paused {
                    vm.resume()?;
                }
                stats.pause_ms = pause_start.map(|p| ms(p.elapsed())).unwrap_or(0.0);
            }
            None => {
                if !was_paused && !cfg.end_paused {
                    vm.resume()?;
                }
                stats.pause_ms = pause_start.map(|p| ms(p.elapsed())).unwrap_or(0.0);
            }
        }
        Ok(state)
    })();
    if result.is_err() && !was_paused {
        let _ = vm.resume();
    }
    let state = result?;
    stats.zero_pages = stats.rounds.iter().map(|r| r.zero_pages).sum();
    stats.data_pages_sent = stats.rounds.iter().map(|r| r.data_pages).sum();
    stats.total_ms = ms(t0.elapsed());
    Ok((state, stats))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; PAGE];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero(&p));
    }

    #[derive(Default)]
    struct Collect(Vec<(u64, usize, bool)>);
    impl PageSink for Collect {
        fn pages(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
            self.0.push((gpa, data.len() / PAGE, true));
            Ok(())
        }
        fn zero(&mut self, gpa: u64, n: u64) -> Result<()> {
            self.0.push((gpa, n as usize, false));
            Ok(())
        }
    }

    #[test]
    fn send_coalesces_runs_and_splits_zero_pages() {
        let ram = ferry_vmm::GuestRam::new(16 << 20).unwrap();
        ram.write(0x1000, &[1]).unwrap();
        ram.write(0x2000, &[2]).unwrap();
        ram.write(0x4000, &[3]).unwrap();
        let regions = ram.regions().to_vec();
        let mut bm = vec![0u64; (16 << 20) / PAGE / 64];
        bm[0] = 0b11110; // pages 1..=4; page 3 is zero
        let mut sink = Collect::default();
        let (d, z) = send(&regions, &[bm], &mut sink).unwrap();
        assert_eq!((d, z), (3, 1));
        assert_eq!(sink.0, vec![(0x1000, 2, true), (0x3000, 1, false), (0x4000, 1, true)]);
    }

    #[test]
    fn runs_of_a_bitmap() {
        let mut bm = vec![0u64; 4];
        bm[0] = 0b0110;
        bm[1] = u64::MAX;
        bm[2] = 1;
        bm[3] = 1 << 63;
        assert_eq!(runs(&[bm]), vec![(0, 1, 2), (0, 64, 65), (0, 255, 1)]);
    }

    #[test]
    fn resident_sees_only_touched_pages() {
        let ram = ferry_vmm::GuestRam::new(16 << 20).unwrap();
        ram.write(0x5000, &[1]).unwrap();
        let bm = resident(&ram.regions()[0]);
        assert_eq!(count(std::slice::from_ref(&bm)), 1);
        assert_ne!(bm[0] & (1 << 5), 0);
    }
}
