//! The sampling job inside the VMM: `PUT /vm/wss` starts it, `GET /vm/wss`
//! reads how far it is and, at the end, its report.
//!
//! One sampler at a time per VMM process (a ferry process serves one VM);
//! a second start gets [`WssError::Busy`] (409). The job holds no VM
//! operation slot: it only takes its own dirty-log view every interval, so
//! pause, resume, snapshots and migrations go on beside it, and it never
//! pauses the guest.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_vmm::{DirtyConsumer, RunState, Vm};
use serde::{Deserialize, Serialize};

use super::windows::Windows;
use super::{SampleChange, WssEnd, WssError, WssReport, WssRequest, WssSample, PAGE_BYTES};
use crate::precopy::{count, is_zero, resident};

/// Longest the sampler thread sleeps before looking whether the VM stopped.
const POLL: Duration = Duration::from_millis(50);

/// What `PUT /vm/wss` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WssStarted {
    /// This run's id (`GET /vm/wss` names it).
    pub id: u64,
    /// Samples it will take.
    pub samples_planned: u64,
    /// Interval, ms.
    pub interval_ms: u64,
}

/// What `GET /vm/wss` answers.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum WssStatus {
    /// No run since the VMM started.
    Idle,
    /// A run is sampling.
    Running {
        /// Its id.
        id: u64,
        /// Samples taken so far.
        samples_done: u64,
        /// Samples it will take.
        samples_planned: u64,
        /// Since it started, ms.
        elapsed_ms: f64,
    },
    /// The last run ended; its report.
    Done {
        /// Its id.
        id: u64,
        /// What it measured.
        report: Box<WssReport>,
    },
    /// The last run failed.
    Failed {
        /// Its id.
        id: u64,
        /// Why.
        error: String,
    },
}

enum Slot {
    Idle,
    Running { id: u64, started: Instant, planned: u64, done: Arc<AtomicU64> },
    Done { id: u64, report: Box<WssReport> },
    Failed { id: u64, error: String },
}

struct Jobs {
    next_id: u64,
    slot: Slot,
}

static JOBS: Mutex<Jobs> = Mutex::new(Jobs { next_id: 1, slot: Slot::Idle });

fn jobs() -> std::sync::MutexGuard<'static, Jobs> {
    // A panic elsewhere while holding the lock leaves plain data behind: use it.
    JOBS.lock().unwrap_or_else(|e| e.into_inner())
}

/// Starts sampling `vm` in a thread of its own; returns at once.
pub fn start(vm: &Arc<Vm>, req: &WssRequest) -> Result<WssStarted, WssError> {
    let planned = req.validate()?;
    if vm.status().state == RunState::Stopped {
        return Err(WssError::Stopped);
    }
    let mut j = jobs();
    if let Slot::Running { id, planned, done, .. } = &j.slot {
        return Err(WssError::Busy { id: *id, done: done.load(Ordering::Relaxed), planned: *planned });
    }
    // The view starts now, so the first interval counts from here.
    let mut view = vm.sampled_dirty_view(DirtyConsumer::WorkingSet, req.sample_one_in)?;
    let id = j.next_id;
    let done = Arc::new(AtomicU64::new(0));
    let (vm2, req2, done2) = (vm.clone(), req.clone(), done.clone());
    std::thread::Builder::new()
        .name("wss".into())
        .spawn(move || {
            let result = run(&vm2, &mut view, &req2, planned, &done2);
            drop(view);
            jobs().slot = match result {
                Ok(report) => Slot::Done { id, report: Box::new(report) },
                Err(e) => Slot::Failed { id, error: e.to_string() },
            };
        })
        .map_err(WssError::Thread)?;
    j.next_id += 1;
    j.slot = Slot::Running { id, started: Instant::now(), planned, done };
    Ok(WssStarted { id, samples_planned: planned, interval_ms: req.interval_ms })
}

