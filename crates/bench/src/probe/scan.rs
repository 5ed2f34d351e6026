//! `ferry bench scan`: YARA scanning of an image of the test guest (random
//! fill, so every page is data) with many string rules, against YARA-X's own
//! scanner over the same memory exported as a raw file, in the same run.
//!
//! Figures are GB/s of non-zero memory per CPU second (user + system time of
//! the scanning process, from `wait4`), so they are comparable on a shared
//! machine, plus wall time. YARA-X runs from its Python package (`pip install
//! yara-x`, in a virtual environment outside the tree: `--python`); its figure
//! is timed inside the interpreter around `scan_file` alone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, timed};
use crate::probe::host::{loadavg, machine, Machine};
use crate::util::{log, median, mib};
use crate::vm::FerryVm;

/// Options of `ferry bench scan`.
#[derive(clap::Args, Debug, Clone)]
pub struct ScanBenchArgs {
    /// Guest memory of the scanned image.
    #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mem: u64,
    /// String rules in the rule file.
    #[arg(long, default_value_t = 100)]
    pub(crate) rules: u32,
    /// Scans per configuration (figures are medians).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: u32,
    /// A Python with the `yara_x` package, for YARA-X's own scanner over the raw export
    /// (skipped if it cannot import `yara_x`).
    #[arg(long, default_value = "python3")]
    pub(crate) python: String,
    /// Another ferry binary whose one-thread scan of the same image is measured too.
    #[arg(long)]
    pub(crate) baseline: Option<PathBuf>,
    /// Directory for the image and the export (a temporary directory is made inside it).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Upper bound for booting and snapshotting, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One configuration's figures.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct ScanFigures {
    /// What ran.
    pub(crate) what: String,
    /// Bytes of non-zero memory (the image's data pages) the figures are per.
    pub(crate) data_bytes: u64,
    /// Median wall time (s).
    pub(crate) wall_s: f64,
    /// Median CPU time, user + system (s).
    pub(crate) cpu_s: f64,
    /// Non-zero GB per wall second.
    pub(crate) gb_per_s_wall: f64,
    /// Non-zero GB per CPU second: the per-core figure.
    pub(crate) gb_per_s_per_core: f64,
    /// Matches reported (all runs must agree).
    pub(crate) matches: u64,
}

/// Everything `ferry bench scan` measured.
#[derive(Serialize, Debug)]
pub(crate) struct ScanBench {
    pub(crate) machine: Machine,
    pub(crate) loadavg_before: String,
    pub(crate) mem_bytes: u64,
    pub(crate) rules: u32,
    pub(crate) ferry: Vec<ScanFigures>,
    pub(crate) yara_x: Option<ScanFigures>,
    /// ferry's per-core figure (one thread) over YARA-X's.
    pub(crate) ratio_per_core: Option<f64>,
    pub(crate) yara_x_note: Option<String>,
}

/// `n` rules of one distinct 16..24-byte string each, none of them in the guest's memory.
fn rule_file(n: u32) -> String {
    let mut s = String::new();
    for i in 0..n {
        s.push_str(&format!(
            "rule bench_{i:03} {{\n  strings:\n    $s = \"ferry-bench-{i:03}-{}\"\n  condition:\n    $s\n}}\n",
            "qzj".repeat(1 + (i % 3) as usize)
        ));
    }
    s
}

/// The figures of `runs` runs of `cmd`; `count` reads the match count from the output.
fn figures(
    what: &str,
    runs: u32,
    data_bytes: u64,
    mut cmd: impl FnMut() -> Command,
    count: impl Fn(&[u8]) -> Result<(u64, Option<(f64, f64)>)>,
) -> Result<ScanFigures> {
    let (mut walls, mut cpus, mut n) = (Vec::new(), Vec::new(), None);
    for _ in 0..runs.max(1) {
        let (wall, cpu, out) = timed(&mut cmd())?;
        let (m, inner) = count(&out)?;
        if n.is_some_and(|k| k != m) {
            bail!("{what}: runs disagree on the match count");
        }
        n = Some(m);
        // Figures timed inside the process (YARA-X's scan alone) replace the process's.
        let (wall, cpu) = inner.unwrap_or((wall.as_secs_f64(), cpu.as_secs_f64()));
        walls.push(wall);
        cpus.push(cpu);
    }
    let (wall_s, cpu_s) = (median(&walls), median(&cpus));
    let f = ScanFigures {
        what: what.into(),
        data_bytes,
        wall_s,
        cpu_s,
        gb_per_s_wall: data_bytes as f64 / wall_s / 1e9,
        gb_per_s_per_core: data_bytes as f64 / cpu_s / 1e9,
        matches: n.unwrap_or(0),
    };
    log(format!(
        "{what}: {:.2} s wall, {:.2} s CPU: {:.2} GB/s, {:.2} GB/s per core",
        f.wall_s, f.cpu_s, f.gb_per_s_wall, f.gb_per_s_per_core
    ));
    Ok(f)
}

/// YARA-X (Python) over the raw file: prints `matches seconds cpu_seconds`.
const PY_SCAN: &str = r#"
import sys, time, yara_x
rules = yara_x.compile(open(sys.argv[1]).read())
s = yara_x.Scanner(rules)
t0 = time.perf_counter(); c0 = time.process_time()
r = s.scan_file(sys.argv[2])
t1 = time.perf_counter(); c1 = time.process_time()
n = sum(len(p.matches) for rule in r.matching_rules for p in rule.patterns)
print(n, t1 - t0, c1 - c0)
"#;

