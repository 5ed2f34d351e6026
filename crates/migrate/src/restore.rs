//! Restoring a VM from an image (or an incremental chain): an incoming
//! migration whose source is a file.
//!
//! Two memory modes:
//! - **eager**: every page whose final contents are data is written before
//!   the first guest instruction, by several threads at once (each with its
//!   own chain handle, each chunk's final pages written exactly once);
//! - **lazy**: the vCPUs start at once on empty memory registered with
//!   userfaultfd; pages arrive on first touch and a background thread
//!   prefetches the rest (see [`crate::lazy`]).

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_image::{Hash32, ImageChain, UserKey};
use ferry_vmm::devices::SerialOut;
use ferry_vmm::memory::GuestRam;
use ferry_vmm::uffd::{self, Uffd};
use ferry_vmm::{Vm, VmState};
use serde::Serialize;

use crate::lazy::LazyRestore;
use crate::{Error, Result};

const PAGE: u64 = 4096;
/// Extents at least this long are pre-faulted with `MADV_POPULATE_WRITE`
/// before they are copied (one kernel call instead of a fault per page).
const POPULATE_MIN: usize = 64 << 10;

/// How guest memory is brought in.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum MemoryMode {
    /// Read everything, then run.
    #[default]
    Eager,
    /// Run at once; pages arrive on first touch (userfaultfd) and by a background prefetch.
    Lazy,
}

impl std::fmt::Display for MemoryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            MemoryMode::Eager => "eager",
            MemoryMode::Lazy => "lazy",
        })
    }
}

/// How to restore.
pub struct RestoreOptions<'a> {
    /// Key for encrypted images.
    pub key: Option<&'a UserKey>,
    /// Leave the vCPUs paused (e.g. to compare the memory digest first).
    pub paused: bool,
    /// Serial output of the restored guest.
    pub serial_out: SerialOut,
    /// Anchor for the timings (process start).
    pub process_start: Instant,
    /// Eager or lazy memory.
    pub memory: MemoryMode,
}

/// What a restore did (up to the first guest instruction; the lazy mode's
/// later figures are in [`crate::lazy::LazyStats`]).
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreStats {
    /// Eager or lazy.
    pub memory_mode: MemoryMode,
    /// Images in the chain (1 for a full image).
    pub chain_len: usize,
    /// Root hash of the image restored.
    pub root_hash: String,
    /// Bytes of guest memory written before the first instruction: the
    /// pages whose final contents are data (eager); 0 for lazy.
    pub data_bytes: u64,
    /// Threads that wrote guest memory (eager).
    pub fill_threads: usize,
    /// Eager pages were put in place with `UFFDIO_COPY` (else copied
    /// through the mapping, when userfaultfd is unavailable).
    pub fill_uffd: bool,
    /// Time to open and check the chain's headers and footers.
    pub open_ms: f64,
    /// Time to fill guest memory (eager), or to register it with
    /// userfaultfd and start the fault and prefetch threads (lazy).
    pub memory_ms: f64,
    /// Memory fill rate over `data_bytes` (eager).
    pub memory_gb_per_s: f64,
    /// Process start to the vCPUs being ready to run.
    pub ready_ms: f64,
    /// Process start to the vCPUs being let into the guest (time to first
    /// guest instruction); `None` for a paused restore, whose guest runs
    /// when it is resumed.
    pub first_instruction_ms: Option<f64>,
}

