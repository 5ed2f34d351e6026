//! The crate's one error type: what failed and where.

use std::path::PathBuf;

/// Errors of mounting and serving an image.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Opening or reading the image (or a chain member) failed.
    #[error(transparent)]
    Image(#[from] ferry_image::Error),
    /// The mount point is not a usable directory.
    #[error("mount point {path}: {reason}")]
    MountPoint {
        /// The directory given.
        path: PathBuf,
        /// Why it cannot be used.
        reason: String,
    },
    /// `/dev/fuse` cannot be opened (no FUSE support in this kernel or container).
    #[error("/dev/fuse: {0} (FUSE is not available here)")]
    NoFuse(std::io::Error),
    /// The FUSE mount itself failed.
    #[error("mounting {path} with FUSE: {source}")]
    Mount {
        /// The mount point.
        path: PathBuf,
        /// The error from fuser (mount(2) or fusermount3).
        source: std::io::Error,
    },
    /// Unmounting or ending the FUSE session failed.
    #[error("unmounting {path}: {reason}")]
    Unmount {
        /// The mount point.
        path: PathBuf,
        /// What went wrong.
        reason: String,
    },
    /// A system call used for signal handling failed.
    #[error("{what}: {source}")]
    Sys {
        /// The call.
        what: &'static str,
        /// Its error.
        source: std::io::Error,
    },
    /// The options are inconsistent.
    #[error("invalid option: {0}")]
    InvalidOption(String),
}

/// Result with this crate's [`Error`].
pub type Result<T> = std::result::Result<T, Error>;
