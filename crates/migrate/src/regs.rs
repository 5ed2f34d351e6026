//! Converting KVM vCPU state into the image's KVM-free register summary
//! (what `image inspect` prints and the ELF core's notes carry).

use ferry_image::export::{DescriptorTable, Segment};
use ferry_image::CpuRegs;
use ferry_vmm::state::VcpuState;
use kvm_bindings::kvm_segment;

fn seg(s: &kvm_segment) -> Segment {
    Segment {
        selector: s.selector,
        base: s.base,
        limit: s.limit,
        attrs: Segment::attrs_from_fields(
            s.type_,
            s.s != 0,
            s.dpl,
            s.present != 0,
            s.avl != 0,
            s.l != 0,
            s.db != 0,
            s.g != 0,
            s.unusable != 0,
        ),
    }
}

fn msr(v: &VcpuState, index: u32) -> u64 {
    v.msrs.iter().find(|m| m.index == index).map(|m| m.data).unwrap_or(0)
}

/// The register summary of one vCPU.
pub fn cpu_regs(v: &VcpuState) -> CpuRegs {
    let r = &v.regs;
    let s = &v.sregs;
    CpuRegs {
        rax: r.rax,
        rbx: r.rbx,
        rcx: r.rcx,
        rdx: r.rdx,
        rsi: r.rsi,
        rdi: r.rdi,
        rsp: r.rsp,
        rbp: r.rbp,
        r8: r.r8,
        r9: r.r9,
        r10: r.r10,
        r11: r.r11,
        r12: r.r12,
        r13: r.r13,
        r14: r.r14,
        r15: r.r15,
        rip: r.rip,
        rflags: r.rflags,
        cs: seg(&s.cs),
        ds: seg(&s.ds),
        es: seg(&s.es),
        fs: seg(&s.fs),
        gs: seg(&s.gs),
        ss: seg(&s.ss),
        ldtr: seg(&s.ldt),
        tr: seg(&s.tr),
        gdt: DescriptorTable { base: s.gdt.base, limit: s.gdt.limit },
        idt: DescriptorTable { base: s.idt.base, limit: s.idt.limit },
        cr0: s.cr0,
        cr2: s.cr2,
        cr3: s.cr3,
        cr4: s.cr4,
        cr8: s.cr8,
        efer: s.efer,
        fs_base: s.fs.base,
        gs_base: s.gs.base,
        kernel_gs_base: msr(v, 0xc000_0102),
        apic_id: v.id,
    }
}
