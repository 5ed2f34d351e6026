//! `ImageReader`: opens, checks and reads one image file.
//!
//! `open` checks the structure that everything else relies on (preamble,
//! header hash, trailer, footer hash, root hash, and with a key the data-key
//! unwrap and the keyed root tag). Every chunk and section is then checked
//! against the footer's hash as it is read, so no read returns unverified bytes.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::sync_channel;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use crate::codec::{decompress, plausible, CodecId};
use crate::crypto::{DataKey, NonceKind, UnwrapError, UserKey, TAG_LEN};
use crate::error::{Error, Result};
use crate::export::{CpuRegs, MemorySource};
use crate::footer::{ChunkEntry, Footer, SectionLoc, Trailer, TRAILER_LEN};
use crate::hash::{Hash32, RootHasher};
use crate::header::{decode_header, decode_preamble, ImageHeader, RamRange, PAGE_SIZE, PREAMBLE_LEN};
use crate::pagemap::{fill, PageMap};
use crate::pipeline::BufPool;
use crate::record::{
    decode_runs, parse_chunk_prefix, parse_section_prefix, RunKind, CHUNK_PREFIX_LEN, CPUS_MAGIC, HASH_LEN, RUN_LEN,
    SECTION_PREFIX_LEN, STATE_MAGIC,
};

const PAGE: usize = PAGE_SIZE as usize;
/// Upper bound on a decompressed state or CPU section.
pub const MAX_SECTION_RAW: u64 = 1 << 30;
/// Zero bytes handed to visitors for zero runs.
static ZEROS: [u8; 64 << 10] = [0; 64 << 10];

/// A run's contents as delivered by [`ImageReader::read_runs`].
#[derive(Debug)]
pub enum RunData<'a> {
    /// The run's page bytes.
    Data(&'a [u8]),
    /// The run's pages are zero.
    Zero {
        /// Number of pages.
        npages: u64,
    },
}

/// What [`ImageReader::verify`] checked.
#[derive(Clone, Debug, Serialize)]
pub struct VerifyReport {
    /// The image.
    pub path: PathBuf,
    /// Root hash recomputed from the contents (equals the recorded one).
    pub root_hash: Hash32,
    /// Chunks whose hash was checked.
    pub chunks: u64,
    /// Data pages in those chunks.
    pub data_pages: u64,
    /// Zero pages recorded as zero runs.
    pub zero_pages: u64,
    /// Whether chunks and sections were also decrypted and decompressed (needs the key for
    /// encrypted images; always true for plain ones).
    pub decoded: bool,
    /// Whether the keyed root tag was checked (encrypted image opened with its key).
    pub authenticated: bool,
    /// Bytes read from the file.
    pub bytes_read: u64,
    /// Wall time.
    pub elapsed_secs: f64,
}

/// Reads, checks and decodes chunk and section records of one image.
pub(crate) struct ChunkDecoder {
    path: PathBuf,
    file: File,
    header_hash: Hash32,
    chunk_size: u32,
    encrypted: bool,
    key: Option<Arc<DataKey>>,
    pub(crate) chunks: Arc<Vec<ChunkEntry>>,
    rec: Vec<u8>,
    out: Vec<u8>,
    /// Decoded data lives in `rec[range]` (stored raw) or in `out`.
    in_rec: Option<std::ops::Range<usize>>,
    cached: Option<u32>,
    pub(crate) bytes_read: u64,
}

impl ChunkDecoder {
    /// A `ChunkCorrupt` error for chunk `i`.
    pub(crate) fn corrupt(&self, i: u32, reason: impl Into<String>) -> Error {
        Error::ChunkCorrupt {
            path: self.path.clone(),
            index: u64::from(i),
            offset: self.chunks.get(i as usize).map(|c| c.offset).unwrap_or(0),
            reason: reason.into(),
        }
    }

