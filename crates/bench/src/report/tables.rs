//! The human-readable tables of every bench.

use crate::probe::boot::BootBench;
use crate::probe::migrate::{Guest, MigrateBench};
use crate::probe::snapshot::{LiveSeries, SnapBenchArgs, SnapshotBench};
use crate::util::{max_of, median, mib, PAGE};

/// `ferry bench boot`'s table.
pub(crate) fn print_boot(b: &BootBench) {
    let runs = b.runs;
    println!("ferry bench boot ({runs} boots of the test guest, 64 MiB)");
    println!(
        "  process start -> first guest instruction: median {:.2} ms  (all: {:?})",
        median(&b.first_guest_instruction_ms),
        b.first_guest_instruction_ms
    );
    println!("  process start -> first KVM_RUN:           median {:.2} ms", median(&b.first_kvm_run_ms));
    println!("  process start -> first progress line:     median {:.1} ms", median(&b.first_progress_line_ms));
    println!("  VMM resident memory beyond guest pages:   median {:.1} MiB", median(&b.vmm_overhead_mib));
    println!("  guest dirty rate (wss 64 MiB, rate=max):  {:.1} M pages/s", b.dirty_rate_pages_per_s / 1e6);
    println!("  memory digest (BLAKE3, {} MiB):         {:.2} GB/s", b.digest_bytes >> 20, b.digest_gb_per_s);
}

/// `42%`, or `n/a` for a ratio that is not a number.
pub(crate) fn pct(x: f64) -> String {
    if x.is_finite() {
        format!("{:.0}%", x * 100.0)
    } else {
        "n/a".into()
    }
}

fn mpps(r: Option<f64>) -> String {
    match r {
        Some(r) if r >= 1e6 => format!("{:.0}M", r / 1e6),
        Some(r) => format!("{:.0}k", r / 1e3),
        None => "-".into(),
    }
}

