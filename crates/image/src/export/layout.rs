//! `FileLayout`: which byte ranges of an export file are format headers,
//! which are zero padding and which map to guest-physical memory.
//!
//! Computed once per format from the RAM ranges (and, for ELF, the vCPU
//! registers), then used both to stream a whole export (`ferry image export`)
//! and to serve random reads of it without writing it (`ferry image mount`),
//! so both produce the same bytes by construction.

use std::io::Write;

use serde::Serialize;

use super::{copy_range, out_err, write_zeros, MemorySource};
use crate::error::{Error, Result};
use crate::header::PAGE_SIZE;

/// An export format.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ExportFormat {
    /// Flat guest-physical memory: file offset = address.
    Raw,
    /// LiME: a 32-byte header before each RAM range.
    Lime,
    /// ELF64 core in QEMU's `dump-guest-memory` layout.
    Elf,
}

impl ExportFormat {
    /// Parses a format name as the CLI takes it (`raw`, `lime`, `elf`).
    pub fn parse(name: &str) -> Option<Self> {
        match name {
            "raw" => Some(ExportFormat::Raw),
            "lime" => Some(ExportFormat::Lime),
            "elf" => Some(ExportFormat::Elf),
            _ => None,
        }
    }

    /// The layout of this format for `src`'s memory (reads the vCPU registers for ELF).
    pub fn layout(self, src: &mut impl MemorySource) -> Result<FileLayout> {
        let ranges = src.ram_ranges();
        match self {
            ExportFormat::Raw => Ok(super::raw::layout(&ranges)),
            ExportFormat::Lime => Ok(super::lime::layout(&ranges)),
            ExportFormat::Elf => super::elf::layout(&ranges, &src.cpu_regs()?),
        }
    }
}

/// What one extent of an export file holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Format bytes (headers, notes), held in memory.
    Bytes(Vec<u8>),
    /// Zero padding (not guest memory).
    Zeros,
    /// Guest memory starting at this guest-physical address (page aligned).
    Memory {
        /// Guest-physical address of the extent's first byte.
        gpa: u64,
    },
}

/// One contiguous piece of an export file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Extent {
    /// File offset of the first byte.
    pub offset: u64,
    /// Length in bytes (never zero).
    pub len: u64,
    /// What the bytes are.
    pub kind: ExtentKind,
}

/// The whole file as a sorted, gap-free list of extents.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileLayout {
    extents: Vec<Extent>,
    size: u64,
}

impl FileLayout {
    /// Appends `len` bytes of `kind` (empty pieces are dropped).
    pub(crate) fn push(&mut self, len: u64, kind: ExtentKind) {
        if len == 0 {
            return;
        }
        self.extents.push(Extent { offset: self.size, len, kind });
        self.size += len;
    }

    /// Appends format bytes.
    pub(crate) fn push_bytes(&mut self, b: Vec<u8>) {
        self.push(b.len() as u64, ExtentKind::Bytes(b));
    }

    /// File size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// The extents, in file order.
    pub fn extents(&self) -> &[Extent] {
        &self.extents
    }

    /// Writes the whole file: what `ferry image export` produces. Returns bytes written.
    pub fn write_to(&self, src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
        let mut buf = Vec::new();
        for e in &self.extents {
            match &e.kind {
                ExtentKind::Bytes(b) => out.write_all(b).map_err(out_err)?,
                ExtentKind::Zeros => write_zeros(out, e.len)?,
                ExtentKind::Memory { gpa } => {
                    copy_range(src, *gpa, e.len, out, &mut buf)?;
                }
            }
        }
        out.flush().map_err(out_err)?;
        Ok(self.size)
    }

    /// Reads up to `buf.len()` bytes at file `offset` (any alignment) and returns how
    /// many were read: fewer only at the end of the file, 0 at or past it. Guest
    /// memory is read through `src` in page-aligned pieces.
    pub fn read_at(&self, src: &mut impl MemorySource, offset: u64, buf: &mut [u8]) -> Result<usize> {
        if offset >= self.size {
            return Ok(0);
        }
        let n = (self.size - offset).min(buf.len() as u64) as usize;
        let buf = &mut buf[..n];
        let mut tmp = Vec::new();
        let first = self.extents.partition_point(|e| e.offset + e.len <= offset);
        let mut done = 0usize;
        for e in &self.extents[first..] {
            if done == n {
                break;
            }
            let at = offset + done as u64;
            let skip = at - e.offset;
            let k = (e.len - skip).min((n - done) as u64) as usize;
            let dst = &mut buf[done..done + k];
            match &e.kind {
                ExtentKind::Bytes(b) => dst.copy_from_slice(&b[skip as usize..skip as usize + k]),
                ExtentKind::Zeros => dst.fill(0),
                ExtentKind::Memory { gpa } => read_memory(src, gpa + skip, dst, &mut tmp)?,
            }
            done += k;
        }
        Ok(done)
    }

