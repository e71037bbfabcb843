//! Undo capture: before the applier changes the replica, the before-images of every
//! range a write-set overwrites are read (holes and zeros as zero extents; the read
//! pass is batched, see `pit::batch`), appended to the undo log durably and
//! published to live views. They are streamed: read in pieces of at most 1 MiB and
//! appended as an entry whenever [`ENTRY_DATA_MAX`] bytes are collected (pieces of
//! the write-set, then its own entry), so memory stays bounded whatever the size of
//! a trim or zeroing.
use std::fs::File;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::bail;
use ferry_journal::undo::{extent_data_offsets, UNDO_MAX_EXTENT_LEN};
use ferry_journal::{
    now_ns, EntryKind, Record, Seq, UndoEntry, UndoError, UndoExtent, UndoLog, UndoPosition,
};

use super::batch::{advise, read_before_images, Sink};
use super::retention::Pressure;
use super::view::Src;
use super::Pit;
use crate::store::base::Base;

/// Before-image bytes collected before they go to the undo log as one entry (a
/// piece of the write-set): the bound on capture memory, together with
/// [`ENTRY_EXTENTS_MAX`].
#[cfg(not(test))]
const ENTRY_DATA_MAX: u64 = 8 << 20;
/// Small in unit tests, so write-sets on the test rig's small volume go in pieces
/// (and every view and rollback test reads pieces).
#[cfg(test)]
const ENTRY_DATA_MAX: u64 = 16 << 10;
/// Extents collected before they go as one entry (zero extents cost no data bytes,
/// but a header each).
const ENTRY_EXTENTS_MAX: usize = 1 << 16;

impl Pit {
    /// Reads the before-images of `recs` and appends them (in pieces if they are
    /// large, see the module docs), publishing each entry to live views. Any error
    /// is returned, so the write-set is not applied without its before-images (the
    /// applier stops; a restart captures it again): capture is never switched off.
    /// An undo log error is also shown in status and fails the open views.
    pub(crate) fn capture(
        &self,
        first: Seq,
        last: Seq,
        ts: u64,
        recs: &[(Seq, Record)],
        kind: EntryKind,
    ) -> anyhow::Result<()> {
        if let Some(why) = self.broken.lock().clone() {
            bail!("undo capture failed earlier (restart ferryd to resume): {why}");
        }
        let started = Instant::now();
        let mut out = EntryStream {
            pit: self,
            first,
            last,
            ts,
            kind,
            extents: Vec::new(),
            data: 0,
            pieces: 0,
        };
        let res = read_before_images(&self.bases, |v| self.capture_file(v), recs, &mut out)
            .and_then(|()| out.finish());
        self.capture_ns
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        res
    }

    /// Appends one entry and publishes it; an undo log error stops capture (status,
    /// views) and is returned.
    ///
    /// Retention gets its chance here too, under the same lock (no second lock
    /// order): by size before the append if the log is over `max_bytes` (a resync
    /// copy or a write-set's pieces append without a write-set being applied, after
    /// which `retain` runs), and when the append meets a full file system, before it
    /// waits: the log's own old segments are often what fills it, and nothing but
    /// retention would free them while the applier waits.
    fn append_entry(&self, entry: &UndoEntry) -> anyhow::Result<()> {
        let mut undo = self.undo.lock();
        // Every boundary from the one before this entry on is kept.
        let keep = entry.first_seq;
        if undo.used_bytes() > self.limits().max_bytes {
            self.retain_locked(&mut undo, keep, now_ns(), Pressure::Limits);
        }
        let mut reclaim =
            |u: &mut UndoLog| self.retain_locked(u, keep, now_ns(), Pressure::DiskFull);
        match append_bridging_gaps(&mut undo, entry, &mut reclaim) {
            Ok(pos) => {
                self.publish(entry, &pos);
                self.refresh_window(&undo);
                Ok(())
            }
            Err(e) => {
                let msg = format!(
                    "undo capture failed at write-set {}..={}: {e}; the replica stops \
                     applying here (nothing is applied without its before-images) until \
                     ferryd restarts and captures it again",
                    entry.first_seq, entry.last_seq
                );
                tracing::error!("{msg}");
                self.fail_views(&msg);
                *self.broken.lock() = Some(msg.clone());
                Err(anyhow::anyhow!(msg))
            }
        }
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
                        entry: *pos,
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
}

/// Appends `entry`, deciding what a gap before it (one the log cannot bridge) means.
/// `reclaim` frees space when the file system is full (see
/// [`UndoLog::append_reclaiming`]).
fn append_bridging_gaps(
    undo: &mut UndoLog,
    entry: &UndoEntry,
    reclaim: &mut dyn FnMut(&mut UndoLog) -> u64,
) -> Result<UndoPosition, UndoError> {
    let (first, last, kind) = (entry.first_seq, entry.last_seq, entry.kind);
    match undo.append_reclaiming(entry, reclaim) {
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
            undo.append_reclaiming(entry, reclaim)
        }
        r => r,
    }
}

