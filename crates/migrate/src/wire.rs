//! The live-migration wire format (specified in `docs/migration-protocol.md`):
//! authenticated frames carrying the hello/accept negotiation, page runs,
//! zero runs, the VM state and the commit handshake.
//!
//! Everything read from the peer is hostile until checked: [`FrameReader`]
//! bounds every length before allocating, checks every tag before parsing,
//! and [`Message::decode`] checks every field; the receiver then checks
//! page addresses against its own memory map ([`check_ram_range`]).

use std::io::{Read, Write};

use serde::{Deserialize, Serialize};

/// `FMG1`: the first four bytes of every frame.
pub const MAGIC: [u8; 4] = *b"FMG1";

/// The protocol version this build speaks.
pub const PROTOCOL_VERSION: u32 = 1;

/// Bytes of a frame header.
pub const HEADER_LEN: usize = 16;

/// Bytes of a frame tag (keyed BLAKE3).
pub const TAG_LEN: usize = 32;

/// Largest payload a frame may declare: a page run of [`MAX_RUN_PAGES`]
/// pages plus its sub-header, or a VM state.
pub const MAX_PAYLOAD: usize = 16 << 20;

/// Most pages one `Pages` or `Zero`-less data frame carries (1 MiB).
pub const MAX_RUN_PAGES: u32 = 256;

/// Guest page size.
pub const PAGE: u64 = 4096;

/// Frame kinds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u16)]
pub enum Kind {
    /// Source → destination: who, what, and the proposed capabilities.
    Hello = 1,
    /// Destination → source: accepted, with its nonce.
    Accept = 2,
    /// Destination → source: refused, with the reason.
    Refuse = 3,
    /// A run of non-zero pages.
    Pages = 4,
    /// A run of zero pages.
    Zero = 5,
    /// The end of one pre-copy round.
    RoundEnd = 6,
    /// The serialised VM state (after the last pages).
    State = 7,
    /// Destination → source: memory and state loaded and checked.
    Ready = 8,
    /// Source → destination: the guest is yours.
    Go = 9,
    /// Destination → source: the guest runs here.
    Running = 10,
    /// Either way: giving up, with the reason.
    Abort = 11,
    /// Post-copy: a bitmap of pages the destination must not trust (source
    /// → destination before `State`), or still lacks (destination → source
    /// when a paused post-copy resumes).
    Needed = 12,
    /// Post-copy, destination → source on the fault stream: a guest vCPU
    /// waits for these pages.
    PageRequest = 13,
    /// The first frame of an extra stream of a running migration.
    Join = 14,
    /// Post-copy, source → destination: every needed page has been pushed;
    /// or destination → source: the end of the `Needed` list on resume.
    PushDone = 15,
    /// Post-copy, destination → source: every page is in place; the
    /// source's copy of memory is no longer needed.
    Complete = 16,
    /// The first frame of a connection that resumes a paused post-copy.
    Resume = 17,
    /// Local migration, destination → source: the memory descriptors are
    /// mapped and the VM is built; the source may pause the guest.
    MemoryMapped = 18,
    /// The first frame of a connection that settles a commit whose `Go`
    /// or `Running` may have been lost.
    Settle = 19,
}

impl Kind {
    fn from_u16(v: u16) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::Zero,
            6 => Kind::RoundEnd,
            7 => Kind::State,
            8 => Kind::Ready,
            9 => Kind::Go,
            10 => Kind::Running,
            11 => Kind::Abort,
            12 => Kind::Needed,
            13 => Kind::PageRequest,
            14 => Kind::Join,
            15 => Kind::PushDone,
            16 => Kind::Complete,
            17 => Kind::Resume,
            18 => Kind::MemoryMapped,
            19 => Kind::Settle,
            _ => return None,
        })
    }
}

/// Why a frame or message was refused.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The stream failed or ended.
    #[error("{}", io_text(.0))]
    Io(std::io::Error),
    /// The stream ended between frames or inside one.
    #[error("the peer closed the migration stream {0}")]
    Closed(&'static str),
    /// A header field is wrong.
    #[error("frame {seq}: {what}")]
    BadFrame {
        /// Frame sequence number in this direction.
        seq: u64,
        /// What is wrong.
        what: String,
    },
    /// The tag does not match: the frame was modified, replayed, reordered
    /// or belongs to another migration.
    #[error("frame {seq} ({kind:?}, {len} bytes): authentication tag mismatch (modified, replayed or from another migration)")]
    BadTag {
        /// Frame sequence number.
        seq: u64,
        /// Its kind.
        kind: Kind,
        /// Payload length.
        len: usize,
    },
    /// A payload is malformed.
    #[error("frame {seq} ({kind:?}): {what}")]
    BadPayload {
        /// Frame sequence number.
        seq: u64,
        /// Its kind.
        kind: Kind,
        /// What is wrong.
        what: String,
    },
}

impl From<std::io::Error> for WireError {
    fn from(e: std::io::Error) -> Self {
        WireError::Io(e)
    }
}

/// Says what an I/O error on the stream means for a person (the OS error
/// once, without a repeated chain).
fn io_text(e: &std::io::Error) -> String {
    use std::io::ErrorKind as K;
    match e.kind() {
        K::ConnectionReset | K::BrokenPipe | K::ConnectionAborted | K::UnexpectedEof => {
            format!("the peer closed the migration stream ({e})")
        }
        K::WouldBlock | K::TimedOut => format!("the peer sent nothing within the timeout ({e})"),
        _ => format!("the migration stream failed: {e}"),
    }
}

