//! The undo log itself ([`UndoLog`]): opening (recovery does the scan), appending
//! entries durably (O_DIRECT into 4 KiB-aligned segments, rolling to a new segment
//! at `segment_size`), the point index, reads of indexed entries, and retention:
//! truncation after a rollback and release of whole old segments, each in a
//! crash-safe order. Single owner, synchronous: the standby's applier thread owns it.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_gm::atrest::{DataKey, Kek};

use crate::engine::AlignedBuf;
use crate::failpoint;
use crate::space::{self, SpaceMonitor};
use crate::undo::entry::{EntryKind, UndoEntry, UndoPoint, UndoPosition};
use crate::undo::error::UndoError;
use crate::undo::format::{
    encode_undo_entry, encode_undo_segment_header, first_entry_offset, pad_to, UndoSegmentHeader,
    UNDO_ALIGN, UNDO_MIN_SEGMENT_SIZE,
};
use crate::undo::index::PointIndex;
use crate::undo::read;
use crate::undo::recovery::{self, UndoRecovery};
use crate::undo::seal::{
    encode_sealed_undo_entry, encode_sealed_undo_segment_header, undo_segment_key_aad,
    UndoSegmentKey,
};
use crate::undo::segment::{self, open_direct, sync_dir, undo_segment_file_name, Segment};

/// The standby's undo log. See the module docs and FORMAT.md "Undo log".
#[derive(Debug)]
pub struct UndoLog {
    dir: PathBuf,
    cluster_id: [u8; 16],
    segment_size: u64,
    segments: Vec<Segment>,
    /// One point per entry, oldest first.
    index: PointIndex,
    /// `first_seq` the next entry must have (contiguity), if known.
    next_seq: Option<u64>,
    next_segment_no: u64,
    poisoned: bool,
    /// Aligned staging buffer for O_DIRECT appends (grown as needed, reused).
    staging: Option<AlignedBuf>,
    /// Waits for space of `append` (see [`UndoLog::space_monitor`]).
    space: SpaceMonitor,
    /// Encryption at rest: the key ring; new segments are sealed under its current
    /// key, older sealed segments are read with the key they name.
    kek: Option<Arc<Kek>>,
    /// Exclusive flock on `dir/LOCK` for the log's lifetime: two owners would corrupt it.
    _lock: fs::File,
}

impl UndoLog {
    /// Opens (creating the directory if needed) and recovers the undo log: deletes
    /// leftover `.undo.tmp` files, validates every segment header and entry header,
    /// truncates a torn last entry of the last segment (never more) and refuses
    /// anything else with [`UndoError::Corruption`] naming file and offset.
    pub fn open(
        dir: &Path,
        cluster_id: [u8; 16],
        segment_size: u64,
    ) -> Result<(UndoLog, UndoRecovery), UndoError> {
        UndoLog::open_with_key(dir, cluster_id, segment_size, None)
    }

    /// [`open`](Self::open) with encryption at rest: `kek` (the key ring of the
    /// node's key file) must hold the key of every sealed segment, else the open is
    /// refused ([`UndoError::KeyRequired`], [`UndoError::WrongKey`]) before
    /// anything is repaired; new segments are sealed under its current key. Without
    /// a key, a log holding a sealed segment is refused the same way.
    pub fn open_with_key(
        dir: &Path,
        cluster_id: [u8; 16],
        segment_size: u64,
        kek: Option<Arc<Kek>>,
    ) -> Result<(UndoLog, UndoRecovery), UndoError> {
        if segment_size < UNDO_MIN_SEGMENT_SIZE {
            return Err(UndoError::InvalidOptions(format!(
                "segment_size {segment_size} below {UNDO_MIN_SEGMENT_SIZE}"
            )));
        }
        fs::create_dir_all(dir)
            .map_err(|e| UndoError::io(format!("create {}", dir.display()), e))?;
        let lock = crate::segment::lock_dir(dir)
            .map_err(|e| UndoError::InvalidOptions(format!("undo log {}: {e}", dir.display())))?;
        let mut r = recovery::recover(dir, cluster_id, kek.as_deref())?;
        let mut log = UndoLog {
            dir: dir.to_path_buf(),
            cluster_id,
            segment_size,
            segments: r.segments,
            next_seq: r.points.last().map(|p| p.seq + 1),
            index: PointIndex::from_points(r.points),
            next_segment_no: r.next_segment_no,
            poisoned: false,
            staging: None,
            space: SpaceMonitor::default(),
            kek,
            _lock: lock,
        };
        r.report.dropped_pieces = log.drop_unfinished_pieces()?;
        r.report.entries -= r.report.dropped_pieces;
        r.report.segments = log.segments.len();
        Ok((log, r.report))
    }

