//! Chunk and section records: the units of memory and state in the file.
//!
//! A chunk record holds a list of page runs (data or zero) and the compressed,
//! optionally encrypted bytes of its data pages, followed by a BLAKE3 hash of
//! everything before it. Runs are applied in order, chunks in index order, so
//! the last write of a page wins.

use serde::{Deserialize, Serialize};

use crate::codec::{CodecId, Encoder};
use crate::crypto::{DataKey, NonceKind, TAG_LEN};
use crate::hash::Hash32;
use crate::header::PAGE_SIZE;

/// Magic of a chunk record.
pub(crate) const CHUNK_MAGIC: [u8; 4] = *b"FCHK";
/// Magic of the VM state section record.
pub(crate) const STATE_MAGIC: [u8; 4] = *b"FSTA";
/// Magic of the CPU register section record.
pub(crate) const CPUS_MAGIC: [u8; 4] = *b"FCPU";
/// Fixed bytes before a chunk's run table.
pub(crate) const CHUNK_PREFIX_LEN: usize = 24;
/// Fixed bytes before a section's payload.
pub(crate) const SECTION_PREFIX_LEN: usize = 24;
/// Bytes per encoded run.
pub(crate) const RUN_LEN: usize = 16;
/// Bytes of the trailing BLAKE3 hash of every record.
pub(crate) const HASH_LEN: usize = 32;
/// Record flag: payload is AES-256-GCM ciphertext followed by the tag.
pub(crate) const FLAG_ENCRYPTED: u8 = 1;
/// Upper bound on runs in one chunk, bounding the run table (256 KiB).
pub const MAX_RUNS_PER_CHUNK: usize = 16384;

/// Whether a run's pages carry data (stored in the chunk payload) or are zero.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum RunKind {
    /// The pages' bytes follow in the chunk payload, in run order.
    Data,
    /// The pages are all-zero (overrides any earlier data for them).
    Zero,
}

/// A contiguous run of guest pages inside one chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PageRun {
    /// Guest-physical address of the first page.
    pub gpa: u64,
    /// Number of 4 KiB pages (at least 1).
    pub npages: u32,
    /// Data or zero.
    pub kind: RunKind,
}

impl PageRun {
    /// One past the last byte.
    pub fn end(&self) -> u64 {
        self.gpa + u64::from(self.npages) * PAGE_SIZE
    }
}

/// Appends the 16-byte encodings of `runs`: u64 gpa, u32 npages, u32 kind (0 data, 1 zero).
pub(crate) fn encode_runs(runs: &[PageRun], out: &mut Vec<u8>) {
    for r in runs {
        out.extend_from_slice(&r.gpa.to_le_bytes());
        out.extend_from_slice(&r.npages.to_le_bytes());
        let k: u32 = match r.kind {
            RunKind::Data => 0,
            RunKind::Zero => 1,
        };
        out.extend_from_slice(&k.to_le_bytes());
    }
}

/// Decodes a run table; the error names the bad run.
pub(crate) fn decode_runs(bytes: &[u8]) -> Result<Vec<PageRun>, String> {
    if bytes.len() % RUN_LEN != 0 {
        return Err(format!("run table of {} bytes is not a multiple of {RUN_LEN}", bytes.len()));
    }
    let mut runs = Vec::with_capacity(bytes.len() / RUN_LEN);
    for (i, b) in bytes.chunks_exact(RUN_LEN).enumerate() {
        let gpa = u64::from_le_bytes(b[0..8].try_into().expect("8"));
        let npages = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        let kind = match u32::from_le_bytes(b[12..16].try_into().expect("4")) {
            0 => RunKind::Data,
            1 => RunKind::Zero,
            k => return Err(format!("run {i}: unknown kind {k}")),
        };
        if gpa % PAGE_SIZE != 0 || npages == 0 {
            return Err(format!("run {i}: gpa {gpa:#x} not page aligned or empty run"));
        }
        if gpa.checked_add(u64::from(npages) * PAGE_SIZE).is_none() {
            return Err(format!("run {i}: gpa {gpa:#x} + {npages} pages overflows"));
        }
        runs.push(PageRun { gpa, npages, kind });
    }
    Ok(runs)
}

/// Number of data pages in a run list.
pub(crate) fn data_pages(runs: &[PageRun]) -> u64 {
    runs.iter().filter(|r| r.kind == RunKind::Data).map(|r| u64::from(r.npages)).sum()
}

