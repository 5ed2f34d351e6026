//! `ImageChain`: an incremental image and its ancestors, read as one memory.
//!
//! Each child records its parent's root hash and a path hint; opening a chain
//! follows the hints and refuses any parent whose root hash differs, so a
//! child can never be applied on top of the wrong base.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::crypto::UserKey;
use crate::error::{Error, Result};
use crate::export::{CpuRegs, MemorySource};
use crate::hash::Hash32;
use crate::header::RamRange;
use crate::pagemap::{fill, PageMap, Src};
use crate::reader::{check_in_ram, ImageReader, RunData, VerifyReport};

/// Longest chain followed before assuming a cycle of parent hints.
pub const MAX_CHAIN_LEN: usize = 256;

/// A full image followed by zero or more incremental images, root first.
pub struct ImageChain {
    images: Vec<ImageReader>,
    map: Option<PageMap>,
    finals: Option<FinalIndex>,
}

/// For each chunk of the chain (members root first, chunks in file order),
/// the extents of guest memory whose final contents it holds.
struct FinalIndex {
    /// Global chunk number of each member's first chunk (plus the total at the end).
    member_first: Vec<usize>,
    /// `extents[starts[g]..starts[g + 1]]` belong to global chunk `g`.
    starts: Vec<usize>,
    /// (guest-physical address, pages, first page within the chunk's decoded data).
    extents: Vec<(u64, u32, u32)>,
}

/// Opens the image at `path` and all its ancestors; see [`ImageChain::open`].
pub fn open_chain(path: &Path, key: Option<&UserKey>) -> Result<ImageChain> {
    ImageChain::open(path, key)
}

/// Where a child's parent hint points: absolute, or relative to the child's directory.
pub fn resolve_parent_path(child: &Path, hint: &str) -> PathBuf {
    let h = Path::new(hint);
    if h.is_absolute() {
        h.to_path_buf()
    } else {
        child.parent().unwrap_or_else(|| Path::new("")).join(h)
    }
}

impl ImageChain {
    /// Opens `path` and follows parent hints to the full image, checking each
    /// parent's root hash and memory layout. All members use the same key.
    pub fn open(path: &Path, key: Option<&UserKey>) -> Result<Self> {
        let mut images = vec![ImageReader::open(path, key)?];
        loop {
            let child = images.last().expect("non-empty");
            let Some(parent) = child.header().parent.clone() else {
                break;
            };
            if images.len() >= MAX_CHAIN_LEN {
                return Err(Error::ChainTooLong { path: child.path().to_path_buf(), max: MAX_CHAIN_LEN });
            }
            let ppath = resolve_parent_path(child.path(), &parent.path_hint);
            let file = File::open(&ppath).map_err(|source| Error::MissingParent {
                child: child.path().to_path_buf(),
                parent: ppath.clone(),
                source,
            })?;
            let p = ImageReader::from_file(&ppath, file, key)?;
            if p.root_hash() != parent.root_hash {
                return Err(Error::ParentMismatch {
                    child: child.path().to_path_buf(),
                    parent: ppath,
                    expected: parent.root_hash,
                    found: p.root_hash(),
                });
            }
            if p.ranges() != child.ranges() {
                return Err(Error::ParentLayoutMismatch {
                    child: child.path().to_path_buf(),
                    parent: ppath,
                    reason: format!("RAM ranges {:?} vs {:?}", p.ranges(), child.ranges()),
                });
            }
            images.push(p);
        }
        images.reverse();
        Ok(ImageChain { images, map: None, finals: None })
    }

    /// The members, full image first, the opened image last.
    pub fn images(&self) -> &[ImageReader] {
        &self.images
    }

    /// The image the chain was opened from.
    pub fn leaf(&mut self) -> &mut ImageReader {
        self.images.last_mut().expect("a chain has at least one image")
    }

    /// Guest RAM ranges (identical in all members).
    pub fn ranges(&self) -> &[RamRange] {
        self.images[0].ranges()
    }

    /// Root hash of the leaf image.
    pub fn root_hash(&self) -> Hash32 {
        self.images.last().expect("non-empty").root_hash()
    }

    /// The leaf's VM state (the state at the time of the newest image).
    pub fn state(&mut self) -> Result<Vec<u8>> {
        self.leaf().state()
    }

