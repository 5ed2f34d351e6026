//! The virtual machine: creation, boot, vCPU threads, pause/resume,
//! shutdown, and the questions a control API asks (status, memory digest).

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::{
    kvm_fpu, kvm_pit_config, kvm_regs, kvm_userspace_memory_region, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use crate::dirty::{DirtyConsumer, DirtyLog, DirtyView};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::signal::Killable;

use crate::boot::{self, BootConfig, KernelFormat, KernelSource};
use crate::cpu::{self, CpuTemplate, EntryMode};
use crate::devices::{PioBus, SerialOut, COM1_IRQ, I8042_IRQ};
use crate::layout;
use crate::memory::GuestRam;
use crate::mptable::MAX_CPUS;
use crate::state::{self as persist, VmState, VM_STATE_VERSION};
use crate::vcpu::{self, Control, Want};
use crate::Error;

/// How to build a VM.
pub struct VmConfig {
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// Number of vCPUs (1..=32).
    pub vcpus: u32,
    /// Kernel to boot.
    pub kernel: KernelSource,
    /// Optional initrd.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: String,
    /// CPUID template.
    pub cpu_template: CpuTemplate,
    /// Serial output sink.
    pub serial_out: SerialOut,
    /// Back guest RAM with memfds (shared mappings) so that a local
    /// migration can hand the memory to a new ferry process.
    pub memfd: bool,
}

/// Why the guest stopped.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum ExitReason {
    /// The guest wrote an exit status to the exit port.
    GuestExit {
        /// The status byte.
        status: u8,
    },
    /// The guest reset itself through the i8042.
    GuestReset,
    /// The host asked for a shutdown and the guest did not finish in time.
    ShutdownForced,
    /// The guest was handed to another VMM by a live migration; it runs there now.
    Migrated {
        /// Where it went.
        to: String,
    },
    /// The guest crashed or the hypervisor gave up on it.
    Crash {
        /// vCPU that stopped.
        vcpu: u32,
        /// What happened.
        what: String,
        /// Guest RIP at the time.
        rip: u64,
        /// Instruction bytes at RIP (up to 15), when readable.
        insn: Vec<u8>,
    },
}

impl ExitReason {
    /// The process exit status ferry uses for this reason: the guest's own
    /// status, 0 for a reset or forced shutdown, 125 for a crash.
    pub fn exit_code(&self) -> i32 {
        match self {
            ExitReason::GuestExit { status } => *status as i32,
            ExitReason::GuestReset | ExitReason::ShutdownForced | ExitReason::Migrated { .. } => 0,
            ExitReason::Crash { .. } => 125,
        }
    }
}

impl std::fmt::Display for ExitReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ExitReason::GuestExit { status } => write!(f, "guest exited with status {status}"),
            ExitReason::GuestReset => write!(f, "guest reset the machine (i8042)"),
            ExitReason::ShutdownForced => write!(f, "guest did not shut down in time; stopped by the host"),
            ExitReason::Migrated { to } => write!(f, "guest migrated to {to}; it runs there now"),
            ExitReason::Crash { vcpu, what, rip, insn } => {
                let bytes: Vec<String> = insn.iter().map(|b| format!("{b:02x}")).collect();
                write!(
                    f,
                    "guest crashed on vCPU {vcpu}: {what}; RIP={rip:#x} instruction bytes [{}]",
                    bytes.join(" ")
                )?;
                if let Some(name) = name_instruction(insn) {
                    write!(f, " ({name})")?;
                }
                Ok(())
            }
        }
    }
}

