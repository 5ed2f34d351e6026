//! ferry's test guest: a PVH kernel whose real work runs in ring 3.
//!
//! Ring 0 (boot.rs) only sets up long mode and drops to ring 3, where port
//! I/O is allowed (IOPL=3 and an all-zero TSS I/O bitmap); everything here
//! runs at CPL 3, natively even on hosts where guest ring 0 is emulated. See ../README.md for the command line, the output lines and
//! the memory pattern (the contract with ferry's tests).

#![no_std]
#![no_main]

mod boot;
mod cmdline;
mod hw;
mod mem;
mod mptable;
mod pattern;

use cmdline::{Command, Config, Crash, CtrlAltDel, Fill, LineBuf, Mode, Plant, Plants, Rate};
use core::cell::UnsafeCell;
use core::fmt::Write;
use core::ptr::{read_volatile, write_volatile};
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use hw::{rdtsc, TscSource};
use pattern::{expected_gen, page_word, random_seed, random_word, slice_of, Region, PAGE_WORDS, SCRATCH_GEN};

/// Most CPUs the guest drives (one stack and counter block each).
pub const MAX_CPUS: usize = 32;
/// Ring-3 stack per CPU.
pub const STACK_SIZE: usize = 16 * 1024;
/// Pages stored between two looks at the clock / the pause flag (`fill=word`).
const BATCH: u64 = 512;
/// The same with `fill=random` (a whole page per store: 64 pages take
/// 0.05-0.15 ms, well under the ~1 ms poll interval).
const BATCH_RANDOM: u64 = 64;
const MIB: u64 = 1 << 20;
const HVM_START_MAGIC: u32 = 0x336e_c578;

// ---------------------------------------------------------------- output

/// One output line, formatted on the stack and written under the lock.
struct Line {
    buf: [u8; 256],
    len: usize,
}

impl Line {
    fn new() -> Self {
        Line { buf: [0; 256], len: 0 }
    }
}

impl Write for Line {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        for &b in s.as_bytes() {
            if self.len < self.buf.len() - 1 {
                self.buf[self.len] = b;
                self.len += 1;
            }
        }
        Ok(())
    }
}

macro_rules! say {
    ($($arg:tt)*) => {{
        let mut l = Line::new();
        let _ = write!(l, $($arg)*);
        l.buf[l.len] = b'\n';
        hw::serial_write(&l.buf[..l.len + 1]);
    }};
}

// ---------------------------------------------------------------- state

/// Interior-mutable static written by the BSP before the APs may read it.
struct Shared<T>(UnsafeCell<T>);
// SAFETY: written only by the BSP before GO is released; read-only after.
unsafe impl<T> Sync for Shared<T> {}

/// Everything the CPUs share about the workload; fixed after boot.
#[derive(Clone, Copy)]
struct Setup {
    mode: Mode,
    fill: Fill,
    region: Region,
    wss_pages: u64,
    ncpus: usize,
    tsc_khz: u64,
    /// Pages per second for each CPU; 0 = max.
    rate_per_cpu: u64,
}

static SETUP: Shared<Setup> = Shared(UnsafeCell::new(Setup {
    mode: Mode::Idle,
    fill: Fill::Word,
    region: Region::new(),
    wss_pages: 0,
    ncpus: 1,
    tsc_khz: 1,
    rate_per_cpu: 0,
}));

/// Makes the setup visible to the APs (before GO is released; they never
/// read it earlier).
fn publish(s: Setup) {
    // SAFETY: no AP reads SETUP before GO, which is stored after this.
    unsafe { SETUP.0.get().write(s) }
}

fn setup() -> &'static Setup {
    // SAFETY: see Shared.
    unsafe { &*SETUP.0.get() }
}

/// Per-CPU counters, in guest RAM so a snapshot/migration carries them.
#[repr(C, align(64))]
struct PerCpu {
    /// Completed passes over this CPU's slice.
    passes: AtomicU64,
    /// Pages of the current pass already written.
    cursor: AtomicU64,
    online: AtomicBool,
    /// Last pause epoch this CPU acknowledged.
    ack: AtomicU64,
}

