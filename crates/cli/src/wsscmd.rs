//! `ferry wss`: starts the VMM's working-set sampler, follows it, and
//! prints (or writes) what it measured and the migration forecast.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Args;
use ferry_migrate::ratelimit::Bandwidth;
use ferry_migrate::wss::{self, PredictParams, WssOutcome, WssReport, WssRequest, WssStarted, WssStatus};

use crate::http;

/// Options of `ferry wss`.
#[derive(Args)]
pub struct WssArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// Length of one sample: 10ms to 60s (ms, s or m).
    #[arg(long, default_value = "100ms", value_parser = parse_interval)]
    interval: u64,
    /// How long to sample: up to 10m.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    duration: u64,
    /// Track one page in N (a power of two; 1 = every page, exact). Sampling
    /// keeps the cost to a fast-writing guest small; counts are scaled by N.
    #[arg(long, value_name = "N", default_value_t = wss::DEFAULT_SAMPLE_ONE_IN)]
    sample: u64,
    /// Track every page (the same as `--sample 1`).
    #[arg(long, conflicts_with = "sample")]
    exact: bool,
    /// Most sampled page writes per second to let the guest fault on (0:
    /// keep the sample fixed). Past it the sampler thins its sample (N
    /// doubles) so that it costs the guest about 1% at ~100 us a fault.
    #[arg(long, value_name = "PAGES_PER_S", default_value_t = wss::DEFAULT_FAULT_BUDGET_PER_S)]
    fault_budget: u64,
    /// Forecast a pre-copy migration at this rate (as `ferry migrate
    /// --max-bandwidth`: K, M, G bytes/s, 1024-based; kbit, mbit, gbit bits/s).
    #[arg(long, value_name = "RATE")]
    bandwidth: Option<Bandwidth>,
    /// Pause budget of the forecast migration, ms.
    #[arg(long, default_value_t = ferry_migrate::snapshot::DEFAULT_DOWNTIME_MS)]
    downtime_ms: u64,
    /// Most pre-copy rounds of the forecast (default: the migration's).
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Forecast without auto-converge (as `ferry migrate --no-throttle`).
    #[arg(long)]
    no_throttle: bool,
    /// Write the per-interval series as CSV here.
    #[arg(long)]
    csv: Option<PathBuf>,
    /// Draw dirty pages per interval and the working set by window into this SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
}

fn parse_interval(s: &str) -> Result<u64, String> {
    let ms = wss::parse_duration_ms(s)?;
    if !(wss::MIN_INTERVAL_MS..=wss::MAX_INTERVAL_MS).contains(&ms) {
        return Err(format!("{s} is outside {}ms..={}s", wss::MIN_INTERVAL_MS, wss::MAX_INTERVAL_MS / 1000));
    }
    Ok(ms)
}

fn parse_duration(s: &str) -> Result<u64, String> {
    let ms = wss::parse_duration_ms(s)?;
    if ms == 0 || ms > wss::MAX_DURATION_MS {
        return Err(format!("{s} is outside 1ms..={}m", wss::MAX_DURATION_MS / 60_000));
    }
    Ok(ms)
}

/// Runs `ferry wss`.
pub fn run(a: WssArgs) -> Result<u8> {
    let sample_one_in = if a.exact { 1 } else { a.sample };
    let req = WssRequest {
        interval_ms: a.interval,
        duration_ms: a.duration,
        sample_one_in,
        fault_budget_per_s: a.fault_budget,
    };
    req.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    let body = serde_json::to_value(&req)?;
    let started: WssStarted =
        serde_json::from_value(http::request(&a.api_sock, "PUT", "/vm/wss", Some(&body), Duration::from_secs(10))?)
            .context("unexpected answer to PUT /vm/wss")?;
    let report = follow(&a.api_sock, &started, a.duration)?;
    if report.sample_one_in == 1 && sample_one_in > 1 && !a.json {
        eprintln!(
            "ferry: this host has no manual dirty-log protection (KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2): \
             every page was tracked, and sampling slowed a fast-writing guest as --exact does"
        );
    }
    let prediction = a.bandwidth.map(|b| {
        let mut p = PredictParams::migrate_defaults(b.bytes_per_s());
        p.downtime_ms = a.downtime_ms;
        p.throttle = !a.no_throttle;
        if let Some(r) = a.max_rounds {
            p.max_rounds = r;
        }
        wss::predict(&report, &p)
    });
    if let Some(path) = &a.csv {
        std::fs::write(path, wss::csv::samples_csv(&report))
            .with_context(|| format!("writing the CSV to {}", path.display()))?;
    }
    if let Some(path) = &a.plot {
        wss::plot::plot_wss(&report, prediction.as_ref(), path)?;
    }
    let out = WssOutcome { report, prediction };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_human(&out);
    }
    Ok(0)
}

