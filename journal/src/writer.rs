//! The journal handle, the group-commit writer thread and the segment helper thread.
//!
//! Appenders assign a sequence and push into a bounded queue under one mutex, so
//! queue order is sequence order. The writer thread owns the IO engine and the
//! active segment: each round it takes as many queued records as fit in
//! `max_batch_bytes`, encodes them into one 4 KiB-aligned staging slot and submits one
//! durable write. While fewer than `depth` writes are in flight and records are
//! queued it forms and submits the next batch; otherwise it waits for the OLDEST
//! in-flight write, advances `durable_seq` to its last seq and hands its completions
//! to the completion thread (which runs them in order while the writer goes on).
//! Results are taken in submission order, so completions and `durable_seq` stay in
//! sequence order even if the device finishes a later write first.
//!
//! Pipelining limits (each keeps FORMAT.md's crash analysis true):
//! * depth = min(`max_inflight_batches`, engine slots, the active segment header's
//!   recorded `max_inflight`): recovery tolerates a torn tail of that many batches;
//! * a segment activation (header + first batch) is written alone: in-flight writes
//!   are drained first and nothing is submitted until it is durable;
//! * a batch whose write carries a trailing zero block (recycled, not known-zero
//!   area) is a barrier too: the next batch starts exactly on that zero block, and
//!   two overlapping in-flight writes could land in either order.
//!
//! Out of space (ENOSPC/EDQUOT on a batch write or a segment creation, EMFILE/ENFILE
//! opening one) the writer and the helper wait and retry (`space`); a batch write
//! that failed at completion is rewritten with every write in flight after it, in
//! order (`rewrite_for_space`). Any other error fails the journal.
//!
//! Encryption at rest: with a key-encryption key each segment activation draws a
//! fresh data key, wraps it into the segment header, and the writer seals every
//! batch body in the staging slot before submitting it (so a rewrite after ENOSPC
//! resubmits the same ciphertext). A journal opened with a key never appends to a
//! segment activated by an earlier process: its first batch activates a new
//! segment, because recovery may have truncated a torn tail whose offset the old
//! data key already used with other bytes (FORMAT.md "Encryption at rest").
//!
//! The helper thread keeps one spare segment ready (recycling released segments or
//! writing a fresh zeroed file) so the write path does not stall on preparation.

use std::collections::VecDeque;
use std::fs::File;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ferry_gm::atrest::{DataKey, Kek};
use parking_lot::{Condvar, Mutex, MutexGuard};

use crate::clock::now_ns;
use crate::engine::{self, IoEngine};
use crate::error::{JournalError, Result};
use crate::format::{self, BatchParams, Record, Seq, BLOCK_SIZE, SEGMENT_HEADER_BLOCK};
use crate::reader::{DurableLog, JournalReader};
use crate::recovery::{self, Recovered, RecoveryReport, SegInfo, Spare};
use crate::segment;
use crate::space::{self, SpaceMonitor};
use crate::{failpoint, Completion, JournalOptions};

/// Completed batches waiting for the completion thread. Small: if callbacks fall this
/// far behind, the writer waits for them (backpressure) rather than buffer more.
const COMPLETION_QUEUE_BATCHES: usize = 8;

type Completed = Vec<(Completion, Result<Seq>)>;

/// Spare segments kept ready ahead of need.
const SPARE_TARGET: usize = 1;
/// How often a writer waiting for space re-checks for shutdown.
const SPACE_WAIT: Duration = Duration::from_millis(50);

struct Pending {
    seq: Seq,
    rec: Record,
    /// `format::data_crc` of a large record's data, computed by the appender.
    crc: Option<u32>,
    done: Completion,
}

struct QueueState {
    next_seq: Seq,
    items: VecDeque<Pending>,
    closed: bool,
    /// Set once a write failed: every later append gets this error.
    failed: Option<JournalError>,
}

struct SegState {
    /// Segments holding data, oldest first; the last one is being appended to.
    data: Vec<SegInfo>,
    spares: VecDeque<Spare>,
    /// Released segments waiting to be recycled or deleted.
    free: Vec<SegInfo>,
    preparing: usize,
    /// Spares taken by the writer whose activation write is in flight: still
    /// counted against capacity.
    activating: usize,
    next_no: u64,
    max_segments: usize,
    shutdown: bool,
    prep_error: Option<JournalError>,
}

impl SegState {
    fn total(&self) -> usize {
        self.data.len() + self.spares.len() + self.free.len() + self.preparing + self.activating
    }
}

struct Shared {
    opts: JournalOptions,
    queue: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    durable_seq: AtomicU64,
    last_seq: AtomicU64,
    epoch: AtomicU64,
    /// Append offset in the active segment (for `used_bytes`).
    active_pos: AtomicU64,
    segs: Mutex<SegState>,
    segs_cv: Condvar,
    closing: AtomicBool,
    stats: StatCounters,
    /// Set by `skip_to`: the next batch must activate a new segment whose header
    /// carries the sequence jump. Cleared once that activation is durable.
    jump_pending: AtomicBool,
    /// Sequence ranges (inclusive) that were skipped and never written: readers
    /// step over them. Pruned as releases pass them.
    gaps: Mutex<Vec<(Seq, Seq)>>,
    /// Waits for space (or file descriptors) of the writer and the helper.
    space: SpaceMonitor,
}

impl Shared {
    /// The state of a journal just recovered (`last`: its last durable sequence;
    /// `active_pos`: the append offset in its active segment).
    fn new(opts: JournalOptions, rec: Recovered, last: Seq, active_pos: u64) -> Shared {
        let max_segments = (opts.capacity / opts.segment_size) as usize;
        Shared {
            queue: Mutex::new(QueueState {
                next_seq: last + 1,
                items: VecDeque::new(),
                closed: false,
                failed: None,
            }),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            durable_seq: AtomicU64::new(last),
            last_seq: AtomicU64::new(last),
            epoch: AtomicU64::new(opts.epoch),
            active_pos: AtomicU64::new(active_pos),
            segs: Mutex::new(SegState {
                data: rec.data,
                spares: rec.spares.into(),
                free: Vec::new(),
                preparing: 0,
                activating: 0,
                next_no: rec.next_no,
                max_segments,
                shutdown: false,
                prep_error: None,
            }),
            segs_cv: Condvar::new(),
            closing: AtomicBool::new(false),
            stats: StatCounters::default(),
            jump_pending: AtomicBool::new(false),
            gaps: Mutex::new(rec.gaps),
            space: SpaceMonitor::default(),
            opts,
        }
    }
}

impl DurableLog for Shared {
    fn durable_seq(&self) -> Seq {
        self.durable_seq.load(Ordering::Acquire)
    }

