//! Cloud Hypervisor, the second live-migration peer: started on the same test
//! guest (`--kernel guest.elf`, a PVH ELF), migrated between two processes
//! over loopback TCP (`ch-remote receive-migration` / `send-migration`).
//!
//! Cloud Hypervisor is not in any package registry and this repository may
//! not build or ship it: the bench takes a path to binaries built elsewhere
//! (`--cloud-hypervisor PATH`, with `ch-remote` beside it) and is skipped
//! with a note when they are absent.
//!
//! Its figures: total time runs from `ch-remote send-migration` (which
//! returns as soon as the migration has started) to the destination's
//! `ch-remote receive-migration` returning (the guest runs there); downtime and
//! bytes are what the source logs with `-v` ("Migration completed after
//! ... with a downtime of N ms", "Precopy complete: ... total=N MiB", the
//! bytes rounded up to MiB by Cloud Hypervisor). The guest's serial port is
//! the process's stdout (`--serial tty`); its input comes from a
//! pseudo-terminal on stdin, since Cloud Hypervisor reads serial input only
//! from a terminal, and a destination keeps the source's serial settings.

use std::fs::File;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::Kid;
use crate::probe::host::sched::vmm_threads_ns;
use crate::util::{kv, mib};

/// One Cloud Hypervisor live migration.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct ChMig {
    /// From `ch-remote send-migration` (which returns once the migration
    /// has started) to the destination's `receive-migration` returning (the
    /// guest runs there), ms.
    pub(crate) total_ms: f64,
    /// The source's "downtime of N ms" (pause to the destination's resume).
    pub(crate) downtime_ms: f64,
    /// The source's "Migration completed after N s" (0.1 s resolution).
    pub(crate) logged_total_s: f64,
    /// Memory sent, from the source's "Precopy complete: ... total=N MiB".
    pub(crate) sent_mib: f64,
    /// Memory iterations, the final (paused) one included.
    pub(crate) iterations: u64,
}

/// What [`ChVm::migrate_live`] returns.
pub(crate) struct ChMigrated {
    /// The destination, now running the guest.
    pub(crate) vm: ChVm,
    /// The migration's figures.
    pub(crate) figures: ChMig,
    /// (CPU ns, run-queue wait ns) of the destination's non-vCPU threads during it.
    pub(crate) dst_sched: Option<(u64, u64)>,
    /// The source's last PROGRESS seq and the destination's first.
    pub(crate) seq_before: Option<u64>,
    pub(crate) seq_after: Option<u64>,
}

/// The binaries: `cloud-hypervisor` and the `ch-remote` next to it.
#[derive(Clone, Debug)]
pub(crate) struct ChBins {
    pub(crate) vmm: PathBuf,
    pub(crate) remote: PathBuf,
}

impl ChBins {
    /// `path` and the `ch-remote` in its directory; fails (saying what is
    /// missing) when either is not an executable file.
    pub(crate) fn find(path: &Path) -> Result<ChBins> {
        let remote = path.with_file_name("ch-remote");
        for p in [path, remote.as_path()] {
            if !p.is_file() {
                bail!(
                    "{} not found (Cloud Hypervisor is built outside this repository; pass --cloud-hypervisor PATH)",
                    p.display()
                );
            }
        }
        Ok(ChBins { vmm: path.to_path_buf(), remote })
    }

    /// The first line of `cloud-hypervisor --version`.
    pub(crate) fn version(&self) -> Result<String> {
        let v = Command::new(&self.vmm)
            .arg("--version")
            .output()
            .with_context(|| format!("running {} --version", self.vmm.display()))?;
        Ok(String::from_utf8_lossy(&v.stdout).lines().next().unwrap_or("").trim().to_string())
    }

    /// Runs `ch-remote --api-socket api ARGS` to completion within `timeout`.
    fn remote(&self, api: &Path, args: &[&str], timeout: Duration) -> Result<()> {
        let mut k = Kid::spawn(
            &format!("ch-remote {}", args.first().unwrap_or(&"")),
            Command::new(&self.remote).arg("--api-socket").arg(api).args(args),
        )?;
        let st = k.finish(timeout)?;
        if !st.success() {
            bail!("{} failed ({st}){}", k.name, k.tail());
        }
        Ok(())
    }
}

/// The number in `line` between `key` and the next `unit`, e.g. 65 in
/// "... a downtime of 65ms (goal ...)"; NaN when it is not there.
fn number_after(line: &str, key: &str, unit: &str) -> f64 {
    line.split(key).nth(1).and_then(|r| r.split(unit).next()).and_then(|n| n.trim().parse().ok()).unwrap_or(f64::NAN)
}

/// The figures in the source's "Migration completed after 10.0s with a
/// downtime of 65ms (goal was 300ms)" (`done`) and "Precopy complete:
/// iter=3 curr=2MiB total=1090MiB ..." (`pre`) log lines; total_ms is 0.
fn log_figures(done: &str, pre: &str) -> ChMig {
    ChMig {
        total_ms: 0.0,
        downtime_ms: number_after(done, "downtime of ", "ms"),
        logged_total_s: number_after(done, "completed after ", "s"),
        sent_mib: number_after(pre, "total=", "MiB"),
        iterations: kv(pre, "iter").unwrap_or(0),
    }
}

