//! Live migration: the source side ([`migrate_out`]) runs the pre-copy
//! engine into a socket and then the commit handshake; the destination side
//! ([`receive`]) builds the VM from the stream. The protocol is specified in
//! `docs/migration-protocol.md`.
//!
//! Who owns the guest is decided in one place, the commit:
//!
//! 1. the source pauses the guest, sends the last pages and the `VmState`;
//! 2. the destination loads and checks everything, then says `Ready`;
//! 3. only then the source says `Go` and gives the guest up for good;
//! 4. the destination resumes the guest and says `Running`.
//!
//! Until `Go` is sent, every failure resumes the guest at the source (the
//! caller, [`crate::control::VmController`], restores the user's state). The
//! destination never runs a guest without `Go`. After `Go` the source never
//! resumes on its own, so the guest cannot run twice.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_vmm::{CpuTemplate, GuestRam, Vm, VmState};
use serde::{Deserialize, Serialize};

use crate::precopy::{precopy, PrecopyConfig, RoundStats, StopReason};
use crate::ratelimit::{Bandwidth, TokenBucket};
use crate::sink::PageSink;
use crate::transport::{self, Address, ClientSecurity, Listener, TlsConfig, TransportReader, TransportWriter};
use crate::wire::{
    check_ram_range, encode_pages, Accept, CpuFeatureWord, FrameKey, FrameReader, FrameWriter, Hello, Kind, Message,
    Ready, Reason, WireCodec, WireError, CAP_ZSTD, HEADER_LEN, MAX_RUN_PAGES, PAGE, PROTOCOL_VERSION, TAG_LEN,
};

/// Default time a peer may stay silent (or a write may block) before the
/// migration gives up on it.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time to connect (TCP and TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Capabilities this build understands.
pub const CAPABILITIES: &[&str] = &[CAP_DIGEST, CAP_ZSTD];

/// The destination hashes the received memory and returns the digest in
/// `Ready`; the source refuses to commit if it differs from its own.
pub const CAP_DIGEST: &str = "memory-digest";

/// How memory moves.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MigrationMode {
    /// Rounds while the guest runs, then stop-and-copy.
    #[default]
    Precopy,
    /// Resume at the destination at once, pages fetched on first touch.
    Postcopy,
    /// Pre-copy rounds, then post-copy.
    Hybrid,
}

macro_rules! from_str_via_serde {
    ($t:ty, $what:literal, $choices:literal) => {
        impl std::str::FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                serde_json::from_value(serde_json::Value::String(s.to_string()))
                    .map_err(|_| format!("unknown {} {s:?}: use {}", $what, $choices))
            }
        }
    };
}
from_str_via_serde!(MigrationMode, "mode", "precopy, postcopy or hybrid");
from_str_via_serde!(WireCodec, "compression", "lz4, zstd or none");

/// Body of `PUT /vm/migrate` and what `ferry migrate` sends.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MigrateRequest {
    /// Destination: `tcp://HOST:PORT` or `unix://PATH`.
    pub to: String,
    /// How memory moves.
    #[serde(default)]
    pub mode: MigrationMode,
    /// Pause budget for the stop-and-copy (default 5).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Most pre-copy rounds (default 8).
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Page compression on the wire.
    #[serde(default)]
    pub compress: WireCodec,
    /// Cap on the source's sending rate, frames included (bytes/s, or a
    /// `RATE` string such as `"100M"` or `"1gbit"`); None: as fast as the link.
    #[serde(default)]
    pub max_bandwidth: Option<Bandwidth>,
    /// Parallel streams (only 1 in this version).
    #[serde(default)]
    pub streams: Option<u32>,
    /// After the commit, keep a paused copy here instead of ending the VM.
    #[serde(default)]
    pub keep_paused: bool,
    /// Plain TCP without TLS: memory crosses the wire in the clear.
    #[serde(default)]
    pub insecure: bool,
    /// Our certificate (PEM), for mutual TLS.
    #[serde(default)]
    pub tls_cert: Option<PathBuf>,
    /// Our private key (PEM).
    #[serde(default)]
    pub tls_key: Option<PathBuf>,
    /// The CA that signs the destination's certificate (PEM).
    #[serde(default)]
    pub tls_ca: Option<PathBuf>,
    /// Name the destination's certificate must carry (default: the host in `to`).
    #[serde(default)]
    pub peer_name: Option<String>,
    /// Compare memory digests at both ends before committing.
    #[serde(default)]
    pub verify_digest: bool,
    /// How long the peer may stall, in ms (default 30000).
    #[serde(default)]
    pub peer_timeout_ms: Option<u64>,
    /// Turn auto-converge off: a guest that dirties memory faster than the
    /// link carries it makes the migration give up instead of being slowed.
    #[serde(default)]
    pub no_throttle: bool,
}

