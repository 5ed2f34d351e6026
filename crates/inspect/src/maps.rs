//! Everything one page table maps, as virtual ranges merged into runs.
//!
//! The tables are enumerated depth first in address order. Hostile or
//! corrupt tables cannot make this run away: a table already on the current
//! path is not entered again (a loop), tables outside memory are skipped,
//! and the numbers of tables visited and runs produced are bounded; every
//! skip is counted and the first few are reported with their level.

use serde::Serialize;

use crate::error::Result;
use crate::mem::{outside, PhysMem};
use crate::paging::{Level, PageFlags, PagingContext, Stop, StopReason};

/// Tables visited before the enumeration gives up (2 GiB worth of tables).
pub const MAX_TABLES: usize = 1 << 19;
/// Runs produced before the enumeration gives up.
pub const MAX_RUNS: usize = 1 << 20;
/// Skipped entries reported one by one (all are counted).
const MAX_REPORTED_STOPS: usize = 16;

const ADDR_MASK: u64 = 0x000f_ffff_ffff_f000;

/// A virtual range mapped contiguously to physical memory with the same page size and flags.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct MapRun {
    /// First virtual address.
    pub va_start: u64,
    /// End virtual address (exclusive).
    pub va_end: u64,
    /// Physical address of `va_start`.
    pub pa_start: u64,
    /// Page size of every page in the run.
    pub page_size: u64,
    /// Effective permissions.
    pub flags: PageFlags,
}

impl MapRun {
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.va_end.wrapping_sub(self.va_start)
    }

    /// Whether the run is empty (never, for runs from [`maps`]).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The virtual address that maps physical `pa`, if this run covers it.
    pub fn va_of(&self, pa: u64) -> Option<u64> {
        (pa >= self.pa_start && pa - self.pa_start < self.len()).then(|| self.va_start + (pa - self.pa_start))
    }
}

/// What [`maps`] found.
#[derive(Clone, Debug, Serialize)]
pub struct MapsReport {
    /// The tables enumerated.
    pub context: PagingContext,
    /// Mapped runs in virtual-address order.
    pub runs: Vec<MapRun>,
    /// Bytes mapped (sum of the runs).
    pub mapped_bytes: u64,
    /// Pages by size: 4 KiB, 2 MiB, 1 GiB.
    pub pages_4k: u64,
    /// 2 MiB pages.
    pub pages_2m: u64,
    /// 1 GiB pages.
    pub pages_1g: u64,
    /// Tables read.
    pub tables: u64,
    /// Present entries not followed (table outside memory, loop, reserved bit).
    pub skipped: u64,
    /// The first skipped entries, with level and reason.
    pub stops: Vec<Stop>,
    /// True when a bound ([`MAX_TABLES`], [`MAX_RUNS`]) ended the enumeration early.
    pub truncated: bool,
}

struct Walker<'a> {
    mem: &'a mut dyn PhysMem,
    ctx: PagingContext,
    report: MapsReport,
    path: Vec<(u64, Level)>,
}

/// Lists the virtual ranges the page tables of `ctx` map.
pub fn maps(mem: &mut dyn PhysMem, ctx: &PagingContext) -> Result<MapsReport> {
    let report = MapsReport {
        context: *ctx,
        runs: Vec::new(),
        mapped_bytes: 0,
        pages_4k: 0,
        pages_2m: 0,
        pages_1g: 0,
        tables: 0,
        skipped: 0,
        stops: Vec::new(),
        truncated: false,
    };
    if !mem.contains(ctx.root, 4096) {
        let ram = outside(mem.ranges(), ctx.root, 4096);
        let ram = match ram {
            crate::Error::OutsideMemory { ram, .. } => ram,
            other => other.to_string(),
        };
        return Err(crate::Error::RootOutsideMemory { root: ctx.root, ram });
    }
    let mut w = Walker { mem, ctx: *ctx, report, path: Vec::new() };
    w.table(ctx.root, ctx.top(), 0, PageFlags::top())?;
    let mut r = w.report;
    r.mapped_bytes = r.runs.iter().map(|x| x.len()).sum();
    Ok(r)
}

impl Walker<'_> {
    fn skip(&mut self, va: u64, level: Level, reason: StopReason) {
        self.report.skipped += 1;
        if self.report.stops.len() < MAX_REPORTED_STOPS {
            let va = self.ctx.sign_extend(va);
            self.report.stops.push(Stop { va, level, reason, steps: vec![] });
        }
    }

    fn table(&mut self, table: u64, level: Level, va_base: u64, flags: PageFlags) -> Result<()> {
        if self.report.truncated {
            return Ok(());
        }
        if let Some(&(_, first_level)) = self.path.iter().find(|(t, _)| *t == table) {
            let parent = self.path.last().map(|p| p.1).unwrap_or(level);
            self.skip(va_base, parent, StopReason::Loop { table, first_level });
            return Ok(());
        }
        if !self.mem.contains(table, 4096) {
            self.skip(va_base, level, StopReason::OutsideMemory { addr: table });
            return Ok(());
        }
        if self.report.tables as usize >= MAX_TABLES {
            self.report.truncated = true;
            return Ok(());
        }
        self.report.tables += 1;
        let mut bytes = vec![0u8; 4096];
        self.mem.read(table, &mut bytes)?;
        self.path.push((table, level));
        for (i, e) in bytes.chunks_exact(8).enumerate() {
            let entry = u64::from_le_bytes(e.try_into().expect("8 bytes"));
            if entry & 1 == 0 {
                continue;
            }
            let va = va_base | ((i as u64) << level.shift());
            let f = PageFlags {
                writable: flags.writable && entry & 2 != 0,
                user: flags.user && entry & 4 != 0,
                nx: flags.nx || entry & (1 << 63) != 0,
            };
            let ps = entry & (1 << 7) != 0;
            if ps && !level.allows_large() {
                self.skip(va, level, StopReason::Reserved { bit: "PS (7)" });
            } else if level == Level::Pt || ps {
                let size = 1u64 << level.shift();
                self.leaf(self.ctx.sign_extend(va), entry & ADDR_MASK & !(size - 1), size, f);
            } else if let Some(next) = level.next() {
                self.table(entry & ADDR_MASK, next, va, f)?;
            }
            if self.report.truncated {
                break;
            }
        }
        self.path.pop();
        Ok(())
    }

    fn leaf(&mut self, va: u64, pa: u64, size: u64, flags: PageFlags) {
        match size {
            4096 => self.report.pages_4k += 1,
            0x20_0000 => self.report.pages_2m += 1,
            _ => self.report.pages_1g += 1,
        }
        if let Some(last) = self.report.runs.last_mut() {
            if last.va_end == va
                && last.pa_start.wrapping_add(last.len()) == pa
                && last.page_size == size
                && last.flags == flags
            {
                last.va_end = va.wrapping_add(size);
                return;
            }
        }
        if self.report.runs.len() >= MAX_RUNS {
            self.report.truncated = true;
            return;
        }
        self.report.runs.push(MapRun {
            va_start: va,
            va_end: va.wrapping_add(size),
            pa_start: pa,
            page_size: size,
            flags,
        });
    }
}
