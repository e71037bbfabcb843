//! Ordered, parallel application of journaled records to the base volumes.
//!
//! Records reach the [`ApplyGate`] from the journal's completion path, strictly in
//! sequence order. A record whose range overlaps no earlier record still being applied
//! is released at once; otherwise it waits until every such earlier record is applied.
//! So overlapping writes reach a base in journal order — the order crash replay uses.
//! A released small write is applied right on the journal's completion path
//! ([`ApplyGate::ready`] with `apply_now`); larger ones, and any record that had to wait, are
//! applied by the NBD task that issued them.
//!
//! Why small writes are applied by the completion path (the journal writer thread on
//! a primary): a 4 KiB page-cache write costs a few microseconds, less than waking a
//! task to do it, and it is done before the task wakes, so a batch's replies no longer
//! queue behind each other's base writes on the runtime worker. 4k random writes at
//! QD32 went from ~53k to 64-75k IOPS on the 2-core test machine
//! (`benches/README.md`). Large writes would hold up the next journal batch, so they
//! stay with their tasks (and the blocking pool).
//!
//! A released record travels to its task as an [`ApplyGuard`]. Whoever drops an
//! unapplied guard applies it: a task cancelled mid-request, or a send to a task that
//! is already gone, can never leave a journaled record off the base.
//!
//! `applied_seq` is the contiguous prefix of applied sequences; the checkpoint may only
//! claim what is applied with no hole below it.
//!
//! Writeback volumes (`cache = "writeback"`) reply before their record is durable, so
//! before it is on the base. Such a write takes a *hold* on its range before it is
//! journaled ([`ApplyGate::hold`]); the hold ends once the record is applied
//! ([`ApplyGuard::with_hold`]). A read overlapping a hold waits for it
//! ([`ApplyGate::wait_unheld`]): reads always see acknowledged writes, although the
//! base never holds a write the journal lacks. A FLUSH waits for `applied_seq`
//! ([`ApplyGate::wait_applied`]). A hold is taken before the sequence is known
//! (`Journal::append` assigns it), so holds are keyed by a ticket of their own: no
//! race between the task that announces the write and the completion that applies it.
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

use bytes::Bytes;
use ferry_journal::{JournalError, Op, Seq};
use parking_lot::Mutex;
use tokio::sync::{oneshot, Notify};

use crate::store::base::Base;

pub type Release = oneshot::Sender<Result<Released, JournalError>>;

/// What a waiting task receives once its record may reach the base.
pub enum Released {
    /// The task applies it (large writes go to the blocking pool).
    Guard(ApplyGuard),
    /// Already applied by the journal's completion path, with this result.
    Applied(std::io::Result<()>),
}

pub struct ApplyGate {
    inner: Mutex<GateInner>,
    /// Online verifies: told before every base write.
    pub verify: crate::verify::Verifier,
    applied_seq: AtomicU64,
    failed: AtomicBool,
    /// Ranges of acknowledged writeback writes not yet applied, by ticket.
    holds: Mutex<Holds>,
    /// `holds`' length, read without the lock by every read (mostly zero).
    held: AtomicUsize,
    /// Woken when `applied_seq` advances, a hold ends, or the gate fails.
    progress: Notify,
}

#[derive(Default)]
struct Holds {
    next: u64,
    ranges: HashMap<u64, (u32, u64, u64)>,
}

/// A writeback write's hold on its range, from [`ApplyGate::hold`].
pub type Ticket = u64;

struct GateInner {
    /// Records handed to the gate and not yet applied, by sequence.
    pending: BTreeMap<Seq, Pending>,
    /// Applied sequences above the contiguous prefix.
    done_above: BTreeSet<Seq>,
    applied: Seq,
    /// The last sequence handed to [`ApplyGate::ready`] (checks the call order).
    last_ready: Seq,
}

struct Pending {
    volume: u32,
    start: u64,
    end: u64,
    /// Earlier overlapping records not yet applied.
    deps: usize,
    /// Later records waiting for this one.
    dependents: Vec<Seq>,
    /// Held while blocked; taken when released.
    blocked: Option<(ApplyGuard, Release)>,
}

