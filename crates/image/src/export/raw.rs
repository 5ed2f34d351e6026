//! Flat raw export: guest-physical memory from address 0 to the end of the last range.

use std::io::Write;

use super::{copy_range, out_err, write_zeros, MemorySource};
use crate::error::Result;

/// Writes guest memory as one flat file where file offset = guest-physical
/// address; holes between (and before) RAM ranges are zero. Returns bytes written.
pub fn write_raw(src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
    let mut buf = Vec::new();
    let mut pos = 0u64;
    for r in src.ram_ranges() {
        write_zeros(out, r.start - pos)?;
        copy_range(src, r.start, r.len, out, &mut buf)?;
        pos = r.end();
    }
    out.flush().map_err(out_err)?;
    Ok(pos)
}
