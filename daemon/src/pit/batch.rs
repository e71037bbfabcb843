//! The before-image read pass of one apply unit, batched: the ranges its records
//! overwrite are cut into pieces (at most [`CAPTURE_PIECE`] each, large ones
//! checked for holes first), collected into batches of at most [`BATCH_BYTES`] to
//! read, and each batch is read at depth: every data piece's readahead is started
//! before the first read waits (the device works on them together), and pieces that
//! touch in the file are read with one `pread` (a sequential unit costs one read per
//! MiB, not one per record). The pieces come out in record order, exactly as one
//! read per piece would give them (the property test below holds the two
//! together), so the undo entry is the same.
//!
//! Memory stays bounded: a batch holds at most [`BATCH_BYTES`] of data, whatever
//! the size of a trim or write in it.
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;

use anyhow::{bail, Context};
use bytes::{Bytes, BytesMut};
use ferry_journal::{Op, Record, Seq, UndoExtent};

use crate::store::base::{find_base, is_hole, Base};

/// Before-images are read in pieces of this size at most; each piece becomes one
/// zero extent or one data extent.
pub(super) const CAPTURE_PIECE: u64 = 1 << 20;
/// Pieces at least this large are checked for holes before being read: asking the
/// file system walks its extent tree and costs more than reading a few cached pages.
pub(super) const HOLE_CHECK_MIN: u64 = 256 << 10;
/// Data bytes one batch reads at most (pieces started together).
const BATCH_BYTES: u64 = 8 << 20;
/// Pieces in one batch at most (zero pieces cost no read, but a slot each).
const BATCH_PIECES: usize = 4096;
/// One `pread` covers touching pieces up to this many bytes.
const READ_MAX: u64 = 1 << 20;

/// Where before-images go, in record order: zero ranges and data extents.
pub(super) trait Sink {
    /// `n` bytes at `at` of `volume` held zeros (a hole, or read as zeros).
    fn zeros(&mut self, volume: u32, at: u64, n: u64) -> anyhow::Result<()>;
    /// A data extent (not all zeros).
    fn data(&mut self, x: UndoExtent) -> anyhow::Result<()>;
}

/// One piece of a record's range.
struct Piece<'a> {
    base: &'a Base,
    file: &'a File,
    seq: Seq,
    at: u64,
    n: u64,
    /// A hole (checked before the batch was read): zeros without a read.
    hole: bool,
}

/// Reads the before-images of every range `recs` overwrite into `out`, in record
/// order. `capture_file` gives the descriptor to read a volume through (the base's
/// own when `None`).
pub(super) fn read_before_images<'a>(
    bases: &'a [std::sync::Arc<Base>],
    capture_file: impl Fn(u32) -> Option<&'a File>,
    recs: &[(Seq, Record)],
    out: &mut dyn Sink,
) -> anyhow::Result<()> {
    let mut batch: Vec<Piece<'a>> = Vec::new();
    let mut bytes = 0u64;
    for (seq, r) in recs {
        if r.op == Op::Seal || r.length == 0 {
            continue;
        }
        let base: &'a Base = find_base(bases, r.volume, *seq)?;
        let file = capture_file(r.volume).unwrap_or(&base.file);
        let end = checked_end(base, *seq, r)?;
        let mut at = r.offset;
        while at < end {
            let n = (end - at).min(CAPTURE_PIECE);
            let hole = n >= HOLE_CHECK_MIN && is_hole(file, at, n);
            if (!hole && bytes + n > BATCH_BYTES) || batch.len() >= BATCH_PIECES {
                read_batch(&batch, out)?;
                batch.clear();
                bytes = 0;
            }
            bytes += if hole { 0 } else { n };
            batch.push(Piece {
                base,
                file,
                seq: *seq,
                at,
                n,
                hole,
            });
            at += n;
        }
    }
    read_batch(&batch, out)
}

/// The end of `r`'s range, which must lie inside its volume.
fn checked_end(base: &Base, seq: Seq, r: &Record) -> anyhow::Result<u64> {
    match r.offset.checked_add(r.length as u64) {
        Some(e) if e <= base.size => Ok(e),
        _ => bail!(
            "record {seq} writes {}+{} beyond volume '{}' ({} bytes)",
            r.offset,
            r.length,
            base.name,
            base.size
        ),
    }
}

