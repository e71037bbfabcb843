//! Protected volumes and the journal-first write path.
//!
//! All volumes of a daemon form one consistency group: they share one journal and one
//! global sequence, so write order across volumes is preserved everywhere downstream.
//!
//! A write travels:
//! 1. NBD task → `Journal::append` (assigns the sequence; the writer thread group-commits
//!    it with O_DIRECT and makes it durable);
//! 2. the journal's completion (called strictly in sequence order) hands the record to
//!    the [`ApplyGate`], which releases it once every earlier overlapping record is
//!    applied (so overlapping writes reach the base in journal order — the order crash
//!    replay uses);
//! 3. the NBD task that issued it writes it to the base, the gate advances the
//!    contiguous `applied_seq`, and the task replies.
//!
//! So an acknowledged write is durable (journal) and visible to reads (base). A FLUSH
//! therefore has nothing left to make durable; it only seals the current write-set.
//! Because every acknowledgement implies durability, FLUSH on any connection covers
//! writes acknowledged on every connection: `CAN_MULTI_CONN` is advertised truthfully.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferry_journal::{Journal, JournalError, Op, Record, Seq};
use tokio::sync::{oneshot, Semaphore};

use crate::ship::{ShipFeed, SyncGate};

use ferry_nbd::{Export, ExportError, ExportFlags, ExportRegistry};

use crate::primary::apply::{ApplyGate, ApplyGuard, Released};
use crate::primary::frontend::{Frontend, FrontendOp};
use crate::store::base::{file_extents, Base};

/// Reads above this size go to a blocking-pool thread; smaller ones are served inline,
/// because a page-cache pread of a few KiB costs less than a thread hand-off.
const INLINE_READ_MAX: u32 = 64 << 10;
/// Mutations above this size (writes, and trims and write-zeroes by the range they
/// cover) are applied on the blocking pool rather than inline.
const INLINE_APPLY_MAX: u32 = 64 << 10;
/// Writes up to this size are applied by the journal's completion path: a page-cache
/// copy this small costs less than the task wake-up it saves, and it delays the
/// writer's next batch by only a few microseconds.
const COMPLETION_APPLY_MAX: u32 = 16 << 10;

/// State shared by every volume of the consistency group.
pub struct Group {
    pub journal: Arc<Journal>,
    pub gate: Arc<ApplyGate>,
    /// What the shippers read, fed by the journal completions (off without targets).
    pub feed: Arc<ShipFeed>,
    /// Set when sync targets exist: writes wait for them before the reply.
    pub sync: parking_lot::RwLock<Option<Arc<SyncGate>>>,
    /// Journal queue slots: async writers wait here instead of blocking a runtime thread
    /// inside `Journal::append`.
    slots: Arc<Semaphore>,
    /// Writes since the last write-set seal.
    dirty: AtomicBool,
    pub frontend: Arc<Frontend>,
    /// Why writes are refused (an outdated primary, a switchover), if they are.
    fence: parking_lot::RwLock<Option<String>>,
    /// Mutations past the fence check and not yet answered (a switchover drains them).
    inflight: std::sync::atomic::AtomicUsize,
}

/// Counts one mutation in flight for [`Group::drain`].
struct InFlight<'a>(&'a std::sync::atomic::AtomicUsize);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Group {
    pub fn new(journal: Arc<Journal>, applied_from: Seq, queue_slots: usize) -> Arc<Group> {
        Arc::new(Group {
            feed: Arc::new(ShipFeed::new(journal.durable_seq())),
            journal,
            gate: ApplyGate::new(applied_from),
            sync: parking_lot::RwLock::new(None),
            slots: Arc::new(Semaphore::new(queue_slots.max(1))),
            dirty: AtomicBool::new(false),
            frontend: Default::default(),
            fence: parking_lot::RwLock::new(None),
            inflight: Default::default(),
        })
    }

    /// Refuses every later write with `reason` (reads go on); `None` lifts it.
    pub fn set_fence(&self, reason: Option<String>) {
        *self.fence.write() = reason;
    }

    pub fn fenced(&self) -> Option<String> {
        self.fence.read().clone()
    }

