//! End to end: the pre-copy fault matrix. A frame-aware relay between the
//! source and the destination finds each phase of a migration by the frames
//! that pass (the Hello, round 1's pages, a later round's pages, the state,
//! the destination's Ready) and injects a fault exactly there: the
//! destination or the source killed, the link dropped, one byte corrupted,
//! the link stalled past the peer timeout, or the user's cancel. Every case
//! asserts that the guest runs on exactly one side afterwards (for a killed
//! source: on none, and nothing ran at the destination) with its memory
//! intact (`verify`).

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
/// Frames at most 16 MiB of payload (docs/migration-protocol.md).
const MAX_PAYLOAD: usize = 16 << 20;
const PEER_TIMEOUT_MS: &str = "3000";

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
struct Relay {
    ctl: Arc<Control>,
    fired: Receiver<String>,
    path: PathBuf,
    _dir: tempfile::TempDir,
}

impl Relay {
    fn start(to: &str, phase: Option<Phase>, fault: Fault) -> Relay {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("relay.sock");
        let l = UnixListener::bind(&path).unwrap();
        let ctl = Arc::new(Control::default());
        let (tx, fired) = channel();
        let (c, to) = (ctl.clone(), to.trim_start_matches("unix://").to_string());
        std::thread::spawn(move || {
            let Ok((a, _)) = l.accept() else { return };
            let Ok(b) = UnixStream::connect(&to) else { return };
            c.socks.lock().unwrap().extend([a.try_clone().unwrap(), b.try_clone().unwrap()]);
            let (a2, b2) = (a.try_clone().unwrap(), b.try_clone().unwrap());
            let (c2, tx2) = (c.clone(), tx.clone());
            let back = std::thread::spawn(move || pump(b2, a2, false, phase, fault, &c2, &tx2));
            pump(a, b, true, phase, fault, &c, &tx);
            let _ = back.join();
        });
        Relay { ctl, fired, path, _dir: dir }
    }

    fn addr(&self) -> String {
        format!("unix://{}", self.path.display())
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
            let _ = fired.send(format!("{phase:?}: frame kind {kind}"));
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
    let (mut dst, _d, addr) = receiver("unix://DIR/mig.sock", &["--peer-timeout-ms", PEER_TIMEOUT_MS]);
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