/// Codec of a page run on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum WireCodec {
    /// Raw pages.
    None,
    /// LZ4 block; the default when the link, not the CPU, is the limit.
    #[default]
    Lz4,
    /// zstd frame at [`ZSTD_WIRE_LEVEL`] (-1): fewer bytes than LZ4 for more CPU,
    /// for slow links. Needs the peer's [`CAP_ZSTD`].
    Zstd,
}

/// Page codec byte of a raw run.
pub const CODEC_RAW: u8 = 0;
/// Page codec byte of an LZ4 block.
pub const CODEC_LZ4: u8 = 1;
/// Page codec byte of a zstd frame.
pub const CODEC_ZSTD: u8 = 2;

/// The capability a source proposes before it sends zstd runs, so that a
/// destination that cannot decode them refuses at the hello, before any
/// memory moves, instead of failing at the first run.
pub const CAP_ZSTD: &str = "zstd-pages";

/// zstd level of wire runs, chosen for speed. Measured in process on 1 MiB
/// runs (the ignored test `codec_speed`; `docs/benchmarks.md`): on
/// one-word-per-page memory level -1 encodes at 6.2 GB/s to 936 bytes per
/// MiB, level 1 at 3.8 GB/s to 905, level 3 at 0.96 GB/s to 888, and -3/-5
/// lose 2x in size; on incompressible pages, which a sender must still try,
/// -1 runs at 4.7 GB/s against level 1's 2.8.
pub const ZSTD_WIRE_LEVEL: i32 = -1;

thread_local! {
    /// One zstd context per thread, reused: creating one per run costs more than a run.
    static ZSTD_C: std::cell::RefCell<Option<zstd::bulk::Compressor<'static>>> = const { std::cell::RefCell::new(None) };
    static ZSTD_D: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> = const { std::cell::RefCell::new(None) };
}

/// Decodes a zstd run into exactly `raw_len` bytes. The output buffer is
/// the bound: zstd refuses to write past it, so a hostile frame that
/// declares or produces more than the run's page count cannot allocate or
/// write more than `raw_len` (at most 1 MiB); the window is bounded too.
fn zstd_decode(body: &[u8], raw_len: usize) -> Result<Vec<u8>, String> {
    ZSTD_D.with(|d| {
        let mut d = d.borrow_mut();
        if d.is_none() {
            let mut dec = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd init: {e}"))?;
            dec.set_parameter(zstd::zstd_safe::DParameter::WindowLogMax(20)).map_err(|e| format!("zstd init: {e}"))?;
            *d = Some(dec);
        }
        let dec = d.as_mut().ok_or("zstd decoder missing")?;
        let mut out = Vec::with_capacity(raw_len);
        let n = dec.decompress_to_buffer(body, &mut out).map_err(|e| format!("zstd data does not decode: {e}"))?;
        if n != raw_len || out.len() != raw_len {
            return Err(format!("zstd data decodes to {n} bytes, not {raw_len}"));
        }
        Ok(out)
    })
}

/// Compresses `data` into `out` with the thread's zstd context; the size,
/// or None when zstd failed or `out` is too small.
fn zstd_encode(data: &[u8], out: &mut [u8]) -> Option<usize> {
    ZSTD_C.with(|c| {
        let mut c = c.borrow_mut();
        if c.is_none() {
            *c = zstd::bulk::Compressor::new(ZSTD_WIRE_LEVEL).ok();
        }
        c.as_mut()?.compress_to_buffer(data, out).ok()
    })
}

/// What the source proposes and who it is.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// [`PROTOCOL_VERSION`] of the source.
    pub protocol_version: u32,
    /// Fresh random id of this migration (32 hex digits).
    pub migration_id: String,
    /// Identity of the VM being moved.
    pub vm_id: String,
    /// Capabilities the source wants to use (see `docs/migration-protocol.md`).
    pub capabilities: Vec<String>,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// RAM ranges (guest-physical start, length).
    pub ram_ranges: Vec<(u64, u64)>,
    /// vCPU count.
    pub vcpus: u32,
    /// CPU template name.
    pub cpu_template: String,
    /// TSC frequency the guest sees.
    pub tsc_khz: u32,
    /// CPUID feature words the guest sees (leaf, subleaf, register, value),
    /// which the destination's host must support.
    pub cpu_features: Vec<CpuFeatureWord>,
    /// Kernel and command line, informational.
    pub kernel: String,
    /// Kernel command line, informational.
    pub cmdline: String,
    /// Page streams besides the main one (`--streams N` sends N-1 of them),
    /// each joined with `Join` (stream 2, 3, ...) right after `Accept`.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extra_streams: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// The round number of the marker each extra page stream sends after its
/// last pages, before the source sends `State` on the main stream.
pub const FINAL_ROUND: u32 = u32::MAX;

/// One CPUID register of feature bits.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct CpuFeatureWord {
    /// CPUID leaf.
    pub leaf: u32,
    /// Sub-leaf.
    pub subleaf: u32,
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// The bits.
    pub bits: u32,
}

/// The destination's acceptance.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Accept {
    /// Version both will speak.
    pub protocol_version: u32,
    /// The capabilities accepted (a subset of the proposal).
    pub capabilities: Vec<String>,
    /// Fresh random nonce of the destination (32 hex digits); keys the frames after this one.
    pub nonce: String,
}

/// A reason, for `Refuse` and `Abort`.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Reason {
    /// What went wrong, for a person.
    pub reason: String,
}

/// The destination's readiness, after loading everything.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct Ready {
    /// BLAKE3 digest of the received memory, when the source asked for it.
    pub memory_digest: Option<String>,
}

/// Most pages one `Needed` frame describes (16 GiB; a 512 KiB bitmap).
pub const MAX_NEEDED_PAGES: u64 = 1 << 22;

