//! Ring-0 code: the PVH entry, the AP trampoline and the static boot tables.
//!
//! Ring 0 is emulated instruction by instruction on the hosts ferry is tested
//! on (about a million instructions per second), so everything that can be
//! precomputed is static data (page tables, GDT) and the code path from the
//! PVH entry to `iretq` into ring 3 is about 40 plain integer instructions.
//! Nothing here uses SSE, `xsave`/`xrstor` or `cmpxchg16b`.
//!
//! Memory map of the boot tables (all in the image at 1 MiB):
//! - `pml4`: one entry -> `pdpt`; `pdpt[0..4]` -> four page directories of
//!   2 MiB pages, identity mapping 0..4 GiB present | writable | user | PS
//!   (0x87), including the xAPIC page at 0xFEE00000, usable from ring 3.
//!   (1 GiB pages would need no directories, but PVM's KVM does not offer
//!   pdpe1gb to guests.) RAM above 4 GiB is mapped later from ring 3 by
//!   [`map_high`]: the tables are user-writable, which is fine for a test
//!   guest and keeps ring 0 free of loops.
//! - `gdt`: 0x08 ring-0 code64, 0x10 ring-0 data, 0x18 ring-3 data
//!   (selector 0x1b), 0x20 ring-3 code64 (selector 0x23), 0x28 64-bit TSS,
//!   shared by all CPUs (no interrupts, so RSP0 is never used).
//! - The TSS has an all-zero I/O permission bitmap: `iretq` asks for IOPL=3,
//!   but PVM's emulated `iretq` lands in ring 3 with IOPL 0 while it does
//!   honour the bitmap, so ring 3 may do port I/O either way.
//! - IDT: limit 0, so any exception escalates to a triple fault.

use crate::{MAX_CPUS, STACK_SIZE};

