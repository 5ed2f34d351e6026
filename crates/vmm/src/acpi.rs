//! Static ACPI tables: RSDP, XSDT, FADT, DSDT and MADT.
//!
//! Why: a kernel built without the MP-table parser (Debian's cloud kernel
//! has `CONFIG_X86_MPPARSE` off) learns about its CPUs and the IOAPIC only
//! from the MADT; without these tables it runs on one CPU whatever
//! `--vcpus` says. The tables describe a hardware-reduced ACPI platform (no
//! PM timer, SCI or fixed-feature hardware, as Firecracker and Cloud
//! Hypervisor do), with the legacy devices ferry emulates (16550, i8042)
//! declared present through the FADT boot flags. They are written once at
//! boot into the reserved BIOS area and found through the RSDP: its address
//! goes into `boot_params.acpi_rsdp_addr` and PVH `rsdp_paddr`, and it sits
//! where the classic 0xE0000-0xFFFFF scan finds it.

use crate::layout;

// The tables sit above the MP table (1 KiB of EBDA) inside the reserved hole.
const _: () = assert!(layout::ACPI_ADDR >= layout::EBDA_ADDR + 0x400 && layout::ACPI_ADDR < layout::LEGACY_HOLE_END);

/// Length of the common table header.
const HEADER_LEN: usize = 36;
/// OEM ID in every table.
const OEM_ID: &[u8; 6] = b"FERRY ";
/// OEM table ID in every table.
const OEM_TABLE_ID: &[u8; 8] = b"FERRYVM ";
/// Creator ID ("ASL compiler") in every table.
const CREATOR_ID: &[u8; 4] = b"FRRY";

/// FADT flag: hardware-reduced ACPI (no fixed-feature hardware).
const FADT_HW_REDUCED_ACPI: u32 = 1 << 20;
/// FADT flag: the power button is a control method, not fixed hardware.
const FADT_PWR_BUTTON: u32 = 1 << 4;
/// FADT flag: the sleep button is a control method, not fixed hardware.
const FADT_SLP_BUTTON: u32 = 1 << 5;
/// IA-PC boot flag: legacy devices (serial ports) are present.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
/// IA-PC boot flag: an 8042 keyboard controller is present (ferry's i8042:
/// Ctrl-Alt-Del and reset). Without it Linux does not probe the i8042.
const IAPC_8042: u16 = 1 << 1;
/// IA-PC boot flag: no VGA.
const IAPC_VGA_NOT_PRESENT: u16 = 1 << 2;
/// MADT flag: the platform also has dual 8259 PICs (KVM's in-kernel PIC).
const MADT_PCAT_COMPAT: u32 = 1;
/// MADT local APIC flag: the processor is enabled.
const LAPIC_ENABLED: u32 = 1;

/// Byte that makes `bytes` sum to zero modulo 256: the checksum of ACPI
/// tables and of the MP table alike.
pub(crate) fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// A system description table: the 36-byte header, then `body`, with length
/// and checksum filled in.
fn table(signature: &[u8; 4], revision: u8, body: &[u8]) -> Vec<u8> {
    let mut t = Vec::with_capacity(HEADER_LEN + body.len());
    t.extend_from_slice(signature);
    t.extend_from_slice(&((HEADER_LEN + body.len()) as u32).to_le_bytes());
    t.push(revision);
    t.push(0); // checksum, below
    t.extend_from_slice(OEM_ID);
    t.extend_from_slice(OEM_TABLE_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // OEM revision
    t.extend_from_slice(CREATOR_ID);
    t.extend_from_slice(&1u32.to_le_bytes()); // creator revision
    t.extend_from_slice(body);
    t[9] = checksum(&t);
    t
}

/// FADT revision 6 (276 bytes): a hardware-reduced platform whose only
/// pointer is the DSDT.
fn fadt(dsdt_addr: u64) -> Vec<u8> {
    let mut body = vec![0u8; 276 - HEADER_LEN];
    let at = |off: usize| off - HEADER_LEN;
    body[at(40)..at(44)].copy_from_slice(&(dsdt_addr as u32).to_le_bytes()); // DSDT
    body[at(109)..at(111)].copy_from_slice(&(IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_VGA_NOT_PRESENT).to_le_bytes());
    body[at(112)..at(116)].copy_from_slice(&(FADT_HW_REDUCED_ACPI | FADT_PWR_BUTTON | FADT_SLP_BUTTON).to_le_bytes());
    body[at(131)] = 0; // FADT minor version (6.0)
    body[at(140)..at(148)].copy_from_slice(&dsdt_addr.to_le_bytes()); // X_DSDT
    body[at(268)..at(276)].copy_from_slice(b"FERRYVMM"); // hypervisor vendor identity
    table(b"FACP", 6, &body)
}

/// MADT: one enabled local APIC per vCPU (ACPI processor UID = APIC ID =
/// vCPU index, as ferry's CPUID says) and the IOAPIC at GSI 0. No interrupt
/// source overrides: KVM's default routing sends ISA IRQ n to IOAPIC pin n,
/// which is what the absence of overrides means.
fn madt(vcpus: u32) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(layout::LAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&MADT_PCAT_COMPAT.to_le_bytes());
    for id in 0..vcpus {
        body.extend_from_slice(&[0, 8, id as u8, id as u8]);
        body.extend_from_slice(&LAPIC_ENABLED.to_le_bytes());
    }
    // IOAPIC: its ID follows the CPUs' (as in the MP table).
    body.extend_from_slice(&[1, 12, vcpus as u8, 0]);
    body.extend_from_slice(&(layout::IOAPIC_ADDR as u32).to_le_bytes());
    body.extend_from_slice(&0u32.to_le_bytes()); // GSI base
    table(b"APIC", 5, &body)
}