static PERCPU: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        passes: AtomicU64::new(0),
        cursor: AtomicU64::new(0),
        online: AtomicBool::new(false),
        ack: AtomicU64::new(0),
    }
}; MAX_CPUS];

/// Released by the BSP once marking is done: APs start their workload.
static GO: AtomicBool = AtomicBool::new(false);
/// Set by the BSP to make all APs stop at a batch boundary.
static PAUSE: AtomicBool = AtomicBool::new(false);
static PAUSE_EPOCH: AtomicU64 = AtomicU64::new(0);
/// PROGRESS line sequence number.
static SEQ: AtomicU64 = AtomicU64::new(0);

/// Copies of the boot data (the VMM's copies below 1 MiB are not ours).
static CMDLINE: Shared<[u8; 1024]> = Shared(UnsafeCell::new([0; 1024]));
static RAM: Shared<[(u64, u64); 64]> = Shared(UnsafeCell::new([(0, 0); 64]));

// ---------------------------------------------------------------- boot

struct BootInfo {
    cmdline: &'static str,
    ram: &'static [(u64, u64)],
    have_memmap: bool,
}

/// Reads hvm_start_info and copies the command line and the RAM ranges.
fn read_boot_info(si: u64) -> BootInfo {
    let rd32 = |a: u64| unsafe { read_volatile(a as *const u32) };
    let rd64 = |a: u64| unsafe { read_volatile(a as *const u64) };
    // SAFETY: BSP only, before anyone else reads these.
    let cmd = unsafe { &mut *CMDLINE.0.get() };
    let ram = unsafe { &mut *RAM.0.get() };
    let mut cmd_len = 0;
    let mut nram = 0;
    let mut have_memmap = false;
    if si != 0 && rd32(si) == HVM_START_MAGIC {
        let version = rd32(si + 4);
        let cmd_pa = rd64(si + 24);
        if cmd_pa != 0 {
            while cmd_len < cmd.len() - 1 {
                let b = unsafe { read_volatile((cmd_pa + cmd_len as u64) as *const u8) };
                if b == 0 {
                    break;
                }
                cmd[cmd_len] = b;
                cmd_len += 1;
            }
        }
        if version >= 1 {
            let map = rd64(si + 40);
            let n = rd32(si + 48) as u64;
            for i in 0..n {
                let e = map + i * 24;
                if rd32(e + 16) == 1 && nram < ram.len() {
                    ram[nram] = (rd64(e), rd64(e + 8));
                    nram += 1;
                }
            }
            have_memmap = map != 0 && nram > 0;
        }
    }
    if !have_memmap {
        ram[0] = (0, 0xa0000);
        ram[1] = (MIB, 15 * MIB);
        nram = 2;
    }
    let cmdline = match core::str::from_utf8(&cmd[..cmd_len]) {
        Ok(s) => s,
        Err(e) => core::str::from_utf8(&cmd[..e.valid_up_to()]).unwrap_or(""),
    };
    BootInfo { cmdline, ram: &ram[..nram], have_memmap }
}

/// Starts AP `cpu` (APIC ID `apic`) with INIT-SIPI-SIPI; true once it runs
/// in ring 3.
fn start_ap(cpu: usize, apic: u32, tsc_khz: u64) -> bool {
    boot::set_ap_boot(cpu);
    hw::send_ipi(apic, 0x0000_4500); // INIT, assert
    hw::delay_ticks(10 * tsc_khz);
    let sipi = 0x0000_4600 | (boot::TRAMPOLINE >> 12) as u32;
    hw::send_ipi(apic, sipi);
    let online = || PERCPU[cpu].online.load(Ordering::Acquire);
    let t0 = rdtsc();
    while !online() && rdtsc() - t0 < tsc_khz {
        core::hint::spin_loop();
    }
    if !online() {
        hw::send_ipi(apic, sipi);
    }
    while !online() && rdtsc() - t0 < 5000 * tsc_khz {
        core::hint::spin_loop();
    }
    online()
}

