//! Recovery of the undo log on open: deletes leftover `.undo.tmp` files, checks
//! that segment numbers are consecutive, validates every segment header and entry
//! header (and the last entry's body), truncates a torn last entry of the last
//! segment (never more) and refuses anything else with
//! [`UndoError::Corruption`] naming file and offset. A sealed segment's data key
//! is unwrapped here, so a missing or wrong key refuses the open before anything
//! is cut or appended. See `journal/FORMAT.md`, "Undo log", for the crash-case
//! table these rules implement (the same for sealed segments: their headers and
//! checksums are plaintext).

use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_gm::atrest::{DataKey, Kek};

use crate::format::salted_crc;
use crate::undo::entry::{UndoPoint, UndoPosition};
use crate::undo::error::UndoError;
use crate::undo::format::{
    decode_undo_entry_header, decode_undo_segment_header, pad_to, UndoEntryHeader,
    UndoSegmentHeader, UNDO_ENTRY_HEADER_LEN, UNDO_ENTRY_MAGIC, UNDO_SEGMENT_HEADER_LEN,
};
use crate::undo::seal::{self, decode_undo_segment_key, UNDO_SEALED_SEGMENT_HEADER_LEN};
use crate::undo::segment::{
    open_existing, parse_undo_segment_name, read_at, sync_dir, undo_segment_file_name, Segment,
    UNDO_TMP_SUFFIX,
};

/// What `UndoLog::open` found and repaired.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UndoRecovery {
    pub segments: usize,
    pub entries: usize,
    /// Torn last entry removed: file, offset it was cut at, bytes removed.
    pub truncated: Option<(PathBuf, u64, u64)>,
    /// Leftover `.undo.tmp` files deleted (unfinished segment creations).
    pub removed_tmp: Vec<PathBuf>,
    /// An empty last segment (header only) deleted.
    pub removed_empty: Option<PathBuf>,
    /// Pieces of a write-set whose own entry was never written, removed from the
    /// end of the log (the write-set was not applied: it is captured again).
    pub dropped_pieces: usize,
}

/// The recovered log: its segments and every entry's index point, oldest first.
pub(super) struct Recovered {
    pub(super) segments: Vec<Segment>,
    pub(super) points: Vec<UndoPoint>,
    /// Number of the next segment to create (one past the highest found, even if
    /// that one was an empty last segment and got deleted).
    pub(super) next_segment_no: u64,
    pub(super) report: UndoRecovery,
}

/// Recovers the log in `dir` (which the caller created and locked).
/// `kek`: the configured key ring, which must hold the key of every sealed segment.
pub(super) fn recover(
    dir: &Path,
    cluster_id: [u8; 16],
    kek: Option<&Kek>,
) -> Result<Recovered, UndoError> {
    let mut report = UndoRecovery::default();
    let nos = list_segments(dir, &mut report)?;
    let mut scan = Scan {
        cluster_id,
        kek,
        segments: Vec::with_capacity(nos.len()),
        points: Vec::new(),
    };
    for (i, &no) in nos.iter().enumerate() {
        let path = dir.join(undo_segment_file_name(no));
        if i > 0 && no != nos[i - 1] + 1 {
            return Err(UndoError::corrupt(
                &path,
                0,
                format!("segment gap: {} is followed by {no}", nos[i - 1]),
            ));
        }
        let last = i + 1 == nos.len();
        scan.segment(no, path, last, &mut report)?;
    }
    // An empty last segment (header only) holds nothing: delete it so the next
    // append starts a segment whose header names its first entry.
    if scan.segments.last().is_some_and(|s| s.entries == 0) {
        let s = scan.segments.pop().expect("checked non-empty");
        fs::remove_file(&s.path)
            .map_err(|e| UndoError::io(format!("remove {}", s.path.display()), e))?;
        sync_dir(dir)?;
        report.removed_empty = Some(s.path);
    }
    report.segments = scan.segments.len();
    report.entries = scan.points.len();
    Ok(Recovered {
        segments: scan.segments,
        points: scan.points,
        next_segment_no: nos.last().map_or(1, |n| n + 1),
        report,
    })
}