/// A pseudo-terminal: the leader (written by the bench) and the follower
/// (a child's stdin), neither inherited by other children.
fn pty() -> Result<(File, OwnedFd)> {
    let (mut leader, mut follower) = (-1, -1);
    // SAFETY: openpty stores two new descriptors through valid pointers;
    // name, termios and window size may be null.
    let r =
        unsafe { libc::openpty(&mut leader, &mut follower, std::ptr::null_mut(), std::ptr::null(), std::ptr::null()) };
    if r != 0 {
        bail!("openpty: {}", std::io::Error::last_os_error());
    }
    // SAFETY: both descriptors were just created and are owned here alone.
    let (l, f) = unsafe { (File::from_raw_fd(leader), OwnedFd::from_raw_fd(follower)) };
    for fd in [leader, follower] {
        // SAFETY: fcntl on a descriptor we own; the child's stdin is a dup without FD_CLOEXEC.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
    Ok((l, f))
}

/// Waits until `path` exists (a socket a child creates).
fn wait_path(kid: &mut Kid, path: &Path, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    while !path.exists() {
        if let Some(st) = kid.exited()? {
            bail!("{} exited ({st}) before creating {}{}", kid.name, path.display(), kid.tail());
        }
        if Instant::now() >= deadline {
            bail!("{}: {} not there after {} s{}", kid.name, path.display(), timeout.as_secs(), kid.tail());
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    Ok(())
}

/// A Cloud Hypervisor process running (or about to receive) the test guest.
pub(crate) struct ChVm {
    kid: Kid,
    api: PathBuf,
    /// The leader side of its stdin's terminal: the guest's serial input.
    input: File,
}

impl ChVm {
    /// Starts `cloud-hypervisor -v --api-socket DIR/ch-HOP.api` with its
    /// stdin on a fresh terminal and `args` after.
    fn spawn(bins: &ChBins, dir: &Path, hop: usize, what: &str, args: &[String]) -> Result<ChVm> {
        let api = dir.join(format!("ch-{hop}.api"));
        let _ = std::fs::remove_file(&api);
        let (input, follower) = pty()?;
        let mut c = Command::new(&bins.vmm);
        c.arg("-v").arg("--api-socket").arg(&api).args(args);
        let mut kid = Kid::spawn_with_stdin(what, &mut c, Stdio::from(follower))?;
        wait_path(&mut kid, &api, Duration::from_secs(30))?;
        Ok(ChVm { kid, api, input })
    }

    /// Boots the test guest (`--kernel elf --memory size=M --cpus boot=1
    /// --serial tty --console off`) and waits until its workload runs.
    pub(crate) fn boot(
        bins: &ChBins,
        elf: &Path,
        dir: &Path,
        hop: usize,
        mem: u64,
        cmdline: &str,
        timeout: Duration,
    ) -> Result<ChVm> {
        let args: Vec<String> = vec![
            "--kernel".into(),
            elf.display().to_string(),
            "--cmdline".into(),
            cmdline.into(),
            "--memory".into(),
            format!("size={}M", mib(mem)),
            "--cpus".into(),
            "boot=1".into(),
            "--serial".into(),
            "tty".into(),
            "--console".into(),
            "off".into(),
        ];
        let mut vm = ChVm::spawn(bins, dir, hop, &format!("Cloud Hypervisor ({} MiB)", mib(mem)), &args)?;
        if cmdline.starts_with("dirty") {
            vm.kid.wait_line("MARKED", false, 0, timeout, |l| l.starts_with("MARKED"))?;
        }
        let n = vm.kid.out_len();
        for i in 0..2 {
            vm.kid.wait_line("PROGRESS", false, n + i, timeout, |l| l.starts_with("PROGRESS"))?;
        }
        Ok(vm)
    }

    /// The seq of this process's first (or `last`) PROGRESS line.
    fn seq(&self, last: bool) -> Option<u64> {
        let lines = self.kid.out.lock().unwrap();
        let mut it = lines.iter().filter(|(_, l)| l.starts_with("PROGRESS"));
        let hit = if last { it.next_back() } else { it.next() };
        hit.and_then(|(_, l)| kv(l, "seq"))
    }

    /// Migrates the guest live to a new Cloud Hypervisor over loopback TCP
    /// (`receive-migration receiver_url=tcp:127.0.0.1:PORT`, then
    /// `send-migration destination_url=...,downtime_ms=D`), waits for the
    /// source to exit and returns the destination once the guest printed
    /// PROGRESS there.
    pub(crate) fn migrate_live(
        mut self,
        bins: &ChBins,
        dir: &Path,
        hop: usize,
        downtime_ms: u64,
        timeout: Duration,
    ) -> Result<ChMigrated> {
        let events = dir.join(format!("ch-{hop}.events"));
        let _ = std::fs::remove_file(&events);
        let mut dst = ChVm::spawn(
            bins,
            dir,
            hop,
            "Cloud Hypervisor (destination)",
            &["--event-monitor".into(), format!("path={}", events.display())],
        )?;
        // A free port: bound and released here, then taken by the destination.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let url = format!("tcp:127.0.0.1:{port}");
        let mut recv = Kid::spawn(
            "ch-remote receive-migration",
            Command::new(&bins.remote)
                .arg("--api-socket")
                .arg(&dst.api)
                .arg("receive-migration")
                .arg(format!("receiver_url={url}")),
        )?;
        // The destination reports when it listens; connecting to find out would take its one accept.
        let deadline = Instant::now() + Duration::from_secs(30);
        while !std::fs::read_to_string(&events).unwrap_or_default().contains("migration-receive-ready") {
            if let Some(st) = recv.exited()? {
                bail!("{} ended ({st}) before the destination listened{}{}", recv.name, recv.tail(), dst.kid.tail());
            }
            if Instant::now() >= deadline {
                bail!("the destination did not listen on {url} within 30 s{}", dst.kid.tail());
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        let dst0 = vmm_threads_ns(dst.kid.child.id(), "vcpu");
        let t0 = Instant::now();
        // send-migration returns once the migration has started; the
        // destination's receive-migration returns once it runs the guest.
        bins.remote(
            &self.api,
            &["send-migration", &format!("destination_url={url},downtime_ms={downtime_ms}")],
            timeout,
        )?;
        let rst = recv.finish(timeout)?;
        let total_ms = t0.elapsed().as_secs_f64() * 1e3;
        let dst_sched = match (dst0, vmm_threads_ns(dst.kid.child.id(), "vcpu")) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        if !rst.success() {
            bail!("{} failed ({rst}){}", recv.name, recv.tail());
        }
        // The source gives the guest up and exits.
        let sst = self.kid.finish(Duration::from_secs(30))?;
        if !sst.success() {
            bail!("the source {} exited {sst} after the migration{}", self.kid.name, self.kid.tail());
        }
        let done = self
            .kid
            .find_err(|l| l.contains("Migration completed after"))
            .with_context(|| format!("the source logged no \"Migration completed\"{}", self.kid.tail()))?;
        let pre = self.kid.find_err(|l| l.contains("Precopy complete:")).unwrap_or_default();
        let figures = ChMig { total_ms, ..log_figures(&done, &pre) };
        let n = dst.kid.out_len();
        dst.kid.wait_line("PROGRESS at the destination", false, n, Duration::from_secs(30), |l| {
            l.starts_with("PROGRESS")
        })?;
        let (seq_before, seq_after) = (self.seq(true), dst.seq(false));
        Ok(ChMigrated { vm: dst, figures, dst_sched, seq_before, seq_after })
    }

    /// Asks the guest (serial command `verify`, dirty mode) to check every
    /// page it wrote, then ends the VMM (`ch-remote shutdown-vmm`); true when
    /// it printed VERIFY OK (idle: when it still printed PROGRESS).
    pub(crate) fn shutdown(mut self, bins: &ChBins, verifies: bool, timeout: Duration) -> Result<bool> {
        let n = self.kid.out_len();
        let ok = if verifies {
            self.input.write_all(b"verify\n").context("writing to the guest's serial input")?;
            let (_, _, l) = self.kid.wait_line("VERIFY", false, n, timeout, |l| l.starts_with("VERIFY"))?;
            l.starts_with("VERIFY OK")
        } else {
            self.kid.wait_line("PROGRESS", false, n, Duration::from_secs(30), |l| l.starts_with("PROGRESS")).is_ok()
        };
        let _ = bins.remote(&self.api, &["shutdown-vmm"], Duration::from_secs(30));
        self.kid.finish(Duration::from_secs(30))?;
        Ok(ok)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn figures_from_the_source_log() {
        // Lines as Cloud Hypervisor v53 prints them with -v.
        let done = "cloud-hypervisor:  15.250553s: <migration-worker> INFO:vmm/src/lib.rs:1748 -- \
                    Migration completed after 10.0s with a downtime of 65ms (goal was 300ms)";
        let pre = "cloud-hypervisor:  15.194730s: <migration-worker> INFO:vmm/src/lib.rs:1538 -- Precopy complete: \
                   iter=3 curr=2MiB total=1090MiB bw=236.46MiB/s transfer=0.01s overhead=0ms est_downtime=1ms";
        let f = log_figures(done, pre);
        assert_eq!(f.downtime_ms, 65.0);
        assert_eq!(f.logged_total_s, 10.0);
        assert_eq!(f.sent_mib, 1090.0);
        assert_eq!(f.iterations, 3);
        let none = log_figures("", "");
        assert!(none.downtime_ms.is_nan() && none.sent_mib.is_nan());
        assert_eq!(none.iterations, 0);
    }
}
