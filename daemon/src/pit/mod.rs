//! Point-in-time recovery on a standby: undo capture, retention, bookmarks, views
//! and rollback.
//!
//! **Capture.** The replica applier hands each write-set to [`Applier`]. With PIT
//! on, the before-images of every range the write-set overwrites are read from the
//! replica and appended to the undo log (`ferry_journal::undo`, durable on return)
//! *before* any of its records touch the replica. So for every retained write-set
//! boundary `k`, applying the entries after `k` newest first restores the replica as
//! it was right after `k` — byte for byte the primary's image at that point, since
//! the replica applies the primary's journal order.
//!
//! **Views** ([`PitView`]) serve the volume as it was at a point over NBD without a
//! copy: a range overwritten since the point is read from the *oldest* undo entry
//! after the point that covers it (that entry holds what the range held at the
//! point); any other range is read from the replica. Replication continues: each new
//! entry is published to live views (filling only ranges they do not cover yet)
//! *before* its write-set is applied, and a view reads the replica only under its map
//! lock, so it never sees a block change under it. Opening a view reads the entries
//! after the point once (time proportional to the undo after the point, not to the
//! volume), and later reads are plain `pread`s of undo segments.
//!
//! **Retention** drops the oldest points, whole undo segments at a time: by size
//! (a hard limit: a bookmarked point may go, with a warning) and by age (a soft
//! limit that stops at the oldest bookmark). A point a view is open at is never
//! dropped.
//!
//! **Rollback** (standby paused): the target is persisted first, then undo is applied
//! newest first, the replica fsynced, the undo log cut after the target and the
//! rollback marked done. Rewriting before-images is idempotent, so a crash anywhere
//! restarts the same rollback from the top at the next start and ends in the same
//! state. Afterwards the node no longer follows the primary.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use bytes::{Bytes, BytesMut};
use ferry_journal::undo::{extent_data_offsets, UNDO_MAX_EXTENT_LEN};
use ferry_journal::{
    EntryKind, Op, Record, Seq, UndoEntry, UndoError, UndoExtent, UndoLog, UndoPosition,
};
use parking_lot::{Mutex, RwLock};
use serde_json::json;

use crate::config::PitConfig;
use crate::nbd::{Export, ExportError, ExportFlags};
use crate::store::base::{find_base, is_hole, Base};
use crate::store::meta::{Bookmark, Meta};
use crate::timefmt::format_rfc3339;

/// Before-images are read in pieces of this size; each piece becomes one zero extent
/// or one data extent.
const CAPTURE_PIECE: u64 = 1 << 20;
/// Pieces at least this large are checked for holes before being read.
const HOLE_CHECK_MIN: u64 = 256 << 10;

/// Testing hook: milliseconds to sleep after each undo entry a rollback applies, so
/// a test can SIGKILL a rollback in the middle. Never set in production.
pub const ROLLBACK_PAUSE_ENV: &str = "FERRYD_TEST_ROLLBACK_PAUSE_MS";

/// A recovery point named on the command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Seq(u64),
    /// ns since the Unix epoch (primary clock).
    Time(u64),
    Bookmark(String),
}

/// A resolved point: the replica state right after `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Point {
    pub seq: u64,
    /// Primary timestamp of the write-set ending at `seq` (0 if unknown: the oldest
    /// boundary, whose write-set's entry is gone).
    pub timestamp_ns: u64,
}

/// Source of a range in a view.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Before-image bytes at `at` in undo segment `segment`.
    Undo { segment: u64, at: u64 },
    /// The range held zeros.
    Zero,
}

impl Src {
    fn advance(self, d: u64) -> Src {
        match self {
            Src::Undo { segment, at } => Src::Undo {
                segment,
                at: at + d,
            },
            Src::Zero => Src::Zero,
        }
    }
}

/// Non-overlapping ranges of a volume, each with its source.
#[derive(Debug, Default)]
struct Extents {
    /// start -> (end, source)
    m: BTreeMap<u64, (u64, Src)>,
}

impl Extents {
    /// Maps the parts of `[start, end)` no range covers yet to `src` (advanced by
    /// their distance from `start`). Existing ranges win: the first entry to cover a
    /// range is the one that holds the point's data.
    fn fill_gaps(&mut self, start: u64, end: u64, src: Src) {
        let mut gaps = Vec::new();
        let mut cursor = start;
        // The range starting at or before `start` may reach into it.
        if let Some((_, &(e, _))) = self.m.range(..=start).next_back() {
            cursor = cursor.max(e);
        }
        for (&s, &(e, _)) in self.m.range(start..end) {
            if s > cursor {
                gaps.push((cursor, s));
            }
            cursor = cursor.max(e);
        }
        if cursor < end {
            gaps.push((cursor, end));
        }
        for (s, e) in gaps {
            self.m.insert(s, (e, src.advance(s - start)));
        }
    }

    /// `[start, end)` cut into pieces, in order, each with its source or `None`.
    fn lookup(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<Src>)> {
        let mut out = Vec::new();
        let mut cursor = start;
        let first = self
            .m
            .range(..=start)
            .next_back()
            .filter(|(_, &(e, _))| e > start)
            .map(|(&s, &v)| (s, v));
        for (s, (e, src)) in first
            .into_iter()
            .chain(self.m.range(start + 1..end).map(|(&s, &v)| (s, v)))
        {
            if s > cursor {
                out.push((cursor, s, None));
            }
            let (ps, pe) = (s.max(cursor), e.min(end));
            if ps < pe {
                out.push((ps, pe, Some(src.advance(ps - s))));
            }
            cursor = cursor.max(pe);
        }
        if cursor < end {
            out.push((cursor, end, None));
        }
        out
    }

    fn ranges(&self) -> usize {
        self.m.len()
    }
}

/// What a live view needs from the undo log: its ranges and their sources.
struct ViewMap {
    id: u64,
    volume: u32,
    point: Point,
    map: RwLock<Extents>,
    /// Set when the undo history the view relies on was lost: reads fail from then on.
    failed: Mutex<Option<String>>,
}

/// Window of retained points, for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Window {
    oldest: Option<Point>,
    newest: Option<Point>,
    points: usize,
    used_bytes: u64,
}

/// The standby's point-in-time state.
pub struct Pit {
    undo: Mutex<UndoLog>,
    dir: PathBuf,
    meta: Arc<Meta>,
    bases: Vec<Arc<Base>>,
    settings: PitConfig,
    /// Highest sequence applied to the replica (the standby's applied position).
    applied: Arc<AtomicU64>,
    views: Mutex<Vec<Arc<ViewMap>>>,
    next_view: AtomicU64,
    window: Mutex<Window>,
    /// Why capture stopped (an undo IO error): points are unusable until restart.
    broken: Mutex<Option<String>>,
    /// Time spent reading before-images and appending undo (for the apply overhead).
    capture_ns: AtomicU64,
    /// Per volume id: the replica opened for before-image reads (readahead off).
    capture_files: Vec<(u32, File)>,
}

