//! ferry-inspect: analysis of a VM's memory, offline (images) and of
//! running guests ([`LiveMem`], [`Watches`]).
//!
//! Everything reads guest-physical memory through [`PhysMem`], so the same
//! page-table walker ([`translate`], [`maps`]), reader ([`read_phys`],
//! [`read_virt`]) and scanners ([`scan`], [`scan_yara`]) serve an image chain
//! ([`ImageMem`]) or a plain buffer ([`BufMem`]). Results are `Serialize`
//! structs so the CLI can print them for a person or as JSON.
#![deny(missing_docs)]

mod diff;
mod error;
mod feed;
mod live;
mod maps;
mod mem;
mod paging;
mod prefilter;
mod read;
mod redact;
mod scan;
mod stats;
mod watch;
mod yara;
mod yara_watch;

#[cfg(test)]
mod diff_tests;
#[cfg(test)]
mod redact_tests;
#[cfg(test)]
mod tests;
#[cfg(test)]
mod yara_tests;

pub use diff::{diff, ChangedRange, ChangedRun, DiffMode, DiffOptions, DiffReport, VirtDiff, VirtRegion};
pub use error::{Error, Result};
pub use feed::{FeedStats, EDGE_SLACK};
pub use live::{live_context, read_live, LiveMem, LiveRead, MapsRequest, ReadRequest};
pub use maps::{maps, MapRun, MapsReport, MAX_RUNS, MAX_TABLES};
pub use mem::{BufMem, ImageMem, PhysMem};
pub use paging::{translate, walk, Level, PageFlags, PagingContext, Step, Stop, StopReason, Translation};
pub use read::{read_phys, read_virt, PhysRead, VirtPiece, VirtRead, MAX_READ};
pub use redact::{
    redact, report_path, Cause, PatternInfo, Phases, PhysRange, RedactReport, RedactSpec, RedactStep, Redaction,
    RuleInfo, SourceImage, MAX_REDACTIONS, REPORT_FORMAT,
};
pub use scan::{scan, Literals, Match, Matcher, Pattern, ScanOptions, ScanReport, MAX_PATTERN};
pub use stats::{entropy, stats, Compressibility, ImageStats, Sharing, StatsOptions, StatsReport};
pub use watch::{
    dirty_extents, LiveMatcher, PassReport, ScanRequest, WatchError, WatchInfo, WatchMatch, Watches, MAX_KNOWN,
    MAX_LISTED, MAX_PATTERNS, MAX_RULES_ORIGIN, MAX_WATCH_IDLE_S,
};
pub use yara::{scan_yara, YaraRules, YaraSummary, MAX_MATCHES_PER_PATTERN, MAX_RULES_FILE, MAX_YARA_PATTERN};
pub use yara_watch::MAX_KNOWN_HITS;
