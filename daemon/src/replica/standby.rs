//! The standby's state ([`Standby`]): its journal (mirroring the primary's
//! sequence), the bounded queue to the replica applier thread, positions and pause
//! state read by status, and the handover hook. Sessions (`replica::session`)
//! and resync copies (`replica::resync`) act on it.
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ferry_journal::{Journal, JournalError, Record, Seq};
use ferry_proto::wire::WriteSet;
use parking_lot::Mutex;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};

use crate::replica::applier::Applier;
use crate::ship::feed::ShipFeed;
use crate::ship::records::{journal_record, RECORD_COST};

/// Bytes of records received and not yet applied to the replica, at most (and at
/// most half the journal): those queued for the standby journal and those durable and
/// waiting for the applier. The standby acknowledges records as durable while its
/// replica catches up (the RPO is durability here, not apply progress); past this, a
/// write-set waits before it is queued for the journal, so the session reads no more
/// and QUIC flow control stops the primary. Nothing blocks on the journal's path: its
/// completions run on its writer thread (`inline_completions`). The journal's own
/// queue counts records (1024), and one record may be as large as the NBD payload
/// limit (64 MiB): bytes, not records, bound the memory.
const APPLY_QUEUE_BYTES: usize = 256 << 20;

/// The budget of [`APPLY_QUEUE_BYTES`]: a write-set takes its share (in bytes, one
/// permit each) before it is queued for the journal; the share travels with its last
/// record to the applier and is released when the unit holding it is applied, or
/// wherever the record stops (a journal error, a misnumbered completion, an applier
/// that stopped: dropping a permit releases it, so no path leaks the budget).
struct ReplicaBudget {
    bytes: Arc<Semaphore>,
    max: usize,
}

impl ReplicaBudget {
    fn new(max: usize) -> ReplicaBudget {
        ReplicaBudget {
            bytes: Arc::new(Semaphore::new(max)),
            max,
        }
    }

    /// Waits until `ws` fits (alone it always fits: it takes at most the whole budget).
    async fn room(&self, ws: &WriteSet) -> anyhow::Result<OwnedSemaphorePermit> {
        let cost: usize = ws.records.iter().map(|r| r.data.len() + RECORD_COST).sum();
        let n = u32::try_from(cost.min(self.max)).unwrap_or(u32::MAX);
        self.bytes
            .clone()
            .acquire_many_owned(n)
            .await
            .context("the standby's apply budget is closed")
    }
}

/// Write-sets already queued are applied together up to this many bytes.
const APPLY_GROUP_BYTES: usize = 16 << 20;

/// A journaled record on its way to the applier; the last record of a write-set
/// carries the primary's timestamp of the write-set and the write-set's share of
/// [`ReplicaBudget`].
type ApplyItem = (Seq, Record, Option<(u64, OwnedSemaphorePermit)>);

/// Shared standby state, read by status.
pub struct StandbyState {
    pub primary: String,
    /// Cascading: the member that relays to this node (`[[cluster.node]] via`); its
    /// sessions are accepted as the primary's are.
    pub via: Option<String>,
    /// The node whose session is live (the primary, or the relay).
    pub source: Mutex<Option<String>>,
    /// Mirror of the metadata's `relay_resync`: this node followed a newer epoch
    /// through its relay and refuses the relay's write-sets until a resync begins.
    pub relay_resync: std::sync::atomic::AtomicBool,
    pub listen: String,
    pub connected: Mutex<Option<String>>,
    pub applied_seq: Arc<AtomicU64>,
    pub last_primary_seq: AtomicU64,
    pub last_error: Mutex<Option<String>>,
    /// Primary timestamp of the newest applied write-set.
    pub applied_ts_ns: AtomicU64,
    /// Set while the node must not follow the primary (paused by an operator, or
    /// rolled back): sessions end and new ones are refused with this reason.
    pub paused: Mutex<Option<String>>,
    /// Signalled when `paused` changes.
    pub pause_tx: watch::Sender<bool>,
    /// The applier stopped on an error (restart replays from the checkpoint).
    pub apply_error: Mutex<Option<String>>,
    /// When a frame last arrived from the primary, on this process's monotonic clock
    /// (see `mono_ns`; 0: never): a connection that has been silent for several
    /// heartbeats is not a live primary (a killed primary's QUIC connection lingers
    /// until its idle timeout). Monotonic so a wall-clock jump on this node neither
    /// declares a live primary dead nor a dead one alive.
    last_heard_mono_ns: AtomicU64,
    /// The sync loss the primary last told of (mirror of the metadata's durable
    /// `heard_sync_loss`): this node may lack writes acknowledged after it.
    pub sync_loss: Mutex<Option<Seq>>,
}

