//! What a pre-copy migration of the sampled guest would do at a given
//! bandwidth: the rounds, why they end, the final dirty set, the downtime
//! and the total time.
//!
//! The forecast replays the engine's decisions ([`crate::convergence`], the
//! same functions [`crate::precopy`] calls) over the measured working set:
//! a round that lasts `T` is followed by a dirty set of `WSS(T)` pages, the
//! distinct pages the guest dirtied in windows of length `T` (interpolated
//! between the measured window lengths, extended along the last slope
//! beyond the longest). Round 1 sends every populated page; data pages
//! cost [`PAGE_BYTES`] on the wire (as with `--compress none`; compressed
//! pages cost less, so the forecast is then an upper bound), zero pages
//! nothing. With auto-converge the throttle steps as the engine's do and
//! the guest then dirties as if it ran only the unthrottled share of the
//! time. Not modelled: the engine holding back pages dirtied in two rounds
//! running (it changes which round sends them, rarely how many rounds
//! there are), connection setup and the commit (milliseconds on a LAN).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{WssReport, PAGE_BYTES};
use crate::convergence;
use crate::migration::DEFAULT_MIGRATION_ROUNDS;
use crate::precopy::{StopReason, ThrottlePolicy};

/// What the forecast assumes about the migration.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PredictParams {
    /// Link (or `--max-bandwidth` cap), bytes per second.
    pub bandwidth_bytes_per_s: u64,
    /// Pause budget, ms (`--downtime-ms`; the migration default is 5).
    pub downtime_ms: u64,
    /// Most live rounds (the migration default: [`DEFAULT_MIGRATION_ROUNDS`]).
    pub max_rounds: u32,
    /// Auto-converge on (as `ferry migrate` without `--no-throttle`).
    pub throttle: bool,
}

impl PredictParams {
    /// The defaults of `ferry migrate` at this bandwidth.
    pub fn migrate_defaults(bandwidth_bytes_per_s: u64) -> PredictParams {
        PredictParams {
            bandwidth_bytes_per_s,
            downtime_ms: crate::snapshot::DEFAULT_DOWNTIME_MS,
            max_rounds: DEFAULT_MIGRATION_ROUNDS,
            throttle: true,
        }
    }
}

/// One forecast round.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct PredictedRound {
    /// 1-based.
    pub round: u32,
    /// Pages it sends.
    pub pages: u64,
    /// How long it takes, ms.
    pub ms: f64,
    /// Throttle in effect during it, percent.
    pub throttle_percent: u32,
}

/// The forecast.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Prediction {
    /// What it assumed.
    pub params: PredictParams,
    /// The live rounds.
    pub rounds: Vec<PredictedRound>,
    /// Why the live rounds end.
    pub stop_reason: StopReason,
    /// Whether the migration completes: only when the rounds converge (a
    /// migration that does not gives up, and the guest stays).
    pub converges: bool,
    /// Pages left for the pause.
    pub final_pages: u64,
    /// Their copy time while paused, ms (the engine plans it within half
    /// the pause budget; stopping and state capture add 1-3 ms here).
    pub final_copy_ms: f64,
    /// Budget for the final set the engine would compute, pages.
    pub budget_pages: u64,
    /// Live rounds plus the final copy, ms.
    pub total_ms: f64,
    /// Bytes sent, payload only.
    pub bytes: u64,
    /// Throttle at the end, percent (0: none).
    pub throttle_percent: u32,
}

/// The working set over a window of `ms`, pages: interpolated between the
/// measured windows, extended along the last slope (never shrinking)
/// beyond the longest, at most all of RAM.
pub fn wss_at(report: &WssReport, ms: f64) -> f64 {
    if ms <= 0.0 {
        return 0.0;
    }
    let mut pts: Vec<(f64, f64)> = vec![(0.0, 0.0)];
    for w in &report.windows {
        if w.ms.is_finite() && w.ms > pts.last().map(|p| p.0).unwrap_or(0.0) {
            pts.push((w.ms, w.mean_pages));
        }
    }
    let cap = report.ram_pages as f64;
    for p in pts.windows(2) {
        let ((x0, y0), (x1, y1)) = (p[0], p[1]);
        if ms <= x1 {
            return (y0 + (y1 - y0) * (ms - x0) / (x1 - x0)).min(cap);
        }
    }
    let n = pts.len();
    let (xl, yl) = pts[n - 1];
    let slope = if n >= 2 {
        let (xp, yp) = pts[n - 2];
        ((yl - yp) / (xl - xp)).max(0.0)
    } else {
        0.0
    };
    (yl + slope * (ms - xl)).min(cap)
}

