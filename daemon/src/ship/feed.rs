//! What shippers read from the write path: [`ShipFeed`] (fed strictly in sequence
//! order), the in-memory [`Tail`] of recent records, the positions ([`DurableSeq`])
//! shippers' reader threads wait on, and the [`SeqIndex`] that gives each target's
//! lag in bytes and seconds.
//!
//! # Shipping before local durability
//!
//! A primary's feed is *early* ([`ShipFeed::new_early`]): each record enters the
//! tail when the journal assigns its sequence ([`ShipFeed::sequenced`], called by
//! `Journal::append_sequenced`), so a shipper sends it while the primary's own
//! journal write is under way, and a write's reply waits for both (DRBD's parallel
//! local and remote writes). Two positions come out of it: *ready* (every record in
//! the tail, what early shippers wait on) and *durable* (what the primary's journal
//! holds, what the cold tier and targets that relay wait on: they must never hold a
//! record this history could lose). The tail is read only up to the position the
//! reader waits on.
//!
//! What this costs on a crash: a standby may hold records the restarted primary's
//! journal lost (none of them was acknowledged: a reply waits for the local journal
//! in every cache mode once the volume has sync targets, and writethrough always).
//! The primary's *crash horizon* (`store::meta`, `horizon/<target>`) makes such a
//! standby resync by digest instead of streaming on from its position
//! (`ship::session::plan_hello`).
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_journal::{now_ns, Op, Seq};
use parking_lot::{Condvar, Mutex};

use crate::ship::records::RECORD_COST;
use crate::ship::target::TargetState;

/// Records tracked for lag accounting; beyond this a far-behind target's lag is
/// reported as a lower bound.
const SEQ_INDEX_LEN: usize = 1 << 20;

/// (sequence, cumulative record bytes, primary timestamp) of recent journal records,
/// appended in sequence order by the journal's completion path.
#[derive(Default)]
pub struct SeqIndex {
    inner: Mutex<SeqIndexInner>,
}

#[derive(Default)]
struct SeqIndexInner {
    entries: VecDeque<(Seq, u64, u64)>,
    cum_bytes: u64,
}

impl SeqIndex {
    pub fn push(&self, seq: Seq, bytes: u64, ts_ns: u64) {
        let mut g = self.inner.lock();
        g.cum_bytes += bytes;
        let cum = g.cum_bytes;
        if g.entries.len() >= SEQ_INDEX_LEN {
            g.entries.pop_front();
        }
        g.entries.push_back((seq, cum, ts_ns));
    }

    /// Forgets every entry (the sequence went on with a gap); the byte count goes on.
    pub fn clear(&self) {
        self.inner.lock().entries.clear();
    }

    /// Bytes and age of everything after `acked` (0 when caught up).
    pub fn lag_after(&self, acked: Seq, now_ns: u64) -> (u64, f64) {
        let g = self.inner.lock();
        let Some(&(last_seq, last_cum, _)) = g.entries.back() else {
            return (0, 0.0);
        };
        if acked >= last_seq {
            return (0, 0.0);
        }
        let Some(&(front_seq, front_cum, front_ts)) = g.entries.front() else {
            return (0, 0.0);
        };
        // Index of the first record after `acked`.
        let (base_cum, first_ts) = if acked < front_seq {
            (front_cum, front_ts) // lower bound: the target is further behind than tracked
        } else {
            let i = (acked - front_seq) as usize;
            let at = g.entries.get(i).map_or(front_cum, |e| e.1);
            let ts = g.entries.get(i + 1).map_or(front_ts, |e| e.2);
            (at, ts)
        };
        let age = now_ns.saturating_sub(first_ts) as f64 / 1e9;
        (last_cum.saturating_sub(base_cum), age)
    }
}

/// Recent durable records kept in memory (bounded by bytes), so a shipper that is
/// current sends from memory and reads journal segments only when it is behind.
pub struct Tail {
    inner: Mutex<TailInner>,
    /// 0 until replication is enabled: a primary without targets keeps nothing.
    cap_bytes: std::sync::atomic::AtomicUsize,
}

struct TailInner {
    entries: VecDeque<(Seq, ferry_journal::Record, u64)>,
    bytes: usize,
}

