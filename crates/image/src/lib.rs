//! ferry-image: the on-disk format of ferry VM memory images (snapshots),
//! incremental chains of them, and exports for forensic tools.
//!
//! This crate knows nothing about KVM. A pre-copy engine feeds an
//! [`ImageWriter`] page runs round after round (the last write of a page
//! wins), then the serialised VM state and the vCPU registers. An
//! [`ImageReader`] checks and reads one file; an [`ImageChain`] reads an
//! incremental image together with its parents. The byte layout is specified
//! in `docs/image-format.md`.
//!
//! ```no_run
//! use ferry_image::*;
//! # fn main() -> ferry_image::Result<()> {
//! let input = ImageHeaderInput {
//!     vm_config: serde_json::json!({"vcpus": 1}),
//!     ranges: vec![RamRange::new(0, 64 << 20)],
//!     parent: None,
//! };
//! let mut w = ImageWriter::create("vm.img".as_ref(), input, WriteOptions::default())?;
//! let guest_ram = vec![0u8; 64 << 20];
//! w.write_pages(0, &guest_ram)?; // round 1: everything
//! w.write_pages(0x5000, &[7u8; 4096])?; // round 2: a dirtied page, overrides round 1
//! let summary = w.finish(b"serialised VmState", &[CpuRegs::default()])?;
//!
//! let mut r = ImageReader::open("vm.img".as_ref(), None)?;
//! assert_eq!(r.root_hash(), summary.root_hash);
//! r.verify()?;
//! let page = r.read_page(0x5000)?;
//! # let _ = page;
//! # Ok(()) }
//! ```
#![deny(missing_docs)]

mod chain;
mod codec;
mod crypto;
mod error;
pub mod export;
mod footer;
mod hash;
mod header;
mod layout;
mod pagemap;
mod pipeline;
mod reader;
mod record;
mod writer;

#[cfg(test)]
mod tests;

pub use chain::{open_chain, resolve_parent_path, ImageChain, MAX_CHAIN_LEN};
pub use crypto::{UserKey, KEY_FILE_CONTEXT, MAX_KEY_FILE_BYTES};
pub use error::{Error, Result};
pub use export::{
    write_elf_core, write_lime, write_raw, CpuRegs, ExportFormat, Extent, ExtentKind, FileLayout, MemorySource,
};
pub use hash::Hash32;
pub use header::{
    Codec, EncryptionParams, ImageHeader, ImageHeaderInput, ParentRef, RamRange, DEFAULT_CHUNK_SIZE, FORMAT_VERSION,
    MAX_CHUNK_SIZE, PAGE_SIZE,
};
pub use reader::{ImageReader, RunData, VerifyReport};
pub use record::{PageRun, RunKind, MAX_RUNS_PER_CHUNK};
pub use writer::{check_output_path, ImageSummary, ImageWriter, WriteOptions};

/// Root hash of an image (alias: the same 32-byte BLAKE3 digest type).
pub type RootHash = Hash32;
