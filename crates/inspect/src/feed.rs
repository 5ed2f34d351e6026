//! Guest memory in overlapping blocks, read and decoded on worker threads and
//! handed, in any order, to one consumer on the calling thread.
//!
//! This is for consumers that must see every block themselves: YARA-X's block
//! scanner keeps the matches of all blocks and evaluates rule conditions once
//! over all of memory, and its state cannot move between threads. Reading and
//! verifying chunks is most of a scan's cost, so that part stays parallel.
//!
//! The blocks are planned as [`crate::scan`] plans them (the data extents,
//! widened by the longest match, in blocks that re-read the longest match minus
//! one before their start), so every stretch of memory up to `max_len` bytes
//! lies whole in at least one block. With `word_edges`, each block's edges are
//! moved outwards (by at most [`EDGE_SLACK`] bytes) to a byte that is not a word
//! character: a consumer treats a block's edge as the edge of the data, which
//! is right for `fullword` and `\b` only where the real neighbour is not a
//! word character either.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};

use serde::Serialize;

use crate::error::{Error, Result};
use crate::mem::PhysMem;
use crate::scan::{segments, spans};

/// How far a block's edge may move outwards to reach a non-word byte.
pub const EDGE_SLACK: usize = 4096;

/// What to feed.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FeedPlan {
    /// Longest match the consumer can report (sets the overlap).
    pub max_len: usize,
    /// Feed all of RAM, zero memory included (the consumer can match zeros).
    pub all_memory: bool,
    /// Move block edges to non-word bytes (see the module documentation).
    pub word_edges: bool,
    /// Bytes per block, before overlap (rounded up to pages).
    pub block_size: usize,
    /// Threads reading and decoding.
    pub threads: usize,
}

/// What feeding cost.
#[derive(Clone, Copy, Debug, Default, Serialize)]
pub struct FeedStats {
    /// Bytes of memory covered (overlaps counted once).
    pub bytes_scanned: u64,
    /// Bytes handed to the consumer (overlaps counted each time).
    pub bytes_fed: u64,
    /// Blocks handed to the consumer.
    pub blocks: u64,
    /// Block edges that found no non-word byte within [`EDGE_SLACK`] (a `fullword` or `\b`
    /// match touching one of them may be reported although its real neighbour is a word byte).
    pub unsafe_edges: u64,
    /// Threads that read memory.
    pub threads: usize,
    /// Blocks the prefilter found no needle in (covered, but not handed on to be scanned).
    pub blocks_skipped: u64,
}

/// What takes the blocks: `(address, bytes, may_match)`.
pub(crate) type Consumer<'a> = dyn FnMut(u64, &[u8], bool) -> Result<()> + 'a;

/// Tells, on the reading threads, whether a block may hold a match (`false`: it holds none;
/// the consumer is told and need not search it).
pub(crate) type BlockFilter<'a> = Option<&'a (dyn Fn(&[u8]) -> bool + Sync)>;

/// One block: `from..end` must be fed, `start..end` is the part it adds; `seg` is its segment.
#[derive(Clone, Copy, Debug)]
struct Block {
    seg: (u64, u64),
    from: u64,
    start: u64,
    end: u64,
}

/// A block read, with the part `s..e` of `buf` to feed (its first byte is memory at `at + s`).
struct Piece {
    at: u64,
    buf: Vec<u8>,
    s: usize,
    e: usize,
    owned: u64,
    unsafe_edges: u64,
    may_match: bool,
}

/// Plans the blocks for `plan` over `mem`.
fn plan_blocks(mem: &mut dyn PhysMem, plan: &FeedPlan) -> Result<(Vec<Block>, u64, usize)> {
    let page = ferry_image::PAGE_SIZE;
    let block = (plan.block_size.max(1) as u64).div_ceil(page) * page;
    let pad = (plan.max_len.saturating_sub(1) as u64).div_ceil(page) * page;
    let spans = spans(mem);
    let segs = if plan.all_memory { spans.clone() } else { segments(&spans, &mem.data_extents()?, pad) };
    let mut blocks = Vec::new();
    for seg in segs {
        let mut a = seg.0;
        while a < seg.1 {
            let b = seg.1.min(a.saturating_add(block));
            blocks.push(Block { seg, from: seg.0.max(a.saturating_sub(pad)), start: a, end: b });
            a = b;
        }
    }
    let slack = if plan.word_edges { EDGE_SLACK } else { 0 };
    Ok((blocks, pad, (block + pad) as usize + 2 * slack))
}