impl Pit {
    /// Opens (recovering) the undo log in `dir`. `applied` is the replica's applied
    /// position; the log must continue from it.
    pub fn open(
        dir: PathBuf,
        cluster_id: [u8; 16],
        settings: PitConfig,
        meta: Arc<Meta>,
        bases: Vec<Arc<Base>>,
        applied: Arc<AtomicU64>,
    ) -> anyhow::Result<Arc<Pit>> {
        let (mut undo, report) = UndoLog::open(&dir, cluster_id, settings.segment_size.0)
            .with_context(|| format!("opening the undo log {}", dir.display()))?;
        if let Some((file, at, bytes)) = &report.truncated {
            tracing::warn!(file = %file.display(), at, bytes, "undo log: torn last entry removed");
        }
        // The log must end where the replica is: an entry per applied write-set. A log
        // that ends earlier has a hole (write-sets applied without undo: PIT was off,
        // or an undo error) and cannot restore anything older than the hole.
        let a = applied.load(Ordering::Acquire);
        if let Some(last) = undo.points().last().map(|p| p.seq) {
            if last < a {
                let freed = undo.release_all()?;
                tracing::warn!(
                    undo_last = last,
                    applied = a,
                    freed,
                    "undo log ends before the replica's applied position (write-sets were applied without undo); its points are unusable and were dropped"
                );
            } else if last > a {
                // Entries exist only for write-sets about to be applied: recovery
                // replays them (the journal still holds them).
                tracing::info!(
                    undo_last = last,
                    applied = a,
                    "undo log is ahead of the replica: recovery re-applies those write-sets"
                );
            }
        }
        let capture_files = bases
            .iter()
            .filter_map(|b| open_capture_file(b).map(|f| (b.id, f)))
            .collect();
        let pit = Arc::new(Pit {
            capture_files,
            undo: Mutex::new(undo),
            dir,
            meta,
            bases,
            settings,
            applied,
            views: Mutex::new(Vec::new()),
            next_view: AtomicU64::new(1),
            window: Mutex::new(Window::default()),
            broken: Mutex::new(None),
            capture_ns: AtomicU64::new(0),
        });
        pit.refresh_window(&pit.undo.lock());
        Ok(pit)
    }

    fn capture_file(&self, volume: u32) -> Option<&File> {
        self.capture_files
            .iter()
            .find(|(id, _)| *id == volume)
            .map(|(_, f)| f)
    }

    /// Sequence of the newest undo point (every write-set up to it has an entry).
    pub fn newest_seq(&self) -> Option<u64> {
        self.undo.lock().points().last().map(|p| p.seq)
    }

    /// Reads the before-images of `recs`, appends them as one entry and publishes it
    /// to live views. On an undo error, PIT is switched off (replication must not
    /// stall for it) and the error is logged and shown in status.
    pub(crate) fn capture(
        &self,
        first: Seq,
        last: Seq,
        ts: u64,
        recs: &[(Seq, Record)],
        kind: EntryKind,
    ) -> anyhow::Result<()> {
        if self.broken.lock().is_some() {
            return Ok(());
        }
        let started = Instant::now();
        let mut extents = Vec::new();
        // Start every read of the unit before waiting for the first: the device
        // works on them together instead of one random read at a time. Only ranges
        // `before_images` reads whole: larger ones are checked for holes first, and
        // prefetching a large trim would fill the page cache with what it skips.
        if recs.len() > 1 {
            for (_, r) in recs {
                if let Some(f) = self.capture_file(r.volume) {
                    if prefetched(r) {
                        advise(f, r.offset, r.length as u64, libc::POSIX_FADV_WILLNEED);
                    }
                }
            }
        }
        for (seq, r) in recs {
            if r.op == Op::Seal || r.length == 0 {
                continue;
            }
            let base = find_base(&self.bases, r.volume, *seq)?;
            let file = self.capture_file(r.volume).unwrap_or(&base.file);
            let end = r.offset.checked_add(r.length as u64);
            if end.is_none_or(|e| e > base.size) {
                bail!(
                    "record {seq} writes {}+{} beyond volume '{}' ({} bytes)",
                    r.offset,
                    r.length,
                    base.name,
                    base.size
                );
            }
            before_images(base, file, r.offset, r.length as u64, &mut extents).with_context(
                || {
                    format!(
                        "reading before-images of record {seq} from {}",
                        base.path.display()
                    )
                },
            )?;
        }
        let entry = UndoEntry {
            first_seq: first,
            last_seq: last,
            timestamp_ns: ts,
            extents,
            kind,
        };
        let mut undo = self.undo.lock();
        let res = match undo.append(&entry) {
            // A gap inside a resync transition: starting over here would offer the
            // boundary before this entry, which is not consistent. No points until
            // restart (loudly), rather than a wrong one.
            Err(UndoError::InvalidEntry(m))
                if m.contains("must start at") && kind == EntryKind::Resync =>
            {
                Err(UndoError::InvalidEntry(format!(
                    "{m} (inside a resync transition: the way back to its start is lost)"
                )))
            }
            // A gap: the log cannot bridge it. Start over from this write-set.
            Err(UndoError::InvalidEntry(m)) if m.contains("must start at") => {
                let freed = undo.release_all()?;
                tracing::warn!(
                    freed,
                    "undo log restarted at write-set {first}..={last}: {m}"
                );
                undo.append(&entry)
            }
            r => r,
        };
        match res {
            Ok(pos) => {
                self.publish(&entry, &pos);
                self.refresh_window(&undo);
            }
            Err(e) => {
                let msg = format!(
                    "undo capture stopped at write-set {first}..={last}: {e}; the replica keeps \
                     applying but has no recovery points until ferryd restarts"
                );
                tracing::error!("{msg}");
                self.fail_views(&msg);
                *self.broken.lock() = Some(msg);
            }
        }
        self.capture_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        Ok(())
    }

    /// Starts (or continues) a resync transition in the undo log: the replica holds
    /// every record up to `after` (drained) and will hold a copy of the primary as of
    /// `snapshot` plus later records. One entry with no extents spans
    /// `after + 1 ..= snapshot` (the records the copy replaces): `RESYNC_START` if the
    /// replica is consistent at `after`, a plain resync entry if an earlier copy was
    /// interrupted (the transition goes on).
    pub fn begin_resync(&self, after: Seq, snapshot: Seq, ts: u64) -> anyhow::Result<()> {
        let continuing = {
            let undo = self.undo.lock();
            undo.points().last().is_some_and(|p| !p.is_point())
                && undo.points().last().map(|p| p.seq) == Some(after)
        };
        let kind = if continuing {
            EntryKind::Resync
        } else {
            EntryKind::ResyncStart
        };
        self.capture(after + 1, snapshot, ts, &[], kind)
    }

    /// Ends a resync whose copy was consistent on its own (nothing was written on the
    /// primary during the copy): an empty ordinary entry, so `snapshot` is a point.
    pub fn end_resync_marker(&self, snapshot: Seq, ts: u64) -> anyhow::Result<()> {
        self.capture(snapshot + 1, snapshot, ts, &[], EntryKind::WriteSet)
    }

    /// Publishes a new entry to live views before its write-set is applied.
    fn publish(&self, entry: &UndoEntry, pos: &UndoPosition) {
        let views = self.views.lock();
        if views.is_empty() {
            return;
        }
        let offsets = extent_data_offsets(pos, entry);
        for v in views.iter() {
            let mut map = v.map.write();
            for (x, at) in entry.extents.iter().zip(&offsets) {
                if x.volume != v.volume {
                    continue;
                }
                let src = match at {
                    Some(at) => Src::Undo {
                        segment: pos.segment_no,
                        at: *at,
                    },
                    None => Src::Zero,
                };
                map.fill_gaps(x.offset, x.offset + x.len(), src);
            }
        }
    }

