//! The undo log's value types: before-image extents, entries, where an entry lives
//! and the time-index points. Plain data; how they are laid out on disk is
//! [`format`](super::format)'s business.

use bytes::Bytes;

/// Before-image of one byte range of one volume.
///
/// A range that held only zeros (a hole, or zeroed blocks) is stored as a *zero
/// extent*: `zeros` is its length and `data` is empty, so trimming a large empty
/// region costs 16 bytes of undo, not its size. Otherwise `zeros` is 0 and `data` is
/// the before-image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoExtent {
    pub volume: u32,
    pub offset: u64,
    pub data: Bytes,
    pub zeros: u32,
}

impl UndoExtent {
    /// An extent holding `data`.
    pub fn data(volume: u32, offset: u64, data: Bytes) -> UndoExtent {
        UndoExtent {
            volume,
            offset,
            data,
            zeros: 0,
        }
    }

    /// A range of `len` bytes that held zeros.
    pub fn zeros(volume: u32, offset: u64, len: u32) -> UndoExtent {
        UndoExtent {
            volume,
            offset,
            data: Bytes::new(),
            zeros: len,
        }
    }

    /// Bytes of the volume this extent covers.
    pub fn len(&self) -> u64 {
        if self.zeros > 0 {
            self.zeros as u64
        } else {
            self.data.len() as u64
        }
    }

    /// Whether the extent covers nothing (never true of a valid extent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// What an entry is (entry header flags bits 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// One write-set: the state after it is a recovery point (flags 0).
    #[default]
    WriteSet,
    /// The first entry of a resync transition (flags RESYNC | RESYNC_START).
    ResyncStart,
    /// A later entry of a resync transition (flags RESYNC).
    Resync,
    /// The first piece of a write-set whose before-images go as several entries
    /// (flags PART | START, format version 2): the state right before it is the
    /// write-set's start (capture never changes the replica).
    PartStart,
    /// A later piece of such a write-set (flags PART). The write-set's own entry
    /// (`WriteSet`, with its sequence range) follows its pieces.
    Part,
}

impl EntryKind {
    /// Whether the state right after the entry is a recovery point.
    pub fn is_point(self) -> bool {
        self == EntryKind::WriteSet
    }

    /// Whether the entry is a piece of a write-set that its own entry ends.
    pub fn is_part(self) -> bool {
        matches!(self, EntryKind::PartStart | EntryKind::Part)
    }
}

/// The before-images of one write-set (sequences `first_seq..=last_seq`), or one
/// piece of them (see [`EntryKind::PartStart`]): a write-set's before-images may go
/// as any number of entries, so none has to hold them all in memory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoEntry {
    pub first_seq: u64,
    /// `>= first_seq`, or `first_seq - 1` for an empty entry (resync data, the
    /// marker that ends a resync, or a piece of a write-set): it covers no sequence.
    pub last_seq: u64,
    /// Primary's timestamp of the write-set, ns since the Unix epoch.
    pub timestamp_ns: u64,
    pub extents: Vec<UndoExtent>,
    /// A write-set, or part of a resync transition (the state after it is not a
    /// recovery point).
    pub kind: EntryKind,
}

/// Where an entry lives: segment number, byte offset of its header, total length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UndoPosition {
    pub segment_no: u64,
    pub offset: u64,
    pub len: u64,
}

/// One time-index point: the replica state right after write-set `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoPoint {
    /// The write-set's `last_seq`: the point is the state after it.
    pub seq: u64,
    /// The write-set's `first_seq` (the point just before it is `first_seq - 1`).
    pub first_seq: u64,
    pub timestamp_ns: u64,
    pub position: UndoPosition,
    /// A resync entry's end is not a recovery point (it is indexed here all the
    /// same: views and rollbacks apply it).
    pub kind: EntryKind,
}

impl UndoPoint {
    /// Whether the state after this entry is a recovery point.
    pub fn is_point(&self) -> bool {
        self.kind.is_point()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_len_counts_zeros_or_data() {
        let d = UndoExtent::data(1, 10, Bytes::from_static(b"abc"));
        assert_eq!((d.len(), d.zeros, d.is_empty()), (3, 0, false));
        let z = UndoExtent::zeros(1, 10, 1 << 20);
        assert_eq!((z.len(), z.data.len(), z.is_empty()), (1 << 20, 0, false));
        assert!(UndoExtent::data(1, 10, Bytes::new()).is_empty());
    }

    #[test]
    fn only_write_sets_are_recovery_points() {
        assert!(EntryKind::WriteSet.is_point());
        assert!(!EntryKind::ResyncStart.is_point());
        assert!(!EntryKind::Resync.is_point());
        assert!(!EntryKind::PartStart.is_point() && !EntryKind::Part.is_point());
        assert!(EntryKind::PartStart.is_part() && EntryKind::Part.is_part());
        assert!(!EntryKind::WriteSet.is_part() && !EntryKind::Resync.is_part());
        assert_eq!(EntryKind::default(), EntryKind::WriteSet);
    }
}