/// APIC IDs of the CPUs to run: BSP first, then the MP table's enabled
/// processors, then guesses (0, 1, ...) if `cpus=` asks for more.
fn cpu_list(want: usize, mp: Option<&mptable::Cpus>, ids: &mut [u32; MAX_CPUS]) {
    let bsp = hw::apic_id();
    ids[0] = bsp;
    let mut n = 1;
    if let Some(mp) = mp {
        for i in 0..mp.count {
            let id = mp.apic_ids[i] as u32;
            if n < want && id != bsp && !mp.is_bsp[i] {
                ids[n] = id;
                n += 1;
            }
        }
    }
    let mut guess = 0u32;
    while n < want {
        if !ids[..n].contains(&guess) {
            ids[n] = guess;
            n += 1;
        }
        guess += 1;
    }
}

#[unsafe(no_mangle)]
extern "C" fn bsp_main(start_info: u64) -> ! {
    hw::serial_init();
    let bi = read_boot_info(start_info);
    let cfg = match cmdline::parse(bi.cmdline) {
        Ok(c) => c,
        Err(word) => {
            say!("ERROR unknown arg {}", word);
            say!("EXIT status=2");
            hw::exit(2);
        }
    };

    let mp = mptable::find_cpus(&|a| unsafe { read_volatile(a as *const u8) });
    let mut ncpus = cfg.cpus.map(|n| n as usize).unwrap_or_else(|| mp.as_ref().map_or(1, |m| m.count));
    if ncpus > MAX_CPUS {
        say!("WARN cpus={} capped to {}", ncpus, MAX_CPUS);
        ncpus = MAX_CPUS;
    }
    let mut apic_ids = [0u32; MAX_CPUS];
    cpu_list(ncpus, mp.as_ref(), &mut apic_ids);

    let (tsc_khz, tsc_src) = if let Some(k) = cfg.tsc_khz {
        (k, TscSource::Cmdline)
    } else if let Some(k) = hw::cpuid_tsc_khz(boot::boot_cpuid()) {
        (k, TscSource::Cpuid)
    } else if let Some(k) = hw::pit_calibrate_khz() {
        (k, TscSource::Pit)
    } else {
        (2_000_000, TscSource::Guess)
    };

    // Page directories for RAM above 4 GiB go right after the image; the
    // workload region starts at the first 2 MiB boundary after them.
    let mut reserved_end = boot::image_end();
    boot::map_high(bi.ram, &mut reserved_end);
    let region_start = reserved_end.next_multiple_of(2 * MIB).max(2 * MIB);

    let ram_bytes: u64 = bi.ram.iter().map(|r| r.1).sum();
    let mode = match cfg.mode {
        Mode::Idle => "idle",
        Mode::Dirty => "dirty",
    };
    say!("FERRY-GUEST boot cpus={} ram_mib={} tsc_khz={} mode={}", ncpus, ram_bytes.div_ceil(MIB), tsc_khz, mode);
    say!(
        "INFO tsc_src={} hv_max={:#x} bsp_apic={} start_info={:#x} reserved_end={:#x} memmap={} mp_cpus={} cmdline=\"{}\"",
        tsc_src.name(),
        boot::boot_cpuid().1,
        apic_ids[0],
        start_info,
        reserved_end,
        bi.have_memmap,
        mp.as_ref().map_or(0, |m| m.count),
        bi.cmdline
    );

    // Scratch: the first `scratch` MiB of the workload area, filled with data
    // (random_page(SCRATCH_GEN, pfn)) that no verify checks; the workload region follows it.
    let mut workload_start = region_start;
    if let Some(mib) = cfg.scratch_mib {
        let scratch = Region::from_ram(bi.ram, region_start, mib.saturating_mul(MIB / 4096));
        write_random(&scratch, 0, scratch.pages(), SCRATCH_GEN);
        let last = scratch.pages().checked_sub(1).and_then(|i| scratch.pfn(i)).unwrap_or(region_start / 4096 - 1);
        workload_start = (last + 1) * 4096;
        say!("SCRATCH gpa={:#x} end={:#x} pages={}", region_start, workload_start, scratch.pages());
    }

    for p in cfg.plants.iter() {
        // Only inside one RAM range of the workload area: never over the guest itself.
        let end = p.gpa.checked_add(p.len as u64);
        let ok = end.is_some_and(|e| p.gpa >= region_start && bi.ram.iter().any(|r| r.0 <= p.gpa && e <= r.0 + r.1));
        if !ok {
            say!("ERROR plant at {:#x} is outside the workload region", p.gpa);
            say!("EXIT status=2");
            hw::exit(2);
        }
        if cfg.plant_after_ms.is_none() {
            plant(&p);
        }
    }

    let mut su = Setup {
        mode: cfg.mode,
        fill: cfg.fill,
        region: Region::new(),
        wss_pages: 0,
        ncpus: 1,
        tsc_khz,
        rate_per_cpu: 0,
    };

    // Bring up the APs one by one (they share one boot slot for stack/index).
    if ncpus > 1 {
        boot::install_trampoline();
        hw::lapic_write(0xf0, hw::lapic_read(0xf0) | 0x1ff); // enable, vector 0xff
        for (cpu, &apic) in apic_ids.iter().enumerate().take(ncpus).skip(1) {
            if !start_ap(cpu, apic, tsc_khz) {
                say!("WARN cpu {} (apic {}) did not start", cpu, apic);
                break;
            }
            su.ncpus = cpu + 1;
        }
    }

    if let Some(n) = cfg.exit {
        say!("EXIT status={}", n);
        hw::exit(n);
    }
    match cfg.crash {
        Some(Crash::Triple) => {
            say!("CRASH triple");
            // SAFETY: intentionally faults; the empty IDT turns it into a
            // triple fault.
            unsafe { core::arch::asm!("ud2", options(noreturn)) }
        }
        Some(Crash::MmioExec) => {
            say!("CRASH mmio-exec");
            // SAFETY: intentionally jumps where no RAM is.
            unsafe { core::arch::asm!("jmp rax", in("rax") 0xd000_0000u64, options(noreturn)) }
        }
        None => {}
    }

    let mut bsp = Bsp::new(&cfg, tsc_khz);
    match cfg.mode {
        Mode::Idle => {
            publish(su);
            GO.store(true, Ordering::Release);
            bsp.idle_loop()
        }
        Mode::Dirty => {
            let max_pages = cfg.mem_mib.map_or(u64::MAX, |m| m.saturating_mul(MIB / 4096));
            su.region = Region::from_ram(bi.ram, workload_start, max_pages);
            let pages = su.region.pages();
            let n = su.ncpus as u64;
            let mut wss = cfg.wss_mib.unwrap_or(64).saturating_mul(MIB / 4096).min(pages);
            if wss < n && pages >= n {
                wss = n; // at least one page per CPU
            }
            su.wss_pages = wss;
            su.rate_per_cpu = match cfg.rate {
                Rate::Max => 0,
                Rate::PagesPerSec(r) => (r / n).max(1),
            };
            publish(su);
            let t0 = rdtsc();
            // The BSP marks alone: on PVM, parallel first touches were slower.
            write_pages(&su.region, 0, pages, 0, su.fill);
            let ms = (rdtsc() - t0) / tsc_khz;
            let first = su.region.pfn(0).unwrap_or(0);
            say!(
                "MARKED pages={} wss_pages={} first_pfn={:#x} last_pfn={:#x} ms={}",
                pages,
                wss,
                first,
                pages.checked_sub(1).and_then(|i| su.region.pfn(i)).unwrap_or(0),
                ms
            );
            if cfg.verify {
                bsp.verify_print();
            }
            bsp.reset_clock();
            GO.store(true, Ordering::Release);
            dirty_loop(0, Some(&mut bsp))
        }
    }
}