/// A byte that `fullword` and `\b` count as part of a word.
fn word(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'_'
}

/// Whether feeding may start at `d[s]`: the byte before is not a word byte, nor the zero half
/// of a wide (UTF-16) word character.
fn safe_start(d: &[u8], s: usize) -> bool {
    match s {
        0 => false,
        1 => !word(d[0]),
        _ => !(word(d[s - 1]) || d[s - 1] == 0 && word(d[s - 2])),
    }
}

/// Chooses the fed part of `d` (memory from `at`): it covers `lo..hi` and ends at non-word
/// neighbours where it can; `lead`/`tail` say whether `d` starts/ends at its segment's edge,
/// beyond which is zero memory or no memory (an edge that is always safe).
/// Returns (s, e, edges that found no safe place).
pub(crate) fn choose_edges(d: &[u8], lo: usize, hi: usize, lead: bool, tail: bool) -> (usize, usize, u64) {
    let mut bad = 0;
    let s = if lo == 0 && lead {
        0
    } else {
        match (0..=lo).rev().find(|&s| safe_start(d, s)) {
            Some(s) => s,
            None if lead => 0,
            None => {
                bad += 1;
                0
            }
        }
    };
    let e = if hi == d.len() && tail {
        hi
    } else {
        match (hi..d.len()).find(|&e| !word(d[e])) {
            Some(e) => e,
            None => {
                if !tail {
                    bad += 1;
                }
                d.len()
            }
        }
    };
    (s, e, bad)
}

/// Reads block `b` into `buf` and picks the part to feed.
fn read_piece(mem: &mut dyn PhysMem, b: &Block, slack: u64, filter: BlockFilter, mut buf: Vec<u8>) -> Result<Piece> {
    let lo = b.seg.0.max(b.from.saturating_sub(slack));
    let hi = b.seg.1.min(b.end.saturating_add(slack));
    let len = usize::try_from(hi - lo).map_err(|_| Error::BadLength { len: hi - lo, reason: "block".into() })?;
    buf.resize(len, 0);
    mem.read(lo, &mut buf)?;
    let (s, e, unsafe_edges) = if slack == 0 {
        (0, len, 0)
    } else {
        choose_edges(&buf, (b.from - lo) as usize, (b.end - lo) as usize, lo == b.seg.0, hi == b.seg.1)
    };
    let may_match = filter.is_none_or(|f| f(&buf[s..e]));
    Ok(Piece { at: lo, buf, s, e, owned: b.end - b.start, unsafe_edges, may_match })
}

