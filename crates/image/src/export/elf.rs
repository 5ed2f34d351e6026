//! ELF64 core file in the layout of QEMU's `dump-guest-memory` without paging:
//! one PT_NOTE with an NT_PRSTATUS ("CORE") note per vCPU followed by a QEMU
//! CPU-state note ("QEMU", type 0) per vCPU, then one PT_LOAD per RAM range
//! with p_paddr = p_vaddr = the guest-physical address (QEMU itself leaves
//! p_vaddr 0 without paging; readers use p_paddr). `crash` and Volatility read
//! this layout.

use std::io::Write;

use super::layout::{ExtentKind, FileLayout};
use super::{CpuRegs, MemorySource, Segment};
use crate::error::{Error, Result};
use crate::header::RamRange;

const EHDR_SIZE: u64 = 64;
const PHDR_SIZE: u64 = 56;
const ET_CORE: u16 = 4;
const EM_X86_64: u16 = 62;
const PT_LOAD: u32 = 1;
const PT_NOTE: u32 = 4;
const NT_PRSTATUS: u32 = 1;
/// Where the first PT_LOAD's data starts is rounded up to this.
const LOAD_ALIGN: u64 = 4096;

/// Size of x86_64 `struct elf_prstatus`.
pub const PRSTATUS_SIZE: usize = 336;
/// Offset of `pr_pid` in `elf_prstatus`.
const PRSTATUS_PID: usize = 32;
/// Offset of `pr_reg` (user_regs_struct) in `elf_prstatus`.
const PRSTATUS_REGS: usize = 112;
/// Size of QEMU's `QEMUCPUState` (version 1, with kernel_gs_base).
pub const QEMU_CPU_STATE_SIZE: usize = 440;

/// Appends one ELF note: namesz, descsz, type, NUL-terminated name and desc, each padded to 4.
fn note(out: &mut Vec<u8>, name: &str, ty: u32, desc: &[u8]) {
    let namesz = name.len() + 1;
    out.extend_from_slice(&(namesz as u32).to_le_bytes());
    out.extend_from_slice(&(desc.len() as u32).to_le_bytes());
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(name.as_bytes());
    out.resize(out.len() + namesz.next_multiple_of(4) - name.len(), 0);
    out.extend_from_slice(desc);
    out.resize(out.len().next_multiple_of(4), 0);
}

/// `elf_prstatus` for vCPU `index`: pr_pid = index + 1, pr_reg in user_regs_struct order.
fn prstatus(index: usize, r: &CpuRegs) -> Vec<u8> {
    let mut d = vec![0u8; PRSTATUS_SIZE];
    d[PRSTATUS_PID..PRSTATUS_PID + 4].copy_from_slice(&(index as u32 + 1).to_le_bytes());
    let regs: [u64; 27] = [
        r.r15,
        r.r14,
        r.r13,
        r.r12,
        r.rbp,
        r.rbx,
        r.r11,
        r.r10,
        r.r9,
        r.r8,
        r.rax,
        r.rcx,
        r.rdx,
        r.rsi,
        r.rdi,
        0, // orig_rax
        r.rip,
        u64::from(r.cs.selector),
        r.rflags,
        r.rsp,
        u64::from(r.ss.selector),
        r.fs_base,
        r.gs_base,
        u64::from(r.ds.selector),
        u64::from(r.es.selector),
        u64::from(r.fs.selector),
        u64::from(r.gs.selector),
    ];
    for (i, v) in regs.iter().enumerate() {
        let o = PRSTATUS_REGS + i * 8;
        d[o..o + 8].copy_from_slice(&v.to_le_bytes());
    }
    d
}

/// QEMU's `QEMUCPUState` (target/i386/arch_dump.c), version 1.
fn qemu_cpu_state(r: &CpuRegs) -> Vec<u8> {
    let mut d = Vec::with_capacity(QEMU_CPU_STATE_SIZE);
    d.extend_from_slice(&1u32.to_le_bytes());
    d.extend_from_slice(&(QEMU_CPU_STATE_SIZE as u32).to_le_bytes());
    for v in [
        r.rax, r.rbx, r.rcx, r.rdx, r.rsi, r.rdi, r.rsp, r.rbp, r.r8, r.r9, r.r10, r.r11, r.r12, r.r13, r.r14, r.r15,
        r.rip, r.rflags,
    ] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    let seg = |d: &mut Vec<u8>, selector: u32, limit: u32, flags: u32, base: u64| {
        d.extend_from_slice(&selector.to_le_bytes());
        d.extend_from_slice(&limit.to_le_bytes());
        d.extend_from_slice(&flags.to_le_bytes());
        d.extend_from_slice(&0u32.to_le_bytes());
        d.extend_from_slice(&base.to_le_bytes());
    };
    let segs: [&Segment; 8] = [&r.cs, &r.ds, &r.es, &r.fs, &r.gs, &r.ss, &r.ldtr, &r.tr];
    for s in segs {
        seg(&mut d, u32::from(s.selector), s.limit, s.qemu_flags(), s.base);
    }
    for t in [&r.gdt, &r.idt] {
        seg(&mut d, 0, u32::from(t.limit), 0, t.base);
    }
    for v in [r.cr0, 0, r.cr2, r.cr3, r.cr4, r.kernel_gs_base] {
        d.extend_from_slice(&v.to_le_bytes());
    }
    debug_assert_eq!(d.len(), QEMU_CPU_STATE_SIZE);
    d
}

