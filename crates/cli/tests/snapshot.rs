//! End to end: live snapshots, restore, incremental chains, encryption,
//! export, and every way an image can be bad.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Restores `img` paused and returns the guest and its API socket.
fn restore_paused(img: &Path, extra: &[&str]) -> (Guest, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let mut args = vec![img.to_str().unwrap(), "--paused", "--api-sock", sock.to_str().unwrap()];
    args.extend_from_slice(extra);
    let g = Guest::start_restore(dir, &args);
    wait_sock(&sock);
    (g, sock)
}

#[test]
fn live_snapshot_restores_with_same_digest_and_guest_continues() {
    let (mut g, sock) = running_guest("dirty wss=16 rate=max report=100", "128M");
    let img = g.path("full.img");
    let s = snapshot_ok(&sock, &img, &["--digest"]);
    assert_eq!(s["mode"], "live");
    assert!(s["rounds"].as_u64().unwrap() >= 2, "live snapshot copies in rounds: {s}");
    assert!(s["pause_ms"].as_f64().unwrap() > 0.0);
    assert!(s["zero_pages_skipped"].as_u64().unwrap() > 0, "{s}");
    let digest = s["memory_digest"].as_str().unwrap().to_string();
    // The source keeps running.
    let before = g.wait_line("PROGRESS", secs(10));
    assert_eq!(api("status", &sock)["state"], "running");

    let (mut r, rsock) = restore_paused(&img, &[]);
    assert_eq!(api("digest", &rsock)["digest"], digest.as_str(), "restored memory equals memory at the final pause");
    assert_eq!(api("status", &rsock)["state"], "paused");
    api("resume", &rsock);
    let p = r.wait_line("PROGRESS", secs(30));
    // The restored guest continues its own sequence (no reboot).
    assert!(field(&p, "seq").unwrap() >= 1, "{p}");
    assert!(!r.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "restore must not reboot: {:?}", r.seen);
    r.send_line("verify");
    let v = r.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    let _ = before;
}

#[test]
fn every_image_kind_restores_to_the_digest_at_its_final_pause() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let key = g.path("key");
    std::fs::write(&key, b"correct horse battery staple").unwrap();
    let full = g.path("full.img");
    let kinds: Vec<(PathBuf, Vec<String>)> = vec![
        (full.clone(), vec!["--digest".into()]),
        (g.path("incr.img"), vec!["--digest".into(), "--parent".into(), full.to_str().unwrap().into()]),
        (g.path("zstd.img"), vec!["--digest".into(), "--codec".into(), "zstd".into()]),
        (g.path("none.img"), vec!["--digest".into(), "--codec".into(), "none".into(), "--pause".into()]),
        (
            g.path("enc.img"),
            vec!["--digest".into(), "--encrypt".into(), "--key-file".into(), key.to_str().unwrap().into()],
        ),
    ];
    let mut digests = vec![];
    for (img, extra) in &kinds {
        let extra: Vec<&str> = extra.iter().map(|s| s.as_str()).collect();
        let s = snapshot_ok(&sock, img, &extra);
        digests.push(s["memory_digest"].as_str().unwrap().to_string());
        if img.ends_with("incr.img") {
            let full_size = std::fs::metadata(&full).unwrap().len();
            let incr_size = std::fs::metadata(img).unwrap().len();
            assert!(incr_size < full_size, "incremental ({incr_size}) smaller than full ({full_size})");
            assert!(s["parent"].is_string());
        }
    }
    for ((img, _), digest) in kinds.iter().zip(&digests) {
        let extra: Vec<&str> =
            if img.ends_with("enc.img") { vec!["--key-file", key.to_str().unwrap()] } else { vec![] };
        let (_r, rsock) = restore_paused(img, &extra);
        assert_eq!(api("digest", &rsock)["digest"].as_str().unwrap(), digest, "{}", img.display());
        // image verify agrees the file is intact.
        let mut args = vec!["image", "verify", img.to_str().unwrap()];
        args.extend_from_slice(&extra);
        let o = ferry_cmd(&args);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    }
}