    /// Reads `len` bytes at `offset` into `buf` (the caller has checked the range against the file).
    fn read_at(file: &File, path: &Path, offset: u64, len: usize, buf: &mut Vec<u8>) -> Result<()> {
        // Every byte is overwritten by the read: only grow (zeroing a reused buffer per
        // chunk showed as a tenth of the time of random reads through a mount).
        buf.resize(len, 0);
        file.read_exact_at(buf, offset).map_err(|e| Error::io("read", path, e))
    }

    /// Reads chunk `i`'s record and checks hash, prefix and runs against the footer.
    fn read_checked(&mut self, i: u32) -> Result<crate::record::ChunkPrefix> {
        self.cached = None;
        let e =
            self.chunks.get(i as usize).ok_or_else(|| Error::InvalidArgument(format!("chunk {i} does not exist")))?;
        let (offset, len, want) = (e.offset, e.record_len as usize, e.hash);
        Self::read_at(&self.file, &self.path, offset, len, &mut self.rec)?;
        self.bytes_read += len as u64;
        let body = &self.rec[..len - HASH_LEN];
        let computed: Hash32 = blake3::hash(body).into();
        if computed != want || self.rec[len - HASH_LEN..] != want.0 {
            return Err(Error::ChunkHashMismatch {
                path: self.path.clone(),
                index: u64::from(i),
                offset,
                len: len as u64,
            });
        }
        let p = parse_chunk_prefix(&self.rec).map_err(|r| self.corrupt(i, r))?;
        let runs_end = CHUNK_PREFIX_LEN as u64 + u64::from(p.nruns) * RUN_LEN as u64;
        if p.index != i {
            return Err(self.corrupt(i, format!("record says it is chunk {}", p.index)));
        }
        if runs_end + u64::from(p.stored_len) + HASH_LEN as u64 != len as u64 {
            return Err(self.corrupt(
                i,
                format!(
                    "prefix declares {} runs and {} payload bytes, which do not add up to the record length {len}",
                    p.nruns, p.stored_len
                ),
            ));
        }
        let runs = decode_runs(&self.rec[CHUNK_PREFIX_LEN..runs_end as usize]).map_err(|r| self.corrupt(i, r))?;
        let entry = &self.chunks[i as usize];
        if runs != entry.runs {
            return Err(self.corrupt(i, "runs in the record differ from the footer index"));
        }
        if u64::from(p.raw_len) != u64::from(entry.data_pages) * PAGE_SIZE || p.raw_len > self.chunk_size {
            return Err(
                self.corrupt(i, format!("raw length {} does not match {} data pages", p.raw_len, entry.data_pages))
            );
        }
        if p.encrypted != self.encrypted {
            return Err(self.corrupt(i, "encryption flag disagrees with the header"));
        }
        let ct_len = u64::from(p.stored_len) - if p.encrypted { TAG_LEN as u64 } else { 0 };
        if u64::from(p.stored_len) < if p.encrypted { TAG_LEN as u64 } else { 0 }
            || !plausible(p.codec, ct_len, u64::from(p.raw_len))
        {
            return Err(self.corrupt(i, "stored and raw lengths are inconsistent with the codec"));
        }
        Ok(p)
    }

