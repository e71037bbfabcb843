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
//! 3. the record is written to the base (by the completion path or the issuing task),
//!    and the gate advances the contiguous `applied_seq`.
//!
//! When the client hears of the write depends on the volume's cache mode
//! (`volume.cache`, [`Cache`]):
//! * **writethrough**: after step 3 and after every sync target holds it durably. An
//!   acknowledged write is durable and on the base; a FLUSH has nothing left to make
//!   durable and only seals the current write-set.
//! * **writeback**: after step 1. The write holds its sequence (so its order against
//!   every other write is fixed) and a hold on its range in the gate, so a read that
//!   overlaps it waits until it is applied: reads see every acknowledged write. Steps
//!   2-3 run exactly as in writethrough, on a task of their own: the base never holds
//!   a write the journal lacks. A FLUSH (and a write with FUA) replies only once every
//!   write sequenced before it is durable and applied here and held by every sync
//!   target ([`Group::barrier`]). A journal failure after such a write was
//!   acknowledged fails the group: every later write and FLUSH gets EIO (a write-back
//!   cache reports errors at flush). With sync targets configured, the reply also
//!   waits until the sync targets (as the policy asks) have *received* the write
//!   (DRBD's protocol B: V4 received acks, `SyncGate::wait_received`): a primary crash
//!   alone then loses no acknowledged write, since each such standby makes durable
//!   what it received; a crash of the primary and those standbys together may lose
//!   writes not yet flushed. A standby older than V4 acknowledges only durable
//!   records, so there the reply waits for durable on it.
//! * **writethrough-until-flush** (default): writethrough until the volume's first
//!   FLUSH, then writeback until the daemon restarts.
//!
//! Either way, a FLUSH on any connection covers writes acknowledged on every
//! connection (the barrier is the last sequence assigned when it arrived, across the
//! group), so `CAN_MULTI_CONN` is advertised truthfully, and so are SEND_FLUSH and
//! SEND_FUA (writeback needs them; writethrough honours them trivially).
//!
//! Memory stays bounded in writeback: the journal queue slots bound the records not
//! yet durable, and a byte budget ([`WRITEBACK_BUDGET`]) the acknowledged ones not yet
//! applied. `inflight` counts a writeback write until it is applied, so a switchover's
//! drain waits for it.
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use ferry_api::config::CacheMode;
use ferry_journal::{Journal, JournalError, Op, Record, Seq};
use tokio::sync::{oneshot, OwnedSemaphorePermit, Semaphore};

use crate::ship::{ShipFeed, SyncGate};

use ferry_nbd::{Export, ExportError, ExportFlags, ExportRegistry};

use crate::primary::apply::{ApplyGate, ApplyGuard, Released, Ticket};
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
/// Bytes of writeback writes acknowledged and not yet applied, at most (a larger
/// single write takes the whole budget). Bounds what clients can pile up in memory
/// once replies no longer wait for the disk.
pub const WRITEBACK_BUDGET: u64 = 256 << 20;
/// The budget's unit: writes are charged by the 4 KiB block, rounded up.
const BUDGET_UNIT: u64 = 4096;

/// What a mutation's reply waits for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Durable in the journal, applied to the base, held by every sync target.
    Durable,
    /// Sequenced in the journal and visible to reads, and received by the sync
    /// targets (a writeback write).
    Sequenced,
}

/// A volume's cache mode: configured, and whether its first FLUSH was seen.
#[derive(Debug)]
pub struct Cache {
    configured: CacheMode,
    flushed: AtomicBool,
}

impl Cache {
    pub fn new(configured: CacheMode) -> Cache {
        Cache {
            configured,
            flushed: AtomicBool::new(false),
        }
    }

    pub fn configured(&self) -> CacheMode {
        self.configured
    }

    /// The mode writes get now: writeback or writethrough.
    pub fn effective(&self) -> CacheMode {
        match self.configured {
            CacheMode::WritethroughUntilFlush if self.flushed.load(Ordering::Acquire) => {
                CacheMode::Writeback
            }
            CacheMode::WritethroughUntilFlush => CacheMode::Writethrough,
            m => m,
        }
    }