/// Joins an extra stream (the post-copy fault stream) to a migration.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Join {
    /// The migration this stream belongs to.
    pub migration_id: String,
    /// The VM being moved.
    pub vm_id: String,
    /// Stream number (1 is the post-copy fault stream).
    pub stream: u32,
}

/// Resumes a post-copy whose link was lost.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Resume {
    /// The migration to resume.
    pub migration_id: String,
    /// The VM being moved.
    pub vm_id: String,
}

/// Asks the destination of a migration whose commit is in doubt (the
/// source sent `Go`, no `Running` came back) whether it runs the guest.
/// Only a destination that sent `Ready` for exactly this migration and VM
/// accepts it; it answers `Running` (it runs the guest) or `Ready` (it
/// holds the paused VM and waits for `Go` or `Abort`).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settle {
    /// The migration whose commit is in doubt.
    pub migration_id: String,
    /// The VM being moved.
    pub vm_id: String,
}

/// The capability a destination offers in `Accept` (unasked) when it
/// holds a VM whose `Go` did not arrive and answers `Settle`: a source
/// that sees it knows an unconfirmed commit can be settled.
pub const CAP_SETTLE: &str = "commit-settle";

/// The destination's figures of a finished post-copy, sent in `Complete`
/// so that the source's statistics show what the guest went through.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields)]
pub struct PostcopyFigures {
    /// Fault events on pages not yet there.
    pub faults: u64,
    /// Page requests sent to the source on the fault stream.
    pub requests: u64,
    /// Pages that arrived because a vCPU asked for them.
    pub pages_requested: u64,
    /// Pages that arrived through the background push.
    pub pages_pushed: u64,
    /// Time vCPUs spent waiting for remote pages, summed over faults.
    pub blocked_ms_total: f64,
    /// Median wait of one remote fault.
    pub blocked_ms_median: f64,
    /// 99th percentile wait of one remote fault.
    pub blocked_ms_p99: f64,
    /// Longest wait.
    pub blocked_ms_max: f64,
    /// Resume at the destination to the last page in place.
    pub postcopy_ms: f64,
    /// Background push rate (MB/s of pages placed by the push).
    pub push_mb_per_s: f64,
    /// Times the link was lost and the post-copy resumed.
    pub resumes: u32,
}

/// A decoded message.
#[derive(Debug, PartialEq)]
pub enum Message {
    /// See [`Hello`].
    Hello(Box<Hello>),
    /// See [`Accept`].
    Accept(Accept),
    /// Refused before any memory moved.
    Refuse(Reason),
    /// Non-zero pages starting at `gpa`.
    Pages {
        /// Guest-physical address, page-aligned.
        gpa: u64,
        /// Page bytes, a whole number of pages.
        data: Vec<u8>,
    },
    /// `npages` zero pages from `gpa`.
    Zero {
        /// Guest-physical address, page-aligned.
        gpa: u64,
        /// Number of pages.
        npages: u64,
    },
    /// End of round `round` (1-based), which sent `pages` pages.
    RoundEnd {
        /// Round number.
        round: u32,
        /// Pages in it.
        pages: u64,
    },
    /// Serialised VM state (JSON).
    State(Vec<u8>),
    /// See [`Ready`].
    Ready(Ready),
    /// The commit.
    Go,
    /// The guest runs at the destination.
    Running,
    /// Giving up.
    Abort(Reason),
    /// Pages `gpa + i*4096` for each set bit `i` of `bitmap` (LSB first).
    Needed {
        /// Guest-physical address of bit 0, page-aligned.
        gpa: u64,
        /// Pages the bitmap covers.
        npages: u64,
        /// `ceil(npages / 8)` bytes.
        bitmap: Vec<u8>,
    },
    /// A vCPU waits for `npages` pages from `gpa`.
    PageRequest {
        /// Guest-physical address, page-aligned.
        gpa: u64,
        /// Number of pages.
        npages: u32,
    },
    /// See [`Join`].
    Join(Join),
    /// All needed pages pushed (or all remaining ones listed); `pages` of them.
    PushDone {
        /// Pages pushed or listed.
        pages: u64,
    },
    /// See [`PostcopyFigures`].
    Complete(PostcopyFigures),
    /// See [`Resume`].
    Resume(Resume),
    /// Local migration: the destination has mapped the guest's memory.
    MemoryMapped,
    /// See [`Settle`].
    Settle(Settle),
}

impl Message {
    /// The frame kind.
    pub fn kind(&self) -> Kind {
        match self {
            Message::Hello(_) => Kind::Hello,
            Message::Accept(_) => Kind::Accept,
            Message::Refuse(_) => Kind::Refuse,
            Message::Pages { .. } => Kind::Pages,
            Message::Zero { .. } => Kind::Zero,
            Message::RoundEnd { .. } => Kind::RoundEnd,
            Message::State(_) => Kind::State,
            Message::Ready(_) => Kind::Ready,
            Message::Go => Kind::Go,
            Message::Running => Kind::Running,
            Message::Abort(_) => Kind::Abort,
            Message::Needed { .. } => Kind::Needed,
            Message::PageRequest { .. } => Kind::PageRequest,
            Message::Join(_) => Kind::Join,
            Message::PushDone { .. } => Kind::PushDone,
            Message::Complete(_) => Kind::Complete,
            Message::Resume(_) => Kind::Resume,
            Message::MemoryMapped => Kind::MemoryMapped,
            Message::Settle(_) => Kind::Settle,
        }
    }