    /// Reads, checks, decrypts and decompresses chunk `i`; returns its data pages.
    pub(crate) fn load(&mut self, i: u32) -> Result<&[u8]> {
        if self.cached != Some(i) {
            let p = self.read_checked(i)?;
            let runs_end = CHUNK_PREFIX_LEN + p.nruns as usize * RUN_LEN;
            let len = self.rec.len();
            let mut payload = runs_end..len - HASH_LEN;
            if p.encrypted {
                let key = self
                    .key
                    .as_ref()
                    .ok_or_else(|| Error::KeyRequired { path: self.path.clone(), what: "memory chunks" })?;
                let (head, rest) = self.rec.split_at_mut(runs_end);
                let ct = &mut rest[..payload.len()];
                let n =
                    key.open(NonceKind::Chunk, u64::from(i), &[&self.header_hash.0, head], ct).ok_or_else(|| {
                        Error::DecryptFailed {
                            path: self.path.clone(),
                            what: "chunk",
                            index: u64::from(i),
                            offset: self.chunks[i as usize].offset,
                        }
                    })?;
                payload = runs_end..runs_end + n;
            }
            if p.codec == CodecId::None {
                if payload.len() != p.raw_len as usize {
                    return Err(self.corrupt(i, "stored size differs from raw size"));
                }
                self.in_rec = Some(payload);
            } else {
                self.in_rec = None;
                decompress(p.codec, &self.rec[payload], p.raw_len as usize, &mut self.out)
                    .map_err(|r| self.corrupt(i, format!("decompression failed: {r}")))?;
            }
            self.cached = Some(i);
        }
        Ok(match &self.in_rec {
            Some(r) => &self.rec[r.clone()],
            None => &self.out,
        })
    }

    /// A second decoder on the same file for a worker thread (own file handle and buffers).
    fn try_clone(&self) -> Result<Self> {
        Ok(ChunkDecoder {
            path: self.path.clone(),
            file: self.file.try_clone().map_err(|e| Error::io("duplicate file handle of", &self.path, e))?,
            header_hash: self.header_hash,
            chunk_size: self.chunk_size,
            encrypted: self.encrypted,
            key: self.key.clone(),
            chunks: Arc::clone(&self.chunks),
            rec: Vec::new(),
            out: Vec::new(),
            in_rec: None,
            cached: None,
            bytes_read: 0,
        })
    }

    /// Moves the decoded data of the last `load` out (buffer and the range holding the data),
    /// replacing the decoder's buffer with `fresh`.
    fn take_decoded(&mut self, fresh: Vec<u8>) -> (Vec<u8>, std::ops::Range<usize>) {
        self.cached = None;
        match self.in_rec.take() {
            Some(r) => (std::mem::replace(&mut self.rec, fresh), r),
            None => {
                let n = self.out.len();
                (std::mem::replace(&mut self.out, fresh), 0..n)
            }
        }
    }

    /// Reads and checks a section; decodes it when `decode` (needs the key if encrypted).
    fn section(
        &mut self,
        loc: SectionLoc,
        magic: [u8; 4],
        name: &'static str,
        decode: bool,
    ) -> Result<Option<Vec<u8>>> {
        let corrupt = |reason: String| Error::SectionCorrupt {
            path: self.path.clone(),
            section: name,
            offset: loc.offset,
            reason,
        };
        let mut rec = Vec::new();
        Self::read_at(&self.file, &self.path, loc.offset, loc.len as usize, &mut rec)?;
        self.bytes_read += loc.len;
        let n = rec.len();
        let computed: Hash32 = blake3::hash(&rec[..n - HASH_LEN]).into();
        if computed != loc.hash || rec[n - HASH_LEN..] != loc.hash.0 {
            return Err(Error::SectionHashMismatch { path: self.path.clone(), section: name, offset: loc.offset });
        }
        let p = parse_section_prefix(&rec, magic).map_err(corrupt)?;
        if SECTION_PREFIX_LEN as u64 + p.stored_len + HASH_LEN as u64 != n as u64 {
            return Err(corrupt(format!("declares {} payload bytes, record is {n}", p.stored_len)));
        }
        if p.encrypted != self.encrypted {
            return Err(corrupt("encryption flag disagrees with the header".into()));
        }
        let tag = if p.encrypted { TAG_LEN as u64 } else { 0 };
        if p.raw_len > MAX_SECTION_RAW || p.stored_len < tag || !plausible(p.codec, p.stored_len - tag, p.raw_len) {
            return Err(corrupt(format!("implausible raw length {}", p.raw_len)));
        }
        if !decode {
            return Ok(None);
        }
        let (head, rest) = rec.split_at_mut(SECTION_PREFIX_LEN);
        let mut payload = &mut rest[..p.stored_len as usize];
        if p.encrypted {
            let key = self.key.as_ref().ok_or_else(|| Error::KeyRequired { path: self.path.clone(), what: name })?;
            let kind = if magic == STATE_MAGIC { NonceKind::State } else { NonceKind::Cpus };
            let m = key.open(kind, 0, &[&self.header_hash.0, head], payload).ok_or_else(|| Error::DecryptFailed {
                path: self.path.clone(),
                what: if magic == STATE_MAGIC { "state section" } else { "cpus section" },
                index: 0,
                offset: loc.offset,
            })?;
            payload = &mut payload[..m];
        }
        let mut out = Vec::new();
        decompress(p.codec, payload, p.raw_len as usize, &mut out).map_err(corrupt)?;
        Ok(Some(out))
    }
}