impl StandbyState {
    /// The address of a primary that is connected and heard from within `within`.
    pub fn live_primary(&self, within: Duration) -> Option<String> {
        let heard = self.last_heard_mono_ns.load(Ordering::Relaxed);
        let fresh = heard_within(heard, mono_ns(), within);
        self.connected.lock().clone().filter(|_| fresh)
    }

    /// Records that a frame just arrived from the primary.
    pub fn heard_from_primary(&self) {
        self.last_heard_mono_ns.store(mono_ns(), Ordering::Relaxed);
    }
}

/// Nanoseconds on a monotonic clock that starts at 1 in this process (0 stays free
/// to mean "never"). Liveness is a duration, so it must not follow the wall clock.
fn mono_ns() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let elapsed = START.get_or_init(Instant::now).elapsed().as_nanos();
    u64::try_from(elapsed).unwrap_or(u64::MAX - 1) + 1
}

/// Whether a primary last heard at monotonic `heard` (0: never) is still live at
/// `now`.
fn heard_within(heard: u64, now: u64, within: Duration) -> bool {
    heard != 0 && now.saturating_sub(heard) < u64::try_from(within.as_nanos()).unwrap_or(u64::MAX)
}

/// Takes over as the primary at a sequence (planned switchover): returns the new
/// epoch once the role change is durable, and the restart to trigger once the old
/// primary has been told.
pub type HandoverFn =
    Arc<dyn Fn(Seq) -> anyhow::Result<(u64, Box<dyn FnOnce() + Send>)> + Send + Sync>;

pub struct Standby {
    pub state: Arc<StandbyState>,
    /// Verify answers waiting for the session to carry them to the primary.
    pub outbox: Arc<crate::verify::Outbox>,
    /// Set by the daemon: what to do when the primary hands over.
    pub handover: Mutex<Option<HandoverFn>>,
    pub(crate) journal: Arc<Journal>,
    /// A relay's feed (cascading): every record durable in this journal goes to the
    /// shippers of the members it relays to, as the primary's completions feed its own.
    pub(crate) feed: Option<Arc<ShipFeed>>,
    /// The replica applier's shared parts (bases, metadata, undo, resync state).
    pub(crate) applier: Arc<Applier>,
    apply_tx: crossbeam_channel::Sender<ApplyItem>,
    apply_budget: ReplicaBudget,
    /// Set once a record completed under another sequence than the primary's:
    /// nothing more goes to the applier or into the journal.
    order_error: Arc<OnceLock<String>>,
    pub(crate) durable_tx: watch::Sender<Seq>,
    applied_tx: Arc<watch::Sender<Seq>>,
    pub(crate) applied_rx: watch::Receiver<Seq>,
}

impl Standby {
    /// Starts the replica applier. `applied` holds where recovery left the replica
    /// (shared with the point-in-time store, which must know it). `(via, feed)`:
    /// the member that relays to this node, and this node's feed when it relays.
    pub fn new(
        journal: Arc<Journal>,
        applier: Arc<Applier>,
        applied: Arc<AtomicU64>,
        (primary, listen): (&str, &str),
        paused: Option<String>,
        (via, feed): (Option<String>, Option<Arc<ShipFeed>>),
    ) -> anyhow::Result<Standby> {
        let start = applied.load(Ordering::Acquire);
        let outbox = applier.outbox.clone();
        let state = Arc::new(StandbyState {
            primary: primary.to_string(),
            via,
            source: Mutex::new(None),
            relay_resync: applier.meta.relay_resync()?.into(),
            listen: listen.to_string(),
            connected: Mutex::new(None),
            applied_seq: applied,
            last_primary_seq: AtomicU64::new(0),
            last_error: Mutex::new(None),
            applied_ts_ns: AtomicU64::new(0),
            paused: Mutex::new(paused),
            pause_tx: watch::channel(false).0,
            apply_error: Mutex::new(None),
            last_heard_mono_ns: AtomicU64::new(0),
            sync_loss: Mutex::new(applier.meta.heard_sync_loss()?),
        });
        let (apply_tx, apply_rx) = apply_channel();
        let apply_budget = ReplicaBudget::new(
            APPLY_QUEUE_BYTES
                .min((journal.capacity_bytes() / 2) as usize)
                .max(16 << 20),
        );
        let applied_tx = Arc::new(watch::channel(start).0);
        let applied_rx = applied_tx.subscribe();
        let thread_applier = applier.clone();
        let (durable_tx, _) = watch::channel(journal.durable_seq());
        {
            let state = state.clone();
            let applier = thread_applier;
            let applied_tx = applied_tx.clone();
            std::thread::Builder::new()
                .name("ferry-replica-apply".into())
                .spawn(move || {
                    lower_priority(APPLIER_NICE);
                    apply_loop(&apply_rx, &applier, &state, &applied_tx)
                })
                .context("spawning the replica applier")?;
        }
        Ok(Standby {
            state,
            outbox,
            handover: Mutex::new(None),
            journal,
            feed,
            applier,
            apply_tx,
            apply_budget,
            order_error: Default::default(),
            durable_tx,
            applied_tx,
            applied_rx,
        })
    }

