//! The per-interval series as CSV, for spreadsheets and other plotting tools.

use std::fmt::Write;

use super::{WssReport, PAGE_BYTES};

/// Header and one row per interval: its index (1-based), when it ended
/// (ms since the start), its length (ms), pages dirtied, pages/s and bytes/s.
pub fn samples_csv(report: &WssReport) -> String {
    let mut s = String::from("interval,t_ms,ms,pages,pages_per_s,bytes_per_s\n");
    for (i, x) in report.samples.iter().enumerate() {
        let _ = writeln!(
            s,
            "{},{:.3},{:.3},{},{:.1},{:.0}",
            i + 1,
            x.t_ms,
            x.ms,
            x.pages,
            x.pages_per_s,
            x.pages_per_s * PAGE_BYTES as f64
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wss::{WssEnd, WssSample};

    #[test]
    fn rows() {
        let r = WssReport {
            interval_ms: 100,
            duration_ms: 200,
            end: WssEnd::Completed,
            ram_pages: 10,
            populated_pages: 10,
            zero_pages: 0,
            samples: vec![
                WssSample { t_ms: 100.5, ms: 100.5, pages: 3, pages_per_s: 29.85, sample_one_in: 1 },
                WssSample { t_ms: 200.0, ms: 99.5, pages: 0, pages_per_s: 0.0, sample_one_in: 1 },
            ],
            windows: vec![],
            distinct_pages: 3,
            sampler_busy_ms: 0.1,
            max_late_ms: 0.5,
            sample_one_in: 1,
            sample_one_in_requested: 1,
            fault_budget_per_s: 0,
            sample_changes: vec![],
        };
        let csv = samples_csv(&r);
        let lines: Vec<&str> = csv.lines().collect();
        assert_eq!(lines.len(), 3);
        assert_eq!(lines[1], "1,100.500,100.500,3,29.9,122266");
        assert_eq!(lines[2], "2,200.000,99.500,0,0.0,0");
    }
}