/// An open image: header, index and verified access to its contents.
pub struct ImageReader {
    path: PathBuf,
    header: ImageHeader,
    footer_root: Hash32,
    state: SectionLoc,
    cpus: SectionLoc,
    authenticated: bool,
    pub(crate) dec: ChunkDecoder,
    map: Option<PageMap>,
}

impl ImageReader {
    /// Opens and checks an image. `key` is needed to read the contents of an
    /// encrypted image; without it only the header (and hash checks) are available.
    pub fn open(path: &Path, key: Option<&UserKey>) -> Result<Self> {
        let file = File::open(path).map_err(|e| Error::io("open image", path, e))?;
        Self::from_file(path, file, key)
    }

    /// Like `open`, on an already opened file (used by chains to tell a missing parent apart).
    pub(crate) fn from_file(path: &Path, file: File, key: Option<&UserKey>) -> Result<Self> {
        let p = path.to_path_buf();
        let size = file.metadata().map_err(|e| Error::io("stat image", path, e))?.len();
        let truncated = |what, needed| Error::Truncated { path: p.clone(), what, needed, size };
        if size < PREAMBLE_LEN as u64 {
            return Err(truncated("preamble", PREAMBLE_LEN as u64));
        }
        let mut pre = [0u8; PREAMBLE_LEN];
        file.read_exact_at(&mut pre, 0).map_err(|e| Error::io("read", path, e))?;
        let preamble = decode_preamble(path, &pre, size)?;
        let data_start = PREAMBLE_LEN as u64 + preamble.json_len;
        let mut json = vec![0u8; preamble.json_len as usize];
        file.read_exact_at(&mut json, PREAMBLE_LEN as u64).map_err(|e| Error::io("read", path, e))?;
        let header = decode_header(path, &pre, &preamble, &json)?;
        if size < data_start + TRAILER_LEN as u64 {
            return Err(truncated("trailer", data_start + TRAILER_LEN as u64));
        }
        let toff = size - TRAILER_LEN as u64;
        let mut tb = [0u8; TRAILER_LEN];
        file.read_exact_at(&mut tb, toff).map_err(|e| Error::io("read", path, e))?;
        if &tb[0..8] != crate::footer::TRAILER_MAGIC {
            return Err(Error::MissingTrailer { path: p, size });
        }
        let trailer = Trailer::decode(path, &tb, toff, data_start, size).map_err(|e| name_misplaced(&file, e))?;
        let mut fb = vec![0u8; trailer.footer_len as usize];
        file.read_exact_at(&mut fb, trailer.footer_offset).map_err(|e| Error::io("read", path, e))?;
        if Hash32::of(&fb) != trailer.footer_hash {
            // A footer that decodes, belongs to this header, whose root hash checks out and
            // whose every entry agrees with the record it points to (prefix, runs, trailing
            // hash) is intact: then the hash stored in the trailer is what was corrupted.
            // (Not attempted for encrypted images: their root tag is only checkable with the key.)
            let consistent = header.encryption.is_none()
                && Footer::decode(path, &fb, trailer.footer_offset, data_start).is_ok_and(|f| {
                    f.header_hash == preamble.hash
                        && f.root_tag == Hash32::default()
                        && compute_root(&f) == f.root
                        && footer_matches_records(&file, &f)
                });
            if consistent {
                return Err(Error::TrailerFooterHashMismatch {
                    path: p,
                    trailer_offset: toff,
                    footer_offset: trailer.footer_offset,
                });
            }
            return Err(Error::FooterHashMismatch { path: p, offset: trailer.footer_offset, len: trailer.footer_len });
        }
        let footer = Footer::decode(path, &fb, trailer.footer_offset, data_start)?;
        if footer.header_hash != preamble.hash {
            return Err(Error::FooterCorrupt {
                path: p,
                offset: trailer.footer_offset + 48,
                reason: "the footer belongs to a different header".into(),
            });
        }
        if header.encryption.is_none() && footer.root_tag != Hash32::default() {
            return Err(Error::FooterCorrupt {
                path: p,
                offset: trailer.footer_offset + 176,
                reason: "root tag is set but the image is not encrypted".into(),
            });
        }
        let layout = crate::layout::Layout::new(&header.ranges);
        for (i, c) in footer.chunks.iter().enumerate() {
            if u64::from(c.data_pages) * PAGE_SIZE > u64::from(header.chunk_size) {
                return Err(Error::ChunkCorrupt {
                    path: p,
                    index: i as u64,
                    offset: c.offset,
                    reason: format!("index claims {} data pages, more than a chunk holds", c.data_pages),
                });
            }
            if let Some(r) = c.runs.iter().find(|r| layout.segments(r.gpa, u64::from(r.npages)).is_err()) {
                return Err(Error::ChunkCorrupt {
                    path: p,
                    index: i as u64,
                    offset: c.offset,
                    reason: format!("run {:#x}..{:#x} lies outside the RAM ranges", r.gpa, r.end()),
                });
            }
        }
        let computed = compute_root(&footer);
        if computed != footer.root {
            return Err(Error::RootHashMismatch { path: p, recorded: footer.root, computed });
        }
        let mut authenticated = false;
        let dk = match (&header.encryption, key) {
            (Some(params), Some(k)) => {
                let dk = DataKey::unwrap(params, k).map_err(|e| match e {
                    UnwrapError::WrongKey => Error::WrongKey { path: p.clone() },
                    UnwrapError::BadParams(reason) => {
                        Error::InvalidHeader { path: p.clone(), field: "encryption", reason }
                    }
                })?;
                if dk.root_tag(&footer.root) != footer.root_tag {
                    return Err(Error::RootTagMismatch { path: p });
                }
                authenticated = true;
                Some(Arc::new(dk))
            }
            _ => None,
        };
        Ok(ImageReader {
            dec: ChunkDecoder {
                path: p.clone(),
                file,
                header_hash: preamble.hash,
                chunk_size: header.chunk_size,
                encrypted: header.encryption.is_some(),
                key: dk,
                chunks: Arc::new(footer.chunks),
                rec: Vec::new(),
                out: Vec::new(),
                in_rec: None,
                cached: None,
                bytes_read: 0,
            },
            path: p,
            footer_root: footer.root,
            state: footer.state,
            cpus: footer.cpus,
            authenticated,
            header,
            map: None,
        })
    }