/// What the tail can say about a position.
pub enum TailRead {
    /// Records from the asked position on (possibly empty: caught up).
    Records(Vec<(Seq, ferry_journal::Record, u64)>),
    /// The position was evicted: read the journal.
    Evicted,
}

impl Default for Tail {
    fn default() -> Self {
        Self::new()
    }
}

impl Tail {
    pub fn new() -> Tail {
        Tail {
            inner: Mutex::new(TailInner {
                entries: VecDeque::new(),
                bytes: 0,
            }),
            cap_bytes: Default::default(),
        }
    }

    /// Starts keeping up to `cap_bytes` of recent records.
    pub fn enable(&self, cap_bytes: usize) {
        self.cap_bytes.store(cap_bytes, Ordering::Release);
    }

    /// Called in sequence order with every durable record.
    pub fn push(&self, seq: Seq, rec: ferry_journal::Record, ts_ns: u64) {
        let cap = self.cap_bytes.load(Ordering::Acquire);
        if cap == 0 {
            return;
        }
        let mut g = self.inner.lock();
        g.bytes += rec.data.len() + RECORD_COST;
        g.entries.push_back((seq, rec, ts_ns));
        while g.bytes > cap {
            match g.entries.pop_front() {
                Some((_, r, _)) => g.bytes -= r.data.len() + RECORD_COST,
                None => break,
            }
        }
    }

    /// Forgets every record kept (the sequence went on with a gap).
    pub fn clear(&self) {
        let mut g = self.inner.lock();
        g.entries.clear();
        g.bytes = 0;
    }

    /// Records from `from` on, up to about `max_bytes` and never past `upto` (the
    /// position the reader may ship: an early tail holds records not durable yet).
    pub fn read(&self, from: Seq, max_bytes: usize, upto: Seq) -> TailRead {
        let g = self.inner.lock();
        let (Some(front), Some(back)) = (g.entries.front(), g.entries.back()) else {
            // Nothing kept (yet): anything not durable yet will arrive here; anything
            // older must come from the journal.
            return TailRead::Evicted;
        };
        let (front, back) = (front.0, back.0.min(upto));
        if from < front {
            return TailRead::Evicted;
        }
        if from > back {
            return TailRead::Records(Vec::new());
        }
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in g.entries.range((from - front) as usize..) {
            if e.0 > upto {
                break;
            }
            bytes += e.1.data.len() + 32;
            out.push(e.clone());
            if bytes >= max_bytes || e.1.op == Op::Seal {
                break;
            }
        }
        TailRead::Records(out)
    }
}

/// What shippers read from the write path, fed by the journal's completions in
/// sequence order: lag accounting, the in-memory tail and the durable position.
/// Disabled — no work, no memory — on a primary without replication targets.
pub struct ShipFeed {
    pub index: Arc<SeqIndex>,
    pub tail: Arc<Tail>,
    durable: Arc<DurableSeq>,
    /// The last record in the tail: `durable`'s twin on a feed that is not early.
    ready: Arc<DurableSeq>,
    /// Records enter the tail when sequenced, not when durable (see the module doc).
    early: bool,
    enabled: AtomicBool,
    /// The last sequence fed (0: none yet), to check that the feed is contiguous.
    last_fed: AtomicU64,
    /// Targets whose overflow tracking marks every durable record while they are in
    /// bitmap mode (`ship::catchup`).
    tracked: parking_lot::RwLock<Vec<Arc<TargetState>>>,
    /// Some tracked target has `max_lag_seconds` (writes look at its lag: `ship::pace`).
    pub(crate) pacing: AtomicBool,
}

impl ShipFeed {
    /// A feed that takes records as they become durable (a relay's).
    pub fn new(durable: Seq) -> ShipFeed {
        Self::with(durable, false)
    }

    /// A feed that takes records as they are sequenced (a primary's; module doc).
    pub fn new_early(durable: Seq) -> ShipFeed {
        Self::with(durable, true)
    }

