//! End to end: the pre-copy fault matrix. A frame-aware relay between the
//! source and the destination finds each phase of a migration by the frames
//! that pass (the Hello, round 1's pages, a later round's pages, the state,
//! the destination's Ready) and injects a fault exactly there: the
//! destination or the source killed, the link dropped, one byte corrupted,
//! the link stalled past the peer timeout, or the user's cancel. Every case
//! asserts that the guest runs on exactly one side afterwards (for a killed
//! source: on none, and nothing ran at the destination) with its memory
//! intact (`verify`).
//!
//! After the source has written `Go` the guest is no longer the source's to
//! resume: the last tests lose `Go` or `Running` on the way and check that
//! the commit is settled (`ferry migrate --resume`, `--take-back`) with the
//! guest running on exactly one side, never on two: in pre-copy, over TLS
//! (a relay that sees only TLS records), with `--keep-paused`, and in
//! post-copy and hybrid, where a settle that gives the guest to the
//! destination goes on with a post-copy resume for the pages it lacks.

mod common;
use common::*;
use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const KIND_HELLO: u16 = 1;
const KIND_PAGES: u16 = 4;
const KIND_ROUND_END: u16 = 6;
const KIND_STATE: u16 = 7;
const KIND_READY: u16 = 8;
const KIND_GO: u16 = 9;
const KIND_RUNNING: u16 = 10;
/// Frames at most 16 MiB of payload (docs/migration-protocol.md).
const MAX_PAYLOAD: usize = 16 << 20;
const PEER_TIMEOUT_MS: &str = "3000";
/// How long a destination holds a VM whose Go did not come, in the matrix.
const COMMIT_WAIT_MS: &str = "3000";

/// Where in a migration the fault strikes.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Phase {
    /// The source's Hello, before the destination has seen it.
    Setup,
    /// Round 1's eighth page frame.
    Round1,
    /// The first page frame after round 1 ended.
    LaterRound,
    /// The VM state, while the guest is paused at the source (before Ready).
    StopAndCopy,
    /// The destination's Ready: it holds the whole VM and waits for Go.
    ReadyGo,
    /// The source's Go: it has given the guest up.
    Go,
    /// The destination's Running: it runs the guest.
    Running,
}

const PHASES: [Phase; 5] = [Phase::Setup, Phase::Round1, Phase::LaterRound, Phase::StopAndCopy, Phase::ReadyGo];

/// What happens there.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Fault {
    KillDestination,
    KillSource,
    Drop,
    Corrupt,
    Stall,
    Cancel,
}

#[derive(Default)]
struct Control {
    /// Forward nothing more, in either direction.
    frozen: AtomicBool,
    /// Close both connections.
    cut: AtomicBool,
    socks: Mutex<Vec<UnixStream>>,
}

impl Control {
    fn cut(&self) {
        self.cut.store(true, Ordering::SeqCst);
        for s in self.socks.lock().unwrap().iter() {
            let _ = s.shutdown(std::net::Shutdown::Both);
        }
    }
}

/// The relay: `fired` reports the phase's frame as it reaches the relay.
/// The fault strikes on the first connection; later ones (a settle) are
/// forwarded untouched to the current target.
struct Relay {
    ctl: Arc<Control>,
    fired: Receiver<String>,
    path: PathBuf,
    target: Arc<Mutex<String>>,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(to: &str, phase: Option<Phase>, fault: Fault) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let l = UnixListener::bind(&path).unwrap();
        let ctl = Arc::new(Control::default());
        let (tx, fired) = channel();
        let target = Arc::new(Mutex::new(to.trim_start_matches("unix://").to_string()));
        let (c, t) = (ctl.clone(), target.clone());
        std::thread::spawn(move || {
            for n in 0..16 {
                let Ok((a, _)) = l.accept() else { return };
                let to = t.lock().unwrap().clone();
                let Ok(b) = UnixStream::connect(&to) else { continue };
                // Only the first connection meets the fault.
                let (c, phase) = if n == 0 { (c.clone(), phase) } else { (Arc::new(Control::default()), None) };
                c.socks.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
                let tx = tx.clone();
                std::thread::spawn(move || {
                    let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                    let (c2, tx2) = (c.clone(), tx.clone());
                    let back = std::thread::spawn(move || pump(b2, a2, false, phase, fault, &c2, &tx2));
                    pump(a, b, true, phase, fault, &c, &tx);
                    let _ = back.join();
                });
            }
        });
        Relay { ctl, fired, path, target, _dir: dir }
    }

    fn addr(&self) -> String {
        format!("unix://{}", self.path.display())
    }

    /// Later connections go to `to`.
    fn retarget(&self, to: &str) {
        *self.target.lock().unwrap() = to.trim_start_matches("unix://").to_string();
    }
}

