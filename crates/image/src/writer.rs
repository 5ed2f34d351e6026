//! `ImageWriter`: streams page runs from pre-copy rounds into an image file.
//!
//! Usage: `create`, then any number of `write_pages` / `write_zero` calls in
//! round order (a page written again later overrides its earlier contents),
//! then `finish` with the serialised VM state and the CPU registers. The file
//! appears at its path only when `finish` succeeds (temp file, fsync, rename,
//! fsync of the directory); dropping the writer removes the temp file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::codec::Encoder;
use crate::crypto::{random_bytes, DataKey, NonceKind, UserKey};
use crate::error::{Error, Result};
use crate::export::CpuRegs;
use crate::footer::{Footer, SectionLoc, Trailer};
use crate::hash::{to_hex, Hash32, RootHasher};
use crate::header::{
    encode_header, validate_ranges, Codec, ImageHeader, ImageHeaderInput, DEFAULT_CHUNK_SIZE, FORMAT_VERSION,
    MAX_CHUNK_SIZE, PAGE_SIZE,
};
use crate::layout::{Bitmap, Layout};
use crate::pipeline::{BufPool, Output, Pipeline, PipelineConfig};
use crate::record::{encode_section, ChunkJob, PageRun, RunKind, CPUS_MAGIC, MAX_RUNS_PER_CHUNK, STATE_MAGIC};

const PAGE: usize = PAGE_SIZE as usize;

/// How to write an image.
#[derive(Clone, Debug)]
pub struct WriteOptions {
    /// Chunk compression (default lz4).
    pub codec: Codec,
    /// Uncompressed data bytes per chunk (multiple of 4096, at most 64 MiB; default 1 MiB).
    pub chunk_size: u32,
    /// Encrypt chunks and sections with a data key wrapped by this key.
    pub key: Option<UserKey>,
    /// Encoder threads; 0 means one per available core.
    pub threads: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions { codec: Codec::Lz4, chunk_size: DEFAULT_CHUNK_SIZE, key: None, threads: 0 }
    }
}

/// What a finished write produced; the figures a user compares between runs.
#[derive(Clone, Debug, Serialize)]
pub struct ImageSummary {
    /// Final path of the image (`None` when written to a stream).
    pub path: Option<PathBuf>,
    /// Root hash naming the image (children record it as their parent).
    pub root_hash: Hash32,
    /// Size of the image file.
    pub bytes_written: u64,
    /// Chunk records written.
    pub chunks: u64,
    /// Chunks stored uncompressed because compression did not help.
    pub raw_chunks: u64,
    /// Data pages stored (a page written in several rounds counts each time).
    pub pages_stored: u64,
    /// Zero pages recorded as zero runs (they override earlier data).
    pub zero_pages_recorded: u64,
    /// Zero pages not recorded at all (never held data in this full image).
    pub zero_pages_skipped: u64,
    /// Uncompressed bytes of the stored data pages.
    pub raw_bytes: u64,
    /// Bytes of chunk payloads as stored (compressed, plus GCM tags when encrypted).
    pub stored_bytes: u64,
    /// Bytes of the VM state given to `finish` (uncompressed).
    pub state_bytes: u64,
    /// Codec requested.
    pub codec: Codec,
    /// Whether the image is encrypted.
    pub encrypted: bool,
    /// Wall time from `create` to the end of `finish`.
    pub elapsed_secs: f64,
}

/// Streams guest memory into a new image file (or any byte stream). `Send`, so
/// a pre-copy engine can feed it from any thread.
pub struct ImageWriter {
    /// Final path and temp path; `None` when writing to a stream.
    paths: Option<(PathBuf, PathBuf)>,
    /// What errors name: the temp path, or `<stream>`.
    name: PathBuf,
    header: ImageHeader,
    header_hash: Hash32,
    chunk_size: usize,
    key: Option<Arc<DataKey>>,
    layout: Layout,
    /// Pages that hold data in this image so far; `None` for incremental images,
    /// where a zero page must always be recorded to override the parent.
    has_data: Option<Bitmap>,
    runs: Vec<PageRun>,
    data: Vec<u8>,
    next_index: u32,
    pipeline: Option<Pipeline>,
    pool: Arc<BufPool>,
    pages_stored: u64,
    zero_recorded: u64,
    zero_skipped: u64,
    started: Instant,
    finished: bool,
}

