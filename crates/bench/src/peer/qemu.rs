//! QEMU, the comparison VMM: started on the same test guest (`-kernel
//! guest.elf`, the ELF ferry embeds), driven over QMP. Snapshots are QEMU
//! migrations to a file (`exec:cat > file`) and restores `-incoming exec:cat
//! file`; live migrations go between two QEMU processes over loopback TCP
//! (`-incoming defer`, `migrate-incoming`, `migrate`), with `query-migrate`
//! polled for QEMU's own total time, downtime and bytes.
//!
//! On PVM hosts QEMU needs `-accel kvm -cpu host,-arch-capabilities` (plain
//! `-cpu host` aborts setting MSR 0x10a).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::Kid;
use crate::probe::host::sched::vmm_threads_ns;
use crate::util::{log, median, mib, shell_quote};

/// One QEMU migration to a file.
#[derive(Serialize, Clone, Debug, Default)]
pub(crate) struct QemuMig {
    pub(crate) status: String,
    pub(crate) total_ms: f64,
    pub(crate) downtime_ms: f64,
    pub(crate) setup_ms: f64,
    pub(crate) transferred: u64,
    pub(crate) normal_pages: u64,
    pub(crate) duplicate_pages: u64,
    pub(crate) dirty_sync_count: u64,
    pub(crate) file_bytes: u64,
    /// Wall time from `migrate` to seeing the final status.
    pub(crate) wall_ms: f64,
    /// Bytes that went over the multifd channels (`ram.multifd-bytes`; 0 without multifd).
    pub(crate) multifd_bytes: u64,
}

/// One QEMU restore from the live migration file.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct QemuRestore {
    /// QEMU spawn to `query-status` reporting running (RAM loaded from the file).
    pub(crate) running_ms: f64,
    /// The guest verified every page on Ctrl-Alt-Del (QEMU exit 1 = guest status 0).
    pub(crate) verified: bool,
}

/// QEMU's side of `ferry bench snapshot` at one memory size.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct QemuFigures {
    pub(crate) version: String,
    pub(crate) mem_mib: u64,
    pub(crate) live: Vec<QemuMig>,
    pub(crate) downtime_ms_median: f64,
    pub(crate) total_ms_median: f64,
    pub(crate) file_bytes: u64,
    pub(crate) stop_world: QemuMig,
    /// With downtime-limit 5 ms (ferry's budget): bounded attempt.
    pub(crate) tight: QemuMig,
    pub(crate) restore: Vec<QemuRestore>,
}

/// A QMP connection.
pub(crate) struct Qmp {
    pub(crate) r: BufReader<UnixStream>,
    pub(crate) w: UnixStream,
}

impl Qmp {
    /// Connects to QEMU's QMP socket (retrying until it is up or `timeout`
    /// passes) and negotiates capabilities.
    pub(crate) fn connect(sock: &Path, kid: &mut Kid, timeout: Duration) -> Result<Qmp> {
        let deadline = Instant::now() + timeout;
        let s = loop {
            if let Ok(s) = UnixStream::connect(sock) {
                break s;
            }
            if let Some(st) = kid.exited()? {
                bail!("{} exited ({st}) before its QMP socket accepted{}", kid.name, kid.tail());
            }
            if Instant::now() >= deadline {
                bail!(
                    "{}: QMP socket {} not up within {} s{}",
                    kid.name,
                    sock.display(),
                    timeout.as_secs(),
                    kid.tail()
                );
            }
            std::thread::sleep(Duration::from_millis(1));
        };
        s.set_read_timeout(Some(Duration::from_secs(60)))?;
        let mut q = Qmp { r: BufReader::new(s.try_clone()?), w: s };
        let mut greeting = String::new();
        q.r.read_line(&mut greeting).context("reading the QMP greeting")?;
        q.cmd("qmp_capabilities", serde_json::Value::Null)?;
        Ok(q)
    }

