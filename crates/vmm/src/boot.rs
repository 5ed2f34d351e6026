//! Loading a kernel (PVH ELF or Linux bzImage) and writing the boot data the
//! entry protocol expects: start info or zero page, e820 map, command line,
//! initrd, GDT, MP table.

use std::fs::File;
use std::io::Read;
use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::bzimage::BzImage;
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::KernelLoader;
use linux_loader::start_info::{hvm_memmap_table_entry, hvm_start_info};
use vm_memory::{ByteValued, GuestAddress};

use crate::cpu::{self, EntryMode};
use crate::layout;
use crate::memory::GuestRam;
use crate::Error;
use crate::{acpi, mptable};

/// Where the kernel comes from.
#[derive(Clone, Debug)]
pub enum KernelSource {
    /// A file on the host.
    Path(PathBuf),
    /// An in-memory image (the embedded test guest), with a name for messages.
    Bytes(&'static str, &'static [u8]),
}

impl KernelSource {
    fn describe(&self) -> String {
        match self {
            KernelSource::Path(p) => p.display().to_string(),
            KernelSource::Bytes(name, _) => name.to_string(),
        }
    }
}

/// What the boot vCPU needs to start.
#[derive(Clone, Copy, Debug)]
pub struct BootEntry {
    /// First instruction.
    pub rip: u64,
    /// Processor mode at entry.
    pub mode: EntryMode,
    /// `rbx` (PVH start info) or `rsi` (Linux zero page).
    pub boot_info: u64,
    /// Format detected, for status and messages.
    pub format: KernelFormat,
}

/// Kernel image formats ferry boots.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KernelFormat {
    /// ELF with a Xen PVH entry note.
    Pvh,
    /// Linux bzImage (64-bit boot protocol).
    Bzimage,
}

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
const CAN_USE_HEAP: u8 = 0x80;

// Local newtypes so vm-memory can treat linux-loader's structs as plain bytes.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: plain-old-data C struct with no padding-dependent invariants.
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: as above.
unsafe impl ByteValued for MemmapEntry {}

/// Reads the whole kernel, checking it against guest memory size first.
fn open_kernel(src: &KernelSource, ram: &GuestRam) -> Result<std::io::Cursor<Vec<u8>>, Error> {
    let bytes = match src {
        KernelSource::Bytes(_, b) => b.to_vec(),
        KernelSource::Path(p) => {
            let io = |e| Error::KernelFile { path: p.clone(), source: e };
            let too_big = |size| Error::KernelTooBig { kernel: src.describe(), size, mem: ram.size() };
            let (f, len) = open_regular(p, "kernel", io)?;
            if len > ram.size() {
                return Err(too_big(len));
            }
            let v = read_at_most(&f, len, ram.size(), io)?;
            if v.len() as u64 > ram.size() {
                return Err(too_big(v.len() as u64));
            }
            v
        }
    };
    Ok(std::io::Cursor::new(bytes))
}

/// Opens a kernel or initrd named by the user and returns it with its size,
/// refusing anything but a regular file (symlinks are followed).
///
/// `/dev/zero` as a kernel would otherwise be read until the OOM killer ends
/// ferry, and a FIFO would block the open. The path is checked with stat
/// before opening; the open uses `O_NONBLOCK` (no effect on regular files) and
/// the open file is checked again, so a path swapped in between cannot block
/// or slip through either.
fn open_regular(path: &Path, what: &'static str, io: impl Fn(std::io::Error) -> Error) -> Result<(File, u64), Error> {
    let not_regular = |m: &std::fs::Metadata| Error::NotARegularFile {
        what,
        path: path.to_path_buf(),
        kind: file_kind(&m.file_type()),
    };
    let meta = std::fs::metadata(path).map_err(&io)?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    let f = std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NONBLOCK).open(path).map_err(&io)?;
    let meta = f.metadata().map_err(&io)?;
    if !meta.is_file() {
        return Err(not_regular(&meta));
    }
    Ok((f, meta.len()))
}

