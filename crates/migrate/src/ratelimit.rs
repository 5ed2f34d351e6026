//! Bandwidth caps for a migration stream: the `RATE` of `ferry migrate
//! --max-bandwidth` and of `max_bandwidth` in `PUT /vm/migrate`, and the
//! token bucket that paces the source's frames to it.
//!
//! Units, as ferry's memory sizes and QEMU's `max-bandwidth` (bytes per
//! second, with 1024-based `K`/`M`/`G` suffixes as in QEMU's HMP and
//! `ferry run --mem`): `100M` is 100 MiB/s = 104,857,600 bytes/s. Bits use
//! the link-speed convention of `tc` and NIC ratings, 1000-based:
//! `1gbit` is 10^9 bits/s = 125,000,000 bytes/s.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Smallest cap accepted: one page frame then takes ~63 ms, well inside
/// any peer timeout; below it the destination would mostly see silence.
pub const MIN_BYTES_PER_S: u64 = 64 << 10;

/// Largest cap accepted (1 TiB/s, far above any link; keeps the arithmetic exact).
pub const MAX_BYTES_PER_S: u64 = 1 << 40;

/// A bandwidth cap in bytes per second, checked to lie in
/// [`MIN_BYTES_PER_S`]..=[`MAX_BYTES_PER_S`]. Serialises as the integer;
/// deserialises from the integer or from a `RATE` string.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "RateRepr", into = "u64")]
pub struct Bandwidth(u64);

/// What a bad `RATE` was, for the CLI's exit 2 and the API's 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RateError {
    /// Nothing given.
    #[error("empty rate: give bytes per second like 100M or 20000K, or bits like 1gbit")]
    Empty,
    /// The number part does not parse.
    #[error("invalid rate {0:?}: expected a number with an optional unit (K, M, G bytes/s; kbit, mbit, gbit bits/s)")]
    BadNumber(String),
    /// An unknown unit.
    #[error("unknown unit {unit:?} in rate {rate:?}: use K, M, G (1024-based bytes/s) or kbit, mbit, gbit (1000-based bits/s)")]
    BadUnit {
        /// The whole input.
        rate: String,
        /// The suffix.
        unit: String,
    },
    /// Outside the accepted range.
    #[error("rate {rate:?} is {bytes} bytes/s, outside {MIN_BYTES_PER_S}..={MAX_BYTES_PER_S} (64K to 1T bytes/s)")]
    OutOfRange {
        /// The input.
        rate: String,
        /// What it came to (saturated).
        bytes: u64,
    },
}

impl Bandwidth {
    /// A cap of `bytes_per_s`, checked against the range.
    pub fn from_bytes_per_s(bytes_per_s: u64) -> Result<Bandwidth, RateError> {
        if !(MIN_BYTES_PER_S..=MAX_BYTES_PER_S).contains(&bytes_per_s) {
            return Err(RateError::OutOfRange { rate: bytes_per_s.to_string(), bytes: bytes_per_s });
        }
        Ok(Bandwidth(bytes_per_s))
    }

    /// Bytes per second.
    pub fn bytes_per_s(self) -> u64 {
        self.0
    }
}

impl From<Bandwidth> for u64 {
    fn from(b: Bandwidth) -> u64 {
        b.0
    }
}

impl std::fmt::Display for Bandwidth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:.1} MiB/s ({:.0} Mbit/s)", self.0 as f64 / 1048576.0, self.0 as f64 * 8.0 / 1e6)
    }
}

impl std::str::FromStr for Bandwidth {
    type Err = RateError;

