//! A live snapshot as one library call: check the request, open the parent
//! and key, write the image through the pre-copy engine, and keep the
//! lineage that lets the next snapshot be incremental. The CLI and the API
//! only parse a [`SnapshotRequest`] and print the [`SnapshotStats`].

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use ferry_image::{
    Codec, Hash32, ImageHeaderInput, ImageReader, ImageWriter, ParentRef, RamRange, UserKey, WriteOptions,
};
use ferry_vmm::Vm;
use serde::{Deserialize, Serialize};
use serde_json::json;

use crate::precopy::{precopy, CowStats, PrecopyConfig, RoundStats, StopReason};

/// How long a snapshot waits for a lazy restore to finish bringing memory in.
pub const LAZY_WAIT: Duration = Duration::from_secs(120);

/// Default pause budget, as Firecracker and QEMU users expect a few ms.
pub const DEFAULT_DOWNTIME_MS: u64 = 5;

/// Default number of live rounds before the final pause.
pub const DEFAULT_MAX_ROUNDS: u32 = 8;

/// Longest pause budget a request may ask for (a minute): anything longer
/// is a typo, not a budget.
pub const MAX_DOWNTIME_MS: u64 = 60_000;

/// Most live rounds a request may ask for.
pub const MAX_ROUNDS_LIMIT: u32 = 1000;

/// Whether the guest keeps running while memory is copied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SnapshotMode {
    /// Copy while the guest runs; pause only for the last dirty pages.
    #[default]
    Live,
    /// Stop the world: pause, copy everything, resume (for comparison).
    Pause,
}

/// Chunk compression of an image (or, later, of a migration stream).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CodecChoice {
    /// Fast; the default.
    #[default]
    Lz4,
    /// Smaller, slower; level from `zstd_level`.
    Zstd,
    /// Stored as is.
    None,
}

/// How the last dirty pages are saved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalPhase {
    /// Write-protect them (userfaultfd), resume, copy in the background,
    /// when they would not fit the pause budget.
    #[default]
    Cow,
    /// Always copy them while paused.
    Copy,
}

macro_rules! from_str_via_serde {
    ($t:ty, $what:literal, $choices:literal) => {
        impl FromStr for $t {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                serde_json::from_value(serde_json::Value::String(s.to_string()))
                    .map_err(|_| format!("unknown {} {s:?}: use {}", $what, $choices))
            }
        }
    };
}
from_str_via_serde!(SnapshotMode, "mode", "live or pause");
from_str_via_serde!(CodecChoice, "codec", "lz4, zstd or none");
from_str_via_serde!(FinalPhase, "final phase", "cow or copy");

/// Body of `PUT /vm/snapshot` and what `ferry snapshot` sends.
#[derive(Debug, Deserialize, Serialize, Clone)]
#[serde(deny_unknown_fields)]
pub struct SnapshotRequest {
    /// Absolute path of the image file to write (replaced atomically; must
    /// be a regular file or not exist yet).
    pub path: PathBuf,
    /// Live (default) or stop-the-world.
    #[serde(default)]
    pub mode: SnapshotMode,
    /// Chunk codec.
    #[serde(default)]
    pub codec: CodecChoice,
    /// zstd level (-7..=22, default 3); only with codec zstd.
    #[serde(default)]
    pub zstd_level: Option<i32>,
    /// Encrypt with the key derived from this file (absolute path).
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
    /// How the last dirty pages are saved.
    #[serde(default)]
    pub final_phase: FinalPhase,
}