/// Reads `f` to its end but never more than `limit` + 1 bytes, so a file
/// that grows after its size was checked is still bounded (the caller refuses
/// more than `limit`). `size` is the expected length, for the allocation.
fn read_at_most(f: &File, size: u64, limit: u64, io: impl Fn(std::io::Error) -> Error) -> Result<Vec<u8>, Error> {
    let mut v = Vec::with_capacity(size.min(limit) as usize);
    f.take(limit.saturating_add(1)).read_to_end(&mut v).map_err(io)?;
    Ok(v)
}

/// What kind of file this is, for "X is a character device, not a regular file".
fn file_kind(t: &std::fs::FileType) -> &'static str {
    if t.is_dir() {
        "a directory"
    } else if t.is_char_device() {
        "a character device"
    } else if t.is_block_device() {
        "a block device"
    } else if t.is_fifo() {
        "a FIFO (named pipe)"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_symlink() {
        "a symbolic link"
    } else if t.is_file() {
        "a regular file"
    } else {
        "a file of unknown type"
    }
}

fn detect(bytes: &[u8]) -> Option<KernelFormat> {
    if bytes.len() >= 4 && &bytes[..4] == b"\x7fELF" {
        Some(KernelFormat::Pvh)
    } else if bytes.len() >= 0x206 && u32::from_le_bytes(bytes[0x202..0x206].try_into().ok()?) == KERNEL_HDR_MAGIC {
        Some(KernelFormat::Bzimage)
    } else {
        None
    }
}

/// Everything `load` needs besides memory.
pub struct BootConfig<'a> {
    /// The kernel.
    pub kernel: &'a KernelSource,
    /// Optional initrd (bzImage only, or a PVH module).
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// vCPU count, for the MP table.
    pub vcpus: u32,
}

