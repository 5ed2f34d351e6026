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
//!
//! Reading the log is not what costs the guest: re-protecting the pages it
//! wrote is, because its next write to each of them faults into the host
//! (on this PVM host, about 16 µs a fault). A working-set sampler that read
//! every 100 ms all of a guest rewriting 64 MiB would fault 160,000 times a
//! second and stall the guest. So where the host has manual protection
//! (`KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`), reading the log re-protects
//! nothing by itself, and the log re-protects (`KVM_CLEAR_DIRTY_LOG`) what
//! its readers need: every page read while an exact reader (a migration, a
//! watch, an exact sampler) holds a view; only a fixed pseudo-random
//! sample of pages while the only readers are a sampling view and the
//! snapshot lineage. Pages outside the sample then stay dirty and writable:
//! the sampler ignores them (and scales its counts), and the lineage sees
//! them as dirty, which costs a larger incremental snapshot, never a
//! missing page. The first exact read afterwards re-protects them all.

use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region, KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
    KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vmm_sys_util::ioctl::ioctl_with_ref;

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

/// The ioctl kvm-ioctls does not wrap.
mod ioctls {
    use kvm_bindings::kvm_clear_dirty_log;
    /// The KVM ioctl type number.
    const KVMIO: u32 = 0xAE;
    vmm_sys_util::ioctl_iowr_nr!(KVM_CLEAR_DIRTY_LOG, KVMIO, 0xc0, kvm_clear_dirty_log);
}
use ioctls::KVM_CLEAR_DIRTY_LOG;

/// Largest sampling ratio (one page in this many).
pub const MAX_SAMPLE_ONE_IN: u64 = 4096;

/// Turns on manual dirty-log protection, before any memory slot exists;
/// returns whether the host has it (without it, every read re-protects all
/// it reports, and sampling views read exactly).
pub(crate) fn enable_manual_protect(vm_fd: &VmFd) -> bool {
    // KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE only: slots start write-protected,
    // as without the capability.
    let cap = kvm_enable_cap { cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, args: [1, 0, 0, 0], ..Default::default() };
    vm_fd.enable_cap(&cap).is_ok()
}

