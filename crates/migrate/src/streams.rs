//! Extra page streams (`--streams N`): the source spreads page runs over
//! N authenticated connections, each fed by its own thread (encoding,
//! tagging and TLS then run on as many cores); the destination writes each
//! stream's pages from a thread of its own.
//!
//! Order: a page appears at most once per round, so pages of one round may
//! arrive in any order across streams. Rounds are kept apart by markers:
//! every extra stream sends `RoundEnd { round }` after its part of a round,
//! and the destination echoes the main stream's `RoundEnd` only once every
//! stream has delivered that round; before `State` every extra stream sends
//! the marker [`FINAL_ROUND`], and the destination applies the state only
//! after all of them.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use ferry_vmm::GuestRam;

use crate::migration::{wire_io, MigrationError, DEFAULT_PEER_TIMEOUT};
use crate::ratelimit::{Bandwidth, TokenBucket};
use crate::transport::{TransportReader, TransportWriter};
use crate::wire::{
    check_ram_range, encode_pages, FrameReader, FrameWriter, Kind, Message, WireCodec, WireError, FINAL_ROUND,
    HEADER_LEN, PAGE, TAG_LEN,
};

/// One extra page stream: a thread that reads the pages it is given from
/// guest RAM, encodes and sends them, so that encoding, tagging and TLS run
/// on as many cores as there are streams.
pub(crate) struct StreamWorker {
    jobs: std::sync::mpsc::SyncSender<StreamJob>,
    acks: Mutex<std::sync::mpsc::Receiver<std::result::Result<(), String>>>,
    pub(crate) bytes: Arc<std::sync::atomic::AtomicU64>,
}

pub(crate) enum StreamJob {
    Pages {
        gpa: u64,
        len: u64,
    },
    Zero {
        gpa: u64,
        npages: u64,
    },
    /// Send `RoundEnd { round }` after everything before it, then acknowledge.
    Mark(u32),
}

impl StreamWorker {
    pub(crate) fn start(
        ram: Arc<GuestRam>,
        mut w: FrameWriter<TransportWriter>,
        codec: WireCodec,
        cap: Option<Bandwidth>,
    ) -> Result<StreamWorker, MigrationError> {
        let (jobs, rx) = std::sync::mpsc::sync_channel::<StreamJob>(64);
        let (ack_tx, acks) = std::sync::mpsc::channel();
        let bytes = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let b = bytes.clone();
        std::thread::Builder::new()
            .name("migrate-stream".into())
            .spawn(move || {
                let mut buf = Vec::new();
                let mut pace = cap.map(TokenBucket::new);
                let mut failed: Option<String> = None;
                for job in rx {
                    if failed.is_some() {
                        if let StreamJob::Mark(_) = job {
                            let _ = ack_tx.send(Err(failed.clone().unwrap_or_default()));
                        }
                        continue;
                    }
                    let r = (|| -> std::io::Result<()> {
                        match job {
                            StreamJob::Pages { gpa, len } => {
                                let data =
                                    ram.slice(gpa, len).ok_or_else(|| std::io::Error::other("pages outside RAM"))?;
                                encode_pages(gpa, data, codec, &mut buf);
                                if let Some(p) = pace.as_mut() {
                                    p.take((HEADER_LEN + buf.len() + TAG_LEN) as u64);
                                }
                                w.write_raw(Kind::Pages, &buf)
                            }
                            StreamJob::Zero { gpa, npages } => w.send(&Message::Zero { gpa, npages }),
                            StreamJob::Mark(round) => {
                                w.send(&Message::RoundEnd { round, pages: 0 })?;
                                w.flush()?;
                                let _ = ack_tx.send(Ok(()));
                                if let Some(p) = pace.as_mut() {
                                    p.restart();
                                }
                                Ok(())
                            }
                        }
                    })();
                    b.store(w.bytes, std::sync::atomic::Ordering::Relaxed);
                    if let Err(e) = r {
                        let msg = WireError::Io(e).to_string();
                        let _ = ack_tx.send(Err(msg.clone()));
                        failed = Some(msg);
                    }
                }
                let _ = w.get_mut().shutdown();
            })
            .map_err(|e| MigrationError::Invalid(format!("starting a stream thread: {e}")))?;
        Ok(StreamWorker { jobs, acks: Mutex::new(acks), bytes })
    }

    pub(crate) fn send(&self, job: StreamJob) -> crate::Result<()> {
        self.jobs.send(job).map_err(|_| wire_io(std::io::Error::other("a page stream's thread ended")))
    }

    /// Sends a round marker after everything queued and waits until it is written.
    pub(crate) fn mark(&self, round: u32) -> crate::Result<()> {
        self.send(StreamJob::Mark(round))?;
        let acks = self.acks.lock().unwrap();
        match acks.recv_timeout(DEFAULT_PEER_TIMEOUT) {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(wire_io(std::io::Error::other(format!("a page stream failed: {e}")))),
            Err(_) => Err(wire_io(std::io::Error::other("a page stream stalled"))),
        }
    }
}