    fn skipped_through(&self, seq: Seq) -> Option<Seq> {
        self.gaps
            .lock()
            .iter()
            .find(|&&(a, b)| a <= seq && seq <= b)
            .map(|&(_, b)| b)
    }

    fn first_seq(&self) -> Option<Seq> {
        self.segs.lock().data.first().map(|d| d.first_seq)
    }

    fn segment_holding(&self, seq: Seq) -> std::result::Result<SegInfo, Seq> {
        let s = self.segs.lock();
        match s.data.iter().rposition(|d| d.first_seq <= seq) {
            Some(i) => Ok(s.data[i].clone()),
            None => Err(s.data.first().map_or(0, |d| d.first_seq)),
        }
    }
}

/// Cumulative counters, read without locks (for metrics and benchmarks).
#[derive(Default)]
struct StatCounters {
    batches: AtomicU64,
    records: AtomicU64,
    bytes_written: AtomicU64,
    write_ns: AtomicU64,
    segments_zeroed: AtomicU64,
    segments_recycled: AtomicU64,
}

/// A snapshot of the journal's cumulative counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Durable batch writes completed.
    pub batches: u64,
    /// Records made durable.
    pub records: u64,
    /// Bytes written to segments by batch writes (headers and padding included).
    pub bytes_written: u64,
    /// Time from submission to completion of durable batch writes, summed (with
    /// several writes in flight the intervals overlap).
    pub write_ns: u64,
    /// Spare segments created by writing them full of zeros (a journal's first pass).
    pub segments_zeroed: u64,
    /// Spare segments made from released ones (one header block written).
    pub segments_recycled: u64,
    /// Times the journal started waiting for space (ENOSPC/EDQUOT on a batch write
    /// or a segment creation, EMFILE/ENFILE opening a segment): appends wait
    /// instead of failing. See [`SpaceWaitStats`](crate::SpaceWaitStats).
    pub space_waits: u64,
    /// Failed attempts retried while waiting for space, over all episodes.
    pub space_retries: u64,
    /// Waiting for space since (ns since the Unix epoch, [`now_ns`]); 0 while not
    /// waiting.
    pub waiting_for_space_since_ns: u64,
}

/// The journal. `Send + Sync`: share it via `Arc`.
pub struct Journal {
    shared: Arc<Shared>,
    writer: Mutex<Option<JoinHandle<()>>>,
    completion: Mutex<Option<JoinHandle<()>>>,
    helper: Mutex<Option<JoinHandle<()>>>,
    engine_name: &'static str,
    fallback_reason: Option<String>,
    /// Held for the journal's lifetime (dropped after the threads are joined).
    _lock: File,
}

impl Journal {
    /// Creates the directory if missing, recovers, picks the engine and starts
    /// the writer and helper threads.
    pub fn open(opts: JournalOptions) -> Result<(Journal, RecoveryReport)> {
        opts.validate()?;
        let (eng, reason) =
            engine::make_engine(opts.engine, staging_len(&opts), opts.max_inflight_batches)
                .map_err(JournalError::EngineUnavailable)?;
        Self::start(opts, eng, reason)
    }

    /// Like [`Journal::open`] with a caller-supplied engine (tests inject faults this way).
    pub fn open_with_engine(
        opts: JournalOptions,
        engine: Box<dyn IoEngine>,
    ) -> Result<(Journal, RecoveryReport)> {
        opts.validate()?;
        Self::start(opts, engine, None)
    }

    fn start(
        opts: JournalOptions,
        engine: Box<dyn IoEngine>,
        fallback_reason: Option<String>,
    ) -> Result<(Journal, RecoveryReport)> {
        std::fs::create_dir_all(&opts.dir)
            .map_err(|e| JournalError::io(format!("create {}", opts.dir.display()), e))?;
        let lock = segment::lock_dir(&opts.dir)?;
        let mut rec = recovery::recover(
            &opts.dir,
            opts.cluster_id,
            opts.recovery,
            opts.encryption.as_deref(),
        )?;
        let engine_name = engine.name();
        let depth = opts
            .max_inflight_batches
            .min(engine.max_inflight())
            .clamp(1, format::MAX_INFLIGHT_BATCHES as usize);
        let active = match rec.data.last() {
            // Encrypted: the first batch activates a new segment with a new data key
            // (never reuse an earlier process's key at an offset it may have used).
            Some(_) if opts.encryption.is_some() => None,
            Some(d) => Some(Active {
                no: d.no,
                file: segment::open_rw(&d.path)?,
                size: d.size,
                pos: rec.write_pos,
                zeroed_from: rec.zeroed_from,
                // Never more in flight than the segment header promises recovery.
                depth: depth.min(rec.active_depth.max(1)),
                key: d.key.clone(),
            }),
            None => None,
        };
        let report = std::mem::take(&mut rec.report);
        let active_pos = active.as_ref().map_or(0, |a| a.pos);
        let shared = Arc::new(Shared::new(opts, rec, report.last_seq, active_pos));
        tracing::info!(
            dir = %shared.opts.dir.display(), engine = engine_name, first_seq = report.first_seq,
            last_seq = report.last_seq, truncated_batches = report.truncated_batches, "journal opened"
        );
        let helper = {
            let sh = shared.clone();
            std::thread::Builder::new()
                .name("ferry-journal-seg".into())
                .spawn(move || helper_loop(&sh))
                .map_err(|e| JournalError::io("spawn segment helper thread", e))?
        };
        let completer = Arc::new(CompletionQueue::default());
        // With inline completions the writer runs them itself: no thread to wait on.
        let completion = (!shared.opts.inline_completions)
            .then(|| spawn_completion_thread(completer.clone()))
            .transpose()?;
        let writer = spawn_writer_thread(Writer {
            shared: shared.clone(),
            engine,
            inflight: VecDeque::new(),
            held: None,
            depth,
            active,
            completer,
        })?;
        let j = Journal {
            shared,
            writer: Mutex::new(Some(writer)),
            completion: Mutex::new(completion),
            helper: Mutex::new(Some(helper)),
            engine_name,
            fallback_reason,
            _lock: lock,
        };
        Ok((j, report))
    }

    /// Queues a record and returns its sequence. Blocks while the queue is full
    /// (which includes while the journal is out of space). `done` runs after the
    /// batch holding the record is durable, strictly in sequence order, on the
    /// completion thread (on the writer thread with `inline_completions`): keep it
    /// quick; a callback that blocks holds up the ones after it (and, inline, every
    /// journal write). If `append` returns an error,
    /// `done` is never called.
    pub fn append(&self, rec: Record, done: Completion) -> Result<Seq> {
        self.append_sequenced(rec, |_, _| {}, done)
    }

