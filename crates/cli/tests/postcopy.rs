//! End to end: post-copy and hybrid migration between two ferry processes
//! (unix sockets, loopback TCP, mutual TLS), and a post-copy whose link is
//! cut mid-way and then resumed.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

/// The guest carries on at the destination: its progress continues with no
/// gap and no repeat, no reboot, and `verify` passes over every page.
fn check_destination(src: &mut Guest, dst: &mut Guest, dsock: &Path, vcpus: &str) {
    assert_eq!(src.wait_exit(secs(60)).code(), Some(0));
    let p = dst.wait_line("PROGRESS", secs(60));
    let last_src = *seqs(&src.seen).last().expect("source printed progress");
    let first_dst = field(&p, "seq").unwrap();
    assert!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "sequence continues: source ended at {last_src}, destination began at {first_dst}"
    );
    assert!(!dst.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "no reboot: {:?}", dst.seen);
    dst.send_line("verify");
    let ok = dst.wait_line("VERIFY", secs(60));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    let st = api("status", dsock);
    assert_eq!(st["state"], "running");
    assert_eq!(st["vcpus"].as_u64().unwrap().to_string(), vcpus);
    let o = ferry_cmd(&["shutdown", "--api-sock", dsock.to_str().unwrap()]);
    assert!(o.status.success());
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0));
}

fn postcopy_and_check(
    mode: &str,
    vcpus: &str,
    workload: &str,
    listen: &str,
    dst_extra: &[String],
    src_extra: &[String],
) {
    let (mut src, ssock) = running_guest_with(workload, "128M", &["--vcpus", vcpus]);
    let dst_extra: Vec<&str> = dst_extra.iter().map(|s| s.as_str()).collect();
    let (mut dst, dsock, addr) = receiver(listen, &dst_extra);
    src.wait_line("PROGRESS", secs(30));
    let mut extra: Vec<&str> = vec!["--mode", mode];
    extra.extend(src_extra.iter().map(|s| s.as_str()));
    let o = migrate(&ssock, &addr, &extra);
    assert!(o.status.success(), "migrate failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["mode"], mode, "{v}");
    let pc = &v["postcopy"];
    let deferred = pc["deferred_pages"].as_u64().unwrap();
    assert!(deferred > 0, "post-copy moved pages after the switch-over: {v}");
    let d = &pc["destination"];
    assert!(d.is_object(), "the destination reported its figures: {v}");
    // Every deferred page reached the destination, pushed or asked for.
    assert!(
        d["pages_pushed"].as_u64().unwrap() + d["pages_requested"].as_u64().unwrap() >= deferred,
        "all deferred pages arrived: {v}"
    );
    if mode == "hybrid" {
        assert!(!v["rounds"].as_array().unwrap().is_empty(), "hybrid ran pre-copy rounds first: {v}");
    } else {
        assert!(v["rounds"].as_array().unwrap().is_empty(), "pure post-copy sends nothing before the switch: {v}");
    }
    eprintln!(
        "{mode}: downtime {} ms, deferred {deferred}, faults {}, blocked median {} ms p99 {} ms, push {} MB/s",
        v["downtime_ms"], d["faults"], d["blocked_ms_median"], d["blocked_ms_p99"], pc["push_mb_per_s"]
    );
    check_destination(&mut src, &mut dst, &dsock, vcpus);
}

#[test]
fn postcopy_over_a_unix_socket_with_one_vcpu() {
    postcopy_and_check("postcopy", "1", "dirty wss=8 rate=max report=50", "unix://DIR/mig.sock", &[], &[]);
}

#[test]
fn postcopy_over_insecure_tcp_with_two_vcpus_and_random_pages() {
    postcopy_and_check(
        "postcopy",
        "2",
        "dirty wss=8 rate=max report=50 fill=random mem=48",
        "tcp://127.0.0.1:0",
        &["--insecure".into()],
        &["--insecure".into(), "--compress".into(), "none".into()],
    );
}

#[test]
fn hybrid_over_mutual_tls_with_two_vcpus() {
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["src", "127.0.0.1"]);
    let mut dst = tls_args(ca.path(), "127.0.0.1");
    dst.extend(["--allow-peer".into(), "src".into()]);
    postcopy_and_check(
        "hybrid",
        "2",
        "dirty wss=16 rate=max report=50",
        "tcp://127.0.0.1:0",
        &dst,
        // Two rounds and a budget of 0 ms: hybrid always switches to
        // post-copy with what round 2 left dirty (on a loaded machine the
        // guest may dirty so slowly that a round finds nothing, and then
        // hybrid ends as pre-copy does).
        &[
            tls_args(ca.path(), "src"),
            ["--streams", "2", "--downtime-ms", "0", "--max-rounds", "2"].map(String::from).to_vec(),
        ]
        .concat(),
    );
}