/// Names the instructions software hypervisors are known to stop at, so a
/// crash report says "lock cmpxchg16b" rather than only bytes.
pub fn name_instruction(insn: &[u8]) -> Option<String> {
    let mut i = 0;
    let mut lock = false;
    let mut rex_w = false;
    while let Some(&b) = insn.get(i) {
        match b {
            0xf0 => lock = true,
            0xf2 | 0xf3 | 0x66 | 0x67 | 0x2e | 0x36 | 0x3e | 0x26 | 0x64 | 0x65 => {}
            0x40..=0x4f => rex_w = b & 0x08 != 0,
            _ => break,
        }
        i += 1;
    }
    let op = &insn.get(i..)?;
    let reg = |m: u8| (m >> 3) & 7;
    let name = match op {
        [0xcc, ..] => "int3".to_string(),
        [0x0f, 0x0b, ..] => "ud2".to_string(),
        [0x0f, 0xc7, m, ..] if reg(*m) == 1 => if rex_w { "cmpxchg16b" } else { "cmpxchg8b" }.to_string(),
        [0x0f, 0xae, m, ..] if *m < 0xc0 && reg(*m) == 5 => if rex_w { "xrstor64" } else { "xrstor" }.to_string(),
        [0x0f, 0xae, m, ..] if *m < 0xc0 && reg(*m) == 4 => if rex_w { "xsave64" } else { "xsave" }.to_string(),
        [0x0f, 0xc7, m, ..] if *m < 0xc0 && reg(*m) == 4 => "xsavec".to_string(),
        [0x0f, 0x01, 0xd0, ..] => "xgetbv".to_string(),
        [0x0f, 0x01, 0xd1, ..] => "xsetbv".to_string(),
        [0x0f, 0xa2, ..] => "cpuid".to_string(),
        [0x0f, 0x30, ..] => "wrmsr".to_string(),
        [0x0f, 0x32, ..] => "rdmsr".to_string(),
        _ => return None,
    };
    Some(if lock { format!("lock {name}") } else { name })
}

/// Timestamps of a boot, for `ferry bench boot` (serialised as milliseconds).
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct BootTimes {
    /// VM, memory and vCPUs created and the kernel loaded.
    #[serde(rename = "setup_done_ms", serialize_with = "as_ms")]
    pub setup_done: Option<Duration>,
    /// The boot vCPU entered `KVM_RUN` for the first time.
    #[serde(rename = "first_kvm_run_ms", serialize_with = "as_ms")]
    pub first_kvm_run: Option<Duration>,
    /// The guest wrote the POST port (its first instruction, for the test guest).
    #[serde(rename = "first_guest_io_ms", serialize_with = "as_ms")]
    pub first_guest_io: Option<Duration>,
}

fn as_ms<S: serde::Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
    match d {
        Some(d) => s.serialize_some(&(d.as_secs_f64() * 1e3)),
        None => s.serialize_none(),
    }
}

/// Whether the guest runs: what `GET /vm` reports as `state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RunState {
    /// vCPUs are executing the guest.
    Running,
    /// Every vCPU is parked outside `KVM_RUN`.
    Paused,
    /// The guest has ended; the VM cannot run again.
    Stopped,
}

impl RunState {
    /// The lower-case name used in messages and JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::Stopped => "stopped",
        }
    }
}

impl std::fmt::Display for RunState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A snapshot of what the VM is, for `GET /vm`.
#[derive(Clone, Debug, Serialize)]
pub struct VmStatus {
    /// Running, paused or stopped.
    pub state: RunState,
    /// Number of vCPUs.
    pub vcpus: u32,
    /// Guest RAM in bytes.
    pub mem_bytes: u64,
    /// RAM ranges (guest-physical start, length).
    pub ram_ranges: Vec<(u64, u64)>,
    /// Kernel format booted (none for a restored VM).
    pub kernel_format: Option<KernelFormat>,
    /// Kernel name.
    pub kernel: String,
    /// Command line.
    pub cmdline: String,
    /// CPU template.
    pub cpu_template: CpuTemplate,
    /// TSC frequency in kHz as KVM reports it (0 if unknown).
    pub tsc_khz: u32,
    /// Why the VM stopped, once it has.
    pub exit: Option<ExitReason>,
}

/// A running (or paused, or stopped) VM.
pub struct Vm {
    vm_fd: Arc<VmFd>,
    ram: Arc<GuestRam>,
    vcpus: Vec<Arc<Mutex<VcpuFd>>>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    ctl: Arc<Control>,
    bus: Arc<PioBus>,
    status: VmStatus,
    created: Instant,
    boot_times: Mutex<BootTimes>,
    msr_list: std::sync::OnceLock<Vec<u32>>,
    dirty: Arc<DirtyLog>,
    /// The view the snapshot lineage reads: made when the VM is created from
    /// a state (restore, incoming migration) or at its first snapshot.
    lineage: Mutex<Option<Arc<DirtyView>>>,
}

fn kvm_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
    move |source| Error::Kvm { op, source }
}