/// Checks the caller's layout and options before anything is created.
fn check_options(input: &ImageHeaderInput, opts: &WriteOptions) -> Result<()> {
    validate_ranges(&input.ranges).map_err(|r| Error::InvalidArgument(format!("RAM ranges: {r}")))?;
    if opts.chunk_size == 0 || opts.chunk_size as u64 % PAGE_SIZE != 0 || opts.chunk_size > MAX_CHUNK_SIZE {
        return Err(Error::InvalidArgument(format!(
            "chunk size {} must be a non-zero multiple of 4096 up to {MAX_CHUNK_SIZE}",
            opts.chunk_size
        )));
    }
    if let Codec::Zstd { level } = opts.codec {
        if !(-7..=22).contains(&level) {
            return Err(Error::InvalidArgument(format!("zstd level {level} out of range -7..=22")));
        }
    }
    Ok(())
}

/// Filesystems where an image never belongs: writing there changes kernel
/// state or fails in confusing ways (procfs, sysfs, cgroupfs, debugfs...).
const PSEUDO_FS: &[(i64, &str)] = &[
    (0x9fa0, "procfs"),
    (0x6265_6572, "sysfs"),
    (0x27e0eb, "cgroupfs"),
    (0x6367_7270, "cgroup2"),
    (0x6462_6720, "debugfs"),
    (0x7472_6163, "tracefs"),
    (0x7363_6673, "securityfs"),
    (0xcafe_4a11, "bpffs"),
];

/// Checks that `path` names a place where an image may be written: a name
/// that is not `/`, `.` or `..`, no NUL byte, an existing directory that is
/// not a kernel pseudo filesystem, and either nothing at the path yet or a
/// regular file (never a device, FIFO, socket, directory or symbolic link:
/// the final rename would replace it, which turned `/dev/null` into a file).
pub fn check_output_path(path: &Path) -> Result<()> {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::FileTypeExt;
    let bad = |why: String| Err(Error::InvalidArgument(format!("image path {:?}: {why}", path.display().to_string())));
    let bytes = path.as_os_str().as_bytes();
    if bytes.is_empty() {
        return bad("empty path".into());
    }
    if bytes.contains(&0) {
        return bad("contains a NUL byte".into());
    }
    let Some(_) = path.file_name() else {
        return bad("names a directory, not a file".into());
    };
    if bytes.ends_with(b"/") {
        return bad("ends with '/': names a directory, not a file".into());
    }
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    match std::fs::metadata(dir) {
        Ok(m) if m.is_dir() => {}
        Ok(_) => return bad(format!("{} is not a directory", dir.display())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return bad(format!("directory {} does not exist", dir.display()))
        }
        Err(e) => return bad(format!("directory {}: {e}", dir.display())),
    }
    if let Ok(c) = std::ffi::CString::new(dir.as_os_str().as_bytes()) {
        // SAFETY: c is a valid NUL-terminated path and st a writable statfs.
        let mut st: libc::statfs = unsafe { std::mem::zeroed() };
        if unsafe { libc::statfs(c.as_ptr(), &mut st) } == 0 {
            let ty = st.f_type as i64;
            if let Some((_, name)) = PSEUDO_FS.iter().find(|(m, _)| *m == ty) {
                return bad(format!("{} is on {name}, a kernel pseudo filesystem", dir.display()));
            }
        }
    }
    match std::fs::symlink_metadata(path) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => bad(e.to_string()),
        Ok(m) => {
            let t = m.file_type();
            let kind = if t.is_file() {
                return Ok(());
            } else if t.is_symlink() {
                "a symbolic link"
            } else if t.is_dir() {
                "a directory"
            } else if t.is_char_device() {
                "a character device"
            } else if t.is_block_device() {
                "a block device"
            } else if t.is_fifo() {
                "a FIFO"
            } else if t.is_socket() {
                "a socket"
            } else {
                "not a regular file"
            };
            bad(format!("is {kind}; an image is written only to a regular file, so it is left alone"))
        }
    }
}

/// Per-process counter making temp names unique when one process writes the same path twice.
static TMP_SEQ: AtomicU64 = AtomicU64::new(0);

/// True when a page is all zero; OR-folds 64-bit words so the compiler vectorises it.
pub(crate) fn is_zero_page(p: &[u8]) -> bool {
    let mut acc = 0u64;
    for c in p.chunks_exact(64) {
        for w in c.chunks_exact(8) {
            acc |= u64::from_ne_bytes(w.try_into().expect("8 bytes"));
        }
        if acc != 0 {
            return false;
        }
    }
    acc == 0
}

