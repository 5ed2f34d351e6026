//! `ferry bench migrate`: live migration on loopback, ferry against the link
//! it runs over and against QEMU, in one run.
//!
//! For every guest (memory size x workload x fill) one VM is booted and then
//! migrated over and over, each destination `ferry receive` becoming the next
//! source: a 4 GiB guest marks its memory once, not once per migration, and
//! every migration moves a guest that has been running (and dirtying) on a
//! ferry that received it, which is what a second hop in production sees.
//! Configurations (transport, wire codec) are interleaved run by run so
//! drift on a noisy host hits all of them alike. The last destination shuts
//! the guest down and the guest checks every page it ever wrote.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, ferry_ok, Kid};
use crate::peer::cloud_hypervisor::{ChBins, ChMig, ChVm};
use crate::peer::qemu::{self, QemuMig};
use crate::probe::host::link::{bulk_copy, Link, LinkSample};
use crate::probe::host::sched::{cpu_pressure_avg10, vmm_threads_ns};
use crate::probe::host::{loadavg, machine, Machine};
use crate::util::{gbps, kv, max_of, median, mib};
use crate::vm::FerryVm;

/// Options of `ferry bench migrate`.
#[derive(clap::Args, Debug, Clone)]
pub struct MigrateBenchArgs {
    /// Migrations per configuration (downtime, total time and bytes are their medians).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: u32,
    /// Guest memory sizes.
    #[arg(long, default_value = "1G,4G", value_delimiter = ',', value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mems: Vec<u64>,
    /// Workloads: `idle` (the guest's idle mode: it never writes its memory),
    /// `marked` (every page written once with the fill, then 1000 page
    /// stores/s on 1 MiB), or a dirty rate for `dirty wss=<wss-mib>
    /// rate=<N|max>` (page stores per second).
    #[arg(long, default_value = "idle,20000,max", value_delimiter = ',')]
    pub(crate) loads: Vec<String>,
    /// What the guest stores: `word` (one 8-byte word per page; lz4 shrinks
    /// memory ~200x) and/or `random` (whole pages of incompressible data).
    #[arg(long, default_value = "word,random", value_delimiter = ',')]
    pub(crate) fills: Vec<String>,
    /// TRANSPORT:CODEC[:MODE][:xN]: transport unix, tcp (`--insecure`) or tls
    /// (mutual TLS 1.3); codec lz4, zstd or none; mode precopy (default),
    /// postcopy or hybrid; xN for N page streams. The first runs on every guest
    /// (and is what the QEMU ratios use, with tcp:none beside it where it
    /// ran); all of them run on the guests of --compare-mems.
    #[arg(long, default_value = "tcp:lz4,tcp:none,unix:lz4,tls:lz4", value_delimiter = ',')]
    pub(crate) configs: Vec<String>,
    /// Guest sizes on which every --configs entry runs (the transport and
    /// codec comparison); elsewhere only the first, to bound the run time.
    #[arg(long, default_value = "1G", value_delimiter = ',', value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) compare_mems: Vec<u64>,
    /// Workloads on which every --configs entry runs (at --compare-mems).
    #[arg(long, default_value = "idle,max", value_delimiter = ',')]
    pub(crate) compare_loads: Vec<String>,
    /// Working set the dirty workloads rewrite, in MiB.
    #[arg(long, default_value_t = 64)]
    pub(crate) wss_mib: u64,
    /// Pause budget given to `ferry migrate --downtime-ms` (default: ferry's own).
    #[arg(long)]
    pub(crate) downtime_ms: Option<u64>,
    /// Bytes each link probe copies (before and after the migrations).
    #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) link_bytes: u64,
    /// A short run: 1 GiB only, 1 migration per configuration (ferry and QEMU).
    /// Overrides --mems and --runs.
    #[arg(long)]
    pub(crate) quick: bool,
    /// Directory for sockets and certificates (a temporary directory is made
    /// inside and removed). Default: the system temp directory.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// QEMU binary for the comparison.
    #[arg(long, default_value = "qemu-system-x86_64")]
    pub(crate) qemu: String,
    /// QEMU's downtime-limit, ms (300 is QEMU's default).
    #[arg(long, default_value_t = 300)]
    pub(crate) qemu_downtime_limit_ms: u64,
    /// QEMU multifd configurations to run beside QEMU's default single
    /// stream, as channel counts (`multifd-channels`, set on both ends);
    /// 0 alone: none.
    #[arg(long, default_value = "2", value_delimiter = ',')]
    pub(crate) qemu_multifd_channels: Vec<u32>,
    /// Skip the QEMU comparison.
    #[arg(long)]
    pub(crate) no_qemu: bool,
    /// Cloud Hypervisor binary for the comparison (built outside this
    /// repository; `ch-remote` must be beside it). Default: `cloud-hypervisor`
    /// on PATH; skipped with a note when there is none.
    #[arg(long)]
    pub(crate) cloud_hypervisor: Option<PathBuf>,
    /// Cloud Hypervisor's `downtime_ms` (300 is its default, as QEMU's).
    #[arg(long, default_value_t = 300)]
    pub(crate) cloud_hypervisor_downtime_ms: u64,
    /// Skip the Cloud Hypervisor comparison.
    #[arg(long)]
    pub(crate) no_cloud_hypervisor: bool,
    /// Upper bound for any single wait (boot, one migration), in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Print JSON instead of tables.
    #[arg(long)]
    pub(crate) json: bool,
    /// Also write the JSON to this file.
    #[arg(long)]
    pub(crate) json_out: Option<PathBuf>,
}

impl MigrateBenchArgs {
    /// Whether every configuration runs on `g` (else only the first).
    fn compares(&self, g: &Guest) -> bool {
        self.compare_mems.iter().any(|&m| mib(m) == g.mem_mib) && self.compare_loads.contains(&g.load)
    }
}

/// Wire codec of `ferry migrate --compress`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub(crate) enum Codec {
    /// LZ4 block per page run (ferry's default).
    Lz4,
    /// zstd frame per page run (level -1): fewer bytes for more CPU.
    Zstd,
    /// Raw pages.
    None,
}

impl Codec {
    /// Its name on `ferry migrate`'s command line.
    pub(crate) fn name(self) -> &'static str {
        match self {
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
            Codec::None => "none",
        }
    }
}

