//! The image header: a fixed 56-byte preamble followed by a JSON document.
//!
//! The header is written first and never encrypted, so tools can show what an
//! image is (layout, codec, parent) without the key. Its hash is bound into
//! every encrypted chunk and into the root hash, so it cannot be altered
//! without detection.

use std::path::Path;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::hash::Hash32;

/// First eight bytes of every image file.
pub const MAGIC: &[u8; 8] = b"FERRYIMG";
/// The one format version this build writes and reads (see docs/image-format.md, versioning).
pub const FORMAT_VERSION: u32 = 1;
/// Guest page size; images only hold 4 KiB pages.
pub const PAGE_SIZE: u64 = 4096;
/// Size of the fixed preamble before the header JSON.
pub const PREAMBLE_LEN: usize = 56;
/// Upper bound on the header JSON, so a corrupt length can never make us allocate much.
pub const MAX_HEADER_LEN: u64 = 16 << 20;
/// Upper bound on a chunk's uncompressed data, which bounds every chunk allocation.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;
/// Default uncompressed data per chunk: big enough to compress and hash well, small enough to pipeline.
pub const DEFAULT_CHUNK_SIZE: u32 = 1 << 20;

/// One contiguous range of guest RAM, in guest-physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RamRange {
    /// First guest-physical address (page aligned).
    pub start: u64,
    /// Length in bytes (a non-zero multiple of the page size).
    pub len: u64,
}

impl RamRange {
    /// Convenience constructor.
    pub fn new(start: u64, len: u64) -> Self {
        RamRange { start, len }
    }

    /// One past the last address.
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// How chunk payloads are compressed; chosen per image, recorded per chunk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    /// Stored as is.
    None,
    /// LZ4 block format (lz4_flex): fast enough to keep up with memory bandwidth.
    #[default]
    Lz4,
    /// Zstandard at the given level: smaller, slower.
    Zstd {
        /// zstd compression level (1..=22; 3 is zstd's default).
        level: i32,
    },
}

/// A reference from an incremental image to the image it was taken against.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ParentRef {
    /// Root hash of the parent image; a chain refuses any other file.
    pub root_hash: Hash32,
    /// Where to find the parent: absolute, or relative to the child's directory.
    pub path_hint: String,
}

/// Public parameters of an encrypted image (everything but the secret).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct EncryptionParams {
    /// Always "aes-256-gcm".
    pub cipher: String,
    /// How the key-encryption key comes from the key file: "blake3-derive-key".
    pub kdf: String,
    /// The BLAKE3 derive-key context string.
    pub kdf_context: String,
    /// Hex of the 12-byte nonce used to wrap the data key.
    pub wrap_nonce: String,
    /// Hex of the wrapped data key: 32 bytes of ciphertext then the 16-byte GCM tag.
    pub wrapped_key: String,
}

/// What the caller supplies to describe a new image.
#[derive(Clone, Debug, PartialEq)]
pub struct ImageHeaderInput {
    /// The VM configuration, opaque to this crate, stored as JSON in the header.
    pub vm_config: serde_json::Value,
    /// Guest RAM ranges; sorted, page aligned, non-overlapping.
    pub ranges: Vec<RamRange>,
    /// For an incremental image: the parent it overrides.
    pub parent: Option<ParentRef>,
}

/// The decoded header as stored in the file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ImageHeader {
    /// Format version; equals the preamble's.
    pub format_version: u32,
    /// Page size in bytes; always 4096.
    pub page_size: u64,
    /// Guest RAM ranges.
    pub ranges: Vec<RamRange>,
    /// Codec the writer was asked to use (a chunk may still be stored raw).
    pub codec: Codec,
    /// Maximum uncompressed data bytes per chunk.
    pub chunk_size: u32,
    /// Present when chunks and sections are encrypted.
    pub encryption: Option<EncryptionParams>,
    /// Present for an incremental image.
    pub parent: Option<ParentRef>,
    /// Random 128-bit id (hex), so two images of identical memory still differ.
    pub image_id: String,
    /// Seconds since the Unix epoch when the writer was created.
    pub created_unix_secs: u64,
    /// The caller's opaque VM configuration.
    pub vm_config: serde_json::Value,
}

