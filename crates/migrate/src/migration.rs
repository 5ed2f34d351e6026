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
//!
//! If `Go` or `Running` is lost, the commit is in doubt: the source keeps
//! the guest paused ([`MigrationState::CommitUnconfirmed`]), the destination
//! keeps the loaded VM unrun for its commit wait, and [`settle_commit`] asks
//! the destination over a new connection (`Settle`) whether it runs the
//! guest, then sends `Go` again or takes the guest back. In post-copy and
//! hybrid the same holds; a settle that leaves the guest at the destination
//! is followed by [`resume_postcopy`], the resume a lost post-copy link
//! uses, because the old page streams went with the link.

use std::io::Read;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_vmm::{CpuTemplate, GuestRam, Vm, VmState};
use serde::{Deserialize, Serialize};

use crate::postcopy::PostcopyIncoming;
use crate::precopy::{precopy, PrecopyConfig, RoundStats, StopReason};
use crate::ratelimit::{Bandwidth, TokenBucket};
use crate::sink::PageSink;
use crate::streams::{StreamJob, StreamReceivers, StreamWorker};
use crate::transport::{self, Address, ClientSecurity, Listener, TlsConfig, TransportReader, TransportWriter};
use crate::wire::{
    check_ram_range, encode_pages, Accept, CpuFeatureWord, FrameKey, FrameReader, FrameWriter, Hello, Join, Kind,
    Message, Ready, Reason, Settle, WireCodec, WireError, CAP_SETTLE, CAP_ZSTD, FINAL_ROUND, HEADER_LEN, MAX_RUN_PAGES,
    PAGE, PROTOCOL_VERSION, TAG_LEN,
};

/// Default time a peer may stay silent (or a write may block) before the
/// migration gives up on it.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(30);

/// Default time to connect (TCP and TLS handshake).
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Capabilities this build understands.
pub const CAPABILITIES: &[&str] = &[CAP_DIGEST, CAP_POSTCOPY, CAP_ZSTD, CAP_LOCAL];

/// Guest RAM is passed as memfd descriptors over a unix socket, not copied.
pub const CAP_LOCAL: &str = "local-memory";

/// The destination hashes the received memory and returns the digest in
/// `Ready`; the source refuses to commit if it differs from its own.
pub const CAP_DIGEST: &str = "memory-digest";

/// The switch-over hands the guest over before all of its memory: the
/// destination fetches the rest on a second stream (the fault stream).
pub const CAP_POSTCOPY: &str = "postcopy";

/// Default pre-copy rounds of a hybrid migration before it switches to
/// post-copy: enough to move the bulk of memory while the guest runs.
pub const DEFAULT_HYBRID_ROUNDS: u32 = 5;

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
    /// Connections the pages are spread over (default 1, at most
    /// [`MAX_STREAMS`]); each is authenticated like the first.
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
    /// Local migration: hand guest RAM (memfds) to the destination on this
    /// host instead of copying it; needs `unix://` and `ferry run --memfd`.
    #[serde(default)]
    pub local: bool,
}

/// Most page streams one migration may use.
pub const MAX_STREAMS: u32 = 16;

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
    /// Committed; the guest runs at the destination, which fetches the
    /// pages it still lacks.
    PostcopyActive,
    /// The link was lost during post-copy: the guest is paused at both
    /// ends (the source keeps all of its memory) until a resume.
    PostcopyPaused,
    /// The source sent `Go` but no `Running` came back (or, at the
    /// destination, `Ready` was sent and `Go` never arrived): the guest is
    /// paused at the source and runs at the destination only if `Go` got
    /// there. It runs nowhere twice; a settle (`ferry migrate --resume` or
    /// `--take-back`) decides who keeps it.
    CommitUnconfirmed,
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
    /// How memory moved.
    #[serde(default)]
    pub mode: MigrationMode,
    /// Post-copy figures, in postcopy and hybrid modes.
    #[serde(default)]
    pub postcopy: Option<PostcopySourceStats>,
    /// Bytes sent on each page stream, the main one first (`--streams`).
    #[serde(default)]
    pub stream_bytes: Vec<u64>,
    /// A local migration: the memory was handed over, not copied.
    #[serde(default)]
    pub local: bool,
    /// Writable working set: pages held back from a live round because
    /// they were dirtied in two rounds running (summed over rounds).
    #[serde(default)]
    pub working_set_held_pages: u64,
    /// Of those, pages dirtied again while held: sends saved.
    #[serde(default)]
    pub working_set_resends_saved: u64,
}

/// The post-copy phase as the source saw it, with the destination's own
/// figures (faults, time vCPUs were blocked) from its `Complete`.
#[derive(Clone, Debug, Serialize, Deserialize, Default)]
pub struct PostcopySourceStats {
    /// Pages whose contents the destination had to fetch after the switch-over.
    pub deferred_pages: u64,
    /// Of the deferred pages, those sent by the background push.
    pub pages_pushed: u64,
    /// Page requests answered on the fault stream.
    pub requests_served: u64,
    /// Pages sent in answer to requests.
    pub pages_served: u64,
    /// Destination resume to its `Complete`.
    pub postcopy_ms: f64,
    /// Background push rate over the post-copy phase (MB/s of page data).
    pub push_mb_per_s: f64,
    /// Times the link was lost and the post-copy resumed.
    pub resumes: u32,
    /// Bytes sent on the fault stream (answers to page requests).
    pub fault_stream_bytes: u64,
    /// The destination's figures.
    pub destination: Option<crate::wire::PostcopyFigures>,
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
    /// The link was lost during post-copy, after the commit: the guest is
    /// the destination's but some of its memory is only here.
    #[error("post-copy lost its link after the commit ({0}); the guest is paused at both ends and this side keeps all of its memory: finish it with `ferry migrate --resume` (PUT /vm/migration/resume)")]
    PostcopyPaused(String),
    /// `Go` was sent but no `Running` came back: whether the destination
    /// runs the guest is unknown here. The guest stays paused here.
    #[error("the commit is in doubt: Go was sent but no Running came back ({0}); the guest stays paused here and runs at the destination only if Go reached it. Settle it: `ferry migrate --resume` (PUT /vm/migration/resume) asks the destination and makes it run the guest if it does not yet; `ferry migrate --take-back` (PUT /vm/migration/take-back) resumes it here if the destination never got Go")]
    CommitUnconfirmed(String),
    /// The destination held the loaded VM for its commit wait and no
    /// source settled the commit: it drops the VM without having run it.
    #[error("no Go arrived for migration {migration_id} and no source settled the commit within {waited_ms} ms; the guest never ran here and this side drops it (the source still holds it paused: take it back there with `ferry migrate --take-back`)")]
    CommitWaitExpired {
        /// The migration.
        migration_id: String,
        /// How long it waited.
        waited_ms: u64,
    },
}

impl MigrationError {
    /// True when a post-copy lost its link and waits for a resume.
    pub fn is_postcopy_paused(&self) -> bool {
        matches!(self, MigrationError::PostcopyPaused(_))
    }