/// Polls `GET /vm/wss` until our run ends; shows progress on a terminal.
fn follow(sock: &Path, started: &WssStarted, duration_ms: u64) -> Result<WssReport> {
    let tty = std::io::stderr().is_terminal();
    // Generous: the run itself, then the count of populated pages at the end.
    let deadline = Instant::now() + Duration::from_millis(duration_ms) + Duration::from_secs(120);
    let poll = Duration::from_millis(started.interval_ms.clamp(20, 250));
    let mut shown = false;
    loop {
        if Instant::now() > deadline {
            bail!("the working-set sampler (run {}) did not finish in time", started.id);
        }
        std::thread::sleep(poll);
        let v = http::request(sock, "GET", "/vm/wss", None, Duration::from_secs(10))?;
        let st: WssStatus = serde_json::from_value(v).context("unexpected answer to GET /vm/wss")?;
        match st {
            WssStatus::Running { id, samples_done, samples_planned, elapsed_ms } if id == started.id => {
                if tty {
                    eprint!("\r\x1b[Kwss: {samples_done}/{samples_planned} samples, {:.1} s", elapsed_ms / 1e3);
                    shown = true;
                }
            }
            WssStatus::Done { id, report } if id == started.id => {
                if shown {
                    eprint!("\r\x1b[K");
                }
                return Ok(*report);
            }
            WssStatus::Failed { id, error } if id == started.id => bail!("the working-set sampler failed: {error}"),
            other => bail!(
                "the working-set sampler (run {}) was replaced by another: {}",
                started.id,
                serde_json::to_string(&other).unwrap_or_default()
            ),
        }
    }
}

fn mib(pages: f64) -> f64 {
    pages * wss::PAGE_BYTES as f64 / 1048576.0
}

fn fmt_window(ms: f64) -> String {
    if ms >= 1000.0 {
        format!("{:.2} s", ms / 1e3)
    } else {
        format!("{ms:.0} ms")
    }
}

/// Tables for a person.
fn print_human(out: &WssOutcome) {
    let r = &out.report;
    let n = r.samples.len();
    let end = match r.end {
        wss::WssEnd::Completed => "completed",
        wss::WssEnd::VmStopped => "ended early: the VM stopped",
    };
    println!(
        "{n} intervals of {} ms ({end}); RAM {} pages, {} populated ({} zero)",
        r.interval_ms, r.ram_pages, r.populated_pages, r.zero_pages
    );
    if r.sample_one_in > 1 {
        println!(
            "tracked one page in {} (counts are that sample's, times {}: estimates; --exact tracks every page)",
            r.sample_one_in, r.sample_one_in
        );
    }
    for c in &r.sample_changes {
        println!(
            "after interval {}: the guest wrote {} sampled pages, over the budget of {:.0} (--fault-budget {}/s): \
             sample thinned from 1/{} to 1/{}",
            c.after_sample, c.sampled_pages, c.budget_pages, r.fault_budget_per_s, c.from_one_in, c.to_one_in
        );
    }
    if n > 0 {
        let pages: Vec<u64> = r.samples.iter().map(|s| s.pages).collect();
        let mean = pages.iter().sum::<u64>() as f64 / n as f64;
        let rate = r.samples.iter().map(|s| s.pages_per_s).sum::<f64>() / n as f64;
        println!(
            "dirtied per interval: mean {mean:.0} pages ({:.2} MiB), min {}, max {}; mean dirty rate {rate:.0} pages/s ({:.1} MiB/s)",
            mib(mean),
            pages.iter().min().unwrap_or(&0),
            pages.iter().max().unwrap_or(&0),
            mib(rate)
        );
    }
    const MAX_ROWS: usize = 30;
    if n <= MAX_ROWS {
        println!("\n{:>8} {:>9} {:>10} {:>12} {:>9}", "interval", "end (s)", "pages", "pages/s", "MiB/s");
        for (i, s) in r.samples.iter().enumerate() {
            println!(
                "{:>8} {:>9.2} {:>10} {:>12.0} {:>9.1}",
                i + 1,
                s.t_ms / 1e3,
                s.pages,
                s.pages_per_s,
                mib(s.pages_per_s)
            );
        }
    } else {
        println!("({n} intervals; --csv FILE writes each one)");
    }
    println!("\nworking set (distinct pages dirtied) by window length:");
    println!("{:>10} {:>8} {:>12} {:>10} {:>10} {:>10}", "window", "windows", "mean pages", "MiB", "min", "max");
    for w in &r.windows {
        println!(
            "{:>10} {:>8} {:>12.0} {:>10.2} {:>10} {:>10}",
            fmt_window(w.ms),
            w.windows,
            w.mean_pages,
            mib(w.mean_pages),
            w.min_pages,
            w.max_pages
        );
    }
    println!("whole run: {} distinct pages ({:.2} MiB)", r.distinct_pages, mib(r.distinct_pages as f64));
    if let Some(p) = &out.prediction {
        println!(
            "\npre-copy forecast at {:.1} MiB/s, pause budget {} ms{}:",
            p.params.bandwidth_bytes_per_s as f64 / 1048576.0,
            p.params.downtime_ms,
            if p.params.throttle { ", auto-converge on" } else { ", no auto-converge" }
        );
        println!("{:>6} {:>10} {:>10} {:>9}", "round", "pages", "ms", "throttle");
        for x in &p.rounds {
            println!("{:>6} {:>10} {:>10.1} {:>8}%", x.round, x.pages, x.ms, x.throttle_percent);
        }
        let reason = serde_json::to_value(p.stop_reason).ok().and_then(|v| v.as_str().map(String::from));
        println!(
            "stops: {}; final set {} pages (budget {}), {:.2} ms to copy while paused; total {:.2} s, {:.1} MiB sent{}",
            reason.unwrap_or_default().replace('_', " "),
            p.final_pages,
            p.budget_pages,
            p.final_copy_ms,
            p.total_ms / 1e3,
            p.bytes as f64 / 1048576.0,
            if p.converges { "" } else { "; the migration would give up (the guest stays)" }
        );
    }
    let span = r.samples.last().map(|s| s.t_ms).unwrap_or(0.0);
    println!(
        "\nsampler: {:.1} ms reading the dirty log over {:.1} s, latest sample {:.1} ms late",
        r.sampler_busy_ms,
        span / 1e3,
        r.max_late_ms
    );
}