/// Default pre-copy rounds of a migration: auto-converge needs room to
/// step from 20% to 99%.
pub const DEFAULT_MIGRATION_ROUNDS: u32 = 30;

/// Where a migration is, as QEMU's query-migrate names it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum MigrationState {
    /// Connecting and negotiating.
    Setup,
    /// Pre-copy rounds.
    Active,
    /// Stop-and-copy and commit.
    Device,
    /// The guest runs at the destination.
    Completed,
    /// It failed; the guest runs at the source.
    Failed,
    /// Cancelled by the user; the guest runs at the source.
    Cancelled,
}

/// Figures of one migration (source side).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct MigrationStats {
    /// Final state.
    pub state: MigrationState,
    /// This migration's id.
    pub migration_id: String,
    /// Destination address.
    pub to: String,
    /// tcp, tls or unix.
    pub transport: String,
    /// Whole migration.
    pub total_ms: f64,
    /// Connecting and negotiating.
    pub setup_ms: f64,
    /// From the source's final pause to the destination's `Running`.
    pub downtime_ms: f64,
    /// The pause the engine planned for (pause budget).
    pub expected_downtime_ms: f64,
    /// Bytes sent, frame headers and tags included.
    pub bytes_sent: u64,
    /// Bytes received from the destination.
    pub bytes_received: u64,
    /// Pages sent with data, summed over rounds.
    pub pages_normal: u64,
    /// Zero pages sent as zero runs.
    pub pages_zero: u64,
    /// Pages never touched by the guest: not read, not sent.
    pub pages_skipped_unpopulated: u64,
    /// Rounds, the last one paused.
    pub rounds: Vec<RoundFigures>,
    /// Why pre-copy stopped iterating.
    pub stop_reason: StopReason,
    /// Average payload throughput of the live rounds (MB/s).
    pub throughput_mb_per_s: f64,
    /// Memory digest at the final pause, when verified.
    pub memory_digest: Option<String>,
    /// The destination's digest of what it received, when verified.
    pub destination_digest: Option<String>,
    /// Auto-converge: each step and what it cost the guest (None with no_throttle).
    pub throttle: Option<crate::precopy::ThrottleStats>,
    /// The page codec asked for.
    #[serde(default)]
    pub compress: WireCodec,
    /// The cap the sender paced itself to, bytes/s (None: uncapped).
    #[serde(default)]
    pub max_bandwidth: Option<Bandwidth>,
    /// Time the sender waited on the cap, ms.
    #[serde(default)]
    pub bandwidth_wait_ms: f64,
}

