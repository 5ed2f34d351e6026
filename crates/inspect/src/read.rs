//! Reading guest memory by physical or virtual address.
//!
//! A virtual read is split at page boundaries; each piece reports the page
//! it came from and that page's permissions, so a person sees where the bytes
//! live and a read across an unmapped page says which address stopped it.

use serde::Serialize;

use crate::error::{Error, Result};
use crate::mem::{outside, PhysMem};
use crate::paging::{translate, PageFlags, PagingContext};

/// Longest read accepted (the bytes are held in memory and printed).
pub const MAX_READ: u64 = 16 << 20;

/// Bytes read at a physical address.
#[derive(Clone, Debug, Serialize)]
pub struct PhysRead {
    /// First physical address.
    pub pa: u64,
    /// The bytes.
    #[serde(serialize_with = "as_hex")]
    pub bytes: Vec<u8>,
}

/// One page's part of a virtual read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct VirtPiece {
    /// First virtual address of the piece.
    pub va: u64,
    /// The physical address it maps to.
    pub pa: u64,
    /// Bytes in the piece.
    pub len: u64,
    /// Size of the page the piece lies in.
    pub page_size: u64,
    /// That page's effective permissions.
    pub flags: PageFlags,
}

/// Bytes read at a virtual address.
#[derive(Clone, Debug, Serialize)]
pub struct VirtRead {
    /// The page tables used.
    pub context: PagingContext,
    /// First virtual address.
    pub va: u64,
    /// Where each page's bytes came from.
    pub pieces: Vec<VirtPiece>,
    /// The bytes.
    #[serde(serialize_with = "as_hex")]
    pub bytes: Vec<u8>,
}

fn as_hex<S: serde::Serializer>(b: &[u8], s: S) -> std::result::Result<S::Ok, S::Error> {
    s.serialize_str(&hex(b))
}

/// Lower-case hex of `b`.
pub(crate) fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn check_len(len: u64) -> Result<()> {
    if len == 0 || len > MAX_READ {
        return Err(Error::BadLength { len, reason: format!("must be 1..={MAX_READ} bytes") });
    }
    Ok(())
}

/// Reads `len` bytes of guest-physical memory at `pa`.
pub fn read_phys(mem: &mut dyn PhysMem, pa: u64, len: u64) -> Result<PhysRead> {
    check_len(len)?;
    if !mem.contains(pa, len) {
        return Err(outside(mem.ranges(), pa, len));
    }
    let mut bytes = vec![0u8; len as usize];
    mem.read(pa, &mut bytes)?;
    Ok(PhysRead { pa, bytes })
}

/// Reads `len` bytes at virtual address `va` through the page tables of `ctx`.
pub fn read_virt(mem: &mut dyn PhysMem, ctx: &PagingContext, va: u64, len: u64) -> Result<VirtRead> {
    check_len(len)?;
    let mut bytes = vec![0u8; len as usize];
    let mut pieces = Vec::new();
    let mut done = 0u64;
    while done < len {
        let at = va.wrapping_add(done);
        let t = translate(mem, ctx, at)?;
        let in_page = t.page_size - (at & (t.page_size - 1));
        let n = in_page.min(len - done);
        if !mem.contains(t.pa, n) {
            return Err(outside(mem.ranges(), t.pa, n));
        }
        mem.read(t.pa, &mut bytes[done as usize..(done + n) as usize])?;
        pieces.push(VirtPiece { va: at, pa: t.pa, len: n, page_size: t.page_size, flags: t.flags });
        done += n;
    }
    Ok(VirtRead { context: *ctx, va, pieces, bytes })
}
