//! Views: a volume as it was at a point, served over NBD without a copy. A range
//! overwritten since the point is read from the *oldest* undo entry after the point
//! that covers it; any other range from the replica. The extents map says which;
//! a writable view keeps its writes in a scratch overlay.
use std::collections::{BTreeMap, HashMap};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use bytes::{Bytes, BytesMut};
use ferry_journal::undo::{extent_data_offsets, UndoImageReader};
use ferry_journal::UndoPosition;
use parking_lot::{Mutex, RwLock};

use super::{Pit, Point, Target};
use crate::store::base::{file_extents, Base};
use ferry_nbd::{Export, ExportError, ExportFlags, Extent};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Src {
    /// Before-image bytes at file offset `at` of the undo entry at `entry` (its
    /// segment, offset and length: a sealed entry's chunks are found from them).
    Undo { entry: UndoPosition, at: u64 },
    /// The range held zeros.
    Zero,
}

impl Src {
    fn advance(self, d: u64) -> Src {
        match self {
            Src::Undo { entry, at } => Src::Undo { entry, at: at + d },
            Src::Zero => Src::Zero,
        }
    }
}

/// Non-overlapping ranges of a volume, each with its source.
#[derive(Debug, Default)]
pub(super) struct Extents {
    /// start -> (end, source)
    m: BTreeMap<u64, (u64, Src)>,
}