    fn fail_views(&self, msg: &str) {
        for v in self.views.lock().iter() {
            *v.failed.lock() = Some(msg.to_string());
        }
    }

    fn refresh_window(&self, undo: &UndoLog) {
        let pt = |p: &ferry_journal::UndoPoint| Point {
            seq: p.seq,
            timestamp_ns: p.timestamp_ns,
        };
        let w = Window {
            oldest: undo.recovery_points().next().map(pt),
            newest: undo.recovery_points().next_back().map(pt),
            points: undo.recovery_points().count(),
            used_bytes: undo.used_bytes(),
        };
        *self.window.lock() = w;
    }

    /// Retention after write-set `last` was applied: by size (hard), then by age
    /// (soft: stops at a bookmark). Never drops a point a view is open at.
    pub(crate) fn retain(&self, last: Seq) {
        let max_bytes = self.settings.max_bytes.0;
        let max_age = Duration::from_secs(self.settings.max_age_secs);
        let mut undo = self.undo.lock();
        let over_size = undo.used_bytes() > max_bytes;
        let now = ferry_journal::now_ns();
        let over_age = self.settings.max_age_secs > 0
            && undo
                .points()
                .first()
                .is_some_and(|p| now.saturating_sub(p.timestamp_ns) > max_age.as_nanos() as u64);
        if !over_size && !over_age {
            return;
        }
        let pinned = self.views.lock().iter().map(|v| v.point.seq).min();
        let bookmarks = self.meta.bookmarks().unwrap_or_default();
        let before = *self.window.lock();
        let mut freed = 0u64;
        let mut reason = "";
        loop {
            let points = undo.points();
            let Some(first) = points.first() else { break };
            // The points of the oldest segment: dropping it drops them all.
            let seg = first.position.segment_no;
            let Some(cut) = points
                .iter()
                .take_while(|p| p.position.segment_no == seg)
                .last()
                .map(|p| p.seq)
            else {
                break;
            };
            if cut >= last || undo.segment_count() < 2 {
                break;
            }
            let size = undo.used_bytes() > max_bytes;
            let cut_ts = points
                .iter()
                .take_while(|p| p.position.segment_no == seg)
                .last()
                .map_or(0, |p| p.timestamp_ns);
            let age = self.settings.max_age_secs > 0
                && now.saturating_sub(cut_ts) > max_age.as_nanos() as u64;
            if !size && !age {
                break;
            }
            // Boundaries lost: first.first_seq - 1 ..= cut - 1 (cut stays reachable as
            // the new oldest boundary).
            let lost_from = first.first_seq.saturating_sub(1);
            if let Some(p) = pinned.filter(|&p| p < cut) {
                tracing::warn!(
                    view_point = p,
                    "undo retention: a point-in-time view holds point {p}; the undo log stays above its limit until it is unexported"
                );
                break;
            }
            let marked: Vec<&Bookmark> = bookmarks
                .iter()
                .filter(|b| b.seq >= lost_from && b.seq < cut)
                .collect();
            if !marked.is_empty() {
                if !size {
                    // Age is a soft limit: bookmarked points are kept.
                    break;
                }
                for b in marked {
                    tracing::warn!(
                        bookmark = %b.name,
                        seq = b.seq,
                        "undo log over its size limit: bookmarked point dropped"
                    );
                }
            }
            match undo.release_before(cut) {
                // Nothing could go (a resync transition is only released whole).
                Ok(0) => break,
                Ok(n) => freed += n,
                Err(e) => {
                    tracing::error!("undo retention: {e}");
                    break;
                }
            }
            reason = if size { "size limit" } else { "age limit" };
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

    /// Resolves a target to a reachable point at or below the applied position.
    pub fn resolve(&self, t: &Target) -> anyhow::Result<Point> {
        let undo = self.undo.lock();
        self.resolve_locked(&undo, t)
    }

    fn resolve_locked(&self, undo: &UndoLog, t: &Target) -> anyhow::Result<Point> {
        if let Some(why) = self.broken.lock().clone() {
            bail!("no recovery points: {why}");
        }
        let resync = self.meta.resync_state()?;
        let applied = self.applied.load(Ordering::Acquire);
        let seq = match t {
            Target::Seq(s) => *s,
            Target::Bookmark(name) => {
                let b = self
                    .meta
                    .bookmarks()?
                    .into_iter()
                    .find(|b| &b.name == name)
                    .ok_or_else(|| anyhow!("no bookmark named '{name}' on this node"))?;
                b.seq
            }
            Target::Time(ns) => {
                let Some(p) = undo.find_by_time(*ns) else {
                    let oldest = undo
                        .points()
                        .first()
                        .map(|p| format_rfc3339(p.timestamp_ns));
                    bail!(
                        "{} is before the oldest retained point ({})",
                        format_rfc3339(*ns),
                        oldest
                            .as_deref()
                            .unwrap_or("none: no write-set applied yet")
                    );
                };
                p.seq.min(applied)
            }
        };
        if let Some(r) = resync.filter(|r| seq > r.from) {
            bail!(
                "point {seq} is not available: the replica is inconsistent while it is \
                 resynced from the primary (its last consistent point is {}; it is \
                 consistent again once {} is applied)",
                r.from,
                if r.through > 0 {
                    r.through.to_string()
                } else {
                    "the copy's end point".to_string()
                }
            );
        }
        if seq > applied {
            bail!("point {seq} is not applied on this standby yet (applied: {applied})");
        }
        if seq == applied {
            let ts = undo
                .find_by_seq(seq)
                .filter(|p| p.seq == seq)
                .map_or(0, |p| p.timestamp_ns);
            return Ok(Point {
                seq,
                timestamp_ns: ts,
            });
        }
        // Validates the boundary (inside a write-set, or older than retained).
        let after = undo
            .points_after(seq)
            .map_err(|e| anyhow!("point {seq}: {e}"))?;
        if after.is_empty() {
            bail!("point {seq}: the undo log holds nothing after it (applied: {applied})");
        }
        let ts = undo
            .find_by_seq(seq)
            .filter(|p| p.seq == seq)
            .map_or(0, |p| p.timestamp_ns);
        Ok(Point {
            seq,
            timestamp_ns: ts,
        })
    }

    /// Opens a view of volume `base` at `t`. Holds the undo lock while reading the
    /// entries after the point, so no entry is missed between that read and the
    /// view's registration for new ones.
    pub fn open_view(
        self: &Arc<Self>,
        base: Arc<Base>,
        t: &Target,
        scratch: Option<PathBuf>,
    ) -> anyhow::Result<Arc<PitView>> {
        let started = Instant::now();
        let undo = self.undo.lock();
        let point = self.resolve_locked(&undo, t)?;
        let mut map = Extents::default();
        let mut entries = 0usize;
        let mut undo_bytes = 0u64;
        // Oldest first: the first entry to cover a range holds its data at the point.
        for p in undo.points_after(point.seq)? {
            let e = undo.read_entry(&p.position)?;
            entries += 1;
            undo_bytes += p.position.len;
            for (x, at) in e.extents.iter().zip(extent_data_offsets(&p.position, &e)) {
                if x.volume != base.id {
                    continue;
                }
                let src = match at {
                    Some(at) => Src::Undo {
                        segment: p.position.segment_no,
                        at,
                    },
                    None => Src::Zero,
                };
                map.fill_gaps(x.offset, x.offset + x.len(), src);
            }
        }
        let id = self.next_view.fetch_add(1, Ordering::Relaxed);
        let vm = Arc::new(ViewMap {
            id,
            volume: base.id,
            point,
            map: RwLock::new(map),
            failed: Mutex::new(None),
        });
        let overlay = match scratch {
            Some(path) => Some(Overlay::create(path, base.size)?),
            None => None,
        };
        self.views.lock().push(vm.clone());
        drop(undo);
        let opened_in = started.elapsed();
        tracing::info!(
            id,
            volume = %base.name,
            seq = point.seq,
            entries,
            undo_bytes,
            ranges = vm.map.read().ranges(),
            "point-in-time view opened in {opened_in:?}"
        );
        Ok(Arc::new(PitView {
            pit: self.clone(),
            base,
            map: vm,
            segments: Mutex::new(HashMap::new()),
            overlay,
            opened_in,
            entries,
        }))
    }

    fn close_view(&self, id: u64) {
        self.views.lock().retain(|v| v.id != id);
    }

    /// Rolls the replica back to `t`. The caller has stopped replication and the
    /// applier is idle with everything applied checkpointed (so no restart replays
    /// the journal over the rolled-back replica).
    pub fn rollback(&self, t: &Target) -> anyhow::Result<RollbackReport> {
        if !self.views.lock().is_empty() {
            bail!("point-in-time views are exported; unexport them before a rollback");
        }
        let point = self.resolve(t)?;
        self.meta
            .set_rollback_state(Some(crate::store::meta::RollbackState::InProgress {
                target: point.seq,
            }))?;
        tracing::warn!(target = point.seq, "rollback started");
        let mut r = self.finish_rollback(point.seq)?;
        r.point = point;
        Ok(r)
    }

    /// Applies undo newest first down to `target`, fsyncs, cuts the log and marks the
    /// rollback done. Idempotent: run again from the top after a crash.
    pub fn finish_rollback(&self, target: u64) -> anyhow::Result<RollbackReport> {
        let started = Instant::now();
        let pause = std::env::var(ROLLBACK_PAUSE_ENV)
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            .map(Duration::from_millis);
        let mut undo = self.undo.lock();
        let mut entries = 0u64;
        let mut bytes = 0u64;
        for e in undo.entries_after(target) {
            let e = e.map_err(|e| anyhow!("rollback to {target}: {e}"))?;
            // Last extent first: overlapping extents of one entry leave the oldest.
            for x in e.extents.iter().rev() {
                let base = find_base(&self.bases, x.volume, e.last_seq)?;
                if x.offset
                    .checked_add(x.len())
                    .is_none_or(|end| end > base.size)
                {
                    bail!(
                        "undo entry {}..={} restores {}+{} beyond volume '{}'",
                        e.first_seq,
                        e.last_seq,
                        x.offset,
                        x.len(),
                        base.name
                    );
                }
                if x.zeros > 0 {
                    base.apply(Op::WriteZeroes, x.offset, x.zeros, &[])
                } else {
                    base.apply(Op::Write, x.offset, x.len() as u32, &x.data)
                }
                .with_context(|| format!("rollback: writing {}", base.path.display()))?;
                bytes += x.len();
            }
            entries += 1;
            if let Some(p) = pause {
                std::thread::sleep(p);
            }
        }
        for b in &self.bases {
            b.sync()
                .with_context(|| format!("rollback: fsync {}", b.path.display()))?;
        }
        undo.truncate_after(target)
            .map_err(|e| anyhow!("rollback: cutting the undo log after {target}: {e}"))?;
        // Rolled back to (at or before) the start of a resync: the transition is over.
        if self.meta.resync_state()?.is_some_and(|r| target <= r.from) {
            self.meta.set_resync_state(None)?;
        }
        self.meta
            .set_rollback_state(Some(crate::store::meta::RollbackState::Done { target }))?;
        self.applied.store(target, Ordering::Release);
        self.refresh_window(&undo);
        let took = started.elapsed();
        tracing::warn!(target, entries, bytes, "rollback finished in {took:?}");
        Ok(RollbackReport {
            point: Point {
                seq: target,
                timestamp_ns: 0,
            },
            entries,
            bytes,
            took,
        })
    }

    /// Status of the window, retention and views.
    pub fn status(&self) -> serde_json::Value {
        let w = *self.window.lock();
        let pt = |p: Option<Point>| {
            p.map(|p| json!({"seq": p.seq, "time": format_rfc3339(p.timestamp_ns), "timestamp_ns": p.timestamp_ns}))
        };
        let views: Vec<_> = self
            .views
            .lock()
            .iter()
            .map(|v| json!({"id": v.id, "volume_id": v.volume, "seq": v.point.seq}))
            .collect();
        json!({
            "enabled": true,
            "dir": self.dir,
            "oldest": pt(w.oldest),
            "newest": pt(w.newest),
            "points": w.points,
            "used_bytes": w.used_bytes,
            "max_bytes": self.settings.max_bytes.0,
            "max_age_secs": self.settings.max_age_secs,
            "capture_seconds": self.capture_ns.load(Ordering::Relaxed) as f64 / 1e9,
            "error": self.broken.lock().clone(),
            "open_views": views,
        })
    }

    /// Numbers for the Prometheus endpoint.
    pub fn window_numbers(&self) -> WindowNumbers {
        let w = *self.window.lock();
        WindowNumbers {
            points: w.points,
            oldest_ns: w.oldest.map_or(0, |p| p.timestamp_ns),
            newest_ns: w.newest.map_or(0, |p| p.timestamp_ns),
            used_bytes: w.used_bytes,
            max_bytes: self.settings.max_bytes.0,
            views: self.views.lock().len(),
        }
    }

    /// Retained points, oldest first (at most `limit`, newest kept).
    pub fn points(&self, limit: usize) -> Vec<Point> {
        let undo = self.undo.lock();
        let p: Vec<_> = undo.recovery_points().collect();
        p[p.len().saturating_sub(limit)..]
            .iter()
            .map(|p| Point {
                seq: p.seq,
                timestamp_ns: p.timestamp_ns,
            })
            .collect()
    }

    /// Whether bookmark seq `seq` is still reachable.
    pub fn reachable(&self, seq: u64) -> bool {
        let undo = self.undo.lock();
        let applied = self.applied.load(Ordering::Acquire);
        seq == applied || (seq < applied && undo.points_after(seq).is_ok_and(|a| !a.is_empty()))
    }
}

#[derive(Debug, Clone, Copy)]
pub struct WindowNumbers {
    pub points: usize,
    pub oldest_ns: u64,
    pub newest_ns: u64,
    pub used_bytes: u64,
    pub max_bytes: u64,
    pub views: usize,
}

#[derive(Debug, Clone, Copy)]
pub struct RollbackReport {
    pub point: Point,
    pub entries: u64,
    pub bytes: u64,
    pub took: Duration,
}

/// Appends the before-images of `[offset, offset + len)` of `base` to `out`:
/// holes and all-zero pieces as zero extents, the rest as data.
fn before_images(
    base: &Base,
    file: &File,
    offset: u64,
    len: u64,
    out: &mut Vec<UndoExtent>,
) -> std::io::Result<()> {
    let end = offset + len;
    let mut at = offset;
    while at < end {
        let n = (end - at).min(CAPTURE_PIECE);
        // Small pieces are just read: asking the file system for holes walks its
        // extent tree and costs more than reading a few cached pages.
        let zero = if n >= HOLE_CHECK_MIN && is_hole(file, at, n) {
            true
        } else {
            let mut buf = BytesMut::zeroed(n as usize);
            file.read_exact_at(&mut buf, at)?;
            if buf.iter().all(|&b| b == 0) {
                true
            } else {
                out.push(UndoExtent::data(base.id, at, buf.freeze()));
                false
            }
        };
        if zero {
            // Merge with a preceding zero extent (a large trim of empty space stays
            // a handful of 16-byte headers).
            match out.last_mut() {
                Some(x)
                    if x.zeros > 0
                        && x.volume == base.id
                        && x.offset + x.zeros as u64 == at
                        && x.zeros as u64 + n <= UNDO_MAX_EXTENT_LEN as u64 =>
                {
                    x.zeros += n as u32
                }
                _ => out.push(UndoExtent::zeros(base.id, at, n as u32)),
            }
        }
        at += n;
    }
    Ok(())
}

/// Whether `capture` starts reading `r`'s before-image ahead (WILLNEED): only ranges
/// `before_images` reads whole. Larger ones are checked for holes first, and
/// prefetching a large trim would fill the page cache with what it skips.
fn prefetched(r: &Record) -> bool {
    r.op != Op::Seal && r.length > 0 && (r.length as u64) < HOLE_CHECK_MIN
}

/// `posix_fadvise` on a range; advice only, so a failure changes nothing.
fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice);
    }
}

