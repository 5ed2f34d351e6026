//! Guest-physical memory as the analyses see it: a trait, an image-backed
//! implementation with a small page cache (page-table walks read the same
//! few pages over and over) and a buffer-backed one.

use std::collections::HashMap;

use std::path::{Path, PathBuf};

use ferry_image::{ImageChain, RamRange, UserKey, PAGE_SIZE};

use crate::error::{Error, Result};

const PAGE: usize = PAGE_SIZE as usize;

/// Guest-physical memory: RAM ranges and reads at any address inside them.
pub trait PhysMem {
    /// Guest RAM ranges, sorted.
    fn ranges(&self) -> &[RamRange];

    /// Fills `buf` from `gpa`; errors with [`Error::OutsideMemory`] if any byte is not RAM.
    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()>;

    /// Extents (address, bytes) that may hold non-zero bytes; the rest of RAM is zero.
    /// A scanner reads only these. The default says "all of RAM".
    fn data_extents(&mut self) -> Result<Vec<(u64, u64)>> {
        Ok(self.ranges().iter().map(|r| (r.start, r.len)).collect())
    }

    /// Another handle on the same memory for a worker thread; `None` when the memory
    /// cannot be shared (then a scan runs on one thread).
    fn try_clone(&self) -> Result<Option<Box<dyn PhysMem + Send>>> {
        Ok(None)
    }

    /// Whether `gpa..gpa+len` lies in RAM (adjacent ranges count as one).
    fn contains(&self, gpa: u64, len: u64) -> bool {
        in_ram(self.ranges(), gpa, len)
    }
}

/// Whether `gpa..gpa+len` is covered by `ranges` (sorted; adjacent ranges join).
pub(crate) fn in_ram(ranges: &[RamRange], gpa: u64, len: u64) -> bool {
    let Some(end) = gpa.checked_add(len) else {
        return false;
    };
    let mut cur = gpa;
    for r in ranges {
        if r.start <= cur && cur < r.start + r.len {
            cur = r.start + r.len;
            if cur >= end {
                return true;
            }
        }
    }
    len == 0 && ranges.iter().any(|r| r.start <= gpa && gpa < r.start + r.len)
}

/// The error for a read outside RAM.
pub(crate) fn outside(ranges: &[RamRange], start: u64, len: u64) -> Error {
    let ram = ranges.iter().map(|r| format!("{:#x}..{:#x}", r.start, r.start + r.len)).collect::<Vec<_>>().join(", ");
    Error::OutsideMemory { start, end: start.saturating_add(len), ram }
}

/// An image chain as physical memory. Small reads go through a page cache;
/// page-aligned bulk reads go straight to the chain.
pub struct ImageMem {
    chain: ImageChain,
    ranges: Vec<RamRange>,
    cache: HashMap<u64, Box<[u8; PAGE]>>,
    /// How to open another handle: the leaf image and its key.
    path: PathBuf,
    key: Option<UserKey>,
}

/// Pages kept by [`ImageMem`]'s cache before it starts over (16 MiB).
const CACHE_PAGES: usize = 4096;

impl ImageMem {
    /// Opens the image at `path` and its parents (see [`ImageChain::open`]).
    pub fn open(path: &Path, key: Option<&UserKey>) -> Result<Self> {
        let chain = ImageChain::open(path, key)?;
        let ranges = chain.ranges().to_vec();
        Ok(ImageMem { chain, ranges, cache: HashMap::new(), path: path.to_path_buf(), key: key.cloned() })
    }

    /// The chain, e.g. for its vCPU registers.
    pub fn chain(&mut self) -> &mut ImageChain {
        &mut self.chain
    }

    fn page(&mut self, pfn: u64) -> Result<&[u8; PAGE]> {
        if !self.cache.contains_key(&pfn) {
            if self.cache.len() >= CACHE_PAGES {
                self.cache.clear();
            }
            let mut p = Box::new([0u8; PAGE]);
            self.chain.read_at(pfn * PAGE_SIZE, &mut p[..])?;
            self.cache.insert(pfn, p);
        }
        Ok(self.cache.get(&pfn).map(|b| &**b).expect("inserted above"))
    }
}

impl PhysMem for ImageMem {
    fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        if !in_ram(&self.ranges, gpa, buf.len() as u64) {
            return Err(outside(&self.ranges, gpa, buf.len() as u64));
        }
        if gpa.is_multiple_of(PAGE_SIZE) && buf.len().is_multiple_of(PAGE) && buf.len() > PAGE {
            return Ok(self.chain.read_at(gpa, buf)?);
        }
        let mut done = 0usize;
        while done < buf.len() {
            let at = gpa + done as u64;
            let off = (at % PAGE_SIZE) as usize;
            let n = (PAGE - off).min(buf.len() - done);
            let page = self.page(at / PAGE_SIZE)?;
            buf[done..done + n].copy_from_slice(&page[off..off + n]);
            done += n;
        }
        Ok(())
    }

    fn data_extents(&mut self) -> Result<Vec<(u64, u64)>> {
        Ok(self.chain.data_extents())
    }

    fn try_clone(&self) -> Result<Option<Box<dyn PhysMem + Send>>> {
        Ok(Some(Box::new(ImageMem::open(&self.path, self.key.as_ref())?)))
    }
}

/// Memory held in a byte buffer that starts at guest-physical 0 (hand-built
/// page tables in tests; a copy of a paused guest's RAM).
pub struct BufMem {
    bytes: Vec<u8>,
    ranges: Vec<RamRange>,
}

impl BufMem {
    /// `bytes` is guest memory from address 0; `ranges` says which parts are RAM
    /// (each must lie inside the buffer).
    pub fn new(bytes: Vec<u8>, ranges: Vec<RamRange>) -> Self {
        let len = bytes.len() as u64;
        let ranges = ranges.into_iter().filter(|r| r.start.checked_add(r.len).is_some_and(|e| e <= len)).collect();
        BufMem { bytes, ranges }
    }

    /// The whole buffer as one RAM range.
    pub fn flat(bytes: Vec<u8>) -> Self {
        let len = bytes.len() as u64;
        BufMem { bytes, ranges: vec![RamRange::new(0, len)] }
    }

    /// The bytes, for building contents.
    pub fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.bytes
    }
}

impl PhysMem for BufMem {
    fn ranges(&self) -> &[RamRange] {
        &self.ranges
    }

    fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        if !in_ram(&self.ranges, gpa, buf.len() as u64) {
            return Err(outside(&self.ranges, gpa, buf.len() as u64));
        }
        let src = usize::try_from(gpa)
            .ok()
            .and_then(|s| self.bytes.get(s..s.checked_add(buf.len())?))
            .ok_or_else(|| outside(&self.ranges, gpa, buf.len() as u64))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}
