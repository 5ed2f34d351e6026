//! The crate's error type: every failure says what was wrong and where
//! (address, level, vCPU), so bad input is a message, never a panic.

use crate::paging::Stop;

/// Result alias of this crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

/// What can go wrong analysing guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading the image failed (corrupt chunk, wrong version, I/O...).
    #[error(transparent)]
    Image(#[from] ferry_image::Error),

    /// A physical range the caller asked for is not guest RAM.
    #[error("physical range {start:#x}..{end:#x} is outside guest memory (RAM: {ram})")]
    OutsideMemory {
        /// First address asked for.
        start: u64,
        /// End of the range asked for (exclusive).
        end: u64,
        /// The guest's RAM ranges, for the message.
        ram: String,
    },

    /// The top-level page table (CR3) is not in guest RAM.
    #[error("page-table root (CR3) {root:#x} is outside guest memory (RAM: {ram})")]
    RootOutsideMemory {
        /// The root table's physical address.
        root: u64,
        /// The guest's RAM ranges, for the message.
        ram: String,
    },

    /// The vCPU index does not exist in the image.
    #[error("vCPU {index} does not exist: the image has {count} vCPU(s)")]
    NoSuchVcpu {
        /// Index asked for.
        index: usize,
        /// vCPUs in the image.
        count: usize,
    },

    /// The vCPU is not in 64-bit paging (4- or 5-level), the only mode the walker knows.
    #[error("vCPU {vcpu}: not in x86-64 long-mode paging (cr0={cr0:#x} cr4={cr4:#x} efer={efer:#x}): {reason}")]
    UnsupportedPaging {
        /// The vCPU.
        vcpu: usize,
        /// Its CR0.
        cr0: u64,
        /// Its CR4.
        cr4: u64,
        /// Its EFER.
        efer: u64,
        /// Which bit is missing.
        reason: &'static str,
    },

    /// A virtual address does not translate; the stop says at which level and why.
    #[error("virtual address {:#x}: {stop}", stop.va)]
    NotMapped {
        /// Where and why the walk stopped.
        stop: Box<Stop>,
    },

    /// A search pattern cannot be used.
    #[error("invalid pattern {pattern:?}: {reason}")]
    BadPattern {
        /// The pattern as given.
        pattern: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A length argument is out of bounds.
    #[error("invalid length {len}: {reason}")]
    BadLength {
        /// The length asked for.
        len: u64,
        /// The bound it breaks.
        reason: String,
    },

    /// Two images to compare have different RAM layouts, so their pages do not correspond.
    #[error("{} and {} have different RAM layouts ({ram_a} vs {ram_b}): not images of the same guest", a.display(), b.display())]
    LayoutMismatch {
        /// First image.
        a: std::path::PathBuf,
        /// Second image.
        b: std::path::PathBuf,
        /// First image's RAM ranges.
        ram_a: String,
        /// Second image's RAM ranges.
        ram_b: String,
    },

    /// A `--range` that cannot be used.
    #[error("invalid range {range:?}: {reason}")]
    BadRange {
        /// The range as given.
        range: String,
        /// What is wrong with it.
        reason: String,
    },

    /// A redaction was asked for with nothing to redact.
    #[error("nothing to redact: give at least one range, string, hex pattern or rule file")]
    NothingToRedact,

    /// The redacted image would overwrite an image it is read from.
    #[error("output {} is the input image {} (or its report would be): write the redacted copy elsewhere", output.display(), input.display())]
    OutputIsInput {
        /// The output asked for.
        output: std::path::PathBuf,
        /// The member of the input chain it names.
        input: std::path::PathBuf,
    },

    /// More matches than one redaction overwrites.
    #[error("{found} matches, more than the {max} one redaction overwrites: use narrower patterns")]
    TooManyMatches {
        /// Matches found.
        found: u64,
        /// The bound.
        max: usize,
    },

    /// The written image still matches (a pattern made of the fill byte, say); it was removed.
    #[error("the redacted copy still has {matches} match(es), the first at {first:#x}, so it was not kept: if a pattern matches the fill byte {fill:#04x}, choose another --fill")]
    RedactionIncomplete {
        /// Matches left.
        matches: u64,
        /// Address of the first.
        first: u64,
        /// The fill byte used.
        fill: u8,
    },

    /// A file operation on the redaction's output failed.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: std::path::PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// A YARA rule file cannot be read.
    #[error("cannot read rules {path}: {reason}")]
    RulesRead {
        /// The file.
        path: String,
        /// Why (I/O error, size, encoding).
        reason: String,
    },

    /// YARA-X refused the rules; its message names file, line and column.
    #[error("invalid rules in {origin}:\n{message}")]
    Rules {
        /// The rule file.
        origin: String,
        /// yara-x's error.
        message: String,
    },

    /// A rule needs what a memory scan cannot give (a whole file, an unbounded match).
    #[error("{origin}:{line}: rule {rule}: {reason}")]
    RuleRefused {
        /// The rule file.
        origin: String,
        /// Line of the offending part.
        line: usize,
        /// The rule (`-` for a file-level statement no rule uses).
        rule: String,
        /// What it uses and why that is refused.
        reason: String,
    },

    /// YARA-X failed while scanning (timeout, internal limit).
    #[error("YARA scan failed: {0}")]
    Yara(String),

    /// No image was given.
    #[error("no image given")]
    NoImages,
}
