//! `ferry bench inspect`: the memory analyses that read a whole image
//! (`ferry image verify`, `stats`, `diff`) on snapshots of the test guest,
//! optionally side by side with another `ferry` build (`--baseline`) on the
//! same images in the same run, alternating, so a shared machine's load falls
//! on both alike.
//!
//! Figures are GB/s of non-zero memory (the image's data pages; for the chain
//! diff the pages B records after A) per wall second and per CPU second (user
//! and system time of the process, from `wait4`): the per-core figure says what
//! the work costs, the wall figure what two threads on a loaded machine delivered.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use serde::Serialize;

use crate::child::{ferry_exe, ferry_json, ferry_ok, timed};
use crate::probe::host::{loadavg, machine, Machine};
use crate::util::{log, median, mib};
use crate::vm::FerryVm;

/// Options of `ferry bench inspect`.
#[derive(clap::Args, Debug, Clone)]
pub struct InspectBenchArgs {
    /// Guest memory of the images.
    #[arg(long, default_value = "1G", value_parser = ferry_vmm::size::parse_mem)]
    pub(crate) mem: u64,
    /// The guest's page fill: `random` (incompressible) or `word` (one word per page).
    #[arg(long, default_value = "random")]
    pub(crate) fill: String,
    /// Runs per command and binary (figures are medians).
    #[arg(long, default_value_t = 3)]
    pub(crate) runs: u32,
    /// Another ferry binary to run the same commands with, alternating with this one.
    #[arg(long)]
    pub(crate) baseline: Option<PathBuf>,
    /// Directory for the images (a temporary directory is made inside it).
    #[arg(long)]
    pub(crate) dir: Option<PathBuf>,
    /// Upper bound for booting and snapshotting, in seconds.
    #[arg(long, default_value_t = 300)]
    pub(crate) timeout_s: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub(crate) json: bool,
}

/// One command's figures with one binary.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct Figures {
    /// `this` or `baseline`.
    pub(crate) build: String,
    /// Median wall time (s).
    pub(crate) wall_s: f64,
    /// Median CPU time, user + system (s).
    pub(crate) cpu_s: f64,
    /// Non-zero GB per wall second.
    pub(crate) gb_per_s_wall: f64,
    /// Non-zero GB per CPU second.
    pub(crate) gb_per_s_per_core: f64,
}

/// One command, with each binary.
#[derive(Serialize, Clone, Debug)]
pub(crate) struct Row {
    /// The command line (after `ferry`).
    pub(crate) what: String,
    /// Bytes of non-zero memory the figures are per.
    pub(crate) data_bytes: u64,
    /// This build, then the baseline.
    pub(crate) builds: Vec<Figures>,
    /// This build's wall time over the baseline's (below 1: faster).
    pub(crate) wall_ratio: Option<f64>,
    /// This build's CPU time over the baseline's.
    pub(crate) cpu_ratio: Option<f64>,
}

/// Everything `ferry bench inspect` measured.
#[derive(Serialize, Debug)]
pub(crate) struct InspectBench {
    pub(crate) machine: Machine,
    pub(crate) loadavg_before: String,
    pub(crate) loadavg_after: String,
    pub(crate) mem_bytes: u64,
    pub(crate) fill: String,
    pub(crate) rows: Vec<Row>,
}

/// `ferry bench inspect`.
pub fn inspect_bench(a: InspectBenchArgs) -> Result<u8> {
    if a.fill != "random" && a.fill != "word" {
        bail!("--fill must be random or word, not {:?}", a.fill);
    }
    let loadavg_before = loadavg();
    let base = a.dir.clone().unwrap_or_else(std::env::temp_dir);
    let tmp = tempfile::Builder::new().prefix("ferry-bench-inspect-").tempdir_in(&base)?;
    let dir = tmp.path();
    let timeout = Duration::from_secs(a.timeout_s);
    let (ia, ib, ic) = (dir.join("a.img"), dir.join("b.img"), dir.join("c.img"));
    let s = |p: &Path| p.to_string_lossy().into_owned();
    log(format!("booting a {} MiB guest (fill={}) and taking a, b (child of a), c (full)", mib(a.mem), a.fill));
    // The workload region is RAM less the guest's own pages: 1000 MiB of a 1 GiB guest.
    let cmdline = format!("dirty wss={} fill={} report=1000", mib(a.mem) * 1000 / 1024, a.fill);
    let vm = FerryVm::boot_cmdline(&dir.join("vm.sock"), a.mem, &cmdline, timeout)?;
    let sock = s(&vm.sock);
    ferry_json(&["snapshot", "--api-sock", &sock, "--out", &s(&ia), "--json"])?;
    std::thread::sleep(Duration::from_secs(1));
    ferry_ok(&["pause", "--api-sock", &sock])?;
    ferry_json(&["snapshot", "--api-sock", &sock, "--out", &s(&ib), "--parent", &s(&ia), "--json"])?;
    ferry_json(&["snapshot", "--api-sock", &sock, "--out", &s(&ic), "--json"])?;
    drop(vm);
    let exe = ferry_exe()?;
    let stats = ferry_json(&["image", "stats", &s(&ic), "--json", "--compress-every", "1000000"])?;
    let data_c = stats["images"][0]["bytes_analysed"].as_u64().context("bytes_analysed")?;
    let chain = ferry_json(&["image", "diff", &s(&ia), &s(&ib), "--json", "--no-virt"])?;
    let written = chain["written_pages"].as_u64().context("written_pages")? * 4096;
    log(format!("{} MiB non-zero in c; {} MiB recorded by b after a", mib(data_c), mib(written)));
    let commands: Vec<(Vec<String>, u64)> = vec![
        (vec!["image".into(), "verify".into(), s(&ic)], data_c),
        (vec!["image".into(), "stats".into(), s(&ic), "--json".into()], data_c),
        (vec!["image".into(), "stats".into(), s(&ic), "--json".into(), "--threads".into(), "1".into()], data_c),
        (vec!["image".into(), "diff".into(), s(&ia), s(&ic), "--json".into(), "--no-virt".into()], data_c),
        (
            vec![
                "image".into(),
                "diff".into(),
                s(&ia),
                s(&ic),
                "--json".into(),
                "--no-virt".into(),
                "--threads".into(),
                "1".into(),
            ],
            data_c,
        ),
        (vec!["image".into(), "diff".into(), s(&ia), s(&ib), "--json".into(), "--no-virt".into()], written),
    ];
    let mut exes = vec![("this".to_string(), exe)];
    if let Some(b) = &a.baseline {
        exes.push(("baseline".to_string(), b.clone()));
    }
    let mut rows = Vec::new();
    for (args, data) in &commands {
        rows.push(row(args, *data, &exes, a.runs)?);
    }
    let b = InspectBench {
        machine: machine(),
        loadavg_before,
        loadavg_after: loadavg(),
        mem_bytes: a.mem,
        fill: a.fill,
        rows,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&b)?);
    } else {
        print_table(&b);
    }
    Ok(0)
}

