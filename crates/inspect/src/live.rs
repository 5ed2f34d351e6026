//! A running guest's RAM as [`PhysMem`].
//!
//! The guest keeps running while we read, so a read races with its writes:
//! bytes are copied out of the host mapping with volatile loads (never
//! through a Rust reference that the compiler may assume stable), every copy
//! bounded by the RAM region it lies in. A read of a page the guest is
//! writing may see part old, part new bytes (a "torn" read): a match found
//! in such a page may be gone a moment later, and one being written may be
//! missed until the next pass. That is the price of never pausing the guest
//! for a scan.

use std::sync::Arc;

use ferry_image::RamRange;
use ferry_vmm::GuestRam;

use ferry_image::CpuRegs;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::mem::{in_ram, outside, PhysMem};
use crate::paging::{translate, PagingContext, Translation};
use crate::read::{read_phys, read_virt, PhysRead, VirtRead};

/// The RAM of a running (or paused) VM, read in place.
#[derive(Clone)]
pub struct LiveMem {
    ram: Arc<GuestRam>,
    ranges: Vec<RamRange>,
    /// Extents a scan reads (all of RAM unless [`LiveMem::with_extents`] narrowed them).
    extents: Option<Vec<(u64, u64)>>,
}

impl LiveMem {
    /// Reads `ram` (the VM's own mapping: no copy is made).
    pub fn new(ram: Arc<GuestRam>) -> Self {
        let ranges = ram.regions().iter().map(|r| RamRange::new(r.gpa, r.len)).collect();
        LiveMem { ram, ranges, extents: None }
    }

    /// The same memory, but a scan reads only `extents` (address, bytes): the
    /// pages a watch found dirty. Reads anywhere in RAM still work.
    pub fn with_extents(&self, extents: Vec<(u64, u64)>) -> Self {
        LiveMem { ram: self.ram.clone(), ranges: self.ranges.clone(), extents: Some(extents) }
    }
}

/// Copies `dst.len()` bytes from host address `src` with volatile loads:
/// single bytes up to 8-byte alignment, then words, then the tail.
///
/// # Safety
/// `src..src + dst.len()` must be mapped and readable for the whole call.
unsafe fn copy_volatile(src: *const u8, dst: &mut [u8]) {
    let n = dst.len();
    let head = (src.align_offset(8)).min(n);
    let mut i = 0;
    while i < head {
        // SAFETY: inside the caller's range.
        dst[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
    while i + 8 <= n {
        // SAFETY: inside the caller's range, 8-byte aligned after the head.
        let w = unsafe { std::ptr::read_volatile(src.add(i) as *const u64) };
        dst[i..i + 8].copy_from_slice(&w.to_ne_bytes());
        i += 8;
    }
    while i < n {
        // SAFETY: inside the caller's range.
        dst[i] = unsafe { std::ptr::read_volatile(src.add(i)) };
        i += 1;
    }
}

impl PhysMem for LiveMem {
    fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        let len = buf.len() as u64;
        if !in_ram(&self.ranges, gpa, len) {
            return Err(outside(&self.ranges, gpa, len));
        }
        // Adjacent regions count as one RAM span: copy region by region.
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let Some(r) = self.ram.regions().iter().find(|r| r.gpa <= at && at < r.end()) else {
                return Err(outside(&self.ranges, gpa, len));
            };
            let n = ((r.end() - at) as usize).min(buf.len() - done);
            let src = r.host.wrapping_add((at - r.gpa) as usize) as *const u8;
            // SAFETY: at..at+n lies inside region r, whose mapping lives as long as `ram`.
            unsafe { copy_volatile(src, &mut buf[done..done + n]) };
            done += n;
        }
        Ok(())
    }

    fn data_extents(&mut self) -> Result<Vec<(u64, u64)>> {
        Ok(match &self.extents {
            Some(e) => e.clone(),
            None => self.ranges.iter().map(|r| (r.start, r.len)).collect(),
        })
    }

    fn try_clone(&self) -> Result<Option<Box<dyn PhysMem + Send>>> {
        Ok(Some(Box::new(self.clone())))
    }
}

