//! x86-64 page-table walks (4- and 5-level; 4 KiB, 2 MiB and 1 GiB pages).
//!
//! A walk either ends at a page (with the effective writable, user and NX
//! bits of the whole path) or stops at one level with a reason: an entry
//! not present, a table outside guest memory, a reserved bit, a table that
//! is already on the path (a loop), or a non-canonical address.

use std::fmt;

use ferry_image::CpuRegs;
use serde::Serialize;

use crate::error::{Error, Result};
use crate::mem::PhysMem;

/// Bits 12..51 of an entry: the next table's (or the page's) address.
const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;
const PRESENT: u64 = 1;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const PS: u64 = 1 << 7;
const NX: u64 = 1 << 63;

/// A paging-structure level, top (PML5) to bottom (PT).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
pub enum Level {
    /// Page-map level 5 (only with LA57).
    #[serde(rename = "PML5")]
    Pml5,
    /// Page-map level 4.
    #[serde(rename = "PML4")]
    Pml4,
    /// Page-directory-pointer table (entries may map 1 GiB pages).
    #[serde(rename = "PDPT")]
    Pdpt,
    /// Page directory (entries may map 2 MiB pages).
    #[serde(rename = "PD")]
    Pd,
    /// Page table (entries map 4 KiB pages).
    #[serde(rename = "PT")]
    Pt,
}

impl Level {
    /// Bit position of the lowest virtual-address bit this level's index covers.
    pub fn shift(self) -> u32 {
        match self {
            Level::Pml5 => 48,
            Level::Pml4 => 39,
            Level::Pdpt => 30,
            Level::Pd => 21,
            Level::Pt => 12,
        }
    }

    /// The next level down (None below PT).
    pub fn next(self) -> Option<Level> {
        match self {
            Level::Pml5 => Some(Level::Pml4),
            Level::Pml4 => Some(Level::Pdpt),
            Level::Pdpt => Some(Level::Pd),
            Level::Pd => Some(Level::Pt),
            Level::Pt => None,
        }
    }

    /// Whether bit 7 may be set here: PS at PDPT (1 GiB) and PD (2 MiB), PAT in a PT entry.
    pub fn allows_large(self) -> bool {
        matches!(self, Level::Pdpt | Level::Pd | Level::Pt)
    }
}

impl fmt::Display for Level {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Level::Pml5 => "PML5",
            Level::Pml4 => "PML4",
            Level::Pdpt => "PDPT",
            Level::Pd => "PD",
            Level::Pt => "PT",
        })
    }
}

/// Which page tables to walk: the root (CR3) and 4 or 5 levels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PagingContext {
    /// Physical address of the top-level table (CR3 without its flag and PCID bits).
    pub root: u64,
    /// 4 or 5.
    pub levels: u8,
}

impl PagingContext {
    /// From a CR3 value and the level count (PCID and flag bits are masked off).
    pub fn from_cr3(cr3: u64, five_level: bool) -> Self {
        PagingContext { root: cr3 & ADDR_MASK, levels: if five_level { 5 } else { 4 } }
    }

    /// From a vCPU's registers: needs CR0.PG, CR4.PAE and EFER.LMA; CR4.LA57 selects 5 levels.
    pub fn from_regs(vcpu: usize, r: &CpuRegs) -> Result<Self> {
        let bad = |reason| Error::UnsupportedPaging { vcpu, cr0: r.cr0, cr4: r.cr4, efer: r.efer, reason };
        if r.cr0 & (1 << 31) == 0 {
            return Err(bad("paging is off (CR0.PG clear)"));
        }
        if r.cr4 & (1 << 5) == 0 {
            return Err(bad("32-bit paging (CR4.PAE clear)"));
        }
        if r.efer & (1 << 10) == 0 {
            return Err(bad("PAE paging outside long mode (EFER.LMA clear)"));
        }
        Ok(Self::from_cr3(r.cr3, r.cr4 & (1 << 12) != 0))
    }

    /// The top level.
    pub fn top(&self) -> Level {
        if self.levels == 5 {
            Level::Pml5
        } else {
            Level::Pml4
        }
    }

    /// Number of meaningful virtual-address bits (48 or 57).
    pub fn va_bits(&self) -> u32 {
        if self.levels == 5 {
            57
        } else {
            48
        }
    }

    /// Whether `va` is canonical (bits above `va_bits` copy the top one).
    pub fn canonical(&self, va: u64) -> bool {
        let s = 64 - self.va_bits();
        ((va << s) as i64 >> s) as u64 == va
    }

    /// Sign-extends a `va_bits`-wide address (what enumerating the tables produces).
    pub fn sign_extend(&self, va: u64) -> u64 {
        let s = 64 - self.va_bits();
        ((va << s) as i64 >> s) as u64
    }
}

/// Effective permissions of a mapping (combined over all levels of its walk).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize)]
pub struct PageFlags {
    /// Writable at every level (R/W set everywhere).
    pub writable: bool,
    /// User-accessible at every level (U/S set everywhere).
    pub user: bool,
    /// Not executable (XD set at some level).
    pub nx: bool,
}

impl PageFlags {
    /// Flags of the path so far combined with one more entry.
    fn and_entry(self, e: u64) -> Self {
        PageFlags {
            writable: self.writable && e & WRITABLE != 0,
            user: self.user && e & USER != 0,
            nx: self.nx || e & NX != 0,
        }
    }

    /// The flags of a path before any entry.
    pub(crate) fn top() -> Self {
        PageFlags { writable: true, user: true, nx: false }
    }
}

impl fmt::Display for PageFlags {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}{}{}",
            if self.writable { "w" } else { "-" },
            if self.user { "u" } else { "-" },
            if self.nx { "-" } else { "x" }
        )
    }
}

