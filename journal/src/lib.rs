//! `ferry-journal`: ferry's segmented, append-only, group-committed redo journal.
//!
//! * [`format`](mod@format): the pure on-disk format (no IO); see `journal/FORMAT.md`.
//! * [`engine`]: io_uring and std IO engines behind [`IoEngine`].
//! * [`Journal`]: many appenders → bounded queue → one writer thread that writes one
//!   4 KiB-aligned batch per round (pipelined up to `max_inflight_batches`) and runs
//!   completions strictly in sequence order.
//!   A helper thread prepares the next segment ahead of need.
//! * [`JournalReader`]: iterates durable records with plain `pread`.
//! * [`now_ns`]: the node's one wall clock; batch stamps and every daemon timestamp
//!   compared with them come from it.
//! * Encryption at rest (optional, [`JournalOptions::encryption`]): SM4-GCM
//!   batch bodies under a data key per segment activation, wrapped in the segment
//!   header by the key-encryption key (FORMAT.md "Encryption at rest").
//! * Recovery on open ([`RecoveryMode`], [`RecoveryReport`]).
//! * Storage faults: ENOSPC (and EMFILE/ENFILE opening a segment) makes the journal
//!   and the undo log wait and retry instead of failing ([`SpaceMonitor`],
//!   `JournalStats::space_waits`); failpoints at every IO edge with the
//!   `failpoints` feature (journal/FAILPOINTS.md).
//!
//! Up to `max_inflight_batches` batch writes are in flight at a time (io_uring
//! only; 1 with std IO), so a crash can tear at most that many batches at the end;
//! the depth is recorded in each segment header and recovery truncates at most that
//! many batches (see FORMAT.md).

pub mod clock;
pub mod engine;
mod error;
mod failpoint;
pub mod format;
mod reader;
mod recovery;
mod segment;
mod space;
pub mod undo;
mod writer;

pub use clock::now_ns;
pub use engine::{EngineChoice, IoEngine, StdEngine, UringEngine};
pub use error::JournalError;
pub use format::{Op, Record, Seq};
pub use reader::JournalReader;
pub use recovery::{RecoveryMode, RecoveryReport};
pub use segment::{parse_segment_name, segment_file_name};
pub use space::{SpaceMonitor, SpaceWaitStats};
pub use undo::{
    EntryKind, UndoEntry, UndoError, UndoExtent, UndoLog, UndoPoint, UndoPosition, UndoRecovery,
};
pub use writer::{try_set_thread_nice, Journal, JournalStats};

use std::path::PathBuf;

// The daemon shares one journal between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Journal>();
    assert_send_sync::<JournalError>();
};

/// Batch-level metadata delivered with every entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchMeta {
    pub epoch: u64,
    pub timestamp_ns: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
}

/// One durable record as read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalEntry {
    pub seq: Seq,
    pub meta: BatchMeta,
    pub record: Record,
}

/// Called once the batch holding the record is durable (or failed), strictly in
/// sequence order, on the writer thread: it must be quick and must not block
/// (in particular it must not call `append_wait` on the same journal).
pub type Completion = Box<dyn FnOnce(Result<Seq, JournalError>) + Send>;