/// A restored VM.
pub struct Restored {
    /// The VM (running, or paused if asked).
    pub vm: Arc<Vm>,
    /// Figures up to the first guest instruction.
    pub stats: RestoreStats,
    /// The fault and prefetch threads of a lazy restore: keep this alive as
    /// long as the VM runs, then call [`LazyRestore::finish`].
    pub lazy: Option<LazyRestore>,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Opens `path` (following its parents), recreates the VM, brings its memory
/// in (`opts.memory`), applies the saved state and starts the vCPUs.
///
/// Eager: nothing runs unless every chunk checks out. Lazy: the headers,
/// footers and state are checked before anything runs; a chunk found
/// corrupt later stops the VM with that error (see [`crate::lazy`]).
pub fn restore_from_image(path: &Path, opts: RestoreOptions) -> Result<Restored> {
    let t0 = Instant::now();
    let mut chain = ImageChain::open(path, opts.key)?;
    let state_bytes = chain.state()?;
    let state: VmState = serde_json::from_slice(&state_bytes)
        .map_err(|e| Error::State { where_: path.display().to_string(), source: e })?;
    let ranges = chain.ranges().to_vec();
    let root = chain.root_hash();
    let mut stats = RestoreStats {
        memory_mode: opts.memory,
        chain_len: chain.images().len(),
        root_hash: root.to_string(),
        open_ms: ms(t0.elapsed()),
        ..Default::default()
    };
    let expected: Vec<(u64, u64)> = ferry_vmm::layout::ram_ranges(state.mem_bytes);
    let got: Vec<(u64, u64)> = ranges.iter().map(|r| (r.start, r.len)).collect();
    if expected != got {
        return Err(Error::Mismatch(format!(
            "{}: RAM ranges {got:x?} do not match the {} bytes the VM state declares",
            path.display(),
            state.mem_bytes
        )));
    }
    let mut fill_error: Option<Error> = None;
    let mut lazy: Option<LazyRestore> = None;
    let mut fill_time = Duration::ZERO;
    let vm = Vm::restore(&state, opts.serial_out, true, opts.process_start, path.display().to_string(), |ram| {
        let t = Instant::now();
        let r = match opts.memory {
            MemoryMode::Eager => {
                let threads = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1).clamp(1, 4);
                stats.fill_threads = threads;
                fill_eager(chain, path, opts.key, root, ram, threads).map(|(b, u)| {
                    stats.data_bytes = b;
                    stats.fill_uffd = u;
                })
            }
            MemoryMode::Lazy => {
                LazyRestore::start(chain, path, opts.key, ram, opts.process_start).map(|l| lazy = Some(l))
            }
        };
        fill_time = t.elapsed();
        r.map_err(|e| {
            let msg = format!("bringing in the memory of {}: {e}", path.display());
            fill_error = Some(e);
            ferry_vmm::Error::BadState(msg)
        })
    });
    let vm = match (vm, fill_error) {
        (_, Some(e)) => return Err(e),
        (v, None) => Arc::new(v?),
    };
    // A lazy restore may already have failed (anything that touched guest
    // RAM while the VM was built was served by its fault handler); once the
    // VM is attached, a failure stops it. Either way, report that failure.
    let lazy_failed = |lazy: &Option<LazyRestore>| {
        let what = lazy.as_ref().and_then(LazyRestore::error)?;
        vm.stop(ferry_vmm::vm::ExitReason::ShutdownForced);
        vm.wait();
        Some(Error::Lazy { path: path.display().to_string(), what })
    };
    if let Some(e) = lazy_failed(&lazy) {
        return Err(e);
    }
    if let Some(l) = &lazy {
        l.attach(&vm);
    }
    let mut start = || -> Result<()> {
        // Vm::restore creates the memory slots with dirty logging on, so the
        // next snapshot of this VM can be incremental over the image it came
        // from; clear whatever the fill may have left in the log.
        vm.lineage_log()?.reset()?;
        stats.ready_ms = ms(opts.process_start.elapsed());
        if !opts.paused {
            vm.resume()?;
            stats.first_instruction_ms = Some(ms(opts.process_start.elapsed()));
        }
        Ok(())
    };
    if let Err(e) = start() {
        return Err(lazy_failed(&lazy).unwrap_or(e));
    }
    if let Some(l) = &lazy {
        l.start_prefetch();
    }
    stats.memory_ms = ms(fill_time);
    stats.memory_gb_per_s = stats.data_bytes as f64 / fill_time.as_secs_f64().max(1e-9) / 1e9;
    Ok(Restored { vm, stats, lazy })
}