    fn check(&self) -> Result<(), UndoError> {
        if self.poisoned {
            Err(UndoError::Poisoned)
        } else {
            Ok(())
        }
    }

    /// Appends one write-set's before-images; durable (fdatasync, plus directory
    /// fsync when a new segment is created) before it returns. `first_seq` must be
    /// the previous entry's `last_seq + 1` (any value on an empty log).
    pub fn append(&mut self, e: &UndoEntry) -> Result<UndoPosition, UndoError> {
        self.append_reclaiming(e, &mut |_| 0)
    }

    /// [`append`](Self::append) that, when the file system is full (ENOSPC or
    /// EDQUOT), first lets `reclaim` free space in this log (retention: it may
    /// call [`release_before`](Self::release_before)) and returns the bytes it
    /// freed; the append is retried at once if it freed any, and waits for space
    /// only when it freed nothing. Why: the log's own old segments are often what
    /// fills its file system, and only retention frees them.
    pub fn append_reclaiming(
        &mut self,
        e: &UndoEntry,
        reclaim: &mut dyn FnMut(&mut UndoLog) -> u64,
    ) -> Result<UndoPosition, UndoError> {
        self.check()?;
        if let Some(n) = self.next_seq.filter(|&n| n != e.first_seq) {
            return Err(UndoError::InvalidEntry(format!(
                "first_seq {} but the next write-set must start at {n}",
                e.first_seq
            )));
        }
        let roll = match self.segments.last() {
            None => true,
            // Packed segments (earlier versions) are read, never appended to.
            Some(s) if !s.aligned => true,
            // A key was configured or removed since the segment was made: new
            // entries go encrypted as configured now. A sealed segment takes
            // entries only while this log made it and has not cut it (nonces).
            Some(s) if s.key.is_some() != self.kek.is_some() => true,
            Some(s) if s.key.is_some() && !s.appendable => true,
            // A resync transition starts a segment: retention can then release
            // every point before it (keeping its start) while it lasts, however
            // large it grows; inside it there is no cut (see `release_points`).
            Some(s) if s.entries > 0 && e.kind == EntryKind::ResyncStart => true,
            Some(s) => {
                let size = pad_to(e.encoded_len(), true);
                s.entries > 0 && s.len.saturating_add(size) > self.segment_size
            }
        };
        let (no, offset, key) = match self.segments.last() {
            Some(s) if !roll => (s.no, s.len, s.key.clone()),
            _ => (self.next_segment_no, UNDO_ALIGN, self.new_data_key()?),
        };
        let bytes = match &key {
            Some(dk) => encode_sealed_undo_entry(e, no, offset, dk)?,
            None => encode_undo_entry(e, no)?,
        };
        // The new segment's header is made once: a retry after ENOSPC writes the
        // same bytes (same wrapped key) again.
        let new = if roll {
            Some(self.segment_header(no, e.first_seq, key)?)
        } else {
            None
        };
        let pos = match self.write_entry(new, no, &bytes, reclaim) {
            Ok(pos) => pos,
            Err(err) => {
                self.poisoned = true;
                return Err(err);
            }
        };
        self.index.push(UndoPoint {
            seq: e.last_seq,
            first_seq: e.first_seq,
            timestamp_ns: e.timestamp_ns,
            position: pos,
            kind: e.kind,
        });
        self.next_seq = Some(e.last_seq + 1);
        Ok(pos)
    }

