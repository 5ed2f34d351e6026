//! ferry-inspect
