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
