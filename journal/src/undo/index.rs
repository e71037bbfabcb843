//! The undo log's time index: one point per entry, oldest first, with the running
//! maximum of their timestamps. Answers "which entry ends at / before this
//! sequence or time" and "is this boundary reachable" without IO; the log keeps it
//! in step with its segment files.

use crate::undo::entry::{EntryKind, UndoPoint, UndoPosition};
use crate::undo::error::UndoError;

/// Index points of every retained entry, oldest first.
#[derive(Debug, Default)]
pub(super) struct PointIndex {
    points: Vec<UndoPoint>,
    /// Running maximum of `points[..=i].timestamp_ns` (for `find_by_time` with a
    /// primary clock that may step back).
    max_ts: Vec<u64>,
    /// How many of `points` are recovery points: status asks after every append,
    /// and counting them there cost the applier time linear in the retained window.
    recovery: usize,
}

fn count_points(points: &[UndoPoint]) -> usize {
    points.iter().filter(|p| p.is_point()).count()
}

impl PointIndex {
    /// The index of recovered points (oldest first).
    pub(super) fn from_points(points: Vec<UndoPoint>) -> PointIndex {
        let mut index = PointIndex {
            points: Vec::with_capacity(points.len()),
            max_ts: Vec::with_capacity(points.len()),
            recovery: 0,
        };
        for p in points {
            index.push(p);
        }
        index
    }

    pub(super) fn push(&mut self, p: UndoPoint) {
        let m = self
            .max_ts
            .last()
            .map_or(p.timestamp_ns, |&m| m.max(p.timestamp_ns));
        self.recovery += usize::from(p.is_point());
        self.points.push(p);
        self.max_ts.push(m);
    }

    /// Whether `pos` is exactly the position of an indexed entry.
    pub(super) fn contains(&self, pos: &UndoPosition) -> bool {
        let key = (pos.segment_no, pos.offset);
        self.points
            .binary_search_by(|p| (p.position.segment_no, p.position.offset).cmp(&key))
            .is_ok_and(|i| self.points[i].position == *pos)
    }

    /// Keeps the first `n` points.
    pub(super) fn truncate(&mut self, n: usize) {
        self.recovery -= count_points(self.points.get(n..).unwrap_or_default());
        self.points.truncate(n);
        self.max_ts.truncate(n);
    }

    /// Drops the oldest `n` points.
    pub(super) fn drain_front(&mut self, n: usize) {
        self.recovery -= count_points(&self.points[..n]);
        self.points.drain(..n);
        self.max_ts.drain(..n);
    }

    pub(super) fn clear(&mut self) {
        self.recovery = 0;
        self.points.clear();
        self.max_ts.clear();
    }

    /// Every indexed entry, oldest first (resync entries included: their `seq` is
    /// not a recovery point, see [`UndoPoint::kind`] and
    /// [`recovery_points`](Self::recovery_points)).
    pub(super) fn points(&self) -> &[UndoPoint] {
        &self.points
    }