/// Forecasts a pre-copy migration of the sampled guest.
pub fn predict(report: &WssReport, params: &PredictParams) -> Prediction {
    let bw = params.bandwidth_bytes_per_s.max(1) as f64;
    let copy_ms = |data_pages: u64| data_pages as f64 * PAGE_BYTES as f64 / bw * 1e3;
    let downtime = Duration::from_millis(params.downtime_ms);
    let policy = ThrottlePolicy::default();
    let mut rounds = Vec::new();

    // Round 1: all populated memory; the rate counts zero pages too, as the engine's does.
    let p1 = report.populated_pages;
    let r1_ms = copy_ms(p1.saturating_sub(report.zero_pages)).max(0.001);
    let mut rate = (p1 as f64 / r1_ms).max(1.0);
    rounds.push(PredictedRound { round: 1, pages: p1, ms: r1_ms, throttle_percent: 0 });
    let mut bytes = p1.saturating_sub(report.zero_pages) * PAGE_BYTES;
    let mut elapsed = r1_ms;
    let mut last_ms = r1_ms;
    let mut pct = 0u32;
    let mut prev = u64::MAX;
    let running = |pct: u32| 1.0 - f64::from(pct) / 100.0;
    // Bounded: the engine's own round limit, and a hard stop for absurd inputs.
    let limit = params.max_rounds.clamp(1, 10_000);
    let (stop_reason, final_pages) = loop {
        let n = wss_at(report, last_ms * running(pct)).round() as u64;
        if n <= convergence::budget_pages(rate, downtime) {
            break (StopReason::Converged, n);
        }
        let ms = copy_ms(n).max(0.001);
        if convergence::updates_rate(n) {
            rate = (n as f64 / ms).max(1.0);
        }
        rounds.push(PredictedRound { round: rounds.len() as u32 + 1, pages: n, ms, throttle_percent: pct });
        bytes += n * PAGE_BYTES;
        elapsed += ms;
        last_ms = ms;
        let count = rounds.len() as u32;
        let not_converging = convergence::not_converging(n, prev);
        prev = n;
        let mut stepped = false;
        if let Some(p) = convergence::throttle_step(count, not_converging, pct, &policy).filter(|_| params.throttle) {
            pct = p;
            stepped = true;
        }
        if let Some(reason) = convergence::stop_after_round(count, limit, not_converging, stepped) {
            break (reason, wss_at(report, last_ms * running(pct)).round() as u64);
        }
    };
    let budget = convergence::budget_pages(rate, downtime);
    let final_copy_ms = copy_ms(final_pages);
    // A migration requires convergence: on any other stop it gives up.
    let converges = stop_reason == StopReason::Converged;
    Prediction {
        params: params.clone(),
        rounds,
        stop_reason,
        converges,
        final_pages,
        final_copy_ms,
        budget_pages: budget,
        total_ms: elapsed + final_copy_ms,
        bytes: bytes + final_pages * PAGE_BYTES,
        throttle_percent: pct,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss::{WssEnd, WssWindow};

    /// A guest that rewrites a set of `wss` pages at `rate` pages/s, as the
    /// test guest's `dirty wss=.. rate=..` does.
    fn cycling(wss: u64, rate: f64, populated: u64) -> WssReport {
        let windows = [100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0]
            .iter()
            .map(|&ms| {
                let pages = (rate * ms / 1e3).min(wss as f64);
                WssWindow {
                    intervals: (ms / 100.0) as u32,
                    ms,
                    windows: 1,
                    mean_pages: pages,
                    max_pages: pages as u64,
                    min_pages: pages as u64,
                }
            })
            .collect();
        WssReport {
            interval_ms: 100,
            duration_ms: 5000,
            end: WssEnd::Completed,
            ram_pages: populated,
            populated_pages: populated,
            zero_pages: 0,
            samples: vec![],
            windows,
            distinct_pages: wss,
            sampler_busy_ms: 0.0,
            max_late_ms: 0.0,
            sample_one_in: 1,
            sample_one_in_requested: 1,
            fault_budget_per_s: 0,
            sample_changes: vec![],
        }
    }

    #[test]
    fn interpolation() {
        let r = cycling(4096, 5000.0, 32768);
        assert_eq!(wss_at(&r, 0.0), 0.0);
        assert!((wss_at(&r, 50.0) - 250.0).abs() < 1e-6);
        assert!((wss_at(&r, 150.0) - 750.0).abs() < 1e-6);
        assert_eq!(wss_at(&r, 60_000.0), 4096.0, "saturated beyond the longest window");
    }

    #[test]
    fn an_idle_guest_converges_after_round_one() {
        let p = predict(&cycling(0, 0.0, 32768), &PredictParams::migrate_defaults(40 << 20));
        assert_eq!(p.rounds.len(), 1);
        assert_eq!(p.stop_reason, StopReason::Converged);
        // 128 MiB at 40 MiB/s.
        assert!((p.total_ms - 3200.0).abs() < 1.0, "{p:?}");
    }

    /// 5,000 pages/s against 10,240 pages/s: each round about halves the
    /// set, so it takes several rounds, not two.
    #[test]
    fn a_dirtying_guest_takes_rounds_that_shrink() {
        let p = predict(&cycling(4096, 5000.0, 32768), &PredictParams::migrate_defaults(40 << 20));
        assert_eq!(p.stop_reason, StopReason::Converged);
        assert_eq!(p.rounds[1].pages, 4096, "round 2: the whole set, dirtied during round 1");
        assert!(p.rounds.len() >= 7 && p.rounds.len() <= 10, "{p:?}");
        for w in p.rounds[1..].windows(2) {
            assert!(w[1].pages < w[0].pages, "{p:?}");
        }
        assert!(p.final_pages <= p.budget_pages);
    }

    /// A guest faster than the link: no throttle, it stops as not converging.
    #[test]
    fn a_guest_faster_than_the_link_does_not_converge() {
        let mut params = PredictParams::migrate_defaults(4 << 20);
        params.throttle = false;
        let p = predict(&cycling(16384, 100_000.0, 65536), &params);
        assert_eq!(p.stop_reason, StopReason::NotConverging);
        assert!(!p.converges);
        assert_eq!(p.rounds.len(), 3);
        params.throttle = true;
        let t = predict(&cycling(16384, 100_000.0, 65536), &params);
        assert!(t.throttle_percent > 0 && t.rounds.len() > 3, "{t:?}");
    }
}
