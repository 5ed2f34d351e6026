//! `CpuRegs`: the vCPU register summary stored in every image and used by the
//! ELF core export. Plain data filled by the VMM, so this crate needs no KVM types.

use serde::{Deserialize, Serialize};

/// One segment register as the CPU caches it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Segment {
    /// Selector.
    pub selector: u16,
    /// Base address.
    pub base: u64,
    /// Limit (byte granular, as KVM reports it).
    pub limit: u32,
    /// Access rights in the VMX layout: type bits 0-3, S 4, DPL 5-6, P 7, AVL 12,
    /// L 13, D/B 14, G 15, unusable 16. See [`Segment::attrs_from_fields`].
    pub attrs: u32,
}

impl Segment {
    /// Packs KVM-style segment fields (`kvm_segment`) into the `attrs` layout.
    #[allow(clippy::too_many_arguments)]
    pub fn attrs_from_fields(
        type_: u8,
        s: bool,
        dpl: u8,
        present: bool,
        avl: bool,
        l: bool,
        db: bool,
        g: bool,
        unusable: bool,
    ) -> u32 {
        u32::from(type_ & 0xf)
            | u32::from(s) << 4
            | u32::from(dpl & 3) << 5
            | u32::from(present) << 7
            | u32::from(avl) << 12
            | u32::from(l) << 13
            | u32::from(db) << 14
            | u32::from(g) << 15
            | u32::from(unusable) << 16
    }

    /// The descriptor-flags word QEMU's dump format uses (the descriptor's high dword
    /// bits 8-23: type, S, DPL, P, AVL, L, D/B, G).
    pub fn qemu_flags(&self) -> u32 {
        (self.attrs & 0xf0ff) << 8
    }
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DescriptorTable {
    /// Linear base address.
    pub base: u64,
    /// Limit in bytes.
    pub limit: u16,
}

/// The registers of one vCPU at the time of the image.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[allow(missing_docs)]
pub struct CpuRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
    pub cs: Segment,
    pub ds: Segment,
    pub es: Segment,
    pub fs: Segment,
    pub gs: Segment,
    pub ss: Segment,
    pub ldtr: Segment,
    pub tr: Segment,
    pub gdt: DescriptorTable,
    pub idt: DescriptorTable,
    pub cr0: u64,
    pub cr2: u64,
    pub cr3: u64,
    pub cr4: u64,
    pub cr8: u64,
    pub efer: u64,
    pub fs_base: u64,
    pub gs_base: u64,
    pub kernel_gs_base: u64,
    pub apic_id: u32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_mode_code_segment_flags() {
        // 64-bit code: type 0xb, S, DPL 0, P, L, G -> descriptor high dword 0x00a09b00.
        let a = Segment::attrs_from_fields(0xb, true, 0, true, false, true, false, true, false);
        let s = Segment { attrs: a, ..Default::default() };
        assert_eq!(s.qemu_flags(), 0x00a0_9b00);
    }
}
