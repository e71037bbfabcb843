//! Where a session's write-sets come from: [`ShipReader`] cuts them from the in-memory
//! tail on the session task while the target is current, and hands over to a
//! [`ReaderThread`] reading journal segments while it is behind. Whether it reads
//! segments (the target catches up) is the bandwidth cap's traffic class
//! ([`ShipReader::catching_up`]). The cold tier's uploader uses a [`ReaderThread`]
//! alone.
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use anyhow::{anyhow, Context};
use ferry_journal::{Journal, Op, Seq};
use ferry_proto::wire::{WireRecord, WriteSet};
use tokio::sync::mpsc;

use crate::ship::feed::{DurableSeq, Tail, TailRead};
use crate::ship::records::wire_record;

/// A write-set is cut at a seal, or once it holds this many bytes of records.
pub const MAX_WRITE_SET_BYTES: usize = 4 << 20;

/// A caught-up reader re-checks its channel at least this often.
const IDLE_WAIT: Duration = Duration::from_millis(200);

/// A session's journal reader thread and the write-sets it forms. Dropping it closes
/// the channel, wakes the thread and joins it: no reader outlives its session (nor,
/// at shutdown, the runtime that drops the session). The join is short: the thread
/// checks the channel between records and returns once it is closed.
pub(crate) struct ReaderThread {
    rx: mpsc::Receiver<anyhow::Result<WriteSet>>,
    upto: Arc<DurableSeq>,
    /// The thread reads journal segments (the target is behind the in-memory tail).
    behind: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl ReaderThread {
    /// Starts reading write-sets from `from` on, at most `ahead` of them formed ahead
    /// of the network.
    pub(crate) fn spawn(
        name: &str,
        src: ShipSource,
        from: Seq,
        epoch: u64,
        ahead: usize,
    ) -> anyhow::Result<ReaderThread> {
        Self::start(name, src, (from, epoch, ahead), false)
    }

    /// A thread that reads from `from` (journal segments first, then the tail) until
    /// it is caught up, then ends (its channel closes): a [`ShipReader`] behind the
    /// tail.
    pub(crate) fn spawn_catch_up(
        name: &str,
        src: ShipSource,
        from: Seq,
        epoch: u64,
        ahead: usize,
    ) -> anyhow::Result<ReaderThread> {
        Self::start(name, src, (from, epoch, ahead), true)
    }

    fn start(
        name: &str,
        src: ShipSource,
        (from, epoch, ahead): (Seq, u64, usize),
        catch_up: bool,
    ) -> anyhow::Result<ReaderThread> {
        let (tx, rx) = mpsc::channel(ahead);
        let upto = src.upto.clone();
        let behind = Arc::new(AtomicBool::new(catch_up));
        let flag = behind.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-ship-{name}"))
            .spawn(move || read_write_sets(src, (from, epoch, catch_up), tx, &flag))
            .context("spawning the journal reader thread")?;
        Ok(ReaderThread {
            rx,
            upto,
            behind,
            thread: Some(thread),
        })
    }

    /// Whether the write-sets now formed come from journal segments.
    pub(crate) fn catching_up(&self) -> bool {
        self.behind.load(Ordering::Relaxed)
    }

    /// The next write-set at once, if one is formed.
    pub(crate) fn try_recv(&mut self) -> Option<anyhow::Result<WriteSet>> {
        self.rx.try_recv().ok()
    }

    /// The next write-set; `None` once the thread stopped.
    pub(crate) async fn recv(&mut self) -> Option<anyhow::Result<WriteSet>> {
        self.rx.recv().await
    }
}

impl Drop for ReaderThread {
    fn drop(&mut self) {
        self.rx.close();
        self.upto.wake();
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                tracing::error!("a journal reader thread panicked");
            }
        }
    }
}

/// A replication session's write-sets: read from the in-memory tail by the session
/// task itself while the target is current, and by a [`ReaderThread`] from journal
/// segments only while it is behind. A current target is the latency path: a write's
/// record enters the tail on the task that appended it, the watch wakes the session
/// task on the same runtime, and the write-set goes out with no thread hand-off (the
/// reader thread used to cost two context switches per write-set, each way of a
/// condition variable and a channel). `recv` is cancel safe: records are taken from
/// the tail only when a write-set is returned.
pub(crate) struct ShipReader {
    src: ShipSource,
    name: String,
    epoch: u64,
    ahead: usize,
    /// The next sequence to ship.
    next: Seq,
    upto: tokio::sync::watch::Receiver<Seq>,
    durable: tokio::sync::watch::Receiver<Seq>,
    /// The reader thread, while the target is behind the tail.
    behind: Option<ReaderThread>,
    /// The last look at the tail found nothing: the next records linger first.
    caught_up: bool,
    /// When lingering records are cut into a write-set.
    hold_until: Option<tokio::time::Instant>,
}

