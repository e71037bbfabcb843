//! Undo capture: before the applier changes the replica, the before-images of every
//! range a write-set overwrites are read (holes and zeros as zero extents), appended
//! to the undo log as one durable entry and published to live views.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::sync::atomic::Ordering;
use std::time::Instant;

use anyhow::bail;
use anyhow::Context;
use bytes::BytesMut;
use ferry_journal::undo::{extent_data_offsets, UNDO_MAX_EXTENT_LEN};
use ferry_journal::{
    EntryKind, Op, Record, Seq, UndoEntry, UndoError, UndoExtent, UndoLog, UndoPosition,
};

use super::view::Src;
use super::Pit;
use crate::store::base::{find_base, is_hole, Base};

/// Before-images are read in pieces of this size; each piece becomes one zero extent
/// or one data extent.
const CAPTURE_PIECE: u64 = 1 << 20;
/// Pieces at least this large are checked for holes before being read.
const HOLE_CHECK_MIN: u64 = 256 << 10;

impl Pit {
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
        let extents = self.read_before_images(recs)?;
        let entry = UndoEntry {
            first_seq: first,
            last_seq: last,
            timestamp_ns: ts,
            extents,
            kind,
        };
        let mut undo = self.undo.lock();
        let res = append_bridging_gaps(&mut undo, &entry);
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

    /// The before-images of every range `recs` overwrite, in record order.
    fn read_before_images(&self, recs: &[(Seq, Record)]) -> anyhow::Result<Vec<UndoExtent>> {
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
        Ok(extents)
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
}

/// Appends `entry`, deciding what a gap before it (one the log cannot bridge) means.
fn append_bridging_gaps(undo: &mut UndoLog, entry: &UndoEntry) -> Result<UndoPosition, UndoError> {
    let (first, last, kind) = (entry.first_seq, entry.last_seq, entry.kind);
    match undo.append(entry) {
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
            undo.append(entry)
        }
        r => r,
    }
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
