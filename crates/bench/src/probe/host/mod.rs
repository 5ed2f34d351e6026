//! Figures of the host itself, measured in the same run as the VMs so that
//! every VM figure can be stated against what the machine can do: the
//! machine's description and load, the disk, the codec, memory speed,
//! scheduler stalls and the loopback link.

pub(crate) mod codec;
pub(crate) mod disk;
pub(crate) mod link;
pub(crate) mod memory;
pub(crate) mod sched;

use std::path::Path;

use anyhow::Result;
use serde::Serialize;

use crate::util::max_of;

/// The disk and the codec, measured in this run.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct Baseline {
    pub(crate) disk_write_gb_s: Vec<f64>,
    pub(crate) lz4_1thread_gb_s: Vec<f64>,
    pub(crate) lz4_threads: usize,
    pub(crate) lz4_nthreads_gb_s: Vec<f64>,
    pub(crate) lz4_ratio: f64,
    /// Single-thread memcpy between pre-touched buffers.
    pub(crate) memcpy_gb_s: Vec<f64>,
    /// First write to a fresh anonymous page (page fault + zeroing), per page.
    pub(crate) first_touch_us_per_page: Vec<f64>,
}

impl Baseline {
    /// Measures all of it once more (the disk is noisy: best of the samples counts).
    pub(crate) fn sample(&mut self, dir: &Path, disk_mib: u64) -> Result<()> {
        self.disk_write_gb_s.push(disk::disk_write_gb_s(dir, disk_mib)?);
        let (g1, ratio) = codec::lz4_gb_s(1);
        self.lz4_1thread_gb_s.push(g1);
        self.lz4_threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1);
        self.lz4_nthreads_gb_s.push(codec::lz4_gb_s(self.lz4_threads).0);
        self.lz4_ratio = ratio;
        self.memcpy_gb_s.push(memory::memcpy_gb_s());
        self.first_touch_us_per_page.push(memory::first_touch_us(256 << 20)?);
        Ok(())
    }
    /// Best of the samples: what the disk and the codec can do.
    pub(crate) fn disk(&self) -> f64 {
        max_of(&self.disk_write_gb_s)
    }
    /// Best lz4 throughput on all threads.
    pub(crate) fn codec(&self) -> f64 {
        max_of(&self.lz4_nthreads_gb_s)
    }
}

/// The machine a run measured, printed at the top of every report: figures
/// from a 2-core software-virtualised host mean little without it.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct Machine {
    pub(crate) nproc: usize,
    pub(crate) cpu: String,
    pub(crate) kernel: String,
    pub(crate) mem_total_gib: f64,
    pub(crate) kvm_is_pvm: bool,
    /// /proc/loadavg at the start and the end of the run (other work on the machine).
    pub(crate) loadavg_start: String,
    pub(crate) loadavg_end: String,
}

/// Describes this machine now (the end load average is filled in later).
pub(crate) fn machine() -> Machine {
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

/// The 1, 5 and 15 minute load averages: other work on a shared machine.
pub(crate) fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}
