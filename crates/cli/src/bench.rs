//! `ferry bench`: benchmarks that print figures (never timed asserts).

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::Subcommand;
use ferry_vmm::{BootTimes, ExitReason, Vm};
use serde::Serialize;

/// Benchmarks.
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Boot the test guest repeatedly: time to first instruction and first
    /// progress line, dirty rate, memory-digest speed, VMM memory overhead.
    Boot {
        /// Boots to measure.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory for the dirty-rate and digest runs.
        #[arg(long, default_value = "1G", value_parser = crate::size::parse_mem)]
        mem: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

/// What `ferry run --report` writes when the VM stops.
#[derive(Debug, Serialize, serde::Deserialize, Default, Clone)]
pub struct RunReport {
    /// Milliseconds from process start to the boot vCPU's first KVM_RUN.
    pub first_kvm_run_ms: Option<f64>,
    /// Milliseconds from process start to the guest's first POST-port write.
    pub first_guest_io_ms: Option<f64>,
    /// Milliseconds from process start to VM set-up done.
    pub setup_ms: Option<f64>,
    /// Process resident set size at exit.
    pub rss_bytes: u64,
    /// Guest RAM pages resident in this process.
    pub guest_resident_bytes: u64,
    /// RSS not explained by guest RAM: what the VMM itself costs.
    pub vmm_overhead_bytes: u64,
    /// Exit reason text.
    pub exit: String,
}

fn ms(d: Option<Duration>) -> Option<f64> {
    d.map(|d| d.as_secs_f64() * 1e3)
}

fn rss_bytes() -> u64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|k| k.parse::<u64>().ok())
        .map(|k| k * 1024)
        .unwrap_or(0)
}

fn resident_bytes(vm: &Vm) -> u64 {
    let page = 4096usize;
    let mut total = 0u64;
    for r in vm.ram().regions() {
        let pages = r.len as usize / page;
        let mut vec = vec![0u8; pages];
        // SAFETY: the region is a live page-aligned mapping of r.len bytes.
        let rc = unsafe { libc::mincore(r.host as *mut libc::c_void, r.len as usize, vec.as_mut_ptr()) };
        if rc == 0 {
            total += vec.iter().filter(|b| *b & 1 == 1).count() as u64 * page as u64;
        }
    }
    total
}

impl RunReport {
    /// Gathers the report from a stopped VM.
    pub fn collect(vm: &Vm, reason: &ExitReason) -> Self {
        let t: BootTimes = vm.boot_times();
        let rss = rss_bytes();
        let guest = resident_bytes(vm);
        RunReport {
            first_kvm_run_ms: ms(t.first_kvm_run),
            first_guest_io_ms: ms(t.first_guest_io),
            setup_ms: ms(t.setup_done),
            rss_bytes: rss,
            guest_resident_bytes: guest,
            vmm_overhead_bytes: rss.saturating_sub(guest),
            exit: reason.to_string(),
        }
    }
}

#[derive(Serialize)]
struct BootBench {
    runs: u32,
    first_guest_instruction_ms: Vec<f64>,
    first_kvm_run_ms: Vec<f64>,
    first_progress_line_ms: Vec<f64>,
    vmm_overhead_mib: Vec<f64>,
    dirty_rate_pages_per_s: f64,
    digest_gb_per_s: f64,
    digest_bytes: u64,
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(|a, b| a.partial_cmp(b).unwrap());
    if s.is_empty() {
        f64::NAN
    } else {
        s[s.len() / 2]
    }
}

fn ferry_exe() -> Result<PathBuf> {
    std::env::current_exe().context("locating the ferry binary")
}

struct GuestRun {
    report: RunReport,
    first_progress: Option<Duration>,
    progress: Vec<(Instant, u64)>,
}

/// Runs the test guest in a child `ferry run`, timing its serial lines.
fn run_guest(mem: u64, cmdline: &str, extra: &[&str]) -> Result<GuestRun> {
    let dir = tempfile::tempdir()?;
    let report_path = dir.path().join("report.json");
    let t0 = Instant::now();
    let mut child = Command::new(ferry_exe()?)
        .args(["run", "--kernel", crate::BUILTIN_TEST_GUEST, "--mem", &format!("{}M", mem >> 20), "--cmdline", cmdline])
        .arg("--report")
        .arg(&report_path)
        .args(extra)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    let out = child.stdout.take().unwrap();
    let mut first_progress = None;
    let mut progress = Vec::new();
    for line in BufReader::new(out).lines() {
        let line = line?;
        if line.starts_with("PROGRESS") {
            let now = Instant::now();
            first_progress.get_or_insert(now - t0);
            let passes = line
                .split_whitespace()
                .find_map(|w| w.strip_prefix("passes="))
                .and_then(|p| p.parse().ok())
                .unwrap_or(0);
            progress.push((now, passes));
        }
    }
    let status = child.wait()?;
    if !status.success() {
        bail!("benchmark guest failed: {status}");
    }
    let report: RunReport = serde_json::from_str(&std::fs::read_to_string(&report_path)?)?;
    Ok(GuestRun { report, first_progress, progress })
}