impl Extents {
    /// Maps the parts of `[start, end)` no range covers yet to `src` (advanced by
    /// their distance from `start`). Existing ranges win: the first entry to cover a
    /// range is the one that holds the point's data.
    pub(super) fn fill_gaps(&mut self, start: u64, end: u64, src: Src) {
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
    pub(super) fn lookup(&self, start: u64, end: u64) -> Vec<(u64, u64, Option<Src>)> {
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
pub(super) struct ViewMap {
    pub(super) id: u64,
    pub(super) volume: u32,
    pub(super) point: Point,
    pub(super) map: RwLock<Extents>,
    /// Set when the undo history the view relies on was lost: reads fail from then on.
    pub(super) failed: Mutex<Option<String>>,
}

impl Pit {
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
                        entry: p.position,
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
}

/// Block status runs being collected: neighbours with the same status merged, at
/// most `max` runs. Collection stops at the first part that covers less than its
/// range, since an extent list must be a prefix of the range asked for.
struct ExtentRun {
    out: Vec<Extent>,
    max: usize,
}

impl ExtentRun {
    fn new(max: usize) -> ExtentRun {
        ExtentRun {
            out: Vec::new(),
            max: max.max(1),
        }
    }

    /// How many more runs fit (at least one: a part always gets a say).
    fn room(&self) -> usize {
        self.max.saturating_sub(self.out.len()).max(1)
    }

    /// Appends `part`, the status of a range of `want` bytes; false when collection
    /// must stop (the part fell short of its range, or a run did not fit).
    fn extend(&mut self, part: Vec<Extent>, want: u64) -> bool {
        let mut got = 0u64;
        for x in part.into_iter().filter(|x| x.len > 0) {
            let full = self.out.len() >= self.max;
            match self.out.last_mut() {
                Some(l) if l.hole == x.hole && l.zero == x.zero => l.len += x.len,
                _ if full => return false,
                _ => self.out.push(x),
            }
            got += x.len;
        }
        got >= want
    }

    fn into_vec(self) -> Vec<Extent> {
        self.out
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
    segments: Mutex<HashMap<u64, Arc<UndoImageReader>>>,
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

    fn segment(&self, no: u64) -> Result<Arc<UndoImageReader>, ferry_journal::UndoError> {
        let mut s = self.segments.lock();
        if let Some(f) = s.get(&no) {
            return Ok(f.clone());
        }
        // Retention never removes a segment a view needs (it is pinned), so the file
        // exists for the view's lifetime. A sealed one is decrypted chunk by chunk.
        let f = Arc::new(UndoImageReader::open(
            &self.pit.dir,
            no,
            self.pit.kek.as_deref(),
        )?);
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
                None => self
                    .base
                    .file
                    .read_exact_at(piece, s)
                    .map_err(|e| e.to_string()),
                Some(Src::Zero) => {
                    piece.fill(0);
                    Ok(())
                }
                Some(Src::Undo { entry, at }) => self
                    .segment(entry.segment_no)
                    .and_then(|f| f.read_image(&entry, at, piece))
                    .map_err(|e| e.to_string()),
            };
            r.map_err(|e| ExportError::Io(format!("point-in-time read at {s}: {e}")))?;
        }
        Ok(())
    }

    pub(super) fn read_sync(&self, offset: u64, len: u32) -> Result<Bytes, ExportError> {
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

    /// Allocation of `[offset, offset + len)` in the view (at most `max` extents, a
    /// prefix of the range): a writable view's overlay ranges by the overlay file's
    /// own holes (written data allocates, trims and zeroes punch), the rest as at the
    /// point.
    fn extents_sync(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        let end = offset + len;
        let Some(ov) = &self.overlay else {
            return self.point_extents(offset, end, max);
        };
        let pieces = ov.written.lock().lookup(offset, end);
        let mut out = ExtentRun::new(max);
        for (s, e, src) in pieces {
            let part = match src {
                Some(_) => file_extents(&ov.file, s, e - s, out.room())?,
                None => self.point_extents(s, e, out.room())?,
            };
            if !out.extend(part, e - s) {
                break;
            }
        }
        Ok(out.into_vec())
    }

    /// Allocation of `[offset, end)` as it was at the point. A range served from undo
    /// is a hole (and zeros) iff its undo extent is a zero extent: capture records
    /// holes and all-zero before-images alike as zero extents, so allocated zeros at
    /// the point show as a hole too. That is still true of the view itself, which
    /// allocates nothing there (a writable view's writes go to a sparse overlay), and
    /// it lets a copy of the view stay sparse. A range served from the replica has
    /// the replica's holes: nothing was written there since the point (the map read
    /// lock keeps the applier from changing it under the seeks).
    fn point_extents(&self, offset: u64, end: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        if let Some(why) = self.map.failed.lock().clone() {
            return Err(ExportError::Io(why));
        }
        let map = self.map.map.read();
        let mut out = ExtentRun::new(max);
        for (s, e, src) in map.lookup(offset, end) {
            let part = match src {
                Some(Src::Zero) => vec![Extent::hole(e - s)],
                Some(Src::Undo { .. }) => vec![Extent::data(e - s)],
                None => file_extents(&self.base.file, s, e - s, out.room())?,
            };
            if !out.extend(part, e - s) {
                break;
            }
        }
        Ok(out.into_vec())
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

    async fn extents(&self, offset: u64, len: u64, max: usize) -> Result<Vec<Extent>, ExportError> {
        self.check(offset, len)?;
        // Seeks on the replica and the overlay may block on the file system, as reads do.
        tokio::task::block_in_place(|| self.extents_sync(offset, len, max))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pit::testrig::{ops_strategy, read_all, rig, to_ops, SIZE};
    use ferry_journal::Op;
    use proptest::prelude::*;

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

    /// With the undo log encrypted: views at every point (opened before and read
    /// after more write-sets) and a rollback equal the images at their points, and
    /// the undo files hold none of the overwritten bytes.
    #[test]
    fn sealed_undo_views_and_rollback_equal_the_images() {
        use crate::pit::testrig::rig_sealed;
        let kek = Arc::new(ferry_gm::atrest::Kek::from_bytes(&[5; 16]));
        let mut r = rig_sealed(64 << 10, 1 << 30, kek);
        // A fill no other byte of the rig uses: searched for in the undo files.
        r.apply(1, &[(Op::Write, 0, SIZE as u32, 0xa7)]);
        r.apply(
            2,
            &[
                (Op::Write, 5000, 70_000, 0x21),
                (Op::Trim, 100_000, 9000, 0),
            ],
        );
        let early = r.view(Target::Seq(r.snaps[0].0), None);
        r.apply(
            3,
            &[
                (Op::Write, 1, 20_000, 0x33),
                (Op::WriteZeroes, 150_000, 30_000, 0),
            ],
        );
        r.apply(
            4,
            &[
                (Op::Write, 4095, 4098, 0x44),
                (Op::Write, 200_000, 50_000, 0x55),
            ],
        );
        assert!(
            read_all(&early) == r.snaps[0].2,
            "view opened before later write-sets"
        );
        drop(early);
        for (seq, _, image) in r.snaps.clone() {
            let v = r.view(Target::Seq(seq), None);
            assert!(read_all(&v) == image, "sealed view at {seq} differs");
        }
        let undo = r._dir.path().join("undo");
        let mut found = 0;
        for f in std::fs::read_dir(&undo).unwrap() {
            let raw = std::fs::read(f.unwrap().path()).unwrap();
            found += 1;
            assert!(
                !raw.windows(64).any(|w| w.iter().all(|&b| b == 0xa7)),
                "plaintext before-images in the undo log"
            );
        }
        assert!(found > 1, "no undo segments");
        let (seq, _, image) = r.snaps[1].clone();
        r.pit.rollback(&Target::Seq(seq)).unwrap();
        assert!(
            std::fs::read(&r.base.path).unwrap() == image,
            "rollback to {seq} differs"
        );
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

    /// An entry position in undo segment `no` (the map only carries it along).
    fn seg(no: u64) -> UndoPosition {
        UndoPosition {
            segment_no: no,
            offset: 4096,
            len: 8192,
        }
    }

    #[test]
    fn extents_fill_gaps_and_lookup() {
        let mut e = Extents::default();
        e.fill_gaps(
            100,
            200,
            Src::Undo {
                entry: seg(1),
                at: 1000,
            },
        );
        e.fill_gaps(
            50,
            250,
            Src::Undo {
                entry: seg(2),
                at: 0,
            },
        );
        e.fill_gaps(120, 130, Src::Zero);
        let got = e.lookup(0, 300);
        assert_eq!(
            got,
            vec![
                (0, 50, None),
                (
                    50,
                    100,
                    Some(Src::Undo {
                        entry: seg(2),
                        at: 0
                    })
                ),
                (
                    100,
                    200,
                    Some(Src::Undo {
                        entry: seg(1),
                        at: 1000
                    })
                ),
                (
                    200,
                    250,
                    Some(Src::Undo {
                        entry: seg(2),
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
                        entry: seg(1),
                        at: 1050
                    })
                ),
                (
                    200,
                    210,
                    Some(Src::Undo {
                        entry: seg(2),
                        at: 150
                    })
                ),
            ]
        );
    }

    /// (offset, len, hole) runs of a view's whole volume.
    fn allocation(v: &PitView) -> Vec<(u64, u64, bool)> {
        let mut out = Vec::new();
        let mut at = 0;
        while at < SIZE {
            let got = v.extents_sync(at, SIZE - at, 4096).unwrap();
            assert!(!got.is_empty(), "no progress at {at}");
            for x in got {
                assert_eq!(
                    x.hole, x.zero,
                    "a hole reads as zeros, data is not promised zero"
                );
                out.push((at, x.len, x.hole));
                at += x.len;
            }
        }
        out
    }

    /// A hole in a view is a hole at its point: after the replica gets data over a
    /// hole and a hole punched over data, the earlier point's view reports the old
    /// allocation (from the undo log's zero and data extents), the newest point the
    /// replica's own; a writable view's overlay has its own holes.
    #[test]
    fn views_report_the_allocation_at_their_point() {
        const K64: u64 = 64 << 10;
        let mut r = rig(1 << 20, 1 << 30);
        let probe = r._dir.path().join("probe");
        let f = std::fs::File::create(&probe).unwrap();
        f.set_len(1 << 20).unwrap();
        if !crate::store::base::is_hole(&f, 0, 1 << 20) {
            ferry_testkit::skip(
                "views_report_the_allocation_at_their_point",
                "the temp file system reports no holes (SEEK_DATA)",
            );
            return;
        }
        // Point 1: data in [0, 64K), holes elsewhere.
        let p1 = r.apply(1, &[(Op::Write, 0, K64 as u32, 0x11)]);
        // Data over the hole at [128K, 192K), a hole punched over [0, 64K).
        let p2 = r.apply(
            2,
            &[
                (Op::Write, 2 * K64, K64 as u32, 0x22),
                (Op::Trim, 0, K64 as u32, 0),
            ],
        );
        let at_p1 = vec![(0, K64, false), (K64, SIZE - K64, true)];
        let at_p2 = vec![
            (0, 2 * K64, true),
            (2 * K64, K64, false),
            (3 * K64, K64, true),
        ];
        let v1 = r.view(Target::Seq(p1), None);
        assert_eq!(allocation(&v1), at_p1, "view at the earlier point");
        let v2 = r.view(Target::Seq(p2), None);
        assert_eq!(allocation(&v2), at_p2, "view at the newest point");
        // Reads agree with the holes: zeros wherever a hole is reported.
        let img = read_all(&v1);
        assert!(img[K64 as usize..].iter().all(|&b| b == 0));
        assert!(img[..K64 as usize].iter().all(|&b| b == 0x11));
        // One run at most: a prefix, ending where the status changes.
        assert_eq!(
            v1.extents_sync(0, SIZE, 1).unwrap(),
            vec![Extent::data(K64)]
        );
        assert_eq!(
            v1.extents_sync(K64 / 2, K64, 8).unwrap(),
            vec![Extent::data(K64 / 2), Extent::hole(K64 / 2)]
        );
        // Writable: overlay data allocates, overlay zeroes are holes, the rest is
        // the point's.
        let scratch = r._dir.path().join("scratch/v.overlay");
        let w = r.view(Target::Seq(p1), Some(scratch));
        w.overlay_write(3 * K64, Some(&[7; K64 as usize]), K64)
            .unwrap();
        w.overlay_write(0, None, K64).unwrap();
        assert_eq!(
            allocation(&w),
            vec![(0, 3 * K64, true), (3 * K64, K64, false)],
            "writable view"
        );
    }
}