#[unsafe(no_mangle)]
extern "C" fn ap_main(cpu: u64) -> ! {
    let cpu = cpu as usize;
    say!("CPU {} online", cpu);
    PERCPU[cpu].online.store(true, Ordering::Release);
    while !GO.load(Ordering::Acquire) {
        check_pause(cpu);
        core::hint::spin_loop();
    }
    match setup().mode {
        Mode::Dirty => dirty_loop(cpu, None),
        Mode::Idle => loop {
            check_pause(cpu);
            core::hint::spin_loop();
        },
    }
}

// ---------------------------------------------------------------- workload

/// Stores generation `gen` into region pages `[start, start + n)` the way
/// `fill` says.
fn write_pages(region: &Region, start: u64, n: u64, gen: u64, fill: Fill) {
    match fill {
        Fill::Word => write_gen(region, start, n, gen),
        Fill::Random => write_random(region, start, n, gen),
    }
}

/// `fill=word`: one 8-byte store per page.
fn write_gen(region: &Region, start: u64, n: u64, gen: u64) {
    region.for_each_run(start, n, |pfn, cnt, _| {
        let hi = gen << 32;
        let mut p = pfn;
        let end = pfn + cnt;
        while p < end {
            // SAFETY: region pages are RAM outside the image, identity mapped.
            unsafe { write_volatile((p << 12) as *mut u64, hi | (p & 0xffff_ffff)) };
            p += 1;
        }
    });
}

