//! The FUSE side: translates kernel requests into [`MountView`] calls.
//! Everything that would change the tree or a file fails with EROFS.

use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo, KernelConfig, LockOwner,
    OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyEmpty, ReplyEntry,
    ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, Request, TimeOrNow, WriteFlags,
};

use crate::view::{MountView, NodeKind};

/// The image never changes while mounted, so the kernel may cache names and attributes long.
const TTL: Duration = Duration::from_secs(3600);
/// Largest read answered at once (the kernel asks for at most max_pages × 4 KiB anyway).
const MAX_READ: u32 = 4 << 20;
const SEEK_DATA: i32 = 3;
const SEEK_HOLE: i32 = 4;

/// A [`MountView`] as a fuser filesystem.
pub struct ImageFs {
    view: Arc<MountView>,
    /// The read buffer, reused across requests.
    scratch: Mutex<Vec<u8>>,
    mtime: SystemTime,
    uid: u32,
    gid: u32,
}

impl ImageFs {
    /// Serves `view`; files carry the image file's modification time and the caller's ids.
    pub fn new(view: Arc<MountView>) -> Self {
        let mtime = std::fs::metadata(view.image()).and_then(|m| m.modified()).unwrap_or(SystemTime::UNIX_EPOCH);
        // SAFETY: getuid/getgid have no preconditions.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        ImageFs { view, scratch: Mutex::new(Vec::new()), mtime, uid, gid }
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let n = self.view.node(ino)?;
        let (kind, perm, size, blocks, nlink) = match &n.kind {
            NodeKind::Dir(ch) => {
                let subdirs =
                    ch.iter().filter(|c| matches!(self.view.node(c.1).map(|n| &n.kind), Some(NodeKind::Dir(_))));
                (FileType::Directory, 0o555, 0, 0, 2 + subdirs.count() as u32)
            }
            NodeKind::File(c) => (FileType::RegularFile, 0o444, c.size(), c.data_bytes().div_ceil(512), 1),
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks,
            atime: self.mtime,
            mtime: self.mtime,
            ctime: self.mtime,
            crtime: self.mtime,
            kind,
            perm,
            nlink,
            uid: self.uid,
            gid: self.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }
}

impl Filesystem for ImageFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        // Larger readahead: sequential readers (export-like copies) get fewer, larger requests.
        let _ = config.set_max_readahead(1 << 20);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let found = name.to_str().and_then(|n| self.view.lookup(parent.0, n)).and_then(|n| self.attr(n.ino));
        match found {
            Some(a) => reply.entry(&TTL, &a, Generation(0)),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        _size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        reply.error(Errno::EROFS);
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        match self.view.node(ino.0).map(|n| &n.kind) {
            None => reply.error(Errno::ENOENT),
            Some(NodeKind::Dir(_)) => reply.error(Errno::EISDIR),
            Some(NodeKind::File(_)) if flags.acc_mode() != OpenAccMode::O_RDONLY => reply.error(Errno::EROFS),
            // The contents never change: let the kernel keep cached pages across opens.
            Some(NodeKind::File(_)) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let mut buf = self.scratch.lock().unwrap_or_else(|p| p.into_inner());
        match self.view.read_into(ino.0, offset, size.min(MAX_READ) as usize, &mut buf) {
            Ok(()) => reply.data(&buf),
            Err(_) => reply.error(Errno::EIO),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _offset: u64,
        _data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        reply.error(Errno::EROFS);
    }

    fn flush(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _lock_owner: LockOwner, reply: ReplyEmpty) {
        reply.ok();
    }

    fn fsync(&self, _req: &Request, _ino: INodeNo, _fh: FileHandle, _datasync: bool, reply: ReplyEmpty) {
        reply.ok();
    }

    fn readdir(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: u64, mut reply: ReplyDirectory) {
        let Some(n) = self.view.node(ino.0) else {
            return reply.error(Errno::ENOENT);
        };
        let NodeKind::Dir(children) = &n.kind else {
            return reply.error(Errno::ENOTDIR);
        };
        let mut entries = vec![(n.ino, FileType::Directory, "."), (n.parent, FileType::Directory, "..")];
        for (name, child) in children {
            let kind = match self.view.node(*child).map(|c| &c.kind) {
                Some(NodeKind::Dir(_)) => FileType::Directory,
                _ => FileType::RegularFile,
            };
            entries.push((*child, kind, name.as_str()));
        }
        for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
            if reply.add(INodeNo(ino), i as u64 + 1, kind, name) {
                break;
            }
        }
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let bytes: u64 = (1..=self.view.node_count() as u64)
            .filter_map(|i| match self.view.node(i).map(|n| &n.kind) {
                Some(NodeKind::File(c)) => Some(c.size()),
                _ => None,
            })
            .sum();
        reply.statfs(bytes.div_ceil(4096), 0, 0, self.view.node_count() as u64, 0, 4096, 255, 4096);
    }

    fn lseek(&self, _req: &Request, ino: INodeNo, _fh: FileHandle, offset: i64, whence: i32, reply: ReplyLseek) {
        let Ok(off) = u64::try_from(offset) else {
            return reply.error(Errno::EINVAL);
        };
        let found = match whence {
            SEEK_DATA => self.view.seek(ino.0, off, true),
            SEEK_HOLE => self.view.seek(ino.0, off, false),
            // SEEK_SET/CUR/END are handled by the kernel and never reach us.
            _ => return reply.error(Errno::EINVAL),
        };
        match found.and_then(|o| i64::try_from(o).ok()) {
            Some(o) => reply.offset(o),
            None => reply.error(Errno::ENXIO),
        }
    }

    // Everything that would modify the image: read-only file system.

    fn mknod(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn mkdir(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn unlink(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn rmdir(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn symlink(&self, _: &Request, _: INodeNo, _: &OsStr, _: &Path, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn rename(&self, _: &Request, _: INodeNo, _: &OsStr, _: INodeNo, _: &OsStr, _: RenameFlags, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn link(&self, _: &Request, _: INodeNo, _: INodeNo, _: &OsStr, reply: ReplyEntry) {
        reply.error(Errno::EROFS);
    }

    fn create(&self, _: &Request, _: INodeNo, _: &OsStr, _: u32, _: u32, _: i32, reply: ReplyCreate) {
        reply.error(Errno::EROFS);
    }

    fn setxattr(&self, _: &Request, _: INodeNo, _: &OsStr, _: &[u8], _: i32, _: u32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn removexattr(&self, _: &Request, _: INodeNo, _: &OsStr, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }

    fn fallocate(&self, _: &Request, _: INodeNo, _: FileHandle, _: u64, _: u64, _: i32, reply: ReplyEmpty) {
        reply.error(Errno::EROFS);
    }
}
