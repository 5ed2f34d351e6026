//! Persist: the serialisable state of a VM apart from its live objects
//! (Firecracker's pattern). `save` runs with the VM paused; `restore` applies
//! the state to freshly created KVM objects before any vCPU runs.

use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::cpu::CpuTemplate;
use crate::devices::DevicesState;
use crate::Error;

/// Version of the serialised `VmState`; bumped on incompatible changes.
pub const VM_STATE_VERSION: u32 = 1;

/// One vCPU's architectural state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    /// vCPU index (also its APIC ID).
    pub id: u32,
    /// General-purpose registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU/SSE/AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers.
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debug_regs: kvm_debugregs,
    /// Local APIC registers.
    pub lapic: kvm_lapic_state,
    /// MSRs from KVM_GET_MSR_INDEX_LIST that this host can read.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs.
    pub events: kvm_vcpu_events,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
}

/// The whole VM apart from memory: what a snapshot stores after its pages.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// [`VM_STATE_VERSION`] at save time.
    pub version: u32,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Kernel command line the VM booted with (informational).
    pub cmdline: String,
    /// CPU template, re-applied to CPUID on restore.
    pub cpu_template: CpuTemplate,
    /// TSC frequency the guest saw (kHz).
    pub tsc_khz: u32,
    /// Every vCPU.
    pub vcpus: Vec<VcpuState>,
    /// i8254 PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock.
    pub clock: kvm_clock_data,
    /// PIC master, PIC slave, IOAPIC.
    pub irqchips: Vec<kvm_irqchip>,
    /// User-space devices.
    pub devices: DevicesState,
}

/// Most MSRs one vCPU's state may carry (KVM's index list has a few hundred).
pub const MAX_MSRS_PER_VCPU: usize = 1024;

/// Longest device FIFO a state may carry (the 16550 has 64 bytes; i8042 a few).
pub const MAX_DEVICE_BUFFER: usize = 4096;

/// Longest command line a state may carry.
pub const MAX_STATE_CMDLINE: usize = 64 << 10;