/// One write-set's before-images on their way to the undo log: extents are
/// collected until [`ENTRY_DATA_MAX`] data bytes (or [`ENTRY_EXTENTS_MAX`] extents)
/// and then appended as a piece; [`finish`](Self::finish) appends the write-set's
/// own entry. Pieces carry an empty sequence range, so the log sees one write-set.
struct EntryStream<'a> {
    pit: &'a Pit,
    first: Seq,
    last: Seq,
    ts: u64,
    kind: EntryKind,
    extents: Vec<UndoExtent>,
    /// Data bytes in `extents`.
    data: u64,
    /// Pieces appended so far.
    pieces: usize,
}

impl Sink for EntryStream<'_> {
    /// Adds a data extent; may append a piece.
    fn data(&mut self, x: UndoExtent) -> anyhow::Result<()> {
        self.data += x.data.len() as u64;
        self.extents.push(x);
        self.maybe_piece()
    }

    /// Adds `n` bytes at `at` of `volume` that held zeros, merged with a preceding
    /// zero extent they continue (a large trim of empty space stays a handful of
    /// 16-byte headers); may append a piece.
    fn zeros(&mut self, volume: u32, at: u64, n: u64) -> anyhow::Result<()> {
        match self.extents.last_mut() {
            Some(x)
                if x.zeros > 0
                    && x.volume == volume
                    && x.offset + x.zeros as u64 == at
                    && x.zeros as u64 + n <= UNDO_MAX_EXTENT_LEN as u64 =>
            {
                x.zeros += n as u32
            }
            _ => self.extents.push(UndoExtent::zeros(volume, at, n as u32)),
        }
        self.maybe_piece()
    }
}

impl EntryStream<'_> {
    fn maybe_piece(&mut self) -> anyhow::Result<()> {
        if self.data < ENTRY_DATA_MAX && self.extents.len() < ENTRY_EXTENTS_MAX {
            return Ok(());
        }
        let kind = piece_kind(self.kind, self.pieces == 0);
        let entry = UndoEntry {
            first_seq: self.first,
            last_seq: self.first.saturating_sub(1),
            timestamp_ns: self.ts,
            extents: std::mem::take(&mut self.extents),
            kind,
        };
        self.data = 0;
        self.pieces += 1;
        self.pit.append_entry(&entry)
    }

    /// Appends the write-set's own entry (the rest of its extents).
    fn finish(self) -> anyhow::Result<()> {
        let kind = match self.kind {
            // The transition's start went as the first piece.
            EntryKind::ResyncStart if self.pieces > 0 => EntryKind::Resync,
            k => k,
        };
        self.pit.append_entry(&UndoEntry {
            first_seq: self.first,
            last_seq: self.last,
            timestamp_ns: self.ts,
            extents: self.extents,
            kind,
        })
    }
}