impl ApplyGate {
    pub fn new(applied: Seq) -> Arc<ApplyGate> {
        Arc::new(ApplyGate {
            verify: Default::default(),
            inner: Mutex::new(GateInner {
                pending: BTreeMap::new(),
                done_above: BTreeSet::new(),
                applied,
                last_ready: applied,
            }),
            applied_seq: AtomicU64::new(applied),
            failed: AtomicBool::new(false),
            holds: Default::default(),
            held: AtomicUsize::new(0),
            progress: Notify::new(),
        })
    }

    /// Fails the group: an acknowledged writeback write was lost (its journal write
    /// failed), so the volumes no longer hold what clients were told. Every waiter
    /// wakes and reports the error.
    pub fn fail(&self) {
        self.failed.store(true, Ordering::SeqCst);
        self.progress.notify_waiters();
    }

    /// Holds `start..end` of `volume` until the returned ticket's record is applied
    /// (or forever, if it never is: reads of a lost write fail).
    pub fn hold(&self, volume: u32, start: u64, end: u64) -> Ticket {
        let mut h = self.holds.lock();
        h.next += 1;
        let t = h.next;
        h.ranges.insert(t, (volume, start, end));
        self.held.store(h.ranges.len(), Ordering::SeqCst);
        t
    }

    /// Ends a hold: its record is on the base, or it never got a sequence (its
    /// write was refused, so no client was told of it).
    pub fn unhold(&self, t: Ticket) {
        let mut h = self.holds.lock();
        if h.ranges.remove(&t).is_some() {
            self.held.store(h.ranges.len(), Ordering::SeqCst);
            drop(h);
            self.progress.notify_waiters();
        }
    }

    fn held_overlaps(&self, volume: u32, start: u64, end: u64) -> bool {
        self.held.load(Ordering::SeqCst) > 0
            && self
                .holds
                .lock()
                .ranges
                .values()
                .any(|&(v, s, e)| v == volume && s < end && start < e)
    }

    /// Waits until no hold overlaps `start..end` of `volume`; `false` if the gate
    /// failed while one did (the acknowledged write there may be lost).
    pub async fn wait_unheld(&self, volume: u32, start: u64, end: u64) -> bool {
        self.wait_for(|| !self.held_overlaps(volume, start, end))
            .await
    }

    /// Waits until `applied_seq >= seq` (so everything up to it is durable in the
    /// journal and on the base); `false` if the gate failed first.
    pub async fn wait_applied(&self, seq: Seq) -> bool {
        self.wait_for(|| self.applied_seq() >= seq).await
    }

    /// Returns once the gate has failed (never, while it has not).
    pub async fn wait_failed(&self) {
        self.wait_for(|| false).await;
    }

    /// Waits until `done()` holds; `false` once the gate has failed and it does not.
    async fn wait_for(&self, done: impl Fn() -> bool) -> bool {
        loop {
            // Registered before the check: a wake between check and await is kept.
            let woken = self.progress.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if done() {
                return true;
            }
            if self.failed() {
                return false;
            }
            woken.await;
        }
    }

    /// Highest sequence such that it and everything below it is applied.
    pub fn applied_seq(&self) -> Seq {
        self.applied_seq.load(Ordering::Acquire)
    }