fn read_frame(s: &mut UnixStream) -> Option<Vec<u8>> {
    let mut f = vec![0u8; 16];
    s.read_exact(&mut f).ok()?;
    let n = u32::from_le_bytes(f[8..12].try_into().unwrap()) as usize;
    if &f[0..4] != b"FMG1" || n > MAX_PAYLOAD {
        return None;
    }
    f.resize(16 + n + 32, 0);
    s.read_exact(&mut f[16..]).ok()?;
    Some(f)
}

/// Forwards frames from `from` to `to`; `source_side` says the direction.
fn pump(
    mut from: UnixStream,
    mut to: UnixStream,
    source_side: bool,
    phase: Option<Phase>,
    fault: Fault,
    ctl: &Control,
    fired: &Sender<String>,
) {
    let (mut pages, mut round_ends, mut done) = (0u32, 0u32, false);
    while let Some(mut frame) = read_frame(&mut from) {
        let kind = u16::from_le_bytes([frame[4], frame[5]]);
        let hit = !done
            && match (phase, source_side) {
                (Some(Phase::Setup), true) => kind == KIND_HELLO,
                (Some(Phase::Round1), true) => kind == KIND_PAGES && round_ends == 0 && pages == 7,
                (Some(Phase::LaterRound), true) => kind == KIND_PAGES && round_ends >= 1,
                (Some(Phase::StopAndCopy), true) => kind == KIND_STATE,
                (Some(Phase::ReadyGo), false) => kind == KIND_READY,
                (Some(Phase::Go), true) => kind == KIND_GO,
                (Some(Phase::Running), false) => kind == KIND_RUNNING,
                _ => false,
            };
        if kind == KIND_PAGES {
            pages += 1;
        }
        if kind == KIND_ROUND_END {
            round_ends += 1;
        }
        if hit {
            done = true;
            // Said before the fault strikes, so that whoever sees its effect
            // (a source whose migration just failed) finds it said.
            let _ = fired.send(format!("{phase:?}: frame kind {kind}"));
            match fault {
                Fault::Drop => ctl.cut(),
                Fault::Corrupt => {
                    // One byte in the middle of the payload (or of the tag, for an empty one).
                    let n = frame.len() - 48;
                    let at = if n > 0 { 16 + n / 2 } else { 16 + 8 };
                    frame[at] ^= 0x10;
                }
                _ => ctl.frozen.store(true, Ordering::SeqCst),
            }
        }
        let deadline = Instant::now() + Duration::from_secs(120);
        while ctl.frozen.load(Ordering::SeqCst) && !ctl.cut.load(Ordering::SeqCst) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        if ctl.cut.load(Ordering::SeqCst) || to.write_all(&frame).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

fn source() -> (Guest, PathBuf) {
    // 20,000 pages/s: every round has pages, and each round's dirty set is
    // a fraction of the last, so the rounds converge to the stop-and-copy.
    running_guest("dirty wss=8 rate=20000 report=100", "96M")
}

/// The source keeps its guest running and intact.
fn source_still_fine(src: &mut Guest, ssock: &Path, case: &str) {
    assert_eq!(api("status", ssock)["state"], "running", "{case}");
    let p = src.wait_line("PROGRESS", secs(30));
    assert!(p.starts_with("PROGRESS"), "{case}: {p}");
    src.send_line("verify");
    let v = src.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{case}: {v}");
}

/// Nothing ran at the destination, and it gives up by itself.
fn destination_ran_nothing(dst: &mut Guest, case: &str) {
    let code = dst.wait_exit(secs(30)).code();
    assert_ne!(code, Some(0), "{case}: the destination must fail");
    assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "{case}: the guest ran at the destination");
}

/// Runs one case; `src` is replaced when the fault kills it.
fn run_case(src: &mut Option<(Guest, PathBuf)>, phase: Phase, fault: Fault) {
    let case = format!("{fault:?} at {phase:?}");
    let (g, ssock) = src.get_or_insert_with(source);
    let ssock = ssock.clone();
    let (mut dst, _d, addr) =
        receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS, "--commit-wait-ms", COMMIT_WAIT_MS]);
    let relay = Relay::start(&addr, Some(phase), fault);
    let (s, to) = (ssock.clone(), relay.addr());
    let mig = std::thread::spawn(move || migrate(&s, &to, &["--peer-timeout-ms", PEER_TIMEOUT_MS]));
    let what = match relay.fired.recv_timeout(secs(60)) {
        Ok(w) => w,
        Err(_) => {
            relay.ctl.cut();
            let o = mig.join().unwrap();
            panic!(
                "{case}: the relay never saw the phase; migrate said: {}{}",
                String::from_utf8_lossy(&o.stderr),
                String::from_utf8_lossy(&o.stdout)
            );
        }
    };
    let mut source_alive = true;
    match fault {
        Fault::KillDestination => {
            dst.child.kill().unwrap();
            relay.ctl.cut();
        }
        Fault::KillSource => {
            g.child.kill().unwrap();
            let _ = g.child.wait();
            relay.ctl.cut();
            source_alive = false;
        }
        Fault::Cancel => {
            let o = ferry_cmd(&["migrate-cancel", "--api-sock", ssock.to_str().unwrap()]);
            assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
        }
        Fault::Drop | Fault::Corrupt | Fault::Stall => {}
    }
    let o = mig.join().unwrap();
    relay.ctl.cut();
    if source_alive {
        let err = String::from_utf8_lossy(&o.stderr).to_string();
        assert_eq!(o.status.code(), Some(1), "{case} ({what}): {err}");
        let m = http_get(&ssock, "/vm/migration");
        let want = if fault == Fault::Cancel { "cancelled" } else { "failed" };
        assert_eq!(m["state"], want, "{case}: {m}");
        if fault == Fault::Stall {
            assert!(err.contains("timed out") || err.contains("temporarily unavailable"), "{case}: {err}");
        }
        source_still_fine(g, &ssock, &case);
    } else {
        *src = None;
    }
    if fault != Fault::KillDestination {
        destination_ran_nothing(&mut dst, &case);
    }
}