#[test]
fn postcopy_refuses_a_digest_check() {
    let (_src, ssock) = running_guest("idle", "64M");
    let o = migrate(&ssock, "unix:///nonexistent/x.sock", &["--mode", "postcopy", "--verify-digest"]);
    assert!(!o.status.success());
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("verify_digest") && e.contains("precopy"), "{e}");
    assert_eq!(api("status", &ssock)["state"], "running");
}

/// What the relay does to the first connections once enough has passed.
#[derive(Clone, Copy, PartialEq)]
enum LinkFault {
    /// Close every connection.
    Cut,
    /// Stop forwarding in both directions, keeping the connections open.
    Stall,
    /// Flip one byte of the source's stream, then go on.
    Corrupt,
}

/// A unix relay that accepts any number of connections; once `after` bytes
/// have gone from the source to the destination over the first ones (the
/// migration's streams before any resume), it applies `fault` to them, and
/// relays later connections (a resume's) untouched.
fn faulty_relay(listen: PathBuf, to: String, after: usize, fault: LinkFault) -> Arc<AtomicBool> {
    let l = UnixListener::bind(&listen).unwrap();
    let hit = Arc::new(AtomicBool::new(false));
    let sent = Arc::new(AtomicUsize::new(0));
    let live: Arc<Mutex<Vec<UnixStream>>> = Arc::new(Mutex::new(Vec::new()));
    let h = hit.clone();
    // A stalled connection waits (bounded) instead of forwarding.
    let stalled = move |h: &AtomicBool, first: bool| {
        if fault == LinkFault::Stall && first && h.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_secs(60));
            return true;
        }
        false
    };
    std::thread::spawn(move || {
        for _ in 0..16 {
            let Ok((a, _)) = l.accept() else { return };
            let b = UnixStream::connect(to.trim_start_matches("unix://")).unwrap();
            let first = !h.load(Ordering::SeqCst);
            if first {
                live.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
            }
            let (mut a2, mut b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let h2 = h.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = b2.read(&mut buf) {
                    if n == 0 || stalled(&h2, first) || a2.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
                let _ = a2.shutdown(std::net::Shutdown::Both);
            });
            let (h, sent, live) = (h.clone(), sent.clone(), live.clone());
            let (mut a, mut b) = (a, b);
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 65536];
                while let Ok(n) = a.read(&mut buf) {
                    if n == 0 || stalled(&h, first) {
                        break;
                    }
                    let strike =
                        first && sent.fetch_add(n, Ordering::SeqCst) + n >= after && !h.swap(true, Ordering::SeqCst);
                    if strike && fault == LinkFault::Corrupt {
                        buf[n / 2] ^= 0x10;
                    }
                    if b.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    if strike && fault == LinkFault::Cut {
                        for s in live.lock().unwrap().iter() {
                            let _ = s.shutdown(std::net::Shutdown::Both);
                        }
                    }
                }
                let _ = b.shutdown(std::net::Shutdown::Write);
            });
        }
    });
    hit
}

