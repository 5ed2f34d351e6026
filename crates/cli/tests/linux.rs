//! Opt-in Linux guest tests (FERRY_LINUX_TESTS=1; assets from
//! scripts/linux-guest.sh). Written for hosts with hardware virtualisation,
//! where the Debian cloud kernel boots to its /init in well under a second.
//! On a software hypervisor (PVM) the kernel's ring-0 code is emulated and
//! stops at an instruction the emulator lacks; there the tests check what
//! the early console shows, that ferry reports the failure clearly, and that
//! a Linux snapshotted mid-boot carries on booting after restore.

mod common;
use common::*;
use std::path::PathBuf;

fn assets() -> Option<(PathBuf, PathBuf)> {
    if std::env::var("FERRY_LINUX_TESTS").ok().as_deref() != Some("1") {
        eprintln!("Linux guest tests are opt-in: set FERRY_LINUX_TESTS=1");
        return None;
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../assets/linux");
    let (k, i) = (root.join("vmlinuz"), root.join("initrd.img"));
    assert!(k.exists() && i.exists(), "run scripts/linux-guest.sh first ({} missing)", k.display());
    Some((k, i))
}

/// `ferry run` of the Debian kernel and initramfs with 512 MiB.
fn start_linux(kernel: &std::path::Path, initrd: &std::path::Path, cmdline: &str, extra: &[&str]) -> Guest {
    let mut args = vec![
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "512M",
        "--cmdline",
        cmdline,
    ];
    args.extend_from_slice(extra);
    Guest::start(&args)
}

#[test]
fn linux_boots_with_ferrys_cmdline_and_e820() {
    let Some((kernel, initrd)) = assets() else { return };
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 ferry.marker=42";
    let mut g = start_linux(&kernel, &initrd, cmdline, &["--vcpus", "2"]);
    g.wait_for("kernel banner", secs(600), |l| l.contains("Linux version"));
    let c = g.wait_for("command line", secs(60), |l| l.contains("Command line:"));
    assert!(c.ends_with(cmdline), "kernel saw ferry's command line: {c}");
    g.wait_for("e820 map", secs(60), |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"));
    // ferry's ACPI tables: this kernel has no MP-table parser, so the MADT
    // is its only way to find the second CPU and the IOAPIC.
    g.wait_for("RSDP", secs(120), |l| l.contains("ACPI: RSDP 0x00000000000E0000"));
    g.wait_for("MADT", secs(300), |l| l.contains("ACPI: Using ACPI (MADT) for SMP configuration information"));
    g.wait_for("two CPUs", secs(60), |l| l.contains("smpboot: Allowing 2 CPUs"));
    // Either the guest reaches its /init (hardware virtualisation) or the
    // hypervisor's emulator gives up and ferry says so.
    let deadline = std::time::Instant::now() + secs(900);
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            let err = g.stderr_lines().join("\n");
            assert_eq!(st.code(), Some(125), "{err}");
            assert!(
                err.contains("emulation failure") && err.contains("RIP=") && err.contains("instruction bytes"),
                "{err}"
            );
            eprintln!("Linux stopped under instruction emulation, as expected on a software hypervisor: {err}");
            return;
        }
        let lines = g.collect_for(std::time::Duration::from_millis(500));
        if let Some(up) = lines.iter().find(|l| l.contains("FERRY-LINUX-INIT up")) {
            assert!(up.contains("cpus=2"), "both vCPUs online in Linux: {up}");
            g.wait_for("memdirty", secs(60), |l| l.contains("MEMDIRTY round="));
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "Linux neither reached /init nor stopped; last: {:?}",
            g.seen.last()
        );
    }
}

