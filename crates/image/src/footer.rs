//! Footer (the random-access index and the root hash) and the fixed trailer
//! that locates it from the end of the file.
//!
//! Why a footer rather than an up-front index: the writer streams chunks as the
//! pre-copy rounds produce them and only knows the index at the end.

use std::path::Path;

use crate::error::{Error, Result};
use crate::hash::Hash32;
use crate::header::FORMAT_VERSION;
use crate::record::{decode_runs, encode_runs, PageRun, CHUNK_PREFIX_LEN, HASH_LEN, MAX_RUNS_PER_CHUNK, RUN_LEN};

/// Magic of the footer.
pub(crate) const FOOTER_MAGIC: [u8; 4] = *b"FFTR";
/// Magic of the trailer (last 64 bytes of the file).
pub(crate) const TRAILER_MAGIC: &[u8; 8] = b"FERRYEND";
/// Size of the trailer.
pub const TRAILER_LEN: usize = 64;
/// Fixed part of the footer before the chunk entries.
pub(crate) const FOOTER_FIXED_LEN: usize = 208;
/// Fixed part of each chunk entry before its runs.
pub(crate) const ENTRY_FIXED_LEN: usize = 56;

/// Where one chunk record is and what it holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct ChunkEntry {
    /// File offset of the record.
    pub offset: u64,
    /// Record length including its trailing hash.
    pub record_len: u64,
    /// The record's hash (also stored at its end).
    pub hash: Hash32,
    /// Number of data pages (pages stored in the payload).
    pub data_pages: u32,
    /// The record's runs, duplicated here so random access needs only the footer.
    pub runs: Vec<PageRun>,
}

/// Where a section record is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub(crate) struct SectionLoc {
    /// File offset of the record.
    pub offset: u64,
    /// Record length including its trailing hash.
    pub len: u64,
    /// The record's hash.
    pub hash: Hash32,
}

/// The decoded footer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Footer {
    /// Hash of the header (same as in the preamble).
    pub header_hash: Hash32,
    /// Chunk entries in index order.
    pub chunks: Vec<ChunkEntry>,
    /// VM state section.
    pub state: SectionLoc,
    /// CPU register section.
    pub cpus: SectionLoc,
    /// Root hash over header, chunks and sections.
    pub root: Hash32,
    /// Keyed tag of the root (all zero when not encrypted).
    pub root_tag: Hash32,
}

impl Footer {
    /// Serialises the footer.
    pub(crate) fn encode(&self) -> Vec<u8> {
        let nruns: usize = self.chunks.iter().map(|c| c.runs.len()).sum();
        let mut b = Vec::with_capacity(FOOTER_FIXED_LEN + self.chunks.len() * ENTRY_FIXED_LEN + nruns * RUN_LEN);
        b.extend_from_slice(&FOOTER_MAGIC);
        b.extend_from_slice(&0u32.to_le_bytes());
        b.extend_from_slice(&(self.chunks.len() as u64).to_le_bytes());
        for s in [&self.state, &self.cpus] {
            b.extend_from_slice(&s.offset.to_le_bytes());
            b.extend_from_slice(&s.len.to_le_bytes());
        }
        for h in [&self.header_hash, &self.state.hash, &self.cpus.hash, &self.root, &self.root_tag] {
            b.extend_from_slice(&h.0);
        }
        debug_assert_eq!(b.len(), FOOTER_FIXED_LEN);
        for c in &self.chunks {
            b.extend_from_slice(&c.offset.to_le_bytes());
            b.extend_from_slice(&c.record_len.to_le_bytes());
            b.extend_from_slice(&c.hash.0);
            b.extend_from_slice(&(c.runs.len() as u32).to_le_bytes());
            b.extend_from_slice(&c.data_pages.to_le_bytes());
            encode_runs(&c.runs, &mut b);
        }
        b
    }