/// Opens /dev/kvm with an error that says what to do.
pub fn open_kvm() -> Result<Kvm, Error> {
    Kvm::new().map_err(|e| {
        let source = std::io::Error::from_raw_os_error(e.errno());
        let hint = match e.errno() {
            libc::ENOENT => " (KVM is not available: enable virtualisation or load kvm_intel/kvm_amd)",
            libc::EACCES | libc::EPERM => " (permission denied: run as root or add your user to the kvm group)",
            _ => "",
        };
        Error::KvmOpen { source, hint }
    })
}

impl Vm {
    /// Creates the VM, loads the kernel and starts all vCPUs.
    /// `process_start` anchors the boot timestamps.
    pub fn boot(config: VmConfig, process_start: Instant) -> Result<Vm, Error> {
        let ram = if config.memfd { Some(Arc::new(GuestRam::new_memfd(config.mem_bytes)?)) } else { None };
        let parts = Parts::new(config.mem_bytes, config.vcpus, false, ram)?;
        let entry = boot::load(
            &parts.ram,
            &BootConfig {
                kernel: &config.kernel,
                initrd: config.initrd.as_deref(),
                cmdline: &config.cmdline,
                vcpus: config.vcpus,
            },
        )?;
        let kernel = match &config.kernel {
            KernelSource::Path(p) => p.display().to_string(),
            KernelSource::Bytes(n, _) => n.to_string(),
        };
        let vm = parts.finish(
            config.vcpus,
            config.cpu_template,
            0,
            config.serial_out,
            process_start,
            Some(entry.format),
            kernel,
            config.cmdline,
            |id, fd| {
                if id == 0 {
                    set_boot_regs(fd, entry.rip, entry.mode, entry.boot_info)?;
                }
                Ok(())
            },
        )?;
        vm.start_threads()?;
        Ok(vm)
    }

    /// Recreates a VM from a saved state. `fill` writes guest memory before
    /// any vCPU exists; the vCPUs start paused when `paused` is set.
    pub fn restore(
        state: &VmState,
        serial_out: SerialOut,
        paused: bool,
        process_start: Instant,
        source: String,
        fill: impl FnOnce(&GuestRam) -> Result<(), Error>,
    ) -> Result<Vm, Error> {
        Self::restore_parts(state, serial_out, paused, process_start, source, &mut None, fill)
    }

    fn restore_parts(
        state: &VmState,
        serial_out: SerialOut,
        paused: bool,
        process_start: Instant,
        source: String,
        ram: &mut Option<Arc<GuestRam>>,
        fill: impl FnOnce(&GuestRam) -> Result<(), Error>,
    ) -> Result<Vm, Error> {
        state.check()?;
        let count = state.vcpus.len() as u32;
        // Restored VMs log dirty pages from the start (their next snapshot can
        // be incremental), so the slots are created with logging on.
        let parts = Parts::new(state.mem_bytes, count, true, ram.take())?;
        fill(&parts.ram)?;
        let vm = parts.finish(
            count,
            state.cpu_template,
            state.tsc_khz,
            serial_out,
            process_start,
            None,
            source,
            state.cmdline.clone(),
            |id, fd| {
                let s =
                    state.vcpus.get(id as usize).ok_or_else(|| Error::BadState(format!("no state for vCPU {id}")))?;
                persist::restore_vcpu(fd, s)
            },
        )?;
        persist::restore_vm(&vm.vm_fd, &state.pit, &state.clock, &state.irqchips)?;
        vm.bus.restore(&state.devices)?;
        if paused {
            let mut c = vm.ctl.inner.lock().unwrap();
            c.want = Want::Pause;
            vm.ctl.attention.store(true, Ordering::SeqCst);
        }
        vm.start_threads()?;
        if paused {
            vm.pause()?;
        }
        Ok(vm)
    }