    /// The file ranges that hold data, as sorted, merged (offset, len) pairs, given the
    /// guest-physical extents whose memory is data (`mem_data`, sorted, as
    /// `ImageChain::data_extents` gives them). Format bytes count as data; zero padding
    /// and memory outside `mem_data` are holes (for SEEK_DATA/SEEK_HOLE and block counts).
    pub fn data_regions(&self, mem_data: &[(u64, u64)]) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut add = |off: u64, len: u64| match out.last_mut() {
            Some(last) if last.0 + last.1 == off => last.1 += len,
            _ => out.push((off, len)),
        };
        for e in &self.extents {
            match &e.kind {
                ExtentKind::Bytes(_) => add(e.offset, e.len),
                ExtentKind::Zeros => {}
                ExtentKind::Memory { gpa } => {
                    let (start, end) = (*gpa, gpa + e.len);
                    let i = mem_data.partition_point(|&(g, l)| g + l <= start);
                    for &(g, l) in &mem_data[i..] {
                        if g >= end {
                            break;
                        }
                        let (a, b) = (g.max(start), (g + l).min(end));
                        add(e.offset + (a - start), b - a);
                    }
                }
            }
        }
        out
    }
}

/// Fills `dst` with guest memory at `gpa` (any alignment), reading whole pages through `src`.
fn read_memory(src: &mut impl MemorySource, gpa: u64, dst: &mut [u8], tmp: &mut Vec<u8>) -> Result<()> {
    let end = gpa
        .checked_add(dst.len() as u64)
        .ok_or_else(|| Error::InvalidArgument(format!("read at {gpa:#x} overflows")))?;
    if gpa % PAGE_SIZE == 0 && end % PAGE_SIZE == 0 {
        return src.read_into(gpa, dst);
    }
    let a = gpa - gpa % PAGE_SIZE;
    let b = end.next_multiple_of(PAGE_SIZE);
    tmp.resize((b - a) as usize, 0);
    src.read_into(a, tmp)?;
    let from = (gpa - a) as usize;
    dst.copy_from_slice(&tmp[from..from + dst.len()]);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::export::CpuRegs;
    use crate::header::RamRange;

    /// Memory whose every byte is a function of its address, for checking offsets.
    struct Pattern(Vec<RamRange>);

    impl MemorySource for Pattern {
        fn ram_ranges(&self) -> Vec<RamRange> {
            self.0.clone()
        }
        fn cpu_regs(&mut self) -> Result<Vec<CpuRegs>> {
            Ok(vec![CpuRegs { rip: 0x1234, cr3: 0x9000, ..Default::default() }; 2])
        }
        fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
            assert!(gpa % PAGE_SIZE == 0 && buf.len() as u64 % PAGE_SIZE == 0, "unaligned read {gpa:#x}");
            for (i, b) in buf.iter_mut().enumerate() {
                let a = gpa + i as u64;
                *b = (a ^ (a >> 8) ^ (a >> 16)) as u8;
            }
            Ok(())
        }
    }

    fn src() -> Pattern {
        Pattern(vec![RamRange::new(0x1000, 0x3000), RamRange::new(0x10000, 0x2000)])
    }

    #[test]
    fn random_reads_equal_the_streamed_file_in_every_format() {
        for f in [ExportFormat::Raw, ExportFormat::Lime, ExportFormat::Elf] {
            let mut s = src();
            let l = f.layout(&mut s).unwrap();
            let mut whole = Vec::new();
            assert_eq!(l.write_to(&mut s, &mut whole).unwrap(), l.size());
            assert_eq!(whole.len() as u64, l.size(), "{f:?}");
            // Every window size and start, including ones crossing extents and the end.
            for &len in &[1usize, 7, 4096, 5000, 20000] {
                for off in (0..l.size() + 10).step_by(997) {
                    let mut buf = vec![0xaa; len];
                    let n = l.read_at(&mut s, off, &mut buf).unwrap();
                    let want = &whole[(off as usize).min(whole.len())..(off as usize + len).min(whole.len())];
                    assert_eq!(&buf[..n], want, "{f:?} at {off} len {len}");
                }
            }
            assert_eq!(l.read_at(&mut s, l.size(), &mut [0u8; 16]).unwrap(), 0);
            assert_eq!(l.read_at(&mut s, u64::MAX, &mut [0u8; 16]).unwrap(), 0);
        }
    }

    #[test]
    fn data_regions_map_memory_extents_to_file_offsets() {
        let mut s = src();
        let raw = ExportFormat::Raw.layout(&mut s).unwrap();
        // Raw: the hole before the first range is padding; memory maps 1:1.
        assert_eq!(raw.data_regions(&[(0x2000, 0x1000), (0x10000, 0x2000)]), vec![(0x2000, 0x1000), (0x10000, 0x2000)]);
        let lime = ExportFormat::Lime.layout(&mut s).unwrap();
        // LiME: header 32, range 1 (0x3000), header 32, range 2.
        assert_eq!(lime.data_regions(&[(0x1000, 0x1000)]), vec![(0, 32 + 0x1000), (32 + 0x3000, 32)]);
        assert_eq!(lime.data_regions(&[]), vec![(0, 32), (32 + 0x3000, 32)]);
    }
}
