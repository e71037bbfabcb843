//! Retention: the oldest points go, whole undo segments at a time, by size (a hard
//! limit: a bookmarked point may go, with a warning) and by age (a soft limit that
//! stops at the oldest bookmark). A point a view is open at is never dropped.
//!
//! Age is measured in the primary's time: point timestamps come from the primary's
//! write-sets, so they are compared with the newest point's timestamp, and never
//! with a later time than this node's own clock (see `age_reference`). A clock jump
//! on either node then makes retention keep more, never drop more.
use std::time::Duration;

use ferry_journal::{Seq, UndoLog};

use super::{Limits, Pit};
use crate::store::meta::Bookmark;
use ferry_api::timefmt::format_rfc3339;

impl Pit {
    /// Retention after write-set `last` was applied: by size (hard), then by age
    /// (soft: stops at a bookmark). Never drops a point a view is open at.
    pub(crate) fn retain(&self, last: Seq) {
        self.retain_at(last, ferry_journal::now_ns());
    }

    /// `retain` with this node's wall clock reading `local_now` (ns since the Unix
    /// epoch), so tests can jump it.
    pub(crate) fn retain_at(&self, last: Seq, local_now: u64) {
        let mut undo = self.undo.lock();
        let limits = self.limits();
        let now = age_reference(local_now, undo.points().last().map(|p| p.timestamp_ns));
        let over_size = undo.used_bytes() > limits.max_bytes;
        let over_age = undo
            .points()
            .first()
            .is_some_and(|p| too_old(limits, now, p.timestamp_ns));
        if !over_size && !over_age {
            return;
        }
        let pinned = self.views.lock().iter().map(|v| v.point.seq).min();
        let bookmarks = self.meta.bookmarks().unwrap_or_default();
        let before = *self.window.lock();
        let mut freed = 0u64;
        let mut reason = "";
        while let Some((cut, why)) = self.next_cut(&undo, limits, (last, now), pinned, &bookmarks) {
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

    /// The next cut (release everything before it: the oldest segment's points) and
    /// the limit that asks for it, or `None` when retention must stop here.
    fn next_cut(
        &self,
        undo: &UndoLog,
        limits: Limits,
        (last, now): (Seq, u64),
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
        let size = undo.used_bytes() > limits.max_bytes;
        if !size && !too_old(limits, now, newest_of_seg.timestamp_ns) {
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

/// Whether a point stamped `ts` is past the age limit at `now` (from
/// `age_reference`; a limit of 0: no age limit).
fn too_old(limits: Limits, now: u64, ts: u64) -> bool {
    let max_age = Duration::from_secs(limits.max_age_secs);
    limits.max_age_secs > 0 && now.saturating_sub(ts) > max_age.as_nanos() as u64
}

/// The time ages are measured at: the newest point's (primary) timestamp, but never
/// later than this node's clock. A standby clock jumping forward (years) then drops
/// nothing the primary's timestamps keep; a primary clock jumping forward stamps
/// points in the future, and the standby's clock still holds the older ones; a
/// backward jump on either side only delays age retention (size stays a hard limit).
fn age_reference(local_now: u64, newest_ts: Option<u64>) -> u64 {
    newest_ts.map_or(local_now, |ts| ts.min(local_now))
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
    /// Lowered limits (a reload) are in force at once: the window shrinks to them
    /// without waiting for the next write-set, and status shows the new limits.
    #[test]
    fn lowered_limits_shrink_the_window_at_once() {
        let mut r = rig(8192, 1 << 20);
        for i in 0..10u64 {
            r.apply(10 + i, &[(Op::Write, i * 4096, 4096, i as u8 + 20)]);
        }
        let before = r.pit.window_numbers();
        assert!(before.used_bytes > 24 << 10, "{before:?}");
        r.pit.set_retention(crate::pit::Limits {
            max_bytes: 24 << 10,
            max_age_secs: 0,
        });
        let after = r.pit.window_numbers();
        assert!(after.used_bytes <= 24 << 10, "{after:?}");
        assert!(after.points < before.points, "{before:?} -> {after:?}");
        assert_eq!(after.max_bytes, 24 << 10);
        let st = serde_json::to_value(r.pit.status()).unwrap();
        assert_eq!(st["max_bytes"], 24 << 10, "{st}");
    }
}

#[cfg(test)]
mod clock_tests {
    use super::age_reference;
    use crate::pit::testrig::{read_all, rig_aged, Rig};
    use crate::pit::Target;
    use ferry_journal::Op;

    const MIN: u64 = 60_000_000_000;
    const YEARS_10: u64 = 10 * 365 * 24 * 60 * MIN;
    /// Primary time of the first write-set: before this machine's real clock, so the
    /// retention run inside each apply measures age by the primary's timestamps.
    const T0: u64 = 1_000_000_000_000_000_000;

    #[test]
    fn age_is_measured_at_the_newest_point_never_past_the_local_clock() {
        assert_eq!(age_reference(5, None), 5);
        assert_eq!(age_reference(T0 + YEARS_10, Some(T0)), T0);
        assert_eq!(age_reference(7, Some(T0)), 7);
        assert_eq!(age_reference(0, Some(T0)), 0);
    }

    /// Whole-segment points (one write-set per 8 KiB segment) every 20 minutes of
    /// primary time for 200 minutes, with a one-hour age limit.
    fn aged_rig() -> (Rig, u64) {
        let mut r = rig_aged(8192, 1 << 30, 3600);
        for i in 0..=10u64 {
            r.apply(
                T0 + i * 20 * MIN,
                &[(Op::Write, i * 4096, 4096, i as u8 + 1)],
            );
        }
        (r, T0 + 200 * MIN)
    }

    /// (points, oldest, newest, bytes) of the point-in-time window.
    fn window(r: &Rig) -> (usize, u64, u64, u64) {
        let w = r.pit.window_numbers();
        (w.points, w.oldest_ns, w.newest_ns, w.used_bytes)
    }

    /// Every point the age limit keeps by the primary's timestamps is reachable and
    /// reads back exactly.
    fn assert_kept_by_primary_time(r: &Rig, newest: u64) {
        for (seq, ts, image) in r.snaps.iter().filter(|s| s.1 + 60 * MIN >= newest) {
            assert!(r.pit.reachable(*seq), "point {seq} at {ts} dropped");
            let v = r.view(Target::Seq(*seq), None);
            assert_eq!(&read_all(&v), image, "point {seq}");
        }
    }

    #[test]
    fn a_standby_clock_jump_forward_drops_no_point_the_primary_time_keeps() {
        let (r, newest) = aged_rig();
        // Age retention runs by the primary's timestamps: the oldest points went.
        assert!(!r.pit.reachable(r.snaps[0].0));
        assert_kept_by_primary_time(&r, newest);
        let (before, window_before) = (r.pit.window_numbers(), window(&r));
        assert!(before.points >= 3, "{before:?}");
        // This node's clock jumps ten years ahead: nothing more goes.
        r.pit
            .retain_at(r.snaps.last().unwrap().0, newest + YEARS_10);
        assert_eq!(window(&r), window_before);
        assert_kept_by_primary_time(&r, newest);
    }

    #[test]
    fn a_standby_clock_jump_backward_keeps_every_point_and_retention_resumes() {
        let (mut r, newest) = aged_rig();
        let (before, window_before) = (r.pit.window_numbers(), window(&r));
        // Back to 1970 (and to before every point): nothing goes, nothing breaks.
        r.pit.retain_at(r.snaps.last().unwrap().0, 0);
        r.pit.retain_at(r.snaps.last().unwrap().0, T0);
        assert_eq!(window(&r), window_before);
        assert_kept_by_primary_time(&r, newest);
        // Later write-sets still age the older points out by the primary's time.
        let later = newest + 120 * MIN;
        r.apply(later, &[(Op::Write, 0, 4096, 77)]);
        r.apply(later + MIN, &[(Op::Write, 4096, 4096, 78)]);
        let after = r.pit.window_numbers();
        assert!(after.points < before.points, "{before:?} -> {after:?}");
        let old = r.snaps.iter().find(|s| s.1 == newest - 20 * MIN).unwrap().0;
        assert!(!r.pit.reachable(old), "{after:?}");
        assert_kept_by_primary_time(&r, later + MIN);
    }
}