    /// Waits (bounded) until no write that passed the fence is still in flight.
    pub async fn drain(&self, timeout: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        while self.inflight.load(Ordering::SeqCst) > 0 {
            if tokio::time::Instant::now() > deadline {
                return false;
            }
            tokio::time::sleep(std::time::Duration::from_millis(1)).await;
        }
        true
    }

    pub fn applied_seq(&self) -> Seq {
        self.gate.applied_seq()
    }

    /// Journals a mutation, waits until it is durable and released by the gate, then
    /// applies it to the base (inline when small, on the blocking pool when large).
    async fn mutate(
        &self,
        base: &Arc<Base>,
        op: Op,
        offset: u64,
        length: u32,
        data: Bytes,
    ) -> Result<(), ExportError> {
        if self.gate.failed() {
            return Err(ExportError::Io(
                "volume group failed an earlier base write; restart ferryd to replay the journal"
                    .into(),
            ));
        }
        // Counted before the fence check (a drain that sees zero after raising the
        // fence can trust that no write slips past it).
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let _inflight = InFlight(&self.inflight);
        if let Some(why) = self.fence.read().clone() {
            return Err(ExportError::ReadOnly(why));
        }
        let started = std::time::Instant::now();
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ExportError::ShuttingDown)?;
        let (tx, rx) = oneshot::channel();
        let gate = self.gate.clone();
        let item_base = base.clone();
        let item_data = data.clone();
        let feed = self.feed.clone();
        // Small writes reach the base on the completion path (see `apply`'s module
        // doc), except while a verify runs: it may read before-images there.
        let apply_now = op == Op::Write && length <= COMPLETION_APPLY_MAX;
        let done: ferry_journal::Completion = Box::new(move |res: Result<Seq, JournalError>| {
            drop(permit);
            match res {
                Ok(seq) => {
                    feed.journaled(seq, || Record {
                        volume: item_base.id,
                        op,
                        offset,
                        length,
                        data: item_data.clone(),
                    });
                    let guard = ApplyGuard::new(
                        gate.clone(),
                        seq,
                        item_base,
                        op,
                        offset,
                        length,
                        item_data,
                    );
                    let now = apply_now && gate.verify.is_idle();
                    gate.ready(guard, tx, now);
                }
                Err(e) => {
                    let _ = tx.send(Err(e));
                }
            }
        });
        let rec = Record {
            volume: base.id,
            op,
            offset,
            length,
            data,
        };
        let seq = self
            .journal
            .append(rec, done)
            .map_err(|e| ExportError::Io(format!("journal: {e}")))?;
        self.dirty.store(true, Ordering::Relaxed);
        let released = rx
            .await
            .map_err(|_| ExportError::ShuttingDown)?
            .map_err(|e| ExportError::Io(format!("journal: {e}")))?;
        self.frontend.observe_journal_wait(started);
        let result = self.apply_released(base, released, op, length, seq).await;
        // A target over its `max_lag_seconds` holds the reply (`ship::pace`).
        if result.is_ok() {
            self.feed.pace().await;
        }
        result
    }

    /// Applies a released mutation (off the runtime when large), waits for the sync
    /// targets, and maps the base's error for the client.
    async fn apply_released(
        &self,
        base: &Base,
        released: Released,
        op: Op,
        length: u32,
        seq: Seq,
    ) -> Result<(), ExportError> {
        let result = match released {
            Released::Applied(r) => r,
            Released::Guard(guard) if applies_inline(op, length) => guard.apply(),
            Released::Guard(guard) => tokio::task::spawn_blocking(move || guard.apply())
                .await
                .map_err(|e| ExportError::Io(format!("apply task: {e}")))?,
        };
        // Sync targets must hold the write durably before the client hears of it.
        let sync = self.sync.read().clone();
        if let Some(sync) = sync {
            if result.is_ok() && sync.has_sync_targets() {
                sync.wait(seq).await;
            }
        }
        result.map_err(|e| {
            if e.raw_os_error() == Some(libc::ENOSPC) {
                ExportError::NoSpace
            } else {
                ExportError::Io(format!("base volume {}: {e}", base.path.display()))
            }
        })
    }

    /// Seals the current write-set if anything was written since the last seal. The
    /// seal needs no wait: every acknowledged write is already durable; the seal only
    /// marks a boundary for shipping and point-in-time recovery. A non-empty marker
    /// (a bookmark name) is always journaled. Returns the seal's sequence, if any.
    pub fn seal(&self, marker: Bytes) -> Result<Option<Seq>, ExportError> {
        self.seal_then(marker, None)
    }

    /// [`Group::seal`], calling `on_durable` with the seal's sequence from its journal
    /// completion: before any later record's completion, so before any later record
    /// is applied.
    pub fn seal_then(
        &self,
        marker: Bytes,
        on_durable: Option<Box<dyn FnOnce(Seq) + Send>>,
    ) -> Result<Option<Seq>, ExportError> {
        if let Some(why) = self.fenced() {
            // Everything acknowledged is durable already: a FLUSH has nothing to do,
            // but a bookmark would be a new record.
            return if marker.is_empty() {
                Ok(None)
            } else {
                Err(ExportError::ReadOnly(why))
            };
        }
        if !self.dirty.swap(false, Ordering::Relaxed) && marker.is_empty() {
            return Ok(None);
        }
        let rec = Record {
            volume: 0,
            op: Op::Seal,
            offset: 0,
            length: 0,
            data: marker,
        };
        let gate = self.gate.clone();
        let feed = self.feed.clone();
        let seal_rec = rec.clone();
        let done: ferry_journal::Completion = Box::new(move |res: Result<Seq, JournalError>| {
            if let Ok(seq) = res {
                if let Some(f) = on_durable {
                    f(seq);
                }
                feed.journaled(seq, || seal_rec);
                gate.skip(seq);
            }
        });
        self.journal
            .append(rec, done)
            .map(Some)
            .map_err(|e| ExportError::Io(format!("journal: {e}")))
    }
}