/// One round, with its dirty rate.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RoundFigures {
    /// Pages sent.
    pub pages: u64,
    /// Of those, with data.
    pub data_pages: u64,
    /// Of those, zero.
    pub zero_pages: u64,
    /// Duration.
    pub ms: f64,
    /// Guest paused during it.
    pub paused: bool,
    /// Pages the guest dirtied per second while this round ran (the next
    /// round's size over this round's time).
    pub dirty_pages_per_s: Option<f64>,
    /// Bytes this round put on the wire, frame headers and tags included.
    #[serde(default)]
    pub wire_bytes: u64,
    /// Measured wire rate of the round (bytes/s): what `max_bandwidth` caps.
    #[serde(default)]
    pub wire_bytes_per_s: f64,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrationError {
    /// The request is wrong.
    #[error("{0}")]
    Invalid(String),
    /// Connecting or authenticating failed.
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    /// The destination refused before any memory moved.
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    /// The peer sent something wrong, stalled or vanished.
    #[error(transparent)]
    Wire(#[from] WireError),
    /// The peer gave up.
    #[error("the peer aborted the migration: {0}")]
    PeerAborted(String),
    /// The destination's memory does not match the source's.
    #[error("memory digest mismatch: source {source_digest}, destination {destination}; not committing")]
    DigestMismatch {
        /// Ours.
        source_digest: String,
        /// Theirs.
        destination: String,
    },
    /// The engine or the VM failed.
    #[error(transparent)]
    Engine(#[from] crate::Error),
    /// A configuration the destination cannot run faithfully.
    #[error("{0}")]
    Mismatch(String),
}

impl MigrationError {
    /// True when the user cancelled it.
    pub fn is_cancelled(&self) -> bool {
        matches!(self, MigrationError::Engine(crate::Error::Cancelled))
    }

    /// True when the request itself was wrong (a 400).
    pub fn is_client_error(&self) -> bool {
        matches!(self, MigrationError::Invalid(_))
            || matches!(self, MigrationError::Transport(transport::TransportError::File { .. }))
            || matches!(self, MigrationError::Transport(transport::TransportError::BadAddress { .. }))
    }
}

/// Progress of the running migration, for `GET /vm/migration` and the terminal.
#[derive(Clone, Debug, Serialize, Default)]
pub struct MigrationProgress {
    /// Where it is (None before it starts).
    pub state: Option<MigrationState>,
    /// Rounds finished.
    pub round: u32,
    /// Bytes on the wire so far.
    pub bytes_sent: u64,
    /// Pages sent so far.
    pub pages_sent: u64,
    /// Elapsed time.
    pub elapsed_ms: f64,
    /// The final statistics, once done.
    pub result: Option<MigrationStats>,
    /// The error, once failed.
    pub error: Option<String>,
    /// The source has sent `Go`: the guest is the destination's, cancel is too late.
    pub committed: bool,
    /// A cancel was asked for; the migration stops at its next frame.
    #[serde(skip)]
    pub cancel_requested: bool,
}

/// Shared progress handle.
pub type ProgressHandle = Arc<Mutex<MigrationProgress>>;

fn random_hex() -> String {
    let mut b = [0u8; 16];
    let ok = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut b)).is_ok();
    if !ok {
        // Never reached on Linux; still unique enough for an id.
        let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
        b = blake3::hash(format!("{t:?}{}", std::process::id()).as_bytes()).as_bytes()[..16].try_into().unwrap();
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A fresh VM identity, for a VM that has none yet.
pub fn new_vm_id() -> String {
    random_hex()
}

fn cpu_features(template: CpuTemplate) -> Result<Vec<CpuFeatureWord>, MigrationError> {
    Ok(ferry_vmm::vm::guest_cpu_features(template)
        .map_err(crate::Error::Vm)?
        .into_iter()
        .map(|(leaf, subleaf, register, bits)| CpuFeatureWord { leaf, subleaf, register: register.into(), bits })
        .collect())
}

/// Which of the source's feature bits this host lacks, as messages.
pub fn missing_cpu_features(source: &[CpuFeatureWord], here: &[CpuFeatureWord]) -> Vec<String> {
    source
        .iter()
        .filter_map(|s| {
            let h = here
                .iter()
                .find(|h| h.leaf == s.leaf && h.subleaf == s.subleaf && h.register == s.register)
                .map(|h| h.bits)
                .unwrap_or(0);
            let missing = s.bits & !h;
            (missing != 0)
                .then(|| format!("CPUID {:#x}.{} {}: bits {missing:#010x} missing here", s.leaf, s.subleaf, s.register))
        })
        .collect()
}

/// The engine's sink: page runs and zero runs as frames.
struct WireSink<'a> {
    w: &'a mut FrameWriter<TransportWriter>,
    r: &'a mut FrameReader<TransportReader>,
    rounds: u32,
    codec: WireCodec,
    buf: Vec<u8>,
    progress: &'a ProgressHandle,
    /// Paces every frame to `max_bandwidth`.
    pace: Option<TokenBucket>,
    /// `w.bytes` after each live round's `RoundEnd`, for the per-round wire figures.
    marks: Vec<u64>,
}

impl WireSink<'_> {
    /// Waits until a frame of `payload` bytes fits the cap (headers and tag counted).
    fn pace(&mut self, payload: usize) {
        if let Some(b) = self.pace.as_mut() {
            b.take((HEADER_LEN + payload + TAG_LEN) as u64);
        }
    }

    /// Pages per `Pages` frame: fewer under a slow cap, so frames keep coming.
    fn run_pages(&self) -> u32 {
        self.pace.as_ref().map_or(MAX_RUN_PAGES, |b| b.pages_per_frame(MAX_RUN_PAGES))
    }
}

impl PageSink for WireSink<'_> {
    fn pages(&mut self, gpa: u64, data: &[u8]) -> crate::Result<()> {
        if self.progress.lock().unwrap().cancel_requested {
            return Err(crate::Error::Cancelled);
        }
        let step = (self.run_pages() as u64 * PAGE) as usize;
        for (i, c) in data.chunks(step).enumerate() {
            encode_pages(gpa + (i * step) as u64, c, self.codec, &mut self.buf);
            self.pace(self.buf.len());
            self.w.write_raw(Kind::Pages, &self.buf).map_err(wire_io)?;
        }
        let mut p = self.progress.lock().unwrap();
        p.bytes_sent = self.w.bytes;
        p.pages_sent += data.len() as u64 / PAGE;
        Ok(())
    }

    fn zero(&mut self, gpa: u64, npages: u64) -> crate::Result<()> {
        self.pace(16);
        self.w.send(&Message::Zero { gpa, npages }).map_err(wire_io)
    }

    fn sync(&mut self, _round: u32, pages: u64) -> crate::Result<()> {
        if self.progress.lock().unwrap().cancel_requested {
            return Err(crate::Error::Cancelled);
        }
        self.rounds += 1;
        let round = self.rounds;
        self.pace(12);
        self.w.send(&Message::RoundEnd { round, pages }).map_err(wire_io)?;
        self.w.flush().map_err(wire_io)?;
        self.marks.push(self.w.bytes);
        self.progress.lock().unwrap().round = round;
        if let Some(b) = self.pace.as_mut() {
            b.restart();
        }
        match self.r.recv()? {
            Message::RoundEnd { round: r, .. } if r == round => Ok(()),
            Message::Abort(why) => Err(crate::Error::Wire(WireError::BadFrame {
                seq: 0,
                what: format!("the destination aborted: {}", why.reason),
            })),
            other => Err(crate::Error::Wire(unexpected(0, "RoundEnd acknowledgement", &other))),
        }
    }
}

