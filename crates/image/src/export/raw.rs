//! Flat raw export: guest-physical memory from address 0 to the end of the last range.

use std::io::Write;

use super::layout::{ExtentKind, FileLayout};
use super::MemorySource;
use crate::error::Result;
use crate::header::RamRange;

/// The raw layout: file offset = guest-physical address; holes between (and
/// before) RAM ranges are zero padding.
pub(crate) fn layout(ranges: &[RamRange]) -> FileLayout {
    let mut l = FileLayout::default();
    for r in ranges {
        l.push(r.start.saturating_sub(l.size()), ExtentKind::Zeros);
        l.push(r.len, ExtentKind::Memory { gpa: r.start });
    }
    l
}

/// Writes guest memory as one flat file where file offset = guest-physical
/// address; holes between (and before) RAM ranges are zero. Returns bytes written.
pub fn write_raw(src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
    layout(&src.ram_ranges()).write_to(src, out)
}
