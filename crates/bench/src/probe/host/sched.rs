//! Scheduler figures from `/proc/PID/task/TID/schedstat`: how long the guest
//! was really stopped, as opposed to how long the VMM says it paused it.

use std::time::Duration;

/// Nanoseconds the non-vCPU threads of `pid` have spent waiting on a run queue.
pub(crate) fn runq_wait_ns(pid: u32) -> Option<u64> {
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
pub(crate) fn vcpu_sched(pid: u32) -> Vec<(String, u64, u64)> {
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
pub(crate) fn vcpu_blocked_ms(a: &[(String, u64, u64)], b: &[(String, u64, u64)], wall: Duration) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for (tid, cpu1, rq1) in b {
        let Some((_, cpu0, rq0)) = a.iter().find(|(t, _, _)| t == tid) else { continue };
        let busy = cpu1.saturating_sub(*cpu0) + rq1.saturating_sub(*rq0);
        let blocked = (wall.as_nanos() as u64).saturating_sub(busy) as f64 / 1e6;
        worst = Some(worst.map_or(blocked, |w: f64| w.max(blocked)));
    }
    worst
}

/// (on-CPU ns, run-queue wait ns) summed over the threads of `pid` whose
/// name does not start with `vcpu_prefix` (ferry: `vcpu`, QEMU: `CPU `): how
/// much CPU the VMM's own work (a migration's receive or send loop) got, and
/// how long it waited for one on a shared machine.
pub(crate) fn vmm_threads_ns(pid: u32, vcpu_prefix: &str) -> Option<(u64, u64)> {
    let (mut cpu, mut rq) = (0, 0);
    for t in std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.flatten() {
        let comm = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        if comm.starts_with(vcpu_prefix) {
            continue;
        }
        let s = std::fs::read_to_string(t.path().join("schedstat")).unwrap_or_default();
        let f: Vec<u64> = s.split_whitespace().filter_map(|w| w.parse().ok()).collect();
        if f.len() >= 2 {
            cpu += f[0];
            rq += f[1];
        }
    }
    Some((cpu, rq))
}

/// `/proc/pressure/cpu`'s `some avg10`: the share of the last 10 s in which
/// some runnable task waited for a CPU (0-100). High values mean the
/// figures were taken on a busy machine.
pub(crate) fn cpu_pressure_avg10() -> Option<f64> {
    let s = std::fs::read_to_string("/proc/pressure/cpu").ok()?;
    s.lines().find(|l| l.starts_with("some"))?.split_whitespace().find_map(|w| w.strip_prefix("avg10=")?.parse().ok())
}
