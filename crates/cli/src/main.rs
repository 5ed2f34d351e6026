//! `ferry`: a thin command line over the ferry library crates.

mod api;
mod certs;
mod http;
mod imagecmd;
mod inspectcmd;
mod liveapi;
mod livecmd;
mod mountcmd;
mod signals;
mod wsscmd;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_migrate::snapshot::{CodecChoice, FinalPhase, SnapshotMode, SnapshotRequest};
use ferry_migrate::VmController;
use ferry_vmm::{CpuTemplate, KernelSource, Vm, VmConfig};

/// The name `--kernel` accepts for the embedded test guest.
pub const BUILTIN_TEST_GUEST: &str = "builtin:test";

#[derive(Parser)]
#[command(name = "ferry", version, about = "A KVM virtual machine monitor built around the memory state of a VM")]
struct Cli {
    #[command(subcommand)]
    cmd: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Boot a VM and run it until the guest stops.
    Run(RunArgs),
    /// Pause a running VM.
    Pause(SockArgs),
    /// Resume a paused VM.
    Resume(SockArgs),
    /// Print a VM's state and configuration as JSON.
    Status(SockArgs),
    /// Ask the guest to shut down (Ctrl-Alt-Del), stopping it after a timeout.
    Shutdown(ShutdownArgs),
    /// Print the BLAKE3 digest of a VM's memory (taken while paused).
    Digest(SockArgs),
    /// Send text to the guest's serial console.
    Console(ConsoleArgs),
    /// Take a snapshot of a running VM into an image file (live by default).
    Snapshot(SnapshotArgs),
    /// Recreate a VM from an image and run it.
    Restore(RestoreArgs),
    /// Move a running VM to another host's `ferry receive`, live.
    Migrate(MigrateArgs),
    /// Wait for one incoming migration, then run the VM that arrives.
    Receive(ReceiveArgs),
    /// Cancel a running migration (the guest keeps running here).
    MigrateCancel(SockArgs),
    /// Sample a running guest's working set; forecast a migration of it.
    Wss(wsscmd::WssArgs),
    /// Make a CA and certificates for migration over mutual TLS.
    Certs {
        #[command(subcommand)]
        cmd: certs::CertsCmd,
    },
    /// Check, describe and export images.
    Image {
        #[command(subcommand)]
        cmd: imagecmd::ImageCmd,
    },
    /// Read a running VM's memory by physical or virtual address (through its API).
    Read(livecmd::LiveReadArgs),
    /// List the virtual ranges a running VM's page tables map.
    Maps(livecmd::LiveMapsArgs),
    /// Search a running VM's memory; `--watch` rescans only what the guest wrote.
    Scan(livecmd::LiveScanArgs),
    /// The embedded test guest.
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        cmd: ferry_bench::BenchCmd,
    },
}

#[derive(Subcommand)]
enum GuestCmd {
    /// Write the test guest's PVH ELF, for other VMMs to boot.
    Export {
        /// Output file.
        #[arg(long)]
        out: PathBuf,
    },
}

/// Options of `ferry run`.
#[derive(Args, Clone)]
pub struct RunArgs {
    /// Kernel: a PVH ELF, a Linux bzImage, or `builtin:test`.
    #[arg(long)]
    pub kernel: String,
    /// Initial ramdisk.
    #[arg(long)]
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, default_value = "")]
    pub cmdline: String,
    /// Guest memory: a number of MiB, or with a unit (512M, 1G, 2GiB).
    #[arg(long, default_value = "256M", value_parser = ferry_vmm::size::parse_mem)]
    pub mem: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// CPU template: host (all KVM supports) or minimal (hides CX16, XSAVE, AVX, PCID).
    #[arg(long, default_value = "host")]
    pub cpu_template: CpuTemplate,
    /// Back guest RAM with memfds (shared memory), so that `ferry migrate
    /// --local` can hand it to a new ferry process instead of copying it.
    #[arg(long)]
    pub memfd: bool,
    /// Serial port: stdio, file:PATH, unix:PATH (connect to a listening socket) or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Control API socket (HTTP/JSON).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Write boot timings and memory figures as JSON here when the VM stops.
    #[arg(long)]
    pub report: Option<PathBuf>,
    /// On SIGTERM, SIGINT or SIGHUP the guest gets Ctrl-Alt-Del and this
    /// many milliseconds to stop before ferry stops it.
    #[arg(long, default_value_t = 10_000)]
    pub shutdown_timeout_ms: u64,
}