    /// A new segment's data key, when the log is encrypted.
    fn new_data_key(&self) -> Result<Option<Arc<DataKey>>, UndoError> {
        match &self.kek {
            None => Ok(None),
            Some(_) => DataKey::generate()
                .map(|k| Some(Arc::new(k)))
                .map_err(|e| UndoError::Crypto(format!("new data key: {e}"))),
        }
    }

    /// The header of new segment `no` (sealed, with `key` wrapped under the
    /// current KEK, when `key` is given).
    fn segment_header(
        &self,
        no: u64,
        first_seq: u64,
        key: Option<Arc<DataKey>>,
    ) -> Result<NewSegment, UndoError> {
        let h = UndoSegmentHeader {
            segment_no: no,
            cluster_id: self.cluster_id,
            first_seq,
            aligned: true,
        };
        let (Some(dk), Some(kek)) = (&key, &self.kek) else {
            return Ok(NewSegment {
                header: encode_undo_segment_header(&h).to_vec(),
                key: None,
            });
        };
        let wrapped = kek
            .wrap(dk, &undo_segment_key_aad(&h, kek.id()))
            .map_err(|e| UndoError::Crypto(format!("wrapping the data key: {e}")))?;
        let sk = UndoSegmentKey {
            key_id: kek.id(),
            wrapped,
        };
        Ok(NewSegment {
            header: encode_sealed_undo_segment_header(&h, &sk).to_vec(),
            key,
        })
    }

    /// Writes encoded entry `bytes` (for segment `no`): in a new segment `no` if
    /// `new` (its header and key) is given, else at the end of the last one. On ENOSPC/EDQUOT it lets `reclaim`
    /// free old segments and tries again, or, if nothing was freed, waits and tries
    /// again (the caller, the standby's applier, blocks; see
    /// [`space_monitor`](Self::space_monitor)): the failed attempt left at most a
    /// partial entry past the log's end, which the retry overwrites (or a removed
    /// temporary file); `reclaim` only removes whole segments before the last one,
    /// so neither moves. Any other error is returned (the caller poisons the log).
    fn write_entry(
        &mut self,
        new: Option<NewSegment>,
        no: u64,
        bytes: &[u8],
        reclaim: &mut dyn FnMut(&mut UndoLog) -> u64,
    ) -> Result<UndoPosition, UndoError> {
        let mon = self.space.clone();
        let what = if new.is_some() {
            "create segment"
        } else {
            "append"
        };
        let mut waiter = mon.waiter("undo log", what);
        // Bounded: each reclaim removes at least one segment (finitely many), then
        // by space coming back or `SpaceMonitor::stop_waiting`.
        loop {
            let r = if let Some(n) = &new {
                self.create_segment(no, n, bytes)
            } else {
                self.append_aligned(bytes)
            };
            if let Err(UndoError::Io { source, .. }) = &r {
                if space::is_space(source) {
                    let segments = self.segments.len();
                    if reclaim(self) > 0 && self.segments.len() < segments {
                        continue;
                    }
                    if self.check().is_ok() && waiter.wait(source, || false) {
                        continue;
                    }
                }
            }
            return r;
        }
    }