fn wire_io(e: std::io::Error) -> crate::Error {
    crate::Error::Wire(WireError::Io(e))
}

/// Source side of a migration, with the VM held by the caller for the
/// whole call. On `Ok` the guest belongs to the destination (paused here,
/// never to be resumed by this process); on `Err` the guest's state here is
/// as the engine left it and the caller resumes it.
pub fn migrate_out(
    vm: &Arc<Vm>,
    vm_id: &str,
    req: &MigrateRequest,
    progress: &ProgressHandle,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    if req.mode != MigrationMode::Precopy {
        return Err(MigrationError::Invalid(format!(
            "mode {:?} is not supported by this build yet; use precopy",
            req.mode
        )));
    }
    if req.streams.unwrap_or(1) != 1 {
        return Err(MigrationError::Invalid("only one stream is supported by this build yet (--streams 1)".into()));
    }
    let addr: Address = req.to.parse()?;
    let tls = match (&req.tls_cert, &req.tls_key, &req.tls_ca) {
        (Some(cert), Some(key), Some(ca)) => Some(TlsConfig { cert: cert.clone(), key: key.clone(), ca: ca.clone() }),
        (None, None, None) => None,
        _ => return Err(MigrationError::Invalid("TLS needs all of tls_cert, tls_key and tls_ca".into())),
    };
    let security = match (tls, req.insecure, &addr) {
        (Some(_), true, _) => return Err(MigrationError::Invalid("insecure and TLS files are exclusive".into())),
        (Some(c), false, _) => ClientSecurity::Tls(c),
        (None, true, _) | (None, false, Address::Unix(_)) => ClientSecurity::Insecure,
        (None, false, Address::Tcp { .. }) => {
            return Err(MigrationError::Invalid(
                "TCP migration needs TLS (tls_cert, tls_key, tls_ca) or an explicit insecure".into(),
            ))
        }
    };
    let peer_timeout = Duration::from_millis(req.peer_timeout_ms.unwrap_or(DEFAULT_PEER_TIMEOUT.as_millis() as u64));
    let downtime = Duration::from_millis(req.downtime_ms.unwrap_or(crate::snapshot::DEFAULT_DOWNTIME_MS));
    let peer_name = req.peer_name.clone().or_else(|| addr.host().map(str::to_string)).unwrap_or_default();
    let set = |st: MigrationState| progress.lock().unwrap().state = Some(st);
    set(MigrationState::Setup);

    let conn = transport::connect(&addr, &security, &peer_name, CONNECT_TIMEOUT)?;
    let kind = conn.kind();
    conn.set_timeouts(Some(peer_timeout), Some(peer_timeout))?;
    let (r, w) = conn.split();
    let mut w = FrameWriter::new(w);
    let mut r = FrameReader::new(r);
    let status = vm.status();
    let migration_id = random_hex();
    let hello = Hello {
        protocol_version: PROTOCOL_VERSION,
        migration_id: migration_id.clone(),
        vm_id: vm_id.to_string(),
        capabilities: proposed_capabilities(req),
        mem_bytes: status.mem_bytes,
        ram_ranges: status.ram_ranges.clone(),
        vcpus: status.vcpus,
        cpu_template: serde_json::to_value(status.cpu_template)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default(),
        tsc_khz: status.tsc_khz,
        cpu_features: cpu_features(status.cpu_template)?,
        kernel: status.kernel.clone(),
        cmdline: status.cmdline.clone(),
    };
    w.send(&Message::Hello(Box::new(hello))).map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let accept = match r.recv()? {
        Message::Accept(a) => a,
        Message::Refuse(why) => return Err(MigrationError::Refused(why.reason)),
        other => return Err(MigrationError::Wire(unexpected(1, "Accept or Refuse", &other))),
    };
    if accept.protocol_version != PROTOCOL_VERSION {
        return Err(MigrationError::Refused(format!("destination speaks version {}", accept.protocol_version)));
    }
    let key = FrameKey::session(&migration_id, &accept.nonce, vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    let setup_ms = ms(t0.elapsed());
    set(MigrationState::Active);

    // Memory: the same engine as a live snapshot, into the socket, ending paused.
    let cfg = PrecopyConfig {
        live: true,
        max_rounds: req.max_rounds.unwrap_or(DEFAULT_MIGRATION_ROUNDS),
        downtime_target: downtime,
        digest: req.verify_digest,
        incremental: false,
        copy_on_write: false,
        end_paused: true,
        throttle: (!req.no_throttle).then(crate::precopy::ThrottlePolicy::default),
        require_convergence: true,
    };
    let result = (|| -> Result<(MigrationStats, Instant), MigrationError> {
        let start_bytes = w.bytes;
        let mut sink = WireSink {
            w: &mut w,
            r: &mut r,
            rounds: 0,
            codec: req.compress,
            buf: Vec::new(),
            progress,
            pace: req.max_bandwidth.map(TokenBucket::new),
            marks: Vec::new(),
        };
        let precopied = precopy(vm, &mut sink, &cfg);
        let (marks, waited) = (std::mem::take(&mut sink.marks), sink.pace.as_ref().map(|b| b.waited));
        let (state, pre) = precopied.map_err(|e| explain(e, &mut r))?;
        let wire = WireFigures { start: start_bytes, marks, end: w.bytes, waited, req };
        // From here the guest is paused: the downtime runs.
        let pause_started = Instant::now() - Duration::from_secs_f64(pre.pause_ms / 1e3);
        set(MigrationState::Device);
        let state_json = serde_json::to_vec(&state).map_err(|e| MigrationError::Invalid(e.to_string()))?;
        w.write_raw(Kind::State, &state_json).map_err(|e| explain(wire_io(e), &mut r))?;
        w.flush().map_err(|e| explain(wire_io(e), &mut r))?;
        let ready = match r.recv()? {
            Message::Ready(x) => x,
            Message::Abort(why) => return Err(MigrationError::PeerAborted(why.reason)),
            other => return Err(MigrationError::Wire(unexpected(0, "Ready", &other))),
        };
        if let (Some(ours), true) = (&pre.memory_digest, req.verify_digest) {
            let theirs = ready.memory_digest.clone().unwrap_or_default();
            if &theirs != ours {
                let _ = w.send(&Message::Abort(Reason { reason: "memory digest mismatch".into() }));
                return Err(MigrationError::DigestMismatch { source_digest: ours.clone(), destination: theirs });
            }
        }
        // The commit: after this write the guest is the destination's. A
        // cancel is honoured up to here, and refused from here on.
        {
            let mut p = progress.lock().unwrap();
            if p.cancel_requested {
                return Err(MigrationError::Engine(crate::Error::Cancelled));
            }
            p.committed = true;
        }
        w.send(&Message::Go).map_err(WireError::Io)?;
        w.flush().map_err(WireError::Io)?;
        let mut stats = finish_stats(&pre, &migration_id, &req.to, kind, setup_ms, downtime, ready);
        wire.apply(&mut stats);
        Ok((stats, pause_started))
    })();
    let (mut stats, pause_started) = match result {
        Ok(s) => s,
        Err(e) => {
            if !matches!(e, MigrationError::PeerAborted(_)) {
                let _ = w.send(&Message::Abort(Reason { reason: e.to_string() }));
                let _ = w.flush();
            }
            return Err(e);
        }
    };
    // Committed. Wait for the destination's word that the guest runs there;
    // whatever happens, the guest is not resumed here.
    match r.recv() {
        Ok(Message::Running) => {}
        Ok(other) => {
            eprintln!("ferry: migration committed; the destination answered {:?} instead of Running", other.kind())
        }
        Err(e) => {
            eprintln!("ferry: migration committed; no Running from the destination ({e}); the guest stays paused here")
        }
    }
    stats.downtime_ms = ms(pause_started.elapsed());
    stats.total_ms = ms(t0.elapsed());
    stats.bytes_sent = w.bytes;
    stats.bytes_received = r.bytes;
    stats.state = MigrationState::Completed;
    Ok(stats)
}

fn unexpected(seq: u64, wanted: &str, got: &Message) -> WireError {
    WireError::BadFrame { seq, what: format!("expected {wanted}, got {:?}", got.kind()) }
}

/// A write that failed usually means the destination gave up: read its
/// Abort (briefly) to say why.
fn explain(e: crate::Error, r: &mut FrameReader<TransportReader>) -> MigrationError {
    if let crate::Error::Wire(WireError::Io(_)) = &e {
        let _ = r.get_mut().set_read_timeout(Some(Duration::from_millis(500)));
        if let Ok(Message::Abort(why)) = r.recv() {
            return MigrationError::PeerAborted(why.reason);
        }
    }
    MigrationError::Engine(e)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

#[allow(clippy::too_many_arguments)]
fn finish_stats(
    pre: &crate::PrecopyStats,
    id: &str,
    to: &str,
    kind: transport::TransportKind,
    setup_ms: f64,
    downtime: Duration,
    ready: Ready,
) -> MigrationStats {
    let rounds: Vec<RoundFigures> = pre
        .rounds
        .iter()
        .enumerate()
        .map(|(i, r): (usize, &RoundStats)| RoundFigures {
            pages: r.pages,
            data_pages: r.data_pages,
            zero_pages: r.zero_pages,
            ms: r.ms,
            paused: r.paused,
            dirty_pages_per_s: pre.rounds.get(i + 1).filter(|_| r.ms > 0.0).map(|n| n.pages as f64 / (r.ms / 1e3)),
            wire_bytes: 0,
            wire_bytes_per_s: 0.0,
        })
        .collect();
    let live: Vec<&RoundStats> = pre.rounds.iter().filter(|r| !r.paused).collect();
    let live_ms: f64 = live.iter().map(|r| r.ms).sum();
    let live_bytes: u64 = live.iter().map(|r| r.data_pages * PAGE).sum();
    MigrationStats {
        state: MigrationState::Device,
        migration_id: id.to_string(),
        to: to.to_string(),
        transport: match kind {
            transport::TransportKind::Tcp => "tcp",
            transport::TransportKind::Unix => "unix",
            transport::TransportKind::Tls => "tls",
        }
        .into(),
        total_ms: 0.0,
        setup_ms,
        // Set once Running arrives.
        downtime_ms: 0.0,
        expected_downtime_ms: ms(downtime),
        bytes_sent: 0,
        bytes_received: 0,
        pages_normal: pre.data_pages_sent,
        pages_zero: pre.zero_pages,
        pages_skipped_unpopulated: pre.unpopulated_pages_skipped,
        rounds,
        stop_reason: pre.stop_reason,
        throughput_mb_per_s: if live_ms > 0.0 { live_bytes as f64 / live_ms / 1e3 } else { 0.0 },
        memory_digest: pre.memory_digest.clone(),
        destination_digest: ready.memory_digest,
        throttle: pre.throttle.clone(),
        compress: WireCodec::default(),
        max_bandwidth: None,
        bandwidth_wait_ms: 0.0,
    }
}

/// The capabilities a request needs from the destination.
fn proposed_capabilities(req: &MigrateRequest) -> Vec<String> {
    let mut caps = Vec::new();
    if req.verify_digest {
        caps.push(CAP_DIGEST.to_string());
    }
    if req.compress == WireCodec::Zstd {
        caps.push(CAP_ZSTD.to_string());
    }
    caps
}

/// What the sender counted on the wire during the pre-copy, turned into
/// per-round figures once the statistics exist.
struct WireFigures<'a> {
    /// `w.bytes` before the first page.
    start: u64,
    /// `w.bytes` after each live round's `RoundEnd`.
    marks: Vec<u64>,
    /// `w.bytes` after the final (paused) round, before the state.
    end: u64,
    /// Time waited on the cap.
    waited: Option<Duration>,
    req: &'a MigrateRequest,
}

impl WireFigures<'_> {
    /// Fills each round's wire bytes and measured rate, and the cap and codec.
    fn apply(&self, stats: &mut MigrationStats) {
        let mut prev = self.start;
        for (i, r) in stats.rounds.iter_mut().enumerate() {
            let upto = match self.marks.get(i) {
                Some(&m) => m,
                None if i == self.marks.len() => self.end,
                None => prev,
            };
            r.wire_bytes = upto.saturating_sub(prev);
            r.wire_bytes_per_s = if r.ms > 0.0 { r.wire_bytes as f64 / (r.ms / 1e3) } else { 0.0 };
            prev = upto;
        }
        stats.compress = self.req.compress;
        stats.max_bandwidth = self.req.max_bandwidth;
        stats.bandwidth_wait_ms = self.waited.map_or(0.0, ms);
    }
}