fn matrix(fault: Fault) {
    let mut src = None;
    for phase in PHASES {
        run_case(&mut src, phase, fault);
    }
}

#[test]
fn the_relay_alone_is_transparent() {
    let (mut g, ssock) = source();
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &[]);
    let relay = Relay::start(&addr, None, Fault::Drop);
    let o = migrate(&ssock, &relay.addr(), &[]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let m: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert!(m["rounds"].as_array().map_or(0, |r| r.len()) >= 2, "round 1 and later rounds: {m}");
    dst.wait_line("PROGRESS", secs(30));
    dst.send_line("verify");
    assert!(dst.wait_line("VERIFY", secs(30)).starts_with("VERIFY OK"));
    assert_ne!(g.wait_exit(secs(30)).code(), None);
}

#[test]
fn destination_killed_in_every_phase() {
    matrix(Fault::KillDestination);
}

#[test]
fn source_killed_in_every_phase() {
    matrix(Fault::KillSource);
}

#[test]
fn link_dropped_in_every_phase() {
    matrix(Fault::Drop);
}

#[test]
fn one_corrupted_byte_in_every_phase() {
    matrix(Fault::Corrupt);
}

#[test]
fn link_stalled_past_the_peer_timeout_in_every_phase() {
    matrix(Fault::Stall);
}

#[test]
fn cancel_in_every_phase() {
    matrix(Fault::Cancel);
}

// After Go: the commit handshake never loses a guest or runs it twice.

/// `ferry migrate` with the matrix's peer timeout, through `relay`.
fn migrate_through(ssock: &Path, relay: &Relay) -> std::process::Output {
    migrate(ssock, &relay.addr(), &["--peer-timeout-ms", PEER_TIMEOUT_MS])
}

