//! End to end: live migration between two ferry processes on this machine
//! (unix sockets and loopback TCP, with and without TLS), and the faults
//! that must leave the guest running on exactly one side.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ferry_migrate::wire::{FrameReader, FrameWriter, Hello, Message};

/// Migrates a busy guest and checks everything the destination must show;
/// returns the source's statistics.
fn migrate_and_check(vcpus: &str, listen: &str, dst_extra: &[String], src_extra: &[String]) -> serde_json::Value {
    let (mut src, ssock) = running_guest_with("dirty wss=8 rate=max report=50", "96M", &["--vcpus", vcpus]);
    let dst_extra: Vec<&str> = dst_extra.iter().map(|s| s.as_str()).collect();
    let (mut dst, dsock, addr) = receiver(listen, &dst_extra);
    assert_eq!(api("status", &dsock)["state"], "incoming");
    src.wait_line("PROGRESS", secs(10));
    let mut extra: Vec<&str> = vec!["--verify-digest"];
    extra.extend(src_extra.iter().map(|s| s.as_str()));
    let o = migrate(&ssock, &addr, &extra);
    assert!(o.status.success(), "migrate failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    let d = v["memory_digest"].as_str().unwrap();
    assert_eq!(
        Some(d),
        v["destination_digest"].as_str(),
        "memory at the source's final pause equals the destination's"
    );
    assert!(v["rounds"].as_array().unwrap().len() >= 2, "{v}");
    assert!(v["pages_skipped_unpopulated"].as_u64().unwrap() > 0, "{v}");
    // The source gave the guest up and exits 0.
    assert_eq!(src.wait_exit(secs(30)).code(), Some(0));
    assert!(src.stderr_lines().join("\n").contains("migrated to"), "source says where the guest went");
    // The guest carries on at the destination: its sequence continues with no repeat.
    let p = dst.wait_line("PROGRESS", secs(30));
    let last_src = *seqs(&src.seen).last().expect("source printed progress");
    let first_dst = field(&p, "seq").unwrap();
    assert!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "sequence continues: source ended at {last_src}, destination began at {first_dst}"
    );
    assert!(!dst.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "no reboot: {:?}", dst.seen);
    dst.send_line("verify");
    let ok = dst.wait_line("VERIFY", secs(30));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    let st = api("status", &dsock);
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"].as_u64().unwrap().to_string(), vcpus);
    let o = ferry_cmd(&["shutdown", "--api-sock", dsock.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0));
    v
}

#[test]
fn migrates_over_a_unix_socket_with_one_vcpu_and_plots_the_rounds() {
    let out = tempfile::tempdir().unwrap();
    let svg = out.path().join("rounds.svg");
    migrate_and_check("1", "unix://DIR/mig.sock", &[], &["--plot".into(), svg.to_str().unwrap().into()]);
    let text = std::fs::read_to_string(&svg).unwrap();
    assert!(text.contains("<svg") && text.contains("pages per round"), "{}", &text[..text.len().min(300)]);
}

#[test]
fn migrates_over_insecure_tcp_with_two_vcpus_uncompressed() {
    migrate_and_check(
        "2",
        "tcp://127.0.0.1:0",
        &["--insecure".into()],
        &["--insecure".into(), "--compress".into(), "none".into()],
    );
}

#[test]
fn migrates_over_insecure_tcp_with_zstd_pages() {
    let v = migrate_and_check(
        "1",
        "tcp://127.0.0.1:0",
        &["--insecure".into()],
        &["--insecure".into(), "--compress".into(), "zstd".into()],
    );
    assert_eq!(v["compress"], "zstd", "{v}");
    // One marked word per page: zstd must have shrunk the pages far below raw.
    let raw = v["pages_normal"].as_u64().unwrap() * 4096;
    assert!(v["bytes_sent"].as_u64().unwrap() * 10 < raw, "{v}");
}