#[derive(Args)]
struct SnapshotArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// Image file to write.
    #[arg(long)]
    out: PathBuf,
    /// Stop the world: pause first, copy everything, resume (for comparison).
    #[arg(long)]
    pause: bool,
    /// Chunk codec: lz4, zstd or none.
    #[arg(long, default_value = "lz4")]
    codec: CodecChoice,
    /// zstd level.
    #[arg(long)]
    zstd_level: Option<i32>,
    /// Encrypt the image (needs --key-file).
    #[arg(long, requires = "key_file")]
    encrypt: bool,
    /// Key file (any bytes; the key is derived from its contents).
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Incremental: store only pages dirtied since this parent (the VM's last snapshot).
    #[arg(long)]
    parent: Option<PathBuf>,
    /// Hash guest memory at the final pause (adds to the pause) and report the digest.
    #[arg(long)]
    digest: bool,
    /// Pause budget in milliseconds for the final round.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Most live copy rounds.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Final phase: cow (write-protect the last dirty pages with userfaultfd,
    /// resume, copy in the background) or copy (copy them while paused).
    #[arg(long, default_value = "cow")]
    final_phase: FinalPhase,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
}

/// TLS files of one migration endpoint.
#[derive(Args, Clone)]
struct TlsArgs {
    /// This host's certificate (PEM; `ferry certs issue` writes DIR/NAME.pem).
    #[arg(long, requires_all = ["tls_key", "tls_ca"])]
    tls_cert: Option<PathBuf>,
    /// This host's private key (PEM).
    #[arg(long, requires_all = ["tls_cert", "tls_ca"])]
    tls_key: Option<PathBuf>,
    /// The CA that signs the peer's certificate (PEM; DIR/ca.pem).
    #[arg(long, requires_all = ["tls_cert", "tls_key"])]
    tls_ca: Option<PathBuf>,
    /// Plain TCP without TLS: guest memory crosses the network in the clear.
    #[arg(long, conflicts_with_all = ["tls_cert", "tls_key", "tls_ca"])]
    insecure: bool,
}

#[derive(Args)]
struct MigrateArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// Destination: tcp://HOST:PORT or unix://PATH.
    #[arg(long, required_unless_present_any = ["resume", "take_back"])]
    to: Option<String>,
    /// Finish a post-copy migration whose link was lost (state
    /// postcopy-paused), or settle a commit in doubt (state
    /// commit-unconfirmed: the destination is asked whether it runs the
    /// guest and made to run it if not; in post-copy and hybrid the pages it
    /// lacks are then pushed as for postcopy-paused), over a new connection
    /// to the same destination.
    #[arg(long, conflicts_with_all = ["to", "take_back"])]
    resume: bool,
    /// Settle a commit in doubt (commit-unconfirmed) the other way: the
    /// destination drops its copy if it never got Go, and the guest runs
    /// here again (if the destination runs it, the migration completes; in
    /// post-copy and hybrid after the pages it lacks are pushed).
    #[arg(long, conflicts_with = "to")]
    take_back: bool,
    /// With --take-back: do not ask the destination, resume the guest here.
    /// Only for a destination known to be gone without having run the
    /// guest (it exited saying so); otherwise the guest may run twice.
    #[arg(long, requires = "take_back")]
    force: bool,
    /// Local migration (to a `ferry receive` on a unix socket of this host):
    /// hand guest RAM over as memfds instead of copying it, so the guest's
    /// stop does not grow with its memory (the VM must run with --memfd).
    #[arg(long)]
    local: bool,
    /// precopy (rounds while the guest runs, then stop-and-copy), postcopy
    /// (the guest moves at once; pages follow on first touch and in the
    /// background) or hybrid (pre-copy rounds, then post-copy). Post-copy
    /// and hybrid cannot fall back once the guest has moved: if the
    /// destination host dies before every page arrived, the guest is lost.
    #[arg(long, default_value = "precopy")]
    mode: ferry_migrate::migration::MigrationMode,
    /// Pause budget for the stop-and-copy, ms.
    #[arg(long)]
    downtime_ms: Option<u64>,
    /// Most pre-copy rounds.
    #[arg(long)]
    max_rounds: Option<u32>,
    /// Page compression on the wire: lz4, zstd (fewer bytes, more CPU; the
    /// destination must know it) or none.
    #[arg(long, default_value = "lz4")]
    compress: ferry_migrate::wire::WireCodec,
    /// Cap on the sending rate, frames included: bytes/s with K, M, G
    /// (1024-based: 100M = 100 MiB/s) or bits/s with kbit, mbit, gbit
    /// (1000-based: 1gbit = 125,000,000 bytes/s). Default: no cap.
    #[arg(long, value_name = "RATE")]
    max_bandwidth: Option<ferry_migrate::ratelimit::Bandwidth>,
    /// Connections the pages are spread over, each authenticated (1..=16).
    #[arg(long)]
    streams: Option<u32>,
    /// Keep a paused copy here after the commit instead of ending.
    #[arg(long)]
    keep_paused: bool,
    #[command(flatten)]
    tls: TlsArgs,
    /// Name the destination's certificate must carry (default: the host in --to).
    #[arg(long)]
    peer_name: Option<String>,
    /// Compare memory digests at both ends before committing (adds to the downtime).
    #[arg(long)]
    verify_digest: bool,
    /// How long the destination may stall, ms.
    #[arg(long)]
    peer_timeout_ms: Option<u64>,
    /// No auto-converge: a guest dirtying memory faster than the link makes
    /// the migration give up (the guest keeps running here) instead of
    /// being slowed down.
    #[arg(long)]
    no_throttle: bool,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
    /// Draw pages per round and the dirty rate against time into this SVG.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