/// The destination's receivers of the extra page streams.
pub(crate) struct StreamReceivers {
    sh: Arc<Shared>,
}

struct Shared {
    /// Highest round marker each stream has delivered, and the first error.
    state: Mutex<(Vec<u32>, Option<String>)>,
    cv: Condvar,
    pages: AtomicU64,
    zero_pages: AtomicU64,
    frames: AtomicU64,
    bytes: AtomicU64,
}

impl StreamReceivers {
    /// Starts one thread per stream writing into `ram` (every address checked).
    pub(crate) fn start(
        ram: &Arc<GuestRam>,
        streams: Vec<FrameReader<TransportReader>>,
    ) -> Result<StreamReceivers, MigrationError> {
        let sh = Arc::new(Shared {
            state: Mutex::new((vec![0; streams.len()], None)),
            cv: Condvar::new(),
            pages: AtomicU64::new(0),
            zero_pages: AtomicU64::new(0),
            frames: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        });
        let ranges: Vec<(u64, u64)> = ram.regions().iter().map(|r| (r.gpa, r.len)).collect();
        for (i, mut r) in streams.into_iter().enumerate() {
            let (sh, ram, ranges) = (sh.clone(), ram.clone(), ranges.clone());
            std::thread::Builder::new()
                .name("receive-stream".into())
                .spawn(move || {
                    let fail = |why: String| {
                        let mut st = sh.state.lock().unwrap();
                        st.1.get_or_insert(format!("page stream {}: {why}", i + 2));
                        sh.cv.notify_all();
                    };
                    loop {
                        let m = match r.recv() {
                            Ok(m) => m,
                            Err(e) => return fail(e.to_string()),
                        };
                        let placed = match m {
                            Message::Pages { gpa, data } => match check_ram_range(&ranges, gpa, data.len() as u64) {
                                None => Err(format!("page run {gpa:#x}+{:#x} is outside guest RAM", data.len())),
                                Some(_) => {
                                    let _ = ram.write(gpa, &data);
                                    sh.pages.fetch_add(data.len() as u64 / PAGE, Ordering::Relaxed);
                                    Ok(())
                                }
                            },
                            Message::Zero { gpa, npages } => {
                                let len = npages.saturating_mul(PAGE);
                                match check_ram_range(&ranges, gpa, len) {
                                    None => Err(format!("zero run {gpa:#x}+{len:#x} is outside guest RAM")),
                                    Some(_) => {
                                        crate::migration::zero_range(&ram, gpa, len);
                                        sh.zero_pages.fetch_add(npages, Ordering::Relaxed);
                                        Ok(())
                                    }
                                }
                            }
                            Message::RoundEnd { round, .. } => {
                                let mut st = sh.state.lock().unwrap();
                                if round <= st.0[i] {
                                    drop(st);
                                    return fail(format!("round marker {round} after {}", st_round(&sh, i)));
                                }
                                st.0[i] = round;
                                sh.cv.notify_all();
                                drop(st);
                                if round == FINAL_ROUND {
                                    sh.bytes.fetch_add(r.bytes, Ordering::Relaxed);
                                    return;
                                }
                                Ok(())
                            }
                            other => Err(format!("unexpected {:?} frame on a page stream", other.kind())),
                        };
                        sh.frames.fetch_add(1, Ordering::Relaxed);
                        if let Err(e) = placed {
                            return fail(e);
                        }
                    }
                })
                .map_err(|e| MigrationError::Invalid(format!("starting a stream receiver: {e}")))?;
        }
        Ok(StreamReceivers { sh })
    }

    /// Waits until every stream has delivered `round` (bounded by `timeout`).
    pub(crate) fn wait(&self, round: u32, timeout: Duration) -> Result<(), MigrationError> {
        let deadline = Instant::now() + timeout;
        let mut st = self.sh.state.lock().unwrap();
        loop {
            if let Some(e) = &st.1 {
                return Err(MigrationError::Wire(WireError::BadFrame { seq: 0, what: e.clone() }));
            }
            if st.0.iter().all(|&r| r >= round) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(MigrationError::Wire(WireError::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "a page stream sent nothing within the timeout",
                ))));
            }
            st = self.sh.cv.wait_timeout(st, deadline - now).unwrap().0;
        }
    }

    /// (pages, zero pages, frames, bytes) received on the extra streams.
    pub(crate) fn counts(&self) -> (u64, u64, u64, u64) {
        let s = &self.sh;
        (
            s.pages.load(Ordering::Relaxed),
            s.zero_pages.load(Ordering::Relaxed),
            s.frames.load(Ordering::Relaxed),
            s.bytes.load(Ordering::Relaxed),
        )
    }
}

fn st_round(sh: &Shared, i: usize) -> u32 {
    sh.state.lock().unwrap().0[i]
}
