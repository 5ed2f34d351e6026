//! Checks that the embedded guest is a PVH ELF the way VMMs load it.

use ferry_guest::{ELF, LOAD_ADDR};

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes(b[o..o + 2].try_into().unwrap())
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().unwrap())
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().unwrap())
}

struct Phdr {
    typ: u32,
    offset: u64,
    paddr: u64,
    filesz: u64,
    memsz: u64,
    align: u64,
}

fn phdrs() -> Vec<Phdr> {
    let (phoff, phentsize, phnum) = (u64_at(ELF, 0x20) as usize, u16_at(ELF, 0x36) as usize, u16_at(ELF, 0x38));
    (0..phnum as usize)
        .map(|i| {
            let p = phoff + i * phentsize;
            Phdr {
                typ: u32_at(ELF, p),
                offset: u64_at(ELF, p + 8),
                paddr: u64_at(ELF, p + 0x18),
                filesz: u64_at(ELF, p + 0x20),
                memsz: u64_at(ELF, p + 0x28),
                align: u64_at(ELF, p + 0x30),
            }
        })
        .collect()
}

#[test]
fn is_elf64_x86_64_exec() {
    assert_eq!(&ELF[..4], b"\x7fELF");
    assert_eq!(ELF[4], 2, "ELFCLASS64");
    assert_eq!(ELF[5], 1, "little endian");
    assert_eq!(u16_at(ELF, 0x10), 2, "ET_EXEC");
    assert_eq!(u16_at(ELF, 0x12), 62, "EM_X86_64");
}

#[test]
fn one_load_segment_at_1mib() {
    let loads: Vec<_> = phdrs().into_iter().filter(|p| p.typ == 1).collect();
    assert_eq!(loads.len(), 1);
    assert_eq!(loads[0].paddr, LOAD_ADDR);
    assert!(loads[0].memsz >= loads[0].filesz);
    // Image, stacks and page tables stay well below 2 MiB.
    assert!(LOAD_ADDR + loads[0].memsz < 0x1f_0000, "memsz {:#x}", loads[0].memsz);
}

#[test]
fn pvh_note_points_at_out_0x80() {
    let ph = phdrs();
    let note = ph.iter().find(|p| p.typ == 4).expect("PT_NOTE");
    assert_eq!(note.align, 4, "QEMU pads the note name to p_align");
    let n = &ELF[note.offset as usize..(note.offset + note.filesz) as usize];
    let (namesz, descsz, typ) = (u32_at(n, 0), u32_at(n, 4), u32_at(n, 8));
    assert_eq!((namesz, typ), (4, 18), "XEN_ELFNOTE_PHYS32_ENTRY");
    assert_eq!(&n[12..16], b"Xen\0");
    assert!(descsz == 4 || descsz == 8);
    let entry = u32_at(n, 16) as u64;
    let load = ph.iter().find(|p| p.typ == 1).unwrap();
    let off = (load.offset + entry - load.paddr) as usize;
    assert_eq!(&ELF[off..off + 2], &[0xe6, 0x80], "first instruction is out 0x80, al");
}

#[test]
fn linux_loader_finds_pvh_entry() {
    use linux_loader::loader::elf::{Elf, PvhBootCapability};
    use linux_loader::loader::KernelLoader;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let r = Elf::load(&mem, None, &mut std::io::Cursor::new(ELF), Some(GuestAddress(LOAD_ADDR))).unwrap();
    let PvhBootCapability::PvhEntryPresent(entry) = r.pvh_boot_cap else {
        panic!("no PVH entry: {:?}", r.pvh_boot_cap);
    };
    let mut first = [0u8; 2];
    mem.read_slice(&mut first, entry).unwrap();
    assert_eq!(first, [0xe6, 0x80]);
    assert!(r.kernel_end <= 0x20_0000, "image ends below 2 MiB: {:#x}", r.kernel_end);
}
