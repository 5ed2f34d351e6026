//! Live snapshots driven through the control API (`PUT /vm/snapshot`), and
//! the lineage that lets the next snapshot be incremental.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_image::{
    Codec, Hash32, ImageHeaderInput, ImageReader, ImageWriter, ParentRef, RamRange, UserKey, WriteOptions,
};
use ferry_migrate::{precopy, PrecopyConfig};
use ferry_vmm::Vm;
use serde::{Deserialize, Serialize};
use serde_json::json;

/// A VM as the API sees it: the live object plus what snapshots need to remember.
pub struct VmHandle {
    /// The VM.
    pub vm: Arc<Vm>,
    /// Root hash of the newest image this VM's memory matches (its last
    /// snapshot, or the image it was restored from), while the dirty log has
    /// tracked every write since. `None` means an incremental snapshot is impossible.
    pub lineage: Mutex<Option<Hash32>>,
    /// For a lazily restored VM: done once every page is in place. Until
    /// then a page not yet populated is not a zero page, so snapshots wait.
    pub memory_ready: Option<ferry_migrate::LazyCompletion>,
}

/// How long a snapshot waits for a lazy restore to finish bringing memory in.
const LAZY_WAIT: Duration = Duration::from_secs(120);

/// Body of `PUT /vm/snapshot`.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Image file to write (replaced atomically).
    pub path: PathBuf,
    /// `live` (default) or `pause` (stop the world).
    #[serde(default)]
    pub mode: Option<String>,
    /// `lz4` (default), `zstd` or `none`.
    #[serde(default)]
    pub codec: Option<String>,
    /// zstd level (default 3).
    #[serde(default)]
    pub zstd_level: Option<i32>,
    /// Encrypt with the key derived from this file.
    #[serde(default)]
    pub key_file: Option<PathBuf>,
    /// Write an incremental image over this parent (must be the VM's last snapshot).
    #[serde(default)]
    pub parent: Option<PathBuf>,
    /// Hash guest memory at the final pause and return the digest.
    #[serde(default)]
    pub digest: bool,
    /// Pause budget in milliseconds (default 5).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// Most live rounds (default 8).
    #[serde(default)]
    pub max_rounds: Option<u32>,
    /// Final phase: `cow` (default: write-protect the last dirty pages and
    /// copy them after resuming) or `copy` (copy them during the pause).
    #[serde(default)]
    pub final_phase: Option<String>,
}

/// An error with its HTTP status.
pub struct SnapError(pub u16, pub String);

fn codec(req: &SnapshotRequest) -> Result<Codec, SnapError> {
    match req.codec.as_deref().unwrap_or("lz4") {
        "lz4" => Ok(Codec::Lz4),
        "none" => Ok(Codec::None),
        "zstd" => Ok(Codec::Zstd { level: req.zstd_level.unwrap_or(3) }),
        other => Err(SnapError(400, format!("unknown codec {other:?}: use lz4, zstd or none"))),
    }
}

/// How the parent is named in the child's header: by file name when both
/// live in one directory (so the pair can be moved together), else absolutely.
fn parent_hint(child: &Path, parent: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let (c, p) = (abs(child.parent().unwrap_or(Path::new("."))), abs(parent));
    if p.parent() == Some(c.as_path()) {
        p.file_name().map(|n| n.to_string_lossy().to_string()).unwrap_or_default()
    } else {
        p.display().to_string()
    }
}

