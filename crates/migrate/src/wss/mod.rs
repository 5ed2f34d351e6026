//! Working-set sampling (`ferry wss`): how many pages a running guest
//! dirties per interval, how many distinct pages it dirties over longer
//! windows (the writable working set of Clark et al., "Live Migration of
//! Virtual Machines", NSDI 2005), and what a pre-copy migration of it would
//! do at a given bandwidth.
//!
//! The sampler runs inside the VMM process on its own dirty-log view
//! ([`ferry_vmm::DirtyConsumer::WorkingSet`]), so intervals are precise (no
//! HTTP round trip per sample), the guest is never paused for it, and
//! snapshots, migrations and watches keep seeing all of their pages.
//!
//! Layout: [`windows`] (distinct pages over windows, in bounded memory),
//! [`sampler`] (the VMM-side job: one at a time), [`predict`] (pre-copy
//! forecast with [`crate::convergence`], the rule the engine follows),
//! [`plot`] (SVG) and [`csv`] (the per-interval series).

pub mod csv;
pub mod plot;
pub mod predict;
pub mod sampler;
pub mod windows;

use serde::{Deserialize, Serialize};

pub use predict::{predict, PredictParams, PredictedRound, Prediction};
pub use sampler::{start, status, WssStarted, WssStatus};

/// Shortest sampling interval: below it the time to read the dirty log
/// (and the scheduler's noise) is a large part of each interval.
pub const MIN_INTERVAL_MS: u64 = 10;
/// Longest sampling interval.
pub const MAX_INTERVAL_MS: u64 = 60_000;
/// Longest sampling run (10 minutes): a sampler holds a job slot and memory.
pub const MAX_DURATION_MS: u64 = 600_000;
/// Most samples in one run: bounds the report's size.
pub const MAX_SAMPLES: u64 = 10_000;

/// Bytes per guest page.
pub const PAGE_BYTES: u64 = 4096;

/// A sampling run, as `PUT /vm/wss` takes it.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WssRequest {
    /// Length of one sample, ms ([`MIN_INTERVAL_MS`]..=[`MAX_INTERVAL_MS`]).
    pub interval_ms: u64,
    /// Length of the run, ms (at least one interval, at most
    /// [`MAX_DURATION_MS`] and [`MAX_SAMPLES`] intervals).
    pub duration_ms: u64,
    /// Track one page in this many (a power of two, 1..=4096; 1 is exact).
    /// Only sampled pages are re-protected after each read, so a sampler
    /// costs a fast-writing guest that many times fewer write faults;
    /// counts are scaled up by it. Default [`DEFAULT_SAMPLE_ONE_IN`].
    #[serde(default = "default_sample")]
    pub sample_one_in: u64,
    /// Most sampled pages per second the guest may fault on (0: keep the
    /// sample as asked). Each sampled page the guest writes costs it one
    /// write fault per interval, and on a software-paging host a fault
    /// costs ~100 us, so a fixed sample of a guest that rewrites a large
    /// set can cost it tens of percent. Past the budget the sampler thins
    /// its sample (doubling N as often as needed, never back within a run)
    /// and reports each change. Default [`DEFAULT_FAULT_BUDGET_PER_S`];
    /// an exact sampler (`sample_one_in` 1) is never thinned.
    #[serde(default = "default_fault_budget")]
    pub fault_budget_per_s: u64,
}

/// The default fault budget of a sampler: 100 sampled page writes per
/// second, ~1% of a vCPU at ~100 us a fault (see [`WssRequest::fault_budget_per_s`]).
pub const DEFAULT_FAULT_BUDGET_PER_S: u64 = 100;

/// Largest fault budget a request may ask for.
pub const MAX_FAULT_BUDGET_PER_S: u64 = 1_000_000;

fn default_fault_budget() -> u64 {
    DEFAULT_FAULT_BUDGET_PER_S
}

/// The default dirty-log sample: one page in 64 (see [`WssRequest::sample_one_in`]).
pub const DEFAULT_SAMPLE_ONE_IN: u64 = 64;

fn default_sample() -> u64 {
    DEFAULT_SAMPLE_ONE_IN
}