    /// [`Journal::append`], and `sequenced` is called with the record and its
    /// sequence once it is assigned, before the record is durable, under the lock
    /// that assigns sequences: calls come strictly in sequence order, one per record,
    /// and never for a record `append` refused. It runs on the appender's thread and
    /// holds up every other appender while it runs: keep it to a quick hand-off.
    /// (A primary's shippers send records from here, in parallel with the journal
    /// write; see ferryd `ship::feed`.)
    pub fn append_sequenced(
        &self,
        rec: Record,
        sequenced: impl FnOnce(Seq, &Record),
        done: Completion,
    ) -> Result<Seq> {
        format::validate_record(&rec).map_err(JournalError::InvalidRecord)?;
        let max = self.shared.opts.max_record_data();
        if rec.data.len() as u64 > max {
            return Err(JournalError::InvalidRecord(format!(
                "record data {} bytes exceeds the segment limit {max}",
                rec.data.len()
            )));
        }
        // The writer is a single thread: checksum big payloads here, in the
        // appender's thread and cache, so the writer only copies them.
        // (An encrypted batch's CRC covers the ciphertext: nothing to precompute.)
        let crc = (rec.data.len() >= format::PRECOMPUTE_CRC_MIN
            && self.shared.opts.encryption.is_none())
        .then(|| format::data_crc(&rec.data));
        let sh = &self.shared;
        let mut q = sh.queue.lock();
        // Bounded by the writer's progress; wakes on every dequeue and on close/failure.
        loop {
            if let Some(e) = &q.failed {
                return Err(e.clone());
            }
            if q.closed {
                return Err(JournalError::Closed);
            }
            if q.items.len() < sh.opts.queue_records {
                break;
            }
            sh.not_full.wait(&mut q);
        }
        let seq = q.next_seq;
        q.next_seq += 1;
        sequenced(seq, &rec);
        q.items.push_back(Pending {
            seq,
            rec,
            crc,
            done,
        });
        sh.last_seq.store(seq, Ordering::Release);
        drop(q);
        sh.not_empty.notify_one();
        Ok(seq)
    }

    /// Appends and blocks until the record is durable.
    pub fn append_wait(&self, rec: Record) -> Result<Seq> {
        let (tx, rx) = crossbeam_channel::bounded(1);
        self.append(
            rec,
            Box::new(move |r| {
                let _ = tx.send(r);
            }),
        )?;
        rx.recv().map_err(|_| JournalError::Closed)?
    }

    /// Continues the sequence at `seq + 1`: the sequences after the last one written
    /// up to `seq` are never written. For a standby whose replica was resynced by a
    /// copy: its journal mirrors the primary's numbering and must go on after the
    /// primary's snapshot point. The journal must be idle (every appended record
    /// durable, nothing queued); `seq` below the last sequence is refused, equal is a
    /// no-op.
    ///
    /// Not durable by itself: the jump is recorded (segment header flag
    /// `SEQ_JUMP`) when the next batch activates a new segment. A crash before that
    /// reopens the journal ending at the old last sequence; a caller that relies on
    /// the jump persists it itself and calls `skip_to` again after reopening. The
    /// records before the jump stay readable until released; the caller must not
    /// need them replayed after the jump (a standby checkpoints them first).
    pub fn skip_to(&self, seq: Seq) -> Result<()> {
        let sh = &self.shared;
        let mut q = sh.queue.lock();
        if let Some(e) = &q.failed {
            return Err(e.clone());
        }
        if q.closed {
            return Err(JournalError::Closed);
        }
        let last = q.next_seq - 1;
        if seq < last {
            return Err(JournalError::InvalidSkip(format!(
                "sequence {seq} is below the last assigned sequence {last}"
            )));
        }
        if seq == last {
            return Ok(());
        }
        let durable = sh.durable_seq.load(Ordering::Acquire);
        if !q.items.is_empty() || durable != last {
            return Err(JournalError::InvalidSkip(format!(
                "the journal is busy (last {last}, durable {durable}, {} queued)",
                q.items.len()
            )));
        }
        sh.gaps.lock().push((last + 1, seq));
        // Set before the queue lock is released: the writer takes the next batch
        // under that lock, so it sees the flag with the first record after the jump.
        sh.jump_pending.store(true, Ordering::Release);
        q.next_seq = seq + 1;
        sh.last_seq.store(seq, Ordering::Release);
        sh.durable_seq.store(seq, Ordering::Release);
        drop(q);
        tracing::info!(from = last, to = seq, "journal: sequence skipped");
        Ok(())
    }

    /// Last assigned sequence (0 if none).
    pub fn last_seq(&self) -> Seq {
        self.shared.last_seq.load(Ordering::Acquire)
    }

    /// Last durable sequence (0 if none).
    /// Oldest sequence still readable (segments below it were released);
    /// `durable_seq() + 1` when the journal holds nothing.
    pub fn first_available_seq(&self) -> Seq {
        let first = self.shared.segs.lock().data.first().map(|d| d.first_seq);
        first
            .filter(|&f| f > 0)
            .unwrap_or_else(|| self.durable_seq() + 1)
    }

    pub fn durable_seq(&self) -> Seq {
        self.shared.durable_seq.load(Ordering::Acquire)
    }

    /// Iterator over durable entries `>= from` (`from == 0`: from the oldest kept).
    pub fn reader(&self, from: Seq) -> Result<JournalReader> {
        JournalReader::new(self.shared.clone(), from)
    }

    /// Checkpoint: segments whose records are all `<= seq` are recycled or deleted
    /// (in the background). The active segment is never released. Not persisted:
    /// after a restart the caller releases again.
    pub fn release_through(&self, seq: Seq) -> Result<()> {
        let mut s = self.shared.segs.lock();
        // Bounded by the number of data segments.
        while s.data.len() > 1 && s.data[1].first_seq - 1 <= seq {
            let d = s.data.remove(0);
            tracing::debug!(segment = d.no, "journal: segment released");
            s.free.push(d);
        }
        let first = s.data.first().map(|d| d.first_seq);
        drop(s);
        if let Some(first) = first {
            // A gap below the oldest kept segment can no longer be asked for.
            self.shared.gaps.lock().retain(|&(_, end)| end >= first);
        }
        self.shared.segs_cv.notify_all();
        Ok(())
    }

    /// Epoch stamped on batches written from now on.
    pub fn set_epoch(&self, epoch: u64) {
        self.shared.epoch.store(epoch, Ordering::Release);
    }

    /// Bytes of segments holding unreleased data, up to the append position.
    pub fn used_bytes(&self) -> u64 {
        let s = self.shared.segs.lock();
        match s.data.split_last() {
            Some((_, older)) => {
                older.iter().map(|d| d.size).sum::<u64>()
                    + self.shared.active_pos.load(Ordering::Acquire)
            }
            None => 0,
        }
    }

    pub fn capacity_bytes(&self) -> u64 {
        (self.shared.opts.capacity / self.shared.opts.segment_size) * self.shared.opts.segment_size
    }