    /// Moves the applied position (the applier is idle): a resync copy stands in for
    /// the records up to its snapshot.
    pub(crate) fn set_applied(&self, seq: Seq) {
        self.state.applied_seq.store(seq, Ordering::Release);
        self.applied_tx.send_replace(seq);
    }

    /// What to advertise as the resume position: the journal's durable position, or,
    /// in the middle of an unfinished resync copy, the point the resync started from
    /// (the journal holds nothing that could resume the copy).
    pub fn resume_position(&self) -> Seq {
        match self.applier.resync.get() {
            Some(r) if !r.copied => r.from,
            _ => self.journal.durable_seq(),
        }
    }

    pub fn applied_seq(&self) -> Seq {
        self.state.applied_seq.load(Ordering::Acquire)
    }

    /// Stops following the primary (`Some(reason)`) or resumes (`None`).
    pub fn set_paused(&self, reason: Option<String>) {
        *self.state.paused.lock() = reason;
        self.state.pause_tx.send_replace(true);
    }

    pub fn paused(&self) -> Option<String> {
        self.state.paused.lock().clone()
    }

    /// A primary's heartbeat said where this standby lost sync (`Some`), or that it
    /// holds every acknowledged write (`None`): persisted on a change, before it is
    /// believed, so a node partitioned from then on still knows after a restart.
    pub(crate) fn heard_sync_loss(&self, at: Option<Seq>) -> anyhow::Result<()> {
        if *self.state.sync_loss.lock() == at {
            return Ok(());
        }
        self.applier
            .meta
            .set_heard_sync_loss(at)
            .context("recording the primary's sync loss")?;
        *self.state.sync_loss.lock() = at;
        match at {
            Some(at) => tracing::warn!(
                seq = at,
                "the primary acknowledged writes after {at} without this standby (sync \
                 target degraded): it may lack them until it catches up; promote refuses \
                 without --force"
            ),
            None => tracing::info!("the primary says this standby holds every acknowledged write"),
        }
        Ok(())
    }

    /// Highest sequence journaled durably on this standby.
    pub fn durable_seq(&self) -> Seq {
        self.journal.durable_seq()
    }

    /// Waits until `ws` fits in the records received and not yet applied
    /// ([`APPLY_QUEUE_BYTES`]); the permit goes to
    /// [`journal_write_set`](Self::journal_write_set).
    pub(crate) async fn journal_room(&self, ws: &WriteSet) -> anyhow::Result<OwnedSemaphorePermit> {
        self.apply_budget.room(ws).await
    }

