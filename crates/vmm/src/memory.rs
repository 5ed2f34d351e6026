//! Guest RAM: host mappings registered with KVM (anonymous, or memfd-backed
//! so that a local migration can hand the memory itself to a new ferry
//! process), and the BLAKE3 digest that proves a snapshot or migration
//! carried memory over intact.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout;
use crate::Error;

/// Guest memory plus a flat list of its RAM ranges, which the dirty tracker
/// and the digest walk without going through `vm-memory`'s traits.
pub struct GuestRam {
    mem: GuestMemoryMmap,
    regions: Vec<RamRegion>,
    /// One memfd per region when the memory is shared (empty: anonymous).
    memfds: Vec<File>,
}

/// One contiguous RAM range: guest-physical start, length, host address.
#[derive(Clone, Copy, Debug)]
pub struct RamRegion {
    /// Guest-physical start address.
    pub gpa: u64,
    /// Length in bytes (a multiple of the page size).
    pub len: u64,
    /// Host virtual address of the first byte.
    pub host: *mut u8,
}

// SAFETY: the host pointers stay valid for the life of `GuestRam` (owned by
// `mem`), and guest memory is by nature shared with vCPU threads.
unsafe impl Send for RamRegion {}
// SAFETY: see above.
unsafe impl Sync for RamRegion {}

impl RamRegion {
    /// The region as a byte slice. Guest vCPUs may write concurrently unless paused.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: host..host+len is mapped for the life of GuestRam.
        unsafe { std::slice::from_raw_parts(self.host, self.len as usize) }
    }

    /// One past the last guest-physical address.
    pub fn end(&self) -> u64 {
        self.gpa + self.len
    }
}

impl GuestRam {
    /// Maps `mem_bytes` of guest RAM laid out around the MMIO gap.
    pub fn new(mem_bytes: u64) -> Result<Self, Error> {
        Self::map(mem_bytes, Vec::new())
    }