#[derive(Debug, Clone)]
pub struct JournalOptions {
    pub dir: PathBuf,
    /// Binds every segment and batch to one cluster: a journal directory from
    /// another cluster is refused.
    pub cluster_id: [u8; 16],
    pub epoch: u64,
    /// Bytes per segment file; multiple of 4 KiB, at least 1 MiB, at most 4 GiB.
    pub segment_size: u64,
    /// Total bytes across all segment files (data + spare), at least 2 segments.
    pub capacity: u64,
    pub engine: EngineChoice,
    pub recovery: RecoveryMode,
    /// Soft limit of one batch; a larger single record goes alone in its batch.
    pub max_batch_bytes: usize,
    /// Bounded queue length in records; `append` blocks while it is full.
    pub queue_records: usize,
    /// Most batch writes in flight at once (writer pipelining), 1 ..= 8; default 1.
    /// Depth 2 was measured slower on a virtio disk that barely overlaps two durable
    /// writes (batches halve, each write gets slower: benches/README.md); raise it on
    /// devices that do overlap them (NVMe).
    /// Only an engine that can submit without waiting (io_uring) goes beyond 1; the
    /// std engine always runs at depth 1. The depth used is recorded in each segment
    /// header, and recovery tolerates a torn tail of up to that many batches (see
    /// FORMAT.md). 1 behaves exactly like the unpipelined writer.
    pub max_inflight_batches: usize,
    /// Run completion callbacks on the writer thread as soon as their batch is
    /// durable, instead of handing them to the completion thread. One thread hop
    /// less per batch (measured ~5% more 4k QD32 write IOPS through NBD on 2 cores),
    /// but the writer submits nothing while callbacks run: only for callers whose
    /// callbacks never block (a primary's: they wake the waiting request). Default
    /// false: a callback that may block needs the completion thread (ferryd's never
    /// block, and it turns this on).
    pub inline_completions: bool,
    /// Nice value for the writer thread; 0 leaves it alone. Why: every durable
    /// append waits for this thread to be scheduled once its write completes. A
    /// refusal (no CAP_SYS_NICE) is logged, never an error.
    pub writer_nice: i32,
    /// Encryption at rest: with a key-encryption key every segment activated from
    /// now on is encrypted (SM4-GCM, FORMAT.md "Encryption at rest"), and segments
    /// already encrypted need it to open (a missing or wrong key is refused with
    /// [`JournalError::KeyRequired`] / [`JournalError::WrongKey`] before anything on
    /// disk is touched). Plaintext segments stay readable either way.
    pub encryption: Option<std::sync::Arc<ferry_gm::atrest::Kek>>,
}

impl JournalOptions {
    pub const MIN_SEGMENT_SIZE: u64 = 1 << 20;
    pub const MAX_SEGMENT_SIZE: u64 = 1 << 32;

    pub fn new(dir: impl Into<PathBuf>, cluster_id: [u8; 16]) -> JournalOptions {
        JournalOptions {
            dir: dir.into(),
            cluster_id,
            epoch: 0,
            segment_size: 64 << 20,
            capacity: 1 << 30,
            engine: EngineChoice::Auto,
            recovery: RecoveryMode::TolerateTornTail,
            max_batch_bytes: 4 << 20,
            queue_records: 1024,
            max_inflight_batches: 1,
            inline_completions: false,
            writer_nice: 0,
            encryption: None,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), JournalError> {
        let bad = |m: String| Err(JournalError::InvalidOptions(m));
        if self.segment_size < Self::MIN_SEGMENT_SIZE
            || self.segment_size > Self::MAX_SEGMENT_SIZE
            || !format::is_block_aligned(self.segment_size)
        {
            return bad(format!(
                "segment_size {} must be a multiple of 4 KiB in [1 MiB, 4 GiB]",
                self.segment_size
            ));
        }
        if self.capacity / self.segment_size < 2 {
            return bad(format!(
                "capacity {} must hold at least 2 segments of {}",
                self.capacity, self.segment_size
            ));
        }
        if self.max_batch_bytes == 0 || self.queue_records == 0 {
            return bad("max_batch_bytes and queue_records must be > 0".into());
        }
        if self.max_inflight_batches == 0
            || self.max_inflight_batches > format::MAX_INFLIGHT_BATCHES as usize
        {
            return bad(format!(
                "max_inflight_batches {} must be in 1..={}",
                self.max_inflight_batches,
                format::MAX_INFLIGHT_BATCHES
            ));
        }
        Ok(())
    }

    /// Largest record data a segment can hold: one batch with one record after
    /// the segment header block (and its tag, when encrypted).
    pub fn max_record_data(&self) -> u64 {
        let tag = if self.encryption.is_some() {
            format::BODY_TAG_LEN as u64
        } else {
            0
        };
        self.segment_size
            - format::SEGMENT_HEADER_BLOCK
            - format::BATCH_HEADER_LEN as u64
            - format::RECORD_HEADER_LEN as u64
            - tag
    }
}