    /// The image file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The public header (readable without the key).
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// Guest RAM ranges.
    pub fn ranges(&self) -> &[RamRange] {
        &self.header.ranges
    }

    /// Root hash naming this image (checked against the contents' hashes at open).
    pub fn root_hash(&self) -> Hash32 {
        self.footer_root
    }

    /// Number of chunk records.
    pub fn chunk_count(&self) -> u64 {
        self.dec.chunks.len() as u64
    }

    /// The page runs this image records (data and zero), chunk by chunk in file order,
    /// from the footer index: which pages an incremental image overrides, without reading them.
    pub fn runs(&self) -> impl Iterator<Item = &crate::record::PageRun> + '_ {
        self.dec.chunks.iter().flat_map(|c| c.runs.iter())
    }

    /// Whether the image is encrypted.
    pub fn is_encrypted(&self) -> bool {
        self.header.encryption.is_some()
    }

    /// The caller's serialised VM state.
    pub fn state(&mut self) -> Result<Vec<u8>> {
        let loc = self.state;
        Ok(self.dec.section(loc, STATE_MAGIC, "state", true)?.unwrap_or_default())
    }

    /// The vCPU registers recorded at `finish`.
    pub fn cpus(&mut self) -> Result<Vec<CpuRegs>> {
        let loc = self.cpus;
        let json = self.dec.section(loc, CPUS_MAGIC, "cpus", true)?.unwrap_or_default();
        serde_json::from_slice(&json).map_err(|e| Error::SectionCorrupt {
            path: self.path.clone(),
            section: "cpus",
            offset: loc.offset,
            reason: format!("JSON: {e}"),
        })
    }

    /// Replays the memory records in file order: data runs as their bytes, zero
    /// runs as counts. Apply them in order to zero-filled memory (for an
    /// incremental image: to the parent's memory) to get the guest's memory.
    pub fn read_runs(&mut self, mut visit: impl FnMut(u64, RunData<'_>) -> Result<()>) -> Result<()> {
        let n = self.dec.chunks.len() as u32;
        let threads = std::thread::available_parallelism().map(|t| t.get()).unwrap_or(1).min(n as usize);
        if threads <= 1 {
            for i in 0..n {
                self.dec.load(i)?;
                let dec = &self.dec;
                let data = match &dec.in_rec {
                    Some(r) => &dec.rec[r.clone()],
                    None => &dec.out,
                };
                visit_chunk(&dec.chunks[i as usize].runs, data, &mut visit)?;
            }
            return Ok(());
        }
        let mut workers = Vec::with_capacity(threads);
        for _ in 0..threads {
            workers.push(self.dec.try_clone()?);
        }
        let bytes_read = AtomicU64::new(0);
        let r = read_parallel(&self.dec.chunks, workers, &bytes_read, &mut visit);
        self.dec.bytes_read += bytes_read.load(Ordering::Relaxed);
        r
    }

    /// Like `read_runs`, but zero runs are delivered as zero-filled slices (of at most 64 KiB).
    pub fn read_memory(&mut self, mut visit: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        self.read_runs(|gpa, run| match run {
            RunData::Data(d) => visit(gpa, d),
            RunData::Zero { npages } => {
                let mut left = npages * PAGE_SIZE;
                let mut at = gpa;
                while left > 0 {
                    let n = left.min(ZEROS.len() as u64);
                    visit(at, &ZEROS[..n as usize])?;
                    at += n;
                    left -= n;
                }
                Ok(())
            }
        })
    }

    /// The resolved page map (built on first use from the footer).
    pub(crate) fn page_map(&mut self) -> &PageMap {
        self.map.get_or_insert_with(|| {
            let mut m = PageMap::default();
            for (i, c) in self.dec.chunks.iter().enumerate() {
                m.apply_chunk(0, i as u32, &c.runs);
            }
            m
        })
    }

    /// Reads guest memory at `gpa` into `buf` (page aligned), using the footer index.
    pub fn read_at(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        check_in_ram(&self.header.ranges, gpa, buf.len() as u64)?;
        self.page_map();
        let map = self.map.as_ref().expect("built above");
        fill(map, &mut [&mut self.dec], gpa, buf)
    }

    /// The latest contents of one guest page.
    pub fn read_page(&mut self, gpa: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; PAGE];
        self.read_at(gpa, &mut buf)?;
        Ok(buf)
    }

    /// Checks everything: every chunk's hash (and, with the key, that it
    /// decrypts and decompresses), both sections, the root hash and the keyed root tag.
    pub fn verify(&mut self) -> Result<VerifyReport> {
        let t = Instant::now();
        let before = self.dec.bytes_read;
        let decode = !self.is_encrypted() || self.dec.key.is_some();
        let mut root = RootHasher::new(&self.dec.header_hash);
        let (mut data_pages, mut zero_pages) = (0u64, 0u64);
        if decode {
            // Same path as a restore: every chunk read, hash-checked, decrypted, decompressed.
            self.read_runs(|_, _| Ok(()))?;
        } else {
            for i in 0..self.dec.chunks.len() as u32 {
                self.dec.read_checked(i)?;
            }
        }
        for c in self.dec.chunks.iter() {
            root.chunk(&c.hash);
            data_pages += u64::from(c.data_pages);
            zero_pages += c.runs.iter().filter(|r| r.kind == RunKind::Zero).map(|r| u64::from(r.npages)).sum::<u64>();
        }
        let (s, c) = (self.state, self.cpus);
        self.dec.section(s, STATE_MAGIC, "state", decode)?;
        self.dec.section(c, CPUS_MAGIC, "cpus", decode)?;
        if decode {
            self.cpus()?;
        }
        let computed = root.finish(&s.hash, &c.hash);
        if computed != self.footer_root {
            return Err(Error::RootHashMismatch { path: self.path.clone(), recorded: self.footer_root, computed });
        }
        Ok(VerifyReport {
            path: self.path.clone(),
            root_hash: computed,
            chunks: self.dec.chunks.len() as u64,
            data_pages,
            zero_pages,
            decoded: decode,
            authenticated: self.authenticated,
            bytes_read: self.dec.bytes_read - before,
            elapsed_secs: t.elapsed().as_secs_f64(),
        })
    }
}