/// A destination built before zstd: it reads the hello and refuses every
/// capability it does not know, as `check_hello` does. Returns the
/// capabilities the source proposed.
fn old_destination(path: PathBuf) -> std::thread::JoinHandle<Vec<String>> {
    let l = UnixListener::bind(&path).unwrap();
    std::thread::spawn(move || {
        let (c, _) = l.accept().unwrap();
        let mut r = FrameReader::new(c.try_clone().unwrap());
        let mut w = FrameWriter::new(c);
        let Message::Hello(h) = r.recv().unwrap() else { panic!("expected a hello") };
        let reason = match h.capabilities.iter().find(|c| c.as_str() != "memory-digest") {
            Some(c) => format!("unknown capability {c:?}"),
            None => "this test destination takes no migration".to_string(),
        };
        w.send(&Message::Refuse(ferry_migrate::wire::Reason { reason })).unwrap();
        w.flush().unwrap();
        h.capabilities
    })
}

#[test]
fn a_destination_without_zstd_refuses_it_at_the_hello_and_the_guest_stays() {
    let (mut src, ssock) = running_guest("dirty wss=4 rate=max report=100", "64M");
    let dir = tempfile::tempdir().unwrap();
    // zstd is proposed as a capability: an old destination refuses before any memory moves.
    let t = old_destination(dir.path().join("old.sock"));
    let to = format!("unix://{}", dir.path().join("old.sock").display());
    let o = migrate(&ssock, &to, &["--compress", "zstd"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("refused") && err.contains("unknown capability \"zstd-pages\""), "{err}");
    assert_eq!(t.join().unwrap(), vec!["zstd-pages".to_string()]);
    source_still_fine(&mut src, &ssock);
    // lz4 (the default) and none do not propose it.
    for codec in ["lz4", "none"] {
        let sock = dir.path().join(format!("old-{codec}.sock"));
        let t = old_destination(sock.clone());
        let o = migrate(&ssock, &format!("unix://{}", sock.display()), &["--compress", codec]);
        assert_eq!(o.status.code(), Some(1));
        assert!(t.join().unwrap().is_empty(), "{codec}");
    }
    source_still_fine(&mut src, &ssock);
}

/// With `--max-bandwidth 20M`, round 1 of a 256 MiB guest full of random
/// (incompressible) pages is paced: the wire rate the source measured and
/// reports stays within 10% of the cap, and the guest arrives intact.
#[test]
fn a_bandwidth_cap_paces_the_stream_and_the_guest_arrives_intact() {
    let (mut src, ssock) = running_guest("dirty wss=1 rate=1000 fill=random report=100", "256M");
    // Bad rates are refused before anything starts: exit 2 from the CLI, 400 from the API.
    for bad in ["20Q", "fast", "0", "100Mbps"] {
        let o = migrate(&ssock, "unix:///nonexistent", &["--max-bandwidth", bad]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(2), "{bad}: {err}");
        assert!(err.contains("--max-bandwidth") && err.contains(bad), "{bad}: {err}");
    }
    for body in [r#"{"to":"unix:///x","max_bandwidth":"20Q"}"#, r#"{"to":"unix:///x","max_bandwidth":5}"#] {
        let r = raw_http(
            &ssock,
            format!("PUT /vm/migrate HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes(),
        );
        assert!(r.starts_with("HTTP/1.1 400"), "{body}: {r}");
        assert!(r.contains("max_bandwidth") || r.contains("rate"), "{body}: {r}");
    }
    assert_eq!(api("status", &ssock)["state"], "running");

    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
    let cap = 20u64 << 20;
    let o = migrate(&ssock, &addr, &["--max-bandwidth", "20M", "--verify-digest"]);
    assert!(o.status.success(), "migrate failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    eprintln!("capped migration: {v}");
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["max_bandwidth"].as_u64(), Some(cap), "{v}");
    assert_eq!(v["memory_digest"], v["destination_digest"], "{v}");
    let r1 = &v["rounds"][0];
    let r1_bytes = r1["wire_bytes"].as_u64().unwrap();
    assert!(r1_bytes > 200 << 20, "round 1 carries the random-filled memory raw: {r1}");
    let rate = r1["wire_bytes_per_s"].as_f64().unwrap();
    eprintln!("round 1: {r1_bytes} bytes at {:.2} MiB/s on the wire (cap 20 MiB/s)", rate / 1048576.0);
    assert!(rate <= cap as f64 * 1.1, "round 1 ran at {rate:.0} bytes/s against a cap of {cap}: {r1}");
    assert!(v["throughput_mb_per_s"].as_f64().unwrap() * 1e6 <= cap as f64 * 1.1, "{v}");
    assert!(v["bandwidth_wait_ms"].as_f64().unwrap() > 0.0, "the sender waited on the cap: {v}");
    for r in v["rounds"].as_array().unwrap() {
        assert!(r["wire_bytes_per_s"].as_f64().unwrap() <= cap as f64 * 1.1, "every round keeps the cap: {v}");
    }
    assert_eq!(src.wait_exit(secs(30)).code(), Some(0));
    dst.wait_line("PROGRESS", secs(30));
    dst.send_line("verify");
    let ok = dst.wait_line("VERIFY", secs(60));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    let o = ferry_cmd(&["shutdown", "--api-sock", dsock.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0));
}

#[test]
fn migrates_over_mutual_tls_with_two_vcpus() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["src", "127.0.0.1"]);
    let mut dst = tls_args(ca.path(), "127.0.0.1");
    dst.extend(["--allow-peer".into(), "src".into()]);
    let mut src = tls_args(ca.path(), "src");
    src.extend(["--streams".into(), "3".into()]);
    let v = migrate_and_check("2", "tcp://127.0.0.1:0", &dst, &src);
    // Three authenticated connections carried the pages.
    let per_stream: Vec<u64> = v["stream_bytes"].as_array().unwrap().iter().map(|b| b.as_u64().unwrap()).collect();
    assert_eq!(per_stream.len(), 3, "{v}");
    assert!(per_stream.iter().all(|&b| b > 4096), "every stream carried pages: {per_stream:?}");
    assert_eq!(per_stream.iter().sum::<u64>(), v["bytes_sent"].as_u64().unwrap(), "{v}");
}