/// `ferry bench scan`.
pub fn scan_bench(a: ScanBenchArgs) -> Result<u8> {
    let machine = machine();
    let loadavg_before = loadavg();
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new().prefix("ferry-bench-scan-").tempdir_in(&base)?;
    let dir = tmp.path();
    let timeout = Duration::from_secs(a.timeout_s);
    let img = dir.join("random.img");
    log(format!("booting a {} MiB guest with fill=random and snapshotting it", mib(a.mem)));
    let vm =
        FerryVm::boot_cmdline(&dir.join("vm.sock"), a.mem, "dirty fill=random wss=1 rate=100 report=100", timeout)?;
    ferry_json(&["snapshot", "--api-sock", &vm.sock.to_string_lossy(), "--out", &img.to_string_lossy(), "--json"])?;
    drop(vm);
    let rules = dir.join("bench.yar");
    std::fs::write(&rules, rule_file(a.rules))?;
    let exe = ferry_exe()?;
    // The image's non-zero memory: what a scan reads (its own report says so).
    let probe = ferry_json(&[
        "image",
        "scan",
        &img.to_string_lossy(),
        "--rules",
        &rules.to_string_lossy(),
        "--json",
        "--no-virt",
    ])?;
    let data_bytes = probe["bytes_scanned"].as_u64().context("bytes_scanned")?;
    log(format!("{} MiB of non-zero memory in {} MiB of RAM", mib(data_bytes), mib(a.mem)));
    let ferry_count = |out: &[u8]| -> Result<(u64, Option<(f64, f64)>)> {
        let v: serde_json::Value = serde_json::from_slice(out)?;
        Ok((v["total_matches"].as_u64().unwrap_or(0), None))
    };
    let mut ferry = Vec::new();
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    // This build with and without its literal prefilter, then the baseline build if given.
    let mut configs: Vec<(String, PathBuf, usize, bool)> = vec![
        ("ferry".into(), exe.clone(), 1, false),
        ("ferry".into(), exe.clone(), cores, false),
        ("ferry --no-prefilter".into(), exe.clone(), 1, true),
    ];
    if let Some(b) = &a.baseline {
        configs.push((format!("baseline {}", b.display()), b.clone(), 1, false));
    }
    for (name, bin, threads, no_prefilter) in configs {
        let what = format!("{name} image scan --rules ({} rules, {threads} thread(s))", a.rules);
        ferry.push(figures(
            &what,
            a.runs,
            data_bytes,
            || {
                let mut c = Command::new(&bin);
                c.args(["image", "scan"]).arg(&img).arg("--rules").arg(&rules);
                c.args(["--json", "--no-virt", "--threads", &threads.to_string()]);
                if no_prefilter {
                    c.arg("--no-prefilter");
                }
                c
            },
            ferry_count,
        )?);
    }
    let (yara_x, yara_x_note) = match yara_x_figures(&a, dir, &img, &rules, data_bytes) {
        Ok(f) => (Some(f), None),
        Err(e) => {
            log(format!("YARA-X comparison skipped: {e:#}"));
            (None, Some(format!("{e:#}")))
        }
    };
    let ratio_per_core = yara_x.as_ref().map(|y| ferry[0].gb_per_s_per_core / y.gb_per_s_per_core);
    let b = ScanBench {
        machine,
        loadavg_before,
        mem_bytes: a.mem,
        rules: a.rules,
        ferry,
        yara_x,
        ratio_per_core,
        yara_x_note,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        print_table(&b);
    }
    Ok(0)
}

/// Exports the image raw and scans it with YARA-X's Python package.
fn yara_x_figures(a: &ScanBenchArgs, dir: &Path, img: &Path, rules: &Path, data_bytes: u64) -> Result<ScanFigures> {
    let ok = Command::new(&a.python).args(["-c", "import yara_x"]).stderr(Stdio::null()).status();
    if !ok.map(|s| s.success()).unwrap_or(false) {
        bail!("{} cannot import yara_x (pip install yara-x in a venv; pass --python)", a.python);
    }
    let raw = dir.join("random.raw");
    ferry_json(&["image", "export", &img.to_string_lossy(), "--format", "raw", "--out", &raw.to_string_lossy()])?;
    let script = dir.join("scan.py");
    std::fs::write(&script, PY_SCAN)?;
    figures(
        "yara-x (Python) scan_file over the raw export",
        a.runs,
        data_bytes,
        || {
            let mut c = Command::new(&a.python);
            c.arg(&script).arg(rules).arg(&raw);
            c
        },
        |out| {
            let t = String::from_utf8_lossy(out);
            let v: Vec<&str> = t.split_whitespace().collect();
            match v.as_slice() {
                [n, secs, cpu] => Ok((n.parse()?, Some((secs.parse()?, cpu.parse()?)))),
                _ => bail!("unexpected output {t:?}"),
            }
        },
    )
}

fn print_table(b: &ScanBench) {
    println!("YARA scan of a {} MiB image (fill=random), {} string rules", mib(b.mem_bytes), b.rules);
    println!("{:<64} {:>8} {:>8} {:>10} {:>14} {:>8}", "what", "wall s", "CPU s", "GB/s", "GB/s per core", "matches");
    for f in b.ferry.iter().chain(b.yara_x.iter()) {
        println!(
            "{:<64} {:>8.2} {:>8.2} {:>10.2} {:>14.2} {:>8}",
            f.what, f.wall_s, f.cpu_s, f.gb_per_s_wall, f.gb_per_s_per_core, f.matches
        );
    }
    match (b.ratio_per_core, &b.yara_x_note) {
        (Some(r), _) => println!("ferry (1 thread) / yara-x per core: {r:.2}"),
        (None, Some(n)) => println!("yara-x comparison skipped: {n}"),
        _ => {}
    }
}