/// The sealed segments of the undo log in `dir` and the id of the key each is
/// wrapped under, oldest first, read from their headers alone (no lock, no
/// repair: a running ferryd may hold the log). What `ferryctl key retire` checks.
pub fn undo_segment_key_ids(
    dir: &Path,
) -> Result<Vec<(PathBuf, ferry_gm::atrest::KeyId)>, UndoError> {
    let mut nos = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(UndoError::io(format!("list {}", dir.display()), e)),
    };
    for ent in rd {
        let ent = ent.map_err(|e| UndoError::io(format!("list {}", dir.display()), e))?;
        if let Some(no) = ent.file_name().to_str().and_then(parse_undo_segment_name) {
            nos.push(no);
        }
    }
    nos.sort_unstable();
    let mut out = Vec::new();
    for no in nos {
        let path = dir.join(undo_segment_file_name(no));
        let file = match File::open(&path) {
            Ok(f) => f,
            // Released by retention since the listing.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(UndoError::io(format!("open {}", path.display()), e)),
        };
        let mut hb = [0u8; UNDO_SEALED_SEGMENT_HEADER_LEN];
        let len = file
            .metadata()
            .map_err(|e| UndoError::io(format!("stat {}", path.display()), e))?
            .len();
        let n = (len as usize).min(hb.len());
        read_at(&file, &path, &mut hb[..n], 0)?;
        let corrupt = |e| UndoError::corrupt(&path, 0, format!("segment header: {e}"));
        decode_undo_segment_header(&hb[..n], no).map_err(corrupt)?;
        if let Some(k) = decode_undo_segment_key(&hb[..n], no).map_err(corrupt)? {
            out.push((path, k.key_id));
        }
    }
    Ok(out)
}

/// Segment numbers in `dir`, sorted; deletes leftover `.undo.tmp` files (segment
/// creations a crash interrupted before their rename) on the way.
fn list_segments(dir: &Path, report: &mut UndoRecovery) -> Result<Vec<u64>, UndoError> {
    let mut nos = Vec::new();
    let rd = fs::read_dir(dir).map_err(|e| UndoError::io(format!("list {}", dir.display()), e))?;
    for ent in rd {
        let ent = ent.map_err(|e| UndoError::io(format!("list {}", dir.display()), e))?;
        let name = ent.file_name();
        let Some(name) = name.to_str() else { continue };
        if name.ends_with(UNDO_TMP_SUFFIX) {
            let p = ent.path();
            fs::remove_file(&p).map_err(|e| UndoError::io(format!("remove {}", p.display()), e))?;
            report.removed_tmp.push(p);
        } else if let Some(no) = parse_undo_segment_name(name) {
            nos.push(no);
        }
    }
    if !report.removed_tmp.is_empty() {
        sync_dir(dir)?;
    }
    nos.sort_unstable();
    Ok(nos)
}

/// Segments and points recovered so far (the checks of a segment look at the
/// previous one's end).
struct Scan<'k> {
    cluster_id: [u8; 16],
    kek: Option<&'k Kek>,
    segments: Vec<Segment>,
    points: Vec<UndoPoint>,
}

/// The segment being scanned.
struct SegFile<'a> {
    no: u64,
    path: &'a Path,
    file: &'a File,
    header: UndoSegmentHeader,
    /// A sealed segment's data key.
    key: Option<Arc<DataKey>>,
    /// File length (shrinks if a torn tail is cut).
    len: u64,
    /// The log's last segment: the only one whose end may be torn.
    last: bool,
}

/// What lies at an entry offset.
enum Found {
    /// A valid entry; the next one starts at `end`.
    Entry { point: UndoPoint, end: u64 },
    /// A torn append (why), provided nothing valid follows it.
    Torn(String),
}