/// `ferry migrate --resume` or `--take-back [--force]` on the source.
/// `--take-back` of a commit in doubt whose destination never got `Go`:
/// the migration is cancelled, the destination drops its copy without
/// running it, and the guest runs on at the source with its memory intact.
fn taken_back(src: &mut Guest, ssock: &Path, dst: &mut Guest, case: &str) {
    let o = settle(ssock, &["--take-back"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "cancelled", "{case}: {v}");
    assert_eq!(http_get(ssock, "/vm/migration")["state"], "cancelled", "{case}");
    dst.wait_stderr("takes the guest back", secs(30));
    destination_ran_nothing(dst, case);
    source_still_fine(src, ssock, case);
}

fn settle(ssock: &Path, how: &[&str]) -> std::process::Output {
    let mut args = vec!["migrate", "--api-sock", s(ssock), "--json"];
    args.extend_from_slice(how);
    ferry_cmd(&args)
}

/// The source holds the guest paused in `commit-unconfirmed` and refuses
/// to run it: a plain resume is 409 naming the migration.
fn source_in_doubt(ssock: &Path, o: &std::process::Output, case: &str) -> String {
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{case}: {err}");
    assert!(err.contains("commit is in doubt") && err.contains("--resume"), "{case}: {err}");
    let m = http_get(ssock, "/vm/migration");
    assert_eq!(m["state"], "commit-unconfirmed", "{case}: {m}");
    assert_eq!(api("status", ssock)["state"], "paused", "{case}");
    let id = m["result"]["migration_id"].as_str().map(str::to_string).unwrap_or_default();
    let r = raw_http(ssock, b"PUT /vm/resume HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert!(r.starts_with("HTTP/1.1 409"), "{case}: {r}");
    assert!(r.contains("unconfirmed commit") && r.contains("migration "), "{case}: {r}");
    assert_eq!(api("status", ssock)["state"], "paused", "{case}: a plain resume did not run the guest");
    id
}

/// The destination holds the loaded VM without having run it, waiting for a settle.
fn destination_holding(dst: &mut Guest, dsock: &Path, case: &str) {
    let deadline = Instant::now() + secs(30);
    loop {
        let v = http_get(dsock, "/vm");
        if v["migration"]["state"] == "commit-unconfirmed" {
            assert_eq!(v["state"], "incoming", "{case}: {v}");
            break;
        }
        assert!(Instant::now() < deadline, "{case}: the destination does not hold the VM: {v}");
        std::thread::sleep(Duration::from_millis(20));
    }
    dst.collect_for(Duration::from_millis(500));
    assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "{case}: the guest ran at the destination");
}

/// The guest carries on at the destination with its sequence unbroken and
/// memory intact; the source gave it up (exit 0) and ran it no further.
fn runs_at_destination_only(src: &mut Guest, dst: &mut Guest, dsock: &Path, case: &str) {
    assert_eq!(src.wait_exit(secs(30)).code(), Some(0), "{case}: the source ends");
    let p = dst.wait_line("PROGRESS", secs(30));
    let last_src = *seqs(&src.seen).last().expect("source printed progress");
    let first_dst = field(&p, "seq").unwrap();
    assert!(
        first_dst == last_src + 1 || first_dst == last_src + 2,
        "{case}: sequence continues once: source ended at {last_src}, destination began at {first_dst}"
    );
    dst.send_line("verify");
    let v = dst.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{case}: {v}");
    assert_eq!(api("status", dsock)["state"], "running", "{case}");
    let o = ferry_cmd(&["shutdown", "--api-sock", s(dsock)]);
    assert!(o.status.success(), "{case}");
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0), "{case}");
}

#[test]
fn go_lost_is_settled_by_resume_and_the_guest_runs_at_the_destination_once() {
    let case = "Go lost";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate_through(&ssock, &relay);
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Go");
    let id = source_in_doubt(&ssock, &o, case);
    destination_holding(&mut dst, &dsock, case);
    assert_eq!(http_get(&dsock, "/vm")["migration"]["migration_id"], id.as_str(), "{case}");
    // A destination that never sent Ready for this migration refuses the settle;
    // the source stays in doubt and can try again.
    let (mut other, _osock, other_addr) = receiver("unix://DIR/mig.sock", &[]);
    relay.retarget(&other_addr);
    let o = settle(&ssock, &["--resume"]);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert_eq!(o.status.code(), Some(1), "{case}: {err}");
    assert!(err.contains("refused") && err.contains("Settle"), "{case}: {err}");
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "commit-unconfirmed", "{case}");
    assert_eq!(other.wait_exit(secs(30)).code(), Some(1), "{case}");
    assert!(!other.seen.iter().any(|l| l.starts_with("PROGRESS")), "{case}");
    // The real destination: it has no Go, gets it now and runs the guest.
    relay.retarget(&addr);
    let o = settle(&ssock, &["--resume"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    assert_eq!(v["migration_id"], id.as_str(), "{case}: {v}");
    runs_at_destination_only(&mut src, &mut dst, &dsock, case);
}

#[test]
fn running_lost_is_settled_by_resume_without_running_the_guest_twice() {
    let case = "Running lost";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Running), Fault::Drop);
    let o = migrate_through(&ssock, &relay);
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Running");
    source_in_doubt(&ssock, &o, case);
    // The destination got Go: the guest runs there, and only there.
    dst.wait_line("PROGRESS", secs(30));
    let o = settle(&ssock, &["--resume"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    dst.wait_stderr("runs here", secs(10));
    runs_at_destination_only(&mut src, &mut dst, &dsock, case);
}

#[test]
fn running_lost_cannot_be_taken_back_the_migration_completes_instead() {
    let case = "Running lost, take-back asked";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Running), Fault::Drop);
    let o = migrate_through(&ssock, &relay);
    source_in_doubt(&ssock, &o, case);
    dst.wait_line("PROGRESS", secs(30));
    // The destination got Go and runs the guest: taking it back would run it
    // twice, so the settle completes the migration instead.
    let o = settle(&ssock, &["--take-back"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    runs_at_destination_only(&mut src, &mut dst, &dsock, case);
}

#[test]
fn the_source_killed_after_go_leaves_the_guest_running_at_the_destination() {
    let case = "source killed after Go";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Running), Fault::KillSource);
    let s2 = ssock.clone();
    let to = relay.addr();
    let mig = std::thread::spawn(move || migrate(&s2, &to, &["--peer-timeout-ms", PEER_TIMEOUT_MS]));
    relay.fired.recv_timeout(secs(60)).expect("the relay saw Running");
    src.child.kill().unwrap();
    let _ = src.child.wait();
    relay.ctl.cut();
    let _ = mig.join();
    let p = dst.wait_line("PROGRESS", secs(30));
    assert!(p.starts_with("PROGRESS"), "{case}");
    dst.send_line("verify");
    let v = dst.wait_line("VERIFY", secs(30));
    assert!(v.starts_with("VERIFY OK"), "{case}: {v}");
    assert_eq!(api("status", &dsock)["state"], "running", "{case}");
    let o = ferry_cmd(&["shutdown", "--api-sock", s(&dsock)]);
    assert!(o.status.success(), "{case}");
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0), "{case}");
}