/// Where the current or last run is.
pub fn status() -> WssStatus {
    match &jobs().slot {
        Slot::Idle => WssStatus::Idle,
        Slot::Running { id, started, planned, done } => WssStatus::Running {
            id: *id,
            samples_done: done.load(Ordering::Relaxed),
            samples_planned: *planned,
            elapsed_ms: started.elapsed().as_secs_f64() * 1e3,
        },
        Slot::Done { id, report } => WssStatus::Done { id: *id, report: report.clone() },
        Slot::Failed { id, error } => WssStatus::Failed { id: *id, error: error.clone() },
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Sleeps until `due`, waking every [`POLL`] to see whether the VM stopped.
fn sleep_until(vm: &Vm, due: Instant) -> bool {
    loop {
        let now = Instant::now();
        if now >= due {
            return true;
        }
        if vm.status().state == RunState::Stopped {
            return false;
        }
        std::thread::sleep((due - now).min(POLL));
    }
}

/// The density a sampler moves to after an interval in which the guest
/// wrote `sampled` of its sampled pages, against `budget` such writes per
/// interval (each costs a write fault in the next interval too): `one_in`
/// times the power of two that brings the count within the budget, up to
/// [`ferry_vmm::dirty::MAX_SAMPLE_ONE_IN`]; `None` when it fits.
pub fn thinned(one_in: u64, sampled: u64, budget: f64) -> Option<u64> {
    let max = ferry_vmm::dirty::MAX_SAMPLE_ONE_IN;
    if budget <= 0.0 || sampled as f64 <= budget || one_in <= 1 || one_in >= max {
        return None;
    }
    let factor = ((sampled as f64 / budget).ceil() as u64).next_power_of_two().max(2);
    Some(one_in.saturating_mul(factor).min(max))
}

fn run(
    vm: &Vm,
    view: &mut ferry_vmm::DirtyView,
    req: &WssRequest,
    planned: u64,
    done: &AtomicU64,
) -> Result<WssReport, WssError> {
    let regions = vm.ram().regions().to_vec();
    let frames: Vec<(u64, u64)> = regions.iter().map(|r| (r.gpa / PAGE_BYTES, r.len / PAGE_BYTES)).collect();
    let mut windows = Windows::new(planned, &frames);
    let mut samples = Vec::with_capacity(planned as usize);
    let interval = Duration::from_millis(req.interval_ms);
    let t0 = Instant::now();
    let mut last = t0;
    let (mut busy_ms, mut max_late_ms) = (0.0f64, 0.0f64);
    let mut end = WssEnd::Completed;
    let requested = req.sample_one_in;
    let mut changes = Vec::new();
    for i in 1..=planned {
        // Due times from the start, so lateness does not accumulate.
        let due = t0 + interval * i as u32;
        if !sleep_until(vm, due) {
            end = WssEnd::VmStopped;
            break;
        }
        let taken = Instant::now();
        let bits = match view.take() {
            Ok(b) => b,
            // The VM went away while we read (a migration committed): end with what we have.
            Err(_) if vm.status().state == RunState::Stopped => {
                end = WssEnd::VmStopped;
                break;
            }
            Err(e) => return Err(e.into()),
        };
        let len = ms(taken - last);
        last = taken;
        // The view holds only its sample: scale to an estimate of all pages.
        let scale = view.sample_one_in();
        let sampled = count(&bits);
        let pages = sampled * scale;
        windows.push(&bits, len, scale);
        samples.push(WssSample {
            t_ms: ms(taken - t0),
            ms: len,
            pages,
            pages_per_s: if len > 0.0 { pages as f64 / (len / 1e3) } else { 0.0 },
            sample_one_in: scale,
        });
        // Keep the guest's faults on sampled pages within the budget.
        let budget = (req.fault_budget_per_s as f64 * len / 1e3).max(1.0);
        if req.fault_budget_per_s > 0 {
            if let Some(to) = thinned(scale, sampled, budget) {
                let now = view.thin_sample(to)?;
                changes.push(SampleChange {
                    after_sample: i,
                    sampled_pages: sampled,
                    budget_pages: budget,
                    from_one_in: scale,
                    to_one_in: now,
                });
            }
        }
        max_late_ms = max_late_ms.max(ms(taken.saturating_duration_since(due)));
        busy_ms += ms(taken.elapsed());
        done.store(i, Ordering::Relaxed);
    }
    let scale = view.sample_one_in();
    // What a pre-copy's round 1 would look at: resident pages, and how
    // many of them are zero (a read of populated memory, once).
    let (mut populated, mut zero) = (0u64, 0u64);
    for r in &regions {
        let bm = resident(r);
        populated += count(std::slice::from_ref(&bm));
        let mem = r.as_slice();
        for (wi, w) in bm.iter().enumerate() {
            let mut w = *w;
            while w != 0 {
                let p = wi * 64 + w.trailing_zeros() as usize;
                w &= w - 1;
                let off = p * PAGE_BYTES as usize;
                if let Some(page) = mem.get(off..off + PAGE_BYTES as usize) {
                    zero += is_zero(page) as u64;
                }
            }
        }
    }
    Ok(WssReport {
        interval_ms: req.interval_ms,
        duration_ms: req.duration_ms,
        end,
        ram_pages: regions.iter().map(|r| r.len / PAGE_BYTES).sum(),
        populated_pages: populated,
        zero_pages: zero,
        samples,
        windows: windows.report(),
        distinct_pages: windows.distinct(),
        sampler_busy_ms: busy_ms,
        max_late_ms,
        sample_one_in: scale,
        sample_one_in_requested: requested,
        fault_budget_per_s: req.fault_budget_per_s,
        sample_changes: changes,
    })
}

#[cfg(test)]
mod tests {
    use super::thinned;

    #[test]
    fn thinning_brings_the_faults_within_the_budget() {
        // 256 sampled writes against 10 a interval: 32x thinner (256/32 = 8 <= 10).
        assert_eq!(thinned(64, 256, 10.0), Some(2048));
        assert_eq!(thinned(64, 10, 10.0), None);
        assert_eq!(thinned(64, 11, 10.0), Some(128));
        // Capped, and never for an exact sampler or without a budget.
        assert_eq!(thinned(2048, 100_000, 1.0), Some(ferry_vmm::dirty::MAX_SAMPLE_ONE_IN));
        assert_eq!(thinned(ferry_vmm::dirty::MAX_SAMPLE_ONE_IN, 100, 1.0), None);
        assert_eq!(thinned(1, 100_000, 1.0), None);
        assert_eq!(thinned(64, 100_000, 0.0), None);
    }
}