struct ReceiveArgs {
    /// Where to listen: tcp://ADDR:PORT or unix://PATH.
    #[arg(long)]
    listen: String,
    #[command(flatten)]
    tls: TlsArgs,
    /// Certificate name of a source allowed to send a VM (repeat for several).
    #[arg(long)]
    allow_peer: Vec<String>,
    /// Serial port: stdio, file:PATH, unix:PATH or none.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Control API socket (answers `incoming` until the VM arrives).
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Leave the VM paused after it arrives.
    #[arg(long)]
    paused: bool,
    /// Give up if no source connects within this many ms (default: wait a day).
    #[arg(long, default_value_t = 86_400_000)]
    accept_timeout_ms: u64,
    /// How long the source may stall, ms.
    #[arg(long, default_value_t = 30_000)]
    peer_timeout_ms: u64,
    /// If the link is lost after this side said Ready and before Go came,
    /// hold the loaded VM (paused, never run) this many ms for the source
    /// to settle the commit (`ferry migrate --resume` or `--take-back`);
    /// then exit 1 without having run the guest.
    #[arg(long, default_value_t = 60_000)]
    commit_wait_ms: u64,
    /// Write the incoming figures and the run report as JSON here when the VM stops.
    #[arg(long)]
    report: Option<PathBuf>,
    /// On SIGTERM, SIGINT or SIGHUP the guest gets Ctrl-Alt-Del and this many ms.
    #[arg(long, default_value_t = 10_000)]
    shutdown_timeout_ms: u64,
}

#[derive(Args)]
struct RestoreArgs {
    /// Image to restore (its parents are found through the chain).
    image: PathBuf,
    /// Key file for encrypted images.
    #[arg(long)]
    key_file: Option<PathBuf>,
    /// Leave the restored VM paused.
    #[arg(long)]
    paused: bool,
    /// Serial port: stdio, file:PATH, unix:PATH or none.
    #[arg(long, default_value = "stdio")]
    serial: String,
    /// Control API socket.
    #[arg(long)]
    api_sock: Option<PathBuf>,
    /// Write restore figures and the run report as JSON here when the VM stops.
    #[arg(long)]
    report: Option<PathBuf>,
    /// On SIGTERM, SIGINT or SIGHUP the guest gets Ctrl-Alt-Del and this
    /// many milliseconds to stop before ferry stops it.
    #[arg(long, default_value_t = 10_000)]
    shutdown_timeout_ms: u64,
    /// Guest memory: `eager` reads it all before the first guest instruction;
    /// `lazy` starts the guest at once and brings pages in on first touch
    /// (userfaultfd) while a background thread prefetches the rest.
    #[arg(long, value_enum, default_value_t = MemoryArg::Eager)]
    memory: MemoryArg,
}

/// `--memory` of `ferry restore`.
#[derive(Clone, Copy, clap::ValueEnum)]
enum MemoryArg {
    /// Read everything, then run.
    Eager,
    /// Run at once; pages arrive on first touch, with a background prefetch.
    Lazy,
}

#[derive(Args)]
struct SockArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
}

#[derive(Args)]
struct ShutdownArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// Milliseconds the guest gets before it is stopped.
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
}

#[derive(Args)]
struct ConsoleArgs {
    /// The VM's API socket.
    #[arg(long)]
    api_sock: PathBuf,
    /// Text to send; a newline is appended.
    text: String,
}

