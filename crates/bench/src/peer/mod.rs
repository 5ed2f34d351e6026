//! The other VMMs ferry is measured against, on the same machine and the
//! same test guest, so that every comparison is a ratio from one run.

pub(crate) mod cloud_hypervisor;
pub(crate) mod firecracker;
pub(crate) mod qemu;