    /// True when `Go` was sent and no `Running` came back.
    pub fn is_commit_unconfirmed(&self) -> bool {
        matches!(self, MigrationError::CommitUnconfirmed(_))
    }

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
    /// Cuts the main stream, so that a cancel is not held up by a stalled peer.
    #[serde(skip)]
    pub link: Option<transport::LinkCutter>,
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
    /// The extra page streams (`--streams`), fed in turn with the main one.
    workers: &'a [StreamWorker],
    /// Whose turn it is: 0 the main stream, k the k-th worker.
    next: usize,
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
            let at = gpa + (i * step) as u64;
            let turn = self.next;
            self.next = (self.next + 1) % (self.workers.len() + 1);
            if turn > 0 {
                self.workers[turn - 1].send(StreamJob::Pages { gpa: at, len: c.len() as u64 })?;
                continue;
            }
            encode_pages(at, c, self.codec, &mut self.buf);
            self.pace(self.buf.len());
            self.w.write_raw(Kind::Pages, &self.buf).map_err(wire_io)?;
        }
        let mut p = self.progress.lock().unwrap();
        p.bytes_sent = self.w.bytes;
        p.pages_sent += data.len() as u64 / PAGE;
        Ok(())
    }

    fn zero(&mut self, gpa: u64, npages: u64) -> crate::Result<()> {
        let turn = self.next;
        self.next = (self.next + 1) % (self.workers.len() + 1);
        if turn > 0 {
            return self.workers[turn - 1].send(StreamJob::Zero { gpa, npages });
        }
        self.pace(16);
        self.w.send(&Message::Zero { gpa, npages }).map_err(wire_io)
    }

    fn sync(&mut self, _round: u32, pages: u64) -> crate::Result<()> {
        if self.progress.lock().unwrap().cancel_requested {
            return Err(crate::Error::Cancelled);
        }
        self.rounds += 1;
        let round = self.rounds;
        // The destination echoes only once every stream has delivered this round.
        for wk in self.workers {
            wk.mark(round)?;
        }
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

pub(crate) fn wire_io(e: std::io::Error) -> crate::Error {
    crate::Error::Wire(WireError::Io(e))
}

/// How the source reaches the destination: address, security, peer name.
#[derive(Clone)]
struct Route {
    addr: Address,
    security: ClientSecurity,
    peer_name: String,
    peer_timeout: Duration,
}

impl Route {
    fn of(req: &MigrateRequest) -> Result<Route, MigrationError> {
        let addr: Address = req.to.parse()?;
        let tls = match (&req.tls_cert, &req.tls_key, &req.tls_ca) {
            (Some(cert), Some(key), Some(ca)) => {
                Some(TlsConfig { cert: cert.clone(), key: key.clone(), ca: ca.clone() })
            }
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
        let peer_timeout =
            Duration::from_millis(req.peer_timeout_ms.unwrap_or(DEFAULT_PEER_TIMEOUT.as_millis() as u64));
        let peer_name = req.peer_name.clone().or_else(|| addr.host().map(str::to_string)).unwrap_or_default();
        Ok(Route { addr, security, peer_name, peer_timeout })
    }

    /// Connects and authenticates one stream.
    fn open(
        &self,
    ) -> Result<(FrameReader<TransportReader>, FrameWriter<TransportWriter>, transport::TransportKind), MigrationError>
    {
        let conn = transport::connect(&self.addr, &self.security, &self.peer_name, CONNECT_TIMEOUT)?;
        let kind = conn.kind();
        conn.set_timeouts(Some(self.peer_timeout), Some(self.peer_timeout))?;
        let (r, w) = conn.split();
        Ok((FrameReader::new(r), FrameWriter::new(w), kind))
    }

    /// Opens the post-copy fault stream of migration `id` and keys it with
    /// the destination's fresh nonce for it.
    fn join(&self, id: &str, vm_id: &str, stream: u32) -> Result<Stream, MigrationError> {
        let (mut r, mut w, _) = self.open()?;
        w.send(&Message::Join(Join { migration_id: id.to_string(), vm_id: vm_id.to_string(), stream }))
            .map_err(WireError::Io)?;
        w.flush().map_err(WireError::Io)?;
        let accept = match r.recv()? {
            Message::Accept(a) => a,
            Message::Refuse(why) => return Err(MigrationError::Refused(why.reason)),
            other => return Err(MigrationError::Wire(unexpected(0, "Accept of the fault stream", &other))),
        };
        let key = FrameKey::session(id, &accept.nonce, vm_id);
        w.rekey(key.clone());
        r.rekey(key);
        Ok((r, w))
    }
}

/// Pages as one bitmap per RAM region.
type PageSet = Vec<Vec<u64>>;

/// Both halves of one keyed stream.
type Stream = (FrameReader<TransportReader>, FrameWriter<TransportWriter>);

/// What a source waits to settle after the commit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsettled {
    /// A post-copy lost its link: the destination runs the guest and
    /// lacks pages that only this side has.
    Postcopy,
    /// `Go` was sent, `Running` did not come back: who runs the guest is
    /// for the destination to say.
    Commit,
}

/// What a source keeps of a post-copy whose link was lost, or of a commit
/// in doubt, to resume or settle it.
#[derive(Clone)]
pub struct PostcopyResume {
    /// What waits.
    pub pending: Unsettled,
    /// The migration.
    pub migration_id: String,
    /// The original request (address, TLS files, codec).
    pub request: MigrateRequest,
    /// Statistics up to the loss.
    pub stats: MigrationStats,
}

impl PostcopyResume {
    /// True when the migration defers pages (post-copy, or hybrid after
    /// its rounds): once the destination has `Go`, the pages it lacks must
    /// still be pushed from here.
    pub fn is_postcopy(&self) -> bool {
        self.stats.postcopy.is_some()
    }
}

/// Source side of a migration, with the VM held by the caller for the
/// whole call. On `Ok` the guest belongs to the destination (paused here,
/// never to be resumed by this process); on `Err` the guest's state here is
/// as the engine left it and the caller resumes it, except for
/// [`MigrationError::PostcopyPaused`]: then the guest is the destination's
/// and this side keeps it paused for [`resume_postcopy`], with `resume`
/// filled in.
pub fn migrate_out(
    vm: &Arc<Vm>,
    vm_id: &str,
    req: &MigrateRequest,
    progress: &ProgressHandle,
    resume: &mut Option<PostcopyResume>,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    let postcopy = req.mode != MigrationMode::Precopy;
    let streams = req.streams.unwrap_or(1);
    if streams == 0 || streams > MAX_STREAMS {
        return Err(MigrationError::Invalid(format!("streams {streams} is outside 1..={MAX_STREAMS}")));
    }
    if postcopy && req.verify_digest {
        return Err(MigrationError::Invalid(
            "verify_digest needs all memory at the destination before it resumes, which post-copy and hybrid do not wait for; use precopy".into(),
        ));
    }
    let route = Route::of(req)?;
    if req.local {
        if !matches!((&route.addr, &route.security), (Address::Unix(_), ClientSecurity::Insecure)) {
            return Err(MigrationError::Invalid(
                "local migration passes guest memory over a unix socket without TLS: use --to unix://PATH".into(),
            ));
        }
        if vm.ram().memfds().is_empty() {
            return Err(MigrationError::Invalid(
                "local migration hands over memfd-backed guest memory; this VM's memory is anonymous (start it with `ferry run --memfd`)".into(),
            ));
        }
        if postcopy || streams > 1 {
            return Err(MigrationError::Invalid(
                "local migration moves no pages: it takes no --mode or --streams".into(),
            ));
        }
    }
    let set = |st: MigrationState| progress.lock().unwrap().state = Some(st);
    set(MigrationState::Setup);

    let (mut r, mut w, kind) = route.open()?;
    {
        let mut p = progress.lock().unwrap();
        p.link = Some(r.get_mut().cutter());
        if p.cancel_requested {
            return Err(MigrationError::Engine(crate::Error::Cancelled));
        }
    }
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
        extra_streams: streams - 1,
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
    // The fault stream is opened before any memory moves, so that a
    // destination that cannot take it refuses while the guest is still here.
    let mut fault = if postcopy { Some(route.join(&migration_id, vm_id, 1)?) } else { None };
    let mut workers = Vec::new();
    for k in 2..=streams {
        let (_, sw) = route.join(&migration_id, vm_id, k)?;
        let cap = req.max_bandwidth.and_then(|b| Bandwidth::from_bytes_per_s(b.bytes_per_s() / streams as u64).ok());
        workers.push(StreamWorker::start(vm.ram().clone(), sw, req.compress, cap)?);
    }
    if req.local {
        // The memory itself goes over, while the guest still runs here; the
        // destination maps it and builds its VM, then says so.
        let (_, mut fw) = route.join(&migration_id, vm_id, crate::local::FD_STREAM)?;
        let fd = fw.get_mut().unix_fd().ok_or_else(|| MigrationError::Invalid("not a plain unix socket".into()))?;
        crate::local::send_fds(fd, vm.ram().memfds()).map_err(WireError::Io)?;
        match r.recv()? {
            Message::MemoryMapped => {}
            Message::Abort(why) => return Err(MigrationError::PeerAborted(why.reason)),
            other => return Err(MigrationError::Wire(unexpected(0, "MemoryMapped", &other))),
        }
    }
    let setup_ms = ms(t0.elapsed());
    set(MigrationState::Active);

    // Memory: the same engine as a live snapshot, into the socket, ending paused.
    let cfg = PrecopyConfig {
        live: req.mode != MigrationMode::Postcopy,
        max_rounds: req.max_rounds.unwrap_or(if postcopy { DEFAULT_HYBRID_ROUNDS } else { DEFAULT_MIGRATION_ROUNDS }),
        downtime_target: Duration::from_millis(req.downtime_ms.unwrap_or(crate::snapshot::DEFAULT_DOWNTIME_MS)),
        digest: req.verify_digest,
        incremental: false,
        copy_on_write: false,
        end_paused: true,
        // Post-copy is the answer to a guest that outruns the link: no throttle.
        throttle: (!req.no_throttle && !postcopy).then(crate::precopy::ThrottlePolicy::default),
        require_convergence: !postcopy,
        defer_final: postcopy,
    };
    let downtime = cfg.downtime_target;
    let ranges: Vec<(u64, u64)> = vm.ram().regions().iter().map(|r| (r.gpa, r.len)).collect();
    let result = (|| -> Result<(MigrationStats, Instant, Option<PageSet>), MigrationError> {
        let start_bytes = w.bytes;
        let mut sink = WireSink {
            w: &mut w,
            r: &mut r,
            rounds: 0,
            codec: req.compress,
            buf: Vec::new(),
            progress,
            pace: req
                .max_bandwidth
                .and_then(|b| Bandwidth::from_bytes_per_s(b.bytes_per_s() / streams as u64).ok())
                .map(TokenBucket::new),
            marks: Vec::new(),
            workers: &workers,
            next: 0,
        };
        // The migration reads its own view of the dirty log, so the snapshot
        // lineage (and any watch) keeps every page it needs.
        let precopied = if req.local {
            pause_for_state(vm)
        } else {
            vm.dirty_view(ferry_vmm::DirtyConsumer::Migration)
                .map_err(crate::Error::Vm)
                .and_then(|log| precopy(vm, &log, &mut sink, &cfg))
        };
        let (marks, waited) = (std::mem::take(&mut sink.marks), sink.pace.as_ref().map(|b| b.waited));
        let (state, mut pre) = precopied.map_err(|e| explain(e, &mut r))?;
        // Every extra stream's last pages are out before the state.
        for wk in &workers {
            wk.mark(FINAL_ROUND).map_err(|e| explain(e, &mut r))?;
        }
        let wire = WireFigures { start: start_bytes, marks, end: w.bytes, waited, req };
        // From here the guest is paused: the downtime runs.
        let pause_started = Instant::now() - Duration::from_secs_f64(pre.pause_ms / 1e3);
        set(MigrationState::Device);
        let deferred = pre.deferred.take();
        if let Some(set) = &deferred {
            for m in crate::postcopy::needed_frames(&ranges, set) {
                w.send(&m).map_err(|e| explain(wire_io(e), &mut r))?;
            }
        }
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
        Ok((stats, pause_started, deferred))
    })();
    let (mut stats, pause_started, deferred) = match result {
        Ok(s) => s,
        Err(e) => {
            if !matches!(e, MigrationError::PeerAborted(_)) {
                let _ = w.send(&Message::Abort(Reason { reason: e.to_string() }));
                let _ = w.flush();
            }
            return Err(e);
        }
    };
    stats.mode = req.mode;
    stats.local = req.local;
    let extra: Vec<u64> = workers.iter().map(|wk| wk.bytes.load(std::sync::atomic::Ordering::Relaxed)).collect();
    drop(workers);
    stats.stream_bytes = std::iter::once(w.bytes).chain(extra.iter().copied()).collect();
    // Committed. Wait for the destination's word that the guest runs there;
    // whatever happens, the guest is not resumed here.
    let running = r.recv();
    stats.downtime_ms = ms(pause_started.elapsed());
    let doubt = match running {
        Ok(Message::Running) => None,
        Ok(other) => Some(format!("the destination answered {:?} instead of Running", other.kind())),
        Err(e) => Some(e.to_string()),
    };
    if let Some(why) = doubt {
        let settle = accept.capabilities.iter().any(|c| c == CAP_SETTLE);
        // A destination without commit-settle does not hold a post-copy
        // whose Go was lost; its post-copy goes on (or pauses) as before.
        if deferred.is_none() || settle {
            // The destination either runs the guest (it got Go) or holds it
            // paused waiting for a settle. Only it can say which; until then
            // the guest stays paused here. In post-copy and hybrid the page
            // streams are given up too: a settle that finds the guest
            // running there goes on with a post-copy resume, which opens
            // them again and learns from the destination what it lacks.
            if let Some(deferred) = &deferred {
                r.get_mut().cutter().cut();
                if let Some((mut fr, _)) = fault.take() {
                    fr.get_mut().cutter().cut();
                }
                stats.postcopy =
                    Some(PostcopySourceStats { deferred_pages: count_bits(deferred), ..Default::default() });
            }
            stats.total_ms = ms(t0.elapsed());
            stats.bytes_sent = w.bytes + extra.iter().sum::<u64>();
            stats.bytes_received = r.bytes;
            stats.state = MigrationState::CommitUnconfirmed;
            set(MigrationState::CommitUnconfirmed);
            let why = if settle {
                why
            } else {
                format!("{why}; this destination does not offer {CAP_SETTLE:?}: it cannot be asked")
            };
            *resume = Some(PostcopyResume {
                pending: Unsettled::Commit,
                migration_id: migration_id.clone(),
                request: req.clone(),
                stats,
            });
            return Err(MigrationError::CommitUnconfirmed(why));
        }
        eprintln!("ferry: migration committed; no Running from the destination ({why}); the guest stays paused here");
    }
    if let (Some(deferred), Some(f)) = (deferred, fault.take()) {
        set(MigrationState::PostcopyActive);
        let mut pc = PostcopySourceStats { deferred_pages: count_bits(&deferred), ..Default::default() };
        let (sent, received) = (w.bytes, r.bytes);
        let outcome = postcopy_out(vm, &deferred, (req.compress, req.max_bandwidth), (r, w), f, progress, &mut pc);
        stats.bytes_sent =
            progress.lock().unwrap().bytes_sent.max(sent) + pc.fault_stream_bytes + extra.iter().sum::<u64>();
        stats.bytes_received = received;
        stats.postcopy = Some(pc);
        stats.total_ms = ms(t0.elapsed());
        if let Err(why) = outcome {
            set(MigrationState::PostcopyPaused);
            stats.state = MigrationState::PostcopyPaused;
            *resume = Some(PostcopyResume {
                pending: Unsettled::Postcopy,
                migration_id: migration_id.clone(),
                request: req.clone(),
                stats,
            });
            return Err(MigrationError::PostcopyPaused(why));
        }
        stats.state = MigrationState::Completed;
        return Ok(stats);
    }
    stats.total_ms = ms(t0.elapsed());
    stats.bytes_sent = w.bytes + extra.iter().sum::<u64>();
    stats.bytes_received = r.bytes;
    stats.state = MigrationState::Completed;
    Ok(stats)
}

/// A local migration's stop: pause and capture the state; no page moves
/// (the destination maps the same memory). The guest stays paused.
fn pause_for_state(vm: &Arc<Vm>) -> crate::Result<(VmState, crate::PrecopyStats)> {
    let t = Instant::now();
    vm.pause()?;
    let state = match vm.save_state() {
        Ok(s) => s,
        Err(e) => {
            let _ = vm.resume();
            return Err(e.into());
        }
    };
    let stats = crate::PrecopyStats {
        state_ms: ms(t.elapsed()),
        pause_ms: ms(t.elapsed()),
        total_ms: ms(t.elapsed()),
        stop_reason: StopReason::Paused,
        ..Default::default()
    };
    Ok((state, stats))
}

fn count_bits(set: &[Vec<u64>]) -> u64 {
    set.iter().flatten().map(|w| w.count_ones() as u64).sum()
}

/// The source's post-copy: answers page requests on the fault stream while
/// pushing `set` on the main stream, then waits for `Complete`. An `Err`
/// says why the link was lost; the guest stays paused here with its memory.
fn postcopy_out(
    vm: &Arc<Vm>,
    set: &[Vec<u64>],
    (codec, cap): (WireCodec, Option<Bandwidth>),
    main: Stream,
    fault: Stream,
    progress: &ProgressHandle,
    pc: &mut PostcopySourceStats,
) -> Result<(), String> {
    use std::sync::atomic::{AtomicU64, Ordering};
    let (mut r, mut w) = main;
    let (mut fr, mut fw) = fault;
    let t = Instant::now();
    let served = Arc::new((AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)));
    let ram = vm.ram().clone();
    let s = served.clone();
    let server = std::thread::Builder::new()
        .name("postcopy-serve".into())
        .spawn(move || {
            let mut buf = Vec::new();
            while let Ok(Message::PageRequest { gpa, npages }) = fr.recv() {
                if crate::postcopy::send_window(&ram, gpa, npages, codec, &mut fw, &mut buf).is_err() {
                    break;
                }
                s.0.fetch_add(1, Ordering::Relaxed);
                s.1.fetch_add(npages as u64, Ordering::Relaxed);
                s.2.store(fw.bytes, Ordering::Relaxed);
            }
            let _ = fw.get_mut().shutdown();
        })
        .map_err(|e| format!("starting the page server: {e}"))?;
    let regions = vm.ram().regions().to_vec();
    let outcome = (|| -> Result<(), String> {
        let mut sink = PushSink { w: &mut w, codec, buf: Vec::new(), progress, pace: cap.map(TokenBucket::new) };
        let (data, zero) = crate::precopy::send(&regions, set, &mut sink).map_err(|e| e.to_string())?;
        pc.pages_pushed = data + zero;
        w.send(&Message::PushDone { pages: data + zero }).map_err(|e| WireError::Io(e).to_string())?;
        w.flush().map_err(|e| WireError::Io(e).to_string())?;
        match r.recv() {
            Ok(Message::Complete(f)) => {
                pc.destination = Some(f);
                Ok(())
            }
            Ok(Message::Abort(why)) => Err(format!("the destination aborted: {}", why.reason)),
            Ok(other) => Err(unexpected(0, "Complete", &other).to_string()),
            Err(e) => Err(e.to_string()),
        }
    })();
    let _ = w.get_mut().shutdown();
    // The destination closes the fault stream after Complete; do not wait long for it otherwise.
    let deadline = Instant::now() + Duration::from_secs(2);
    while !server.is_finished() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(5));
    }
    if server.is_finished() {
        let _ = server.join();
    }
    pc.requests_served += served.0.load(Ordering::Relaxed);
    pc.pages_served += served.1.load(Ordering::Relaxed);
    pc.fault_stream_bytes += served.2.load(Ordering::Relaxed);
    pc.postcopy_ms += ms(t.elapsed());
    pc.push_mb_per_s = if pc.postcopy_ms > 0.0 { (pc.pages_pushed * PAGE) as f64 / pc.postcopy_ms / 1e3 } else { 0.0 };
    {
        let mut p = progress.lock().unwrap();
        p.bytes_sent = w.bytes;
    }
    outcome
}