/// Boots Linux to its shell, snapshots it live, restores it in a new ferry,
/// and checks the restored guest still runs: its shell answers and its
/// clock moved on sanely. Only meaningful where Linux reaches user space
/// (hardware virtualisation); under instruction emulation it stops early
/// and the test says so.
#[test]
fn linux_survives_snapshot_and_restore() {
    let Some((kernel, initrd)) = assets() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let mut g = start_linux(&kernel, &initrd, "console=ttyS0 panic=-1", &["--api-sock", sock.to_str().unwrap()]);
    let deadline = std::time::Instant::now() + secs(900);
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            eprintln!(
                "Linux stopped before its shell (exit {st}); snapshot/restore of Linux needs hardware virtualisation"
            );
            return;
        }
        let lines = g.collect_for(std::time::Duration::from_millis(500));
        if lines.iter().any(|l| l.contains("FERRY-LINUX-SHELL ready")) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "Linux did not reach its shell");
    }
    wait_sock(&sock);
    g.send_line("date +%s; echo BEFORE-SNAPSHOT");
    let before = g.wait_for("date", secs(30), |l| l.trim().parse::<u64>().is_ok());
    let img = dir.path().join("linux.img");
    let o = ferry_cmd(&["snapshot", "--api-sock", sock.to_str().unwrap(), "--out", img.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    drop(g);
    std::thread::sleep(std::time::Duration::from_secs(2));
    let mut r = Guest::start_restore(tempfile::tempdir().unwrap(), &[img.to_str().unwrap()]);
    r.send_line("date +%s; echo RESTORED-ALIVE");
    let after = r.wait_for("date after restore", secs(60), |l| l.trim().parse::<u64>().is_ok());
    r.wait_for("shell answer", secs(30), |l| l.contains("RESTORED-ALIVE"));
    let (b, a): (u64, u64) = (before.trim().parse().unwrap(), after.trim().parse().unwrap());
    assert!(a >= b && a - b < 3600, "clock sane after restore: before {b}, after {a}");
}

/// The printk timestamp of a console line (`[   12.345678] ...`), in seconds.
fn printk_secs(line: &str) -> Option<f64> {
    let rest = line.trim_start().strip_prefix('[')?;
    rest.split_once(']')?.0.trim().parse().ok()
}

/// The part of the snapshot/restore story a software hypervisor lets us
/// see: Linux is snapshotted live while early in boot (its ring-0 code runs
/// under instruction emulation), the image's memory digest matches a paused
/// restore of it, and a restored kernel carries on booting: it prints lines
/// the source never printed, its printk clock continues from where it was,
/// and it ends where an unsnapshotted boot ends here (the emulator's stop,
/// reported the same way) or, on hardware, reaches its /init. Two vCPUs, the
/// second not yet started at the snapshot.
#[test]
fn linux_snapshotted_mid_boot_continues_booting_after_restore() {
    let Some((kernel, initrd)) = assets() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1";
    let mut g = start_linux(&kernel, &initrd, cmdline, &["--api-sock", sock.to_str().unwrap(), "--vcpus", "2"]);
    g.wait_for("e820 map", secs(600), |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"));
    wait_sock(&sock);
    let img = dir.path().join("linux-boot.img");
    let stats = snapshot_ok(&sock, &img, &["--digest"]);
    let digest = stats["memory_digest"].as_str().expect("snapshot digest").to_string();
    eprintln!("snapshot of booting Linux: pause {} ms, total {} ms", stats["pause_ms"], stats["total_ms"]);
    // Stop the source at once; whatever it printed up to here is what a
    // restored kernel must go beyond.
    let _ = api("pause", &sock);
    let source_lines: Vec<String> = {
        g.collect_for(std::time::Duration::from_millis(300));
        g.seen.clone()
    };
    drop(g);
    let last_before = source_lines.iter().rev().find_map(|l| printk_secs(l)).unwrap_or(0.0);

    // Nothing lost: the paused restore holds the very memory the snapshot saw.
    {
        let rdir = tempfile::tempdir().unwrap();
        let rsock = rdir.path().join("r.sock");
        let _r = Guest::start_restore(
            tempfile::tempdir().unwrap(),
            &[img.to_str().unwrap(), "--paused", "--serial", "none", "--api-sock", rsock.to_str().unwrap()],
        );
        wait_sock(&rsock);
        assert_eq!(api("digest", &rsock)["digest"].as_str(), Some(digest.as_str()), "digest after paused restore");
    }

    // Restored and running: boot goes on from where the snapshot was taken.
    let mut r = Guest::start_restore(tempfile::tempdir().unwrap(), &[img.to_str().unwrap()]);
    let first_new = r.wait_for("a console line the source never printed", secs(900), |l| {
        printk_secs(l).is_some() && !source_lines.iter().any(|s| s == l)
    });
    let t = printk_secs(&first_new).unwrap();
    // The snapshot was taken before the kernel read its ACPI tables: the
    // restored kernel finds both vCPUs in the restored memory.
    if !source_lines.iter().any(|l| l.contains("smpboot: Allowing 2 CPUs")) {
        r.wait_for("both vCPUs found after restore", secs(600), |l| l.contains("smpboot: Allowing 2 CPUs"));
    }
    assert!(
        t >= last_before && t - last_before < 600.0,
        "printk clock continues: last before the snapshot {last_before}, first new line {t} ({first_new})"
    );
    boots_on_until_init_or_emulator_stop(&mut r, &source_lines, &first_new, "restored");
}

/// Follows a Linux that resumed elsewhere (restored or migrated) until it
/// reaches /init (hardware virtualisation) or stops where an unmoved boot
/// stops on a software hypervisor; reports how far it got.
fn boots_on_until_init_or_emulator_stop(g: &mut Guest, source_lines: &[String], first_new: &str, how: &str) {
    let deadline = std::time::Instant::now() + secs(1200);
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            let err = g.stderr_lines().join("\n");
            assert_eq!(st.code(), Some(125), "{err}");
            assert!(err.contains("emulation failure") && err.contains("instruction bytes"), "{err}");
            let new_lines = g.seen.iter().filter(|l| !source_lines.contains(l)).count();
            eprintln!(
                "{how} Linux printed {new_lines} new console lines (first: {first_new}), last: {:?}, then stopped under instruction emulation as an unmoved boot does here: {err}",
                g.seen.last()
            );
            return;
        }
        let lines = g.collect_for(std::time::Duration::from_millis(500));
        if lines.iter().any(|l| l.contains("FERRY-LINUX-INIT up")) {
            return;
        }
        assert!(std::time::Instant::now() < deadline, "{how} Linux neither reached /init nor stopped");
    }
}