#[test]
fn go_lost_and_taken_back_runs_the_guest_at_the_source_again() {
    let case = "Go lost, taken back";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate_through(&ssock, &relay);
    source_in_doubt(&ssock, &o, case);
    destination_holding(&mut dst, &dsock, case);
    taken_back(&mut src, &ssock, &mut dst, case);
}

#[test]
fn a_commit_wait_that_expires_drops_the_never_run_copy_and_the_source_takes_it_back() {
    let case = "commit wait expired";
    let (mut src, ssock) = source();
    let (mut dst, _dsock, addr) =
        receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS, "--commit-wait-ms", COMMIT_WAIT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate_through(&ssock, &relay);
    source_in_doubt(&ssock, &o, case);
    // Nobody settles: the destination drops the VM it never ran and exits 1.
    dst.wait_stderr("never ran here", secs(30));
    let code = dst.wait_exit(secs(30)).code();
    assert_eq!(code, Some(1), "{case}");
    assert!(!dst.seen.iter().any(|l| l.starts_with("PROGRESS")), "{case}: the guest ran at the destination");
    // The source cannot reach it: still in doubt, still paused.
    let o = settle(&ssock, &["--take-back"]);
    assert_eq!(o.status.code(), Some(1), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "commit-unconfirmed", "{case}");
    assert_eq!(api("status", &ssock)["state"], "paused", "{case}");
    // The operator knows the destination exited without running it: forced take-back.
    let o = settle(&ssock, &["--take-back", "--force"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    source_still_fine(&mut src, &ssock, case);
}

#[test]
fn every_link_fault_after_go_is_settled_by_resume() {
    for phase in [Phase::Go, Phase::Running] {
        for fault in [Fault::Drop, Fault::Stall, Fault::Corrupt] {
            let case = format!("{fault:?} at {phase:?}");
            let (mut src, ssock) = source();
            let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
            let relay = Relay::start(&addr, Some(phase), fault);
            let o = migrate_through(&ssock, &relay);
            assert!(relay.fired.try_recv().is_ok(), "{case}: the relay struck");
            source_in_doubt(&ssock, &o, &case);
            if phase == Phase::Go {
                // Go was cut, held back or damaged: the destination never read an intact one.
                destination_holding(&mut dst, &dsock, &case);
            } else {
                dst.wait_line("PROGRESS", secs(30));
            }
            // The settle goes over a new connection, which the relay leaves alone.
            let o = settle(&ssock, &["--resume"]);
            assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
            let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
            assert_eq!(v["state"], "completed", "{case}: {v}");
            relay.ctl.cut();
            runs_at_destination_only(&mut src, &mut dst, &dsock, &case);
        }
    }
}

// Post-copy and hybrid: the same commit, with pages still to follow.

/// `ferry migrate --mode MODE` through `relay`. Hybrid runs two rounds
/// with a budget of 0 ms, so that it always switches to post-copy with
/// what round 2 left dirty (a converged hybrid may defer nothing).
fn migrate_mode_through(ssock: &Path, relay: &Relay, mode: &str) -> std::process::Output {
    let mut args = vec!["--peer-timeout-ms", PEER_TIMEOUT_MS, "--mode", mode];
    if mode == "hybrid" {
        args.extend(["--downtime-ms", "0", "--max-rounds", "2"]);
    }
    migrate(ssock, &relay.addr(), &args)
}

/// The source in doubt kept what a post-copy resume needs: the mode, and
/// the pages it deferred (which only it has).
fn deferred_pages_kept(ssock: &Path, mode: &str, case: &str) {
    let m = http_get(ssock, "/vm/migration");
    assert_eq!(m["result"]["mode"], mode, "{case}: {m}");
    assert!(m["result"]["postcopy"]["deferred_pages"].as_u64().unwrap_or(0) > 0, "{case}: {m}");
    if mode == "hybrid" {
        assert!(!m["result"]["rounds"].as_array().unwrap().is_empty(), "{case}: hybrid ran rounds first: {m}");
    }
}

/// The settle completed a post-copy: the destination got every deferred
/// page over page streams opened again by the resume.
fn postcopy_completed_after_settle(o: &std::process::Output, id: &str, mode: &str, case: &str) {
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    assert_eq!(v["migration_id"], id, "{case}: {v}");
    assert_eq!(v["mode"], mode, "{case}: {v}");
    let pc = &v["postcopy"];
    let deferred = pc["deferred_pages"].as_u64().unwrap();
    let d = &pc["destination"];
    assert!(d.is_object(), "{case}: the destination reported its figures: {v}");
    assert!(
        d["pages_pushed"].as_u64().unwrap() + d["pages_requested"].as_u64().unwrap() >= deferred,
        "{case}: every deferred page arrived: {v}"
    );
    assert_eq!(pc["resumes"], 1, "{case}: the page streams were opened once more: {v}");
    assert_eq!(d["resumes"], 1, "{case}: {v}");
}

/// `Go` lost in post-copy or hybrid, then `--resume`: the destination ran
/// nothing while in doubt, gets `Go` over the settle, and the post-copy
/// resume brings the pages; the guest continues there only.
fn postcopy_go_lost_then_resume(mode: &str) {
    let case = format!("{mode}: Go lost, then --resume");
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate_mode_through(&ssock, &relay, mode);
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Go");
    let id = source_in_doubt(&ssock, &o, &case);
    deferred_pages_kept(&ssock, mode, &case);
    destination_holding(&mut dst, &dsock, &case);
    assert_eq!(http_get(&dsock, "/vm")["migration"]["migration_id"], id.as_str(), "{case}");
    let o = settle(&ssock, &["--resume"]);
    postcopy_completed_after_settle(&o, &id, mode, &case);
    relay.ctl.cut();
    runs_at_destination_only(&mut src, &mut dst, &dsock, &case);
}

#[test]
fn postcopy_go_lost_is_settled_by_resume_and_the_pages_follow() {
    postcopy_go_lost_then_resume("postcopy");
}

#[test]
fn hybrid_go_lost_is_settled_by_resume_and_the_pages_follow() {
    postcopy_go_lost_then_resume("hybrid");
}

#[test]
fn postcopy_go_lost_and_taken_back_runs_the_guest_at_the_source_again() {
    let case = "postcopy: Go lost, taken back";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate_mode_through(&ssock, &relay, "postcopy");
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Go");
    source_in_doubt(&ssock, &o, case);
    deferred_pages_kept(&ssock, "postcopy", case);
    destination_holding(&mut dst, &dsock, case);
    // The source still has every page: it takes the guest back whole.
    taken_back(&mut src, &ssock, &mut dst, case);
}

#[test]
fn postcopy_running_lost_is_settled_by_resume_and_the_push_goes_on() {
    let case = "postcopy: Running lost, then --resume";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Running), Fault::Drop);
    let o = migrate_mode_through(&ssock, &relay, "postcopy");
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Running");
    let id = source_in_doubt(&ssock, &o, case);
    deferred_pages_kept(&ssock, "postcopy", case);
    // The destination got Go; with its page streams gone it pauses the guest.
    dst.wait_stderr("post-copy link lost", secs(30));
    // The settle hears Running (nothing is sent twice), then the post-copy
    // resume pushes what the destination still lacks.
    let o = settle(&ssock, &["--resume"]);
    dst.wait_stderr("runs here", secs(10));
    postcopy_completed_after_settle(&o, &id, "postcopy", case);
    runs_at_destination_only(&mut src, &mut dst, &dsock, case);
}