/// `fill=random`: the whole page, the marker word first, then the 511
/// pseudo-random words of (pfn, gen).
fn write_random(region: &Region, start: u64, n: u64, gen: u64) {
    region.for_each_run(start, n, |pfn, cnt, _| {
        for p in pfn..pfn + cnt {
            let base = (p << 12) as *mut u64;
            let seed = random_seed(gen, p);
            // SAFETY: region pages are RAM outside the image, identity mapped;
            // only this CPU writes its slice.
            unsafe {
                write_volatile(base, page_word(gen, p));
                for i in 1..PAGE_WORDS {
                    write_volatile(base.add(i), random_word(seed, i as u64));
                }
            }
        }
    });
}

/// Paces page stores to a rate with the TSC (token bucket, bounded burst so
/// a long pause such as a migration does not cause a catch-up storm).
struct Pacer {
    per_sec: u64,
    khz: u64,
    base: u64,
    used: u64,
    burst: u64,
    batch: u64,
}

impl Pacer {
    fn new(per_sec: u64, khz: u64, batch: u64) -> Self {
        let burst = (per_sec / 20).max(batch);
        Pacer { per_sec, khz, base: rdtsc(), used: 0, burst, batch }
    }

    fn allow(&mut self, now: u64) -> u64 {
        if self.per_sec == 0 {
            return self.batch;
        }
        if now < self.base {
            self.base = now;
            self.used = 0;
        }
        let allowed = ((now - self.base) as u128 * self.per_sec as u128 / (self.khz as u128 * 1000)) as u64;
        let avail = allowed.saturating_sub(self.used);
        if avail > self.burst {
            self.base = now;
            self.used = 0;
            return self.burst.min(self.batch);
        }
        avail.min(self.batch)
    }

    fn used(&mut self, n: u64) {
        self.used += n;
    }
}

/// APs: if the BSP asked for a pause, acknowledge and wait for release.
fn check_pause(cpu: usize) {
    while PAUSE.load(Ordering::Acquire) {
        let e = PAUSE_EPOCH.load(Ordering::Acquire);
        PERCPU[cpu].ack.store(e, Ordering::Release);
        while PAUSE.load(Ordering::Acquire) && PAUSE_EPOCH.load(Ordering::Acquire) == e {
            core::hint::spin_loop();
        }
    }
}