/// What a snapshot did: the figures `ferry snapshot` prints and `--json` emits.
#[derive(Clone, Debug, Serialize)]
pub struct SnapshotStats {
    /// The image written.
    pub path: Option<PathBuf>,
    /// Its root hash.
    pub root_hash: String,
    /// The parent's root hash, for an incremental image.
    pub parent: Option<String>,
    /// Live or stop-the-world.
    pub mode: SnapshotMode,
    /// Whole operation.
    pub total_ms: f64,
    /// How long the guest was paused.
    pub pause_ms: f64,
    /// Of the pause, time hashing memory for `memory_digest`.
    pub digest_ms: f64,
    /// Of the pause, time capturing vCPU and device state.
    pub state_ms: f64,
    /// BLAKE3 of guest RAM at the final pause, when asked for.
    pub memory_digest: Option<String>,
    /// Rounds including the final one.
    pub rounds: usize,
    /// Pages looked at per round.
    pub pages_per_round: Vec<u64>,
    /// Every round's figures.
    pub round_details: Vec<RoundStats>,
    /// Why live rounds ended.
    pub stop_reason: StopReason,
    /// The copy-on-write final phase, when used.
    pub cow: Option<CowStats>,
    /// Why copy-on-write was not possible, when it was wanted.
    pub cow_fallback: Option<String>,
    /// Pages never touched by the guest, not even read.
    pub unpopulated_pages_skipped: u64,
    /// All-zero pages found by reading them.
    pub zero_pages: u64,
    /// Zero pages that cost no data in the image (unpopulated or recorded as zero runs).
    pub zero_pages_skipped: u64,
    /// Pages stored with data, summed over rounds.
    pub data_pages_sent: u64,
    /// Bytes of the image file.
    pub bytes_written: u64,
    /// Page bytes before compression.
    pub raw_bytes: u64,
    /// Page bytes after compression.
    pub stored_bytes: u64,
    /// raw_bytes / stored_bytes.
    pub compression_ratio: f64,
    /// The codec used.
    pub codec: Codec,
    /// Whether records are encrypted.
    pub encrypted: bool,
    /// Time the writer spent, in seconds.
    pub write_secs: f64,
    /// Bytes of serialised VM state.
    pub state_bytes: u64,
}

/// Why a snapshot could not be taken, classified by whose fault it is so
/// that the API answers 400, 409 or 500 without guessing.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    /// The request is wrong (bad path, out-of-range field, unreadable key or parent).
    #[error("{0}")]
    Invalid(String),
    /// The VM is not in a state that allows this snapshot.
    #[error("{0}")]
    Conflict(String),
    /// The VMM failed while taking it; the previous image is intact.
    #[error("snapshot failed: {0}")]
    Failed(String),
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

/// True when writing `path` would replace the directory entry `parent`
/// resolves to, however the two are spelled (`a/./b`, `a//b`, symlinked
/// directories). A hard link to the parent is another entry and is fine.
fn same_file(parent: &Path, path: &Path) -> bool {
    let (Ok(p), Some(dir), Some(name)) = (std::fs::canonicalize(parent), path.parent(), path.file_name()) else {
        return false;
    };
    std::fs::canonicalize(dir).map(|d| d.join(name) == p).unwrap_or(false)
}

/// Checks a path a client gave for a file ferry reads or writes: absolute,
/// no NUL byte, not empty.
pub fn check_client_path(field: &str, p: &Path) -> Result<(), SnapshotError> {
    let s = p.as_os_str();
    if s.is_empty() {
        return Err(SnapshotError::Invalid(format!("{field} is empty")));
    }
    if std::os::unix::ffi::OsStrExt::as_bytes(s).contains(&0) {
        return Err(SnapshotError::Invalid(format!("{field} {:?} contains a NUL byte", p.display())));
    }
    if !p.is_absolute() {
        return Err(SnapshotError::Invalid(format!(
            "{field} {} is relative; the API takes absolute paths (ferry's working directory is not the client's)",
            p.display()
        )));
    }
    Ok(())
}

impl SnapshotRequest {
    /// Checks every field before anything is opened or paused.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        check_client_path("path", &self.path)?;
        if let Some(k) = &self.key_file {
            check_client_path("key_file", k)?;
        }
        if let Some(p) = &self.parent {
            check_client_path("parent", p)?;
        }
        if let Some(l) = self.zstd_level {
            if self.codec != CodecChoice::Zstd {
                return Err(SnapshotError::Invalid("zstd_level is only valid with codec zstd".into()));
            }
            if !(-7..=22).contains(&l) {
                return Err(SnapshotError::Invalid(format!("zstd_level {l} is out of range -7..=22")));
            }
        }
        if let Some(d) = self.downtime_ms {
            if d > MAX_DOWNTIME_MS {
                return Err(SnapshotError::Invalid(format!("downtime_ms {d} is larger than {MAX_DOWNTIME_MS}")));
            }
        }
        if let Some(r) = self.max_rounds {
            if r == 0 || r > MAX_ROUNDS_LIMIT {
                return Err(SnapshotError::Invalid(format!("max_rounds {r} is out of range 1..={MAX_ROUNDS_LIMIT}")));
            }
        }
        Ok(())
    }

    fn codec(&self) -> Codec {
        match self.codec {
            CodecChoice::Lz4 => Codec::Lz4,
            CodecChoice::None => Codec::None,
            CodecChoice::Zstd => Codec::Zstd { level: self.zstd_level.unwrap_or(3) },
        }
    }
}

