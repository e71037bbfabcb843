//! Conversions between journal records and wire records (the shipper sends one, the
//! standby journals the other): the two must stay exact inverses.

use ferry_journal::{Op, Seq};
use ferry_transport::wire::{RecordOp, WireRecord};

/// Memory a record costs beyond its data, counted per record by every byte budget
/// that holds records (the shipper's in-memory tail, the standby's apply queue): a
/// record without data still costs.
pub const RECORD_COST: usize = 64;

/// The wire record of journal record `seq` (the inverse of [`journal_record`]).
pub(crate) fn wire_record(seq: Seq, r: ferry_journal::Record) -> WireRecord {
    WireRecord {
        seq,
        volume: r.volume,
        op: match r.op {
            Op::Write => RecordOp::Write,
            Op::Trim => RecordOp::Trim,
            Op::WriteZeroes => RecordOp::WriteZeroes,
            Op::Seal => RecordOp::Seal,
        },
        offset: r.offset,
        // The journal keeps a seal's length 0 (its label is payload); on the wire a
        // record's length always covers the bytes it carries.
        length: if r.op == Op::Seal {
            r.data.len() as u32
        } else {
            r.length
        },
        data: r.data,
    }
}

/// Maps a wire op to the journal's.
/// The journal record of a received wire record (the inverse of [`wire_record`]).
pub fn journal_record(r: WireRecord) -> ferry_journal::Record {
    let op = match r.op {
        RecordOp::Write => Op::Write,
        RecordOp::Trim => Op::Trim,
        RecordOp::WriteZeroes => Op::WriteZeroes,
        RecordOp::Seal => Op::Seal,
    };
    ferry_journal::Record {
        volume: r.volume,
        op,
        offset: r.offset,
        // A seal's label is payload: its journal length is 0 (see `wire_record`).
        length: if op == Op::Seal { 0 } else { r.length },
        data: r.data,
    }
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;
    use ferry_journal::Record;

    use super::*;

    #[test]
    fn journal_and_wire_records_round_trip() {
        let cases = [
            Record::write(3, 8192, Bytes::from(vec![7u8; 4096])),
            Record {
                volume: 1,
                op: Op::Trim,
                offset: 1 << 20,
                length: 65536,
                data: Bytes::new(),
            },
            Record {
                volume: 2,
                op: Op::WriteZeroes,
                offset: 4096,
                length: 4096,
                data: Bytes::new(),
            },
            // A labelled seal: length 0 in the journal, the label's length on the wire.
            Record {
                volume: 0,
                op: Op::Seal,
                offset: 0,
                length: 0,
                data: Bytes::from_static(b"before-upgrade"),
            },
        ];
        for (i, rec) in cases.into_iter().enumerate() {
            let seq = 100 + i as Seq;
            let w = wire_record(seq, rec.clone());
            assert_eq!(w.seq, seq);
            assert_eq!(w.volume, rec.volume);
            assert_eq!(w.offset, rec.offset);
            assert_eq!(w.data, rec.data);
            let expected_len = if rec.op == Op::Seal {
                rec.data.len() as u32
            } else {
                rec.length
            };
            assert_eq!(w.length, expected_len, "{:?}", rec.op);
            let back = journal_record(w);
            assert_eq!(
                (back.volume, back.op, back.offset, back.length, back.data),
                (rec.volume, rec.op, rec.offset, rec.length, rec.data),
            );
        }
    }
}