/// How `ferry receive` accepts and builds the incoming VM.
pub struct ReceiveOptions {
    /// How long to wait for the source to connect.
    pub accept_timeout: Duration,
    /// How long the source may stall.
    pub peer_timeout: Duration,
    /// The guest's serial output.
    pub serial_out: ferry_vmm::devices::SerialOut,
    /// Process start (for timings).
    pub process_start: Instant,
    /// Leave the guest paused after the commit.
    pub paused: bool,
}

/// What arrived.
pub struct Received {
    /// The VM, running (or paused if asked).
    pub vm: Arc<Vm>,
    /// The VM's identity, carried over from the source.
    pub vm_id: String,
    /// Figures of the incoming side.
    pub stats: IncomingStats,
}

/// Figures of the destination side.
#[derive(Clone, Debug, Serialize, Default)]
pub struct IncomingStats {
    /// Migration id.
    pub migration_id: String,
    /// Who sent it (address, and certificate name with TLS).
    pub peer: String,
    /// Authenticated peer name.
    pub peer_name: Option<String>,
    /// Bytes received.
    pub bytes_received: u64,
    /// Page frames received.
    pub page_frames: u64,
    /// Pages received with data.
    pub pages: u64,
    /// Zero pages received.
    pub zero_pages: u64,
    /// Connection to `Go`.
    pub total_ms: f64,
    /// `State` received to `Running` sent.
    pub switchover_ms: f64,
}