    /// A base write failed after its record was journaled: the base no longer equals
    /// the journal prefix. `applied_seq` stops below the failure (so the checkpoint
    /// never passes it and a restart replays it) and the volumes refuse writes.
    pub fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Hands a journaled mutation to the gate. Called in sequence order. A record
    /// that waits for an earlier overlapping one is handed to its task as a guard
    /// once released. One that waits for nothing is applied right here, on the
    /// caller's thread (the journal's completion path), with `apply_now` (its task
    /// only hears the result), else handed over at once.
    pub fn ready(self: &Arc<Self>, guard: ApplyGuard, to: Release, apply_now: bool) {
        let seq = guard.seq;
        let (volume, start, end) = guard.range();
        let mut g = self.inner.lock();
        // Dependencies are found among earlier pending records only: a record handed
        // over out of order could overtake an earlier overlapping one.
        debug_assert!(
            seq > g.last_ready,
            "ApplyGate::ready called out of sequence order: {seq} after {}",
            g.last_ready
        );
        g.last_ready = seq;
        let mut deps = 0;
        for (_, p) in g.pending.range_mut(..seq) {
            if p.volume == volume && p.start < end && start < p.end {
                p.dependents.push(seq);
                deps += 1;
            }
        }
        let mut pending = Pending {
            volume,
            start,
            end,
            deps,
            dependents: Vec::new(),
            blocked: None,
        };
        if deps > 0 {
            pending.blocked = Some((guard, to));
            g.pending.insert(seq, pending);
            return;
        }
        g.pending.insert(seq, pending);
        drop(g);
        if apply_now {
            let r = guard.apply();
            let _ = to.send(Ok(Released::Applied(r)));
        } else {
            release(guard, to);
        }
    }

    /// Records that carry no data (write-set seals) count as applied at once.
    pub fn skip(&self, seq: Seq) {
        let mut g = self.inner.lock();
        self.mark_done(&mut g, seq);
    }

    fn done(&self, seq: Seq, ok: bool) {
        let mut g = self.inner.lock();
        let Some(p) = g.pending.remove(&seq) else {
            return;
        };
        if ok {
            self.mark_done(&mut g, seq);
        } else {
            self.fail();
        }
        let mut now = Vec::new();
        for d in p.dependents {
            if let Some(dp) = g.pending.get_mut(&d) {
                dp.deps -= 1;
                if dp.deps == 0 {
                    if let Some(r) = dp.blocked.take() {
                        now.push(r);
                    }
                }
            }
        }
        drop(g);
        for (guard, to) in now {
            release(guard, to);
        }
    }

    fn mark_done(&self, g: &mut GateInner, seq: Seq) {
        if seq <= g.applied {
            return;
        }
        g.done_above.insert(seq);
        let mut a = g.applied;
        while g.done_above.remove(&(a + 1)) {
            a += 1;
        }
        if a != g.applied {
            g.applied = a;
            self.applied_seq.store(a, Ordering::Release);
            self.progress.notify_waiters();
        }
    }
}

/// Sends the guard to its task; if the task is gone, the returned guard is dropped
/// here and applies itself.
fn release(guard: ApplyGuard, to: Release) {
    if let Err(Ok(Released::Guard(guard))) = to.send(Ok(Released::Guard(guard))) {
        drop(guard);
    }
}

/// One journaled, released mutation that must reach its base exactly once.
pub struct ApplyGuard {
    pub seq: Seq,
    pub base: Arc<Base>,
    pub op: Op,
    pub offset: u64,
    pub length: u32,
    pub data: Bytes,
    gate: Arc<ApplyGate>,
    applied: bool,
    /// A writeback write's hold, ended once it is applied.
    hold: Option<Ticket>,
}

impl ApplyGuard {
    pub fn new(
        gate: Arc<ApplyGate>,
        seq: Seq,
        base: Arc<Base>,
        op: Op,
        offset: u64,
        length: u32,
        data: Bytes,
    ) -> ApplyGuard {
        ApplyGuard {
            seq,
            base,
            op,
            offset,
            length,
            data,
            gate,
            applied: false,
            hold: None,
        }
    }

    /// Ends `hold` once the record is applied (kept if the base write fails: a read
    /// there then fails instead of missing an acknowledged write).
    pub fn with_hold(mut self, hold: Option<Ticket>) -> ApplyGuard {
        self.hold = hold;
        self
    }

    fn range(&self) -> (u32, u64, u64) {
        (self.base.id, self.offset, self.offset + self.length as u64)
    }

    /// Writes the record to its base and tells the gate.
    pub fn apply(mut self) -> std::io::Result<()> {
        self.apply_once()
    }