/// Rewrites this CPU's slice of the working set forever, generation by
/// generation; the BSP also does the housekeeping between batches.
fn dirty_loop(cpu: usize, mut bsp: Option<&mut Bsp>) -> ! {
    let s = setup();
    let pc = &PERCPU[cpu];
    let (lo, hi) = slice_of(s.wss_pages, s.ncpus as u64, cpu as u64);
    let len = hi - lo;
    let batch = match s.fill {
        Fill::Word => BATCH,
        Fill::Random => BATCH_RANDOM,
    };
    let mut pacer = Pacer::new(s.rate_per_cpu, s.tsc_khz, batch);
    loop {
        let mut pass_done = false;
        if len > 0 {
            let n = pacer.allow(rdtsc());
            if n > 0 {
                let cursor = pc.cursor.load(Ordering::Relaxed);
                let passes = pc.passes.load(Ordering::Relaxed);
                let n = n.min(len - cursor);
                write_pages(&s.region, lo + cursor, n, passes + 1, s.fill);
                pacer.used(n);
                if cursor + n == len {
                    pc.passes.store(passes + 1, Ordering::Release);
                    pc.cursor.store(0, Ordering::Release);
                    pass_done = true;
                } else {
                    pc.cursor.store(cursor + n, Ordering::Release);
                }
            } else {
                core::hint::spin_loop();
            }
        }
        match bsp.as_deref_mut() {
            Some(b) => b.tick(pass_done),
            None => check_pause(cpu),
        }
    }
}

/// Progress over all CPUs: (completed passes over the whole wss = minimum
/// over CPUs, newest generation in memory, total page stores).
fn totals() -> (u64, u64, u64) {
    let s = setup();
    let (mut min, mut gen, mut total) = (u64::MAX, 0, 0);
    for (cpu, pc) in PERCPU.iter().enumerate().take(s.ncpus) {
        let (lo, hi) = slice_of(s.wss_pages, s.ncpus as u64, cpu as u64);
        if hi == lo {
            continue;
        }
        let p = pc.passes.load(Ordering::Acquire);
        let c = pc.cursor.load(Ordering::Acquire);
        min = min.min(p);
        gen = gen.max(p + (c > 0) as u64);
        total += p * (hi - lo) + c;
    }
    (if min == u64::MAX { 0 } else { min }, gen, total)
}

struct VerifyResult {
    pages: u64,
    /// Pages that differ anywhere.
    bad: u64,
    /// First bad page: (pfn, found word, expected word, byte offset of
    /// that word in the page).
    first: (u64, u64, u64, u64),
}

fn check_run(region: &Region, start: u64, n: u64, gen: u64, fill: Fill, r: &mut VerifyResult) {
    match fill {
        Fill::Word => check_words(region, start, n, gen, r),
        Fill::Random => check_random(region, start, n, gen, r),
    }
}

/// `fill=word`: the marker word of each page.
fn check_words(region: &Region, start: u64, n: u64, gen: u64, r: &mut VerifyResult) {
    region.for_each_run(start, n, |pfn, cnt, _| {
        for p in pfn..pfn + cnt {
            // SAFETY: region pages are RAM, identity mapped.
            let found = unsafe { read_volatile((p << 12) as *const u64) };
            let want = page_word(gen, p);
            if found != want {
                if r.bad == 0 {
                    r.first = (p, found, want, 0);
                }
                r.bad += 1;
            }
        }
        r.pages += cnt;
    });
}

