//! ferry-migrate: the pre-copy engine that live snapshot and live migration
//! share (dirty tracking, rounds, final pause), the sinks it writes to, and
//! restoring a VM from what it wrote.
//!
//! A live snapshot is a migration whose destination is a file; a restore is
//! an incoming migration whose source is a file.

#![deny(missing_docs)]

pub mod certs;
pub mod control;
pub mod convergence;
pub mod lazy;
pub mod local;
pub mod migration;
pub mod plot;
pub mod postcopy;
pub mod precopy;
pub mod ratelimit;
pub mod regs;
pub mod restore;
pub mod sink;
pub mod snapshot;
mod streams;
pub mod transport;
pub mod wire;
pub mod wss;

pub use control::{Applied, ControlError, Fault, Operation, RegsReport, VmController};
pub use lazy::{LazyCompletion, LazyRestore, LazyStats};
pub use precopy::{
    precopy, CowStats, PrecopyConfig, PrecopyStats, RoundStats, StopReason, ThrottlePolicy, ThrottleStats, ThrottleStep,
};
pub use restore::{restore_from_image, MemoryMode, RestoreOptions, RestoreStats, Restored};
pub use sink::PageSink;
pub use snapshot::{SnapshotError, SnapshotRequest, SnapshotStats};

/// Errors of the engine and of restore.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The VM refused an operation.
    #[error(transparent)]
    Vm(#[from] ferry_vmm::Error),
    /// The image layer failed.
    #[error(transparent)]
    Image(#[from] ferry_image::Error),
    /// The serialised VM state could not be encoded or decoded.
    #[error("VM state in {where_}: {source}")]
    State {
        /// Which image.
        where_: String,
        /// The decoder's error.
        source: serde_json::Error,
    },
    /// An image does not fit the VM or vice versa.
    #[error("{0}")]
    Mismatch(String),
    /// Lazy restore (userfaultfd) could not be set up, or a page could not be supplied.
    #[error("lazy restore of {path}: {what}")]
    Lazy {
        /// The image.
        path: String,
        /// What failed.
        what: String,
    },
    /// The copy-on-write phase (userfaultfd write protection) failed.
    #[error("copy-on-write snapshot: {0}")]
    Cow(String),
    /// Pre-copy rounds ended with more dirty memory than the pause budget
    /// allows; the guest was not paused for it.
    #[error("did not converge after {rounds} rounds: {dirty_pages} pages dirtied in the last round, {pages_per_s:.0} pages/s delivered{}; the guest keeps running here (allow throttling, raise --downtime-ms or --max-rounds)", throttle_percent.map(|p| format!(", throttle at {p}%")).unwrap_or_default())]
    NotConverging {
        /// Rounds run.
        rounds: u32,
        /// Dirty pages found after the last round.
        dirty_pages: u64,
        /// Delivery rate measured.
        pages_per_s: f64,
        /// Throttle in effect at the end, if auto-converge was on.
        throttle_percent: Option<u32>,
    },
    /// The user cancelled the migration before it committed.
    #[error("cancelled by the user before the commit; the guest keeps running here")]
    Cancelled,
    /// The migration stream failed or carried something wrong.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// A migration transport failed (address, socket, TLS files or handshake).
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
}

/// Result alias.
pub type Result<T> = std::result::Result<T, Error>;
