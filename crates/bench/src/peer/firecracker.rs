//! Firecracker, the other comparison VMM.
//!
//! Firecracker is not in any package registry and may not be built or
//! shipped by this repository, so no driver lives here: its snapshot and
//! restore comparison is `scripts/bench-firecracker.py`, which takes a path
//! to a Firecracker binary built elsewhere (`FC=/path/to/firecracker`), and
//! its figures are in `docs/benchmarks.md`. Firecracker has no live
//! migration, so `ferry bench migrate` has no Firecracker column; this is the
//! note the migration report prints in its place.

/// Why the migration report has no Firecracker column.
pub(crate) const MIGRATE_NOTE: &str = "Firecracker: no live migration (snapshot/restore only; \
     its comparison is scripts/bench-firecracker.py with FC=/path/to/firecracker)";
