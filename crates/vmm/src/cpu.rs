//! x86_64 vCPU set-up: CPUID, boot MSRs, segment/control registers and the
//! local APIC, as pure functions over KVM structures so they can be unit tested.

use kvm_bindings::{kvm_cpuid_entry2, kvm_lapic_state, kvm_msr_entry, kvm_segment, kvm_sregs};
use serde::{Deserialize, Serialize};

use crate::layout;

/// CPU feature templates: which host features the guest sees.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CpuTemplate {
    /// Everything KVM supports (the default).
    #[default]
    Host,
    /// Hides features a software hypervisor's instruction emulator may lack
    /// (CMPXCHG16B, XSAVE and the AVX family, PCID, INVPCID), so kernels
    /// fall back to simpler instructions in emulated ring-0 code.
    Minimal,
}

impl std::str::FromStr for CpuTemplate {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "host" => Ok(CpuTemplate::Host),
            "minimal" => Ok(CpuTemplate::Minimal),
            other => Err(format!("unknown CPU template {other:?} (expected host or minimal)")),
        }
    }
}

/// KVM's paravirt CPUID signature leaf.
pub const KVM_CPUID_SIGNATURE: u32 = 0x4000_0000;
/// Timing leaf (as QEMU and VMware fill it): EAX = TSC kHz, EBX = APIC bus kHz.
pub const CPUID_TIMING_LEAF: u32 = 0x4000_0010;

fn bits_for(n: u32) -> u32 {
    if n <= 1 {
        0
    } else {
        32 - (n - 1).leading_zeros()
    }
}

/// Patches the supported CPUID for vCPU `id` of `count`: APIC IDs and
/// topology, the hypervisor bit, the timing leaf and the CPU template.
pub fn patch_cpuid(entries: &mut Vec<kvm_cpuid_entry2>, id: u32, count: u32, tsc_khz: u32, template: CpuTemplate) {
    let shift = bits_for(count);
    for e in entries.iter_mut() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | (count.clamp(1, 255) << 16) | (8 << 8);
                e.ecx |= 1 << 31; // running under a hypervisor
                if count > 1 {
                    e.edx |= 1 << 28; // HTT: more than one logical processor
                }
                if template == CpuTemplate::Minimal {
                    // CX16, PCID, XSAVE, OSXSAVE, AVX, F16C, RDRAND stay hidden.
                    e.ecx &= !((1 << 13) | (1 << 17) | (1 << 26) | (1 << 27) | (1 << 28) | (1 << 29) | (1 << 30));
                }
            }
            7 if e.index == 0 && template == CpuTemplate::Minimal => {
                // AVX2, INVPCID, AVX-512*, and friends.
                e.ebx &= !((1 << 5)
                    | (1 << 10)
                    | (1 << 16)
                    | (1 << 17)
                    | (1 << 21)
                    | (1 << 26)
                    | (1 << 27)
                    | (1 << 28)
                    | (1 << 30)
                    | (1 << 31));
                e.ecx = 0;
                e.edx = 0;
            }
            0xb | 0x1f => {
                // x2APIC topology: level 0 = SMT (1 thread), level 1 = cores.
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = count;
                        e.ecx = 1 | (2 << 8);
                    }
                    _ => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = e.index;
                    }
                }
                e.edx = id;
            }
            4 => {
                // Intel deterministic cache leaf: cores per package.
                e.eax = (e.eax & 0x03ff_ffff) | ((count.max(1) - 1) << 26);
            }
            0x8000_0001 if count > 1 => e.ecx |= 1 << 1, // CmpLegacy
            0x8000_0008 => {
                e.ecx = (e.ecx & !0xf0ff) | (shift << 12) | (count.max(1) - 1);
            }
            0xd if template == CpuTemplate::Minimal => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            KVM_CPUID_SIGNATURE => e.eax = e.eax.max(CPUID_TIMING_LEAF),
            _ => {}
        }
    }
    if tsc_khz != 0 && !entries.iter().any(|e| e.function == CPUID_TIMING_LEAF) {
        entries.push(kvm_cpuid_entry2 {
            function: CPUID_TIMING_LEAF,
            eax: tsc_khz,
            ebx: 1_000_000, // KVM's APIC timer runs at 1 GHz
            ..Default::default()
        });
    }
}

/// MSRs written at boot, as Firecracker does: SYSENTER/SYSCALL cleared,
/// fast strings on, write-back default memory type.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    const MSRS: [(u32, u64); 11] = [
        (0x174, 0),             // IA32_SYSENTER_CS
        (0x175, 0),             // IA32_SYSENTER_ESP
        (0x176, 0),             // IA32_SYSENTER_EIP
        (0xc000_0081, 0),       // STAR
        (0xc000_0082, 0),       // LSTAR
        (0xc000_0083, 0),       // CSTAR
        (0xc000_0084, 0),       // SYSCALL_MASK
        (0xc000_0102, 0),       // KERNEL_GS_BASE
        (0x10, 0),              // IA32_TSC
        (0x1a0, 1),             // IA32_MISC_ENABLE: fast strings
        (0x2ff, (1 << 11) | 6), // MTRRdefType: enabled, write-back
    ];
    MSRS.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect()
}