/// What [`ShipReader::poll_tail`] found.
enum Poll {
    Ready(WriteSet),
    /// Records are there; they go at this time (linger).
    Hold(tokio::time::Instant),
    /// Nothing after `next` yet.
    Empty,
    /// `next` is neither in memory nor durable yet (or the tail is still empty).
    NotYetDurable,
    /// `next` left memory: read journal segments.
    Evicted,
}

impl ShipReader {
    /// Write-sets from `from` on; a reader thread, while one is needed, forms at most
    /// `ahead` of them ahead of the network. Every target starts on the tail; one
    /// behind it gets a catch-up thread. (Async targets kept a thread for the whole
    /// session until the send queue was bounded in bytes: with a queue that took every
    /// write-set the session task cut, reading on the task cost more under 1M writes.
    /// Since, it costs less: benches/README.md, "Async targets on the tail".)
    pub(crate) fn new(
        name: &str,
        src: ShipSource,
        (from, epoch, ahead): (Seq, u64, usize),
    ) -> Self {
        ShipReader {
            upto: src.upto.subscribe(),
            durable: src.durable.subscribe(),
            src,
            name: name.to_string(),
            epoch,
            ahead,
            next: from,
            behind: None,
            caught_up: false,
            hold_until: None,
        }
    }

    /// Whether the write-sets now formed come from journal segments: the target is
    /// catching up (bulk traffic for the bandwidth cap), not following live writes.
    pub(crate) fn catching_up(&self) -> bool {
        self.behind.as_ref().is_some_and(|t| t.catching_up())
    }

    /// The next write-set at once, if one is formed (or due from memory).
    pub(crate) fn try_recv(&mut self) -> Option<anyhow::Result<WriteSet>> {
        if let Some(t) = self.behind.as_mut() {
            return t.try_recv().map(|r| self.took(r));
        }
        match self.poll_tail() {
            Poll::Ready(ws) => Some(Ok(ws)),
            _ => None,
        }
    }

    /// The next write-set; `None` never (the stream goes on until the session ends),
    /// an error if the journal could not be read.
    pub(crate) async fn recv(&mut self) -> Option<anyhow::Result<WriteSet>> {
        loop {
            if let Some(t) = self.behind.as_mut() {
                match t.recv().await {
                    Some(r) => return Some(self.took(r)),
                    // The thread caught up: back to memory.
                    None => {
                        self.behind = None;
                        continue;
                    }
                }
            }
            // Marked seen before the tail is read: a record published after the read
            // wakes the wait below.
            self.upto.borrow_and_update();
            match self.poll_tail() {
                Poll::Ready(ws) => return Some(Ok(ws)),
                Poll::Hold(until) => tokio::time::sleep_until(until).await,
                Poll::Empty => self.upto.changed().await.ok()?,
                Poll::NotYetDurable => {
                    // It arrives in the tail (an empty tail: the first record), or,
                    // evicted before it was durable, it is read once the journal
                    // holds it.
                    let next = self.next;
                    tokio::select! {
                        r = self.durable.wait_for(|d| *d >= next) => r.ok().map(|_| ())?,
                        r = self.upto.changed() => r.ok()?,
                    }
                }
                Poll::Evicted => match self.read_behind() {
                    Ok(t) => self.behind = Some(t),
                    Err(e) => return Some(Err(e)),
                },
            }
        }
    }

    /// What the tail has from `next`. An async target that was caught up lingers
    /// (`replication.async_linger_us`) from the first record it sees, so the records
    /// that follow join its write-set, as the reader thread did; one that is behind
    /// never waits.
    fn poll_tail(&mut self) -> Poll {
        let upto = self.src.upto.get();
        let recs = match self.src.tail.read(self.next, MAX_WRITE_SET_BYTES, upto) {
            TailRead::Records(recs) => recs,
            // Not in memory (evicted before it was durable, or the tail is off) and
            // not readable yet: wait until the journal holds it.
            TailRead::Evicted if self.next > self.src.journal.durable_seq() => {
                self.caught_up = true;
                return Poll::NotYetDurable;
            }
            TailRead::Evicted => return Poll::Evicted,
        };
        if recs.is_empty() {
            self.caught_up = true;
            return Poll::Empty;
        }
        if self.caught_up && !self.src.linger.is_zero() {
            let now = tokio::time::Instant::now();
            let until = *self.hold_until.get_or_insert(now + self.src.linger);
            if now < until {
                return Poll::Hold(until);
            }
        }
        self.caught_up = false;
        self.hold_until = None;
        Poll::Ready(self.cut(recs))
    }