/// The source keeps its guest running and intact after a failed migration.
fn source_still_fine(src: &mut Guest, ssock: &Path) {
    assert_eq!(api("status", ssock)["state"], "running");
    let p = src.wait_line("PROGRESS", secs(30));
    assert!(p.starts_with("PROGRESS"));
    src.send_line("verify");
    let v = src.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{v}");
}

#[test]
fn tls_refusals_leave_the_guest_at_the_source() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["src", "127.0.0.1", "intruder"]);
    let other = tempfile::tempdir().unwrap();
    certs(other.path(), &["src"]);
    let (mut src, ssock) = running_guest("dirty wss=4 rate=max report=100", "64M");
    // A source whose name the destination does not allow.
    let mut d = tls_args(ca.path(), "127.0.0.1");
    d.extend(["--allow-peer".into(), "src".into()]);
    let dargs: Vec<&str> = d.iter().map(|s| s.as_str()).collect();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (tls_args(ca.path(), "intruder"), "allow-list"),
        (tls_args(other.path(), "src"), "CA"),
        (vec!["--insecure".into()], ""),
    ];
    for (sargs, words) in cases {
        let (mut dst, _dsock, addr) = receiver("tcp://127.0.0.1:0", &dargs);
        let s: Vec<&str> = sargs.iter().map(|s| s.as_str()).collect();
        let o = migrate(&ssock, &addr, &s);
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{sargs:?}: {err}");
        assert!(err.contains(words), "{sargs:?}: {err}");
        source_still_fine(&mut src, &ssock);
        let _ = dst.child.kill();
    }
    // Plain TCP needs an explicit --insecure; the destination's name must match.
    let o = migrate(&ssock, "tcp://127.0.0.1:9", &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("insecure"), "{}", String::from_utf8_lossy(&o.stderr));
    let (_dst, _d, addr) = receiver("tcp://127.0.0.1:0", &dargs);
    let mut s = tls_args(ca.path(), "src");
    s.extend(["--peer-name".into(), "elsewhere".into()]);
    let s: Vec<&str> = s.iter().map(|x| x.as_str()).collect();
    let o = migrate(&ssock, &addr, &s);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("elsewhere"), "{}", String::from_utf8_lossy(&o.stderr));
    source_still_fine(&mut src, &ssock);
}