fn main() -> ExitCode {
    let start = Instant::now();
    let cli = Cli::parse();
    match dispatch(cli, start) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("ferry: error: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn dispatch(cli: Cli, start: Instant) -> Result<u8> {
    let api = |sock: &Path, method: &str, path: &str, body: Option<serde_json::Value>| -> Result<serde_json::Value> {
        Ok(http::request(sock, method, path, body.as_ref(), Duration::from_secs(120))?)
    };
    match cli.cmd {
        Command::Run(args) => run(args, start),
        Command::Pause(a) => print_json(api(&a.api_sock, "PUT", "/vm/pause", None)?),
        Command::Resume(a) => print_json(api(&a.api_sock, "PUT", "/vm/resume", None)?),
        Command::Status(a) => print_json(api(&a.api_sock, "GET", "/vm", None)?),
        Command::Digest(a) => print_json(api(&a.api_sock, "GET", "/vm/memory-digest", None)?),
        Command::Shutdown(a) => print_json(api(
            &a.api_sock,
            "PUT",
            "/vm/shutdown",
            Some(serde_json::json!({ "timeout_ms": a.timeout_ms })),
        )?),
        Command::Console(a) => print_json(api(
            &a.api_sock,
            "PUT",
            "/vm/console",
            Some(serde_json::json!({ "input": format!("{}\n", a.text) })),
        )?),
        Command::Guest { cmd: GuestCmd::Export { out } } => {
            std::fs::write(&out, ferry_guest::ELF).with_context(|| format!("writing {}", out.display()))?;
            eprintln!("ferry: wrote the test guest ({} bytes, PVH ELF) to {}", ferry_guest::ELF.len(), out.display());
            Ok(0)
        }
        Command::Bench { cmd } => ferry_bench::run(cmd),
        Command::Snapshot(a) => {
            if a.key_file.is_some() && !a.encrypt {
                bail!("--key-file given without --encrypt; add --encrypt to encrypt the image");
            }
            let abs = |p: &Path| -> Result<PathBuf> {
                Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
            };
            let req = SnapshotRequest {
                path: abs(&a.out)?,
                mode: if a.pause { SnapshotMode::Pause } else { SnapshotMode::Live },
                codec: a.codec,
                zstd_level: a.zstd_level,
                key_file: a.key_file.as_deref().map(abs).transpose()?,
                parent: a.parent.as_deref().map(abs).transpose()?,
                digest: a.digest,
                downtime_ms: a.downtime_ms,
                max_rounds: a.max_rounds,
                final_phase: a.final_phase,
            };
            let body = serde_json::to_value(&req)?;
            let v = api(&a.api_sock, "PUT", "/vm/snapshot", Some(body))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_snapshot(&v);
            }
            Ok(0)
        }
        Command::Restore(a) => restore(a, start),
        Command::Receive(a) => receive(a, start),
        Command::Certs { cmd } => certs::run(cmd),
        Command::Read(a) => livecmd::read(a),
        Command::Maps(a) => livecmd::maps(a),
        Command::Scan(a) => livecmd::scan(a),
        Command::MigrateCancel(a) => print_json(api(&a.api_sock, "PUT", "/vm/migration/cancel", None)?),
        Command::Migrate(a) => {
            // `--resume` finishes a paused post-copy or settles a commit in
            // doubt, `--take-back` settles it the other way; otherwise a new migration.
            let body = if a.take_back {
                Some(serde_json::json!({ "force": a.force }))
            } else if a.resume {
                None
            } else {
                Some(serde_json::to_value(ferry_migrate::migration::MigrateRequest {
                    to: a.to.clone().unwrap_or_default(),
                    mode: a.mode,
                    downtime_ms: a.downtime_ms,
                    max_rounds: a.max_rounds,
                    compress: a.compress,
                    max_bandwidth: a.max_bandwidth,
                    streams: a.streams,
                    keep_paused: a.keep_paused,
                    insecure: a.tls.insecure,
                    tls_cert: a.tls.tls_cert.as_deref().map(abs_path).transpose()?,
                    tls_key: a.tls.tls_key.as_deref().map(abs_path).transpose()?,
                    tls_ca: a.tls.tls_ca.as_deref().map(abs_path).transpose()?,
                    peer_name: a.peer_name.clone(),
                    verify_digest: a.verify_digest,
                    peer_timeout_ms: a.peer_timeout_ms,
                    no_throttle: a.no_throttle,
                    local: a.local,
                })?)
            };
            let path = match (a.resume, a.take_back) {
                (_, true) => "/vm/migration/take-back",
                (true, _) => "/vm/migration/resume",
                _ => "/vm/migrate",
            };
            let progress = progress_printer(a.api_sock.clone(), a.json);
            let v = api(&a.api_sock, "PUT", path, body);
            progress.store(true, std::sync::atomic::Ordering::SeqCst);
            let v = v?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_migration(&v);
            }
            if let Some(path) = &a.plot {
                let stats: ferry_migrate::migration::MigrationStats =
                    serde_json::from_value(v.clone()).context("reading the migration statistics for --plot")?;
                ferry_migrate::plot::plot_migration(&stats, path)?;
                if !a.json {
                    println!("  plot             {}", path.display());
                }
            }
            Ok(0)
        }
        Command::Wss(a) => wsscmd::run(a),
        Command::Image { cmd } => {
            // `ferry image maps IMG | head` must end quietly, as any Unix
            // filter does, not panic on the closed pipe. Only here: the
            // commands that talk to sockets handle their errors themselves.
            // SAFETY: restoring the default disposition of one signal.
            unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
            imagecmd::run(cmd)
        }
    }
}

fn abs_path(p: &Path) -> Result<PathBuf> {
    Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
}