    /// Writes one encoded entry, zero-padded to [`UNDO_ALIGN`], at the end of the
    /// last (aligned) segment through its O_DIRECT descriptor, then `fdatasync`s it.
    fn append_aligned(&mut self, bytes: &[u8]) -> Result<UndoPosition, UndoError> {
        let padded = pad_to(bytes.len() as u64, true) as usize;
        let buf = match &mut self.staging {
            Some(b) if b.len() >= padded => b,
            slot => slot.insert(AlignedBuf::new_zeroed(padded)),
        };
        let out = &mut buf.as_mut_slice()[..padded];
        out[..bytes.len()].copy_from_slice(bytes);
        // The padding is part of the format (zeros), not leftovers of an older entry.
        out[bytes.len()..].fill(0);
        let s = self.segments.last_mut().expect("caller checked");
        if s.direct.is_none() {
            s.direct = Some(open_direct(&s.path)?);
        }
        let f = s.direct.as_ref().expect("opened above");
        let off = s.len;
        failpoint::check("undo::append_write")
            .and_then(|()| f.write_all_at(out, off))
            .and_then(|()| failpoint::check("undo::append_fdatasync"))
            .and_then(|()| f.sync_data())
            .map_err(|err| {
                UndoError::io(
                    format!(
                        "append {} bytes ({padded} with padding) to {} at {off}",
                        bytes.len(),
                        s.path.display()
                    ),
                    err,
                )
            })?;
        s.len += padded as u64;
        s.entries += 1;
        Ok(UndoPosition {
            segment_no: s.no,
            offset: off,
            len: bytes.len() as u64,
        })
    }

    /// New segment `no` holding its header and first entry, created durably (see
    /// [`segment::create_durably`]).
    fn create_segment(
        &mut self,
        no: u64,
        new: &NewSegment,
        entry: &[u8],
    ) -> Result<UndoPosition, UndoError> {
        let hdr = &new.header;
        // Header block and first entry, each zero-padded to UNDO_ALIGN. Creation is
        // rare (once per segment_size), so this one goes through the page cache.
        let mut image = vec![0u8; UNDO_ALIGN as usize + pad_to(entry.len() as u64, true) as usize];
        image[..hdr.len()].copy_from_slice(hdr);
        image[UNDO_ALIGN as usize..UNDO_ALIGN as usize + entry.len()].copy_from_slice(entry);
        let file = segment::create_durably(&self.dir, no, &image)?;
        self.next_segment_no = no + 1;
        self.segments.push(Segment {
            no,
            path: self.segment_path(no),
            file,
            direct: None,
            aligned: true,
            len: image.len() as u64,
            first_point: self.index.points().len(),
            entries: 1,
            key: new.key.clone(),
            appendable: true,
        });
        Ok(UndoPosition {
            segment_no: no,
            offset: UNDO_ALIGN,
            len: entry.len() as u64,
        })
    }

    /// Every indexed entry, oldest first (resync entries included: their `seq` is
    /// not a recovery point, see [`UndoPoint::kind`] and
    /// [`recovery_points`](Self::recovery_points)).
    pub fn points(&self) -> &[UndoPoint] {
        self.index.points()
    }