#[test]
fn destination_killed_mid_stream_leaves_the_guest_at_the_source() {
    let (mut src, ssock) = running_guest("dirty wss=32 rate=max report=100", "256M");
    let (mut dst, _dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
    let s = ssock.clone();
    let t = std::thread::spawn(move || migrate(&s, &addr, &["--max-rounds", "30", "--downtime-ms", "0"]));
    // Kill the destination while pages flow.
    let deadline = std::time::Instant::now() + secs(30);
    loop {
        let p = http_get(&ssock, "/vm/migration");
        if p["pages_sent"].as_u64().unwrap_or(0) > 1000 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "migration never started: {p}");
        std::thread::sleep(Duration::from_millis(2));
    }
    dst.child.kill().unwrap();
    let o = t.join().unwrap();
    assert_eq!(o.status.code(), Some(1), "{}", String::from_utf8_lossy(&o.stdout));
    let p = http_get(&ssock, "/vm/migration");
    assert_eq!(p["state"], "failed", "{p}");
    source_still_fine(&mut src, &ssock);
}

/// Relays a unix stream from the source to `to` and back; `tamper` sees
/// each source-to-destination chunk with its offset in the stream before
/// it is forwarded. Returns what the source sent.
fn relay(
    listen: PathBuf,
    to: String,
    mut tamper: impl FnMut(usize, &mut [u8]) + Send + 'static,
) -> std::thread::JoinHandle<Vec<u8>> {
    let l = UnixListener::bind(&listen).unwrap();
    std::thread::spawn(move || {
        let (mut a, _) = l.accept().unwrap();
        let mut b = UnixStream::connect(to.trim_start_matches("unix://")).unwrap();
        let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
        let back = std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Both);
        });
        let mut rec = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Ok(n) = a.read(&mut buf) {
            if n == 0 {
                break;
            }
            tamper(rec.len(), &mut buf[..n]);
            rec.extend_from_slice(&buf[..n]);
            if b.write_all(&buf[..n]).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Write);
        let _ = back.join();
        rec
    })
}

/// A relay that flips one byte at `flip_at` of the source's stream.
fn corrupting_relay(listen: PathBuf, to: String, flip_at: usize) -> std::thread::JoinHandle<Vec<u8>> {
    relay(listen, to, move |seen, chunk| {
        if seen <= flip_at && flip_at < seen + chunk.len() {
            chunk[flip_at - seen] ^= 0x40;
        }
    })
}

#[test]
fn one_corrupted_byte_aborts_the_migration_and_the_guest_stays() {
    let (mut src, ssock) = running_guest("dirty wss=8 rate=max report=100", "96M");
    for flip_at in [20usize, 300_000] {
        let (mut dst, _dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
        let relay_dir = tempfile::tempdir().unwrap();
        let relay_path = relay_dir.path().join("relay.sock");
        let t = corrupting_relay(relay_path.clone(), addr, flip_at);
        let o = migrate(&ssock, &format!("unix://{}", relay_path.display()), &[]);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(1), "flip at {flip_at}: {err}");
        assert!(err.contains("tag mismatch") || err.contains("aborted"), "flip at {flip_at}: {err}");
        assert_ne!(dst.wait_exit(secs(30)).code(), Some(0), "the destination gives up");
        let _ = t.join();
        source_still_fine(&mut src, &ssock);
    }
}

#[test]
fn a_stalled_destination_times_out_and_the_guest_stays() {
    let (mut src, ssock) = running_guest("dirty wss=4 rate=max report=100", "64M");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stall.sock");
    let l = UnixListener::bind(&path).unwrap();
    // Accepts and reads the hello, then never answers.
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 4096];
        let _ = c.read(&mut b);
        std::thread::sleep(Duration::from_secs(5));
    });
    let o = migrate(&ssock, &format!("unix://{}", path.display()), &["--peer-timeout-ms", "1000"]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("timed out") || err.contains("Resource temporarily unavailable") || err.contains("would block"),
        "{err}"
    );
    source_still_fine(&mut src, &ssock);
    t.join().unwrap();
}