/// The replica opened once more for before-image reads, with readahead off. Why:
/// these reads are random and small, and the kernel's readahead turned each 4 KiB
/// read into a much larger one (most of the capture cost under random writes). A
/// separate descriptor keeps readahead for the sequential readers of the base
/// (verify, resync, views).
fn open_capture_file(base: &Base) -> Option<File> {
    match File::open(&base.path) {
        Ok(f) => {
            advise(&f, 0, 0, libc::POSIX_FADV_RANDOM);
            Some(f)
        }
        Err(e) => {
            tracing::warn!(
                volume = %base.name,
                error = %e,
                "undo capture reads through the replica's own descriptor (readahead on)"
            );
            None
        }
    }
}

/// Scratch copy-on-write overlay of a writable view (a sparse temp file).
struct Overlay {
    file: File,
    path: PathBuf,
    written: Mutex<Extents>,
}

impl Overlay {
    fn create(path: PathBuf, size: u64) -> anyhow::Result<Overlay> {
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)
            .with_context(|| format!("creating scratch overlay {}", path.display()))?;
        file.set_len(size)
            .with_context(|| format!("sizing scratch overlay {}", path.display()))?;
        Ok(Overlay {
            file,
            path,
            written: Mutex::new(Extents::default()),
        })
    }
}