#[test]
fn linux_migrated_mid_boot_continues_booting_at_the_destination() {
    let Some((kernel, initrd)) = assets() else { return };
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1";
    let mut g = start_linux(&kernel, &initrd, cmdline, &["--api-sock", sock.to_str().unwrap(), "--vcpus", "2"]);
    g.wait_for("e820 map", secs(600), |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"));
    wait_sock(&sock);
    // The destination waits on a unix socket; the source migrates to it live.
    let ddir = tempfile::tempdir().unwrap();
    let mig = ddir.path().join("mig.sock");
    let dsock = ddir.path().join("d.sock");
    let listen = format!("unix://{}", mig.display());
    let mut d = Guest::start_receive(
        tempfile::tempdir().unwrap(),
        &["--listen", &listen, "--api-sock", dsock.to_str().unwrap()],
    );
    d.wait_stderr("waiting for a migration", secs(30));
    let o = ferry_cmd(&["migrate", "--api-sock", sock.to_str().unwrap(), "--to", &listen, "--verify-digest", "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["memory_digest"], v["destination_digest"], "{v}");
    eprintln!(
        "migrated booting Linux: downtime {} ms, total {} ms, rounds {}, {} bytes",
        v["downtime_ms"],
        v["total_ms"],
        v["rounds"].as_array().map(|r| r.len()).unwrap_or(0),
        v["bytes_sent"]
    );
    assert_eq!(g.wait_exit(secs(60)).code(), Some(0), "the source gave the guest up");
    let source_lines = g.seen.clone();
    let last_before = source_lines.iter().rev().find_map(|l| printk_secs(l)).unwrap_or(0.0);
    let first_new = d.wait_for("a console line the source never printed", secs(900), |l| {
        printk_secs(l).is_some() && !source_lines.iter().any(|s| s == l)
    });
    let t = printk_secs(&first_new).unwrap();
    assert!(
        t >= last_before && t - last_before < 600.0,
        "printk clock continues: last at the source {last_before}, first at the destination {t} ({first_new})"
    );
    boots_on_until_init_or_emulator_stop(&mut d, &source_lines, &first_new, "migrated");
}