core::arch::global_asm!(
    r#"
    .pushsection .text.boot, "ax"
    .code32
    .globl pvh_start32
    /* PVH entry: 32-bit protected mode, paging off, ebx = hvm_start_info. */
pvh_start32:
    outb %al, $0x80                 /* "first guest instruction" marker */
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0x620, %eax               /* CR4: PAE | OSFXSR | OSXMMEXCPT */
    movl %eax, %cr4
    movl $0xC0000080, %ecx          /* EFER.LME */
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $tss, %eax                 /* patch the TSS base into its descriptor */
    movw %ax, tss_desc+2
    shrl $16, %eax
    movb %al, tss_desc+4
    movb %ah, tss_desc+7
    lgdt gdt_ptr
    movl $0x80000023, %eax          /* CR0: PG | NE | MP | PE (EM, TS clear) */
    movl %eax, %cr0
    ljmp $0x08, $bsp_start64

    .code64
bsp_start64:
    movl %ebx, %edi                 /* arg 0: hvm_start_info paddr */
    /* CPUID at CPL 3 may run natively on the host CPU (PVM), so the
       hypervisor leaves ring 3 needs are read here, in ring 0. */
    movl $0x40000000, %eax
    cpuid
    movl %eax, boot_hv_max(%rip)
    movl $0x40000010, %eax
    cpuid
    movl %eax, boot_hv_tsc_khz(%rip)
    leaq bsp_main(%rip), %r12
    leaq stacks+{stack_size}-8(%rip), %r13
    jmp enter_ring3

    .globl ap_start64
ap_start64:
    movq ap_boot_stack(%rip), %r13
    movq ap_boot_cpu(%rip), %rdi    /* arg 0: cpu index */
    leaq ap_main(%rip), %r12
    andb $0xfd, tss_desc+5(%rip)    /* the TSS is shared: clear busy for ltr */

    /* r12 = ring-3 rip, r13 = ring-3 rsp (16n-8), rdi = argument */
enter_ring3:
    movl $1, %eax
    cpuid
    movl %ecx, boot_cpuid1_ecx(%rip)
    btl $26, %ecx                   /* XSAVE supported? */
    jnc 1f
    movq %cr4, %rax
    orl $0x40000, %eax              /* CR4.OSXSAVE */
    movq %rax, %cr4
    shrl $26, %ecx                  /* AVX (bit 28) -> bit 2 */
    andl $4, %ecx
    leal 3(%rcx), %eax              /* XCR0 = x87 | SSE [| AVX] */
    xorl %ecx, %ecx
    xorl %edx, %edx
    xsetbv
1:
    movw $0x28, %ax
    ltr %ax
    lidt idt_null(%rip)
    movq %r13, %rsp
    pushq $0x1b                     /* ss */
    pushq %r13                      /* rsp */
    pushq $0x3002                   /* rflags: IOPL=3, IF=0 */
    pushq $0x23                     /* cs */
    pushq %r12                      /* rip */
    iretq
    .popsection

    /* AP trampoline, copied to 0x9000 (SIPI vector 0x09): real mode ->
       long mode directly (PE and PG set together), then ap_start64. */
    .pushsection .rodata.ap_tramp, "a"
    .code16
    .globl ap_tramp_start
    .globl ap_tramp_end
ap_tramp_start:
    lgdtl %cs:(ap_gdtr - ap_tramp_start)
    movl $0x620, %eax
    movl %eax, %cr4
    movl $pml4, %eax
    movl %eax, %cr3
    movl $0xC0000080, %ecx
    rdmsr
    orl $0x100, %eax
    wrmsr
    movl $0x80000023, %eax
    movl %eax, %cr0
    ljmpl $0x08, $ap_start64
    .balign 8
ap_gdtr:
    .word gdt_end - gdt - 1
    .long gdt
ap_tramp_end:
    .code64
    .popsection

    .pushsection .data.boot, "aw"
    .balign 4096
    .globl pml4
pml4:
    .quad pdpt + 0x7
    .fill 511, 8, 0
    .globl pdpt
pdpt:
    .quad pd_low + 0x0007, pd_low + 0x1007, pd_low + 0x2007, pd_low + 0x3007
    .fill 508, 8, 0
pd_low:
    .set ferry_2m, 0
    .rept 2048
    .quad (ferry_2m << 21) | 0x87
    .set ferry_2m, ferry_2m + 1
    .endr

    .balign 16
gdt:
    .quad 0
    .quad 0x00af9a000000ffff        /* 0x08 ring-0 code64 */
    .quad 0x00cf92000000ffff        /* 0x10 ring-0 data */
    .quad 0x00cff2000000ffff        /* 0x18 ring-3 data */
    .quad 0x00affa000000ffff        /* 0x20 ring-3 code64 */
tss_desc:                           /* 0x28 64-bit TSS, base patched at boot */
    .word 104 + 8192, 0             /* limit: TSS + I/O bitmap + 0xff */
    .byte 0, 0x89, 0, 0
    .long 0, 0
gdt_end:
    .balign 8
gdt_ptr:
    .word gdt_end - gdt - 1
    .quad gdt
idt_null:
    .word 0
    .quad 0

    .balign 16
tss:
    .fill 25, 4, 0
    .word 0, 104                    /* I/O bitmap right after the TSS */
    .fill 8192, 1, 0                /* all ports allowed at CPL 3 */
    .byte 0xff

    .globl ap_boot_stack
    .globl ap_boot_cpu
    .balign 8
ap_boot_stack:
    .quad 0
ap_boot_cpu:
    .quad 0
    .globl boot_hv_max
    .globl boot_hv_tsc_khz
    .globl boot_cpuid1_ecx
boot_hv_max:
    .long 0
boot_hv_tsc_khz:
    .long 0
boot_cpuid1_ecx:
    .long 0
    .popsection

    /* PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY = 18). Aligned to 4 only, as
       loaders pad the name to the PT_NOTE alignment. */
    .pushsection .note.Xen, "a", @note
    .balign 4
    .long 4
    .long 8
    .long 18
    .asciz "Xen"
    .balign 4
    .quad pvh_start32
    .popsection

    .pushsection .bss.stacks, "aw", @nobits
    .balign 4096
    .globl stacks
stacks:
    .skip {stacks_total}
    .popsection
"#,
    stack_size = const STACK_SIZE,
    stacks_total = const STACK_SIZE * MAX_CPUS,
    options(att_syntax)
);