/// `ferry bench snapshot`'s tables.
pub(crate) fn print_snapshot_bench(b: &SnapshotBench, a: &SnapBenchArgs) {
    let m = &b.machine;
    println!(
        "ferry bench snapshot: {} x {}, {:.0} GiB, kernel {}, /dev/kvm {}",
        m.nproc,
        m.cpu,
        m.mem_total_gib,
        m.kernel,
        if m.kvm_is_pvm { "is PVM (software hypervisor)" } else { "hardware" }
    );
    println!("load average at start: {}, at end: {}", m.loadavg_start, m.loadavg_end);
    println!(
        "test guest, 1 vCPU, `dirty wss={} rate=<rate>`; {} live lz4 snapshots per row, medians",
        b.wss_mib, b.runs
    );
    println!();
    println!("1. Live snapshot: guest pause");
    println!(
        "  {:>8} {:>6} {:>10} {:>10} {:>10} {:>9} {:>8} {:>14} {:>12} {:>13}",
        "memory",
        "rate",
        "pause med",
        "pause max",
        "total med",
        "image",
        "GB/s",
        "guest st/s",
        "stop-world",
        "rounds (last)"
    );
    for s in &b.live {
        println!(
            "  {:>4} MiB {:>6} {:>7.2} ms {:>7.2} ms {:>7.0} ms {:>5} KiB {:>8.2} {:>6}/{:<7} {:>9.0} ms {:>13}",
            s.mem_mib,
            s.rate,
            s.pause_ms_median,
            s.pause_ms_max,
            s.total_ms_median,
            s.bytes_written_median as u64 >> 10,
            s.gb_per_s_median,
            mpps(s.guest_rate_before),
            mpps(s.guest_rate_during_median),
            s.stop_world.pause_ms,
            s.live.last().map(|l| format!("{:?}", l.pages_per_round)).unwrap_or_default()
        );
    }
    println!("  (guest st/s: guest page stores per second before / during the snapshots, from its PROGRESS lines)");
    println!("  guest-visible stall per live snapshot: time the vCPU thread was blocked (schedstat), median / max,");
    println!("  against the reported pause; 'idle' is the same measure over 1.5 s without a snapshot");
    for s in &b.live {
        let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
        println!(
            "    {:>4} MiB {:>6}: blocked {:>7} / {:>7} ms, pause {:.2} / {:.2} ms, idle {} ms, stop-the-world blocked {} ms",
            s.mem_mib,
            s.rate,
            f(s.vcpu_blocked_ms_median),
            f(s.vcpu_blocked_ms_max),
            s.pause_ms_median,
            s.pause_ms_max,
            f(s.vcpu_blocked_idle_ms),
            f(s.stop_world.vcpu_blocked_ms)
        );
    }
    for rate in &a.rates {
        let rows: Vec<&LiveSeries> = b.live.iter().filter(|s| &s.rate == rate).collect();
        if let (Some(lo), Some(hi)) = (rows.iter().min_by_key(|s| s.mem_mib), rows.iter().max_by_key(|s| s.mem_mib)) {
            if lo.mem_mib != hi.mem_mib {
                println!(
                    "  rate={rate}: pause {} MiB -> {} MiB: {:.2} -> {:.2} ms (x{:.2})",
                    lo.mem_mib,
                    hi.mem_mib,
                    lo.pause_ms_median,
                    hi.pause_ms_median,
                    hi.pause_ms_median / lo.pause_ms_median
                );
            }
        }
    }
    if b.live.iter().any(|s| s.cow_protected_pages_median.is_some()) {
        println!("  copy-on-write final phase (medians): pages protected at the pause / guest write faults / copy after resume");
        for s in &b.live {
            let f = |v: Option<f64>| v.map(|x| format!("{x:.0}")).unwrap_or_else(|| "-".into());
            println!(
                "    {:>4} MiB {:>6}: {:>6} / {:>6} / {:>6} ms",
                s.mem_mib,
                s.rate,
                f(s.cow_protected_pages_median),
                f(s.cow_write_faults_median),
                s.cow_background_ms_median.map(|x| format!("{x:.1}")).unwrap_or_else(|| "-".into())
            );
        }
    }
    if b.live.iter().any(|s| !s.live_final_copy.is_empty()) {
        println!("  final phase: cow (default) vs copy (`--final-phase copy`), medians of pause / vCPU blocked");
        for s in &b.live {
            let f = |v: Option<f64>| v.map(|x| format!("{x:.2}")).unwrap_or_else(|| "-".into());
            println!(
                "    {:>4} MiB {:>6}: cow {:.2} / {} ms, copy {} / {} ms",
                s.mem_mib,
                s.rate,
                s.pause_ms_median,
                f(s.vcpu_blocked_ms_median),
                f(s.final_copy_pause_ms_median),
                f(s.final_copy_vcpu_blocked_ms_median)
            );
        }
    }
    let all_under = b.live.iter().all(|s| s.pause_ms_median <= 5.0);
    println!("  goal: median pause <= 5 ms in every row: {}", if all_under { "met" } else { "MISSED" });
    println!();

    let bl = &b.baseline;
    println!("2. Throughput on non-zero pages (data pages x 4096 / snapshot total time)");
    println!(
        "  disk: sequential write + fsync, {} MiB:        {:.2} GB/s (samples {:.2?})",
        a.disk_mib,
        bl.disk(),
        bl.disk_write_gb_s
    );
    println!(
        "  codec: lz4 on guest-like pages, 1 MiB chunks: {:.2} GB/s on {} threads, {:.2} GB/s on 1 (ratio {:.0}x)",
        bl.codec(),
        bl.lz4_threads,
        max_of(&bl.lz4_1thread_gb_s),
        bl.lz4_ratio
    );
    println!(
        "  memory: memcpy {:.2} GB/s (1 thread); first touch of a fresh page {:.2} us ({:.2} GB/s of 4 KiB pages)",
        max_of(&bl.memcpy_gb_s),
        median(&bl.first_touch_us_per_page),
        PAGE as f64 / median(&bl.first_touch_us_per_page) / 1e3
    );
    let slower = bl.disk().min(bl.codec());
    if let Some(io) = &b.io {
        println!(
            "  snapshot, stop-the-world, lz4, {} MiB:      {:.2} GB/s = {} of min(disk, codec) = {} of the codec alone",
            io.mem_mib,
            io.plain_gb_per_s_median,
            pct(io.plain_gb_per_s_median / slower),
            pct(io.plain_gb_per_s_median / bl.codec())
        );
        println!(
            "  snapshot, stop-the-world, codec none:        {:.2} GB/s = {} of the disk (image {} MiB)",
            io.codec_none_gb_per_s_median,
            pct(io.codec_none_gb_per_s_median / bl.disk()),
            io.codec_none.first().map(|s| mib(s.bytes_written)).unwrap_or(0)
        );
        for s in b.live.iter().filter(|s| s.mem_mib == io.mem_mib) {
            println!(
                "  snapshot, live, lz4, rate={:<6}              {:.2} GB/s = {} of min(disk, codec) (data pages incl. re-sent)",
                s.rate,
                s.gb_per_s_median,
                pct(s.gb_per_s_median / slower)
            );
        }
    }
    println!();

    println!("3. Restore (eager, image in the page cache)");
    println!(
        "  {:>8} {:>10} {:>12} {:>12} {:>11} {:>15} {:>12} {:>9}",
        "memory", "image", "first instr", "memory ms", "GB/s", "first PROGRESS", "lazy: first", "verified"
    );
    for r in &b.restore {
        println!(
            "  {:>4} MiB {:>6} KiB {:>9.1} ms {:>9.0} ms {:>11.2} {:>12.0} ms {:>12} {:>9}",
            r.mem_mib,
            r.image_bytes >> 10,
            r.first_instruction_ms_median,
            median(&r.runs.iter().map(|x| x.memory_ms).collect::<Vec<_>>()),
            r.memory_gb_per_s_median,
            median(&r.runs.iter().map(|x| x.first_progress_ms).collect::<Vec<_>>()),
            r.lazy_first_instruction_ms_median.map(|t| format!("{t:.1} ms")).unwrap_or_else(|| "-".into()),
            r.runs.iter().chain(&r.lazy).all(|x| x.verified)
        );
        if let Some(e) = &r.lazy_error {
            println!("    lazy restore failed: {e}");
        }
    }
    println!("  (medians; first instr: process start -> first guest instruction (the report's first_instruction_ms,");
    println!("   else ready_ms); GB/s: eager fill rate over non-zero bytes; first PROGRESS: spawn -> the guest's next");
    println!("   serial line, which it prints at most every 100 ms; lazy: `ferry restore --memory lazy`)");
    println!();

    if let Some(io) = &b.io {
        println!("4. Encryption (stop-the-world snapshots, {} MiB, alternating, medians)", io.mem_mib);
        println!(
            "  plain {:.2} GB/s, encrypted {:.2} GB/s: cost {} (goal <= 10%: {})",
            io.plain_gb_per_s_median,
            io.encrypted_gb_per_s_median,
            pct(io.encryption_cost),
            if io.encryption_cost <= 0.10 { "met" } else { "MISSED" }
        );
        println!(
            "  codec none (every data byte encrypted): plain {:.2} GB/s, encrypted {:.2} GB/s: cost {}",
            io.codec_none_gb_per_s_median,
            io.codec_none_encrypted_gb_per_s_median,
            pct(io.codec_none_encryption_cost)
        );
        println!(
            "  live encrypted snapshots: pause median {:.2} ms, {:.2} GB/s",
            median(&io.live_encrypted.iter().map(|s| s.pause_ms).collect::<Vec<_>>()),
            median(&io.live_encrypted.iter().map(|s| s.gb_per_s).collect::<Vec<_>>())
        );
        println!();
    }

    if let Some(inc) = &b.incremental {
        println!("5. Incremental ({} MiB, rate={}, working set {} pages)", inc.mem_mib, inc.rate, inc.wss_pages);
        println!(
            "  full (live):                      {:>8} data pages, {:>10} bytes",
            inc.full.data_pages, inc.full.bytes_written
        );
        println!(
            "  incremental right after (live):   {:>8} data pages, {:>10} bytes = {} of the pages, {} of the bytes; rounds {:?}",
            inc.incremental.data_pages,
            inc.incremental.bytes_written,
            pct(inc.data_pages_ratio),
            pct(inc.bytes_ratio),
            inc.incremental.pages_per_round
        );
        println!(
            "    (the guest completed >= {} passes over its working set between the full image and this one)",
            inc.passes_full_to_incremental.map(|p| p.to_string()).unwrap_or_else(|| "?".into())
        );
        let sw = &inc.incremental_stop_world;
        let whole = inc.passes_before_stop_world.unwrap_or(0) >= 1;
        println!("  incremental 1 s later (paused):   {:>8} data pages, {:>10} bytes", sw.data_pages, sw.bytes_written);
        println!(
            "    dirtied since its parent: {} -> {:+} pages beyond the working set",
            if whole {
                format!(
                    "the whole working set ({} pages; >= {} passes in between) plus the guest's own state pages",
                    inc.wss_pages,
                    inc.passes_before_stop_world.unwrap_or(0)
                )
            } else {
                format!("part of the working set ({} pages; no whole pass seen in between)", inc.wss_pages)
            },
            sw.data_pages as i64 - inc.wss_pages as i64
        );
        if let Some(r) = &inc.chain_restore {
            println!(
                "  restore of the 3-image chain: ready {:.1} ms, {} MiB of data written, guest verified: {}",
                r.ready_ms,
                mib(r.data_bytes),
                r.verified
            );
        }
        println!();
    }

    println!(
        "6. QEMU on the same machine (same guest, migrate to exec:cat > file; restore with -incoming exec:cat file)"
    );
    if let Some(e) = &b.qemu_error {
        println!("  failed: {e}");
    }
    for q in &b.qemu {
        let f = b.live.iter().find(|s| s.mem_mib == q.mem_mib && s.rate == "max");
        let fr = b.restore.iter().find(|r| r.mem_mib == q.mem_mib);
        println!("  {} , {} MiB, rate=max, max-bandwidth unlimited, downtime-limit 300 ms", q.version, q.mem_mib);
        println!("  {:<34} {:>12} {:>12} {:>10}", "", "QEMU", "ferry", "ferry/QEMU");
        let row = |name: &str, qv: f64, fv: Option<f64>, unit: &str| {
            let fv = fv.unwrap_or(f64::NAN);
            println!("  {name:<34} {:>9.1} {unit:<2} {:>9.2} {unit:<2} {:>10.3}", qv, fv, fv / qv);
        };
        row("live: downtime / pause (median)", q.downtime_ms_median, f.map(|s| s.pause_ms_median), "ms");
        row("live: total time (median)", q.total_ms_median, f.map(|s| s.total_ms_median), "ms");
        row("live: file size", mib(q.file_bytes) as f64, f.map(|s| s.bytes_written_median / (1 << 20) as f64), "MiB");
        row("stop-the-world: total (= pause)", q.stop_world.total_ms, f.map(|s| s.stop_world.total_ms), "ms");
        row(
            "restore: start -> running (median)",
            median(&q.restore.iter().map(|r| r.running_ms).collect::<Vec<_>>()),
            fr.map(|r| r.first_instruction_ms_median),
            "ms",
        );
        println!(
            "  QEMU live runs: downtime {:?} ms, total {:?} ms, dirty syncs {:?}",
            q.live.iter().map(|m| m.downtime_ms).collect::<Vec<_>>(),
            q.live.iter().map(|m| m.total_ms).collect::<Vec<_>>(),
            q.live.iter().map(|m| m.dirty_sync_count).collect::<Vec<_>>()
        );
        println!(
            "  QEMU with downtime-limit 5 ms (ferry's budget): {} after {:.0} ms, downtime {:.0} ms, {} dirty syncs, {} MiB transferred",
            q.tight.status,
            q.tight.wall_ms,
            q.tight.downtime_ms,
            q.tight.dirty_sync_count,
            mib(q.tight.transferred)
        );
        println!("  QEMU restores verified by the guest: {}", q.restore.iter().all(|r| r.verified));
    }
    println!();
    println!("guest verified its memory after every run: {}", b.guest_verified_all);
}