/// The background push's sink: page runs and zero runs, no round syncs.
struct PushSink<'a> {
    w: &'a mut FrameWriter<TransportWriter>,
    codec: WireCodec,
    buf: Vec<u8>,
    progress: &'a ProgressHandle,
    /// The push keeps to `max_bandwidth`; answers to page requests do not wait on it.
    pace: Option<TokenBucket>,
}

impl PageSink for PushSink<'_> {
    fn pages(&mut self, gpa: u64, data: &[u8]) -> crate::Result<()> {
        let step = (MAX_RUN_PAGES as u64 * PAGE) as usize;
        for (i, c) in data.chunks(step).enumerate() {
            encode_pages(gpa + (i * step) as u64, c, self.codec, &mut self.buf);
            if let Some(b) = self.pace.as_mut() {
                b.take((HEADER_LEN + self.buf.len() + TAG_LEN) as u64);
            }
            self.w.write_raw(Kind::Pages, &self.buf).map_err(wire_io)?;
        }
        let mut p = self.progress.lock().unwrap();
        p.bytes_sent = self.w.bytes;
        p.pages_sent += data.len() as u64 / PAGE;
        Ok(())
    }

    fn zero(&mut self, gpa: u64, npages: u64) -> crate::Result<()> {
        if let Some(b) = self.pace.as_mut() {
            b.take((HEADER_LEN + 16 + TAG_LEN) as u64);
        }
        self.w.send(&Message::Zero { gpa, npages }).map_err(wire_io)
    }
}

