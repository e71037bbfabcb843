//! Point-in-time recovery on a standby: undo capture, retention, bookmarks, views
//! and rollback. This module owns [`Pit`] (the undo log, the live views' maps and the
//! window of retained points); each role lives in its own file:
//!
//! * [`capture`]: before-image reads, undo append, publishing new entries to views.
//! * [`batch`]: a unit's before-image read pass (hole checks, readahead at depth,
//!   touching pieces in one read).
//! * [`retention`]: dropping the oldest points by size and age.
//! * [`points`]: recovery targets and their resolution to points.
//! * [`rollback`]: rolling the replica back to a point.
//! * [`view`]: a volume at a point served over NBD ([`PitView`]), its extents map
//!   and scratch overlay.
//! * [`exports`]: the registry of views exported on their own listeners.
//!
//! Point-in-time recovery on a standby: undo capture, retention, bookmarks, views
//! and rollback.
//!
//! **Capture.** The replica applier hands each write-set to [`Applier`](crate::replica::applier::Applier). With PIT
//! on, the before-images of every range the write-set overwrites are read from the
//! replica and appended to the undo log (`ferry_journal::undo`, durable on return)
//! *before* any of its records touch the replica. They are streamed in bounded
//! pieces (several entries for one large write-set, one recovery point), so a trim
//! or zeroing of any size costs bounded memory; an error in capture stops the
//! applier rather than letting it apply without undo (which would leave a hole
//! that costs every older point). So for every retained write-set
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
mod batch;
mod capture;
mod exports;
mod points;
mod retention;
mod rollback;
mod view;

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use ferry_gm::atrest::Kek;
use ferry_journal::UndoLog;
use parking_lot::Mutex;

use crate::store::base::Base;
use crate::store::meta::Meta;
use ferry_api::config::PitConfig;
use ferry_api::status::{OpenView, PitPoint, PitStatus, PitWindow};
use ferry_api::timefmt::format_rfc3339;

use capture::open_capture_file;
pub use exports::PitExports;
pub use points::{Point, Target};
pub use rollback::{RollbackReport, ROLLBACK_PAUSE_ENV};
pub use view::PitView;
use view::ViewMap;

/// Window of retained points, for status and logs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Window {
    oldest: Option<Point>,
    newest: Option<Point>,
    points: usize,
    used_bytes: u64,
}

/// `pit.max_bytes` (hard) and `pit.max_age_secs` (soft, 0: none).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_bytes: u64,
    pub max_age_secs: u64,
}

impl Limits {
    pub fn of(settings: &PitConfig) -> Limits {
        Limits {
            max_bytes: settings.max_bytes.0,
            max_age_secs: settings.max_age_secs,
        }
    }
}

