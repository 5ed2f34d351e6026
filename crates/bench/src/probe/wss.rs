//! `ferry bench wss`: what working-set sampling costs the guest.
//!
//! One guest per workload; phases without and with `ferry wss` sampling
//! (at `--interval`) alternate on the same guest, so drift on a noisy host
//! hits both alike. The guest's own progress rate (page stores per second
//! from its PROGRESS lines, timed by its TSC) in each phase is the figure;
//! the slowdown is 1 - median(with) / median(without).
//!
//! Expect the cost to depend on what the guest writes: each interval the
//! sampler reads the dirty log, KVM write-protects the pages again, and the
//! guest's first write to each of them in the next interval faults. A guest
//! that writes fewer distinct pages per interval than the host can fault
//! in does not notice; one that rewrites megabytes at full speed does.

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::ferry_exe;
use crate::util::median;
use crate::vm::FerryVm;

/// Options of `ferry bench wss`.
#[derive(clap::Args, Debug, Clone)]
pub struct WssBenchArgs {
    /// Guest memory.
    #[arg(long, default_value = "256M", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mem: u64,
    /// Workloads, each the `dirty` words of the guest's command line
    /// (`wss=<MiB> rate=<pages/s|max>`), separated by `;`.
    #[arg(long, default_value = "wss=4 rate=5000;wss=16 rate=50000;wss=16 rate=max", value_delimiter = ';')]
    pub(crate) loads: Vec<String>,
    /// Pairs of phases (without, with sampling) per workload.
    #[arg(long, default_value_t = 3)]
    pub(crate) pairs: u32,
    /// Length of each phase, seconds.
    #[arg(long, default_value_t = 4)]
    pub(crate) phase_s: u64,
    /// Sampling interval (as `ferry wss --interval`).
    #[arg(long, default_value = "100ms")]
    pub(crate) interval: String,
    /// Dirty-log samples to compare (as `ferry wss --sample N`; 1 = exact), comma-separated:
    /// each gets its own alternating phases on the same guest.
    #[arg(long, default_value = "1,64,256", value_delimiter = ',')]
    pub(crate) samples: Vec<u64>,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One workload's figures.
#[derive(Debug, Serialize)]
pub struct WssBenchLoad {
    /// The guest's workload words.
    pub load: String,
    /// The sampler tracked one page in this many (1: exact).
    pub sample_one_in: u64,
    /// Guest progress rate in each phase without sampling, pages/s.
    pub without: Vec<f64>,
    /// Same, with sampling.
    pub with: Vec<f64>,
    /// Median without.
    pub median_without: f64,
    /// Median with.
    pub median_with: f64,
    /// 1 - median_with / median_without, percent.
    pub slowdown_percent: f64,
    /// Mean dirty pages per interval the sampler saw (last phase).
    pub pages_per_interval: f64,
    /// Time the sampler spent reading the dirty log, share of the phase, percent (last phase).
    pub sampler_busy_percent: f64,
}

/// The whole run.
#[derive(Debug, Serialize)]
pub struct WssBench {
    /// Guest memory, bytes.
    pub mem: u64,
    /// Sampling interval.
    pub interval: String,
    /// Phase length, s.
    pub phase_s: u64,
    /// Per workload.
    pub loads: Vec<WssBenchLoad>,
}

/// Runs the bench and prints it.
pub fn wss_bench(a: WssBenchArgs) -> Result<u8> {
    let dir = tempfile::tempdir()?;
    let mut out = WssBench { mem: a.mem, interval: a.interval.clone(), phase_s: a.phase_s, loads: Vec::new() };
    for (i, load) in a.loads.iter().enumerate() {
        let sock = dir.path().join(format!("wss-{i}.sock"));
        let vm = FerryVm::boot_cmdline(&sock, a.mem, &format!("dirty {load} report=100"), Duration::from_secs(180))?;
        for &n in &a.samples {
            match measure(&vm, load, n, &a) {
                Ok(r) => out.loads.push(r),
                Err(e) => {
                    let _ = vm.shutdown(Duration::from_secs(120));
                    return Err(e);
                }
            }
        }
        let _ = vm.shutdown(Duration::from_secs(120));
    }
    if a.json {
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print(&out);
    }
    Ok(0)
}

fn measure(vm: &FerryVm, load: &str, sample: u64, a: &WssBenchArgs) -> Result<WssBenchLoad> {
    let phase = Duration::from_secs(a.phase_s.max(1));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut per_interval, mut busy) = (0.0, 0.0);
    for _ in 0..a.pairs.max(1) {
        let t0 = Instant::now();
        std::thread::sleep(phase);
        without.push(vm.rate_in(t0, Instant::now()).context("no guest progress without sampling")?);
        let t0 = Instant::now();
        let o = Command::new(ferry_exe()?)
            .args(["wss", "--api-sock", &vm.sock.to_string_lossy(), "--interval", &a.interval])
            .args(["--duration", &format!("{}s", a.phase_s.max(1)), "--sample", &sample.to_string(), "--json"])
            .stdin(Stdio::null())
            .output()?;
        let t1 = Instant::now();
        if !o.status.success() {
            bail!("ferry wss failed: {}", String::from_utf8_lossy(&o.stderr).trim());
        }
        with.push(vm.rate_in(t0, t1).context("no guest progress while sampling")?);
        let v: serde_json::Value = serde_json::from_slice(&o.stdout)?;
        let samples = v["report"]["samples"].as_array().cloned().unwrap_or_default();
        if !samples.is_empty() {
            per_interval = samples.iter().filter_map(|s| s["pages"].as_f64()).sum::<f64>() / samples.len() as f64;
        }
        busy = v["report"]["sampler_busy_ms"].as_f64().unwrap_or(0.0) / (a.phase_s.max(1) as f64 * 1e3) * 100.0;
    }
    let (mw, mo) = (median(&without), median(&with));
    Ok(WssBenchLoad {
        load: load.to_string(),
        sample_one_in: sample,
        median_without: mw,
        median_with: mo,
        slowdown_percent: if mw > 0.0 { (1.0 - mo / mw) * 100.0 } else { 0.0 },
        without,
        with,
        pages_per_interval: per_interval,
        sampler_busy_percent: busy,
    })
}

fn print(b: &WssBench) {
    println!(
        "guest progress with and without `ferry wss --interval {}` ({} MiB guest, {} s phases, alternating)",
        b.interval,
        b.mem >> 20,
        b.phase_s
    );
    println!(
        "{:<24} {:>7} {:>16} {:>16} {:>10} {:>16} {:>14}",
        "workload", "sample", "without (p/s)", "with (p/s)", "slowdown", "pages/interval", "sampler busy"
    );
    for l in &b.loads {
        println!(
            "{:<24} {:>7} {:>16.0} {:>16.0} {:>9.1}% {:>16.0} {:>13.3}%",
            l.load,
            format!("1/{}", l.sample_one_in),
            l.median_without,
            l.median_with,
            l.slowdown_percent,
            l.pages_per_interval,
            l.sampler_busy_percent
        );
    }
    println!("(sample 1/N: the sampler tracked one page in N and scaled its counts by N; 1/1 is exact)");
}
