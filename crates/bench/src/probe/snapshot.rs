//! `ferry bench snapshot`: live snapshot pauses (as reported and as the
//! guest's vCPU sees them), throughput against the disk and the codec,
//! restore, encryption and incremental images, side by side with QEMU.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, has_flag, Kid};
use crate::peer::qemu::{self, QemuFigures};
use crate::probe::host::sched::{runq_wait_ns, vcpu_blocked_ms, vcpu_sched};
use crate::probe::host::{loadavg, machine, Baseline, Machine};
use crate::util::{gbps, log, max_of, median, mib, PAGE};
use crate::vm::{progress_of, FerryVm};

/// Options of `ferry bench snapshot`.
#[derive(clap::Args, Debug, Clone)]
pub struct SnapBenchArgs {
    /// Live snapshots per configuration (the pause figure is their median).
    #[arg(long, default_value_t = 5)]
    pub(crate) runs: u32,
    /// Guest memory sizes to snapshot.
    #[arg(long, default_value = "256M,1G,4G", value_delimiter = ',', value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mems: Vec<u64>,
    /// Working set the guest rewrites, in MiB.
    #[arg(long, default_value_t = 64)]
    pub(crate) wss_mib: u64,
    /// Guest dirty rates: page stores per second, or max.
    #[arg(long, default_value = "max,20000", value_delimiter = ',')]
    pub(crate) rates: Vec<String>,
    /// Guest memory for the throughput, encryption and incremental runs.
    #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) io_mem: u64,
    /// Restores per image.
    #[arg(long, default_value_t = 3)]
    pub(crate) restore_runs: u32,
    /// MiB written (and fsynced) to measure the disk.
    #[arg(long, default_value_t = 1024)]
    pub(crate) disk_mib: u64,
    /// Directory for images and the disk test (a temporary directory is made
    /// inside it and removed at the end). Default: the system temp directory.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// QEMU binary for the comparison.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub(crate) qemu: String,
    /// Guest memory sizes for the QEMU comparison.
    #[arg(long, default_value = "1G", value_delimiter = ',', value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) qemu_mems: Vec<u64>,
    /// Skip the QEMU comparison.
    #[arg(long)]
    pub(crate) no_qemu: bool,
    /// Upper bound for any single wait (boot, snapshot, restore), in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub(crate) json_out: Option<PathBuf>,
}

/// What one `ferry snapshot --json` reported.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct Snap {
    pub(crate) pause_ms: f64,
    pub(crate) total_ms: f64,
    pub(crate) rounds: u64,
    pub(crate) pages_per_round: Vec<u64>,
    pub(crate) stop_reason: String,
    pub(crate) data_pages: u64,
    pub(crate) bytes_written: u64,
    pub(crate) compression_ratio: f64,
    /// Non-zero pages sent per second of the whole snapshot: data_pages * 4096 / total_ms.
    pub(crate) gb_per_s: f64,
    /// Wall time of the `ferry snapshot` client process.
    pub(crate) client_ms: f64,
    /// Time the vCPU thread spent blocked (neither running nor runnable)
    /// while the `ferry snapshot` client ran: the guest-visible stall.
    pub(crate) vcpu_blocked_ms: Option<f64>,
    /// Time the VMM's non-vCPU threads spent runnable but waiting for a CPU
    /// during this snapshot (from /proc/PID/task/*/schedstat): host contention.
    pub(crate) vmm_runq_wait_ms: Option<f64>,
    /// The copy-on-write phase, when the engine used one.
    pub(crate) cow: Option<serde_json::Value>,
    /// Guest page stores per second over the PROGRESS lines bracketing this snapshot.
    pub(crate) guest_rate_during: Option<f64>,
    #[serde(skip)]
    pub(crate) t0: Option<Instant>,
    #[serde(skip)]
    pub(crate) t1: Option<Instant>,
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