/// Loads the kernel and writes all boot data into guest memory.
pub fn load(ram: &GuestRam, cfg: &BootConfig) -> Result<BootEntry, Error> {
    let what = cfg.kernel.describe();
    if cfg.cmdline.len() + 1 > layout::CMDLINE_MAX {
        return Err(Error::CmdlineTooLong { len: cfg.cmdline.len(), max: layout::CMDLINE_MAX - 1 });
    }
    let mut image = open_kernel(cfg.kernel, ram)?;
    if image.get_ref().len() as u64 > ram.size() {
        return Err(Error::KernelTooBig { kernel: what, size: image.get_ref().len() as u64, mem: ram.size() });
    }
    let format = detect(image.get_ref()).ok_or_else(|| Error::NotAKernel { kernel: what.clone() })?;
    let mem = ram.memory();
    let loader_err = |e: linux_loader::loader::Error| Error::KernelLoad { kernel: what.clone(), why: e.to_string() };

    // Common boot data.
    let gdt: Vec<u8> = cpu::BOOT_GDT.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(layout::GDT_ADDR, &gdt)?;
    ram.write(layout::IDT_ADDR, &[0u8; 8])?;
    ram.write(layout::EBDA_ADDR, &mptable::build(cfg.vcpus))?;
    ram.write(layout::ACPI_ADDR, &acpi::build(cfg.vcpus, layout::ACPI_ADDR))?;
    let mut cmdline = cfg.cmdline.as_bytes().to_vec();
    cmdline.push(0);
    ram.write(layout::CMDLINE_ADDR, &cmdline)?;

    let e820 = layout::e820_map(ram.size());
    match format {
        KernelFormat::Pvh => {
            let res =
                Elf::load(mem, None, &mut image, Some(GuestAddress(layout::HIGH_MEMORY_START))).map_err(loader_err)?;
            let entry = match res.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(a) => a.0,
                _ => {
                    return Err(Error::KernelLoad {
                        kernel: what,
                        why: "ELF has no Xen PVH entry note (XEN_ELFNOTE_PHYS32_ENTRY)".into(),
                    })
                }
            };
            let mut info = hvm_start_info {
                magic: XEN_HVM_START_MAGIC,
                version: 1,
                cmdline_paddr: layout::CMDLINE_ADDR,
                memmap_paddr: layout::PVH_MEMMAP_ADDR,
                memmap_entries: e820.len() as u32,
                rsdp_paddr: layout::ACPI_ADDR,
                ..Default::default()
            };
            if let Some(initrd) = cfg.initrd {
                let (addr, size) = load_initrd(ram, initrd, u32::MAX as u64, res.kernel_end)?;
                let module = [addr.to_le_bytes(), size.to_le_bytes(), 0u64.to_le_bytes(), 0u64.to_le_bytes()].concat();
                let modlist = layout::PVH_MEMMAP_ADDR + 0x800;
                ram.write(modlist, &module)?;
                info.nr_modules = 1;
                info.modlist_paddr = modlist;
            }
            ram.write(layout::PVH_INFO_ADDR, StartInfo(info).as_slice())?;
            for (i, (addr, size, ty)) in e820.iter().enumerate() {
                let e = MemmapEntry(hvm_memmap_table_entry { addr: *addr, size: *size, type_: *ty, reserved: 0 });
                ram.write(layout::PVH_MEMMAP_ADDR + (i * 24) as u64, e.as_slice())?;
            }
            Ok(BootEntry { rip: entry, mode: EntryMode::Protected32, boot_info: layout::PVH_INFO_ADDR, format })
        }
        KernelFormat::Bzimage => {
            let res = BzImage::load(mem, None, &mut image, Some(GuestAddress(layout::HIGH_MEMORY_START)))
                .map_err(loader_err)?;
            let hdr = res.setup_header.ok_or_else(|| Error::KernelLoad {
                kernel: what.clone(),
                why: "bzImage without a setup header".into(),
            })?;
            if hdr.boot_flag != KERNEL_BOOT_FLAG_MAGIC {
                return Err(Error::KernelLoad {
                    kernel: what,
                    why: format!("bad boot flag {:#x} in setup header", { hdr.boot_flag }),
                });
            }
            if hdr.version < 0x020c {
                return Err(Error::KernelLoad {
                    kernel: what,
                    why: format!("boot protocol {:#x} too old; 2.12+ (64-bit entry) needed", { hdr.version }),
                });
            }
            let mut params = boot_params { hdr, ..Default::default() };
            params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.cmd_line_ptr = layout::CMDLINE_ADDR as u32;
            params.hdr.cmdline_size = cfg.cmdline.len() as u32;
            params.hdr.kernel_alignment = params.hdr.kernel_alignment.max(KERNEL_MIN_ALIGNMENT);
            params.hdr.loadflags |= CAN_USE_HEAP;
            params.hdr.heap_end_ptr = 0xfe00;
            params.acpi_rsdp_addr = layout::ACPI_ADDR;
            if let Some(initrd) = cfg.initrd {
                let max = if params.hdr.initrd_addr_max == 0 { 0x37ff_ffff } else { params.hdr.initrd_addr_max as u64 };
                let (addr, size) = load_initrd(ram, initrd, max, res.kernel_end)?;
                params.hdr.ramdisk_image = addr as u32;
                params.hdr.ramdisk_size = size as u32;
            }
            for (i, (addr, size, ty)) in e820.iter().enumerate() {
                params.e820_table[i] = boot_e820_entry { addr: *addr, size: *size, r#type: *ty };
            }
            params.e820_entries = e820.len() as u8;
            // SAFETY: boot_params is plain old data; linux-loader implements ByteValued for it.
            ram.write(layout::ZERO_PAGE_ADDR, params.as_slice())?;
            for (addr, page) in cpu::identity_page_tables() {
                ram.write(addr, &page)?;
            }
            // 64-bit entry point is 0x200 past the protected-mode kernel.
            Ok(BootEntry {
                rip: res.kernel_load.0 + 0x200,
                mode: EntryMode::Long64,
                boot_info: layout::ZERO_PAGE_ADDR,
                format,
            })
        }
    }
}