    /// A thread that reads from `next` (journal segments, then the tail) until it is
    /// caught up, then ends.
    fn read_behind(&self) -> anyhow::Result<ReaderThread> {
        ReaderThread::spawn_catch_up(
            &self.name,
            self.src.clone(),
            self.next,
            self.epoch,
            self.ahead,
        )
    }

    fn took(&mut self, r: anyhow::Result<WriteSet>) -> anyhow::Result<WriteSet> {
        let ws = r?;
        self.next = ws.last_seq + 1;
        Ok(ws)
    }

    /// One write-set of the records the tail gave (it stops at a seal and at
    /// [`MAX_WRITE_SET_BYTES`], as the thread's cut does).
    fn cut(&mut self, recs: Vec<(Seq, ferry_journal::Record, u64)>) -> WriteSet {
        let first = recs.first().map_or(self.next, |r| r.0);
        let last = recs.last().map_or(self.next, |r| r.0);
        let ts = recs.last().map_or(0, |r| r.2);
        self.next = last + 1;
        WriteSet {
            epoch: self.epoch,
            first_seq: first,
            last_seq: last,
            timestamp_ns: ts,
            records: recs
                .into_iter()
                .map(|(s, r, _)| wire_record(s, r))
                .collect(),
        }
    }
}

/// Where a shipper's reader (its session task, or a reader thread) takes records
/// from, and how it waits for them.
#[derive(Clone)]
pub(crate) struct ShipSource {
    pub(crate) journal: Arc<Journal>,
    pub(crate) tail: Arc<Tail>,
    /// The position this reader ships up to and waits on: the feed's ready position
    /// (records not durable yet included: `ship::feed`), or its durable one.
    pub(crate) upto: Arc<DurableSeq>,
    /// The journal's durable position (what a reader behind the tail waits for).
    pub(crate) durable: Arc<DurableSeq>,
    /// Coalescing wait once caught up (`replication.async_linger_us`; 0 for sync).
    pub(crate) linger: Duration,
}

/// Produces write-sets from `from` on: from the in-memory tail while it holds the
/// position, from journal segments while behind. Blocks while the channel is full.
/// `catch_up`: starts in the journal and returns once it is caught up (nothing more
/// to read in memory either): one thread for the whole time the target is behind, not
/// one per pass over the journal. A thread per pass cost the primary ≈ 40 % more CPU
/// under 1M sequential writes, its fresh heap zeroing new pages for every journal
/// read (`clear_page_erms` 22 % of the primary's samples).
fn read_write_sets(
    src: ShipSource,
    (from, epoch, catch_up): (Seq, u64, bool),
    tx: mpsc::Sender<anyhow::Result<WriteSet>>,
    behind: &AtomicBool,
) {
    let ShipSource {
        journal,
        tail,
        upto,
        // The thread waits on `upto` alone: it reads only what the journal or
        // the tail already holds (`ShipReader` waits on `durable`).
        durable: _,
        linger,
    } = src;
    let mut next = from;
    let mut ws = Forming {
        tx: &tx,
        epoch,
        records: Vec::new(),
        bytes: 0,
        ts: 0,
    };
    let mut reader: Option<ferry_journal::JournalReader> = None;
    if catch_up {
        match journal.reader(next) {
            Ok(r) => reader = Some(r),
            Err(e) => {
                let _ = tx.blocking_send(Err(anyhow!("journal reader from {next}: {e}")));
                return;
            }
        }
    }
    loop {
        if tx.is_closed() {
            return;
        }
        // Memory first.
        if reader.is_none() {
            let read = match tail.read(next, MAX_WRITE_SET_BYTES, upto.get()) {
                // Nothing in memory yet and nothing durable to read: caught up.
                TailRead::Evicted if next > journal.durable_seq() => TailRead::Records(Vec::new()),
                r => r,
            };
            match read {
                TailRead::Records(recs) if recs.is_empty() => {
                    // Caught up: a catch-up thread hands over to its session task.
                    if catch_up {
                        return;
                    }
                    // Wait for more records (bounded, re-checks).
                    let arrived = upto.wait_for(next, IDLE_WAIT);
                    // Coalesce: let the records that follow join this write-set.
                    if arrived && !linger.is_zero() {
                        std::thread::sleep(linger);
                    }
                    continue;
                }
                TailRead::Records(recs) => {
                    for (seq, rec, t) in recs {
                        next = seq + 1;
                        if !ws.add(seq, rec, t) {
                            return;
                        }
                    }
                    if !ws.emit() {
                        return;
                    }
                    continue;
                }
                TailRead::Evicted => match journal.reader(next) {
                    Ok(r) => {
                        behind.store(true, Ordering::Relaxed);
                        reader = Some(r);
                    }
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow!("journal reader from {next}: {e}")));
                        return;
                    }
                },
            }
        }
        // Behind: read segments until caught up with what is durable, then back to memory.
        if tx.is_closed() {
            return;
        }
        let Some(r) = reader.as_mut() else { continue };
        match r.next() {
            Some(Ok(e)) => {
                next = e.seq + 1;
                if !ws.add(e.seq, e.record, e.meta.timestamp_ns) {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = tx.blocking_send(Err(anyhow!("reading the journal: {e}")));
                return;
            }
            None => {
                if !ws.emit() {
                    return;
                }
                behind.store(false, Ordering::Relaxed);
                reader = None;
            }
        }
    }
}

