//! Retention: the oldest points go, whole undo segments at a time, by size (a hard
//! limit: a bookmarked point may go, with a warning) and by age (a soft limit that
//! stops at the oldest bookmark). A point a view is open at is never dropped.
//!
//! **Where it cuts.** Only after a segment that ends in a recovery point
//! (`UndoLog::release_points`): a segment ending in a piece of a write-set or inside
//! a resync transition offers no cut, so the first cut is at the first later segment
//! that ends in a point, and the rules (a pinned view, bookmarks, age, `cut < last`)
//! apply to that cut. (Proposing the oldest segment's end instead stopped retention
//! for good behind the first such segment.)
//!
//! **When it runs.** After each applied write-set; before an undo append when the
//! log is over `max_bytes` (a resync copy and a write-set's pieces append without a
//! write-set being applied); and when an append meets a full file system, before it
//! waits: then the oldest points go one cut at a time as if the log were over its
//! size limit (same warnings, plus a WARN that the file system is full), and only
//! when nothing can be freed do writes wait (the "out of space" WARN). All of it runs
//! under the undo log's lock, which the capture path already holds: one lock order.
//!
//! **Transitions larger than `max_bytes`.** A resync transition's before-images exist
//! to keep its start (the last consistent point) reachable, and no point inside it
//! is consistent, so it is released only whole. While it lasts, size retention drops
//! every point before it (the undo log starts a segment at the transition's first
//! entry, so that boundary is a cut), and if the transition alone is over the limit
//! the log stays over it, with one WARN per episode; it is cut at the first segment
//! boundary after the transition ends. The same holds for a write-set captured in
//! pieces whose before-images exceed `max_bytes`.
//!
//! Age is measured in the primary's time: point timestamps come from the primary's
//! write-sets, so they are compared with the newest point's timestamp, and never
//! with a later time than this node's own clock (see `age_reference`). A clock jump
//! on either node then makes retention keep more, never drop more.
use std::sync::atomic::Ordering;
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
        self.retain_locked(&mut undo, last, local_now, Pressure::Limits);
    }

    /// Retention on the locked log (the capture path holds it: see
    /// `append_entry`), keeping every boundary from `last` on. Returns the bytes
    /// freed. With [`Pressure::DiskFull`] the oldest points go as if the log were
    /// over its size limit, one cut (at least a segment) per call: the append is
    /// retried after each.
    pub(super) fn retain_locked(
        &self,
        undo: &mut UndoLog,
        last: Seq,
        local_now: u64,
        pressure: Pressure,
    ) -> u64 {
        let limits = self.limits();
        let now = age_reference(local_now, undo.points().last().map(|p| p.timestamp_ns));
        let over_size = undo.used_bytes() > limits.max_bytes;
        let over_age = undo
            .points()
            .first()
            .is_some_and(|p| too_old(limits, now, p.timestamp_ns));
        // No cut anywhere (inside a transition, say): nothing to look up.
        let needed = pressure == Pressure::DiskFull || over_size || over_age;
        if !needed || undo.release_points().next().is_none() {
            self.note_limit(undo);
            return 0;
        }
        let pinned = self.views.lock().iter().map(|v| v.point.seq).min();
        let bookmarks = self.meta.bookmarks().unwrap_or_default();
        let before = *self.window.lock();
        let mut freed = 0u64;
        let mut reason = "";
        loop {
            // A full file system asks for one cut; the limits for as many as they need.
            let full = pressure == Pressure::DiskFull && freed == 0;
            let Some((cut, why)) =
                self.next_cut(undo, limits, (last, now), pinned, &bookmarks, full)
            else {
                break;
            };
            match undo.release_before(cut) {
                // Cannot happen (`cut` is a release point); never loop on it.
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
            self.refresh_window(undo);
            self.log_shrank(before, freed, reason);
        }
        self.note_limit(undo);
        freed
    }

    fn log_shrank(&self, before: super::Window, freed: u64, reason: &str) {
        let after = *self.window.lock();
        let (dropped_points, oldest_seq, oldest_time, used_bytes) = (
            before.points.saturating_sub(after.points),
            after.oldest.map(|p| p.seq),
            after.oldest.map(|p| format_rfc3339(p.timestamp_ns)),
            after.used_bytes,
        );
        if reason == DISK_FULL {
            // Points dropped below the configured limit: an operator should know.
            tracing::warn!(
                reason,
                freed_bytes = freed,
                dropped_points,
                oldest_seq,
                oldest_time,
                used_bytes,
                "point-in-time window shrank: the undo log's file system is full (it is smaller than max_bytes, or shared)"
            );
        } else {
            tracing::info!(
                reason,
                freed_bytes = freed,
                dropped_points,
                oldest_seq,
                oldest_time,
                used_bytes,
                "point-in-time window shrank"
            );
        }
    }

    /// Warns once (until the log is back under its limit) when retention leaves
    /// the log over `max_bytes`: a view pins an old point, or nothing before the
    /// newest segment ends in a point (a resync transition or a write-set's pieces,
    /// released only whole).
    fn note_limit(&self, undo: &UndoLog) {
        let over = undo.used_bytes() > self.limits().max_bytes;
        let was = self.over_limit.swap(over, Ordering::Relaxed);
        if over && !was {
            tracing::warn!(
                used_bytes = undo.used_bytes(),
                max_bytes = self.limits().max_bytes,
                "undo log stays over its size limit: nothing more can be released yet (a \
                 point-in-time view holds an old point, or a resync transition or a write-set \
                 captured in pieces, released only whole, keeps its start reachable); the log \
                 is cut at the first segment that ends in a point after it"
            );
        }
    }

    /// The next cut (release everything before it: up to the end of the first
    /// segment that ends in a recovery point, see `UndoLog::release_points`) and
    /// the limit that asks for it, or `None` when retention must stop here. `full`:
    /// the file system is full, the cut goes whatever the limits say (still never
    /// past a view's point; bookmarks go with a warning, as by size).
    fn next_cut(
        &self,
        undo: &UndoLog,
        limits: Limits,
        (last, now): (Seq, u64),
        pinned: Option<Seq>,
        bookmarks: &[Bookmark],
        full: bool,
    ) -> Option<(Seq, &'static str)> {
        let first = undo.points().first()?;
        // Not simply the oldest segment's end: that may be a piece of a write-set or
        // inside a resync transition, where no cut is possible.
        let cut_point = undo.release_points().next()?;
        let cut = cut_point.seq;
        if cut >= last {
            return None;
        }
        let size = full || undo.used_bytes() > limits.max_bytes;
        // Age: every point dropped must be too old (a primary clock may step back).
        let newest_dropped = undo
            .recovery_points()
            .take_while(|p| p.seq <= cut)
            .map(|p| p.timestamp_ns)
            .max()
            .unwrap_or(cut_point.timestamp_ns);
        if !size && !too_old(limits, now, newest_dropped) {
            return None;
        }
        if let Some(p) = pinned.filter(|&p| p < cut) {
            tracing::warn!(
                view_point = p,
                "undo retention: a point-in-time view holds point {p}; the undo log stays above its limit until it is unexported"
            );
            return None;
        }
        let why = if full {
            DISK_FULL
        } else if size {
            "size limit"
        } else {
            "age limit"
        };
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
                    reason = why,
                    "undo log over its size limit: bookmarked point dropped"
                );
            }
        }
        Some((cut, why))
    }
}

