//! Retention: the oldest points go, whole undo segments at a time, by size (a hard
//! limit: a bookmarked point may go, with a warning) and by age (a soft limit that
//! stops at the oldest bookmark). A point a view is open at is never dropped.
use std::time::Duration;

use ferry_journal::{Seq, UndoLog};

use super::Pit;
use crate::store::meta::Bookmark;
use ferry_api::timefmt::format_rfc3339;

impl Pit {
    /// Retention after write-set `last` was applied: by size (hard), then by age
    /// (soft: stops at a bookmark). Never drops a point a view is open at.
    pub(crate) fn retain(&self, last: Seq) {
        let mut undo = self.undo.lock();
        let now = ferry_journal::now_ns();
        let over_size = undo.used_bytes() > self.settings.max_bytes.0;
        let over_age = undo
            .points()
            .first()
            .is_some_and(|p| self.too_old(now, p.timestamp_ns));
        if !over_size && !over_age {
            return;
        }
        let pinned = self.views.lock().iter().map(|v| v.point.seq).min();
        let bookmarks = self.meta.bookmarks().unwrap_or_default();
        let before = *self.window.lock();
        let mut freed = 0u64;
        let mut reason = "";
        while let Some((cut, why)) = self.next_cut(&undo, last, now, pinned, &bookmarks) {
            match undo.release_before(cut) {
                // Nothing could go (a resync transition is only released whole).
                Ok(0) => break,
                Ok(n) => freed += n,
                Err(e) => {
                    tracing::error!("undo retention: {e}");
                    break;
                }
            }
            reason = why;
        }
        if freed > 0 {
            self.refresh_window(&undo);
            let after = *self.window.lock();
            tracing::info!(
                reason,
                freed_bytes = freed,
                dropped_points = before.points - after.points,
                oldest_seq = after.oldest.map(|p| p.seq),
                oldest_time = after.oldest.map(|p| format_rfc3339(p.timestamp_ns)),
                used_bytes = after.used_bytes,
                "point-in-time window shrank"
            );
        }
    }

    /// Whether a point stamped `ts` is past the age limit (0: no age limit).
    fn too_old(&self, now: u64, ts: u64) -> bool {
        let max_age = Duration::from_secs(self.settings.max_age_secs);
        self.settings.max_age_secs > 0 && now.saturating_sub(ts) > max_age.as_nanos() as u64
    }

    /// The next cut (release everything before it: the oldest segment's points) and
    /// the limit that asks for it, or `None` when retention must stop here.
    fn next_cut(
        &self,
        undo: &UndoLog,
        last: Seq,
        now: u64,
        pinned: Option<Seq>,
        bookmarks: &[Bookmark],
    ) -> Option<(Seq, &'static str)> {
        let points = undo.points();
        let first = points.first()?;
        // The points of the oldest segment: dropping it drops them all.
        let seg = first.position.segment_no;
        let newest_of_seg = points
            .iter()
            .take_while(|p| p.position.segment_no == seg)
            .last()?;
        let cut = newest_of_seg.seq;
        if cut >= last || undo.segment_count() < 2 {
            return None;
        }
        let size = undo.used_bytes() > self.settings.max_bytes.0;
        if !size && !self.too_old(now, newest_of_seg.timestamp_ns) {
            return None;
        }
        if let Some(p) = pinned.filter(|&p| p < cut) {
            tracing::warn!(
                view_point = p,
                "undo retention: a point-in-time view holds point {p}; the undo log stays above its limit until it is unexported"
            );
            return None;
        }
        // Boundaries lost: first.first_seq - 1 ..= cut - 1 (cut stays reachable as
        // the new oldest boundary).
        let lost_from = first.first_seq.saturating_sub(1);
        let marked: Vec<&Bookmark> = bookmarks
            .iter()
            .filter(|b| b.seq >= lost_from && b.seq < cut)
            .collect();
        if !marked.is_empty() {
            if !size {
                // Age is a soft limit: bookmarked points are kept.
                return None;
            }
            for b in marked {
                tracing::warn!(
                    bookmark = %b.name,
                    seq = b.seq,
                    "undo log over its size limit: bookmarked point dropped"
                );
            }
        }
        Some((cut, if size { "size limit" } else { "age limit" }))
    }
}

#[cfg(test)]
mod tests {
    use crate::pit::testrig::{read_all, rig, SIZE};
    use crate::pit::Target;
    use ferry_journal::Op;

    #[test]
    fn retention_drops_oldest_segments_and_keeps_what_views_hold() {
        // 8 KiB segments, 24 KiB limit: each write-set's entry (4 KiB of before-image)
        // fills most of a segment.
        let mut r = rig(8192, 24 << 10);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 9)]);
        let v = r.view(Target::Seq(1), None);
        for i in 0..10u64 {
            r.apply(10 + i, &[(Op::Write, i * 4096, 4096, i as u8 + 20)]);
        }
        // The view pins its point: nothing after it was dropped.
        assert!(r.pit.reachable(1));
        assert_eq!(read_all(&v), r.snaps[0].2);
        drop(v);
        r.apply(50, &[(Op::Write, 0, 4096, 99)]);
        let st = serde_json::to_value(r.pit.status()).unwrap();
        assert!(st["used_bytes"].as_u64().unwrap() <= 24 << 10, "{st}");
        let oldest = st["oldest"]["seq"].as_u64().unwrap();
        assert!(oldest > 2, "nothing dropped: {st}");
        assert!(!r.pit.reachable(1));
        // What is left still restores exactly.
        let (seq, _, image) = r.snaps.iter().find(|s| s.0 == oldest).unwrap().clone();
        let v = r.view(Target::Seq(seq), None);
        assert_eq!(read_all(&v), image);
    }
}