/// Appends a 56-byte program header.
#[allow(clippy::too_many_arguments)]
fn phdr(out: &mut Vec<u8>, ty: u32, flags: u32, offset: u64, vaddr: u64, paddr: u64, size: u64, align: u64) {
    out.extend_from_slice(&ty.to_le_bytes());
    out.extend_from_slice(&flags.to_le_bytes());
    for v in [offset, vaddr, paddr, size, size, align] {
        out.extend_from_slice(&v.to_le_bytes());
    }
}

/// The ELF core layout: ELF header, program headers (one PT_NOTE, one PT_LOAD
/// per RAM range), the notes, zero padding to [`LOAD_ALIGN`], then each range's bytes.
pub(crate) fn layout(ranges: &[RamRange], cpus: &[CpuRegs]) -> Result<FileLayout> {
    let phnum = ranges.len() + 1;
    if phnum >= 0xffff {
        return Err(Error::Export(format!("{} RAM ranges do not fit in an ELF program header table", ranges.len())));
    }
    let mut notes = Vec::new();
    for (i, r) in cpus.iter().enumerate() {
        note(&mut notes, "CORE", NT_PRSTATUS, &prstatus(i, r));
    }
    for r in cpus {
        note(&mut notes, "QEMU", 0, &qemu_cpu_state(r));
    }
    let notes_off = EHDR_SIZE + PHDR_SIZE * phnum as u64;
    let data_off = (notes_off + notes.len() as u64).next_multiple_of(LOAD_ALIGN);

    let mut head = Vec::with_capacity(notes_off as usize);
    head.extend_from_slice(&[0x7f, b'E', b'L', b'F', 2, 1, 1, 0]);
    head.resize(16, 0);
    head.extend_from_slice(&ET_CORE.to_le_bytes());
    head.extend_from_slice(&EM_X86_64.to_le_bytes());
    head.extend_from_slice(&1u32.to_le_bytes()); // e_version
    head.extend_from_slice(&0u64.to_le_bytes()); // e_entry
    head.extend_from_slice(&EHDR_SIZE.to_le_bytes()); // e_phoff
    head.extend_from_slice(&0u64.to_le_bytes()); // e_shoff
    head.extend_from_slice(&0u32.to_le_bytes()); // e_flags
    head.extend_from_slice(&(EHDR_SIZE as u16).to_le_bytes());
    head.extend_from_slice(&(PHDR_SIZE as u16).to_le_bytes());
    head.extend_from_slice(&(phnum as u16).to_le_bytes());
    head.extend_from_slice(&64u16.to_le_bytes()); // e_shentsize
    head.extend_from_slice(&0u16.to_le_bytes()); // e_shnum
    head.extend_from_slice(&0u16.to_le_bytes()); // e_shstrndx
    debug_assert_eq!(head.len() as u64, EHDR_SIZE);
    phdr(&mut head, PT_NOTE, 0, notes_off, 0, 0, notes.len() as u64, 0);
    let mut off = data_off;
    for r in ranges {
        phdr(&mut head, PT_LOAD, 7, off, r.start, r.start, r.len, 0);
        off += r.len;
    }
    let pad = data_off - notes_off - notes.len() as u64;
    head.extend_from_slice(&notes);
    let mut l = FileLayout::default();
    l.push_bytes(head);
    l.push(pad, ExtentKind::Zeros);
    for r in ranges {
        l.push(r.len, ExtentKind::Memory { gpa: r.start });
    }
    debug_assert_eq!(l.size(), off);
    Ok(l)
}

/// Writes an ELF64 ET_CORE file of the source's memory and vCPU registers (see [`layout`]).
/// Returns bytes written.
pub fn write_elf_core(src: &mut impl MemorySource, out: &mut impl Write) -> Result<u64> {
    let cpus = src.cpu_regs()?;
    layout(&src.ram_ranges(), &cpus)?.write_to(src, out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_and_offsets() {
        let r =
            CpuRegs { r15: 15, rip: 0xffff_8000_0000_1234, gs_base: 0x77, kernel_gs_base: 0x99, ..Default::default() };
        let p = prstatus(2, &r);
        assert_eq!(p.len(), PRSTATUS_SIZE);
        assert_eq!(u32::from_le_bytes(p[32..36].try_into().unwrap()), 3);
        assert_eq!(u64::from_le_bytes(p[112..120].try_into().unwrap()), 15);
        assert_eq!(u64::from_le_bytes(p[112 + 16 * 8..112 + 17 * 8].try_into().unwrap()), r.rip);
        assert_eq!(u64::from_le_bytes(p[112 + 22 * 8..112 + 23 * 8].try_into().unwrap()), 0x77);
        let q = qemu_cpu_state(&r);
        assert_eq!(q.len(), QEMU_CPU_STATE_SIZE);
        assert_eq!(u64::from_le_bytes(q[432..440].try_into().unwrap()), 0x99);
        let mut n = Vec::new();
        note(&mut n, "CORE", 1, &p);
        assert_eq!(n.len(), 12 + 8 + 336);
    }
}
