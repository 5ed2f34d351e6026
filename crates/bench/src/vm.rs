//! The system under test: `ferry run` (or `ferry receive`) of the test guest
//! in a child process with an API socket, its serial output read line by line.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Result;

use crate::child::{ferry_exe, ferry_json, Kid, Lines, TEST_GUEST};
use crate::util::{kv, mib};

/// A guest PROGRESS line.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Progress {
    pub(crate) at: Instant,
    pub(crate) pages: u64,
    pub(crate) passes: u64,
    pub(crate) tsc: u64,
}

/// The PROGRESS lines among `lines`, with their arrival times.
pub(crate) fn progress_of(lines: &Lines) -> Vec<Progress> {
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

/// A ferry process running the test guest, with an API socket.
pub(crate) struct FerryVm {
    pub(crate) kid: Kid,
    pub(crate) sock: PathBuf,
    pub(crate) tsc_khz: u64,
}

impl FerryVm {
    /// Boots `dirty wss=<wss_mib> rate=<rate> report=100` (the snapshot bench's guest).
    pub(crate) fn boot(dir: &Path, mem: u64, wss_mib: u64, rate: &str, timeout: Duration) -> Result<FerryVm> {
        let sock = dir.join(format!("vm-{}m-{rate}.sock", mib(mem)));
        let cmdline = format!("dirty wss={wss_mib} rate={rate} report=100");
        FerryVm::boot_cmdline(&sock, mem, &cmdline, timeout)
    }

    /// Boots the test guest with `cmdline` and waits until it runs its
    /// workload: memory marked (dirty mode) and two PROGRESS lines seen.
    pub(crate) fn boot_cmdline(sock: &Path, mem: u64, cmdline: &str, timeout: Duration) -> Result<FerryVm> {
        let _ = std::fs::remove_file(sock);
        let mut kid = Kid::spawn(
            &format!("ferry run ({} MiB, {cmdline:?})", mib(mem)),
            Command::new(ferry_exe()?)
                .args(["run", "--kernel", TEST_GUEST, "--mem", &format!("{}M", mib(mem))])
                .args(["--cmdline", cmdline, "--serial", "stdio", "--api-sock"])
                .arg(sock),
        )?;
        let (_, _, boot) = kid.wait_line("its boot line", false, 0, timeout, |l| l.starts_with("FERRY-GUEST boot"))?;
        let tsc_khz = kv(&boot, "tsc_khz").unwrap_or(0);
        if boot.contains("mode=dirty") {
            kid.wait_line("MARKED (memory populated)", false, 0, timeout, |l| l.starts_with("MARKED"))?;
        }
        let (i, _, _) = kid.wait_line("a PROGRESS line", false, 0, timeout, |l| l.starts_with("PROGRESS"))?;
        kid.wait_line("a second PROGRESS line", false, i + 1, timeout, |l| l.starts_with("PROGRESS"))?;
        Ok(FerryVm { kid, sock: sock.to_path_buf(), tsc_khz })
    }

    /// Guest page stores per second between two PROGRESS lines (guest TSC).
    pub(crate) fn rate_between(&self, a: &Progress, b: &Progress) -> Option<f64> {
        let secs = b.tsc.checked_sub(a.tsc)? as f64 / (self.tsc_khz as f64 * 1e3);
        (secs > 0.0 && self.tsc_khz > 0).then(|| b.pages.saturating_sub(a.pages) as f64 / secs)
    }

    /// Guest store rate over the PROGRESS lines that arrived within [from, to].
    pub(crate) fn rate_in(&self, from: Instant, to: Instant) -> Option<f64> {
        let p: Vec<Progress> = progress_of(&self.kid.out).into_iter().filter(|p| p.at >= from && p.at <= to).collect();
        self.rate_between(p.first()?, p.last()?)
    }

    /// Passes over the working set the guest completed between two instants
    /// (a lower bound: from the first PROGRESS line after `from` to the last before `to`).
    pub(crate) fn passes_between(&self, from: Option<Instant>, to: Option<Instant>) -> Option<u64> {
        let (from, to) = (from?, to?);
        let p = progress_of(&self.kid.out);
        let a = p.iter().find(|p| p.at >= from)?;
        let b = p.iter().rev().find(|p| p.at <= to)?;
        Some(if a.at <= b.at { b.passes.saturating_sub(a.passes) } else { 0 })
    }

    /// Guest store rate from the last PROGRESS line before `t0` to the first after `t1`.
    pub(crate) fn rate_around(&self, t0: Instant, t1: Instant) -> Option<f64> {
        let p = progress_of(&self.kid.out);
        let a = p.iter().rev().find(|p| p.at <= t0)?;
        let b = p.iter().find(|p| p.at >= t1)?;
        self.rate_between(a, b)
    }

    /// Ctrl-Alt-Del: the dirty-mode guest verifies every page and exits 0 when all are right.
    pub(crate) fn shutdown(mut self, timeout: Duration) -> Result<bool> {
        let _ = ferry_json(&["shutdown", "--api-sock", &self.sock.to_string_lossy(), "--timeout-ms", "20000"]);
        let st = self.kid.finish(timeout)?;
        let ok = st.code() == Some(0) && Kid::text(&self.kid.out).contains("VERIFY OK");
        if !ok {
            eprintln!("bench: {} ended with {st} without VERIFY OK{}", self.kid.name, self.kid.tail());
        }
        Ok(ok)
    }
}