    /// The entries whose end is a recovery point (not resync entries), oldest first.
    pub fn recovery_points(&self) -> impl DoubleEndedIterator<Item = &UndoPoint> + '_ {
        self.index.recovery_points()
    }

    /// How many recovery points are retained (kept as the index changes, not counted).
    pub fn recovery_point_count(&self) -> usize {
        self.index.recovery_point_count()
    }

    /// Newest recovery point with `seq <= seq`.
    pub fn find_by_seq(&self, seq: u64) -> Option<UndoPoint> {
        self.index.find_by_seq(seq)
    }

    /// Newest recovery point at or before `ts_ns`: the last point of the longest
    /// prefix of write-sets all stamped `<= ts_ns` (so a primary clock stepping back
    /// never makes a view include a write-set stamped after `ts_ns`).
    pub fn find_by_time(&self, ts_ns: u64) -> Option<UndoPoint> {
        self.index.find_by_time(ts_ns)
    }

    fn segment(&self, no: u64) -> Option<&Segment> {
        let first = self.segments.first()?.no;
        let s = self.segments.get(no.checked_sub(first)? as usize)?;
        (s.no == no).then_some(s)
    }

    /// Reads and verifies one entry.
    pub fn read_entry(&self, pos: &UndoPosition) -> Result<UndoEntry, UndoError> {
        self.check()?;
        // Only positions of indexed entries (a stale position after a truncate or
        // release is refused, not misread).
        let known = self.index.contains(pos);
        let s = self
            .segment(pos.segment_no)
            .filter(|_| known)
            .ok_or(UndoError::UnknownPosition(*pos))?;
        read::read_entry(s, pos)
    }

    /// The time-index points after boundary `seq`, oldest first (their entries hold
    /// what the write-sets after `seq` overwrote), or why `seq` is not reachable.
    pub fn points_after(&self, seq: u64) -> Result<&[UndoPoint], UndoError> {
        self.check()?;
        let i = self.index.target_index(seq)?;
        Ok(&self.index.points()[i..])
    }

    /// Checks every entry after boundary `seq` (header, body checksum, extent
    /// layout) without applying or keeping anything: each body is streamed in
    /// bounded pieces. A rollback or a view must not start on a log it cannot
    /// finish, so callers run this first (`entries_after` does it itself).
    /// Errors: [`UndoError::InvalidTarget`] if `seq` is not a reachable boundary,
    /// [`UndoError::Corruption`] naming the segment file and entry offset of the
    /// first (oldest) bad entry, or the IO error.
    pub fn verify_from(&self, seq: u64) -> Result<(), UndoError> {
        self.verified_start(seq).map(|_| ())
    }

    /// [`verify_from`](Self::verify_from), returning the index of the first entry
    /// after `seq`.
    fn verified_start(&self, seq: u64) -> Result<usize, UndoError> {
        self.check()?;
        let i = self.index.target_index(seq)?;
        for p in &self.index.points()[i..] {
            let s = self
                .segment(p.position.segment_no)
                .ok_or(UndoError::UnknownPosition(p.position))?;
            read::verify_entry(s, &p.position)?;
        }
        Ok(i)
    }

    /// Entries of the write-sets after boundary `seq`, newest first: applying their
    /// extents in this order restores the replica as it was right after `seq`.
    /// Every one of them is verified ([`verify_from`](Self::verify_from)) before
    /// the first is yielded, so a bad entry never leaves a half-applied rollback:
    /// if `seq` is not a reachable boundary or any entry is bad, the iterator
    /// yields that one error and nothing else.
    pub fn entries_after(
        &self,
        seq: u64,
    ) -> impl Iterator<Item = Result<UndoEntry, UndoError>> + '_ {
        let (start, err) = match self.verified_start(seq) {
            Ok(i) => (i, None),
            Err(e) => (self.index.points().len(), Some(e)),
        };
        err.into_iter().map(Err).chain(
            self.index.points()[start..]
                .iter()
                .rev()
                .map(move |p| self.read_entry(&p.position)),
        )
    }

    /// Drops every entry after boundary `seq` (after a rollback to `seq`).
    ///
    /// Crash-safe order: whole segments after the cut are deleted newest first (a
    /// directory fsync after each), then the cut segment is truncated (`set_len` +
    /// fsync) or, if the cut is at its first entry, deleted (+ directory fsync). A crash leaves a prefix of the
    /// log ending at some boundary `>= seq`: the caller (which persisted its rollback
    /// target first) simply calls `truncate_after(seq)` again.
    pub fn truncate_after(&mut self, seq: u64) -> Result<(), UndoError> {
        self.check()?;
        let i = self.index.target_index(seq)?;
        self.cut_from(i)?;
        self.next_seq = Some(seq + 1);
        Ok(())
    }

    /// Removes the pieces of a write-set whose own entry was never written (a crash
    /// or an error in the middle of its capture; the write-set was not applied, so a
    /// restart captures it again). Same crash-safe order as
    /// [`truncate_after`](Self::truncate_after): a crash leaves a prefix, and the
    /// next open removes the rest. Returns the number of entries removed.
    fn drop_unfinished_pieces(&mut self) -> Result<usize, UndoError> {
        let points = self.index.points();
        let keep = points
            .iter()
            .rposition(|p| !p.kind.is_part())
            .map_or(0, |k| k + 1);
        let dropped = points.len() - keep;
        if dropped > 0 {
            self.cut_from(keep)?;
            self.next_seq = self.index.points().last().map(|p| p.seq + 1);
        }
        Ok(dropped)
    }

    /// Deletes entry `i` and every later one from the segment files and the index
    /// (see [`truncate_after`](Self::truncate_after) for the order). Poisons the log
    /// on an error.
    fn cut_from(&mut self, i: usize) -> Result<(), UndoError> {
        if i == self.index.points().len() {
            return Ok(());
        }
        let cut = self.index.points()[i].position;
        let res = (|| -> Result<(), UndoError> {
            while let Some(s) = self.segments.last() {
                let whole = s.no > cut.segment_no
                    || (s.no == cut.segment_no && cut.offset == first_entry_offset(s.aligned));
                if whole {
                    fs::remove_file(&s.path)
                        .map_err(|e| UndoError::io(format!("remove {}", s.path.display()), e))?;
                    self.segments.pop();
                    // Each deletion durable before the next (older) one: a crash
                    // never leaves a gap.
                    sync_dir(&self.dir)?;
                } else {
                    if s.no == cut.segment_no {
                        s.file
                            .set_len(cut.offset)
                            .and_then(|()| s.file.sync_all())
                            .map_err(|e| {
                                UndoError::io(
                                    format!("truncate {} to {}", s.path.display(), cut.offset),
                                    e,
                                )
                            })?;
                        // Its O_DIRECT descriptor, if open, stays valid (same inode)
                        // and appends at the new `len`.
                        let s = self.segments.last_mut().expect("exists");
                        s.len = cut.offset;
                        s.entries = i - s.first_point;
                        // Appending over the cut would reuse its nonces.
                        s.appendable = false;
                    }
                    break;
                }
            }
            sync_dir(&self.dir)
        })();
        if let Err(e) = res {
            self.poisoned = true;
            return Err(e);
        }
        self.index.truncate(i);
        // Numbers stay consecutive: the next segment follows the last one kept (a
        // number past a deleted one would be a gap, refused on open).
        if let Some(s) = self.segments.last() {
            self.next_segment_no = s.no + 1;
        }
        Ok(())
    }

    /// Where retention can cut, oldest first: the last entry of each segment but the
    /// newest, where that entry is a recovery point (a write-set's own entry, not a
    /// piece of it nor a resync entry). [`release_before`](Self::release_before)
    /// with such a point's `seq` deletes its segment and every older one, and the
    /// point stays reachable as the oldest boundary. A segment ending in a piece or
    /// inside a resync transition is no cut: the next cut is at a later segment.
    pub fn release_points(&self) -> impl Iterator<Item = &UndoPoint> + '_ {
        let points = self.index.points();
        self.segments.windows(2).filter_map(move |w| {
            let last = points.get(w[1].first_point.checked_sub(1)?)?;
            (last.position.segment_no == w[0].no && last.is_point()).then_some(last)
        })
    }

    /// Retention: deletes whole oldest segments whose entries all end at or before
    /// `seq` (never the newest segment). Oldest first, a directory fsync after each,
    /// so a crash leaves a consecutive suffix of segments. Returns the bytes freed.
    /// Afterwards the oldest reachable boundary is the first kept entry's
    /// `first_seq - 1`.
    pub fn release_before(&mut self, seq: u64) -> Result<u64, UndoError> {
        self.check()?;
        // Segments that may go: all entries at or before `seq`, and never leaving a
        // log whose oldest entry continues a resync (the boundary before the oldest
        // entry must be a consistent state): a transition goes as a whole.
        let mut cut = 0usize;
        let mut k = 0usize;
        while self.segments.len() > k + 1 {
            let last = &self.index.points()[self.segments[k + 1].first_point - 1];
            if last.seq > seq {
                break;
            }
            k += 1;
            if last.is_point() {
                cut = k;
            }
        }
        let mut freed = 0u64;
        let mut dropped = 0usize;
        let mut res = Ok(());
        while dropped < cut {
            let s = &self.segments[dropped];
            if let Err(e) = fs::remove_file(&s.path) {
                res = Err(UndoError::io(format!("remove {}", s.path.display()), e));
                break;
            }
            // Each deletion durable before the next (newer) one: a crash never
            // leaves a gap.
            if let Err(e) = sync_dir(&self.dir) {
                res = Err(e);
                dropped += 1;
                freed += s.len;
                break;
            }
            freed += s.len;
            dropped += 1;
        }
        if dropped > 0 {
            let n = self.segments[dropped].first_point;
            self.segments.drain(..dropped);
            for s in &mut self.segments {
                s.first_point -= n;
            }
            self.index.drain_front(n);
        }
        res.map(|()| freed)
    }

    /// Drops every entry (the history has a gap the log cannot bridge, e.g. the
    /// replica was changed without undo). Oldest segment first with a directory fsync
    /// after each, so a crash leaves a consecutive suffix. Returns the bytes freed.
    /// The next `append` may start at any sequence.
    pub fn release_all(&mut self) -> Result<u64, UndoError> {
        self.check()?;
        let mut freed = 0;
        while !self.segments.is_empty() {
            let s = &self.segments[0];
            let res = fs::remove_file(&s.path)
                .map_err(|e| UndoError::io(format!("remove {}", s.path.display()), e))
                .and_then(|()| sync_dir(&self.dir));
            if let Err(e) = res {
                self.poisoned = true;
                return Err(e);
            }
            freed += s.len;
            self.segments.remove(0);
        }
        self.index.clear();
        self.next_seq = None;
        Ok(freed)
    }

    /// The log's waits for space: counters and "waiting since" for metrics
    /// ([`SpaceMonitor::stats`]), and [`SpaceMonitor::stop_waiting`] for shutdown
    /// (an `append` waiting for space then fails as it did before waiting). A
    /// clone: take it once after open; it stays readable while `append` blocks.
    pub fn space_monitor(&self) -> SpaceMonitor {
        self.space.clone()
    }

    /// Bytes of all segment files.
    pub fn used_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum()
    }

    /// Number of segment files.
    pub fn segment_count(&self) -> usize {
        self.segments.len()
    }

    /// Path of segment `no` in this log's directory.
    pub fn segment_path(&self, no: u64) -> PathBuf {
        self.dir.join(undo_segment_file_name(no))
    }

    /// The key ring the log was opened with (views open segments with it).
    pub fn kek(&self) -> Option<&Arc<Kek>> {
        self.kek.as_ref()
    }
}