/// A hostile source speaking the protocol directly.
fn hostile_source(addr: &str, hello: Hello, after: Vec<Message>) -> Option<Message> {
    let s = UnixStream::connect(addr.trim_start_matches("unix://")).unwrap();
    s.set_read_timeout(Some(secs(20))).unwrap();
    let mut w = FrameWriter::new(s.try_clone().unwrap());
    let mut r = FrameReader::new(s);
    w.send(&Message::Hello(Box::new(hello.clone()))).unwrap();
    let accept = match r.recv().ok()? {
        Message::Accept(a) => a,
        other => return Some(other),
    };
    let key = ferry_migrate::wire::FrameKey::session(&hello.migration_id, &accept.nonce, &hello.vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    for m in &after {
        if w.send(m).is_err() {
            break;
        }
    }
    r.recv().ok()
}

fn good_hello() -> Hello {
    let mem = 64u64 << 20;
    Hello {
        protocol_version: 1,
        migration_id: "0123456789abcdef0123456789abcdef".into(),
        vm_id: "hostile".into(),
        capabilities: vec![],
        mem_bytes: mem,
        ram_ranges: ferry_vmm::layout::ram_ranges(mem),
        vcpus: 1,
        cpu_template: "host".into(),
        tsc_khz: 0,
        cpu_features: vec![],
        kernel: "x".into(),
        cmdline: "".into(),
        extra_streams: 0,
    }
}

#[test]
fn the_destination_refuses_hostile_and_mismatched_streams_before_running_anything() {
    let mut bad_cpu = good_hello();
    bad_cpu.cpu_features =
        vec![ferry_migrate::wire::CpuFeatureWord { leaf: 7, subleaf: 0, register: "ebx".into(), bits: u32::MAX }];
    let mut bad_layout = good_hello();
    bad_layout.ram_ranges = vec![(0, 1 << 40)];
    let mut bad_vcpus = good_hello();
    bad_vcpus.vcpus = 99;
    let mut bad_version = good_hello();
    bad_version.protocol_version = 7;
    let mut bad_cap = good_hello();
    bad_cap.capabilities = vec!["teleport".into()];
    let refusals: Vec<(Hello, &str)> = vec![
        (bad_cpu, "lacks features"),
        (bad_layout, "memory layout"),
        (bad_vcpus, "vCPUs"),
        (bad_version, "version"),
        (bad_cap, "capability"),
    ];
    for (hello, words) in refusals {
        let (mut dst, _s, addr) = receiver("unix://DIR/mig.sock", &[]);
        match hostile_source(&addr, hello, vec![]) {
            Some(Message::Refuse(r)) => assert!(r.reason.contains(words), "{} (expected {words:?})", r.reason),
            other => panic!("expected a refusal containing {words:?}, got {other:?}"),
        }
        assert_eq!(dst.wait_exit(secs(30)).code(), Some(1));
    }
    // Accepted, then pages outside guest RAM, a bad state, and no Go: each aborts, nothing runs.
    let streams: Vec<(Vec<Message>, &str)> = vec![
        (vec![Message::Pages { gpa: 1 << 40, data: vec![1; 4096] }], "outside guest RAM"),
        (vec![Message::Zero { gpa: (64 << 20) - 4096, npages: 2 }], "outside guest RAM"),
        (vec![Message::State(b"{\"not\": \"a state\"}".to_vec())], "State"),
        (vec![Message::Go], "expected"),
    ];
    for (msgs, words) in streams {
        let (mut dst, _s, addr) = receiver("unix://DIR/mig.sock", &[]);
        match hostile_source(&addr, good_hello(), msgs) {
            Some(Message::Abort(r)) => assert!(r.reason.contains(words), "{} (expected {words:?})", r.reason),
            other => panic!("expected an abort containing {words:?}, got {other:?}"),
        }
        assert_eq!(dst.wait_exit(secs(30)).code(), Some(1));
        assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "no guest ran");
    }
}