/// A post-copy whose link suffers `fault` in its push: both sides report
/// `postcopy-paused` (the destination with its guest paused), the source
/// refuses to run the guest itself, and a resume over a new connection
/// finishes it with the guest intact.
fn postcopy_link_fault_then_resume(fault: LinkFault) {
    // ~160 MiB of incompressible pages, all deferred: the fault at 24 MiB lands in the push.
    let (mut src, ssock) = running_guest_with("dirty wss=8 rate=max report=50 fill=random mem=160", "256M", &[]);
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", "3000"]);
    src.wait_line("PROGRESS", secs(60));
    let relay_dir = tempfile::tempdir().unwrap();
    let relay_path = relay_dir.path().join("relay.sock");
    let hit = faulty_relay(relay_path.clone(), addr, 24 << 20, fault);
    let to = format!("unix://{}", relay_path.display());
    let o = migrate(&ssock, &to, &["--mode", "postcopy", "--compress", "none", "--peer-timeout-ms", "3000"]);
    assert!(hit.load(Ordering::SeqCst), "the relay struck");
    assert!(!o.status.success(), "the first attempt cannot finish: {}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("post-copy lost its link") && e.contains("--resume"), "{e}");
    // Both sides say so; the source keeps the guest paused, not running, not gone.
    let m = http_get(&ssock, "/vm/migration");
    assert_eq!(m["state"], "postcopy-paused", "{m}");
    assert_eq!(api("status", &ssock)["state"], "paused");
    dst.wait_stderr("post-copy link lost", secs(30));
    // The destination paused the guest, keeping the pages it has.
    assert_eq!(api("status", &dsock)["state"], "paused", "the destination pauses a guest whose link is lost");
    // Nothing else may touch the guest at the source meanwhile, and a cancel is too late.
    let o = ferry_cmd(&["resume", "--api-sock", ssock.to_str().unwrap()]);
    assert!(!o.status.success(), "the source must not resume a guest it gave away");
    // Resume over a new connection finishes it.
    let o = ferry_cmd(&["migrate", "--api-sock", ssock.to_str().unwrap(), "--resume", "--json"]);
    assert!(o.status.success(), "resume failed: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["postcopy"]["resumes"], 1, "{v}");
    assert_eq!(v["postcopy"]["destination"]["resumes"], 1, "{v}");
    check_destination(&mut src, &mut dst, &dsock, "1");
}

#[test]
fn a_postcopy_whose_link_is_cut_pauses_on_both_sides_and_resume_finishes_it() {
    postcopy_link_fault_then_resume(LinkFault::Cut);
}

#[test]
fn a_stalled_postcopy_link_times_out_on_both_sides_and_resume_finishes_it() {
    postcopy_link_fault_then_resume(LinkFault::Stall);
}

#[test]
fn a_corrupted_byte_during_postcopy_pauses_both_sides_and_resume_finishes_it() {
    postcopy_link_fault_then_resume(LinkFault::Corrupt);
}

/// Starts a post-copy of a guest with ~200 MiB of incompressible pages
/// (all deferred) and waits until the destination runs it.
fn postcopy_under_way() -> (Guest, PathBuf, Guest, PathBuf, std::thread::JoinHandle<std::process::Output>) {
    let (mut src, ssock) = running_guest_with("dirty wss=8 rate=max report=50 fill=random mem=200", "256M", &[]);
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &[]);
    src.wait_line("PROGRESS", secs(60));
    let s = ssock.clone();
    let t = std::thread::spawn(move || {
        migrate(
            &s,
            &addr,
            &["--mode", "postcopy", "--compress", "none", "--peer-timeout-ms", "5000", "--max-bandwidth", "100M"],
        )
    });
    dst.wait_stderr("received VM", secs(60));
    (src, ssock, dst, dsock, t)
}

#[test]
fn the_destination_dying_during_postcopy_is_reported_loudly_and_the_source_keeps_its_copy_paused() {
    let (src, ssock, mut dst, _dsock, t) = postcopy_under_way();
    dst.child.kill().unwrap();
    let o = t.join().unwrap();
    assert!(!o.status.success(), "{}", String::from_utf8_lossy(&o.stdout));
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("post-copy lost its link"), "{e}");
    // The guest ran at the destination: the source must never run it again on
    // its own, and keeps its memory for a resume that cannot come.
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "postcopy-paused");
    assert_eq!(api("status", &ssock)["state"], "paused");
    let o = ferry_cmd(&["resume", "--api-sock", ssock.to_str().unwrap()]);
    assert!(!o.status.success(), "a guest that ran elsewhere is not resumed here");
    let o = ferry_cmd(&["migrate", "--api-sock", ssock.to_str().unwrap(), "--resume", "--json"]);
    assert!(!o.status.success(), "there is no destination to resume to");
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "postcopy-paused", "a failed resume can be retried");
    drop(src);
}

#[test]
fn the_source_dying_during_postcopy_is_reported_loudly_at_the_destination() {
    let (mut src, _ssock, mut dst, dsock, t) = postcopy_under_way();
    src.child.kill().unwrap();
    let _ = t.join();
    let l = dst.wait_stderr("post-copy link lost", secs(30));
    assert!(l.contains("the guest is paused here with the pages it has"), "{l}");
    // The destination stays up and answers, reporting the paused post-copy.
    let st = api("status", &dsock);
    assert!(st["state"].is_string(), "{st}");
    drop(dst);
}

#[test]
fn cancel_during_postcopy_is_refused_and_the_migration_completes() {
    let (mut src, ssock, mut dst, dsock, t) = postcopy_under_way();
    let o = ferry_cmd(&["migrate-cancel", "--api-sock", ssock.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1), "a committed migration cannot be cancelled");
    let e = String::from_utf8_lossy(&o.stderr);
    assert!(e.contains("409"), "{e}");
    let o = t.join().unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    check_destination(&mut src, &mut dst, &dsock, "1");
}