    /// Decodes a payload whose frame tag was already checked.
    pub fn decode(seq: u64, kind: Kind, p: &[u8]) -> Result<Message, WireError> {
        let bad = |what: String| WireError::BadPayload { seq, kind, what };
        fn json<T: serde::de::DeserializeOwned>(p: &[u8]) -> Result<T, String> {
            serde_json::from_slice(p).map_err(|e| format!("invalid JSON: {e}"))
        }
        let u64_at = |o: usize| u64::from_le_bytes(p[o..o + 8].try_into().expect("8 bytes"));
        Ok(match kind {
            Kind::Hello => Message::Hello(Box::new(json(p).map_err(bad)?)),
            Kind::Accept => Message::Accept(json(p).map_err(bad)?),
            Kind::Refuse => Message::Refuse(json(p).map_err(bad)?),
            Kind::Abort => Message::Abort(json(p).map_err(bad)?),
            Kind::Ready => Message::Ready(json(p).map_err(bad)?),
            Kind::Join => Message::Join(json(p).map_err(bad)?),
            Kind::Complete => Message::Complete(json(p).map_err(bad)?),
            Kind::Resume => Message::Resume(json(p).map_err(bad)?),
            Kind::Settle => Message::Settle(json(p).map_err(bad)?),
            Kind::Needed => {
                if p.len() < 16 {
                    return Err(bad(format!("{} bytes, shorter than the 16-byte bitmap header", p.len())));
                }
                let (gpa, npages) = (u64_at(0), u64_at(8));
                if gpa % PAGE != 0 {
                    return Err(bad(format!("address {gpa:#x} is not page-aligned")));
                }
                if npages == 0 || npages > MAX_NEEDED_PAGES {
                    return Err(bad(format!("bitmap of {npages} pages is outside 1..={MAX_NEEDED_PAGES}")));
                }
                let want = npages.div_ceil(8) as usize;
                if p.len() - 16 != want {
                    return Err(bad(format!("{} bitmap bytes for {npages} pages (want {want})", p.len() - 16)));
                }
                Message::Needed { gpa, npages, bitmap: p[16..].to_vec() }
            }
            Kind::PageRequest => {
                if p.len() != 12 {
                    return Err(bad(format!("{} bytes; a page request is 12", p.len())));
                }
                let gpa = u64_at(0);
                let npages = u32::from_le_bytes(p[8..12].try_into().expect("4 bytes"));
                if gpa % PAGE != 0 {
                    return Err(bad(format!("address {gpa:#x} is not page-aligned")));
                }
                if npages == 0 || npages > MAX_RUN_PAGES {
                    return Err(bad(format!("page count {npages} is outside 1..={MAX_RUN_PAGES}")));
                }
                Message::PageRequest { gpa, npages }
            }
            Kind::PushDone => {
                if p.len() != 8 {
                    return Err(bad(format!("{} bytes; a push end is 8", p.len())));
                }
                Message::PushDone { pages: u64_at(0) }
            }
            Kind::Pages => {
                if p.len() < 16 {
                    return Err(bad(format!("{} bytes, shorter than the 16-byte run header", p.len())));
                }
                let gpa = u64_at(0);
                let npages = u32::from_le_bytes(p[8..12].try_into().expect("4 bytes"));
                let codec = p[12];
                if p[13..16] != [0, 0, 0] {
                    return Err(bad("reserved bytes of the run header are not zero".into()));
                }
                if gpa % PAGE != 0 {
                    return Err(bad(format!("address {gpa:#x} is not page-aligned")));
                }
                if npages == 0 || npages > MAX_RUN_PAGES {
                    return Err(bad(format!("page count {npages} is outside 1..={MAX_RUN_PAGES}")));
                }
                let raw_len = npages as usize * PAGE as usize;
                let body = &p[16..];
                let data = match codec {
                    CODEC_RAW => {
                        if body.len() != raw_len {
                            return Err(bad(format!("{} data bytes for {npages} raw pages", body.len())));
                        }
                        body.to_vec()
                    }
                    CODEC_LZ4 => {
                        let mut out = vec![0u8; raw_len];
                        let n = lz4_flex::block::decompress_into(body, &mut out)
                            .map_err(|e| bad(format!("lz4 data does not decode: {e}")))?;
                        if n != raw_len {
                            return Err(bad(format!("lz4 data decodes to {n} bytes, not {raw_len}")));
                        }
                        out
                    }
                    CODEC_ZSTD => zstd_decode(body, raw_len).map_err(bad)?,
                    c => return Err(bad(format!("unknown page codec {c}"))),
                };
                Message::Pages { gpa, data }
            }
            Kind::Zero => {
                if p.len() != 16 {
                    return Err(bad(format!("{} bytes; a zero run is 16", p.len())));
                }
                let (gpa, npages) = (u64_at(0), u64_at(8));
                if gpa % PAGE != 0 {
                    return Err(bad(format!("address {gpa:#x} is not page-aligned")));
                }
                if npages == 0 || npages > (1 << 40) / PAGE {
                    return Err(bad(format!("zero run of {npages} pages")));
                }
                Message::Zero { gpa, npages }
            }
            Kind::RoundEnd => {
                if p.len() != 12 {
                    return Err(bad(format!("{} bytes; a round end is 12", p.len())));
                }
                Message::RoundEnd { round: u32::from_le_bytes(p[0..4].try_into().expect("4 bytes")), pages: u64_at(4) }
            }
            Kind::State => {
                if p.is_empty() {
                    return Err(bad("empty VM state".into()));
                }
                Message::State(p.to_vec())
            }
            Kind::Go | Kind::Running | Kind::MemoryMapped => {
                if !p.is_empty() {
                    return Err(bad(format!("{} payload bytes where none belong", p.len())));
                }
                match kind {
                    Kind::Go => Message::Go,
                    Kind::Running => Message::Running,
                    _ => Message::MemoryMapped,
                }
            }
        })
    }
}