/// `ferry bench migrate`'s tables: ferry per guest and configuration, then
/// QEMU on the same guests with ferry/QEMU ratios.
pub(crate) fn print_migrate_bench(b: &MigrateBench) {
    use crate::probe::host::link::Link;
    let m = &b.machine;
    println!(
        "ferry bench migrate: {} x {}, {:.0} GiB, kernel {}, /dev/kvm {}",
        m.nproc,
        m.cpu,
        m.mem_total_gib,
        m.kernel,
        if m.kvm_is_pvm { "is PVM (software hypervisor)" } else { "hardware" }
    );
    let psi = |p: Option<f64>| p.map(|p| format!("{p:.0}%")).unwrap_or_else(|| "?".into());
    println!(
        "load average at start: {}, at end: {}; CPU pressure (some avg10) {} -> {}; run took {:.0} s",
        m.loadavg_start,
        m.loadavg_end,
        psi(b.cpu_pressure_start),
        psi(b.cpu_pressure_end),
        b.elapsed_s
    );
    println!(
        "test guest, 1 vCPU, wss {} MiB for the dirty loads; {} migration(s) per row, medians; each destination is the next source; pause budget {}",
        b.wss_mib,
        b.runs,
        b.downtime_ms.map(|d| format!("{d} ms")).unwrap_or_else(|| "ferry's default".into())
    );
    let links: Vec<String> = [Link::Unix, Link::Tcp, Link::Tls]
        .iter()
        .map(|&l| {
            let v: Vec<String> = b.link.iter().filter(|s| s.link == l).map(|s| format!("{:.2}", s.gb_per_s)).collect();
            format!("{} {:.2} GB/s [{}]", l.name(), b.link_gb_s(l), v.join(", "))
        })
        .collect();
    println!(
        "link: bulk copy of {} MiB between two threads over ferry's transports (best of before/after): {}",
        b.link.first().map(|s| mib(s.bytes)).unwrap_or(0),
        links.join(", ")
    );
    println!();
    println!("1. ferry live migration on loopback");
    println!(
        "  {:>8} {:>6} {:>6} {:>8} {:>24} {:>10} {:>10} {:>6} {:>15} {:>14} {:>9} {:>9} {:>10} {:>15}",
        "memory",
        "load",
        "fill",
        "config",
        "downtime med (min-max)",
        "total med",
        "wire MiB",
        "rounds",
        "stop reason",
        "throttle",
        "wire GB/s",
        "data GB/s",
        "total/link",
        "dst cpu/runq ms"
    );
    for r in &b.rows {
        let g = &r.guest;
        for s in &r.series {
            if s.runs.is_empty() {
                continue;
            }
            let mut reasons = s.stop_reasons.clone();
            reasons.dedup();
            println!(
                "  {:>4} MiB {:>6} {:>6} {:>8} {:>8.2} ms ({:>5.2}-{:>5.2}) {:>7.0} ms {:>10.1} {:>6.0} {:>15} {:>14} {:>9.2} {:>9.2} {:>10} {:>7.0}/{:<7.0}",
                g.mem_mib,
                g.load,
                g.fill.as_deref().unwrap_or("-"),
                s.config.label(),
                s.downtime_ms_median,
                s.downtime_ms_min,
                s.downtime_ms_max,
                s.total_ms_median,
                s.bytes_median / (1 << 20) as f64,
                s.rounds_median,
                reasons.join("/"),
                match s.throttle_max_percent {
                    Some(0) => "-".to_string(),
                    Some(p) => format!("{p}% {:.0} ms", s.throttled_ms_median),
                    None => "n/a".into(),
                },
                s.wire_gb_per_s_median,
                s.data_gb_per_s_median,
                times(s.total_over_link_time),
                s.dst_cpu_ms_median,
                s.dst_runq_ms_median
            );
        }
        for s in &r.series {
            let pc: Vec<&crate::probe::migrate::MigRun> =
                s.runs.iter().filter(|x| x.postcopy_faults.is_some()).collect();
            if pc.is_empty() {
                continue;
            }
            let med = |f: &dyn Fn(&crate::probe::migrate::MigRun) -> f64| {
                let mut v: Vec<f64> = pc.iter().map(|x| f(x)).collect();
                v.sort_by(|a, b| a.total_cmp(b));
                v[v.len() / 2]
            };
            println!(
                "    {} post-copy: {:.0} pages deferred, {:.0} remote faults, a vCPU waited {:.3} ms per fault (median; p99 {:.3} ms), medians of {} runs",
                s.config.label(),
                med(&|x| x.postcopy_deferred_pages.unwrap_or(0) as f64),
                med(&|x| x.postcopy_faults.unwrap_or(0) as f64),
                med(&|x| x.postcopy_blocked_ms_median.unwrap_or(0.0)),
                med(&|x| x.postcopy_blocked_ms_p99.unwrap_or(0.0)),
                pc.len()
            );
        }
        if let Some(e) = &r.error {
            println!("    {}: failed: {e}", g.label());
        }
    }
    println!("  (downtime: the source's final pause to the destination's Running, as ferry reports it; wire: bytes");
    println!("   sent incl. frame headers and tags; data GB/s: guest pages with data (4 KiB each, re-sent ones too)");
    println!("   per second of total time; total/link: total time over the time the link probe needs for the wire");
    println!("   bytes on that transport (x1.0 = as fast as a plain copy); rounds include the paused one;");
    println!("   dst cpu/runq: CPU time of the destination's VMM threads during the migration / time they waited");
    println!("   for a CPU, from schedstat: a large runq means the machine, not ferry, set the pace;");
    println!("   throttle: auto-converge's highest step over the runs and the median time it held the vCPUs)");
    let cont = b.rows.iter().flat_map(|r| r.series.iter().flat_map(|s| &s.runs)).all(|r| r.seq_continued);
    println!(
        "  guest sequence continued at every destination: {cont}; guest verified its memory after every chain: {}",
        b.rows.iter().all(|r| r.verified)
    );
    println!();

    match (&b.qemu_version, &b.qemu_error) {
        (Some(v), _) => println!(
            "2. QEMU on the same guests ({v}; tcp loopback, downtime-limit {} ms, no bandwidth cap)",
            b.qemu_downtime_limit_ms
        ),
        (None, Some(e)) => println!("2. QEMU: skipped: {e}"),
        (None, None) => println!("2. QEMU: not run (--no-qemu)"),
    }
    if !b.qemu.is_empty() {
        let head = format!(
            "  {:>8} {:>6} {:>6} {:>10} {:>11} {:>10} {:>10} {:>6} {:>10} {:>15}",
            "memory", "load", "fill", "setup", "downtime", "total", "MiB", "syncs", "total/link", "dst cpu/runq ms"
        );
        println!("{head} | {:>8} {:>9} {:>9} {:>9}", "ferry", "downtime", "total", "bytes");
        for q in &b.qemu {
            let g = &q.guest;
            let left = format!(
                "  {:>4} MiB {:>6} {:>6} {:>10} {:>8.1} ms {:>7.0} ms {:>10.1} {:>6.0} {:>10} {:>7}/{:<7}",
                g.mem_mib,
                g.load,
                g.fill.as_deref().unwrap_or("-"),
                match q.multifd_channels {
                    0 => "default".to_string(),
                    n => format!("multifd x{n}"),
                },
                q.downtime_ms_median,
                q.total_ms_median,
                q.transferred_median / (1 << 20) as f64,
                q.dirty_syncs_median,
                times(q.total_over_link_time),
                // multifd's receive threads exit with the migration, taking their CPU time along.
                if q.multifd_channels == 0 { format!("{:.0}", median(&q.dst_cpu_ms)) } else { "-".into() },
                if q.multifd_channels == 0 { format!("{:.0}", median(&q.dst_runq_ms)) } else { "-".into() },
            );
            println!("{left} | {:>8} {:>9} {:>9} {:>9}", "QEMU", "1", "1", "1");
            print_ratios(b, g, "ferry/QEMU", left.len(), q.downtime_ms_median, q.total_ms_median, q.transferred_median);
            if let Some(e) = &q.error {
                println!("    {} {}: failed: {e}", q.label(), g.label());
            }
        }
        println!("  (QEMU's own query-migrate figures: downtime, total-time, ram.transferred, dirty-sync-count;");
        println!("   setup: one migration stream, or multifd with N channels set on both ends; dst cpu/runq is");
        println!("   not shown for multifd, whose receive threads exit with the migration and take their CPU");
        println!("   time along; ratios are ferry's medians over QEMU's, same guest, same size; < 1: ferry lower)");
        println!(
            "  QEMU: guest sequence continued at every destination: {}; guests verified their memory after every chain: {}",
            b.qemu.iter().all(|q| q.seq_continued.iter().all(|&c| c)),
            b.qemu.iter().all(|q| q.verified)
        );
    }
    println!();
    match (&b.ch_version, &b.ch_error) {
        (Some(v), _) => println!(
            "3. Cloud Hypervisor on the same guests ({v}; tcp loopback, downtime_ms {}, one connection)",
            b.ch_downtime_ms
        ),
        (None, Some(e)) => println!("3. Cloud Hypervisor: {e}"),
        (None, None) => println!("3. Cloud Hypervisor: not run"),
    }
    if !b.ch.is_empty() {
        let head = format!(
            "  {:>8} {:>6} {:>6} {:>11} {:>10} {:>10} {:>6} {:>10} {:>15}",
            "memory", "load", "fill", "downtime", "total", "MiB", "iters", "total/link", "dst cpu/runq ms"
        );
        println!("{head} | {:>8} {:>9} {:>9} {:>9}", "ferry", "downtime", "total", "bytes");
        for c in &b.ch {
            let g = &c.guest;
            let left = format!(
                "  {:>4} MiB {:>6} {:>6} {:>8.1} ms {:>7.0} ms {:>10.0} {:>6.0} {:>10} {:>7.0}/{:<7.0}",
                g.mem_mib,
                g.load,
                g.fill.as_deref().unwrap_or("-"),
                c.downtime_ms_median,
                c.total_ms_median,
                c.sent_bytes_median / (1 << 20) as f64,
                c.iterations_median,
                times(c.total_over_link_time),
                median(&c.dst_cpu_ms),
                median(&c.dst_runq_ms),
            );
            println!("{left} | {:>8} {:>9} {:>9} {:>9}", "CH", "1", "1", "1");
            print_ratios(b, g, "ferry/CH", left.len(), c.downtime_ms_median, c.total_ms_median, c.sent_bytes_median);
            if let Some(e) = &c.error {
                println!("    Cloud Hypervisor {}: failed: {e}", g.label());
            }
        }
        println!("  (downtime: the source's log with -v, \"downtime of N ms\" (its pause to the destination's");
        println!("   resume); total: from ch-remote send-migration to the destination's receive-migration");
        println!("   returning; MiB: the source's \"Precopy complete: total=\" (rounded up to MiB); iters: memory");
        println!("   iterations, the paused one included; ratios are ferry's medians over CH's; < 1: ferry lower)");
        println!(
            "  Cloud Hypervisor: guest sequence continued at every destination: {}; guests verified their memory after every chain: {}",
            b.ch.iter().all(|c| c.seq_continued.iter().all(|&x| x)),
            b.ch.iter().all(|c| c.verified)
        );
    }
    println!("  {}", crate::peer::firecracker::MIGRATE_NOTE);
}

/// ferry's medians over a peer's on guest `g` (`ratio` names the peer), one
/// line per ferry configuration shown beside a peer: the first (ferry's
/// default codec) and every TCP one, since the peers migrate over TCP.
fn print_ratios(b: &MigrateBench, g: &Guest, ratio: &str, width: usize, downtime: f64, total: f64, bytes: f64) {
    use crate::probe::host::link::Link;
    let row = b.rows.iter().find(|r| r.guest.mem_mib == g.mem_mib && r.guest.load == g.load && r.guest.fill == g.fill);
    let ferry = row.iter().flat_map(|r| &r.series).filter(|s| !s.runs.is_empty());
    for (_, s) in ferry.enumerate().filter(|(i, s)| *i == 0 || s.config.transport == Link::Tcp) {
        println!(
            "{ratio:>width$} | {:>8} {:>9.3} {:>9.3} {:>9.3}",
            s.config.label(),
            s.downtime_ms_median / downtime,
            s.total_ms_median / total,
            s.bytes_median / bytes
        );
    }
}

/// `x3.2`, or `-` when there is no figure.
fn times(x: f64) -> String {
    if x.is_finite() && x > 0.0 {
        format!("x{x:.1}")
    } else {
        "-".into()
    }
}