/// Reads one batch: readahead of every data run first (when there is more than
/// one read to overlap), then one `pread` per run, the pieces out in order.
fn read_batch(batch: &[Piece], out: &mut dyn Sink) -> anyhow::Result<()> {
    let runs = runs(batch);
    for (file, at, len) in readahead(batch, &runs) {
        advise(file, at, len, libc::POSIX_FADV_WILLNEED);
    }
    for r in runs {
        let pieces = &batch[r];
        let first = &pieces[0];
        if first.hole {
            for p in pieces {
                out.zeros(p.base.id, p.at, p.n)?;
            }
            continue;
        }
        let len = pieces.iter().map(|p| p.n).sum::<u64>();
        let mut buf = BytesMut::zeroed(len as usize);
        first
            .file
            .read_exact_at(&mut buf, first.at)
            .with_context(|| {
                format!(
                    "reading before-images of record {} from {}",
                    first.seq,
                    first.base.path.display()
                )
            })?;
        let buf = buf.freeze();
        let mut off = 0usize;
        for p in pieces {
            let data: Bytes = buf.slice(off..off + p.n as usize);
            off += p.n as usize;
            if data.iter().all(|&b| b == 0) {
                out.zeros(p.base.id, p.at, p.n)?;
            } else {
                out.data(UndoExtent::data(p.base.id, p.at, data))?;
            }
        }
    }
    Ok(())
}