/// The standby's point-in-time state.
pub struct Pit {
    undo: Mutex<UndoLog>,
    dir: PathBuf,
    /// The at-rest key ring (views open sealed undo segments with it).
    kek: Option<Arc<Kek>>,
    meta: Arc<Meta>,
    bases: Vec<Arc<Base>>,
    /// The retention limits in force: the only copy (status, metrics and retention
    /// read it here), so a reload that changes them ([`Pit::set_retention`]) leaves
    /// nothing stale.
    limits: Mutex<Limits>,
    /// Highest sequence applied to the replica (the standby's applied position).
    applied: Arc<AtomicU64>,
    views: Mutex<Vec<Arc<ViewMap>>>,
    next_view: AtomicU64,
    window: Mutex<Window>,
    /// Why capture failed (an undo IO error): the applier stopped there, points are
    /// unusable until a restart reopens the log and captures the write-set again.
    broken: Mutex<Option<String>>,
    /// Time spent reading before-images and appending undo (for the apply overhead).
    capture_ns: AtomicU64,
    /// Per volume id: the replica opened for before-image reads (readahead off).
    capture_files: Vec<(u32, File)>,
    /// The undo log was left over `max_bytes` by retention (warned once per episode).
    over_limit: AtomicBool,
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
        kek: Option<Arc<Kek>>,
    ) -> anyhow::Result<Arc<Pit>> {
        // Encryption at rest: with the node's key ring the log seals new segments
        // and refuses (naming file and key id) a sealed segment it has no key for.
        let (mut undo, report) =
            UndoLog::open_with_key(&dir, cluster_id, settings.segment_size.0, kek.clone())
                .with_context(|| format!("opening the undo log {}", dir.display()))?;
        if let Some((file, at, bytes)) = &report.truncated {
            tracing::warn!(file = %file.display(), at, bytes, "undo log: torn last entry removed");
        }
        if report.dropped_pieces > 0 {
            tracing::warn!(
                pieces = report.dropped_pieces,
                "undo log: pieces of a write-set whose capture did not finish removed (it \
                 was not applied; it is captured again)"
            );
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
            kek,
            meta,
            bases,
            limits: Mutex::new(Limits::of(&settings)),
            applied,
            views: Mutex::new(Vec::new()),
            next_view: AtomicU64::new(1),
            window: Mutex::new(Window::default()),
            broken: Mutex::new(None),
            capture_ns: AtomicU64::new(0),
            over_limit: AtomicBool::new(false),
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

    /// The retention limits in force.
    pub fn limits(&self) -> Limits {
        *self.limits.lock()
    }

    /// New retention limits (a reload): in force at once — retention runs now, up to
    /// the applied position, and again after every write-set as before. The caller
    /// validated them (`Config::validate`: at least two undo segments).
    pub fn set_retention(&self, limits: Limits) {
        *self.limits.lock() = limits;
        self.retain(self.applied.load(Ordering::Acquire));
    }

    /// Sequence of the newest undo point (every write-set up to it has an entry).
    pub fn newest_seq(&self) -> Option<u64> {
        self.undo.lock().points().last().map(|p| p.seq)
    }

    fn refresh_window(&self, undo: &UndoLog) {
        let pt = |p: &ferry_journal::UndoPoint| Point {
            seq: p.seq,
            timestamp_ns: p.timestamp_ns,
        };
        let w = Window {
            oldest: undo.recovery_points().next().map(pt),
            newest: undo.recovery_points().next_back().map(pt),
            points: undo.recovery_point_count(),
            used_bytes: undo.used_bytes(),
        };
        *self.window.lock() = w;
    }

    /// Status of the window, retention and views.
    pub fn status(&self) -> PitStatus {
        let w = *self.window.lock();
        let limits = self.limits();
        let pt = |p: Option<Point>| {
            p.map(|p| PitPoint {
                seq: p.seq,
                time: format_rfc3339(p.timestamp_ns),
                timestamp_ns: p.timestamp_ns,
            })
        };
        let open_views = self
            .views
            .lock()
            .iter()
            .map(|v| OpenView {
                id: v.id,
                volume_id: v.volume,
                seq: v.point.seq,
            })
            .collect();
        PitStatus {
            enabled: true,
            window: Some(PitWindow {
                dir: self.dir.clone(),
                oldest: pt(w.oldest),
                newest: pt(w.newest),
                points: w.points as u64,
                used_bytes: w.used_bytes,
                max_bytes: limits.max_bytes,
                max_age_secs: limits.max_age_secs,
                capture_seconds: self.capture_ns.load(Ordering::Relaxed) as f64 / 1e9,
                error: self.broken.lock().clone(),
                open_views,
            }),
            exports: None,
        }
    }

    /// Numbers for the Prometheus endpoint.
    pub fn window_numbers(&self) -> WindowNumbers {
        let w = *self.window.lock();
        WindowNumbers {
            points: w.points,
            oldest_ns: w.oldest.map_or(0, |p| p.timestamp_ns),
            newest_ns: w.newest.map_or(0, |p| p.timestamp_ns),
            used_bytes: w.used_bytes,
            max_bytes: self.limits().max_bytes,
            views: self.views.lock().len(),
        }
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

/// The test rig shared by the role files: a standby's replica, undo log and applier
/// in a temp dir, and the replica image after every applied write-set.
#[cfg(test)]
mod testrig {
    use std::path::PathBuf;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    use bytes::Bytes;
    use ferry_journal::{Op, Record, Seq};
    use proptest::prelude::*;

    use super::{Kek, Pit, PitView, Target};
    use crate::replica::applier::Applier;
    use crate::store::base::Base;
    use crate::store::meta::Meta;
    use ferry_api::config::PitConfig;
    use ferry_api::size::ByteSize;

    pub(crate) const SIZE: u64 = 256 << 10;

    pub(crate) struct Rig {
        pub(crate) _dir: tempfile::TempDir,
        pub(crate) base: Arc<Base>,
        pub(crate) pit: Arc<Pit>,
        pub(crate) applier: Applier,
        pub(crate) applied: Arc<AtomicU64>,
        pub(crate) next_seq: u64,
        /// (point seq, timestamp, replica image right after it)
        pub(crate) snaps: Vec<(u64, u64, Vec<u8>)>,
    }

    pub(crate) fn rig(segment_size: u64, max_bytes: u64) -> Rig {
        rig_aged(segment_size, max_bytes, 0)
    }

    /// `rig` with an age limit (`max_age_secs`, 0: none).
    pub(crate) fn rig_aged(segment_size: u64, max_bytes: u64, max_age_secs: u64) -> Rig {
        rig_in(None, segment_size, max_bytes, max_age_secs)
    }

    /// `rig_aged` with the undo log in `undo` (a small file system, say) instead of
    /// the rig's temp dir.
    pub(crate) fn rig_in(
        undo: Option<PathBuf>,
        segment_size: u64,
        max_bytes: u64,
        max_age_secs: u64,
    ) -> Rig {
        rig_keyed(undo, segment_size, max_bytes, max_age_secs, None)
    }

    /// `rig` with the undo log encrypted under `kek`.
    pub(crate) fn rig_sealed(segment_size: u64, max_bytes: u64, kek: Arc<Kek>) -> Rig {
        rig_keyed(None, segment_size, max_bytes, 0, Some(kek))
    }

    fn rig_keyed(
        undo: Option<PathBuf>,
        segment_size: u64,
        max_bytes: u64,
        max_age_secs: u64,
        kek: Option<Arc<Kek>>,
    ) -> Rig {
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
            max_age_secs,
            segment_size: ByteSize(segment_size),
        };
        let pit = Pit::open(
            undo.unwrap_or_else(|| dir.path().join("undo")),
            [3; 16],
            settings,
            meta.clone(),
            vec![base.clone()],
            applied.clone(),
            kek,
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
        pub(crate) fn apply(&mut self, ts: u64, ops: &[(Op, u64, u32, u8)]) -> u64 {
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

        pub(crate) fn view(&self, t: Target, scratch: Option<PathBuf>) -> Arc<PitView> {
            self.pit.open_view(self.base.clone(), &t, scratch).unwrap()
        }
    }

    pub(crate) fn read_all(v: &PitView) -> Vec<u8> {
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

    pub(crate) fn ops_strategy() -> impl Strategy<Value = Vec<Vec<(u8, u64, u32, u8)>>> {
        prop::collection::vec(
            prop::collection::vec((0u8..4, 0u64..SIZE / 512, 1u32..64, 1u8..255), 1..4),
            1..12,
        )
    }

    pub(crate) fn to_ops(ws: &[(u8, u64, u32, u8)]) -> Vec<(Op, u64, u32, u8)> {
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
}

#[cfg(test)]
mod tests {
    use super::testrig::rig;
    use ferry_journal::Op;

    /// The window (status, metrics numbers, point list) follows capture: every
    /// applied write-set is a point, and the list keeps the newest.
    #[test]
    fn the_window_follows_capture() {
        let mut r = rig(1 << 20, 1 << 30);
        assert_eq!(r.pit.newest_seq(), None);
        assert_eq!(r.pit.window_numbers().points, 0);
        r.apply(1_000, &[(Op::Write, 0, 4096, 1)]);
        r.apply(
            2_000,
            &[(Op::Write, 4096, 4096, 2), (Op::Write, 0, 4096, 3)],
        );
        r.apply(3_000, &[(Op::Trim, 0, 8192, 0)]);
        assert_eq!(r.pit.newest_seq(), Some(4));
        let n = r.pit.window_numbers();
        assert_eq!(n.newest_ns, 3_000);
        assert_eq!(n.max_bytes, 1 << 30);
        assert!(n.used_bytes > 0);
        let seqs: Vec<u64> = r.pit.points(usize::MAX).iter().map(|p| p.seq).collect();
        assert_eq!(seqs.len(), n.points);
        assert_eq!(seqs.last(), Some(&4));
        assert!(seqs.windows(2).all(|w| w[0] < w[1]), "{seqs:?}");
        let newest: Vec<u64> = r.pit.points(2).iter().map(|p| p.seq).collect();
        assert_eq!(newest, seqs[seqs.len() - 2..]);
        let st = serde_json::to_value(r.pit.status()).unwrap();
        assert_eq!(st["newest"]["seq"], 4);
        assert_eq!(st["points"], n.points);
        assert_eq!(st["error"], serde_json::Value::Null);
    }
}
