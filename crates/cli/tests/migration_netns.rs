//! End to end: live migration across a real bandwidth limit. Each test
//! builds two network namespaces joined by a veth pair whose both directions
//! are shaped to 1 Gbit/s with tbf, runs the source `ferry run` in one and
//! `ferry receive` in the other, and migrates a guest whose incompressible
//! working set is dirtied much faster than the link carries it.
//!
//! Needs root (`ip netns add`); without it each test prints why and passes.

mod common;
use common::*;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The port `ferry receive` listens on inside its namespace.
const PORT: u16 = 7777;
/// Guest RAM: the whole region is marked with random (incompressible) pages.
const MEM: &str = "512M";

/// Two cores: the tests are timing-sensitive, so they run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

fn one_at_a_time() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Runs a program to completion, killing it after `timeout`.
fn run_bounded(program: &str, args: &[&str], timeout: Duration) -> Output {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {program}: {e}"));
    let read_all = |mut r: Box<dyn std::io::Read + Send>| {
        std::thread::spawn(move || {
            let mut v = vec![];
            let _ = r.read_to_end(&mut v);
            v
        })
    };
    let out = read_all(Box::new(child.stdout.take().unwrap()));
    let err = read_all(Box::new(child.stderr.take().unwrap()));
    let deadline = Instant::now() + timeout;
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{program} {args:?} did not finish within {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    Output { status, stdout: out.join().unwrap(), stderr: err.join().unwrap() }
}

/// Runs a setup command that must succeed.
fn must(program: &str, args: &[&str]) {
    let o = run_bounded(program, args, secs(30));
    assert!(o.status.success(), "{program} {args:?}: {}", String::from_utf8_lossy(&o.stderr));
}

/// Two namespaces joined by a shaped veth pair; removed on drop (also on panic).
struct Link {
    a: String,
    b: String,
    /// Address of the source's end (namespace `a`).
    src_ip: String,
    /// Address of the destination's end (namespace `b`).
    dst_ip: String,
}

impl Link {
    /// Builds the link, or None (with a message) when namespaces cannot be made here.
    fn new() -> Option<Link> {
        static N: AtomicU32 = AtomicU32::new(0);
        let n = N.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let x = (pid.wrapping_mul(7).wrapping_add(n) % 250) + 1;
        let a = format!("ferry-mig-{pid}-{n}-a");
        let b = format!("ferry-mig-{pid}-{n}-b");
        let o = run_bounded("ip", &["netns", "add", &a], secs(30));
        if !o.status.success() {
            eprintln!(
                "SKIP: `ip netns add` is not permitted here ({}); this test needs root",
                String::from_utf8_lossy(&o.stderr).trim()
            );
            return None;
        }
        let link = Link { a, b, src_ip: format!("10.77.{x}.1"), dst_ip: format!("10.77.{x}.2") };
        let (a, b) = (link.a.as_str(), link.b.as_str());
        must("ip", &["netns", "add", b]);
        // Created directly inside the namespaces: no name is ever taken in the host's namespace.
        must("ip", &["link", "add", "veth-a", "netns", a, "type", "veth", "peer", "name", "veth-b", "netns", b]);
        for (ns, dev, ip) in [(a, "veth-a", &link.src_ip), (b, "veth-b", &link.dst_ip)] {
            must("ip", &["-n", ns, "addr", "add", &format!("{ip}/24"), "dev", dev]);
            must("ip", &["-n", ns, "link", "set", "lo", "up"]);
            must("ip", &["-n", ns, "link", "set", dev, "up"]);
            // 256 KiB of burst: several 64 KiB GSO segments, 2 ms at line rate.
            must(
                "ip",
                &[
                    "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", "1gbit", "burst",
                    "256kb", "latency", "50ms",
                ],
            );
        }
        eprintln!("link: {a} {} <-> {b} {}, tbf 1gbit both ways", link.src_ip, link.dst_ip);
        Some(link)
    }

    /// Sends 200 MB from `a` to `b` over TCP and returns the rate the receiver saw, bit/s.
    fn measure(&self) -> f64 {
        const LISTENER: &str = r#"
import socket, sys, time
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(1)
s.settimeout(30)
print("ready", flush=True)
c, _ = s.accept()
c.settimeout(30)
n, t0 = 0, None
while True:
    b = c.recv(1 << 20)
    if not b:
        break
    if t0 is None:
        t0 = time.monotonic()
    n += len(b)
print("got", n, time.monotonic() - t0, flush=True)
"#;
        const SENDER: &str = r#"
import socket, sys
s = socket.create_connection((sys.argv[1], int(sys.argv[2])), timeout=30)
buf = bytes(1 << 20)
for _ in range(200):
    s.sendall(buf)
s.close()
"#;
        let port = "5201";
        let mut l = Proc::spawn(&self.b, "python3", &["-u", "-c", LISTENER, &self.dst_ip, port]);
        l.wait_line("ready", secs(20));
        let t = Instant::now();
        let o = run_bounded("ip", &["netns", "exec", &self.a, "python3", "-c", SENDER, &self.dst_ip, port], secs(60));
        let wall = t.elapsed();
        assert!(o.status.success(), "sender: {}", String::from_utf8_lossy(&o.stderr));
        let got = l.wait_line("got", secs(30));
        let w: Vec<&str> = got.split_whitespace().collect();
        let bytes: f64 = w[1].parse().unwrap();
        let s: f64 = w[2].parse().unwrap();
        assert_eq!(bytes as u64, 200 << 20, "the listener got everything");
        let rate = bytes * 8.0 / s;
        eprintln!(
            "link rate: {:.0} Mbit/s ({:.0} MB in {:.2} s; sender wall time {:.2} s)",
            rate / 1e6,
            bytes / 1e6,
            s,
            wall.as_secs_f64()
        );
        rate
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Deleting a namespace deletes the veth end inside it, and with it its peer.
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// A process started inside a namespace (`ip netns exec` execs it: the pid is the program's),
/// stdout and stderr collected line by line; killed on drop.
struct Proc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: Receiver<String>,
    seen: Vec<String>,
    errs: Receiver<String>,
    err_seen: Vec<String>,
}

impl Proc {
    fn spawn(ns: &str, program: &str, args: &[&str]) -> Proc {
        let mut child = Command::new("ip")
            .args(["netns", "exec", ns, program])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn ip netns exec");
        let (tx, lines) = channel();
        let out = child.stdout.take().unwrap();
        std::thread::spawn(move || {
            for l in BufReader::new(out).lines() {
                let Ok(l) = l else { break };
                if tx.send(l).is_err() {
                    break;
                }
            }
        });
        let (etx, errs) = channel();
        let err = child.stderr.take().unwrap();
        let tag = Path::new(program).file_name().unwrap().to_string_lossy().to_string();
        std::thread::spawn(move || {
            for l in BufReader::new(err).lines() {
                let Ok(l) = l else { break };
                eprintln!("[{tag} stderr] {l}");
                if etx.send(l).is_err() {
                    break;
                }
            }
        });
        let stdin = child.stdin.take();
        Proc { child, stdin, lines, seen: vec![], errs, err_seen: vec![] }
    }

    /// `ferry <args>` inside `ns`.
    fn ferry(ns: &str, args: &[&str]) -> Proc {
        Self::spawn(ns, ferry(), args)
    }

    fn wait_line(&mut self, prefix: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    self.seen.push(l.clone());
                    if l.starts_with(prefix) {
                        return l;
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    panic!("timed out waiting for {prefix:?}; last lines: {:?}", self.tail())
                }
                Err(RecvTimeoutError::Disconnected) => {
                    panic!("exited while waiting for {prefix:?}; last lines: {:?}; stderr: {:?}", self.tail(), {
                        self.stderr_text()
                    })
                }
            }
        }
    }

    fn wait_stderr(&mut self, needle: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        loop {
            match self.errs.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => {
                    self.err_seen.push(l.clone());
                    if l.contains(needle) {
                        return l;
                    }
                }
                Err(_) => panic!("no stderr line with {needle:?} in time; stderr: {:?}", self.err_seen),
            }
        }
    }

    /// Everything on stderr so far.
    fn stderr_text(&mut self) -> String {
        self.err_seen.extend(self.errs.try_iter());
        self.err_seen.join("\n")
    }

    fn send_line(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().unwrap();
        writeln!(stdin, "{s}").unwrap();
        stdin.flush().unwrap();
    }

    /// Waits for the exit, then for the rest of its output.
    fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        let status = loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("did not exit within {timeout:?}; last lines: {:?}", self.tail());
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let drain_until = Instant::now() + Duration::from_secs(5);
        while let Ok(l) = self.lines.recv_timeout(drain_until.saturating_duration_since(Instant::now())) {
            self.seen.push(l);
        }
        status
    }

    fn tail(&self) -> Vec<String> {
        self.seen.iter().rev().take(8).rev().cloned().collect()
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn seqs(lines: &[String]) -> Vec<u64> {
    lines.iter().filter(|l| l.starts_with("PROGRESS")).filter_map(|l| field(l, "seq")).collect()
}

/// Source in `a`, destination in `b`, both up; and the `--to` address.
struct Pair {
    src: Proc,
    ssock: PathBuf,
    dst: Proc,
    dsock: PathBuf,
    to: String,
    _dir: tempfile::TempDir,
}

fn pair(link: &Link, cmdline: &str) -> Pair {
    let dir = tempfile::tempdir().unwrap();
    let ssock = dir.path().join("src.sock");
    let dsock = dir.path().join("dst.sock");
    let t = Instant::now();
    let mut src = Proc::ferry(
        &link.a,
        &["run", "--kernel", "builtin:test", "--mem", MEM, "--cmdline", cmdline, "--api-sock", ssock.to_str().unwrap()],
    );
    let marked = src.wait_line("MARKED", secs(120));
    src.wait_line("PROGRESS", secs(60));
    wait_sock(&ssock);
    eprintln!("source up in {:.1} s: {marked}", t.elapsed().as_secs_f64());
    let listen = format!("tcp://{}:{PORT}", link.dst_ip);
    let mut dst = Proc::ferry(
        &link.b,
        &[
            "receive",
            "--listen",
            &listen,
            "--insecure",
            "--api-sock",
            dsock.to_str().unwrap(),
            "--accept-timeout-ms",
            "300000",
        ],
    );
    let line = dst.wait_stderr("waiting for a migration on ", secs(30));
    let to = line.rsplit(' ').next().unwrap().to_string();
    assert_eq!(to, listen, "{line}");
    wait_sock(&dsock);
    assert_eq!(api("status", &dsock)["state"], "incoming");
    Pair { src, ssock, dst, dsock, to, _dir: dir }
}

/// `ferry migrate --insecure --json` from the host's namespace (it only talks to the source's API).
fn migrate(p: &Pair, extra: &[&str]) -> (Output, f64) {
    let mut args = vec!["migrate", "--api-sock", p.ssock.to_str().unwrap(), "--to", &p.to, "--insecure", "--json"];
    args.extend_from_slice(extra);
    let t = Instant::now();
    let o = run_bounded(ferry(), &args, secs(300));
    (o, t.elapsed().as_secs_f64())
}

/// Prints what a finished migration reports.
fn print_figures(v: &serde_json::Value, wall_s: f64) {
    let rounds = v["rounds"].as_array().cloned().unwrap_or_default();
    let pages: Vec<u64> = rounds.iter().map(|r| r["pages"].as_u64().unwrap_or(0)).collect();
    let ms: Vec<String> = rounds.iter().map(|r| format!("{:.0}", r["ms"].as_f64().unwrap_or(0.0))).collect();
    eprintln!(
        "migration {}: {} rounds ({}), pages per round {pages:?}, ms per round {ms:?}",
        v["state"],
        rounds.len(),
        v["stop_reason"].as_str().unwrap_or("?")
    );
    let t = &v["throttle"];
    if t.is_null() {
        eprintln!("throttle: none reported");
    } else {
        let steps: Vec<String> = t["steps"]
            .as_array()
            .map(|s| {
                s.iter()
                    .map(|x| {
                        format!(
                            "round {} -> {}% at {:.0} ms",
                            x["round"],
                            x["percent"],
                            x["at_ms"].as_f64().unwrap_or(0.0)
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        eprintln!(
            "throttle: {} steps [{}], final {}%, vCPUs held {:.0} ms",
            steps.len(),
            steps.join(", "),
            t["final_percent"],
            t["throttled_ms"].as_f64().unwrap_or(0.0)
        );
    }
    eprintln!(
        "downtime {:.2} ms (budget {:.0} ms), total {:.0} ms (setup {:.1} ms; `ferry migrate` wall {:.1} s), \
         {:.1} MB on the wire, {:.0} MB/s in live rounds, {} data pages, {} zero, {} never touched",
        v["downtime_ms"].as_f64().unwrap_or(-1.0),
        v["expected_downtime_ms"].as_f64().unwrap_or(-1.0),
        v["total_ms"].as_f64().unwrap_or(-1.0),
        v["setup_ms"].as_f64().unwrap_or(-1.0),
        wall_s,
        v["bytes_sent"].as_f64().unwrap_or(0.0) / 1e6,
        v["throughput_mb_per_s"].as_f64().unwrap_or(0.0),
        v["pages_normal"],
        v["pages_zero"],
        v["pages_skipped_unpopulated"]
    );
}

/// A completed migration: the source gives the guest up, the guest carries on at the destination
/// with its memory intact; then it is shut down there.
fn check_arrived(p: &mut Pair) {
    assert_eq!(p.src.wait_exit(secs(60)).code(), Some(0), "the source ends after the commit");
    assert!(p.src.stderr_text().contains("migrated to"), "the source says where the guest went");
    let first = p.dst.wait_line("PROGRESS", secs(60));
    let last_src = *seqs(&p.src.seen).last().expect("source printed progress");
    let first_dst = field(&first, "seq").unwrap();
    assert!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "sequence continues: source ended at {last_src}, destination began at {first_dst}"
    );
    assert!(!p.dst.seen.iter().any(|l| l.starts_with("FERRY-GUEST boot")), "no reboot: {:?}", p.dst.seen);
    let next = p.dst.wait_line("PROGRESS", secs(30));
    assert_eq!(field(&next, "seq"), Some(first_dst + 1), "{next}");
    p.dst.send_line("verify");
    let ok = p.dst.wait_line("VERIFY", secs(120));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    eprintln!("destination: PROGRESS seq {last_src} -> {first_dst}, {ok}");
    assert_eq!(api("status", &p.dsock)["state"], "running");
    let o = run_bounded(ferry(), &["shutdown", "--api-sock", p.dsock.to_str().unwrap()], secs(60));
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(p.dst.wait_exit(secs(60)).code(), Some(0));
}

/// Builds the link and checks that the shaping is in effect (loopback-speed veths run at many Gbit/s).
fn shaped_link() -> Option<Link> {
    let link = Link::new()?;
    let rate = link.measure();
    assert!(rate < 2e9, "the link is not shaped: {:.0} Mbit/s", rate / 1e6);
    Some(link)
}

#[test]
fn converges_over_a_1gbit_link_with_auto_converge() {
    let _serial = one_at_a_time();
    let t = Instant::now();
    let Some(link) = shaped_link() else { return };
    let mut p = pair(&link, "dirty wss=64 rate=max fill=random report=100");
    p.src.wait_line("PROGRESS", secs(10));
    let dirtying = p.src.wait_line("PROGRESS", secs(10));
    eprintln!("guest before: {dirtying}");
    let (o, wall) = migrate(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "migrate failed ({:?}): {err}", o.status);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    print_figures(&v, wall);
    assert_eq!(v["state"], "completed", "{v}");
    let steps = v["throttle"]["steps"].as_array().unwrap_or_else(|| panic!("no throttle.steps: {v}"));
    assert!(!steps.is_empty(), "a guest dirtying faster than the link needs the throttle: {v}");
    for s in steps {
        assert!(s["round"].as_u64().is_some_and(|r| r >= 1), "{s}");
        assert!(s["percent"].as_u64().is_some_and(|p| p > 0 && p < 100), "{s}");
        assert!(s["at_ms"].as_f64().is_some_and(|t| t >= 0.0), "{s}");
    }
    let pct: Vec<u64> = steps.iter().filter_map(|s| s["percent"].as_u64()).collect();
    assert!(pct.windows(2).all(|w| w[0] <= w[1]), "steps never loosen the throttle: {pct:?}");
    assert!(v["throttle"]["final_percent"].as_u64().is_some_and(|p| p > 0), "{v}");
    let downtime = v["downtime_ms"].as_f64().unwrap_or(-1.0);
    assert!(downtime > 0.0 && downtime.is_finite(), "downtime reported: {v}");
    assert!(v["rounds"].as_array().unwrap().len() >= 2, "{v}");
    // Reported either way (this guest rewrites its whole working set evenly,
    // so few pages are hot apart from the rest).
    assert!(v["working_set_held_pages"].is_u64() && v["working_set_resends_saved"].is_u64(), "{v}");
    eprintln!(
        "working set: {} pages held back, {} re-sends saved",
        v["working_set_held_pages"], v["working_set_resends_saved"]
    );
    check_arrived(&mut p);
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn gives_up_cleanly_without_throttle() {
    let _serial = one_at_a_time();
    let t = Instant::now();
    let Some(link) = shaped_link() else { return };
    let mut p = pair(&link, "dirty wss=64 rate=max fill=random report=100");
    p.src.wait_line("PROGRESS", secs(10));
    let (o, wall) = migrate(&p, &["--no-throttle", "--max-rounds", "6"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    eprintln!("`ferry migrate --no-throttle --max-rounds 6` after {wall:.1} s: {:?}: {}", o.status, err.trim());
    let prog: serde_json::Value = {
        let r = raw_http(&p.ssock, b"GET /vm/migration HTTP/1.1\r\nHost: x\r\n\r\n");
        serde_json::from_str(r.split_once("\r\n\r\n").map(|x| x.1).unwrap_or("null")).unwrap_or_default()
    };
    eprintln!(
        "source's /vm/migration: state {}, round {}, {} pages, {:.1} MB sent, {:.0} ms",
        prog["state"],
        prog["round"],
        prog["pages_sent"],
        prog["bytes_sent"].as_f64().unwrap_or(0.0) / 1e6,
        prog["elapsed_ms"].as_f64().unwrap_or(0.0)
    );
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(err.contains("did not converge"), "{err}");
    // The guest stays at the source, running, its memory intact.
    assert_eq!(api("status", &p.ssock)["state"], "running");
    let before = *seqs(&p.src.seen).last().unwrap();
    let now = p.src.wait_line("PROGRESS", secs(30));
    assert!(field(&now, "seq").unwrap() > before, "{now}");
    p.src.send_line("verify");
    let ok = p.src.wait_line("VERIFY", secs(120));
    assert!(ok.starts_with("VERIFY OK"), "{ok}");
    let again = p.src.wait_line("PROGRESS", secs(30));
    eprintln!("source after: {ok}; {again}");
    // The destination dropped what it had and ran nothing.
    let st = p.dst.wait_exit(secs(60));
    assert_ne!(st.code(), Some(0), "the destination gives up: {st:?}");
    assert!(!p.dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "no guest ran there: {:?}", p.dst.seen);
    eprintln!("destination exited with {st:?}: {}", p.dst.stderr_text().lines().last().unwrap_or(""));
    assert_eq!(api("status", &p.ssock)["state"], "running");
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn a_slowly_dirtying_guest_converges_without_throttle_steps() {
    let _serial = one_at_a_time();
    let t = Instant::now();
    let Some(link) = shaped_link() else { return };
    let mut p = pair(&link, "dirty wss=64 rate=2000 fill=random report=100");
    // One pass over 16384 pages at 2000 pages/s takes about 8 s; PROGRESS comes once a pass.
    p.src.wait_line("PROGRESS", secs(30));
    let (o, wall) = migrate(&p, &[]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "migrate failed ({:?}): {err}", o.status);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    print_figures(&v, wall);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["stop_reason"], "converged", "{v}");
    let steps = v["throttle"]["steps"].as_array().map_or(0, |s| s.len());
    assert_eq!(steps, 0, "no throttle for a guest the link keeps up with: {v}");
    assert!(v["throttle"]["final_percent"].as_u64().unwrap_or(0) == 0, "{v}");
    check_arrived(&mut p);
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}

#[test]
fn hybrid_moves_a_guest_that_outruns_the_link_with_a_short_stop() {
    let _serial = one_at_a_time();
    let t = Instant::now();
    let Some(link) = shaped_link() else { return };
    let mut p = pair(&link, "dirty wss=64 rate=max fill=random report=100");
    p.src.wait_line("PROGRESS", secs(10));
    let (o, wall) = migrate(&p, &["--mode", "hybrid", "--max-rounds", "3"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(o.status.success(), "migrate failed ({:?}): {err}", o.status);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    print_figures(&v, wall);
    assert_eq!(v["state"], "completed", "{v}");
    assert_eq!(v["mode"], "hybrid", "{v}");
    assert!(v["throttle"].is_null(), "hybrid does not throttle: {v}");
    let pc = &v["postcopy"];
    let d = &pc["destination"];
    // The working set the link could not keep up with moved after the switch-over.
    assert!(pc["deferred_pages"].as_u64().unwrap() > 1000, "{v}");
    eprintln!(
        "hybrid over 1 Gbit/s: downtime {:.2} ms, {} pages deferred, {} remote faults (blocked median {:.3} ms, p99 {:.3} ms), push {:.0} MB/s, post-copy {:.0} ms",
        v["downtime_ms"].as_f64().unwrap_or(0.0),
        pc["deferred_pages"],
        d["faults"],
        d["blocked_ms_median"].as_f64().unwrap_or(0.0),
        d["blocked_ms_p99"].as_f64().unwrap_or(0.0),
        pc["push_mb_per_s"].as_f64().unwrap_or(0.0),
        pc["postcopy_ms"].as_f64().unwrap_or(0.0)
    );
    check_arrived(&mut p);
    eprintln!("test took {:.1} s", t.elapsed().as_secs_f64());
}