    /// Runs one QMP command and returns its `return` value, skipping events.
    pub(crate) fn cmd(&mut self, name: &str, args: serde_json::Value) -> Result<serde_json::Value> {
        let mut m = serde_json::json!({ "execute": name });
        if !args.is_null() {
            m["arguments"] = args;
        }
        writeln!(self.w, "{m}").with_context(|| format!("sending QMP {name}"))?;
        loop {
            let mut line = String::new();
            if self.r.read_line(&mut line).with_context(|| format!("reading the QMP reply to {name}"))? == 0 {
                bail!("QMP connection closed while waiting for the reply to {name}");
            }
            let v: serde_json::Value = serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
            if v.get("event").is_some() {
                continue;
            }
            if let Some(e) = v.get("error") {
                bail!("QMP {name} failed: {e}");
            }
            return Ok(v["return"].clone());
        }
    }
}

/// The QEMU command line for the test guest: one vCPU, no devices but the
/// serial port (to a file) and the exit port ferry's guest writes its status to.
pub(crate) fn qemu_cmd(qemu: &str, elf: &Path, mem: u64, cmdline: &str, serial: &Path, qmp: &Path) -> Command {
    let mut c = Command::new(qemu);
    c.args(["-accel", "kvm", "-cpu", "host,-arch-capabilities", "-m", &mib(mem).to_string(), "-smp", "1"])
        .args(["-nodefaults", "-display", "none", "-no-reboot", "-kernel"])
        .arg(elf)
        .args(["-append", cmdline, "-serial"])
        .arg(format!("file:{}", serial.display()))
        .arg("-qmp")
        .arg(format!("unix:{},server=on,wait=off", qmp.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=1"]);
    c
}

/// Starts `migrate` to `uri` and polls query-migrate until it ends; on
/// timeout cancels it. Returns the last figures, whether it was cancelled
/// and the wall time from `migrate` to the end.
fn migrate_and_poll(
    q: &mut Qmp,
    uri: &str,
    timeout: Duration,
    poll: Duration,
) -> Result<(serde_json::Value, bool, f64)> {
    let t = Instant::now();
    q.cmd("migrate", serde_json::json!({ "uri": uri }))?;
    let deadline = t + timeout;
    let mut cancelled = false;
    let mut last_active = serde_json::Value::Null;
    let v = loop {
        let v = q.cmd("query-migrate", serde_json::Value::Null)?;
        let st = v["status"].as_str().unwrap_or("");
        if matches!(st, "completed" | "failed" | "cancelled") {
            // A cancelled migration reports no figures: keep the last ones seen.
            break if st == "completed" || last_active.is_null() { v } else { last_active };
        }
        if v.get("ram").is_some() {
            last_active = v;
        }
        if Instant::now() >= deadline && !cancelled {
            q.cmd("migrate_cancel", serde_json::Value::Null)?;
            cancelled = true;
        }
        if Instant::now() >= deadline + Duration::from_secs(30) {
            bail!("QEMU migration neither ended nor cancelled {} s after the deadline", 30);
        }
        std::thread::sleep(poll);
    };
    Ok((v, cancelled, t.elapsed().as_secs_f64() * 1e3))
}

/// QEMU's figures from a final query-migrate answer `v`.
fn figures(v: &serde_json::Value, status: String, file_bytes: u64, wall_ms: f64) -> QemuMig {
    let f = |k: &str| v[k].as_f64().unwrap_or(f64::NAN);
    let ram = &v["ram"];
    let u = |k: &str| ram[k].as_u64().unwrap_or(0);
    QemuMig {
        status,
        total_ms: f("total-time"),
        downtime_ms: f("downtime"),
        setup_ms: f("setup-time"),
        transferred: u("transferred"),
        normal_pages: u("normal"),
        duplicate_pages: u("duplicate"),
        dirty_sync_count: u("dirty-sync-count"),
        file_bytes,
        wall_ms,
        multifd_bytes: u("multifd-bytes"),
    }
}

/// Migrates to `uri` (a file through `exec:cat`) and polls query-migrate
/// until it ends; on timeout cancels it.
pub(crate) fn qemu_migrate(q: &mut Qmp, uri: &str, file: &Path, timeout: Duration) -> Result<QemuMig> {
    let _ = std::fs::remove_file(file);
    let (v, cancelled, wall_ms) = migrate_and_poll(q, uri, timeout, Duration::from_millis(2))?;
    // `cat` may still be writing: wait until the file stops growing.
    let mut size = 0;
    let stable_deadline = Instant::now() + Duration::from_secs(30);
    loop {
        std::thread::sleep(Duration::from_millis(100));
        let s = std::fs::metadata(file).map(|m| m.len()).unwrap_or(0);
        if s == size || Instant::now() >= stable_deadline {
            break;
        }
        size = s;
    }
    let final_status = q.cmd("query-migrate", serde_json::Value::Null)?["status"].as_str().unwrap_or("?").to_string();
    let status = if cancelled {
        format!("not completed within {} s (then cancelled: {final_status})", timeout.as_secs())
    } else {
        final_status
    };
    Ok(figures(&v, status, size, wall_ms))
}

/// Waits until `serial` (QEMU's serial file) has `n` lines starting with `what`.
pub(crate) fn wait_serial(kid: &mut Kid, serial: &Path, what: &str, n: usize, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let s = std::fs::read_to_string(serial).unwrap_or_default();
        if s.lines().filter(|l| l.starts_with(what)).count() >= n {
            return Ok(());
        }
        if let Some(st) = kid.exited()? {
            bail!("{} exited ({st}) before its serial showed {n} {what} line(s){}", kid.name, kid.tail());
        }
        if Instant::now() >= deadline {
            bail!("{}: no {n} {what} line(s) on its serial within {} s{}", kid.name, timeout.as_secs(), kid.tail());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// QEMU's side of `ferry bench snapshot` at `mem`: `runs` live migrations
/// to a file (downtime-limit 300 ms), one stop-the-world, one bounded try with
/// ferry's 5 ms budget, and `restore_runs` restores from the live file.
pub(crate) fn snapshot_figures(
    qemu: &str,
    runs: u32,
    wss_mib: u64,
    restore_runs: u32,
    dir: &Path,
    mem: u64,
    timeout: Duration,
) -> Result<QemuFigures> {
    let version = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {} --version (install it: apt-get install -y qemu-system-x86)", qemu))?;
    let version = String::from_utf8_lossy(&version.stdout).lines().next().unwrap_or("").to_string();
    let elf = dir.join("guest.elf");
    std::fs::write(&elf, ferry_guest::ELF)?;
    let cmdline = format!("dirty wss={} rate=max report=500", wss_mib);
    let (serial, qmp_sock) = (dir.join("qemu-serial.txt"), dir.join("qemu-qmp.sock"));
    let _ = std::fs::remove_file(&qmp_sock);
    log(format!("QEMU: booting the test guest, {} MiB, {cmdline:?}", mib(mem)));
    let mut kid =
        Kid::spawn(&format!("QEMU ({} MiB)", mib(mem)), &mut qemu_cmd(qemu, &elf, mem, &cmdline, &serial, &qmp_sock))?;
    let mut q = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
    wait_serial(&mut kid, &serial, "MARKED", 1, timeout)?;
    wait_serial(&mut kid, &serial, "PROGRESS", 2, timeout)?;
    // No bandwidth cap (QEMU 7.2 defaults to 128 MiB/s); QEMU's default downtime limit.
    q.cmd("migrate-set-parameters", serde_json::json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": 300 }))?;
    let file = dir.join("qemu-mig.bin");
    let uri = format!("exec:cat > {}", shell_quote(&file));
    let mut live = Vec::new();
    for i in 0..runs {
        let m = qemu_migrate(&mut q, &uri, &file, timeout)?;
        if !m.status.starts_with("completed") {
            bail!("QEMU migration to a file ended {}", m.status);
        }
        log(format!(
            "  QEMU live {}/{}: downtime {:.0} ms, total {:.0} ms, {} MiB, {} syncs",
            i + 1,
            runs,
            m.downtime_ms,
            m.total_ms,
            mib(m.file_bytes),
            m.dirty_sync_count
        ));
        live.push(m);
        q.cmd("cont", serde_json::Value::Null)?; // the source stops after a completed migration
        std::thread::sleep(Duration::from_millis(500));
    }
    let keep = dir.join("qemu-live.bin");
    std::fs::rename(&file, &keep)?;
    q.cmd("stop", serde_json::Value::Null)?;
    let stop_world = qemu_migrate(&mut q, &uri, &file, timeout)?;
    q.cmd("cont", serde_json::Value::Null)?;
    log(format!("  QEMU stop-the-world: total {:.0} ms ({})", stop_world.total_ms, stop_world.status));
    let _ = std::fs::remove_file(&file);
    std::thread::sleep(Duration::from_millis(500));
    q.cmd("migrate-set-parameters", serde_json::json!({ "downtime-limit": 5 }))?;
    let tight = qemu_migrate(&mut q, &uri, &file, Duration::from_secs(20))?;
    log(format!(
        "  QEMU with downtime-limit 5 ms: {} after {:.0} ms, {} syncs",
        tight.status, tight.wall_ms, tight.dirty_sync_count
    ));
    if tight.status.starts_with("completed") {
        q.cmd("cont", serde_json::Value::Null)?;
    }
    let _ = std::fs::remove_file(&file);
    let _ = q.cmd("quit", serde_json::Value::Null);
    kid.finish(Duration::from_secs(30))?;
    drop(q);

    let mut restore = Vec::new();
    for i in 0..restore_runs.max(1) {
        let _ = std::fs::remove_file(&qmp_sock);
        let mut c = qemu_cmd(qemu, &elf, mem, &cmdline, &serial, &qmp_sock);
        c.arg("-incoming").arg(format!("exec:cat {}", shell_quote(&keep)));
        let mut kid = Kid::spawn("QEMU -incoming", &mut c)?;
        let mut q = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
        let deadline = Instant::now() + timeout;
        loop {
            let v = q.cmd("query-status", serde_json::Value::Null)?;
            if v["status"] == "running" {
                break;
            }
            if Instant::now() >= deadline {
                bail!("QEMU -incoming: not running {} s after start (status {})", timeout.as_secs(), v["status"]);
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let running_ms = kid.spawned.elapsed().as_secs_f64() * 1e3;
        std::thread::sleep(Duration::from_millis(500));
        let keys: Vec<serde_json::Value> =
            ["ctrl", "alt", "delete"].iter().map(|k| serde_json::json!({"type": "qcode", "data": k})).collect();
        q.cmd("send-key", serde_json::json!({ "keys": keys }))?;
        let st = kid.finish(timeout)?;
        let verified =
            st.code() == Some(1) && std::fs::read_to_string(&serial).unwrap_or_default().contains("VERIFY OK");
        log(format!(
            "  QEMU restore {}/{}: running after {running_ms:.0} ms, verified {verified}",
            i + 1,
            restore_runs
        ));
        restore.push(QemuRestore { running_ms, verified });
    }
    let _ = std::fs::remove_file(&keep);
    Ok(QemuFigures {
        version,
        mem_mib: mib(mem),
        downtime_ms_median: median(&live.iter().map(|m| m.downtime_ms).collect::<Vec<_>>()),
        total_ms_median: median(&live.iter().map(|m| m.total_ms).collect::<Vec<_>>()),
        file_bytes: live.last().map(|m| m.file_bytes).unwrap_or(0),
        live,
        stop_world,
        tight,
        restore,
    })
}

/// The first line of `qemu --version`; fails (with how to install it) when
/// QEMU is not there.
pub(crate) fn version(qemu: &str) -> Result<String> {
    let v = Command::new(qemu)
        .arg("--version")
        .output()
        .with_context(|| format!("running {qemu} --version (install it: apt-get install -y qemu-system-x86)"))?;
    Ok(String::from_utf8_lossy(&v.stdout).lines().next().unwrap_or("").to_string())
}

/// What [`QemuVm::migrate_live`] returns.
pub(crate) struct Migrated {
    /// The destination, now running the guest.
    pub(crate) vm: QemuVm,
    /// QEMU's own figures of the migration.
    pub(crate) figures: QemuMig,
    /// (CPU ns, run-queue wait ns) of the destination's non-vCPU threads during it.
    pub(crate) dst_sched: Option<(u64, u64)>,
    /// The last PROGRESS seq the source printed and the first the destination
    /// printed: the second must follow the first.
    pub(crate) seq_before: Option<u64>,
    pub(crate) seq_after: Option<u64>,
}

/// Whether the guest's PROGRESS sequence went on across one switch: the
/// destination's first seq follows the source's last (+1, or +2 when the
/// line printed around the pause was lost).
pub(crate) fn seq_continues(before: Option<u64>, after: Option<u64>) -> bool {
    matches!((before, after), (Some(b), Some(a)) if a > b && a <= b + 2)
}

/// The seq of the first (or `last`) complete PROGRESS line in `text` (a
/// serial log; a line still being written is ignored, its number may be cut).
pub(crate) fn serial_seq(text: &str, last: bool) -> Option<u64> {
    let done = text.rfind('\n').map_or("", |i| &text[..i]);
    let mut it = done.lines().filter(|l| l.starts_with("PROGRESS"));
    let hit = if last { it.next_back() } else { it.next() };
    hit.and_then(|l| crate::util::kv(l, "seq"))
}

/// Turns multifd on with `channels` page channels (`migrate-set-capabilities`
/// and `migrate-set-parameters`); both ends need it before the migration starts.
fn set_multifd(q: &mut Qmp, channels: u32) -> Result<()> {
    q.cmd(
        "migrate-set-capabilities",
        serde_json::json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
    )?;
    q.cmd("migrate-set-parameters", serde_json::json!({ "multifd-channels": channels }))?;
    Ok(())
}

/// A QEMU process running the test guest, with its QMP connection and its
/// serial file (one per process: a destination writes its own).
pub(crate) struct QemuVm {
    kid: Kid,
    qmp: Qmp,
    serial: PathBuf,
    mem: u64,
    cmdline: String,
}

impl QemuVm {
    /// Boots the test guest and waits until its workload runs (memory marked
    /// in dirty mode, two PROGRESS lines).
    pub(crate) fn boot(
        qemu: &str,
        elf: &Path,
        dir: &Path,
        hop: usize,
        mem: u64,
        cmdline: &str,
        timeout: Duration,
    ) -> Result<QemuVm> {
        let (serial, qmp_sock) = (dir.join(format!("qemu-{hop}.serial")), dir.join(format!("qemu-{hop}.qmp")));
        let _ = std::fs::remove_file(&qmp_sock);
        let mut kid = Kid::spawn(
            &format!("QEMU ({} MiB)", mib(mem)),
            &mut qemu_cmd(qemu, elf, mem, cmdline, &serial, &qmp_sock),
        )?;
        let qmp = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
        if cmdline.starts_with("dirty") {
            wait_serial(&mut kid, &serial, "MARKED", 1, timeout)?;
        }
        wait_serial(&mut kid, &serial, "PROGRESS", 2, timeout)?;
        Ok(QemuVm { kid, qmp, serial, mem, cmdline: cmdline.to_string() })
    }

    /// Migrates the guest live to a new QEMU (`-incoming defer`,
    /// `migrate-incoming tcp:127.0.0.1:PORT`) with `downtime_limit_ms` and no
    /// bandwidth cap (QEMU 7.2 defaults to 128 MiB/s), over `multifd_channels`
    /// multifd channels (0: QEMU's default single stream), quits this one and
    /// returns the destination once the guest printed PROGRESS there, with
    /// the destination's non-vCPU CPU and run-queue time (ns) during it.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn migrate_live(
        mut self,
        qemu: &str,
        elf: &Path,
        dir: &Path,
        hop: usize,
        downtime_limit_ms: u64,
        multifd_channels: u32,
        timeout: Duration,
    ) -> Result<Migrated> {
        let (serial, qmp_sock) = (dir.join(format!("qemu-{hop}.serial")), dir.join(format!("qemu-{hop}.qmp")));
        let _ = std::fs::remove_file(&qmp_sock);
        let mut c = qemu_cmd(qemu, elf, self.mem, &self.cmdline, &serial, &qmp_sock);
        c.args(["-incoming", "defer"]);
        let mut kid = Kid::spawn(&format!("QEMU -incoming ({} MiB)", mib(self.mem)), &mut c)?;
        let mut qmp = Qmp::connect(&qmp_sock, &mut kid, Duration::from_secs(30))?;
        // A free port: bound and released here, then taken by QEMU.
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let uri = format!("tcp:127.0.0.1:{port}");
        if multifd_channels > 0 {
            set_multifd(&mut qmp, multifd_channels)?;
            set_multifd(&mut self.qmp, multifd_channels)?;
        }
        qmp.cmd("migrate-incoming", serde_json::json!({ "uri": uri }))?;
        self.qmp.cmd(
            "migrate-set-parameters",
            serde_json::json!({ "max-bandwidth": 100u64 << 30, "downtime-limit": downtime_limit_ms }),
        )?;
        // Polled every 10 ms: QMP commands take QEMU's main-loop lock, which the
        // migration's last phase needs too.
        let dst0 = vmm_threads_ns(kid.child.id(), "CPU ");
        let (v, cancelled, wall_ms) = migrate_and_poll(&mut self.qmp, &uri, timeout, Duration::from_millis(10))?;
        let sched = match (dst0, vmm_threads_ns(kid.child.id(), "CPU ")) {
            (Some(a), Some(b)) => Some((b.0.saturating_sub(a.0), b.1.saturating_sub(a.1))),
            _ => None,
        };
        let status = v["status"].as_str().unwrap_or("?").to_string();
        if cancelled || status != "completed" {
            bail!("QEMU migration to {uri} ended {status} (cancelled after {} s: {cancelled})", timeout.as_secs());
        }
        let m = figures(&v, status, 0, wall_ms);
        let _ = self.qmp.cmd("quit", serde_json::Value::Null);
        self.kid.finish(Duration::from_secs(30))?;
        wait_serial(&mut kid, &serial, "PROGRESS", 1, Duration::from_secs(30))?;
        // The source has exited, so its serial file is complete.
        let seq_before = serial_seq(&std::fs::read_to_string(&self.serial).unwrap_or_default(), true);
        // The destination's first PROGRESS line may still be arriving.
        let deadline = Instant::now() + Duration::from_secs(30);
        let seq_after = loop {
            let s = serial_seq(&std::fs::read_to_string(&serial).unwrap_or_default(), false);
            if s.is_some() || Instant::now() >= deadline {
                break s;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        let vm = QemuVm { kid, qmp, serial, mem: self.mem, cmdline: self.cmdline.clone() };
        Ok(Migrated { vm, figures: m, dst_sched: sched, seq_before, seq_after })
    }

    /// Ctrl-Alt-Del through QMP; true when the guest exited 0 (QEMU exit 1)
    /// and, if it `verifies` (dirty mode), printed VERIFY OK.
    pub(crate) fn shutdown(mut self, verifies: bool, timeout: Duration) -> Result<bool> {
        let keys: Vec<serde_json::Value> =
            ["ctrl", "alt", "delete"].iter().map(|k| serde_json::json!({"type": "qcode", "data": k})).collect();
        self.qmp.cmd("send-key", serde_json::json!({ "keys": keys }))?;
        let st = self.kid.finish(timeout)?;
        let out = std::fs::read_to_string(&self.serial).unwrap_or_default();
        Ok(st.code() == Some(1) && (!verifies || out.contains("VERIFY OK")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_across_a_switch() {
        let log = "INFO x\nPROGRESS seq=4 passes=0\nMARKED\nPROGRESS seq=7 passes=1\n";
        assert_eq!(serial_seq(log, false), Some(4));
        assert_eq!(serial_seq(log, true), Some(7));
        assert_eq!(serial_seq("no lines", true), None);
        assert_eq!(serial_seq("PROGRESS seq=1", false), None, "a line still being written");
        assert_eq!(serial_seq("PROGRESS seq=3\nPROGRESS seq=4", true), Some(3));
        assert!(seq_continues(Some(7), Some(8)));
        assert!(seq_continues(Some(7), Some(9)));
        assert!(!seq_continues(Some(7), Some(7)));
        assert!(!seq_continues(Some(7), Some(10)));
        assert!(!seq_continues(None, Some(1)));
    }
}
