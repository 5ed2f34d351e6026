//! ferry-vmm: a KVM virtual machine for x86_64 — guest memory, boot (PVH ELF
//! and Linux bzImage), vCPU threads, the devices ferry emulates, pause and
//! resume, dirty tracking and the memory digest.
//!
//! It knows nothing of files or sockets: images and migration streams live
//! in `ferry-image` and `ferry-migrate`.

#![deny(missing_docs)]

pub mod acpi;
pub mod boot;
pub mod cpu;
pub mod devices;
pub mod dirty;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod size;
pub mod state;
pub mod uffd;
mod vcpu;
pub mod vm;

use std::path::PathBuf;

pub use boot::{KernelFormat, KernelSource};
pub use cpu::CpuTemplate;
pub use dirty::{DirtyConsumer, DirtyView};
pub use memory::{GuestRam, RamRegion};
pub use state::VmState;
pub use vm::{BootTimes, ExitReason, PreparedVm, RunState, Vm, VmConfig, VmStatus};

/// Everything that can go wrong creating or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// /dev/kvm is missing or not accessible.
    #[error("cannot open /dev/kvm: {source}{hint}")]
    KvmOpen {
        /// The OS error.
        source: std::io::Error,
        /// What to do about it.
        hint: &'static str,
    },
    /// A KVM ioctl failed.
    #[error("KVM {op} failed: {source}")]
    Kvm {
        /// Which operation.
        op: &'static str,
        /// The error KVM returned.
        source: kvm_ioctls::Error,
    },
    /// The requested memory size cannot be used.
    #[error("invalid memory size {bytes} bytes: {why}")]
    InvalidMemorySize {
        /// Requested size.
        bytes: u64,
        /// Why it was refused.
        why: String,
    },
    /// A dirty-log sampling ratio that is not a power of two in range.
    #[error("invalid dirty-log sample: one page in {one_in}; must be a power of two from 1 to {max}")]
    InvalidSample {
        /// Requested ratio.
        one_in: u64,
        /// The largest allowed.
        max: u64,
    },
    /// vCPU count out of range.
    #[error("invalid vCPU count {count}: must be between 1 and {max}")]
    InvalidVcpuCount {
        /// Requested count.
        count: u32,
        /// The maximum.
        max: u32,
    },
    /// The kernel file could not be read.
    #[error("cannot read kernel {path}: {source}")]
    KernelFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The kernel is neither an ELF nor a bzImage.
    #[error("{kernel} is not a kernel ferry can boot: expected an ELF with a PVH note or a Linux bzImage")]
    NotAKernel {
        /// The kernel's name.
        kernel: String,
    },
    /// The kernel does not fit in guest memory.
    #[error("kernel {kernel} is {size} bytes, larger than guest memory ({mem} bytes)")]
    KernelTooBig {
        /// The kernel's name.
        kernel: String,
        /// Its size.
        size: u64,
        /// Guest memory size.
        mem: u64,
    },
    /// The loader rejected the kernel.
    #[error("cannot load kernel {kernel}: {why}")]
    KernelLoad {
        /// The kernel's name.
        kernel: String,
        /// Loader's reason.
        why: String,
    },
    /// The initrd could not be read.
    #[error("cannot read initrd {path}: {source}")]
    InitrdFile {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// The initrd does not fit.
    #[error("initrd {path} ({size} bytes) does not fit in the {room} bytes of low memory above the kernel")]
    InitrdTooBig {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// Space available.
        room: u64,
    },
    /// A kernel or initrd path names a device, FIFO, directory or socket.
    #[error("{what} {path} is {kind}, not a regular file")]
    NotARegularFile {
        /// "kernel" or "initrd".
        what: &'static str,
        /// The path as given (symlinks are followed).
        path: PathBuf,
        /// What it is instead ("a character device", "a FIFO (named pipe)", "a directory"...).
        kind: &'static str,
    },
    /// The command line is too long.
    #[error("kernel command line is {len} bytes; at most {max} are allowed")]
    CmdlineTooLong {
        /// Its length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// A guest-physical range is not backed by RAM.
    #[error("guest address range {gpa:#x}+{len:#x} is not in guest RAM")]
    GuestAddress {
        /// Start.
        gpa: u64,
        /// Length.
        len: u64,
    },
    /// The operation needs a different VM state.
    #[error("VM is {state}: {what}")]
    WrongState {
        /// Current state.
        state: &'static str,
        /// What was attempted.
        what: &'static str,
    },
    /// A saved state cannot be applied.
    #[error("invalid VM state: {0}")]
    BadState(String),
    /// A host I/O error (threads, eventfds).
    #[error("host I/O error: {0}")]
    Io(#[from] std::io::Error),
}