#[test]
fn restore_twice_gives_two_independent_guests() {
    let (g, sock) = running_guest("dirty wss=8 rate=max report=100", "64M");
    let img = g.path("a.img");
    snapshot_ok(&sock, &img, &[]);
    let (mut a, asock) = restore_paused(&img, &[]);
    let (mut b, bsock) = restore_paused(&img, &[]);
    api("resume", &asock);
    api("resume", &bsock);
    a.wait_line("PROGRESS", secs(30));
    b.wait_line("PROGRESS", secs(30));
    // Stopping one leaves the other running.
    let o = ferry_cmd(&["shutdown", "--api-sock", asock.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(a.wait_exit(secs(30)).code(), Some(0));
    let p = b.wait_line("PROGRESS", secs(10));
    assert!(p.starts_with("PROGRESS"));
    assert_eq!(api("status", &bsock)["state"], "running");
}

#[test]
fn pause_snapshot_and_incremental_refusals() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let a = g.path("a.img");
    let s = snapshot_ok(&sock, &a, &["--pause"]);
    assert_eq!(s["mode"], "pause");
    assert_eq!(s["rounds"], 1);
    // A parent that is not the last snapshot is refused, and the lineage is kept.
    let b = g.path("b.img");
    snapshot_ok(&sock, &b, &[]);
    let o = snapshot(&sock, &g.path("c.img"), &["--parent", a.to_str().unwrap()]);
    assert!(!o.status.success());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("is not this VM's last snapshot"), "{err}");
    assert!(!g.path("c.img").exists());
    snapshot_ok(&sock, &g.path("c.img"), &["--parent", b.to_str().unwrap()]);
}