/// The write-set being formed from consecutive records.
struct Forming<'a> {
    tx: &'a mpsc::Sender<anyhow::Result<WriteSet>>,
    epoch: u64,
    records: Vec<WireRecord>,
    bytes: usize,
    /// Timestamp of the newest record (the write-set's).
    ts: u64,
}

impl Forming<'_> {
    /// Adds a record; a seal or a full write-set is sent at once. False if the
    /// consumer is gone.
    fn add(&mut self, seq: Seq, rec: ferry_journal::Record, ts: u64) -> bool {
        let seal = rec.op == Op::Seal;
        self.ts = ts;
        self.bytes += rec.data.len() + 32;
        self.records.push(wire_record(seq, rec));
        !(seal || self.bytes >= MAX_WRITE_SET_BYTES) || self.emit()
    }

    /// Sends the records gathered so far as one write-set (nothing if none). False
    /// if the consumer is gone.
    fn emit(&mut self) -> bool {
        let recs = std::mem::take(&mut self.records);
        self.bytes = 0;
        let (Some(first), Some(last)) = (recs.first().map(|r| r.seq), recs.last().map(|r| r.seq))
        else {
            return true;
        };
        let ws = WriteSet {
            epoch: self.epoch,
            first_seq: first,
            last_seq: last,
            timestamp_ns: self.ts,
            records: recs,
        };
        self.tx.blocking_send(Ok(ws)).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_journal::Record;
    use std::time::Instant;

    fn journal(dir: &std::path::Path) -> Arc<Journal> {
        let mut o = ferry_journal::JournalOptions::new(dir.join("j"), [1; 16]);
        o.segment_size = 1 << 20;
        o.capacity = 8 << 20;
        o.engine = ferry_journal::EngineChoice::Std;
        Arc::new(Journal::open(o).unwrap().0)
    }

    fn write(j: &Journal, offset: u64) -> Seq {
        let rec = Record::write(0, offset, bytes::Bytes::from(vec![7u8; 4096]));
        j.append_wait(rec).unwrap()
    }

    async fn seqs_until(reader: &mut ReaderThread, last: Seq) -> Vec<Seq> {
        let mut got = Vec::new();
        while got.last() != Some(&last) {
            let ws = tokio::time::timeout(Duration::from_secs(10), reader.recv())
                .await
                .expect("a write-set within 10 s")
                .expect("the reader runs")
                .unwrap();
            assert_eq!(ws.epoch, 3);
            assert_eq!(ws.first_seq, ws.records[0].seq);
            got.extend(ws.records.iter().map(|r| r.seq));
        }
        got
    }

    /// Reads what the journal holds from the asked position, waits for what becomes
    /// durable later, and its handle joins the thread promptly when dropped while the
    /// thread waits (the session ending).
    #[tokio::test]
    async fn the_reader_follows_the_durable_position_and_is_joined_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        for i in 0..5 {
            write(&j, i * 4096);
        }
        let durable = Arc::new(DurableSeq::new(j.durable_seq()));
        let src = ShipSource {
            journal: j.clone(),
            tail: Arc::new(Tail::new()),
            upto: durable.clone(),
            durable: durable.clone(),
            linger: Duration::ZERO,
        };
        let mut reader = ReaderThread::spawn("t", src, 3, 3, 4).unwrap();
        assert_eq!(seqs_until(&mut reader, 5).await, vec![3, 4, 5]);
        // Caught up: the next record is shipped once it is durable.
        let s = write(&j, 1 << 20);
        durable.publish(s);
        assert_eq!(seqs_until(&mut reader, s).await, vec![s]);
        let t0 = Instant::now();
        drop(reader);
        assert!(
            t0.elapsed() < IDLE_WAIT * 5,
            "joining the waiting reader took {:?}",
            t0.elapsed()
        );
    }

    /// A journal and an enabled early feed over it.
    fn early(dir: &std::path::Path) -> (Arc<Journal>, crate::ship::ShipFeed) {
        let feed = crate::ship::ShipFeed::new_early(0);
        feed.enable(1 << 20);
        (journal(dir), feed)
    }

    fn rec(offset: u64) -> Record {
        Record::write(0, offset, bytes::Bytes::from(vec![7u8; 4096]))
    }

    fn source(j: &Arc<Journal>, feed: &crate::ship::ShipFeed, linger: Duration) -> ShipSource {
        ShipSource {
            journal: j.clone(),
            tail: feed.tail.clone(),
            upto: feed.ready(),
            durable: feed.durable(),
            linger,
        }
    }

    async fn next_ws(r: &mut ShipReader) -> WriteSet {
        tokio::time::timeout(Duration::from_secs(10), r.recv())
            .await
            .expect("a write-set within 10 s")
            .expect("the reader runs")
            .unwrap()
    }

    fn seqs(ws: &WriteSet) -> Vec<Seq> {
        ws.records.iter().map(|r| r.seq).collect()
    }

    /// A current target's write-sets come from the early tail on the session task:
    /// records not durable yet included, cut at a seal, and nothing read past the
    /// ready position.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_current_reader_ships_from_memory_before_the_journal_holds_the_records() {
        let dir = tempfile::tempdir().unwrap();
        let (j, feed) = early(dir.path());
        let mut r = ShipReader::new("t", source(&j, &feed, Duration::ZERO), (1, 3, 4));
        assert!(r.try_recv().is_none(), "nothing sequenced yet");
        for s in 1..=2 {
            feed.sequenced(s, &rec(s * 4096));
        }
        let seal = Record {
            volume: 0,
            op: ferry_journal::Op::Seal,
            offset: 0,
            length: 0,
            data: bytes::Bytes::new(),
        };
        feed.sequenced(3, &seal);
        feed.sequenced(4, &rec(0));
        assert_eq!(j.durable_seq(), 0, "the journal holds none of them");
        let ws = next_ws(&mut r).await;
        assert_eq!((seqs(&ws), ws.epoch), (vec![1, 2, 3], 3), "cut at the seal");
        assert!(!r.catching_up());
        assert_eq!(seqs(&r.try_recv().unwrap().unwrap()), vec![4]);
        // Caught up: the next record wakes the waiting task.
        let waiting = tokio::spawn(async move { seqs(&next_ws(&mut r).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        feed.sequenced(5, &rec(8192));
        assert_eq!(waiting.await.unwrap(), vec![5]);
    }

    /// An async target that was caught up lingers from the first record it sees, so
    /// the records sequenced meanwhile join its write-set.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_caught_up_async_reader_lingers_so_that_records_coalesce() {
        let dir = tempfile::tempdir().unwrap();
        let (j, feed) = early(dir.path());
        let linger = Duration::from_millis(500);
        let mut r = ShipReader::new("t", source(&j, &feed, linger), (1, 3, 4));
        assert!(r.try_recv().is_none());
        feed.sequenced(1, &rec(0));
        assert!(r.try_recv().is_none(), "held for the linger");
        feed.sequenced(2, &rec(4096));
        assert_eq!(seqs(&next_ws(&mut r).await), vec![1, 2]);
    }

    /// A reader behind the tail reads journal segments on a thread, then returns to
    /// memory once it is caught up; a record neither in memory nor
    /// durable is waited for.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reader_behind_the_tail_catches_up_from_the_journal_then_follows_memory() {
        let dir = tempfile::tempdir().unwrap();
        let j = journal(dir.path());
        for i in 0..5 {
            write(&j, i * 4096);
        }
        // The tail is off (as before replication was enabled): every record is read
        // back from the journal.
        let feed = crate::ship::ShipFeed::new_early(j.durable_seq());
        let mut r = ShipReader::new("t", source(&j, &feed, Duration::ZERO), (3, 3, 4));
        // The tail holds nothing: these can only come from journal segments.
        assert_eq!(seqs(&next_ws(&mut r).await), vec![3, 4, 5]);
        let (jj, f) = (j.clone(), feed.durable());
        let waiting = tokio::spawn(async move { seqs(&next_ws(&mut r).await) });
        tokio::time::sleep(Duration::from_millis(20)).await;
        let s = write(&jj, 1 << 20);
        f.publish(s);
        assert_eq!(waiting.await.unwrap(), vec![s], "read once durable");
    }
}