/// The tables for a VM with `vcpus` CPUs, laid out from `base`; returns the
/// bytes to write at `base` (the RSDP first, so `base` is its address).
pub fn build(vcpus: u32, base: u64) -> Vec<u8> {
    // RSDP (36 bytes) padded to 48, then each table 8-byte aligned.
    let mut out = vec![0u8; 48];
    let place = |out: &mut Vec<u8>, t: Vec<u8>| -> u64 {
        while !out.len().is_multiple_of(8) {
            out.push(0);
        }
        let addr = base + out.len() as u64;
        out.extend_from_slice(&t);
        addr
    };
    // An empty DSDT: no AML devices; the legacy devices are found by their ports.
    let dsdt = place(&mut out, table(b"DSDT", 2, &[]));
    let fadt = place(&mut out, fadt(dsdt));
    let madt = place(&mut out, madt(vcpus));
    let xsdt_body: Vec<u8> = [fadt, madt].iter().flat_map(|a| a.to_le_bytes()).collect();
    let xsdt = place(&mut out, table(b"XSDT", 1, &xsdt_body));

    let mut rsdp = Vec::with_capacity(36);
    rsdp.extend_from_slice(b"RSD PTR ");
    rsdp.push(0); // checksum of the first 20 bytes, below
    rsdp.extend_from_slice(OEM_ID);
    rsdp.push(2); // revision: ACPI 2.0+, XSDT present
    rsdp.extend_from_slice(&0u32.to_le_bytes()); // no RSDT
    rsdp.extend_from_slice(&36u32.to_le_bytes());
    rsdp.extend_from_slice(&xsdt.to_le_bytes());
    rsdp.push(0); // extended checksum, below
    rsdp.extend_from_slice(&[0; 3]);
    rsdp[8] = checksum(&rsdp[..20]);
    rsdp[32] = checksum(&rsdp);
    out[..36].copy_from_slice(&rsdp);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: u64 = 0xe0000;

    fn u32_at(b: &[u8], off: usize) -> u32 {
        u32::from_le_bytes(b[off..off + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], off: usize) -> u64 {
        u64::from_le_bytes(b[off..off + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked: signature, length within
    /// the blob, checksum zero.
    fn table_at<'a>(blob: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - BASE) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        let t = &blob[off..off + len];
        assert_eq!(t.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn rsdp_points_through_xsdt_to_fadt_dsdt_and_madt() {
        let blob = build(4, BASE);
        let rsdp = &blob[..36];
        assert_eq!(&rsdp[..8], b"RSD PTR ");
        assert_eq!(rsdp[..20].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "RSDP v1 checksum");
        assert_eq!(rsdp.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0, "RSDP extended checksum");
        assert_eq!(rsdp[15], 2);
        assert_eq!(u32_at(rsdp, 20), 36);
        let xsdt = table_at(&blob, u64_at(rsdp, 24), b"XSDT");
        let entries: Vec<u64> = xsdt[36..].chunks(8).map(|c| u64::from_le_bytes(c.try_into().unwrap())).collect();
        assert_eq!(entries.len(), 2);
        let fadt = table_at(&blob, entries[0], b"FACP");
        assert_eq!(fadt.len(), 276);
        assert_eq!(fadt[8], 6, "FADT revision");
        assert_ne!(u32_at(fadt, 112) & FADT_HW_REDUCED_ACPI, 0);
        let boot_flags = u16::from_le_bytes([fadt[109], fadt[110]]);
        assert_ne!(boot_flags & IAPC_8042, 0, "i8042 declared present");
        let dsdt_addr = u64_at(fadt, 140);
        assert_eq!(dsdt_addr, u32_at(fadt, 40) as u64);
        assert_eq!(table_at(&blob, dsdt_addr, b"DSDT").len(), 36);
        let madt = table_at(&blob, entries[1], b"APIC");
        assert_eq!(u32_at(madt, 36) as u64, layout::LAPIC_ADDR);
        // Walk the interrupt controller structures.
        let (mut off, mut lapics, mut ioapics) = (44, vec![], vec![]);
        while off < madt.len() {
            let (ty, len) = (madt[off], madt[off + 1] as usize);
            match ty {
                0 => lapics.push((madt[off + 2], madt[off + 3], u32_at(madt, off + 4))),
                1 => ioapics.push((madt[off + 2], u32_at(madt, off + 4), u32_at(madt, off + 8))),
                _ => panic!("unexpected MADT entry type {ty}"),
            }
            off += len;
        }
        assert_eq!(off, madt.len(), "entries fill the table exactly");
        assert_eq!(lapics, (0..4).map(|i| (i, i, LAPIC_ENABLED)).collect::<Vec<_>>());
        assert_eq!(ioapics, vec![(4, layout::IOAPIC_ADDR as u32, 0)]);
    }

    /// The tables as separate files, the way `acpidump`/`acpixtract` give them.
    fn split(blob: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
        let at = |addr: u64| {
            let off = (addr - BASE) as usize;
            blob[off..off + u32_at(blob, off + 4) as usize].to_vec()
        };
        let xsdt = at(u64_at(blob, 24));
        let (fadt, madt) = (at(u64_at(&xsdt, 36)), at(u64_at(&xsdt, 44)));
        let dsdt = at(u64_at(&fadt, 140));
        vec![("rsdp", blob[..36].to_vec()), ("xsdt", xsdt), ("facp", fadt), ("apic", madt), ("dsdt", dsdt)]
    }

    /// An independent decoder agrees: ACPICA's disassembler (`iasl -d`, from
    /// Debian's acpica-tools, which .ci/run installs) reads every table
    /// without a warning, and finds in them what Linux relies on.
    #[test]
    fn acpica_disassembles_every_table_without_warnings() {
        if std::process::Command::new("iasl").arg("-v").output().is_err() {
            eprintln!("iasl is not installed (apt-get install acpica-tools): skipping");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let mut decoded = std::collections::HashMap::new();
        // iasl takes tables with the common header; the RSDP has none (the
        // test above checks it, and Linux prints what it read from it).
        for (name, bytes) in split(&build(2, BASE)).into_iter().filter(|(n, _)| *n != "rsdp") {
            let dat = dir.path().join(format!("{name}.dat"));
            std::fs::write(&dat, &bytes).unwrap();
            let o = std::process::Command::new("iasl").arg("-d").arg(&dat).current_dir(dir.path()).output().unwrap();
            let log = format!("{}{}", String::from_utf8_lossy(&o.stdout), String::from_utf8_lossy(&o.stderr));
            assert!(o.status.success(), "iasl -d {name}: {log}");
            let dsl = std::fs::read_to_string(dir.path().join(format!("{name}.dsl"))).unwrap();
            for bad in ["Warning", "Error", "Incorrect", "Invalid"] {
                assert!(!log.contains(bad) && !dsl.contains(bad), "{name}: iasl says {bad}:\n{log}\n{dsl}");
            }
            decoded.insert(name, dsl);
        }
        let has =
            |name: &str, what: &str| assert!(decoded[name].contains(what), "{name} lacks {what:?}:\n{}", decoded[name]);
        has("facp", "Hardware Reduced (V5) : 1");
        has("facp", "8042 Present on ports 60/64 (V2) : 1");
        has("facp", "DSDT Address : 00000000000E0030");
        has("apic", "I/O Apic ID : 02");
        assert_eq!(decoded["apic"].matches("Processor Enabled : 1").count(), 2, "{}", decoded["apic"]);
    }

    #[test]
    fn tables_fit_the_reserved_area_for_the_most_cpus() {
        let blob = build(crate::mptable::MAX_CPUS, layout::ACPI_ADDR);
        assert!(layout::ACPI_ADDR + blob.len() as u64 <= layout::LEGACY_HOLE_END);
    }
}
