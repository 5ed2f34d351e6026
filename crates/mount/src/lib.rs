//! ferry-mount: `ferry image mount IMG DIR`, an image (or an incremental
//! chain) shown as read-only files for forensic tools, read on demand from
//! the compressed, verified chunks.
//!
//! - [`view`]: the file tree (`pmem`, `core.elf`, `mem.lime`, `info.json`,
//!   `vcpu/N/regs.json`) and its reads. The export files use
//!   [`ferry_image::FileLayout`], the same description of the formats that
//!   `ferry image export` writes with, so the bytes are identical.
//! - [`cache`]: decoded memory in fixed windows with a small LRU cache, so a
//!   4 GiB image needs neither a 4 GiB export nor 4 GiB of memory.
//! - [`fs`]: the FUSE requests (fuser, no libfuse): reads, SEEK_DATA/SEEK_HOLE,
//!   EIO for a corrupt chunk, EROFS for every change.
//! - [`serve`]: mounting, and unmounting on a signal or from outside.
#![deny(missing_docs)]

pub mod cache;
mod error;
pub mod fs;
pub mod serve;
pub mod view;

pub use error::{Error, Result};
pub use serve::{serve, Ended, MountReport, ServeOptions};
pub use view::{MountView, ReadFailure, ReadStats, ViewOptions};