    /// Builds a VM for an incoming migration before its state arrives: memory
    /// slots (dirty logging on), irqchip, PIT, devices and configured vCPUs,
    /// everything that does not depend on the state. Creating the memory
    /// slots costs milliseconds on this host; done here, it stays out of the
    /// migration's downtime. Pages are written into [`PreparedVm::ram`] as
    /// they arrive; [`PreparedVm::apply`] then only loads the state.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_incoming(
        mem_bytes: u64,
        vcpus: u32,
        template: CpuTemplate,
        tsc_khz: u32,
        cmdline: String,
        serial_out: SerialOut,
        process_start: Instant,
        source: String,
        ram: Option<Arc<GuestRam>>,
    ) -> Result<PreparedVm, Error> {
        let parts = Parts::new(mem_bytes, vcpus, true, ram)?;
        let vm =
            parts.finish(vcpus, template, tsc_khz, serial_out, process_start, None, source, cmdline, |_, _| Ok(()))?;
        Ok(PreparedVm { vm })
    }

    /// Recreates a VM from a saved state around guest RAM that is already
    /// filled (an incoming migration writes pages as they arrive, before the
    /// state exists). The vCPUs start paused.
    pub fn restore_with_ram(
        state: &VmState,
        ram: Arc<GuestRam>,
        serial_out: SerialOut,
        process_start: Instant,
        source: String,
    ) -> Result<Vm, Error> {
        if ram.size() != state.mem_bytes {
            return Err(Error::BadState(format!(
                "VM state declares {} bytes of RAM, but {} were received",
                state.mem_bytes,
                ram.size()
            )));
        }
        let mut ram = Some(ram);
        Self::restore_parts(state, serial_out, true, process_start, source, &mut ram, |_| Ok(()))
    }

    /// Captures vCPU, interrupt-controller, clock and device state. The VM
    /// must be paused.
    pub fn save_state(&self) -> Result<VmState, Error> {
        {
            let c = self.ctl.inner.lock().unwrap();
            if c.want != Want::Pause || c.parked != c.running_threads {
                return Err(Error::WrongState { state: "running", what: "pause it before saving its state" });
            }
        }
        let mut vcpus = Vec::new();
        for (id, fd) in self.vcpus.iter().enumerate() {
            let fd = fd.lock().unwrap();
            // Probing which MSRs KVM can read costs one ioctl per MSR: do it once per VM,
            // not inside every snapshot's pause.
            let msrs = match self.msr_list.get() {
                Some(l) => l,
                None => {
                    let l = persist::saveable_msrs(&open_kvm()?, &fd)?;
                    self.msr_list.get_or_init(|| l)
                }
            };
            vcpus.push(persist::save_vcpu(id as u32, &fd, msrs)?);
        }
        let (pit, clock, irqchips) = persist::save_vm(&self.vm_fd)?;
        Ok(VmState {
            version: VM_STATE_VERSION,
            mem_bytes: self.status.mem_bytes,
            cmdline: self.status.cmdline.clone(),
            cpu_template: self.status.cpu_template,
            tsc_khz: self.status.tsc_khz,
            vcpus,
            pit,
            clock,
            irqchips,
            devices: self.bus.save(),
        })
    }

    /// A new view of the dirty log for `consumer`: it sees every page the
    /// guest writes from now on, whatever other views read meanwhile.
    pub fn dirty_view(&self, consumer: DirtyConsumer) -> Result<DirtyView, Error> {
        self.dirty.view(consumer)
    }

    /// A view that sees a fixed sample of one page in `one_in` (a power of
    /// two): it costs the guest a fault only on the sampled pages it writes,
    /// so a sampler can read often without slowing a fast writer (see
    /// [`crate::dirty`]). Without manual protection on the host it is exact.
    pub fn sampled_dirty_view(&self, consumer: DirtyConsumer, one_in: u64) -> Result<DirtyView, Error> {
        self.dirty.sampled_view(consumer, one_in)
    }

    /// The snapshot lineage's view (made on first use): what changed since
    /// the last snapshot, or since the VM was built from a state.
    pub fn lineage_log(&self) -> Result<Arc<DirtyView>, Error> {
        let mut l = self.lineage.lock().unwrap();
        if let Some(v) = l.as_ref() {
            return Ok(v.clone());
        }
        let v = Arc::new(self.dirty.view(DirtyConsumer::Lineage)?);
        *l = Some(v.clone());
        Ok(v)
    }

    /// Who reads the dirty log now (one entry per view).
    pub fn dirty_consumers(&self) -> Vec<DirtyConsumer> {
        self.dirty.consumers()
    }

    fn start_threads(&self) -> Result<(), Error> {
        vcpu::install_kick_handler()?;
        let mut threads = self.threads.lock().unwrap();
        for (i, fd) in self.vcpus.iter().enumerate() {
            let (fd, ctl, bus, ram) = (fd.clone(), self.ctl.clone(), self.bus.clone(), self.ram.clone());
            let h = std::thread::Builder::new()
                .name(format!("vcpu{i}"))
                .spawn(move || vcpu::run_vcpu(i as u32, fd, ctl, bus, ram))?;
            threads.push(h);
        }
        Ok(())
    }

    fn kick_all(&self) {
        for t in self.threads.lock().unwrap().iter() {
            let _ = t.kill(vcpu::kick_signal());
        }
    }

    /// Guest RAM.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.ram
    }

    /// The KVM VM handle (dirty log, irqchip state).
    pub fn vm_fd(&self) -> &VmFd {
        &self.vm_fd
    }

    /// The port bus (serial input, device state).
    pub fn bus(&self) -> &PioBus {
        &self.bus
    }

    /// Pauses every vCPU and waits until all are parked outside `KVM_RUN`.
    pub fn pause(&self) -> Result<(), Error> {
        {
            let mut c = self.ctl.inner.lock().unwrap();
            match c.want {
                Want::Stop => return Err(Error::WrongState { state: "stopped", what: "cannot pause" }),
                // Already requested (maybe by restore): still wait until every vCPU is parked.
                Want::Pause => {}
                Want::Run => {
                    c.want = Want::Pause;
                    self.ctl.attention.store(true, Ordering::SeqCst);
                }
            }
        }
        let mut kicked = false;
        loop {
            let c = self.ctl.inner.lock().unwrap();
            if c.want == Want::Stop {
                return Err(Error::WrongState { state: "stopped", what: "stopped while pausing" });
            }
            if c.parked == c.running_threads {
                return Ok(());
            }
            if kicked {
                // Wait for a vCPU to park; kick again if a signal was missed.
                drop(self.ctl.cv.wait_timeout(c, Duration::from_millis(1)).unwrap());
            } else {
                drop(c);
            }
            self.kick_all();
            kicked = true;
        }
    }

    /// Asks every vCPU to pause and returns at once, without waiting for
    /// them to park: a vCPU blocked on a page that has not arrived (post-copy
    /// with its link lost) parks only once the page is there.
    pub fn request_pause(&self) -> Result<(), Error> {
        {
            let mut c = self.ctl.inner.lock().unwrap();
            match c.want {
                Want::Stop => return Err(Error::WrongState { state: "stopped", what: "cannot pause" }),
                Want::Pause => return Ok(()),
                Want::Run => {
                    c.want = Want::Pause;
                    self.ctl.attention.store(true, Ordering::SeqCst);
                }
            }
        }
        self.kick_all();
        Ok(())
    }

    /// Resumes a paused VM.
    pub fn resume(&self) -> Result<(), Error> {
        let mut c = self.ctl.inner.lock().unwrap();
        match c.want {
            Want::Stop => return Err(Error::WrongState { state: "stopped", what: "cannot resume" }),
            Want::Run => return Ok(()),
            Want::Pause => {}
        }
        c.want = Want::Run;
        self.ctl.attention.store(false, Ordering::SeqCst);
        self.ctl.cv.notify_all();
        Ok(())
    }

    /// True while paused.
    pub fn is_paused(&self) -> bool {
        self.ctl.inner.lock().unwrap().want == Want::Pause
    }

    /// Asks the guest to shut down (Ctrl-Alt-Del through the i8042); if it
    /// has not stopped after `timeout`, stops it.
    pub fn request_shutdown(self: &Arc<Self>, timeout: Duration) -> Result<(), Error> {
        if self.is_paused() {
            self.resume()?;
        }
        self.bus.ctrl_alt_del();
        let me = Arc::downgrade(self);
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if let Some(vm) = me.upgrade() {
                vm.stop(ExitReason::ShutdownForced);
            }
        });
        Ok(())
    }

    /// Stops the VM at once with `reason` (ignored if it already stopped).
    pub fn stop(&self, reason: ExitReason) {
        self.ctl.finish(reason);
        self.kick_all();
    }

    /// Blocks until the VM stops; joins vCPU threads and returns why.
    pub fn wait(&self) -> ExitReason {
        let reason = {
            let mut c = self.ctl.inner.lock().unwrap();
            while c.exit.is_none() {
                c = self.ctl.cv.wait(c).unwrap();
            }
            c.exit.clone().unwrap()
        };
        self.kick_all();
        loop {
            let c = self.ctl.inner.lock().unwrap();
            if c.running_threads == 0 {
                break;
            }
            drop(self.ctl.cv.wait_timeout(c, Duration::from_millis(1)).unwrap());
            self.kick_all();
        }
        for t in self.threads.lock().unwrap().drain(..) {
            let _ = t.join();
        }
        self.bus.flush();
        reason
    }

    /// Current status.
    pub fn status(&self) -> VmStatus {
        let mut s = self.status.clone();
        let c = self.ctl.inner.lock().unwrap();
        s.state = match (c.want, &c.exit) {
            (_, Some(_)) | (Want::Stop, _) => RunState::Stopped,
            (Want::Pause, _) => RunState::Paused,
            (Want::Run, _) => RunState::Running,
        };
        s.exit = c.exit.clone();
        s
    }

    /// BLAKE3 digest of guest memory; the VM must be paused so it is consistent.
    pub fn memory_digest(&self) -> Result<blake3::Hash, Error> {
        let c = self.ctl.inner.lock().unwrap();
        if c.want != Want::Pause || c.parked != c.running_threads {
            return Err(Error::WrongState {
                state: if c.want == Want::Stop { "stopped" } else { "running" },
                what: "pause it before taking a memory digest",
            });
        }
        drop(c);
        Ok(self.ram.digest())
    }

    /// Boot timestamps relative to process start.
    pub fn boot_times(&self) -> BootTimes {
        let mut t = *self.boot_times.lock().unwrap();
        let c = self.ctl.inner.lock().unwrap();
        t.first_kvm_run = c.first_run.map(|i| i.saturating_duration_since(self.created));
        t.first_guest_io = self.bus.first_guest_io().map(|i| i.saturating_duration_since(self.created));
        t
    }
}