/// Shows the migration's progress on a terminal (one rewritten line) until
/// the returned flag is set.
fn progress_printer(sock: PathBuf, quiet: bool) -> Arc<std::sync::atomic::AtomicBool> {
    use std::io::IsTerminal;
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    if quiet || !std::io::stderr().is_terminal() {
        return done;
    }
    let d = done.clone();
    std::thread::spawn(move || {
        let mut shown = false;
        while !d.load(std::sync::atomic::Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(200));
            if let Ok(p) = http::request(&sock, "GET", "/vm/migration", None, Duration::from_secs(2)) {
                if d.load(std::sync::atomic::Ordering::SeqCst) {
                    break;
                }
                eprint!(
                    "\r\x1b[Kmigration {}: {} pages, {:.1} MiB sent, {:.1} s",
                    p["state"].as_str().unwrap_or("setup"),
                    p["pages_sent"],
                    p["bytes_sent"].as_f64().unwrap_or(0.0) / 1048576.0,
                    p["elapsed_ms"].as_f64().unwrap_or(0.0) / 1e3
                );
                shown = true;
            }
        }
        if shown {
            eprintln!();
        }
    });
    done
}

fn print_migration(v: &serde_json::Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    println!(
        "migration {} to {} over {}: {}",
        v["migration_id"].as_str().unwrap_or(""),
        v["to"].as_str().unwrap_or(""),
        v["transport"].as_str().unwrap_or(""),
        v["state"].as_str().unwrap_or("")
    );
    println!("  total            {:.1} ms (setup {:.1} ms)", f("total_ms"), f("setup_ms"));
    println!("  downtime         {:.2} ms (budget {:.0} ms)", f("downtime_ms"), f("expected_downtime_ms"));
    let rounds = v["rounds"]
        .as_array()
        .map(|r| r.iter().map(|x| x["pages"].as_u64().unwrap_or(0)).collect::<Vec<_>>())
        .unwrap_or_default();
    println!(
        "  rounds           {} ({}), pages per round {rounds:?}",
        rounds.len(),
        v["stop_reason"].as_str().unwrap_or("")
    );
    println!(
        "  pages            {} with data, {} zero, {} never touched (not sent)",
        v["pages_normal"], v["pages_zero"], v["pages_skipped_unpopulated"]
    );
    println!(
        "  bytes on wire    {} ({:.0} MB/s of pages in live rounds, codec {})",
        v["bytes_sent"],
        f("throughput_mb_per_s"),
        v["compress"].as_str().unwrap_or("")
    );
    if let Some(cap) = v["max_bandwidth"].as_u64() {
        let r1 = v["rounds"][0]["wire_bytes_per_s"].as_f64().unwrap_or(0.0);
        println!(
            "  bandwidth cap    {:.1} MiB/s; round 1 ran at {:.1} MiB/s on the wire; {:.0} ms waited on the cap",
            cap as f64 / 1048576.0,
            r1 / 1048576.0,
            f("bandwidth_wait_ms")
        );
    }
    if let Some(t) = v["throttle"].as_object() {
        let steps: Vec<String> = t["steps"]
            .as_array()
            .map(|s| s.iter().map(|x| format!("{}%@r{}", x["percent"], x["round"])).collect())
            .unwrap_or_default();
        if !steps.is_empty() {
            println!(
                "  auto-converge    {} (vCPUs held {:.0} ms in all)",
                steps.join(" "),
                t["throttled_ms"].as_f64().unwrap_or(0.0)
            );
        }
    }
    if let Some(d) = v["memory_digest"].as_str() {
        println!("  memory digest    {d} (both ends agree)");
    }
    if v["working_set_held_pages"].as_u64().unwrap_or(0) > 0 {
        println!(
            "  working set      {} pages held back from live rounds, {} re-sends saved",
            v["working_set_held_pages"], v["working_set_resends_saved"]
        );
    }
    if let Some(p) = v["postcopy"].as_object() {
        let d = &p["destination"];
        println!(
            "  post-copy        {} pages deferred: {} pushed, {} requests served ({} pages); {:.1} ms, push {:.0} MB/s",
            p["deferred_pages"],
            p["pages_pushed"],
            p["requests_served"],
            p["pages_served"],
            p["postcopy_ms"].as_f64().unwrap_or(0.0),
            p["push_mb_per_s"].as_f64().unwrap_or(0.0)
        );
        if d.is_object() {
            println!(
                "  remote faults    {} (vCPUs blocked {:.2} ms in all; per fault median {:.3} ms, p99 {:.3} ms, max {:.3} ms)",
                d["faults"], d["blocked_ms_total"].as_f64().unwrap_or(0.0), d["blocked_ms_median"].as_f64().unwrap_or(0.0),
                d["blocked_ms_p99"].as_f64().unwrap_or(0.0), d["blocked_ms_max"].as_f64().unwrap_or(0.0)
            );
        }
    }
}