impl FerryVm {
    /// Takes one snapshot with `ferry snapshot --json`, measuring the
    /// vCPU's stall and the guest's store rate around it.
    pub(crate) fn snapshot(&mut self, out: &Path, extra: &[&str], timeout: Duration) -> Result<Snap> {
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
}

/// One `ferry restore` of an image.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct RestoreRun {
    pub(crate) chain_len: u64,
    pub(crate) data_bytes: u64,
    pub(crate) open_ms: f64,
    pub(crate) memory_ms: f64,
    pub(crate) memory_gb_per_s: f64,
    /// Process start to the vCPUs being ready to run.
    pub(crate) ready_ms: f64,
    /// Process start to the vCPUs being let into the guest, when the restore reports it.
    pub(crate) first_instruction_ms: Option<f64>,
    /// eager or lazy, when the restore reports it.
    pub(crate) memory_mode: Option<String>,
    pub(crate) fill_threads: Option<u64>,
    /// The lazy restore's figures (faults, prefetch), when present.
    pub(crate) lazy: Option<serde_json::Value>,
    pub(crate) first_kvm_run_ms: Option<f64>,
    pub(crate) first_guest_io_ms: Option<f64>,
    /// Spawn of `ferry restore` to the restored guest's first PROGRESS line (the guest prints
    /// at most every 100 ms, so this bounds time-to-running from above).
    pub(crate) first_progress_ms: f64,
    /// The guest verified every page on Ctrl-Alt-Del and exited 0.
    pub(crate) verified: bool,
}

/// Restores `img` in a child `ferry restore`, waits for the guest's first
/// PROGRESS line, shuts it down (the guest verifies every page) and reads
/// the restore report.
pub(crate) fn ferry_restore(dir: &Path, img: &Path, extra: &[&str], timeout: Duration) -> Result<RestoreRun> {
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
    ferry_json(&["shutdown", "--api-sock", &sock.to_string_lossy(), "--timeout-ms", "20000"])
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

/// Live snapshots of one guest configuration.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct LiveSeries {
    pub(crate) mem_mib: u64,
    pub(crate) rate: String,
    pub(crate) pause_ms_median: f64,
    pub(crate) pause_ms_max: f64,
    pub(crate) total_ms_median: f64,
    pub(crate) gb_per_s_median: f64,
    pub(crate) bytes_written_median: f64,
    /// Guest page stores per second before the snapshots (rate=max only meaningful).
    pub(crate) guest_rate_before: Option<f64>,
    /// vCPU blocked time over 1.5 s without snapshots (what serial output etc. cost).
    pub(crate) vcpu_blocked_idle_ms: Option<f64>,
    /// Median and largest guest-visible stall (vCPU blocked) per live snapshot.
    pub(crate) vcpu_blocked_ms_median: Option<f64>,
    pub(crate) vcpu_blocked_ms_max: Option<f64>,
    pub(crate) guest_rate_during_median: Option<f64>,
    /// Copy-on-write final phase (when the engine reports one): medians of
    /// pages protected at the pause, guest write faults on them, and the
    /// background copy time after the guest resumed.
    pub(crate) cow_protected_pages_median: Option<f64>,
    pub(crate) cow_write_faults_median: Option<f64>,
    pub(crate) cow_background_ms_median: Option<f64>,
    pub(crate) live: Vec<Snap>,
    /// The same number of live snapshots with `--final-phase copy` (the last
    /// dirty pages copied while paused), when this ferry has the option.
    pub(crate) live_final_copy: Vec<Snap>,
    pub(crate) final_copy_pause_ms_median: Option<f64>,
    pub(crate) final_copy_vcpu_blocked_ms_median: Option<f64>,
    /// The stop-the-world (`--pause`) snapshot of the same guest.
    pub(crate) stop_world: Snap,
    /// The guest verified all its pages at shutdown after all these snapshots.
    pub(crate) guest_verified_after: bool,
}