/// One transport, codec, mode and stream count.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub(crate) struct Config {
    /// The stream.
    pub(crate) transport: Link,
    /// The wire codec.
    pub(crate) compress: Codec,
    /// `precopy`, `postcopy` or `hybrid` (`ferry migrate --mode`).
    pub(crate) mode: &'static str,
    /// `ferry migrate --streams`.
    pub(crate) streams: u32,
}

impl Config {
    /// `TRANSPORT[:CODEC[:MODE][:xN]]`, e.g. `tcp:lz4`, `tls:lz4:hybrid`, `tcp:none:x4`.
    fn parse(s: &str) -> Result<Config> {
        let mut parts = s.split(':');
        let transport = Link::parse(parts.next().unwrap_or_default()).map_err(anyhow::Error::msg)?;
        let compress = match parts.next().unwrap_or("lz4") {
            "lz4" => Codec::Lz4,
            "zstd" => Codec::Zstd,
            "none" => Codec::None,
            c => bail!("unknown codec {c:?} in --configs entry {s:?}: use lz4, zstd or none"),
        };
        let (mut mode, mut streams) = ("precopy", 1);
        for p in parts {
            match p {
                "precopy" => mode = "precopy",
                "postcopy" => mode = "postcopy",
                "hybrid" => mode = "hybrid",
                x if x.starts_with('x') && x[1..].parse::<u32>().is_ok_and(|n| (1..=16).contains(&n)) => {
                    streams = x[1..].parse().unwrap_or(1)
                }
                x => {
                    bail!("unknown part {x:?} in --configs entry {s:?}: use precopy, postcopy, hybrid or xN (streams)")
                }
            }
        }
        Ok(Config { transport, compress, mode, streams })
    }

    /// `tcp:lz4`, `tls:lz4:hybrid:x2` and the like.
    pub(crate) fn label(&self) -> String {
        let mut l = format!("{}:{}", self.transport.name(), self.compress.name());
        if self.mode != "precopy" {
            l += &format!(":{}", self.mode);
        }
        if self.streams > 1 {
            l += &format!(":x{}", self.streams);
        }
        l
    }
}

/// One guest configuration: memory, workload, fill.
#[derive(Clone, Debug, Serialize)]
pub(crate) struct Guest {
    /// Guest memory, MiB.
    pub(crate) mem_mib: u64,
    /// `idle`, `marked`, or the dirty rate.
    pub(crate) load: String,
    /// `word` or `random`; None for idle, which never writes its memory.
    pub(crate) fill: Option<String>,
    /// The test guest's command line.
    pub(crate) cmdline: String,
}

impl Guest {
    /// `1024 MiB max random` and the like, for logs.
    pub(crate) fn label(&self) -> String {
        format!("{} MiB {} {}", self.mem_mib, self.load, self.fill.as_deref().unwrap_or("-"))
    }

    /// Whether the guest checks its pages on Ctrl-Alt-Del (dirty mode does).
    pub(crate) fn verifies(&self) -> bool {
        self.load != "idle"
    }
}

/// What one `ferry migrate --json` reported, with what the bench saw around it.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct MigRun {
    /// The source's final pause to the destination's `Running` (ferry's figure).
    pub(crate) downtime_ms: f64,
    /// The whole migration as ferry reports it.
    pub(crate) total_ms: f64,
    /// Connecting and negotiating, part of `total_ms`.
    pub(crate) setup_ms: f64,
    /// Bytes on the wire, frame headers and tags included (TLS records not).
    pub(crate) bytes_sent: u64,
    /// Rounds, the paused one included.
    pub(crate) rounds: u64,
    /// Pages sent per round.
    pub(crate) pages_per_round: Vec<u64>,
    /// Milliseconds per round.
    pub(crate) round_ms: Vec<f64>,
    /// Why the live rounds ended.
    pub(crate) stop_reason: String,
    /// Pages with data, summed over rounds.
    pub(crate) pages_normal: u64,
    /// Pages the source never read because the guest never touched them.
    pub(crate) pages_skipped_unpopulated: u64,
    /// ferry's payload throughput of the live rounds.
    pub(crate) throughput_mb_per_s: f64,
    /// Auto-converge (when this ferry has it): the highest share of the time
    /// the vCPUs were held, and how long they were held in all. A throttled
    /// guest dirties less, so a migration's figures depend on it.
    pub(crate) throttle_max_percent: Option<u64>,
    pub(crate) throttled_ms: Option<f64>,
    /// bytes_sent / total_ms.
    pub(crate) wire_gb_per_s: f64,
    /// Guest data moved (pages_normal x 4 KiB) / total_ms: what compression buys.
    pub(crate) data_gb_per_s: f64,
    /// Wall time of the `ferry migrate` client.
    pub(crate) client_ms: f64,
    /// The destination's "running N ms after its state arrived".
    pub(crate) dst_switchover_ms: Option<f64>,
    /// CPU time the destination's VMM threads (receive loop) used during
    /// the migration, and how long they waited for a CPU: on a busy machine
    /// the second is where a slow migration's time went.
    pub(crate) dst_cpu_ms: Option<f64>,
    pub(crate) dst_runq_ms: Option<f64>,
    /// The guest's first PROGRESS seq after the switch followed the last one
    /// before it (see `SeqCheck`).
    pub(crate) seq_continued: bool,
    /// Those two seqs.
    pub(crate) seq_before: Option<u64>,
    pub(crate) seq_after: Option<u64>,
    /// Post-copy: remote faults at the destination, and how long a vCPU
    /// waited for one (median, p99), ms.
    pub(crate) postcopy_faults: Option<u64>,
    pub(crate) postcopy_blocked_ms_median: Option<f64>,
    pub(crate) postcopy_blocked_ms_p99: Option<f64>,
    /// Post-copy: pages the destination fetched after the switch-over.
    pub(crate) postcopy_deferred_pages: Option<u64>,
}