/// Builds a GDT descriptor from flags, base and limit.
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    ((base as u64 & 0xff00_0000) << 32)
        | ((base as u64 & 0x00ff_ffff) << 16)
        | (limit as u64 & 0x0000_ffff)
        | (((limit as u64 & 0x000f_0000) >> 16) << 48)
        | ((flags as u64 & 0x0000_f0ff) << 40)
}

/// Selector of the flat 32-bit code segment (PVH entry).
pub const SEL_CODE32: u16 = 0x08;
/// Selector of the 64-bit code segment (`__BOOT_CS` of the Linux boot protocol).
pub const SEL_CODE64: u16 = 0x10;
/// Selector of the flat data segment (`__BOOT_DS`).
pub const SEL_DATA: u16 = 0x18;
/// Selector of the boot TSS.
pub const SEL_TSS: u16 = 0x20;

/// The boot GDT written at [`layout::GDT_ADDR`].
pub const BOOT_GDT: [u64; 5] = [
    0,
    gdt_entry(0xc09b, 0, 0xfffff), // 32-bit code
    gdt_entry(0xa09b, 0, 0xfffff), // 64-bit code
    gdt_entry(0xc093, 0, 0xfffff), // data
    gdt_entry(0x808b, 0, 0xfffff), // TSS
];

/// Decodes a GDT entry into KVM's segment form.
pub fn segment_from_gdt(entry: u64, selector: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 { (limit << 12) | 0xfff } else { limit },
        selector,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
        padding: 0,
    }
}

/// Entry mode of the boot vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryMode {
    /// PVH: 32-bit protected mode, paging off.
    Protected32,
    /// Linux 64-bit boot protocol: long mode with the identity map at [`layout::PML4_ADDR`].
    Long64,
}

const X86_CR0_PE: u64 = 0x1;
const X86_CR0_ET: u64 = 0x10;
const X86_CR0_PG: u64 = 0x8000_0000;
const X86_CR4_PAE: u64 = 0x20;
const EFER_LME: u64 = 0x100;
const EFER_LMA: u64 = 0x400;

/// Sets segment and control registers for the boot vCPU.
pub fn setup_sregs(sregs: &mut kvm_sregs, mode: EntryMode) {
    let code = match mode {
        EntryMode::Protected32 => segment_from_gdt(BOOT_GDT[1], SEL_CODE32),
        EntryMode::Long64 => segment_from_gdt(BOOT_GDT[2], SEL_CODE64),
    };
    let data = segment_from_gdt(BOOT_GDT[3], SEL_DATA);
    let tss = segment_from_gdt(BOOT_GDT[4], SEL_TSS);
    sregs.gdt.base = layout::GDT_ADDR;
    sregs.gdt.limit = (BOOT_GDT.len() * 8 - 1) as u16;
    sregs.idt.base = layout::IDT_ADDR;
    sregs.idt.limit = 0;
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = tss;
    match mode {
        EntryMode::Protected32 => {
            sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
            sregs.cr4 = 0;
            sregs.efer = 0;
        }
        EntryMode::Long64 => {
            sregs.cr3 = layout::PML4_ADDR;
            sregs.cr4 |= X86_CR4_PAE;
            sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
            sregs.efer |= EFER_LME | EFER_LMA;
        }
    }
}

/// Identity-map page tables for the Linux 64-bit entry: the first 4 GiB with
/// 2 MiB pages. Returns `(guest address, page bytes)` pairs.
pub fn identity_page_tables() -> Vec<(u64, Vec<u8>)> {
    let mut pml4 = vec![0u8; 4096];
    pml4[..8].copy_from_slice(&(layout::PDPT_ADDR | 0x3).to_le_bytes());
    let mut pdpt = vec![0u8; 4096];
    let mut out = Vec::new();
    for i in 0..4u64 {
        let pd_addr = layout::PD_ADDR + i * 4096;
        pdpt[(i * 8) as usize..(i * 8 + 8) as usize].copy_from_slice(&(pd_addr | 0x3).to_le_bytes());
        let mut pd = vec![0u8; 4096];
        for j in 0..512u64 {
            let entry = ((i * 512 + j) << 21) | 0x83; // present, writable, 2 MiB
            pd[(j * 8) as usize..(j * 8 + 8) as usize].copy_from_slice(&entry.to_le_bytes());
        }
        out.push((pd_addr, pd));
    }
    out.push((layout::PML4_ADDR, pml4));
    out.push((layout::PDPT_ADDR, pdpt));
    out
}

const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(lapic: &kvm_lapic_state, off: usize) -> u32 {
    let b: [u8; 4] = std::array::from_fn(|i| lapic.regs[off + i] as u8);
    u32::from_le_bytes(b)
}

