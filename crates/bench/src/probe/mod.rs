//! What the benches measure, one module per probe: ferry's boot, snapshot
//! and migration, and the host figures they are judged against.

pub(crate) mod boot;
pub(crate) mod host;
pub(crate) mod inspect;
pub(crate) mod migrate;
pub(crate) mod mount;
pub(crate) mod scan;
pub(crate) mod snapshot;
pub(crate) mod watch;
pub(crate) mod wss;