/// Throughput and encryption cost (stop-the-world snapshots, guest paused).
#[derive(Serialize, Clone, Debug)]
pub(crate) struct IoFigures {
    pub(crate) mem_mib: u64,
    pub(crate) plain: Vec<Snap>,
    pub(crate) encrypted: Vec<Snap>,
    pub(crate) codec_none: Vec<Snap>,
    pub(crate) codec_none_encrypted: Vec<Snap>,
    pub(crate) plain_gb_per_s_median: f64,
    pub(crate) encrypted_gb_per_s_median: f64,
    /// 1 - encrypted/plain throughput (lz4: only the compressed bytes are encrypted).
    pub(crate) encryption_cost: f64,
    pub(crate) codec_none_gb_per_s_median: f64,
    pub(crate) codec_none_encrypted_gb_per_s_median: f64,
    /// 1 - encrypted/plain throughput with codec none (every byte encrypted).
    pub(crate) codec_none_encryption_cost: f64,
    /// Live (encrypted) snapshot pauses, for the record.
    pub(crate) live_encrypted: Vec<Snap>,
}

/// A full snapshot followed by incremental ones.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct IncFigures {
    pub(crate) mem_mib: u64,
    pub(crate) rate: String,
    pub(crate) wss_pages: u64,
    pub(crate) full: Snap,
    /// Live incremental right after `full`.
    pub(crate) incremental: Snap,
    /// Stop-the-world incremental right after `incremental`: its pages are
    /// exactly the pages the guest dirtied since the previous image.
    pub(crate) incremental_stop_world: Snap,
    pub(crate) bytes_ratio: f64,
    pub(crate) data_pages_ratio: f64,
    /// Whole passes over the working set the guest made between the full
    /// image's end and the live incremental's start (a lower bound).
    pub(crate) passes_full_to_incremental: Option<u64>,
    /// The same between the live incremental's end and the stop-the-world
    /// one's start: >= 1 means every working-set page was dirtied in between.
    pub(crate) passes_before_stop_world: Option<u64>,
    /// The three-image chain restored and verified by the guest.
    pub(crate) chain_restore: Option<RestoreRun>,
}

/// The restores of one image: eager, then lazy when this ferry has it.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct RestoreSeries {
    pub(crate) mem_mib: u64,
    pub(crate) image_bytes: u64,
    pub(crate) runs: Vec<RestoreRun>,
    pub(crate) ready_ms_median: f64,
    /// Median time to first guest instruction (`first_instruction_ms`, else `ready_ms`).
    pub(crate) first_instruction_ms_median: f64,
    pub(crate) memory_gb_per_s_median: f64,
    /// `ferry restore --memory lazy`, when this ferry has it.
    pub(crate) lazy: Vec<RestoreRun>,
    pub(crate) lazy_first_instruction_ms_median: Option<f64>,
    pub(crate) lazy_error: Option<String>,
}

/// Everything `ferry bench snapshot` measured (its JSON output).
#[derive(Serialize, Debug)]
pub(crate) struct SnapshotBench {
    pub(crate) machine: Machine,
    pub(crate) runs: u32,
    pub(crate) wss_mib: u64,
    pub(crate) baseline: Baseline,
    pub(crate) live: Vec<LiveSeries>,
    pub(crate) io: Option<IoFigures>,
    pub(crate) incremental: Option<IncFigures>,
    pub(crate) restore: Vec<RestoreSeries>,
    pub(crate) qemu: Vec<QemuFigures>,
    pub(crate) qemu_error: Option<String>,
    pub(crate) guest_verified_all: bool,
}

/// Runs `ferry bench snapshot` and prints its tables or JSON.
pub(crate) fn snapshot_bench(a: SnapBenchArgs) -> Result<u8> {
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
            match qemu::snapshot_figures(&a.qemu, a.runs, a.wss_mib, a.restore_runs, &dir, mem, timeout) {
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
    crate::report::json::emit(&b, a.json, a.json_out.as_deref(), || {
        crate::report::tables::print_snapshot_bench(&b, &a)
    })?;
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

/// Time to the first guest instruction: the report's figure, else ready_ms.
pub(crate) fn first_instr(r: &RestoreRun) -> f64 {
    r.first_instruction_ms.unwrap_or(r.ready_ms)
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
