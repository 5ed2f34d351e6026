//! `ferry bench watch`: what an incremental scan pass costs against a full
//! scan of the same running guest. The guest rewrites a working set
//! (`dirty wss=<MiB> rate=max`), so each pass after the first sees about the
//! working set dirty; the pass should cost about the working set's share of
//! a full scan.

use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json};
use crate::util::{log, median, mib};
use crate::vm::FerryVm;

/// Options of `ferry bench watch`.
#[derive(Args)]
pub struct WatchBenchArgs {
    /// Guest memory.
    #[arg(long, default_value = "4G", value_parser = ferry_vmm::size::parse_mem)]
    pub mem: u64,
    /// The working set the guest keeps rewriting (MiB).
    #[arg(long, default_value_t = 64)]
    pub wss: u64,
    /// Full scans to time.
    #[arg(long, default_value_t = 3)]
    pub full_scans: u32,
    /// Watch passes (the first is full; the rest incremental).
    #[arg(long, default_value_t = 8)]
    pub passes: u32,
    /// Time between passes.
    #[arg(long, default_value = "1s")]
    pub every: String,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// The figures.
#[derive(Serialize)]
struct WatchBench {
    mem_mib: u64,
    wss_mib: u64,
    full_scan_ms: Vec<f64>,
    full_scan_gb_per_s: f64,
    first_pass_ms: f64,
    incremental_ms: Vec<f64>,
    incremental_pages_scanned: Vec<u64>,
    incremental_dirty_pages: Vec<u64>,
    /// Median incremental pass over median full scan.
    time_share: f64,
    /// Median pages scanned per incremental pass over RAM pages.
    page_share: f64,
    /// The working set over RAM.
    wss_share: f64,
    guest_verified: bool,
}

/// Runs the benchmark.
pub fn watch_bench(a: WatchBenchArgs) -> Result<u8> {
    let dir = tempfile::tempdir()?;
    log(format!("booting a {} MiB guest rewriting {} MiB", mib(a.mem), a.wss));
    let vm = FerryVm::boot(dir.path(), a.mem, a.wss, "max", Duration::from_secs(300))?;
    let sock = vm.sock.to_string_lossy().to_string();
    // A pattern that is nowhere in the guest: the scan reads everything and reports nothing.
    let pat = "5eed0fba5eba11c0ffee";
    let mut full = Vec::new();
    let mut bytes = 0u64;
    for i in 0..a.full_scans.max(1) {
        let v = ferry_json(&["scan", "--api-sock", &sock, "--hex", pat, "--no-virt", "--json"])?;
        let ms = v["elapsed_secs"].as_f64().unwrap_or(0.0) * 1e3;
        bytes = v["bytes_scanned"].as_u64().unwrap_or(0);
        log(format!("full scan {}: {ms:.0} ms", i + 1));
        full.push(ms);
    }
    let o = Command::new(ferry_exe()?)
        .args(["scan", "--api-sock", &sock, "--hex", pat, "--no-virt", "--json", "--watch", "--every", &a.every])
        .args(["--passes", &a.passes.max(2).to_string()])
        .stdin(Stdio::null())
        .output()
        .context("running ferry scan --watch")?;
    if !o.status.success() {
        bail!("ferry scan --watch failed: {}", String::from_utf8_lossy(&o.stderr).trim());
    }
    let mut passes = Vec::new();
    for l in String::from_utf8_lossy(&o.stdout).lines() {
        let v: serde_json::Value = serde_json::from_str(l).with_context(|| format!("a watch line: {l}"))?;
        if v["type"] == "pass" {
            passes.push(v);
        }
    }
    let Some(first) = passes.first() else { bail!("the watch reported no pass") };
    let first_pass_ms = first["scan_ms"].as_f64().unwrap_or(0.0);
    let inc = &passes[1..];
    let f = |k: &str| inc.iter().map(|p| p[k].as_f64().unwrap_or(0.0)).collect::<Vec<_>>();
    let u = |k: &str| inc.iter().map(|p| p[k].as_u64().unwrap_or(0)).collect::<Vec<_>>();
    let incremental_ms = f("scan_ms");
    let scanned = u("pages_scanned");
    let ram_pages = a.mem / 4096;
    let full_med = median(&full);
    let b = WatchBench {
        mem_mib: mib(a.mem),
        wss_mib: a.wss,
        full_scan_gb_per_s: bytes as f64 / (full_med / 1e3).max(1e-9) / 1e9,
        full_scan_ms: full,
        first_pass_ms,
        time_share: median(&incremental_ms) / full_med.max(1e-9),
        page_share: median(&scanned.iter().map(|&x| x as f64).collect::<Vec<_>>()) / ram_pages.max(1) as f64,
        wss_share: a.wss as f64 / mib(a.mem).max(1) as f64,
        incremental_ms,
        incremental_pages_scanned: scanned,
        incremental_dirty_pages: u("dirty_pages"),
        guest_verified: vm.shutdown(Duration::from_secs(120))?,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
        return Ok(0);
    }
    println!("watch bench: {} MiB guest, {} MiB working set rewritten at full speed", b.mem_mib, b.wss_mib);
    println!("  full scan           {:>8.0} ms median ({:.2} GB/s)", full_med, b.full_scan_gb_per_s);
    println!("  watch pass 1 (full) {:>8.0} ms", b.first_pass_ms);
    println!(
        "  incremental pass    {:>8.1} ms median ({:.1}% of a full scan); {:.1}% of pages scanned; working set {:.1}% of RAM",
        median(&b.incremental_ms),
        b.time_share * 100.0,
        b.page_share * 100.0,
        b.wss_share * 100.0
    );
    println!("  per pass: ms {:?}", b.incremental_ms.iter().map(|x| (x * 10.0).round() / 10.0).collect::<Vec<_>>());
    println!("  per pass: pages scanned {:?}", b.incremental_pages_scanned);
    println!("  guest verified after: {}", b.guest_verified);
    Ok(0)
}