impl Scan<'_> {
    /// Validates segment `no` entry by entry and indexes its entries.
    fn segment(
        &mut self,
        no: u64,
        path: PathBuf,
        last: bool,
        report: &mut UndoRecovery,
    ) -> Result<(), UndoError> {
        let file = open_existing(&path)?;
        let (header, key, len) = self.segment_header(no, &path, &file)?;
        if let Some(prev) = self.segments.last().filter(|s| s.entries == 0) {
            return Err(UndoError::corrupt(
                &prev.path,
                UNDO_SEGMENT_HEADER_LEN as u64,
                "segment holds no entries but is not the last",
            ));
        }
        let mut seg = SegFile {
            no,
            path: &path,
            file: &file,
            header,
            key: key.clone(),
            len,
            last,
        };
        let first_point = self.points.len();
        let mut entries = 0usize;
        let mut pos = header.first_entry_offset();
        while pos < seg.len {
            match self.entry_at(&seg, pos, entries)? {
                Found::Entry { point, end } => {
                    self.points.push(point);
                    entries += 1;
                    pos = end;
                }
                Found::Torn(reason) => {
                    cut_torn_tail(&seg, pos, &reason, report)?;
                    seg.len = pos;
                }
            }
        }
        let len = seg.len;
        self.segments.push(Segment {
            no,
            path,
            file,
            direct: None,
            aligned: header.aligned,
            len,
            first_point,
            entries,
            key,
            // Recovered segments are never appended to when sealed (see `seal`).
            appendable: false,
        });
        Ok(())
    }

    /// Reads and checks segment `no`'s header; returns it, a sealed segment's data
    /// key (unwrapped with the configured ring) and the file length.
    #[allow(clippy::type_complexity)]
    fn segment_header(
        &self,
        no: u64,
        path: &Path,
        file: &File,
    ) -> Result<(UndoSegmentHeader, Option<Arc<DataKey>>, u64), UndoError> {
        let len = file
            .metadata()
            .map_err(|e| UndoError::io(format!("stat {}", path.display()), e))?
            .len();
        if len < UNDO_SEGMENT_HEADER_LEN as u64 {
            return Err(UndoError::corrupt(
                path,
                0,
                format!("file of {len} bytes is shorter than a segment header"),
            ));
        }
        // Below: `len` may not cover a whole header block (aligned segments are only
        // ever renamed into place complete, so that is corruption, caught next).
        let mut hb = [0u8; UNDO_SEALED_SEGMENT_HEADER_LEN];
        let n = (len as usize).min(hb.len());
        read_at(file, path, &mut hb[..n], 0)?;
        let corrupt = |e| UndoError::corrupt(path, 0, format!("segment header: {e}"));
        let sh = decode_undo_segment_header(&hb[..n], no).map_err(corrupt)?;
        if sh.cluster_id != self.cluster_id {
            return Err(UndoError::ClusterMismatch {
                file: path.to_path_buf(),
                expected: self.cluster_id,
                found: sh.cluster_id,
            });
        }
        if len < sh.first_entry_offset() {
            return Err(UndoError::corrupt(
                path,
                0,
                format!("file of {len} bytes is shorter than its header block"),
            ));
        }
        let key = match decode_undo_segment_key(&hb[..n], no).map_err(corrupt)? {
            Some(k) => Some(Arc::new(seal::unwrap_segment_key(path, &sh, &k, self.kek)?)),
            None => None,
        };
        Ok((sh, key, len))
    }

    /// What lies at `pos` of `seg`, which already holds `entries` valid entries.
    fn entry_at(&self, seg: &SegFile, pos: u64, entries: usize) -> Result<Found, UndoError> {
        let mut eb = [0u8; UNDO_ENTRY_HEADER_LEN];
        let avail = (seg.len - pos).min(UNDO_ENTRY_HEADER_LEN as u64) as usize;
        read_at(seg.file, seg.path, &mut eb[..avail], pos)?;
        let h = match decode_undo_entry_header(&eb[..avail], seg.no) {
            Ok(h) => h,
            Err(e) if e.is_checksummed() => {
                return Err(UndoError::corrupt(
                    seg.path,
                    pos,
                    format!("entry header: {e}"),
                ));
            }
            Err(e) => {
                let torn_reason = format!("entry header: {e}");
                // A bad header is a torn tail only if nothing valid follows it.
                if let Some(q) = find_valid_header(seg.file, seg.path, seg.no, pos + 1, seg.len)? {
                    return Err(UndoError::corrupt(
                        seg.path,
                        pos,
                        format!("{torn_reason}; a valid entry follows at offset {q}"),
                    ));
                }
                return Ok(Found::Torn(torn_reason));
            }
        };
        if h.sealed != seg.key.is_some() {
            return Err(UndoError::corrupt(
                seg.path,
                pos,
                "entry sealed flag does not match its segment's encryption",
            ));
        }
        self.check_contiguous(seg, pos, entries, &h)?;
        // The next entry's offset; an aligned entry's padding is part of its write,
        // so a file ending inside it holds a torn append.
        let end = pad_to(pos + h.total_len(), seg.header.aligned);
        if end > seg.len {
            return Ok(Found::Torn(format!(
                "entry of {} bytes ({} with padding) extends past end of file ({})",
                h.total_len(),
                end - pos,
                seg.len
            )));
        }
        if seg.last && end == seg.len {
            // The last entry of the log: its body may be torn. The checksum covers
            // what is stored (a sealed body's tags and ciphertext): no key needed.
            let mut body = vec![0u8; h.stored_body_len() as usize];
            read_at(
                seg.file,
                seg.path,
                &mut body,
                pos + UNDO_ENTRY_HEADER_LEN as u64,
            )?;
            let computed = salted_crc(seg.no, &body);
            if computed != h.body_crc {
                return Ok(Found::Torn(format!(
                    "last entry body crc mismatch (stored {:#010x}, computed {computed:#010x})",
                    h.body_crc
                )));
            }
        }
        let point = UndoPoint {
            seq: h.last_seq,
            first_seq: h.first_seq,
            timestamp_ns: h.timestamp_ns,
            position: UndoPosition {
                segment_no: seg.no,
                offset: pos,
                len: h.total_len(),
            },
            kind: h.kind,
        };
        Ok(Found::Entry { point, end })
    }

    /// Entry `h` at `pos` must continue the sequence: the segment header's
    /// `first_seq` for its first entry, else the previous entry's `last_seq + 1`;
    /// and a segment's first entry continues the previous segment.
    fn check_contiguous(
        &self,
        seg: &SegFile,
        pos: u64,
        entries: usize,
        h: &UndoEntryHeader,
    ) -> Result<(), UndoError> {
        let expect = if entries == 0 {
            Some(seg.header.first_seq)
        } else {
            self.points.last().map(|p| p.seq + 1)
        };
        if let Some(x) = expect.filter(|&x| x != h.first_seq) {
            return Err(UndoError::corrupt(
                seg.path,
                pos,
                format!("entry first_seq {} expected {x}", h.first_seq),
            ));
        }
        if entries == 0 {
            if let Some(p) = self.points.last().filter(|p| p.seq + 1 != h.first_seq) {
                return Err(UndoError::corrupt(
                    seg.path,
                    pos,
                    format!(
                        "segment starts at seq {}, previous segment ends at {}",
                        h.first_seq, p.seq
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Cuts the torn tail of `seg` at `pos` (truncate + fsync), or refuses if `seg` is
/// not the log's last segment (only the last append can be torn).
fn cut_torn_tail(
    seg: &SegFile,
    pos: u64,
    reason: &str,
    report: &mut UndoRecovery,
) -> Result<(), UndoError> {
    if !seg.last {
        return Err(UndoError::corrupt(
            seg.path,
            pos,
            format!("{reason} (not the last segment: cannot be torn)"),
        ));
    }
    let cut = seg.len - pos;
    tracing::warn!(file = %seg.path.display(), offset = pos, bytes = cut, reason = %reason, "undo: truncating torn last entry");
    seg.file
        .set_len(pos)
        .and_then(|()| seg.file.sync_all())
        .map_err(|e| UndoError::io(format!("truncate {} to {pos}", seg.path.display()), e))?;
    report.truncated = Some((seg.path.to_path_buf(), pos, cut));
    Ok(())
}

/// Looks for any entry header valid under segment `no`'s salt in `[from, len)`.
fn find_valid_header(
    file: &File,
    path: &Path,
    no: u64,
    from: u64,
    len: u64,
) -> Result<Option<u64>, UndoError> {
    const CHUNK: u64 = 1 << 20;
    let mut start = from;
    while start + (UNDO_ENTRY_HEADER_LEN as u64) <= len {
        let end = (start + CHUNK + UNDO_ENTRY_HEADER_LEN as u64).min(len);
        let mut buf = vec![0u8; (end - start) as usize];
        read_at(file, path, &mut buf, start)?;
        for i in 0..=buf.len() - UNDO_ENTRY_HEADER_LEN {
            // A CRC-valid header counts even if a field is invalid: it was written,
            // not torn.
            if buf[i..i + 4] == UNDO_ENTRY_MAGIC
                && match decode_undo_entry_header(&buf[i..], no) {
                    Ok(_) => true,
                    Err(e) => e.is_checksummed(),
                }
            {
                return Ok(Some(start + i as u64));
            }
        }
        start = end - UNDO_ENTRY_HEADER_LEN as u64 + 1;
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::FileExt;

    use bytes::Bytes;

    use super::*;
    use crate::undo::entry::{EntryKind, UndoEntry, UndoExtent};
    use crate::undo::format::{encode_undo_entry, encode_undo_segment_header, UNDO_ALIGN};
    use crate::undo::segment::create_durably;

    const CLUSTER: [u8; 16] = [5; 16];

    fn entry_bytes(no: u64) -> Vec<u8> {
        let e = UndoEntry {
            first_seq: 1,
            last_seq: 1,
            timestamp_ns: 0,
            extents: vec![UndoExtent::data(0, 0, Bytes::from_static(b"z"))],
            kind: EntryKind::WriteSet,
        };
        encode_undo_entry(&e, no).unwrap()
    }

    #[test]
    fn valid_header_found_behind_garbage_and_across_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scan");
        let f = File::create_new(&path).unwrap();
        // Garbage with the entry magic but no valid checksum.
        let mut garbage = vec![0xA5u8; 3 << 20];
        garbage[100..104].copy_from_slice(&UNDO_ENTRY_MAGIC);
        f.write_all_at(&garbage, 0).unwrap();
        let len = garbage.len() as u64;
        assert_eq!(find_valid_header(&f, &path, 7, 1, len).unwrap(), None);
        // A header past the first 1 MiB chunk is found; one valid only under
        // another segment's salt is not.
        let at = (1 << 20) + 10;
        f.write_all_at(&entry_bytes(8), at).unwrap();
        assert_eq!(find_valid_header(&f, &path, 7, 1, len).unwrap(), None);
        f.write_all_at(&entry_bytes(7), at).unwrap();
        assert_eq!(find_valid_header(&f, &path, 7, 1, len).unwrap(), Some(at));
        assert_eq!(find_valid_header(&f, &path, 7, at + 1, len).unwrap(), None);
    }

    #[test]
    fn empty_last_segment_deleted_but_its_number_not_reused() {
        let dir = tempfile::tempdir().unwrap();
        let mut image = vec![0u8; UNDO_ALIGN as usize];
        let hdr = encode_undo_segment_header(&UndoSegmentHeader {
            segment_no: 4,
            cluster_id: CLUSTER,
            first_seq: 1,
            aligned: true,
        });
        image[..hdr.len()].copy_from_slice(&hdr);
        create_durably(dir.path(), 4, &image).unwrap();
        let r = recover(dir.path(), CLUSTER, None).unwrap();
        assert!(r.segments.is_empty() && r.points.is_empty());
        assert_eq!(r.next_segment_no, 5);
        assert_eq!(
            r.report.removed_empty,
            Some(dir.path().join(undo_segment_file_name(4)))
        );
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        // Another cluster's segment is refused, not recovered.
        create_durably(dir.path(), 4, &image).unwrap();
        assert!(matches!(
            recover(dir.path(), [6; 16], None),
            Err(UndoError::ClusterMismatch { .. })
        ));
    }
}