    /// "io_uring" or "std".
    pub fn engine_name(&self) -> &'static str {
        self.engine_name
    }

    /// Why `EngineChoice::Auto` fell back to std IO, if it did.
    pub fn fallback_reason(&self) -> Option<String> {
        self.fallback_reason.clone()
    }

    /// Cumulative batch/record/byte/time counters.
    pub fn stats(&self) -> JournalStats {
        let st = &self.shared.stats;
        let space = self.shared.space.stats();
        JournalStats {
            space_waits: space.episodes,
            space_retries: space.retries,
            waiting_for_space_since_ns: space.waiting_since_ns,
            batches: st.batches.load(Ordering::Relaxed),
            records: st.records.load(Ordering::Relaxed),
            bytes_written: st.bytes_written.load(Ordering::Relaxed),
            write_ns: st.write_ns.load(Ordering::Relaxed),
            segments_zeroed: st.segments_zeroed.load(Ordering::Relaxed),
            segments_recycled: st.segments_recycled.load(Ordering::Relaxed),
        }
    }

    /// Drains the queue, completes everything, joins the threads. Returns the
    /// write error if the journal had failed.
    pub fn close(self) -> Result<()> {
        self.shutdown()
    }

    fn shutdown(&self) -> Result<()> {
        let sh = &self.shared;
        {
            let mut q = sh.queue.lock();
            q.closed = true;
        }
        sh.closing.store(true, Ordering::Release);
        sh.not_empty.notify_all();
        sh.not_full.notify_all();
        sh.segs_cv.notify_all();
        if let Some(w) = self.writer.lock().take() {
            let _ = w.join();
        }
        // The writer is gone, so the completion channel is closed: this returns once
        // every callback has run.
        if let Some(c) = self.completion.lock().take() {
            let _ = c.join();
        }
        sh.segs.lock().shutdown = true;
        sh.segs_cv.notify_all();
        if let Some(h) = self.helper.lock().take() {
            let _ = h.join();
        }
        match sh.queue.lock().failed.clone() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}

impl Drop for Journal {
    fn drop(&mut self) {
        let _ = self.shutdown();
    }
}

fn staging_len(opts: &JournalOptions) -> usize {
    opts.max_batch_bytes + format::BATCH_HEADER_LEN + format::BODY_TAG_LEN + 3 * BLOCK_SIZE
}

/// Sets the calling thread's nice value (Linux: PRIO_PROCESS with a thread id
/// addresses that thread only). Lowering it needs CAP_SYS_NICE; raising it does not.
/// Public for the other threads of a node that set their own priority (ferryd's
/// replica applier).
pub fn try_set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: plain syscalls on this thread's own id; no memory is passed.
    let r = unsafe {
        let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
        libc::setpriority(libc::PRIO_PROCESS, tid, nice)
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// [`try_set_thread_nice`]; a refusal (no CAP_SYS_NICE) is logged and the writer
/// runs at normal priority.
fn set_thread_nice(nice: i32) {
    if let Err(e) = try_set_thread_nice(nice) {
        tracing::warn!(
            nice,
            error = %e,
            "journal writer priority unchanged (lowering nice needs CAP_SYS_NICE); appends may wait longer for it on a busy machine"
        );
    } else {
        tracing::debug!(nice, "journal writer thread priority set");
    }
}

fn run_completion(done: Completion, r: Result<Seq>) {
    // A panicking callback must not take the writer (and every later append) down.
    if catch_unwind(AssertUnwindSafe(|| done(r))).is_err() {
        tracing::error!("journal: a completion callback panicked");
    }
}

struct Active {
    no: u64,
    file: File,
    size: u64,
    /// Offset of the next batch.
    pos: u64,
    /// From here to the end the file is known to be zero. Below it, the block
    /// after each batch is zeroed explicitly so an all-zero block always marks
    /// the end of the log (recycled segments hold stale bytes).
    zeroed_from: u64,
    /// Most batch writes in flight in this segment (recorded in its header).
    depth: usize,
    /// The data key of an encrypted segment (drawn at activation).
    key: Option<Arc<DataKey>>,
}

/// A batch write submitted to the engine and not yet reaped.
struct Flight {
    batch: Vec<Pending>,
    slot: usize,
    last: Seq,
    /// Segment, offset and length of the write (for errors and stats).
    seg_no: u64,
    offset: u64,
    total: usize,
    /// End of the batch in its segment (the append position once durable).
    end: u64,
    /// Nothing may be submitted until this write is reaped.
    barrier: bool,
    started: Instant,
    /// Segment activated by this write; joins the log once the write is durable.
    roll: Option<(Active, Spare)>,
}

type Failure = (JournalError, Vec<Pending>);

struct Writer {
    shared: Arc<Shared>,
    // Field order: the engine is dropped (reaping anything still in flight) before
    // the files the writes target.
    engine: Box<dyn IoEngine>,
    /// Submitted writes, oldest first.
    inflight: VecDeque<Flight>,
    /// A batch formed but waiting for in-flight writes to drain (segment roll).
    held: Option<Vec<Pending>>,
    /// Writer pipeline depth: min(option, engine slots).
    depth: usize,
    active: Option<Active>,
    completer: Arc<CompletionQueue>,
}

/// Hand-off of completed batches from the writer to the completion thread. A plain
/// mutex and condvar (futex sleep, no spin-then-yield loops): on a 2-core machine a
/// spinning waiter steals the CPU the other side needs.
#[derive(Default)]
struct CompletionQueue {
    state: std::sync::Mutex<(VecDeque<Completed>, bool)>,
    cv: std::sync::Condvar,
    space: std::sync::Condvar,
}

impl CompletionQueue {
    /// Queues a batch, waiting while COMPLETION_QUEUE_BATCHES are already queued.
    /// Returns the batch if the queue was closed.
    fn push(&self, batch: Completed) -> std::result::Result<(), Completed> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        while g.0.len() >= COMPLETION_QUEUE_BATCHES && !g.1 {
            g = self.space.wait(g).unwrap_or_else(|p| p.into_inner());
        }
        if g.1 {
            return Err(batch);
        }
        g.0.push_back(batch);
        drop(g);
        self.cv.notify_one();
        Ok(())
    }

    fn pop(&self) -> Option<Completed> {
        let mut g = self.state.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            if let Some(b) = g.0.pop_front() {
                drop(g);
                self.space.notify_one();
                return Some(b);
            }
            if g.1 {
                return None;
            }
            g = self.cv.wait(g).unwrap_or_else(|p| p.into_inner());
        }
    }

    fn close(&self) {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).1 = true;
        self.cv.notify_all();
        self.space.notify_all();
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        // Lets the completion thread finish once it has run everything queued.
        self.completer.close();
    }
}

