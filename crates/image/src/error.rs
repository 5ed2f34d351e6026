//! The crate's single error type.
//!
//! Every variant that comes from reading an image names the file and where in
//! it the problem is (file offset, chunk index, section or field), so a user
//! can tell a truncated copy from a flipped bit from a wrong key.

use std::path::PathBuf;

use crate::hash::Hash32;

/// Result alias used throughout the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Everything that can go wrong writing, reading, verifying or exporting an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An operating-system I/O call failed (ENOSPC, EIO, permission...).
    #[error("{op} {path}: {source}")]
    Io {
        /// What we were doing ("write", "open", "fsync", "rename"...).
        op: &'static str,
        /// The file concerned.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },

    /// The file ends before a structure that must be there.
    #[error("{path}: truncated: {what} needs bytes up to offset {needed}, but the file has only {size} bytes")]
    Truncated {
        /// The image file.
        path: PathBuf,
        /// Which structure was cut off.
        what: &'static str,
        /// End offset the structure needs.
        needed: u64,
        /// Actual file size.
        size: u64,
    },

    /// A structure does not start with its magic bytes.
    #[error("{path}: bad magic for {what} at offset {offset} (not a ferry image, or corrupted)")]
    BadMagic {
        /// The image file.
        path: PathBuf,
        /// Which structure.
        what: &'static str,
        /// Where it should have started.
        offset: u64,
    },

    /// The image was written by an incompatible format version.
    #[error("{path}: unsupported image format version {found} in the {what} (this build reads version {supported})")]
    UnsupportedVersion {
        /// The image file.
        path: PathBuf,
        /// Which structure carried the version ("preamble", "trailer", "header").
        what: &'static str,
        /// Version found in the file.
        found: u32,
        /// Version this build understands.
        supported: u32,
    },

    /// A length or offset read from the file points outside the file.
    #[error("{path}: {what} at offset {offset} declares {len} bytes, which exceeds the file size {file_size}")]
    SizeExceedsFile {
        /// The image file.
        path: PathBuf,
        /// Which structure declared the size.
        what: &'static str,
        /// Where the declared region starts.
        offset: u64,
        /// Declared length.
        len: u64,
        /// Actual file size.
        file_size: u64,
    },

    /// The header bytes do not match the hash stored in the preamble.
    #[error("{path}: header (offsets 0..{end}) does not match its hash: the header was modified or corrupted")]
    HeaderHashMismatch {
        /// The image file.
        path: PathBuf,
        /// End offset of the header.
        end: u64,
    },

    /// The header parsed, but a field is invalid.
    #[error("{path}: invalid header field `{field}`: {reason}")]
    InvalidHeader {
        /// The image file.
        path: PathBuf,
        /// Field name.
        field: &'static str,
        /// What is wrong with it.
        reason: String,
    },

    /// A chunk's bytes do not match the hash recorded for it.
    #[error("{path}: chunk {index} at offset {offset} ({len} bytes): hash mismatch, the chunk is corrupted")]
    ChunkHashMismatch {
        /// The image file.
        path: PathBuf,
        /// Chunk index.
        index: u64,
        /// File offset of the chunk record.
        offset: u64,
        /// Record length.
        len: u64,
    },

    /// A chunk record is malformed (bad header, runs disagree with the index, bad payload).
    #[error("{path}: chunk {index} at offset {offset}: {reason}")]
    ChunkCorrupt {
        /// The image file.
        path: PathBuf,
        /// Chunk index.
        index: u64,
        /// File offset of the chunk record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The state or CPU section does not match its hash.
    #[error("{path}: {section} section at offset {offset}: hash mismatch, the section is corrupted")]
    SectionHashMismatch {
        /// The image file.
        path: PathBuf,
        /// "state" or "cpus".
        section: &'static str,
        /// File offset of the section record.
        offset: u64,
    },

    /// The state or CPU section is malformed.
    #[error("{path}: {section} section at offset {offset}: {reason}")]
    SectionCorrupt {
        /// The image file.
        path: PathBuf,
        /// "state" or "cpus".
        section: &'static str,
        /// File offset of the section record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The last 64 bytes are not a trailer: the file was cut short or never finished.
    #[error("{path}: no trailer in the last 64 bytes of the file ({size} bytes): the image is truncated or was never finished")]
    MissingTrailer {
        /// The image file.
        path: PathBuf,
        /// Actual file size.
        size: u64,
    },

    /// The footer does not match the hash stored in the trailer.
    #[error("{path}: footer at offset {offset} ({len} bytes): hash mismatch, the footer is corrupted")]
    FooterHashMismatch {
        /// The image file.
        path: PathBuf,
        /// File offset of the footer.
        offset: u64,
        /// Footer length.
        len: u64,
    },

    /// The trailer's footer offset and length fit in the file but do not end where the trailer starts.
    #[error("{path}: trailer at offset {trailer_offset}: the {field} field is wrong: footer offset {footer_offset} + footer length {footer_len} ends at {}, but the footer must end where the trailer starts ({trailer_offset})", footer_offset.saturating_add(*footer_len))]
    FooterMisplaced {
        /// The image file.
        path: PathBuf,
        /// File offset of the trailer.
        trailer_offset: u64,
        /// Footer offset the trailer declares.
        footer_offset: u64,
        /// Footer length the trailer declares.
        footer_len: u64,
        /// Which trailer field disagrees ("footer offset", "footer length", or both when unknown).
        field: &'static str,
    },

    /// The trailer's footer hash disagrees with a footer whose own contents are consistent.
    #[error("{path}: trailer at offset {trailer_offset}: the footer hash field (bytes 32..64) disagrees with the footer at offset {footer_offset}, whose header hash and root hash check out: the trailer's footer hash is corrupted")]
    TrailerFooterHashMismatch {
        /// The image file.
        path: PathBuf,
        /// File offset of the trailer.
        trailer_offset: u64,
        /// File offset of the footer.
        footer_offset: u64,
    },

    /// The footer is malformed.
    #[error("{path}: footer at offset {offset}: {reason}")]
    FooterCorrupt {
        /// The image file.
        path: PathBuf,
        /// File offset of the problem inside the footer.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The fixed-size trailer at the end of the file is malformed.
    #[error("{path}: trailer at offset {offset}: {reason}")]
    TrailerCorrupt {
        /// The image file.
        path: PathBuf,
        /// File offset of the trailer.
        offset: u64,
        /// What is wrong.
        reason: String,
    },

    /// The root hash recorded in the footer does not match the image's contents.
    #[error("{path}: root hash mismatch: the footer records {recorded}, the contents hash to {computed}")]
    RootHashMismatch {
        /// The image file.
        path: PathBuf,
        /// Root hash stored in the footer.
        recorded: Hash32,
        /// Root hash computed from the contents.
        computed: Hash32,
    },

    /// The keyed root tag of an encrypted image does not verify.
    #[error("{path}: root authentication tag mismatch: the image was altered by someone without the key")]
    RootTagMismatch {
        /// The image file.
        path: PathBuf,
    },

    /// The user key cannot unwrap the image's data key.
    #[error("{path}: wrong key: the given key file cannot unwrap this image's data key")]
    WrongKey {
        /// The image file.
        path: PathBuf,
    },

    /// The image is encrypted and no key was given.
    #[error("{path}: the image is encrypted; a key file is needed to read {what}")]
    KeyRequired {
        /// The image file.
        path: PathBuf,
        /// What the caller tried to read.
        what: &'static str,
    },

    /// An encrypted chunk or section failed authentication although the key is right.
    #[error("{path}: {what} {index} at offset {offset}: decryption failed (authentication tag mismatch): the data or its index entry was altered")]
    DecryptFailed {
        /// The image file.
        path: PathBuf,
        /// "chunk", "state section" or "cpus section".
        what: &'static str,
        /// Chunk index (0 for sections).
        index: u64,
        /// File offset of the record.
        offset: u64,
    },

    /// A chain member's parent file does not exist or cannot be opened.
    #[error("{child}: parent image {parent} is missing: {source}")]
    MissingParent {
        /// The image that names the parent.
        child: PathBuf,
        /// Where the parent was looked for.
        parent: PathBuf,
        /// Why it could not be opened.
        #[source]
        source: std::io::Error,
    },

    /// A chain member's parent is not the image it was made against.
    #[error("{child}: parent {parent} has root hash {found}, but the child was made against {expected}")]
    ParentMismatch {
        /// The image that names the parent.
        child: PathBuf,
        /// The parent file.
        parent: PathBuf,
        /// Root hash recorded in the child.
        expected: Hash32,
        /// Root hash of the file found.
        found: Hash32,
    },

    /// A chain member's parent describes a different guest memory layout.
    #[error("{child}: parent {parent} has a different memory layout: {reason}")]
    ParentLayoutMismatch {
        /// The image that names the parent.
        child: PathBuf,
        /// The parent file.
        parent: PathBuf,
        /// What differs.
        reason: String,
    },

    /// Following parent hints did not end (cycle or absurd depth).
    #[error("{path}: image chain is longer than {max} images (a cycle of parent hints?)")]
    ChainTooLong {
        /// The image where we stopped.
        path: PathBuf,
        /// The limit.
        max: usize,
    },

    /// A key file is not a regular file (a device such as /dev/zero, a FIFO, a directory...).
    #[error("key file {path} is {kind}, not a regular file")]
    KeyFileNotRegular {
        /// The key file (as given; symlinks are followed).
        path: PathBuf,
        /// What it is instead ("a character device", "a FIFO (named pipe)", "a directory"...).
        kind: &'static str,
    },

    /// A key file is larger than `MAX_KEY_FILE_BYTES`.
    #[error("key file {path} is {size} bytes, more than the {max} bytes a key file may have (32 random bytes make a good key)")]
    KeyFileTooBig {
        /// The key file.
        path: PathBuf,
        /// Its size (at least this many bytes when it grew while being read).
        size: u64,
        /// The limit, `MAX_KEY_FILE_BYTES`.
        max: u64,
    },

    /// A key file has no bytes.
    #[error("key file {path} is empty")]
    KeyFileEmpty {
        /// The key file.
        path: PathBuf,
    },

    /// A caller passed an invalid argument (misaligned address, bad length, bad range list).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// A caller wrote or read guest memory outside the image's RAM ranges.
    #[error("guest-physical range {gpa:#x}..{end:#x} is outside the image's RAM ranges")]
    OutsideRam {
        /// Start of the offending range.
        gpa: u64,
        /// End (exclusive).
        end: u64,
    },

    /// Compression or encryption failed while writing (should not happen with valid input).
    #[error("{path}: encoding {what} failed: {reason}")]
    Encode {
        /// The image being written.
        path: PathBuf,
        /// What was being encoded.
        what: &'static str,
        /// Why.
        reason: String,
    },

    /// A writer worker thread died.
    #[error("{path}: writer worker thread failed: {reason}")]
    Worker {
        /// The image being written.
        path: PathBuf,
        /// What happened.
        reason: String,
    },

    /// An export cannot represent this image (too many ranges for ELF, ...).
    #[error("export: {0}")]
    Export(String),

    /// A caller's visitor callback failed; its error is passed through.
    #[error("visitor callback failed: {0}")]
    Callback(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl Error {
    /// Wraps an I/O error with the operation and the path, the only way I/O errors enter this enum.
    pub(crate) fn io(op: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Error::Io { op, path: path.into(), source }
    }
}