/// Finishes a post-copy whose link was lost: reconnects, learns which pages
/// the destination still lacks, and pushes them (answering page requests
/// meanwhile). The guest stays paused here either way.
pub fn resume_postcopy(
    vm: &Arc<Vm>,
    vm_id: &str,
    ctx: &mut PostcopyResume,
    progress: &ProgressHandle,
) -> Result<MigrationStats, MigrationError> {
    // Whatever fails, the guest stays committed to the destination and its
    // missing pages stay here: the post-copy is still paused, and a later
    // resume may succeed.
    resume_postcopy_once(vm, vm_id, ctx, progress).map_err(|e| {
        progress.lock().unwrap().state = Some(MigrationState::PostcopyPaused);
        match e {
            MigrationError::PostcopyPaused(_) => e,
            other => MigrationError::PostcopyPaused(format!("the resume failed: {other}")),
        }
    })
}

fn resume_postcopy_once(
    vm: &Arc<Vm>,
    vm_id: &str,
    ctx: &mut PostcopyResume,
    progress: &ProgressHandle,
) -> Result<MigrationStats, MigrationError> {
    let t0 = Instant::now();
    let route = Route::of(&ctx.request)?;
    progress.lock().unwrap().state = Some(MigrationState::PostcopyActive);
    let id = ctx.migration_id.clone();
    let (mut r, mut w, _) = route.open()?;
    w.send(&Message::Resume(crate::wire::Resume { migration_id: id.clone(), vm_id: vm_id.to_string() }))
        .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let accept = match r.recv()? {
        Message::Accept(a) => a,
        Message::Refuse(why) => return Err(MigrationError::Refused(why.reason)),
        other => return Err(MigrationError::Wire(unexpected(0, "Accept of the resume", &other))),
    };
    let key = FrameKey::session(&id, &accept.nonce, vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    let ranges: Vec<(u64, u64)> = vm.ram().regions().iter().map(|r| (r.gpa, r.len)).collect();
    let mut missing = crate::postcopy::empty_set(&ranges);
    loop {
        match r.recv()? {
            Message::Needed { gpa, npages, bitmap } => {
                crate::postcopy::merge_needed(&ranges, &mut missing, gpa, npages, &bitmap)
                    .map_err(|what| MigrationError::Wire(WireError::BadPayload { seq: 0, kind: Kind::Needed, what }))?;
            }
            Message::PushDone { .. } => break,
            Message::Abort(why) => return Err(MigrationError::PeerAborted(why.reason)),
            other => return Err(MigrationError::Wire(unexpected(0, "Needed or PushDone", &other))),
        }
    }
    let fault = route.join(&id, vm_id, 1)?;
    let mut pc = ctx.stats.postcopy.clone().unwrap_or_default();
    pc.resumes += 1;
    let outcome =
        postcopy_out(vm, &missing, (ctx.request.compress, ctx.request.max_bandwidth), (r, w), fault, progress, &mut pc);
    ctx.stats.postcopy = Some(pc);
    ctx.stats.total_ms += ms(t0.elapsed());
    if let Err(why) = outcome {
        progress.lock().unwrap().state = Some(MigrationState::PostcopyPaused);
        return Err(MigrationError::PostcopyPaused(why));
    }
    ctx.stats.state = MigrationState::Completed;
    Ok(ctx.stats.clone())
}

/// What a source wants from settling a commit in doubt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SettleWant {
    /// The guest should run at the destination: send `Go` again if it did
    /// not get it.
    Destination,
    /// The guest should run here again: tell the destination to drop its
    /// copy, which it does only if it never got `Go`.
    TakeBack,
}