impl Writer {
    fn run(mut self) {
        if let Err((e, failed)) = self.pump() {
            tracing::error!(error = %e, "journal: batch write failed; journal is now failed");
            self.fail(e, failed);
        }
    }

    /// The writer loop. Ok once closed and drained; Err with the first failure and
    /// every batch from the failed one on (in sequence order), none acknowledged.
    fn pump(&mut self) -> std::result::Result<(), Failure> {
        // Each iteration submits what it may, then reaps the oldest write.
        loop {
            while self.can_submit() {
                let batch = match self.held.take() {
                    Some(b) => b,
                    None => match self.next_batch(self.inflight.is_empty()) {
                        Some(b) => b,
                        None if self.inflight.is_empty() => return Ok(()),
                        None => break,
                    },
                };
                if !self.inflight.is_empty() && self.needs_roll(&batch) {
                    // No pipelining across a roll: drain first.
                    self.held = Some(batch);
                    break;
                }
                if let Err((e, batch)) = self.submit_batch(batch) {
                    // Writes submitted before it may still succeed: reap (and
                    // acknowledge) them in order, then fail this batch.
                    let (e, mut failed) = match self.settle_all(None) {
                        Some((first, mut failed)) => {
                            failed.extend(batch);
                            (first, failed)
                        }
                        None => (e, batch),
                    };
                    failed.extend(self.held.take().into_iter().flatten());
                    return Err((e, failed));
                }
            }
            let Some(f) = self.inflight.pop_front() else {
                continue;
            };
            let r = self
                .engine
                .wait_oldest()
                .and_then(|()| failpoint::check("journal::batch_complete"));
            let r = match r {
                Err(e) if space::is_space(&e) => self.rewrite_for_space(f, e),
                r => self.finish(f, r),
            };
            if let Err(fail) = r {
                let (e, mut failed) = self.settle_all(Some(fail)).unwrap_or_else(|| {
                    (JournalError::Closed, Vec::new()) // unreachable: Some in, Some out
                });
                failed.extend(self.held.take().into_iter().flatten());
                return Err((e, failed));
            }
        }
    }

    fn can_submit(&self) -> bool {
        let limit = self
            .active
            .as_ref()
            .map_or(1, |a| a.depth)
            .min(self.depth)
            .max(1);
        self.inflight.len() < limit && !self.inflight.back().is_some_and(|f| f.barrier)
    }

    fn needs_roll(&self, batch: &[Pending]) -> bool {
        if self.shared.jump_pending.load(Ordering::Acquire) {
            return true;
        }
        let disk = self.batch_disk_len(batch);
        match &self.active {
            Some(a) => a.pos + disk > a.size,
            None => true,
        }
    }

    /// Bytes `batch` takes on disk (encrypted batches carry a tag).
    fn batch_disk_len(&self, batch: &[Pending]) -> u64 {
        let records = batch.iter().map(|p| &p.rec);
        format::batch_disk_len(if self.shared.opts.encryption.is_some() {
            format::sealed_body_len(records)
        } else {
            format::body_len(records)
        })
    }

    /// Reaps every write still in flight, oldest first. Until a failure is known
    /// (`failed` None) successes are acknowledged as usual; from the first failure
    /// on, later writes are only waited for and their records join the failed list
    /// even if they reached the disk (their completions must never say durable).
    fn settle_all(&mut self, mut failed: Option<Failure>) -> Option<Failure> {
        while let Some(f) = self.inflight.pop_front() {
            let r = self.engine.wait_oldest();
            match &mut failed {
                None => {
                    if let Err(fail) = self.finish(f, r) {
                        failed = Some(fail);
                    }
                }
                Some((_, list)) => {
                    self.abandon_roll(f.roll);
                    list.extend(f.batch);
                }
            }
        }
        failed
    }

    /// Returns the spare of a roll whose activation write did not complete.
    fn abandon_roll(&self, roll: Option<(Active, Spare)>) {
        if let Some((_, spare)) = roll {
            let mut s = self.shared.segs.lock();
            s.activating -= 1;
            s.spares.push_front(spare);
        }
    }

    /// The oldest write `first` completed with ENOSPC (`err`): waits for space and
    /// writes it again, then every write that was in flight after it (reaped first,
    /// their results ignored: rewriting the same bytes at the same offset is
    /// harmless), one at a time and in order, acknowledging each once durable. Why
    /// rewrite the whole write rather than retry a failed fdatasync: after a failed
    /// flush the kernel may have dropped the dirty pages, and only writing them
    /// again makes them durable. Their staging slots are intact: nothing is staged
    /// until this returns. Any other error fails that write and all later ones.
    fn rewrite_for_space(
        &mut self,
        first: Flight,
        err: std::io::Error,
    ) -> std::result::Result<(), Failure> {
        let mut redo = VecDeque::from([first]);
        while let Some(f) = self.inflight.pop_front() {
            let _ = self.engine.wait_oldest();
            redo.push_back(f);
        }
        let sh = self.shared.clone();
        let mut waiter = sh.space.waiter("journal", "batch write");
        let mut last_err = Some(err);
        while let Some(f) = redo.pop_front() {
            // Bounded by the space coming back or the journal closing.
            let r = loop {
                if let Some(e) = last_err.take() {
                    if !space::is_space(&e)
                        || !waiter.wait(&e, || sh.closing.load(Ordering::Acquire))
                    {
                        break Err(e);
                    }
                }
                let file = match (&f.roll, &self.active) {
                    (Some((a, _)), _) | (None, Some(a)) => &a.file,
                    (None, None) => break Err(std::io::Error::other("no active segment")),
                };
                let r = failpoint::check("journal::batch_write")
                    .and_then(|()| self.engine.submit_staged(f.slot, file, f.total, f.offset))
                    .and_then(|()| self.engine.wait_oldest())
                    .and_then(|()| failpoint::check("journal::batch_complete"));
                match r {
                    Ok(()) => break Ok(()),
                    Err(e) => last_err = Some(e),
                }
            };
            if let Err((e, mut failed)) = self.finish(f, r) {
                for g in redo {
                    self.abandon_roll(g.roll);
                    failed.extend(g.batch);
                }
                return Err((e, failed));
            }
        }
        Ok(())
    }

