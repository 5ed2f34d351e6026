//! `ferry image mount IMG DIR`: parses, opens the view, serves it in the
//! foreground until unmounted or signalled, prints what it did.

use std::path::PathBuf;

use anyhow::Result;
use clap::Args;
use ferry_image::UserKey;
use ferry_mount::{MountView, ServeOptions, ViewOptions};

/// `ferry image mount`.
#[derive(Args)]
pub struct MountArgs {
    /// The image (its parents are found through the chain).
    image: PathBuf,
    /// The directory to mount on (must exist).
    dir: PathBuf,
    /// Key file for encrypted images.
    #[arg(long, alias = "key")]
    key_file: Option<PathBuf>,
    /// Serve in the foreground until unmounted or signalled (the default, and the only mode).
    #[arg(long)]
    foreground: bool,
    /// Decoded memory kept in the cache, in MiB (1 MiB windows).
    #[arg(long, default_value = "32")]
    cache_mib: usize,
    /// Do not decode the next 1 MiB ahead on a second thread during sequential reads.
    #[arg(long)]
    no_prefetch: bool,
    /// Let other users read the files (needs user_allow_other in /etc/fuse.conf unless root).
    #[arg(long)]
    allow_other: bool,
    /// Print the final report as JSON.
    #[arg(long)]
    json: bool,
}

/// Runs `ferry image mount`.
pub fn mount(a: MountArgs) -> Result<u8> {
    let _ = a.foreground;
    let key = a.key_file.as_ref().map(|f| UserKey::from_file(f)).transpose()?;
    let opts = ViewOptions { window_bytes: 1 << 20, cache_windows: a.cache_mib, prefetch: !a.no_prefetch };
    let view = MountView::open(&a.image, key.as_ref(), &opts)?.on_failure(|f| {
        eprintln!("ferry: read of {} at offset {} ({} bytes) failed with EIO: {}", f.file, f.offset, f.len, f.reason)
    });
    let dir = a.dir.clone();
    let report = ferry_mount::serve(view, &a.dir, &ServeOptions { allow_other: a.allow_other }, || {
        eprintln!(
            "ferry: mounted {} at {} (pmem, core.elf, mem.lime, info.json, vcpu/N/regs.json); \
             unmount with `fusermount3 -u {}` or Ctrl-C",
            a.image.display(),
            dir.display(),
            dir.display()
        )
    })?;
    if a.json {
        println!("{}", serde_json::to_string(&report)?);
    } else {
        let how = match &report.ended {
            ferry_mount::Ended::Unmounted => "unmounted".to_string(),
            ferry_mount::Ended::Signal { name } => format!("{name}, unmounted"),
        };
        let r = &report.reads;
        eprintln!(
            "ferry: {} ended ({how}) after {:.1} s: {} reads, {} bytes, {} failed; cache {} hits, {} misses",
            report.mountpoint.display(),
            report.mounted_secs,
            r.reads,
            r.bytes,
            r.failed_reads,
            r.cache.hits,
            r.cache.misses
        );
    }
    Ok(0)
}