    /// Records a FLUSH; returns the mode writes had before it (a FLUSH after
    /// writethrough writes only has nothing to wait for).
    fn flush_seen(&self) -> CacheMode {
        match self.configured {
            CacheMode::WritethroughUntilFlush if !self.flushed.swap(true, Ordering::AcqRel) => {
                CacheMode::Writethrough
            }
            _ => self.effective(),
        }
    }
}

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
    /// Mutations past the fence check and not yet answered, or, in writeback, not yet
    /// applied (a switchover drains them).
    inflight: Arc<AtomicUsize>,
    /// [`WRITEBACK_BUDGET`] in [`BUDGET_UNIT`]s.
    writeback: Arc<Semaphore>,
    /// The volumes' cache modes, by name (for status).
    caches: parking_lot::RwLock<Vec<(String, Arc<Cache>)>>,
}

/// Counts one mutation in flight for [`Group::drain`].
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Group {
    pub fn new(journal: Arc<Journal>, applied_from: Seq, queue_slots: usize) -> Arc<Group> {
        Arc::new(Group {
            feed: Arc::new(ShipFeed::new_early(journal.durable_seq())),
            journal,
            gate: ApplyGate::new(applied_from),
            sync: parking_lot::RwLock::new(None),
            slots: Arc::new(Semaphore::new(queue_slots.max(1))),
            dirty: AtomicBool::new(false),
            frontend: Default::default(),
            fence: parking_lot::RwLock::new(None),
            inflight: Default::default(),
            writeback: Arc::new(Semaphore::new(budget_units(WRITEBACK_BUDGET) as usize)),
            caches: Default::default(),
        })
    }

    /// The effective cache mode of each volume, by name.
    pub fn cache_modes(&self) -> Vec<(String, CacheMode, CacheMode)> {
        self.caches
            .read()
            .iter()
            .map(|(n, c)| (n.clone(), c.configured(), c.effective()))
            .collect()
    }

    /// The error every write and FLUSH gets once the group failed.
    fn failed_error() -> ExportError {
        ExportError::Io(
            "volume group failed: a journaled write could not be journaled or applied; \
             restart ferryd to replay the journal"
                .into(),
        )
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

    /// Journals a mutation and replies as `ack` says: once it is durable, applied and
    /// held by the sync targets ([`Ack::Durable`]), or once it is sequenced, leaving
    /// the rest to a task of its own ([`Ack::Sequenced`]).
    async fn mutate(
        self: &Arc<Self>,
        base: &Arc<Base>,
        op: Op,
        offset: u64,
        length: u32,
        data: Bytes,
        ack: Ack,
    ) -> Result<(), ExportError> {
        if self.gate.failed() {
            return Err(Self::failed_error());
        }
        // Counted before the fence check (a drain that sees zero after raising the
        // fence can trust that no write slips past it).
        self.inflight.fetch_add(1, Ordering::SeqCst);
        let inflight = InFlight(self.inflight.clone());
        if let Some(why) = self.fence.read().clone() {
            return Err(ExportError::ReadOnly(why));
        }
        let started = std::time::Instant::now();
        let budget = match ack {
            Ack::Sequenced => Some(self.budget(length).await?),
            Ack::Durable => None,
        };
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ExportError::ShuttingDown)?;
        let hold = (ack == Ack::Sequenced)
            .then(|| self.gate.hold(base.id, offset, offset + u64::from(length)));
        let (seq, rx) = self
            .submit(base, (op, offset, length, data), permit, hold)
            .inspect_err(|_| {
                if let Some(t) = hold {
                    self.gate.unhold(t);
                }
            })?;
        self.dirty.store(true, Ordering::Relaxed);
        if ack == Ack::Durable {
            self.complete(base, rx, (op, length, seq), started, true)
                .await?;
        } else {
            let (group, base) = (self.clone(), base.clone());
            tokio::spawn(async move {
                let _until_applied = (inflight, budget);
                // No durable wait for the sync targets: FLUSH and FUA do that.
                let done = group.complete(&base, rx, (op, length, seq), started, false);
                if let Err(e) = done.await {
                    group.lost(seq, &e);
                }
            });
            self.received_by_sync_targets(seq).await?;
        }
        // A target over its `max_lag_seconds` holds the reply (`ship::pace`), in
        // every cache mode: writeback replies are what writers pace themselves by.
        self.feed.pace().await;
        Ok(())
    }

    /// A writeback write's share of [`WRITEBACK_BUDGET`], held until it is applied.
    async fn budget(&self, length: u32) -> Result<OwnedSemaphorePermit, ExportError> {
        let units = budget_units(u64::from(length)).min(budget_units(WRITEBACK_BUDGET));
        self.writeback
            .clone()
            .acquire_many_owned(units as u32)
            .await
            .map_err(|_| ExportError::ShuttingDown)
    }

    /// Appends the record; its completion hands it to the gate (which applies it or
    /// releases it to `complete`). A writeback record's journal failure fails the
    /// group right there, in sequence order: no later FLUSH or FUA write can succeed
    /// past a lost write.
    fn submit(
        &self,
        base: &Arc<Base>,
        (op, offset, length, data): (Op, u64, u32, Bytes),
        permit: OwnedSemaphorePermit,
        hold: Option<Ticket>,
    ) -> Result<(Seq, oneshot::Receiver<Result<Released, JournalError>>), ExportError> {
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
                    )
                    .with_hold(hold);
                    let now = apply_now && gate.verify.is_idle();
                    gate.ready(guard, tx, now);
                }
                Err(e) => {
                    if hold.is_some() {
                        gate.fail();
                    }
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
            .append_sequenced(rec, |seq, r| self.feed.sequenced(seq, r), done)
            .map_err(|e| ExportError::Io(format!("journal: {e}")))?;
        Ok((seq, rx))
    }

    /// Waits for the record's release, applies it and (`wait_sync`) waits until the
    /// sync targets hold it durably.
    async fn complete(
        &self,
        base: &Base,
        rx: oneshot::Receiver<Result<Released, JournalError>>,
        (op, length, seq): (Op, u32, Seq),
        started: std::time::Instant,
        wait_sync: bool,
    ) -> Result<(), ExportError> {
        let released = rx
            .await
            .map_err(|_| ExportError::ShuttingDown)?
            .map_err(|e| ExportError::Io(format!("journal: {e}")))?;
        self.frontend.observe_journal_wait(started);
        self.apply_released(base, released, (op, length, seq), wait_sync)
            .await
    }

    /// A writeback write's reply waits until the sync targets have received it (the
    /// gate's received position; see the module doc) and this journal holds it. EIO
    /// if the group fails first (its journal write failed).
    ///
    /// The local wait is needed because the record is shipped in parallel with the
    /// journal write (`ship::feed`): the standby may hold it first. A primary that
    /// crashed before its journal did and then restarted would lack a write it had
    /// acknowledged, and its crash horizon resyncs the standbys to its own content.
    async fn received_by_sync_targets(&self, seq: Seq) -> Result<(), ExportError> {
        let sync = self.sync.read().clone();
        let Some(sync) = sync.filter(|s| s.has_sync_targets()) else {
            return Ok(());
        };
        // Applied implies durable (the gate sees records after their completion);
        // small writes are applied on the completion path itself.
        let both = async { tokio::join!(sync.wait_received(seq), self.gate.wait_applied(seq)).1 };
        tokio::select! {
            true = both => Ok(()),
            _ = self.gate.wait_failed() => Err(Self::failed_error()),
        }
    }

    /// An acknowledged writeback write failed after its reply: the group fails (if
    /// the gate has not already), so every later write and FLUSH reports it.
    fn lost(&self, seq: Seq, e: &ExportError) {
        tracing::error!(
            seq,
            "an acknowledged writeback write failed: {e}; every later write and FLUSH \
             fails; restart ferryd to replay the journal"
        );
        self.gate.fail();
    }

    /// The FLUSH barrier of writeback: waits until every record sequenced so far (on
    /// any connection and volume) is durable in the journal and applied, then until
    /// every sync target holds it. EIO if the group failed first.
    pub async fn barrier(&self) -> Result<(), ExportError> {
        if self.gate.failed() {
            return Err(Self::failed_error());
        }
        let last = self.journal.last_seq();
        // Applied implies durable: the gate only sees records after their completion.
        if !self.gate.wait_applied(last).await {
            return Err(Self::failed_error());
        }
        let sync = self.sync.read().clone();
        if let Some(sync) = sync {
            if sync.has_sync_targets() {
                sync.wait(last).await;
            }
        }
        Ok(())
    }

    /// Applies a released mutation (off the runtime when large), waits for the sync
    /// targets (`wait_sync`), and maps the base's error for the client.
    async fn apply_released(
        &self,
        base: &Base,
        released: Released,
        (op, length, seq): (Op, u32, Seq),
        wait_sync: bool,
    ) -> Result<(), ExportError> {
        let result = match released {
            Released::Applied(r) => r,
            Released::Guard(guard) if applies_inline(op, length) => guard.apply(),
            Released::Guard(guard) => tokio::task::spawn_blocking(move || guard.apply())
                .await
                .map_err(|e| ExportError::Io(format!("apply task: {e}")))?,
        };
        // Sync targets must hold the write durably before the client hears of it.
        let sync = self.sync.read().clone().filter(|_| wait_sync);
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
    /// seal itself needs no wait (a writeback FLUSH waits in [`Group::barrier`]
    /// first); it only marks a boundary for shipping and point-in-time recovery. A non-empty marker
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
            // Nothing to seal (a writeback FLUSH waited for its writes in the
            // barrier already), but a bookmark would be a new record.
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
            .append_sequenced(rec, |seq, r| self.feed.sequenced(seq, r), done)
            .map(Some)
            .map_err(|e| ExportError::Io(format!("journal: {e}")))
    }
}