/// Whether a point stamped `ts` is past the age limit at `now` (from
/// `age_reference`; a limit of 0: no age limit).
fn too_old(limits: Limits, now: u64, ts: u64) -> bool {
    let max_age = Duration::from_secs(limits.max_age_secs);
    limits.max_age_secs > 0 && now.saturating_sub(ts) > max_age.as_nanos() as u64
}

/// Why retention runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Pressure {
    /// The configured limits (size, age).
    Limits,
    /// An undo append met a full file system (ENOSPC, EDQUOT).
    DiskFull,
}

/// The reason logged when a full file system made retention cut.
const DISK_FULL: &str = "undo file system full";

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

/// Retention past entries that are no recovery point (a write-set's pieces, a resync
/// transition) and when the undo file system fills up.
#[cfg(test)]
mod cut_tests {
    use std::process::Command;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::{Duration, Instant};

    use bytes::Bytes;
    use ferry_journal::{EntryKind, Op, Record, Seq};

    use crate::pit::testrig::{read_all, rig, rig_in, Rig, SIZE};
    use crate::pit::Target;
    use crate::store::meta::ResyncState;

    fn used_bytes(r: &Rig) -> u64 {
        r.pit.window_numbers().used_bytes
    }

    /// Every point still reachable reads back exactly; returns how many there are.
    fn assert_kept_points_exact(r: &Rig) -> usize {
        let kept: Vec<_> = r.snaps.iter().filter(|s| r.pit.reachable(s.0)).collect();
        for (seq, _, image) in &kept {
            let v = r.view(Target::Seq(*seq), None);
            assert!(&read_all(&v) == image, "point {seq} reads back wrong");
        }
        kept.len()
    }