/// The runs of one configuration on one guest.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct MigSeries {
    /// Transport and codec.
    pub(crate) config: Config,
    /// Every run.
    pub(crate) runs: Vec<MigRun>,
    /// Medians (and spread) over the runs.
    pub(crate) downtime_ms_median: f64,
    pub(crate) downtime_ms_min: f64,
    pub(crate) downtime_ms_max: f64,
    pub(crate) total_ms_median: f64,
    pub(crate) bytes_median: f64,
    pub(crate) rounds_median: f64,
    /// The stop reasons seen, in run order.
    pub(crate) stop_reasons: Vec<String>,
    /// Highest auto-converge step over the runs (None: this ferry has none).
    pub(crate) throttle_max_percent: Option<u64>,
    /// Median time the vCPUs were held by auto-converge.
    pub(crate) throttled_ms_median: f64,
    /// Medians of the destination's VMM-thread CPU time and run-queue wait.
    pub(crate) dst_cpu_ms_median: f64,
    pub(crate) dst_runq_ms_median: f64,
    /// Median bytes / total time.
    pub(crate) wire_gb_per_s_median: f64,
    /// Median guest data / total time.
    pub(crate) data_gb_per_s_median: f64,
    /// Median total time over (median bytes at the link probe's speed for this transport).
    pub(crate) total_over_link_time: f64,
}

/// All configurations on one guest.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct MigRow {
    /// The guest.
    pub(crate) guest: Guest,
    /// One series per configuration, in `--configs` order.
    pub(crate) series: Vec<MigSeries>,
    /// Boot to workload running (memory marked), ms.
    pub(crate) boot_ms: f64,
    /// The guest's own check of every page after the last migration passed
    /// (idle: it shut down cleanly).
    pub(crate) verified: bool,
    /// A migration or a wait failed; the rest of this guest's runs were skipped.
    pub(crate) error: Option<String>,
}

/// QEMU on one guest.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct QemuRow {
    /// The guest.
    pub(crate) guest: Guest,
    /// multifd channels (0: QEMU's default, one migration stream).
    pub(crate) multifd_channels: u32,
    /// Every migration (QEMU's own figures).
    pub(crate) runs: Vec<QemuMig>,
    /// Per migration: CPU time of the destination QEMU's non-vCPU threads,
    /// and their run-queue wait (as for ferry).
    pub(crate) dst_cpu_ms: Vec<f64>,
    pub(crate) dst_runq_ms: Vec<f64>,
    pub(crate) downtime_ms_median: f64,
    pub(crate) total_ms_median: f64,
    pub(crate) transferred_median: f64,
    pub(crate) dirty_syncs_median: f64,
    /// Median total time over (median bytes at the TCP link probe's speed).
    pub(crate) total_over_link_time: f64,
    /// Per migration: the guest's PROGRESS seq went on at the destination.
    pub(crate) seq_continued: Vec<bool>,
    /// The guest verified every page after the last migration.
    pub(crate) verified: bool,
    pub(crate) error: Option<String>,
}

impl QemuRow {
    /// `QEMU` or `QEMU multifd x2`, for logs and tables.
    pub(crate) fn label(&self) -> String {
        match self.multifd_channels {
            0 => "QEMU".to_string(),
            n => format!("QEMU multifd x{n}"),
        }
    }
}

/// Cloud Hypervisor on one guest.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct ChRow {
    /// The guest.
    pub(crate) guest: Guest,
    /// Every migration.
    pub(crate) runs: Vec<ChMig>,
    /// Per migration: CPU time of the destination's non-vCPU threads and their run-queue wait.
    pub(crate) dst_cpu_ms: Vec<f64>,
    pub(crate) dst_runq_ms: Vec<f64>,
    pub(crate) downtime_ms_median: f64,
    pub(crate) total_ms_median: f64,
    /// Median memory sent, bytes (Cloud Hypervisor logs MiB, rounded up).
    pub(crate) sent_bytes_median: f64,
    pub(crate) iterations_median: f64,
    /// Median total time over (median bytes at the TCP link probe's speed).
    pub(crate) total_over_link_time: f64,
    /// Per migration: the guest's PROGRESS seq went on at the destination.
    pub(crate) seq_continued: Vec<bool>,
    /// The guest verified every page after the last migration.
    pub(crate) verified: bool,
    pub(crate) error: Option<String>,
}

/// Everything `ferry bench migrate` measured (its JSON output).
#[derive(Serialize, Debug)]
pub(crate) struct MigrateBench {
    pub(crate) machine: Machine,
    pub(crate) runs: u32,
    pub(crate) wss_mib: u64,
    pub(crate) downtime_ms: Option<u64>,
    /// Link probes before and after the migrations.
    pub(crate) link: Vec<LinkSample>,
    pub(crate) rows: Vec<MigRow>,
    pub(crate) qemu_version: Option<String>,
    pub(crate) qemu_downtime_limit_ms: u64,
    /// QEMU rows per guest: default first, then each multifd channel count.
    pub(crate) qemu: Vec<QemuRow>,
    pub(crate) qemu_error: Option<String>,
    /// `cloud-hypervisor --version`, when it ran.
    pub(crate) ch_version: Option<String>,
    pub(crate) ch_downtime_ms: u64,
    pub(crate) ch: Vec<ChRow>,
    /// Why Cloud Hypervisor did not run (absent binary, --no-cloud-hypervisor).
    pub(crate) ch_error: Option<String>,
    pub(crate) guest_verified_all: bool,
    /// `/proc/pressure/cpu` some avg10 at the start and the end (% of time
    /// some task waited for a CPU): how busy the machine was.
    pub(crate) cpu_pressure_start: Option<f64>,
    pub(crate) cpu_pressure_end: Option<f64>,
    /// Wall time of the whole bench.
    pub(crate) elapsed_s: f64,
}

impl MigrateBench {
    /// Best link speed seen for `link` (GB/s): what the socket can do here.
    pub(crate) fn link_gb_s(&self, link: Link) -> f64 {
        max_of(&self.link.iter().filter(|s| s.link == link).map(|s| s.gb_per_s).collect::<Vec<_>>())
    }
}

fn cmdline(load: &str, fill: Option<&str>, wss_mib: u64) -> String {
    match (load, fill) {
        ("idle", _) => "idle report=100".to_string(),
        ("marked", Some(f)) => format!("dirty wss=1 rate=1000 fill={f} report=100"),
        (rate, Some(f)) => format!("dirty wss={wss_mib} rate={rate} fill={f} report=100"),
        (rate, None) => format!("dirty wss={wss_mib} rate={rate} report=100"),
    }
}