fn set_lapic_reg(lapic: &mut kvm_lapic_state, off: usize, v: u32) {
    for (i, b) in v.to_le_bytes().iter().enumerate() {
        lapic.regs[off + i] = *b as _;
    }
}

/// Routes LINT0 to ExtINT (the PIC) and LINT1 to NMI, as firmware does.
pub fn setup_lint(lapic: &mut kvm_lapic_state) {
    let set_mode = |v: u32, mode: u32| (v & !0x700) | (mode << 8);
    let l0 = lapic_reg(lapic, APIC_LVT0);
    set_lapic_reg(lapic, APIC_LVT0, set_mode(l0, APIC_MODE_EXTINT));
    let l1 = lapic_reg(lapic, APIC_LVT1);
    set_lapic_reg(lapic, APIC_LVT1, set_mode(l1, APIC_MODE_NMI));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 { function, index, ..Default::default() }
    }

    #[test]
    fn cpuid_sets_apic_id_count_and_hypervisor_bit() {
        let mut e = vec![leaf(1, 0), leaf(0xb, 0), leaf(0xb, 1), leaf(KVM_CPUID_SIGNATURE, 0)];
        patch_cpuid(&mut e, 3, 4, 2_500_000, CpuTemplate::Host);
        assert_eq!(e[0].ebx >> 24, 3);
        assert_eq!((e[0].ebx >> 16) & 0xff, 4);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_ne!(e[0].edx & (1 << 28), 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].eax, 2, "4 CPUs need 2 bits of core id");
        assert_eq!(e[2].ebx, 4);
        assert_eq!(e[3].eax, CPUID_TIMING_LEAF);
        let t = e.iter().find(|e| e.function == CPUID_TIMING_LEAF).unwrap();
        assert_eq!(t.eax, 2_500_000);
    }

    #[test]
    fn minimal_template_hides_cx16_and_xsave() {
        let mut e = vec![kvm_cpuid_entry2 { function: 1, ecx: u32::MAX, ..Default::default() }];
        patch_cpuid(&mut e, 0, 1, 0, CpuTemplate::Minimal);
        assert_eq!(e[0].ecx & (1 << 13), 0);
        assert_eq!(e[0].ecx & (1 << 26), 0);
        assert_eq!(e[0].edx & (1 << 28), 0, "single CPU has no HTT");
        assert!(!e.iter().any(|e| e.function == CPUID_TIMING_LEAF), "no timing leaf without a TSC rate");
    }

    #[test]
    fn gdt_entries_decode_to_flat_segments() {
        let cs = segment_from_gdt(BOOT_GDT[2], SEL_CODE64);
        assert_eq!((cs.base, cs.limit, cs.l, cs.db, cs.type_, cs.present), (0, 0xffff_ffff, 1, 0, 0xb, 1));
        let cs32 = segment_from_gdt(BOOT_GDT[1], SEL_CODE32);
        assert_eq!((cs32.l, cs32.db), (0, 1));
        let ds = segment_from_gdt(BOOT_GDT[3], SEL_DATA);
        assert_eq!((ds.type_, ds.s, ds.g), (3, 1, 1));
        let tr = segment_from_gdt(BOOT_GDT[4], SEL_TSS);
        assert_eq!((tr.type_, tr.s), (0xb, 0));
    }

    #[test]
    fn long_mode_sregs() {
        let mut s = kvm_sregs::default();
        setup_sregs(&mut s, EntryMode::Long64);
        assert_eq!(s.cr3, layout::PML4_ADDR);
        assert_ne!(s.cr0 & X86_CR0_PG, 0);
        assert_eq!(s.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        let mut p = kvm_sregs::default();
        setup_sregs(&mut p, EntryMode::Protected32);
        assert_eq!(p.cr0 & X86_CR0_PG, 0);
        assert_eq!(p.cs.selector, SEL_CODE32);
    }

    #[test]
    fn page_tables_identity_map_4g() {
        let pts = identity_page_tables();
        let pd3 = &pts.iter().find(|(a, _)| *a == layout::PD_ADDR + 3 * 4096).unwrap().1;
        let last = u64::from_le_bytes(pd3[4088..4096].try_into().unwrap());
        assert_eq!(last & !0xfff, (4u64 << 30) - (2 << 20));
    }

    #[test]
    fn lint_modes() {
        let mut l = kvm_lapic_state::default();
        setup_lint(&mut l);
        assert_eq!((lapic_reg(&l, APIC_LVT0) >> 8) & 7, APIC_MODE_EXTINT);
        assert_eq!((lapic_reg(&l, APIC_LVT1) >> 8) & 7, APIC_MODE_NMI);
    }

    #[test]
    fn boot_msrs_include_mtrr_default() {
        assert!(boot_msrs().iter().any(|m| m.index == 0x2ff && m.data == 0x806));
    }
}