    /// The oldest write completed with `r`: publish it or report the failure.
    fn finish(&mut self, f: Flight, r: std::io::Result<()>) -> std::result::Result<(), Failure> {
        let st = &self.shared.stats;
        st.write_ns
            .fetch_add(f.started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        if let Err(e) = r {
            self.abandon_roll(f.roll);
            let name = segment::segment_file_name(f.seg_no);
            return Err((
                JournalError::io(
                    format!("write {} bytes at {} of segment {name}", f.total, f.offset),
                    e,
                ),
                f.batch,
            ));
        }
        st.batches.fetch_add(1, Ordering::Relaxed);
        st.records
            .fetch_add(f.batch.len() as u64, Ordering::Relaxed);
        st.bytes_written
            .fetch_add(f.total as u64, Ordering::Relaxed);
        if let Some((a, spare)) = f.roll {
            // The activation carried the jump (if one was pending): it is durable now.
            self.shared.jump_pending.store(false, Ordering::Release);
            let mut s = self.shared.segs.lock();
            s.activating -= 1;
            s.data.push(SegInfo {
                no: spare.no,
                path: spare.path,
                first_seq: f.batch.first().map_or(0, |p| p.seq),
                size: spare.size,
                key: a.key.clone(),
            });
            drop(s);
            self.active = Some(a);
        }
        self.shared.active_pos.store(f.end, Ordering::Release);
        self.shared.durable_seq.store(f.last, Ordering::Release);
        self.complete(f.batch.into_iter().map(|p| (p.done, Ok(p.seq))).collect());
        Ok(())
    }

    /// Takes one round's worth of queued records. `wait`: blocks for records
    /// (None when closed and drained, or failed); otherwise None if none are queued.
    fn next_batch(&mut self, wait: bool) -> Option<Vec<Pending>> {
        let sh = &self.shared;
        let limit = (sh.opts.max_batch_bytes as u64)
            .min(sh.opts.max_record_data() + format::RECORD_HEADER_LEN as u64);
        let mut q = sh.queue.lock();
        while q.items.is_empty() {
            if !wait || q.closed || q.failed.is_some() {
                return None;
            }
            sh.not_empty.wait(&mut q);
        }
        let mut batch = Vec::new();
        let mut bytes = 0u64;
        while let Some(front) = q.items.front() {
            let len = front.rec.encoded_len() as u64;
            if !batch.is_empty() && bytes + len > limit {
                break;
            }
            bytes += len;
            if let Some(p) = q.items.pop_front() {
                batch.push(p);
            }
        }
        drop(q);
        sh.not_full.notify_all();
        Some(batch)
    }

    /// Encodes `batch` into a free slot and submits its write. A roll (segment
    /// activation) is only called with nothing in flight.
    fn submit_batch(&mut self, batch: Vec<Pending>) -> std::result::Result<(), Failure> {
        match self.stage_and_submit(&batch) {
            Ok(mut f) => {
                f.batch = batch;
                self.inflight.push_back(f);
                Ok(())
            }
            Err(e) => Err((e, batch)),
        }
    }

    /// Takes a spare and opens it as the next active segment (returned with the
    /// spare, which goes back to the pool if the activation is abandoned).
    fn next_active(&mut self) -> Result<(Active, Spare)> {
        let spare = self.take_spare()?;
        let sh = self.shared.clone();
        let mut waiter = sh.space.waiter("journal", "open segment");
        // Bounded by descriptors (or space) coming back or the journal closing.
        let opened = loop {
            match segment::open_rw(&spare.path) {
                Err(e)
                    if space::io_source(&e).is_some_and(|io| {
                        space::is_space_or_fds(io)
                            && waiter.wait(io, || sh.closing.load(Ordering::Acquire))
                    }) => {}
                r => break r,
            }
        };
        drop(waiter);
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                let mut s = self.shared.segs.lock();
                s.activating -= 1;
                s.spares.push_front(spare);
                return Err(e);
            }
        };
        let key = match self.shared.opts.encryption {
            Some(_) => match DataKey::generate() {
                Ok(k) => Some(Arc::new(k)),
                Err(e) => {
                    let mut s = self.shared.segs.lock();
                    s.activating -= 1;
                    s.spares.push_front(spare);
                    return Err(JournalError::io(
                        "draw a segment data key",
                        std::io::Error::other(e),
                    ));
                }
            },
            None => None,
        };
        let active = Active {
            no: spare.no,
            file,
            size: spare.size,
            pos: SEGMENT_HEADER_BLOCK,
            zeroed_from: if spare.zeroed {
                SEGMENT_HEADER_BLOCK
            } else {
                spare.size
            },
            depth: self.depth,
            key,
        };
        Ok((active, spare))
    }

    fn stage_and_submit(&mut self, batch: &[Pending]) -> Result<Flight> {
        let disk = self.batch_disk_len(batch);
        let first_seq = batch.first().map_or(0, |p| p.seq);
        let last = batch.last().map_or(0, |p| p.seq);
        let roll = self.needs_roll(batch);
        let mut new_active = if roll {
            debug_assert!(self.inflight.is_empty());
            Some(self.next_active()?)
        } else {
            None
        };
        let slot = (0..self.depth)
            .find(|s| !self.inflight.iter().any(|f| f.slot == *s))
            .unwrap_or(0);
        let target = match (&mut new_active, &mut self.active) {
            (Some((a, _)), _) => a,
            (None, Some(a)) => a,
            (None, None) => return Err(JournalError::Closed),
        };
        let end = target.pos + disk;
        if end > target.size {
            let err = JournalError::InvalidRecord(format!(
                "batch of {disk} bytes does not fit a segment"
            ));
            self.abandon_roll(new_active);
            return Err(err);
        }
        let trailing = end < target.size && end < target.zeroed_from;
        let head = if roll {
            SEGMENT_HEADER_BLOCK as usize
        } else {
            0
        };
        let total = head + disk as usize + if trailing { BLOCK_SIZE } else { 0 };
        let params = BatchParams {
            segment_no: target.no,
            cluster_id: self.shared.opts.cluster_id,
            epoch: self.shared.epoch.load(Ordering::Acquire),
            first_seq,
            timestamp_ns: now_ns(),
        };
        let offset = if roll { 0 } else { target.pos };
        let seg_no = target.no;
        let layout = Layout {
            head,
            disk,
            total,
            trailing,
        };
        let staged = (|| -> Result<Instant> {
            let buf = self
                .engine
                .staging_slot(slot, total)
                .map_err(|e| JournalError::io("allocate staging buffer", e))?;
            // Segment header and first batch go in one write: a torn activation
            // leaves either no header (spare) or a header with a torn first batch.
            let seq_jump = roll.then(|| self.shared.jump_pending.load(Ordering::Acquire));
            let kek = self.shared.opts.encryption.as_deref();
            encode_staged(buf, target, seq_jump, kek, &params, batch, &layout)?;
            submit_batch(
                self.engine.as_mut(),
                &self.shared,
                slot,
                &target.file,
                total,
                offset,
                target.no,
            )
        })();
        let started = match staged {
            Ok(t) => t,
            Err(e) => {
                self.abandon_roll(new_active);
                return Err(e);
            }
        };
        target.pos = end;
        Ok(Flight {
            batch: Vec::new(),
            slot,
            last,
            seg_no,
            offset,
            total,
            end,
            barrier: roll || trailing,
            started,
            roll: new_active,
        })
    }

    /// Takes the prepared spare; waits (backpressure) while the journal is full.
    fn take_spare(&mut self) -> Result<Spare> {
        let sh = &self.shared;
        let mut s = sh.segs.lock();
        let mut warned = false;
        loop {
            if let Some(sp) = s.spares.pop_front() {
                s.activating += 1;
                drop(s);
                sh.segs_cv.notify_all();
                return Ok(sp);
            }
            if let Some(e) = &s.prep_error {
                return Err(e.clone());
            }
            // Closing while the helper waits for space: no spare is coming.
            if sh.closing.load(Ordering::Acquire) && sh.space.stats().waiting_since_ns != 0 {
                return Err(JournalError::Closed);
            }
            let can_progress = s.preparing > 0 || !s.free.is_empty() || s.total() < s.max_segments;
            if !can_progress {
                if sh.closing.load(Ordering::Acquire) {
                    return Err(JournalError::Closed);
                }
                if !warned {
                    tracing::warn!(
                        segments = s.total(),
                        "journal full: appends wait for release_through"
                    );
                    warned = true;
                }
            }
            sh.segs_cv.wait_for(&mut s, SPACE_WAIT);
        }
    }

    /// Fails this batch, everything queued and every later append with `e`.
    fn fail(&mut self, e: JournalError, batch: Vec<Pending>) {
        let drained: Vec<Pending> = {
            let mut q = self.shared.queue.lock();
            q.failed = Some(e.clone());
            q.items.drain(..).collect()
        };
        self.shared.not_full.notify_all();
        self.complete(
            batch
                .into_iter()
                .chain(drained)
                .map(|p| (p.done, Err(e.clone())))
                .collect(),
        );
    }

    /// Hands completions to the completion thread (in order); runs them here if that
    /// thread is gone, so no appender is ever left waiting.
    fn complete(&self, batch: Completed) {
        if self.shared.opts.inline_completions {
            for (done, r) in batch {
                run_completion(done, r);
            }
            return;
        }
        if let Err(batch) = self.completer.push(batch) {
            for (done, r) in batch {
                run_completion(done, r);
            }
        }
    }
}

