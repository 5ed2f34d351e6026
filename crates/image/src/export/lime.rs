//! LiME ("Linux Memory Extractor") format: per RAM range a 32-byte header then the bytes.

use std::io::Write;

use super::layout::{ExtentKind, FileLayout};
use super::MemorySource;
use crate::error::Result;
use crate::header::RamRange;

/// LiME header magic ("EMiL" when read as little-endian bytes).
pub const LIME_MAGIC: u32 = 0x4C69_4D45;

/// The LiME layout: for each RAM range a header (u32 magic, u32 version 1,
/// u64 start, u64 inclusive end, 8 zero bytes, all little-endian) followed by
/// the range's bytes.
pub(crate) fn layout(ranges: &[RamRange]) -> FileLayout {
    let mut l = FileLayout::default();
    for r in ranges {
        let mut h = vec![0u8; 32];
        h[0..4].copy_from_slice(&LIME_MAGIC.to_le_bytes());
        h[4..8].copy_from_slice(&1u32.to_le_bytes());
        h[8..16].copy_from_slice(&r.start.to_le_bytes());
        h[16..24].copy_from_slice(&(r.end() - 1).to_le_bytes());
        l.push_bytes(h);
        l.push(r.len, ExtentKind::Memory { gpa: r.start });
    }
    l
}

/// Writes the source's memory in LiME format (see [`layout`]). Returns bytes written.
pub fn write_lime(src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
    layout(&src.ram_ranges()).write_to(src, out)
}