/// The kind of a piece of a write-set of kind `kind`. A resync's pieces are resync
/// entries (the transition is one unit already); a write-set's are pieces, the
/// first marked so the state before it stays reachable.
fn piece_kind(kind: EntryKind, first: bool) -> EntryKind {
    match kind {
        EntryKind::ResyncStart if first => EntryKind::ResyncStart,
        EntryKind::ResyncStart | EntryKind::Resync => EntryKind::Resync,
        _ if first => EntryKind::PartStart,
        _ => EntryKind::Part,
    }
}

/// The replica opened once more for before-image reads, with readahead off. Why:
/// these reads are random and small, and the kernel's readahead turned each 4 KiB
/// read into a much larger one (most of the capture cost under random writes). A
/// separate descriptor keeps readahead for the sequential readers of the base
/// (verify, resync, views).
pub(super) fn open_capture_file(base: &Base) -> Option<File> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::testrig::{rig, SIZE};
    use bytes::Bytes;
    use ferry_journal::Op;

    /// A write-set whose before-images exceed the bound goes as pieces, the first
    /// marked, then its own entry; only its end is a point, and the view at its
    /// start reads the data the pieces hold.
    #[test]
    fn large_before_images_go_in_pieces() {
        let mut r = rig(1 << 20, 1 << 30);
        let before = r.apply(1, &[(Op::Write, 0, SIZE as u32, 0x5a)]);
        let image = r.snaps[0].2.clone();
        // Four trims, each overwriting more than a piece holds.
        let q = SIZE / 4;
        assert!(q >= ENTRY_DATA_MAX);
        let trims: Vec<_> = (0..4).map(|i| (Op::Trim, i * q, q as u32, 0)).collect();
        let end = r.apply(2, &trims);
        let kinds: Vec<EntryKind> = {
            let undo = r.pit.undo.lock();
            let after = undo.points_after(before).unwrap();
            after.iter().map(|p| p.kind).collect()
        };
        let pieces = 4;
        assert_eq!(kinds.len(), pieces + 1, "{kinds:?}");
        assert_eq!(kinds[0], EntryKind::PartStart);
        assert!(kinds[1..pieces].iter().all(|&k| k == EntryKind::Part));
        assert_eq!(kinds[pieces], EntryKind::WriteSet);
        let points: Vec<u64> = r.pit.points(usize::MAX).iter().map(|p| p.seq).collect();
        assert_eq!(points, vec![before, end]);
        let v = r.view(crate::pit::Target::Seq(before), None);
        assert!(
            crate::pit::testrig::read_all(&v) == image,
            "view before the trim"
        );
    }

    /// A capture that failed stays failed: later write-sets are refused (the
    /// applier stops) and never applied without their before-images.
    #[test]
    fn capture_is_never_skipped_after_a_failure() {
        let mut r = rig(1 << 20, 1 << 30);
        r.apply(1, &[(Op::Write, 0, 4096, 1)]);
        *r.pit.broken.lock() = Some("injected".into());
        let rec = Record {
            volume: 0,
            op: Op::Write,
            offset: 0,
            length: 4096,
            data: Bytes::from(vec![2u8; 4096]),
        };
        let e = r.applier.apply_write_set(2, &[(2, rec)]).unwrap_err();
        assert!(e.to_string().contains("injected"), "{e}");
        let replica = std::fs::read(&r.base.path).unwrap();
        assert_eq!(replica, r.snaps[0].2, "applied without undo");
    }

    #[test]
    fn zero_ranges_cost_no_undo_bytes() {
        let mut r = rig(1 << 20, 1 << 30);
        // Trimming a large hole and writing over zeros: before-images are all zero.
        r.apply(
            1,
            &[(Op::Trim, 0, SIZE as u32, 0), (Op::Write, 4096, 65536, 5)],
        );
        let used = serde_json::to_value(r.pit.status()).unwrap()["used_bytes"]
            .as_u64()
            .unwrap();
        // The segment's header block and one 4 KiB block for the entry: no data bytes
        // (the 64 KiB written over zeros alone would take 17 blocks).
        let blocks = 2 * ferry_journal::undo::UNDO_ALIGN;
        assert!(
            used <= blocks,
            "undo used {used} bytes for zero before-images"
        );
    }
}