/// `bytes` in [`BUDGET_UNIT`]s, at least one.
fn budget_units(bytes: u64) -> u64 {
    bytes.div_ceil(BUDGET_UNIT).max(1)
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
    pub cache: Arc<Cache>,
}

impl Volume {
    pub fn new(base: Arc<Base>, group: Arc<Group>, cache: CacheMode) -> Volume {
        let cache = Arc::new(Cache::new(cache));
        group
            .caches
            .write()
            .push((base.name.clone(), cache.clone()));
        Volume { base, group, cache }
    }

    /// What a mutation's reply waits for: writeback writes without FUA reply once
    /// sequenced and received by the sync targets (if any).
    fn ack(&self, fua: bool) -> Ack {
        if !fua && self.cache.effective() == CacheMode::Writeback {
            Ack::Sequenced
        } else {
            Ack::Durable
        }
    }

    /// Waits until no acknowledged, unapplied writeback write overlaps the range.
    async fn settled(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        if self
            .group
            .gate
            .wait_unheld(self.base.id, offset, offset + len)
            .await
        {
            Ok(())
        } else {
            Err(Group::failed_error())
        }
    }

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

    /// The same in every cache mode: writeback needs FLUSH and FUA; writethrough
    /// honours them trivially; FLUSH covers every connection in both (see the module
    /// doc), so `CAN_MULTI_CONN` is true.
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
        let r = self.flush_inner().await;
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
    /// over the range has reached the base first (writeback ones are waited for), so
    /// a hole here is a hole the client can rely on.
    async fn extents(
        &self,
        offset: u64,
        len: u64,
        max: usize,
    ) -> Result<Vec<ferry_nbd::Extent>, ExportError> {
        self.check(offset, len)?;
        self.settled(offset, len).await?;
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

    /// A FLUSH: in writeback, the barrier first; then the write-set seal.
    async fn flush_inner(&self) -> Result<(), ExportError> {
        if self.cache.flush_seen() == CacheMode::Writeback {
            self.group.barrier().await?;
        }
        self.group.seal(Bytes::new()).map(|_| ())
    }

    async fn read_inner(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.check(offset, len as u64)?;
        self.settled(offset, len as u64).await?;
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

    async fn write_inner(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), ExportError> {
        // FUA in writeback: the write waits as in writethrough. Its completion comes
        // after every earlier record's (completions run in sequence order) and a lost
        // earlier one fails the gate first, so everything before it is durable too.
        self.check(offset, data.len() as u64)?;
        let len = u32::try_from(data.len())
            .map_err(|_| ExportError::Invalid("write larger than 4 GiB".into()))?;
        let ack = self.ack(fua);
        self.group
            .mutate(&self.base, Op::Write, offset, len, data, ack)
            .await?;
        if fua && self.group.gate.failed() {
            return Err(Group::failed_error());
        }
        Ok(())
    }

    async fn trim_inner(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.check(offset, len as u64)?;
        self.group
            .mutate(
                &self.base,
                Op::Trim,
                offset,
                len,
                Bytes::new(),
                self.ack(false),
            )
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
            .mutate(
                &self.base,
                Op::WriteZeroes,
                offset,
                len,
                Bytes::new(),
                self.ack(false),
            )
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

    #[test]
    fn writethrough_until_flush_turns_writeback_at_the_first_flush() {
        let c = Cache::new(CacheMode::WritethroughUntilFlush);
        assert_eq!(c.effective(), CacheMode::Writethrough);
        assert_eq!(
            c.flush_seen(),
            CacheMode::Writethrough,
            "nothing to wait for"
        );
        assert_eq!(c.effective(), CacheMode::Writeback);
        assert_eq!(
            c.flush_seen(),
            CacheMode::Writeback,
            "later flushes are barriers"
        );
        assert_eq!(c.configured(), CacheMode::WritethroughUntilFlush);
        for m in [CacheMode::Writeback, CacheMode::Writethrough] {
            let c = Cache::new(m);
            assert_eq!(c.flush_seen(), m);
            assert_eq!(
                c.effective(),
                m,
                "a flush changes only the until-flush mode"
            );
        }
    }

    #[test]
    fn the_writeback_budget_charges_by_the_block() {
        assert_eq!(budget_units(0), 1);
        assert_eq!(budget_units(1), 1);
        assert_eq!(budget_units(4096), 1);
        assert_eq!(budget_units(4097), 2);
        assert_eq!(budget_units(WRITEBACK_BUDGET), WRITEBACK_BUDGET / 4096);
    }

    fn writeback_volume(dir: &std::path::Path, mode: CacheMode) -> (Arc<Journal>, Volume) {
        let mut o = ferry_journal::JournalOptions::new(dir.join("j"), [1; 16]);
        o.segment_size = 1 << 20;
        o.capacity = 8 << 20;
        o.engine = ferry_journal::EngineChoice::Std;
        let journal = Arc::new(Journal::open(o).unwrap().0);
        let p = dir.join("v.img");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        let base = Arc::new(Base::open(0, "v", &p, 1 << 20).unwrap());
        let group = Group::new(journal.clone(), 0, 64);
        (journal, Volume::new(base, group, mode))
    }

    /// Writeback end to end on a real journal: reads see acknowledged writes, FUA
    /// and FLUSH return only once everything before them is durable and applied, and
    /// the group reports the mode for status.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn writeback_writes_are_visible_at_once_and_durable_at_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, v) = writeback_volume(dir.path(), CacheMode::Writeback);
        assert_eq!(v.ack(false), Ack::Sequenced);
        assert_eq!(v.ack(true), Ack::Durable, "FUA waits");
        for i in 0..64u8 {
            let data = Bytes::from(vec![i; 4096]);
            v.write(u64::from(i % 8) * 4096, data, false).await.unwrap();
            let back = v.read(u64::from(i % 8) * 4096, 4096).await.unwrap();
            assert!(
                back.iter().all(|&b| b == i),
                "write {i} must be visible at once"
            );
        }
        v.flush().await.unwrap();
        let last = journal.last_seq();
        assert!(journal.durable_seq() >= 64 && v.group.applied_seq() >= 64);
        assert!(v.group.drain(std::time::Duration::from_secs(5)).await);
        v.write(0, Bytes::from(vec![0xee; 4096]), true)
            .await
            .unwrap();
        assert!(
            journal.durable_seq() > last,
            "a FUA write is durable at its reply"
        );
        let modes = v.group.cache_modes();
        assert_eq!(
            modes,
            vec![("v".to_string(), CacheMode::Writeback, CacheMode::Writeback)]
        );
    }

    /// A writeback group that lost an acknowledged write refuses every later write
    /// and FLUSH (a write-back cache reports its errors at flush).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn after_a_lost_write_every_write_and_flush_fails() {
        let dir = tempfile::tempdir().unwrap();
        let (_journal, v) = writeback_volume(dir.path(), CacheMode::Writeback);
        v.write(0, Bytes::from(vec![1; 4096]), false).await.unwrap();
        v.flush().await.unwrap();
        v.group.gate.fail();
        assert!(matches!(v.flush().await, Err(ExportError::Io(_))));
        assert!(matches!(
            v.write(0, Bytes::from(vec![2; 4096]), false).await,
            Err(ExportError::Io(_))
        ));
    }

    /// Until its first FLUSH an until-flush volume acknowledges durable writes.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn until_flush_writes_are_durable_before_the_first_flush() {
        let dir = tempfile::tempdir().unwrap();
        let (journal, v) = writeback_volume(dir.path(), CacheMode::WritethroughUntilFlush);
        v.write(0, Bytes::from(vec![1; 4096]), false).await.unwrap();
        assert!(journal.durable_seq() >= 1 && v.group.applied_seq() >= 1);
        assert_eq!(v.ack(false), Ack::Durable);
        v.flush().await.unwrap();
        assert_eq!(v.ack(false), Ack::Sequenced);
        assert_eq!(v.cache.effective(), CacheMode::Writeback);
    }
}
