//! LiME ("Linux Memory Extractor") format: per RAM range a 32-byte header then the bytes.

use std::io::Write;

use super::{copy_range, out_err, MemorySource};
use crate::error::Result;

/// LiME header magic ("EMiL" when read as little-endian bytes).
pub const LIME_MAGIC: u32 = 0x4C69_4D45;

/// Writes the source's memory in LiME format: for each RAM range a header
/// (u32 magic, u32 version 1, u64 start, u64 inclusive end, 8 zero bytes, all
/// little-endian) followed by the range's bytes. Returns bytes written.
pub fn write_lime(src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
    let mut buf = Vec::new();
    let mut total = 0;
    for r in src.ram_ranges() {
        let mut h = [0u8; 32];
        h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&r.start.to_le_bytes());
        h[16..24].copy_from_slice(&(r.end() - 1).to_le_bytes());
        out.write_all(&h).map_err(out_err)?;
        total += 32 + copy_range(src, r.start, r.len, out, &mut buf)?;
    }
    out.flush().map_err(out_err)?;
    Ok(total)
}