#[test]
fn operations_during_a_migration_get_409() {
    let (_src, ssock) = running_guest("dirty wss=32 rate=max report=100", "256M");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("stall.sock");
    let l = UnixListener::bind(&path).unwrap();
    let t = std::thread::spawn(move || {
        let (mut c, _) = l.accept().unwrap();
        let mut b = [0u8; 4096];
        let _ = c.read(&mut b);
        std::thread::sleep(Duration::from_secs(3));
    });
    let s = ssock.clone();
    let to = format!("unix://{}", path.display());
    let m = std::thread::spawn(move || migrate(&s, &to, &["--peer-timeout-ms", "2500"]));
    let deadline = std::time::Instant::now() + secs(10);
    while http_get(&ssock, "/vm")["operation"]["kind"] != "migration" {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    for (m, p) in [("PUT", "/vm/pause"), ("PUT", "/vm/migrate"), ("GET", "/vm/memory-digest")] {
        let body = if p == "/vm/migrate" { "{\"to\":\"unix:///x\"}" } else { "" };
        let r =
            raw_http(&ssock, format!("{m} {p} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        assert!(r.starts_with("HTTP/1.1 409"), "{m} {p}: {r}");
        assert!(r.contains("migration is in progress"), "{r}");
    }
    let o = snapshot(&ssock, &dir.path().join("x.img"), &[]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("migration is in progress"));
    assert_eq!(m.join().unwrap().status.code(), Some(1));
    t.join().unwrap();
    assert_eq!(api("status", &ssock)["state"], "running");
}

#[test]
fn cancel_during_the_rounds_keeps_the_guest_and_cancel_without_a_migration_is_409() {
    let (mut src, ssock) = running_guest("dirty wss=64 rate=max report=100", "512M");
    let o = ferry_cmd(&["migrate-cancel", "--api-sock", ssock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("no migration is running"));
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &[]);
    let s = ssock.clone();
    // A budget of 0 ms never converges: the rounds go on until cancelled.
    let t = std::thread::spawn(move || migrate(&s, &addr, &["--downtime-ms", "0", "--max-rounds", "1000"]));
    let deadline = std::time::Instant::now() + secs(30);
    while http_get(&ssock, "/vm/migration")["round"].as_u64().unwrap_or(0) < 2 {
        assert!(std::time::Instant::now() < deadline, "no rounds: {}", http_get(&ssock, "/vm/migration"));
        std::thread::sleep(Duration::from_millis(5));
    }
    let o = ferry_cmd(&["migrate-cancel", "--api-sock", ssock.to_str().unwrap()]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let o = t.join().unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&o.stderr).contains("cancelled"), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "cancelled");
    assert_ne!(dst.wait_exit(secs(30)).code(), Some(0));
    assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "nothing ran at the destination");
    source_still_fine(&mut src, &ssock);
}

#[test]
fn source_killed_mid_stream_runs_nothing_at_the_destination() {
    let (mut src, ssock) = running_guest("dirty wss=64 rate=max report=100", "512M");
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &[]);
    let s = ssock.clone();
    let t = std::thread::spawn(move || migrate(&s, &addr, &["--downtime-ms", "0", "--max-rounds", "1000"]));
    let deadline = std::time::Instant::now() + secs(30);
    while http_get(&ssock, "/vm/migration")["round"].as_u64().unwrap_or(0) < 1 {
        assert!(std::time::Instant::now() < deadline);
        std::thread::sleep(Duration::from_millis(5));
    }
    src.child.kill().unwrap();
    let _ = t.join();
    let code = dst.wait_exit(secs(30)).code();
    assert_eq!(code, Some(1), "the destination gives up");
    assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "no guest ran: {:?}", dst.seen);
    assert!(dst.stderr_lines().join("\n").contains("closed"), "it says the source went away");
}