#[test]
fn export_lime_elf_and_raw() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let img = g.path("a.img");
    snapshot_ok(&sock, &img, &[]);
    for fmt in ["lime", "elf", "raw"] {
        let out = g.path(&format!("mem.{fmt}"));
        let o = ferry_cmd(&["image", "export", img.to_str().unwrap(), "--format", fmt, "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let bytes = std::fs::read(&out).unwrap();
        match fmt {
            "lime" => {
                assert_eq!(&bytes[0..4], &0x4C69_4D45u32.to_le_bytes());
                let end = u64::from_le_bytes(bytes[16..24].try_into().unwrap());
                assert_eq!(end, (64 << 20) - 1, "one RAM range, inclusive end");
                assert_eq!(bytes.len(), 32 + (64 << 20));
            }
            "elf" => {
                assert_eq!(&bytes[0..4], b"\x7fELF");
                assert_eq!(u16::from_le_bytes([bytes[16], bytes[17]]), 4, "ET_CORE");
            }
            _ => assert_eq!(bytes.len(), 64 << 20),
        }
    }
    // The test guest's page pattern is visible in the raw export: word at page 0x300 carries pfn 0x300.
    let raw = std::fs::read(g.path("mem.raw")).unwrap();
    let word = u64::from_le_bytes(raw[0x300 * 4096..0x300 * 4096 + 8].try_into().unwrap());
    assert_eq!(word & 0xffff_ffff, 0x300);
    let o = ferry_cmd(&["image", "inspect", img.to_str().unwrap()]);
    assert!(o.status.success());
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(text.contains("root hash") && text.contains("vcpu 0") && text.contains("rip="), "{text}");
}

/// ferry's memory digest (`GuestRam::digest`) of one RAM range starting at 0.
fn memory_digest_of(ram: &[u8]) -> String {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry memory digest v1");
    h.update(&0u64.to_le_bytes());
    h.update(&(ram.len() as u64).to_le_bytes());
    h.update(ram);
    h.finalize().to_hex().to_string()
}

/// Export follows an incremental chain: the memory exported from a full
/// image plus an incremental one is exactly guest RAM at the incremental's
/// final pause (same digest), in raw, LiME and ELF form, while the
/// incremental alone holds only a small part of it.
#[test]
fn export_of_an_incremental_chain_is_guest_memory_at_its_pause() {
    let (mut g, sock) = running_guest("dirty wss=8 rate=max report=100", "64M");
    let full = g.path("full.img");
    snapshot_ok(&sock, &full, &[]);
    g.wait_line("PROGRESS", secs(10));
    let inc = g.path("inc.img");
    let s = snapshot_ok(&sock, &inc, &["--parent", full.to_str().unwrap(), "--digest"]);
    let digest = s["memory_digest"].as_str().unwrap();
    assert!(
        std::fs::metadata(&inc).unwrap().len() * 2 < std::fs::metadata(&full).unwrap().len(),
        "the incremental image holds only what changed"
    );
    let export = |fmt: &str| {
        let out = g.path(&format!("inc.{fmt}"));
        let o = ferry_cmd(&["image", "export", inc.to_str().unwrap(), "--format", fmt, "--out", out.to_str().unwrap()]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        std::fs::read(&out).unwrap()
    };
    let raw = export("raw");
    assert_eq!(memory_digest_of(&raw), digest, "raw export of the chain = guest RAM at the pause");
    let lime = export("lime");
    assert_eq!(memory_digest_of(&lime[32..]), digest, "LiME: one 32-byte header, then the range");
    let elf = export("elf");
    // ELF64 core: the program headers' PT_LOAD (type 1) for guest-physical 0.
    let u64_at = |o: usize| u64::from_le_bytes(elf[o..o + 8].try_into().unwrap());
    let (phoff, phentsize, phnum) = (u64_at(32) as usize, u16::from_le_bytes([elf[54], elf[55]]) as usize, elf[56]);
    let loads: Vec<(usize, usize)> = (0..phnum as usize)
        .map(|i| phoff + i * phentsize)
        .filter(|&ph| u32::from_le_bytes(elf[ph..ph + 4].try_into().unwrap()) == 1)
        .map(|ph| (u64_at(ph + 8) as usize, u64_at(ph + 32) as usize))
        .collect();
    assert_eq!(loads.len(), 1, "one PT_LOAD per RAM range");
    let (off, len) = loads[0];
    assert_eq!(memory_digest_of(&elf[off..off + len]), digest, "ELF core: the PT_LOAD holds the range");
}

fn corrupt_copy(src: &Path, dst: &Path, f: impl FnOnce(&mut Vec<u8>)) {
    let mut b = std::fs::read(src).unwrap();
    f(&mut b);
    std::fs::write(dst, b).unwrap();
}

fn restore_fails(img: &Path, extra: &[&str], expect: &str) {
    let mut args = vec!["restore", img.to_str().unwrap(), "--serial", "none"];
    args.extend_from_slice(extra);
    let o = ferry_cmd(&args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(1), "restore of {} should fail: {err}", img.display());
    assert!(err.to_lowercase().contains(&expect.to_lowercase()), "expected {expect:?} in: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn bad_images_are_rejected_with_what_and_where() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let key = g.path("key");
    std::fs::write(&key, b"k1").unwrap();
    let wrong = g.path("wrong");
    std::fs::write(&wrong, b"k2").unwrap();
    let full = g.path("full.img");
    snapshot_ok(&sock, &full, &[]);
    let len = std::fs::metadata(&full).unwrap().len() as usize;

    let t = g.path("truncated.img");
    corrupt_copy(&full, &t, |b| b.truncate(len / 2));
    restore_fails(&t, &[], "truncated");
    let flip = g.path("flip-chunk.img");
    corrupt_copy(&full, &flip, |b| b[len / 3] ^= 0x10);
    restore_fails(&flip, &[], "hash mismatch, the chunk is corrupted");
    // ...and says which chunk and where.
    let o = ferry_cmd(&["restore", flip.to_str().unwrap(), "--serial", "none"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("chunk ") && err.contains(" at offset "), "{err}");
    let hdr = g.path("flip-header.img");
    corrupt_copy(&full, &hdr, |b| b[20] ^= 0x01);
    restore_fails(&hdr, &[], "exceeds the file size");
    let hdr2 = g.path("flip-header-json.img");
    corrupt_copy(&full, &hdr2, |b| b[80] ^= 0x01);
    restore_fails(&hdr2, &[], "header");
    let ver = g.path("version.img");
    corrupt_copy(&full, &ver, |b| b[8] = 0x7f);
    restore_fails(&ver, &[], "unsupported image format version 127");
    let junk = g.path("junk.img");
    std::fs::write(&junk, b"definitely not an image").unwrap();
    restore_fails(&junk, &[], "junk.img");

    // Encrypted: no key, wrong key.
    let enc = g.path("enc.img");
    snapshot_ok(&sock, &enc, &["--encrypt", "--key-file", key.to_str().unwrap()]);
    restore_fails(&enc, &[], "key");
    restore_fails(&enc, &["--key-file", wrong.to_str().unwrap()], "wrong key");

    // Chains: missing parent, mismatched parent.
    let base = g.path("base.img");
    snapshot_ok(&sock, &base, &[]);
    let child = g.path("child.img");
    snapshot_ok(&sock, &child, &["--parent", base.to_str().unwrap()]);
    std::fs::rename(&base, g.path("moved.img")).unwrap();
    restore_fails(&child, &[], "parent");
    std::fs::copy(&full, &base).unwrap(); // a different image under the parent's name
    restore_fails(&child, &[], "parent");
}

#[test]
fn failed_snapshot_leaves_previous_image_intact() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let img = g.path("keep.img");
    snapshot_ok(&sock, &img, &[]);
    let before = std::fs::read(&img).unwrap();
    // Bad request: unknown codec; and an unwritable directory.
    let o = snapshot(&sock, &img, &["--codec", "bogus"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unknown codec"));
    let o = snapshot(&sock, Path::new("/nonexistent-dir/x.img"), &[]);
    assert!(!o.status.success());
    assert_eq!(std::fs::read(&img).unwrap(), before, "previous image untouched");
    assert_eq!(api("status", &sock)["state"], "running", "a failed snapshot leaves the guest running");
}

/// A VMM killed (SIGKILL) while writing an image over an older one leaves
/// the older image intact and valid; the next snapshot to that path works
/// and removes the dead writer's temporary file.
#[test]
fn vmm_killed_mid_snapshot_leaves_previous_image_intact() {
    let (mut g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "1G");
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("vm.img");
    snapshot_ok(&sock, &img, &[]);
    let before = std::fs::read(&img).unwrap();
    // An uncompressed stop-the-world snapshot of 1 GiB is slow enough to be caught mid-write.
    let mut client = std::process::Command::new(ferry())
        .args(["snapshot", "--api-sock", sock.to_str().unwrap(), "--out", img.to_str().unwrap()])
        .args(["--codec", "none", "--pause"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + secs(60);
    let tmp = loop {
        let partial = std::fs::read_dir(dir.path()).unwrap().flatten().find(|e| {
            e.file_name().to_string_lossy().starts_with("vm.img.tmp-")
                && e.metadata().map(|m| m.len() > 8 << 20).unwrap_or(false)
        });
        if let Some(e) = partial {
            break e.path();
        }
        assert!(client.try_wait().unwrap().is_none(), "the snapshot finished before it could be interrupted");
        assert!(std::time::Instant::now() < deadline, "no temporary image appeared");
        std::thread::sleep(std::time::Duration::from_millis(1));
    };
    g.child.kill().unwrap();
    g.child.wait().unwrap();
    let st = client.wait().unwrap();
    assert!(!st.success(), "the snapshot whose VMM died must fail");
    assert_eq!(std::fs::read(&img).unwrap(), before, "previous image untouched");
    let o = ferry_cmd(&["image", "verify", img.to_str().unwrap()]);
    assert!(o.status.success(), "previous image still valid: {}", String::from_utf8_lossy(&o.stderr));
    assert!(tmp.exists(), "a killed writer cannot clean up after itself");

    let (_g2, sock2) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    snapshot_ok(&sock2, &img, &[]);
    assert!(!tmp.exists(), "the next writer of the path removes the dead writer's temporary file");
    let o = ferry_cmd(&["image", "verify", img.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn disk_full_while_writing_keeps_previous_image_and_guest() {
    // A 16 MiB tmpfs cannot hold a snapshot of 64 MiB of incompressible-enough memory.
    let mnt = tempfile::tempdir().unwrap();
    let ok = std::process::Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=2m", "ferrytest", mnt.path().to_str().unwrap()])
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    if !ok {
        eprintln!("cannot mount a tmpfs here; skipping");
        return;
    }
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _u = Unmount(mnt.path().to_path_buf());
    let (_g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let prev = mnt.path().join("img");
    std::fs::write(&prev, b"previous image").unwrap();
    let o = snapshot(&sock, &prev, &["--codec", "none"]);
    assert!(!o.status.success(), "snapshot to a full disk must fail");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("No space left") || err.contains("space"), "{err}");
    assert_eq!(std::fs::read(&prev).unwrap(), b"previous image");
    let leftovers: Vec<_> = std::fs::read_dir(mnt.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(leftovers.len(), 1, "temporary file removed: {leftovers:?}");
    assert_eq!(api("status", &sock)["state"], "running");
}

#[test]
fn copy_on_write_final_phase_is_consistent_and_short() {
    // A guest dirtying 16 MiB at full speed; one live round forces a large
    // final dirty set, which the copy-on-write phase protects instead of copying.
    let (g, sock) = running_guest("dirty wss=16 rate=max report=100", "128M");
    for (phase, name) in [("cow", "cow.img"), ("copy", "copy.img")] {
        let img = g.path(name);
        // --downtime-ms 0: no pause budget, so any final dirty set goes through copy-on-write.
        let s =
            snapshot_ok(&sock, &img, &["--max-rounds", "1", "--downtime-ms", "0", "--final-phase", phase, "--digest"]);
        let last_round = s["pages_per_round"].as_array().unwrap().last().unwrap().as_u64().unwrap();
        if phase == "cow" && last_round > 0 {
            assert_eq!(s["cow"]["protected_pages"].as_u64(), Some(last_round), "{s}");
        }
        if phase == "copy" {
            assert!(s["cow"].is_null(), "{s}");
        }
        let (_r, rsock) = restore_paused(&img, &[]);
        assert_eq!(api("digest", &rsock)["digest"], s["memory_digest"], "{phase}: image equals memory at the pause");
    }
    assert_eq!(api("status", &sock)["state"], "running");
}

#[test]
fn inspect_and_verify_report_keys_and_corruption() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let key = g.path("key");
    std::fs::write(&key, b"inspect key").unwrap();
    let enc = g.path("enc.img");
    snapshot_ok(&sock, &enc, &["--encrypt", "--key-file", key.to_str().unwrap()]);
    // Without the key: the public header only, no registers.
    let o = ferry_cmd(&["image", "inspect", enc.to_str().unwrap(), "--json"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(v["header"]["encryption"].is_object(), "{v}");
    assert_eq!(v["vcpus"].as_array().map(|a| a.len()), Some(0), "no registers without the key: {v}");
    // With it: registers.
    let o = ferry_cmd(&["image", "inspect", enc.to_str().unwrap(), "--json", "--key-file", key.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["vcpus"].as_array().map(|a| a.len()), Some(1), "{v}");
    assert!(v["vcpus"][0]["rip"].as_u64().unwrap() > 0);
    // verify names the damage.
    let plain = g.path("plain.img");
    snapshot_ok(&sock, &plain, &[]);
    let mut b = std::fs::read(&plain).unwrap();
    let at = b.len() / 2;
    b[at] ^= 0x40;
    let bad = g.path("bad.img");
    std::fs::write(&bad, b).unwrap();
    let o = ferry_cmd(&["image", "verify", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("bad.img") && (err.contains("chunk") || err.contains("footer") || err.contains("section")),
        "{err}"
    );
    let o = ferry_cmd(&["image", "verify", plain.to_str().unwrap()]);
    assert!(o.status.success());
}

#[test]
fn two_vcpu_guest_snapshot_restores_both_cpus() {
    let (g, sock) = running_guest_with("dirty wss=8 rate=max report=100", "64M", &["--vcpus", "2"]);
    assert!(g.seen.iter().any(|l| l == "CPU 1 online"), "{:?}", g.seen);
    let img = g.path("smp.img");
    let s = snapshot_ok(&sock, &img, &["--digest"]);
    let (mut r, rsock) = restore_paused(&img, &[]);
    assert_eq!(api("digest", &rsock)["digest"], s["memory_digest"]);
    assert_eq!(api("status", &rsock)["vcpus"], 2);
    api("resume", &rsock);
    // passes= is the minimum over CPUs: it only advances if both vCPUs run.
    let a = r.wait_line("PROGRESS", secs(30));
    let b = r.wait_line("PROGRESS", secs(30));
    assert!(field(&b, "passes").unwrap() > field(&a, "passes").unwrap(), "{a} / {b}");
    r.send_line("verify");
    let v = r.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
}

/// The dirty log has one view per consumer: a migration's rounds (here one
/// whose destination dies while it reads the log) must not take pages away
/// from the snapshot lineage, or the next incremental image would miss
/// what the guest wrote meanwhile.
#[test]
fn an_incremental_snapshot_after_a_failed_migration_is_complete() {
    // 2000 pages/s through a 64 MiB working set: a page is written again only
    // about 8 s later, so the incremental image below, taken within a few
    // seconds of the full one, has only the lineage's view to find it by.
    let (g, sock) = running_guest("dirty wss=64 rate=2000 fill=random report=100", "256M");
    let full = g.path("full.img");
    snapshot_ok(&sock, &full, &[]);
    std::thread::sleep(std::time::Duration::from_millis(500));
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &[]);
    let s = sock.clone();
    // The capped link keeps round 1 (incompressible pages) going for seconds.
    let t = std::thread::spawn(move || migrate(&s, &addr, &["--max-bandwidth", "50M"]));
    let deadline = std::time::Instant::now() + secs(30);
    while http_get(&sock, "/vm/migration")["state"] != "active" {
        assert!(std::time::Instant::now() < deadline, "not active: {}", http_get(&sock, "/vm/migration"));
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    std::thread::sleep(std::time::Duration::from_millis(300));
    dst.child.kill().unwrap();
    let o = t.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(api("status", &sock)["state"], "running");
    let inc = g.path("inc.img");
    let s = snapshot_ok(&sock, &inc, &["--parent", full.to_str().unwrap(), "--digest"]);
    let (_r, rsock) = restore_paused(&inc, &[]);
    assert_eq!(
        api("digest", &rsock)["digest"],
        s["memory_digest"],
        "the chain holds every page written since the full image, including those the migration read"
    );
}