    /// Kinds of the last entries of every segment but the newest, oldest first.
    fn segment_ends(r: &Rig) -> Vec<EntryKind> {
        let undo = r.pit.undo.lock();
        let pts = undo.points();
        pts.windows(2)
            .filter(|w| w[0].position.segment_no != w[1].position.segment_no)
            .map(|w| w[0].kind)
            .collect()
    }

    /// A write-set whose before-images go as pieces, each ending its own segment
    /// (none of them a point), then small write-sets: retention cuts after the
    /// write-set's own entry, the log comes back under its limit and the points it
    /// keeps read back exactly.
    #[test]
    fn retention_cuts_past_a_write_set_in_pieces() {
        let mut r = rig(8192, 64 << 10);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 7)]);
        // Four 16 KiB writes over data: four pieces (ENTRY_DATA_MAX is 16 KiB in
        // unit tests), 20 KiB each, so each in a segment of its own.
        let ws: Vec<_> = (0..4u64)
            .map(|i| (Op::Write, i * 16384, 16384, 0x40 + i as u8))
            .collect();
        r.apply(2, &ws);
        let ends = segment_ends(&r);
        assert!(
            ends.iter().filter(|k| k.is_part()).count() >= 3,
            "segments should end in pieces: {ends:?}"
        );
        for i in 0..12u64 {
            r.apply(
                10 + i,
                &[(Op::Write, (128 << 10) + i * 4096, 4096, i as u8 + 1)],
            );
        }
        let used = used_bytes(&r);
        assert!(
            used <= 64 << 10,
            "undo log {used} bytes over its 64 KiB limit"
        );
        assert!(
            !r.pit.reachable(r.snaps[1].0),
            "the write-set in pieces stayed"
        );
        assert!(assert_kept_points_exact(&r) >= 3);
    }

    /// A resync transition (copy batches and write-sets during the copy, none of
    /// them a point) spanning segments: once it completes, retention cuts past it.
    #[test]
    fn retention_cuts_past_a_resync_transition() {
        let mut r = rig(8192, 64 << 10);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 7)]);
        let from = r.apply(2, &[(Op::Write, 0, 4096, 8)]);
        let st = start_resync(&mut r, from);
        copy_batches(&mut r, st.snapshot, 0);
        // Written on the primary during the copy: part of the transition.
        r.apply(5, &[(Op::Write, 200 << 10, 4096, 0x70)]);
        r.apply(6, &[(Op::Write, 204 << 10, 4096, 0x71)]);
        copy_done(&mut r, st);
        let ends = segment_ends(&r);
        assert!(
            ends.iter()
                .filter(|k| matches!(k, EntryKind::Resync | EntryKind::ResyncStart))
                .count()
                >= 4,
            "segments should end inside the transition: {ends:?}"
        );
        write_past_the_transition(&mut r);
        assert!(!r.pit.reachable(from), "the transition stayed");
        assert!(assert_kept_points_exact(&r) >= 3);
    }

    /// A transition larger than `max_bytes`: while it lasts, the points before it go
    /// (it starts its own segment, so that boundary is a cut) and its start stays
    /// reachable and exact; the log is over its limit by the transition only, and
    /// comes back under it once the transition has ended.
    #[test]
    fn a_transition_over_the_limit_keeps_only_its_start_until_it_ends() {
        // 32 KiB segments: the write-sets before the resync share them with room left.
        let mut r = rig(32 << 10, 64 << 10);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 7)]);
        for i in 0..6u64 {
            r.apply(2 + i, &[(Op::Write, i * 4096, 4096, 0x10 + i as u8)]);
        }
        let from = r.snaps.last().unwrap().0;
        let before_from = r.snaps[r.snaps.len() - 2].0;
        let image_at_from = r.snaps.last().unwrap().2.clone();
        let st = start_resync(&mut r, from);
        // 64 KiB of before-images in the copy alone: over the limit by itself.
        copy_batches(&mut r, st.snapshot, 64 << 10);
        r.apply(5, &[(Op::Write, 200 << 10, 4096, 0x70)]);
        assert!(used_bytes(&r) > 64 << 10, "the transition alone is over");
        assert!(
            !r.pit.reachable(before_from),
            "points before the transition stayed"
        );
        assert!(r.pit.reachable(from));
        let v = r.view(Target::Seq(from), None);
        assert!(read_all(&v) == image_at_from, "the transition's start");
        drop(v);
        copy_done(&mut r, st);
        write_past_the_transition(&mut r);
        assert!(!r.pit.reachable(from));
        assert!(assert_kept_points_exact(&r) >= 3);
    }

    /// Starts a resync transition at `from` on the rig (snapshot `from + 10`), as the
    /// replica's resync does.
    fn start_resync(r: &mut Rig, from: Seq) -> ResyncState {
        let snapshot = from + 10;
        let st = ResyncState {
            from,
            snapshot,
            through: 0,
            copied: false,
        };
        r.applier.resync.set(Some(st));
        r.pit.begin_resync(from, snapshot, 3).unwrap();
        r.next_seq = snapshot + 1;
        r.applied.store(snapshot, Ordering::Release);
        st
    }

    /// Four 16 KiB copy batches of the resync from `offset` on.
    fn copy_batches(r: &mut Rig, snapshot: Seq, offset: u64) {
        for i in 0..4u64 {
            let rec = Record {
                volume: 0,
                op: Op::Write,
                offset: offset + i * 16384,
                length: 16384,
                data: Bytes::from(vec![0x60 + i as u8; 16384]),
            };
            r.applier
                .apply_resync_batch(snapshot, 4, &[(snapshot, rec)])
                .unwrap();
        }
    }

    /// The copy is done: the transition ends once the next write-set is applied.
    fn copy_done(r: &mut Rig, st: ResyncState) {
        r.applier.resync.set(Some(ResyncState {
            through: r.next_seq,
            copied: true,
            ..st
        }));
    }

    /// Twelve write-sets after the copy: the transition ends and the log comes back
    /// under its 64 KiB limit.
    fn write_past_the_transition(r: &mut Rig) {
        for i in 0..12u64 {
            r.apply(
                10 + i,
                &[(Op::Write, (128 << 10) + i * 4096, 4096, i as u8 + 1)],
            );
        }
        assert_eq!(r.applier.resync.get(), None, "the transition ended");
        let used = used_bytes(r);
        assert!(
            used <= 64 << 10,
            "undo log {used} bytes over its 64 KiB limit"
        );
    }

    /// A tmpfs of `kib` KiB mounted on `dir` (needs root); unmounted on drop.
    struct Tmpfs(std::path::PathBuf);

    impl Tmpfs {
        fn mount(dir: &std::path::Path, kib: u64) -> Result<Tmpfs, String> {
            std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
            let out = Command::new("mount")
                .args(["-t", "tmpfs", "-o", &format!("size={kib}k"), "tmpfs"])
                .arg(dir)
                .output()
                .map_err(|e| format!("mount: {e}"))?;
            if !out.status.success() {
                return Err(format!(
                    "mount -t tmpfs failed (needs root): {}",
                    String::from_utf8_lossy(&out.stderr).trim()
                ));
            }
            Ok(Tmpfs(dir.to_path_buf()))
        }
    }

    impl Drop for Tmpfs {
        fn drop(&mut self) {
            let _ = Command::new("umount").arg(&self.0).status();
        }
    }

    /// The undo log on a file system smaller than its `max_bytes`: when an append
    /// meets ENOSPC, retention frees the oldest segments (the oldest points go)
    /// instead of waiting for space that only it could free. Before, the applier
    /// waited for good; here a watchdog ends such a wait (the test then fails).
    #[test]
    fn a_full_undo_file_system_frees_old_points_instead_of_waiting() {
        const TEST: &str = "a_full_undo_file_system_frees_old_points_instead_of_waiting";
        let mnt = tempfile::tempdir().unwrap();
        let _fs = match Tmpfs::mount(mnt.path(), 512) {
            Ok(fs) => fs,
            Err(why) => {
                ferry_testkit::skip(TEST, &why);
                return;
            }
        };
        let mut r = rig_in(Some(mnt.path().join("undo")), 8192, 1 << 30, 0);
        let monitor = r.pit.undo.lock().space_monitor();
        let done = Arc::new(AtomicBool::new(false));
        let watchdog = {
            let (done, monitor) = (done.clone(), monitor.clone());
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(30);
                while !done.load(Ordering::Acquire) && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(50));
                }
                monitor.stop_waiting();
            })
        };
        // 100 write-sets of 12 KiB of undo each: more than twice the file system.
        for i in 0..100u64 {
            let off = (i % 60) * 4096;
            r.apply(i + 1, &[(Op::Write, off, 4096, i as u8 + 1)]);
        }
        done.store(true, Ordering::Release);
        watchdog.join().unwrap();
        let used = used_bytes(&r);
        assert!(used <= 512 << 10, "{used}");
        assert!(
            !r.pit.reachable(r.snaps[1].0),
            "old points should have gone"
        );
        assert!(assert_kept_points_exact(&r) >= 10);
        assert_eq!(monitor.stats().episodes, 0, "appends waited for space");
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