fn print_snapshot(v: &serde_json::Value) {
    let f = |k: &str| v[k].as_f64().unwrap_or(0.0);
    println!("snapshot {} ({})", v["path"].as_str().unwrap_or(""), v["mode"].as_str().unwrap_or(""));
    println!("  root hash        {}", v["root_hash"].as_str().unwrap_or(""));
    if let Some(p) = v["parent"].as_str() {
        println!("  parent           {p}");
    }
    println!("  total            {:.1} ms", f("total_ms"));
    if f("digest_ms") > 0.0 {
        println!(
            "  guest paused     {:.2} ms ({:.2} ms of it hashing memory for --digest)",
            f("pause_ms"),
            f("digest_ms")
        );
    } else {
        println!("  guest paused     {:.2} ms", f("pause_ms"));
    }
    println!(
        "  rounds           {} ({}), pages per round {}",
        v["rounds"],
        v["stop_reason"].as_str().unwrap_or(""),
        v["pages_per_round"]
    );
    println!("  zero pages       {} skipped", v["zero_pages_skipped"]);
    println!(
        "  bytes written    {} (compression {:.2}x, codec {}, encrypted {})",
        v["bytes_written"],
        f("compression_ratio"),
        v["codec"],
        v["encrypted"]
    );
    if let Some(d) = v["memory_digest"].as_str() {
        println!("  memory digest    {d} (at the final pause)");
    }
}

fn print_json(v: serde_json::Value) -> Result<u8> {
    if !v.is_null() {
        println!("{}", serde_json::to_string_pretty(&v)?);
    }
    Ok(0)
}

/// Resolves `--kernel`.
pub fn kernel_source(kernel: &str) -> Result<KernelSource> {
    if let Some(name) = kernel.strip_prefix("builtin:") {
        if name != "test" {
            bail!("unknown built-in kernel {kernel:?}; the only one is {BUILTIN_TEST_GUEST}");
        }
        return Ok(KernelSource::Bytes(BUILTIN_TEST_GUEST, ferry_guest::ELF));
    }
    Ok(KernelSource::Path(PathBuf::from(kernel)))
}

/// The guest's serial output and, where there is one, its input.
type SerialEnds = (Box<dyn Write + Send>, Option<Box<dyn Read + Send>>);

fn serial_sink(spec: &str) -> Result<SerialEnds> {
    if spec == "stdio" {
        return Ok((Box::new(std::io::stdout()), Some(Box::new(std::io::stdin()))));
    }
    if spec == "none" {
        return Ok((Box::new(std::io::sink()), None));
    }
    if let Some(p) = spec.strip_prefix("file:") {
        let f = std::fs::File::create(p).with_context(|| format!("creating serial output file {p}"))?;
        return Ok((Box::new(f), None));
    }
    if let Some(p) = spec.strip_prefix("unix:") {
        let s = std::os::unix::net::UnixStream::connect(p)
            .with_context(|| format!("connecting serial to unix socket {p}"))?;
        let r = s.try_clone()?;
        return Ok((Box::new(s), Some(Box::new(r))));
    }
    bail!("invalid --serial {spec:?}: expected stdio, none, file:PATH or unix:PATH")
}

fn run(args: RunArgs, start: Instant) -> Result<u8> {
    // Before any thread exists, so that every thread inherits the mask and
    // only the signal thread sees SIGTERM, SIGINT and SIGHUP.
    let signals = signals::block_termination()?;
    let kernel = kernel_source(&args.kernel)?;
    let (out, input) = serial_sink(&args.serial)?;
    // Bind the API socket before booting so a taken path fails fast.
    let api = match &args.api_sock {
        Some(p) => Some(api::bind(p)?),
        None => None,
    };
    let cfg = VmConfig {
        mem_bytes: args.mem,
        vcpus: args.vcpus,
        kernel,
        initrd: args.initrd.clone(),
        cmdline: args.cmdline.clone(),
        cpu_template: args.cpu_template,
        serial_out: out,
        memfd: args.memfd,
    };
    let vm = Arc::new(Vm::boot(cfg, start)?);
    let ctl = VmController::new(vm, None, None);
    let stop = Stop { signals, timeout: Duration::from_millis(args.shutdown_timeout_ms) };
    serve_vm(ctl, api, input, args.report.as_deref(), None, stop)
}

