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
use crate::probe::host::sched::vcpu_sched;
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
    /// Fault budgets to compare for each sample above 1 (as `ferry wss
    /// --fault-budget`; 0 keeps the sample fixed), comma-separated.
    #[arg(long, default_value = "0,100", value_delimiter = ',')]
    pub(crate) fault_budgets: Vec<u64>,
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
    /// The sampler's fault budget, sampled page writes per second (0: fixed sample).
    pub fault_budget_per_s: u64,
    /// The sample it ended with (last phase), one page in this many.
    pub final_one_in: u64,
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
    /// Share of each phase the guest's vCPUs were on a CPU, without sampling.
    pub cpu_share_without: Vec<f64>,
    /// Same, with sampling.
    pub cpu_share_with: Vec<f64>,
    /// The same slowdown per second the vCPUs were on a CPU (progress over
    /// on-CPU time, medians): what the sampler itself cost the guest, apart
    /// from other programs taking its CPU on a shared machine. Write faults
    /// are handled on the vCPU's thread, so they count as its CPU time.
    pub slowdown_per_cpu_percent: f64,
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
            // An exact sampler is never thinned: one budget is enough for it.
            let budgets = if n == 1 { &a.fault_budgets[..a.fault_budgets.len().min(1)] } else { &a.fault_budgets[..] };
            for &budget in budgets {
                match measure(&vm, load, n, budget, &a) {
                    Ok(r) => out.loads.push(r),
                    Err(e) => {
                        let _ = vm.shutdown(Duration::from_secs(120));
                        return Err(e);
                    }
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

fn measure(vm: &FerryVm, load: &str, sample: u64, budget: u64, a: &WssBenchArgs) -> Result<WssBenchLoad> {
    let phase = Duration::from_secs(a.phase_s.max(1));
    let (mut without, mut with) = (Vec::new(), Vec::new());
    let (mut share_without, mut share_with) = (Vec::new(), Vec::new());
    let pid = vm.kid.child.id();
    // Share of [t0, now] the vCPU threads were on a CPU, from schedstat.
    let cpu_at = || -> u64 { vcpu_sched(pid).iter().map(|(_, cpu, _)| cpu).sum() };
    let share =
        |c0: u64, c1: u64, t0: Instant| c1.saturating_sub(c0) as f64 / (t0.elapsed().as_nanos() as f64).max(1.0);
    let (mut per_interval, mut busy, mut final_one_in) = (0.0, 0.0, sample);
    for _ in 0..a.pairs.max(1) {
        let (t0, c0) = (Instant::now(), cpu_at());
        std::thread::sleep(phase);
        share_without.push(share(c0, cpu_at(), t0));
        without.push(vm.rate_in(t0, Instant::now()).context("no guest progress without sampling")?);
        let (t0, c0) = (Instant::now(), cpu_at());
        let o = Command::new(ferry_exe()?)
            .args(["wss", "--api-sock", &vm.sock.to_string_lossy(), "--interval", &a.interval])
            .args(["--duration", &format!("{}s", a.phase_s.max(1)), "--sample", &sample.to_string(), "--json"])
            .args(["--fault-budget", &budget.to_string()])
            .stdin(Stdio::null())
            .output()?;
        share_with.push(share(c0, cpu_at(), t0));
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
        final_one_in = v["report"]["sample_one_in"].as_u64().unwrap_or(sample);
        busy = v["report"]["sampler_busy_ms"].as_f64().unwrap_or(0.0) / (a.phase_s.max(1) as f64 * 1e3) * 100.0;
    }
    let (mw, mo) = (median(&without), median(&with));
    let per_cpu = |rates: &[f64], shares: &[f64]| -> f64 {
        median(&rates.iter().zip(shares).map(|(r, s)| if *s > 0.0 { r / s } else { 0.0 }).collect::<Vec<_>>())
    };
    let (cw, co) = (per_cpu(&without, &share_without), per_cpu(&with, &share_with));
    Ok(WssBenchLoad {
        load: load.to_string(),
        sample_one_in: sample,
        fault_budget_per_s: budget,
        final_one_in,
        median_without: mw,
        median_with: mo,
        slowdown_percent: if mw > 0.0 { (1.0 - mo / mw) * 100.0 } else { 0.0 },
        slowdown_per_cpu_percent: if cw > 0.0 { (1.0 - co / cw) * 100.0 } else { 0.0 },
        cpu_share_without: share_without,
        cpu_share_with: share_with,
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
        "{:<24} {:>7} {:>7} {:>7} {:>16} {:>16} {:>10} {:>12} {:>10} {:>16} {:>14}",
        "workload",
        "sample",
        "budget",
        "final",
        "without (p/s)",
        "with (p/s)",
        "slowdown",
        "per CPU s",
        "vCPU on",
        "pages/interval",
        "sampler busy"
    );
    for l in &b.loads {
        println!(
            "{:<24} {:>7} {:>7} {:>7} {:>16.0} {:>16.0} {:>9.1}% {:>11.1}% {:>9.0}% {:>16.0} {:>13.3}%",
            l.load,
            format!("1/{}", l.sample_one_in),
            if l.fault_budget_per_s == 0 { "fixed".to_string() } else { format!("{}/s", l.fault_budget_per_s) },
            format!("1/{}", l.final_one_in),
            l.median_without,
            l.median_with,
            l.slowdown_percent,
            l.slowdown_per_cpu_percent,
            median(&l.cpu_share_with) * 100.0,
            l.pages_per_interval,
            l.sampler_busy_percent
        );
    }
    println!("(sample 1/N: the sampler tracked one page in N and scaled its counts by N; 1/1 is exact;");
    println!(" budget: most sampled page writes per second before the sampler thins its sample; final: the sample it ended with;");
    println!(" per CPU s: the slowdown of progress per second the vCPU was on a CPU; vCPU on: its share of the phase, sampling)");
}