/// A segment about to be created: its header bytes and (sealed) data key.
struct NewSegment {
    header: Vec<u8>,
    key: Option<Arc<DataKey>>,
}

#[cfg(test)]
mod tests {
    use bytes::Bytes;

    use super::*;
    use crate::undo::entry::UndoExtent;

    fn write_set(first: u64, ts: u64) -> UndoEntry {
        UndoEntry {
            first_seq: first,
            last_seq: first,
            timestamp_ns: ts,
            extents: vec![UndoExtent::data(
                0,
                first * 512,
                Bytes::from(vec![1u8; 512]),
            )],
            kind: EntryKind::WriteSet,
        }
    }

    /// An entry of `kind` continuing at `first` (pieces and resync data cover no
    /// sequence; a write-set covers `first` alone).
    fn entry(first: u64, kind: EntryKind) -> UndoEntry {
        let last = if kind == EntryKind::WriteSet {
            first
        } else {
            first - 1
        };
        UndoEntry {
            kind,
            last_seq: last,
            ..write_set(first, first * 10)
        }
    }

    /// Segments ending in a write-set's piece or inside a resync transition offer
    /// no cut; retention cuts at the first later segment ending in a point, and
    /// the boundary there stays reachable.
    #[test]
    fn release_points_skip_segments_ending_in_pieces_or_resyncs() {
        use EntryKind::*;
        let dir = tempfile::tempdir().unwrap();
        // Three 4 KiB entries per segment after the header block.
        let (mut log, _) = UndoLog::open(dir.path(), [0; 16], 4 * UNDO_ALIGN).unwrap();
        let plan = [
            (1, WriteSet),
            (2, PartStart),
            (2, Part),
            // segment 2
            (2, Part),
            (2, Part),
            (2, WriteSet),
            // segment 3 (a resync starts a segment)
            (3, ResyncStart),
            (3, Resync),
            (3, Resync),
            // segment 4
            (3, Resync),
            (3, WriteSet),
            (4, WriteSet),
            // segment 5
            (5, WriteSet),
        ];
        for (first, kind) in plan {
            log.append(&entry(first, kind)).unwrap();
        }
        assert_eq!(log.segment_count(), 5);
        let cuts: Vec<u64> = log.release_points().map(|p| p.seq).collect();
        assert_eq!(cuts, vec![2, 4]);
        // The oldest segment ends in a piece: cutting there frees nothing.
        assert_eq!(log.release_before(1).unwrap(), 0);
        assert!(log.release_before(2).unwrap() > 0);
        assert_eq!(log.segment_count(), 3);
        assert!(log.points_after(2).is_ok() && log.points_after(1).is_err());
        let cuts: Vec<u64> = log.release_points().map(|p| p.seq).collect();
        assert_eq!(cuts, vec![4]);
        assert!(log.release_before(4).unwrap() > 0);
        assert_eq!(log.release_points().count(), 0);
        assert_eq!(log.points_after(4).unwrap().len(), 1);
    }

