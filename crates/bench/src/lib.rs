//! `ferry bench`: ferry's benchmark harness.
//!
//! Benchmarks print figures; they never assert on time, because the machines
//! they run on are shared and noisy. Every comparison (against the disk, the
//! codec, the link, QEMU) is measured side by side in the same run and stated
//! as a ratio.
//!
//! The harness drives the real `ferry` binary as child processes (it finds it
//! with [`std::env::current_exe`], so `ferry bench` measures the build it was
//! started from) and talks to it only through its command line and its
//! output, as a user would. It is a crate of its own so that the CLI stays a
//! thin layer over the library crates and the benchmarks can grow without
//! growing the binary's main module.
//!
//! Layout: `probe` (what is measured: boot, snapshot, migrate, mount, scan, inspect, and the host
//! figures: machine, disk, codec, memory, schedstat, link), `peer` (the other
//! VMMs: QEMU; Firecracker's comparison is a script), `report` (tables and
//! JSON), and the plumbing (`child`, `vm`, `util`, `size`).
#![warn(missing_docs)]

mod child;
mod peer;
mod probe;
mod report;
mod run_report;
mod util;
mod vm;

use anyhow::Result;
use clap::Subcommand;

pub use probe::inspect::InspectBenchArgs;
pub use probe::migrate::MigrateBenchArgs;
pub use probe::mount::MountBenchArgs;
pub use probe::scan::ScanBenchArgs;
pub use probe::snapshot::SnapBenchArgs;
pub use probe::watch::WatchBenchArgs;
pub use probe::wss::WssBenchArgs;
pub use run_report::RunReport;

/// The `ferry bench` subcommands (clap derive; the CLI flattens this enum
/// under `ferry bench`).
#[derive(Subcommand)]
pub enum BenchCmd {
    /// Boot the test guest repeatedly: time to first instruction and first
    /// progress line, dirty rate, memory-digest speed, VMM memory overhead.
    Boot {
        /// Boots to measure.
        #[arg(long, default_value_t = 5)]
        runs: u32,
        /// Guest memory for the dirty-rate and digest runs.
        #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
        mem: u64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Live snapshot, restore, encryption and incremental figures, side by
    /// side with the disk, the codec and QEMU on the same machine.
    Snapshot {
        /// Its options.
        #[command(flatten)]
        args: SnapBenchArgs,
    },
    /// Live migration on loopback (unix, TCP, TLS; lz4 or raw): downtime,
    /// total time, bytes, rounds, against the link's own speed and QEMU's
    /// migration of the same guest.
    Migrate {
        /// Its options.
        #[command(flatten)]
        args: MigrateBenchArgs,
    },
    /// Reading core.elf through `ferry image mount` against reading the exported
    /// file: cold and warm MB/s, the export's time, the mount's memory.
    Mount {
        /// Its options.
        #[command(flatten)]
        args: MountBenchArgs,
    },
    /// YARA scan of an image with many string rules (`ferry image scan --rules`): GB/s of
    /// non-zero memory per core, against YARA-X's own scanner over the raw export.
    Scan {
        /// Its options.
        #[command(flatten)]
        args: ScanBenchArgs,
    },
    /// The whole-image analyses (`ferry image verify`, `stats`, `diff`) on snapshots of the
    /// test guest: GB/s of non-zero memory per wall and per CPU second, optionally side by
    /// side with another ferry build (`--baseline`).
    Inspect {
        /// Its options.
        #[command(flatten)]
        args: InspectBenchArgs,
    },
    /// Incremental scanning (`ferry scan --watch`) of a guest rewriting a
    /// working set: time per pass against a full scan.
    Watch {
        /// Its options.
        #[command(flatten)]
        args: WatchBenchArgs,
    },
    /// What `ferry wss` sampling costs the guest: its progress rate with and
    /// without sampling, alternating on the same guest.
    Wss {
        /// Its options.
        #[command(flatten)]
        args: WssBenchArgs,
    },
}

/// Runs a benchmark and returns the process exit status (0: it ran; a
/// benchmark whose guest failed its own checks still prints its figures).
pub fn run(cmd: BenchCmd) -> Result<u8> {
    match cmd {
        BenchCmd::Boot { runs, mem, json } => {
            let b = probe::boot::boot_bench(runs, mem)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&b)?);
            } else {
                report::tables::print_boot(&b);
            }
            Ok(0)
        }
        BenchCmd::Snapshot { args } => probe::snapshot::snapshot_bench(args),
        BenchCmd::Migrate { args } => probe::migrate::migrate_bench(args),
        BenchCmd::Mount { args } => probe::mount::mount_bench(args),
        BenchCmd::Scan { args } => probe::scan::scan_bench(args),
        BenchCmd::Inspect { args } => probe::inspect::inspect_bench(args),
        BenchCmd::Watch { args } => probe::watch::watch_bench(args),
        BenchCmd::Wss { args } => probe::wss::wss_bench(args),
    }
}