    /// The leaf's vCPU registers.
    pub fn cpus(&mut self) -> Result<Vec<CpuRegs>> {
        self.leaf().cpus()
    }

    /// Replays all members' records, parent first, children overriding; apply to zero-filled memory.
    pub fn read_runs(&mut self, mut visit: impl FnMut(u64, RunData<'_>) -> Result<()>) -> Result<()> {
        for img in &mut self.images {
            img.read_runs(&mut visit)?;
        }
        Ok(())
    }

    /// Like `read_runs` with zero runs as zero-filled slices.
    pub fn read_memory(&mut self, mut visit: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        for img in &mut self.images {
            img.read_memory(&mut visit)?;
        }
        Ok(())
    }

    /// Builds the resolved page map on first use.
    fn build_map(&mut self) {
        if self.map.is_none() {
            let mut m = PageMap::default();
            for (im, img) in self.images.iter().enumerate() {
                for (i, c) in img.dec.chunks.iter().enumerate() {
                    m.apply_chunk(im as u16, i as u32, &c.runs);
                }
            }
            self.map = Some(m);
        }
    }

    /// Reads the chain's resulting memory at `gpa` (page aligned) by random access.
    pub fn read_at(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        check_in_ram(self.ranges(), gpa, buf.len() as u64)?;
        self.build_map();
        let map = self.map.as_ref().expect("built above");
        let mut decs: Vec<_> = self.images.iter_mut().map(|r| &mut r.dec).collect();
        fill(map, &mut decs, gpa, buf)
    }

    /// Visits the chain's resulting memory over `gpa..gpa + len` (both page aligned) in
    /// address order without copying it: data as slices of the decoded chunks, zero memory
    /// (zero runs, pages never recorded) as page counts. For consumers that only look at
    /// the bytes (comparisons), where a copy into a buffer costs as much as their own work.
    pub fn visit_range(
        &mut self,
        gpa: u64,
        len: u64,
        mut visit: impl FnMut(u64, RunData<'_>) -> Result<()>,
    ) -> Result<()> {
        const PAGE: u64 = crate::header::PAGE_SIZE;
        if gpa % PAGE != 0 || len % PAGE != 0 {
            return Err(Error::InvalidArgument(format!(
                "visit at {gpa:#x} of {len} bytes: address and length must be multiples of 4096"
            )));
        }
        check_in_ram(self.ranges(), gpa, len)?;
        self.build_map();
        let map = self.map.as_ref().expect("built above");
        let (first, end) = (gpa / PAGE, (gpa + len) / PAGE);
        let mut at = first;
        for (p, n, src) in map.query(first, end - first) {
            if p > at {
                visit(at * PAGE, RunData::Zero { npages: p - at })?;
            }
            match src {
                Src::Zero => visit(p * PAGE, RunData::Zero { npages: n })?,
                Src::Data { image, chunk, page } => {
                    let dec = &mut self.images[image as usize].dec;
                    let from = page as usize * PAGE as usize;
                    let bytes = n as usize * PAGE as usize;
                    let data = dec.load(chunk)?;
                    match data.get(from..from + bytes) {
                        Some(d) => visit(p * PAGE, RunData::Data(d))?,
                        None => return Err(dec.corrupt(chunk, "run extends past the chunk's data")),
                    }
                }
            }
            at = p + n;
        }
        if end > at {
            visit(at * PAGE, RunData::Zero { npages: end - at })?;
        }
        Ok(())
    }

    /// Number of chunks over all members: the numbering of [`ImageChain::read_final_chunk`]
    /// (the root's chunks first, each member's in file order).
    pub fn chunk_count(&self) -> usize {
        self.images.iter().map(|i| i.dec.chunks.len()).sum()
    }

    /// Builds the index of final contents per chunk on first use.
    fn build_finals(&mut self) {
        if self.finals.is_some() {
            return;
        }
        self.build_map();
        let mut member_first = Vec::with_capacity(self.images.len() + 1);
        let mut total = 0usize;
        for img in &self.images {
            member_first.push(total);
            total += img.dec.chunks.len();
        }
        member_first.push(total);
        let end_page = self.ranges().iter().map(|r| r.end()).max().unwrap_or(0) / crate::header::PAGE_SIZE;
        let map = self.map.as_ref().expect("built above");
        let mut all: Vec<(usize, u32, u64, u32)> = map
            .query(0, end_page)
            .into_iter()
            .filter_map(|(p, n, src)| match src {
                Src::Zero => None,
                Src::Data { image, chunk, page } => {
                    Some((member_first[image as usize] + chunk as usize, page, p * crate::header::PAGE_SIZE, n as u32))
                }
            })
            .collect();
        all.sort_unstable();
        let mut starts = vec![0usize; total + 1];
        for &(g, ..) in &all {
            starts[g + 1] += 1;
        }
        for g in 0..total {
            starts[g + 1] += starts[g];
        }
        let extents = all.into_iter().map(|(_, page, gpa, n)| (gpa, n, page)).collect();
        self.finals = Some(FinalIndex { member_first, starts, extents });
    }

    /// The guest-physical extents whose final contents are data, as (address, bytes), sorted
    /// and merged where adjacent; everything else reads as zero. Lets a scanner skip zero
    /// memory without reading it.
    pub fn data_extents(&mut self) -> Vec<(u64, u64)> {
        self.build_map();
        let end_page = self.ranges().iter().map(|r| r.end()).max().unwrap_or(0) / crate::header::PAGE_SIZE;
        let map = self.map.as_ref().expect("built above");
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (p, n, src) in map.query(0, end_page) {
            if src == Src::Zero {
                continue;
            }
            let (gpa, len) = (p * crate::header::PAGE_SIZE, n * crate::header::PAGE_SIZE);
            match out.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += len,
                _ => out.push((gpa, len)),
            }
        }
        out
    }

    /// Pages whose final contents are recorded as data (not as zero runs):
    /// what a restore has to write.
    pub fn final_data_pages(&mut self) -> u64 {
        self.build_finals();
        self.finals.as_ref().expect("built above").extents.iter().map(|e| u64::from(e.1)).sum()
    }

    /// Reads, checks and decodes chunk `index` of the chain (see
    /// [`ImageChain::chunk_count`]) and visits the extents of guest memory
    /// whose final contents it holds, as (guest-physical address, bytes).
    /// Pages that a later record overrides are left out, so the chunks'
    /// extents are disjoint and can be applied in any order, by several
    /// chain handles in parallel, to zero-filled memory. The chunk is checked
    /// even when none of its pages are final.
    pub fn read_final_chunk(&mut self, index: usize, mut visit: impl FnMut(u64, &[u8]) -> Result<()>) -> Result<()> {
        self.build_finals();
        let f = self.finals.as_ref().expect("built above");
        if index >= *f.member_first.last().unwrap_or(&0) {
            return Err(Error::InvalidArgument(format!("chunk {index} does not exist in this chain")));
        }
        let image = f.member_first.partition_point(|&s| s <= index) - 1;
        let chunk = (index - f.member_first[image]) as u32;
        let dec = &mut self.images[image].dec;
        let data = dec.load(chunk)?;
        for &(gpa, n, page) in &f.extents[f.starts[index]..f.starts[index + 1]] {
            let from = page as usize * crate::header::PAGE_SIZE as usize;
            let len = n as usize * crate::header::PAGE_SIZE as usize;
            match data.get(from..from + len) {
                Some(d) => visit(gpa, d)?,
                None => return Err(dec.corrupt(chunk, "run extends past the chunk's data")),
            }
        }
        Ok(())
    }

    /// The chain's resulting contents of one page.
    pub fn read_page(&mut self, gpa: u64) -> Result<Vec<u8>> {
        let mut buf = vec![0u8; crate::header::PAGE_SIZE as usize];
        self.read_at(gpa, &mut buf)?;
        Ok(buf)
    }

    /// Verifies every member, root first.
    pub fn verify(&mut self) -> Result<Vec<VerifyReport>> {
        self.images.iter_mut().map(|i| i.verify()).collect()
    }
}

impl MemorySource for ImageChain {
    fn ram_ranges(&self) -> Vec<RamRange> {
        self.ranges().to_vec()
    }

    fn cpu_regs(&mut self) -> Result<Vec<CpuRegs>> {
        self.cpus()
    }

    fn read_into(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
        self.read_at(gpa, buf)
    }
}