impl VmState {
    /// Checks every count and length before anything is applied: a state
    /// read from a file or a peer is hostile until checked.
    pub fn check(&self) -> Result<(), Error> {
        let bad = |w: String| Err(Error::BadState(w));
        if self.version != VM_STATE_VERSION {
            return bad(format!(
                "VM state version {} is not supported (this ferry reads {VM_STATE_VERSION})",
                self.version
            ));
        }
        let n = self.vcpus.len();
        if n == 0 || n > crate::mptable::MAX_CPUS as usize {
            return bad(format!("{n} vCPUs in the state; 1..={} are supported", crate::mptable::MAX_CPUS));
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return bad(format!("vCPU {i} carries id {}", v.id));
            }
            if v.msrs.len() > MAX_MSRS_PER_VCPU {
                return bad(format!("vCPU {i} carries {} MSRs, more than {MAX_MSRS_PER_VCPU}", v.msrs.len()));
            }
        }
        if self.irqchips.len() != 3 {
            return bad(format!(
                "{} interrupt controllers in the state; expected 3 (PIC master, PIC slave, IOAPIC)",
                self.irqchips.len()
            ));
        }
        for (i, want) in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC].iter().enumerate() {
            if self.irqchips[i].chip_id != *want {
                return bad(format!(
                    "interrupt controller {i} has chip id {}, expected {want}",
                    self.irqchips[i].chip_id
                ));
            }
        }
        if self.cmdline.len() > MAX_STATE_CMDLINE {
            return bad(format!("command line of {} bytes", self.cmdline.len()));
        }
        if self.devices.serial.in_buffer.len() > MAX_DEVICE_BUFFER
            || self.devices.i8042.buffer.len() > MAX_DEVICE_BUFFER
        {
            return bad("a device buffer is longer than any device has".into());
        }
        if self.mem_bytes == 0 {
            return bad("no guest memory in the state".into());
        }
        Ok(())
    }
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// MSRs worth saving: the host's index list, minus those KVM refuses to read.
pub fn saveable_msrs(kvm: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, Error> {
    let list = kvm.get_msr_index_list().map_err(kvm_err("KVM_GET_MSR_INDEX_LIST"))?;
    let mut ok = Vec::new();
    for &index in list.as_slice() {
        let mut m = Msrs::from_entries(&[kvm_msr_entry { index, ..Default::default() }])
            .map_err(|_| Error::BadState("MSR list".into()))?;
        if vcpu.get_msrs(&mut m).map(|n| n == 1).unwrap_or(false) {
            ok.push(index);
        }
    }
    Ok(ok)
}

/// Saves one vCPU (it must not be inside KVM_RUN).
pub fn save_vcpu(id: u32, fd: &VcpuFd, msr_indices: &[u32]) -> Result<VcpuState, Error> {
    let mp_state = fd.get_mp_state().map_err(kvm_err("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm_err("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm_err("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm_err("KVM_GET_XCRS"))?;
    let debug_regs = fd.get_debug_regs().map_err(kvm_err("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    let events = fd.get_vcpu_events().map_err(kvm_err("KVM_GET_VCPU_EVENTS"))?;
    let entries: Vec<kvm_msr_entry> =
        msr_indices.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
    let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::BadState("too many MSRs".into()))?;
    let n = fd.get_msrs(&mut msrs).map_err(kvm_err("KVM_GET_MSRS"))?;
    if n != entries.len() {
        return Err(Error::BadState(format!(
            "KVM read only {n} of {} MSRs; first refused: {:#x}",
            entries.len(),
            entries[n].index
        )));
    }
    Ok(VcpuState { id, regs, sregs, xsave, xcrs, debug_regs, lapic, msrs: msrs.as_slice().to_vec(), events, mp_state })
}

/// Applies a saved vCPU state, in the order KVM needs (Firecracker's order).
pub fn restore_vcpu(fd: &VcpuFd, s: &VcpuState) -> Result<(), Error> {
    fd.set_mp_state(s.mp_state).map_err(kvm_err("KVM_SET_MP_STATE"))?;
    fd.set_regs(&s.regs).map_err(kvm_err("KVM_SET_REGS"))?;
    fd.set_sregs(&s.sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    // SAFETY: the xsave buffer came from KVM_GET_XSAVE on the same architecture.
    unsafe { fd.set_xsave(&s.xsave) }.map_err(kvm_err("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&s.xcrs).map_err(kvm_err("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&s.debug_regs).map_err(kvm_err("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&s.lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&s.msrs).map_err(|_| Error::BadState("too many MSRs".into()))?;
    let n = fd.set_msrs(&msrs).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != s.msrs.len() {
        return Err(Error::BadState(format!(
            "KVM accepted only {n} of {} saved MSRs; first refused: {:#x}",
            s.msrs.len(),
            s.msrs[n].index
        )));
    }
    fd.set_vcpu_events(&s.events).map_err(kvm_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

/// Saves PIT, kvmclock and the in-kernel interrupt controllers.
pub fn save_vm(vm: &VmFd) -> Result<(kvm_pit_state2, kvm_clock_data, Vec<kvm_irqchip>), Error> {
    let pit = vm.get_pit2().map_err(kvm_err("KVM_GET_PIT2"))?;
    let clock = vm.get_clock().map_err(kvm_err("KVM_GET_CLOCK"))?;
    let mut chips = Vec::new();
    for id in [KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQCHIP_IOAPIC] {
        let mut c = kvm_irqchip { chip_id: id, ..Default::default() };
        vm.get_irqchip(&mut c).map_err(kvm_err("KVM_GET_IRQCHIP"))?;
        chips.push(c);
    }
    Ok((pit, clock, chips))
}

/// Restores what [`save_vm`] saved.
pub fn restore_vm(vm: &VmFd, pit: &kvm_pit_state2, clock: &kvm_clock_data, chips: &[kvm_irqchip]) -> Result<(), Error> {
    vm.set_pit2(pit).map_err(kvm_err("KVM_SET_PIT2"))?;
    // Only the clock value carries over; flags describe the source host.
    let c = kvm_clock_data { clock: clock.clock, ..Default::default() };
    vm.set_clock(&c).map_err(kvm_err("KVM_SET_CLOCK"))?;
    for chip in chips {
        vm.set_irqchip(chip).map_err(kvm_err("KVM_SET_IRQCHIP"))?;
    }
    Ok(())
}

#[cfg(test)]
mod check_tests {
    use super::*;
    use crate::devices::{DevicesState, I8042State, SerialRegs};

    fn vcpu(id: u32) -> VcpuState {
        VcpuState {
            id,
            regs: Default::default(),
            sregs: Default::default(),
            xsave: Default::default(),
            xcrs: Default::default(),
            debug_regs: Default::default(),
            lapic: Default::default(),
            msrs: vec![kvm_msr_entry { index: 0x10, data: 5, ..Default::default() }],
            events: Default::default(),
            mp_state: Default::default(),
        }
    }

    fn state() -> VmState {
        let chip = |id| kvm_irqchip { chip_id: id, ..Default::default() };
        VmState {
            version: VM_STATE_VERSION,
            mem_bytes: 64 << 20,
            cmdline: "idle".into(),
            cpu_template: CpuTemplate::Host,
            tsc_khz: 1000,
            vcpus: vec![vcpu(0), vcpu(1)],
            pit: Default::default(),
            clock: Default::default(),
            irqchips: vec![chip(KVM_IRQCHIP_PIC_MASTER), chip(KVM_IRQCHIP_PIC_SLAVE), chip(KVM_IRQCHIP_IOAPIC)],
            devices: DevicesState {
                serial: SerialRegs {
                    baud_divisor_low: 0,
                    baud_divisor_high: 0,
                    interrupt_enable: 0,
                    interrupt_identification: 0,
                    line_control: 0,
                    line_status: 0,
                    modem_control: 0,
                    modem_status: 0,
                    scratch: 0,
                    in_buffer: vec![],
                },
                i8042: I8042State::default(),
            },
        }
    }

    #[test]
    fn check_refuses_bad_counts() {
        state().check().unwrap();
        let mut s = state();
        s.vcpus.clear();
        assert!(s.check().is_err());
        let mut s = state();
        s.vcpus[1].id = 7;
        assert!(s.check().unwrap_err().to_string().contains("id 7"));
        let mut s = state();
        s.vcpus[0].msrs = vec![Default::default(); MAX_MSRS_PER_VCPU + 1];
        assert!(s.check().is_err());
        let mut s = state();
        s.irqchips.pop();
        assert!(s.check().is_err());
        let mut s = state();
        s.irqchips[2].chip_id = 9;
        assert!(s.check().is_err());
        let mut s = state();
        s.devices.i8042.buffer = vec![0; MAX_DEVICE_BUFFER + 1];
        assert!(s.check().is_err());
    }

    /// The state decoder under a small deterministic fuzzer that runs in the
    /// suite: mutated JSON decodes or fails, never panics, and what decodes
    /// is then checked.
    #[test]
    fn fuzz_the_state_decoder() {
        let seed = serde_json::to_vec(&state()).unwrap();
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let (mut decoded, mut checked) = (0, 0);
        for i in 0..20_000 {
            let mut b = seed.clone();
            match i % 3 {
                0 => {
                    for _ in 0..(next() % 4 + 1) {
                        let at = next() as usize % b.len();
                        let alphabet = b"0123456789[]{},:\"-e.x ";
                        b[at] = alphabet[next() as usize % alphabet.len()];
                    }
                }
                1 => b.truncate(next() as usize % b.len()),
                _ => {
                    let at = next() as usize % b.len();
                    let digits = format!("{}", next());
                    b.splice(at..at, digits.into_bytes());
                }
            }
            if let Ok(s) = serde_json::from_slice::<VmState>(&b) {
                decoded += 1;
                if s.check().is_ok() {
                    checked += 1;
                }
            }
        }
        eprintln!("state fuzz: {decoded} of 20000 mutations decoded, {checked} passed the checks");
    }
}
