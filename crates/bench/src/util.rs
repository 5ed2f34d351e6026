//! Small helpers every probe uses: statistics, units, logging.

/// Bytes in a guest page.
pub(crate) const PAGE: u64 = 4096;

/// The median (upper median for an even count); NaN for no samples, so an
/// empty series prints as NaN rather than as a plausible zero.
pub(crate) fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.total_cmp(b));
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

/// The largest sample (NaN for none).
pub(crate) fn max_of(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NAN, f64::max)
}

/// Whole MiB in `b` bytes.
pub(crate) fn mib(b: u64) -> u64 {
    b >> 20
}

/// GB/s for `bytes` moved in `ms` milliseconds (NaN for no time).
pub(crate) fn gbps(bytes: f64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes / (ms / 1e3) / 1e9
    } else {
        f64::NAN
    }
}

/// The integer value of `key=value` in a space-separated line.
pub(crate) fn kv(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// Progress messages go to stderr, so stdout carries only the table or JSON.
pub(crate) fn log(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

/// `p` quoted for `sh -c` (QEMU's `exec:` migration URIs).
pub(crate) fn shell_quote(p: &std::path::Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

/// Milliseconds in an optional duration.
pub(crate) fn ms(d: Option<std::time::Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e3)
}