/// Writes every page whose final contents are data, on `threads` threads
/// that take chunks in turn (each with its own chain handle). Chunks' final
/// extents are disjoint, so the order does not matter. Every chunk is
/// checked. Returns the bytes written and whether userfaultfd was used.
///
/// The pages are put in place with `UFFDIO_COPY` when userfaultfd is
/// available: the kernel allocates and fills each page in one call per
/// extent, where writing through the mapping costs a page fault per page
/// (several microseconds each when the host is itself a VM). Nothing
/// touches guest RAM meanwhile (no vCPU exists yet), and RAM is
/// unregistered before returning.
fn fill_eager(
    chain: ImageChain,
    path: &Path,
    key: Option<&UserKey>,
    root: Hash32,
    ram: &GuestRam,
    threads: usize,
) -> Result<(u64, bool)> {
    let uffd = Uffd::new(0).ok().filter(|u| {
        let ok = ram.regions().iter().all(|r| u.register(r.host as u64, r.len, uffd::MODE_MISSING).is_ok());
        if !ok {
            for r in ram.regions() {
                let _ = u.unregister(r.host as u64, r.len);
            }
        }
        ok
    });
    let n = chain.chunk_count();
    let next = AtomicUsize::new(0);
    let stop = AtomicBool::new(false);
    let bytes = AtomicU64::new(0);
    let first_error: Mutex<Option<Error>> = Mutex::new(None);
    let work = |mut chain: ImageChain| {
        let mut local = 0u64;
        let r = (|| -> Result<()> {
            while !stop.load(Ordering::Relaxed) {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    break;
                }
                chain.read_final_chunk(i, |gpa, d| {
                    write_ram(ram, uffd.as_ref(), gpa, d)?;
                    local += d.len() as u64;
                    Ok(())
                })?;
            }
            Ok(())
        })();
        bytes.fetch_add(local, Ordering::Relaxed);
        if let Err(e) = r {
            stop.store(true, Ordering::Relaxed);
            first_error.lock().unwrap().get_or_insert(e);
        }
    };
    std::thread::scope(|s| {
        for t in 1..threads.min(n.max(1)) {
            let (work, stop, first_error) = (&work, &stop, &first_error);
            // If a thread cannot be spawned, fewer threads take all the chunks: still correct.
            let _ =
                std::thread::Builder::new().name(format!("restore-fill{t}")).spawn_scoped(s, move || {
                    match open_twin(path, key, root) {
                        Ok(c) => work(c),
                        Err(e) => {
                            stop.store(true, Ordering::Relaxed);
                            first_error.lock().unwrap().get_or_insert(e);
                        }
                    }
                });
        }
        work(chain);
    });
    if let Some(u) = &uffd {
        for r in ram.regions() {
            let _ = u.unregister(r.host as u64, r.len);
        }
    }
    if let Some(e) = first_error.into_inner().unwrap() {
        return Err(e);
    }
    Ok((bytes.into_inner(), uffd.is_some()))
}

/// Opens another handle on the chain at `path` and checks it is the same chain.
pub(crate) fn open_twin(path: &Path, key: Option<&UserKey>, root: Hash32) -> Result<ImageChain> {
    let c = ImageChain::open(path, key)?;
    if c.root_hash() != root {
        return Err(Error::Mismatch(format!(
            "{} changed while it was being restored (root hash {} became {})",
            path.display(),
            root,
            c.root_hash()
        )));
    }
    Ok(c)
}

/// Puts `data` into guest RAM at `gpa`: with `UFFDIO_COPY` when RAM is
/// registered with `uffd`, else by copying (pre-faulting long extents).
fn write_ram(ram: &GuestRam, uffd: Option<&Uffd>, gpa: u64, data: &[u8]) -> ferry_image::Result<()> {
    let len = data.len() as u64;
    let p = ram.host_range(gpa, len).ok_or_else(|| {
        ferry_image::Error::InvalidArgument(format!("data at {gpa:#x}+{len:#x} lies outside guest RAM"))
    })?;
    if let Some(u) = uffd {
        return u.copy(p as u64, data).map_err(|e| {
            ferry_image::Error::InvalidArgument(format!("filling guest memory at {gpa:#x}+{len:#x}: {e}"))
        });
    }
    if data.len() >= POPULATE_MIN && (p as u64).is_multiple_of(PAGE) {
        // Best effort: older kernels lack it, and the copy below faults the pages in anyway.
        // SAFETY: p..p+len lies inside guest RAM, which no vCPU uses yet.
        unsafe { libc::madvise(p as *mut libc::c_void, data.len(), libc::MADV_POPULATE_WRITE) };
    }
    // SAFETY: bounds checked above; each page is written by exactly one thread.
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), p, data.len()) };
    Ok(())
}
