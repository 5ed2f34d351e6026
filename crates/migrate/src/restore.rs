//! Restoring a VM from an image (or an incremental chain): an incoming
//! migration whose source is a file.

use std::path::Path;
use std::time::{Duration, Instant};

use ferry_image::{ImageChain, RunData, UserKey};
use ferry_vmm::devices::SerialOut;
use ferry_vmm::{Vm, VmState};
use serde::Serialize;

use crate::{Error, Result};

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
}

/// What a restore did.
#[derive(Clone, Debug, Default, Serialize)]
pub struct RestoreStats {
    /// Images in the chain (1 for a full image).
    pub chain_len: usize,
    /// Root hash of the image restored.
    pub root_hash: String,
    /// Bytes of non-zero guest memory written.
    pub data_bytes: u64,
    /// Time to open and check the chain's headers and footers.
    pub open_ms: f64,
    /// Time to fill guest memory.
    pub memory_ms: f64,
    /// Memory fill rate over non-zero bytes.
    pub memory_gb_per_s: f64,
    /// Process start to the vCPUs being ready to run.
    pub ready_ms: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// Opens `path` (following its parents), recreates the VM, fills its memory
/// eagerly, applies the saved state and starts the vCPUs. Nothing runs
/// unless every chunk read checks out.
pub fn restore_from_image(path: &Path, opts: RestoreOptions) -> Result<(Vm, RestoreStats)> {
    let t0 = Instant::now();
    let mut chain = ImageChain::open(path, opts.key)?;
    let state_bytes = chain.state()?;
    let state: VmState = serde_json::from_slice(&state_bytes)
        .map_err(|e| Error::State { where_: path.display().to_string(), source: e })?;
    let ranges = chain.ranges().to_vec();
    let mut stats = RestoreStats {
        chain_len: chain.images().len(),
        root_hash: chain.root_hash().to_string(),
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
    let t_mem = Instant::now();
    let mut data_bytes = 0u64;
    let mut image_error = None;
    let vm = Vm::restore(&state, opts.serial_out, true, opts.process_start, path.display().to_string(), |ram| {
        chain
            .read_runs(|gpa, run| {
                match run {
                    RunData::Data(d) => {
                        data_bytes += d.len() as u64;
                        ram.write(gpa, d).map_err(|e| ferry_image::Error::InvalidArgument(e.to_string()))?;
                    }
                    RunData::Zero { npages } => {
                        let len = npages * 4096;
                        let p = ram.host_range(gpa, len).ok_or_else(|| {
                            ferry_image::Error::InvalidArgument(format!("zero run {gpa:#x}+{len:#x} outside RAM"))
                        })?;
                        // Drop the pages: anonymous memory reads back as zero without being populated.
                        // SAFETY: p..p+len lies inside guest RAM, which no vCPU uses yet.
                        unsafe { libc::madvise(p as *mut libc::c_void, len as usize, libc::MADV_DONTNEED) };
                    }
                }
                Ok(())
            })
            .map_err(|e| {
                let msg = format!("reading memory of {}: {e}", path.display());
                image_error = Some(e);
                ferry_vmm::Error::BadState(msg)
            })
    });
    let vm = match (vm, image_error) {
        (_, Some(e)) => return Err(Error::Image(e)),
        (v, None) => v?,
    };
    // Track writes from the first guest instruction on, so the next
    // snapshot of this VM can be incremental over the image it came from.
    vm.set_dirty_logging(true)?;
    vm.take_dirty_log()?;
    if !opts.paused {
        vm.resume()?;
    }
    stats.data_bytes = data_bytes;
    stats.memory_ms = ms(t_mem.elapsed());
    stats.memory_gb_per_s = data_bytes as f64 / t_mem.elapsed().as_secs_f64().max(1e-9) / 1e9;
    stats.ready_ms = ms(opts.process_start.elapsed());
    Ok((vm, stats))
}