/// A VM built ahead of its state (see [`Vm::prepare_incoming`]); no vCPU
/// thread runs until [`PreparedVm::apply`].
pub struct PreparedVm {
    vm: Vm,
}

impl PreparedVm {
    /// Guest RAM, to be filled before the state is applied.
    pub fn ram(&self) -> &Arc<GuestRam> {
        &self.vm.ram
    }

    /// Loads `state` (checked against what the VM was built with) and starts
    /// the vCPU threads, paused.
    pub fn apply(self, state: &VmState) -> Result<Vm, Error> {
        let vm = self.vm;
        state.check()?;
        let want = (vm.status.mem_bytes, vm.vcpus.len(), vm.status.cpu_template, vm.status.tsc_khz);
        let got = (state.mem_bytes, state.vcpus.len(), state.cpu_template, state.tsc_khz);
        if want != got {
            return Err(Error::BadState(format!(
                "VM state (memory, vCPUs, CPU template, TSC kHz) {got:?} does not match the VM built for it {want:?}"
            )));
        }
        for (fd, s) in vm.vcpus.iter().zip(&state.vcpus) {
            persist::restore_vcpu(&fd.lock().unwrap(), s)?;
        }
        persist::restore_vm(&vm.vm_fd, &state.pit, &state.clock, &state.irqchips)?;
        vm.bus.restore(&state.devices)?;
        {
            let mut c = vm.ctl.inner.lock().unwrap();
            c.want = Want::Pause;
            vm.ctl.attention.store(true, Ordering::SeqCst);
        }
        vm.start_threads()?;
        vm.pause()?;
        Ok(vm)
    }
}