/// Runs `args` `runs` times with each binary, alternating, and checks that their outputs agree.
fn row(args: &[String], data: u64, exes: &[(String, PathBuf)], runs: u32) -> Result<Row> {
    let mut walls = vec![Vec::new(); exes.len()];
    let mut cpus = vec![Vec::new(); exes.len()];
    let mut outs: Vec<Option<serde_json::Value>> = vec![None; exes.len()];
    for _ in 0..runs.max(1) {
        for (k, (_, exe)) in exes.iter().enumerate() {
            let (wall, cpu, out) = timed(Command::new(exe).args(args))?;
            walls[k].push(wall.as_secs_f64());
            cpus[k].push(cpu.as_secs_f64());
            if args.iter().any(|x| x == "--json") {
                let mut v: serde_json::Value = serde_json::from_slice(&out).context("JSON output")?;
                strip_times(&mut v);
                outs[k] = Some(v);
            }
        }
    }
    if outs.iter().flatten().any(|o| Some(o) != outs[0].as_ref()) {
        bail!("ferry {}: the builds' outputs differ (beyond their times)", args.join(" "));
    }
    let builds: Vec<Figures> = exes
        .iter()
        .enumerate()
        .map(|(k, (name, _))| {
            let (wall_s, cpu_s) = (median(&walls[k]), median(&cpus[k]));
            Figures {
                build: name.clone(),
                wall_s,
                cpu_s,
                gb_per_s_wall: data as f64 / wall_s / 1e9,
                gb_per_s_per_core: data as f64 / cpu_s / 1e9,
            }
        })
        .collect();
    let what = args.iter().map(|x| x.rsplit('/').next().unwrap_or(x)).collect::<Vec<_>>().join(" ");
    for f in &builds {
        log(format!(
            "{what} [{}]: {:.2} s wall, {:.2} s CPU: {:.2} GB/s, {:.2} GB/s per core",
            f.build, f.wall_s, f.cpu_s, f.gb_per_s_wall, f.gb_per_s_per_core
        ));
    }
    let ratio = |g: fn(&Figures) -> f64| builds.get(1).map(|b| g(&builds[0]) / g(b));
    Ok(Row { what, data_bytes: data, wall_ratio: ratio(|f| f.wall_s), cpu_ratio: ratio(|f| f.cpu_s), builds })
}

/// Removes the time fields (`elapsed_secs`) so two runs' outputs compare equal.
fn strip_times(v: &mut serde_json::Value) {
    match v {
        serde_json::Value::Object(m) => {
            m.remove("elapsed_secs");
            m.values_mut().for_each(strip_times);
        }
        serde_json::Value::Array(a) => a.iter_mut().for_each(strip_times),
        _ => {}
    }
}

fn print_table(b: &InspectBench) {
    println!(
        "memory analyses of {} MiB images (fill={}), load average {} before, {} after",
        mib(b.mem_bytes),
        b.fill,
        b.loadavg_before,
        b.loadavg_after
    );
    println!("{:<52} {:>8} {:>8} {:>8} {:>8} {:>10}", "what", "build", "wall s", "CPU s", "GB/s", "GB/s/core");
    for r in &b.rows {
        for f in &r.builds {
            println!(
                "{:<52} {:>8} {:>8.2} {:>8.2} {:>8.2} {:>10.2}",
                r.what, f.build, f.wall_s, f.cpu_s, f.gb_per_s_wall, f.gb_per_s_per_core
            );
        }
        if let (Some(w), Some(c)) = (r.wall_ratio, r.cpu_ratio) {
            println!("{:<52} {:>8} wall x{w:.2}, CPU x{c:.2} (this / baseline)", "", "");
        }
    }
}
