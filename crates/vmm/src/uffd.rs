//! A small userfaultfd wrapper over raw ioctls (no bindgen, so no libclang at
//! build time): register guest RAM for missing-page faults (lazy restore)
//! or write-protect faults (copy-on-write snapshots), read fault events,
//! and resolve them.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

/// Register mode: faults on pages that are not populated.
pub const MODE_MISSING: u64 = 1;
/// Register mode: faults on writes to write-protected pages.
pub const MODE_WP: u64 = 2;
/// Fault flag: the access was a write.
pub const FLAG_WRITE: u64 = 1;
/// Fault flag: the fault is a write-protect fault.
pub const FLAG_WP: u64 = 2;

const UFFD_API: u64 = 0xaa;
const UFFD_EVENT_PAGEFAULT: u8 = 0x12;
/// Feature bit: report write-protect faults.
pub const FEATURE_PAGEFAULT_FLAG_WP: u64 = 1 << 0;
/// Feature bit: write-protect also works on unpopulated anonymous pages.
pub const FEATURE_WP_UNPOPULATED: u64 = 1 << 13;

const fn iowr(nr: u64, size: u64) -> u64 {
    (3 << 30) | (size << 16) | (0xaa << 8) | nr
}
const fn ior(nr: u64, size: u64) -> u64 {
    (2 << 30) | (size << 16) | (0xaa << 8) | nr
}
const UFFDIO_API: u64 = iowr(0x3f, 24);
const UFFDIO_REGISTER: u64 = iowr(0x00, 32);
const UFFDIO_UNREGISTER: u64 = ior(0x01, 16);
const UFFDIO_WAKE: u64 = ior(0x02, 16);
const UFFDIO_COPY: u64 = iowr(0x03, 40);
const UFFDIO_ZEROPAGE: u64 = iowr(0x04, 32);
const UFFDIO_WRITEPROTECT: u64 = iowr(0x06, 24);

#[repr(C)]
struct Api {
    api: u64,
    features: u64,
    ioctls: u64,
}
#[repr(C)]
#[derive(Clone, Copy)]
struct Range {
    start: u64,
    len: u64,
}
#[repr(C)]
struct Register {
    range: Range,
    mode: u64,
    ioctls: u64,
}
#[repr(C)]
struct Copy {
    dst: u64,
    src: u64,
    len: u64,
    mode: u64,
    copy: i64,
}
#[repr(C)]
struct Zeropage {
    range: Range,
    mode: u64,
    zeropage: i64,
}
#[repr(C)]
struct WriteProtect {
    range: Range,
    mode: u64,
}
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Msg {
    event: u8,
    _r1: u8,
    _r2: u16,
    _r3: u32,
    flags: u64,
    address: u64,
    _rest: u64,
}

/// A page fault reported by the kernel.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Fault {
    /// Faulting host virtual address (not page aligned).
    pub address: u64,
    /// `FLAG_WRITE`, `FLAG_WP`.
    pub flags: u64,
}

/// An open userfaultfd.
pub struct Uffd {
    fd: OwnedFd,
    features: u64,
}

fn last_err(what: &str) -> std::io::Error {
    let e = std::io::Error::last_os_error();
    std::io::Error::new(e.kind(), format!("userfaultfd {what}: {e}"))
}