/// CPUID feature registers a guest sees and a migration destination must
/// offer as well: (leaf, subleaf, register name, mask of the bits that are
/// features rather than IDs or dynamic state).
const FEATURE_WORDS: &[(u32, u32, &str, u32)] = &[
    (1, 0, "ecx", !(1 << 27)), // OSXSAVE mirrors the guest's CR4
    (1, 0, "edx", u32::MAX),
    (7, 0, "ebx", u32::MAX),
    (7, 0, "ecx", !(1 << 4)), // OSPKE mirrors the guest's CR4
    (7, 0, "edx", u32::MAX),
    (0xd, 1, "eax", u32::MAX),
    (0x8000_0001, 0, "ecx", u32::MAX),
    (0x8000_0001, 0, "edx", u32::MAX),
];

/// The CPUID feature bits a guest with `template` gets on this host: what a
/// migration source announces and a destination checks against its own.
pub fn guest_cpu_features(template: CpuTemplate) -> Result<Vec<(u32, u32, &'static str, u32)>, Error> {
    let kvm = open_kvm()?;
    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
    let mut entries = supported.as_slice().to_vec();
    cpu::patch_cpuid(&mut entries, 0, 1, 0, template);
    Ok(FEATURE_WORDS
        .iter()
        .map(|&(leaf, sub, reg, mask)| {
            let e = entries.iter().find(|e| e.function == leaf && (e.index == sub || (leaf != 7 && leaf != 0xd)));
            let v = e.map(|e| match reg {
                "eax" => e.eax,
                "ebx" => e.ebx,
                "ecx" => e.ecx,
                _ => e.edx,
            });
            (leaf, sub, reg, v.unwrap_or(0) & mask)
        })
        .collect())
}

