//! `ferry bench`: benchmarks that print figures (never timed asserts).

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
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
    /// Live snapshot, restore, encryption and incremental figures, side by
    /// side with the disk, the codec and QEMU on the same machine.
    Snapshot {
        #[command(flatten)]
        args: SnapBenchArgs,
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
        BenchCmd::Snapshot { args } => snapshot_bench(args),
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

// ---------------------------------------------------------------------------
// ferry bench snapshot
// ---------------------------------------------------------------------------

/// Options of `ferry bench snapshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapBenchArgs {
    /// Live snapshots per configuration (the pause figure is their median).
    #[arg(long, default_value_t = 5)]
    runs: u32,
    /// Guest memory sizes to snapshot.
    #[arg(long, default_value = "256M,1G,4G", value_delimiter = ',', value_parser = crate::size::parse_mem)]
    mems: Vec<u64>,
    /// Working set the guest rewrites, in MiB.
    #[arg(long, default_value_t = 64)]
    wss_mib: u64,
    /// Guest dirty rates: page stores per second, or max.
    #[arg(long, default_value = "max,20000", value_delimiter = ',')]
    rates: Vec<String>,
    /// Guest memory for the throughput, encryption and incremental runs.
    #[arg(long, default_value = "1G", value_parser = crate::size::parse_mem)]
    io_mem: u64,
    /// Restores per image.
    #[arg(long, default_value_t = 3)]
    restore_runs: u32,
    /// MiB written (and fsynced) to measure the disk.
    #[arg(long, default_value_t = 1024)]
    disk_mib: u64,
    /// Directory for images and the disk test (a temporary directory is made
    /// inside it and removed at the end). Default: the system temp directory.
    #[arg(long)]
    dir: Option<PathBuf>,
    /// QEMU binary for the comparison.
    #[arg(long, default_value = "qemu-system-x86_64")]
    qemu: String,
    /// Guest memory sizes for the QEMU comparison.
    #[arg(long, default_value = "1G", value_delimiter = ',', value_parser = crate::size::parse_mem)]
    qemu_mems: Vec<u64>,
    /// Skip the QEMU comparison.
    #[arg(long)]
    no_qemu: bool,
    /// Upper bound for any single wait (boot, snapshot, restore), in seconds.
    #[arg(long, default_value_t = 300)]
    timeout_s: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    json_out: Option<PathBuf>,
}

const PAGE: u64 = 4096;

fn mib(b: u64) -> u64 {
    b >> 20
}

fn gbps(bytes: f64, ms: f64) -> f64 {
    if ms > 0.0 {
        bytes / (ms / 1e3) / 1e9
    } else {
        f64::NAN
    }
}

fn max_of(v: &[f64]) -> f64 {
    v.iter().cloned().fold(f64::NAN, f64::max)
}

/// Lines of a child's output with their arrival times.
type Lines = Arc<Mutex<Vec<(Instant, String)>>>;

fn read_lines(r: impl Read + Send + 'static, sink: Lines) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let line = String::from_utf8_lossy(&buf).trim_end_matches(['\n', '\r']).to_string();
                    sink.lock().unwrap().push((Instant::now(), line));
                }
            }
        }
    })
}

/// A child process whose output is collected line by line, and which is
/// killed and reaped when dropped (on every path, errors included).
struct Kid {
    name: String,
    child: Child,
    spawned: Instant,
    out: Lines,
    err: Lines,
    readers: Vec<JoinHandle<()>>,
}

impl Kid {
    fn spawn(name: &str, cmd: &mut Command) -> Result<Kid> {
        let spawned = Instant::now();
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {name}"))?;
        let (out, err) = (Lines::default(), Lines::default());
        let readers = vec![
            read_lines(child.stdout.take().context("child stdout")?, out.clone()),
            read_lines(child.stderr.take().context("child stderr")?, err.clone()),
        ];
        Ok(Kid { name: name.to_string(), child, spawned, out, err, readers })
    }

    fn exited(&mut self) -> Result<Option<ExitStatus>> {
        Ok(self.child.try_wait()?)
    }

    /// Waits for exit until `deadline`; `None` if still running.
    fn wait_until(&mut self, deadline: Instant) -> Result<Option<ExitStatus>> {
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
    }

    /// Waits for exit (killing the process and failing after `timeout`), then
    /// gives the output readers a bounded moment to drain.
    fn finish(&mut self, timeout: Duration) -> Result<ExitStatus> {
        match self.wait_until(Instant::now() + timeout)? {
            Some(s) => {
                let deadline = Instant::now() + Duration::from_secs(2);
                while self.readers.iter().any(|h| !h.is_finished()) && Instant::now() < deadline {
                    std::thread::sleep(Duration::from_millis(2));
                }
                Ok(s)
            }
            None => {
                let _ = self.child.kill();
                let _ = self.child.wait();
                bail!("{} did not finish within {} s (killed){}", self.name, timeout.as_secs(), self.tail())
            }
        }
    }

    fn text(lines: &Lines) -> String {
        lines.lock().unwrap().iter().map(|(_, l)| l.as_str()).collect::<Vec<_>>().join("\n")
    }

    /// The last lines of stderr, for error messages.
    fn tail(&self) -> String {
        let l = self.err.lock().unwrap();
        let tail: Vec<&str> = l.iter().rev().take(8).rev().map(|(_, s)| s.as_str()).collect();
        if tail.is_empty() {
            String::new()
        } else {
            format!("; its stderr ends:\n    {}", tail.join("\n    "))
        }
    }