impl Drop for Overlay {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            tracing::warn!("removing scratch overlay {}: {e}", self.path.display());
        }
    }
}

/// A volume as it was at a point, served over NBD.
pub struct PitView {
    pit: Arc<Pit>,
    base: Arc<Base>,
    map: Arc<ViewMap>,
    segments: Mutex<HashMap<u64, Arc<File>>>,
    overlay: Option<Overlay>,
    pub opened_in: Duration,
    pub entries: usize,
}

impl Drop for PitView {
    fn drop(&mut self) {
        self.pit.close_view(self.map.id);
    }
}

impl PitView {
    pub fn id(&self) -> u64 {
        self.map.id
    }

    pub fn point(&self) -> Point {
        self.map.point
    }

    pub fn writable(&self) -> bool {
        self.overlay.is_some()
    }

    pub fn volume(&self) -> &str {
        &self.base.name
    }

    fn segment(&self, no: u64) -> std::io::Result<Arc<File>> {
        let mut s = self.segments.lock();
        if let Some(f) = s.get(&no) {
            return Ok(f.clone());
        }
        // Retention never removes a segment a view needs (it is pinned), so the file
        // exists for the view's lifetime.
        let path = self
            .pit
            .dir
            .join(ferry_journal::undo::undo_segment_file_name(no));
        let f = Arc::new(File::open(&path)?);
        s.insert(no, f.clone());
        Ok(f)
    }

    /// The point's content of `[offset, offset + buf.len())`, without the overlay.
    fn read_point(&self, offset: u64, buf: &mut [u8]) -> Result<(), ExportError> {
        if let Some(why) = self.map.failed.lock().clone() {
            return Err(ExportError::Io(why));
        }
        let end = offset + buf.len() as u64;
        // Held across the replica reads: the applier publishes (under the write
        // lock) before it changes any block of the replica.
        let map = self.map.map.read();
        for (s, e, src) in map.lookup(offset, end) {
            let piece = &mut buf[(s - offset) as usize..(e - offset) as usize];
            let r = match src {
                None => self.base.file.read_exact_at(piece, s),
                Some(Src::Zero) => {
                    piece.fill(0);
                    Ok(())
                }
                Some(Src::Undo { segment, at }) => self
                    .segment(segment)
                    .and_then(|f| f.read_exact_at(piece, at)),
            };
            r.map_err(|e| ExportError::Io(format!("point-in-time read at {s}: {e}")))?;
        }
        Ok(())
    }

    fn read_sync(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        let mut buf = BytesMut::zeroed(len as usize);
        let end = offset + len as u64;
        let Some(ov) = &self.overlay else {
            self.read_point(offset, &mut buf)?;
            return Ok(buf.freeze());
        };
        let pieces = ov.written.lock().lookup(offset, end);
        for (s, e, src) in pieces {
            let piece = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match src {
                Some(_) => ov
                    .file
                    .read_exact_at(piece, s)
                    .map_err(|e| ExportError::Io(format!("scratch overlay read: {e}")))?,
                None => self.read_point(s, piece)?,
            }
        }
        Ok(buf.freeze())
    }

    fn check(&self, offset: u64, len: u64) -> Result<(), ExportError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.base.size => Ok(()),
            _ => Err(ExportError::Invalid(format!(
                "range {offset}+{len} is beyond the volume size {}",
                self.base.size
            ))),
        }
    }

    fn overlay(&self) -> Result<&Overlay, ExportError> {
        self.overlay.as_ref().ok_or_else(|| {
            ExportError::ReadOnly("a point-in-time view is read-only (export it with --writable for a scratch overlay)".into())
        })
    }

    fn overlay_write(&self, offset: u64, data: Option<&[u8]>, len: u64) -> Result<(), ExportError> {
        self.check(offset, len)?;
        let ov = self.overlay()?;
        if len == 0 {
            return Ok(());
        }
        let r = match data {
            Some(d) => ov.file.write_all_at(d, offset),
            None => crate::store::base::zero_range(&ov.file, offset, len, false),
        };
        r.map_err(|e| match e.raw_os_error() {
            Some(libc::ENOSPC) => ExportError::NoSpace,
            _ => ExportError::Io(format!("scratch overlay {}: {e}", ov.path.display())),
        })?;
        // The overlay's bytes sit at the volume offset: any source value marks "here".
        ov.written.lock().fill_gaps(offset, offset + len, Src::Zero);
        Ok(())
    }
}

