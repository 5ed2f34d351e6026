//! Finds the Intel MultiProcessor table and lists the enabled processors.
//!
//! Shared (via `#[path]`) with the host crate for unit tests; `core` only.
//! Memory is read through a callback so the host can feed a fake image.

/// Most processors remembered (the guest's own CPU limit is lower).
pub const MAX_APICS: usize = 64;

/// Enabled processors of the MP table: local APIC IDs, BSP flag.
#[derive(Clone, Copy, Debug)]
pub struct Cpus {
    /// Local APIC IDs in table order.
    pub apic_ids: [u8; MAX_APICS],
    /// Which of them has the BSP flag.
    pub is_bsp: [bool; MAX_APICS],
    /// Number of valid entries.
    pub count: usize,
}

fn sum(read: &dyn Fn(u64) -> u8, addr: u64, len: u64) -> u8 {
    (0..len).fold(0u8, |a, i| a.wrapping_add(read(addr + i)))
}

fn rd16(read: &dyn Fn(u64) -> u8, a: u64) -> u64 {
    read(a) as u64 | (read(a + 1) as u64) << 8
}

fn rd32(read: &dyn Fn(u64) -> u8, a: u64) -> u64 {
    rd16(read, a) | rd16(read, a + 2) << 16
}

/// Looks for the `_MP_` floating pointer in `[start, start+len)` (16-byte
/// aligned, valid checksum) and returns its address.
fn scan(read: &dyn Fn(u64) -> u8, start: u64, len: u64) -> Option<u64> {
    let mut a = start & !15;
    while a + 16 <= start + len {
        if read(a) == b'_'
            && read(a + 1) == b'M'
            && read(a + 2) == b'P'
            && read(a + 3) == b'_'
            && sum(read, a, 16 * (read(a + 8) as u64).max(1)) == 0
        {
            return Some(a);
        }
        a += 16;
    }
    None
}

/// Searches the standard places (first KiB of the EBDA, the last KiB below
/// 640 KiB, 0xF0000-0xFFFFF) and parses the processor entries. `read` reads
/// one byte of guest-physical memory below 1 MiB.
pub fn find_cpus(read: &dyn Fn(u64) -> u8) -> Option<Cpus> {
    let ebda = rd16(read, 0x40e) << 4;
    let mut fp = None;
    if (0x80000..0xa0000).contains(&ebda) {
        fp = scan(read, ebda, 1024);
    }
    fp = fp.or_else(|| scan(read, 0x9fc00, 1024)).or_else(|| scan(read, 0xf0000, 0x10000));
    let fp = fp?;
    let table = rd32(read, fp + 4);
    if table == 0 || table >= 0x100000 {
        return None; // default configurations (no table) are not supported
    }
    if read(table) != b'P' || read(table + 1) != b'C' || read(table + 2) != b'M' || read(table + 3) != b'P' {
        return None;
    }
    let base_len = rd16(read, table + 4);
    let count = rd16(read, table + 0x22);
    let end = table + base_len;
    let mut cpus = Cpus { apic_ids: [0; MAX_APICS], is_bsp: [false; MAX_APICS], count: 0 };
    let mut p = table + 0x2c;
    for _ in 0..count {
        if p >= end {
            break;
        }
        match read(p) {
            0 => {
                let flags = read(p + 3);
                if flags & 1 != 0 && cpus.count < MAX_APICS {
                    cpus.apic_ids[cpus.count] = read(p + 1);
                    cpus.is_bsp[cpus.count] = flags & 2 != 0;
                    cpus.count += 1;
                }
                p += 20;
            }
            1..=4 => p += 8,
            _ => break,
        }
    }
    if cpus.count == 0 {
        None
    } else {
        Some(cpus)
    }
}
