//! The shipper's reader thread: cuts durable journal records into write-sets (from the
//! in-memory tail while current, from journal segments while behind).
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;
use ferry_journal::{Journal, Op, Seq};
use ferry_transport::wire::{WireRecord, WriteSet};
use tokio::sync::{mpsc, watch};

use crate::ship::feed::{Tail, TailRead};
use crate::ship::records::wire_record;

/// A write-set is cut at a seal, or once it holds this many bytes of records.
pub const MAX_WRITE_SET_BYTES: usize = 4 << 20;

/// Where a shipper's reader thread takes records from, and how it waits for them.
pub(crate) struct ShipSource {
    pub(crate) journal: Arc<Journal>,
    pub(crate) tail: Arc<Tail>,
    pub(crate) durable: watch::Receiver<Seq>,
    pub(crate) rt: tokio::runtime::Handle,
    /// Coalescing wait once caught up (`replication.async_linger_us`; 0 for sync).
    pub(crate) linger: Duration,
}

/// Produces write-sets from `from` on: from the in-memory tail while it holds the
/// position, from journal segments while behind. Blocks while the channel is full.
pub(crate) fn read_write_sets(
    src: ShipSource,
    from: Seq,
    epoch: u64,
    tx: mpsc::Sender<anyhow::Result<WriteSet>>,
) {
    let ShipSource {
        journal,
        tail,
        mut durable,
        rt,
        linger,
    } = src;
    let mut next = from;
    let mut records: Vec<WireRecord> = Vec::new();
    let mut bytes = 0usize;
    let mut ts = 0u64;
    let mut reader: Option<ferry_journal::JournalReader> = None;
    loop {
        if tx.is_closed() {
            return;
        }
        // Memory first.
        if reader.is_none() {
            let read = match tail.read(next, MAX_WRITE_SET_BYTES) {
                // Nothing in memory yet and nothing durable to read: caught up.
                TailRead::Evicted if next > journal.durable_seq() => TailRead::Records(Vec::new()),
                r => r,
            };
            match read {
                TailRead::Records(recs) if recs.is_empty() => {
                    // Caught up: wait for more durable records (bounded, re-checks).
                    let arrived = rt.block_on(async {
                        tokio::time::timeout(
                            Duration::from_millis(200),
                            durable.wait_for(|d| *d >= next),
                        )
                        .await
                        .is_ok_and(|r| r.is_ok())
                    });
                    // Coalesce: let the records that follow join this write-set.
                    if arrived && !linger.is_zero() {
                        std::thread::sleep(linger);
                    }
                    continue;
                }
                TailRead::Records(recs) => {
                    for (seq, rec, t) in recs {
                        next = seq + 1;
                        ts = t;
                        let seal = rec.op == Op::Seal;
                        bytes += rec.data.len() + 32;
                        records.push(wire_record(seq, rec));
                        if (seal || bytes >= MAX_WRITE_SET_BYTES)
                            && !emit(&tx, epoch, &mut records, &mut bytes, ts)
                        {
                            return;
                        }
                    }
                    if !records.is_empty() && !emit(&tx, epoch, &mut records, &mut bytes, ts) {
                        return;
                    }
                    continue;
                }
                TailRead::Evicted => match journal.reader(next) {
                    Ok(r) => reader = Some(r),
                    Err(e) => {
                        let _ = tx.blocking_send(Err(anyhow!("journal reader from {next}: {e}")));
                        return;
                    }
                },
            }
        }
        // Behind: read segments until caught up with what is durable, then back to memory.
        let Some(r) = reader.as_mut() else { continue };
        match r.next() {
            Some(Ok(e)) => {
                next = e.seq + 1;
                ts = e.meta.timestamp_ns;
                let seal = e.record.op == Op::Seal;
                bytes += e.record.data.len() + 32;
                records.push(wire_record(e.seq, e.record));
                if (seal || bytes >= MAX_WRITE_SET_BYTES)
                    && !emit(&tx, epoch, &mut records, &mut bytes, ts)
                {
                    return;
                }
            }
            Some(Err(e)) => {
                let _ = tx.blocking_send(Err(anyhow!("reading the journal: {e}")));
                return;
            }
            None => {
                if !records.is_empty() && !emit(&tx, epoch, &mut records, &mut bytes, ts) {
                    return;
                }
                reader = None;
            }
        }
    }
}

fn emit(
    tx: &mpsc::Sender<anyhow::Result<WriteSet>>,
    epoch: u64,
    records: &mut Vec<WireRecord>,
    bytes: &mut usize,
    ts: u64,
) -> bool {
    let recs = std::mem::take(records);
    *bytes = 0;
    let (Some(first), Some(last)) = (recs.first().map(|r| r.seq), recs.last().map(|r| r.seq))
    else {
        return true;
    };
    let ws = WriteSet {
        epoch,
        first_seq: first,
        last_seq: last,
        timestamp_ns: ts,
        records: recs,
    };
    tx.blocking_send(Ok(ws)).is_ok()
}