/// Runs a benchmark.
pub fn run(cmd: BenchCmd) -> Result<u8> {
    match cmd {
        BenchCmd::Boot { runs, mem, json } => {
            let mut b = BootBench {
                runs,
                first_guest_instruction_ms: vec![],
                first_kvm_run_ms: vec![],
                first_progress_line_ms: vec![],
                vmm_overhead_mib: vec![],
                dirty_rate_pages_per_s: 0.0,
                digest_gb_per_s: 0.0,
                digest_bytes: 0,
            };
            for _ in 0..runs {
                let r = run_guest(64 << 20, "dirty wss=16 rate=max passes=20 report=0", &[])?;
                b.first_guest_instruction_ms.extend(r.report.first_guest_io_ms);
                b.first_kvm_run_ms.extend(r.report.first_kvm_run_ms);
                b.first_progress_line_ms.extend(r.first_progress.map(|d| d.as_secs_f64() * 1e3));
                b.vmm_overhead_mib.push(r.report.vmm_overhead_bytes as f64 / (1 << 20) as f64);
            }
            // Dirty rate: a 64 MiB working set rewritten at full speed.
            let wss_pages = 64 * 256;
            let r = run_guest(mem, "dirty wss=64 rate=max passes=3000 report=200", &[])?;
            if let (Some(a), Some(z)) = (r.progress.get(1), r.progress.last()) {
                let dt = z.0.duration_since(a.0).as_secs_f64();
                if dt > 0.0 {
                    b.dirty_rate_pages_per_s = (z.1 - a.1) as f64 * wss_pages as f64 / dt;
                }
            }
            // Digest speed over populated memory.
            let digest = digest_speed(mem)?;
            b.digest_gb_per_s = digest.0;
            b.digest_bytes = digest.1;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                println!("ferry bench boot ({runs} boots of the test guest, 64 MiB)");
                println!(
                    "  process start -> first guest instruction: median {:.2} ms  (all: {:?})",
                    median(&b.first_guest_instruction_ms),
                    b.first_guest_instruction_ms
                );
                println!("  process start -> first KVM_RUN:           median {:.2} ms", median(&b.first_kvm_run_ms));
                println!(
                    "  process start -> first progress line:     median {:.1} ms",
                    median(&b.first_progress_line_ms)
                );
                println!("  VMM resident memory beyond guest pages:   median {:.1} MiB", median(&b.vmm_overhead_mib));
                println!("  guest dirty rate (wss 64 MiB, rate=max):  {:.1} M pages/s", b.dirty_rate_pages_per_s / 1e6);
                println!(
                    "  memory digest (BLAKE3, {} MiB):         {:.2} GB/s",
                    b.digest_bytes >> 20,
                    b.digest_gb_per_s
                );
            }
            Ok(0)
        }
    }
}

fn digest_speed(mem: u64) -> Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("api.sock");
    let mut child = Command::new(ferry_exe()?)
        .args([
            "run",
            "--kernel",
            crate::BUILTIN_TEST_GUEST,
            "--mem",
            &format!("{}M", mem >> 20),
            "--cmdline",
            "dirty wss=16 rate=1000",
            "--serial",
            "stdio",
        ])
        .arg("--api-sock")
        .arg(&sock)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let out = child.stdout.take().unwrap();
    let mut lines = BufReader::new(out).lines();
    // Wait until the guest has marked (populated) all its memory.
    for line in lines.by_ref() {
        if line?.starts_with("MARKED") {
            break;
        }
    }
    std::thread::spawn(move || for _ in lines {});
    let mut best: f64 = 0.0;
    let mut bytes = 0;
    for _ in 0..3 {
        let v = crate::http::request(&sock, "GET", "/vm/memory-digest", None, Duration::from_secs(60))?;
        best = best.max(v["gb_per_s"].as_f64().unwrap_or(0.0));
        bytes = v["bytes"].as_u64().unwrap_or(0);
    }
    let _ = crate::http::request(
        &sock,
        "PUT",
        "/vm/shutdown",
        Some(&serde_json::json!({"timeout_ms": 5000})),
        Duration::from_secs(10),
    );
    let _ = child.wait();
    Ok((best, bytes))
}