/// Feeds every block of `mem` to `consume(address, bytes, may_match)` on this thread, reading
/// them on `plan.threads` threads (each with its own handle on the memory) when the memory can
/// be shared; `may_match` is what `filter` said of the block on the reading thread (`true`
/// without a filter).
pub(crate) fn feed(
    mem: &mut dyn PhysMem,
    plan: &FeedPlan,
    filter: BlockFilter,
    consume: &mut Consumer,
) -> Result<FeedStats> {
    let (blocks, _pad, cap) = plan_blocks(mem, plan)?;
    let slack = if plan.word_edges { EDGE_SLACK as u64 } else { 0 };
    let mut stats = FeedStats { threads: 1, ..FeedStats::default() };
    let mut take = |p: &Piece, stats: &mut FeedStats| -> Result<()> {
        consume(p.at + p.s as u64, &p.buf[p.s..p.e], p.may_match)?;
        stats.bytes_scanned += p.owned;
        stats.blocks += 1;
        if p.may_match {
            stats.bytes_fed += (p.e - p.s) as u64;
        } else {
            stats.blocks_skipped += 1;
        }
        stats.unsafe_edges += p.unsafe_edges;
        Ok(())
    };
    let mut helpers: Vec<Box<dyn PhysMem + Send>> = Vec::new();
    if plan.threads > 1 && blocks.len() > 1 {
        for _ in 0..plan.threads.clamp(1, 64).min(blocks.len()) {
            match mem.try_clone()? {
                Some(m) => helpers.push(m),
                None => break,
            }
        }
    }
    if helpers.is_empty() {
        let mut buf = Vec::with_capacity(cap);
        for b in &blocks {
            let p = read_piece(mem, b, slack, filter, buf)?;
            take(&p, &mut stats)?;
            buf = p.buf;
        }
        return Ok(stats);
    }
    stats.threads = helpers.len();
    let pool: Arc<Mutex<Vec<Vec<u8>>>> = Arc::new(Mutex::new(Vec::new()));
    let (tx, rx) = sync_channel::<Result<Piece>>(helpers.len() * 2);
    let job = Job {
        blocks: &blocks,
        next: std::sync::atomic::AtomicUsize::new(0),
        // Consecutive blocks share their overlap's chunk: a reader that takes a run of them
        // decodes that chunk once instead of once per block.
        stripe: (blocks.len() / (helpers.len() * 4)).max(1),
        slack,
        filter,
        cap,
        pool: &pool,
    };
    std::thread::scope(|s| {
        for mut m in helpers {
            let (tx, job) = (tx.clone(), &job);
            s.spawn(move || worker(&mut *m, job, &tx));
        }
        drop(tx);
        // `rx` moves in and is dropped on return, so workers blocked on a send see the end.
        consume_all(rx, &pool, &mut |p| take(p, &mut stats))
    })?;
    Ok(stats)
}

/// What the readers share.
struct Job<'a> {
    blocks: &'a [Block],
    /// Next stripe to take.
    next: std::sync::atomic::AtomicUsize,
    /// Blocks per stripe.
    stripe: usize,
    slack: u64,
    filter: BlockFilter<'a>,
    cap: usize,
    pool: &'a Mutex<Vec<Vec<u8>>>,
}

/// One reader: takes stripes of consecutive blocks in turn until none are left or the
/// consumer went away.
fn worker(mem: &mut dyn PhysMem, job: &Job, tx: &SyncSender<Result<Piece>>) {
    loop {
        let first = job.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed).saturating_mul(job.stripe);
        if first >= job.blocks.len() {
            return;
        }
        for b in &job.blocks[first..job.blocks.len().min(first + job.stripe)] {
            let buf = job.pool.lock().ok().and_then(|mut p| p.pop()).unwrap_or_else(|| Vec::with_capacity(job.cap));
            let r = read_piece(mem, b, job.slack, job.filter, buf);
            let failed = r.is_err();
            if tx.send(r).is_err() || failed {
                return;
            }
        }
    }
}