impl Export for PitView {
    fn name(&self) -> &str {
        &self.base.name
    }

    fn size(&self) -> u64 {
        self.base.size
    }

    fn flags(&self) -> ExportFlags {
        let w = self.overlay.is_some();
        ExportFlags {
            read_only: !w,
            can_trim: w,
            can_write_zeroes: w,
            can_multi_conn: true,
            send_fua: false,
            send_flush: w,
        }
    }

    async fn read(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
        self.check(offset, len as u64)?;
        // A view reads undo segments and replica ranges that are often not cached: a
        // read may block on the disk, so let the runtime move its other tasks off this
        // worker (ferryd's runtime is multi-threaded).
        tokio::task::block_in_place(|| self.read_sync(offset, len))
    }

    async fn write(&self, offset: u64, data: Bytes, _fua: bool) -> Result<(), ExportError> {
        self.overlay_write(offset, Some(&data), data.len() as u64)
    }

    async fn flush(&self) -> Result<(), ExportError> {
        // Scratch writes are dropped at unexport: there is nothing to make durable.
        Ok(())
    }

    async fn trim(&self, offset: u64, len: u32) -> Result<(), ExportError> {
        self.overlay_write(offset, None, len as u64)
    }

    async fn write_zeroes(
        &self,
        offset: u64,
        len: u32,
        _may_trim: bool,
    ) -> Result<(), ExportError> {
        self.overlay_write(offset, None, len as u64)
    }
}

/// Point-in-time views served over NBD, each on its own listener.
pub struct PitExports {
    pit: Arc<Pit>,
    scratch_dir: PathBuf,
    list: Mutex<Vec<ServedView>>,
}

struct ServedView {
    view: Arc<PitView>,
    addr: std::net::SocketAddr,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// The one-export registry of a view's NBD server.
struct ViewRegistry(Arc<PitView>);

impl crate::nbd::ExportRegistry for ViewRegistry {
    type E = PitView;
    fn lookup(&self, name: &str) -> Option<Arc<PitView>> {
        (name == self.0.volume()).then(|| self.0.clone())
    }
    fn names(&self) -> Vec<String> {
        vec![self.0.volume().to_string()]
    }
    fn default_export(&self) -> Option<String> {
        Some(self.0.volume().to_string())
    }
}

impl PitExports {
    pub fn new(pit: Arc<Pit>, scratch_dir: PathBuf) -> PitExports {
        // Overlays of a previous run are scratch by definition: drop them.
        if let Ok(rd) = std::fs::read_dir(&scratch_dir) {
            for e in rd.flatten() {
                let _ = std::fs::remove_file(e.path());
            }
        }
        PitExports {
            pit,
            scratch_dir,
            list: Mutex::new(Vec::new()),
        }
    }

    /// Opens a view and serves it on `listen`. Must run inside the tokio runtime.
    pub fn export(
        &self,
        base: Arc<Base>,
        target: &Target,
        listen: std::net::SocketAddr,
        writable: bool,
    ) -> anyhow::Result<serde_json::Value> {
        let std_listener = std::net::TcpListener::bind(listen)
            .with_context(|| format!("binding the view's NBD listener on {listen}"))?;
        std_listener.set_nonblocking(true)?;
        let addr = std_listener.local_addr()?;
        let scratch = writable.then(|| {
            self.scratch_dir.join(format!(
                "{}-{}-{}.scratch",
                base.name,
                std::process::id(),
                self.pit.next_view.load(Ordering::Relaxed)
            ))
        });
        let view = self.pit.open_view(base, target, scratch)?;
        let listener = tokio::net::TcpListener::from_std(std_listener)?;
        let (stop, stop_rx) = tokio::sync::watch::channel(false);
        let cfg = crate::nbd::ServerConfig {
            shutdown_grace: Duration::from_secs(2),
            ..Default::default()
        };
        let registry = Arc::new(ViewRegistry(view.clone()));
        let id = view.id();
        let task = tokio::spawn(async move {
            if let Err(e) = crate::nbd::serve(listener, registry, cfg, stop_rx).await {
                tracing::warn!(id, "point-in-time view server: {e}");
            }
        });
        let point = view.point();
        let out = json!({
            "id": id,
            "volume": view.volume(),
            "seq": point.seq,
            "time": format_rfc3339(point.timestamp_ns),
            "listen": addr.to_string(),
            "uri": format!("nbd://{addr}/{}", view.volume()),
            "writable": writable,
            "undo_entries_read": view.entries,
            "open_seconds": view.opened_in.as_secs_f64(),
        });
        tracing::info!(id, %addr, seq = point.seq, writable, "point-in-time view exported");
        self.list.lock().push(ServedView {
            view,
            addr,
            stop,
            task,
        });
        Ok(out)
    }

    /// Stops the views named (one id, or all), waiting for their servers to close;
    /// a writable view's overlay is deleted with it.
    pub async fn unexport(&self, id: Option<u64>, all: bool) -> anyhow::Result<Vec<u64>> {
        let taken: Vec<ServedView> = {
            let mut list = self.list.lock();
            match (id, all) {
                (_, true) => list.drain(..).collect(),
                (Some(id), false) => {
                    let Some(i) = list.iter().position(|v| v.view.id() == id) else {
                        bail!("no point-in-time view with id {id} is exported");
                    };
                    vec![list.remove(i)]
                }
                (None, false) => match list.len() {
                    0 => bail!("no point-in-time view is exported"),
                    1 => list.drain(..).collect(),
                    n => bail!("{n} views are exported: name one with its id, or use --all"),
                },
            }
        };
        let mut ids = Vec::new();
        for v in taken {
            let _ = v.stop.send(true);
            let _ = v.task.await;
            ids.push(v.view.id());
            tracing::info!(id = v.view.id(), addr = %v.addr, "point-in-time view unexported");
            // Last reference: the view unregisters (unpinning its undo) and its
            // overlay file is removed.
            drop(v.view);
        }
        Ok(ids)
    }

    pub fn status(&self) -> Vec<serde_json::Value> {
        self.list
            .lock()
            .iter()
            .map(|v| {
                let p = v.view.point();
                json!({
                    "id": v.view.id(),
                    "volume": v.view.volume(),
                    "seq": p.seq,
                    "time": format_rfc3339(p.timestamp_ns),
                    "listen": v.addr.to_string(),
                    "writable": v.view.writable(),
                })
            })
            .collect()
    }