/// The guests to run, in order: per size, per workload, per fill.
fn guests(a: &MigrateBenchArgs, mems: &[u64]) -> Result<Vec<Guest>> {
    for l in &a.loads {
        if l != "idle" && l != "marked" && l != "max" && l.parse::<u64>().map(|n| n == 0).unwrap_or(true) {
            bail!("invalid --loads entry {l:?}: use idle, marked, max or a positive page-store rate");
        }
    }
    for f in &a.fills {
        if f != "word" && f != "random" {
            bail!("invalid --fills entry {f:?}: use word or random");
        }
    }
    let mut v = Vec::new();
    for &mem in mems {
        for load in &a.loads {
            let fills: Vec<Option<&str>> =
                if load == "idle" { vec![None] } else { a.fills.iter().map(|f| Some(f.as_str())).collect() };
            for fill in fills {
                v.push(Guest {
                    mem_mib: mib(mem),
                    load: load.clone(),
                    fill: fill.map(str::to_string),
                    cmdline: cmdline(load, fill, a.wss_mib),
                });
            }
        }
    }
    Ok(v)
}

/// Progress on stderr with the seconds since the bench started, so a run's
/// log shows where its time went.
fn say(msg: impl std::fmt::Display) {
    static START: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    let t = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("bench: [{t:6.1} s] {msg}");
}

/// Runs `ferry bench migrate` and prints its tables or JSON.
pub(crate) fn migrate_bench(mut a: MigrateBenchArgs) -> Result<u8> {
    let started = Instant::now();
    say("ferry bench migrate");
    if a.quick {
        a.mems = vec![1 << 30];
        a.runs = 1;
    }
    if a.runs == 0 || a.mems.is_empty() || a.loads.is_empty() || a.fills.is_empty() || a.configs.is_empty() {
        bail!("--runs, --mems, --loads, --fills and --configs must not be empty");
    }
    let configs = a.configs.iter().map(|c| Config::parse(c)).collect::<Result<Vec<_>>>()?;
    // QEMU's default single stream, then each multifd channel count.
    let mut qemu_setups = vec![0u32];
    for &n in &a.qemu_multifd_channels {
        if n > 64 {
            bail!("--qemu-multifd-channels {n}: QEMU takes 1 to 255 channels, use at most 64 here");
        }
        if n > 0 && !qemu_setups.contains(&n) {
            qemu_setups.push(n);
        }
    }
    let guests = guests(&a, &a.mems)?;
    let timeout = Duration::from_secs(a.timeout_s.max(1));
    let parent = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new()
        .prefix("ferry-bench-migrate-")
        .tempdir_in(&parent)
        .with_context(|| format!("making a temporary directory in {}", parent.display()))?;
    let dir = tmp.path().to_path_buf();
    let n_mig: usize =
        guests.iter().map(|g| if a.compares(g) { configs.len() } else { 1 }).sum::<usize>() * a.runs as usize;
    say(format!(
        "working in {}; {} guests, {} ferry migrations{}{}",
        dir.display(),
        guests.len(),
        n_mig,
        if a.no_qemu {
            String::new()
        } else {
            format!(", {} QEMU migrations", guests.len() * a.runs as usize * qemu_setups.len())
        },
        if a.no_cloud_hypervisor {
            String::new()
        } else {
            format!(", {} Cloud Hypervisor migrations (if it is there)", guests.len() * a.runs as usize)
        }
    ));
    let pki = dir.join("pki");
    let pki_s = pki.to_str().context("temporary directory is not UTF-8")?.to_string();
    ferry_ok(&["certs", "init", "--dir", &pki_s])?;
    for n in ["src", "127.0.0.1"] {
        ferry_ok(&["certs", "issue", "--dir", &pki_s, "--name", n])?;
    }
    let mut b = MigrateBench {
        machine: machine(),
        runs: a.runs,
        wss_mib: a.wss_mib,
        downtime_ms: a.downtime_ms,
        link: vec![],
        rows: vec![],
        qemu_version: None,
        qemu_downtime_limit_ms: a.qemu_downtime_limit_ms,
        qemu: vec![],
        qemu_error: None,
        ch_version: None,
        ch_downtime_ms: a.cloud_hypervisor_downtime_ms,
        ch: vec![],
        ch_error: None,
        guest_verified_all: true,
        cpu_pressure_start: cpu_pressure_avg10(),
        cpu_pressure_end: None,
        elapsed_s: 0.0,
    };
    probe_links(&mut b, &dir, &pki, a.link_bytes)?;
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, ferry_guest::ELF)?;
    if !a.no_qemu {
        match qemu::version(&a.qemu) {
            Ok(v) => b.qemu_version = Some(v),
            Err(e) => {
                say(format!("QEMU comparison skipped: {e:#}"));
                b.qemu_error = Some(format!("{e:#}"));
            }
        }
    }
    let ch_bins = if a.no_cloud_hypervisor {
        b.ch_error = Some("not run (--no-cloud-hypervisor)".into());
        None
    } else {
        match find_ch(a.cloud_hypervisor.as_deref()).and_then(|bins| Ok((bins.version()?, bins))) {
            Ok((v, bins)) => {
                b.ch_version = Some(v);
                Some(bins)
            }
            Err(e) => {
                say(format!("Cloud Hypervisor comparison skipped: {e:#}"));
                b.ch_error = Some(format!("skipped: {e:#}"));
                None
            }
        }
    };
    // ferry and the peers guest by guest, so a change in the machine's load
    // between the start and the end of the run hits both alike.
    for g in &guests {
        let all = a.compares(g);
        let row = ferry_row(&a, &dir, &pki, g, if all { &configs } else { &configs[..1] }, timeout);
        b.guest_verified_all &= row.verified;
        b.rows.push(row);
        if b.qemu_version.is_some() {
            for &n in &qemu_setups {
                let row = qemu_row(&a, &dir, &elf, g, n, timeout);
                b.guest_verified_all &= row.verified;
                b.qemu.push(row);
            }
        }
        if let Some(bins) = &ch_bins {
            let row = ch_row(&a, bins, &dir, &elf, g, timeout);
            b.guest_verified_all &= row.verified;
            b.ch.push(row);
        }
    }
    probe_links(&mut b, &dir, &pki, a.link_bytes)?;
    // Total time against the time the link alone needs for the same bytes.
    let over_link = |total_ms: f64, bytes: f64, gb_s: f64| total_ms / (bytes / (gb_s * 1e9) * 1e3);
    let (links, tcp) = (b.link.clone(), b.link_gb_s(Link::Tcp));
    for s in b.rows.iter_mut().flat_map(|r| r.series.iter_mut()) {
        let best =
            max_of(&links.iter().filter(|l| l.link == s.config.transport).map(|l| l.gb_per_s).collect::<Vec<_>>());
        s.total_over_link_time = over_link(s.total_ms_median, s.bytes_median, best);
    }
    for q in &mut b.qemu {
        q.total_over_link_time = over_link(q.total_ms_median, q.transferred_median, tcp);
    }
    for c in &mut b.ch {
        c.total_over_link_time = over_link(c.total_ms_median, c.sent_bytes_median, tcp);
    }
    b.machine.loadavg_end = loadavg();
    b.cpu_pressure_end = cpu_pressure_avg10();
    b.elapsed_s = started.elapsed().as_secs_f64();
    crate::report::json::emit(&b, a.json, a.json_out.as_deref(), || crate::report::tables::print_migrate_bench(&b))?;
    drop(tmp);
    Ok(if b.rows.iter().all(|r| r.error.is_none()) { 0 } else { 1 })
}