/// A fixed mix of a page frame number: the sample must not follow the
/// strides a guest writes with.
fn mix(pfn: u64) -> u64 {
    let mut z = pfn.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The pages of a sample of one in `one_in` (a power of two): those whose
/// mixed frame number has its low bits zero, so a sparser sample is a
/// subset of a denser one.
fn sample_mask(regions: &[RamRegion], one_in: u64) -> Vec<Bitmap> {
    regions.iter().map(|r| sample_bitmap(r.gpa / 4096, r.len / 4096, one_in)).collect()
}

/// The sample of one page in `one_in` (a power of two) among `pages` pages
/// from frame `first_pfn` on, as a bitmap: the pages a sampling view of
/// that density tracks. Readers that mix densities (a sample thinned during
/// a run) mask what they gathered with the sparser one.
pub fn sample_bitmap(first_pfn: u64, pages: u64, one_in: u64) -> Bitmap {
    let mut map = vec![0u64; pages.div_ceil(64) as usize];
    if one_in <= 1 {
        map.iter_mut().for_each(|w| *w = !0);
        if !pages.is_multiple_of(64) {
            if let Some(last) = map.last_mut() {
                *last = (1u64 << (pages % 64)) - 1;
            }
        }
        return map;
    }
    for p in 0..pages {
        if mix(first_pfn + p) & (one_in - 1) == 0 {
            map[(p / 64) as usize] |= 1 << (p % 64);
        }
    }
    map
}

/// A sampling view's pages.
struct Sample {
    one_in: u64,
    mask: Vec<Bitmap>,
}

struct ViewBits {
    id: u64,
    consumer: DirtyConsumer,
    bits: Vec<Bitmap>,
    /// `None`: every page (exact).
    sample: Option<Sample>,
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
    /// Manual protection is on: reads re-protect only what [`DirtyLog::harvest`] clears.
    manual: bool,
    inner: Mutex<Inner>,
}

fn empty(regions: &[RamRegion]) -> Vec<Bitmap> {
    regions.iter().map(|r| vec![0u64; (r.len / 4096).div_ceil(64) as usize]).collect()
}

impl DirtyLog {
    /// `logging`: whether the slots were created with dirty logging on;
    /// `manual`: whether [`enable_manual_protect`] succeeded on `vm_fd`.
    pub(crate) fn new(vm_fd: Arc<VmFd>, regions: Vec<RamRegion>, logging: bool, manual: bool) -> Arc<Self> {
        Arc::new(Self { vm_fd, regions, manual, inner: Mutex::new(Inner { logging, next_id: 1, views: Vec::new() }) })
    }

    /// Re-protects the pages set in `bits` of `slot`, so the next write to each is logged.
    fn clear(&self, slot: usize, r: &RamRegion, bits: &[u64]) -> Result<(), Error> {
        let mut c = kvm_clear_dirty_log {
            slot: slot as u32,
            num_pages: (r.len / 4096) as u32,
            first_page: 0,
            ..Default::default()
        };
        c.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
        // SAFETY: `bits` holds a bit for each of the slot's `num_pages` pages
        // and lives across the call; KVM only reads it.
        let ret = unsafe { ioctl_with_ref(&*self.vm_fd, KVM_CLEAR_DIRTY_LOG(), &c) };
        if ret < 0 {
            return Err(Error::Kvm { op: "KVM_CLEAR_DIRTY_LOG", source: vmm_sys_util::errno::Error::last() });
        }
        Ok(())
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

    /// The sampling view whose sample is re-protected (the densest), or
    /// `None` when every page read must be: an exact reader other than the
    /// lineage holds a view, no view samples, or the host has no manual protection.
    fn sampled_by(&self, inner: &Inner) -> Option<usize> {
        if !self.manual || inner.views.iter().any(|v| v.sample.is_none() && v.consumer != DirtyConsumer::Lineage) {
            return None;
        }
        (0..inner.views.len())
            .filter(|&i| inner.views[i].sample.is_some())
            .min_by_key(|&i| inner.views[i].sample.as_ref().map_or(u64::MAX, |s| s.one_in))
    }

    /// Reads KVM's log, re-protects what the readers need (see the module
    /// documentation) and ORs it into every view (a sampling view keeps
    /// only its sample).
    fn harvest(&self, inner: &mut Inner) -> Result<(), Error> {
        if !inner.logging {
            return Ok(());
        }
        let sampled_by = self.sampled_by(inner);
        for (slot, r) in self.regions.iter().enumerate() {
            let log = self
                .vm_fd
                .get_dirty_log(slot as u32, r.len as usize)
                .map_err(|source| Error::Kvm { op: "KVM_GET_DIRTY_LOG", source })?;
            if self.manual {
                let sample = sampled_by.and_then(|i| inner.views[i].sample.as_ref());
                let protect: Vec<u64> = match sample {
                    Some(s) => log.iter().zip(&s.mask[slot]).map(|(l, m)| l & m).collect(),
                    None => log.clone(),
                };
                if protect.iter().any(|&w| w != 0) {
                    self.clear(slot, r, &protect)?;
                }
            }
            for v in inner.views.iter_mut() {
                match &v.sample {
                    None => v.bits[slot].iter_mut().zip(&log).for_each(|(d, s)| *d |= *s),
                    Some(smp) => {
                        v.bits[slot].iter_mut().zip(&log).zip(&smp.mask[slot]).for_each(|((d, s), m)| *d |= *s & *m)
                    }
                }
            }
        }
        Ok(())
    }

    /// Adds a view that starts empty: it sees the pages written from now on.
    pub(crate) fn view(self: &Arc<Self>, consumer: DirtyConsumer) -> Result<DirtyView, Error> {
        self.add_view(consumer, 1)
    }

    /// Adds a view that sees only a fixed sample of one page in `one_in`
    /// (a power of two up to [`MAX_SAMPLE_ONE_IN`]; 1 is exact). Without
    /// manual protection on the host the view is exact ([`DirtyView::sample_one_in`] says so).
    pub(crate) fn sampled_view(self: &Arc<Self>, consumer: DirtyConsumer, one_in: u64) -> Result<DirtyView, Error> {
        if !one_in.is_power_of_two() || one_in > MAX_SAMPLE_ONE_IN {
            return Err(Error::InvalidSample { one_in, max: MAX_SAMPLE_ONE_IN });
        }
        self.add_view(consumer, if self.manual { one_in } else { 1 })
    }

    fn add_view(self: &Arc<Self>, consumer: DirtyConsumer, one_in: u64) -> Result<DirtyView, Error> {
        let mut inner = self.inner.lock().unwrap();
        if !inner.logging {
            self.set_logging(true)?;
            inner.logging = true;
        }
        // What KVM logged so far belongs to the views that already exist.
        self.harvest(&mut inner)?;
        let id = inner.next_id;
        inner.next_id += 1;
        let sample = (one_in > 1).then(|| Sample { one_in, mask: sample_mask(&self.regions, one_in) });
        inner.views.push(ViewBits { id, consumer, bits: empty(&self.regions), sample });
        Ok(DirtyView { log: self.clone(), id, consumer, one_in })
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
    one_in: u64,
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

    /// The view sees one page in this many (1: every page); counts scale by it.
    pub fn sample_one_in(&self) -> u64 {
        self.one_in
    }

    /// Thins a sampling view to one page in `one_in` (a power of two, at
    /// least the current density, at most [`MAX_SAMPLE_ONE_IN`]), keeping
    /// only the pages of the sparser sample from now on, including those it
    /// holds. Why: each sampled page the guest writes costs it a write fault
    /// per interval, so a sampler whose sample faults too often thins it to
    /// stay within its budget. Samples nest, so the thinner one is a subset.
    /// An exact view (or a host without manual protection) stays exact;
    /// the density in effect is returned.
    pub fn thin_sample(&mut self, one_in: u64) -> Result<u64, Error> {
        if !one_in.is_power_of_two() || one_in > MAX_SAMPLE_ONE_IN {
            return Err(Error::InvalidSample { one_in, max: MAX_SAMPLE_ONE_IN });
        }
        if self.one_in == 1 || one_in <= self.one_in {
            return Ok(self.one_in);
        }
        let mut inner = self.log.inner.lock().unwrap();
        let mask = sample_mask(&self.log.regions, one_in);
        let v = inner.views.iter_mut().find(|v| v.id == self.id).expect("a live view is registered");
        for (bits, m) in v.bits.iter_mut().zip(&mask) {
            bits.iter_mut().zip(m).for_each(|(b, m)| *b &= *m);
        }
        v.sample = Some(Sample { one_in, mask });
        self.one_in = one_in;
        Ok(one_in)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn region(gpa: u64, len: u64) -> RamRegion {
        RamRegion { gpa, len, host: std::ptr::null_mut() }
    }

    fn ones(m: &[Bitmap]) -> u64 {
        m.iter().flatten().map(|w| w.count_ones() as u64).sum()
    }

    #[test]
    fn samples_are_near_their_ratio_nested_and_not_strided() {
        let regions = [region(0, 1 << 30), region(1 << 32, 1 << 28)];
        let pages = (1u64 << 30) / 4096 + (1 << 28) / 4096;
        let m64 = sample_mask(&regions, 64);
        let m256 = sample_mask(&regions, 256);
        for (m, n) in [(&m64, 64), (&m256, 256)] {
            let got = ones(m) as f64;
            let want = pages as f64 / n as f64;
            assert!((got - want).abs() < want * 0.1, "1 in {n}: {got} of {pages} pages");
        }
        // A sparser sample is a subset of a denser one.
        for (a, b) in m256.iter().flatten().zip(m64.iter().flatten()) {
            assert_eq!(a & !b, 0);
        }
        // A guest writing every 64th page still hits about 1 in 64 of them.
        let strided = (0..(1u64 << 30) / 4096).step_by(64).filter(|p| m64[0][(p / 64) as usize] >> (p % 64) & 1 == 1);
        let n = strided.count() as f64;
        let want = (1u64 << 30) as f64 / 4096.0 / 64.0 / 64.0;
        assert!((n - want).abs() < want * 0.3, "{n} of a stride-64 pattern sampled, {want} expected");
    }
}
