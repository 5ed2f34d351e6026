//! `ferry`: a thin command line over the ferry library crates.

mod api;
mod bench;
mod http;
mod imagecmd;
mod size;
mod snapshot;

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand};
use ferry_vmm::{CpuTemplate, KernelSource, Vm, VmConfig};
use snapshot::VmHandle;

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
    /// Check, describe and export images.
    Image {
        #[command(subcommand)]
        cmd: imagecmd::ImageCmd,
    },
    /// The embedded test guest.
    Guest {
        #[command(subcommand)]
        cmd: GuestCmd,
    },
    /// Benchmarks that print figures.
    Bench {
        #[command(subcommand)]
        cmd: bench::BenchCmd,
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
    #[arg(long, default_value = "256M", value_parser = size::parse_mem)]
    pub mem: u64,
    /// Number of vCPUs (1..=32).
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// CPU template: host (all KVM supports) or minimal (hides CX16, XSAVE, AVX, PCID).
    #[arg(long, default_value = "host")]
    pub cpu_template: CpuTemplate,
    /// Serial port: stdio, file:PATH, unix:PATH (connect to a listening socket) or none.
    #[arg(long, default_value = "stdio")]
    pub serial: String,
    /// Control API socket (HTTP/JSON).
    #[arg(long)]
    pub api_sock: Option<PathBuf>,
    /// Write boot timings and memory figures as JSON here when the VM stops.
    #[arg(long)]
    pub report: Option<PathBuf>,
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
    codec: String,
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
    final_phase: String,
    /// Print the statistics as JSON.
    #[arg(long)]
    json: bool,
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
        Command::Bench { cmd } => bench::run(cmd),
        Command::Snapshot(a) => {
            if a.key_file.is_some() && !a.encrypt {
                bail!("--key-file given without --encrypt; add --encrypt to encrypt the image");
            }
            let abs = |p: &Path| -> Result<PathBuf> {
                Ok(if p.is_absolute() { p.to_path_buf() } else { std::env::current_dir()?.join(p) })
            };
            let body = serde_json::json!({
                "path": abs(&a.out)?,
                "mode": if a.pause { "pause" } else { "live" },
                "codec": a.codec,
                "zstd_level": a.zstd_level,
                "key_file": a.key_file.as_deref().map(abs).transpose()?,
                "parent": a.parent.as_deref().map(abs).transpose()?,
                "digest": a.digest,
                "downtime_ms": a.downtime_ms,
                "max_rounds": a.max_rounds,
                "final_phase": a.final_phase,
            });
            let v = api(&a.api_sock, "PUT", "/vm/snapshot", Some(body))?;
            if a.json {
                println!("{}", serde_json::to_string_pretty(&v)?);
            } else {
                print_snapshot(&v);
            }
            Ok(0)
        }
        Command::Restore(a) => restore(a, start),
        Command::Image { cmd } => imagecmd::run(cmd),
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
    };
    let vm = Arc::new(Vm::boot(cfg, start)?);
    serve_vm(VmHandle { vm, lineage: Mutex::new(None), memory_ready: None }, api, input, args.report.as_deref(), None)
}

fn restore(a: RestoreArgs, start: Instant) -> Result<u8> {
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
    let handle = VmHandle { vm, lineage: Mutex::new(root), memory_ready };
    let code = serve_vm(handle, api, input, a.report.as_deref(), Some(&restore_json))?;
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

/// Serves the API and the console of a running VM until it stops.
fn serve_vm(
    handle: VmHandle,
    api: Option<(std::os::unix::net::UnixListener, api::ApiServer)>,
    input: Option<Box<dyn Read + Send>>,
    report: Option<&Path>,
    restore: Option<&dyn Fn() -> serde_json::Value>,
) -> Result<u8> {
    let handle = Arc::new(handle);
    let vm = handle.vm.clone();
    let _server = api.map(|(listener, server)| {
        api::serve(listener, handle.clone());
        server
    });
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
    if let Some(path) = report {
        let mut report = serde_json::to_value(bench::RunReport::collect(&vm, &reason))?;
        if let Some(r) = restore {
            report["restore"] = r();
        }
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| format!("writing report {}", path.display()))?;
    }
    eprintln!("ferry: {reason}");
    Ok(reason.exit_code() as u8)
}