/// Refuses the source with a reason (best effort) and returns the error.
fn refuse(w: &mut FrameWriter<TransportWriter>, why: String) -> MigrationError {
    let _ = w.send(&Message::Refuse(Reason { reason: why.clone() }));
    let _ = w.flush();
    MigrationError::Mismatch(why)
}

/// Checks a hello against what this host can run faithfully.
fn check_hello(h: &Hello) -> Result<CpuTemplate, String> {
    if h.protocol_version != PROTOCOL_VERSION {
        return Err(format!(
            "protocol version {} is not supported (this ferry speaks {PROTOCOL_VERSION})",
            h.protocol_version
        ));
    }
    if let Some(c) = h.capabilities.iter().find(|c| !CAPABILITIES.contains(&c.as_str())) {
        return Err(format!("unknown capability {c:?}"));
    }
    if h.migration_id.len() != 32 || !h.migration_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("migration id is not 32 hex digits".into());
    }
    if h.vm_id.is_empty() || h.vm_id.len() > 64 {
        return Err("VM id is empty or longer than 64 bytes".into());
    }
    if h.vcpus == 0 || h.vcpus > ferry_vmm::mptable::MAX_CPUS {
        return Err(format!("{} vCPUs: this ferry runs 1..={}", h.vcpus, ferry_vmm::mptable::MAX_CPUS));
    }
    let expected = ferry_vmm::layout::ram_ranges(h.mem_bytes);
    if h.ram_ranges != expected {
        return Err(format!(
            "memory layout {:x?} is not the one this ferry builds for {} bytes ({expected:x?})",
            h.ram_ranges, h.mem_bytes
        ));
    }
    let template: CpuTemplate =
        h.cpu_template.parse().map_err(|_| format!("unknown CPU template {:?}", h.cpu_template))?;
    let here = cpu_features(template).map_err(|e| e.to_string())?;
    let missing = missing_cpu_features(&h.cpu_features, &here);
    if !missing.is_empty() {
        return Err(format!("this host's CPU lacks features the guest uses: {}", missing.join("; ")));
    }
    Ok(template)
}