/// Calls `visit` for each run of one decoded chunk.
fn visit_chunk(
    runs: &[crate::record::PageRun],
    data: &[u8],
    visit: &mut impl FnMut(u64, RunData<'_>) -> Result<()>,
) -> Result<()> {
    let mut off = 0usize;
    for r in runs {
        match r.kind {
            RunKind::Data => {
                let len = r.npages as usize * PAGE;
                let d = data.get(off..off + len).ok_or_else(|| {
                    Error::InvalidArgument(format!("run at {:#x} extends past its chunk's data", r.gpa))
                })?;
                visit(r.gpa, RunData::Data(d))?;
                off += len;
            }
            RunKind::Zero => visit(r.gpa, RunData::Zero { npages: u64::from(r.npages) })?,
        }
    }
    Ok(())
}

/// A decoded chunk travelling from a worker to the visiting thread.
type Decoded = (u32, Result<(Vec<u8>, std::ops::Range<usize>)>);

/// Decodes chunks on `workers.len()` threads (read, hash check, decrypt,
/// decompress) while the calling thread visits them strictly in index order.
fn read_parallel(
    chunks: &Arc<Vec<ChunkEntry>>,
    workers: Vec<ChunkDecoder>,
    bytes_read: &AtomicU64,
    visit: &mut impl FnMut(u64, RunData<'_>) -> Result<()>,
) -> Result<()> {
    let n = chunks.len() as u32;
    let next = AtomicU32::new(0);
    let stop = AtomicBool::new(false);
    let pool = BufPool::new(workers.len() * 4);
    let (tx, rx) = sync_channel::<Decoded>(workers.len() * 2);
    std::thread::scope(|s| {
        for mut dec in workers {
            let tx = tx.clone();
            let (next, stop, pool) = (&next, &stop, &pool);
            s.spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= n {
                        break;
                    }
                    let r = dec.load(i).map(|_| ()).map(|()| dec.take_decoded(pool.get(0)));
                    let failed = r.is_err();
                    if tx.send((i, r)).is_err() || failed {
                        break;
                    }
                }
                bytes_read.fetch_add(dec.bytes_read, Ordering::Relaxed);
            });
        }
        drop(tx);
        let mut pending = BTreeMap::new();
        let mut want = 0u32;
        let result = (|| {
            while want < n {
                let (buf, range) = match pending.remove(&want) {
                    Some(r) => r,
                    None => {
                        let (i, r) = rx.recv().map_err(|_| Error::InvalidArgument("decoder threads stopped".into()))?;
                        pending.insert(i, r);
                        continue;
                    }
                }?;
                visit_chunk(&chunks[want as usize].runs, &buf[range], visit)?;
                pool.put(buf);
                want += 1;
            }
            Ok(())
        })();
        stop.store(true, Ordering::Relaxed);
        drop(rx);
        result
    })
}