    /// Maps `mem_bytes` of guest RAM backed by one memfd per region
    /// (`MAP_SHARED`): another process given the memfds sees the same
    /// memory, which is what a local migration passes instead of copying it.
    pub fn new_memfd(mem_bytes: u64) -> Result<Self, Error> {
        let mut files = Vec::new();
        for (_, len) in layout::ram_ranges(mem_bytes) {
            // SAFETY: a NUL-terminated name; the result is checked.
            let fd = unsafe { libc::memfd_create(c"ferry-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
            if fd < 0 {
                return Err(Error::InvalidMemorySize {
                    bytes: mem_bytes,
                    why: format!("memfd_create failed: {}", std::io::Error::last_os_error()),
                });
            }
            // SAFETY: a fresh descriptor we own.
            let f = unsafe { File::from_raw_fd(fd) };
            f.set_len(len).map_err(|e| Error::InvalidMemorySize {
                bytes: mem_bytes,
                why: format!("sizing the guest memory memfd to {len} bytes: {e}"),
            })?;
            files.push(f);
        }
        Self::map(mem_bytes, files)
    }

    /// Maps guest RAM from memfds another ferry process created (a local
    /// migration). Each must be a memfd of exactly its region's length.
    pub fn from_memfds(mem_bytes: u64, files: Vec<File>) -> Result<Self, Error> {
        let ranges = layout::ram_ranges(mem_bytes);
        let bad = |why: String| Error::InvalidMemorySize { bytes: mem_bytes, why };
        if files.len() != ranges.len() {
            return Err(bad(format!("{} memory descriptors for {} RAM ranges", files.len(), ranges.len())));
        }
        for (i, (f, (_, len))) in files.iter().zip(&ranges).enumerate() {
            // SAFETY: F_GET_SEALS only reads; it fails with EINVAL on anything but a memfd.
            if unsafe { libc::fcntl(f.as_raw_fd(), libc::F_GET_SEALS) } < 0 {
                return Err(bad(format!("memory descriptor {i} is not a memfd")));
            }
            let size = f.metadata().map_err(|e| bad(format!("memory descriptor {i}: {e}")))?.len();
            if size != *len {
                return Err(bad(format!("memory descriptor {i} holds {size} bytes; its RAM range has {len}")));
            }
        }
        Self::map(mem_bytes, files)
    }

    /// The memfds backing guest RAM, one per region; empty for anonymous memory.
    pub fn memfds(&self) -> &[File] {
        &self.memfds
    }

    fn map(mem_bytes: u64, memfds: Vec<File>) -> Result<Self, Error> {
        if mem_bytes == 0 {
            return Err(Error::InvalidMemorySize { bytes: 0, why: "memory size must be greater than zero".into() });
        }
        if !mem_bytes.is_multiple_of(2 << 20) {
            return Err(Error::InvalidMemorySize {
                bytes: mem_bytes,
                why: "memory size must be a multiple of 2 MiB".into(),
            });
        }
        if mem_bytes < 16 << 20 {
            return Err(Error::InvalidMemorySize { bytes: mem_bytes, why: "at least 16 MiB is needed to boot".into() });
        }
        let phys_bits = host_phys_bits();
        let top = layout::ram_ranges(mem_bytes).last().map(|r| r.0 + r.1).unwrap_or(0);
        if phys_bits < 64 && top > 1u64 << phys_bits {
            return Err(Error::InvalidMemorySize {
                bytes: mem_bytes,
                why: format!(
                    "guest RAM would end at {top:#x}, beyond the CPU's {phys_bits}-bit physical address space"
                ),
            });
        }
        let mut ranges: Vec<(GuestAddress, usize, Option<FileOffset>)> = Vec::new();
        for (i, (s, l)) in layout::ram_ranges(mem_bytes).into_iter().enumerate() {
            let fo = match memfds.get(i) {
                Some(f) => Some(FileOffset::new(
                    f.try_clone().map_err(|e| Error::InvalidMemorySize { bytes: mem_bytes, why: e.to_string() })?,
                    0,
                )),
                None => None,
            };
            ranges.push((GuestAddress(s), l as usize, fo));
        }
        let mem = GuestMemoryMmap::from_ranges_with_files(ranges).map_err(|e| Error::InvalidMemorySize {
            bytes: mem_bytes,
            why: format!("the host cannot map that much memory: {e}"),
        })?;
        let regions = mem.iter().map(|r| RamRegion { gpa: r.start_addr().0, len: r.len(), host: r.as_ptr() }).collect();
        Ok(GuestRam { mem, regions, memfds })
    }

    /// The `vm-memory` view, for loaders.
    pub fn memory(&self) -> &GuestMemoryMmap {
        &self.mem
    }

    /// RAM ranges in guest-physical order.
    pub fn regions(&self) -> &[RamRegion] {
        &self.regions
    }

    /// Total RAM in bytes.
    pub fn size(&self) -> u64 {
        self.regions.iter().map(|r| r.len).sum()
    }

    /// Host pointer for a guest-physical range, if it lies inside one region.
    pub fn host_range(&self, gpa: u64, len: u64) -> Option<*mut u8> {
        self.regions
            .iter()
            .find(|r| gpa >= r.gpa && gpa + len <= r.end())
            .map(|r| r.host.wrapping_add((gpa - r.gpa) as usize))
    }

    /// Bytes at a guest-physical range, if RAM backs all of it.
    pub fn slice(&self, gpa: u64, len: u64) -> Option<&[u8]> {
        // SAFETY: host_range checked bounds within a live mapping.
        self.host_range(gpa, len).map(|p| unsafe { std::slice::from_raw_parts(p, len as usize) })
    }

    /// Writes bytes at a guest-physical address.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), Error> {
        let p = self.host_range(gpa, data.len() as u64).ok_or(Error::GuestAddress { gpa, len: data.len() as u64 })?;
        // SAFETY: bounds checked above.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
        Ok(())
    }

    /// Drops the pages of a guest-physical range (`MADV_DONTNEED`): the next
    /// access finds them missing, which is how a post-copy destination makes
    /// stale pages fault so that their current contents are fetched.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), Error> {
        let p = self.host_range(gpa, len).ok_or(Error::GuestAddress { gpa, len })?;
        if let Some((f, off)) = self
            .regions
            .iter()
            .zip(&self.memfds)
            .find(|(r, _)| gpa >= r.gpa && gpa + len <= r.end())
            .map(|(r, f)| (f, gpa - r.gpa))
        {
            // Shared memory keeps its pages in the memfd: punch them out there.
            // SAFETY: a checked range of our own memfd.
            let rc = unsafe {
                libc::fallocate(
                    f.as_raw_fd(),
                    libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                    off as libc::off_t,
                    len as libc::off_t,
                )
            };
            if rc != 0 {
                return Err(Error::GuestAddress { gpa, len });
            }
        }
        // SAFETY: a checked, page-aligned range of our own mapping.
        let rc = unsafe { libc::madvise(p as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
        if rc != 0 {
            return Err(Error::GuestAddress { gpa, len });
        }
        Ok(())
    }

    /// BLAKE3 digest of all guest RAM, region by region (start and length
    /// included), so two VMs with the same layout and contents agree.
    /// Call it with the guest paused; it uses all host cores.
    pub fn digest(&self) -> blake3::Hash {
        digest_regions(&self.regions)
    }
}

/// Digest of a list of RAM regions (see [`GuestRam::digest`]).
pub fn digest_regions(regions: &[RamRegion]) -> blake3::Hash {
    let mut h = blake3::Hasher::new();
    h.update(b"ferry memory digest v1");
    for r in regions {
        h.update(&r.gpa.to_le_bytes());
        h.update(&r.len.to_le_bytes());
        h.update_rayon(r.as_slice());
    }
    h.finalize()
}

/// The host CPU's physical address width (CPUID 0x80000008), 36 if unknown.
pub fn host_phys_bits() -> u32 {
    let max = std::arch::x86_64::__cpuid(0x8000_0000).eax;
    if max >= 0x8000_0008 {
        (std::arch::x86_64::__cpuid(0x8000_0008).eax & 0xff).max(32)
    } else {
        36
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_zero_and_odd_sizes() {
        assert!(matches!(GuestRam::new(0), Err(Error::InvalidMemorySize { .. })));
        assert!(matches!(GuestRam::new((64 << 20) + 4096), Err(Error::InvalidMemorySize { .. })));
    }

    #[test]
    fn rejects_memory_beyond_physical_address_space() {
        let err = GuestRam::new(1 << 60).err().expect("must fail");
        assert!(err.to_string().contains("physical address"), "{err}");
    }

    #[test]
    fn digest_changes_with_contents() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let d0 = ram.digest();
        ram.write(0x12_3000, &[1]).unwrap();
        let d1 = ram.digest();
        assert_ne!(d0, d1);
        ram.write(0x12_3000, &[0]).unwrap();
        assert_eq!(ram.digest(), d0);
    }

    #[test]
    fn writes_outside_ram_fail() {
        let ram = GuestRam::new(32 << 20).unwrap();
        assert!(ram.write(32 << 20, &[1]).is_err());
        assert!(ram.slice((32 << 20) - 1, 2).is_none());
    }
}