/// Whose fault an image-layer error is when it comes from creating the output.
fn classify_create(e: ferry_image::Error) -> SnapshotError {
    use std::io::ErrorKind as K;
    match &e {
        ferry_image::Error::InvalidArgument(_) => SnapshotError::Invalid(e.to_string()),
        ferry_image::Error::Io { source, .. }
            if matches!(
                source.kind(),
                K::NotFound
                    | K::PermissionDenied
                    | K::IsADirectory
                    | K::NotADirectory
                    | K::ReadOnlyFilesystem
                    | K::InvalidInput
                    | K::InvalidFilename
            ) =>
        {
            SnapshotError::Invalid(e.to_string())
        }
        _ => SnapshotError::Failed(e.to_string()),
    }
}

/// Takes a snapshot of `vm`. `lineage` is the root hash of the newest image
/// the VM's memory follows from; it is updated on success and cleared when
/// the dirty log was consumed by a snapshot that then failed. The caller
/// ([`crate::control::VmController`]) makes sure nothing else pauses or
/// resumes the VM meanwhile.
pub fn take_snapshot(
    vm: &std::sync::Arc<Vm>,
    lineage: &mut Option<Hash32>,
    memory_ready: Option<&crate::LazyCompletion>,
    req: &SnapshotRequest,
) -> Result<SnapshotStats, SnapshotError> {
    req.validate()?;
    let key = match &req.key_file {
        Some(f) => Some(UserKey::from_file(f).map_err(|e| SnapshotError::Invalid(e.to_string()))?),
        None => None,
    };
    if vm.status().state == ferry_vmm::RunState::Stopped {
        return Err(SnapshotError::Conflict("VM has stopped".into()));
    }
    if let Some(ready) = memory_ready {
        if !ready.wait(LAZY_WAIT) {
            return Err(SnapshotError::Conflict(format!(
                "guest memory is still being restored lazily after {} s; try again later",
                LAZY_WAIT.as_secs()
            )));
        }
    }
    let parent = match &req.parent {
        None => None,
        Some(p) => {
            let reader =
                ImageReader::open(p, key.as_ref()).map_err(|e| SnapshotError::Invalid(format!("parent image: {e}")))?;
            if same_file(p, &req.path) {
                return Err(SnapshotError::Invalid(format!(
                    "parent {} is the image being written ({}): the new image would replace its own parent",
                    p.display(),
                    req.path.display()
                )));
            }
            if reader.is_encrypted() && req.key_file.is_none() {
                return Err(SnapshotError::Invalid(format!(
                    "parent {} is encrypted: an incremental image over it must be encrypted too (key_file)",
                    p.display()
                )));
            }
            let root = reader.root_hash();
            match *lineage {
                Some(l) if l == root => {}
                Some(l) => {
                    return Err(SnapshotError::Conflict(format!(
                        "{} (root {root}) is not this VM's last snapshot (root {l}); an incremental image needs the dirty log since its parent",
                        p.display()
                    )))
                }
                None => {
                    return Err(SnapshotError::Conflict(
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
    let opts = WriteOptions { codec: req.codec(), key, ..Default::default() };
    let mut writer = ImageWriter::create(&req.path, input, opts).map_err(classify_create)?;
    let cfg = PrecopyConfig {
        live: req.mode == SnapshotMode::Live,
        max_rounds: req.max_rounds.unwrap_or(DEFAULT_MAX_ROUNDS),
        downtime_target: Duration::from_millis(req.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
        digest: req.digest,
        incremental: parent.is_some(),
        copy_on_write: req.final_phase == FinalPhase::Cow,
        end_paused: false,
        throttle: None,
        require_convergence: false,
        defer_final: false,
    };
    // From here on the dirty log is consumed: the lineage holds only if this succeeds.
    *lineage = None;
    let log = vm.lineage_log().map_err(|e| SnapshotError::Failed(e.to_string()))?;
    let (state, stats) = precopy(vm, &log, &mut writer, &cfg).map_err(|e| SnapshotError::Failed(e.to_string()))?;
    let cpus: Vec<_> = state.vcpus.iter().map(crate::regs::cpu_regs).collect();
    let state_json = serde_json::to_vec(&state).map_err(|e| SnapshotError::Failed(e.to_string()))?;
    let summary =
        writer.finish(&state_json, &cpus).map_err(|e| SnapshotError::Failed(format!("writing image: {e}")))?;
    *lineage = Some(summary.root_hash);
    let ratio = if summary.stored_bytes > 0 { summary.raw_bytes as f64 / summary.stored_bytes as f64 } else { 1.0 };
    Ok(SnapshotStats {
        path: summary.path,
        root_hash: summary.root_hash.to_string(),
        parent: parent.map(|p| p.root_hash.to_string()),
        mode: req.mode,
        total_ms: stats.total_ms,
        pause_ms: stats.pause_ms,
        digest_ms: stats.digest_ms,
        state_ms: stats.state_ms,
        memory_digest: stats.memory_digest,
        rounds: stats.rounds.len(),
        pages_per_round: stats.rounds.iter().map(|r| r.pages).collect(),
        round_details: stats.rounds,
        stop_reason: stats.stop_reason,
        cow: stats.cow,
        cow_fallback: stats.cow_fallback,
        unpopulated_pages_skipped: stats.unpopulated_pages_skipped,
        zero_pages: stats.zero_pages,
        zero_pages_skipped: stats.unpopulated_pages_skipped + summary.zero_pages_skipped,
        data_pages_sent: stats.data_pages_sent,
        bytes_written: summary.bytes_written,
        raw_bytes: summary.raw_bytes,
        stored_bytes: summary.stored_bytes,
        compression_ratio: ratio,
        codec: summary.codec,
        encrypted: summary.encrypted,
        write_secs: summary.elapsed_secs,
        state_bytes: summary.state_bytes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(v: serde_json::Value) -> Result<SnapshotRequest, serde_json::Error> {
        serde_json::from_value(v)
    }

    #[test]
    fn typed_fields_refuse_unknown_names() {
        assert!(req(json!({"path": "/tmp/a", "codec": "gzip"})).is_err());
        assert!(req(json!({"path": "/tmp/a", "mode": "fast"})).is_err());
        assert!(req(json!({"path": "/tmp/a", "bogus": 1})).is_err());
        let r = req(json!({"path": "/tmp/a", "codec": "zstd", "zstd_level": 5, "final_phase": "copy"})).unwrap();
        assert_eq!((r.codec, r.final_phase, r.mode), (CodecChoice::Zstd, FinalPhase::Copy, SnapshotMode::Live));
        assert_eq!("none".parse::<CodecChoice>().unwrap(), CodecChoice::None);
        assert!("lz5".parse::<CodecChoice>().unwrap_err().contains("lz4, zstd or none"));
    }

    #[test]
    fn client_mistakes_are_invalid_requests() {
        for v in [
            json!({"path": ""}),
            json!({"path": "relative.img"}),
            json!({"path": "/tmp/a\u{0}b"}),
            json!({"path": "/tmp/a", "codec": "zstd", "zstd_level": 99}),
            json!({"path": "/tmp/a", "zstd_level": 3}),
            json!({"path": "/tmp/a", "max_rounds": 0}),
            json!({"path": "/tmp/a", "downtime_ms": 1_000_000}),
            json!({"path": "/tmp/a", "key_file": "k"}),
        ] {
            let r = req(v.clone()).unwrap();
            assert!(matches!(r.validate(), Err(SnapshotError::Invalid(_))), "{v}");
        }
        req(json!({"path": "/tmp/a.img"})).unwrap().validate().unwrap();
    }
}