fn probe_links(b: &mut MigrateBench, dir: &Path, pki: &Path, bytes: u64) -> Result<()> {
    for link in [Link::Unix, Link::Tcp, Link::Tls] {
        let s = bulk_copy(link, dir, pki, bytes)?;
        say(format!("link {}: {} MiB in {:.0} ms = {:.2} GB/s", link.name(), mib(s.bytes), s.ms, s.gb_per_s));
        b.link.push(s);
    }
    Ok(())
}

/// Boots one guest and migrates it `runs` times per configuration.
fn ferry_row(a: &MigrateBenchArgs, dir: &Path, pki: &Path, g: &Guest, configs: &[Config], timeout: Duration) -> MigRow {
    let mut row = MigRow {
        guest: g.clone(),
        series: configs.iter().map(|&config| MigSeries::empty(config)).collect(),
        boot_ms: f64::NAN,
        verified: false,
        error: None,
    };
    say(format!("ferry: booting {} ({:?})", g.label(), g.cmdline));
    let t = Instant::now();
    let vm = match FerryVm::boot_cmdline(
        &dir.join(format!("src-{}.sock", next_hop())),
        g.mem_mib << 20,
        &g.cmdline,
        timeout,
    ) {
        Ok(vm) => vm,
        Err(e) => {
            row.error = Some(format!("{e:#}"));
            return row;
        }
    };
    row.boot_ms = t.elapsed().as_secs_f64() * 1e3;
    say(format!("  booted in {:.1} s", row.boot_ms / 1e3));
    let mut holder = Some(vm);
    let mut seq = SeqCheck::default();
    'runs: for run in 0..a.runs {
        for (ci, c) in configs.iter().enumerate() {
            let Some(vm) = holder.take() else { break 'runs };
            match migrate_once(a, dir, pki, vm, *c, next_hop(), timeout) {
                Ok((next, r, seqs)) => {
                    seq.process_done(&mut row, seqs);
                    seq.pending.push((ci, row.series[ci].runs.len()));
                    say(format!(
                        "  {} {} {}/{}: downtime {:.2} ms, total {:.0} ms, {:.1} MiB, rounds {:?} ({}), dst switchover {}, throttle {}, dst cpu {:.0} ms, runq {:.0} ms",
                        g.label(),
                        c.label(),
                        run + 1,
                        a.runs,
                        r.downtime_ms,
                        r.total_ms,
                        r.bytes_sent as f64 / (1 << 20) as f64,
                        r.pages_per_round,
                        r.stop_reason,
                        r.dst_switchover_ms.map(|m| format!("{m:.2} ms")).unwrap_or_else(|| "?".into()),
                        match (r.throttle_max_percent, r.throttled_ms) {
                            (Some(p), Some(t)) if p > 0 => format!("up to {p}% ({t:.0} ms held)"),
                            (Some(_), _) => "none".into(),
                            _ => "n/a".into(),
                        },
                        r.dst_cpu_ms.unwrap_or(f64::NAN),
                        r.dst_runq_ms.unwrap_or(f64::NAN)
                    ));
                    row.series[ci].runs.push(r);
                    holder = Some(next);
                }
                Err(e) => {
                    // The processes of the failed hop are gone (killed and
                    // reaped when dropped); the rest of this guest is skipped.
                    say(format!("  {} {}: failed: {e:#}", g.label(), c.label()));
                    row.error = Some(format!("{} run {}: {e:#}", c.label(), run + 1));
                    break 'runs;
                }
            }
        }
    }
    for s in &mut row.series {
        s.summarise();
    }
    if let Some(vm) = holder {
        // The workload's own check of every page it wrote since boot, after all the hops.
        match shutdown_verified(vm, g.verifies(), timeout) {
            Ok((ok, first)) => {
                say(format!("  {}: shut down, guest verified its memory: {ok}", g.label()));
                row.verified = ok;
                seq.process_done(&mut row, SeqEnds { first, last: None });
            }
            Err(e) => row.error = Some(format!("shutdown: {e:#}")),
        }
    }
    row
}

impl MigSeries {
    fn empty(config: Config) -> MigSeries {
        MigSeries {
            config,
            runs: vec![],
            downtime_ms_median: f64::NAN,
            downtime_ms_min: f64::NAN,
            downtime_ms_max: f64::NAN,
            total_ms_median: f64::NAN,
            bytes_median: f64::NAN,
            rounds_median: f64::NAN,
            stop_reasons: vec![],
            throttle_max_percent: None,
            throttled_ms_median: f64::NAN,
            dst_cpu_ms_median: f64::NAN,
            dst_runq_ms_median: f64::NAN,
            wire_gb_per_s_median: f64::NAN,
            data_gb_per_s_median: f64::NAN,
            total_over_link_time: f64::NAN,
        }
    }

