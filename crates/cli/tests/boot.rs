//! End to end: boot the embedded test guest through the real `ferry` binary.

mod common;
use common::*;
use std::time::Duration;

#[test]
fn dirty_workload_progresses_verifies_and_exits_with_guest_status() {
    let mut g = Guest::start(&[
        "--kernel",
        "builtin:test",
        "--mem",
        "64M",
        "--cmdline",
        "dirty wss=8 rate=max passes=40 report=0",
    ]);
    let boot = g.wait_line("FERRY-GUEST boot", secs(60));
    assert_eq!(field(&boot, "cpus"), Some(1), "{boot}");
    let marked = g.wait_line("MARKED", secs(30));
    assert!(field(&marked, "pages").unwrap() > 10_000, "{marked}");
    let p1 = g.wait_line("PROGRESS", secs(30));
    let p2 = g.wait_line("PROGRESS", secs(30));
    assert_eq!(field(&p2, "seq").unwrap(), field(&p1, "seq").unwrap() + 1, "sequence numbers count up by one");
    let v = g.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    let st = g.wait_exit(secs(30));
    assert_eq!(st.code(), Some(0));
}

#[test]
fn pause_stops_progress_and_resume_continues() {
    let (mut g, sock) = running_guest("dirty wss=8 rate=20000 report=20", "64M");
    let st = api("status", &sock);
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"], 1);
    assert_eq!(st["mem_bytes"], 64 << 20);
    assert_eq!(api("pause", &sock)["state"], "paused");
    assert_eq!(api("status", &sock)["state"], "paused");
    // Anything already in flight drains quickly; after that, silence.
    g.collect_for(Duration::from_millis(300));
    let during = g.collect_for(Duration::from_millis(1000));
    assert!(during.is_empty(), "guest printed while paused: {during:?}");
    let last_seq =
        g.seen.iter().rev().find_map(|l| if l.starts_with("PROGRESS") { field(l, "seq") } else { None }).unwrap();
    api("resume", &sock);
    let next = g.wait_line("PROGRESS", secs(10));
    assert_eq!(field(&next, "seq"), Some(last_seq + 1), "progress resumes where it stopped");
}

#[test]
fn verify_command_over_serial_and_graceful_shutdown_status() {
    let (mut g, sock) = running_guest("dirty wss=16 rate=max report=50", "64M");
    g.send_line("verify");
    let v = g.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    // The same through the API's console endpoint.
    let out = ferry_cmd(&["console", "--api-sock", sock.to_str().unwrap(), "verify"]);
    assert!(out.status.success());
    let v = g.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    // Graceful shutdown: the guest verifies once more and exits with status 0.
    let out = ferry_cmd(&["shutdown", "--api-sock", sock.to_str().unwrap()]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v = g.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    assert_eq!(g.wait_exit(secs(30)).code(), Some(0));
    assert!(!sock.exists(), "API socket removed on exit");
}

#[test]
fn guest_exit_status_is_ferrys_exit_status() {
    let mut g = Guest::start(&["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "exit=7"]);
    assert_eq!(g.wait_exit(secs(60)).code(), Some(7));
}

#[test]
fn two_vcpus_both_run_guest_code() {
    let mut g = Guest::start(&[
        "--kernel",
        "builtin:test",
        "--mem",
        "64M",
        "--vcpus",
        "2",
        "--cmdline",
        "dirty wss=8 rate=max passes=30 report=0",
    ]);
    let boot = g.wait_line("FERRY-GUEST boot", secs(60));
    assert_eq!(field(&boot, "cpus"), Some(2), "guest found 2 CPUs in ferry's MP table: {boot}");
    g.wait_line("CPU 1 online", secs(60));
    let v = g.wait_line("VERIFY", secs(60));
    assert!(v.starts_with("VERIFY OK"), "{v}");
    assert_eq!(g.wait_exit(secs(30)).code(), Some(0));
}

#[test]
fn memory_digest_is_stable_while_paused_and_changes_with_the_guest() {
    let (mut g, sock) = running_guest("dirty wss=8 rate=max report=50", "64M");
    api("pause", &sock);
    let d1 = api("digest", &sock);
    let d2 = api("digest", &sock);
    assert_eq!(d1["digest"], d2["digest"]);
    assert_eq!(d1["bytes"], 64 << 20);
    assert_eq!(d1["digest"].as_str().unwrap().len(), 64);
    api("resume", &sock);
    g.wait_line("PROGRESS", secs(10));
    let d3 = api("digest", &sock); // pauses and resumes by itself
    assert_ne!(d1["digest"], d3["digest"], "the running guest changed its memory");
    assert_eq!(api("status", &sock)["state"], "running", "digest of a running VM resumes it");
}

#[test]
fn guest_export_writes_a_pvh_elf() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("guest.elf");
    let o = ferry_cmd(&["guest", "export", "--out", out.to_str().unwrap()]);
    assert!(o.status.success());
    let bytes = std::fs::read(&out).unwrap();
    assert_eq!(&bytes[..4], b"\x7fELF");
    // And ferry boots the exported file like any other kernel.
    let mut g = Guest::start(&["--kernel", out.to_str().unwrap(), "--mem", "32M", "--cmdline", "exit=3"]);
    assert_eq!(g.wait_exit(secs(60)).code(), Some(3));
}

#[test]
fn serial_to_a_file_and_to_a_unix_socket() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("serial.log");
    let spec = format!("file:{}", log.display());
    let mut g = Guest::start(&["--kernel", "builtin:test", "--mem", "32M", "--cmdline", "exit=5", "--serial", &spec]);
    assert_eq!(g.wait_exit(secs(60)).code(), Some(5));
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("FERRY-GUEST boot"), "{text}");

    // unix:PATH connects to a listening socket, both directions.
    let sock = dir.path().join("console.sock");
    let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let spec = format!("unix:{}", sock.display());
    let mut g = Guest::start(&[
        "--kernel",
        "builtin:test",
        "--mem",
        "32M",
        "--cmdline",
        "dirty wss=4 rate=20000 report=50",
        "--serial",
        &spec,
    ]);
    let (conn, _) = listener.accept().unwrap();
    conn.set_read_timeout(Some(secs(60))).unwrap();
    let mut reader = std::io::BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    use std::io::{BufRead, Write};
    loop {
        line.clear();
        assert!(reader.read_line(&mut line).unwrap() > 0, "console closed");
        if line.starts_with("PROGRESS") {
            break;
        }
    }
    (&conn).write_all(b"exit 9\n").unwrap();
    assert_eq!(g.wait_exit(secs(30)).code(), Some(9));
}