    pub fn is_empty(&self) -> bool {
        self.list.lock().is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replica::applier::Applier;
    use crate::size::ByteSize;
    use proptest::prelude::*;

    const SIZE: u64 = 256 << 10;

    #[test]
    fn only_ranges_read_whole_are_prefetched() {
        let rec = |op, length| Record {
            volume: 0,
            op,
            offset: 1 << 30,
            length,
            data: Bytes::new(),
        };
        assert!(prefetched(&rec(Op::Write, 4096)));
        assert!(prefetched(&rec(Op::WriteZeroes, 64 << 10)));
        assert!(prefetched(&rec(Op::Write, (HOLE_CHECK_MIN - 4096) as u32)));
        // A large trim or zeroing is checked for holes, never pulled into the cache.
        assert!(!prefetched(&rec(Op::Trim, HOLE_CHECK_MIN as u32)));
        assert!(!prefetched(&rec(Op::Trim, 1 << 30)));
        assert!(!prefetched(&rec(Op::Seal, 0)));
        assert!(!prefetched(&rec(Op::Write, 0)));
    }

    struct Rig {
        _dir: tempfile::TempDir,
        base: Arc<Base>,
        pit: Arc<Pit>,
        applier: Applier,
        applied: Arc<AtomicU64>,
        next_seq: u64,
        /// (point seq, timestamp, replica image right after it)
        snaps: Vec<(u64, u64, Vec<u8>)>,
    }

    fn rig(segment_size: u64, max_bytes: u64) -> Rig {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.img");
        std::fs::File::create(&path).unwrap().set_len(SIZE).unwrap();
        let base = Arc::new(Base::open(0, "v", &path, SIZE).unwrap());
        let meta = Arc::new(Meta::open(&dir.path().join("meta"), [3; 16]).unwrap());
        let applied = Arc::new(AtomicU64::new(0));
        let settings = PitConfig {
            enabled: true,
            dir: None,
            max_bytes: ByteSize(max_bytes),
            max_age_secs: 0,
            segment_size: ByteSize(segment_size),
        };
        let pit = Pit::open(
            dir.path().join("undo"),
            [3; 16],
            settings,
            meta.clone(),
            vec![base.clone()],
            applied.clone(),
        )
        .unwrap();
        let applier = Applier {
            bases: vec![base.clone()],
            meta,
            pit: Some(pit.clone()),
            verify: Default::default(),
            applied: applied.clone(),
            outbox: Default::default(),
            resync: Default::default(),
        };
        Rig {
            _dir: dir,
            base,
            pit,
            applier,
            applied,
            next_seq: 1,
            snaps: Vec::new(),
        }
    }

    impl Rig {
        /// Applies one write-set of `ops` (op, offset, len, fill byte) stamped `ts`.
        fn apply(&mut self, ts: u64, ops: &[(Op, u64, u32, u8)]) -> u64 {
            let recs: Vec<(Seq, Record)> = ops
                .iter()
                .map(|&(op, offset, length, fill)| {
                    let s = self.next_seq;
                    self.next_seq += 1;
                    let data = match op {
                        Op::Write => Bytes::from(vec![fill; length as usize]),
                        Op::Seal => Bytes::from(format!("mark{fill}")),
                        _ => Bytes::new(),
                    };
                    let length = if op == Op::Seal { 0 } else { length };
                    (
                        s,
                        Record {
                            volume: 0,
                            op,
                            offset,
                            length,
                            data,
                        },
                    )
                })
                .collect();
            self.applier.apply_write_set(ts, &recs).unwrap();
            let last = recs.last().unwrap().0;
            self.applied.store(last, Ordering::Release);
            self.snaps
                .push((last, ts, std::fs::read(&self.base.path).unwrap()));
            last
        }

        fn view(&self, t: Target, scratch: Option<PathBuf>) -> Arc<PitView> {
            self.pit.open_view(self.base.clone(), &t, scratch).unwrap()
        }
    }

    fn read_all(v: &PitView) -> Vec<u8> {
        let mut out = Vec::new();
        // Odd-sized reads cross range boundaries at arbitrary points.
        let mut at = 0;
        while at < SIZE {
            let n = (SIZE - at).min(12_345);
            out.extend_from_slice(&v.read_sync(at, n as u32).unwrap());
            at += n;
        }
        out
    }

    fn ops_strategy() -> impl Strategy<Value = Vec<Vec<(u8, u64, u32, u8)>>> {
        prop::collection::vec(
            prop::collection::vec((0u8..4, 0u64..SIZE / 512, 1u32..64, 1u8..255), 1..4),
            1..12,
        )
    }

    fn to_ops(ws: &[(u8, u64, u32, u8)]) -> Vec<(Op, u64, u32, u8)> {
        ws.iter()
            .map(|&(k, sector, sectors, fill)| {
                let offset = sector * 512;
                let len = (sectors as u64 * 512).min(SIZE - offset) as u32;
                let op = match k {
                    0 | 1 => Op::Write,
                    2 => Op::Trim,
                    _ => Op::WriteZeroes,
                };
                (op, offset, len, fill)
            })
            .collect()
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, .. ProptestConfig::default() })]