/// How a settle ended.
#[derive(Debug)]
pub enum Settled {
    /// The destination runs the guest (it had `Go`, or got it now): the
    /// migration is complete.
    Running(MigrationStats),
    /// The destination never got `Go` and was told to drop its copy (or,
    /// forced, was not asked): the guest is this side's again.
    TakenBack(MigrationStats),
}

/// Settles a commit in doubt over a new connection to the destination:
/// asks with `Settle` whether it runs the guest. If it does, the migration
/// is complete whatever `want` says (in post-copy and hybrid: committed,
/// its missing pages still to be pushed by [`resume_postcopy`]; the stats
/// say `postcopy-paused` until then). If it holds the paused VM without `Go`,
/// `want` decides: `Go` now (and wait for `Running`), or `Abort` and the
/// guest is this side's again. Safe to repeat: any failure leaves the
/// commit in doubt, and the destination runs the guest only on a `Go`.
pub fn settle_commit(
    vm_id: &str,
    ctx: &mut PostcopyResume,
    progress: &ProgressHandle,
    want: SettleWant,
) -> Result<Settled, MigrationError> {
    let t0 = Instant::now();
    let r = settle_once(vm_id, ctx, want);
    ctx.stats.total_ms += ms(t0.elapsed());
    let mut p = progress.lock().unwrap();
    match r {
        Ok(running) => {
            ctx.stats.state = match (running, ctx.is_postcopy()) {
                // The guest runs there, but part of its memory is only here:
                // the caller goes on with a post-copy resume.
                (true, true) => MigrationState::PostcopyPaused,
                (true, false) => MigrationState::Completed,
                (false, _) => MigrationState::Cancelled,
            };
            p.state = Some(ctx.stats.state);
            Ok(if running { Settled::Running(ctx.stats.clone()) } else { Settled::TakenBack(ctx.stats.clone()) })
        }
        Err(e) => {
            p.state = Some(MigrationState::CommitUnconfirmed);
            Err(match e {
                MigrationError::CommitUnconfirmed(_) => e,
                other => MigrationError::CommitUnconfirmed(format!("the settle failed: {other}")),
            })
        }
    }
}