/// Checks that ranges are sorted, page aligned, non-empty, non-overlapping and do not overflow.
pub(crate) fn validate_ranges(ranges: &[RamRange]) -> std::result::Result<(), String> {
    if ranges.is_empty() {
        return Err("no RAM ranges".into());
    }
    let mut prev_end = 0u64;
    for (i, r) in ranges.iter().enumerate() {
        if r.start % PAGE_SIZE != 0 || r.len % PAGE_SIZE != 0 || r.len == 0 {
            return Err(format!("range {i} ({:#x}+{:#x}) is empty or not page aligned", r.start, r.len));
        }
        let Some(_end) = r.start.checked_add(r.len) else {
            return Err(format!("range {i} ({:#x}+{:#x}) overflows", r.start, r.len));
        };
        if i > 0 && r.start < prev_end {
            return Err(format!("range {i} starts at {:#x}, before the end {prev_end:#x} of range {}", r.start, i - 1));
        }
        prev_end = r.start + r.len;
    }
    Ok(())
}

impl ImageHeader {
    /// Checks every field a reader relies on; `path` is for the error message.
    pub(crate) fn validate(&self, path: &Path) -> Result<()> {
        let bad =
            |field: &'static str, reason: String| Error::InvalidHeader { path: path.to_path_buf(), field, reason };
        if self.format_version != FORMAT_VERSION {
            return Err(Error::UnsupportedVersion {
                path: path.to_path_buf(),
                what: "header",
                found: self.format_version,
                supported: FORMAT_VERSION,
            });
        }
        if self.page_size != PAGE_SIZE {
            return Err(bad("page_size", format!("{} (only 4096 is supported)", self.page_size)));
        }
        validate_ranges(&self.ranges).map_err(|r| bad("ranges", r))?;
        if self.chunk_size == 0 || u64::from(self.chunk_size) % PAGE_SIZE != 0 || self.chunk_size > MAX_CHUNK_SIZE {
            return Err(bad(
                "chunk_size",
                format!("{} (must be a multiple of 4096 up to {MAX_CHUNK_SIZE})", self.chunk_size),
            ));
        }
        if let Codec::Zstd { level } = self.codec {
            if !(-7..=22).contains(&level) {
                return Err(bad("codec", format!("zstd level {level} out of range")));
            }
        }
        if let Some(e) = &self.encryption {
            if e.cipher != "aes-256-gcm" || e.kdf != "blake3-derive-key" {
                return Err(bad("encryption", format!("unsupported cipher {:?} / kdf {:?}", e.cipher, e.kdf)));
            }
        }
        Ok(())
    }

    /// Total guest pages covered by the RAM ranges.
    pub fn total_pages(&self) -> u64 {
        self.ranges.iter().map(|r| r.len / PAGE_SIZE).sum()
    }
}

/// Serialises the header into preamble + JSON, returning the bytes and the header hash.
pub(crate) fn encode_header(h: &ImageHeader) -> std::result::Result<(Vec<u8>, Hash32), String> {
    let json = serde_json::to_vec(h).map_err(|e| e.to_string())?;
    let mut out = Vec::with_capacity(PREAMBLE_LEN + json.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(json.len() as u64).to_le_bytes());
    let hash = header_hash(&out[..24], &json);
    out.extend_from_slice(&hash.0);
    out.extend_from_slice(&json);
    Ok((out, hash))
}

/// BLAKE3 over the first 24 preamble bytes and the JSON: what the header hash covers.
fn header_hash(pre: &[u8], json: &[u8]) -> Hash32 {
    let mut h = blake3::Hasher::new();
    h.update(pre);
    h.update(json);
    h.finalize().into()
}

/// Parsed fixed preamble.
pub(crate) struct Preamble {
    /// Length of the JSON that follows.
    pub json_len: u64,
    /// Stored header hash.
    pub hash: Hash32,
}