    /// The one write of the record (from [`ApplyGuard::apply`], or from `drop` when
    /// its task vanished): verify first, then the base, then the gate.
    fn apply_once(&mut self) -> std::io::Result<()> {
        self.applied = true;
        self.gate
            .verify
            .before_write(self.seq, &self.base, self.offset, self.length as u64);
        let r = self
            .base
            .apply(self.op, self.offset, self.length, &self.data);
        if let Err(e) = &r {
            tracing::error!(
                volume = %self.base.name,
                seq = self.seq,
                offset = self.offset,
                "base volume write failed after the record was journaled: {e}; refusing \
                 further writes; the record stays in the journal and is replayed on restart"
            );
        }
        self.gate.done(self.seq, r.is_ok());
        if let (Some(t), true) = (self.hold.take(), r.is_ok()) {
            self.gate.unhold(t);
        }
        r
    }
}

impl Drop for ApplyGuard {
    fn drop(&mut self) {
        if !self.applied {
            // The error is logged and fails the group inside; nobody waits for it.
            let _ = self.apply_once();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    fn base(dir: &std::path::Path) -> Arc<Base> {
        let p = dir.join("b.img");
        std::fs::File::create(&p).unwrap().set_len(1 << 20).unwrap();
        Arc::new(Base::open(0, "b", &p, 1 << 20).unwrap())
    }

    /// The guard a task received (`ready` without `apply_now` always hands one over).
    fn got(r: Result<Result<Released, JournalError>, oneshot::error::TryRecvError>) -> ApplyGuard {
        match r {
            Ok(Ok(Released::Guard(g))) => g,
            Ok(Ok(Released::Applied(_))) => panic!("applied, no guard handed over"),
            Ok(Err(e)) => panic!("journal error {e}"),
            Err(e) => panic!("nothing released: {e}"),
        }
    }

    fn guard(gate: &Arc<ApplyGate>, b: &Arc<Base>, seq: Seq, off: u64, byte: u8) -> ApplyGuard {
        ApplyGuard::new(
            gate.clone(),
            seq,
            b.clone(),
            Op::Write,
            off,
            4096,
            Bytes::from(vec![byte; 4096]),
        )
    }

    /// `base`'s file opened read-only: its pwrite fails (EBADF) like a dying disk.
    fn read_only(dir: &std::path::Path) -> Arc<Base> {
        let mut ro = Base::open(0, "b", &dir.join("b.img"), 1 << 20).unwrap();
        ro.file = std::fs::File::open(dir.join("b.img")).unwrap();
        Arc::new(ro)
    }

    type Rx = oneshot::Receiver<Result<Released, JournalError>>;

    /// Seqs 1..=3 handed to the gate with `apply_now[i]`: seq 1 at 0, seq 2 at 8192
    /// (independent), seq 3 at 2048 (overlaps seq 1). Their tasks' receivers.
    fn three_records(gate: &Arc<ApplyGate>, b: &Arc<Base>, apply_now: [bool; 3]) -> [Rx; 3] {
        let at = [(1, 0, 1), (2, 8192, 2), (3, 2048, 3)];
        std::array::from_fn(|i| {
            let (seq, off, byte) = at[i];
            let (t, r) = oneshot::channel();
            gate.ready(guard(gate, b, seq, off, byte), t, apply_now[i]);
            r
        })
    }

    #[test]
    fn overlapping_records_apply_in_order_and_prefix_is_contiguous() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let gate = ApplyGate::new(0);
        let [mut r1, mut r2, mut r3] = three_records(&gate, &b, [false; 3]);
        let g1 = got(r1.try_recv());
        let g2 = got(r2.try_recv());
        assert!(r3.try_recv().is_err(), "seq 3 must wait for seq 1");
        g2.apply().unwrap();
        assert_eq!(gate.applied_seq(), 0, "prefix cannot skip seq 1");
        g1.apply().unwrap();
        assert_eq!(gate.applied_seq(), 2);
        let g3 = got(r3.try_recv());
        g3.apply().unwrap();
        assert_eq!(gate.applied_seq(), 3);
        gate.skip(4);
        assert_eq!(gate.applied_seq(), 4);
        let mut buf = [0u8; 1];
        b.file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf[0], 3, "the later overlapping write wins");
    }