/// Places the initrd page-aligned at the top of RAM below `max_addr`, above the kernel.
///
/// The size is checked against the room there before anything is read, and
/// the read is bounded by that room, so neither a huge file nor one that grows
/// while read can make ferry allocate more than guest memory.
fn load_initrd(ram: &GuestRam, path: &Path, max_addr: u64, kernel_end: u64) -> Result<(u64, u64), Error> {
    let io = |e| Error::InitrdFile { path: path.to_path_buf(), source: e };
    let low_end = ram.regions()[0].end().min(max_addr.saturating_add(1));
    let floor = kernel_end.max(layout::HIGH_MEMORY_START);
    let too_big =
        |size| Error::InitrdTooBig { path: path.to_path_buf(), size, room: low_end.saturating_sub(kernel_end) };
    // Page-aligned load address for `size` bytes, if they fit above the kernel.
    let place = |size: u64| {
        let addr = low_end.saturating_sub(size) & !(layout::PAGE_SIZE - 1);
        (size != 0 && size <= low_end && addr > floor).then_some(addr)
    };
    let (f, len) = open_regular(path, "initrd", io)?;
    if place(len).is_none() {
        return Err(too_big(len));
    }
    let data = read_at_most(&f, len, low_end.saturating_sub(floor), io)?;
    let size = data.len() as u64;
    let addr = place(size).ok_or_else(|| too_big(size))?;
    ram.write(addr, &data)?;
    Ok((addr, size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_formats() {
        assert_eq!(detect(b"\x7fELF...."), Some(KernelFormat::Pvh));
        let mut bz = vec![0u8; 0x300];
        bz[0x202..0x206].copy_from_slice(b"HdrS");
        assert_eq!(detect(&bz), Some(KernelFormat::Bzimage));
        assert_eq!(detect(b"#!/bin/sh\n"), None);
    }

    #[test]
    fn rejects_non_kernel_and_oversized_cmdline() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let src = KernelSource::Bytes("junk", b"this is not a kernel at all");
        let cfg = BootConfig { kernel: &src, initrd: None, cmdline: "", vcpus: 1 };
        assert!(matches!(load(&ram, &cfg), Err(Error::NotAKernel { .. })));
        let long = "x".repeat(layout::CMDLINE_MAX);
        let cfg = BootConfig { kernel: &src, initrd: None, cmdline: &long, vcpus: 1 };
        assert!(matches!(load(&ram, &cfg), Err(Error::CmdlineTooLong { .. })));
    }

    /// Runs `f` on a thread and fails the test if it has not returned within 10 s.
    fn within_10s<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(f());
        });
        rx.recv_timeout(std::time::Duration::from_secs(10)).unwrap_or_else(|_| panic!("{what} blocked"))
    }

    fn mkfifo(path: &Path) {
        use std::os::unix::ffi::OsStrExt;
        let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
        // SAFETY: c is a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo {}", path.display());
    }

    fn kernel_err(path: &Path, ram: &GuestRam) -> Error {
        match open_kernel(&KernelSource::Path(path.to_path_buf()), ram) {
            Ok(_) => panic!("kernel {} accepted", path.display()),
            Err(e) => e,
        }
    }

    #[test]
    fn kernel_must_be_a_regular_file_no_larger_than_memory() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let e = kernel_err(Path::new("/dev/zero"), &ram);
        assert!(matches!(e, Error::NotARegularFile { what: "kernel", kind: "a character device", .. }), "{e:?}");
        assert_eq!(e.to_string(), "kernel /dev/zero is a character device, not a regular file");

        let dir = tempfile::tempdir().unwrap();
        let e = kernel_err(dir.path(), &ram);
        assert_eq!(e.to_string(), format!("kernel {} is a directory, not a regular file", dir.path().display()));

        let link = dir.path().join("link");
        std::os::unix::fs::symlink("/dev/zero", &link).unwrap();
        assert!(matches!(kernel_err(&link, &ram), Error::NotARegularFile { kind: "a character device", .. }));

        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let (f, r) = (fifo.clone(), GuestRam::new(32 << 20).unwrap());
        let e = within_10s("opening a FIFO kernel", move || kernel_err(&f, &r));
        assert_eq!(e.to_string(), format!("kernel {} is a FIFO (named pipe), not a regular file", fifo.display()));

        // A sparse file larger than memory is refused from its size, without reading it.
        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(64 << 30).unwrap();
        let e = kernel_err(&big, &ram);
        assert!(matches!(e, Error::KernelTooBig { size, mem, .. } if size == 64 << 30 && mem == 32 << 20), "{e:?}");

        let e = kernel_err(&dir.path().join("missing"), &ram);
        assert!(matches!(e, Error::KernelFile { .. }), "{e:?}");
    }

    #[test]
    fn initrd_must_be_a_regular_file_that_fits() {
        let ram = GuestRam::new(32 << 20).unwrap();
        let top = u32::MAX as u64;
        let kend = layout::HIGH_MEMORY_START + (1 << 20);
        let e = load_initrd(&ram, Path::new("/dev/zero"), top, kend).unwrap_err();
        assert_eq!(e.to_string(), "initrd /dev/zero is a character device, not a regular file");

        let dir = tempfile::tempdir().unwrap();
        let e = load_initrd(&ram, dir.path(), top, kend).unwrap_err();
        assert!(matches!(e, Error::NotARegularFile { what: "initrd", kind: "a directory", .. }), "{e:?}");

        let fifo = dir.path().join("fifo");
        mkfifo(&fifo);
        let (f, r) = (fifo.clone(), GuestRam::new(32 << 20).unwrap());
        let e = within_10s("opening a FIFO initrd", move || load_initrd(&r, &f, top, kend).unwrap_err());
        assert!(matches!(e, Error::NotARegularFile { kind: "a FIFO (named pipe)", .. }), "{e:?}");

        let big = dir.path().join("big");
        std::fs::File::create(&big).unwrap().set_len(64 << 30).unwrap();
        let e = load_initrd(&ram, &big, top, kend).unwrap_err();
        assert!(matches!(e, Error::InitrdTooBig { size, .. } if size == 64 << 30), "{e:?}");
        assert!(e.to_string().contains(&big.display().to_string()), "{e}");

        // One that fits lands page-aligned below the end of RAM, above the kernel.
        let ok = dir.path().join("initrd");
        std::fs::write(&ok, vec![0x5a; 12345]).unwrap();
        let (addr, size) = load_initrd(&ram, &ok, top, kend).unwrap();
        assert_eq!(size, 12345);
        assert_eq!(addr % layout::PAGE_SIZE, 0);
        assert!(addr > kend && addr + size <= 32 << 20, "{addr:#x}");
        assert!(ram.slice(addr, size).unwrap().iter().all(|&b| b == 0x5a));
    }

    #[test]
    fn bounded_read_stops_after_the_limit() {
        // /dev/zero never ends: the read stops one byte past the limit.
        let f = File::open("/dev/zero").unwrap();
        let v = read_at_most(&f, 0, 4096, |e| Error::InitrdFile { path: "/dev/zero".into(), source: e }).unwrap();
        assert_eq!(v.len(), 4097);
    }

    #[test]
    fn zero_page_layout_matches_boot_protocol() {
        // boot_params must be exactly one page with hdr at 0x1f1 and e820 at 0x2d0.
        assert_eq!(std::mem::size_of::<boot_params>(), 4096);
        let p = boot_params::default();
        let base = &p as *const _ as usize;
        assert_eq!(&p.hdr as *const _ as usize - base, 0x1f1);
        assert_eq!(&p.e820_table as *const _ as usize - base, 0x2d0);
        assert_eq!(&p.e820_entries as *const _ as usize - base, 0x1e8);
    }
}