/// `fill=random`: every word (so every byte) of each page.
fn check_random(region: &Region, start: u64, n: u64, gen: u64, r: &mut VerifyResult) {
    region.for_each_run(start, n, |pfn, cnt, _| {
        for p in pfn..pfn + cnt {
            let base = (p << 12) as *const u64;
            let seed = random_seed(gen, p);
            let want = |i: usize| if i == 0 { page_word(gen, p) } else { random_word(seed, i as u64) };
            // SAFETY: region pages are RAM, identity mapped.
            let found = |i: usize| unsafe { read_volatile(base.add(i)) };
            // Branch-free first: OR of all differences, then look closer.
            let mut diff = found(0) ^ page_word(gen, p);
            for i in 1..PAGE_WORDS {
                diff |= found(i) ^ random_word(seed, i as u64);
            }
            if diff != 0 {
                if r.bad == 0 {
                    let i = (0..PAGE_WORDS).find(|&i| found(i) != want(i)).unwrap_or(0);
                    r.first = (p, found(i), want(i), 8 * i as u64);
                }
                r.bad += 1;
            }
        }
        r.pages += cnt;
    });
}

/// Checks every region page against the word the counters say it must hold.
/// All writers must be quiesced.
fn verify_all() -> VerifyResult {
    let s = setup();
    let mut r = VerifyResult { pages: 0, bad: 0, first: (0, 0, 0, 0) };
    if s.mode != Mode::Dirty {
        return r;
    }
    for (cpu, pc) in PERCPU.iter().enumerate().take(s.ncpus) {
        let (lo, hi) = slice_of(s.wss_pages, s.ncpus as u64, cpu as u64);
        let p = pc.passes.load(Ordering::Acquire);
        let c = pc.cursor.load(Ordering::Acquire);
        // Pages before the cursor were rewritten in this pass, the rest not.
        check_run(&s.region, lo, c, expected_gen(p, c, 0), s.fill, &mut r);
        check_run(&s.region, lo + c, hi - lo - c, expected_gen(p, c, c), s.fill, &mut r);
    }
    check_run(&s.region, s.wss_pages, s.region.pages() - s.wss_pages, 0, s.fill, &mut r);
    r
}

// ---------------------------------------------------------------- BSP

/// Writes the `plant=` bytes (checked to lie in the workload region) and says so.
fn plant(p: &Plant) {
    for (i, &b) in p.bytes().iter().enumerate() {
        // SAFETY: RAM of the workload region (checked at boot), identity mapped and writable from ring 3.
        unsafe { core::ptr::write_volatile((p.gpa + i as u64) as *mut u8, b) };
    }
    say!("PLANTED gpa={:#x} len={}", p.gpa, p.len);
}

/// BSP-only housekeeping: host commands, Ctrl-Alt-Del, PROGRESS, passes.
struct Bsp {
    report_ticks: u64,
    poll_ticks: u64,
    passes_target: Option<u64>,
    last_poll: u64,
    last_report: Option<u64>,
    last_pages: u64,
    line: LineBuf,
    cad: CtrlAltDel,
    /// `plant=` with `plant_after=`: the bytes and the TSC at which to write them.
    plant: Option<(Plants, u64)>,
}

impl Bsp {
    fn new(cfg: &Config, khz: u64) -> Self {
        let default_ms = if cfg.mode == Mode::Idle { 1000 } else { 100 };
        Bsp {
            // Idle has no passes to wait for: report=0 means every ~1 ms.
            report_ticks: cfg.report_ms.unwrap_or(default_ms).max((cfg.mode == Mode::Idle) as u64) * khz,
            poll_ticks: khz,
            passes_target: cfg.passes,
            last_poll: rdtsc(),
            last_report: None,
            last_pages: 0,
            line: LineBuf::new(),
            cad: CtrlAltDel::new(),
            plant: cfg.plant_after_ms.map(|ms| (cfg.plants, rdtsc() + ms.saturating_mul(khz))),
        }
    }

    fn reset_clock(&mut self) {
        self.last_poll = rdtsc();
    }