    fn with(durable: Seq, early: bool) -> ShipFeed {
        let durable = Arc::new(DurableSeq::new(durable));
        ShipFeed {
            index: Arc::new(SeqIndex::default()),
            tail: Arc::new(Tail::new()),
            ready: if early {
                Arc::new(DurableSeq::new(durable.get()))
            } else {
                durable.clone()
            },
            durable,
            early,
            enabled: AtomicBool::new(false),
            last_fed: AtomicU64::new(0),
            tracked: Default::default(),
            pacing: AtomicBool::new(false),
        }
    }

    /// Registers the targets whose dirty maps mark durable records.
    pub fn track(&self, targets: Vec<Arc<TargetState>>) {
        let pacing = targets.iter().any(|t| t.max_lag.is_some());
        *self.tracked.write() = targets;
        self.pacing.store(pacing, Ordering::Release);
    }

    /// The tracked targets that pace writes (`max_lag_seconds`).
    pub(crate) fn paced_targets(&self) -> Vec<Arc<TargetState>> {
        if !self.pacing.load(Ordering::Acquire) {
            return Vec::new();
        }
        let tracked = self.tracked.read();
        tracked
            .iter()
            .filter(|t| t.max_lag.is_some())
            .cloned()
            .collect()
    }

    /// Starts feeding, keeping up to `tail_bytes` of recent records in memory.
    pub fn enable(&self, tail_bytes: usize) {
        self.tail.enable(tail_bytes);
        self.enabled.store(true, Ordering::Release);
    }

    /// An early feed: called with every record as its sequence is assigned, in
    /// sequence order (`Journal::append_sequenced`). A feed that is not early
    /// ignores it.
    pub fn sequenced(&self, seq: Seq, rec: &ferry_journal::Record) {
        if self.early && self.enabled.load(Ordering::Acquire) {
            self.to_tail(seq, rec.clone());
        }
    }

    /// Called with every durable record, in sequence order.
    pub fn journaled(&self, seq: Seq, rec: impl FnOnce() -> ferry_journal::Record) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        let rec = rec();
        for t in self.tracked.read().iter() {
            t.track.on_durable(seq, &rec);
        }
        if !self.early {
            self.to_tail(seq, rec);
        }
        self.durable.publish(seq);
    }

    /// The record enters the lag index and the tail, and shippers waiting on the
    /// ready position wake.
    fn to_tail(&self, seq: Seq, rec: ferry_journal::Record) {
        // Shippers and the tail assume no hole: a record skipped here would never be
        // shipped from memory.
        let last = self.last_fed.swap(seq, Ordering::Relaxed);
        debug_assert!(
            last == 0 || seq == last + 1,
            "ShipFeed fed out of order: {seq} after {last}"
        );
        let ts = now_ns();
        // Lag is counted in bytes to ship: a trim's range is not shipped as data.
        self.index.push(seq, rec.data.len() as u64, ts);
        self.tail.push(seq, rec, ts);
        if self.early {
            self.ready.publish(seq);
        }
    }

    /// The journal went on after `seq` without records up to it (a relay's resync
    /// from its primary: `Journal::skip_to`). The tail and the lag index hold only
    /// contiguous records, so they start over; a target behind `seq` reads the
    /// journal, which then plans a resync for it.
    pub fn skipped_to(&self, seq: Seq) {
        if !self.enabled.load(Ordering::Acquire) {
            return;
        }
        self.tail.clear();
        self.index.clear();
        self.last_fed.store(seq, Ordering::Relaxed);
        self.durable.publish(seq);
        if self.early {
            self.ready.publish(seq);
        }
    }

    /// The durable position: what a reader that must not ship a record this history
    /// could still lose waits on.
    pub fn durable(&self) -> Arc<DurableSeq> {
        self.durable.clone()
    }

    /// The last record in the tail: what other readers wait on (the durable position
    /// unless the feed is early).
    pub fn ready(&self) -> Arc<DurableSeq> {
        self.ready.clone()
    }
}

/// The journal's durable position as the feed last saw it, for shippers' reader
/// threads to wait on. A plain condition variable, not a tokio channel: the readers
/// are OS threads, and a tokio timer they drove through a runtime handle panicked
/// once that runtime was shutting down (a stopping primary).
///
/// A session task that reads the tail itself (`ship::reader::ShipReader`) waits on the
/// same position through [`DurableSeq::subscribe`]: a tokio watch, which needs no timer
/// and wakes the task on the runtime the write came from, with no thread in between.
pub struct DurableSeq {
    seq: Mutex<Seq>,
    changed: Condvar,
    watch: tokio::sync::watch::Sender<Seq>,
}

