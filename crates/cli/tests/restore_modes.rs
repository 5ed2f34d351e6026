//! End to end: `ferry restore --memory eager|lazy`. Lazy memory arrives on
//! first touch (userfaultfd) and by a background prefetch; whichever way a
//! page comes in, the restored memory must equal the snapshot's.

mod common;
use common::*;
use std::path::{Path, PathBuf};

/// Takes a snapshot with `--digest` and returns the memory digest.
fn snapshot_digest(sock: &Path, out: &Path, extra: &[&str]) -> String {
    let mut args = vec!["--digest"];
    args.extend_from_slice(extra);
    snapshot_ok(sock, out, &args)["memory_digest"].as_str().unwrap().to_string()
}

/// `ferry restore IMG --memory MODE` with an API socket and a report file.
fn restore(img: &Path, mode: &str, extra: &[&str]) -> (Guest, PathBuf, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("r.sock");
    let report = dir.path().join("report.json");
    let mut args = vec![
        img.to_str().unwrap(),
        "--memory",
        mode,
        "--api-sock",
        sock.to_str().unwrap(),
        "--report",
        report.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let g = Guest::start_restore(dir, &args);
    wait_sock(&sock);
    (g, sock, report)
}

/// Stops a restored VM and returns the `restore` part of its report.
fn stop_and_report(mut g: Guest, sock: &Path, report: &Path) -> serde_json::Value {
    let o = ferry_cmd(&["shutdown", "--api-sock", sock.to_str().unwrap(), "--timeout-ms", "200"]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    g.wait_exit(secs(30));
    let r: serde_json::Value = serde_json::from_slice(&std::fs::read(report).unwrap()).unwrap();
    r["restore"].clone()
}

#[test]
fn lazy_restore_of_full_incremental_and_encrypted_images_has_the_snapshot_digest() {
    let (mut g, sock) = running_guest("dirty wss=16 rate=max report=100", "128M");
    let full = g.path("full.img");
    let full_digest = snapshot_digest(&sock, &full, &[]);
    // Let the guest run (and dirty memory) before the incremental one, even on a loaded host.
    g.wait_line("PROGRESS", secs(30));
    let incr = g.path("incr.img");
    let incr_digest = snapshot_digest(&sock, &incr, &["--parent", full.to_str().unwrap()]);
    assert_ne!(full_digest, incr_digest, "the guest kept dirtying memory between the snapshots");
    let key = g.path("key");
    std::fs::write(&key, b"lazy pages, same secrets").unwrap();
    let enc = g.path("enc.img");
    let enc_digest = snapshot_digest(&sock, &enc, &["--encrypt", "--key-file", key.to_str().unwrap()]);
    for (img, digest) in [(&full, &full_digest), (&incr, &incr_digest), (&enc, &enc_digest)] {
        let mut extra = vec!["--paused", "--serial", "none"];
        if img == &enc {
            extra.extend_from_slice(&["--key-file", key.to_str().unwrap()]);
        }
        // Lazy: the digest reads every page, most of them before the prefetch reaches them.
        let (r, rsock, report) = restore(img, "lazy", &extra);
        assert_eq!(api("digest", &rsock)["digest"].as_str().unwrap(), digest, "lazy {}", img.display());
        assert_eq!(api("status", &rsock)["state"], "paused");
        let rep = stop_and_report(r, &rsock, &report);
        assert_eq!(rep["memory_mode"], "lazy", "{rep}");
        let lazy = &rep["lazy"];
        assert!(lazy["error"].is_null(), "{rep}");
        let data = lazy["data_pages"].as_u64().unwrap();
        let brought = lazy["pages_faulted"].as_u64().unwrap() + lazy["pages_prefetched"].as_u64().unwrap();
        assert!(brought > 0 && brought <= data, "pages brought in ({brought}) vs data pages ({data}): {rep}");
        // Eager (two fill threads): the same digest.
        let (r, rsock, report) = restore(img, "eager", &extra);
        assert_eq!(api("digest", &rsock)["digest"].as_str().unwrap(), digest, "eager {}", img.display());
        let rep = stop_and_report(r, &rsock, &report);
        assert_eq!(rep["memory_mode"], "eager", "{rep}");
        assert!(rep["data_bytes"].as_u64().unwrap() > 0, "{rep}");
        assert!(rep["lazy"].is_null(), "{rep}");
    }
}

#[test]
fn lazily_restored_guest_runs_at_once_and_verifies() {
    let (g, sock) = running_guest("dirty wss=16 rate=max report=100", "128M");
    let img = g.path("full.img");
    snapshot_digest(&sock, &img, &[]);
    let (mut r, rsock, report) = restore(&img, "lazy", &[]);
    let p = r.wait_line("PROGRESS", secs(30));
    assert!(field(&p, "seq").unwrap() >= 1, "the guest continues its sequence: {p}");
    assert!(!r.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "restore must not reboot: {:?}", r.seen);
    r.send_line("verify");
    let v = r.wait_line("VERIFY", secs(60));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    let err = r.stderr_lines().join("\n");
    assert!(err.contains("memory lazy") && err.contains("first guest instruction"), "{err}");
    let rep = stop_and_report(r, &rsock, &report);
    let first = rep["first_instruction_ms"].as_f64().unwrap();
    assert!(first > 0.0, "{rep}");
    assert!(rep["lazy"]["faults"].as_u64().unwrap() > 0, "a running guest faults pages in: {rep}");
    eprintln!("lazy restore: first guest instruction {first:.1} ms after start; {}", rep["lazy"]);
}

#[test]
fn lazy_restore_stops_the_vm_on_a_corrupt_chunk() {
    let (g, sock) = running_guest("dirty wss=8 rate=20000 report=100", "64M");
    let full = g.path("full.img");
    snapshot_digest(&sock, &full, &[]);
    let mut b = std::fs::read(&full).unwrap();
    let at = b.len() / 3;
    b[at] ^= 0x10;
    let bad = g.path("bad.img");
    std::fs::write(&bad, b).unwrap();
    // Headers and footers are intact, so the guest starts; the prefetcher then
    // finds the chunk and the VM is stopped with what and where.
    let dir = tempfile::tempdir().unwrap();
    let report = dir.path().join("report.json");
    let mut r = Guest::start_restore(
        dir,
        &[bad.to_str().unwrap(), "--memory", "lazy", "--serial", "none", "--report", report.to_str().unwrap()],
    );
    let status = r.wait_exit(secs(60));
    let err = r.stderr_lines().join("\n");
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("lazy restore") && err.to_lowercase().contains("chunk"), "{err}");
    assert!(err.contains("bad.img"), "names the image: {err}");
    assert!(!err.contains("panicked"), "{err}");
    let rep: serde_json::Value = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert!(rep["restore"]["lazy"]["error"].as_str().unwrap().to_lowercase().contains("chunk"), "{rep}");
    // Eager refuses the same image before anything runs.
    let o = ferry_cmd(&["restore", bad.to_str().unwrap(), "--serial", "none"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).to_lowercase().contains("chunk"));
}

#[test]
fn unknown_memory_mode_is_a_usage_error() {
    let o = ferry_cmd(&["restore", "/nonexistent.img", "--memory", "sometimes"]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("eager") && err.contains("lazy"), "{err}");
}

#[test]
fn snapshot_of_a_lazily_restored_guest_works_while_it_prefetches() {
    let (g, sock) = running_guest("dirty wss=16 rate=max report=100", "256M");
    let img = g.path("a.img");
    snapshot_digest(&sock, &img, &[]);
    let (_r, rsock, _report) = restore(&img, "lazy", &[]);
    // At once, while the prefetch may still be bringing memory in: the
    // snapshot waits for it (unpopulated pages are not zero yet) and the
    // image must hold exactly the memory at its pause.
    let again = g.path("b.img");
    let s = snapshot_ok(&rsock, &again, &["--max-rounds", "1", "--digest"]);
    let (_q, qsock) = {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("q.sock");
        let g = Guest::start_restore(dir, &[again.to_str().unwrap(), "--paused", "--api-sock", sock.to_str().unwrap()]);
        wait_sock(&sock);
        (g, sock)
    };
    assert_eq!(api("digest", &qsock)["digest"], s["memory_digest"]);
}