    fn progress(&mut self) {
        let now = rdtsc();
        let (passes, gen, pages) = totals();
        let rate = match self.last_report {
            Some(t) if now > t => {
                ((pages - self.last_pages) as u128 * setup().tsc_khz as u128 * 1000 / (now - t) as u128) as u64
            }
            _ => 0,
        };
        let seq = SEQ.fetch_add(1, Ordering::Relaxed);
        say!("PROGRESS seq={} passes={} gen={} pages={} tsc={} rate={}", seq, passes, gen, pages, now, rate);
        self.last_report = Some(now);
        self.last_pages = pages;
    }

    fn quiesce(&self) {
        let e = PAUSE_EPOCH.fetch_add(1, Ordering::SeqCst) + 1;
        PAUSE.store(true, Ordering::SeqCst);
        for pc in PERCPU.iter().take(setup().ncpus).skip(1) {
            while pc.ack.load(Ordering::Acquire) != e {
                core::hint::spin_loop();
            }
        }
    }

    /// Quiesces the APs, verifies, prints the result; true if OK.
    fn verify_print(&mut self) -> bool {
        self.quiesce();
        let r = verify_all();
        PAUSE.store(false, Ordering::Release);
        if r.bad == 0 {
            say!("VERIFY OK pages={}", r.pages);
        } else {
            let (p, f, w, off) = r.first;
            match setup().fill {
                Fill::Word => say!("VERIFY FAIL page={} found={:#x} expected={:#x} bad={}", p, f, w, r.bad),
                Fill::Random => {
                    say!("VERIFY FAIL page={} found={:#x} expected={:#x} bad={} offset={}", p, f, w, r.bad, off)
                }
            }
        }
        r.bad == 0
    }

    fn shutdown_verified(&mut self) -> ! {
        let status = if setup().mode == Mode::Dirty && !self.verify_print() { 1 } else { 0 };
        say!("EXIT status={}", status);
        hw::exit(status)
    }

    fn poll(&mut self) {
        for _ in 0..64 {
            let Some(b) = hw::serial_get() else { break };
            let cmd = match self.line.push(b).map(cmdline::parse_command) {
                Some(Some(Ok(c))) => c,
                Some(Some(Err(l))) => {
                    say!("ERROR unknown command {}", l);
                    continue;
                }
                _ => continue,
            };
            match cmd {
                Command::Verify => {
                    self.verify_print();
                }
                Command::Status => self.progress(),
                Command::Exit(n) => {
                    say!("EXIT status={}", n);
                    hw::exit(n)
                }
            }
        }
        for _ in 0..16 {
            let Some(b) = hw::kbd_get() else { break };
            if self.cad.feed(b) {
                say!("SHUTDOWN ctrl-alt-del");
                self.shutdown_verified();
            }
        }
    }

    /// Called by the BSP after every batch of page stores.
    /// Writes a delayed plant once its time has come.
    fn maybe_plant(&mut self, now: u64) {
        if let Some((plants, due)) = self.plant {
            if now >= due {
                self.plant = None;
                for p in plants.iter() {
                    plant(p);
                }
            }
        }
    }

    fn tick(&mut self, pass_done: bool) {
        let now = rdtsc();
        self.maybe_plant(now);
        if now.wrapping_sub(self.last_poll) >= self.poll_ticks {
            self.last_poll = now;
            self.poll();
        }
        if pass_done {
            let due = self.last_report.is_none_or(|t| now.wrapping_sub(t) >= self.report_ticks);
            if due {
                self.progress();
            }
            if let Some(n) = self.passes_target {
                if totals().0 >= n {
                    self.progress();
                    self.shutdown_verified();
                }
            }
        }
    }

    fn idle_loop(&mut self) -> ! {
        self.progress();
        loop {
            let now = rdtsc();
            self.maybe_plant(now);
            if now.wrapping_sub(self.last_poll) >= self.poll_ticks {
                self.last_poll = now;
                self.poll();
            }
            if self.last_report.is_none_or(|t| now.wrapping_sub(t) >= self.report_ticks) {
                self.progress();
            }
            core::hint::spin_loop();
        }
    }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    hw::serial_unlock();
    say!("PANIC {}", info);
    hw::exit(3)
}