    #[test]
    fn a_vanished_task_still_gets_its_record_applied() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let gate = ApplyGate::new(10);
        let (t, r) = oneshot::channel();
        drop(r);
        gate.ready(guard(&gate, &b, 11, 0, 9), t, false);
        assert_eq!(gate.applied_seq(), 11);
        // Released into a receiver that is then dropped unread.
        let (t, r) = oneshot::channel();
        gate.ready(guard(&gate, &b, 12, 4096, 8), t, false);
        drop(r);
        assert_eq!(gate.applied_seq(), 12);
        let mut buf = [0u8; 2];
        b.file.read_exact_at(&mut buf[..1], 0).unwrap();
        b.file.read_exact_at(&mut buf[1..], 4096).unwrap();
        assert_eq!(buf, [9, 8]);
    }

    #[test]
    fn a_failed_base_write_stops_the_prefix_and_fails_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let ok = base(dir.path());
        let ro = read_only(dir.path());
        let gate = ApplyGate::new(0);
        let (t1, mut r1) = oneshot::channel();
        let (t2, mut r2) = oneshot::channel();
        gate.ready(guard(&gate, &ro, 1, 0, 7), t1, false);
        gate.ready(guard(&gate, &ok, 2, 8192, 8), t2, false);
        assert!(got(r1.try_recv()).apply().is_err());
        assert!(gate.failed(), "the group must refuse further writes");
        got(r2.try_recv()).apply().unwrap();
        assert_eq!(
            gate.applied_seq(),
            0,
            "the checkpoint must never pass the failed record (restart replays it)"
        );
    }

    #[test]
    fn a_failed_write_on_the_completion_path_reaches_its_task_and_fails_the_group() {
        let dir = tempfile::tempdir().unwrap();
        let _ = base(dir.path());
        let ro = read_only(dir.path());
        let gate = ApplyGate::new(0);
        let (t, mut r) = oneshot::channel();
        gate.ready(guard(&gate, &ro, 1, 0, 7), t, true);
        match r.try_recv() {
            Ok(Ok(Released::Applied(Err(_)))) => {}
            _ => panic!("the task must hear the failed write, not a success or a guard"),
        }
        assert!(gate.failed(), "the group must refuse further writes");
        assert_eq!(gate.applied_seq(), 0, "the checkpoint must not pass it");
    }

    #[test]
    fn apply_now_applies_free_records_at_once_and_hands_waiting_ones_to_their_task() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let gate = ApplyGate::new(0);
        // Seq 1 is held by its task, not applied yet.
        let [mut r1, mut r2, mut r3] = three_records(&gate, &b, [false, true, true]);
        match r2.try_recv() {
            Ok(Ok(Released::Applied(Ok(())))) => {}
            _ => panic!("seq 2 waits for nothing: it must be applied and reported at once"),
        }
        let mut buf = [0u8; 1];
        b.file.read_exact_at(&mut buf, 8192).unwrap();
        assert_eq!(buf[0], 2, "seq 2 reached the base before its task woke");
        assert!(r3.try_recv().is_err(), "seq 3 must wait for seq 1");
        got(r1.try_recv()).apply().unwrap();
        // Released by seq 1's apply: its task applies it, as without apply_now.
        got(r3.try_recv()).apply().unwrap();
        assert_eq!(gate.applied_seq(), 3);
        b.file.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(buf[0], 3, "the later overlapping write wins");
    }

    /// Polls `f` once: whether it finished at once (without any wake-up).
    fn ready_now<F: std::future::Future>(f: F) -> Option<F::Output> {
        let f = std::pin::pin!(f);
        let waker = futures_noop_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        match f.poll(&mut cx) {
            std::task::Poll::Ready(v) => Some(v),
            std::task::Poll::Pending => None,
        }
    }

    fn futures_noop_waker() -> std::task::Waker {
        fn clone(_: *const ()) -> std::task::RawWaker {
            std::task::RawWaker::new(std::ptr::null(), &VTABLE)
        }
        fn noop(_: *const ()) {}
        static VTABLE: std::task::RawWakerVTable =
            std::task::RawWakerVTable::new(clone, noop, noop, noop);
        // SAFETY: every vtable function ignores the (null) data pointer.
        unsafe { std::task::Waker::from_raw(clone(std::ptr::null())) }
    }

    /// Writeback: a read that overlaps an acknowledged, unapplied write waits until
    /// the write is on the base; reads elsewhere (another range, another volume) do
    /// not wait.
    #[tokio::test]
    async fn a_read_overlapping_a_held_write_waits_until_it_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let gate = ApplyGate::new(0);
        let t = gate.hold(0, 0, 4096);
        assert_eq!(ready_now(gate.wait_unheld(0, 8192, 12288)), Some(true));
        assert_eq!(ready_now(gate.wait_unheld(1, 0, 4096)), Some(true));
        assert_eq!(
            ready_now(gate.wait_unheld(0, 4096, 8192)),
            Some(true),
            "adjacent"
        );
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_unheld(0, 2048, 6144).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        assert!(
            !waiting.is_finished(),
            "the read must wait for the held write"
        );
        // Journaled: the completion hands it to the gate, which applies it.
        let (tx, _rx) = oneshot::channel();
        gate.ready(guard(&gate, &b, 1, 0, 5).with_hold(Some(t)), tx, true);
        assert!(waiting.await.unwrap(), "released once applied");
        let mut buf = [0u8; 1];
        b.file.read_exact_at(&mut buf, 2048).unwrap();
        assert_eq!(buf[0], 5, "the read that waited sees the write");
        assert_eq!(ready_now(gate.wait_unheld(0, 0, 4096)), Some(true));
    }

    /// A held write whose base write fails keeps its hold: a read there fails
    /// instead of returning data without the acknowledged write; a hold whose write
    /// was refused before it got a sequence simply ends.
    #[tokio::test]
    async fn a_lost_held_write_fails_its_readers() {
        let dir = tempfile::tempdir().unwrap();
        let _ = base(dir.path());
        let ro = read_only(dir.path());
        let gate = ApplyGate::new(0);
        let refused = gate.hold(0, 65536, 69632);
        gate.unhold(refused);
        assert_eq!(ready_now(gate.wait_unheld(0, 65536, 69632)), Some(true));
        let t = gate.hold(0, 0, 4096);
        let waiting = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_unheld(0, 0, 512).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let (tx, _rx) = oneshot::channel();
        gate.ready(guard(&gate, &ro, 1, 0, 5).with_hold(Some(t)), tx, true);
        assert!(!waiting.await.unwrap(), "the waiting read must fail");
        assert_eq!(ready_now(gate.wait_unheld(0, 0, 512)), Some(false));
        assert_eq!(ready_now(gate.wait_unheld(0, 8192, 8704)), Some(true));
    }

    /// The FLUSH barrier: `wait_applied(n)` returns once the contiguous applied
    /// prefix reaches n (a later record applied first does not count), and fails
    /// when the gate fails (a lost write: the prefix would never get there).
    #[tokio::test]
    async fn the_flush_barrier_waits_for_the_contiguous_prefix_and_fails_with_the_gate() {
        let dir = tempfile::tempdir().unwrap();
        let b = base(dir.path());
        let gate = ApplyGate::new(0);
        assert_eq!(ready_now(gate.wait_applied(0)), Some(true));
        let [mut r1, mut r2, mut r3] = three_records(&gate, &b, [false; 3]);
        let barrier = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_applied(2).await }
        });
        got(r2.try_recv()).apply().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!barrier.is_finished(), "seq 1 is not applied yet");
        got(r1.try_recv()).apply().unwrap();
        assert!(barrier.await.unwrap());
        let later = tokio::spawn({
            let gate = gate.clone();
            async move { gate.wait_applied(4).await }
        });
        got(r3.try_recv()).apply().unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert!(!later.is_finished(), "seq 4 was never applied");
        gate.fail();
        assert!(
            !later.await.unwrap(),
            "a failed gate ends the barrier with an error"
        );
    }
}