/// Encodes a page run's payload (lz4 and zstd fall back to raw when they do not shrink it).
pub fn encode_pages(gpa: u64, data: &[u8], codec: WireCodec, out: &mut Vec<u8>) {
    let npages = (data.len() as u64 / PAGE) as u32;
    out.clear();
    out.extend_from_slice(&gpa.to_le_bytes());
    out.extend_from_slice(&npages.to_le_bytes());
    out.extend_from_slice(&[0u8; 4]);
    if codec == WireCodec::Lz4 {
        let max = lz4_flex::block::get_maximum_output_size(data.len());
        out.resize(16 + max, 0);
        if let Ok(n) = lz4_flex::block::compress_into(data, &mut out[16..]) {
            if n < data.len() {
                out.truncate(16 + n);
                out[12] = CODEC_LZ4;
                return;
            }
        }
        out.truncate(16);
    }
    if codec == WireCodec::Zstd {
        out.resize(16 + zstd::zstd_safe::compress_bound(data.len()), 0);
        if let Some(n) = zstd_encode(data, &mut out[16..]) {
            if n < data.len() {
                out.truncate(16 + n);
                out[12] = CODEC_ZSTD;
                return;
            }
        }
        out.truncate(16);
    }
    out.extend_from_slice(data);
}

/// Encodes a message's payload (page runs use [`encode_pages`]).
pub fn encode(msg: &Message, out: &mut Vec<u8>) {
    out.clear();
    let j = |out: &mut Vec<u8>, v: &dyn erased::Ser| v.write(out);
    match msg {
        Message::Hello(h) => j(out, h.as_ref()),
        Message::Accept(a) => j(out, a),
        Message::Refuse(r) | Message::Abort(r) => j(out, r),
        Message::Ready(r) => j(out, r),
        Message::Pages { gpa, data } => encode_pages(*gpa, data, WireCodec::None, out),
        Message::Zero { gpa, npages } => {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&npages.to_le_bytes());
        }
        Message::RoundEnd { round, pages } => {
            out.extend_from_slice(&round.to_le_bytes());
            out.extend_from_slice(&pages.to_le_bytes());
        }
        Message::State(s) => out.extend_from_slice(s),
        Message::Go | Message::Running | Message::MemoryMapped => {}
        Message::Join(x) => j(out, x),
        Message::Complete(x) => j(out, x),
        Message::Resume(x) => j(out, x),
        Message::Settle(x) => j(out, x),
        Message::Needed { gpa, npages, bitmap } => {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&npages.to_le_bytes());
            out.extend_from_slice(bitmap);
        }
        Message::PageRequest { gpa, npages } => {
            out.extend_from_slice(&gpa.to_le_bytes());
            out.extend_from_slice(&npages.to_le_bytes());
        }
        Message::PushDone { pages } => out.extend_from_slice(&pages.to_le_bytes()),
    }
}

mod erased {
    /// Serialises any of the JSON messages without generics in `encode`.
    pub trait Ser {
        fn write(&self, out: &mut Vec<u8>);
    }
    impl<T: serde::Serialize> Ser for T {
        fn write(&self, out: &mut Vec<u8>) {
            let _ = serde_json::to_writer(out, self);
        }
    }
}

/// Keys of the frames in one direction.
#[derive(Clone)]
pub struct FrameKey {
    key: [u8; 32],
}

impl FrameKey {
    /// The public key of the hello and accept frames, before the
    /// destination's nonce is known: it detects corruption, not forgery
    /// (the transport's TLS does that).
    pub fn handshake() -> FrameKey {
        FrameKey { key: blake3::derive_key("ferry migration v1 handshake frames", b"") }
    }

    /// The key of every frame after `Accept`: bound to this migration id,
    /// the destination's fresh nonce and the VM id, so that a recorded
    /// stream replayed later, or a stream spliced from another migration,
    /// fails its first tag check.
    pub fn session(migration_id: &str, nonce: &str, vm_id: &str) -> FrameKey {
        let mut m = Vec::new();
        for part in [migration_id, nonce, vm_id] {
            m.extend_from_slice(&(part.len() as u64).to_le_bytes());
            m.extend_from_slice(part.as_bytes());
        }
        FrameKey { key: blake3::derive_key("ferry migration v1 session frames", &m) }
    }

    fn tag(&self, seq: u64, header: &[u8; HEADER_LEN], payload: &[u8]) -> [u8; TAG_LEN] {
        let mut h = blake3::Hasher::new_keyed(&self.key);
        h.update(&seq.to_le_bytes());
        h.update(header);
        h.update(payload);
        *h.finalize().as_bytes()
    }
}

