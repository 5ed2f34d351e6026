//! Ring-3 hardware access: port I/O (IOPL=3), TSC, CPUID, COM1, i8042, PIT,
//! xAPIC (the LAPIC page is mapped user-accessible) and the exit device.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

/// COM1 base port.
pub const COM1: u16 = 0x3f8;
/// ferry's exit device (QEMU: isa-debug-exit, iobase=0xf4).
pub const EXIT_PORT: u16 = 0xf4;
const LAPIC: usize = 0xfee0_0000;

#[inline(always)]
pub fn outb(port: u16, v: u8) {
    // SAFETY: IOPL=3 lets ring 3 do port I/O.
    unsafe { asm!("out dx, al", in("dx") port, in("al") v, options(nomem, nostack, preserves_flags)) }
}

#[inline(always)]
pub fn inb(port: u16) -> u8 {
    let v: u8;
    // SAFETY: IOPL=3 lets ring 3 do port I/O.
    unsafe { asm!("in al, dx", in("dx") port, out("al") v, options(nomem, nostack, preserves_flags)) }
    v
}

#[inline(always)]
pub fn rdtsc() -> u64 {
    // SAFETY: CR4.TSD is clear, so rdtsc works at CPL 3.
    unsafe { core::arch::x86_64::_rdtsc() }
}

/// Minimal 16550 setup: 115200 8N1, FIFOs on, interrupts off.
pub fn serial_init() {
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x80);
    outb(COM1, 0x01);
    outb(COM1 + 1, 0x00);
    outb(COM1 + 3, 0x03);
    outb(COM1 + 2, 0xc7);
    outb(COM1 + 4, 0x03);
}

fn serial_put(b: u8) {
    // Wait for THR empty, but never forever (a missing UART reads 0xff).
    let mut spins = 0u32;
    while inb(COM1 + 5) & 0x20 == 0 && spins < 1_000_000 {
        spins += 1;
        core::hint::spin_loop();
    }
    outb(COM1, b);
}

/// Reads one received byte from COM1 if there is one.
pub fn serial_get() -> Option<u8> {
    if inb(COM1 + 5) & 0x01 != 0 {
        Some(inb(COM1))
    } else {
        None
    }
}

/// Reads one byte from the i8042 output buffer if there is one.
pub fn kbd_get() -> Option<u8> {
    let st = inb(0x64);
    if st != 0xff && st & 0x01 != 0 {
        Some(inb(0x60))
    } else {
        None
    }
}

static SERIAL_LOCK: AtomicBool = AtomicBool::new(false);

/// Writes bytes to COM1 under a spin lock so lines of different CPUs never
/// interleave.
pub fn serial_write(bytes: &[u8]) {
    while SERIAL_LOCK.compare_exchange_weak(false, true, Ordering::Acquire, Ordering::Relaxed).is_err() {
        core::hint::spin_loop();
    }
    for &b in bytes {
        serial_put(b);
    }
    SERIAL_LOCK.store(false, Ordering::Release);
}

/// Breaks the serial lock (used by the panic handler).
pub fn serial_unlock() {
    SERIAL_LOCK.store(false, Ordering::Release);
}

/// Exits the VM: ferry's exit device, then an i8042 reset, then spins.
pub fn exit(code: u8) -> ! {
    // Let the UART drain (TEMT) so the last line is not lost.
    let mut spins = 0u32;
    while inb(COM1 + 5) & 0x40 == 0 && spins < 1_000_000 {
        spins += 1;
    }
    outb(EXIT_PORT, code);
    outb(0x64, 0xfe);
    loop {
        core::hint::spin_loop();
    }
}

pub fn lapic_read(reg: usize) -> u32 {
    // SAFETY: the xAPIC page is identity mapped and user-accessible.
    unsafe { core::ptr::read_volatile((LAPIC + reg) as *const u32) }
}

pub fn lapic_write(reg: usize, v: u32) {
    // SAFETY: as above.
    unsafe { core::ptr::write_volatile((LAPIC + reg) as *mut u32, v) }
}