/// Removes `<path>.tmp-<pid>-<n>` files left by a writer process that no
/// longer exists (killed mid-snapshot: nothing runs its Drop). A temp file
/// of a live process, ours included, is left alone, so two writers of one
/// path never delete each other's work. Best effort: errors are ignored.
fn remove_stale_temps(path: &Path) {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else { return };
    let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
    let prefix = format!("{name}.tmp-");
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries.flatten() {
        let file_name = e.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(prefix.as_str())) else { continue };
        let Some((pid, seq)) = rest.split_once('-') else { continue };
        let (Ok(pid), Ok(_)) = (pid.parse::<u32>(), seq.parse::<u64>()) else { continue };
        if pid != std::process::id() && !Path::new("/proc").join(pid.to_string()).exists() {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

impl ImageWriter {
    /// Creates `<path>.tmp-<pid>-<n>` (first removing such files of writers
    /// that died), writes the header and starts the encoder
    /// threads. The image appears at `path` only when `finish` succeeds.
    pub fn create(path: &Path, input: ImageHeaderInput, opts: WriteOptions) -> Result<Self> {
        let started = Instant::now();
        check_options(&input, &opts)?;
        check_output_path(path)?;
        let file_name = path
            .file_name()
            .ok_or_else(|| Error::InvalidArgument(format!("image path {} has no file name", path.display())))?;
        let mut tmp_name = file_name.to_os_string();
        tmp_name.push(format!(".tmp-{}-{}", std::process::id(), TMP_SEQ.fetch_add(1, Ordering::Relaxed)));
        let tmp_path = path.with_file_name(tmp_name);
        remove_stale_temps(path);
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp_path)
            .map_err(|e| Error::io("create temporary image file", &tmp_path, e))?;
        Self::start(Some((path.to_path_buf(), tmp_path)), Output::File(file), input, opts, started)
    }

    /// Writes the image as one sequential byte stream to `out` (a socket, a
    /// pipe, `std::io::sink()`): the same bytes as a file, with no temp file,
    /// fsync or rename. A reader needs the complete stream saved to a file.
    pub fn create_stream(out: Box<dyn Write + Send>, input: ImageHeaderInput, opts: WriteOptions) -> Result<Self> {
        let started = Instant::now();
        check_options(&input, &opts)?;
        Self::start(None, Output::Stream(out), input, opts, started)
    }

    /// Common part of `create` and `create_stream`: header, key, threads.
    fn start(
        paths: Option<(PathBuf, PathBuf)>,
        out: Output,
        input: ImageHeaderInput,
        opts: WriteOptions,
        started: Instant,
    ) -> Result<Self> {
        let name = paths.as_ref().map(|p| p.1.clone()).unwrap_or_else(|| PathBuf::from("<stream>"));
        let mut w = ImageWriter {
            paths,
            name: name.clone(),
            header: ImageHeader {
                format_version: FORMAT_VERSION,
                page_size: PAGE_SIZE,
                ranges: Vec::new(),
                codec: opts.codec,
                chunk_size: opts.chunk_size,
                encryption: None,
                parent: None,
                image_id: String::new(),
                created_unix_secs: 0,
                vm_config: serde_json::Value::Null,
            },
            header_hash: Hash32::default(),
            chunk_size: opts.chunk_size as usize,
            key: None,
            layout: Layout::new(&[]),
            has_data: None,
            runs: Vec::new(),
            data: Vec::new(),
            next_index: 0,
            pipeline: None,
            pool: Arc::new(BufPool::new(0)),
            pages_stored: 0,
            zero_recorded: 0,
            zero_skipped: 0,
            started,
            finished: false,
        };
        // From here on the writer exists, so Drop removes the temp file on any error.
        w.init(out, input, opts)?;
        Ok(w)
    }

    /// Fills in the header, writes it and starts the pipeline.
    fn init(&mut self, out: Output, input: ImageHeaderInput, opts: WriteOptions) -> Result<()> {
        let name = self.name.clone();
        let encode_err = |what, reason| Error::Encode { path: name.clone(), what, reason };
        let (key, encryption) = match &opts.key {
            Some(k) => {
                let (dk, params) = DataKey::generate(k).map_err(|r| encode_err("data key", r))?;
                (Some(Arc::new(dk)), Some(params))
            }
            None => (None, None),
        };
        let mut id = [0u8; 16];
        random_bytes(&mut id).map_err(|r| encode_err("image id", r))?;
        let header = ImageHeader {
            format_version: FORMAT_VERSION,
            page_size: PAGE_SIZE,
            ranges: input.ranges,
            codec: opts.codec,
            chunk_size: opts.chunk_size,
            encryption,
            parent: input.parent,
            image_id: to_hex(&id),
            created_unix_secs: SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0),
            vm_config: input.vm_config,
        };
        let (header_bytes, header_hash) = encode_header(&header).map_err(|r| encode_err("header", r))?;
        let layout = Layout::new(&header.ranges);
        let threads = if opts.threads == 0 {
            std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
        } else {
            opts.threads
        };
        let pool = Arc::new(BufPool::new(threads * 6 + 8));
        self.has_data = header.parent.is_none().then(|| Bitmap::new(layout.total_pages()));
        self.layout = layout;
        self.header = header;
        self.header_hash = header_hash;
        self.key = key;
        self.pool = Arc::clone(&pool);
        let mut file = BufWriter::with_capacity(256 << 10, out);
        file.write_all(&header_bytes).map_err(|e| Error::io("write header to", &name, e))?;
        self.pipeline = Some(Pipeline::start(PipelineConfig {
            threads,
            codec: self.header.codec,
            key: self.key.clone(),
            header_hash,
            file,
            offset: header_bytes.len() as u64,
            root: RootHasher::new(&header_hash),
            path: name,
            pool,
        })?);
        self.data = self.pool.get(self.data_capacity());
        Ok(())
    }

    /// The header as it will be stored.
    pub fn header(&self) -> &ImageHeader {
        &self.header
    }

    /// Hash of the header bytes (bound into every encrypted record).
    pub fn header_hash(&self) -> Hash32 {
        self.header_hash
    }

    /// Capacity a chunk data buffer needs (room for the GCM tag so sealing never reallocates).
    fn data_capacity(&self) -> usize {
        self.chunk_size + crate::crypto::TAG_LEN
    }

    /// Records a contiguous run of guest pages starting at `gpa`. `data.len()`
    /// must be a multiple of 4096; all-zero pages are detected here and not
    /// stored. A later write of the same page wins.
    pub fn write_pages(&mut self, gpa: u64, data: &[u8]) -> Result<()> {
        if gpa % PAGE_SIZE != 0 || data.len() % PAGE != 0 {
            return Err(Error::InvalidArgument(format!(
                "write_pages({gpa:#x}, {} bytes): address and length must be multiples of 4096",
                data.len()
            )));
        }
        let npages = (data.len() / PAGE) as u64;
        let segs = self.layout.segments(gpa, npages)?;
        let mut off = 0usize;
        for s in segs {
            let bytes = &data[off..off + s.npages as usize * PAGE];
            off += bytes.len();
            let n = s.npages as usize;
            let mut p = 0;
            while p < n {
                let zero = is_zero_page(&bytes[p * PAGE..(p + 1) * PAGE]);
                let mut q = p + 1;
                while q < n && is_zero_page(&bytes[q * PAGE..(q + 1) * PAGE]) == zero {
                    q += 1;
                }
                let run_gpa = s.gpa + (p * PAGE) as u64;
                let index = s.index + p as u64;
                if zero {
                    self.zero_pages(run_gpa, index, (q - p) as u64)?;
                } else {
                    self.data_pages(run_gpa, index, &bytes[p * PAGE..q * PAGE])?;
                }
                p = q;
            }
        }
        Ok(())
    }

    /// Records that `npages` pages from `gpa` are now all zero (overriding earlier rounds).
    pub fn write_zero(&mut self, gpa: u64, npages: u64) -> Result<()> {
        if gpa % PAGE_SIZE != 0 {
            return Err(Error::InvalidArgument(format!(
                "write_zero({gpa:#x}, {npages}): address must be a multiple of 4096"
            )));
        }
        for s in self.layout.segments(gpa, npages)? {
            self.zero_pages(s.gpa, s.index, s.npages)?;
        }
        Ok(())
    }

    /// Appends data pages (inside one RAM range) to the current chunk, flushing full chunks.
    fn data_pages(&mut self, mut gpa: u64, index: u64, mut bytes: &[u8]) -> Result<()> {
        if let Some(b) = &mut self.has_data {
            b.set_range(index, (bytes.len() / PAGE) as u64, true);
        }
        self.pages_stored += (bytes.len() / PAGE) as u64;
        while !bytes.is_empty() {
            let room = self.chunk_size - self.data.len();
            let take = room.min(bytes.len());
            let n = (take / PAGE) as u32;
            self.push_run(gpa, n, RunKind::Data);
            self.data.extend_from_slice(&bytes[..take]);
            bytes = &bytes[take..];
            gpa += take as u64;
            if self.data.len() >= self.chunk_size || self.runs.len() >= MAX_RUNS_PER_CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Records zero pages (inside one RAM range); in a full image only pages that
    /// held data earlier need a record, the rest are zero by absence.
    fn zero_pages(&mut self, gpa: u64, index: u64, npages: u64) -> Result<()> {
        let Some(bm) = &mut self.has_data else {
            return self.push_zero(gpa, npages);
        };
        // Collect the sub-runs that held data, then record them.
        let mut subruns = Vec::new();
        let mut p = 0;
        while p < npages {
            let set = bm.get(index + p);
            let mut q = p + 1;
            while q < npages && bm.get(index + q) == set {
                q += 1;
            }
            if set {
                bm.set_range(index + p, q - p, false);
                subruns.push((gpa + p * PAGE_SIZE, q - p));
            } else {
                self.zero_skipped += q - p;
            }
            p = q;
        }
        for (g, n) in subruns {
            self.push_zero(g, n)?;
        }
        Ok(())
    }

    /// Appends a zero run, splitting at the u32 page-count limit.
    fn push_zero(&mut self, mut gpa: u64, mut npages: u64) -> Result<()> {
        self.zero_recorded += npages;
        while npages > 0 {
            let n = npages.min(u64::from(u32::MAX)) as u32;
            self.push_run(gpa, n, RunKind::Zero);
            gpa += u64::from(n) * PAGE_SIZE;
            npages -= u64::from(n);
            if self.runs.len() >= MAX_RUNS_PER_CHUNK {
                self.flush()?;
            }
        }
        Ok(())
    }

    /// Adds a run to the current chunk, merging with the previous one when contiguous.
    fn push_run(&mut self, gpa: u64, npages: u32, kind: RunKind) {
        if let Some(last) = self.runs.last_mut() {
            if last.kind == kind && last.end() == gpa {
                if let Some(n) = last.npages.checked_add(npages) {
                    last.npages = n;
                    return;
                }
            }
        }
        self.runs.push(PageRun { gpa, npages, kind });
    }

    /// Hands the current chunk to the encoder threads.
    fn flush(&mut self) -> Result<()> {
        if self.runs.is_empty() {
            return Ok(());
        }
        let cap = self.data_capacity();
        let pipeline = self
            .pipeline
            .as_mut()
            .ok_or_else(|| Error::Worker { path: self.name.clone(), reason: "writer already failed".into() })?;
        let data = std::mem::replace(&mut self.data, pipeline.pool().get(cap));
        let job = ChunkJob { index: self.next_index, runs: std::mem::take(&mut self.runs), data };
        self.next_index = self
            .next_index
            .checked_add(1)
            .ok_or_else(|| Error::InvalidArgument("more than 2^32 chunks in one image".into()))?;
        let r = pipeline.submit(job);
        if r.is_err() {
            self.pipeline = None;
        }
        r
    }

    /// Writes the last chunk, the VM state, the CPU registers, the footer and
    /// the trailer, makes the file durable and renames it into place.
    pub fn finish(mut self, state: &[u8], cpus: &[CpuRegs]) -> Result<ImageSummary> {
        self.flush()?;
        let mut pipeline = self
            .pipeline
            .take()
            .ok_or_else(|| Error::Worker { path: self.name.clone(), reason: "writer already failed".into() })?;
        let io = pipeline.finish()?;
        drop(pipeline);
        let tmp = self.name.clone();
        let mut file = io.file;
        let mut offset = io.offset;
        let enc_err = |what, reason| Error::Encode { path: tmp.clone(), what, reason };
        let mut enc = Encoder::new(self.header.codec).map_err(|r| enc_err("state section", r))?;
        let key = self.key.as_deref();
        let (state_rec, state_hash) =
            encode_section(STATE_MAGIC, NonceKind::State, state, &mut enc, key, &self.header_hash)
                .map_err(|r| enc_err("state section", r))?;
        let cpus_json = serde_json::to_vec(cpus).map_err(|e| enc_err("cpus section", e.to_string()))?;
        let (cpus_rec, cpus_hash) =
            encode_section(CPUS_MAGIC, NonceKind::Cpus, &cpus_json, &mut enc, key, &self.header_hash)
                .map_err(|r| enc_err("cpus section", r))?;
        let werr = |e| Error::io("write to", &tmp, e);
        file.write_all(&state_rec).map_err(werr)?;
        let state_loc = SectionLoc { offset, len: state_rec.len() as u64, hash: state_hash };
        offset += state_rec.len() as u64;
        file.write_all(&cpus_rec).map_err(werr)?;
        let cpus_loc = SectionLoc { offset, len: cpus_rec.len() as u64, hash: cpus_hash };
        offset += cpus_rec.len() as u64;

        let root = io.root.finish(&state_hash, &cpus_hash);
        let root_tag = key.map(|k| k.root_tag(&root)).unwrap_or_default();
        let chunks = io.entries.len() as u64;
        let footer = Footer {
            header_hash: self.header_hash,
            chunks: io.entries,
            state: state_loc,
            cpus: cpus_loc,
            root,
            root_tag,
        }
        .encode();
        let trailer =
            Trailer { footer_offset: offset, footer_len: footer.len() as u64, footer_hash: Hash32::of(&footer) };
        file.write_all(&footer).map_err(werr)?;
        file.write_all(&trailer.encode()).map_err(werr)?;
        offset += footer.len() as u64 + crate::footer::TRAILER_LEN as u64;
        match file.into_inner().map_err(|e| Error::io("write to", &tmp, e.into_error()))? {
            Output::File(f) => {
                f.sync_all().map_err(|e| Error::io("fsync", &tmp, e))?;
                drop(f);
                if let Some((path, tmp_path)) = &self.paths {
                    std::fs::rename(tmp_path, path)
                        .map_err(|e| Error::io("rename temporary file into place", tmp_path, e))?;
                    self.finished = true;
                    sync_dir(path)?;
                }
            }
            Output::Stream(mut s) => s.flush().map_err(|e| Error::io("flush", &tmp, e))?,
        }
        self.finished = true;
        Ok(ImageSummary {
            path: self.paths.as_ref().map(|p| p.0.clone()),
            root_hash: root,
            bytes_written: offset,
            chunks,
            raw_chunks: io.raw_chunks,
            pages_stored: self.pages_stored,
            zero_pages_recorded: self.zero_recorded,
            zero_pages_skipped: self.zero_skipped,
            raw_bytes: self.pages_stored * PAGE_SIZE,
            stored_bytes: io.stored_bytes,
            state_bytes: state.len() as u64,
            codec: self.header.codec,
            encrypted: self.key.is_some(),
            elapsed_secs: self.started.elapsed().as_secs_f64(),
        })
    }
}

/// fsyncs the directory holding `path`, so the rename itself survives a crash.
fn sync_dir(path: &Path) -> Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let d = File::open(&dir).map_err(|e| Error::io("open directory for fsync", &dir, e))?;
    d.sync_all().map_err(|e| Error::io("fsync directory", &dir, e))
}

impl Drop for ImageWriter {
    fn drop(&mut self) {
        if !self.finished {
            // Stop the threads first so nothing writes to the file we remove.
            self.pipeline = None;
            if let Some((_, tmp)) = &self.paths {
                let _ = std::fs::remove_file(tmp);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_detection() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero_page(&p));
        p[4095] = 1;
        assert!(!is_zero_page(&p));
        p[4095] = 0;
        p[0] = 1;
        assert!(!is_zero_page(&p));
    }

    #[test]
    fn stale_temp_files_of_dead_writers_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("vm.img");
        // pid_max is at most 2^22, so this process cannot exist.
        let dead = dir.path().join("vm.img.tmp-4294967295-0");
        let live = dir.path().join("vm.img.tmp-1-0");
        let ours = dir.path().join(format!("vm.img.tmp-{}-99", std::process::id()));
        let other_image = dir.path().join("other.img.tmp-4294967295-0");
        let not_ours = dir.path().join("vm.img.tmp-notes");
        for p in [&dead, &live, &ours, &other_image, &not_ours] {
            std::fs::write(p, b"x").unwrap();
        }
        remove_stale_temps(&img);
        assert!(!dead.exists(), "a dead writer's temp file is removed");
        for p in [&live, &ours, &other_image, &not_ours] {
            assert!(p.exists(), "{} is kept", p.display());
        }
    }

    #[test]
    fn writer_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<ImageWriter>();
    }
}
