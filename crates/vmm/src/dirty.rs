//! Dirty-page tracking with one view per consumer.
//!
//! KVM keeps one dirty bitmap per memory slot, and reading it
//! (`KVM_GET_DIRTY_LOG`) clears it. With several readers (the snapshot
//! lineage, a migration, the working-set sampler, a memory watch) whoever
//! read first would steal the others' pages: an incremental snapshot taken
//! while a watch runs would miss what the watch had read. So nobody reads
//! KVM's log directly. Each consumer holds a [`DirtyView`]; taking a view
//! reads KVM's log once, ORs it into *every* view, and hands back (and
//! clears) only the taker's own bits.

use std::sync::{Arc, Mutex};

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
use kvm_ioctls::VmFd;

use crate::memory::RamRegion;
use crate::Error;

/// One bit per 4 KiB page of a RAM region, as KVM reports it.
pub type Bitmap = Vec<u64>;

/// Who reads a view, so that errors and listings can name it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DirtyConsumer {
    /// What changed since the VM's last snapshot (or the image it came from).
    Lineage,
    /// A live migration's rounds.
    Migration,
    /// The working-set sampler (`ferry wss`).
    WorkingSet,
    /// An incremental memory scan (`ferry scan --watch`).
    Watch,
}

struct ViewBits {
    id: u64,
    consumer: DirtyConsumer,
    bits: Vec<Bitmap>,
}

struct Inner {
    logging: bool,
    next_id: u64,
    views: Vec<ViewBits>,
}

/// The VM's side of dirty tracking: KVM's log and every consumer's bits.
pub(crate) struct DirtyLog {
    vm_fd: Arc<VmFd>,
    regions: Vec<RamRegion>,
    inner: Mutex<Inner>,
}

fn empty(regions: &[RamRegion]) -> Vec<Bitmap> {
    regions.iter().map(|r| vec![0u64; (r.len / 4096).div_ceil(64) as usize]).collect()
}

impl DirtyLog {
    /// `logging`: whether the slots were created with dirty logging on.
    pub(crate) fn new(vm_fd: Arc<VmFd>, regions: Vec<RamRegion>, logging: bool) -> Arc<Self> {
        Arc::new(Self { vm_fd, regions, inner: Mutex::new(Inner { logging, next_id: 1, views: Vec::new() }) })
    }

    fn set_logging(&self, on: bool) -> Result<(), Error> {
        for (slot, r) in self.regions.iter().enumerate() {
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                flags: if on { KVM_MEM_LOG_DIRTY_PAGES } else { 0 },
                guest_phys_addr: r.gpa,
                memory_size: r.len,
                userspace_addr: r.host as u64,
            };
            // SAFETY: same mapping as registered at creation, still alive (the
            // VM owns the RAM and this log).
            unsafe { self.vm_fd.set_user_memory_region(region) }
                .map_err(|source| Error::Kvm { op: "KVM_SET_USER_MEMORY_REGION", source })?;
        }
        Ok(())
    }

    /// Reads (and so clears) KVM's log and ORs it into every view.
    fn harvest(&self, inner: &mut Inner) -> Result<(), Error> {
        if !inner.logging {
            return Ok(());
        }
        for (slot, r) in self.regions.iter().enumerate() {
            let log = self
                .vm_fd
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(|source| Error::Kvm { op: "KVM_GET_DIRTY_LOG", source })?;
            for v in inner.views.iter_mut() {
                for (d, s) in v.bits[slot].iter_mut().zip(&log) {
                    *d |= *s;
                }
            }
        }
        Ok(())
    }

    /// Adds a view that starts empty: it sees the pages written from now on.
    pub(crate) fn view(self: &Arc<Self>, consumer: DirtyConsumer) -> Result<DirtyView, Error> {
        let mut inner = self.inner.lock().unwrap();
        if !inner.logging {
            self.set_logging(true)?;
            inner.logging = true;
        }
        // What KVM logged so far belongs to the views that already exist.
        self.harvest(&mut inner)?;
        let id = inner.next_id;
        inner.next_id += 1;
        inner.views.push(ViewBits { id, consumer, bits: empty(&self.regions) });
        Ok(DirtyView { log: self.clone(), id, consumer })
    }

    /// The consumers that hold a view now.
    pub(crate) fn consumers(&self) -> Vec<DirtyConsumer> {
        self.inner.lock().unwrap().views.iter().map(|v| v.consumer).collect()
    }
}

/// One consumer's dirty pages: everything the guest wrote since the view was
/// made or last taken, whoever else reads theirs meanwhile. Dropping it
/// removes the view.
pub struct DirtyView {
    log: Arc<DirtyLog>,
    id: u64,
    consumer: DirtyConsumer,
}

impl DirtyView {
    /// The pages written since the view was made or last taken (one bitmap
    /// per RAM region, in region order); the view starts over empty.
    pub fn take(&self) -> Result<Vec<Bitmap>, Error> {
        let mut inner = self.log.inner.lock().unwrap();
        self.log.harvest(&mut inner)?;
        let fresh = empty(&self.log.regions);
        let v = inner.views.iter_mut().find(|v| v.id == self.id).expect("a live view is registered");
        Ok(std::mem::replace(&mut v.bits, fresh))
    }

    /// Forgets what the view holds, so that it sees only later writes.
    pub fn reset(&self) -> Result<(), Error> {
        self.take().map(drop)
    }

    /// Puts pages back (ORs them in), e.g. when an operation that took them
    /// failed and its successor must still see them.
    pub fn put_back(&self, bits: &[Bitmap]) {
        let mut inner = self.log.inner.lock().unwrap();
        if let Some(v) = inner.views.iter_mut().find(|v| v.id == self.id) {
            for (dst, src) in v.bits.iter_mut().zip(bits) {
                for (d, s) in dst.iter_mut().zip(src) {
                    *d |= *s;
                }
            }
        }
    }

    /// Who this view is for.
    pub fn consumer(&self) -> DirtyConsumer {
        self.consumer
    }
}

impl Drop for DirtyView {
    fn drop(&mut self) {
        // Dirty logging stays on: turning it off and on again would cost a
        // memory-slot update each time, and the lineage view is usually there.
        self.log.inner.lock().unwrap().views.retain(|v| v.id != self.id);
    }
}

impl std::fmt::Debug for DirtyView {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DirtyView").field("id", &self.id).field("consumer", &self.consumer).finish()
    }
}
