//! Compression of chunk and section payloads.
//!
//! Each record says which codec its payload uses (a byte), so a writer can
//! store incompressible data raw even when the image asks for lz4 or zstd.

use crate::header::Codec;

/// Codec byte stored in every chunk and section record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub(crate) enum CodecId {
    /// Payload is the data itself.
    None = 0,
    /// LZ4 block format, no frame; the record gives the decompressed length.
    Lz4 = 1,
    /// One Zstandard frame.
    Zstd = 2,
}

impl CodecId {
    /// Decodes the codec byte, `None` for unknown values.
    pub(crate) fn from_u8(v: u8) -> Option<Self> {
        match v {
            0 => Some(CodecId::None),
            1 => Some(CodecId::Lz4),
            2 => Some(CodecId::Zstd),
            _ => None,
        }
    }
}

/// A per-thread compressor (zstd keeps a reusable context).
pub(crate) struct Encoder {
    codec: Codec,
    zstd: Option<zstd::bulk::Compressor<'static>>,
}

impl Encoder {
    /// Makes an encoder for the image's codec.
    pub(crate) fn new(codec: Codec) -> Result<Self, String> {
        let zstd = match codec {
            Codec::Zstd { level } => Some(zstd::bulk::Compressor::new(level).map_err(|e| format!("zstd init: {e}"))?),
            _ => None,
        };
        Ok(Encoder { codec, zstd })
    }

    /// Compresses `input` into `out` (cleared first). Returns `CodecId::None` and
    /// leaves `out` empty when compression does not save space: the caller then
    /// stores `input` itself.
    pub(crate) fn compress(&mut self, input: &[u8], out: &mut Vec<u8>) -> Result<CodecId, String> {
        out.clear();
        match self.codec {
            Codec::None => return Ok(CodecId::None),
            Codec::Lz4 => {
                let max = lz4_flex::block::get_maximum_output_size(input.len());
                out.resize(max, 0);
                let n = lz4_flex::block::compress_into(input, out).map_err(|e| format!("lz4: {e}"))?;
                out.truncate(n);
            }
            Codec::Zstd { .. } => {
                let max = zstd::zstd_safe::compress_bound(input.len());
                out.reserve(max);
                let z = self.zstd.as_mut().ok_or("zstd encoder missing")?;
                z.compress_to_buffer(input, out).map_err(|e| format!("zstd: {e}"))?;
            }
        }
        if out.len() >= input.len() {
            out.clear();
            return Ok(CodecId::None);
        }
        Ok(match self.codec {
            Codec::Zstd { .. } => CodecId::Zstd,
            _ => CodecId::Lz4,
        })
    }
}

/// Upper bound on what `raw_len` bytes can be claimed to decompress from
/// `stored` bytes, so a forged length cannot make us allocate far more than the
/// file could plausibly hold (lz4 cannot expand more than ~255x).
pub(crate) fn plausible(id: CodecId, stored: u64, raw_len: u64) -> bool {
    match id {
        CodecId::None => stored == raw_len,
        CodecId::Lz4 => raw_len <= stored.saturating_mul(256).saturating_add(64),
        CodecId::Zstd => true,
    }
}

/// Decompresses `input` into `out`, which must end up exactly `raw_len` bytes.
pub(crate) fn decompress(id: CodecId, input: &[u8], raw_len: usize, out: &mut Vec<u8>) -> Result<(), String> {
    out.clear();
    match id {
        CodecId::None => {
            if input.len() != raw_len {
                return Err(format!("stored {} bytes but {raw_len} expected", input.len()));
            }
            out.extend_from_slice(input);
        }
        CodecId::Lz4 => {
            out.resize(raw_len, 0);
            let n = lz4_flex::block::decompress_into(input, out).map_err(|e| format!("lz4: {e}"))?;
            if n != raw_len {
                return Err(format!("lz4 produced {n} bytes, {raw_len} expected"));
            }
        }
        CodecId::Zstd => {
            out.reserve(raw_len);
            let mut d = zstd::bulk::Decompressor::new().map_err(|e| format!("zstd init: {e}"))?;
            let n = d.decompress_to_buffer(input, out).map_err(|e| format!("zstd: {e}"))?;
            if n != raw_len {
                return Err(format!("zstd produced {n} bytes, {raw_len} expected"));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data() -> Vec<u8> {
        (0..65536u32).map(|i| (i / 7 % 13) as u8).collect()
    }

    #[test]
    fn round_trips() {
        for codec in [Codec::None, Codec::Lz4, Codec::Zstd { level: 3 }] {
            let mut e = Encoder::new(codec).unwrap();
            let input = data();
            let mut out = Vec::new();
            let id = e.compress(&input, &mut out).unwrap();
            let stored: &[u8] = if id == CodecId::None { &input } else { &out };
            let mut back = Vec::new();
            decompress(id, stored, input.len(), &mut back).unwrap();
            assert_eq!(back, input, "{codec:?}");
            assert!(plausible(id, stored.len() as u64, input.len() as u64));
        }
    }

    #[test]
    fn incompressible_is_stored_raw() {
        let mut x = 0x1234_5678_9abc_def0u64;
        let input: Vec<u8> = (0..8192)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let mut out = Vec::new();
        assert_eq!(Encoder::new(Codec::Lz4).unwrap().compress(&input, &mut out).unwrap(), CodecId::None);
        assert!(out.is_empty());
    }

    #[test]
    fn garbage_does_not_panic() {
        let mut out = Vec::new();
        assert!(decompress(CodecId::Lz4, &[0xff; 40], 4096, &mut out).is_err());
        assert!(decompress(CodecId::Zstd, &[0xff; 40], 4096, &mut out).is_err());
        assert!(decompress(CodecId::None, &[0; 40], 4096, &mut out).is_err());
    }
}