/// Work for an encoder thread: one chunk's runs and concatenated data pages.
pub(crate) struct ChunkJob {
    /// Chunk index (file order).
    pub index: u32,
    /// Runs in write order.
    pub runs: Vec<PageRun>,
    /// The data pages of the `Data` runs, concatenated.
    pub data: Vec<u8>,
}

/// A finished chunk record, in three pieces so the payload is never copied.
pub(crate) struct EncodedChunk {
    /// Chunk index.
    pub index: u32,
    /// Fixed prefix and run table.
    pub prefix: Vec<u8>,
    /// Stored payload (compressed and/or encrypted data).
    pub payload: Vec<u8>,
    /// A buffer the caller may reuse.
    pub spare: Vec<u8>,
    /// BLAKE3 of prefix || payload; written after the payload.
    pub hash: Hash32,
    /// The runs, for the footer index.
    pub runs: Vec<PageRun>,
    /// Which codec the payload ended up with.
    pub codec: CodecId,
}

impl EncodedChunk {
    /// Total record length on disk.
    pub(crate) fn record_len(&self) -> u64 {
        (self.prefix.len() + self.payload.len() + HASH_LEN) as u64
    }
}

/// Compresses, encrypts and hashes one chunk; `scratch` becomes the compression buffer.
pub(crate) fn encode_chunk(
    job: ChunkJob,
    enc: &mut Encoder,
    key: Option<&DataKey>,
    header_hash: &Hash32,
    mut scratch: Vec<u8>,
) -> Result<EncodedChunk, String> {
    let raw_len = u32::try_from(job.data.len()).map_err(|_| "chunk data exceeds 4 GiB".to_string())?;
    let codec = enc.compress(&job.data, &mut scratch)?;
    let (mut payload, spare) = if codec == CodecId::None { (job.data, scratch) } else { (scratch, job.data) };
    let stored_len = payload.len() + if key.is_some() { TAG_LEN } else { 0 };
    let stored_len = u32::try_from(stored_len).map_err(|_| "chunk payload exceeds 4 GiB".to_string())?;
    let mut prefix = Vec::with_capacity(CHUNK_PREFIX_LEN + job.runs.len() * RUN_LEN);
    prefix.extend_from_slice(&CHUNK_MAGIC);
    prefix.extend_from_slice(&job.index.to_le_bytes());
    prefix.extend_from_slice(&(job.runs.len() as u32).to_le_bytes());
    prefix.push(codec as u8);
    prefix.push(if key.is_some() { FLAG_ENCRYPTED } else { 0 });
    prefix.extend_from_slice(&[0, 0]);
    prefix.extend_from_slice(&raw_len.to_le_bytes());
    prefix.extend_from_slice(&stored_len.to_le_bytes());
    encode_runs(&job.runs, &mut prefix);
    if let Some(k) = key {
        k.seal(NonceKind::Chunk, u64::from(job.index), &[&header_hash.0, &prefix], &mut payload)?;
    }
    let mut h = blake3::Hasher::new();
    h.update(&prefix);
    h.update(&payload);
    Ok(EncodedChunk { index: job.index, prefix, payload, spare, hash: h.finalize().into(), runs: job.runs, codec })
}

/// Parsed fixed prefix of a chunk record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ChunkPrefix {
    pub index: u32,
    pub nruns: u32,
    pub codec: CodecId,
    pub encrypted: bool,
    pub raw_len: u32,
    pub stored_len: u32,
}

/// Parses the 24-byte chunk prefix.
pub(crate) fn parse_chunk_prefix(b: &[u8]) -> Result<ChunkPrefix, String> {
    if b.len() < CHUNK_PREFIX_LEN {
        return Err("record shorter than its prefix".into());
    }
    if b[0..4] != CHUNK_MAGIC {
        return Err("bad chunk magic".into());
    }
    let codec = CodecId::from_u8(b[12]).ok_or_else(|| format!("unknown codec byte {}", b[12]))?;
    if b[13] & !FLAG_ENCRYPTED != 0 || b[14] != 0 || b[15] != 0 {
        return Err(format!("unknown flags {:#x}/{:#x}{:02x}", b[13], b[15], b[14]));
    }
    let u32at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4"));
    Ok(ChunkPrefix {
        index: u32at(4),
        nruns: u32at(8),
        codec,
        encrypted: b[13] & FLAG_ENCRYPTED != 0,
        raw_len: u32at(16),
        stored_len: u32at(20),
    })
}