/// One settle attempt; true when the destination runs the guest, false
/// when it was told to drop its copy.
fn settle_once(vm_id: &str, ctx: &PostcopyResume, want: SettleWant) -> Result<bool, MigrationError> {
    let route = Route::of(&ctx.request)?;
    let id = ctx.migration_id.clone();
    let (mut r, mut w, _) = route.open()?;
    w.send(&Message::Settle(Settle { migration_id: id.clone(), vm_id: vm_id.to_string() })).map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let accept = match r.recv()? {
        Message::Accept(a) => a,
        Message::Refuse(why) => return Err(MigrationError::Refused(why.reason)),
        other => return Err(MigrationError::Wire(unexpected(0, "Accept of the settle", &other))),
    };
    let key = FrameKey::session(&id, &accept.nonce, vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    match r.recv()? {
        Message::Running => Ok(true),
        Message::Ready(_) => match want {
            SettleWant::Destination => {
                w.send(&Message::Go).map_err(WireError::Io)?;
                w.flush().map_err(WireError::Io)?;
                match r.recv()? {
                    Message::Running => Ok(true),
                    Message::Abort(why) => Err(MigrationError::PeerAborted(why.reason)),
                    other => Err(MigrationError::Wire(unexpected(0, "Running", &other))),
                }
            }
            SettleWant::TakeBack => {
                // Best effort: the destination runs the guest only on a Go,
                // and none will come from here again.
                let _ = w.send(&Message::Abort(Reason {
                    reason: "the source takes the guest back: drop the copy that never ran".into(),
                }));
                let _ = w.flush();
                Ok(false)
            }
        },
        Message::Abort(why) => Err(MigrationError::PeerAborted(why.reason)),
        other => Err(MigrationError::Wire(unexpected(0, "Running or Ready", &other))),
    }
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
        mode: MigrationMode::Precopy,
        postcopy: None,
        stream_bytes: Vec::new(),
        local: false,
        working_set_held_pages: pre.wws_held_pages,
        working_set_resends_saved: pre.wws_resends_saved,
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
    if req.mode != MigrationMode::Precopy {
        caps.push(CAP_POSTCOPY.to_string());
    }
    if req.local {
        caps.push(CAP_LOCAL.to_string());
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
    /// How long to hold a loaded VM whose `Go` did not arrive (the link
    /// was lost after `Ready`) for the source to settle the commit.
    pub commit_wait: Duration,
    /// Where the incoming migration is, for the API while no VM is served.
    pub progress: IncomingHandle,
}

/// Default of [`ReceiveOptions::commit_wait`]: long enough for an operator
/// to notice and run `ferry migrate --resume`.
pub const DEFAULT_COMMIT_WAIT: Duration = Duration::from_secs(60);

/// An incoming migration's phase, for `GET /vm` before the VM is served.
#[derive(Clone, Debug, Serialize, Default)]
pub struct IncomingProgress {
    /// Where it is (None while waiting for a source).
    pub state: Option<MigrationState>,
    /// The migration, once its hello arrived.
    pub migration_id: Option<String>,
    /// In `commit-unconfirmed`: ms left before the loaded VM is dropped.
    pub commit_wait_left_ms: Option<u64>,
}

/// Shared incoming progress.
pub type IncomingHandle = Arc<Mutex<IncomingProgress>>;

/// What arrived.
pub struct Received {
    /// The VM, running (or paused if asked).
    pub vm: Arc<Vm>,
    /// The VM's identity, carried over from the source.
    pub vm_id: String,
    /// Figures of the incoming side.
    pub stats: IncomingStats,
    /// Post-copy in progress: the pages still arriving, and what a resume needs.
    pub postcopy: Option<IncomingPostcopy>,
}

/// A post-copy still fetching pages at the destination.
pub struct IncomingPostcopy {
    /// The fault handler and receivers.
    pub pages: Arc<PostcopyIncoming>,
    /// The migration, for a resume.
    pub migration_id: String,
    /// The VM, for a resume.
    pub vm_id: String,
    /// How long the source may stall.
    pub peer_timeout: Duration,
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
    if h.extra_streams >= MAX_STREAMS {
        return Err(format!("{} page streams: this ferry takes at most {MAX_STREAMS}", h.extra_streams + 1));
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
    let kind = conn.kind();
    let t0 = Instant::now();
    let accept_timeout = opts.accept_timeout;
    conn.set_timeouts(Some(opts.peer_timeout), Some(opts.peer_timeout))?;
    let (r, w) = conn.split();
    let mut w = FrameWriter::new(w);
    let mut r = FrameReader::new(r);
    let mut stats = IncomingStats { peer: peer.addr.clone(), peer_name: peer.name.clone(), ..Default::default() };
    let set = |st: MigrationState| opts.progress.lock().unwrap().state = Some(st);
    set(MigrationState::Setup);
    let hello = match r.recv() {
        Ok(Message::Hello(h)) => h,
        Ok(other) => return Err(refuse(&mut w, unexpected(0, "Hello", &other).to_string())),
        Err(e) => return Err(refuse(&mut w, e.to_string())),
    };
    let template = match check_hello(&hello) {
        Ok(t) => t,
        Err(why) => return Err(refuse(&mut w, why)),
    };
    if hello.capabilities.iter().any(|c| c == CAP_LOCAL) && kind != transport::TransportKind::Unix {
        return Err(refuse(&mut w, "local migration needs a unix socket without TLS".into()));
    }
    if hello.capabilities.iter().any(|c| c == CAP_POSTCOPY) {
        if let Err(e) = ferry_vmm::uffd::Uffd::new(0) {
            return Err(refuse(&mut w, format!("post-copy needs userfaultfd on this host, which failed: {e}")));
        }
    }
    let nonce = random_hex();
    opts.progress.lock().unwrap().migration_id = Some(hello.migration_id.clone());
    // Offered unasked: this side holds a VM whose Go did not arrive for a settle.
    let mut capabilities = hello.capabilities.clone();
    capabilities.push(CAP_SETTLE.to_string());
    w.send(&Message::Accept(Accept { protocol_version: PROTOCOL_VERSION, capabilities, nonce: nonce.clone() }))
        .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let key = FrameKey::session(&hello.migration_id, &nonce, &hello.vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    stats.migration_id = hello.migration_id.clone();
    let postcopy = hello.capabilities.iter().any(|c| c == CAP_POSTCOPY);
    let mut fault: Option<Stream> = None;
    if postcopy {
        match accept_join(listener, accept_timeout, opts.peer_timeout, &hello.migration_id, &hello.vm_id, 1) {
            Ok(f) => fault = Some(f),
            Err(e) => return Err(refuse(&mut w, format!("the post-copy fault stream did not join: {e}"))),
        }
    }
    let mut extra = Vec::new();
    for k in 2..=hello.extra_streams + 1 {
        match accept_join(listener, accept_timeout, opts.peer_timeout, &hello.migration_id, &hello.vm_id, k) {
            // The destination only reads page streams; their sending halves close.
            Ok((er, _)) => extra.push(er),
            Err(e) => return Err(refuse(&mut w, format!("page stream {k} did not join: {e}"))),
        }
    }
    let mut pages_in: Option<Arc<PostcopyIncoming>> = None;
    // A post-copy whose Go came through a settle: its page streams are
    // opened again by the source's resume, not carried on from here.
    let mut relink = false;
    let local = hello.capabilities.iter().any(|c| c == CAP_LOCAL);
    let mut local_ram: Option<Arc<GuestRam>> = None;
    if local {
        let got = (|| -> Result<Arc<GuestRam>, MigrationError> {
            let (mut fr, _) = accept_join(
                listener,
                accept_timeout,
                opts.peer_timeout,
                &hello.migration_id,
                &hello.vm_id,
                crate::local::FD_STREAM,
            )?;
            let fd = fr
                .get_mut()
                .unix_fd()
                .ok_or_else(|| MigrationError::Mismatch("local migration needs a unix socket without TLS".into()))?;
            let ranges = ferry_vmm::layout::ram_ranges(hello.mem_bytes).len();
            let files = crate::local::recv_fds(fd, ranges, opts.peer_timeout).map_err(WireError::Io)?;
            Ok(Arc::new(GuestRam::from_memfds(hello.mem_bytes, files).map_err(crate::Error::Vm)?))
        })();
        match got {
            Ok(ram) => local_ram = Some(ram),
            Err(e) => return Err(refuse(&mut w, format!("the guest's memory did not arrive: {e}"))),
        }
    }

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
            local_ram.take(),
        )
        .map_err(crate::Error::Vm)?;
        if local {
            w.send(&Message::MemoryMapped).map_err(WireError::Io)?;
            w.flush().map_err(WireError::Io)?;
        }
        let ram = prepared.ram().clone();
        let ranges: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.gpa, r.len)).collect();
        let mut needed = postcopy.then(|| crate::postcopy::empty_set(&ranges));
        let receivers =
            if extra.is_empty() { None } else { Some(StreamReceivers::start(&ram, std::mem::take(&mut extra))?) };
        set(MigrationState::Active);
        let state_bytes = loop {
            match r.recv()? {
                Message::Pages { .. } | Message::Zero { .. } if local => {
                    return Err(MigrationError::Wire(WireError::BadFrame {
                        seq: stats.page_frames,
                        what: "pages in a local migration, whose memory is shared".into(),
                    }));
                }
                Message::Needed { gpa, npages, bitmap } => {
                    let Some(set) = needed.as_mut() else {
                        return Err(MigrationError::Wire(WireError::BadFrame {
                            seq: stats.page_frames,
                            what: "a post-copy page bitmap in a pre-copy migration".into(),
                        }));
                    };
                    crate::postcopy::merge_needed(&ranges, set, gpa, npages, &bitmap).map_err(|what| {
                        MigrationError::Wire(WireError::BadPayload { seq: stats.page_frames, kind: Kind::Needed, what })
                    })?;
                }
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
                    if let Some(rx) = &receivers {
                        rx.wait(round, opts.peer_timeout)?;
                    }
                    // Everything before it is in guest RAM: acknowledge.
                    w.send(&Message::RoundEnd { round, pages }).map_err(WireError::Io)?;
                    w.flush().map_err(WireError::Io)?;
                }
                Message::State(s) => {
                    if let Some(rx) = &receivers {
                        rx.wait(FINAL_ROUND, opts.peer_timeout)?;
                        let (p, z, f, b) = rx.counts();
                        stats.pages += p;
                        stats.zero_pages += z;
                        stats.page_frames += f;
                        stats.bytes_received += b;
                    }
                    break s;
                }
                Message::Abort(why) => return Err(MigrationError::PeerAborted(why.reason)),
                other => return Err(MigrationError::Wire(unexpected(0, "pages or State", &other))),
            }
        };
        let t_state = Instant::now();
        set(MigrationState::Device);
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
        if let Some(set) = &needed {
            // Stale pages are dropped and guest RAM is handed to userfaultfd
            // before any vCPU can run.
            let pc = PostcopyIncoming::prepare(&ram, set).map_err(MigrationError::Mismatch)?;
            pages_in = Some(Arc::new(pc));
        }
        let vm = Arc::new(prepared.apply(&state).map_err(crate::Error::Vm)?);
        let digest = hello.capabilities.iter().any(|c| c == CAP_DIGEST).then(|| ram.digest().to_hex().to_string());
        let ready = Ready { memory_digest: digest };
        w.send(&Message::Ready(ready.clone())).map_err(WireError::Io)?;
        w.flush().map_err(WireError::Io)?;
        let drop_vm = || {
            vm.stop(ferry_vmm::ExitReason::ShutdownForced);
            vm.wait();
        };
        match r.recv() {
            Ok(Message::Go) => {}
            // An authenticated frame other than Go in Go's place: the source
            // did not commit (it aborted or is broken), and never will on
            // this stream.
            Ok(Message::Abort(why)) => {
                drop_vm();
                return Err(MigrationError::PeerAborted(why.reason));
            }
            Ok(other) => {
                drop_vm();
                return Err(MigrationError::Wire(unexpected(0, "Go", &other)));
            }
            // The link failed (or Go arrived damaged): Go may have been
            // sent. Hold the loaded VM for a settle. This stream is never
            // read again, so only a settle can bring Go. In post-copy the
            // page streams are gone with it: after a settle's Go they are
            // opened again by a post-copy resume (`Resume`).
            Err(e) => {
                let wait = opts.commit_wait;
                eprintln!(
                    "ferry: the link to the source failed after Ready ({e}); Go may have been sent: holding the loaded VM of migration {} paused for {} ms for the source to settle the commit (`ferry migrate --resume` there)",
                    hello.migration_id,
                    wait.as_millis()
                );
                set(MigrationState::CommitUnconfirmed);
                stats.bytes_received += r.bytes;
                let ids = (hello.migration_id.as_str(), hello.vm_id.as_str());
                match await_settle(listener, ids, &ready, wait, opts.peer_timeout, &opts.progress) {
                    SettleEnd::Go((sr, sw)) => {
                        eprintln!("ferry: the source settled the commit: Go");
                        r = sr;
                        w = sw;
                        relink = postcopy;
                    }
                    SettleEnd::TakenBack(why) => {
                        drop_vm();
                        return Err(MigrationError::PeerAborted(why));
                    }
                    SettleEnd::Expired => {
                        drop_vm();
                        return Err(MigrationError::CommitWaitExpired {
                            migration_id: hello.migration_id.clone(),
                            waited_ms: wait.as_millis() as u64,
                        });
                    }
                }
            }
        }
        set(MigrationState::Completed);
        opts.progress.lock().unwrap().commit_wait_left_ms = None;
        // Ours now: the lineage starts here.
        vm.lineage_log().and_then(|l| l.reset()).map_err(crate::Error::Vm)?;
        if let (true, Some(pc)) = (relink, &pages_in) {
            // The old page streams died with the link: the guest runs, and a
            // vCPU touching a page still at the source waits until the
            // source's resume (right after this Running) opens them again.
            pc.attach_vm(&vm);
            pc.await_resume("the commit was settled; waiting for the source to open the page streams again".into());
        }
        if !opts.paused {
            vm.resume().map_err(crate::Error::Vm)?;
        }
        let _ = w.send(&Message::Running);
        let _ = w.flush();
        stats.switchover_ms = ms(t_state.elapsed());
        stats.total_ms = ms(t0.elapsed());
        stats.bytes_received += r.bytes;
        Ok(Received { vm, vm_id: hello.vm_id.clone(), stats: stats.clone(), postcopy: None })
    })();
    if let Err(e) = &result {
        if !matches!(e, MigrationError::PeerAborted(_)) {
            let _ = w.send(&Message::Abort(Reason { reason: e.to_string() }));
            let _ = w.flush();
        }
    }
    let mut got = result?;
    if let Some(pc) = pages_in {
        pc.attach_vm(&got.vm);
        // When Go came through a settle the old fault stream is dead too,
        // and is dropped here; the source's resume joins a new one.
        if let (Some((fr, fw)), false) = (fault, relink) {
            pc.start(r, w, fr, fw, opts.peer_timeout).map_err(|e| MigrationError::Engine(crate::Error::Mismatch(e)))?;
        }
        got.postcopy = Some(IncomingPostcopy {
            pages: pc,
            migration_id: hello.migration_id.clone(),
            vm_id: hello.vm_id.clone(),
            peer_timeout: opts.peer_timeout,
        });
    }
    Ok(got)
}

