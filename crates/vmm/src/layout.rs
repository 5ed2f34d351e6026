//! Guest-physical memory layout of an x86_64 ferry VM.
//!
//! Kept in one place because the boot code, the MP table, the test guest's
//! contract (it keeps 0x9000 for its AP trampoline) and the e820 map must agree.

/// Global descriptor table used at entry (PVH and Linux 64-bit boot).
pub const GDT_ADDR: u64 = 0x500;
/// Empty interrupt descriptor table: guests install their own.
pub const IDT_ADDR: u64 = 0x580;
/// Linux 64-bit boot page tables: PML4, PDPT, then four page directories (4 GiB).
pub const PML4_ADDR: u64 = 0xa000;
/// PDPT for the Linux boot identity map.
pub const PDPT_ADDR: u64 = 0xb000;
/// First of four page directories (2 MiB pages) for the Linux boot identity map.
pub const PD_ADDR: u64 = 0xc000;
/// PVH `hvm_start_info`.
pub const PVH_INFO_ADDR: u64 = 0x6000;
/// PVH memory map, right after the start info.
pub const PVH_MEMMAP_ADDR: u64 = 0x6100;
/// Linux zero page (`boot_params`).
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
/// Initial stack pointer for the boot vCPU.
pub const BOOT_STACK_ADDR: u64 = 0x8ff0;
/// Page the test guest uses for its AP trampoline (SIPI vector 0x09); ferry writes nothing here.
pub const AP_TRAMPOLINE_ADDR: u64 = 0x9000;
/// Kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
/// Largest command line ferry accepts (including the NUL).
pub const CMDLINE_MAX: usize = 0x10000;
/// Extended BIOS data area: the MP table lives here, and it is reserved in e820.
pub const EBDA_ADDR: u64 = 0x9fc00;
/// ACPI tables (RSDP first), in the BIOS area that e820 reserves and where
/// guests scan for the RSDP.
pub const ACPI_ADDR: u64 = 0xe0000;
/// Start of the legacy hole (VGA, option ROMs, BIOS), reserved in e820.
pub const LEGACY_HOLE_END: u64 = 0x10_0000;
/// Kernels are loaded at 1 MiB.
pub const HIGH_MEMORY_START: u64 = 0x10_0000;
/// RAM below 4 GiB stops here; the gap up to 4 GiB is for MMIO (LAPIC, IOAPIC, TSS).
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// RAM resumes at 4 GiB.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// KVM's TSS area for real-mode emulation (three pages inside the MMIO gap).
pub const KVM_TSS_ADDR: u64 = 0xfffb_d000;
/// KVM's identity-map page for real-mode emulation.
pub const KVM_IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u64 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const LAPIC_ADDR: u64 = 0xfee0_0000;
/// Guest page size.
pub const PAGE_SIZE: u64 = 4096;

/// Guest RAM ranges `(start, length)` for a VM of `mem_bytes`, splitting
/// around the MMIO gap below 4 GiB.
pub fn ram_ranges(mem_bytes: u64) -> Vec<(u64, u64)> {
    let low = mem_bytes.min(MMIO_GAP_START);
    let mut ranges = vec![(0, low)];
    if mem_bytes > low {
        ranges.push((MMIO_GAP_END, mem_bytes - low));
    }
    ranges
}

/// E820 type for usable RAM.
pub const E820_RAM: u32 = 1;
/// E820 type for reserved areas.
pub const E820_RESERVED: u32 = 2;

/// The e820 map ferry reports: RAM below the EBDA, the reserved legacy hole,
/// then the RAM ranges above 1 MiB.
pub fn e820_map(mem_bytes: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![(0, EBDA_ADDR, E820_RAM), (EBDA_ADDR, LEGACY_HOLE_END - EBDA_ADDR, E820_RESERVED)];
    for (start, len) in ram_ranges(mem_bytes) {
        let (start, len) =
            if start == 0 { (LEGACY_HOLE_END, len.saturating_sub(LEGACY_HOLE_END)) } else { (start, len) };
        if len > 0 {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_vm_has_one_range() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
    }

    #[test]
    fn large_vm_splits_around_mmio_gap() {
        let r = ram_ranges(4 << 30);
        assert_eq!(r, vec![(0, MMIO_GAP_START), (MMIO_GAP_END, (4 << 30) - MMIO_GAP_START)]);
        let total: u64 = r.iter().map(|r| r.1).sum();
        assert_eq!(total, 4 << 30);
    }

    #[test]
    fn e820_reserves_legacy_hole_and_covers_ram() {
        let map = e820_map(1 << 30);
        assert_eq!(map[0], (0, EBDA_ADDR, E820_RAM));
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2], (LEGACY_HOLE_END, (1 << 30) - LEGACY_HOLE_END, E820_RAM));
        // No overlaps, sorted.
        for w in map.windows(2) {
            assert!(w[0].0 + w[0].1 <= w[1].0);
        }
    }
}
