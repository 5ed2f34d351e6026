//! The pre-copy convergence rule, on its own so that the engine that follows
//! it ([`crate::precopy`]) and the predictor that forecasts it
//! ([`crate::wss::predict`]) cannot drift apart.
//!
//! Live rounds go on until the dirty set can be copied within the share of
//! the pause budget planned for it ([`FINAL_COPY_SHARE`]), or the round
//! limit is reached, or the dirty set stops shrinking (by at least 10% a
//! round, judged from round 3 on, unless auto-converge just tightened), and
//! auto-converge tightens the throttle after every round that did not shrink it.

use std::time::Duration;

use crate::precopy::{StopReason, ThrottlePolicy, FINAL_COPY_SHARE};

/// Fewest pages a live round must send for its time to update the delivery
/// rate the rule plans with (1 MiB): a round that sent little measures the
/// round trip, not the link.
pub const MIN_RATE_SAMPLE_PAGES: u64 = 256;

/// A dirty set that shrank by less than this factor in a round is "not
/// converging".
pub const SHRINK_FACTOR: f64 = 0.9;

/// Rounds before "not converging" may end the live phase.
pub const MIN_ROUNDS_BEFORE_GIVING_UP: u32 = 3;

/// Pages that may be left for the final pause: what the measured delivery
/// rate copies in [`FINAL_COPY_SHARE`] of the downtime budget.
pub fn budget_pages(rate_pages_per_ms: f64, downtime: Duration) -> u64 {
    (rate_pages_per_ms * downtime.as_secs_f64() * 1e3 * FINAL_COPY_SHARE) as u64
}

/// Whether a round of `pages` is long enough to re-measure the delivery rate.
pub fn updates_rate(pages: u64) -> bool {
    pages >= MIN_RATE_SAMPLE_PAGES
}

/// Whether the dirty set (`dirty` pages, `prev` after the round before)
/// shrank by less than 10%.
pub fn not_converging(dirty: u64, prev: u64) -> bool {
    dirty as f64 > prev as f64 * SHRINK_FACTOR
}

/// Why the live rounds end after round `rounds` (1-based), if they do:
/// the round limit, or a dirty set that stopped shrinking while
/// auto-converge did not tighten (`stepped`) in this round.
pub fn stop_after_round(rounds: u32, max_rounds: u32, not_converging: bool, stepped: bool) -> Option<StopReason> {
    if rounds >= max_rounds {
        Some(StopReason::MaxRounds)
    } else if rounds >= MIN_ROUNDS_BEFORE_GIVING_UP && not_converging && !stepped {
        Some(StopReason::NotConverging)
    } else {
        None
    }
}

/// Auto-converge: the throttle percent after round `rounds`, when that
/// round did not shrink the dirty set (from round 2 on, up to the cap).
pub fn throttle_step(rounds: u32, not_converging: bool, current: u32, policy: &ThrottlePolicy) -> Option<u32> {
    if rounds < 2 || !not_converging || current >= policy.max_percent {
        return None;
    }
    Some(if current == 0 { policy.initial_percent } else { (current + policy.step_percent).min(policy.max_percent) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn budget_is_the_final_copy_share_of_the_downtime() {
        // 10 pages/ms for 5 ms, half of it planned for the copy.
        assert_eq!(budget_pages(10.0, Duration::from_millis(5)), 25);
        assert_eq!(budget_pages(0.0, Duration::from_millis(5)), 0);
    }

    #[test]
    fn stop_rules() {
        assert!(not_converging(95, 100));
        assert!(!not_converging(89, 100));
        assert_eq!(stop_after_round(2, 30, true, false), None);
        assert_eq!(stop_after_round(3, 30, true, false), Some(StopReason::NotConverging));
        assert_eq!(stop_after_round(3, 30, true, true), None);
        assert_eq!(stop_after_round(30, 30, false, false), Some(StopReason::MaxRounds));
        assert!(updates_rate(256) && !updates_rate(255));
        let p = ThrottlePolicy::default();
        assert_eq!(throttle_step(1, true, 0, &p), None);
        assert_eq!(throttle_step(2, false, 0, &p), None);
        assert_eq!(throttle_step(2, true, 0, &p), Some(20));
        assert_eq!(throttle_step(5, true, 20, &p), Some(30));
        assert_eq!(throttle_step(5, true, 95, &p), Some(99));
        assert_eq!(throttle_step(5, true, 99, &p), None);
    }
}
