//! `ferry bench mount`: reading `core.elf` through `ferry image mount`
//! against reading the same bytes from the file `ferry image export` wrote,
//! cold (page cache of the files dropped; nothing decoded yet) and warm
//! (read again), in MB/s, with the export's own time and the mount's memory.

use std::io::Read;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, ferry_ok, Kid};
use crate::util::{log, median, mib};
use crate::vm::FerryVm;

/// Options of `ferry bench mount`.
#[derive(clap::Args, Debug, Clone)]
pub struct MountBenchArgs {
    /// Guest memory (filled with incompressible `fill=random` pages).
    #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mem: u64,
    /// Cold and warm reads per side (figures are medians).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: u32,
    /// Directory for the image, the export and the mount point (a temporary
    /// directory is made inside it). Default: the system temp directory.
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Upper bound for any single wait, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One round of reads.
#[derive(Serialize, Debug, Clone)]
pub(crate) struct MountRun {
    export_cold_mb_s: f64,
    export_warm_mb_s: f64,
    mount_cold_mb_s: f64,
    mount_warm_mb_s: f64,
    /// CPU time (user + system) the mount process spent serving the cold read: a figure
    /// the shared machine's load distorts less than the wall-clock rate.
    mount_cold_cpu_s: f64,
    /// Peak resident memory of the `ferry image mount` process.
    mount_peak_rss_mib: f64,
    /// Windows the mount decoded, and served from its cache, during this round.
    mount_cache_misses: u64,
    mount_cache_hits: u64,
}

/// The figures.
#[derive(Serialize, Debug)]
pub(crate) struct MountBench {
    guest_mib: u64,
    image_bytes: u64,
    core_elf_bytes: u64,
    /// `ferry image export --format elf` of the whole image.
    export_secs: f64,
    /// Whether the mounted core.elf equals the exported file byte for byte.
    identical: bool,
    runs: Vec<MountRun>,
    median_export_cold_mb_s: f64,
    median_export_warm_mb_s: f64,
    median_mount_cold_mb_s: f64,
    median_mount_warm_mb_s: f64,
    /// Mount cold / export cold.
    cold_ratio: f64,
    /// Mount warm / export warm.
    warm_ratio: f64,
}

/// Drops `path`'s pages from the page cache (after writing back), so the next read is cold.
fn drop_cache(path: &Path) -> Result<()> {
    let f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    f.sync_all().ok();
    // SAFETY: a valid descriptor; fadvise only gives advice about its pages.
    let rc = unsafe { libc::posix_fadvise(f.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
    if rc != 0 {
        bail!("posix_fadvise({}): {}", path.display(), std::io::Error::from_raw_os_error(rc));
    }
    Ok(())
}

/// Reads `path` to the end in 1 MiB reads; MB/s.
fn read_all(path: &Path) -> Result<f64> {
    let mut f = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut buf = vec![0u8; 1 << 20];
    let t = Instant::now();
    let mut n = 0u64;
    loop {
        let k = f.read(&mut buf).with_context(|| format!("reading {}", path.display()))?;
        if k == 0 {
            break;
        }
        n += k as u64;
    }
    Ok(n as f64 / t.elapsed().as_secs_f64() / 1e6)
}

/// Whether two files have the same bytes.
fn same_bytes(a: &Path, b: &Path) -> Result<bool> {
    let (mut fa, mut fb) = (std::fs::File::open(a)?, std::fs::File::open(b)?);
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    loop {
        let ka = read_full(&mut fa, &mut ba)?;
        let kb = read_full(&mut fb, &mut bb)?;
        if ka != kb || ba[..ka] != bb[..kb] {
            return Ok(false);
        }
        if ka == 0 {
            return Ok(true);
        }
    }
}

fn read_full(f: &mut std::fs::File, buf: &mut [u8]) -> Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        let k = f.read(&mut buf[n..])?;
        if k == 0 {
            break;
        }
        n += k;
    }
    Ok(n)
}

/// Peak resident set (VmHWM) of a process, in MiB.
fn peak_rss_mib(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with("VmHWM:")).map(str::to_string))
        .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse::<f64>().ok()))
        .map(|kib| kib / 1024.0)
        .unwrap_or(f64::NAN)
}

/// User + system CPU seconds of a process so far (NaN if unreadable).
fn cpu_secs(pid: u32) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let tck = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            // Fields after the command name (which may contain spaces) start at ") ".
            let rest = s.rsplit_once(") ")?.1.split_whitespace().collect::<Vec<_>>();
            let (u, k): (f64, f64) = (rest.get(11)?.parse().ok()?, rest.get(12)?.parse().ok()?);
            Some((u + k) / tck)
        })
        .unwrap_or(f64::NAN)
}

/// A running `ferry image mount`, unmounted (lazily) and reaped on drop.
struct MountKid {
    kid: Kid,
    dir: PathBuf,
}