/// Hands each piece to `take` and returns its buffer to the pool; stops at the first error.
fn consume_all(
    rx: Receiver<Result<Piece>>,
    pool: &Mutex<Vec<Vec<u8>>>,
    take: &mut dyn FnMut(&Piece) -> Result<()>,
) -> Result<()> {
    for r in rx.iter() {
        let p = r?;
        take(&p)?;
        if let Ok(mut pool) = pool.lock() {
            pool.push(p.buf);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mem::BufMem;
    use ferry_image::RamRange;

    /// A buffer that can be shared with worker threads (as an image can).
    struct Shared(BufMem, Vec<u8>, Vec<RamRange>);

    impl Shared {
        fn new(bytes: Vec<u8>, ranges: Vec<RamRange>) -> Self {
            Shared(BufMem::new(bytes.clone(), ranges.clone()), bytes, ranges)
        }
    }

    impl PhysMem for Shared {
        fn ranges(&self) -> &[RamRange] {
            self.0.ranges()
        }
        fn read(&mut self, gpa: u64, buf: &mut [u8]) -> Result<()> {
            self.0.read(gpa, buf)
        }
        fn try_clone(&self) -> Result<Option<Box<dyn PhysMem + Send>>> {
            Ok(Some(Box::new(Shared::new(self.1.clone(), self.2.clone()))))
        }
    }

    #[test]
    fn edges_move_out_to_non_word_bytes() {
        //            0123456789012345
        let d = b"ab cdefgh ijk.lm";
        // Must cover 5..8 ("efg"): start after the space at 2, end at the space at 9.
        assert_eq!(choose_edges(d, 5, 8, false, false), (3, 9, 0));
        // Already safe edges stay.
        assert_eq!(choose_edges(d, 3, 9, false, false), (3, 9, 0));
        // No non-word byte after 14: the end edge is unsafe unless the data ends there.
        assert_eq!(choose_edges(d, 3, 15, false, false), (3, 16, 1));
        assert_eq!(choose_edges(d, 3, 15, false, true), (3, 16, 0));
        // A wide word character before: "a\0" is not a safe neighbour.
        let w = b"xa\0b\0c";
        assert_eq!(choose_edges(w, 3, 4, true, true).0, 0);
        assert_eq!(choose_edges(w, 3, 4, false, true), (0, 4, 1));
    }

    /// Every stretch up to `max_len` bytes lies whole in some fed block, across block and range
    /// boundaries, and blocks never cross a hole.
    #[test]
    fn fed_blocks_cover_every_short_stretch() {
        let ranges = vec![RamRange::new(0, 0x6000), RamRange::new(0x6000, 0x3000), RamRange::new(0x10000, 0x4000)];
        let mut bytes = vec![0u8; 0x14000];
        for (i, b) in bytes.iter_mut().enumerate() {
            *b = if i % 7 == 0 { b' ' } else { b'a' + (i % 26) as u8 };
        }
        for (word_edges, threads, max_len) in [(false, 1, 100), (true, 1, 100), (true, 3, 5000), (false, 2, 1)] {
            let mut mem = Shared::new(bytes.clone(), ranges.clone());
            let plan = FeedPlan { max_len, all_memory: true, word_edges, block_size: 4096, threads };
            let mut fed: Vec<(u64, u64)> = Vec::new();
            let st = feed(&mut mem, &plan, None, &mut |a, d, _| {
                assert_eq!(&bytes[a as usize..a as usize + d.len()], d, "block at {a:#x} holds memory at {a:#x}");
                fed.push((a, a + d.len() as u64));
                Ok(())
            })
            .unwrap();
            assert_eq!(st.bytes_scanned, 0x9000 + 0x4000);
            assert_eq!(st.unsafe_edges, 0);
            assert_eq!(st.threads, if threads > 1 { threads } else { 1 });
            for &(a, b) in &fed {
                assert!(b <= 0x9000 || a >= 0x10000, "block {a:#x}..{b:#x} crosses the hole");
            }
            for (lo, hi) in [(0u64, 0x9000u64), (0x10000, 0x14000)] {
                for s in (lo..=hi - max_len as u64).step_by(61) {
                    let e = s + max_len as u64;
                    assert!(fed.iter().any(|&(a, b)| a <= s && e <= b), "{s:#x}..{e:#x} in no block ({word_edges})");
                }
            }
        }
    }

    #[test]
    fn a_consumer_error_stops_the_feed() {
        let ranges = vec![RamRange::new(0, 0x40000)];
        let mut mem = Shared::new(vec![1u8; 0x40000], ranges);
        let plan = FeedPlan { max_len: 16, all_memory: true, word_edges: false, block_size: 4096, threads: 2 };
        let mut n = 0;
        let r = feed(&mut mem, &plan, None, &mut |_, _, _| {
            n += 1;
            Err(Error::BadLength { len: 0, reason: "stop".into() })
        });
        assert!(r.is_err());
        assert_eq!(n, 1);
    }
}
