//! The writer's background pipeline: encoder threads compress, encrypt and
//! hash chunks while the caller keeps feeding pages; one I/O thread writes the
//! finished records in index order.
//!
//! Why threads here and not in the caller: the pre-copy engine must never wait
//! on compression while the guest is dirtying memory. Buffers circulate through
//! a small pool so steady-state writing allocates nothing.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use crate::codec::{CodecId, Encoder};
use crate::crypto::DataKey;
use crate::error::{Error, Result};
use crate::footer::ChunkEntry;
use crate::hash::{Hash32, RootHasher};
use crate::header::Codec;
use crate::record::{data_pages, encode_chunk, ChunkJob, EncodedChunk};

/// A bounded pool of byte buffers shared by the caller and the threads.
pub(crate) struct BufPool {
    bufs: Mutex<Vec<Vec<u8>>>,
    max: usize,
}

impl BufPool {
    /// A pool keeping at most `max` idle buffers.
    pub(crate) fn new(max: usize) -> Self {
        BufPool { bufs: Mutex::new(Vec::new()), max }
    }

    /// An empty buffer with at least `cap` capacity.
    pub(crate) fn get(&self, cap: usize) -> Vec<u8> {
        let mut v = self.bufs.lock().ok().and_then(|mut b| b.pop()).unwrap_or_default();
        v.clear();
        v.reserve(cap);
        v
    }

    /// Returns a buffer for reuse (dropped when the pool is full).
    pub(crate) fn put(&self, mut v: Vec<u8>) {
        v.clear();
        if let Ok(mut b) = self.bufs.lock() {
            if b.len() < self.max && v.capacity() > 0 {
                b.push(v);
            }
        }
    }
}

/// Where the image bytes go: a temp file (made durable and renamed at the end)
/// or any byte stream (a socket, a pipe, a null sink for benchmarks).
pub(crate) enum Output {
    /// The temp file of an image being written to a path.
    File(File),
    /// A caller-supplied stream.
    Stream(Box<dyn Write + Send>),
}

impl Write for Output {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Output::File(f) => f.write(buf),
            Output::Stream(s) => s.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.write_all(buf),
            Output::Stream(s) => s.write_all(buf),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Output::File(f) => f.flush(),
            Output::Stream(s) => s.flush(),
        }
    }
}

/// What the I/O thread has produced when the pipeline is drained.
pub(crate) struct IoState {
    /// The output, positioned at `offset`.
    pub file: BufWriter<Output>,
    /// Bytes written so far (next record's offset).
    pub offset: u64,
    /// Footer entries in index order.
    pub entries: Vec<ChunkEntry>,
    /// Root hash fed with every chunk hash in order.
    pub root: RootHasher,
    /// Sum of chunk payload bytes as stored.
    pub stored_bytes: u64,
    /// Chunks that ended up stored raw (compression did not help).
    pub raw_chunks: u64,
}

/// Message from an encoder to the I/O thread.
enum IoMsg {
    Chunk(EncodedChunk),
    Failed(String),
}

/// Running encoder and I/O threads.
pub(crate) struct Pipeline {
    jobs: Option<SyncSender<ChunkJob>>,
    workers: Vec<JoinHandle<()>>,
    io: Option<JoinHandle<Result<IoState>>>,
    failed: Arc<AtomicBool>,
    pool: Arc<BufPool>,
    path: PathBuf,
}

/// Everything the threads need, bundled to keep `Pipeline::start` readable.
pub(crate) struct PipelineConfig {
    pub threads: usize,
    pub codec: Codec,
    pub key: Option<Arc<DataKey>>,
    pub header_hash: Hash32,
    pub file: BufWriter<Output>,
    pub offset: u64,
    pub root: RootHasher,
    pub path: PathBuf,
    pub pool: Arc<BufPool>,
}

impl Pipeline {
    /// Starts `threads` encoders and the I/O thread.
    pub(crate) fn start(cfg: PipelineConfig) -> Result<Self> {
        let threads = cfg.threads.max(1);
        let (job_tx, job_rx) = sync_channel::<ChunkJob>(threads * 2);
        let (res_tx, res_rx) = sync_channel::<IoMsg>(threads * 2 + 2);
        let job_rx = Arc::new(Mutex::new(job_rx));
        let failed = Arc::new(AtomicBool::new(false));
        let spawn_err =
            |e: std::io::Error| Error::Worker { path: cfg.path.clone(), reason: format!("cannot spawn thread: {e}") };
        let mut workers = Vec::with_capacity(threads);
        for i in 0..threads {
            let rx = Arc::clone(&job_rx);
            let tx = res_tx.clone();
            let key = cfg.key.clone();
            let pool = Arc::clone(&cfg.pool);
            let header_hash = cfg.header_hash;
            let codec = cfg.codec;
            let h = std::thread::Builder::new()
                .name(format!("ferry-image-enc{i}"))
                .spawn(move || encoder_loop(rx, tx, codec, key, header_hash, pool))
                .map_err(spawn_err)?;
            workers.push(h);
        }
        drop(res_tx);
        let io_failed = Arc::clone(&failed);
        let pool = Arc::clone(&cfg.pool);
        let path = cfg.path.clone();
        let state = IoState {
            file: cfg.file,
            offset: cfg.offset,
            entries: Vec::new(),
            root: cfg.root,
            stored_bytes: 0,
            raw_chunks: 0,
        };
        let io = std::thread::Builder::new()
            .name("ferry-image-io".into())
            .spawn(move || {
                let r = io_loop(res_rx, state, &pool, &path);
                if r.is_err() {
                    io_failed.store(true, Ordering::SeqCst);
                }
                r
            })
            .map_err(spawn_err)?;
        Ok(Pipeline { jobs: Some(job_tx), workers, io: Some(io), failed, pool: cfg.pool, path: cfg.path })
    }