/// A read of a running guest's memory (the body of `PUT /vm/memory/read`).
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReadRequest {
    /// Guest-physical address (give this or `virt`).
    #[serde(default)]
    pub phys: Option<u64>,
    /// Virtual address, through the page tables of `vcpu` (or `cr3`).
    #[serde(default)]
    pub virt: Option<u64>,
    /// Bytes to read (1..=[`crate::MAX_READ`]).
    #[serde(default = "default_len")]
    pub len: u64,
    /// Whose page tables (default 0).
    #[serde(default)]
    pub vcpu: Option<usize>,
    /// Walk the tables at this physical address instead (paging mode of `vcpu`).
    #[serde(default)]
    pub cr3: Option<u64>,
}

fn default_len() -> u64 {
    64
}

/// Which page tables to list (the body of `PUT /vm/memory/maps`).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MapsRequest {
    /// Whose page tables (default 0).
    #[serde(default)]
    pub vcpu: Option<usize>,
    /// Walk the tables at this physical address instead (paging mode of `vcpu`).
    #[serde(default)]
    pub cr3: Option<u64>,
}

impl ReadRequest {
    /// Checks the request's shape; the addresses are checked when read.
    pub fn validate(&self) -> Result<()> {
        match (self.phys, self.virt) {
            (Some(_), None) | (None, Some(_)) => Ok(()),
            _ => Err(Error::BadLength { len: self.len, reason: "give exactly one of phys and virt".into() }),
        }
    }

    /// Whether the read needs a vCPU's registers.
    pub fn needs_paging(&self) -> bool {
        self.virt.is_some()
    }
}

/// The page tables of vCPU `vcpu` (its `regs`), or those at `cr3` in its paging mode.
pub fn live_context(vcpu: usize, regs: &CpuRegs, cr3: Option<u64>) -> Result<PagingContext> {
    match cr3 {
        Some(c) => Ok(PagingContext::from_cr3(c, regs.cr4 & (1 << 12) != 0)),
        None => PagingContext::from_regs(vcpu, regs),
    }
}

/// What a live read returns: physical bytes, or a virtual read with its translation.
#[derive(Clone, Debug, Serialize)]
#[serde(untagged)]
pub enum LiveRead {
    /// `phys` was given.
    Phys(PhysRead),
    /// `virt` was given.
    Virt {
        /// The walk of the first byte's address.
        translation: Translation,
        /// The bytes and where each page's part came from.
        read: VirtRead,
    },
}

/// Carries out `req` on `mem` (`ctx`: the page tables, needed for `virt`).
pub fn read_live(mem: &mut dyn PhysMem, req: &ReadRequest, ctx: Option<&PagingContext>) -> Result<LiveRead> {
    req.validate()?;
    if let Some(pa) = req.phys {
        return Ok(LiveRead::Phys(read_phys(mem, pa, req.len)?));
    }
    let va = req.virt.unwrap_or(0);
    let Some(ctx) = ctx else {
        return Err(Error::BadLength { len: req.len, reason: "a virtual read needs page tables".into() });
    };
    let translation = translate(mem, ctx, va)?;
    let read = read_virt(mem, ctx, va, req.len)?;
    Ok(LiveRead::Virt { translation, read })
}

#[cfg(test)]
mod tests {
    use super::copy_volatile;

    #[test]
    fn volatile_copy_handles_every_alignment_and_length() {
        let src: Vec<u8> = (0..200u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for len in [0usize, 1, 7, 8, 9, 15, 16, 17, 100] {
                let mut dst = vec![0u8; len];
                // SAFETY: start+len <= 200, inside `src`.
                unsafe { copy_volatile(src.as_ptr().add(start), &mut dst) };
                assert_eq!(dst, &src[start..start + len], "start {start} len {len}");
            }
        }
    }
}