/// Accepts the fault stream of migration `id`: its `Join` must name this
/// migration and VM; it is keyed with a nonce of its own.
fn accept_join(
    listener: &Listener,
    accept_timeout: Duration,
    peer_timeout: Duration,
    id: &str,
    vm_id: &str,
    stream: u32,
) -> Result<Stream, MigrationError> {
    let (conn, _) = listener.accept(accept_timeout.min(CONNECT_TIMEOUT * 3))?;
    conn.set_timeouts(Some(peer_timeout), Some(peer_timeout))?;
    let (r, w) = conn.split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    match r.recv()? {
        Message::Join(j) if j.migration_id == id && j.vm_id == vm_id && j.stream == stream => {}
        Message::Join(_) => return Err(refuse(&mut w, "the stream joins another migration".into())),
        other => return Err(refuse(&mut w, unexpected(0, "Join", &other).to_string())),
    }
    let nonce = random_hex();
    w.send(&Message::Accept(Accept { protocol_version: PROTOCOL_VERSION, capabilities: vec![], nonce: nonce.clone() }))
        .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let key = FrameKey::session(id, &nonce, vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    Ok((r, w))
}

/// Destination side of a post-copy after the commit: waits on `listener`
/// for the source to reconnect with `Resume` (the link was lost, or a
/// settle brought `Go` over a new connection), tells it which pages are
/// still missing, and restarts the receivers. A `Settle` of this migration
/// (its source did not hear `Running`) is answered `Running`: the guest is
/// this side's. Once every page is in place it goes on answering settles
/// (as [`serve_commit_settles`]); it returns when post-copy failed for
/// good, or `stop` is set.
pub fn serve_postcopy_resumes(listener: &Listener, pc: &IncomingPostcopy, stop: &std::sync::atomic::AtomicBool) {
    use crate::postcopy::PostcopyPhase;
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::SeqCst) {
        match pc.pages.phase() {
            PostcopyPhase::Completed => {
                return serve_commit_settles(listener, (&pc.migration_id, &pc.vm_id), pc.peer_timeout, stop)
            }
            PostcopyPhase::Failed => return,
            PostcopyPhase::Active | PostcopyPhase::Paused => {}
        }
        let (conn, peer) = match listener.accept(Duration::from_millis(500)) {
            Ok(c) => c,
            Err(_) => continue,
        };
        match resume_incoming(listener, conn, pc) {
            Ok(true) => eprintln!("ferry: post-copy resumed by {}", peer.addr),
            Ok(false) => eprintln!("ferry: told {} that migration {} runs here", peer.addr, pc.migration_id),
            Err(e) => eprintln!("ferry: a post-copy resume from {} failed: {e}", peer.addr),
        }
    }
}

/// Serves one connection to a post-copy destination: a `Resume` (true once
/// the receivers run again) or a `Settle`, answered `Running` (false).
fn resume_incoming(
    listener: &Listener,
    conn: transport::Transport,
    pc: &IncomingPostcopy,
) -> Result<bool, MigrationError> {
    conn.set_timeouts(Some(pc.peer_timeout), Some(pc.peer_timeout))?;
    let (r, w) = conn.split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    match r.recv()? {
        Message::Resume(x) if x.migration_id == pc.migration_id && x.vm_id == pc.vm_id => {}
        Message::Resume(_) => return Err(refuse(&mut w, "no paused post-copy of that migration and VM here".into())),
        Message::Settle(x) => {
            answer_settle((r, w), &x, (&pc.migration_id, &pc.vm_id), Holding::Running)?;
            return Ok(false);
        }
        other => return Err(refuse(&mut w, unexpected(0, "Resume or Settle", &other).to_string())),
    }
    let nonce = random_hex();
    w.send(&Message::Accept(Accept { protocol_version: PROTOCOL_VERSION, capabilities: vec![], nonce: nonce.clone() }))
        .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let key = FrameKey::session(&pc.migration_id, &nonce, &pc.vm_id);
    w.rekey(key.clone());
    r.rekey(key);
    // The old link's receivers are finished or will fail harmlessly.
    pc.pages.supersede_link();
    pc.pages.reap_receivers();
    pc.pages.forget_unfilled_claims();
    let missing = pc.pages.missing();
    let ranges: Vec<(u64, u64)> = pc.pages.ranges();
    let n = count_bits(&missing);
    for m in crate::postcopy::needed_frames(&ranges, &missing) {
        w.send(&m).map_err(WireError::Io)?;
    }
    w.send(&Message::PushDone { pages: n }).map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let (fr, fw) = accept_join(listener, CONNECT_TIMEOUT, pc.peer_timeout, &pc.migration_id, &pc.vm_id, 1)?;
    pc.pages.start(r, w, fr, fw, pc.peer_timeout).map_err(|e| MigrationError::Engine(crate::Error::Mismatch(e)))?;
    Ok(true)
}

/// How a destination's wait for a settle ended.
enum SettleEnd {
    /// A settle brought `Go`, on this stream (to answer `Running` on).
    Go(Stream),
    /// The source took the guest back (its `Abort` reason).
    TakenBack(String),
    /// The commit wait passed without either.
    Expired,
}

/// What a destination says to a settle.
#[derive(Clone, Copy)]
enum Holding<'a> {
    /// It runs the guest: `Running`.
    Running,
    /// It holds the loaded VM paused without `Go`: `Ready` (as before), then
    /// it waits for `Go` or `Abort`.
    Paused(&'a Ready),
}

/// What one settle connection brought.
enum SettleStep {
    /// Answered `Running`; nothing changes.
    Answered,
    /// `Go` arrived.
    Go(Stream),
    /// `Abort` arrived: the source takes the guest back.
    Abort(String),
}

/// Whether a `Settle` names the migration and VM this side holds; a
/// settle for anything else (another migration, another VM, a replay
/// aimed at a destination that never sent `Ready` for it) is refused.
fn settle_matches(x: &Settle, (id, vm_id): (&str, &str)) -> bool {
    x.migration_id == id && x.vm_id == vm_id
}

/// Serves one settle connection: checks the `Settle`, accepts it with a
/// fresh nonce (session key as for the main stream) and answers what this
/// side holds.
fn settle_incoming(
    conn: transport::Transport,
    ids: (&str, &str),
    holding: Holding<'_>,
    peer_timeout: Duration,
) -> Result<SettleStep, MigrationError> {
    conn.set_timeouts(Some(peer_timeout), Some(peer_timeout))?;
    let (r, w) = conn.split();
    let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
    match r.recv()? {
        Message::Settle(x) => answer_settle((r, w), &x, ids, holding),
        other => Err(refuse(&mut w, unexpected(0, "Settle", &other).to_string())),
    }
}