/// Takes a snapshot; returns the statistics as JSON.
pub fn take(h: &VmHandle, req: &SnapshotRequest) -> Result<serde_json::Value, SnapError> {
    let live = match req.mode.as_deref().unwrap_or("live") {
        "live" => true,
        "pause" => false,
        other => return Err(SnapError(400, format!("unknown mode {other:?}: use live or pause"))),
    };
    let codec = codec(req)?;
    let copy_on_write = match req.final_phase.as_deref().unwrap_or("cow") {
        "cow" => true,
        "copy" => false,
        other => return Err(SnapError(400, format!("unknown final_phase {other:?}: use cow or copy"))),
    };
    let key = match &req.key_file {
        Some(f) => Some(UserKey::from_file(f).map_err(|e| SnapError(400, e.to_string()))?),
        None => None,
    };
    let vm = &h.vm;
    if vm.status().state == "stopped" {
        return Err(SnapError(409, "VM has stopped".into()));
    }
    if let Some(ready) = &h.memory_ready {
        if !ready.wait(LAZY_WAIT) {
            return Err(SnapError(
                409,
                format!("guest memory is still being restored lazily after {} s; try again later", LAZY_WAIT.as_secs()),
            ));
        }
    }
    // Holding the lineage lock serialises snapshots.
    let mut lineage = h.lineage.lock().unwrap();
    let parent = match &req.parent {
        None => None,
        Some(p) => {
            let reader =
                ImageReader::open(p, key.as_ref()).map_err(|e| SnapError(400, format!("parent image: {e}")))?;
            let root = reader.root_hash();
            match *lineage {
                Some(l) if l == root => {}
                Some(l) => {
                    return Err(SnapError(
                        409,
                        format!(
                            "{} (root {root}) is not this VM's last snapshot (root {l}); an incremental image needs the dirty log since its parent",
                            p.display()
                        ),
                    ))
                }
                None => {
                    return Err(SnapError(
                        409,
                        "this VM has no snapshot its dirty log follows from; take a full snapshot first".into(),
                    ))
                }
            }
            Some(ParentRef { root_hash: root, path_hint: parent_hint(&req.path, p) })
        }
    };
    let status = vm.status();
    let input = ImageHeaderInput {
        vm_config: json!({
            "mem_bytes": status.mem_bytes,
            "vcpus": status.vcpus,
            "cmdline": status.cmdline,
            "cpu_template": status.cpu_template,
            "kernel": status.kernel,
        }),
        ranges: vm.ram().regions().iter().map(|r| RamRange { start: r.gpa, len: r.len }).collect(),
        parent: parent.clone(),
    };
    let opts = WriteOptions { codec, key, ..Default::default() };
    let mut writer = ImageWriter::create(&req.path, input, opts).map_err(|e| SnapError(500, e.to_string()))?;
    let cfg = PrecopyConfig {
        live,
        max_rounds: req.max_rounds.unwrap_or(8).max(1),
        downtime_target: Duration::from_millis(req.downtime_ms.unwrap_or(5)),
        digest: req.digest,
        incremental: parent.is_some(),
        copy_on_write,
    };
    // From here on the dirty log is consumed: the lineage holds only if this succeeds.
    *lineage = None;
    let (state, stats) = precopy(vm, &mut writer, &cfg).map_err(|e| SnapError(500, format!("snapshot failed: {e}")))?;
    let cpus: Vec<_> = state.vcpus.iter().map(ferry_migrate::regs::cpu_regs).collect();
    let state_json = serde_json::to_vec(&state).map_err(|e| SnapError(500, e.to_string()))?;
    let summary = writer.finish(&state_json, &cpus).map_err(|e| SnapError(500, format!("writing image: {e}")))?;
    *lineage = Some(summary.root_hash);
    let ratio = if summary.stored_bytes > 0 { summary.raw_bytes as f64 / summary.stored_bytes as f64 } else { 1.0 };
    Ok(json!({
        "path": summary.path,
        "root_hash": summary.root_hash.to_string(),
        "parent": parent.map(|p| p.root_hash.to_string()),
        "mode": if live { "live" } else { "pause" },
        "total_ms": stats.total_ms,
        "pause_ms": stats.pause_ms,
        "digest_ms": stats.digest_ms,
        "state_ms": stats.state_ms,
        "memory_digest": stats.memory_digest,
        "rounds": stats.rounds.len(),
        "pages_per_round": stats.rounds.iter().map(|r| r.pages).collect::<Vec<_>>(),
        "round_details": stats.rounds,
        "stop_reason": stats.stop_reason,
        "cow": stats.cow,
        "cow_fallback": stats.cow_fallback,
        "unpopulated_pages_skipped": stats.unpopulated_pages_skipped,
        "zero_pages": stats.zero_pages,
        "zero_pages_skipped": stats.unpopulated_pages_skipped + summary.zero_pages_skipped,
        "data_pages_sent": stats.data_pages_sent,
        "bytes_written": summary.bytes_written,
        "raw_bytes": summary.raw_bytes,
        "stored_bytes": summary.stored_bytes,
        "compression_ratio": ratio,
        "codec": summary.codec,
        "encrypted": summary.encrypted,
        "write_secs": summary.elapsed_secs,
        "state_bytes": summary.state_bytes,
    }))
}
