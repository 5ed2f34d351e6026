//! How the benches print what they measured: tables for people, JSON for
//! programs (and for `docs/benchmarks.md`, whose figures come from it).

pub(crate) mod json;
pub(crate) mod tables;