/// Builds a complete state or CPU section record (prefix, payload, hash).
pub(crate) fn encode_section(
    magic: [u8; 4],
    kind: NonceKind,
    data: &[u8],
    enc: &mut Encoder,
    key: Option<&DataKey>,
    header_hash: &Hash32,
) -> Result<(Vec<u8>, Hash32), String> {
    let mut scratch = Vec::new();
    let codec = enc.compress(data, &mut scratch)?;
    let mut payload = if codec == CodecId::None { data.to_vec() } else { scratch };
    let stored_len = (payload.len() + if key.is_some() { TAG_LEN } else { 0 }) as u64;
    let mut rec = Vec::with_capacity(SECTION_PREFIX_LEN + stored_len as usize + HASH_LEN);
    rec.extend_from_slice(&magic);
    rec.push(codec as u8);
    rec.push(if key.is_some() { FLAG_ENCRYPTED } else { 0 });
    rec.extend_from_slice(&[0, 0]);
    rec.extend_from_slice(&(data.len() as u64).to_le_bytes());
    rec.extend_from_slice(&stored_len.to_le_bytes());
    if let Some(k) = key {
        k.seal(kind, 0, &[&header_hash.0, &rec], &mut payload)?;
    }
    rec.extend_from_slice(&payload);
    let hash = Hash32::of(&rec);
    rec.extend_from_slice(&hash.0);
    Ok((rec, hash))
}

/// Parsed fixed prefix of a section record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SectionPrefix {
    pub codec: CodecId,
    pub encrypted: bool,
    pub raw_len: u64,
    pub stored_len: u64,
}

/// Parses the 24-byte section prefix, checking the magic.
pub(crate) fn parse_section_prefix(b: &[u8], magic: [u8; 4]) -> Result<SectionPrefix, String> {
    if b.len() < SECTION_PREFIX_LEN {
        return Err("record shorter than its prefix".into());
    }
    if b[0..4] != magic {
        return Err("bad section magic".into());
    }
    let codec = CodecId::from_u8(b[4]).ok_or_else(|| format!("unknown codec byte {}", b[4]))?;
    if b[5] & !FLAG_ENCRYPTED != 0 || b[6] != 0 || b[7] != 0 {
        return Err(format!("unknown flags {:#x}", b[5]));
    }
    Ok(SectionPrefix {
        codec,
        encrypted: b[5] & FLAG_ENCRYPTED != 0,
        raw_len: u64::from_le_bytes(b[8..16].try_into().expect("8")),
        stored_len: u64::from_le_bytes(b[16..24].try_into().expect("8")),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::header::Codec;

    #[test]
    fn runs_round_trip_and_reject_garbage() {
        let runs = vec![
            PageRun { gpa: 0x1000, npages: 3, kind: RunKind::Data },
            PageRun { gpa: 0x9000, npages: 1, kind: RunKind::Zero },
        ];
        let mut b = Vec::new();
        encode_runs(&runs, &mut b);
        assert_eq!(decode_runs(&b).unwrap(), runs);
        let mut bad = b.clone();
        bad[12] = 7;
        assert!(decode_runs(&bad).unwrap_err().contains("run 0"));
        assert!(decode_runs(&b[..17]).is_err());
        let mut misaligned = b.clone();
        misaligned[0] = 1;
        assert!(decode_runs(&misaligned).is_err());
    }

    #[test]
    fn chunk_encoding_layout() {
        let job = ChunkJob {
            index: 5,
            runs: vec![PageRun { gpa: 0, npages: 1, kind: RunKind::Data }],
            data: vec![7u8; 4096],
        };
        let mut e = Encoder::new(Codec::Lz4).unwrap();
        let c = encode_chunk(job, &mut e, None, &Hash32::default(), Vec::new()).unwrap();
        let p = parse_chunk_prefix(&c.prefix).unwrap();
        assert_eq!((p.index, p.nruns, p.raw_len), (5, 1, 4096));
        assert_eq!(p.stored_len as usize, c.payload.len());
        assert_eq!(p.codec, CodecId::Lz4);
        assert!(!p.encrypted);
    }
}
