//! The vCPU thread: runs `KVM_RUN`, routes exits to the port bus, parks when
//! the VM is paused, and reports why the guest stopped.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Instant;

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};

use crate::devices::{DeviceExit, PioBus};
use crate::memory::GuestRam;
use crate::vm::ExitReason;

thread_local! {
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// Signal used to kick vCPUs out of `KVM_RUN`.
pub fn kick_signal() -> i32 {
    vmm_sys_util::signal::SIGRTMIN()
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Setting immediate_exit makes a KVM_RUN that is about to start return
    // at once, closing the race between "check for pause" and "enter guest".
    let p = KVM_RUN_PTR.with(|c| c.get());
    if !p.is_null() {
        // SAFETY: p points at this thread's mmapped kvm_run, valid while the thread lives.
        unsafe { (*p).immediate_exit = 1 };
    }
}

/// Installs the kick handler once per process.
pub fn install_kick_handler() -> Result<(), crate::Error> {
    static ONCE: std::sync::Once = std::sync::Once::new();
    let mut res = Ok(());
    ONCE.call_once(|| {
        res = vmm_sys_util::signal::register_signal_handler(kick_signal(), handle_kick)
            .map_err(|e| crate::Error::Io(std::io::Error::from_raw_os_error(e.errno())));
    });
    res
}

/// What the VM wants its vCPUs to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Want {
    /// Run the guest.
    Run,
    /// Park until told otherwise.
    Pause,
    /// Leave the run loop.
    Stop,
}

/// Shared between the VM controller and its vCPU threads.
pub struct Control {
    pub(crate) inner: Mutex<ControlInner>,
    pub(crate) cv: Condvar,
    /// Fast path: the run loop only takes the lock when this is set.
    pub(crate) attention: AtomicBool,
}

pub struct ControlInner {
    pub want: Want,
    pub parked: u32,
    pub running_threads: u32,
    pub exit: Option<ExitReason>,
    pub first_run: Option<Instant>,
}

impl Control {
    pub fn new(threads: u32) -> Self {
        Control {
            inner: Mutex::new(ControlInner {
                want: Want::Run,
                parked: 0,
                running_threads: threads,
                exit: None,
                first_run: None,
            }),
            cv: Condvar::new(),
            attention: AtomicBool::new(false),
        }
    }

    /// Records why the VM ends (the first reason wins) and asks every vCPU to stop.
    pub fn finish(&self, reason: ExitReason) {
        let mut c = self.inner.lock().unwrap();
        if c.exit.is_none() {
            c.exit = Some(reason);
        }
        c.want = Want::Stop;
        self.attention.store(true, Ordering::SeqCst);
        self.cv.notify_all();
    }
}

/// Runs one vCPU until the VM stops.
pub fn run_vcpu(index: u32, vcpu: Arc<Mutex<VcpuFd>>, ctl: Arc<Control>, bus: Arc<PioBus>, ram: Arc<GuestRam>) {
    let run_ptr: *mut kvm_run = vcpu.lock().unwrap().get_kvm_run();
    KVM_RUN_PTR.with(|c| c.set(run_ptr));
    loop {
        if ctl.attention.load(Ordering::SeqCst) {
            let mut c = ctl.inner.lock().unwrap();
            if c.want == Want::Pause {
                c.parked += 1;
                ctl.cv.notify_all();
                while c.want == Want::Pause {
                    c = ctl.cv.wait(c).unwrap();
                }
                c.parked -= 1;
            }
            if c.want == Want::Stop {
                break;
            }
        }
        let mut fd = vcpu.lock().unwrap();
        if index == 0 {
            let mut c = ctl.inner.lock().unwrap();
            if c.first_run.is_none() {
                c.first_run = Some(Instant::now());
            }
        }
        let outcome = match fd.run() {
            Ok(VcpuExit::IoOut(port, data)) => bus.write(port, data).map(|e| match e {
                DeviceExit::Status(s) => ExitReason::GuestExit { status: s },
                DeviceExit::Reset => ExitReason::GuestReset,
            }),
            Ok(VcpuExit::IoIn(port, data)) => {
                bus.read(port, data);
                None
            }
            Ok(VcpuExit::MmioRead(_, data)) => {
                data.fill(0xff);
                None
            }
            Ok(VcpuExit::MmioWrite(..)) | Ok(VcpuExit::Intr) | Ok(VcpuExit::Hlt) => None,
            Ok(VcpuExit::Shutdown) => Some(describe_crash(index, &fd, &ram, "triple fault (KVM_EXIT_SHUTDOWN)".into())),
            Ok(VcpuExit::InternalError) => {
                let why = internal_error_text(&mut fd);
                Some(describe_crash(index, &fd, &ram, why))
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => Some(ExitReason::Crash {
                vcpu: index,
                what: format!("KVM entry failure: hardware reason {reason:#x} on host CPU {cpu}"),
                rip: 0,
                insn: vec![],
            }),
            Ok(other) => {
                let what = format!("unexpected exit {other:?}");
                Some(describe_crash(index, &fd, &ram, what))
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                fd.set_kvm_immediate_exit(0);
                None
            }
            Err(e) => {
                Some(ExitReason::Crash { vcpu: index, what: format!("KVM_RUN failed: {e}"), rip: 0, insn: vec![] })
            }
        };
        drop(fd);
        if let Some(reason) = outcome {
            ctl.finish(reason);
        }
    }
    let mut c = ctl.inner.lock().unwrap();
    c.running_threads -= 1;
    ctl.cv.notify_all();
}

fn internal_error_text(fd: &mut VcpuFd) -> String {
    let run = fd.get_kvm_run();
    // SAFETY: exit_reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the active member.
    let ie = unsafe { run.__bindgen_anon_1.internal };
    let what = match ie.suberror {
        1 => "instruction emulation failure (KVM_INTERNAL_ERROR_EMULATION): the hypervisor could not emulate the guest's instruction",
        2 => "simultaneous exceptions (KVM_INTERNAL_ERROR_SIMUL_EX)",
        3 => "delivery event failure (KVM_INTERNAL_ERROR_DELIVERY_EV)",
        4 => "unexpected exit reason (KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON)",
        _ => "internal error",
    };
    let n = (ie.ndata as usize).min(ie.data.len());
    let data: Vec<String> = ie.data[..n].iter().map(|d| format!("{d:#x}")).collect();
    format!("{what}, suberror {} data [{}]", ie.suberror, data.join(", "))
}

/// Builds a crash report with RIP and the instruction bytes at it.
fn describe_crash(vcpu: u32, fd: &VcpuFd, ram: &GuestRam, what: String) -> ExitReason {
    let (rip, insn) = match fd.get_regs() {
        Ok(regs) => {
            let sregs = fd.get_sregs().ok();
            let linear = sregs.map(|s| s.cs.base.wrapping_add(regs.rip)).unwrap_or(regs.rip);
            let gpa = if sregs.map(|s| s.cr0 & 0x8000_0000 != 0).unwrap_or(false) {
                fd.translate_gva(linear).ok().filter(|t| t.valid != 0).map(|t| t.physical_address)
            } else {
                Some(linear)
            };
            let insn = gpa.and_then(|g| ram.slice(g, 15).map(|s| s.to_vec())).unwrap_or_default();
            (regs.rip, insn)
        }
        Err(_) => (0, vec![]),
    };
    ExitReason::Crash { vcpu, what, rip, insn }
}
