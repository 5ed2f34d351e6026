//! `ferry bench boot`: how fast the test guest starts and what the VMM costs
//! (time to first instruction, first serial line, memory overhead), plus the
//! guest's dirty rate and the memory digest's speed, which the snapshot and
//! migration figures depend on.

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, TEST_GUEST};
use crate::RunReport;

/// Everything `ferry bench boot` measured (its JSON output).
#[derive(Serialize)]
pub(crate) struct BootBench {
    pub(crate) runs: u32,
    pub(crate) first_guest_instruction_ms: Vec<f64>,
    pub(crate) first_kvm_run_ms: Vec<f64>,
    pub(crate) first_progress_line_ms: Vec<f64>,
    pub(crate) vmm_overhead_mib: Vec<f64>,
    pub(crate) dirty_rate_pages_per_s: f64,
    pub(crate) digest_gb_per_s: f64,
    pub(crate) digest_bytes: u64,
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
        .args(["run", "--kernel", TEST_GUEST, "--mem", &format!("{}M", mem >> 20), "--cmdline", cmdline])
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

/// Runs `ferry bench boot`: `runs` boots of a 64 MiB guest, then the dirty
/// rate and the digest speed with `mem` of guest memory.
pub(crate) fn boot_bench(runs: u32, mem: u64) -> Result<BootBench> {
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
    Ok(b)
}

/// Best of three `ferry digest` runs over a guest whose memory is all
/// populated: (GB/s, bytes hashed).
fn digest_speed(mem: u64) -> Result<(f64, u64)> {
    let dir = tempfile::tempdir()?;
    let sock = dir.path().join("api.sock");
    let sock_s = sock.to_string_lossy().to_string();
    let mut child = Command::new(ferry_exe()?)
        .args([
            "run",
            "--kernel",
            TEST_GUEST,
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
        let v = ferry_json(&["digest", "--api-sock", &sock_s])?;
        best = best.max(v["gb_per_s"].as_f64().unwrap_or(0.0));
        bytes = v["bytes"].as_u64().unwrap_or(0);
    }
    let _ = ferry_json(&["shutdown", "--api-sock", &sock_s, "--timeout-ms", "5000"]);
    let _ = child.wait();
    Ok((best, bytes))
}