/// One entry read during a walk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct Step {
    /// The table's level.
    pub level: Level,
    /// Physical address of the table.
    pub table: u64,
    /// Index of the entry in the table (0..512).
    pub index: u16,
    /// Physical address of the entry.
    pub entry_addr: u64,
    /// The entry's value.
    pub entry: u64,
}

/// Why a walk stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum StopReason {
    /// The entry's present bit is clear.
    NotPresent,
    /// The table (or the entry in it) is not in guest RAM.
    OutsideMemory {
        /// Physical address that is outside.
        addr: u64,
    },
    /// The entry points to a table already used higher up on this walk.
    Loop {
        /// The table it points to.
        table: u64,
        /// The level that table was first used at.
        first_level: Level,
    },
    /// A bit that must be zero here is set (PS in a PML5 or PML4 entry).
    Reserved {
        /// Which bit.
        bit: &'static str,
    },
    /// The address is not canonical for this paging mode.
    NonCanonical,
}

/// A walk that did not reach a page: where and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Stop {
    /// The virtual address.
    pub va: u64,
    /// The level whose table or entry stopped the walk.
    pub level: Level,
    /// Why.
    pub reason: StopReason,
    /// Entries read before the stop (the last one is the offending entry when it could be read).
    pub steps: Vec<Step>,
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let last = self.steps.last().filter(|s| s.level == self.level);
        match (self.reason, last) {
            (StopReason::NotPresent, Some(s)) => write!(
                f,
                "walk stopped at {}: entry {} at {:#x} = {:#x} is not present",
                self.level, s.index, s.entry_addr, s.entry
            ),
            (StopReason::NotPresent, None) => write!(f, "walk stopped at {}: not present", self.level),
            (StopReason::OutsideMemory { addr }, _) => {
                write!(f, "walk stopped at {}: the table at {addr:#x} is outside guest memory", self.level)
            }
            (StopReason::Loop { table, first_level }, _) => write!(
                f,
                "walk stopped at {}: its entry points to the table at {table:#x}, already used as the {first_level} (the page tables loop)",
                self.level
            ),
            (StopReason::Reserved { bit }, Some(s)) => write!(
                f,
                "walk stopped at {}: entry {} at {:#x} = {:#x} has reserved bit {bit} set",
                self.level, s.index, s.entry_addr, s.entry
            ),
            (StopReason::Reserved { bit }, None) => write!(f, "walk stopped at {}: reserved bit {bit}", self.level),
            (StopReason::NonCanonical, _) => write!(f, "not canonical for {}-level paging", self.level_count()),
        }
    }
}

impl Stop {
    fn level_count(&self) -> u8 {
        if self.steps.first().map(|s| s.level) == Some(Level::Pml5) || self.level == Level::Pml5 {
            5
        } else {
            4
        }
    }
}

/// A virtual address translated to a physical one.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Translation {
    /// The virtual address.
    pub va: u64,
    /// The physical address it maps to.
    pub pa: u64,
    /// Size of the page (4096, 2 MiB or 1 GiB).
    pub page_size: u64,
    /// Physical address of the page's first byte.
    pub page_pa: u64,
    /// Effective permissions.
    pub flags: PageFlags,
    /// Every entry read, top level first.
    pub steps: Vec<Step>,
}

/// Walks the page tables for `va`: `Ok(Ok(translation))`, `Ok(Err(stop))` when the
/// tables do not map it, `Err` when memory could not be read (a corrupt image).
pub fn walk(mem: &mut dyn PhysMem, ctx: &PagingContext, va: u64) -> Result<std::result::Result<Translation, Stop>> {
    let mut steps: Vec<Step> = Vec::with_capacity(5);
    let mut level = ctx.top();
    let stop = |level, reason, steps: Vec<Step>| Ok(Err(Stop { va, level, reason, steps }));
    if !ctx.canonical(va) {
        return stop(level, StopReason::NonCanonical, steps);
    }
    let mut table = ctx.root;
    let mut flags = PageFlags::top();
    loop {
        if let Some(first) = steps.iter().find(|s| s.table == table) {
            let reason = StopReason::Loop { table, first_level: first.level };
            let above = steps.last().map(|s| s.level).unwrap_or(level);
            return stop(above, reason, steps);
        }
        let index = ((va >> level.shift()) & 0x1ff) as u16;
        let entry_addr = table + u64::from(index) * 8;
        if !mem.contains(table, 4096) {
            return stop(level, StopReason::OutsideMemory { addr: table }, steps);
        }
        let mut b = [0u8; 8];
        mem.read(entry_addr, &mut b)?;
        let entry = u64::from_le_bytes(b);
        steps.push(Step { level, table, index, entry_addr, entry });
        if entry & PRESENT == 0 {
            return stop(level, StopReason::NotPresent, steps);
        }
        flags = flags.and_entry(entry);
        let leaf = level == Level::Pt || (entry & PS != 0 && level.allows_large());
        if entry & PS != 0 && !level.allows_large() {
            return stop(level, StopReason::Reserved { bit: "PS (7)" }, steps);
        }
        if leaf {
            let page_size = 1u64 << level.shift();
            let page_pa = entry & ADDR_MASK & !(page_size - 1);
            return Ok(Ok(Translation { va, pa: page_pa | (va & (page_size - 1)), page_size, page_pa, flags, steps }));
        }
        table = entry & ADDR_MASK;
        level = level.next().expect("PT entries are leaves");
    }
}

/// Like [`walk`], with a stop turned into [`Error::NotMapped`].
pub fn translate(mem: &mut dyn PhysMem, ctx: &PagingContext, va: u64) -> Result<Translation> {
    walk(mem, ctx, va)?.map_err(|stop| Error::NotMapped { stop: Box::new(stop) })
}
