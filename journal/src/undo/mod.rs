//! Undo log of a standby: before-images of every block range a write-set
//! overwrites, made durable *before* the write-set is applied to the replica, so the
//! replica can be viewed or rolled back to any write-set boundary.
//!
//! See `journal/FORMAT.md`, section "Undo log", for the byte layout, checksums,
//! recovery rules and crash-case table.
//!
//! * A directory of segment files `NNNNNNNNNNNNNNNN.undo` (16-digit, zero padded,
//!   consecutive numbers). Each starts with a 64-byte segment header. In an *aligned*
//!   segment (header flag [`UNDO_SEGMENT_FLAG_ALIGNED`], every segment this code
//!   creates) the header block and every entry are zero-padded to 4 KiB, so entries
//!   are appended with O_DIRECT + `fdatasync`: before-images are written once, from
//!   the applier's buffer, and never occupy the page cache (the log is written for
//!   every write-set and read only by views and rollbacks). Segments without the flag
//!   (written by earlier versions) hold entries back to back; they stay readable.
//! * One entry per write-set: a 56-byte entry header, then the body: extents, each a
//!   16-byte extent header followed by the before-image bytes. A write-set whose
//!   before-images are large goes as several entries (pieces, format version 2,
//!   [`EntryKind::PartStart`]) then its own, so no entry (and no capture) has to hold
//!   a whole trim's before-images; an unfinished write-set's pieces at the end of
//!   the log are removed on open.
//! * CRC32C salted with the segment number, like the redo journal.
//! * Optionally encrypted at rest ([`UndoLog::open_with_key`]): a sealed segment
//!   (format version 3) carries its own data key wrapped under the key-encryption
//!   key, and every entry body is sealed with SM4-GCM in 4 KiB chunks; headers stay
//!   plaintext and checksummed, so recovery finds torn tails without the key.
//!
//! Single owner, synchronous: the standby's applier thread owns the [`UndoLog`].
//!
//! Modules, mirroring the redo journal's split:
//! * `format`: the pure byte format (layouts, encode/decode, checksums; no IO);
//! * `entry`: the value types (extents, entries, positions, index points);
//! * `segment`: segment files (names, opening, positioned reads, durable creation);
//! * `recovery`: the scan on open (validation, torn-tail truncation);
//! * `index`: the time index over the entries (no IO);
//! * `seal`: encrypted segments and entries (format version 3: the segment's
//!   wrapped data key, entry bodies sealed with SM4-GCM per 4 KiB chunk);
//! * `read`: verified reads of one entry, and [`UndoImageReader`] for views;
//! * `log`: [`UndoLog`] (append, retention, truncation).
//!
//! Everything public is re-exported here: callers name `ferry_journal::undo::X`.

mod entry;
mod error;
mod format;
mod index;
mod log;
mod read;
mod recovery;
mod seal;
mod segment;

pub use self::entry::{EntryKind, UndoEntry, UndoExtent, UndoPoint, UndoPosition};
pub use self::error::UndoError;
pub use self::format::{
    decode_undo_entry, decode_undo_entry_body, decode_undo_entry_header,
    decode_undo_segment_header, encode_undo_entry, encode_undo_entry_header,
    encode_undo_segment_header, extent_data_offsets, UndoEntryHeader, UndoFormatError,
    UndoSegmentHeader, UNDO_ALIGN, UNDO_ENTRY_FLAG_PART, UNDO_ENTRY_FLAG_RESYNC,
    UNDO_ENTRY_FLAG_RESYNC_START, UNDO_ENTRY_FLAG_SEALED, UNDO_ENTRY_HEADER_LEN, UNDO_ENTRY_MAGIC,
    UNDO_EXTENT_HEADER_LEN, UNDO_EXTENT_ZERO_FLAG, UNDO_FORMAT_VERSION, UNDO_MAX_BODY,
    UNDO_MAX_EXTENT_LEN, UNDO_MIN_FORMAT_VERSION, UNDO_MIN_SEGMENT_SIZE, UNDO_PLAIN_FORMAT_VERSION,
    UNDO_SEGMENT_FLAG_ALIGNED, UNDO_SEGMENT_FLAG_SEALED, UNDO_SEGMENT_HEADER_LEN,
    UNDO_SEGMENT_MAGIC,
};
pub use self::log::UndoLog;
pub use self::read::UndoImageReader;
pub use self::recovery::{undo_segment_key_ids, UndoRecovery};
pub use self::seal::{
    decode_undo_segment_key, encode_sealed_undo_entry, encode_sealed_undo_segment_header,
    sealed_len, tags_len, undo_segment_key_aad, UndoSegmentKey, UNDO_SEALED_SEGMENT_HEADER_LEN,
    UNDO_SEAL_CHUNK, UNDO_TAG_LEN,
};
pub use self::segment::{
    parse_undo_segment_name, undo_segment_file_name, UNDO_SEGMENT_SUFFIX, UNDO_TMP_SUFFIX,
};

// The applier thread owns the log; the daemon may move it between threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<UndoLog>();
    assert_send::<UndoImageReader>();
    assert_send::<UndoError>();
};