impl MountKid {
    fn start(img: &Path, dir: &Path, timeout: Duration) -> Result<MountKid> {
        std::fs::create_dir_all(dir)?;
        let kid = Kid::spawn(
            "ferry image mount",
            Command::new(ferry_exe()?).args(["image", "mount"]).arg(img).arg(dir).arg("--json"),
        )?;
        let mut m = MountKid { kid, dir: dir.to_path_buf() };
        let deadline = Instant::now() + timeout;
        while !dir.join("core.elf").exists() {
            if let Some(st) = m.kid.exited()? {
                bail!("ferry image mount exited ({st}) before mounting{}", m.kid.tail());
            }
            if Instant::now() >= deadline {
                bail!("the mount did not appear within {} s", timeout.as_secs());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(m)
    }

    /// Unmounts and returns the mount's JSON report.
    fn finish(mut self, timeout: Duration) -> Result<serde_json::Value> {
        let st = Command::new("fusermount3").args(["-u", "--"]).arg(&self.dir).status()?;
        if !st.success() {
            bail!("fusermount3 -u {}: {st}", self.dir.display());
        }
        self.kid.finish(timeout)?;
        let text = Kid::text(&self.kid.out);
        serde_json::from_str(text.trim()).with_context(|| format!("the mount's report: {text}"))
    }
}

impl Drop for MountKid {
    fn drop(&mut self) {
        if matches!(self.kid.exited(), Ok(None)) {
            let _ = Command::new("fusermount3").args(["-u", "-z", "--"]).arg(&self.dir).status();
        }
    }
}

/// Runs the benchmark.
pub(crate) fn mount_bench(a: MountBenchArgs) -> Result<u8> {
    let timeout = Duration::from_secs(a.timeout_s);
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new().prefix("ferry-bench-mount-").tempdir_in(&base)?;
    let dir = tmp.path();
    log(format!("booting a {} MiB fill=random guest", mib(a.mem)));
    let sock = dir.join("vm.sock");
    let wss = mib(a.mem).min(64);
    let vm = FerryVm::boot_cmdline(&sock, a.mem, &format!("dirty wss={wss} rate=max report=100 fill=random"), timeout)?;
    let img = dir.join("guest.img");
    let sock_s = sock.to_string_lossy().to_string();
    ferry_json(&["snapshot", "--api-sock", &sock_s, "--out", &img.to_string_lossy(), "--json"])?;
    drop(vm);
    let core = dir.join("core.elf");
    let t = Instant::now();
    ferry_ok(&["image", "export", &img.to_string_lossy(), "--format", "elf", "--out", &core.to_string_lossy()])?;
    let export_secs = t.elapsed().as_secs_f64();
    log(format!("exported core.elf in {export_secs:.2} s"));

    let mnt = dir.join("mnt");
    let mut runs = Vec::new();
    let mut identical = true;
    for i in 0..a.runs.max(1) {
        drop_cache(&core)?;
        let export_cold = read_all(&core)?;
        let export_warm = read_all(&core)?;
        drop_cache(&img)?;
        let m = MountKid::start(&img, &mnt, timeout)?;
        let mounted = mnt.join("core.elf");
        let cpu0 = cpu_secs(m.kid.child.id());
        let mount_cold = read_all(&mounted)?;
        let mount_cold_cpu = cpu_secs(m.kid.child.id()) - cpu0;
        let mount_warm = read_all(&mounted)?;
        if i == 0 {
            identical = same_bytes(&mounted, &core)?;
        }
        let rss = peak_rss_mib(m.kid.child.id());
        let report = m.finish(timeout)?;
        let cache = &report["reads"]["cache"];
        runs.push(MountRun {
            export_cold_mb_s: export_cold,
            export_warm_mb_s: export_warm,
            mount_cold_mb_s: mount_cold,
            mount_warm_mb_s: mount_warm,
            mount_cold_cpu_s: mount_cold_cpu,
            mount_peak_rss_mib: rss,
            mount_cache_misses: cache["misses"].as_u64().unwrap_or(0),
            mount_cache_hits: cache["hits"].as_u64().unwrap_or(0),
        });
        log(format!(
            "run {i}: export cold {export_cold:.0} warm {export_warm:.0} MB/s; mount cold {mount_cold:.0} warm {mount_warm:.0} MB/s, cold read cost the mount {mount_cold_cpu:.2} s CPU"
        ));
    }
    let med = |f: fn(&MountRun) -> f64| median(&runs.iter().map(f).collect::<Vec<_>>());
    let b = MountBench {
        guest_mib: mib(a.mem),
        image_bytes: std::fs::metadata(&img)?.len(),
        core_elf_bytes: std::fs::metadata(&core)?.len(),
        export_secs,
        identical,
        median_export_cold_mb_s: med(|r| r.export_cold_mb_s),
        median_export_warm_mb_s: med(|r| r.export_warm_mb_s),
        median_mount_cold_mb_s: med(|r| r.mount_cold_mb_s),
        median_mount_warm_mb_s: med(|r| r.mount_warm_mb_s),
        cold_ratio: med(|r| r.mount_cold_mb_s) / med(|r| r.export_cold_mb_s),
        warm_ratio: med(|r| r.mount_warm_mb_s) / med(|r| r.export_warm_mb_s),
        runs,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        println!(
            "ferry bench mount ({} MiB fill=random guest, core.elf {} MiB, {} runs)",
            b.guest_mib,
            mib(b.core_elf_bytes),
            b.runs.len()
        );
        println!("  export (ferry image export --format elf): {:.2} s", b.export_secs);
        println!(
            "  read exported core.elf: cold {:.0} MB/s, warm {:.0} MB/s",
            b.median_export_cold_mb_s, b.median_export_warm_mb_s
        );
        println!(
            "  read mounted core.elf:  cold {:.0} MB/s, warm {:.0} MB/s",
            b.median_mount_cold_mb_s, b.median_mount_warm_mb_s
        );
        println!(
            "  mount / export: cold {:.2}x, warm {:.2}x; identical bytes: {}",
            b.cold_ratio, b.warm_ratio, b.identical
        );
        let cpu = median(&b.runs.iter().map(|r| r.mount_cold_cpu_s).collect::<Vec<_>>());
        println!(
            "  mount CPU for one cold read: {cpu:.2} s ({:.0} MB per CPU second)",
            b.core_elf_bytes as f64 / 1e6 / cpu
        );
        println!(
            "  mount process peak RSS: {:.0} MiB",
            median(&b.runs.iter().map(|r| r.mount_peak_rss_mib).collect::<Vec<_>>())
        );
    }
    Ok(if b.identical { 0 } else { 1 })
}