/// Sends an IPI through the xAPIC ICR and waits until it was delivered.
pub fn send_ipi(apic_id: u32, low: u32) {
    lapic_write(0x310, apic_id << 24);
    lapic_write(0x300, low);
    let mut spins = 0u32;
    while lapic_read(0x300) & (1 << 12) != 0 && spins < 100_000 {
        spins += 1;
        core::hint::spin_loop();
    }
}

/// Busy-waits `ticks` TSC ticks.
pub fn delay_ticks(ticks: u64) {
    let t0 = rdtsc();
    while rdtsc().wrapping_sub(t0) < ticks {
        core::hint::spin_loop();
    }
}

/// Latches and reads the PIT channel 2 count.
fn pit2_count() -> u16 {
    outb(0x43, 0x80);
    let lo = inb(0x42) as u16;
    lo | (inb(0x42) as u16) << 8
}

/// A (TSC, PIT count) pair taken as tightly as possible (best of 5), so
/// that a vCPU being descheduled between the two readings does not matter.
fn pit2_sample() -> (u64, u16, u64) {
    let mut best = (0, 0, u64::MAX);
    for _ in 0..5 {
        let a = rdtsc();
        let c = pit2_count();
        let w = rdtsc() - a;
        if w < best.2 {
            best = (a + w / 2, c, w);
        }
    }
    best
}

/// Measures the TSC against PIT channel 2 (mode 0 from 0xffff, ~35 ms).
/// Reads the PIT count at both ends instead of waiting for OUT2, so host
/// scheduling delays between the samples do not distort the result.
/// None if the PIT does not seem to count.
pub fn pit_calibrate_khz() -> Option<u64> {
    const PIT_HZ: u128 = 1_193_182;
    for _ in 0..3 {
        let v = inb(0x61);
        outb(0x61, (v & !0x02) | 0x01); // gate on, speaker off
        outb(0x43, 0xb0); // channel 2, lobyte/hibyte, mode 0, binary
        outb(0x42, 0xff);
        outb(0x42, 0xff);
        let (t0, c0, _) = pit2_sample();
        let start = rdtsc();
        let mut c = c0;
        // Wait for ~42000 PIT ticks (35 ms); give up after ~10^11 TSC ticks.
        while c0.wrapping_sub(c) < 42_000 && c <= c0 {
            if rdtsc() - start > 100_000_000_000 {
                return None;
            }
            c = pit2_count();
        }
        let (t1, c1, _) = pit2_sample();
        // OUT2 high: the count passed 0 and wrapped; the difference is void.
        if inb(0x61) & 0x20 != 0 || c1 > c0 {
            continue;
        }
        let ticks = (c0 - c1) as u128;
        let khz = ((t1 - t0) as u128 * PIT_HZ / ticks / 1000) as u64;
        return if khz == 0 { None } else { Some(khz) };
    }
    None
}

/// Source of the TSC frequency, for the INFO line.
#[derive(Clone, Copy)]
pub enum TscSource {
    Cmdline,
    Cpuid,
    Pit,
    Guess,
}

impl TscSource {
    pub fn name(self) -> &'static str {
        match self {
            TscSource::Cmdline => "cmdline",
            TscSource::Cpuid => "cpuid",
            TscSource::Pit => "pit",
            TscSource::Guess => "guess",
        }
    }
}

/// TSC kHz from the hypervisor leaf 0x40000010 (as filled by ferry and
/// QEMU), from the values ring 0 read (see `boot::boot_cpuid`).
pub fn cpuid_tsc_khz((leaf1_ecx, max, khz): (u32, u32, u32)) -> Option<u64> {
    if leaf1_ecx & (1 << 31) == 0 {
        return None; // no hypervisor: leaf 0x40000000 is meaningless
    }
    if !(0x4000_0010..=0x4000_00ff).contains(&max) || khz == 0 {
        return None;
    }
    Some(khz as u64)
}

/// Local APIC ID of the calling CPU, from the xAPIC ID register (ring-3
/// CPUID may report the host CPU's ID under PVM).
pub fn apic_id() -> u32 {
    lapic_read(0x20) >> 24
}