/// Whether a released mutation is applied on the runtime worker that issued it. Only
/// small ones: a trim or write-zeroes of gigabytes (`fallocate` over the range, or
/// zeroes written where the file system cannot punch) can take seconds, and on a
/// runtime with one worker every other request, the control socket and the
/// replication sessions would wait behind it.
fn applies_inline(op: Op, length: u32) -> bool {
    match op {
        Op::Write | Op::Trim | Op::WriteZeroes => length <= INLINE_APPLY_MAX,
        Op::Seal => true,
    }
}

/// Reads what the page cache holds of `buf.len()` bytes at `offset` without blocking
/// on the device (`preadv2(RWF_NOWAIT)`); returns how many bytes it read (0 on a miss,
/// or where the kernel does not support the flag: the caller reads the rest).
fn read_cached(file: &File, buf: &mut [u8], offset: u64) -> usize {
    let mut done = 0usize;
    while done < buf.len() {
        let iov = libc::iovec {
            iov_base: buf[done..].as_mut_ptr().cast(),
            iov_len: buf.len() - done,
        };
        // SAFETY: one iovec over our own buffer's unfilled tail; the fd is ours.
        let n = unsafe {
            libc::preadv2(
                file.as_raw_fd(),
                &iov,
                1,
                (offset + done as u64) as libc::off_t,
                libc::RWF_NOWAIT,
            )
        };
        if n <= 0 {
            break;
        }
        done += n as usize;
    }
    done
}

/// A protected volume served as an NBD export.
pub struct Volume {
    pub base: Arc<Base>,
    pub group: Arc<Group>,
}

impl Volume {
    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.base.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                self.base.size
            ))),
        }
    }
}

impl Export for Volume {
    fn name(&self) -> &str {
        &self.base.name
    }

    fn size(&self) -> u64 {
        self.base.size
    }