impl DurableSeq {
    pub fn new(seq: Seq) -> DurableSeq {
        DurableSeq {
            seq: Mutex::new(seq),
            changed: Condvar::new(),
            watch: tokio::sync::watch::Sender::new(seq),
        }
    }

    pub fn get(&self) -> Seq {
        *self.seq.lock()
    }

    pub(crate) fn publish(&self, seq: Seq) {
        let mut g = self.seq.lock();
        *g = seq;
        // Under the lock: the watch never ends on an older value than the mutex.
        self.watch.send_replace(seq);
        drop(g);
        self.changed.notify_all();
    }

    /// The position as a tokio watch, for async waiters.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<Seq> {
        self.watch.subscribe()
    }

    /// Blocks until the durable position is at least `seq`, [`DurableSeq::wake`] is
    /// called, or `timeout` passed. Whether it is at least `seq`.
    pub fn wait_for(&self, seq: Seq, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut g = self.seq.lock();
        if *g < seq {
            // One wait: a wake-up (a session letting go of its reader) returns early.
            let _ = self.changed.wait_until(&mut g, deadline);
        }
        *g >= seq
    }

    /// Wakes every waiter (a reader whose session ended re-checks its channel).
    pub fn wake(&self) {
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use ferry_journal::Record;

    fn rec(len: usize, op: Op) -> Record {
        Record {
            volume: 0,
            op,
            offset: 0,
            length: len as u32,
            data: Bytes::from(vec![1u8; len]),
        }
    }

    #[test]
    fn tail_serves_from_memory_and_reports_eviction() {
        let t = Tail::new();
        t.push(1, rec(10, Op::Write), 1);
        assert!(
            matches!(t.read(1, 1 << 20, u64::MAX), TailRead::Evicted),
            "a disabled tail keeps nothing"
        );
        t.enable(1000);
        for s in 1..=20 {
            t.push(
                s,
                rec(100, if s % 5 == 0 { Op::Seal } else { Op::Write }),
                s,
            );
        }
        // 164 bytes accounted per record: about 6 fit in 1000.
        assert!(matches!(t.read(1, 1 << 20, u64::MAX), TailRead::Evicted));
        match t.read(16, 1 << 20, u64::MAX) {
            TailRead::Records(r) => {
                // Stops at the seal (seq 20).
                assert_eq!(
                    r.iter().map(|e| e.0).collect::<Vec<_>>(),
                    vec![16, 17, 18, 19, 20]
                );
            }
            TailRead::Evicted => panic!("seq 16 is in memory"),
        }
        assert!(matches!(t.read(21, 1 << 20, u64::MAX), TailRead::Records(r) if r.is_empty()));
    }

    /// A relay's journal that went on after a resync snapshot: the feed forgets the
    /// records before the gap (the tail and the lag index index by position), so a
    /// reader behind it goes to the journal, and the records after it are served.
    #[test]
    fn a_skip_restarts_the_tail_and_the_lag_index_after_the_gap() {
        let f = ShipFeed::new(0);
        f.enable(1 << 20);
        for s in 1..=3 {
            f.journaled(s, || rec(100, Op::Write));
        }
        f.skipped_to(10);
        assert_eq!(f.durable().get(), 10);
        assert!(matches!(
            f.tail.read(2, 1 << 20, u64::MAX),
            TailRead::Evicted
        ));
        f.journaled(11, || rec(100, Op::Write));
        match f.tail.read(11, 1 << 20, u64::MAX) {
            TailRead::Records(r) => assert_eq!(r.iter().map(|e| e.0).collect::<Vec<_>>(), vec![11]),
            TailRead::Evicted => panic!("seq 11 is in memory"),
        }
        assert!(matches!(
            f.tail.read(5, 1 << 20, u64::MAX),
            TailRead::Evicted
        ));
        f.journaled(12, || rec(100, Op::Write));
        assert_eq!(
            f.index.lag_after(11, now_ns()).0,
            100,
            "only record 12 to ship"
        );
        assert_eq!(f.index.lag_after(12, now_ns()), (0, 0.0));
    }

    /// A primary's early feed: a record is in the tail, and the ready position moves,
    /// as soon as it is sequenced; the durable position moves only when the journal
    /// holds it, and a reader limited to it gets nothing past it.
    #[test]
    fn an_early_feed_serves_records_before_they_are_durable_but_only_to_early_readers() {
        let f = ShipFeed::new_early(0);
        f.enable(1 << 20);
        for s in 1..=3 {
            f.sequenced(s, &rec(100, Op::Write));
        }
        assert_eq!((f.ready().get(), f.durable().get()), (3, 0));
        let seqs = |upto| match f.tail.read(1, 1 << 20, upto) {
            TailRead::Records(r) => r.iter().map(|e| e.0).collect::<Vec<_>>(),
            TailRead::Evicted => panic!("seq 1 is in memory"),
        };
        assert_eq!(seqs(f.ready().get()), vec![1, 2, 3]);
        assert!(seqs(f.durable().get()).is_empty(), "nothing durable yet");
        f.journaled(1, || rec(100, Op::Write));
        f.journaled(2, || rec(100, Op::Write));
        assert_eq!((f.ready().get(), f.durable().get()), (3, 2));
        assert_eq!(seqs(f.durable().get()), vec![1, 2]);
        // The durable completion does not add the record a second time.
        f.journaled(3, || rec(100, Op::Write));
        assert_eq!(seqs(u64::MAX), vec![1, 2, 3]);
        assert_eq!(
            f.index.lag_after(1, now_ns()).0,
            200,
            "records 2 and 3, each counted once"
        );
        // A feed that is not early ignores the sequenced call.
        let late = ShipFeed::new(0);
        late.enable(1 << 20);
        late.sequenced(1, &rec(100, Op::Write));
        assert_eq!(late.ready().get(), 0);
        late.journaled(1, || rec(100, Op::Write));
        assert_eq!((late.ready().get(), late.durable().get()), (1, 1));
    }

    #[test]
    fn durable_seq_wait_returns_on_publish_wake_or_timeout() {
        let d = Arc::new(DurableSeq::new(5));
        assert!(d.wait_for(5, Duration::ZERO), "already durable");
        let t0 = Instant::now();
        assert!(
            !d.wait_for(6, Duration::from_millis(50)),
            "nothing published"
        );
        assert!(t0.elapsed() >= Duration::from_millis(50));
        let (d2, t0) = (d.clone(), Instant::now());
        let h = std::thread::spawn(move || d2.wait_for(7, Duration::from_secs(30)));
        std::thread::sleep(Duration::from_millis(20));
        d.publish(7);
        assert!(h.join().unwrap(), "woken by the publish");
        assert!(t0.elapsed() < Duration::from_secs(10));
        assert_eq!(d.get(), 7);
        let (d2, t0) = (d.clone(), Instant::now());
        let h = std::thread::spawn(move || d2.wait_for(100, Duration::from_secs(30)));
        // The waiter may not be parked yet when woken: retry until it returns.
        while !h.is_finished() {
            d.wake();
            std::thread::sleep(Duration::from_millis(5));
        }
        assert!(!h.join().unwrap(), "woken, not durable");
        assert!(t0.elapsed() < Duration::from_secs(10));
    }

    #[test]
    fn seq_index_gives_lag_in_bytes_and_seconds() {
        let i = SeqIndex::default();
        assert_eq!(i.lag_after(0, 100), (0, 0.0));
        for s in 1..=10u64 {
            i.push(s, 4096, s * 1_000_000_000);
        }
        assert_eq!(i.lag_after(10, 20_000_000_000), (0, 0.0));
        let (bytes, secs) = i.lag_after(7, 20_000_000_000);
        assert_eq!(bytes, 3 * 4096);
        assert!(
            (secs - 12.0).abs() < 1e-9,
            "oldest unacked is seq 8 at t=8 s: {secs}"
        );
        let (bytes, _) = i.lag_after(0, 20_000_000_000);
        assert_eq!(bytes, 9 * 4096, "lower bound when behind the index front");
    }
}