// Two more for the pre-copy settle: over TLS, and with --keep-paused.

/// A TCP relay for TLS connections: it sees only TLS records, so it finds
/// `Go` by the frames' shape. Every frame is written as separate records
/// (header, payload, tag); the destination's `Ready` is the only frame whose
/// payload record is 39 bytes long (22 bytes of `{"memory_digest":null}`
/// plus TLS 1.3's type byte and 16-byte tag) once memory has moved (the
/// handshake's records come before), and the source sends `Go` right
/// after it: the first record from the source after that record is
/// Go's header, and the relay cuts the first connection there. Later
/// connections (the settle) are forwarded untouched.
struct TlsRelay {
    addr: String,
    fired: Receiver<()>,
}

impl TlsRelay {
    fn start(to: &str) -> TlsRelay {
        use std::net::{TcpListener, TcpStream};
        let to = to.trim_start_matches("tcp://").to_string();
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = format!("tcp://{}", l.local_addr().unwrap());
        let (tx, fired) = channel();
        std::thread::spawn(move || {
            for n in 0..16 {
                let Ok((a, _)) = l.accept() else { return };
                let Ok(b) = TcpStream::connect(&to) else { continue };
                let ready_seen = Arc::new((AtomicBool::new(false), std::sync::atomic::AtomicUsize::new(0)));
                let socks = Arc::new(Mutex::new(vec![a.try_clone().unwrap(), b.try_clone().unwrap()]));
                let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
                let (rs, sk) = (ready_seen.clone(), socks.clone());
                std::thread::spawn(move || tls_pump(b2, a2, false, n == 0, &rs, &sk, None));
                let tx = tx.clone();
                std::thread::spawn(move || tls_pump(a, b, true, n == 0, &ready_seen, &socks, Some(tx)));
            }
        });
        TlsRelay { addr, fired }
    }
}