/// Where a batch sits in its staging buffer: after the segment header (`head` bytes,
/// when it activates a segment), `disk` bytes of batch, then a zeroed block when
/// `trailing`; `total` bytes in all.
struct Layout {
    head: usize,
    disk: u64,
    total: usize,
    trailing: bool,
}

/// Fills a batch's staging buffer for segment `target`: its header when the batch
/// activates it (`seq_jump`: Some, with the header's jump flag), the encoded batch
/// (sealed under the segment's data key when it has one; the batch sits at
/// `target.pos`), and the trailing zero block.
fn encode_staged(
    buf: &mut [u8],
    target: &Active,
    seq_jump: Option<bool>,
    kek: Option<&Kek>,
    params: &BatchParams,
    batch: &[Pending],
    layout: &Layout,
) -> Result<()> {
    let (head, disk, total) = (layout.head, layout.disk, layout.total);
    if let Some(seq_jump) = seq_jump {
        let first_seq = params.first_seq;
        stage_segment_header(
            &mut buf[..head],
            target,
            params.cluster_id,
            first_seq,
            seq_jump,
            kek,
        )?;
    }
    let out = &mut buf[head..head + disk as usize];
    let encoded = match &target.key {
        Some(key) => {
            let records = batch.iter().map(|p| &p.rec);
            format::encode_batch_sealed(out, params, records, key, target.pos)
        }
        None => format::encode_batch_with_crcs(out, params, batch.iter().map(|p| (&p.rec, p.crc))),
    };
    let (_, n) =
        encoded.map_err(|e| JournalError::InvalidRecord(format!("encoding batch: {e}")))?;
    debug_assert_eq!(n as u64, disk);
    if layout.trailing {
        buf[head + n..total].fill(0);
    }
    Ok(())
}

/// Submits a staged batch write, waiting while the disk is full; returns when the
/// write started.
fn submit_batch(
    engine: &mut dyn IoEngine,
    sh: &Shared,
    slot: usize,
    file: &File,
    total: usize,
    offset: u64,
    seg_no: u64,
) -> Result<Instant> {
    let started = Instant::now();
    let mut waiter = sh.space.waiter("journal", "batch write");
    // Bounded by the space coming back or the journal closing.
    let submitted = loop {
        let r = failpoint::check("journal::batch_write")
            .and_then(|()| engine.submit_staged(slot, file, total, offset));
        match r {
            Err(e)
                if space::is_space(&e)
                    && waiter.wait(&e, || sh.closing.load(Ordering::Acquire)) => {}
            r => break r,
        }
    };
    submitted.map(|()| started).map_err(|e| {
        let name = segment::segment_file_name(seg_no);
        JournalError::io(
            format!("write {total} bytes at {offset} of segment {name}"),
            e,
        )
    })
}

/// Writes the header block of segment `a` (activated by a batch starting at
/// `first_seq`) into `block`; an encrypted segment's data key is wrapped under `kek`
/// and bound to the header's fields.
fn stage_segment_header(
    block: &mut [u8],
    a: &Active,
    cluster_id: [u8; 16],
    first_seq: Seq,
    seq_jump: bool,
    kek: Option<&Kek>,
) -> Result<()> {
    block.fill(0);
    let sh = format::SegmentHeader {
        segment_no: a.no,
        cluster_id,
        first_seq,
        segment_size: a.size,
        max_inflight: a.depth as u32,
        seq_jump,
    };
    let (Some(key), Some(kek)) = (&a.key, kek) else {
        block[..format::SEGMENT_HEADER_LEN].copy_from_slice(&format::encode_segment_header(&sh));
        return Ok(());
    };
    let key_id = kek.id();
    let wrapped = kek
        .wrap(key, &format::segment_key_aad(&sh, key_id))
        .map_err(|e| JournalError::io("wrap a segment data key", std::io::Error::other(e)))?;
    let info = format::SegmentKeyInfo { key_id, wrapped };
    block[..format::SEGMENT_HEADER_V2_LEN]
        .copy_from_slice(&format::encode_segment_header_encrypted(&sh, &info));
    Ok(())
}

/// Runs completions handed over by the writer, in order. Ends when the writer
/// closed the queue and it drained.
fn spawn_completion_thread(q: Arc<CompletionQueue>) -> Result<JoinHandle<()>> {
    std::thread::Builder::new()
        .name("ferry-journal-done".into())
        .spawn(move || {
            while let Some(batch) = q.pop() {
                for (done, r) in batch {
                    run_completion(done, r);
                }
            }
        })
        .map_err(|e| JournalError::io("spawn journal completion thread", e))
}