#[test]
fn an_expired_source_certificate_is_refused_end_to_end() {
    use std::time::{Duration as D, SystemTime};
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["127.0.0.1"]);
    let now = SystemTime::now();
    ferry_migrate::certs::issue_with_validity(ca.path(), "src", now - D::from_secs(7200), now - D::from_secs(3600))
        .unwrap();
    let (mut src, ssock) = running_guest("dirty wss=4 rate=max report=100", "64M");
    let mut d = tls_args(ca.path(), "127.0.0.1");
    d.extend(["--allow-peer".into(), "src".into()]);
    let d: Vec<&str> = d.iter().map(|s| s.as_str()).collect();
    let (_dst, _s, addr) = receiver("tcp://127.0.0.1:0", &d);
    let s = tls_args(ca.path(), "src");
    let s: Vec<&str> = s.iter().map(|x| x.as_str()).collect();
    let o = migrate(&ssock, &addr, &s);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr).to_lowercase();
    assert!(err.contains("expired") || err.contains("certificate"), "{err}");
    source_still_fine(&mut src, &ssock);
}

#[test]
fn a_recorded_migration_replayed_to_another_destination_is_refused() {
    let (_src, ssock) = running_guest("dirty wss=4 rate=20000 report=100", "64M");
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &[]);
    let relay_dir = tempfile::tempdir().unwrap();
    let relay_path = relay_dir.path().join("relay.sock");
    let t = relay(relay_path.clone(), addr, |_, _| {});
    let o = migrate(&ssock, &format!("unix://{}", relay_path.display()), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let recorded = t.join().unwrap();
    assert!(recorded.len() > 1000);
    // Replay the whole recording to a fresh destination.
    let (mut dst2, _d2, addr2) = receiver("unix://DIR/mig.sock", &[]);
    let mut c = UnixStream::connect(addr2.trim_start_matches("unix://")).unwrap();
    let _ = c.write_all(&recorded);
    let _ = c.shutdown(std::net::Shutdown::Write);
    assert_eq!(dst2.wait_exit(secs(30)).code(), Some(1));
    let err = dst2.stderr_lines().join("\n");
    assert!(err.contains("tag mismatch"), "the replay fails its first session frame: {err}");
    assert!(!dst2.seen.iter().any(|l| l.starts_with("PROGRESS")), "nothing ran");
    let o = ferry_cmd(&["shutdown", "--api-sock", _d.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0));
}

/// `ferry receive` and `ferry migrate --local`: the memory is handed over.
fn local_migration(mem: &str) -> serde_json::Value {
    let (mut src, ssock) =
        running_guest_with("dirty wss=8 rate=max report=50 fill=random mem=32", mem, &["--memfd", "--vcpus", "2"]);
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
    src.wait_line("PROGRESS", secs(30));
    let o = migrate(&ssock, &addr, &["--local"]);
    assert!(o.status.success(), "local migrate failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["local"], true, "{v}");
    // No page crossed the socket: a few KiB of handshake and state.
    assert!(v["bytes_sent"].as_u64().unwrap() < 256 << 10, "{v}");
    assert_eq!(v["pages_normal"], 0, "{v}");
    assert_eq!(src.wait_exit(secs(30)).code(), Some(0));
    let p = dst.wait_line("PROGRESS", secs(30));
    let last_src = *seqs(&src.seen).last().expect("source printed progress");
    let first_dst = field(&p, "seq").unwrap();
    assert!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "source ended at {last_src}, destination began at {first_dst}"
    );
    dst.send_line("verify");
    let ok = dst.wait_line("VERIFY", secs(30));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    let o = ferry_cmd(&["shutdown", "--api-sock", dsock.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0));
    eprintln!("local migration of {mem}: downtime {} ms, {} bytes", v["downtime_ms"], v["bytes_sent"]);
    v
}

#[test]
fn a_local_migration_hands_the_memory_over_at_any_size() {
    local_migration("128M");
    local_migration("1G");
}

#[test]
fn a_local_migration_needs_memfd_memory_and_a_unix_socket() {
    let (mut src, ssock) = running_guest("dirty wss=4 rate=max report=50", "64M");
    let (_dst, _dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
    let o = migrate(&ssock, &addr, &["--local"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("--memfd"), "{e}");
    let o = migrate(&ssock, "tcp://127.0.0.1:9", &["--local", "--insecure"]);
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("unix"), "{}", String::from_utf8_lossy(&o.stderr));
    source_still_fine(&mut src, &ssock);
}