/// Decodes and checks the preamble (magic, version, JSON length against file size).
pub(crate) fn decode_preamble(path: &Path, buf: &[u8; PREAMBLE_LEN], file_size: u64) -> Result<Preamble> {
    if &buf[0..8] != MAGIC {
        return Err(Error::BadMagic { path: path.to_path_buf(), what: "image preamble", offset: 0 });
    }
    let version = u32::from_le_bytes(buf[8..12].try_into().expect("4 bytes"));
    if version != FORMAT_VERSION {
        return Err(Error::UnsupportedVersion {
            path: path.to_path_buf(),
            what: "preamble",
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let json_len = u64::from_le_bytes(buf[16..24].try_into().expect("8 bytes"));
    if json_len > MAX_HEADER_LEN || json_len > file_size.saturating_sub(PREAMBLE_LEN as u64) {
        return Err(Error::SizeExceedsFile {
            path: path.to_path_buf(),
            what: "header",
            offset: PREAMBLE_LEN as u64,
            len: json_len,
            file_size,
        });
    }
    Ok(Preamble { json_len, hash: Hash32(buf[24..56].try_into().expect("32 bytes")) })
}

/// Checks the JSON against the preamble hash and parses and validates it.
pub(crate) fn decode_header(
    path: &Path,
    pre_bytes: &[u8; PREAMBLE_LEN],
    pre: &Preamble,
    json: &[u8],
) -> Result<ImageHeader> {
    if header_hash(&pre_bytes[..24], json) != pre.hash {
        return Err(Error::HeaderHashMismatch {
            path: path.to_path_buf(),
            end: PREAMBLE_LEN as u64 + json.len() as u64,
        });
    }
    let h: ImageHeader = serde_json::from_slice(json).map_err(|e| Error::InvalidHeader {
        path: path.to_path_buf(),
        field: "json",
        reason: format!("{e} (header JSON starts at offset {PREAMBLE_LEN})"),
    })?;
    h.validate(path)?;
    Ok(h)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> ImageHeader {
        ImageHeader {
            format_version: FORMAT_VERSION,
            page_size: PAGE_SIZE,
            ranges: vec![RamRange::new(0, 0xa0000), RamRange::new(0x100000, 0x100000)],
            codec: Codec::Zstd { level: 3 },
            chunk_size: DEFAULT_CHUNK_SIZE,
            encryption: None,
            parent: None,
            image_id: "00".repeat(16),
            created_unix_secs: 1,
            vm_config: serde_json::json!({"vcpus": 2}),
        }
    }

    #[test]
    fn round_trip() {
        let h = sample();
        let (bytes, hash) = encode_header(&h).unwrap();
        let pre_bytes: [u8; PREAMBLE_LEN] = bytes[..PREAMBLE_LEN].try_into().unwrap();
        let pre = decode_preamble(Path::new("x"), &pre_bytes, bytes.len() as u64).unwrap();
        assert_eq!(pre.hash, hash);
        let back = decode_header(Path::new("x"), &pre_bytes, &pre, &bytes[PREAMBLE_LEN..]).unwrap();
        assert_eq!(back, h);
    }

    #[test]
    fn range_validation() {
        assert!(validate_ranges(&[]).is_err());
        assert!(validate_ranges(&[RamRange::new(1, 4096)]).is_err());
        assert!(validate_ranges(&[RamRange::new(0, 0)]).is_err());
        assert!(validate_ranges(&[RamRange::new(8192, 4096), RamRange::new(0, 4096)]).is_err());
        assert!(validate_ranges(&[RamRange::new(u64::MAX - 4095, 8192)]).is_err());
        assert!(validate_ranges(&[RamRange::new(0, 4096), RamRange::new(4096, 4096)]).is_ok());
    }

    #[test]
    fn codec_json_names() {
        assert_eq!(serde_json::to_string(&Codec::Lz4).unwrap(), "\"lz4\"");
        assert_eq!(serde_json::to_string(&Codec::Zstd { level: 3 }).unwrap(), "{\"zstd\":{\"level\":3}}");
    }
}