    fn summarise(&mut self) {
        let f = |g: &dyn Fn(&MigRun) -> f64| self.runs.iter().map(g).collect::<Vec<f64>>();
        let down = f(&|r| r.downtime_ms);
        self.downtime_ms_median = median(&down);
        self.downtime_ms_min = down.iter().cloned().fold(f64::NAN, f64::min);
        self.downtime_ms_max = max_of(&down);
        self.total_ms_median = median(&f(&|r| r.total_ms));
        self.bytes_median = median(&f(&|r| r.bytes_sent as f64));
        self.rounds_median = median(&f(&|r| r.rounds as f64));
        self.wire_gb_per_s_median = median(&f(&|r| r.wire_gb_per_s));
        self.data_gb_per_s_median = median(&f(&|r| r.data_gb_per_s));
        self.stop_reasons = self.runs.iter().map(|r| r.stop_reason.clone()).collect();
        self.throttle_max_percent = self.runs.iter().filter_map(|r| r.throttle_max_percent).max();
        self.throttled_ms_median = median(&f(&|r| r.throttled_ms.unwrap_or(f64::NAN)));
        self.dst_cpu_ms_median = median(&f(&|r| r.dst_cpu_ms.unwrap_or(f64::NAN)));
        self.dst_runq_ms_median = median(&f(&|r| r.dst_runq_ms.unwrap_or(f64::NAN)));
    }
}