    /// Parses a footer that was read from `footer_offset`; `data_start` is the
    /// end of the header: every record must lie in `data_start..footer_offset`.
    pub(crate) fn decode(path: &Path, b: &[u8], footer_offset: u64, data_start: u64) -> Result<Footer> {
        let corrupt = |at: usize, reason: String| Error::FooterCorrupt {
            path: path.to_path_buf(),
            offset: footer_offset + at as u64,
            reason,
        };
        if b.len() < FOOTER_FIXED_LEN {
            return Err(corrupt(0, format!("{} bytes, shorter than the fixed {FOOTER_FIXED_LEN}", b.len())));
        }
        if b[0..4] != FOOTER_MAGIC {
            return Err(Error::BadMagic { path: path.to_path_buf(), what: "footer", offset: footer_offset });
        }
        if b[4..8] != [0; 4] {
            return Err(corrupt(4, "reserved bytes are not zero".into()));
        }
        let u64at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8"));
        let h32at = |o: usize| Hash32(b[o..o + 32].try_into().expect("32"));
        let nchunks = u64at(8);
        let room = (b.len() - FOOTER_FIXED_LEN) / ENTRY_FIXED_LEN;
        if nchunks > room as u64 {
            return Err(corrupt(8, format!("declares {nchunks} chunks but only has room for {room}")));
        }
        let section = |o: usize, h: usize, name: &str| -> Result<SectionLoc> {
            let (offset, len) = (u64at(o), u64at(o + 8));
            let end = offset.checked_add(len);
            if offset < data_start || end.is_none_or(|e| e > footer_offset) || len < 24 + HASH_LEN as u64 {
                return Err(corrupt(
                    o,
                    format!("{name} section {offset}+{len} is outside {data_start}..{footer_offset}"),
                ));
            }
            Ok(SectionLoc { offset, len, hash: h32at(h) })
        };
        let state = section(16, 80, "state")?;
        let cpus = section(32, 112, "cpus")?;
        let mut chunks = Vec::with_capacity(nchunks as usize);
        let mut at = FOOTER_FIXED_LEN;
        let mut prev_end = data_start;
        for i in 0..nchunks {
            if b.len() - at < ENTRY_FIXED_LEN {
                return Err(corrupt(at, format!("entry of chunk {i} is cut off")));
            }
            let offset = u64at(at);
            let record_len = u64at(at + 8);
            let hash = h32at(at + 16);
            let nruns = u32::from_le_bytes(b[at + 48..at + 52].try_into().expect("4")) as usize;
            let data_pages = u32::from_le_bytes(b[at + 52..at + 56].try_into().expect("4"));
            let end = offset.checked_add(record_len);
            if offset < prev_end || end.is_none_or(|e| e > footer_offset) {
                return Err(corrupt(
                    at,
                    format!("chunk {i} record {offset}+{record_len} is outside {prev_end}..{footer_offset} or overlaps the previous one"),
                ));
            }
            if record_len < (CHUNK_PREFIX_LEN + HASH_LEN) as u64 {
                return Err(corrupt(at, format!("chunk {i} record length {record_len} is too small")));
            }
            if nruns > MAX_RUNS_PER_CHUNK || nruns * RUN_LEN > b.len() - at - ENTRY_FIXED_LEN {
                return Err(corrupt(at + 48, format!("chunk {i} declares {nruns} runs, more than fit")));
            }
            let rb = &b[at + ENTRY_FIXED_LEN..at + ENTRY_FIXED_LEN + nruns * RUN_LEN];
            let runs = decode_runs(rb).map_err(|e| corrupt(at + ENTRY_FIXED_LEN, format!("chunk {i}: {e}")))?;
            if crate::record::data_pages(&runs) != u64::from(data_pages) {
                return Err(corrupt(at + 52, format!("chunk {i}: data page count disagrees with its runs")));
            }
            chunks.push(ChunkEntry { offset, record_len, hash, data_pages, runs });
            prev_end = offset + record_len;
            at += ENTRY_FIXED_LEN + nruns * RUN_LEN;
        }
        if at != b.len() {
            return Err(corrupt(at, format!("{} unexpected bytes after the last entry", b.len() - at)));
        }
        Ok(Footer { header_hash: h32at(48), chunks, state, cpus, root: h32at(144), root_tag: h32at(176) })
    }
}

/// The fixed-size trailer: where the footer is and its hash.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Trailer {
    /// File offset of the footer.
    pub footer_offset: u64,
    /// Footer length.
    pub footer_len: u64,
    /// BLAKE3 of the footer bytes.
    pub footer_hash: Hash32,
}