fn receive(a: ReceiveArgs, start: Instant) -> Result<u8> {
    use ferry_migrate::transport::{Address, Listener, Security, TlsConfig};
    let blocked = signals::block_termination()?;
    let (out, input) = serial_sink(&a.serial)?;
    let api = match &a.api_sock {
        Some(p) => Some(api::bind(p)?),
        None => None,
    };
    let listen: Address = a.listen.parse()?;
    let security = match (&a.tls.tls_cert, &a.tls.tls_key, &a.tls.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => {
            if a.allow_peer.is_empty() {
                bail!("TLS needs at least one --allow-peer NAME: the sources allowed to send a VM");
            }
            Security::Tls {
                config: TlsConfig { cert: cert.clone(), key: key.clone(), ca: ca.clone() },
                allowed_peers: a.allow_peer.clone(),
            }
        }
        _ if a.tls.insecure || matches!(listen, Address::Unix(_)) => Security::Insecure,
        _ => bail!("listening on TCP needs TLS (--tls-cert, --tls-key, --tls-ca) or an explicit --insecure"),
    };
    let listener = Listener::bind(&listen, security)?;
    eprintln!("ferry: waiting for a migration on {}", listener.local_addr());
    let progress = ferry_migrate::migration::IncomingHandle::default();
    let target = api::Target::incoming(listener.local_addr().to_string(), progress.clone());
    let server = api.map(|(l, server)| {
        api::serve(l, &server, target.clone());
        server
    });
    let signal = signals::spawn_shutdown_thread(
        blocked,
        signals::Watched::Incoming(target.clone(), a.api_sock.clone()),
        Duration::from_millis(a.shutdown_timeout_ms),
    )?;
    let opts = ferry_migrate::migration::ReceiveOptions {
        accept_timeout: Duration::from_millis(a.accept_timeout_ms),
        peer_timeout: Duration::from_millis(a.peer_timeout_ms),
        serial_out: out,
        process_start: start,
        paused: a.paused,
        commit_wait: Duration::from_millis(a.commit_wait_ms),
        progress,
    };
    let got = ferry_migrate::migration::receive(&listener, opts).context("incoming migration")?;
    let s = got.stats.clone();
    eprintln!(
        "ferry: received VM {} (migration {}) from {}{}: {} pages, {} zero pages, {} bytes; running {:.2} ms after its state arrived",
        got.vm_id,
        s.migration_id,
        s.peer,
        s.peer_name.as_deref().map(|n| format!(" ({n})")).unwrap_or_default(),
        s.pages,
        s.zero_pages,
        s.bytes_received,
        s.switchover_ms
    );
    let memory_ready = got.postcopy.as_ref().map(|p| p.pages.completion());
    let postcopy = got.postcopy.as_ref().map(|p| p.pages.clone());
    if let Some(pc) = got.postcopy {
        // Post-copy: pages still arrive; the listener stays for a resume after a lost link.
        static NEVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        std::thread::spawn(move || ferry_migrate::migration::serve_postcopy_resumes(&listener, &pc, &NEVER));
    } else {
        // Pre-copy: the source may not have heard Running; it can ask again
        // (`ferry migrate --resume`) for as long as the guest runs here.
        static NEVER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        let (id, vm_id, timeout) =
            (s.migration_id.clone(), got.vm_id.clone(), Duration::from_millis(a.peer_timeout_ms));
        std::thread::spawn(move || {
            ferry_migrate::migration::serve_commit_settles(&listener, (&id, &vm_id), timeout, &NEVER)
        });
    }
    let ctl = Arc::new(VmController::with_id(got.vm, None, memory_ready, got.vm_id));
    target.set(ctl.clone());
    let incoming_json = move || {
        let mut v = serde_json::to_value(&s).unwrap_or_default();
        if let (Some(pc), Some(o)) = (&postcopy, v.as_object_mut()) {
            o.insert("postcopy".into(), serde_json::to_value(pc.stats()).unwrap_or_default());
        }
        v
    };
    serve_vm_with(ctl, server, input, a.report.as_deref(), Some(&incoming_json), signal)
}

