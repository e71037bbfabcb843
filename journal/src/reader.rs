//! Reader of durable entries (for shipping and replay). Encrypted segments are
//! decrypted with the data key their `SegInfo` carries. Uses plain `pread` on its
//! own file handles and never looks past `durable_seq`, so it runs safely while
//! the writer appends.
//!
//! What the reader needs from the live journal is the [`DurableLog`] trait defined
//! here: the writer's shared state implements it, so the writer depends on the
//! reader (it hands readers out) and never the other way round.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use bytes::Bytes;

use crate::error::{JournalError, Result};
use crate::format::{self, Seq, BLOCK_SIZE, SEGMENT_HEADER_BLOCK};
use crate::recovery::SegInfo;
use crate::segment;
use crate::{BatchMeta, JournalEntry};

/// The live journal as a reader sees it. Each call takes the journal's own locks
/// briefly; the answers may be stale by the time they are used, which the reader
/// tolerates (a released segment shows up as [`JournalError::Released`]).
pub(crate) trait DurableLog: Send + Sync {
    /// Highest sequence that is durable (readers never look past it).
    fn durable_seq(&self) -> Seq;
    /// If `seq` lies in a range skipped on purpose (never written), that range's
    /// last sequence.
    fn skipped_through(&self, seq: Seq) -> Option<Seq>;
    /// First sequence still held, if any segment holds data.
    fn first_seq(&self) -> Option<Seq>;
    /// The newest data segment starting at or before `seq`, or the first sequence
    /// still held (0 if none) when `seq` was released.
    fn segment_holding(&self, seq: Seq) -> std::result::Result<SegInfo, Seq>;
}

struct Cursor {
    no: u64,
    path: PathBuf,
    file: File,
    size: u64,
    pos: u64,
    /// The segment's data key (encrypted segments).
    key: Option<Arc<ferry_gm::atrest::DataKey>>,
}

/// Iterator over durable entries in sequence order. Returns `None` once it has
/// caught up with `durable_seq`; calling `next` again later continues with newly
/// durable entries. After an error it returns `None`.
pub struct JournalReader {
    log: Arc<dyn DurableLog>,
    next: Seq,
    cur: Option<Cursor>,
    pending: VecDeque<JournalEntry>,
    failed: bool,
}

impl JournalReader {
    pub(crate) fn new(log: Arc<dyn DurableLog>, from: Seq) -> Result<JournalReader> {
        let first = log.first_seq();
        let next = match first {
            Some(f) if from == 0 => f,
            Some(f) if from < f => {
                return Err(JournalError::Released {
                    requested: from,
                    first_available: f,
                })
            }
            _ => from.max(1),
        };
        Ok(JournalReader {
            log,
            next,
            cur: None,
            pending: VecDeque::new(),
            failed: false,
        })
    }

    /// Next sequence this reader will return.
    pub fn position(&self) -> Seq {
        self.pending.front().map_or(self.next, |e| e.seq)
    }

    /// Reads the next batch holding `self.next` into `pending`. Ok(false): caught up.
    fn fill(&mut self) -> Result<bool> {
        let durable = self.log.durable_seq();
        // Bounded: each iteration skips one batch or moves to a later segment;
        // a segment holds at most size / 4 KiB batches.
        loop {
            // Sequences skipped on purpose (Journal::skip_to) were never written.
            if let Some(end) = self.log.skipped_through(self.next) {
                self.next = end + 1;
            }
            if self.next > durable {
                return Ok(false);
            }
            let seg = self
                .log
                .segment_holding(self.next)
                .map_err(|first_available| JournalError::Released {
                    requested: self.next,
                    first_available,
                })?;
            if self.cur.as_ref().is_none_or(|c| c.no != seg.no) {
                let file = segment::open_ro(&seg.path)?;
                self.cur = Some(Cursor {
                    no: seg.no,
                    path: seg.path.clone(),
                    file,
                    size: seg.size,
                    pos: SEGMENT_HEADER_BLOCK,
                    key: seg.key.clone(),
                });
            }
            let Some(c) = self.cur.as_mut() else {
                return Ok(false);
            };
            let corrupt = |c: &Cursor, reason: String| JournalError::Corruption {
                segment: c.path.clone(),
                offset: c.pos,
                reason,
            };
            if c.pos + BLOCK_SIZE as u64 > c.size {
                return Err(corrupt(
                    c,
                    format!("durable seq {} not found before the segment end", self.next),
                ));
            }
            let mut block = vec![0u8; format::BATCH_HEADER_LEN];
            segment::read_exact_at(&c.file, &c.path, &mut block, c.pos)?;
            let h = format::decode_batch_header(&block, c.no)
                .map_err(|e| corrupt(c, format!("looking for durable seq {}: {e}", self.next)))?;
            let disk = h.disk_len();
            if h.last_seq < self.next {
                c.pos += disk;
                continue;
            }
            if h.first_seq > self.next {
                return Err(corrupt(
                    c,
                    format!(
                        "batch starts at seq {}, expected {}",
                        h.first_seq, self.next
                    ),
                ));
            }
            let mut buf = vec![0u8; format::BATCH_HEADER_LEN + h.body_len as usize];
            segment::read_exact_at(&c.file, &c.path, &mut buf, c.pos)?;
            let body = Bytes::from(buf).slice(format::BATCH_HEADER_LEN..);
            let recs = format::decode_batch_body_at(&h, &body, c.pos, c.key.as_deref())
                .map_err(|e| corrupt(c, e.to_string()))?;
            let meta = BatchMeta {
                epoch: h.epoch,
                timestamp_ns: h.timestamp_ns,
                first_seq: h.first_seq,
                last_seq: h.last_seq,
            };
            for (seq, record) in recs {
                if seq >= self.next {
                    self.pending.push_back(JournalEntry { seq, meta, record });
                }
            }
            self.next = h.last_seq + 1;
            c.pos += disk;
            return Ok(true);
        }
    }

    /// If `next` was released meanwhile, say so instead of reporting the stale
    /// bytes of a recycled segment as corruption.
    fn released_instead(&self, e: JournalError) -> JournalError {
        match self.log.first_seq() {
            Some(f) if self.next < f => JournalError::Released {
                requested: self.next,
                first_available: f,
            },
            _ => e,
        }
    }
}

impl Iterator for JournalReader {
    type Item = Result<JournalEntry>;

    fn next(&mut self) -> Option<Self::Item> {
        if let Some(e) = self.pending.pop_front() {
            return Some(Ok(e));
        }
        if self.failed {
            return None;
        }
        match self.fill() {
            Ok(true) => self.pending.pop_front().map(Ok),
            Ok(false) => None,
            Err(e) => {
                self.failed = true;
                Some(Err(self.released_instead(e)))
            }
        }
    }
}