    /// The entries whose end is a recovery point (not resync entries), oldest first.
    pub(super) fn recovery_points(&self) -> impl DoubleEndedIterator<Item = &UndoPoint> + '_ {
        self.points.iter().filter(|p| p.is_point())
    }

    /// How many entries end at a recovery point (`recovery_points().count()`,
    /// without the walk).
    pub(super) fn recovery_point_count(&self) -> usize {
        self.recovery
    }

    /// Newest recovery point with `seq <= seq`.
    pub(super) fn find_by_seq(&self, seq: u64) -> Option<UndoPoint> {
        let i = self.points.partition_point(|p| p.seq <= seq);
        self.points[..i]
            .iter()
            .rev()
            .find(|p| p.is_point())
            .copied()
    }

    /// Newest recovery point at or before `ts_ns`: the last point of the longest
    /// prefix of write-sets all stamped `<= ts_ns` (so a primary clock stepping back
    /// never makes a view include a write-set stamped after `ts_ns`).
    pub(super) fn find_by_time(&self, ts_ns: u64) -> Option<UndoPoint> {
        let i = self.max_ts.partition_point(|&m| m <= ts_ns);
        self.points[..i]
            .iter()
            .rev()
            .find(|p| p.is_point())
            .copied()
    }

    /// Index of the first entry after the boundary `seq`, or why `seq` is not a
    /// reachable boundary (inside a write-set, inside a resync, or older than the
    /// oldest retained entry).
    pub(super) fn target_index(&self, seq: u64) -> Result<usize, UndoError> {
        let mut i = self.points.partition_point(|p| p.seq <= seq);
        // Empty resync entries may end "at" `seq` too (a resync whose snapshot equals
        // the point it started from): the boundary is the position before them,
        // the last consistent state at `seq`.
        while let Some(p) = i.checked_sub(1).map(|k| &self.points[k]) {
            if !p.is_point() && p.seq == seq && p.first_seq > seq {
                i -= 1;
            } else {
                break;
            }
        }
        if let Some(p) = self.points.get(i) {
            if p.first_seq <= seq {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is inside write-set {}..={}",
                    p.first_seq, p.seq
                )));
            }
            if i == 0 && seq + 1 < p.first_seq {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is older than the oldest retained point {}",
                    p.first_seq - 1
                )));
            }
            if i == 0 && p.kind == EntryKind::Resync {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is inside a resync whose start is no longer retained \
                     (the oldest entry {}..={} continues it)",
                    p.first_seq, p.seq
                )));
            }
            if i == 0 && p.kind == EntryKind::Part {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is older than the oldest retained point (the oldest entry \
                     is a later piece of write-set {}.., whose first pieces are gone)",
                    p.first_seq
                )));
            }
        }
        if let Some(p) = i
            .checked_sub(1)
            .map(|k| &self.points[k])
            .filter(|p| !p.is_point())
        {
            // The transition's consistent ends: before its first entry, and the end
            // of the first non-resync entry after it.
            let start = self.points[..i]
                .iter()
                .rposition(|q| q.is_point())
                .map_or(self.points[0].first_seq - 1, |k| self.points[k].seq);
            let end = self.points[i..]
                .iter()
                .find(|q| q.is_point())
                .map(|q| q.seq);
            return Err(UndoError::InvalidTarget(format!(
                "seq {seq} is inside a resync (the replica was being resynced after \
                 {start}; entry {}..={} is not a consistent point); the nearest \
                 consistent points are {start} and {}",
                p.first_seq,
                p.seq,
                end.map_or("the end of the resync (not reached yet)".to_string(), |e| e
                    .to_string())
            )));
        }
        Ok(i)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Write-set `first..=last` stamped `ts`, at a made-up position.
    fn point(first: u64, last: u64, ts: u64, kind: EntryKind) -> UndoPoint {
        UndoPoint {
            seq: last,
            first_seq: first,
            timestamp_ns: ts,
            position: UndoPosition {
                segment_no: 1,
                offset: 4096 * first,
                len: 100,
            },
            kind,
        }
    }

    fn index(points: &[UndoPoint]) -> PointIndex {
        PointIndex::from_points(points.to_vec())
    }

    #[test]
    fn time_lookup_survives_a_clock_stepping_back() {
        let w = EntryKind::WriteSet;
        // The third write-set is stamped before the second one.
        let ix = index(&[
            point(1, 2, 100, w),
            point(3, 4, 300, w),
            point(5, 6, 200, w),
            point(7, 8, 400, w),
        ]);
        assert_eq!(ix.find_by_time(99), None);
        // 5..=6 is stamped <= 250 but follows one stamped after it: not included.
        assert_eq!(ix.find_by_time(250).map(|p| p.seq), Some(2));
        assert_eq!(ix.find_by_time(300).map(|p| p.seq), Some(6));
        assert_eq!(ix.find_by_time(u64::MAX).map(|p| p.seq), Some(8));
        assert_eq!(ix.find_by_seq(5).map(|p| p.seq), Some(4));
        assert_eq!(ix.find_by_seq(1), None);
    }

    #[test]
    fn boundaries_inside_write_sets_or_resyncs_refused() {
        let ix = index(&[
            point(11, 20, 1, EntryKind::WriteSet),
            point(21, 30, 2, EntryKind::ResyncStart),
            point(31, 40, 3, EntryKind::Resync),
            point(41, 50, 4, EntryKind::WriteSet),
        ]);
        assert_eq!(ix.target_index(10).ok(), Some(0));
        assert_eq!(ix.target_index(20).ok(), Some(1));
        assert_eq!(ix.target_index(50).ok(), Some(4));
        for bad in [9, 15, 30, 35] {
            assert!(
                matches!(ix.target_index(bad), Err(UndoError::InvalidTarget(_))),
                "{bad}"
            );
        }
        let recovery: Vec<u64> = ix.recovery_points().map(|p| p.seq).collect();
        assert_eq!(recovery, vec![20, 50]);
    }

    /// A write-set captured in pieces: the boundary before its first piece is
    /// reachable, none inside it is, and a log whose oldest entry is a later piece
    /// (its first ones released) no longer offers that boundary.
    #[test]
    fn pieces_of_a_write_set_are_one_step() {
        let w = EntryKind::WriteSet;
        let ix = index(&[
            point(1, 5, 1, w),
            point(6, 5, 2, EntryKind::PartStart),
            point(6, 5, 2, EntryKind::Part),
            point(6, 9, 2, w),
            point(10, 10, 3, w),
        ]);
        assert_eq!(ix.target_index(5).ok(), Some(1));
        assert_eq!(ix.target_index(9).ok(), Some(4));
        assert_eq!(ix.target_index(10).ok(), Some(5));
        for bad in [6, 8] {
            assert!(
                matches!(ix.target_index(bad), Err(UndoError::InvalidTarget(_))),
                "{bad}"
            );
        }
        assert_eq!(ix.find_by_seq(8).map(|p| p.seq), Some(5));
        let recovery: Vec<u64> = ix.recovery_points().map(|p| p.seq).collect();
        assert_eq!(recovery, vec![5, 9, 10]);
        // Oldest retained entry: the first piece (reachable) or a later one (not).
        let first = index(&[point(6, 5, 2, EntryKind::PartStart), point(6, 9, 2, w)]);
        assert_eq!(first.target_index(5).ok(), Some(0));
        let later = index(&[point(6, 5, 2, EntryKind::Part), point(6, 9, 2, w)]);
        assert!(matches!(
            later.target_index(5),
            Err(UndoError::InvalidTarget(m)) if m.contains("piece")
        ));
        assert_eq!(later.target_index(9).ok(), Some(2));
    }

    /// The kept count of recovery points follows every edit of the index.
    #[test]
    fn the_recovery_point_count_follows_every_edit() {
        let kinds = [
            EntryKind::WriteSet,
            EntryKind::PartStart,
            EntryKind::Part,
            EntryKind::WriteSet,
            EntryKind::ResyncStart,
            EntryKind::Resync,
            EntryKind::WriteSet,
            EntryKind::WriteSet,
        ];
        let mut ix = index(&[]);
        let check = |ix: &PointIndex| {
            assert_eq!(ix.recovery_point_count(), ix.recovery_points().count());
        };
        for (i, &k) in kinds.iter().enumerate() {
            ix.push(point(i as u64 + 1, i as u64 + 1, 1, k));
            check(&ix);
        }
        assert_eq!(ix.recovery_point_count(), 4);
        ix.drain_front(2);
        check(&ix);
        ix.truncate(4);
        check(&ix);
        ix.truncate(10);
        check(&ix);
        assert_eq!(ix.recovery_point_count(), 1);
        ix.clear();
        check(&ix);
        let again = index(&[point(1, 1, 1, EntryKind::WriteSet)]);
        assert_eq!(again.recovery_point_count(), 1);
    }

    #[test]
    fn contains_only_exact_positions_and_edits_stay_in_step() {
        let w = EntryKind::WriteSet;
        let mut ix = index(&[point(1, 1, 500, w), point(2, 2, 100, w)]);
        let p = ix.points()[1].position;
        assert!(ix.contains(&p));
        assert!(!ix.contains(&UndoPosition { len: 99, ..p }));
        ix.push(point(3, 3, 200, w));
        // The running maximum came with the pushed point: 500 still bounds it.
        assert_eq!(ix.find_by_time(499), None);
        ix.drain_front(1);
        assert_eq!(ix.points().len(), 2);
        assert_eq!(ix.find_by_time(500).map(|p| p.seq), Some(3));
        let third = ix.points()[1].position;
        ix.truncate(1);
        assert!(ix.contains(&p) && !ix.contains(&third));
        assert_eq!(ix.find_by_time(u64::MAX).map(|p| p.seq), Some(2));
        ix.clear();
        assert!(ix.points().is_empty() && ix.find_by_seq(u64::MAX).is_none());
    }
}