/// Destination side: accepts one migration on `listener`, builds the VM
/// from the stream, commits and starts it. Nothing runs unless the source
/// said `Go`.
pub fn receive(listener: &Listener, opts: ReceiveOptions) -> Result<Received, MigrationError> {
    let (conn, peer) = listener.accept(opts.accept_timeout)?;
    let t0 = Instant::now();
    conn.set_timeouts(Some(opts.peer_timeout), Some(opts.peer_timeout))?;
    let (r, w) = conn.split();
    let mut w = FrameWriter::new(w);
    let mut r = FrameReader::new(r);
    let mut stats = IncomingStats { peer: peer.addr.clone(), peer_name: peer.name.clone(), ..Default::default() };
    let hello = match r.recv() {
        Ok(Message::Hello(h)) => h,
        Ok(other) => return Err(refuse(&mut w, unexpected(0, "Hello", &other).to_string())),
        Err(e) => return Err(refuse(&mut w, e.to_string())),
    };
    let template = match check_hello(&hello) {
        Ok(t) => t,
        Err(why) => return Err(refuse(&mut w, why)),
    };
    let nonce = random_hex();
    w.send(&Message::Accept(Accept {
        protocol_version: PROTOCOL_VERSION,
        capabilities: hello.capabilities.clone(),
        nonce: nonce.clone(),
    }))
    .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let key = FrameKey::session(&hello.migration_id, &nonce, &hello.vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    stats.migration_id = hello.migration_id.clone();

    let result = (|| -> Result<Received, MigrationError> {
        // Everything that does not need the state is built now, outside the downtime.
        let prepared = Vm::prepare_incoming(
            hello.mem_bytes,
            hello.vcpus,
            template,
            hello.tsc_khz,
            hello.cmdline.clone(),
            opts.serial_out,
            opts.process_start,
            format!("migration {} from {}", hello.migration_id, peer.addr),
        )
        .map_err(crate::Error::Vm)?;
        let ram = prepared.ram().clone();
        let ranges: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.gpa, r.len)).collect();
        let state_bytes = loop {
            match r.recv()? {
                Message::Pages { gpa, data } => {
                    if check_ram_range(&ranges, gpa, data.len() as u64).is_none() {
                        return Err(MigrationError::Wire(WireError::BadFrame {
                            seq: stats.page_frames,
                            what: format!("page run {gpa:#x}+{:#x} is outside guest RAM", data.len()),
                        }));
                    }
                    ram.write(gpa, &data).map_err(crate::Error::Vm)?;
                    stats.page_frames += 1;
                    stats.pages += data.len() as u64 / PAGE;
                }
                Message::Zero { gpa, npages } => {
                    let len = npages.saturating_mul(PAGE);
                    if check_ram_range(&ranges, gpa, len).is_none() {
                        return Err(MigrationError::Wire(WireError::BadFrame {
                            seq: stats.page_frames,
                            what: format!("zero run {gpa:#x}+{len:#x} is outside guest RAM"),
                        }));
                    }
                    zero_range(&ram, gpa, len);
                    stats.zero_pages += npages;
                }
                Message::RoundEnd { round, pages } => {
                    // Everything before it is in guest RAM: acknowledge.
                    w.send(&Message::RoundEnd { round, pages }).map_err(WireError::Io)?;
                    w.flush().map_err(WireError::Io)?;
                }
                Message::State(s) => break s,
                Message::Abort(why) => return Err(MigrationError::PeerAborted(why.reason)),
                other => return Err(MigrationError::Wire(unexpected(0, "pages or State", &other))),
            }
        };
        let t_state = Instant::now();
        let state: VmState = serde_json::from_slice(&state_bytes).map_err(|e| {
            MigrationError::Wire(WireError::BadPayload { seq: 0, kind: Kind::State, what: e.to_string() })
        })?;
        if state.mem_bytes != hello.mem_bytes || state.vcpus.len() as u32 != hello.vcpus {
            return Err(MigrationError::Mismatch(format!(
                "VM state ({} bytes, {} vCPUs) does not match the hello ({} bytes, {} vCPUs)",
                state.mem_bytes,
                state.vcpus.len(),
                hello.mem_bytes,
                hello.vcpus
            )));
        }
        let vm = Arc::new(prepared.apply(&state).map_err(crate::Error::Vm)?);
        let digest = hello.capabilities.iter().any(|c| c == CAP_DIGEST).then(|| ram.digest().to_hex().to_string());
        w.send(&Message::Ready(Ready { memory_digest: digest })).map_err(WireError::Io)?;
        w.flush().map_err(WireError::Io)?;
        let go = r.recv();
        match go {
            Ok(Message::Go) => {}
            Ok(Message::Abort(why)) => {
                vm.stop(ferry_vmm::ExitReason::ShutdownForced);
                vm.wait();
                return Err(MigrationError::PeerAborted(why.reason));
            }
            Ok(other) => {
                vm.stop(ferry_vmm::ExitReason::ShutdownForced);
                vm.wait();
                return Err(MigrationError::Wire(unexpected(0, "Go", &other)));
            }
            Err(e) => {
                vm.stop(ferry_vmm::ExitReason::ShutdownForced);
                vm.wait();
                return Err(MigrationError::Wire(e));
            }
        }
        // Ours now.
        vm.take_dirty_log().map_err(crate::Error::Vm)?;
        if !opts.paused {
            vm.resume().map_err(crate::Error::Vm)?;
        }
        let _ = w.send(&Message::Running);
        let _ = w.flush();
        stats.switchover_ms = ms(t_state.elapsed());
        stats.total_ms = ms(t0.elapsed());
        stats.bytes_received = r.bytes;
        Ok(Received { vm, vm_id: hello.vm_id.clone(), stats: stats.clone() })
    })();
    if let Err(e) = &result {
        if !matches!(e, MigrationError::PeerAborted(_)) {
            let _ = w.send(&Message::Abort(Reason { reason: e.to_string() }));
            let _ = w.flush();
        }
    }
    result
}

/// Zeroes guest RAM in a checked range.
fn zero_range(ram: &GuestRam, gpa: u64, len: u64) {
    static ZERO: [u8; 1 << 16] = [0; 1 << 16];
    let mut off = 0;
    while off < len {
        let n = (len - off).min(ZERO.len() as u64);
        let _ = ram.write(gpa + off, &ZERO[..n as usize]);
        off += n;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_features_are_named() {
        let w = |bits| CpuFeatureWord { leaf: 7, subleaf: 0, register: "ebx".into(), bits };
        assert!(missing_cpu_features(&[w(0b1010)], &[w(0b1110)]).is_empty());
        let m = missing_cpu_features(&[w(0b1011)], &[w(0b1010)]);
        assert_eq!(m.len(), 1);
        assert!(m[0].contains("0x7.0 ebx") && m[0].contains("0x00000001"), "{m:?}");
        assert_eq!(missing_cpu_features(&[w(1)], &[]).len(), 1);
    }
}