    /// Journals the records of an accepted write-set under their primary sequences.
    /// The journal must assign exactly those: checked before anything is queued (a
    /// record journaled under another sequence would be replayed and applied as
    /// that one), and again on every completion before the record goes to the
    /// applier. `room` (from [`journal_room`](Self::journal_room)) goes with the last
    /// record, and is released once the applier has applied it (or wherever the
    /// record stops).
    pub(crate) fn journal_write_set(
        &self,
        ws: WriteSet,
        room: OwnedSemaphorePermit,
    ) -> anyhow::Result<()> {
        let mut room = Some(room);
        check_next_seq(self.journal.last_seq(), ws.first_seq)?;
        if let Some(e) = self.order_error.get() {
            bail!("{e}");
        }
        let ts = ws.timestamp_ns;
        let last = ws.last_seq;
        for r in ws.records {
            let expected = r.seq;
            // The write-set's end: its timestamp and its share of the apply budget.
            let end = if expected == last {
                room.take().map(|p| (ts, p))
            } else {
                None
            };
            let rec = journal_record(r);
            let apply_tx = self.apply_tx.clone();
            let durable_tx = self.durable_tx.clone();
            let feed = self.feed.clone();
            let order_error = self.order_error.clone();
            let state = self.state.clone();
            let for_apply = rec.clone();
            // Runs on the journal's writer thread: it must never block.
            let done: ferry_journal::Completion =
                Box::new(move |res: Result<Seq, JournalError>| {
                    if let Ok(seq) = res {
                        // The standby journal mirrors the primary's: the record is
                        // durable under the primary's sequence. One that is not (or
                        // anything after it) never reaches the replica.
                        if order_error.get().is_some() || seq != expected {
                            refuse_misnumbered(&order_error, &state, seq, expected);
                            return;
                        }
                        durable_tx.send_replace(seq);
                        if let Some(f) = &feed {
                            f.journaled(seq, || for_apply.clone());
                        }
                        // An applier that stopped drops it, and its budget share.
                        let _ = apply_tx.send((seq, for_apply, end));
                    }
                });
            let got = self.journal.append(rec, done)?;
            check_assigned(got, expected)?;
        }
        Ok(())
    }
}

/// The journal's next sequence (after `last`) must be the write-set's first: the
/// standby journal mirrors the primary's numbering.
fn check_next_seq(last: Seq, first: Seq) -> anyhow::Result<()> {
    if last.checked_add(1) != Some(first) {
        bail!(
            "write-set from {first} refused: the standby journal ends at {last}, so its records \
             would be journaled under other sequences (was the journal re-created?); a full \
             resync is needed"
        );
    }
    Ok(())
}

fn check_assigned(got: Seq, expected: Seq) -> anyhow::Result<()> {
    if got != expected {
        bail!(
            "standby journal assigned sequence {got} to the primary's record {expected}: \
             the standby journal does not mirror the primary's (was it re-created?); \
             a full resync is needed"
        );
    }
    Ok(())
}

/// A record completed under another sequence than the primary's: it and everything
/// after it stay out of the replica (apply stops, as on an apply error; a restart
/// replays only what the journal holds in order, after the operator's resync).
fn refuse_misnumbered(
    order_error: &OnceLock<String>,
    state: &StandbyState,
    seq: Seq,
    expected: Seq,
) {
    if order_error.get().is_some() {
        return;
    }
    let msg = format!(
        "standby journal completed sequence {seq} for the primary's record {expected}: \
         not applied; apply stops here (a full resync is needed)"
    );
    tracing::error!("{msg}");
    let _ = order_error.set(msg.clone());
    *state.apply_error.lock() = Some(msg);
}

/// The applier thread's nice value. Apply is background work: a write-set is
/// acknowledged (received, durable) before it is applied, and the apply budget holds
/// the backlog within bounds. The session task (receipt, acks) and the journal writer
/// are on every write's path, and on a machine with few cores the applier's reads,
/// undo appends and replica writes competed with them for the CPU at every write.
const APPLIER_NICE: i32 = 10;

/// Lowers the calling thread's priority to `nice` (raising nice needs no
/// privilege). Advice: a refusal is logged and changes nothing else.
fn lower_priority(nice: i32) {
    if let Err(e) = ferry_journal::try_set_thread_nice(nice) {
        tracing::warn!(nice, error = %e, "replica applier priority unchanged");
    }
}

/// The queue from journal completions to the applier: unbounded in count, bounded in
/// bytes by the [`ReplicaBudget`] shares its items carry. Unbounded also because
/// crossbeam's list flavor drops what it holds as soon as the applier's end is
/// dropped (an applier that stopped), releasing those shares while the standby goes
/// on journaling; the bounded (array) flavor keeps its items until every sender is
/// gone too, and the completions hold a sender for the life of the standby.
fn apply_channel() -> (
    crossbeam_channel::Sender<ApplyItem>,
    crossbeam_channel::Receiver<ApplyItem>,
) {
    crossbeam_channel::unbounded()
}

