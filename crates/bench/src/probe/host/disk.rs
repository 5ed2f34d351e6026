//! The disk the snapshot images go to: the bound a snapshot's throughput is
//! judged against.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use anyhow::{Context, Result};

/// Sequential write speed of `dir`'s file system: `mib` MiB in 1 MiB writes, then fsync.
pub(crate) fn disk_write_gb_s(dir: &Path, mib: u64) -> Result<f64> {
    let path = dir.join("disk-speed.tmp");
    let mut buf = vec![0u8; 1 << 20];
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    for c in buf.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        c.copy_from_slice(&x.to_le_bytes()[..c.len()]);
    }
    let t = Instant::now();
    let res = (|| -> Result<()> {
        let mut f = std::fs::File::create(&path)?;
        for i in 0..mib {
            buf[0..8].copy_from_slice(&i.to_le_bytes());
            f.write_all(&buf)?;
        }
        f.sync_all()?;
        Ok(())
    })();
    let secs = t.elapsed().as_secs_f64();
    let _ = std::fs::remove_file(&path);
    res.with_context(|| format!("writing {}", path.display()))?;
    Ok((mib << 20) as f64 / secs / 1e9)
}