    fn out_len(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    fn find_line(&self, lines: &Lines, from: usize, pred: &dyn Fn(&str) -> bool) -> Option<(usize, Instant, String)> {
        let l = lines.lock().unwrap();
        l.iter().enumerate().skip(from).find(|(_, (_, s))| pred(s)).map(|(i, (t, s))| (i, *t, s.clone()))
    }

    /// Waits for a line (stdout, or stderr with `on_err`) matching `pred` at
    /// index `from` or later; fails if the process exits or time runs out.
    fn wait_line(
        &mut self,
        what: &str,
        on_err: bool,
        from: usize,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<(usize, Instant, String)> {
        let deadline = Instant::now() + timeout;
        let lines = if on_err { self.err.clone() } else { self.out.clone() };
        loop {
            if let Some(hit) = self.find_line(&lines, from, &pred) {
                return Ok(hit);
            }
            if let Some(st) = self.exited()? {
                std::thread::sleep(Duration::from_millis(100));
                if let Some(hit) = self.find_line(&lines, from, &pred) {
                    return Ok(hit);
                }
                bail!("{} exited ({st}) before printing {what}{}", self.name, self.tail());
            }
            if Instant::now() >= deadline {
                bail!("{} did not print {what} within {} s{}", self.name, timeout.as_secs(), self.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

impl Drop for Kid {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// Nanoseconds the non-vCPU threads of `pid` have spent waiting on a run queue.
fn runq_wait_ns(pid: u32) -> Option<u64> {
    let mut total = 0;
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with("vcpu") {
            continue;
        }
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        total += s.split_whitespace().nth(1).and_then(|w| w.parse::<u64>().ok()).unwrap_or(0);
    }
    Some(total)
}

/// (on-CPU ns, run-queue wait ns) of each vCPU thread of `pid`, by thread id.
fn vcpu_sched(pid: u32) -> Vec<(String, u64, u64)> {
    let mut v = Vec::new();
    let Ok(dir) = std::fs::read_dir(format!("/proc/{pid}/task")) else { return v };
    for t in dir.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if !comm.starts_with("vcpu") {
            continue;
        }
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        if f.len() >= 2 {
            v.push((t.file_name().to_string_lossy().to_string(), f[0], f[1]));
        }
    }
    v
}

/// Longest time any vCPU thread spent blocked (neither running nor waiting
/// for a CPU) between two `vcpu_sched` samples `wall` apart. The test guest
/// never halts, so this is what the VMM made it wait: the pause as the guest
/// sees it, including kick and wake-up latency and copy-on-write faults.
fn vcpu_blocked_ms(a: &[(String, u64, u64)], b: &[(String, u64, u64)], wall: Duration) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for (tid, cpu1, rq1) in b {
        let Some((_, cpu0, rq0)) = a.iter().find(|(t, _, _)| t == tid) else { continue };
        let busy = cpu1.saturating_sub(*cpu0) + rq1.saturating_sub(*rq0);
        let blocked = (wall.as_nanos() as u64).saturating_sub(busy) as f64 / 1e6;
        worst = Some(worst.map_or(blocked, |w: f64| w.max(blocked)));
    }
    worst
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

fn kv(line: &str, key: &str) -> Option<u64> {
    line.split_whitespace().find_map(|w| w.strip_prefix(key)?.strip_prefix('=')?.parse().ok())
}

/// A guest PROGRESS line.
#[derive(Clone, Copy, Debug)]
struct Progress {
    at: Instant,
    pages: u64,
    passes: u64,
    tsc: u64,
}

fn progress_of(lines: &Lines) -> Vec<Progress> {
    lines
        .lock()
        .unwrap()
        .iter()
        .filter(|(_, l)| l.starts_with("PROGRESS"))
        .filter_map(|(at, l)| {
            Some(Progress { at: *at, pages: kv(l, "pages")?, passes: kv(l, "passes")?, tsc: kv(l, "tsc")? })
        })
        .collect()
}

/// What one `ferry snapshot --json` reported.
#[derive(Serialize, Clone, Debug)]
struct Snap {
    pause_ms: f64,
    total_ms: f64,
    rounds: u64,
    pages_per_round: Vec<u64>,
    stop_reason: String,
    data_pages: u64,
    bytes_written: u64,
    compression_ratio: f64,
    /// Non-zero pages sent per second of the whole snapshot: data_pages * 4096 / total_ms.
    gb_per_s: f64,
    /// Wall time of the `ferry snapshot` client process.
    client_ms: f64,
    /// Time the vCPU thread spent blocked (neither running nor runnable)
    /// while the `ferry snapshot` client ran: the guest-visible stall.
    vcpu_blocked_ms: Option<f64>,
    /// Time the VMM's non-vCPU threads spent runnable but waiting for a CPU
    /// during this snapshot (from /proc/PID/task/*/schedstat): host contention.
    vmm_runq_wait_ms: Option<f64>,
    /// The copy-on-write phase, when the engine used one.
    cow: Option<serde_json::Value>,
    /// Guest page stores per second over the PROGRESS lines bracketing this snapshot.
    guest_rate_during: Option<f64>,
    #[serde(skip)]
    t0: Option<Instant>,
    #[serde(skip)]
    t1: Option<Instant>,
}

impl Snap {
    fn from_json(v: &serde_json::Value, t0: Instant, t1: Instant) -> Result<Snap> {
        let f = |k: &str| v[k].as_f64().with_context(|| format!("ferry snapshot --json has no number {k:?}: {v}"));
        let u = |k: &str| v[k].as_u64().with_context(|| format!("ferry snapshot --json has no integer {k:?}: {v}"));
        let data_pages = u("data_pages_sent")?;
        let total_ms = f("total_ms")?;
        Ok(Snap {
            pause_ms: f("pause_ms")?,
            total_ms,
            rounds: u("rounds")?,
            pages_per_round: v["pages_per_round"]
                .as_array()
                .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                .unwrap_or_default(),
            stop_reason: v["stop_reason"].as_str().unwrap_or("").to_string(),
            data_pages,
            bytes_written: u("bytes_written")?,
            compression_ratio: v["compression_ratio"].as_f64().unwrap_or(f64::NAN),
            gb_per_s: gbps((data_pages * PAGE) as f64, total_ms),
            client_ms: (t1 - t0).as_secs_f64() * 1e3,
            cow: v.get("cow").filter(|c| !c.is_null()).cloned(),
            guest_rate_during: None,
            vmm_runq_wait_ms: None,
            vcpu_blocked_ms: None,
            t0: Some(t0),
            t1: Some(t1),
        })
    }
}

/// A `ferry run` of the test guest with an API socket.
struct FerryVm {
    kid: Kid,
    sock: PathBuf,
    tsc_khz: u64,
}

impl FerryVm {
    fn boot(dir: &Path, mem: u64, wss_mib: u64, rate: &str, timeout: Duration) -> Result<FerryVm> {
        let sock = dir.join(format!("vm-{}m-{rate}.sock", mib(mem)));
        let _ = std::fs::remove_file(&sock);
        let cmdline = format!("dirty wss={wss_mib} rate={rate} report=100");
        let mut kid = Kid::spawn(
            &format!("ferry run ({} MiB, {cmdline:?})", mib(mem)),
            Command::new(ferry_exe()?)
                .args(["run", "--kernel", crate::BUILTIN_TEST_GUEST, "--mem", &format!("{}M", mib(mem))])
                .args(["--cmdline", &cmdline, "--serial", "stdio", "--api-sock"])
                .arg(&sock),
        )?;
        let (_, _, boot) = kid.wait_line("its boot line", false, 0, timeout, |l| l.starts_with("FERRY-GUEST boot"))?;
        let tsc_khz = kv(&boot, "tsc_khz").unwrap_or(0);
        kid.wait_line("MARKED (memory populated)", false, 0, timeout, |l| l.starts_with("MARKED"))?;
        let (i, _, _) = kid.wait_line("a PROGRESS line", false, 0, timeout, |l| l.starts_with("PROGRESS"))?;
        kid.wait_line("a second PROGRESS line", false, i + 1, timeout, |l| l.starts_with("PROGRESS"))?;
        Ok(FerryVm { kid, sock, tsc_khz })
    }

    /// Guest page stores per second between two PROGRESS lines (guest TSC).
    fn rate_between(&self, a: &Progress, b: &Progress) -> Option<f64> {
        let secs = b.tsc.checked_sub(a.tsc)? as f64 / (self.tsc_khz as f64 * 1e3);
        (secs > 0.0 && self.tsc_khz > 0).then(|| b.pages.saturating_sub(a.pages) as f64 / secs)
    }

    /// Guest store rate over the PROGRESS lines that arrived within [from, to].
    fn rate_in(&self, from: Instant, to: Instant) -> Option<f64> {
        let p: Vec<Progress> = progress_of(&self.kid.out).into_iter().filter(|p| p.at >= from && p.at <= to).collect();
        self.rate_between(p.first()?, p.last()?)
    }

    /// Passes over the working set the guest completed between two instants
    /// (a lower bound: from the first PROGRESS line after `from` to the last before `to`).
    fn passes_between(&self, from: Option<Instant>, to: Option<Instant>) -> Option<u64> {
        let (from, to) = (from?, to?);
        let p = progress_of(&self.kid.out);
        let a = p.iter().find(|p| p.at >= from)?;
        let b = p.iter().rev().find(|p| p.at <= to)?;
        Some(if a.at <= b.at { b.passes.saturating_sub(a.passes) } else { 0 })
    }

    /// Guest store rate from the last PROGRESS line before `t0` to the first after `t1`.
    fn rate_around(&self, t0: Instant, t1: Instant) -> Option<f64> {
        let p = progress_of(&self.kid.out);
        let a = p.iter().rev().find(|p| p.at <= t0)?;
        let b = p.iter().find(|p| p.at >= t1)?;
        self.rate_between(a, b)
    }

    fn snapshot(&mut self, out: &Path, extra: &[&str], timeout: Duration) -> Result<Snap> {
        if let Some(st) = self.kid.exited()? {
            bail!("{} has stopped ({st}){}", self.kid.name, self.kid.tail());
        }
        let n = self.kid.out_len();
        let pid = self.kid.child.id();
        let w0 = runq_wait_ns(pid);
        let v0 = vcpu_sched(pid);
        let t0 = Instant::now();
        let mut k = Kid::spawn(
            &format!("ferry snapshot {}", extra.join(" ")),
            Command::new(ferry_exe()?)
                .args(["snapshot", "--json", "--api-sock"])
                .arg(&self.sock)
                .arg("--out")
                .arg(out)
                .args(extra),
        )?;
        let st = k.finish(timeout)?;
        let t1 = Instant::now();
        let v1 = vcpu_sched(pid);
        if !st.success() {
            bail!("{} failed ({st}){}", k.name, k.tail());
        }
        let v: serde_json::Value = serde_json::from_str(&Kid::text(&k.out))
            .with_context(|| format!("parsing the output of {}: {}", k.name, Kid::text(&k.out)))?;
        let mut s = Snap::from_json(&v, t0, t1)?;
        s.vcpu_blocked_ms = vcpu_blocked_ms(&v0, &v1, t1 - t0);
        s.vmm_runq_wait_ms = match (w0, runq_wait_ns(pid)) {
            (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1e6),
            _ => None,
        };
        // The guest must be running again: wait for a PROGRESS line that
        // arrived after the snapshot ended (it also closes the rate bracket).
        self.kid
            .wait_line("PROGRESS after a snapshot", false, n, Duration::from_secs(30), |l| l.starts_with("PROGRESS"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        while progress_of(&self.kid.out).last().map(|p| p.at < t1).unwrap_or(true) {
            if Instant::now() >= deadline {
                bail!("{}: no PROGRESS line within 30 s after a snapshot{}", self.kid.name, self.kid.tail());
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        s.guest_rate_during = self.rate_around(t0, t1);
        Ok(s)
    }

    /// Ctrl-Alt-Del: the dirty-mode guest verifies every page and exits 0 when all are right.
    fn shutdown(mut self, timeout: Duration) -> Result<bool> {
        let _ = crate::http::request(
            &self.sock,
            "PUT",
            "/vm/shutdown",
            Some(&serde_json::json!({ "timeout_ms": 20000 })),
            Duration::from_secs(30),
        );
        let st = self.kid.finish(timeout)?;
        let ok = st.code() == Some(0) && Kid::text(&self.kid.out).contains("VERIFY OK");
        if !ok {
            eprintln!("bench: {} ended with {st} without VERIFY OK{}", self.kid.name, self.kid.tail());
        }
        Ok(ok)
    }
}

/// One `ferry restore` of an image.
#[derive(Serialize, Clone, Debug)]
struct RestoreRun {
    chain_len: u64,
    data_bytes: u64,
    open_ms: f64,
    memory_ms: f64,
    memory_gb_per_s: f64,
    /// Process start to the vCPUs being ready to run.
    ready_ms: f64,
    /// Process start to the vCPUs being let into the guest, when the restore reports it.
    first_instruction_ms: Option<f64>,
    /// eager or lazy, when the restore reports it.
    memory_mode: Option<String>,
    fill_threads: Option<u64>,
    /// The lazy restore's figures (faults, prefetch), when present.
    lazy: Option<serde_json::Value>,
    first_kvm_run_ms: Option<f64>,
    first_guest_io_ms: Option<f64>,
    /// Spawn of `ferry restore` to the restored guest's first PROGRESS line (the guest prints
    /// at most every 100 ms, so this bounds time-to-running from above).
    first_progress_ms: f64,
    /// The guest verified every page on Ctrl-Alt-Del and exited 0.
    verified: bool,
}

fn ferry_restore(dir: &Path, img: &Path, extra: &[&str], timeout: Duration) -> Result<RestoreRun> {
    let sock = dir.join("restore.sock");
    let report = dir.join("restore-report.json");
    let _ = std::fs::remove_file(&sock);
    let _ = std::fs::remove_file(&report);
    let mut kid = Kid::spawn(
        &format!("ferry restore {}", img.display()),
        Command::new(ferry_exe()?)
            .arg("restore")
            .arg(img)
            .args(["--serial", "stdio", "--api-sock"])
            .arg(&sock)
            .arg("--report")
            .arg(&report)
            .args(extra),
    )?;
    let (_, t_prog, _) =
        kid.wait_line("a PROGRESS line after restore", false, 0, timeout, |l| l.starts_with("PROGRESS"))?;
    let first_progress_ms = (t_prog - kid.spawned).as_secs_f64() * 1e3;
    crate::http::request(
        &sock,
        "PUT",
        "/vm/shutdown",
        Some(&serde_json::json!({ "timeout_ms": 20000 })),
        Duration::from_secs(30),
    )
    .map_err(|e| anyhow::anyhow!("shutting down the restored VM: {e}"))?;
    let st = kid.finish(timeout)?;
    let verified = st.code() == Some(0) && Kid::text(&kid.out).contains("VERIFY OK");
    let rep: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(&report).with_context(|| format!("reading {}{}", report.display(), kid.tail()))?,
    )?;
    let r = &rep["restore"];
    let f = |k: &str| r[k].as_f64().with_context(|| format!("restore report has no {k:?}: {rep}"));
    Ok(RestoreRun {
        chain_len: r["chain_len"].as_u64().unwrap_or(0),
        data_bytes: r["data_bytes"].as_u64().unwrap_or(0),
        open_ms: f("open_ms")?,
        memory_ms: f("memory_ms")?,
        memory_gb_per_s: f("memory_gb_per_s")?,
        ready_ms: f("ready_ms")?,
        first_instruction_ms: r["first_instruction_ms"].as_f64(),
        memory_mode: r["memory_mode"].as_str().map(str::to_string),
        fill_threads: r["fill_threads"].as_u64(),
        lazy: r.get("lazy").filter(|l| !l.is_null()).cloned(),
        first_kvm_run_ms: rep["first_kvm_run_ms"].as_f64(),
        first_guest_io_ms: rep["first_guest_io_ms"].as_f64(),
        first_progress_ms,
        verified,
    })
}

/// Sequential write speed of `dir`'s file system: `mib` MiB in 1 MiB writes, then fsync.
fn disk_write_gb_s(dir: &Path, mib: u64) -> Result<f64> {
    let path = dir.join("disk-speed.tmp");
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let t = Instant::now();
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for i in 0..mib {
            buf[0..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&buf)?;
        }
        f.sync_all()?;
        Ok(())
    })();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    res.with_context(|| format!("writing {}", path.display()))?;
    Ok((mib << 20) as f64 / secs / 1e9)
}

/// Single-thread memcpy speed between buffers that are already populated.
fn memcpy_gb_s() -> f64 {
    let (src, mut dst) = (vec![1u8; 256 << 20], vec![2u8; 16 << 20]);
    let t = Instant::now();
    let mut n = 0usize;
    for _ in 0..4 {
        for c in src.chunks(dst.len()) {
            dst[..c.len()].copy_from_slice(c);
            n += c.len();
            std::hint::black_box(&mut dst);
        }
    }
    n as f64 / t.elapsed().as_secs_f64() / 1e9
}

/// Microseconds per page for the first write to fresh anonymous memory: what
/// an eager restore pays for every non-zero page on top of copying it.
fn first_touch_us(len: usize) -> Result<f64> {
    // SAFETY: a private anonymous mapping, unmapped below; nothing else uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        bail!("mmap of {} MiB failed: {}", len >> 20, std::io::Error::last_os_error());
    }
    let t = Instant::now();
    for off in (0..len).step_by(PAGE as usize) {
        // SAFETY: off < len, inside the mapping.
        unsafe { std::ptr::write_volatile((p as *mut u8).add(off), 1) };
    }
    let us = t.elapsed().as_secs_f64() * 1e6 / (len as u64 / PAGE) as f64;
    // SAFETY: p..p+len is the mapping made above.
    unsafe { libc::munmap(p, len) };
    Ok(us)
}

/// LZ4 block compression (as the image writer does it, one chunk at a time) of
/// pages like the test guest's (one 8-byte word per page, the rest zero), on
/// `threads` threads. Returns (input GB/s, compression ratio).
fn lz4_gb_s(threads: usize) -> (f64, f64) {
    let chunk = ferry_image::DEFAULT_CHUNK_SIZE as usize;
    let buf_len = 64usize << 20;
    let mut buf = vec![0u8; buf_len];
    for (i, p) in buf.chunks_mut(PAGE as usize).enumerate() {
        let word = (7u64 << 32) | (0x200 + i as u64);
        p[..8].copy_from_slice(&word.to_le_bytes());
    }
    let per_thread: usize = 1 << 30; // bytes each thread compresses
    let t = Instant::now();
    let out_total: usize = std::thread::scope(|s| {
        let hs: Vec<_> = (0..threads)
            .map(|ti| {
                let buf = &buf;
                s.spawn(move || {
                    let mut out = vec![0u8; lz4_flex::block::get_maximum_output_size(chunk)];
                    let mut total = 0usize;
                    let chunks = buf_len / chunk;
                    for k in 0..per_thread / chunk {
                        let c = (k + ti * 7) % chunks;
                        total +=
                            lz4_flex::block::compress_into(&buf[c * chunk..(c + 1) * chunk], &mut out).unwrap_or(0);
                    }
                    std::hint::black_box(total)
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap_or(0)).sum()
    });
    let secs = t.elapsed().as_secs_f64();
    let input = (per_thread * threads) as f64;
    (input / secs / 1e9, input / out_total.max(1) as f64)
}

/// The disk and the codec, measured in this run.
#[derive(Serialize, Clone, Debug, Default)]
struct Baseline {
    disk_write_gb_s: Vec<f64>,
    lz4_1thread_gb_s: Vec<f64>,
    lz4_threads: usize,
    lz4_nthreads_gb_s: Vec<f64>,
    lz4_ratio: f64,
    /// Single-thread memcpy between pre-touched buffers.
    memcpy_gb_s: Vec<f64>,
    /// First write to a fresh anonymous page (page fault + zeroing), per page.
    first_touch_us_per_page: Vec<f64>,
}

impl Baseline {
    fn sample(&mut self, dir: &Path, disk_mib: u64) -> Result<()> {
        self.disk_write_gb_s.push(disk_write_gb_s(dir, disk_mib)?);
        let (g1, ratio) = lz4_gb_s(1);
        self.lz4_1thread_gb_s.push(g1);
        self.lz4_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.lz4_nthreads_gb_s.push(lz4_gb_s(self.lz4_threads).0);
        self.lz4_ratio = ratio;
        self.memcpy_gb_s.push(memcpy_gb_s());
        self.first_touch_us_per_page.push(first_touch_us(256 << 20)?);
        Ok(())
    }
    /// Best of the samples: what the disk and the codec can do.
    fn disk(&self) -> f64 {
        max_of(&self.disk_write_gb_s)
    }
    fn codec(&self) -> f64 {
        max_of(&self.lz4_nthreads_gb_s)
    }
}

/// Live snapshots of one guest configuration.
#[derive(Serialize, Clone, Debug)]
struct LiveSeries {
    mem_mib: u64,
    rate: String,
    pause_ms_median: f64,
    pause_ms_max: f64,
    total_ms_median: f64,
    gb_per_s_median: f64,
    bytes_written_median: f64,
    /// Guest page stores per second before the snapshots (rate=max only meaningful).
    guest_rate_before: Option<f64>,
    /// vCPU blocked time over 1.5 s without snapshots (what serial output etc. cost).
    vcpu_blocked_idle_ms: Option<f64>,
    /// Median and largest guest-visible stall (vCPU blocked) per live snapshot.
    vcpu_blocked_ms_median: Option<f64>,
    vcpu_blocked_ms_max: Option<f64>,
    guest_rate_during_median: Option<f64>,
    /// Copy-on-write final phase (when the engine reports one): medians of
    /// pages protected at the pause, guest write faults on them, and the
    /// background copy time after the guest resumed.
    cow_protected_pages_median: Option<f64>,
    cow_write_faults_median: Option<f64>,
    cow_background_ms_median: Option<f64>,
    live: Vec<Snap>,
    /// The same number of live snapshots with `--final-phase copy` (the last
    /// dirty pages copied while paused), when this ferry has the option.
    live_final_copy: Vec<Snap>,
    final_copy_pause_ms_median: Option<f64>,
    final_copy_vcpu_blocked_ms_median: Option<f64>,
    /// The stop-the-world (`--pause`) snapshot of the same guest.
    stop_world: Snap,
    /// The guest verified all its pages at shutdown after all these snapshots.
    guest_verified_after: bool,
}

/// Throughput and encryption cost (stop-the-world snapshots, guest paused).
#[derive(Serialize, Clone, Debug)]
struct IoFigures {
    mem_mib: u64,
    plain: Vec<Snap>,
    encrypted: Vec<Snap>,
    codec_none: Vec<Snap>,
    codec_none_encrypted: Vec<Snap>,
    plain_gb_per_s_median: f64,
    encrypted_gb_per_s_median: f64,
    /// 1 - encrypted/plain throughput (lz4: only the compressed bytes are encrypted).
    encryption_cost: f64,
    codec_none_gb_per_s_median: f64,
    codec_none_encrypted_gb_per_s_median: f64,
    /// 1 - encrypted/plain throughput with codec none (every byte encrypted).
    codec_none_encryption_cost: f64,
    /// Live (encrypted) snapshot pauses, for the record.
    live_encrypted: Vec<Snap>,
}

/// A full snapshot followed by incremental ones.
#[derive(Serialize, Clone, Debug)]
struct IncFigures {
    mem_mib: u64,
    rate: String,
    wss_pages: u64,
    full: Snap,
    /// Live incremental right after `full`.
    incremental: Snap,
    /// Stop-the-world incremental right after `incremental`: its pages are
    /// exactly the pages the guest dirtied since the previous image.
    incremental_stop_world: Snap,
    bytes_ratio: f64,
    data_pages_ratio: f64,
    /// Whole passes over the working set the guest made between the full
    /// image's end and the live incremental's start (a lower bound).
    passes_full_to_incremental: Option<u64>,
    /// The same between the live incremental's end and the stop-the-world
    /// one's start: >= 1 means every working-set page was dirtied in between.
    passes_before_stop_world: Option<u64>,
    /// The three-image chain restored and verified by the guest.
    chain_restore: Option<RestoreRun>,
}

#[derive(Serialize, Clone, Debug)]
struct RestoreSeries {
    mem_mib: u64,
    image_bytes: u64,
    runs: Vec<RestoreRun>,
    ready_ms_median: f64,
    /// Median time to first guest instruction (`first_instruction_ms`, else `ready_ms`).
    first_instruction_ms_median: f64,
    memory_gb_per_s_median: f64,
    /// `ferry restore --memory lazy`, when this ferry has it.
    lazy: Vec<RestoreRun>,
    lazy_first_instruction_ms_median: Option<f64>,
    lazy_error: Option<String>,
}

/// One QEMU migration to a file.
#[derive(Serialize, Clone, Debug, Default)]
struct QemuMig {
    status: String,
    total_ms: f64,
    downtime_ms: f64,
    setup_ms: f64,
    transferred: u64,
    normal_pages: u64,
    duplicate_pages: u64,
    dirty_sync_count: u64,
    file_bytes: u64,
    /// Wall time from `migrate` to seeing the final status.
    wall_ms: f64,
}

#[derive(Serialize, Clone, Debug)]
struct QemuRestore {
    /// QEMU spawn to `query-status` reporting running (RAM loaded from the file).
    running_ms: f64,
    /// The guest verified every page on Ctrl-Alt-Del (QEMU exit 1 = guest status 0).
    verified: bool,
}

#[derive(Serialize, Clone, Debug)]
struct QemuFigures {
    version: String,
    mem_mib: u64,
    live: Vec<QemuMig>,
    downtime_ms_median: f64,
    total_ms_median: f64,
    file_bytes: u64,
    stop_world: QemuMig,
    /// With downtime-limit 5 ms (ferry's budget): bounded attempt.
    tight: QemuMig,
    restore: Vec<QemuRestore>,
}

#[derive(Serialize, Clone, Debug, Default)]
struct Machine {
    nproc: usize,
    cpu: String,
    kernel: String,
    mem_total_gib: f64,
    kvm_is_pvm: bool,
    /// /proc/loadavg at the start and the end of the run (other work on the machine).
    loadavg_start: String,
    loadavg_end: String,
}

fn machine() -> Machine {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    Machine {
        nproc: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
        cpu: cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map(|s| s.trim().to_string())
            .unwrap_or_default(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default().trim().to_string(),
        mem_total_gib: meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|k| k.parse::<f64>().ok())
            .map(|k| k / (1u64 << 20) as f64)
            .unwrap_or(0.0),
        kvm_is_pvm: Path::new("/sys/module/kvm_pvm").exists(),
        loadavg_start: loadavg(),
        loadavg_end: String::new(),
    }
}

#[derive(Serialize, Debug)]
struct SnapshotBench {
    machine: Machine,
    runs: u32,
    wss_mib: u64,
    baseline: Baseline,
    live: Vec<LiveSeries>,
    io: Option<IoFigures>,
    incremental: Option<IncFigures>,
    restore: Vec<RestoreSeries>,
    qemu: Vec<QemuFigures>,
    qemu_error: Option<String>,
    guest_verified_all: bool,
}

fn log(msg: impl std::fmt::Display) {
    eprintln!("bench: {msg}");
}

fn snapshot_bench(a: SnapBenchArgs) -> Result<u8> {
    for r in &a.rates {
        if r != "max" && r.parse::<u64>().map(|n| n == 0).unwrap_or(true) {
            bail!("invalid --rates entry {r:?}: use max or a positive number of page stores per second");
        }
    }
    if a.runs == 0 || a.mems.is_empty() || a.rates.is_empty() {
        bail!("--runs, --mems and --rates must not be empty");
    }
    let timeout = Duration::from_secs(a.timeout_s.max(1));
    let parent = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("ferry-bench-")
        .tempdir_in(&parent)
        .with_context(|| format!("making a temporary directory in {}", parent.display()))?;
    let dir = tmp.path().to_path_buf();
    let mut b = SnapshotBench {
        machine: machine(),
        runs: a.runs,
        wss_mib: a.wss_mib,
        baseline: Baseline::default(),
        live: vec![],
        io: None,
        incremental: None,
        restore: vec![],
        qemu: vec![],
        qemu_error: None,
        guest_verified_all: true,
    };
    log(format!("working in {}", dir.display()));
    log(format!("disk ({} MiB + fsync) and lz4 speed", a.disk_mib));
    b.baseline.sample(&dir, a.disk_mib)?;

    let mut io_done = false;
    for &mem in &a.mems {
        let keep = dir.join(format!("full-{}m.img", mib(mem)));
        for (ri, rate) in a.rates.iter().enumerate() {
            let with_io = ri == 0 && mem == a.io_mem;
            let (series, io, inc) = live_series(&a, &dir, mem, rate, (ri == 0).then_some(&keep), with_io, timeout)?;
            b.guest_verified_all &= series.guest_verified_after;
            b.live.push(series);
            if with_io {
                b.io = io;
                b.incremental = inc;
                io_done = true;
            }
        }
        if keep.exists() {
            b.restore.push(restore_series(&a, &dir, mem, &keep, timeout)?);
            let _ = std::fs::remove_file(&keep);
        }
        log("disk and lz4 speed again");
        b.baseline.sample(&dir, a.disk_mib)?;
    }
    if !io_done {
        let (series, io, inc) = live_series(&a, &dir, a.io_mem, &a.rates[0], None, true, timeout)?;
        b.guest_verified_all &= series.guest_verified_after;
        b.live.push(series);
        b.io = io;
        b.incremental = inc;
    }
    if let Some(inc) = &b.incremental {
        b.guest_verified_all &= inc.chain_restore.as_ref().map(|r| r.verified).unwrap_or(false);
    }
    if !a.no_qemu {
        for &mem in &a.qemu_mems {
            match qemu_bench(&a, &dir, mem, timeout) {
                Ok(q) => b.qemu.push(q),
                Err(e) => {
                    log(format!("QEMU comparison failed: {e:#}"));
                    b.qemu_error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
    }
    b.machine.loadavg_end = loadavg();
    let json = serde_json::to_string_pretty(&b)?;
    if let Some(p) = &a.json_out {
        std::fs::write(p, &json).with_context(|| format!("writing {}", p.display()))?;
    }
    if a.json {
        println!("{json}");
    } else {
        print_snapshot_bench(&b, &a);
    }
    drop(tmp);
    Ok(0)
}

type SeriesOut = (LiveSeries, Option<IoFigures>, Option<IncFigures>);

/// Boots one guest, takes the live and stop-the-world snapshots, and (with
/// `with_io`) the throughput, encryption and incremental runs.
fn live_series(
    a: &SnapBenchArgs,
    dir: &Path,
    mem: u64,
    rate: &str,
    keep: Option<&PathBuf>,
    with_io: bool,
    timeout: Duration,
) -> Result<SeriesOut> {
    log(format!("booting the test guest: {} MiB, wss={} MiB, rate={rate}", mib(mem), a.wss_mib));
    let mut vm = FerryVm::boot(dir, mem, a.wss_mib, rate, timeout)?;
    let t = Instant::now();
    let s0 = vcpu_sched(vm.kid.child.id());
    std::thread::sleep(Duration::from_millis(1500));
    let vcpu_blocked_idle_ms = vcpu_blocked_ms(&s0, &vcpu_sched(vm.kid.child.id()), t.elapsed());
    let guest_rate_before = vm.rate_in(t, Instant::now());
    let img = dir.join("live.img");
    let mut live = Vec::new();
    for i in 0..a.runs {
        let s = vm.snapshot(&img, &[], timeout)?;
        log(format!(
            "  live {}/{}: pause {:.2} ms (vCPU blocked {:.2} ms), total {:.0} ms, rounds {:?} ({}), {:.2} GB/s, VMM run-queue wait {:.1} ms",
            i + 1,
            a.runs,
            s.pause_ms,
            s.vcpu_blocked_ms.unwrap_or(f64::NAN),
            s.total_ms,
            s.pages_per_round,
            s.stop_reason,
            s.gb_per_s,
            s.vmm_runq_wait_ms.unwrap_or(f64::NAN)
        ));
        live.push(s);
        std::thread::sleep(Duration::from_millis(200));
    }
    if let Some(k) = keep {
        std::fs::rename(&img, k)?;
    }
    let mut live_final_copy = Vec::new();
    if has_flag("snapshot", "--final-phase") {
        for i in 0..a.runs {
            let s = vm.snapshot(&img, &["--final-phase", "copy"], timeout)?;
            log(format!(
                "  live --final-phase copy {}/{}: pause {:.2} ms (vCPU blocked {:.2} ms), rounds {:?}",
                i + 1,
                a.runs,
                s.pause_ms,
                s.vcpu_blocked_ms.unwrap_or(f64::NAN),
                s.pages_per_round
            ));
            live_final_copy.push(s);
            let _ = std::fs::remove_file(&img);
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    let _ = std::fs::remove_file(&img);
    let stop_world = vm.snapshot(&img, &["--pause"], timeout)?;
    log(format!(
        "  stop-the-world: pause {:.1} ms (vCPU blocked {:.1} ms), {:.2} GB/s",
        stop_world.pause_ms,
        stop_world.vcpu_blocked_ms.unwrap_or(f64::NAN),
        stop_world.gb_per_s
    ));
    let _ = std::fs::remove_file(&img);

    let (mut io, mut inc) = (None, None);
    if with_io {
        io = Some(io_figures(a, dir, &mut vm, mem, timeout)?);
        inc = Some(inc_figures(a, dir, &mut vm, mem, rate, timeout)?);
    }
    let verified = vm.shutdown(timeout)?;
    if let Some(inc) = inc.as_mut() {
        log("  restoring the full+incremental chain");
        let last = dir.join("inc-2.img");
        inc.chain_restore = Some(ferry_restore(dir, &last, &[], timeout)?);
        for i in 0..3 {
            let _ = std::fs::remove_file(dir.join(format!("inc-{i}.img")));
        }
    }
    let pauses: Vec<f64> = live.iter().map(|s| s.pause_ms).collect();
    let during: Vec<f64> = live.iter().filter_map(|s| s.guest_rate_during).collect();
    let blocked: Vec<f64> = live.iter().filter_map(|s| s.vcpu_blocked_ms).collect();
    let series = LiveSeries {
        mem_mib: mib(mem),
        rate: rate.to_string(),
        pause_ms_median: median(&pauses),
        pause_ms_max: max_of(&pauses),
        total_ms_median: median(&live.iter().map(|s| s.total_ms).collect::<Vec<_>>()),
        gb_per_s_median: median(&live.iter().map(|s| s.gb_per_s).collect::<Vec<_>>()),
        bytes_written_median: median(&live.iter().map(|s| s.bytes_written as f64).collect::<Vec<_>>()),
        guest_rate_before,
        vcpu_blocked_idle_ms,
        vcpu_blocked_ms_median: (!blocked.is_empty()).then(|| median(&blocked)),
        vcpu_blocked_ms_max: (!blocked.is_empty()).then(|| max_of(&blocked)),
        guest_rate_during_median: (!during.is_empty()).then(|| median(&during)),
        cow_protected_pages_median: cow_median(&live, "protected_pages"),
        cow_write_faults_median: cow_median(&live, "write_faults"),
        cow_background_ms_median: cow_median(&live, "background_ms"),
        final_copy_pause_ms_median: (!live_final_copy.is_empty())
            .then(|| median(&live_final_copy.iter().map(|s| s.pause_ms).collect::<Vec<_>>())),
        final_copy_vcpu_blocked_ms_median: {
            let v: Vec<f64> = live_final_copy.iter().filter_map(|s| s.vcpu_blocked_ms).collect();
            (!v.is_empty()).then(|| median(&v))
        },
        live,
        live_final_copy,
        stop_world,
        guest_verified_after: verified,
    };
    Ok((series, io, inc))
}

/// Stop-the-world snapshots with and without encryption, in alternating
/// order so drift on a noisy host hits both alike. Returns (plain, encrypted).
fn enc_pairs(
    vm: &mut FerryVm,
    img: &Path,
    base: &[&str],
    keyp: &str,
    runs: u32,
    timeout: Duration,
) -> Result<(Vec<Snap>, Vec<Snap>)> {
    let (mut plain, mut encrypted) = (Vec::new(), Vec::new());
    for i in 0..runs {
        for enc in if i % 2 == 0 { [false, true] } else { [true, false] } {
            let mut extra: Vec<&str> = base.to_vec();
            if enc {
                extra.extend(["--encrypt", "--key-file", keyp]);
            }
            let s = vm.snapshot(img, &extra, timeout)?;
            log(format!(
                "  {} {}: {:.2} GB/s ({} data pages in {:.0} ms, {} MiB written)",
                base.join(" "),
                if enc { "encrypted" } else { "plain    " },
                s.gb_per_s,
                s.data_pages,
                s.total_ms,
                mib(s.bytes_written)
            ));
            if enc {
                encrypted.push(s)
            } else {
                plain.push(s)
            }
            let _ = std::fs::remove_file(img);
        }
    }
    Ok((plain, encrypted))
}

/// Median of a copy-on-write figure over the snapshots that report one.
fn cow_median(snaps: &[Snap], key: &str) -> Option<f64> {
    let v: Vec<f64> = snaps.iter().filter_map(|s| s.cow.as_ref()?.get(key)?.as_f64()).collect();
    (!v.is_empty()).then(|| median(&v))
}

fn io_figures(a: &SnapBenchArgs, dir: &Path, vm: &mut FerryVm, mem: u64, timeout: Duration) -> Result<IoFigures> {
    let key = dir.join("bench.key");
    std::fs::write(&key, b"ferry bench snapshot key: not a secret")?;
    let keyp = key.to_str().context("key path is not UTF-8")?;
    let img = dir.join("io.img");
    let (plain, encrypted) = enc_pairs(vm, &img, &["--pause"], keyp, a.runs, timeout)?;
    let (codec_none, codec_none_encrypted) =
        enc_pairs(vm, &img, &["--pause", "--codec", "none"], keyp, a.runs.min(3), timeout)?;
    let mut live_encrypted = Vec::new();
    for _ in 0..a.runs.min(3) {
        let s = vm.snapshot(&img, &["--encrypt", "--key-file", keyp], timeout)?;
        log(format!("  live encrypted: pause {:.2} ms, {:.2} GB/s", s.pause_ms, s.gb_per_s));
        live_encrypted.push(s);
        let _ = std::fs::remove_file(&img);
    }
    let med = |v: &[Snap]| median(&v.iter().map(|s| s.gb_per_s).collect::<Vec<_>>());
    let (p, e) = (med(&plain), med(&encrypted));
    let (pn, en) = (med(&codec_none), med(&codec_none_encrypted));
    Ok(IoFigures {
        mem_mib: mib(mem),
        plain_gb_per_s_median: p,
        encrypted_gb_per_s_median: e,
        encryption_cost: 1.0 - e / p,
        codec_none_gb_per_s_median: pn,
        codec_none_encrypted_gb_per_s_median: en,
        codec_none_encryption_cost: 1.0 - en / pn,
        plain,
        encrypted,
        codec_none,
        codec_none_encrypted,
        live_encrypted,
    })
}

fn inc_figures(
    a: &SnapBenchArgs,
    dir: &Path,
    vm: &mut FerryVm,
    mem: u64,
    rate: &str,
    timeout: Duration,
) -> Result<IncFigures> {
    let p: Vec<PathBuf> = (0..3).map(|i| dir.join(format!("inc-{i}.img"))).collect();
    let s = |p: &PathBuf| p.to_str().map(str::to_string).context("image path is not UTF-8");
    let full = vm.snapshot(&p[0], &[], timeout)?;
    let incremental = vm.snapshot(&p[1], &["--parent", &s(&p[0])?], timeout)?;
    // Let the guest run at least one whole pass over its working set, so that
    // every working-set page is dirtied before the next incremental image.
    let n = vm.kid.out_len();
    std::thread::sleep(Duration::from_secs(1));
    let (i, _, _) = vm.kid.wait_line("PROGRESS", false, n, timeout, |l| l.starts_with("PROGRESS"))?;
    vm.kid.wait_line("PROGRESS", false, i + 1, timeout, |l| l.starts_with("PROGRESS"))?;
    let incremental_stop_world = vm.snapshot(&p[2], &["--pause", "--parent", &s(&p[1])?], timeout)?;
    let passes_full_to_incremental = vm.passes_between(full.t1, incremental.t0);
    let passes_before_stop_world = vm.passes_between(incremental.t1, incremental_stop_world.t0);
    log(format!(
        "  incremental: full {} pages / {} B, live incremental {} pages / {} B (rounds {:?}), stop-the-world incremental {} pages",
        full.data_pages,
        full.bytes_written,
        incremental.data_pages,
        incremental.bytes_written,
        incremental.pages_per_round,
        incremental_stop_world.data_pages
    ));
    Ok(IncFigures {
        mem_mib: mib(mem),
        rate: rate.to_string(),
        wss_pages: a.wss_mib * 256,
        bytes_ratio: incremental.bytes_written as f64 / full.bytes_written as f64,
        data_pages_ratio: incremental.data_pages as f64 / full.data_pages as f64,
        passes_full_to_incremental,
        passes_before_stop_world,
        full,
        incremental,
        incremental_stop_world,
        chain_restore: None,
    })
}

fn first_instr(r: &RestoreRun) -> f64 {
    r.first_instruction_ms.unwrap_or(r.ready_ms)
}

/// Whether `ferry <cmd>` has `flag` (options other work adds may be absent).
fn has_flag(cmd: &str, flag: &str) -> bool {
    ferry_exe()
        .ok()
        .and_then(|exe| Command::new(exe).args([cmd, "--help"]).output().ok())
        .map(|o| String::from_utf8_lossy(&o.stdout).contains(flag))
        .unwrap_or(false)
}

fn restore_series(a: &SnapBenchArgs, dir: &Path, mem: u64, img: &Path, timeout: Duration) -> Result<RestoreSeries> {
    let image_bytes = std::fs::metadata(img)?.len();
    let n = a.restore_runs.max(1);
    let mut runs = Vec::new();
    for i in 0..n {
        let r = ferry_restore(dir, img, &[], timeout)?;
        log(format!(
            "  restore {} MiB {}/{n}: first instruction {:.1} ms, memory {:.1} ms ({:.2} GB/s), verified {}",
            mib(mem),
            i + 1,
            first_instr(&r),
            r.memory_ms,
            r.memory_gb_per_s,
            r.verified
        ));
        runs.push(r);
    }
    let (mut lazy, mut lazy_error) = (Vec::new(), None);
    if has_flag("restore", "--memory") {
        for i in 0..n {
            match ferry_restore(dir, img, &["--memory", "lazy"], timeout) {
                Ok(r) => {
                    log(format!(
                        "  lazy restore {} MiB {}/{n}: first instruction {:.1} ms, verified {}",
                        mib(mem),
                        i + 1,
                        first_instr(&r),
                        r.verified
                    ));
                    lazy.push(r);
                }
                Err(e) => {
                    log(format!("  lazy restore failed: {e:#}"));
                    lazy_error = Some(format!("{e:#}"));
                    break;
                }
            }
        }
    }
    Ok(RestoreSeries {
        mem_mib: mib(mem),
        image_bytes,
        ready_ms_median: median(&runs.iter().map(|r| r.ready_ms).collect::<Vec<_>>()),
        first_instruction_ms_median: median(&runs.iter().map(first_instr).collect::<Vec<_>>()),
        memory_gb_per_s_median: median(&runs.iter().map(|r| r.memory_gb_per_s).collect::<Vec<_>>()),
        lazy_first_instruction_ms_median: (!lazy.is_empty())
            .then(|| median(&lazy.iter().map(first_instr).collect::<Vec<_>>())),
        runs,
        lazy,
        lazy_error,
    })
}

// --- QEMU -------------------------------------------------------------------

/// A QMP connection.
struct Qmp {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Qmp {
    fn connect(sock: &Path, kid: &mut Kid, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            if let Ok(s) = UnixStream::connect(sock) {
                break s;
            }
            if let Some(st) = kid.exited()? {
                bail!("{} exited ({st}) before its QMP socket accepted{}", kid.name, kid.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: QMP socket {} not up within {} s{}",
                    kid.name,
                    sock.display(),
                    timeout.as_secs(),
                    kid.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp { r: BufReader::new(s.try_clone()?), w: s };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).context("reading the QMP greeting")?;
        q.cmd("qmp_capabilities", serde_json::Value::Null)?;
        Ok(q)
    }

    fn cmd(&mut self, name: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let mut m = serde_json::json!({ "execute": name });
        if !args.is_null() {
            m["arguments"] = args;
        }
        writeln!(self.w, "{m}").with_context(|| format!("sending QMP {name}"))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).with_context(|| format!("reading the QMP reply to {name}"))? == 0 {
                bail!("QMP connection closed while waiting for the reply to {name}");
            }
            let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name} failed: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

fn shell_quote(p: &Path) -> String {
    format!("'{}'", p.display().to_string().replace('\'', r"'\''"))
}

fn qemu_cmd(a: &SnapBenchArgs, elf: &Path, mem: u64, cmdline: &str, serial: &Path, qmp: &Path) -> Command {
    let mut c = Command::new(&a.qemu);
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", &mib(mem).to_string(), "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-kernel"])
        .arg(elf)
        .args(["-append", cmdline, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"]);
    c
}

/// Migrates to `uri` and polls query-migrate until it ends; on timeout cancels it.
fn qemu_migrate(q: &mut Qmp, uri: &str, file: &Path, timeout: Duration) -> Result<QemuMig> {
    let _ = std::fs::remove_file(file);
    let t = Instant::now();
    q.cmd("migrate", serde_json::json!({ "uri": uri }))?;
    let deadline = t + timeout;
    let mut cancelled = false;
    let mut last_active = serde_json::Value::Null;
    let v = loop {
        let v = q.cmd("query-migrate", serde_json::Value::Null)?;
        let st = v["status"].as_str().unwrap_or("");
        if matches!(st, "completed" | "failed" | "cancelled") {
            // A cancelled migration reports no figures: keep the last ones seen.
            break if st == "completed" || last_active.is_null() { v } else { last_active };
        }
        if v.get("ram").is_some() {
            last_active = v;
        }
        if Instant::now() >= deadline && !cancelled {
            q.cmd("migrate_cancel", serde_json::Value::Null)?;
            cancelled = true;
        }
        if Instant::now() >= deadline + Duration::from_secs(30) {
            bail!("QEMU migration neither ended nor cancelled {} s after the deadline", 30);
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    let wall_ms = t.elapsed().as_secs_f64() * 1e3;
    // `cat` may still be writing: wait until the file stops growing.
    let mut size = 0;
    let stable_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if s == size || Instant::now() >= stable_deadline {
            break;
        }
        size = s;
    }
    let final_status = q.cmd("query-migrate", serde_json::Value::Null)?["status"].as_str().unwrap_or("?").to_string();
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ram = &v["ram"];
    let u = |k: &str| ram[k].as_u64().unwrap_or(0);
    Ok(QemuMig {
        status: if cancelled {
            format!("not completed within {} s (then cancelled: {final_status})", timeout.as_secs())
        } else {
            final_status
        },
        total_ms: f("total-time"),
        downtime_ms: f("downtime"),
        setup_ms: f("setup-time"),
        transferred: u("transferred"),
        normal_pages: u("normal"),
        duplicate_pages: u("duplicate"),
        dirty_sync_count: u("dirty-sync-count"),
        file_bytes: size,
        wall_ms,
    })
}

fn wait_serial(kid: &mut Kid, serial: &Path, what: &str, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = std::fs::read_to_string(serial).unwrap_or_default();
        if s.lines().filter(|l| l.starts_with(what)).count() >= n {
            return Ok(());
        }
        if let Some(st) = kid.exited()? {
            bail!("{} exited ({st}) before its serial showed {n} {what} line(s){}", kid.name, kid.tail());
        }
        if Instant::now() >= deadline {
            bail!("{}: no {n} {what} line(s) on its serial within {} s{}", kid.name, timeout.as_secs(), kid.tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn qemu_bench(a: &SnapBenchArgs, dir: &Path, mem: u64, timeout: Duration) -> Result<QemuFigures> {
    let version = Command::new(&a.qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version (install it: apt-get install -y qemu-system-x86)", a.qemu))?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("").to_string();
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, ferry_guest::ELF)?;
    let cmdline = format!("dirty wss={} rate=max report=500", a.wss_mib);
    let (serial, qmp_sock) = (dir.join("qemu-serial.txt"), dir.join("qemu-qmp.sock"));
    let _ = std::fs::remove_file(&qmp_sock);
    log(format!("QEMU: booting the test guest, {} MiB, {cmdline:?}", mib(mem)));
    let mut kid =
        Kid::spawn(&format!("QEMU ({} MiB)", mib(mem)), &mut qemu_cmd(a, &elf, mem, &cmdline, &serial, &qmp_sock))?;
    let mut q = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
    wait_serial(&mut kid, &serial, "MARKED", 1, timeout)?;
    wait_serial(&mut kid, &serial, "PROGRESS", 2, timeout)?;
    // No bandwidth cap (QEMU 7.2 defaults to 128 MiB/s); QEMU's default downtime limit.
    q.cmd("migrate-set-parameters", serde_json::json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": 300 }))?;
    let file = dir.join("qemu-mig.bin");
    let uri = format!("exec:cat > {}", shell_quote(&file));
    let mut live = Vec::new();
    for i in 0..a.runs {
        let m = qemu_migrate(&mut q, &uri, &file, timeout)?;
        if !m.status.starts_with("completed") {
            bail!("QEMU migration to a file ended {}", m.status);
        }
        log(format!(
            "  QEMU live {}/{}: downtime {:.0} ms, total {:.0} ms, {} MiB, {} syncs",
            i + 1,
            a.runs,
            m.downtime_ms,
            m.total_ms,
            mib(m.file_bytes),
            m.dirty_sync_count
        ));
        live.push(m);
        q.cmd("cont", serde_json::Value::Null)?; // the source stops after a completed migration
        std::thread::sleep(Duration::from_millis(500));
    }
    let keep = dir.join("qemu-live.bin");
    std::fs::rename(&file, &keep)?;
    q.cmd("stop", serde_json::Value::Null)?;
    let stop_world = qemu_migrate(&mut q, &uri, &file, timeout)?;
    q.cmd("cont", serde_json::Value::Null)?;
    log(format!("  QEMU stop-the-world: total {:.0} ms ({})", stop_world.total_ms, stop_world.status));
    let _ = std::fs::remove_file(&file);
    std::thread::sleep(Duration::from_millis(500));
    q.cmd("migrate-set-parameters", serde_json::json!({ "downtime-limit": 5 }))?;
    let tight = qemu_migrate(&mut q, &uri, &file, Duration::from_secs(20))?;
    log(format!(
        "  QEMU with downtime-limit 5 ms: {} after {:.0} ms, {} syncs",
        tight.status, tight.wall_ms, tight.dirty_sync_count
    ));
    if tight.status.starts_with("completed") {
        q.cmd("cont", serde_json::Value::Null)?;
    }
    let _ = std::fs::remove_file(&file);
    let _ = q.cmd("quit", serde_json::Value::Null);
    kid.finish(Duration::from_secs(30))?;
    drop(q);

    let mut restore = Vec::new();
    for i in 0..a.restore_runs.max(1) {
        let _ = std::fs::remove_file(&qmp_sock);
        let mut c = qemu_cmd(a, &elf, mem, &cmdline, &serial, &qmp_sock);
        c.arg("-incoming").arg(format!("exec:cat {}", shell_quote(&keep)));
        let mut kid = Kid::spawn("QEMU -incoming", &mut c)?;
        let mut q = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = q.cmd("query-status", serde_json::Value::Null)?;
            if v["status"] == "running" {
                break;
            }
            if Instant::now() >= deadline {
                bail!("QEMU -incoming: not running {} s after start (status {})", timeout.as_secs(), v["status"]);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let running_ms = kid.spawned.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(Duration::from_millis(500));
        let keys: Vec<serde_json::Value> =
            ["ctrl", "alt", "delete"].iter().map(|k| serde_json::json!({"type": "qcode", "data": k})).collect();
        q.cmd("send-key", serde_json::json!({ "keys": keys }))?;
        let st = kid.finish(timeout)?;
        let verified =
            st.code() == Some(1) && std::fs::read_to_string(&serial).unwrap_or_default().contains("VERIFY OK");
        log(format!(
            "  QEMU restore {}/{}: running after {running_ms:.0} ms, verified {verified}",
            i + 1,
            a.restore_runs
        ));
        restore.push(QemuRestore { running_ms, verified });
    }
    let _ = std::fs::remove_file(&keep);
    Ok(QemuFigures {
        version,
        mem_mib: mib(mem),
        downtime_ms_median: median(&live.iter().map(|m| m.downtime_ms).collect::<Vec<_>>()),
        total_ms_median: median(&live.iter().map(|m| m.total_ms).collect::<Vec<_>>()),
        file_bytes: live.last().map(|m| m.file_bytes).unwrap_or(0),
        live,
        stop_world,
        tight,
        restore,
    })
}

fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.0}%", x * 100.0)
    } else {
        "n/a".into()
    }
}

fn mpps(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 1e6 => format!("{:.0}M", r / 1e6),
        Some(r) => format!("{:.0}k", r / 1e3),
        None => "-".into(),
    }
}

fn print_snapshot_bench(b: &SnapshotBench, a: &SnapBenchArgs) {
    let m = &b.machine;
    println!(
        "ferry bench snapshot: {} x {}, {:.0} GiB, kernel {}, /dev/kvm {}",
        m.nproc,
        m.cpu,
        m.mem_total_gib,
        m.kernel,
        if m.kvm_is_pvm { "is PVM (software hypervisor)" } else { "hardware" }
    );
    println!("load average at start: {}, at end: {}", m.loadavg_start, m.loadavg_end);
    println!(
        "test guest, 1 vCPU, `dirty wss={} rate=<rate>`; {} live lz4 snapshots per row, medians",
        b.wss_mib, b.runs
    );
    println!();
    println!("1. Live snapshot: guest pause");
    println!(
        "  {:>8} {:>6} {:>10} {:>10} {:>10} {:>9} {:>8} {:>14} {:>12} {:>13}",
        "memory",
        "rate",
        "pause med",
        "pause max",
        "total med",
        "image",
        "GB/s",
        "guest st/s",
        "stop-world",
        "rounds (last)"
    );
    for s in &b.live {
        println!(
            "  {:>4} MiB {:>6} {:>7.2} ms {:>7.2} ms {:>7.0} ms {:>5} KiB {:>8.2} {:>6}/{:<7} {:>9.0} ms {:>13}",
            s.mem_mib,
            s.rate,
            s.pause_ms_median,
            s.pause_ms_max,
            s.total_ms_median,
            s.bytes_written_median as u64 >> 10,
            s.gb_per_s_median,
            mpps(s.guest_rate_before),
            mpps(s.guest_rate_during_median),
            s.stop_world.pause_ms,
            s.live.last().map(|l| format!("{:?}", l.pages_per_round)).unwrap_or_default()
        );
    }
    println!("  (guest st/s: guest page stores per second before / during the snapshots, from its PROGRESS lines)");
    println!("  guest-visible stall per live snapshot: time the vCPU thread was blocked (schedstat), median / max,");
    println!("  against the reported pause; 'idle' is the same measure over 1.5 s without a snapshot");
    for s in &b.live {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "    {:>4} MiB {:>6}: blocked {:>7} / {:>7} ms, pause {:.2} / {:.2} ms, idle {} ms, stop-the-world blocked {} ms",
            s.mem_mib,
            s.rate,
            f(s.vcpu_blocked_ms_median),
            f(s.vcpu_blocked_ms_max),
            s.pause_ms_median,
            s.pause_ms_max,
            f(s.vcpu_blocked_idle_ms),
            f(s.stop_world.vcpu_blocked_ms)
        );
    }
    for rate in &a.rates {
        let rows: Vec<&LiveSeries> = b.live.iter().filter(|s| &s.rate == rate).collect();
        if let (Some(lo), Some(hi)) = (rows.iter().min_by_key(|s| s.mem_mib), rows.iter().max_by_key(|s| s.mem_mib)) {
            if lo.mem_mib != hi.mem_mib {
                println!(
                    "  rate={rate}: pause {} MiB -> {} MiB: {:.2} -> {:.2} ms (x{:.2})",
                    lo.mem_mib,
                    hi.mem_mib,
                    lo.pause_ms_median,
                    hi.pause_ms_median,
                    hi.pause_ms_median / lo.pause_ms_median
                );
            }
        }
    }
    if b.live.iter().any(|s| s.cow_protected_pages_median.is_some()) {
        println!("  copy-on-write final phase (medians): pages protected at the pause / guest write faults / copy after resume");
        for s in &b.live {
            let f = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
            println!(
                "    {:>4} MiB {:>6}: {:>6} / {:>6} / {:>6} ms",
                s.mem_mib,
                s.rate,
                f(s.cow_protected_pages_median),
                f(s.cow_write_faults_median),
                s.cow_background_ms_median.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
            );
        }
    }
    if b.live.iter().any(|s| !s.live_final_copy.is_empty()) {
        println!("  final phase: cow (default) vs copy (`--final-phase copy`), medians of pause / vCPU blocked");
        for s in &b.live {
            let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            println!(
                "    {:>4} MiB {:>6}: cow {:.2} / {} ms, copy {} / {} ms",
                s.mem_mib,
                s.rate,
                s.pause_ms_median,
                f(s.vcpu_blocked_ms_median),
                f(s.final_copy_pause_ms_median),
                f(s.final_copy_vcpu_blocked_ms_median)
            );
        }
    }
    let all_under = b.live.iter().all(|s| s.pause_ms_median <= 5.0);
    println!("  goal: median pause <= 5 ms in every row: {}", if all_under { "met" } else { "MISSED" });
    println!();

    let bl = &b.baseline;
    println!("2. Throughput on non-zero pages (data pages x 4096 / snapshot total time)");
    println!(
        "  disk: sequential write + fsync, {} MiB:        {:.2} GB/s (samples {:.2?})",
        a.disk_mib,
        bl.disk(),
        bl.disk_write_gb_s
    );
    println!(
        "  codec: lz4 on guest-like pages, 1 MiB chunks: {:.2} GB/s on {} threads, {:.2} GB/s on 1 (ratio {:.0}x)",
        bl.codec(),
        bl.lz4_threads,
        max_of(&bl.lz4_1thread_gb_s),
        bl.lz4_ratio
    );
    println!(
        "  memory: memcpy {:.2} GB/s (1 thread); first touch of a fresh page {:.2} us ({:.2} GB/s of 4 KiB pages)",
        max_of(&bl.memcpy_gb_s),
        median(&bl.first_touch_us_per_page),
        PAGE as f64 / median(&bl.first_touch_us_per_page) / 1e3
    );
    let slower = bl.disk().min(bl.codec());
    if let Some(io) = &b.io {
        println!(
            "  snapshot, stop-the-world, lz4, {} MiB:      {:.2} GB/s = {} of min(disk, codec) = {} of the codec alone",
            io.mem_mib,
            io.plain_gb_per_s_median,
            pct(io.plain_gb_per_s_median / slower),
            pct(io.plain_gb_per_s_median / bl.codec())
        );
        println!(
            "  snapshot, stop-the-world, codec none:        {:.2} GB/s = {} of the disk (image {} MiB)",
            io.codec_none_gb_per_s_median,
            pct(io.codec_none_gb_per_s_median / bl.disk()),
            io.codec_none.first().map(|s| mib(s.bytes_written)).unwrap_or(0)
        );
        for s in b.live.iter().filter(|s| s.mem_mib == io.mem_mib) {
            println!(
                "  snapshot, live, lz4, rate={:<6}              {:.2} GB/s = {} of min(disk, codec) (data pages incl. re-sent)",
                s.rate,
                s.gb_per_s_median,
                pct(s.gb_per_s_median / slower)
            );
        }
    }
    println!();

    println!("3. Restore (eager, image in the page cache)");
    println!(
        "  {:>8} {:>10} {:>12} {:>12} {:>11} {:>15} {:>12} {:>9}",
        "memory", "image", "first instr", "memory ms", "GB/s", "first PROGRESS", "lazy: first", "verified"
    );
    for r in &b.restore {
        println!(
            "  {:>4} MiB {:>6} KiB {:>9.1} ms {:>9.0} ms {:>11.2} {:>12.0} ms {:>12} {:>9}",
            r.mem_mib,
            r.image_bytes >> 10,
            r.first_instruction_ms_median,
            median(&r.runs.iter().map(|x| x.memory_ms).collect::<Vec<_>>()),
            r.memory_gb_per_s_median,
            median(&r.runs.iter().map(|x| x.first_progress_ms).collect::<Vec<_>>()),
            r.lazy_first_instruction_ms_median.map(|t| format!("{t:.1} ms")).unwrap_or_else(|| "-".into()),
            r.runs.iter().chain(&r.lazy).all(|x| x.verified)
        );
        if let Some(e) = &r.lazy_error {
            println!("    lazy restore failed: {e}");
        }
    }
    println!("  (medians; first instr: process start -> first guest instruction (the report's first_instruction_ms,");
    println!("   else ready_ms); GB/s: eager fill rate over non-zero bytes; first PROGRESS: spawn -> the guest's next");
    println!("   serial line, which it prints at most every 100 ms; lazy: `ferry restore --memory lazy`)");
    println!();

    if let Some(io) = &b.io {
        println!("4. Encryption (stop-the-world snapshots, {} MiB, alternating, medians)", io.mem_mib);
        println!(
            "  plain {:.2} GB/s, encrypted {:.2} GB/s: cost {} (goal <= 10%: {})",
            io.plain_gb_per_s_median,
            io.encrypted_gb_per_s_median,
            pct(io.encryption_cost),
            if io.encryption_cost <= 0.10 { "met" } else { "MISSED" }
        );
        println!(
            "  codec none (every data byte encrypted): plain {:.2} GB/s, encrypted {:.2} GB/s: cost {}",
            io.codec_none_gb_per_s_median,
            io.codec_none_encrypted_gb_per_s_median,
            pct(io.codec_none_encryption_cost)
        );
        println!(
            "  live encrypted snapshots: pause median {:.2} ms, {:.2} GB/s",
            median(&io.live_encrypted.iter().map(|s| s.pause_ms).collect::<Vec<_>>()),
            median(&io.live_encrypted.iter().map(|s| s.gb_per_s).collect::<Vec<_>>())
        );
        println!();
    }

    if let Some(inc) = &b.incremental {
        println!("5. Incremental ({} MiB, rate={}, working set {} pages)", inc.mem_mib, inc.rate, inc.wss_pages);
        println!(
            "  full (live):                      {:>8} data pages, {:>10} bytes",
            inc.full.data_pages, inc.full.bytes_written
        );
        println!(
            "  incremental right after (live):   {:>8} data pages, {:>10} bytes = {} of the pages, {} of the bytes; rounds {:?}",
            inc.incremental.data_pages,
            inc.incremental.bytes_written,
            pct(inc.data_pages_ratio),
            pct(inc.bytes_ratio),
            inc.incremental.pages_per_round
        );
        println!(
            "    (the guest completed >= {} passes over its working set between the full image and this one)",
            inc.passes_full_to_incremental.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        );
        let sw = &inc.incremental_stop_world;
        let whole = inc.passes_before_stop_world.unwrap_or(0) >= 1;
        println!("  incremental 1 s later (paused):   {:>8} data pages, {:>10} bytes", sw.data_pages, sw.bytes_written);
        println!(
            "    dirtied since its parent: {} -> {:+} pages beyond the working set",
            if whole {
                format!(
                    "the whole working set ({} pages; >= {} passes in between) plus the guest's own state pages",
                    inc.wss_pages,
                    inc.passes_before_stop_world.unwrap_or(0)
                )
            } else {
                format!("part of the working set ({} pages; no whole pass seen in between)", inc.wss_pages)
            },
            sw.data_pages as i64 - inc.wss_pages as i64
        );
        if let Some(r) = &inc.chain_restore {
            println!(
                "  restore of the 3-image chain: ready {:.1} ms, {} MiB of data written, guest verified: {}",
                r.ready_ms,
                mib(r.data_bytes),
                r.verified
            );
        }
        println!();
    }

    println!(
        "6. QEMU on the same machine (same guest, migrate to exec:cat > file; restore with -incoming exec:cat file)"
    );
    if let Some(e) = &b.qemu_error {
        println!("  failed: {e}");
    }
    for q in &b.qemu {
        let f = b.live.iter().find(|s| s.mem_mib == q.mem_mib && s.rate == "max");
        let fr = b.restore.iter().find(|r| r.mem_mib == q.mem_mib);
        println!("  {} , {} MiB, rate=max, max-bandwidth unlimited, downtime-limit 300 ms", q.version, q.mem_mib);
        println!("  {:<34} {:>12} {:>12} {:>10}", "", "QEMU", "ferry", "ferry/QEMU");
        let row = |name: &str, qv: f64, fv: Option<f64>, unit: &str| {
            let fv = fv.unwrap_or(f64::NAN);
            println!("  {name:<34} {:>9.1} {unit:<2} {:>9.2} {unit:<2} {:>10.3}", qv, fv, fv / qv);
        };
        row("live: downtime / pause (median)", q.downtime_ms_median, f.map(|s| s.pause_ms_median), "ms");
        row("live: total time (median)", q.total_ms_median, f.map(|s| s.total_ms_median), "ms");
        row("live: file size", mib(q.file_bytes) as f64, f.map(|s| s.bytes_written_median / (1 << 20) as f64), "MiB");
        row("stop-the-world: total (= pause)", q.stop_world.total_ms, f.map(|s| s.stop_world.total_ms), "ms");
        row(
            "restore: start -> running (median)",
            median(&q.restore.iter().map(|r| r.running_ms).collect::<Vec<_>>()),
            fr.map(|r| r.first_instruction_ms_median),
            "ms",
        );
        println!(
            "  QEMU live runs: downtime {:?} ms, total {:?} ms, dirty syncs {:?}",
            q.live.iter().map(|m| m.downtime_ms).collect::<Vec<_>>(),
            q.live.iter().map(|m| m.total_ms).collect::<Vec<_>>(),
            q.live.iter().map(|m| m.dirty_sync_count).collect::<Vec<_>>()
        );
        println!(
            "  QEMU with downtime-limit 5 ms (ferry's budget): {} after {:.0} ms, downtime {:.0} ms, {} dirty syncs, {} MiB transferred",
            q.tight.status,
            q.tight.wall_ms,
            q.tight.downtime_ms,
            q.tight.dirty_sync_count,
            mib(q.tight.transferred)
        );
        println!("  QEMU restores verified by the guest: {}", q.restore.iter().all(|r| r.verified));
    }
    println!();
    println!("guest verified its memory after every run: {}", b.guest_verified_all);
}