/// Names which trailer field of a [`Error::FooterMisplaced`] is wrong by looking for the
/// footer's magic at the declared offset (then the length is wrong) or where the declared
/// length would put it (then the offset is wrong).
fn name_misplaced(file: &File, e: Error) -> Error {
    let Error::FooterMisplaced { path, trailer_offset, footer_offset, footer_len, .. } = e else {
        return e;
    };
    let magic_at = |off: u64| {
        let mut m = [0u8; 4];
        off.checked_add(4).is_some_and(|end| end <= trailer_offset)
            && file.read_exact_at(&mut m, off).is_ok()
            && m == crate::footer::FOOTER_MAGIC
    };
    let field = if magic_at(footer_offset) {
        "footer length"
    } else if trailer_offset.checked_sub(footer_len).is_some_and(magic_at) {
        "footer offset"
    } else {
        "footer offset or footer length"
    };
    Error::FooterMisplaced { path, trailer_offset, footer_offset, footer_len, field }
}

/// Whether every chunk entry and section location of `f` agrees with the record it points
/// to: the chunk's index, runs and raw length in its prefix and the trailing hash of every
/// record. Reads only prefixes and hashes (used to tell a corrupt trailer from a corrupt footer).
fn footer_matches_records(file: &File, f: &Footer) -> bool {
    let tail_is = |offset: u64, len: u64, want: &Hash32| {
        let mut h = [0u8; HASH_LEN];
        len >= HASH_LEN as u64 && file.read_exact_at(&mut h, offset + len - HASH_LEN as u64).is_ok() && h == want.0
    };
    let chunks_ok = f.chunks.iter().enumerate().all(|(i, c)| {
        let plen = CHUNK_PREFIX_LEN + c.runs.len() * RUN_LEN;
        if plen as u64 + HASH_LEN as u64 > c.record_len {
            return false;
        }
        let mut b = vec![0u8; plen];
        file.read_exact_at(&mut b, c.offset).is_ok()
            && parse_chunk_prefix(&b)
                .is_ok_and(|p| p.index as usize == i && p.raw_len as u64 == u64::from(c.data_pages) * PAGE_SIZE)
            && decode_runs(&b[CHUNK_PREFIX_LEN..]).is_ok_and(|r| r == c.runs)
            && tail_is(c.offset, c.record_len, &c.hash)
    });
    chunks_ok && tail_is(f.state.offset, f.state.len, &f.state.hash) && tail_is(f.cpus.offset, f.cpus.len, &f.cpus.hash)
}

/// Recomputes the root hash from the footer's hashes.
fn compute_root(f: &Footer) -> Hash32 {
    let mut r = RootHasher::new(&f.header_hash);
    for c in &f.chunks {
        r.chunk(&c.hash);
    }
    r.finish(&f.state.hash, &f.cpus.hash)
}

/// Errors unless `gpa..gpa+len` lies inside the RAM ranges.
pub(crate) fn check_in_ram(ranges: &[RamRange], gpa: u64, len: u64) -> Result<()> {
    crate::layout::Layout::new(ranges).segments(gpa, len.div_ceil(PAGE_SIZE)).map(|_| ())
}

impl MemorySource for ImageReader {
    fn ram_ranges(&self) -> Vec<RamRange> {
        self.header.ranges.clone()
    }

    fn cpu_regs(&mut self) -> Result<Vec<CpuRegs>> {
        self.cpus()
    }

    fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(gpa, buf)
    }
}