    fn flags(&self) -> ExportFlags {
        ExportFlags {
            read_only: false,
            can_trim: true,
            can_write_zeroes: true,
            can_multi_conn: true,
            send_fua: true,
            send_flush: true,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let started = std::time::Instant::now();
        let r = self.read_inner(offset, len).await;
        self.observe(FrontendOp::Read, len as u64, started, r.is_ok());
        r
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        let started = std::time::Instant::now();
        let len = data.len() as u64;
        let r = self.write_inner(offset, data, fua).await;
        self.observe(FrontendOp::Write, len, started, r.is_ok());
        r
    }

    async fn flush(&self) -> Result<(), ExportError> {
        let started = std::time::Instant::now();
        let r = self.group.seal(Bytes::new()).map(|_| ());
        self.observe(FrontendOp::Flush, 0, started, r.is_ok());
        r
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        let started = std::time::Instant::now();
        let r = self.trim_inner(offset, len).await;
        self.observe(FrontendOp::Trim, len as u64, started, r.is_ok());
        r
    }

    async fn write_zeroes(&self, offset: u64, len: u32, may_trim: bool) -> Result<(), ExportError> {
        let started = std::time::Instant::now();
        let r = self.write_zeroes_inner(offset, len, may_trim).await;
        self.observe(FrontendOp::WriteZeroes, len as u64, started, r.is_ok());
        r
    }

    /// Holes of the base file (block status, sparse reads). Every acknowledged write
    /// has reached the base already (see `Group::mutate`), so a hole here is a hole the
    /// client can rely on.
    async fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<ferry_nbd::Extent>, ExportError> {
        self.check(offset, len)?;
        let base = self.base.clone();
        tokio::task::spawn_blocking(move || file_extents(&base.file, offset, len, max))
            .await
            .map_err(|e| ExportError::Io(format!("extents task: {e}")))?
    }
}

/// The request bodies, timed and counted by the `Export` methods above.
impl Volume {
    fn observe(&self, op: FrontendOp, bytes: u64, started: std::time::Instant, ok: bool) {
        self.group.frontend.observe(op, bytes, started, ok);
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.check(offset, len as u64)?;
        let base = self.base.clone();
        let mut buf = BytesMut::zeroed(len as usize);
        // Small reads first try the page cache without blocking (RWF_NOWAIT): a hit
        // is served right here, with no thread hop. A miss would stall this runtime
        // worker on the disk (and with it every other request it serves), so the
        // rest goes to the blocking pool, where many misses wait in parallel.
        let done = if len <= INLINE_READ_MAX {
            read_cached(&base.file, &mut buf, offset)
        } else {
            0
        };
        if done == buf.len() {
            return Ok(buf.freeze());
        }
        tokio::task::spawn_blocking(move || -> Result<Bytes, ExportError> {
            base.file
                .read_exact_at(&mut buf[done..], offset + done as u64)
                .map_err(|e| ExportError::Io(format!("read {}: {e}", base.path.display())))?;
            Ok(buf.freeze())
        })
        .await
        .map_err(|e| ExportError::Io(format!("read task: {e}")))?
    }

    async fn write_inner(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        // FUA needs nothing extra: the write is acknowledged only once journaled durably.
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| ExportError::Invalid("write larger than 4 GiB".into()))?;
        self.group
            .mutate(&self.base, Op::Write, offset, len, data)
            .await
    }

    async fn trim_inner(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        self.group
            .mutate(&self.base, Op::Trim, offset, len, Bytes::new())
            .await
    }

    async fn write_zeroes_inner(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        self.group
            .mutate(&self.base, Op::WriteZeroes, offset, len, Bytes::new())
            .await
    }
}

/// The daemon's exports, by name.
pub struct Registry {
    pub volumes: Vec<Arc<Volume>>,
}

impl ExportRegistry for Registry {
    type E = Volume;
    fn lookup(&self, name: &str) -> Option<Arc<Volume>> {
        self.volumes.iter().find(|v| v.base.name == name).cloned()
    }
    fn names(&self) -> Vec<String> {
        self.volumes.iter().map(|v| v.base.name.clone()).collect()
    }
    fn default_export(&self) -> Option<String> {
        self.volumes.first().map(|v| v.base.name.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Issue 17: a huge TRIM or WRITE_ZEROES must not run on the runtime's worker
    /// (ferryd's runtime may have only one); small mutations stay inline, where a
    /// thread hand-off would cost more than the work.
    #[test]
    fn only_small_mutations_are_applied_on_the_runtime_worker() {
        for op in [Op::Write, Op::Trim, Op::WriteZeroes] {
            assert!(applies_inline(op, 4096), "{op:?}");
            assert!(applies_inline(op, INLINE_APPLY_MAX), "{op:?}");
            assert!(!applies_inline(op, INLINE_APPLY_MAX + 1), "{op:?}");
            assert!(!applies_inline(op, 1 << 30), "{op:?} of 1 GiB");
            assert!(!applies_inline(op, u32::MAX), "{op:?} of 4 GiB");
        }
    }
}
