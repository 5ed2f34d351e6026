//! Exports of an image's memory for forensic tools: LiME (Volatility, avml),
//! ELF core in QEMU's `dump-guest-memory` layout (`crash`, Volatility, gdb),
//! and a flat raw file.
//!
//! All exports read through [`MemorySource`], so an incremental chain exports
//! the same bytes as the full image it stands for. Each format is described
//! once as a [`FileLayout`] (which byte ranges are headers, padding or guest
//! memory), shared by the streaming export and the mounted view.

mod cpu;
mod elf;
mod layout;
mod lime;
mod raw;

use std::io::Write;

pub use cpu::{CpuRegs, DescriptorTable, Segment};
pub use elf::{write_elf_core, PRSTATUS_SIZE, QEMU_CPU_STATE_SIZE};
pub use layout::{ExportFormat, Extent, ExtentKind, FileLayout};
pub use lime::{write_lime, LIME_MAGIC};
pub use raw::write_raw;

use crate::error::{Error, Result};
use crate::header::RamRange;

/// Something that can be exported: guest RAM layout, vCPU registers and random-access memory.
pub trait MemorySource {
    /// Guest RAM ranges, sorted.
    fn ram_ranges(&self) -> Vec<RamRange>;
    /// Registers of every vCPU, in vCPU index order.
    fn cpu_regs(&mut self) -> Result<Vec<CpuRegs>>;
    /// Fills `buf` with guest memory at `gpa` (page aligned, inside one RAM range or adjacent ones).
    fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()>;
}

/// Bytes read per step while streaming a range out (bounds memory use).
const WINDOW: u64 = 16 << 20;

/// The error for a failed write to the export destination.
fn out_err(e: std::io::Error) -> Error {
    Error::io("write", "export output", e)
}

/// Streams `len` bytes of guest memory from `start` to `out`; returns bytes written.
fn copy_range(
    src: &mut impl MemorySource,
    start: u64,
    len: u64,
    out: &mut impl Write,
    buf: &mut Vec<u8>,
) -> Result<u64> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(WINDOW) as usize;
        buf.resize(n, 0);
        src.read_into(start + done, &mut buf[..n])?;
        out.write_all(&buf[..n]).map_err(out_err)?;
        done += n as u64;
    }
    Ok(len)
}

/// Writes `n` zero bytes.
fn write_zeros(out: &mut impl Write, mut n: u64) -> Result<()> {
    let z = [0u8; 64 << 10];
    while n > 0 {
        let k = n.min(z.len() as u64) as usize;
        out.write_all(&z[..k]).map_err(out_err)?;
        n -= k as u64;
    }
    Ok(())
}
