//! The figures `ferry run --report` (and `restore`/`receive --report`) write
//! when a VM stops. They live here because the benches are what read them:
//! one definition for the writer (the CLI) and the reader (`bench boot`).

use ferry_vmm::{BootTimes, ExitReason, Vm};
use serde::{Deserialize, Serialize};

use crate::util::ms;

/// What `ferry run --report` writes when the VM stops: boot timings and what
/// the VMM costs in memory, so `ferry bench boot` can read them back from a
/// child process.
#[derive(Debug, Serialize, Deserialize, Default, Clone)]
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