/// KVM objects and memory shared by boot and restore, before vCPU threads exist.
struct Parts {
    kvm: Kvm,
    vm_fd: VmFd,
    ram: Arc<GuestRam>,
    log_dirty: bool,
    /// Manual dirty-log protection is on (see [`crate::dirty`]).
    manual_dirty: bool,
}

impl Parts {
    fn new(mem_bytes: u64, vcpus: u32, log_dirty: bool, ram: Option<Arc<GuestRam>>) -> Result<Parts, Error> {
        if vcpus == 0 || vcpus > MAX_CPUS {
            return Err(Error::InvalidVcpuCount { count: vcpus, max: MAX_CPUS });
        }
        let kvm = open_kvm()?;
        let ram = match ram {
            Some(r) => r,
            None => Arc::new(GuestRam::new(mem_bytes)?),
        };
        let vm_fd = kvm.create_vm().map_err(kvm_err("KVM_CREATE_VM"))?;
        vm_fd.set_tss_address(layout::KVM_TSS_ADDR as usize).map_err(kvm_err("KVM_SET_TSS_ADDR"))?;
        vm_fd.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDR).map_err(kvm_err("KVM_SET_IDENTITY_MAP_ADDR"))?;
        let manual_dirty = crate::dirty::enable_manual_protect(&vm_fd);
        for (slot, r) in ram.regions().iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if log_dirty { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host as u64,
            };
            // SAFETY: the mapping outlives the VM (both owned by Vm).
            unsafe { vm_fd.set_user_memory_region(region) }.map_err(kvm_err("KVM_SET_USER_MEMORY_REGION"))?;
        }
        // The interrupt controllers come after the memory slots: on this
        // host, a slot created after KVM_CREATE_IRQCHIP costs ten times as
        // much (1 GiB: 5-9 ms against 0.6 ms), which was most of the time to
        // a restored guest's first instruction. Firecracker orders it so too.
        vm_fd.create_irq_chip().map_err(kvm_err("KVM_CREATE_IRQCHIP"))?;
        vm_fd
            .create_pit2(kvm_pit_config { flags: KVM_PIT_SPEAKER_DUMMY, ..Default::default() })
            .map_err(kvm_err("KVM_CREATE_PIT2"))?;
        Ok(Parts { kvm, vm_fd, ram, log_dirty, manual_dirty })
    }

    #[allow(clippy::too_many_arguments)]
    fn finish(
        self,
        count: u32,
        template: CpuTemplate,
        want_tsc_khz: u32,
        serial_out: SerialOut,
        process_start: Instant,
        format: Option<KernelFormat>,
        kernel: String,
        cmdline: String,
        per_vcpu: impl Fn(u32, &VcpuFd) -> Result<(), Error>,
    ) -> Result<Vm, Error> {
        let Parts { kvm, vm_fd, ram, log_dirty, manual_dirty } = self;
        let serial_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        let kbd_irq = EventFd::new(libc::EFD_NONBLOCK)?;
        vm_fd.register_irqfd(&serial_irq, COM1_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
        vm_fd.register_irqfd(&kbd_irq, I8042_IRQ).map_err(kvm_err("KVM_IRQFD"))?;
        let bus = Arc::new(PioBus::new(serial_out, serial_irq, kbd_irq));
        let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).map_err(kvm_err("KVM_GET_SUPPORTED_CPUID"))?;
        let mut vcpus = Vec::new();
        let mut tsc_khz = want_tsc_khz;
        for id in 0..count {
            let fd = vm_fd.create_vcpu(id as u64).map_err(kvm_err("KVM_CREATE_VCPU"))?;
            let host_khz = fd.get_tsc_khz().unwrap_or(0);
            if tsc_khz == 0 {
                tsc_khz = host_khz;
            } else if host_khz != tsc_khz {
                // A restored guest keeps the TSC rate it booted with.
                let _ = fd.set_tsc_khz(tsc_khz);
            }
            configure_vcpu(&fd, id, count, tsc_khz, template, &supported)?;
            per_vcpu(id, &fd)?;
            vcpus.push(Arc::new(Mutex::new(fd)));
        }
        let status = VmStatus {
            state: RunState::Running,
            vcpus: count,
            mem_bytes: ram.size(),
            ram_ranges: ram.regions().iter().map(|r| (r.gpa, r.len)).collect(),
            kernel_format: format,
            kernel,
            cmdline,
            cpu_template: template,
            tsc_khz,
            exit: None,
        };
        let vm_fd = Arc::new(vm_fd);
        let dirty = DirtyLog::new(vm_fd.clone(), ram.regions().to_vec(), log_dirty, manual_dirty);
        // A VM built from a state tracks writes from its very first one, so
        // that its next snapshot can be incremental over that state's image.
        let lineage = if log_dirty { Some(Arc::new(dirty.view(DirtyConsumer::Lineage)?)) } else { None };
        Ok(Vm {
            vm_fd,
            ram,
            dirty,
            lineage: Mutex::new(lineage),
            ctl: Arc::new(Control::new(count)),
            vcpus,
            threads: Mutex::new(Vec::new()),
            bus,
            status,
            created: process_start,
            boot_times: Mutex::new(BootTimes { setup_done: Some(process_start.elapsed()), ..Default::default() }),
            msr_list: std::sync::OnceLock::new(),
        })
    }
}