/// Forwards TLS records from `from` to `to` (`source_side`: the source's
/// direction); on the first connection, drops Go as [`TlsRelay`] says.
fn tls_pump(
    mut from: std::net::TcpStream,
    mut to: std::net::TcpStream,
    source_side: bool,
    strike: bool,
    (ready_seen, sent): &(AtomicBool, std::sync::atomic::AtomicUsize),
    socks: &Mutex<Vec<std::net::TcpStream>>,
    fired: Option<Sender<()>>,
) {
    const APPLICATION_DATA: u8 = 0x17;
    const READY_PAYLOAD_RECORD: usize = 22 + 1 + 16;
    /// Round 1 of the guest's memory (uncompressed) has passed: the
    /// handshake is long over.
    const MEMORY_MOVED: usize = 256 << 10;
    loop {
        let mut rec = vec![0u8; 5];
        if from.read_exact(&mut rec).is_err() {
            break;
        }
        let n = u16::from_be_bytes([rec[3], rec[4]]) as usize;
        rec.resize(5 + n, 0);
        if from.read_exact(&mut rec[5..]).is_err() {
            break;
        }
        if strike && rec[0] == APPLICATION_DATA {
            if source_side {
                sent.fetch_add(n, Ordering::SeqCst);
            } else if n == READY_PAYLOAD_RECORD && sent.load(Ordering::SeqCst) >= MEMORY_MOVED {
                ready_seen.store(true, Ordering::SeqCst);
            }
            if source_side && ready_seen.load(Ordering::SeqCst) {
                if let Some(tx) = &fired {
                    let _ = tx.send(());
                }
                for s in socks.lock().unwrap().iter() {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                }
                return;
            }
        }
        if to.write_all(&rec).is_err() {
            break;
        }
    }
    let _ = to.shutdown(std::net::Shutdown::Both);
    let _ = from.shutdown(std::net::Shutdown::Both);
}