/// Starts the writer thread (at the configured nice value, if any).
fn spawn_writer_thread(w: Writer) -> Result<JoinHandle<()>> {
    let nice = w.shared.opts.writer_nice;
    std::thread::Builder::new()
        .name("ferry-journal-writer".into())
        .spawn(move || {
            if nice != 0 {
                set_thread_nice(nice);
            }
            w.run()
        })
        .map_err(|e| JournalError::io("spawn journal writer thread", e))
}

fn helper_loop(sh: &Shared) {
    let dir = sh.opts.dir.clone();
    let mut s = sh.segs.lock();
    // Each iteration does one preparation/deletion or waits for a change.
    loop {
        if s.shutdown {
            return;
        }
        if s.prep_error.is_some() {
            sh.segs_cv.wait(&mut s);
            continue;
        }
        let want_spare = s.spares.len() + s.preparing < SPARE_TARGET;
        // Released segments are kept for recycling (a 4 KiB header write) rather
        // than deleted, unless the journal holds more than its capacity: deleting
        // one and later pre-zeroing a new one writes a whole segment again.
        if !s.free.is_empty() && (want_spare || s.total() > s.max_segments) {
            let f = s.free.remove(0);
            if want_spare {
                let no = s.next_no;
                s.next_no += 1;
                s.preparing += 1;
                let r = MutexGuard::unlocked(&mut s, || segment::recycle(&dir, &f.path, no));
                s.preparing -= 1;
                if r.is_ok() {
                    sh.stats.segments_recycled.fetch_add(1, Ordering::Relaxed);
                }
                finish_prep(
                    sh,
                    &mut s,
                    r.map(|path| Spare {
                        no,
                        path,
                        size: f.size,
                        zeroed: false,
                    }),
                );
            } else {
                let r = MutexGuard::unlocked(&mut s, || segment::delete(&dir, &f.path));
                if let Err(e) = r {
                    tracing::error!(error = %e, "journal: deleting a released segment failed");
                }
            }
            continue;
        }
        if want_spare && s.total() < s.max_segments {
            let no = s.next_no;
            s.next_no += 1;
            s.preparing += 1;
            let size = sh.opts.segment_size;
            let r = MutexGuard::unlocked(&mut s, || create_when_space(sh, &dir, no, size));
            s.preparing -= 1;
            if r.is_ok() {
                sh.stats.segments_zeroed.fetch_add(1, Ordering::Relaxed);
            }
            finish_prep(
                sh,
                &mut s,
                r.map(|path| Spare {
                    no,
                    path,
                    size,
                    zeroed: true,
                }),
            );
            continue;
        }
        sh.segs_cv.wait(&mut s);
    }
}

/// Creates spare `no`, waiting and retrying while the file system is full (or the
/// process is out of descriptors); gives up (returns the error) once the journal
/// closes. `create_zeroed` removes its temporary file on failure, so a waiting
/// helper holds no space.
fn create_when_space(
    sh: &Shared,
    dir: &std::path::Path,
    no: u64,
    size: u64,
) -> Result<std::path::PathBuf> {
    let mut waiter = sh.space.waiter("journal", "create segment");
    // Bounded by space coming back or the journal closing.
    loop {
        match segment::create_zeroed(dir, no, size) {
            Err(e)
                if space::io_source(&e).is_some_and(|io| {
                    space::is_space_or_fds(io)
                        && waiter.wait(io, || sh.closing.load(Ordering::Acquire))
                }) => {}
            r => return r,
        }
    }
}

fn finish_prep(sh: &Shared, s: &mut SegState, r: Result<Spare>) {
    match r {
        Ok(sp) => {
            tracing::debug!(
                segment = sp.no,
                recycled = !sp.zeroed,
                "journal: spare segment ready"
            );
            s.spares.push_back(sp);
        }
        Err(e) => {
            tracing::error!(error = %e, "journal: preparing a segment failed");
            s.prep_error = Some(e);
        }
    }
    sh.segs_cv.notify_all();
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This thread's nice value.
    fn thread_nice() -> i32 {
        // SAFETY: plain syscalls on this thread's own id. getpriority can return -1
        // legitimately; errno is cleared first and checked.
        unsafe {
            let tid = libc::syscall(libc::SYS_gettid) as libc::id_t;
            *libc::__errno_location() = 0;
            let n = libc::getpriority(libc::PRIO_PROCESS, tid);
            assert_eq!(*libc::__errno_location(), 0, "getpriority failed");
            n
        }
    }

    #[repr(C)]
    struct CapHeader {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy, Default)]
    struct CapData {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const CAP_V3: u32 = 0x2008_0522;
    const CAP_SYS_NICE: u32 = 23;

    /// Removes CAP_SYS_NICE from the calling thread's effective set (capabilities
    /// are per thread on Linux: the rest of the test process keeps it).
    fn drop_cap_sys_nice() {
        let mut h = CapHeader {
            version: CAP_V3,
            pid: 0,
        };
        let mut d = [CapData::default(); 2];
        // SAFETY: capget/capset with a v3 header and the two data words v3 uses.
        unsafe {
            assert_eq!(libc::syscall(libc::SYS_capget, &mut h, d.as_mut_ptr()), 0);
            d[0].effective &= !(1 << CAP_SYS_NICE);
            assert_eq!(libc::syscall(libc::SYS_capset, &mut h, d.as_ptr()), 0);
        }
    }

    #[test]
    fn a_refused_priority_is_reported_and_changes_nothing() {
        std::thread::spawn(|| {
            drop_cap_sys_nice();
            let before = thread_nice();
            let mut lim = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            // SAFETY: getrlimit writes one rlimit struct we own.
            assert_eq!(unsafe { libc::getrlimit(libc::RLIMIT_NICE, &mut lim) }, 0);
            // RLIMIT_NICE r lets any thread go down to nice 20 - r without the capability.
            if 20 - (lim.rlim_cur.min(40) as i32) <= before - 5 {
                ferry_testkit::skip(
                    "a_refused_priority_is_reported_and_changes_nothing",
                    &format!(
                        "RLIMIT_NICE {} allows nice {} without CAP_SYS_NICE",
                        lim.rlim_cur,
                        before - 5
                    ),
                );
                return;
            }
            let err = try_set_thread_nice(before - 5)
                .expect_err("lowering nice without CAP_SYS_NICE (RLIMIT_NICE 0) must fail");
            assert!(
                matches!(err.raw_os_error(), Some(libc::EACCES) | Some(libc::EPERM)),
                "{err}"
            );
            assert_eq!(
                thread_nice(),
                before,
                "a refusal must leave the priority alone"
            );
            // The logging wrapper only warns: the writer goes on at normal priority.
            set_thread_nice(before - 5);
            assert_eq!(thread_nice(), before);
            // Raising nice (lower priority) needs no capability.
            try_set_thread_nice(before + 1).unwrap();
            assert_eq!(thread_nice(), before + 1);
        })
        .join()
        .unwrap();
    }
}
