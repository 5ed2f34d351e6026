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
use super::{WssEnd, WssError, WssReport, WssRequest, WssSample, PAGE_BYTES};
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
    let view = vm.sampled_dirty_view(DirtyConsumer::WorkingSet, req.sample_one_in)?;
    let id = j.next_id;
    let done = Arc::new(AtomicU64::new(0));
    let (vm2, req2, done2) = (vm.clone(), req.clone(), done.clone());
    std::thread::Builder::new()
        .name("wss".into())
        .spawn(move || {
            let result = run(&vm2, &view, &req2, planned, &done2);
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

fn run(
    vm: &Vm,
    view: &ferry_vmm::DirtyView,
    req: &WssRequest,
    planned: u64,
    done: &AtomicU64,
) -> Result<WssReport, WssError> {
    let regions = vm.ram().regions().to_vec();
    let words: Vec<usize> = regions.iter().map(|r| (r.len / PAGE_BYTES).div_ceil(64) as usize).collect();
    let mut windows = Windows::new(planned, &words);
    let mut samples = Vec::with_capacity(planned as usize);
    let interval = Duration::from_millis(req.interval_ms);
    let t0 = Instant::now();
    let mut last = t0;
    let (mut busy_ms, mut max_late_ms) = (0.0f64, 0.0f64);
    let mut end = WssEnd::Completed;
    let scale = view.sample_one_in();
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
        let pages = count(&bits) * scale;
        windows.push(&bits, len);
        samples.push(WssSample {
            t_ms: ms(taken - t0),
            ms: len,
            pages,
            pages_per_s: if len > 0.0 { pages as f64 / (len / 1e3) } else { 0.0 },
        });
        max_late_ms = max_late_ms.max(ms(taken.saturating_duration_since(due)));
        busy_ms += ms(taken.elapsed());
        done.store(i, Ordering::Relaxed);
    }
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
        windows: windows.report().into_iter().map(|w| w.scaled(scale)).collect(),
        distinct_pages: windows.distinct() * scale,
        sampler_busy_ms: busy_ms,
        max_late_ms,
        sample_one_in: scale,
    })
}