    /// Parses `RATE`: `104857600`, `100M`, `100MiB`, `1.5G`, `20000K`,
    /// `1gbit`, `100mbit`, `800kbit`, optionally followed by `/s`.
    fn from_str(s: &str) -> Result<Bandwidth, RateError> {
        let t = s.trim();
        let t = t.strip_suffix("/s").unwrap_or(t).trim_end();
        if t.is_empty() {
            return Err(RateError::Empty);
        }
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let unit = unit.trim_start();
        if num.is_empty() || num.starts_with('.') || num.ends_with('.') {
            return Err(RateError::BadNumber(s.to_string()));
        }
        let n: f64 = num.parse().map_err(|_| RateError::BadNumber(s.to_string()))?;
        let bytes_per_unit: f64 = match unit.to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" | "kib" => 1024.0,
            "m" | "mb" | "mib" => 1048576.0,
            "g" | "gb" | "gib" => 1073741824.0,
            "t" | "tb" | "tib" => 1099511627776.0,
            "bit" => 1.0 / 8.0,
            "kbit" => 1e3 / 8.0,
            "mbit" => 1e6 / 8.0,
            "gbit" => 1e9 / 8.0,
            "tbit" => 1e12 / 8.0,
            _ => return Err(RateError::BadUnit { rate: s.to_string(), unit: unit.to_string() }),
        };
        let bytes = n * bytes_per_unit;
        // Saturating: an overflowing rate is reported as out of range.
        let b = if bytes >= u64::MAX as f64 { u64::MAX } else { bytes.round() as u64 };
        if !(MIN_BYTES_PER_S..=MAX_BYTES_PER_S).contains(&b) {
            return Err(RateError::OutOfRange { rate: s.to_string(), bytes: b });
        }
        Ok(Bandwidth(b))
    }
}

/// The JSON forms of a cap: bytes per second or a `RATE` string.
#[derive(Deserialize)]
#[serde(untagged)]
enum RateRepr {
    Bytes(u64),
    Text(String),
}

impl TryFrom<RateRepr> for Bandwidth {
    type Error = RateError;
    fn try_from(r: RateRepr) -> Result<Bandwidth, RateError> {
        match r {
            RateRepr::Bytes(b) => Bandwidth::from_bytes_per_s(b),
            RateRepr::Text(s) => s.parse(),
        }
    }
}

/// Paces a writer to a [`Bandwidth`]: before each frame, waits until the
/// bytes written fit the rate.
///
/// Inside a round the bucket holds up to [`BURST`] bytes of credit, so the
/// time spent encoding a frame is not lost to the rate. At the start of a
/// round ([`TokenBucket::restart`]) the credit saved while idle (the round
/// trip of `RoundEnd`, reading the dirty log) is dropped: from a round's
/// first frame on, bytes sent never exceed the rate times the time since,
/// so the rate the convergence model measures per round is at most the cap.
#[derive(Debug)]
pub struct TokenBucket {
    rate: f64,
    /// Bytes that may be sent now; negative is a debt to wait out.
    tokens: f64,
    last: Instant,
    /// The next frame starts a round: drop saved credit.
    fresh: bool,
    /// Time spent waiting in all.
    pub waited: Duration,
}

/// Most credit a bucket holds within a round: one full page frame.
pub const BURST: f64 = (crate::wire::MAX_RUN_PAGES as u64 * crate::wire::PAGE) as f64 + 64.0;

impl TokenBucket {
    /// A bucket for `cap`, starting empty.
    pub fn new(cap: Bandwidth) -> TokenBucket {
        TokenBucket {
            rate: cap.bytes_per_s() as f64,
            tokens: 0.0,
            last: Instant::now(),
            fresh: true,
            waited: Duration::ZERO,
        }
    }

    /// A round ended: the next frame starts a new one, without the credit saved until then.
    pub fn restart(&mut self) {
        self.fresh = true;
    }

    /// Waits until `bytes` more may be sent, and counts them as sent.
    pub fn take(&mut self, bytes: u64) {
        let now = Instant::now();
        self.tokens = (self.tokens + now.duration_since(self.last).as_secs_f64() * self.rate).min(BURST);
        if std::mem::take(&mut self.fresh) {
            self.tokens = self.tokens.min(0.0);
        }
        self.last = now;
        self.tokens -= bytes as f64;
        if self.tokens < 0.0 {
            let d = Duration::from_secs_f64(-self.tokens / self.rate);
            std::thread::sleep(d);
            self.waited += d;
        }
    }