/// Receives `vm` in a fresh `ferry receive` over `c` and returns the
/// destination, now running the guest, with the figures.
fn migrate_once(
    a: &MigrateBenchArgs,
    dir: &Path,
    pki: &Path,
    mut src: FerryVm,
    c: Config,
    hop: usize,
    timeout: Duration,
) -> Result<(FerryVm, MigRun, SeqEnds)> {
    let dsock = dir.join(format!("dst-{hop}.sock"));
    let _ = std::fs::remove_file(&dsock);
    let tls = |name: &str| -> Vec<String> {
        vec![
            "--tls-cert".into(),
            pki.join(format!("{name}.pem")).display().to_string(),
            "--tls-key".into(),
            pki.join(format!("{name}.key")).display().to_string(),
            "--tls-ca".into(),
            pki.join("ca.pem").display().to_string(),
        ]
    };
    let (listen, dst_args, src_args): (String, Vec<String>, Vec<String>) = match c.transport {
        Link::Unix => (format!("unix://{}", dir.join(format!("mig-{hop}.sock")).display()), vec![], vec![]),
        Link::Tcp => ("tcp://127.0.0.1:0".into(), vec!["--insecure".into()], vec!["--insecure".into()]),
        Link::Tls => {
            let mut d = tls("127.0.0.1");
            d.extend(["--allow-peer".into(), "src".into()]);
            ("tcp://127.0.0.1:0".into(), d, tls("src"))
        }
    };
    let mut dst = Kid::spawn(
        &format!("ferry receive ({})", c.label()),
        Command::new(ferry_exe()?)
            .args(["receive", "--listen", &listen, "--serial", "stdio", "--accept-timeout-ms", "120000"])
            .arg("--api-sock")
            .arg(&dsock)
            .args(&dst_args),
    )?;
    let (_, _, line) = dst.wait_line("its listening address", true, 0, Duration::from_secs(30), |l| {
        l.contains("waiting for a migration on ")
    })?;
    let addr = line.rsplit(' ').next().unwrap_or_default().to_string();
    let deadline = Instant::now() + Duration::from_secs(30);
    while !dsock.exists() {
        if Instant::now() >= deadline {
            bail!("{}: API socket {} not there after 30 s{}", dst.name, dsock.display(), dst.tail());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    let mut m = vec!["migrate".to_string(), "--json".into(), "--api-sock".into(), src.sock.display().to_string()];
    m.extend(["--to".into(), addr.clone(), "--compress".into(), c.compress.name().into()]);
    m.extend(["--mode".into(), c.mode.into(), "--streams".into(), c.streams.to_string()]);
    if let Some(d) = a.downtime_ms {
        m.extend(["--downtime-ms".into(), d.to_string()]);
    }
    m.extend(src_args);
    let dst0 = vmm_threads_ns(dst.child.id(), "vcpu");
    let t0 = Instant::now();
    let mut k = Kid::spawn(&format!("ferry migrate ({})", c.label()), Command::new(ferry_exe()?).args(&m))?;
    let st = k.finish(timeout)?;
    let client_ms = t0.elapsed().as_secs_f64() * 1e3;
    let (dst_cpu_ms, dst_runq_ms) = match (dst0, vmm_threads_ns(dst.child.id(), "vcpu")) {
        (Some(a), Some(b)) => (Some(b.0.saturating_sub(a.0) as f64 / 1e6), Some(b.1.saturating_sub(a.1) as f64 / 1e6)),
        _ => (None, None),
    };
    if !st.success() {
        bail!("{} failed ({st}){}", k.name, k.tail());
    }
    let v: serde_json::Value = serde_json::from_str(&Kid::text(&k.out))
        .with_context(|| format!("parsing the output of {}: {}", k.name, Kid::text(&k.out)))?;
    if v["state"] != "completed" {
        bail!("{} ended {}: {v}", k.name, v["state"]);
    }
    // The source gives the guest up and exits 0.
    let sst = src.kid.finish(Duration::from_secs(30))?;
    if sst.code() != Some(0) {
        bail!("the source {} exited {sst} after the migration{}", src.kid.name, src.kid.tail());
    }
    // Only now: the guest ran (and printed) at the source until its final
    // pause. The source's first line closes the previous hop's check.
    let (first_src_seq, last_src_seq) = (seq_at(&src.kid, false), seq_at(&src.kid, true));
    // The destination runs the guest once its API says so (its PROGRESS
    // lines are checked when it is the next source, or at shutdown).
    wait_running(&dst, &dsock)?;
    let dst_switchover_ms = dst
        .find_err(|l| l.contains("after its state arrived"))
        .and_then(|l| l.split("running ").nth(1)?.split_whitespace().next()?.parse().ok());
    let f = |k: &str| v[k].as_f64().with_context(|| format!("ferry migrate --json has no number {k:?}: {v}"));
    let u = |k: &str| v[k].as_u64().with_context(|| format!("ferry migrate --json has no integer {k:?}: {v}"));
    let rounds_of = |k: &str| -> Vec<serde_json::Value> {
        v["rounds"].as_array().map(|r| r.iter().map(|x| x[k].clone()).collect()).unwrap_or_default()
    };
    let rounds: Vec<u64> = rounds_of("pages").iter().map(|x| x.as_u64().unwrap_or(0)).collect();
    let round_ms: Vec<f64> = rounds_of("ms").iter().map(|x| x.as_f64().unwrap_or(f64::NAN)).collect();
    let (total_ms, bytes_sent) = (f("total_ms")?, u("bytes_sent")?);
    let run = MigRun {
        downtime_ms: f("downtime_ms")?,
        total_ms,
        setup_ms: f("setup_ms")?,
        bytes_sent,
        rounds: rounds.len() as u64,
        pages_per_round: rounds,
        round_ms,
        stop_reason: v["stop_reason"].as_str().unwrap_or("").to_string(),
        pages_normal: u("pages_normal")?,
        pages_skipped_unpopulated: u("pages_skipped_unpopulated")?,
        throughput_mb_per_s: f("throughput_mb_per_s")?,
        throttle_max_percent: v["throttle"]["steps"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x["percent"].as_u64()).max().unwrap_or(0)),
        throttled_ms: v["throttle"]["throttled_ms"].as_f64(),
        wire_gb_per_s: gbps(bytes_sent as f64, total_ms),
        data_gb_per_s: gbps((u("pages_normal")? * crate::util::PAGE) as f64, total_ms),
        client_ms,
        dst_switchover_ms,
        dst_cpu_ms,
        dst_runq_ms,
        seq_continued: false,
        seq_before: None,
        seq_after: None,
        postcopy_faults: v["postcopy"]["destination"]["faults"].as_u64(),
        postcopy_blocked_ms_median: v["postcopy"]["destination"]["blocked_ms_median"].as_f64(),
        postcopy_blocked_ms_p99: v["postcopy"]["destination"]["blocked_ms_p99"].as_f64(),
        postcopy_deferred_pages: v["postcopy"]["deferred_pages"].as_u64(),
    };
    Ok((
        FerryVm { kid: dst, sock: dsock, tsc_khz: src.tsc_khz },
        run,
        SeqEnds { first: first_src_seq, last: last_src_seq },
    ))
}

/// A number for the next process's socket and serial files, unique in this
/// run, so no process ever finds a file a previous one left behind.
fn next_hop() -> usize {
    static HOP: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    HOP.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
}

/// The `seq` of the first (or `last`) PROGRESS line a process printed.
fn seq_at(kid: &Kid, last: bool) -> Option<u64> {
    let lines = kid.out.lock().unwrap();
    let mut it = lines.iter().filter(|(_, l)| l.starts_with("PROGRESS"));
    let hit = if last { it.next_back() } else { it.next() };
    hit.and_then(|(_, l)| kv(l, "seq"))
}

/// The guest's sequence numbers at one ferry process: its first and last PROGRESS line.
struct SeqEnds {
    first: Option<u64>,
    last: Option<u64>,
}

/// Checks the guest's PROGRESS sequence across a chain of ferry processes:
/// at every hop the first line printed after the switch must follow the
/// last one printed before it (+1, or one more per line that may have been
/// lost in a switch: a hop that printed nothing, e.g. an idle guest between
/// two quick migrations, is checked together with the next).
#[derive(Default)]
struct SeqCheck {
    /// The last seq printed so far in the chain.
    last: Option<u64>,
    /// Runs (series, index) whose switch has no line after it yet.
    pending: Vec<(usize, usize)>,
}

impl SeqCheck {
    /// A process of the chain has ended (or, the last one, printed a
    /// line): its first and last seq.
    fn process_done(&mut self, row: &mut MigRow, seqs: SeqEnds) {
        let Some(first) = seqs.first else { return };
        let hops = self.pending.len() as u64;
        let ok = matches!(self.last, Some(l) if first > l && first <= l + 1 + hops);
        for (ci, i) in self.pending.drain(..) {
            if let Some(r) = row.series[ci].runs.get_mut(i) {
                r.seq_continued = ok;
                r.seq_before = self.last;
                r.seq_after = Some(first);
            }
        }
        self.last = seqs.last.or(Some(first));
    }
}

/// Polls `ferry status` until the destination reports `running`.
fn wait_running(dst: &Kid, sock: &Path) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(v) = ferry_json(&["status", "--api-sock", &sock.to_string_lossy()]) {
            if v["state"] == "running" {
                return Ok(());
            }
        }
        if Instant::now() >= deadline {
            bail!("{}: not running 30 s after the migration{}", dst.name, dst.tail());
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Ctrl-Alt-Del through the API; true when the guest exited 0 and (dirty
/// mode) printed VERIFY OK, i.e. every page it wrote was intact. Also
/// returns the first PROGRESS seq this process printed.
fn shutdown_verified(mut vm: FerryVm, verifies: bool, timeout: Duration) -> Result<(bool, Option<u64>)> {
    // A line at the destination, so the last hop's sequence can be checked.
    let n = vm.kid.out_len();
    vm.kid.wait_line("PROGRESS", false, n, Duration::from_secs(30), |l| l.starts_with("PROGRESS"))?;
    if !verifies {
        let _ = ferry_json(&["shutdown", "--api-sock", &vm.sock.to_string_lossy(), "--timeout-ms", "20000"]);
        let st = vm.kid.finish(timeout)?;
        return Ok((st.code() == Some(0), seq_at(&vm.kid, false)));
    }
    let first = seq_at(&vm.kid, false);
    Ok((vm.shutdown(timeout)?, first))
}

/// QEMU on one guest: boot, then `runs` migrations, each to a fresh
/// `-incoming defer` QEMU over loopback TCP, with `multifd` channels (0: off).
fn qemu_row(a: &MigrateBenchArgs, dir: &Path, elf: &Path, g: &Guest, multifd: u32, timeout: Duration) -> QemuRow {
    let mut row = QemuRow {
        guest: g.clone(),
        multifd_channels: multifd,
        runs: vec![],
        dst_cpu_ms: vec![],
        dst_runq_ms: vec![],
        downtime_ms_median: f64::NAN,
        total_ms_median: f64::NAN,
        transferred_median: f64::NAN,
        dirty_syncs_median: f64::NAN,
        total_over_link_time: f64::NAN,
        seq_continued: vec![],
        verified: false,
        error: None,
    };
    let name = row.label();
    let res = (|| -> Result<bool> {
        say(format!("{name}: booting {} ({:?})", g.label(), g.cmdline));
        let mut vm = qemu::QemuVm::boot(&a.qemu, elf, dir, next_hop(), g.mem_mib << 20, &g.cmdline, timeout)?;
        for run in 0..a.runs {
            let qemu::Migrated { vm: next, figures: m, dst_sched: sched, seq_before, seq_after } =
                vm.migrate_live(&a.qemu, elf, dir, next_hop(), a.qemu_downtime_limit_ms, multifd, timeout)?;
            let (cpu, rq) = sched.map(|(c, r)| (c as f64 / 1e6, r as f64 / 1e6)).unwrap_or((f64::NAN, f64::NAN));
            let cont = qemu::seq_continues(seq_before, seq_after);
            say(format!(
                "  {name} {} {}/{}: downtime {:.0} ms, total {:.0} ms, {:.1} MiB, {} dirty syncs ({}), dst cpu {cpu:.0} ms, runq {rq:.0} ms, seq {seq_before:?} -> {seq_after:?}",
                g.label(),
                run + 1,
                a.runs,
                m.downtime_ms,
                m.total_ms,
                m.transferred as f64 / (1 << 20) as f64,
                m.dirty_sync_count,
                m.status
            ));
            row.runs.push(m);
            row.seq_continued.push(cont);
            row.dst_cpu_ms.push(cpu);
            row.dst_runq_ms.push(rq);
            vm = next;
        }
        let ok = vm.shutdown(g.verifies(), timeout)?;
        say(format!("  {name} {}: shut down, guest verified its memory: {ok}", g.label()));
        Ok(ok)
    })();
    match res {
        Ok(v) => row.verified = v,
        Err(e) => {
            say(format!("  {name} {}: failed: {e:#}", g.label()));
            row.error = Some(format!("{e:#}"));
        }
    }
    let f = |g: &dyn Fn(&QemuMig) -> f64| median(&row.runs.iter().map(g).collect::<Vec<f64>>());
    row.downtime_ms_median = f(&|m| m.downtime_ms);
    row.total_ms_median = f(&|m| m.total_ms);
    row.transferred_median = f(&|m| m.transferred as f64);
    row.dirty_syncs_median = f(&|m| m.dirty_sync_count as f64);
    row
}

/// The Cloud Hypervisor binaries: `path`, or `cloud-hypervisor` on PATH.
fn find_ch(path: Option<&Path>) -> Result<ChBins> {
    if let Some(p) = path {
        return ChBins::find(p);
    }
    let on_path = std::env::var_os("PATH")
        .iter()
        .flat_map(std::env::split_paths)
        .map(|d| d.join("cloud-hypervisor"))
        .find(|p| p.is_file());
    match on_path {
        Some(p) => ChBins::find(&p),
        None => {
            bail!("no cloud-hypervisor on PATH (it is built outside this repository; pass --cloud-hypervisor PATH)")
        }
    }
}

/// Cloud Hypervisor on one guest: boot, then `runs` migrations, each to a
/// fresh `cloud-hypervisor` over loopback TCP, then the guest's own check.
fn ch_row(a: &MigrateBenchArgs, bins: &ChBins, dir: &Path, elf: &Path, g: &Guest, timeout: Duration) -> ChRow {
    let mut row = ChRow {
        guest: g.clone(),
        runs: vec![],
        dst_cpu_ms: vec![],
        dst_runq_ms: vec![],
        downtime_ms_median: f64::NAN,
        total_ms_median: f64::NAN,
        sent_bytes_median: f64::NAN,
        iterations_median: f64::NAN,
        total_over_link_time: f64::NAN,
        seq_continued: vec![],
        verified: false,
        error: None,
    };
    let res = (|| -> Result<bool> {
        say(format!("Cloud Hypervisor: booting {} ({:?})", g.label(), g.cmdline));
        let mut vm = ChVm::boot(bins, elf, dir, next_hop(), g.mem_mib << 20, &g.cmdline, timeout)?;
        for run in 0..a.runs {
            let m = vm.migrate_live(bins, dir, next_hop(), a.cloud_hypervisor_downtime_ms, timeout)?;
            let (cpu, rq) = m.dst_sched.map(|(c, r)| (c as f64 / 1e6, r as f64 / 1e6)).unwrap_or((f64::NAN, f64::NAN));
            let f = &m.figures;
            let cont = qemu::seq_continues(m.seq_before, m.seq_after);
            say(format!(
                "  Cloud Hypervisor {} {}/{}: downtime {:.0} ms, total {:.0} ms (logged {:.1} s), {:.0} MiB, {} iterations, dst cpu {cpu:.0} ms, runq {rq:.0} ms, seq {:?} -> {:?}",
                g.label(),
                run + 1,
                a.runs,
                f.downtime_ms,
                f.total_ms,
                f.logged_total_s,
                f.sent_mib,
                f.iterations,
                m.seq_before,
                m.seq_after
            ));
            row.runs.push(m.figures);
            row.seq_continued.push(cont);
            row.dst_cpu_ms.push(cpu);
            row.dst_runq_ms.push(rq);
            vm = m.vm;
        }
        let ok = vm.shutdown(bins, g.verifies(), timeout)?;
        say(format!("  Cloud Hypervisor {}: guest verified its memory: {ok}", g.label()));
        Ok(ok)
    })();
    match res {
        Ok(v) => row.verified = v,
        Err(e) => {
            say(format!("  Cloud Hypervisor {}: failed: {e:#}", g.label()));
            row.error = Some(format!("{e:#}"));
        }
    }
    let f = |g: &dyn Fn(&ChMig) -> f64| median(&row.runs.iter().map(g).collect::<Vec<f64>>());
    row.downtime_ms_median = f(&|m| m.downtime_ms);
    row.total_ms_median = f(&|m| m.total_ms);
    row.sent_bytes_median = f(&|m| m.sent_mib * (1u64 << 20) as f64);
    row.iterations_median = f(&|m| m.iterations as f64);
    row
}