/// The ranges to start reading ahead before the batch's first read waits: every
/// data run, when there are at least two to overlap. Never a hole (nothing to read
/// there: readahead would only fill the cache with zero pages).
fn readahead<'a>(
    batch: &[Piece<'a>],
    runs: &[std::ops::Range<usize>],
) -> Vec<(&'a File, u64, u64)> {
    let data: Vec<(&'a File, u64, u64)> = runs
        .iter()
        .filter(|r| !batch[r.start].hole)
        .map(|r| {
            let (first, last) = (&batch[r.start], &batch[r.end - 1]);
            (first.file, first.at, last.at + last.n - first.at)
        })
        .collect();
    if data.len() > 1 {
        data
    } else {
        Vec::new()
    }
}

/// The batch cut into runs: holes alone, and data pieces that continue each other
/// in the same file (up to [`READ_MAX`] bytes) together.
fn runs(batch: &[Piece]) -> Vec<std::ops::Range<usize>> {
    let mut runs: Vec<std::ops::Range<usize>> = Vec::new();
    let mut bytes = 0u64;
    for (i, p) in batch.iter().enumerate() {
        let joins = runs.last().is_some_and(|r| {
            let prev = &batch[i - 1];
            r.end == i
                && !p.hole
                && !prev.hole
                && std::ptr::eq(prev.file, p.file)
                && prev.at + prev.n == p.at
                && bytes + p.n <= READ_MAX
        });
        if joins {
            if let Some(r) = runs.last_mut() {
                r.end = i + 1;
            }
            bytes += p.n;
        } else {
            runs.push(i..i + 1);
            bytes = p.n;
        }
    }
    runs
}

/// `posix_fadvise` on a range; advice only, so a failure changes nothing.
pub(super) fn advise(file: &File, offset: u64, len: u64, advice: libc::c_int) {
    // SAFETY: plain syscall on an fd we own; no memory is passed.
    unsafe {
        libc::posix_fadvise(file.as_raw_fd(), offset as i64, len as i64, advice);
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use proptest::prelude::*;

    use super::*;

    /// What a sink was given, in order.
    #[derive(Debug, Default, PartialEq, Eq)]
    struct Recorded(Vec<(u32, u64, u64, Option<Vec<u8>>)>);

    impl Sink for Recorded {
        fn zeros(&mut self, volume: u32, at: u64, n: u64) -> anyhow::Result<()> {
            self.0.push((volume, at, n, None));
            Ok(())
        }
        fn data(&mut self, x: UndoExtent) -> anyhow::Result<()> {
            self.0
                .push((x.volume, x.offset, x.len(), Some(x.data.to_vec())));
            Ok(())
        }
    }

    /// The capture before batching: one hole check and one read per piece, in
    /// record order (the reference the batched pass must match).
    fn one_by_one(bases: &[Arc<Base>], recs: &[(Seq, Record)], out: &mut Recorded) {
        for (seq, r) in recs {
            if r.op == Op::Seal || r.length == 0 {
                continue;
            }
            let base = find_base(bases, r.volume, *seq).unwrap();
            let (mut at, end) = (r.offset, r.offset + r.length as u64);
            while at < end {
                let n = (end - at).min(CAPTURE_PIECE);
                if n >= HOLE_CHECK_MIN && is_hole(&base.file, at, n) {
                    out.zeros(base.id, at, n).unwrap();
                } else {
                    let mut buf = vec![0u8; n as usize];
                    base.file.read_exact_at(&mut buf, at).unwrap();
                    if buf.iter().all(|&b| b == 0) {
                        out.zeros(base.id, at, n).unwrap();
                    } else {
                        out.data(UndoExtent::data(base.id, at, buf.into())).unwrap();
                    }
                }
                at += n;
            }
        }
    }

    const VOL: u64 = 8 << 20;

    /// Two volumes with data, zeros and holes: 64 KiB blocks of pattern `k`,
    /// zeros written (k == 1) or left a hole (k == 0).
    fn volumes(dir: &std::path::Path, layout: &[u8]) -> Vec<Arc<Base>> {
        (0..2u32)
            .map(|v| {
                let path = dir.join(format!("v{v}.img"));
                let f = std::fs::File::create(&path).unwrap();
                f.set_len(VOL).unwrap();
                for (i, &k) in layout.iter().enumerate() {
                    let at = i as u64 * (64 << 10);
                    match k {
                        0 => {}
                        1 => f.write_all_at(&[0u8; 64 << 10], at).unwrap(),
                        k => {
                            let block: Vec<u8> =
                                (0..64 << 10).map(|j| (j as u8) ^ k ^ v as u8).collect();
                            f.write_all_at(&block, at).unwrap();
                        }
                    }
                }
                Arc::new(Base::open(v + 3, "v", &path, VOL).unwrap())
            })
            .collect()
    }

    fn record(volume: u32, op: Op, offset: u64, length: u32) -> Record {
        Record {
            volume,
            op,
            offset,
            length,
            data: Bytes::new(),
        }
    }

    fn batched(bases: &[Arc<Base>], recs: &[(Seq, Record)]) -> Recorded {
        let mut out = Recorded::default();
        read_before_images(bases, |_| None, recs, &mut out).unwrap();
        out
    }

    /// Overlapping writes in one unit: each captures what the replica held before
    /// the unit, in record order (the second write over the same range captures
    /// the same old bytes again, not the first write's data, which is not applied
    /// yet).
    #[test]
    fn overlapping_writes_capture_the_units_before_images_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let bases = volumes(dir.path(), &[7, 9, 0, 1]);
        let recs: Vec<(Seq, Record)> = vec![
            (1, record(3, Op::Write, 4096, 8192)),
            (2, record(3, Op::Write, 0, 16384)),
            (3, record(4, Op::Write, 4096, 4096)),
            (4, record(3, Op::Seal, 0, 0)),
            (5, record(3, Op::Write, 8192, 4096)),
        ];
        let got = batched(&bases, &recs);
        let old = std::fs::read(&bases[0].path).unwrap();
        let old4 = std::fs::read(&bases[1].path).unwrap();
        let want: Vec<(u32, u64, u64, Option<Vec<u8>>)> = vec![
            (3, 4096, 8192, Some(old[4096..12288].to_vec())),
            (3, 0, 16384, Some(old[..16384].to_vec())),
            (4, 4096, 4096, Some(old4[4096..8192].to_vec())),
            (3, 8192, 4096, Some(old[8192..12288].to_vec())),
        ];
        assert_eq!(got.0, want);
    }

    /// A large write over a hole, zeros and data: holes without a read, zeros as
    /// zeros, data in pieces, touching reads merged but the pieces kept.
    #[test]
    fn large_ranges_go_in_pieces_with_holes_and_zeros_apart() {
        let dir = tempfile::tempdir().unwrap();
        // 0..4 MiB: hole; 4..5 MiB: written zeros; 5..8 MiB: data.
        let layout = {
            let mut l = vec![0u8; 128];
            l[64..80].fill(1);
            l[80..].fill(5);
            l
        };
        let bases = volumes(dir.path(), &layout);
        let recs = vec![(1, record(3, Op::Write, 0, VOL as u32))];
        let got = batched(&bases, &recs);
        let mut want = Recorded::default();
        one_by_one(&bases, &recs, &mut want);
        assert_eq!(got, want);
        assert_eq!(
            got.0.len(),
            8,
            "{:?}",
            got.0.iter().map(|x| x.1).collect::<Vec<_>>()
        );
        assert!(got.0[..5].iter().all(|x| x.3.is_none()), "hole and zeros");
        assert!(got.0[5..].iter().all(|x| x.3.is_some()), "data");
    }

    #[test]
    fn runs_join_touching_data_pieces_only() {
        let dir = tempfile::tempdir().unwrap();
        let bases = volumes(dir.path(), &[2]);
        let f = &bases[0].file;
        let g = &bases[1].file;
        let p = |file, at, n, hole| Piece {
            base: &bases[0],
            file,
            seq: 1,
            at,
            n,
            hole,
        };
        let batch = [
            p(f, 0, 4096, false),
            p(f, 4096, 4096, false),
            p(g, 8192, 4096, false),
            p(g, 12288, 4096, true),
            p(g, 16384, 4096, true),
            p(f, 0, READ_MAX, false),
            p(f, READ_MAX, 4096, false),
        ];
        assert_eq!(runs(&batch), vec![0..2, 2..3, 3..4, 4..5, 5..6, 6..7]);
    }

    /// Readahead covers every data run when two or more overlap, never a hole, and
    /// nothing for a lone read (it would only add a syscall).
    #[test]
    fn readahead_starts_data_runs_only() {
        let dir = tempfile::tempdir().unwrap();
        let bases = volumes(dir.path(), &[2]);
        let f = &bases[0].file;
        let p = |at, n, hole| Piece {
            base: &bases[0],
            file: f,
            seq: 1,
            at,
            n,
            hole,
        };
        let batch = [
            p(0, 4096, false),
            p(4096, 4096, false),
            p(1 << 20, CAPTURE_PIECE, true),
            p(4 << 20, 4096, false),
        ];
        let got: Vec<(u64, u64)> = readahead(&batch, &runs(&batch))
            .into_iter()
            .map(|(_, at, len)| (at, len))
            .collect();
        assert_eq!(got, vec![(0, 8192), (4 << 20, 4096)]);
        let lone = [p(0, 4096, false), p(1 << 20, CAPTURE_PIECE, true)];
        assert!(readahead(&lone, &runs(&lone)).is_empty());
    }

    /// A record past its volume's end is refused before anything is read.
    #[test]
    fn a_record_beyond_its_volume_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let bases = volumes(dir.path(), &[2]);
        let mut out = Recorded::default();
        let recs = vec![(9, record(3, Op::Write, VOL - 4096, 8192))];
        let e = read_before_images(&bases, |_| None, &recs, &mut out).unwrap_err();
        assert!(e.to_string().contains("record 9 writes"), "{e}");
        let recs = vec![(9, record(8, Op::Write, 0, 4096))];
        assert!(read_before_images(&bases, |_| None, &recs, &mut out).is_err());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(48))]

        /// The batched pass gives exactly what one read per piece gives, for any
        /// mix of records (overlapping, touching, large, on either volume, with
        /// seals) over any layout of data, zeros and holes.
        #[test]
        fn batched_capture_matches_one_by_one(
            layout in prop::collection::vec(0u8..4, 128),
            ops in prop::collection::vec(
                (0u8..4, 0u32..2, 0u64..(VOL / 4096), 1u64..600),
                1..40,
            ),
        ) {
            let dir = tempfile::tempdir().unwrap();
            let bases = volumes(dir.path(), &layout);
            let recs: Vec<(Seq, Record)> = ops
                .iter()
                .enumerate()
                .map(|(i, &(k, v, block, blocks))| {
                    let op = [Op::Write, Op::Trim, Op::WriteZeroes, Op::Seal][k as usize];
                    let offset = block * 4096;
                    let len = (blocks * 4096).min(VOL - offset) as u32;
                    (i as Seq + 1, record(v + 3, op, offset, if op == Op::Seal { 0 } else { len }))
                })
                .collect();
            let mut want = Recorded::default();
            one_by_one(&bases, &recs, &mut want);
            prop_assert_eq!(batched(&bases, &recs), want);
        }
    }
}