fn header(kind: Kind, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&(kind as u16).to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

/// Writes frames in one direction, numbering them.
pub struct FrameWriter<W: Write> {
    out: W,
    key: FrameKey,
    seq: u64,
    /// Bytes written, headers and tags included.
    pub bytes: u64,
}

impl<W: Write> FrameWriter<W> {
    /// Starts a direction with the handshake key.
    pub fn new(out: W) -> Self {
        FrameWriter { out, key: FrameKey::handshake(), seq: 0, bytes: 0 }
    }

    /// Switches to the session key (after `Accept`).
    pub fn rekey(&mut self, key: FrameKey) {
        self.key = key;
    }

    /// Writes a frame with an already-encoded payload.
    pub fn write_raw(&mut self, kind: Kind, payload: &[u8]) -> std::io::Result<()> {
        assert!(payload.len() <= MAX_PAYLOAD, "payload of {} bytes exceeds MAX_PAYLOAD", payload.len());
        let h = header(kind, payload.len());
        let tag = self.key.tag(self.seq, &h, payload);
        self.out.write_all(&h)?;
        self.out.write_all(payload)?;
        self.out.write_all(&tag)?;
        self.seq += 1;
        self.bytes += (HEADER_LEN + payload.len() + TAG_LEN) as u64;
        Ok(())
    }

    /// Encodes and writes a message.
    pub fn send(&mut self, msg: &Message) -> std::io::Result<()> {
        let mut p = Vec::new();
        encode(msg, &mut p);
        self.write_raw(msg.kind(), &p)
    }

    /// Flushes the underlying stream.
    pub fn flush(&mut self) -> std::io::Result<()> {
        self.out.flush()
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut W {
        &mut self.out
    }
}

/// Reads frames in one direction, checking each before use.
pub struct FrameReader<R: Read> {
    inp: R,
    key: FrameKey,
    seq: u64,
    buf: Vec<u8>,
    /// Bytes read, headers and tags included.
    pub bytes: u64,
}

impl<R: Read> FrameReader<R> {
    /// Starts a direction with the handshake key.
    pub fn new(inp: R) -> Self {
        FrameReader { inp, key: FrameKey::handshake(), seq: 0, buf: Vec::new(), bytes: 0 }
    }

    /// Switches to the session key (after `Accept`).
    pub fn rekey(&mut self, key: FrameKey) {
        self.key = key;
    }

    fn fill(&mut self, n: usize, at_start: bool) -> Result<(), WireError> {
        self.buf.resize(n, 0);
        let mut got = 0;
        while got < n {
            match self.inp.read(&mut self.buf[got..n]) {
                Ok(0) if got == 0 && at_start => return Err(WireError::Closed("between frames")),
                Ok(0) => return Err(WireError::Closed("in the middle of a frame")),
                Ok(k) => got += k,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(WireError::Io(e)),
            }
        }
        Ok(())
    }

    /// Reads, authenticates and decodes the next frame.
    pub fn recv(&mut self) -> Result<Message, WireError> {
        let seq = self.seq;
        self.fill(HEADER_LEN, true)?;
        let h: [u8; HEADER_LEN] = self.buf[..HEADER_LEN].try_into().expect("header");
        let bad = |what: String| WireError::BadFrame { seq, what };
        if h[0..4] != MAGIC {
            return Err(bad(format!("bad magic {:02x?} (not a ferry migration stream, or corrupted)", &h[0..4])));
        }
        let kind_v = u16::from_le_bytes([h[4], h[5]]);
        let kind = Kind::from_u16(kind_v).ok_or_else(|| bad(format!("unknown frame kind {kind_v}")))?;
        if h[6..8] != [0, 0] || h[12..16] != [0, 0, 0, 0] {
            return Err(bad("reserved header bytes are not zero".into()));
        }
        let len = u32::from_le_bytes(h[8..12].try_into().expect("4 bytes")) as usize;
        if len > MAX_PAYLOAD {
            return Err(bad(format!("payload length {len} exceeds the limit {MAX_PAYLOAD}")));
        }
        self.fill(len + TAG_LEN, false)?;
        let (payload, tag) = self.buf.split_at(len);
        if self.key.tag(seq, &h, payload)[..] != tag[..] {
            return Err(WireError::BadTag { seq, kind, len });
        }
        self.seq += 1;
        self.bytes += (HEADER_LEN + len + TAG_LEN) as u64;
        Message::decode(seq, kind, payload)
    }

    /// The underlying stream.
    pub fn get_mut(&mut self) -> &mut R {
        &mut self.inp
    }
}

/// Checks that `[gpa, gpa + len)` lies inside one of `ranges` (start, length);
/// returns the offset into the range and its index. A peer's address is
/// used only after this (QEMU once had code execution through an unchecked
/// RAM offset in a migration stream).
pub fn check_ram_range(ranges: &[(u64, u64)], gpa: u64, len: u64) -> Option<(usize, u64)> {
    let end = gpa.checked_add(len)?;
    ranges.iter().enumerate().find_map(|(i, &(s, l))| (gpa >= s && end <= s.saturating_add(l)).then(|| (i, gpa - s)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn roundtrip(msgs: &[Message]) -> Vec<u8> {
        let mut w = FrameWriter::new(Vec::new());
        for m in msgs {
            w.send(m).unwrap();
        }
        w.out
    }

    fn sample() -> Vec<Message> {
        let mut data = vec![0u8; 8192];
        data[5] = 7;
        data[4097] = 9;
        vec![
            Message::Accept(Accept { protocol_version: 1, capabilities: vec!["digest".into()], nonce: "ab".into() }),
            Message::Pages { gpa: 0x1000, data },
            Message::Zero { gpa: 0x3000, npages: 5 },
            Message::RoundEnd { round: 1, pages: 7 },
            Message::State(b"{}".to_vec()),
            Message::Ready(Ready { memory_digest: Some("00".into()) }),
            Message::Go,
            Message::Running,
            Message::Abort(Reason { reason: "x".into() }),
            Message::Needed { gpa: 0x10_0000, npages: 12, bitmap: vec![0b1010_0001, 0b1000] },
            Message::PageRequest { gpa: 0x2000, npages: 16 },
            Message::Join(Join { migration_id: "ab".into(), vm_id: "vm".into(), stream: 1 }),
            Message::PushDone { pages: 9 },
            Message::Complete(PostcopyFigures { faults: 3, ..Default::default() }),
            Message::Resume(Resume { migration_id: "ab".into(), vm_id: "vm".into() }),
            Message::MemoryMapped,
            Message::Settle(Settle { migration_id: "ab".into(), vm_id: "vm".into() }),
        ]
    }

    #[test]
    fn frames_round_trip() {
        let msgs = sample();
        let bytes = roundtrip(&msgs);
        let mut r = FrameReader::new(&bytes[..]);
        for m in &msgs {
            assert_eq!(&r.recv().unwrap(), m);
        }
        assert!(matches!(r.recv(), Err(WireError::Closed("between frames"))));
    }

    #[test]
    fn lz4_pages_round_trip_and_fall_back_to_raw() {
        let mut p = Vec::new();
        let zeroish = vec![1u8; 4096 * 3];
        encode_pages(0x5000, &zeroish, WireCodec::Lz4, &mut p);
        assert_eq!(p[12], 1);
        assert!(p.len() < 1000);
        assert_eq!(Message::decode(0, Kind::Pages, &p).unwrap(), Message::Pages { gpa: 0x5000, data: zeroish });
        let noise: Vec<u8> = (0..4096u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        encode_pages(0, &noise, WireCodec::Lz4, &mut p);
        assert_eq!(Message::decode(0, Kind::Pages, &p).unwrap(), Message::Pages { gpa: 0, data: noise });
    }

    #[test]
    fn zstd_pages_round_trip_and_fall_back_to_raw() {
        let mut p = Vec::new();
        let mut word = vec![0u8; 4096 * 256];
        for (i, page) in word.chunks_mut(4096).enumerate() {
            page[..8].copy_from_slice(&(i as u64 * 0x1234_5678_9abc).to_le_bytes());
        }
        encode_pages(0x10_0000, &word, WireCodec::Zstd, &mut p);
        assert_eq!(p[12], CODEC_ZSTD);
        assert!(p.len() < word.len() / 50, "{} bytes", p.len());
        assert_eq!(Message::decode(0, Kind::Pages, &p).unwrap(), Message::Pages { gpa: 0x10_0000, data: word });
        let noise: Vec<u8> = (0..8192u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
        encode_pages(0, &noise, WireCodec::Zstd, &mut p);
        assert_eq!(Message::decode(0, Kind::Pages, &p).unwrap(), Message::Pages { gpa: 0, data: noise });
    }

    /// Not a check: prints what each codec costs per 1 MiB run on the test
    /// guest's two fills (`cargo test --release -p ferry-migrate --lib
    /// codec_speed -- --ignored --nocapture`; figures in docs/benchmarks.md).
    #[test]
    #[ignore]
    fn codec_speed() {
        let mut word = vec![0u8; 1 << 20];
        for (i, page) in word.chunks_mut(4096).enumerate() {
            page[..8].copy_from_slice(&((i as u64) << 20 | 7).to_le_bytes());
        }
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let random: Vec<u8> = (0..1 << 20)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        for (fill, data) in [("word", &word), ("random", &random)] {
            for level in [3, 1, -1, -3, -5] {
                let mut c = zstd::bulk::Compressor::new(level).unwrap();
                let mut out = vec![0u8; 2 << 20];
                let t = std::time::Instant::now();
                let mut len = 0;
                for _ in 0..256 {
                    len = c.compress_to_buffer(&data[..], &mut out[..]).unwrap();
                }
                let gbs = 256.0 * 1048576.0 / t.elapsed().as_secs_f64() / 1e9;
                eprintln!("{fill:>6} zstd level {level:>2}: {len} bytes per MiB, encode {gbs:.2} GB/s");
            }
            for codec in [WireCodec::Lz4, WireCodec::Zstd, WireCodec::None] {
                let mut p = Vec::new();
                let n = 512;
                let t = std::time::Instant::now();
                for _ in 0..n {
                    encode_pages(0, data, codec, &mut p);
                }
                let enc = t.elapsed().as_secs_f64();
                let t = std::time::Instant::now();
                for _ in 0..n {
                    let _ = Message::decode(0, Kind::Pages, &p).unwrap();
                }
                let dec = t.elapsed().as_secs_f64();
                eprintln!(
                    "{fill:>6} {codec:?}: {} bytes per MiB, encode {:.2} GB/s, decode {:.2} GB/s",
                    p.len(),
                    n as f64 * 1048576.0 / enc / 1e9,
                    n as f64 * 1048576.0 / dec / 1e9
                );
            }
        }
    }

    /// A zstd run header with `npages` around a zstd frame of `raw`.
    fn zstd_run(npages: u32, raw: &[u8]) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&0u64.to_le_bytes());
        p.extend_from_slice(&npages.to_le_bytes());
        p.extend_from_slice(&[CODEC_ZSTD, 0, 0, 0]);
        p.extend_from_slice(&zstd::bulk::compress(raw, 1).unwrap());
        p
    }

    #[test]
    fn a_zstd_run_must_decode_to_exactly_its_page_count() {
        // Exactly right.
        assert!(Message::decode(0, Kind::Pages, &zstd_run(2, &[7u8; 8192])).is_ok());
        // More than declared: refused without writing past 1 page (a zip bomb
        // of 64 MiB of zeros is a few kB of zstd).
        for raw in [vec![7u8; 8192], vec![0u8; 64 << 20]] {
            let e = Message::decode(0, Kind::Pages, &zstd_run(1, &raw)).unwrap_err().to_string();
            assert!(e.contains("zstd"), "{e}");
        }
        // Fewer than declared, or nothing at all.
        let e = Message::decode(0, Kind::Pages, &zstd_run(3, &[7u8; 8192])).unwrap_err().to_string();
        assert!(e.contains("decodes to 8192 bytes, not 12288"), "{e}");
        assert!(Message::decode(0, Kind::Pages, &zstd_run(1, &[])).is_err());
        // Two concatenated frames that together exceed the run.
        let mut two = zstd_run(1, &[1u8; 4096]);
        two.extend_from_slice(&zstd::bulk::compress(&[2u8; 4096], 1).unwrap());
        assert!(Message::decode(0, Kind::Pages, &two).is_err());
        // A frame that needs a window larger than a run is refused.
        let big: Vec<u8> = (0..(4u32 << 20)).map(|i| (i.wrapping_mul(2654435761) >> 7) as u8).collect();
        let mut c = zstd::bulk::Compressor::new(1).unwrap();
        c.set_parameter(zstd::zstd_safe::CParameter::WindowLog(23)).unwrap();
        let mut p = zstd_run(1, &[]);
        p.truncate(16);
        p.extend_from_slice(&c.compress(&big).unwrap());
        assert!(Message::decode(0, Kind::Pages, &p).is_err());
    }

    #[test]
    fn a_session_key_refuses_replayed_and_reordered_frames() {
        let k1 = FrameKey::session("m1", "n1", "vm");
        let mut w = FrameWriter::new(Vec::new());
        w.rekey(k1.clone());
        w.send(&Message::Go).unwrap();
        w.send(&Message::Running).unwrap();
        let bytes = w.out;
        // Another migration's key (same id, another nonce) refuses the stream.
        let mut r = FrameReader::new(&bytes[..]);
        r.rekey(FrameKey::session("m1", "n2", "vm"));
        assert!(matches!(r.recv(), Err(WireError::BadTag { seq: 0, .. })));
        // Swapping two frames (same length) breaks the sequence binding.
        let half = bytes.len() / 2;
        let swapped = [&bytes[half..], &bytes[..half]].concat();
        let mut r = FrameReader::new(&swapped[..]);
        r.rekey(k1);
        assert!(matches!(r.recv(), Err(WireError::BadTag { .. })));
    }

    #[test]
    fn every_flipped_bit_is_refused() {
        let bytes = roundtrip(&sample()[..3]);
        for bit in 0..bytes.len() * 8 {
            let mut b = bytes.clone();
            b[bit / 8] ^= 1 << (bit % 8);
            let mut r = FrameReader::new(&b[..]);
            let ok = (0..3).all(|_| r.recv().is_ok());
            assert!(!ok, "flip of bit {bit} went unnoticed");
        }
    }

    #[test]
    fn ram_ranges_are_checked() {
        let ranges = [(0, 0x10000), (0x100000, 0x1000)];
        assert_eq!(check_ram_range(&ranges, 0x1000, 0x1000), Some((0, 0x1000)));
        assert_eq!(check_ram_range(&ranges, 0x100000, 0x1000), Some((1, 0)));
        assert_eq!(check_ram_range(&ranges, 0xf000, 0x2000), None);
        assert_eq!(check_ram_range(&ranges, u64::MAX - 10, 0x1000), None);
        assert_eq!(check_ram_range(&ranges, 0x20000, 0x1000), None);
    }

    /// A small deterministic fuzzer that runs in the suite: random and
    /// mutated frames must decode or fail with an error, never panic or
    /// allocate beyond the limits.
    #[test]
    fn fuzz_the_decoder() {
        let mut msgs = sample();
        let mut word = vec![0u8; 4096 * 4];
        word[8] = 1;
        word[4096 * 3 + 100] = 2;
        // Seed frames: the sample, plus zstd and lz4 page frames.
        let mut runs = Vec::new();
        for codec in [WireCodec::Zstd, WireCodec::Lz4, WireCodec::None] {
            let mut p = Vec::new();
            encode_pages(0x2000, &word, codec, &mut p);
            runs.push(p);
        }
        let seed_frames = {
            let mut w = FrameWriter::new(Vec::new());
            for m in msgs.drain(..) {
                w.send(&m).unwrap();
            }
            for r in &runs {
                w.write_raw(Kind::Pages, r).unwrap();
            }
            w.out
        };
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..20_000 {
            let mut b = seed_frames.clone();
            match i % 4 {
                0 => {
                    let n = (next() % 8) as usize + 1;
                    for _ in 0..n {
                        let at = (next() as usize) % b.len();
                        b[at] = next() as u8;
                    }
                }
                1 => b.truncate((next() as usize) % b.len()),
                2 => {
                    let len = (next() % 200) as usize;
                    b = (0..len).map(|_| next() as u8).collect();
                    if len >= 4 {
                        b[..4].copy_from_slice(&MAGIC);
                    }
                }
                _ => {
                    // A valid header claiming a huge or odd length.
                    let at = (next() as usize) % b.len().saturating_sub(12).max(1);
                    b[at..at + 4].copy_from_slice(&(next() as u32).to_le_bytes());
                }
            }
            let mut r = FrameReader::new(&b[..]);
            for _ in 0..16 {
                if r.recv().is_err() {
                    break;
                }
            }
            // Page runs of every codec, mutated below the tag (the tag
            // would catch these on the wire; the decoder must not rely on it).
            let mut run = runs[i % runs.len()].clone();
            let n = (next() % 4) as usize + 1;
            for _ in 0..n {
                let at = (next() as usize) % run.len();
                run[at] = next() as u8;
            }
            if i % 7 == 0 {
                run.truncate(16 + (next() as usize) % (run.len() - 15));
            }
            if let Ok(Message::Pages { data, .. }) = Message::decode(0, Kind::Pages, &run) {
                let npages = u32::from_le_bytes(run[8..12].try_into().unwrap()) as usize;
                assert_eq!(data.len(), npages * PAGE as usize, "a run decodes to exactly its page count");
            }
            // Payload decoders directly, without tags, on random bytes.
            let len = (next() % 64) as usize;
            let p: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            for k in 1..=18u16 {
                let _ = Message::decode(0, Kind::from_u16(k).unwrap(), &p);
            }
        }
    }
}