    #[test]
    fn tiny_segment_size_refused() {
        let dir = tempfile::tempdir().unwrap();
        let err = UndoLog::open(dir.path(), [0; 16], UNDO_MIN_SEGMENT_SIZE - 1).unwrap_err();
        assert!(matches!(err, UndoError::InvalidOptions(_)), "{err}");
    }

    #[test]
    fn reopen_rebuilds_the_same_time_index() {
        let dir = tempfile::tempdir().unwrap();
        // A clock that steps back, and segments of three 4 KiB entries after the
        // header block (so the index spans a segment roll).
        let stamps = [100, 400, 200, 300, 500];
        let (mut log, _) = UndoLog::open(dir.path(), [0; 16], 4 * UNDO_ALIGN).unwrap();
        for (i, &ts) in stamps.iter().enumerate() {
            log.append(&write_set(i as u64 + 1, ts)).unwrap();
        }
        let probe = |log: &UndoLog| -> Vec<Option<u64>> {
            (0..=6)
                .map(|k| log.find_by_time(k * 100).map(|p| p.seq))
                .collect()
        };
        let before = probe(&log);
        assert_eq!(
            before,
            vec![None, Some(1), Some(1), Some(1), Some(4), Some(5), Some(5)]
        );
        let segments = log.segment_count();
        assert_eq!(segments, 2);
        drop(log);
        let (mut log, rec) = UndoLog::open(dir.path(), [0; 16], 4 * UNDO_ALIGN).unwrap();
        assert_eq!((rec.segments, rec.entries), (segments, stamps.len()));
        assert_eq!(probe(&log), before);
        // Appends continue the sequence after reopen.
        assert!(log.append(&write_set(9, 600)).is_err());
        log.append(&write_set(6, 600)).unwrap();
    }
}