fn one() -> u64 {
    1
}

impl WssRequest {
    /// Checks the limits; the error says which and what is allowed.
    pub fn validate(&self) -> Result<u64, WssError> {
        let bad = |what: String| Err(WssError::Invalid(what));
        if !(MIN_INTERVAL_MS..=MAX_INTERVAL_MS).contains(&self.interval_ms) {
            return bad(format!(
                "interval_ms {} is outside {MIN_INTERVAL_MS}..={MAX_INTERVAL_MS} (milliseconds)",
                self.interval_ms
            ));
        }
        if self.duration_ms > MAX_DURATION_MS {
            return bad(format!("duration_ms {} exceeds the limit of {MAX_DURATION_MS} ms", self.duration_ms));
        }
        if self.duration_ms < self.interval_ms {
            return bad(format!(
                "duration_ms {} is shorter than one interval ({} ms)",
                self.duration_ms, self.interval_ms
            ));
        }
        if !self.sample_one_in.is_power_of_two() || self.sample_one_in > ferry_vmm::dirty::MAX_SAMPLE_ONE_IN {
            return bad(format!(
                "sample_one_in {} must be a power of two from 1 (exact) to {}",
                self.sample_one_in,
                ferry_vmm::dirty::MAX_SAMPLE_ONE_IN
            ));
        }
        if self.fault_budget_per_s > MAX_FAULT_BUDGET_PER_S {
            return bad(format!(
                "fault_budget_per_s {} exceeds {MAX_FAULT_BUDGET_PER_S} (0 keeps the sample fixed)",
                self.fault_budget_per_s
            ));
        }
        let samples = self.duration_ms / self.interval_ms;
        if samples > MAX_SAMPLES {
            return bad(format!(
                "{samples} samples ({} ms / {} ms) exceed the limit of {MAX_SAMPLES}; use a longer interval",
                self.duration_ms, self.interval_ms
            ));
        }
        Ok(samples)
    }
}

/// Why a sampling run could not start or failed.
#[derive(Debug, thiserror::Error)]
pub enum WssError {
    /// The request is outside the limits.
    #[error("invalid working-set request: {0}")]
    Invalid(String),
    /// Another sampler runs on this VM.
    #[error("a working-set sampler is already running (run {id}, {done} of {planned} samples); wait for it to end")]
    Busy {
        /// The running sampler's id.
        id: u64,
        /// Samples it has taken.
        done: u64,
        /// Samples it will take.
        planned: u64,
    },
    /// The VM has stopped.
    #[error("VM has stopped: cannot sample its working set")]
    Stopped,
    /// The dirty log could not be read.
    #[error("working-set sampler: {0}")]
    Vm(#[from] ferry_vmm::Error),
    /// The sampler thread could not be started.
    #[error("working-set sampler: cannot start its thread: {0}")]
    Thread(std::io::Error),
}

/// How a run ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WssEnd {
    /// Every planned sample was taken.
    Completed,
    /// The VM stopped (or migrated away) before the end.
    VmStopped,
}

/// One interval.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WssSample {
    /// When the interval ended, ms since the run started.
    pub t_ms: f64,
    /// How long it really lasted, ms.
    pub ms: f64,
    /// Pages the guest dirtied in it.
    pub pages: u64,
    /// Dirty rate, pages per second.
    pub pages_per_s: f64,
    /// The sample this interval was tracked with (one page in this many);
    /// `pages` is its count times this.
    #[serde(default = "one")]
    pub sample_one_in: u64,
}

/// Distinct pages dirtied over windows of one length.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WssWindow {
    /// Intervals per window.
    pub intervals: u32,
    /// Mean window length, ms.
    pub ms: f64,
    /// Windows measured (consecutive, not overlapping).
    pub windows: u32,
    /// Mean distinct pages per window: the working set for this length.
    pub mean_pages: f64,
    /// Largest window.
    pub max_pages: u64,
    /// Smallest window.
    pub min_pages: u64,
}

