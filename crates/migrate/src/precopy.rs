//! The pre-copy engine: copy all memory while the guest runs, re-copy what
//! it dirtied in rounds until the rest fits the downtime budget, then pause,
//! copy the last dirty pages, capture device and vCPU state, and resume.
//! Live snapshot uses it with a file sink; live migration with a transport.

use std::time::{Duration, Instant};

use ferry_vmm::{RamRegion, Vm, VmState};
use serde::Serialize;

use crate::sink::PageSink;
use crate::Result;

const PAGE: usize = 4096;

/// How a pre-copy runs.
#[derive(Clone, Debug)]
pub struct PrecopyConfig {
    /// Copy while the guest runs (false: pause first, copy, resume — "stop the world").
    pub live: bool,
    /// Most live rounds before the final pause.
    pub max_rounds: u32,
    /// Pause-time budget: iterate until the dirty set is small enough to copy within it.
    pub downtime_target: Duration,
    /// Hash all guest memory at the final pause (adds the hash time to the pause).
    pub digest: bool,
    /// Copy only the pages dirtied since dirty logging was last read (an
    /// incremental image over the previous snapshot), instead of all memory.
    pub incremental: bool,
}

impl Default for PrecopyConfig {
    fn default() -> Self {
        PrecopyConfig {
            live: true,
            max_rounds: 8,
            downtime_target: Duration::from_millis(5),
            digest: false,
            incremental: false,
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

/// What a pre-copy did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PrecopyStats {
    /// Whole operation.
    pub total_ms: f64,
    /// How long the guest was paused.
    pub pause_ms: f64,
    /// Of the pause, time spent hashing memory for `memory_digest`.
    pub digest_ms: f64,
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
    /// Why iteration stopped: converged, max_rounds, not_converging, or paused (stop-the-world).
    pub stop_reason: String,
}

/// Bitmap of pages to visit in one region (one bit per page).
type Bitmap = Vec<u64>;

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn count(bms: &[Bitmap]) -> u64 {
    bms.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

/// Pages of the region that are resident (ever touched); the others are zero.
fn resident(region: &RamRegion) -> Bitmap {
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

fn is_zero(page: &[u8]) -> bool {
    // SAFETY: every bit pattern is a valid u128.
    let (pre, words, post) = unsafe { page.align_to::<u128>() };
    pre.iter().all(|b| *b == 0) && post.iter().all(|b| *b == 0) && words.iter().fold(0u128, |a, w| a | w) == 0
}

/// Sends the pages marked in `bms`, coalescing runs; returns (data pages, zero pages).
fn send(regions: &[RamRegion], bms: &[Bitmap], sink: &mut dyn PageSink) -> Result<(u64, u64)> {
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
    Ok(RoundStats { pages: count(bms), data_pages, zero_pages, ms: ms(t.elapsed()), paused })
}

/// Runs a pre-copy of `vm` into `sink` and returns the VM state captured at
/// the final pause. The guest is running again when this returns (unless it
/// was paused before), also on error.
pub fn precopy(vm: &Vm, sink: &mut dyn PageSink, cfg: &PrecopyConfig) -> Result<(VmState, PrecopyStats)> {
    let t0 = Instant::now();
    let was_paused = vm.is_paused();
    let regions: Vec<RamRegion> = vm.ram().regions().to_vec();
    let mut stats = PrecopyStats::default();
    // Dirty logging stays on after a snapshot so the next one can be incremental.
    vm.set_dirty_logging(true)?;

    let result = (|| -> Result<VmState> {
        let live = cfg.live && !was_paused;
        let mut pause_start = None;
        if !live {
            vm.pause()?;
            pause_start = Some(Instant::now());
        }
        // Round 1: everything populated, or what changed since the last snapshot.
        let first: Vec<Bitmap> = if cfg.incremental {
            vm.take_dirty_log()?
        } else {
            let _ = vm.take_dirty_log()?; // start a clean log
            let bms: Vec<Bitmap> = regions.iter().map(resident).collect();
            let total: u64 = regions.iter().map(|r| r.len / PAGE as u64).sum();
            stats.unpopulated_pages_skipped = total - count(&bms);
            bms
        };
        let r1 = round(&regions, &first, sink, !live)?;
        let mut rate_pages_per_ms = (r1.pages as f64 / r1.ms.max(0.001)).max(1.0);
        stats.rounds.push(r1);
        stats.stop_reason = "paused".into();
        if live {
            let budget_pages = |rate: f64| (rate * ms(cfg.downtime_target)) as u64;
            let mut prev = u64::MAX;
            loop {
                let dirty = vm.take_dirty_log()?;
                let n = count(&dirty);
                if n <= budget_pages(rate_pages_per_ms) {
                    // Small enough: leave it for the pause. KVM has cleared
                    // these bits, so stash them for the final round.
                    stats.stop_reason = "converged".into();
                    vm.pause()?;
                    pause_start = Some(Instant::now());
                    let rest = vm.take_dirty_log()?;
                    let merged: Vec<Bitmap> =
                        dirty.iter().zip(&rest).map(|(a, b)| a.iter().zip(b).map(|(x, y)| x | y).collect()).collect();
                    stats.rounds.push(round(&regions, &merged, sink, true)?);
                    break;
                }
                let r = round(&regions, &dirty, sink, false)?;
                if r.ms > 0.0 {
                    rate_pages_per_ms = (r.pages as f64 / r.ms).max(1.0);
                }
                stats.rounds.push(r);
                let rounds = stats.rounds.len() as u32;
                let not_converging = n as f64 > prev as f64 * 0.9;
                prev = n;
                if rounds >= cfg.max_rounds || (rounds >= 3 && not_converging) {
                    stats.stop_reason = if rounds >= cfg.max_rounds { "max_rounds" } else { "not_converging" }.into();
                    vm.pause()?;
                    pause_start = Some(Instant::now());
                    let rest = vm.take_dirty_log()?;
                    stats.rounds.push(round(&regions, &rest, sink, true)?);
                    break;
                }
            }
        } else {
            // Stop-the-world: anything written between reading the log and pausing.
            let rest = vm.take_dirty_log()?;
            if count(&rest) > 0 {
                stats.rounds.push(round(&regions, &rest, sink, true)?);
            }
        }
        if cfg.digest {
            let t = Instant::now();
            stats.memory_digest = Some(vm.ram().digest().to_hex().to_string());
            stats.digest_ms = ms(t.elapsed());
        }
        let state = vm.save_state()?;
        if !was_paused {
            vm.resume()?;
        }
        if let Some(p) = pause_start {
            stats.pause_ms = ms(p.elapsed());
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
    fn resident_sees_only_touched_pages() {
        let ram = ferry_vmm::GuestRam::new(16 << 20).unwrap();
        ram.write(0x5000, &[1]).unwrap();
        let bm = resident(&ram.regions()[0]);
        assert_eq!(count(std::slice::from_ref(&bm)), 1);
        assert_ne!(bm[0] & (1 << 5), 0);
    }
}
