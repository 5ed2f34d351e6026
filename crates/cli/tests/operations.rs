//! End to end: one operation at a time on a VM, client mistakes as 4xx,
//! files that must not be clobbered, signals, and strict HTTP framing —
//! what a hostile or careless client found (issue 7).

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One HTTP exchange: (status, headers, JSON body).
fn http(sock: &Path, method: &str, path: &str, body: Option<&serde_json::Value>) -> (u16, String, serde_json::Value) {
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!("{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    parse(&raw_http(sock, req.as_bytes()))
}

fn parse(resp: &str) -> (u16, String, serde_json::Value) {
    let (head, body) = resp.split_once("\r\n\r\n").unwrap_or((resp, ""));
    let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    (status, head.to_string(), serde_json::from_str(body).unwrap_or(serde_json::Value::Null))
}

fn snap_body(path: &Path, extra: serde_json::Value) -> serde_json::Value {
    let mut v = serde_json::json!({ "path": path });
    for (k, x) in extra.as_object().unwrap() {
        v[k] = x.clone();
    }
    v
}

/// Files in `dir` whose names contain `.tmp-` (a writer's temp file).
fn temp_files(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

/// Waits until `GET /vm` reports `op` as the running operation.
fn wait_operation(sock: &Path, op: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        let (_, _, v) = http(sock, "GET", "/vm", None);
        if v["operation"]["kind"] == op {
            return true;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    false
}

/// A slow snapshot request (zstd at its highest level over a busy working
/// set) so that other requests can arrive while it runs.
fn slow_snapshot(path: &Path) -> serde_json::Value {
    snap_body(path, serde_json::json!({"codec": "zstd", "zstd_level": 19, "digest": true}))
}

#[test]
fn pause_resume_and_digest_racing_snapshots_never_break_an_image() {
    let (g, sock) = running_guest_with("dirty wss=8 rate=max report=20", "96M", &["--vcpus", "2"]);
    let stop = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicU64::new(0));
    let mut clients = vec![];
    for i in 0..3u64 {
        let (sock, stop, sent) = (sock.clone(), stop.clone(), sent.clone());
        clients.push(std::thread::spawn(move || {
            let mut n = i;
            let deadline = Instant::now() + secs(300);
            while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                let (m, p) = match n % 3 {
                    0 => ("PUT", "/vm/pause"),
                    1 => ("PUT", "/vm/resume"),
                    _ => ("GET", "/vm/memory-digest"),
                };
                let (status, _, v) = http(&sock, m, p, None);
                assert!(matches!(status, 200 | 202 | 409), "{m} {p} -> {status} {v}");
                if status == 409 {
                    assert!(v["error"].as_str().unwrap().contains("in progress"), "{v}");
                }
                sent.fetch_add(1, Ordering::Relaxed);
                n += 1;
                std::thread::sleep(Duration::from_micros(300 * (i + 1)));
            }
        }));
    }
    let mut images = vec![];
    for k in 0..36 {
        let img = g.path(&format!("race-{k}.img"));
        let (status, _, v) =
            http(&sock, "PUT", "/vm/snapshot", Some(&snap_body(&img, serde_json::json!({"digest": true}))));
        assert_eq!(status, 200, "snapshot {k}: {v}");
        images.push((img, v["memory_digest"].as_str().unwrap().to_string(), v["stop_reason"].clone()));
    }
    stop.store(true, Ordering::Relaxed);
    for c in clients {
        c.join().unwrap();
    }
    assert!(sent.load(Ordering::Relaxed) > 100, "the clients raced the snapshots");
    // Leave the source running, as the user asked last.
    http(&sock, "PUT", "/vm/resume", None);
    for (k, (img, digest, reason)) in images.iter().enumerate() {
        let dir = tempfile::tempdir().unwrap();
        let rsock = dir.path().join("r.sock");
        let mut r =
            Guest::start_restore(dir, &[img.to_str().unwrap(), "--paused", "--api-sock", rsock.to_str().unwrap()]);
        wait_sock(&rsock);
        assert_eq!(api("digest", &rsock)["digest"].as_str().unwrap(), digest, "image {k} ({reason})");
        api("resume", &rsock);
        r.send_line("verify");
        let v = r.wait_line("VERIFY", secs(30));
        assert!(v.starts_with("VERIFY OK"), "image {k} ({reason}): {v}");
        r.wait_line("PROGRESS", secs(30));
    }
}

#[test]
fn pause_during_a_snapshot_is_honoured_and_resume_does_not_fail_it() {
    let (g, sock) = running_guest("dirty wss=48 rate=max report=100", "128M");
    // Pause while a snapshot runs: recorded, applied when it ends.
    let img = g.path("a.img");
    let s = sock.clone();
    let body = slow_snapshot(&img);
    let t = std::thread::spawn(move || http(&s, "PUT", "/vm/snapshot", Some(&body)));
    assert!(wait_operation(&sock, "snapshot", secs(30)), "snapshot never showed as the running operation");
    let (status, _, v) = http(&sock, "PUT", "/vm/pause", None);
    assert_eq!(status, 202, "{v}");
    assert_eq!(v["requested_state"], "paused");
    assert_eq!(v["applies_after"], "snapshot");
    let (status, _, v) = t.join().unwrap();
    assert_eq!(status, 200, "{v}");
    let st = api("status", &sock);
    assert_eq!(st["state"], "paused", "the user's pause outlives the snapshot: {st}");
    assert_eq!(st["requested_state"], "paused");

    // Resume while a snapshot of the paused VM runs: the snapshot succeeds and the VM runs after it.
    let img = g.path("b.img");
    let s = sock.clone();
    let body = slow_snapshot(&img);
    let t = std::thread::spawn(move || http(&s, "PUT", "/vm/snapshot", Some(&body)));
    assert!(wait_operation(&sock, "snapshot", secs(30)));
    let (status, _, v) = http(&sock, "PUT", "/vm/resume", None);
    assert_eq!(status, 202, "{v}");
    let (status, _, v) = t.join().unwrap();
    assert_eq!(status, 200, "a resume during a snapshot must not fail it: {v}");
    assert_eq!(api("status", &sock)["state"], "running");

    // Other operations during a snapshot get 409 naming it.
    let img = g.path("c.img");
    let s = sock.clone();
    let body = slow_snapshot(&img);
    let t = std::thread::spawn(move || http(&s, "PUT", "/vm/snapshot", Some(&body)));
    assert!(wait_operation(&sock, "snapshot", secs(30)));
    for (m, p, body) in [
        ("PUT", "/vm/snapshot", Some(snap_body(&g.path("d.img"), serde_json::json!({})))),
        ("GET", "/vm/memory-digest", None),
        ("PUT", "/vm/shutdown", None),
    ] {
        let (status, _, v) = http(&sock, m, p, body.as_ref());
        assert_eq!(status, 409, "{m} {p}: {v}");
        assert_eq!(v["operation"], "snapshot", "{v}");
        assert!(v["error"].as_str().unwrap().contains("snapshot is in progress"), "{v}");
    }
    assert_eq!(t.join().unwrap().0, 200);
    assert!(!g.path("d.img").exists());
    assert!(temp_files(g.dir.path()).is_empty(), "{:?}", temp_files(g.dir.path()));
}

#[test]
fn guest_stopping_during_a_snapshot_answers_the_client_and_leaves_no_temp_file() {
    let (mut g, sock) = running_guest("dirty wss=48 rate=max report=100", "128M");
    let img = g.path("a.img");
    let s = sock.clone();
    let body = slow_snapshot(&img);
    let t = std::thread::spawn(move || http(&s, "PUT", "/vm/snapshot", Some(&body)));
    assert!(wait_operation(&sock, "snapshot", secs(30)));
    g.send_line("exit 3");
    let (status, _, v) = t.join().unwrap();
    assert!(status == 409 || status == 500 || status == 200, "{status} {v}");
    assert!(v["error"].is_string() || v["root_hash"].is_string(), "a real answer, not a cut connection: {v}");
    assert_eq!(g.wait_exit(secs(60)).code(), Some(3));
    assert!(temp_files(g.dir.path()).is_empty(), "{:?}", temp_files(g.dir.path()));
    if status != 200 {
        assert!(!img.exists(), "a failed snapshot leaves no image");
    }
}

#[test]
fn snapshot_paths_and_fields_that_are_client_mistakes_get_400() {
    let (g, sock) = running_guest("dirty wss=4 rate=20000 report=100", "64M");
    let dir = g.dir.path();
    std::fs::create_dir(dir.join("sub")).unwrap();
    std::fs::write(dir.join("target"), b"precious").unwrap();
    std::os::unix::fs::symlink(dir.join("target"), dir.join("link.img")).unwrap();
    std::os::unix::fs::symlink("/dev/null", dir.join("null-link.img")).unwrap();
    let cases: Vec<(serde_json::Value, &str)> = vec![
        (serde_json::json!({"path": "/dev/null"}), "character device"),
        (serde_json::json!({"path": ""}), "empty"),
        (serde_json::json!({"path": "/"}), "directory"),
        (serde_json::json!({"path": "/tmp/a\u{0}b.img"}), "NUL"),
        (serde_json::json!({"path": dir.join("missing/a.img")}), "does not exist"),
        (serde_json::json!({"path": "/proc/self/ferry.img"}), "pseudo filesystem"),
        (serde_json::json!({"path": "/sys/kernel/ferry.img"}), "pseudo filesystem"),
        (serde_json::json!({"path": dir.join("sub")}), "directory"),
        (serde_json::json!({"path": dir.join("link.img")}), "symbolic link"),
        (serde_json::json!({"path": dir.join("null-link.img")}), "symbolic link"),
        (serde_json::json!({"path": "relative.img"}), "relative"),
        (serde_json::json!({"path": dir.join("z.img"), "codec": "zstd", "zstd_level": 99}), "zstd_level"),
        (serde_json::json!({"path": dir.join("z.img"), "codec": "gzip"}), "unknown variant"),
        (serde_json::json!({"path": dir.join("z.img"), "max_rounds": 0}), "max_rounds"),
        (serde_json::json!({"path": dir.join("z.img"), "key_file": "key"}), "relative"),
        (serde_json::json!({"path": dir.join("z.img"), "key_file": dir.join("nokey")}), "key"),
        (serde_json::json!({"path": dir.join("z.img"), "parent": dir.join("noparent.img")}), "parent"),
    ];
    for (body, words) in cases {
        let (status, _, v) = http(&sock, "PUT", "/vm/snapshot", Some(&body));
        assert_eq!(status, 400, "{body} -> {v}");
        assert!(v["error"].as_str().unwrap().contains(words), "{body} -> {v} (expected {words:?})");
    }
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device(), "/dev/null is still a device");
    assert_eq!(std::fs::read(dir.join("target")).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(dir.join("link.img")).unwrap().file_type().is_symlink());
    assert!(!dir.join("z.img").exists());
    // The CLI refuses a device too, and says why.
    let o = snapshot(&sock, Path::new("/dev/null"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("character device"), "{}", String::from_utf8_lossy(&o.stderr));
    assert!(std::fs::metadata("/dev/null").unwrap().file_type().is_char_device());
    // The VM is unharmed and still snapshots.
    assert_eq!(api("status", &sock)["state"], "running");
    snapshot_ok(&sock, &dir.join("ok.img"), &[]);
}

#[test]
fn termination_signals_stop_the_vm_cleanly() {
    for sig in ["TERM", "INT", "HUP"] {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("api.sock");
        let report = dir.path().join("report.json");
        let mut g = Guest::start_in(
            dir,
            &[
                "--kernel",
                "builtin:test",
                "--mem",
                "64M",
                "--cmdline",
                "dirty wss=4 rate=max report=100",
                "--api-sock",
                sock.to_str().unwrap(),
                "--report",
                report.to_str().unwrap(),
            ],
        );
        g.wait_line("PROGRESS", secs(60));
        wait_sock(&sock);
        let pid = g.child.id().to_string();
        assert!(std::process::Command::new("kill").args([&format!("-{sig}"), &pid]).status().unwrap().success());
        // The guest gets Ctrl-Alt-Del: it verifies its memory and exits 0.
        g.wait_line("SHUTDOWN ctrl-alt-del", secs(30));
        let st = g.wait_exit(secs(60));
        assert_eq!(st.code(), Some(0), "SIG{sig}: {:?}", g.stderr_lines());
        assert!(g.seen.iter().any(|l| l.starts_with("VERIFY OK")), "SIG{sig}: {:?}", g.seen);
        assert!(!sock.exists(), "SIG{sig}: the API socket is removed");
        let r: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
        assert_eq!(r["signal"], format!("SIG{sig}"), "{r}");
    }
}

#[test]
fn a_second_signal_stops_a_guest_that_ignores_the_first() {
    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("api.sock");
    // A paused guest cannot answer Ctrl-Alt-Del... it is resumed for it, so
    // use a long timeout and a second signal instead.
    let mut g = Guest::start_in(
        dir,
        &[
            "--kernel",
            "builtin:test",
            "--mem",
            "32M",
            "--cmdline",
            "idle",
            "--api-sock",
            sock.to_str().unwrap(),
            "--shutdown-timeout-ms",
            "600000",
        ],
    );
    g.wait_line("FERRY-GUEST boot", secs(60));
    wait_sock(&sock);
    let pid = g.child.id().to_string();
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    std::process::Command::new("kill").args(["-TERM", &pid]).status().unwrap();
    let st = g.wait_exit(secs(30));
    assert!(st.code().is_some(), "ferry exits (not killed by the signal): {st:?}");
    assert!(!sock.exists());
}

#[test]
fn http_framing_is_strict_and_connections_are_bounded() {
    let (_g, sock) = running_guest("idle", "32M");
    // 405 carries Allow.
    let (status, head, _) = http(&sock, "DELETE", "/vm/snapshot", None);
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("\r\nallow: put"), "{head}");
    let (status, head, _) = http(&sock, "PUT", "/vm", None);
    assert_eq!(status, 405);
    assert!(head.to_ascii_lowercase().contains("\r\nallow: get"), "{head}");
    // Content-Length: one, digits only.
    for req in [
        &b"PUT /vm/pause HTTP/1.1\r\nContent-Length: +2\r\n\r\n{}"[..],
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 0\r\n\r\n{}",
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\n{}",
        b"PUT /vm/pause HTTP/1.1\r\nContent-Length: 0x2\r\n\r\n{}",
    ] {
        let (status, _, v) = parse(&raw_http(&sock, req));
        assert_eq!(status, 400, "{:?} -> {v}", String::from_utf8_lossy(req));
        assert!(v["error"].as_str().unwrap().contains("Content-Length"), "{v}");
    }
    assert_eq!(api("status", &sock)["state"], "running", "none of them paused the VM");
    // The body limit counts the body and says so.
    let big = format!("PUT /vm/console HTTP/1.1\r\nContent-Length: {}\r\n\r\n", (1 << 20) + 1);
    let (status, _, v) = parse(&raw_http(&sock, big.as_bytes()));
    assert_eq!(status, 413, "{v}");
    assert!(v["error"].as_str().unwrap().contains("body of 1048577 bytes"), "{v}");
    let body = format!("{{\"input\": \"{}\"}}", "x".repeat((1 << 20) - 20));
    let ok = format!("PUT /vm/console HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len());
    assert_eq!(parse(&raw_http(&sock, ok.as_bytes())).0, 200, "a body just under 1 MiB is accepted");
    // A head over the limit.
    let long = format!("GET /vm HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(20_000));
    assert_eq!(parse(&raw_http(&sock, long.as_bytes())).0, 431);

    // Bounded connections: 300 idle clients do not make 300 threads, and
    // the API answers again once they leave.
    let pid = _g.child.id();
    let threads = || -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Threads:").map(|v| v.trim().parse().unwrap()))
            .unwrap()
    };
    let before = threads();
    let idle: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(&sock).unwrap()).collect();
    std::thread::sleep(Duration::from_millis(500));
    let during = threads();
    assert!(during <= before + 70, "threads {before} -> {during} with 300 idle connections");
    // An extra client is told to come back, not left hanging.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.set_read_timeout(Some(secs(5))).unwrap();
    s.write_all(b"GET /vm HTTP/1.1\r\n\r\n").unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 503"), "{out}");
    drop(idle);
    let deadline = Instant::now() + secs(20);
    loop {
        let (status, _, _) = http(&sock, "GET", "/vm", None);
        if status == 200 {
            break;
        }
        assert!(Instant::now() < deadline, "API did not recover after idle clients left");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn an_incremental_never_replaces_its_parent_nor_drops_its_encryption() {
    let (g, sock) = running_guest("dirty wss=4 rate=20000 report=100", "64M");
    let dir = g.dir.path();
    let base = dir.join("base.img");
    snapshot_ok(&sock, &base, &[]);
    for spelled in
        [base.clone(), dir.join(".").join("base.img"), Path::new(&format!("{}//base.img", dir.display())).to_path_buf()]
    {
        let body = serde_json::json!({"path": spelled, "parent": base});
        let (status, _, v) = http(&sock, "PUT", "/vm/snapshot", Some(&body));
        assert_eq!(status, 400, "{body} -> {v}");
        assert!(v["error"].as_str().unwrap().contains("its own parent"), "{v}");
    }
    let o = ferry_cmd(&["image", "verify", base.to_str().unwrap()]);
    assert!(o.status.success(), "the parent is intact: {}", String::from_utf8_lossy(&o.stderr));
    // An encrypted parent: its child must be encrypted too.
    let key = dir.join("key");
    std::fs::write(&key, b"0123456789abcdef0123456789abcdef").unwrap();
    let enc = dir.join("enc.img");
    snapshot_ok(&sock, &enc, &["--encrypt", "--key-file", key.to_str().unwrap()]);
    let body = serde_json::json!({"path": dir.join("child.img"), "parent": enc});
    let (status, _, v) = http(&sock, "PUT", "/vm/snapshot", Some(&body));
    assert_eq!(status, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("encrypted"), "{v}");
    assert!(!dir.join("child.img").exists());
}
