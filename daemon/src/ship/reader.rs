//! The shipper's reader thread: cuts journal records into write-sets (from the
//! in-memory tail while current, from journal segments while behind), and
//! [`ReaderThread`], the session's handle that joins it. Whether it reads segments
//! (the target catches up) is the bandwidth cap's traffic class
//! ([`ReaderThread::catching_up`]).
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
        let (tx, rx) = mpsc::channel(ahead);
        let upto = src.upto.clone();
        let behind = Arc::new(AtomicBool::new(false));
        let flag = behind.clone();
        let thread = std::thread::Builder::new()
            .name(format!("ferry-ship-{name}"))
            .spawn(move || read_write_sets(src, from, epoch, tx, &flag))
            .context("spawning the journal reader thread")?;
        Ok(ReaderThread {
            rx,
            upto,
            behind,
            thread: Some(thread),
        })
    }

    /// Whether the write-sets now formed come from journal segments: the target is
    /// catching up (bulk traffic for the bandwidth cap), not following live writes.
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

/// Where a shipper's reader thread takes records from, and how it waits for them.
pub(crate) struct ShipSource {
    pub(crate) journal: Arc<Journal>,
    pub(crate) tail: Arc<Tail>,
    /// The position this reader ships up to and waits on: the feed's ready position
    /// (records not durable yet included: `ship::feed`), or its durable one.
    pub(crate) upto: Arc<DurableSeq>,
    /// Coalescing wait once caught up (`replication.async_linger_us`; 0 for sync).
    pub(crate) linger: Duration,
}

/// Produces write-sets from `from` on: from the in-memory tail while it holds the
/// position, from journal segments while behind. Blocks while the channel is full.
fn read_write_sets(
    src: ShipSource,
    from: Seq,
    epoch: u64,
    tx: mpsc::Sender<anyhow::Result<WriteSet>>,
    behind: &AtomicBool,
) {
    let ShipSource {
        journal,
        tail,
        upto,
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
                    // Caught up: wait for more records (bounded, re-checks).
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
                        reader = Some(r)
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
}