        /// Every retained point's view equals the replica image taken at that point,
        /// before and after more write-sets are applied under the open view; a
        /// rollback to any point restores that image.
        #[test]
        fn views_and_rollback_equal_the_images_at_their_points(
            sets in ops_strategy(),
            more in ops_strategy(),
            pick in any::<prop::sample::Index>(),
        ) {
            let mut r = rig(8192, 1 << 30);
            // Data before the first point: it must show through views too.
            r.apply(1, &[(Op::Write, 0, SIZE as u32, 0x11)]);
            for (i, ws) in sets.iter().enumerate() {
                r.apply(10 + i as u64, &to_ops(ws));
            }
            let snaps = r.snaps.clone();
            for (seq, ts, image) in &snaps {
                let v = r.view(Target::Seq(*seq), None);
                prop_assert_eq!(v.point().seq, *seq);
                prop_assert!(read_all(&v) == *image, "view at seq {} differs", seq);
                let v = r.view(Target::Time(*ts), None);
                prop_assert_eq!(v.point().seq, *seq);
            }
            // Views stay put while replication continues.
            let (seq, _, image) = snaps[pick.index(snaps.len())].clone();
            let v = r.view(Target::Seq(seq), None);
            for (i, ws) in more.iter().enumerate() {
                r.apply(100 + i as u64, &to_ops(ws));
            }
            prop_assert!(read_all(&v) == image, "view at {} changed under replication", seq);
            drop(v);
            let report = r.pit.rollback(&Target::Seq(seq)).unwrap();
            prop_assert_eq!(report.point.seq, seq);
            prop_assert!(std::fs::read(&r.base.path).unwrap() == image, "rollback to {} differs", seq);
            // The log now ends at the target: a second rollback to it is a no-op.
            prop_assert_eq!(r.pit.newest_seq().unwrap_or(seq), seq);
        }
    }

    /// A resync transition: no point inside it is offered (views, rollback), the
    /// point it started from is, also after a crash in the middle of the copy (the
    /// undo log reopened), and a rollback to it restores that image exactly.
    #[test]
    fn resync_keeps_its_start_reachable_across_a_crash() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 0x11)]);
        let from = r.apply(2, &[(Op::Write, 4096, 8192, 0x22), (Op::Seal, 0, 0, 1)]);
        let image_at_from = std::fs::read(&r.base.path).unwrap();
        // Begin: the copy replaces records from+1..=snapshot.
        let snapshot = from + 40;
        r.applier
            .meta
            .begin_resync(
                &crate::store::meta::ResyncState {
                    from,
                    snapshot,
                    through: 0,
                    copied: false,
                },
                from,
            )
            .unwrap();
        r.pit.begin_resync(from, snapshot, 3).unwrap();
        r.applied.store(snapshot, Ordering::Release);
        // Two copied batches, one with data, one zeroing a range.
        let batch = |off: u64, len: u32, fill: Option<u8>| {
            vec![(
                snapshot,
                Record {
                    volume: 0,
                    op: if fill.is_some() { Op::Write } else { Op::Trim },
                    offset: off,
                    length: len,
                    data: fill.map_or(Bytes::new(), |f| Bytes::from(vec![f; len as usize])),
                },
            )]
        };
        r.applier
            .apply_resync_batch(snapshot, 4, &batch(0, 65536, Some(0x33)))
            .unwrap();
        r.applier
            .apply_resync_batch(snapshot, 5, &batch(100_000, 50_000, None))
            .unwrap();
        assert_ne!(std::fs::read(&r.base.path).unwrap(), image_at_from);
        let inside = r
            .pit
            .resolve(&Target::Seq(snapshot))
            .unwrap_err()
            .to_string();
        assert!(inside.contains("inconsistent"), "{inside}");
        assert_eq!(r.pit.status()["newest"]["seq"], from, "no point inside");
        // A crash: the undo log is reopened from disk.
        let Rig {
            _dir: dir,
            base,
            pit,
            applier,
            applied,
            ..
        } = r;
        drop(applier);
        drop(pit);
        let settings = PitConfig {
            enabled: true,
            dir: None,
            max_bytes: ByteSize(1 << 30),
            max_age_secs: 0,
            segment_size: ByteSize(1 << 20),
        };
        let meta = Arc::new(Meta::open(&dir.path().join("meta"), [3; 16]).unwrap());
        let pit = Pit::open(
            dir.path().join("undo"),
            [3; 16],
            settings,
            meta.clone(),
            vec![base.clone()],
            applied,
        )
        .unwrap();
        assert!(pit.resolve(&Target::Seq(snapshot)).is_err());
        let v = pit
            .open_view(base.clone(), &Target::Seq(from), None)
            .unwrap();
        let mut got = Vec::new();
        let mut at = 0;
        while at < SIZE {
            let n = (SIZE - at).min(65536);
            got.extend_from_slice(&v.read_sync(at, n as u32).unwrap());
            at += n;
        }
        assert!(got == image_at_from, "the view at the resync's start");
        drop(v);
        let report = pit.rollback(&Target::Seq(from)).unwrap();
        assert_eq!(report.point.seq, from);
        assert!(
            std::fs::read(&base.path).unwrap() == image_at_from,
            "rollback to the resync's start"
        );
        assert_eq!(meta.resync_state().unwrap(), None, "the transition is over");
    }

    #[test]
    fn writable_view_keeps_writes_in_its_overlay() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(1, &[(Op::Write, 0, 8192, 0xaa)]);
        r.apply(2, &[(Op::Write, 4096, 8192, 0xbb)]);
        let replica = std::fs::read(&r.base.path).unwrap();
        let scratch = r._dir.path().join("scratch/v.overlay");
        let v = r.view(Target::Seq(1), Some(scratch.clone()));
        assert!(v.writable() && scratch.exists());
        v.overlay_write(2048, Some(&[0xcc; 4096]), 4096).unwrap();
        v.overlay_write(100_000, None, 5000).unwrap();
        let got = read_all(&v);
        let mut want = r.snaps[0].2.clone();
        want[2048..6144].fill(0xcc);
        want[100_000..105_000].fill(0);
        assert!(got == want, "writable view content");
        assert_eq!(
            std::fs::read(&r.base.path).unwrap(),
            replica,
            "replica touched"
        );
        drop(v);
        assert!(!scratch.exists(), "overlay not removed with its view");
        let ro = r.view(Target::Seq(1), None);
        assert!(matches!(
            ro.overlay_write(0, Some(&[1]), 1),
            Err(ExportError::ReadOnly(_))
        ));
    }

    #[test]
    fn targets_resolve_or_say_why_not() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(
            1_000,
            &[(Op::Write, 0, 4096, 1), (Op::Write, 8192, 4096, 2)],
        );
        r.apply(2_000, &[(Op::Write, 0, 4096, 3), (Op::Seal, 0, 0, 7)]);
        r.apply(3_000, &[(Op::Write, 0, 4096, 4)]);
        let p = |t| r.pit.resolve(&t).map(|p| p.seq).map_err(|e| e.to_string());
        assert_eq!(p(Target::Seq(2)), Ok(2));
        assert_eq!(p(Target::Seq(0)), Ok(0));
        assert_eq!(p(Target::Bookmark("mark7".into())), Ok(4));
        assert_eq!(p(Target::Time(2_500)), Ok(4));
        assert_eq!(p(Target::Time(1_000_000)), Ok(5));
        assert!(p(Target::Seq(1)).unwrap_err().contains("inside write-set"));
        assert!(p(Target::Seq(9)).unwrap_err().contains("not applied"));
        assert!(p(Target::Time(999))
            .unwrap_err()
            .contains("before the oldest"));
        assert!(p(Target::Bookmark("nope".into()))
            .unwrap_err()
            .contains("no bookmark"));
        // The bookmark came with the stream.
        let b = r.applier.meta.bookmarks().unwrap();
        assert_eq!(
            (b[0].name.as_str(), b[0].seq, b[0].timestamp_ns),
            ("mark7", 4, 2_000)
        );
    }

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
        let st = r.pit.status();
        assert!(st["used_bytes"].as_u64().unwrap() <= 24 << 10, "{st}");
        let oldest = st["oldest"]["seq"].as_u64().unwrap();
        assert!(oldest > 2, "nothing dropped: {st}");
        assert!(!r.pit.reachable(1));
        // What is left still restores exactly.
        let (seq, _, image) = r.snaps.iter().find(|s| s.0 == oldest).unwrap().clone();
        let v = r.view(Target::Seq(seq), None);
        assert_eq!(read_all(&v), image);
    }

    #[test]
    fn zero_ranges_cost_no_undo_bytes() {
        let mut r = rig(1 << 20, 1 << 30);
        // Trimming a large hole and writing over zeros: before-images are all zero.
        r.apply(
            1,
            &[(Op::Trim, 0, SIZE as u32, 0), (Op::Write, 4096, 65536, 5)],
        );
        let used = r.pit.status()["used_bytes"].as_u64().unwrap();
        // The segment's header block and one 4 KiB block for the entry: no data bytes
        // (the 64 KiB written over zeros alone would take 17 blocks).
        let blocks = 2 * ferry_journal::undo::UNDO_ALIGN;
        assert!(
            used <= blocks,
            "undo used {used} bytes for zero before-images"
        );
    }

    #[test]
    fn extents_fill_gaps_and_lookup() {
        let mut e = Extents::default();
        e.fill_gaps(
            100,
            200,
            Src::Undo {
                segment: 1,
                at: 1000,
            },
        );
        e.fill_gaps(50, 250, Src::Undo { segment: 2, at: 0 });
        e.fill_gaps(120, 130, Src::Zero);
        let got = e.lookup(0, 300);
        assert_eq!(
            got,
            vec![
                (0, 50, None),
                (50, 100, Some(Src::Undo { segment: 2, at: 0 })),
                (
                    100,
                    200,
                    Some(Src::Undo {
                        segment: 1,
                        at: 1000
                    })
                ),
                (
                    200,
                    250,
                    Some(Src::Undo {
                        segment: 2,
                        at: 150
                    })
                ),
                (250, 300, None),
            ]
        );
        assert_eq!(
            e.lookup(150, 210),
            vec![
                (
                    150,
                    200,
                    Some(Src::Undo {
                        segment: 1,
                        at: 1050
                    })
                ),
                (
                    200,
                    210,
                    Some(Src::Undo {
                        segment: 2,
                        at: 150
                    })
                ),
            ]
        );
    }
}
