//! ferry's test guest, built by `build.rs` from `payload/` and embedded here.
//!
//! The guest is a PVH ELF that boots in a few dozen (emulated) ring-0
//! instructions and does all its work in ring 3. Its command line, output
//! lines, ports and memory pattern are documented in `guest/README.md`; the
//! parsers and the pattern arithmetic are shared with the guest through the
//! modules below, so host-side tests use exactly the guest's rules.

/// The finished PVH ELF (load at physical 1 MiB, entry in the Xen
/// PHYS32_ENTRY note).
pub static ELF: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/ferry-guest.elf"));

/// Physical address the ELF's single load segment starts at.
pub const LOAD_ADDR: u64 = 0x10_0000;

/// Port of the exit device: a byte written here is the VM's exit status.
pub const EXIT_PORT: u16 = 0xf4;

/// Port the guest's very first instruction writes to (`out 0x80, al`).
pub const FIRST_INSN_PORT: u16 = 0x80;

/// Physical page the AP trampoline occupies (SIPI vector 0x09).
pub const AP_TRAMPOLINE: u64 = 0x9000;

#[path = "../payload/cmdline.rs"]
pub mod cmdline;

#[path = "../payload/pattern.rs"]
pub mod pattern;

#[path = "../payload/mptable.rs"]
pub mod mptable;