impl Trailer {
    /// Serialises the 64-byte trailer.
    pub(crate) fn encode(&self) -> [u8; TRAILER_LEN] {
        let mut b = [0u8; TRAILER_LEN];
        b[0..8].copy_from_slice(TRAILER_MAGIC);
        b[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        b[16..24].copy_from_slice(&self.footer_offset.to_le_bytes());
        b[24..32].copy_from_slice(&self.footer_len.to_le_bytes());
        b[32..64].copy_from_slice(&self.footer_hash.0);
        b
    }

    /// Parses the trailer found at `offset` (file size - 64) and checks the footer lies in
    /// `data_start..offset`.
    pub(crate) fn decode(
        path: &Path,
        b: &[u8; TRAILER_LEN],
        offset: u64,
        data_start: u64,
        file_size: u64,
    ) -> Result<Trailer> {
        if &b[0..8] != TRAILER_MAGIC {
            return Err(Error::BadMagic {
                path: path.to_path_buf(),
                what: "trailer (the image is truncated or was never finished)",
                offset,
            });
        }
        let version = u32::from_le_bytes(b[8..12].try_into().expect("4"));
        if version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                what: "trailer",
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        if b[12..16] != [0; 4] {
            return Err(Error::TrailerCorrupt {
                path: path.to_path_buf(),
                offset,
                reason: "reserved bytes are not zero".into(),
            });
        }
        let footer_offset = u64::from_le_bytes(b[16..24].try_into().expect("8"));
        let footer_len = u64::from_le_bytes(b[24..32].try_into().expect("8"));
        let end = footer_offset.checked_add(footer_len);
        if footer_offset < data_start {
            return Err(Error::TrailerCorrupt {
                path: path.to_path_buf(),
                offset: offset + 16,
                reason: format!(
                    "footer offset field says {footer_offset}, before the end of the header at {data_start}"
                ),
            });
        }
        if end.is_some_and(|e| e <= file_size) && end != Some(offset) {
            // Both fit the file, but the footer must end exactly where the trailer starts:
            // one of the two fields is wrong. `ImageReader` names which by looking for the
            // footer's magic.
            return Err(Error::FooterMisplaced {
                path: path.to_path_buf(),
                trailer_offset: offset,
                footer_offset,
                footer_len,
                field: "footer offset or footer length",
            });
        }
        if end != Some(offset) {
            return Err(Error::SizeExceedsFile {
                path: path.to_path_buf(),
                what: "footer (declared by the trailer)",
                offset: footer_offset,
                len: footer_len,
                file_size,
            });
        }
        Ok(Trailer { footer_offset, footer_len, footer_hash: Hash32(b[32..64].try_into().expect("32")) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::RunKind;

    fn sample() -> Footer {
        Footer {
            header_hash: Hash32::of(b"h"),
            chunks: vec![
                ChunkEntry {
                    offset: 100,
                    record_len: 200,
                    hash: Hash32::of(b"c0"),
                    data_pages: 2,
                    runs: vec![PageRun { gpa: 0, npages: 2, kind: RunKind::Data }],
                },
                ChunkEntry {
                    offset: 300,
                    record_len: 100,
                    hash: Hash32::of(b"c1"),
                    data_pages: 0,
                    runs: vec![PageRun { gpa: 0, npages: 1, kind: RunKind::Zero }],
                },
            ],
            state: SectionLoc { offset: 400, len: 60, hash: Hash32::of(b"s") },
            cpus: SectionLoc { offset: 460, len: 60, hash: Hash32::of(b"c") },
            root: Hash32::of(b"r"),
            root_tag: Hash32::default(),
        }
    }

    #[test]
    fn round_trip() {
        let f = sample();
        let b = f.encode();
        assert_eq!(Footer::decode(Path::new("x"), &b, 520, 100).unwrap(), f);
    }

    #[test]
    fn rejects_out_of_range_and_overclaims() {
        let f = sample();
        let b = f.encode();
        // Footer placed before the second chunk ends.
        assert!(Footer::decode(Path::new("x"), &b, 350, 100).is_err());
        // Claimed chunk count larger than the bytes.
        let mut big = b.clone();
        big[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        let e = Footer::decode(Path::new("x"), &big, 520, 100).unwrap_err().to_string();
        assert!(e.contains("declares"), "{e}");
        // Truncated entries.
        assert!(Footer::decode(Path::new("x"), &b[..b.len() - 1], 520, 100).is_err());
    }

    #[test]
    fn trailer_round_trip() {
        let t = Trailer { footer_offset: 1000, footer_len: 300, footer_hash: Hash32::of(b"f") };
        let b = t.encode();
        assert_eq!(Trailer::decode(Path::new("x"), &b, 1300, 56, 1364).unwrap(), t);
        assert!(Trailer::decode(Path::new("x"), &b, 1200, 56, 1264).is_err());
    }
}