unsafe extern "C" {
    static ap_tramp_start: u8;
    static ap_tramp_end: u8;
    static stacks: u8;
    static mut pdpt: [u64; 512];
    static mut ap_boot_stack: u64;
    static mut ap_boot_cpu: u64;
    static boot_hv_max: u32;
    static boot_hv_tsc_khz: u32;
    static boot_cpuid1_ecx: u32;
    static __image_end: u8;
}

/// Physical address where the AP trampoline runs (SIPI vector 0x09).
pub const TRAMPOLINE: u64 = 0x9000;

/// Copies the AP trampoline to [`TRAMPOLINE`].
pub fn install_trampoline() {
    // SAFETY: both symbols delimit the trampoline bytes in our image; the
    // destination page is reserved for us by the VMM and identity mapped.
    unsafe {
        let start = &raw const ap_tramp_start;
        let len = (&raw const ap_tramp_end as usize) - (start as usize);
        core::ptr::copy_nonoverlapping(start, TRAMPOLINE as *mut u8, len);
    }
}

/// Tells the next AP to come up which CPU index and stack it gets.
pub fn set_ap_boot(cpu: usize) {
    let top = (&raw const stacks) as u64 + ((cpu + 1) * STACK_SIZE) as u64 - 8;
    // SAFETY: only the BSP writes these, and only while no AP is starting.
    unsafe {
        core::ptr::write_volatile(&raw mut ap_boot_stack, top);
        core::ptr::write_volatile(&raw mut ap_boot_cpu, cpu as u64);
    }
}

/// First byte after the image (code, data, page tables, stacks, state).
pub fn image_end() -> u64 {
    (&raw const __image_end) as u64
}

/// Identity-maps all RAM between 4 GiB and 512 GiB with 2 MiB pages, taking
/// page-directory pages from `*alloc` (page aligned, below 4 GiB, bumped).
/// Runs in ring 3 before any AP starts; a not-present entry is never cached,
/// so no TLB flush is needed.
pub fn map_high(ram: &[(u64, u64)], alloc: &mut u64) {
    const GIB: u64 = 1 << 30;
    for gib in 4..512u64 {
        let (lo, hi) = (gib * GIB, (gib + 1) * GIB);
        if !ram.iter().any(|&(a, l)| a < hi && a.saturating_add(l) > lo) {
            continue;
        }
        let pd = *alloc;
        *alloc += 4096;
        for i in 0..512u64 {
            // SAFETY: pd is a fresh page of our reserved area, identity mapped.
            unsafe { core::ptr::write_volatile((pd + i * 8) as *mut u64, (lo + (i << 21)) | 0x87) };
        }
        // SAFETY: only the BSP edits the tables, before APs exist.
        unsafe { core::ptr::write_volatile((&raw mut pdpt[0]).add(gib as usize), pd | 0x7) };
    }
}

/// CPUID values the BSP read in ring 0: (leaf 1 ECX, leaf 0x40000000 EAX,
/// leaf 0x40000010 EAX). Ring-3 CPUID cannot be trusted to reach the VMM.
pub fn boot_cpuid() -> (u32, u32, u32) {
    // SAFETY: written once in ring 0 before ring 3 started.
    unsafe {
        (
            core::ptr::read_volatile(&raw const boot_cpuid1_ecx),
            core::ptr::read_volatile(&raw const boot_hv_max),
            core::ptr::read_volatile(&raw const boot_hv_tsc_khz),
        )
    }
}