/// What a sampling run measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WssReport {
    /// Requested interval, ms.
    pub interval_ms: u64,
    /// Requested duration, ms.
    pub duration_ms: u64,
    /// How the run ended.
    pub end: WssEnd,
    /// Guest RAM, pages.
    pub ram_pages: u64,
    /// Pages resident at the end (what a pre-copy's round 1 looks at).
    pub populated_pages: u64,
    /// Of those, pages that are all zero (sent as zero runs, nearly free).
    pub zero_pages: u64,
    /// Every interval, in order.
    pub samples: Vec<WssSample>,
    /// The working set by window length, shortest first.
    pub windows: Vec<WssWindow>,
    /// Distinct pages dirtied over the whole run.
    pub distinct_pages: u64,
    /// Time the sampler spent reading the dirty log and counting, ms in all.
    pub sampler_busy_ms: f64,
    /// Latest an interval ended after its due time, ms.
    pub max_late_ms: f64,
    /// Pages were tracked one in this many (1: exactly); every page count
    /// above is the sample's count times this (an estimate when above 1).
    #[serde(default = "one")]
    pub sample_one_in: u64,
    /// The sample the run was asked to start with.
    #[serde(default = "one")]
    pub sample_one_in_requested: u64,
    /// The fault budget it kept to (0: none; the sample stayed fixed).
    #[serde(default)]
    pub fault_budget_per_s: u64,
    /// Each time the sampler thinned its sample to stay within the budget.
    #[serde(default)]
    pub sample_changes: Vec<SampleChange>,
}

/// The sampler thinned its sample after an interval that faulted more than its budget allows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SampleChange {
    /// After which interval (1-based).
    pub after_sample: u64,
    /// Sampled pages the guest wrote in that interval.
    pub sampled_pages: u64,
    /// The budget per interval they exceeded.
    pub budget_pages: f64,
    /// Density before, one page in this many.
    pub from_one_in: u64,
    /// Density after.
    pub to_one_in: u64,
}

/// What `ferry wss` reports: the measurement and, with `--bandwidth`, the
/// migration forecast.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct WssOutcome {
    /// What the sampler measured.
    pub report: WssReport,
    /// The pre-copy forecast, when a bandwidth was given.
    pub prediction: Option<Prediction>,
}

/// Parses a duration with a unit: `100ms`, `10s`, `2m` (whole numbers or
/// decimals; `1.5s`). A bare number is refused: ms or s would be a guess.
pub fn parse_duration_ms(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let (num, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1e3)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60e3)
    } else {
        return Err(format!("{s:?} needs a unit: ms, s or m (e.g. 100ms, 10s, 2m)"));
    };
    let v: f64 = num.trim().parse().map_err(|_| format!("{s:?} is not a number with a unit (e.g. 100ms, 10s)"))?;
    if !v.is_finite() || v < 0.0 {
        return Err(format!("{s:?} must be zero or more"));
    }
    let ms = v * scale;
    if ms > u64::MAX as f64 / 2.0 {
        return Err(format!("{s:?} is too long"));
    }
    Ok(ms.round() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_need_units() {
        assert_eq!(parse_duration_ms("100ms"), Ok(100));
        assert_eq!(parse_duration_ms("10s"), Ok(10_000));
        assert_eq!(parse_duration_ms("1.5s"), Ok(1500));
        assert_eq!(parse_duration_ms("2m"), Ok(120_000));
        for bad in ["100", "fast", "-1s", "1e400s", "s", ""] {
            assert!(parse_duration_ms(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn request_limits() {
        let r = |interval_ms, duration_ms| {
            WssRequest { interval_ms, duration_ms, sample_one_in: 64, fault_budget_per_s: 100 }.validate()
        };
        assert_eq!(r(100, 10_000).unwrap(), 100);
        assert!(r(0, 1000).is_err());
        assert!(r(9, 1000).is_err());
        assert!(r(100, 50).is_err());
        assert!(r(100, MAX_DURATION_MS + 1).is_err());
        assert!(r(10, MAX_DURATION_MS).is_err(), "60,000 samples exceed the sample limit");
        let e = r(0, 1000).unwrap_err().to_string();
        assert!(e.contains("interval_ms") && e.contains("10..=60000"), "{e}");
    }
}
