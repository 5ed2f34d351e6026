//! Intel MultiProcessor Specification 1.4 table: how a guest without ACPI
//! (the test guest, Linux with `acpi=off`) learns how many CPUs it has and
//! where the IOAPIC is.

use crate::acpi::checksum;
use crate::layout;

const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
/// Most vCPUs the table (and ferry) supports; the table must fit the EBDA's 1 KiB.
pub const MAX_CPUS: u32 = 32;
const ISA_IRQS: u8 = 16;

/// Builds the floating pointer and configuration table for `cpus` CPUs,
/// to be written at [`layout::EBDA_ADDR`].
pub fn build(cpus: u32) -> Vec<u8> {
    assert!((1..=MAX_CPUS).contains(&cpus), "vCPU count validated by the caller");
    let base = layout::EBDA_ADDR as u32;
    let table_addr = base + 16;
    let ioapic_id = cpus as u8;

    let mut entries: Vec<u8> = Vec::new();
    let mut count = 0u16;
    // Signature and features for the processor entries.
    let leaf1 = std::arch::x86_64::__cpuid(1);
    for id in 0..cpus {
        entries.push(0); // processor
        entries.push(id as u8);
        entries.push(APIC_VERSION);
        entries.push(CPU_ENABLED | if id == 0 { CPU_BSP } else { 0 });
        entries.extend_from_slice(&leaf1.eax.to_le_bytes());
        entries.extend_from_slice(&leaf1.edx.to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[1, 0, b'I', b'S', b'A', b' ', b' ', b' ']); // bus 0: ISA
    count += 1;
    entries.extend_from_slice(&[2, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    count += 1;
    for irq in 0..ISA_IRQS {
        // ISA IRQ n arrives at IOAPIC pin n: that is KVM's default GSI
        // routing, which ferry keeps (QEMU reroutes the PIT to pin 2 and
        // says so; saying so here without rerouting would misdirect it).
        entries.extend_from_slice(&[3, 0, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    entries.extend_from_slice(&[4, 3, 0, 0, 0, 0, 0xff, 0]); // ExtINT -> LINT0 on all
    entries.extend_from_slice(&[4, 1, 0, 0, 0, 0, 0xff, 1]); // NMI -> LINT1 on all
    count += 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(MPC_SIGNATURE);
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(4); // spec revision 1.4
    table.push(0); // checksum, below
    table.extend_from_slice(b"FERRY   ");
    table.extend_from_slice(b"FERRYVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // extended table length
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4);
    mpf.push(0);
    mpf.extend_from_slice(&[0; 5]);
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    mpf
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_cpu_entries() {
        for cpus in [1, 2, MAX_CPUS] {
            let t = build(cpus);
            assert!(t.len() <= 1024, "fits in the EBDA");
            assert_eq!(&t[0..4], MPF_SIGNATURE);
            assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let len = u16::from_le_bytes([t[20], t[21]]) as usize;
            let mpc = &t[16..16 + len];
            assert_eq!(&mpc[0..4], MPC_SIGNATURE);
            assert_eq!(mpc.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
            let procs = mpc[44..].chunks(20).take_while(|e| e[0] == 0).count();
            assert_eq!(procs as u32, cpus);
            assert_eq!(mpc[44 + 3] & CPU_BSP, CPU_BSP);
        }
    }
}