fn restore(a: RestoreArgs, start: Instant) -> Result<u8> {
    let signals = signals::block_termination()?;
    let (out, input) = serial_sink(&a.serial)?;
    let api = match &a.api_sock {
        Some(p) => Some(api::bind(p)?),
        None => None,
    };
    let key = match &a.key_file {
        Some(f) => Some(ferry_image::UserKey::from_file(f)?),
        None => None,
    };
    let memory = match a.memory {
        MemoryArg::Eager => ferry_migrate::MemoryMode::Eager,
        MemoryArg::Lazy => ferry_migrate::MemoryMode::Lazy,
    };
    let opts = ferry_migrate::RestoreOptions {
        key: key.as_ref(),
        paused: a.paused,
        serial_out: out,
        process_start: start,
        memory,
    };
    let restored = ferry_migrate::restore_from_image(&a.image, opts)
        .with_context(|| format!("restoring {}", a.image.display()))?;
    let (vm, stats, lazy) = (restored.vm, restored.stats, restored.lazy);
    let first = match stats.first_instruction_ms {
        Some(t) => format!("first guest instruction {t:.1} ms after start"),
        None => format!("ready {:.1} ms after start, paused", stats.ready_ms),
    };
    match memory {
        ferry_migrate::MemoryMode::Eager => eprintln!(
            "ferry: restored {} (chain of {}, root {}, memory eager): {} MiB of data in {:.1} ms ({:.2} GB/s, {} threads), {first}",
            a.image.display(),
            stats.chain_len,
            stats.root_hash,
            stats.data_bytes >> 20,
            stats.memory_ms,
            stats.memory_gb_per_s,
            stats.fill_threads,
        ),
        ferry_migrate::MemoryMode::Lazy => eprintln!(
            "ferry: restored {} (chain of {}, root {}, memory lazy: on first touch, prefetching), {first}",
            a.image.display(),
            stats.chain_len,
            stats.root_hash,
        ),
    }
    let root = stats.root_hash.parse().ok();
    let restore_json = || {
        let mut j = serde_json::to_value(&stats).unwrap_or_default();
        if let Some(l) = &lazy {
            j["lazy"] = serde_json::to_value(l.stats()).unwrap_or_default();
        }
        j
    };
    let memory_ready = lazy.as_ref().map(|l| l.completion());
    let ctl = VmController::new(vm, root, memory_ready);
    let stop = Stop { signals, timeout: Duration::from_millis(a.shutdown_timeout_ms) };
    let code = serve_vm(ctl, api, input, a.report.as_deref(), Some(&restore_json), stop)?;
    if let Some(l) = lazy {
        let s = l.finish();
        let prefetch = match (s.prefetch_ms, s.prefetch_gb_per_s) {
            (Some(t), Some(r)) => format!("prefetched {} pages in {t:.1} ms ({r:.2} GB/s)", s.pages_prefetched),
            _ => format!("prefetch stopped after {} pages", s.pages_prefetched),
        };
        eprintln!(
            "ferry: lazy memory: {prefetch}; {} faults brought in {} pages and {} zero pages",
            s.faults, s.pages_faulted, s.zero_pages_faulted
        );
        if let Some(e) = s.error {
            eprintln!("ferry: error: restoring {}: {e}", a.image.display());
            return Ok(1);
        }
    }
    Ok(code)
}

/// How a served VM reacts to termination signals.
struct Stop {
    signals: signals::Blocked,
    timeout: Duration,
}

/// How long, after the guest stopped, ferry waits for an operation that was
/// running (a snapshot) to end and answer its client before it exits.
const OPERATION_DRAIN: Duration = Duration::from_secs(30);

/// Serves the API and the console of a running VM until it stops.
fn serve_vm(
    ctl: VmController,
    api: Option<(std::os::unix::net::UnixListener, api::ApiServer)>,
    input: Option<Box<dyn Read + Send>>,
    report: Option<&Path>,
    restore: Option<&dyn Fn() -> serde_json::Value>,
    stop: Stop,
) -> Result<u8> {
    let ctl = Arc::new(ctl);
    let server = api.map(|(listener, server)| {
        api::serve(listener, &server, api::Target::vm(ctl.clone()));
        server
    });
    let signal = signals::spawn_shutdown_thread(stop.signals, signals::Watched::Vm(ctl.clone()), stop.timeout)?;
    serve_vm_with(ctl, server, input, report, restore, signal)
}

/// The part of [`serve_vm`] after the API and the signal thread are up.
fn serve_vm_with(
    ctl: Arc<VmController>,
    server: Option<api::ApiServer>,
    input: Option<Box<dyn Read + Send>>,
    report: Option<&Path>,
    restore: Option<&dyn Fn() -> serde_json::Value>,
    signal: signals::Received,
) -> Result<u8> {
    let vm = ctl.vm().clone();
    if let Some(mut input) = input {
        let vm = vm.clone();
        std::thread::Builder::new().name("serial-in".into()).spawn(move || {
            let mut buf = [0u8; 256];
            while let Ok(n) = input.read(&mut buf) {
                if n == 0 {
                    break;
                }
                let mut sent = 0;
                while sent < n {
                    let k = vm.bus().serial_input(&buf[sent..n]);
                    sent += k;
                    if k == 0 {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                }
            }
        })?;
    }
    let reason = vm.wait();
    // An operation running when the guest stopped fails at its next pause;
    // let it clean up (temp files) and answer its client before exiting.
    ctl.wait_idle(OPERATION_DRAIN);
    if let Some(s) = &server {
        s.drain(Duration::from_secs(2));
    }
    if let Some(path) = report {
        let mut report = serde_json::to_value(ferry_bench::RunReport::collect(&vm, &reason))?;
        if let Some(sig) = signal.received() {
            report["signal"] = serde_json::json!(sig);
        }
        if let Some(r) = restore {
            report["restore"] = r();
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    eprintln!("ferry: {reason}");
    Ok(reason.exit_code() as u8)
}