#[test]
fn go_lost_over_tls_is_settled_by_resume_over_tls() {
    let case = "TLS: Go lost";
    let ca = tempfile::tempdir().unwrap();
    certs(ca.path(), &["src", "127.0.0.1"]);
    let (mut src, ssock) = source();
    let mut dargs = tls_args(ca.path(), "127.0.0.1");
    dargs.extend(["--allow-peer", "src", "--peer-timeout-ms", PEER_TIMEOUT_MS].map(String::from));
    let dargs: Vec<&str> = dargs.iter().map(String::as_str).collect();
    let (mut dst, dsock, addr) = receiver("tcp://127.0.0.1:0", &dargs);
    let relay = TlsRelay::start(&addr);
    let sargs = tls_args(ca.path(), "src");
    let mut args: Vec<&str> = sargs.iter().map(String::as_str).collect();
    // Uncompressed, so that memory moving is plain to see in record sizes;
    // a generous pause budget, since the relay forwards record by record
    // and the last rounds' delivery rate is low (this is about the settle).
    args.extend(["--peer-timeout-ms", PEER_TIMEOUT_MS, "--compress", "none", "--downtime-ms", "500"]);
    let o = migrate(&ssock, &relay.addr, &args);
    assert!(
        relay.fired.try_recv().is_ok(),
        "{case}: the relay cut the link at Go; migrate said: {}{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    let id = source_in_doubt(&ssock, &o, case);
    assert_eq!(http_get(&ssock, "/vm/migration")["result"]["transport"], "tls", "{case}");
    destination_holding(&mut dst, &dsock, case);
    // The settle opens a new TLS connection with the migration's files; the
    // destination's allow-list applies to it again.
    let o = settle(&ssock, &["--resume"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    assert_eq!(v["migration_id"], id.as_str(), "{case}: {v}");
    assert_eq!(v["transport"], "tls", "{case}: {v}");
    runs_at_destination_only(&mut src, &mut dst, &dsock, case);
}

#[test]
fn keep_paused_after_a_settle_keeps_a_paused_copy_that_refuses_every_operation() {
    let case = "Go lost, --keep-paused, then --resume";
    let (mut src, ssock) = source();
    let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
    let relay = Relay::start(&addr, Some(Phase::Go), Fault::Drop);
    let o = migrate(&ssock, &relay.addr(), &["--peer-timeout-ms", PEER_TIMEOUT_MS, "--keep-paused"]);
    assert!(relay.fired.try_recv().is_ok(), "{case}: the relay swallowed Go");
    source_in_doubt(&ssock, &o, case);
    destination_holding(&mut dst, &dsock, case);
    let o = settle(&ssock, &["--resume"]);
    assert!(o.status.success(), "{case}: {}", String::from_utf8_lossy(&o.stderr));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["state"], "completed", "{case}: {v}");
    // The guest runs at the destination, intact.
    dst.wait_line("PROGRESS", secs(30));
    dst.send_line("verify");
    assert!(dst.wait_line("VERIFY", secs(30)).starts_with("VERIFY OK"), "{case}");
    // The source keeps its paused copy, as after a normal commit with
    // --keep-paused: the process stays, the guest does not run, and every
    // operation is refused with 409 naming where the guest went.
    // (Lines the guest printed before its pause are read first.)
    src.collect_for(Duration::from_millis(500));
    let last = seqs(&src.seen).last().copied();
    src.collect_for(Duration::from_millis(500));
    assert!(src.child.try_wait().unwrap().is_none(), "{case}: the source keeps its copy");
    assert_eq!(seqs(&src.seen).last().copied(), last, "{case}: the paused copy ran");
    assert_eq!(api("status", &ssock)["state"], "paused", "{case}");
    assert_eq!(http_get(&ssock, "/vm/migration")["state"], "completed", "{case}");
    let body = format!(r#"{{"to":"{}"}}"#, relay.addr());
    let snap = format!(r#"{{"path":"{}"}}"#, src.path("copy.img").display());
    for (path, body) in [
        ("/vm/resume", ""),
        ("/vm/pause", ""),
        ("/vm/shutdown", ""),
        ("/vm/snapshot", snap.as_str()),
        ("/vm/migrate", body.as_str()),
        ("/vm/migration/resume", ""),
        ("/vm/migration/take-back", ""),
    ] {
        let r =
            raw_http(&ssock, format!("PUT {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n{body}", body.len()).as_bytes());
        assert!(r.starts_with("HTTP/1.1 409"), "{case}: {path}: {r}");
    }
    assert_eq!(api("status", &ssock)["state"], "paused", "{case}: nothing ran the copy");
    // SIGTERM does not shut down a migrated copy (the guest lives elsewhere);
    // it says so, and a second signal ends the process.
    let pid = src.child.id() as i32;
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    src.wait_stderr("was not shut down", secs(30));
    assert!(src.child.try_wait().unwrap().is_none(), "{case}");
    assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
    src.wait_exit(secs(30));
    assert_eq!(seqs(&src.seen).last().copied(), last, "{case}: the paused copy never ran again");
    assert_eq!(api("status", &dsock)["state"], "running", "{case}");
    let o = ferry_cmd(&["shutdown", "--api-sock", s(&dsock)]);
    assert!(o.status.success(), "{case}");
    assert_eq!(dst.wait_exit(secs(30)).code(), Some(0), "{case}");
}

#[test]
fn every_link_fault_at_go_and_running_in_postcopy_is_settled_by_resume() {
    for phase in [Phase::Go, Phase::Running] {
        for fault in [Fault::Stall, Fault::Corrupt] {
            let case = format!("postcopy: {fault:?} at {phase:?}");
            let (mut src, ssock) = source();
            let (mut dst, dsock, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
            let relay = Relay::start(&addr, Some(phase), fault);
            let o = migrate_mode_through(&ssock, &relay, "postcopy");
            assert!(relay.fired.try_recv().is_ok(), "{case}: the relay struck");
            let id = source_in_doubt(&ssock, &o, &case);
            if phase == Phase::Go {
                // Held back or damaged: the destination never read an intact Go.
                destination_holding(&mut dst, &dsock, &case);
            } else {
                // It had Go; its page link is gone (cut by the source, or timed out).
                dst.wait_stderr("post-copy link lost", secs(30));
            }
            let o = settle(&ssock, &["--resume"]);
            postcopy_completed_after_settle(&o, &id, "postcopy", &case);
            relay.ctl.cut();
            runs_at_destination_only(&mut src, &mut dst, &dsock, &case);
        }
    }
}