fn configure_vcpu(
    fd: &VcpuFd,
    id: u32,
    count: u32,
    tsc_khz: u32,
    template: CpuTemplate,
    supported: &kvm_bindings::CpuId,
) -> Result<(), Error> {
    let mut entries = supported.as_slice().to_vec();
    cpu::patch_cpuid(&mut entries, id, count, tsc_khz, template);
    let cpuid =
        kvm_bindings::CpuId::from_entries(&entries).map_err(|_| Error::BadState("too many CPUID entries".into()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm_err("KVM_SET_CPUID2"))?;
    let msrs = cpu::boot_msrs();
    let m = Msrs::from_entries(&msrs).map_err(|_| Error::BadState("too many MSRs".into()))?;
    let n = fd.set_msrs(&m).map_err(kvm_err("KVM_SET_MSRS"))?;
    if n != msrs.len() {
        return Err(Error::BadState(format!(
            "KVM accepted only {n} of {} boot MSRs; first refused: {:#x}",
            msrs.len(),
            msrs[n].index
        )));
    }
    let mut lapic = fd.get_lapic().map_err(kvm_err("KVM_GET_LAPIC"))?;
    cpu::setup_lint(&mut lapic);
    fd.set_lapic(&lapic).map_err(kvm_err("KVM_SET_LAPIC"))?;
    let fpu = kvm_fpu { fcw: 0x37f, mxcsr: 0x1f80, ..Default::default() };
    fd.set_fpu(&fpu).map_err(kvm_err("KVM_SET_FPU"))?;
    Ok(())
}

fn set_boot_regs(fd: &VcpuFd, rip: u64, mode: EntryMode, boot_info: u64) -> Result<(), Error> {
    let mut sregs = fd.get_sregs().map_err(kvm_err("KVM_GET_SREGS"))?;
    cpu::setup_sregs(&mut sregs, mode);
    fd.set_sregs(&sregs).map_err(kvm_err("KVM_SET_SREGS"))?;
    let mut regs =
        kvm_regs { rip, rflags: 0x2, rsp: layout::BOOT_STACK_ADDR, rbp: layout::BOOT_STACK_ADDR, ..Default::default() };
    match mode {
        EntryMode::Protected32 => regs.rbx = boot_info,
        EntryMode::Long64 => regs.rsi = boot_info,
    }
    fd.set_regs(&regs).map_err(kvm_err("KVM_SET_REGS"))?;
    Ok(())
}

#[cfg(test)]
mod insn_tests {
    use super::name_instruction;

    #[test]
    fn names_the_instructions_the_emulator_lacks() {
        assert_eq!(name_instruction(&[0xf0, 0x48, 0x0f, 0xc7, 0x4d, 0x20]).as_deref(), Some("lock cmpxchg16b"));
        assert_eq!(name_instruction(&[0x48, 0x0f, 0xae, 0x2f]).as_deref(), Some("xrstor64"));
        assert_eq!(name_instruction(&[0xcc, 0x90]).as_deref(), Some("int3"));
        assert_eq!(name_instruction(&[0x90]), None);
        assert_eq!(name_instruction(&[]), None);
    }
}