/// Result of a page-filling ioctl: `EEXIST` means a racing fill already
/// populated the page, which is as good as success.
fn fill_result(rc: libc::c_int, what: impl FnOnce() -> String) -> std::io::Result<()> {
    if rc == 0 {
        return Ok(());
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(std::io::Error::new(e.kind(), format!("userfaultfd {}: {e}", what())))
}

impl Uffd {
    /// Opens a userfaultfd (non-blocking, close-on-exec) and negotiates
    /// `features` (those the kernel lacks are an error).
    pub fn new(features: u64) -> std::io::Result<Uffd> {
        // SAFETY: plain syscall; the result is checked.
        let raw = unsafe { libc::syscall(libc::SYS_userfaultfd, libc::O_CLOEXEC | libc::O_NONBLOCK) } as RawFd;
        if raw < 0 {
            return Err(last_err("open"));
        }
        // SAFETY: raw is a fresh fd we own.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let mut api = Api { api: UFFD_API, features, ioctls: 0 };
        // SAFETY: api is a valid uffdio_api.
        if unsafe { libc::ioctl(fd.as_raw_fd(), UFFDIO_API as _, &mut api) } != 0 {
            return Err(last_err("API handshake (features not supported?)"));
        }
        Ok(Uffd { fd, features: api.features })
    }

    /// Features the kernel granted.
    pub fn features(&self) -> u64 {
        self.features
    }

    /// Registers `[start, start+len)` with `mode` (`MODE_MISSING`, `MODE_WP`).
    pub fn register(&self, start: u64, len: u64, mode: u64) -> std::io::Result<()> {
        let mut r = Register { range: Range { start, len }, mode, ioctls: 0 };
        // SAFETY: r is a valid uffdio_register.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_REGISTER as _, &mut r) } != 0 {
            return Err(last_err("register"));
        }
        Ok(())
    }

    /// Unregisters a range.
    pub fn unregister(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = Range { start, len };
        // SAFETY: r is a valid uffdio_range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_UNREGISTER as _, &mut r) } != 0 {
            return Err(last_err("unregister"));
        }
        Ok(())
    }

    /// Write-protects (`protect`) or unprotects a range; unprotecting wakes
    /// the threads waiting on it.
    pub fn write_protect(&self, start: u64, len: u64, protect: bool) -> std::io::Result<()> {
        let mut w = WriteProtect { range: Range { start, len }, mode: u64::from(protect) };
        // SAFETY: w is a valid uffdio_writeprotect.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WRITEPROTECT as _, &mut w) } != 0 {
            return Err(last_err("write-protect"));
        }
        Ok(())
    }

    /// Atomically fills missing pages at `dst` with `src` and wakes waiters.
    /// `EEXIST` (already populated by a racing copy) counts as success.
    pub fn copy(&self, dst: u64, src: &[u8]) -> std::io::Result<()> {
        let mut c = Copy { dst, src: src.as_ptr() as u64, len: src.len() as u64, mode: 0, copy: 0 };
        // SAFETY: src is valid for len bytes; dst is inside a registered range.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_COPY as _, &mut c) };
        fill_result(rc, || format!("copy to {dst:#x}"))
    }

    /// Maps zero pages at a missing range and wakes waiters.
    pub fn zeropage(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut z = Zeropage { range: Range { start, len }, mode: 0, zeropage: 0 };
        // SAFETY: z is a valid uffdio_zeropage.
        let rc = unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_ZEROPAGE as _, &mut z) };
        fill_result(rc, || format!("zeropage at {start:#x}"))
    }

    /// Wakes threads waiting on a range without changing it.
    pub fn wake(&self, start: u64, len: u64) -> std::io::Result<()> {
        let mut r = Range { start, len };
        // SAFETY: r is a valid uffdio_range.
        if unsafe { libc::ioctl(self.fd.as_raw_fd(), UFFDIO_WAKE as _, &mut r) } != 0 {
            return Err(last_err("wake"));
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` for the next fault; `None` on timeout.
    pub fn next_fault(&self, timeout_ms: i32) -> std::io::Result<Option<Fault>> {
        let mut pfd = libc::pollfd { fd: self.fd.as_raw_fd(), events: libc::POLLIN, revents: 0 };
        // SAFETY: pfd is valid.
        let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(None);
            }
            return Err(e);
        }
        if n == 0 {
            return Ok(None);
        }
        let mut msg = Msg::default();
        // SAFETY: reading one uffd_msg into a buffer of its size.
        let r = unsafe {
            libc::read(self.fd.as_raw_fd(), &mut msg as *mut Msg as *mut libc::c_void, std::mem::size_of::<Msg>())
        };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                return Ok(None);
            }
            return Err(last_err("read"));
        }
        if r as usize != std::mem::size_of::<Msg>() || msg.event != UFFD_EVENT_PAGEFAULT {
            return Ok(None);
        }
        Ok(Some(Fault { address: msg.address, flags: msg.flags }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The next fault on `u`, however long the faulting thread takes to get there.
    fn wait_fault(u: &Uffd) -> Fault {
        loop {
            if let Some(f) = u.next_fault(1000).unwrap() {
                return f;
            }
        }
    }

    /// A fresh private anonymous mapping of `len` bytes.
    fn anon(len: usize) -> u64 {
        // SAFETY: a new mapping nothing else refers to; tests unmap it.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(p, libc::MAP_FAILED);
        p as u64
    }

    #[test]
    fn message_layout_matches_the_kernel() {
        assert_eq!(std::mem::size_of::<Msg>(), 32);
        assert_eq!(std::mem::size_of::<Api>(), 24);
        assert_eq!(std::mem::size_of::<Register>(), 32);
        assert_eq!(std::mem::size_of::<Copy>(), 40);
        assert_eq!(UFFDIO_API, 0xc018_aa3f);
        assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
        assert_eq!(UFFDIO_COPY, 0xc028_aa03);
        assert_eq!(UFFDIO_WRITEPROTECT, 0xc018_aa06);
    }

    /// Missing faults on anonymous memory, served by UFFDIO_COPY from a handler thread.
    #[test]
    fn missing_fault_is_served_by_copy() {
        let Ok(u) = Uffd::new(0) else {
            eprintln!("userfaultfd unavailable; skipping");
            return;
        };
        let len = 4 * 4096;
        let p = anon(len);
        u.register(p, len as u64, MODE_MISSING).unwrap();
        let u = std::sync::Arc::new(u);
        let h = {
            let u = u.clone();
            std::thread::spawn(move || {
                let f = wait_fault(&u);
                let page = vec![0x5au8; 4096];
                u.copy(f.address & !0xfff, &page).unwrap();
                f
            })
        };
        // SAFETY: p+4096 is inside the mapping; this read faults into the handler.
        let v = unsafe { std::ptr::read_volatile((p + 4096 + 7) as *const u8) };
        let f = h.join().unwrap();
        assert_eq!(v, 0x5a);
        assert_eq!(f.address & !0xfff, p + 4096);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }

    /// Write-protect faults: a write blocks until the handler unprotects.
    #[test]
    fn write_protect_fault_then_unprotect() {
        let Ok(u) = Uffd::new(FEATURE_PAGEFAULT_FLAG_WP) else {
            eprintln!("userfaultfd WP unavailable; skipping");
            return;
        };
        let len = 2 * 4096;
        let p = anon(len);
        // SAFETY: inside the mapping.
        unsafe { std::ptr::write_bytes(p as *mut u8, 1, len) };
        u.register(p, len as u64, MODE_WP).unwrap();
        u.write_protect(p, len as u64, true).unwrap();
        let u = std::sync::Arc::new(u);
        let h = {
            let u = u.clone();
            std::thread::spawn(move || {
                let f = wait_fault(&u);
                // The page still holds its protected contents here.
                // SAFETY: reading inside the mapping.
                let before = unsafe { std::ptr::read_volatile((f.address & !0xfff) as *const u8) };
                u.write_protect(f.address & !0xfff, 4096, false).unwrap();
                (f, before)
            })
        };
        // SAFETY: inside the mapping; blocks until unprotected.
        unsafe { std::ptr::write_volatile((p + 4096) as *mut u8, 9) };
        let (f, before) = h.join().unwrap();
        assert_ne!(f.flags & FLAG_WP, 0);
        assert_eq!(before, 1, "handler saw the page before the write");
        // SAFETY: inside the mapping.
        assert_eq!(unsafe { std::ptr::read_volatile((p + 4096) as *const u8) }, 9);
        // SAFETY: unmapping what we mapped.
        unsafe { libc::munmap(p as *mut libc::c_void, len) };
    }
}