    /// The shared buffer pool.
    pub(crate) fn pool(&self) -> &Arc<BufPool> {
        &self.pool
    }

    /// Queues a chunk; blocks when the encoders are behind. Returns the
    /// pipeline's error as soon as the I/O thread has failed.
    pub(crate) fn submit(&mut self, job: ChunkJob) -> Result<()> {
        if self.failed.load(Ordering::SeqCst) {
            return Err(self.drain_error());
        }
        let sent = self.jobs.as_ref().map(|tx| tx.send(job).is_ok()).unwrap_or(false);
        if !sent {
            return Err(self.drain_error());
        }
        Ok(())
    }

    /// Stops the threads after a failure and returns the error that caused it.
    fn drain_error(&mut self) -> Error {
        match self.finish() {
            Err(e) => e,
            Ok(_) => Error::Worker { path: self.path.clone(), reason: "pipeline stopped unexpectedly".into() },
        }
    }

    /// Waits for every queued chunk to be written and returns the I/O state.
    pub(crate) fn finish(&mut self) -> Result<IoState> {
        self.jobs = None;
        let mut panicked = false;
        for w in self.workers.drain(..) {
            panicked |= w.join().is_err();
        }
        let io = self.io.take().ok_or_else(|| Error::Worker {
            path: self.path.clone(),
            reason: "pipeline already finished after an earlier error".into(),
        })?;
        let res =
            io.join().map_err(|_| Error::Worker { path: self.path.clone(), reason: "I/O thread panicked".into() })?;
        if panicked {
            return Err(Error::Worker { path: self.path.clone(), reason: "encoder thread panicked".into() });
        }
        res
    }
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        self.jobs = None;
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
        if let Some(io) = self.io.take() {
            let _ = io.join();
        }
    }
}

/// Encoder thread body: take a job, encode it, pass it on; stop when either channel closes.
fn encoder_loop(
    rx: Arc<Mutex<Receiver<ChunkJob>>>,
    tx: SyncSender<IoMsg>,
    codec: Codec,
    key: Option<Arc<DataKey>>,
    header_hash: Hash32,
    pool: Arc<BufPool>,
) {
    let mut enc = match Encoder::new(codec) {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.send(IoMsg::Failed(e));
            return;
        }
    };
    loop {
        let job = match rx.lock() {
            Ok(rx) => rx.recv(),
            Err(_) => return,
        };
        let Ok(job) = job else { return };
        let scratch = pool.get(0);
        let msg = match encode_chunk(job, &mut enc, key.as_deref(), &header_hash, scratch) {
            Ok(c) => IoMsg::Chunk(c),
            Err(e) => IoMsg::Failed(e),
        };
        if tx.send(msg).is_err() {
            return;
        }
    }
}

/// I/O thread body: write records in index order, collecting footer entries.
fn io_loop(rx: Receiver<IoMsg>, mut st: IoState, pool: &BufPool, path: &std::path::Path) -> Result<IoState> {
    let mut pending: BTreeMap<u32, EncodedChunk> = BTreeMap::new();
    let mut next: u32 = 0;
    for msg in rx {
        let c = match msg {
            IoMsg::Chunk(c) => c,
            IoMsg::Failed(reason) => return Err(Error::Encode { path: path.to_path_buf(), what: "chunk", reason }),
        };
        pending.insert(c.index, c);
        while let Some(c) = pending.remove(&next) {
            let werr = |e| Error::io("write chunk to", path, e);
            st.file.write_all(&c.prefix).map_err(werr)?;
            st.file.write_all(&c.payload).map_err(werr)?;
            st.file.write_all(&c.hash.0).map_err(werr)?;
            let len = c.record_len();
            st.entries.push(ChunkEntry {
                offset: st.offset,
                record_len: len,
                hash: c.hash,
                data_pages: data_pages(&c.runs) as u32,
                runs: c.runs,
            });
            st.root.chunk(&c.hash);
            st.offset += len;
            st.stored_bytes += c.payload.len() as u64;
            if c.codec == CodecId::None {
                st.raw_chunks += 1;
            }
            pool.put(c.payload);
            pool.put(c.spare);
            next += 1;
        }
    }
    if !pending.is_empty() {
        return Err(Error::Worker {
            path: path.to_path_buf(),
            reason: format!("chunk {next} never arrived (an encoder died)"),
        });
    }
    Ok(st)
}