    /// Pages per frame that keep one frame's wait near 100 ms, so a slow cap
    /// does not leave the peer without a frame for seconds (1..=`max`).
    pub fn pages_per_frame(&self, max: u32) -> u32 {
        ((self.rate * 0.1 / 4096.0) as u32).clamp(1, max)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<u64, RateError> {
        s.parse::<Bandwidth>().map(Bandwidth::bytes_per_s)
    }

    #[test]
    fn bytes_are_1024_based_and_bits_1000_based() {
        assert_eq!(p("104857600"), Ok(104_857_600));
        assert_eq!(p("100M"), Ok(100 << 20));
        assert_eq!(p("100m"), Ok(100 << 20));
        assert_eq!(p("100MiB"), Ok(100 << 20));
        assert_eq!(p("100MB/s"), Ok(100 << 20));
        assert_eq!(p(" 20M "), Ok(20 << 20));
        assert_eq!(p("20000K"), Ok(20000 << 10));
        assert_eq!(p("1.5G"), Ok(3 << 29));
        assert_eq!(p("1G"), Ok(1 << 30));
        assert_eq!(p("1gbit"), Ok(125_000_000));
        assert_eq!(p("1Gbit/s"), Ok(125_000_000));
        assert_eq!(p("100mbit"), Ok(12_500_000));
        assert_eq!(p("800kbit"), Ok(100_000));
        assert_eq!(p("8000000bit"), Ok(1_000_000));
        assert_eq!(p("1T"), Ok(1 << 40));
    }

    #[test]
    fn bad_rates_say_what_is_wrong() {
        assert_eq!(p(""), Err(RateError::Empty));
        assert_eq!(p("/s"), Err(RateError::Empty));
        assert!(matches!(p("fast"), Err(RateError::BadNumber(_))));
        assert!(matches!(p("M"), Err(RateError::BadNumber(_))));
        assert!(matches!(p("1..5M"), Err(RateError::BadNumber(_))));
        assert!(matches!(p(".5M"), Err(RateError::BadNumber(_))));
        assert!(matches!(p("-5M"), Err(RateError::BadNumber(_))));
        assert!(matches!(p("100Mbps"), Err(RateError::BadUnit { .. })));
        assert!(matches!(p("100X"), Err(RateError::BadUnit { .. })));
        assert!(matches!(p("0"), Err(RateError::OutOfRange { bytes: 0, .. })));
        assert!(matches!(p("1K"), Err(RateError::OutOfRange { bytes: 1024, .. })));
        assert!(matches!(p("2T"), Err(RateError::OutOfRange { .. })));
        assert!(matches!(p("99999999999999999999999G"), Err(RateError::OutOfRange { bytes: u64::MAX, .. })));
        let e = p("100X").unwrap_err().to_string();
        assert!(e.contains("\"X\"") && e.contains("mbit"), "{e}");
    }

    #[test]
    fn json_takes_bytes_or_a_rate_and_writes_bytes() {
        let b: Bandwidth = serde_json::from_str("\"20M\"").unwrap();
        assert_eq!(b.bytes_per_s(), 20 << 20);
        let b: Bandwidth = serde_json::from_str("1048576").unwrap();
        assert_eq!(serde_json::to_string(&b).unwrap(), "1048576");
        let e = serde_json::from_str::<Bandwidth>("\"20Q\"").unwrap_err().to_string();
        assert!(e.contains("unknown unit"), "{e}");
        assert!(serde_json::from_str::<Bandwidth>("5").is_err());
        assert!(serde_json::from_str::<Bandwidth>("-5").is_err());
        assert!(serde_json::from_str::<Bandwidth>("true").is_err());
    }

    /// The bucket's arithmetic, checked without the clock: after sending
    /// `n` bytes at least `n / rate` has passed.
    #[test]
    fn the_bucket_never_runs_ahead_of_the_rate() {
        let cap = Bandwidth::from_bytes_per_s(10 << 20).unwrap();
        let mut b = TokenBucket::new(cap);
        let t = Instant::now();
        for _ in 0..20 {
            b.take(64 << 10);
        }
        // 1.25 MiB at 10 MiB/s: at least 125 ms must have passed.
        assert!(t.elapsed() >= Duration::from_millis(125), "{:?}", t.elapsed());
        // Idle credit is dropped at a round start: the next round is paced from zero.
        std::thread::sleep(Duration::from_millis(50));
        b.restart();
        let t = Instant::now();
        for _ in 0..10 {
            b.take(64 << 10);
        }
        assert!(t.elapsed() >= Duration::from_millis(62), "{:?}", t.elapsed());
        assert_eq!(b.pages_per_frame(256), 256);
        let slow = TokenBucket::new(Bandwidth::from_bytes_per_s(MIN_BYTES_PER_S).unwrap());
        assert_eq!(slow.pages_per_frame(256), 1);
    }
}