/// The replica applier thread: receives journaled records in order and applies each
/// write-set (or a group of queued ones) as one unit, until the channel closes or an
/// apply fails (then it records the error and returns: apply stops there, a restart
/// replays it, and the records queued after it are dropped with their budget shares,
/// so the standby goes on journaling).
fn apply_loop(
    apply_rx: &crossbeam_channel::Receiver<ApplyItem>,
    applier: &Applier,
    state: &StandbyState,
    applied_tx: &watch::Sender<Seq>,
) {
    // Records of the write-set being received; applied as one unit (one
    // undo entry, one recovery point) when its last record arrives.
    let mut ws: Vec<(Seq, Record)> = Vec::new();
    let mut bytes = 0usize;
    // The budget shares of the write-sets in the unit: released once it is applied.
    let mut shares: Vec<OwnedSemaphorePermit> = Vec::new();
    let mut next = apply_rx.recv().ok();
    while let Some((seq, rec, end)) = next.take() {
        // A labelled seal (bookmark, verify) must stay a point of its own.
        let labelled = rec.op == ferry_journal::Op::Seal && !rec.data.is_empty();
        bytes += rec.data.len() + RECORD_COST;
        ws.push((seq, rec));
        let Some((ts, share)) = end else {
            next = apply_rx.recv().ok();
            continue;
        };
        shares.push(share);
        // Under load, write-sets queue up: apply what is already here as
        // one unit (one undo entry, one fdatasync, one recovery point)
        // instead of one per write-set. Any journal prefix is a valid
        // point, so merging loses only point granularity, never safety.
        if !labelled && bytes < APPLY_GROUP_BYTES {
            if let Ok(item) = apply_rx.try_recv() {
                next = Some(item);
                continue;
            }
        }
        if let Err(e) = applier.apply_write_set(ts, &ws) {
            let msg = format!(
                    "replica apply of write-set {}..={seq} failed: {}; apply stops here (restart replays it)",
                    ws.first().map_or(seq, |w| w.0),
                    crate::error_chain(&e)
                );
            tracing::error!("{msg}");
            *state.apply_error.lock() = Some(msg);
            return;
        }
        ws.clear();
        shares.clear();
        bytes = 0;
        state.applied_seq.store(seq, Ordering::Release);
        if ts != 0 {
            state.applied_ts_ns.store(ts, Ordering::Relaxed);
        }
        applied_tx.send_replace(seq);
        next = apply_rx.recv().ok();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_set(first: Seq, sizes: &[usize]) -> WriteSet {
        let records = sizes
            .iter()
            .zip(first..)
            .map(|(&n, seq)| ferry_proto::wire::WireRecord {
                seq,
                volume: 0,
                op: ferry_proto::wire::RecordOp::Write,
                offset: 0,
                length: n as u32,
                data: bytes::Bytes::from(vec![0u8; n]),
            })
            .collect();
        WriteSet {
            epoch: 1,
            first_seq: first,
            last_seq: first + sizes.len() as u64 - 1,
            timestamp_ns: 0,
            records,
        }
    }

    /// Received records wait within a byte budget until applied: a write-set waits
    /// while the queued ones fill it, goes once one is released, and one larger than
    /// the whole budget still goes alone (it must not wedge the session).
    #[tokio::test]
    async fn records_received_and_not_applied_are_bounded_in_bytes() {
        let cost = 3 * (4096 + RECORD_COST);
        let b = ReplicaBudget::new(2 * cost);
        let first = b.room(&write_set(1, &[4096; 3])).await.unwrap();
        let _second = b.room(&write_set(4, &[4096; 3])).await.unwrap();
        let third = write_set(7, &[4096; 3]);
        let waiting = tokio::time::timeout(Duration::from_millis(50), b.room(&third)).await;
        assert!(waiting.is_err(), "a third write-set fit in a budget of two");
        drop(first);
        let _third = tokio::time::timeout(Duration::from_secs(10), b.room(&third))
            .await
            .expect("released bytes were not reused")
            .unwrap();

        let small = ReplicaBudget::new(1024);
        let huge = small.room(&write_set(1, &[1 << 20])).await.unwrap();
        assert_eq!(huge.num_permits(), 1024, "takes the whole budget, no more");
    }

    /// The sequence is checked before a record is queued, not after.
    #[test]
    fn a_write_set_must_continue_the_journal_exactly() {
        assert!(check_next_seq(10, 11).is_ok());
        for (last, first) in [(10, 12), (10, 10), (10, 3), (Seq::MAX, 0)] {
            let e = check_next_seq(last, first).unwrap_err().to_string();
            assert!(
                e.contains(&format!("write-set from {first} refused")),
                "{e}"
            );
        }
        assert!(check_assigned(7, 7).is_ok());
        assert!(check_assigned(8, 7).is_err());
    }

    /// Liveness is a monotonic duration: never heard is never live, and the window
    /// is measured from the last frame whatever the wall clock does meanwhile.
    #[test]
    fn primary_liveness_uses_the_monotonic_clock() {
        let within = Duration::from_secs(3);
        assert!(!heard_within(0, 1, within));
        assert!(heard_within(5_000_000_000, 7_999_999_999, within));
        assert!(!heard_within(5_000_000_000, 8_000_000_000, within));
        // A frame stamped after `now` was read (racing threads) is fresh, not stale.
        assert!(heard_within(9, 5, within));
        // Stamps from `mono_ns` are never 0 and never go backwards.
        let (a, b) = (mono_ns(), mono_ns());
        assert!(a >= 1 && b >= a);
    }

    /// A misnumbered completion shows in status and stays.
    #[test]
    fn a_misnumbered_record_stops_apply_for_good() {
        let order = OnceLock::new();
        let state = state();
        refuse_misnumbered(&order, &state, 12, 11);
        let e = state.apply_error.lock().clone().unwrap();
        assert!(e.contains("sequence 12") && e.contains("record 11"), "{e}");
        refuse_misnumbered(&order, &state, 13, 12);
        assert!(
            order.get().unwrap().contains("record 11"),
            "the first cause stays"
        );
    }

    /// Every budget share comes back, whatever stops the records: applied ones as
    /// their unit is applied, the share of a unit whose apply failed, those queued
    /// behind it when the applier stops, and those sent after it stopped. A leaked
    /// share would shrink the budget for good and, at zero, wedge every session.
    #[tokio::test]
    async fn budget_shares_come_back_when_apply_succeeds_or_stops() {
        let dir = tempfile::tempdir().unwrap();
        let applier = crate::replica::applier::scratch_applier(dir.path(), 0);
        let (state, applied_tx) = (state(), watch::channel(0).0);
        let max = 8 * (4096 + RECORD_COST);
        let budget = ReplicaBudget::new(max);
        // One write-set of one record each; volume 9 does not exist: its apply fails.
        let item = |seq: Seq, volume: u32| {
            let mut ws = write_set(seq, &[4096]);
            ws.records[0].volume = volume;
            let share = budget
                .bytes
                .clone()
                .try_acquire_many_owned(4096 + RECORD_COST as u32);
            let rec = journal_record(ws.records.remove(0));
            (seq, rec, Some((7, share.unwrap())))
        };

        let (tx, rx) = apply_channel();
        for seq in 1..=2 {
            tx.send(item(seq, 0)).unwrap();
        }
        drop(tx);
        apply_loop(&rx, &applier, &state, &applied_tx);
        assert_eq!(*applied_tx.borrow(), 2, "both write-sets applied");
        assert_eq!(
            budget.bytes.available_permits(),
            max,
            "applied shares leaked"
        );

        // Write-set 3..=4 (a bad record, then a bookmark: a labelled seal is a unit
        // of its own, so 5 stays queued behind it), then write-set 5.
        let (tx, rx) = apply_channel();
        let (seq, bad, _) = item(3, 9);
        tx.send((seq, bad, None)).unwrap();
        let (seq, mut seal, share) = item(4, 0);
        (seal.op, seal.length, seal.data) = (ferry_journal::Op::Seal, 0, "bm".into());
        tx.send((seq, seal, share)).unwrap();
        tx.send(item(5, 0)).unwrap();
        apply_loop(&rx, &applier, &state, &applied_tx);
        let e = state
            .apply_error
            .lock()
            .clone()
            .expect("the apply error is shown");
        assert!(
            e.contains("write-set 3..=4") && e.contains("volume id 9"),
            "{e}"
        );
        assert_eq!(rx.len(), 1, "write-set 5 was not left queued");
        assert_eq!(*applied_tx.borrow(), 2, "nothing applied past the failure");
        drop(rx);
        // A completion after the applier stopped: its send fails and drops the share.
        assert!(tx.send(item(5, 0)).is_err());
        assert_eq!(
            budget.bytes.available_permits(),
            max,
            "a share leaked when apply stopped"
        );
    }

    fn state() -> StandbyState {
        StandbyState {
            primary: "p".into(),
            via: None,
            source: Default::default(),
            relay_resync: Default::default(),
            listen: "l".into(),
            connected: Default::default(),
            applied_seq: Default::default(),
            last_primary_seq: Default::default(),
            last_error: Default::default(),
            applied_ts_ns: Default::default(),
            paused: Default::default(),
            pause_tx: watch::channel(false).0,
            apply_error: Default::default(),
            last_heard_mono_ns: Default::default(),
            sync_loss: Default::default(),
        }
    }
}