/// The rest of a settle connection whose first frame was `x`: refuses a
/// settle of another migration or VM, else accepts it and answers.
fn answer_settle(
    (mut r, mut w): Stream,
    x: &Settle,
    ids: (&str, &str),
    holding: Holding<'_>,
) -> Result<SettleStep, MigrationError> {
    if !settle_matches(x, ids) {
        return Err(refuse(&mut w, "no commit of that migration and VM waits to be settled here".into()));
    }
    let nonce = random_hex();
    w.send(&Message::Accept(Accept {
        protocol_version: PROTOCOL_VERSION,
        capabilities: vec![CAP_SETTLE.to_string()],
        nonce: nonce.clone(),
    }))
    .map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    let key = FrameKey::session(ids.0, &nonce, ids.1);
    w.rekey(key.clone());
    r.rekey(key);
    let ready = match holding {
        Holding::Running => {
            w.send(&Message::Running).map_err(WireError::Io)?;
            w.flush().map_err(WireError::Io)?;
            return Ok(SettleStep::Answered);
        }
        Holding::Paused(ready) => ready,
    };
    w.send(&Message::Ready(ready.clone())).map_err(WireError::Io)?;
    w.flush().map_err(WireError::Io)?;
    match r.recv()? {
        Message::Go => Ok(SettleStep::Go((r, w))),
        Message::Abort(why) => Ok(SettleStep::Abort(why.reason)),
        other => Err(MigrationError::Wire(unexpected(0, "Go or Abort", &other))),
    }
}

/// Destination side of a commit in doubt: holds the loaded VM (paused,
/// never run) and serves settles on `listener`, one at a time, until one
/// brings `Go` or `Abort` or `wait` has passed.
fn await_settle(
    listener: &Listener,
    ids: (&str, &str),
    ready: &Ready,
    wait: Duration,
    peer_timeout: Duration,
    progress: &IncomingHandle,
) -> SettleEnd {
    let deadline = Instant::now() + wait;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        progress.lock().unwrap().commit_wait_left_ms = Some(left.as_millis() as u64);
        if left.is_zero() {
            return SettleEnd::Expired;
        }
        let (conn, peer) = match listener.accept(left.min(Duration::from_millis(500))) {
            Ok(c) => c,
            Err(_) => {
                // A timeout, or a client that failed TLS or the allow-list.
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        // A settle may not hold the VM past the wait.
        let timeout =
            peer_timeout.min(deadline.saturating_duration_since(Instant::now())).max(Duration::from_millis(1));
        match settle_incoming(conn, ids, Holding::Paused(ready), timeout) {
            Ok(SettleStep::Go(stream)) => return SettleEnd::Go(stream),
            Ok(SettleStep::Abort(why)) => return SettleEnd::TakenBack(why),
            Ok(SettleStep::Answered) => {}
            Err(e) => eprintln!("ferry: a settle from {} failed: {e}; still holding the VM", peer.addr),
        }
    }
}

/// Destination side after the commit of a pre-copy: answers `Running` to
/// every settle of migration `id` of VM `vm_id` (its source may not have
/// heard the first one), until `stop` is set.
pub fn serve_commit_settles(
    listener: &Listener,
    (id, vm_id): (&str, &str),
    peer_timeout: Duration,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::sync::atomic::Ordering;
    while !stop.load(Ordering::SeqCst) {
        let (conn, peer) = match listener.accept(Duration::from_millis(500)) {
            Ok(c) => c,
            Err(_) => {
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        match settle_incoming(conn, (id, vm_id), Holding::Running, peer_timeout) {
            Ok(_) => eprintln!("ferry: told {} that migration {id} runs here", peer.addr),
            Err(e) => eprintln!("ferry: a settle from {} failed: {e}", peer.addr),
        }
    }
}

/// Zeroes guest RAM in a checked range.
pub(crate) fn zero_range(ram: &GuestRam, gpa: u64, len: u64) {
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

    /// A source's side of one settle, by hand: sends `first`, returns the
    /// destination's answer to it and, when accepted, its next frame.
    fn settle_client(addr: &Address, first: Message, then: Option<Message>) -> (Message, Option<Message>) {
        let conn = transport::connect(addr, &ClientSecurity::Insecure, "", CONNECT_TIMEOUT).unwrap();
        conn.set_timeouts(Some(Duration::from_secs(10)), Some(Duration::from_secs(10))).unwrap();
        let (r, w) = conn.split();
        let (mut r, mut w) = (FrameReader::new(r), FrameWriter::new(w));
        w.send(&first).unwrap();
        w.flush().unwrap();
        let answer = r.recv().unwrap();
        let Message::Accept(a) = &answer else { return (answer, None) };
        let key = FrameKey::session("m1", &a.nonce, "vm1");
        w.rekey(key.clone());
        r.rekey(key);
        let next = r.recv().unwrap();
        if let Some(m) = then {
            w.send(&m).unwrap();
            w.flush().unwrap();
        }
        (answer, Some(next))
    }

    #[test]
    fn a_destination_in_doubt_refuses_other_settles_and_takes_go_from_its_own() {
        let dir = tempfile::tempdir().unwrap();
        let addr: Address = format!("unix://{}", dir.path().join("m.sock").display()).parse().unwrap();
        let listener = Listener::bind(&addr, transport::Security::Insecure).unwrap();
        let progress = IncomingHandle::default();
        let ready = Ready { memory_digest: Some("ab".into()) };
        let a = addr.clone();
        let client = std::thread::spawn(move || {
            let settle = |id: &str, vm: &str| Message::Settle(Settle { migration_id: id.into(), vm_id: vm.into() });
            // Another migration, another VM (a replay), a new migration's hello: refused.
            for first in [
                settle("m2", "vm1"),
                settle("m1", "vm2"),
                Message::Resume(crate::wire::Resume { migration_id: "m1".into(), vm_id: "vm1".into() }),
            ] {
                let (answer, _) = settle_client(&a, first, None);
                assert!(matches!(answer, Message::Refuse(_)), "{answer:?}");
            }
            // Its own: Accept, then Ready as before, then Go.
            let (answer, next) = settle_client(&a, settle("m1", "vm1"), Some(Message::Go));
            let Message::Accept(acc) = answer else { panic!("{answer:?}") };
            assert_eq!(acc.capabilities, vec![CAP_SETTLE.to_string()]);
            assert_eq!(next, Some(Message::Ready(Ready { memory_digest: Some("ab".into()) })));
        });
        let end =
            await_settle(&listener, ("m1", "vm1"), &ready, Duration::from_secs(30), Duration::from_secs(10), &progress);
        assert!(matches!(end, SettleEnd::Go(_)), "the settle brought Go");
        client.join().unwrap();
        assert!(progress.lock().unwrap().commit_wait_left_ms.is_some());
        // With nobody settling, the wait ends by itself.
        let t = Instant::now();
        let end = await_settle(
            &listener,
            ("m1", "vm1"),
            &ready,
            Duration::from_millis(300),
            Duration::from_secs(10),
            &progress,
        );
        assert!(matches!(end, SettleEnd::Expired));
        assert!(t.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_destination_that_runs_the_guest_answers_running_and_an_abort_takes_it_back() {
        let dir = tempfile::tempdir().unwrap();
        let addr: Address = format!("unix://{}", dir.path().join("m.sock").display()).parse().unwrap();
        let listener = Listener::bind(&addr, transport::Security::Insecure).unwrap();
        let a = addr.clone();
        let settle = || Message::Settle(Settle { migration_id: "m1".into(), vm_id: "vm1".into() });
        let client = std::thread::spawn(move || settle_client(&a, settle(), None));
        let (conn, _) = listener.accept(Duration::from_secs(10)).unwrap();
        let step = settle_incoming(conn, ("m1", "vm1"), Holding::Running, Duration::from_secs(10)).unwrap();
        assert!(matches!(step, SettleStep::Answered));
        assert_eq!(client.join().unwrap().1, Some(Message::Running));
        // Holding the paused VM: an Abort in Go's place takes the guest back.
        let a = addr.clone();
        let abort = Message::Abort(Reason { reason: "taking it back".into() });
        let client = std::thread::spawn(move || settle_client(&a, settle(), Some(abort)));
        let ready = Ready::default();
        let progress = IncomingHandle::default();
        let end =
            await_settle(&listener, ("m1", "vm1"), &ready, Duration::from_secs(30), Duration::from_secs(10), &progress);
        assert!(matches!(end, SettleEnd::TakenBack(ref why) if why == "taking it back"));
        client.join().unwrap();
    }

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
