//! Opt-in Linux guest tests (FERRY_LINUX_TESTS=1; assets from
//! scripts/linux-guest.sh). Written for hosts with hardware virtualisation,
//! where the Debian cloud kernel boots to its /init in well under a second.
//! On a software hypervisor (PVM) the kernel's ring-0 code is emulated and
//! stops at an instruction the emulator lacks; there the test checks what
//! the early console shows and that ferry reports the failure clearly.

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

#[test]
fn linux_boots_with_ferrys_cmdline_and_e820() {
    let Some((kernel, initrd)) = assets() else { return };
    let cmdline = "console=ttyS0 earlyprintk=serial,ttyS0 panic=-1 ferry.marker=42";
    let mut g = Guest::start(&[
        "--kernel",
        kernel.to_str().unwrap(),
        "--initrd",
        initrd.to_str().unwrap(),
        "--mem",
        "512M",
        "--cmdline",
        cmdline,
        "--api-sock",
        "/tmp/ferry-linux-test.sock",
    ]);
    g.wait_for("kernel banner", secs(600), |l| l.contains("Linux version"));
    let c = g.wait_for("command line", secs(60), |l| l.contains("Command line:"));
    assert!(c.ends_with(cmdline), "kernel saw ferry's command line: {c}");
    g.wait_for("e820 map", secs(60), |l| l.contains("BIOS-e820: [mem 0x0000000000100000-0x000000001fffffff] usable"));
    // Either the guest reaches its /init (hardware virtualisation) or the
    // hypervisor's emulator gives up and ferry says so.
    let deadline = std::time::Instant::now() + secs(900);
    loop {
        if let Some(st) = g.child.try_wait().unwrap() {
            let err = g.stderr_lines().join("\n");
            assert_eq!(st.code(), Some(125), "{err}");
            assert!(err.contains("emulation failure") && err.contains("RIP=") && err.contains("instruction bytes"), "{err}");
            eprintln!("Linux stopped under instruction emulation, as expected on a software hypervisor: {err}");
            return;
        }
        let lines = g.collect_for(std::time::Duration::from_millis(500));
        if lines.iter().any(|l| l.contains("FERRY-LINUX-INIT up")) {
            g.wait_for("memdirty", secs(60), |l| l.contains("MEMDIRTY round="));
            return;
        }
        assert!(std::time::Instant::now() < deadline, "Linux neither reached /init nor stopped; last: {:?}", g.seen.last());
    }
}
