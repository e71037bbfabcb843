//! Recovery on open: scan every segment, validate every batch, truncate a torn tail
//! (at most as many batches as the last segment's header says were in flight),
//! refuse on corruption.
//!
//! Decision table (see FORMAT.md for the crash analysis behind it):
//!
//! | what is found at the end position P of the log      | later valid batch? | result                       |
//! |------------------------------------------------------|--------------------|------------------------------|
//! | all-zero block / segment end                          | no                 | clean end                    |
//! | stale batch (valid under an older segment number)     | no                 | clean end (recycled segment) |
//! | bad header CRC / magic / fields                       | no                 | torn tail: zero P..P+4K      |
//! | valid header, bad body CRC or bad records             | no                 | torn tail: zero the batch    |
//! | zero / invalid (not stale), depth N >= 2 recorded     | <= N-1, contiguous seqs, nothing valid after | torn tail: zero P..end of the last one, WARN "discarded" |
//! | any of the above                                      | yes (otherwise)    | `Corruption`                 |
//! | torn tail in a segment that is not the last one       | -                  | `Corruption`                 |
//! | first_seq != previous last_seq + 1 (batch or segment) | -                  | `Corruption` (gap/overlap)   |
//! | segment first_seq > previous last_seq + 1, header flag `SEQ_JUMP` | -        | gap accepted (skipped seqs)  |
//! | bad segment header right after the last data segment | no (nothing valid in the file) | torn activation: wiped, kept as spare |
//! | bad segment header right after the last data segment | yes (a whole valid batch) | `Corruption` (file, offset 0, the batch's offset) |
//! | torn tail and `RecoveryMode::AbsoluteConsistency`     | -                  | `TornTail` error             |
//! | encrypted batch: body CRC right, SM4-GCM tag wrong    | -                  | `Corruption` (altered, never torn) |
//! | encrypted segment, no key / another key id            | -                  | `KeyRequired` / `WrongKey`, before any repair |

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_gm::atrest::{DataKey, Kek};

use bytes::Bytes;

use crate::error::{JournalError, Result};
use crate::format::{self, FormatError, Seq, BLOCK_SIZE, SEGMENT_HEADER_BLOCK};
use crate::segment;

/// How to treat a torn tail found on open. With the `serde` feature it is spelled
/// `tolerate-torn-tail`, `absolute-consistency` (ferryd's `journal.recovery`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(
    feature = "serde",
    derive(serde::Serialize, serde::Deserialize),
    serde(rename_all = "kebab-case")
)]
pub enum RecoveryMode {
    /// Truncate (and zero) a torn last batch: it was never acknowledged.
    #[default]
    TolerateTornTail,
    /// Any torn tail is an error (for callers who never expect a crash mid-write).
    AbsoluteConsistency,
}

/// What recovery found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// First sequence present (0 if the journal holds no records).
    pub first_seq: Seq,
    /// Last durable sequence (0 if none was ever written).
    pub last_seq: Seq,
    pub truncated_bytes: u64,
    pub truncated_batches: u32,
    /// Segments holding data (including the active one).
    pub segments: usize,
    /// Prepared, unused segments found.
    pub spare_segments: usize,
    /// Leftover `.seg.tmp` files (interrupted preparation/recycle) removed.
    pub removed_temp_files: usize,
    /// Human-readable list of the actions taken (truncations, removals).
    pub events: Vec<String>,
}

#[derive(Debug, Clone)]
pub(crate) struct SegInfo {
    pub no: u64,
    pub path: PathBuf,
    pub first_seq: Seq,
    pub size: u64,
    /// The segment's data key, unwrapped on open or at activation (None: plaintext).
    pub key: Option<Arc<DataKey>>,
}

#[derive(Debug, Clone)]
pub(crate) struct Spare {
    pub no: u64,
    pub path: PathBuf,
    pub size: u64,
    /// Everything after the header block is known to be zero (fresh file).
    pub zeroed: bool,
}

pub(crate) struct Recovered {
    pub data: Vec<SegInfo>,
    /// Append position and known-zero watermark in the last data segment.
    pub write_pos: u64,
    pub zeroed_from: u64,
    /// `max_inflight` recorded in the last data segment's header (1 if none).
    pub active_depth: usize,
    pub spares: Vec<Spare>,
    pub next_no: u64,
    pub report: RecoveryReport,
    /// Sequence ranges skipped in front of `SEQ_JUMP` segments (inclusive).
    pub gaps: Vec<(Seq, Seq)>,
}

enum Kind {
    /// A valid header, and the data key of an encrypted segment.
    Data(format::SegmentHeader, Option<Arc<DataKey>>),
    Unused,
    BadHeader(String),
}

struct SegFile {
    no: u64,
    path: PathBuf,
    size: u64,
    kind: Kind,
}

/// How the batch chain of one segment ended.
enum End {
    /// Zero block, stale batch or the end of the file.
    Clean,
    /// Invalid batch at `pos` spanning `len` bytes (4 KiB if the header is bad);
    /// with pipelining, `len` also covers up to N-1 valid batches written after it
    /// (`discarded`: batch count and seq range of the whole torn span).
    Torn {
        len: u64,
        reason: String,
        discarded: Option<(u64, Seq, Seq)>,
    },
}

struct ScanResult {
    next_seq: Seq,
    batches: u64,
    end_pos: u64,
    end: End,
    /// Smallest offset from which the rest of the file is zero (after truncation).
    zeroed_from: u64,
}

fn corruption(path: &Path, offset: u64, reason: impl Into<String>) -> JournalError {
    JournalError::Corruption {
        segment: path.to_path_buf(),
        offset,
        reason: reason.into(),
    }
}

/// Recovers the journal in `dir`. `kek`: the configured key-encryption key; every
/// encrypted segment's key is checked and unwrapped (in `classify`, before anything
/// is repaired), so a missing or wrong key refuses to open with the file untouched.
pub(crate) fn recover(
    dir: &Path,
    cluster_id: [u8; 16],
    mode: RecoveryMode,
    kek: Option<&Kek>,
) -> Result<Recovered> {
    std::fs::create_dir_all(dir)
        .map_err(|e| JournalError::io(format!("create {}", dir.display()), e))?;
    let mut report = RecoveryReport::default();
    let (segs, max_no) = list_segments(dir, &mut report)?;
    let mut files = Vec::with_capacity(segs.len());
    for (no, path) in segs {
        files.push(classify(no, path, &cluster_id, kek)?);
    }

    let last_data = files.iter().rposition(|f| matches!(f.kind, Kind::Data(..)));
    let mut chain = Chain {
        rec: Recovered {
            data: Vec::new(),
            write_pos: SEGMENT_HEADER_BLOCK,
            zeroed_from: SEGMENT_HEADER_BLOCK,
            active_depth: 1,
            spares: Vec::new(),
            next_no: max_no + 1,
            report,
            gaps: Vec::new(),
        },
        expected: None,
        cluster_id,
        mode,
    };
    for (i, f) in files.iter().enumerate() {
        let is_last_data = Some(i) == last_data;
        match (&f.kind, last_data) {
            (Kind::Data(h, key), Some(_)) => chain.data_segment(f, h, key, is_last_data)?,
            (Kind::Unused, Some(ld)) if i < ld => {
                return Err(corruption(
                    &f.path,
                    0,
                    "segment header is all zero, but later segments hold data",
                ));
            }
            (Kind::BadHeader(r), Some(ld)) if i < ld => {
                return Err(corruption(
                    &f.path,
                    0,
                    format!("bad segment header ({r}), but later segments hold data"),
                ));
            }
            (Kind::Unused, _) => chain.rec.spares.push(Spare {
                no: f.no,
                path: f.path.clone(),
                size: f.size,
                zeroed: false,
            }),
            (Kind::BadHeader(r), _) => chain.torn_activation(f, r)?,
            // Cannot happen (a data segment makes last_data Some); an error, not a panic.
            (Kind::Data(..), None) => {
                return Err(corruption(
                    &f.path,
                    0,
                    "internal: data segment without last_data",
                ))
            }
        }
    }
    Ok(chain.finish())
}

/// Segment files in `dir` (number order) and the highest segment number seen;
/// removes leftover temporary files (interrupted preparations or recycles).
fn list_segments(dir: &Path, report: &mut RecoveryReport) -> Result<(Vec<(u64, PathBuf)>, u64)> {
    let mut segs = Vec::new();
    let mut max_no = 0u64;
    for (name, path) in segment::list_dir(dir)
        .map_err(|e| JournalError::io(format!("list {}", dir.display()), e))?
    {
        if name.ends_with(segment::TMP_SUFFIX) {
            // An interrupted preparation or recycle: never part of the log.
            std::fs::remove_file(&path)
                .map_err(|e| JournalError::io(format!("remove {}", path.display()), e))?;
            report.removed_temp_files += 1;
            report.events.push(format!(
                "removed interrupted temporary file {}",
                path.display()
            ));
        } else if let Some(no) = segment::parse_segment_name(&name) {
            max_no = max_no.max(no);
            segs.push((no, path));
        }
    }
    if report.removed_temp_files > 0 {
        segment::sync_dir(dir)?;
    }
    segs.sort();
    Ok((segs, max_no))
}

/// The log recovered so far, segment by segment in number order.
struct Chain {
    rec: Recovered,
    /// First sequence the next data segment must start at (none before the first).
    expected: Option<Seq>,
    cluster_id: [u8; 16],
    mode: RecoveryMode,
}

impl Chain {
    /// Validates data segment `f` (header `h`) batch by batch and appends it;
    /// repairs its torn tail if it is the last data segment.
    fn data_segment(
        &mut self,
        f: &SegFile,
        h: &format::SegmentHeader,
        key: &Option<Arc<DataKey>>,
        is_last_data: bool,
    ) -> Result<()> {
        self.check_continues(f, h)?;
        let file = segment::open_ro(&f.path)?;
        let scan = scan_segment(&file, f, h, &self.cluster_id, key.as_deref())?;
        if let End::Torn {
            len,
            reason,
            discarded,
        } = &scan.end
        {
            if !is_last_data {
                return Err(corruption(
                    &f.path,
                    scan.end_pos,
                    format!("{reason}, but later segments hold data"),
                ));
            }
            self.cut_torn_tail(f, h, scan.end_pos, *len, reason, discarded)?;
        }
        self.expected = Some(scan.next_seq);
        self.rec.write_pos = scan.end_pos;
        self.rec.zeroed_from = scan.zeroed_from;
        self.rec.active_depth = h.max_inflight.max(1) as usize;
        self.rec.data.push(SegInfo {
            no: f.no,
            path: f.path.clone(),
            first_seq: h.first_seq,
            size: f.size,
            key: key.clone(),
        });
        let _ = scan.batches;
        Ok(())
    }

    /// Data segment `f` must directly follow the previous one, in number and in
    /// sequence (or jump ahead on purpose: `SEQ_JUMP`, recorded as a gap).
    fn check_continues(&mut self, f: &SegFile, h: &format::SegmentHeader) -> Result<()> {
        if let Some(prev) = self.rec.data.last().map(|d| d.no) {
            if f.no != prev + 1 {
                return Err(corruption(
                    &f.path,
                    0,
                    format!("segment {} follows segment {prev}: segment missing", f.no),
                ));
            }
        }
        if let Some(exp) = self.expected {
            // A deliberate jump (Journal::skip_to) may leave a gap, never an
            // overlap; any other mismatch is corruption.
            if h.seq_jump && h.first_seq > exp {
                self.rec.gaps.push((exp, h.first_seq - 1));
                self.rec.report.events.push(format!(
                    "sequences {exp}..={} were skipped (segment {} jumps)",
                    h.first_seq - 1,
                    f.path.display()
                ));
            } else if h.first_seq != exp {
                return Err(corruption(
                    &f.path,
                    0,
                    format!(
                    "segment starts at seq {}, previous segment ended at {} (sequence gap/overlap)",
                    h.first_seq, exp - 1
                ),
                ));
            }
        }
        Ok(())
    }

    /// Zeroes the torn tail `at..at + len` of the last data segment (or refuses
    /// in `AbsoluteConsistency` mode) and reports it.
    fn cut_torn_tail(
        &mut self,
        f: &SegFile,
        h: &format::SegmentHeader,
        at: u64,
        len: u64,
        reason: &str,
        discarded: &Option<(u64, Seq, Seq)>,
    ) -> Result<()> {
        if self.mode == RecoveryMode::AbsoluteConsistency {
            return Err(JournalError::TornTail {
                segment: f.path.clone(),
                offset: at,
                reason: reason.to_string(),
            });
        }
        segment::zero_range(&f.path, at, at + len)?;
        let report = &mut self.rec.report;
        report.truncated_bytes += len;
        match discarded {
            None => {
                report.truncated_batches += 1;
                report.events.push(format!(
                    "truncated torn batch in {} at offset {at} ({len} bytes): {reason}",
                    f.path.display(),
                ));
                tracing::warn!(segment = %f.path.display(), offset = at, %reason, "journal recovery: truncated torn tail");
            }
            Some((n, a, b)) => {
                report.truncated_batches += *n as u32;
                let msg = format!(
                    "discarded {n} batches, seqs {a}..{b}, written but never acknowledged: torn tail in {} at offset {at} ({len} bytes, max_inflight {}): {reason}",
                    f.path.display(),
                    h.max_inflight
                );
                tracing::warn!(segment = %f.path.display(), offset = at, "journal recovery: {msg}");
                report.events.push(msg);
            }
        }
        Ok(())
    }

    /// A segment with a bad header after the last data segment: only the one right
    /// after it can have been activated (header + first batch in one write) when
    /// the crash hit; that one is wiped and kept as a spare, provided nothing valid
    /// follows its header (otherwise the header was damaged, not torn: `Corruption`).
    fn torn_activation(&mut self, f: &SegFile, r: &str) -> Result<()> {
        let next_expected_no = self.rec.data.last().map(|d| d.no + 1);
        let first_after = next_expected_no.map_or(self.rec.spares.is_empty(), |n| n == f.no);
        if !first_after {
            return Err(corruption(
                &f.path,
                0,
                format!("bad segment header ({r}) in a spare segment"),
            ));
        }
        // The activation write (header + first batch) is the first write to the
        // file, and nothing else is submitted until it is durable: a complete batch
        // valid under this segment's salt means that write (or a later one) was
        // acknowledged, so the header was damaged after the fact. Wiping it would
        // drop acknowledged records: refuse instead.
        if let Some((at, h)) = first_valid_batch(f, &self.cluster_id)? {
            return Err(corruption(
                &f.path,
                0,
                format!(
                    "bad segment header ({r}), but a valid batch (seq {}..={}) at offset {at} \
                     follows it: the header was damaged after acknowledged writes, not torn \
                     by its activation; refusing to open rather than discard them",
                    h.first_seq, h.last_seq
                ),
            ));
        }
        if self.mode == RecoveryMode::AbsoluteConsistency {
            return Err(JournalError::TornTail {
                segment: f.path.clone(),
                offset: 0,
                reason: format!("torn segment activation: {r}"),
            });
        }
        // The activation write carried the first batch too: wipe the header
        // and the block after it, and keep the file as a spare.
        segment::zero_range(&f.path, 0, 2 * SEGMENT_HEADER_BLOCK)?;
        let report = &mut self.rec.report;
        report.truncated_bytes += 2 * SEGMENT_HEADER_BLOCK;
        report.truncated_batches += 1;
        report.events.push(format!(
            "torn segment activation in {}: {r}; kept as spare",
            f.path.display()
        ));
        self.rec.spares.push(Spare {
            no: f.no,
            path: f.path.clone(),
            size: f.size,
            zeroed: false,
        });
        Ok(())
    }

    /// The recovered log with its report's totals filled in.
    fn finish(self) -> Recovered {
        let mut rec = self.rec;
        let last_seq = self.expected.map_or(0, |e| e - 1);
        rec.report.last_seq = last_seq;
        rec.report.first_seq = match rec.data.first() {
            Some(d) if d.first_seq <= last_seq => d.first_seq,
            _ => 0,
        };
        rec.report.segments = rec.data.len();
        rec.report.spare_segments = rec.spares.len();
        rec
    }
}

fn classify(no: u64, path: PathBuf, cluster_id: &[u8; 16], kek: Option<&Kek>) -> Result<SegFile> {
    let file = segment::open_ro(&path)?;
    let size = segment::file_len(&file, &path)?;
    if size < 2 * SEGMENT_HEADER_BLOCK || !format::is_block_aligned(size) {
        return Err(corruption(
            &path,
            0,
            format!("segment file size {size} is not a multiple of 4 KiB >= 8 KiB"),
        ));
    }
    let mut block = vec![0u8; BLOCK_SIZE];
    segment::read_exact_at(&file, &path, &mut block, 0)?;
    let kind = match format::decode_segment_header_any(&block, no) {
        Ok((h, key_info)) => {
            if h.cluster_id != *cluster_id {
                return Err(JournalError::ClusterMismatch {
                    segment: path,
                    expected: *cluster_id,
                    found: h.cluster_id,
                });
            }
            if h.segment_size != size {
                return Err(corruption(
                    &path,
                    0,
                    format!("header says {} bytes, file has {size}", h.segment_size),
                ));
            }
            let len = format::segment_header_len(key_info.is_some());
            if !format::is_zero(&block[len..]) {
                return Err(corruption(
                    &path,
                    len as u64,
                    "segment header block padding not zero",
                ));
            }
            let key = match key_info {
                Some(info) => Some(Arc::new(segment_key(&path, &h, &info, kek)?)),
                None => None,
            };
            Kind::Data(h, key)
        }
        Err(FormatError::Zero) if format::is_zero(&block) => Kind::Unused,
        // The checksum verified, so this header was written on purpose, not torn: a
        // newer format or a damaged field. Discarding it could drop acknowledged data.
        Err(e @ (FormatError::UnsupportedVersion(_) | FormatError::Invalid(_))) => {
            return Err(corruption(
                &path,
                0,
                format!(
                    "segment header has a valid checksum but {e}: written by another ferry \
                     version or damaged; refusing to open rather than discard it"
                ),
            ));
        }
        Err(e) => Kind::BadHeader(e.to_string()),
    };
    Ok(SegFile {
        no,
        path,
        size,
        kind,
    })
}

/// The data key of encrypted segment `h` (key part `info`), unwrapped with the key
/// of `kek`'s ring that the header names (an older key after a rotation, or the
/// current one). The key id is looked up first so a wrong key is named as such; a
/// matching id
/// whose wrap does not authenticate means the header was altered.
fn segment_key(
    path: &Path,
    h: &format::SegmentHeader,
    info: &format::SegmentKeyInfo,
    kek: Option<&Kek>,
) -> Result<DataKey> {
    let Some(kek) = kek else {
        return Err(JournalError::KeyRequired {
            segment: path.to_path_buf(),
            key_id: info.key_id,
        });
    };
    let Some(kek) = kek.for_id(info.key_id) else {
        return Err(JournalError::WrongKey {
            segment: path.to_path_buf(),
            found: info.key_id,
            configured: kek.id(),
        });
    };
    kek.unwrap(&info.wrapped, &format::segment_key_aad(h, info.key_id))
        .map_err(|e| {
            corruption(
                path,
                format::SEGMENT_HEADER_LEN as u64,
                format!(
                    "the wrapped data key (key id {}) does not unwrap under the configured key                      ({e}): the segment header was altered",
                    info.key_id
                ),
            )
        })
}

const SCAN_CHUNK: usize = 1 << 20;

/// The first complete batch (header and body) valid under segment `f`'s salt and
/// `cluster_id`, anywhere after its header block: evidence that the segment held
/// acknowledged data. Reads the file in `SCAN_CHUNK`s (bounded memory).
fn first_valid_batch(
    f: &SegFile,
    cluster_id: &[u8; 16],
) -> Result<Option<(u64, format::BatchHeader)>> {
    let file = segment::open_ro(&f.path)?;
    let mut chunk = vec![0u8; SCAN_CHUNK];
    let mut off = SEGMENT_HEADER_BLOCK;
    while off < f.size {
        let n = ((f.size - off) as usize).min(SCAN_CHUNK);
        segment::read_exact_at(&file, &f.path, &mut chunk[..n], off)?;
        for (i, blk) in chunk[..n].chunks(BLOCK_SIZE).enumerate() {
            let at = off + (i * BLOCK_SIZE) as u64;
            let Ok(h) = format::decode_batch_header(blk, f.no) else {
                continue;
            };
            if h.cluster_id != *cluster_id || at + h.disk_len() > f.size {
                continue;
            }
            // Header and body: a torn first batch may have its header block only.
            let mut buf = vec![0u8; h.disk_len() as usize];
            segment::read_exact_at(&file, &f.path, &mut buf, at)?;
            let body = Bytes::from(buf)
                .slice(format::BATCH_HEADER_LEN..format::BATCH_HEADER_LEN + h.body_len as usize);
            // The header is bad, so an encrypted segment's data key is unknown: the
            // CRC over the ciphertext is the evidence that the batch was written whole.
            let whole = if h.encrypted {
                format::check_body_crc(&h, &body).is_ok()
            } else {
                format::decode_batch_body(&h, &body).is_ok()
            };
            if whole {
                return Ok(Some((at, h)));
            }
        }
        off += n as u64;
    }
    Ok(None)
}

/// Follows the batch chain of one segment from its first batch.
fn scan_segment(
    file: &File,
    f: &SegFile,
    sh: &format::SegmentHeader,
    cluster_id: &[u8; 16],
    key: Option<&DataKey>,
) -> Result<ScanResult> {
    let (path, no, size, max_inflight) = (&f.path, f.no, f.size, sh.max_inflight);
    let walk = walk_batches(file, f, sh.first_seq, cluster_id, key)?;
    let Walk {
        pos,
        expected,
        batches,
        stale_at_end,
        ..
    } = walk;
    // Look past the end: a batch that validates under this segment's salt after
    // the end means an earlier write was lost or damaged, not torn -- unless the
    // writer had several batch writes in flight (see `tail_span`).
    let (found, last_nonzero_end) = look_past_end(file, path, no, size, &walk, max_inflight)?;
    let mut end = walk.end;
    let mut zeroed_from = last_nonzero_end.max(pos);
    if let Some(&(at, h)) = found.first() {
        match tail_span(stale_at_end, pos, expected, size, max_inflight, &found) {
            Some((span_end, n, last)) => {
                let reason = match &end {
                    End::Clean => "all-zero block (write never landed)".to_string(),
                    End::Torn { reason, .. } => reason.clone(),
                };
                end = End::Torn {
                    len: span_end - pos,
                    reason: format!(
                        "{reason}, followed by {} valid batch(es) up to seq {last} written while it was in flight",
                        found.len()
                    ),
                    discarded: Some((n, expected, last)),
                };
                if last_nonzero_end <= span_end {
                    zeroed_from = pos;
                }
            }
            None => {
                let what = match &end {
                    End::Clean => "the end of the log".to_string(),
                    End::Torn { reason, .. } => format!("an invalid batch ({reason})"),
                };
                return Err(corruption(
                    path,
                    at,
                    format!(
                        "valid batch (seq {}..={}) found after {what} at offset {pos} (max_inflight {max_inflight})",
                        h.first_seq, h.last_seq
                    ),
                ));
            }
        }
    }
    Ok(ScanResult {
        next_seq: expected,
        batches,
        end_pos: pos,
        end,
        zeroed_from,
    })
}

/// Where the chain of valid batches from a segment's start ends.
struct Walk {
    /// Offset of the first position that is not a valid next batch.
    pos: u64,
    /// Sequence the next batch would start at.
    expected: Seq,
    batches: u64,
    end: End,
    /// Bytes of the invalid batch at `pos` (0 if none).
    invalid_len: u64,
    /// The chain ended on a stale batch (left over in a recycled segment).
    stale_at_end: bool,
}

/// Walks the valid batches of one segment from its first batch until a zero
/// block, a stale or invalid batch, or the end of the file.
fn walk_batches(
    file: &File,
    f: &SegFile,
    first_seq: Seq,
    cluster_id: &[u8; 16],
    key: Option<&DataKey>,
) -> Result<Walk> {
    let (path, no, size) = (&f.path, f.no, f.size);
    let mut pos = SEGMENT_HEADER_BLOCK;
    let mut expected = first_seq;
    let mut batches = 0u64;
    let mut block = vec![0u8; BLOCK_SIZE];
    // Bounded: pos strictly increases by >= 4 KiB per iteration up to `size`.
    let (end, invalid_len, stale_at_end) = loop {
        if pos + BLOCK_SIZE as u64 > size {
            break (End::Clean, 0, false);
        }
        segment::read_exact_at(file, path, &mut block, pos)?;
        let h = match format::decode_batch_header(&block, no) {
            Err(FormatError::Zero) if format::is_zero(&block) => break (End::Clean, 0, false),
            Err(FormatError::Stale { .. }) => break (End::Clean, 0, true),
            // Valid checksum, unusable content: written on purpose (another format
            // version) or damaged in place — never a torn write. Refuse.
            Err(e @ (FormatError::UnsupportedVersion(_) | FormatError::Invalid(_))) => {
                return Err(corruption(
                    path,
                    pos,
                    format!(
                        "batch header has a valid checksum but {e}: written by another ferry \
                         version or damaged; refusing to open rather than discard it"
                    ),
                ));
            }
            Err(e) => {
                break (
                    End::Torn {
                        len: BLOCK_SIZE as u64,
                        reason: format!("bad batch header: {e}"),
                        discarded: None,
                    },
                    BLOCK_SIZE as u64,
                    false,
                )
            }
            Ok(h) => h,
        };
        let disk = check_batch_header(&h, (path, pos, size), expected, cluster_id, key)?;
        let mut buf = vec![0u8; disk as usize];
        segment::read_exact_at(file, path, &mut buf, pos)?;
        let body = Bytes::from(buf)
            .slice(format::BATCH_HEADER_LEN..format::BATCH_HEADER_LEN + h.body_len as usize);
        match format::decode_batch_body_at(&h, &body, pos, key) {
            Ok(_) => {}
            // The CRC over the ciphertext verified, the tag did not: altered after
            // it was written (a torn write fails the CRC), never truncated.
            Err(e @ (FormatError::Authentication | FormatError::KeyRequired)) => {
                return Err(corruption(
                    path,
                    pos,
                    format!("batch seq {}..={}: {e}", h.first_seq, h.last_seq),
                ));
            }
            Err(e) => {
                break (
                    End::Torn {
                        len: disk,
                        reason: format!(
                            "bad batch body (seq {}..={}): {e}",
                            h.first_seq, h.last_seq
                        ),
                        discarded: None,
                    },
                    disk,
                    false,
                )
            }
        }
        expected = h.last_seq + 1;
        batches += 1;
        pos += disk;
    };
    Ok(Walk {
        pos,
        expected,
        batches,
        end,
        invalid_len,
        stale_at_end,
    })
}

/// The checks of a batch header whose checksum verified, against the segment it is
/// in (`path`, its `size`) at `pos`: cluster, sequence, encryption, length. Any
/// failure is corruption (a checksummed header is never torn). Returns the batch's
/// length on disk.
fn check_batch_header(
    h: &format::BatchHeader,
    (path, pos, size): (&Path, u64, u64),
    expected: Seq,
    cluster_id: &[u8; 16],
    key: Option<&DataKey>,
) -> Result<u64> {
    if h.cluster_id != *cluster_id {
        return Err(corruption(
            path,
            pos,
            format!("batch for cluster {:02x?}", h.cluster_id),
        ));
    }
    if h.first_seq != expected {
        return Err(corruption(
            path,
            pos,
            format!(
                "batch starts at seq {}, expected {expected} (sequence gap/overlap)",
                h.first_seq
            ),
        ));
    }
    if h.encrypted != key.is_some() {
        return Err(corruption(
            path,
            pos,
            format!(
                "batch version {} in a segment of the other version (encrypted: {})",
                if h.encrypted { 2 } else { 1 },
                key.is_some()
            ),
        ));
    }
    let disk = h.disk_len();
    if pos + disk > size {
        return Err(corruption(
            path,
            pos,
            format!("batch of {disk} bytes overruns the segment end {size}"),
        ));
    }
    Ok(disk)
}

/// Valid batch headers (under this segment's salt) after the end of the chain,
/// at most `max_inflight` of them, and the end of the last non-zero block.
fn look_past_end(
    file: &File,
    path: &Path,
    no: u64,
    size: u64,
    walk: &Walk,
    max_inflight: u32,
) -> Result<(Vec<(u64, format::BatchHeader)>, u64)> {
    let (pos, invalid_len, stale_at_end) = (walk.pos, walk.invalid_len, walk.stale_at_end);
    let mut last_nonzero_end = if stale_at_end {
        pos + BLOCK_SIZE as u64
    } else {
        pos
    };
    let mut found: Vec<(u64, format::BatchHeader)> = Vec::new();
    let mut off = pos + invalid_len.max(if stale_at_end { BLOCK_SIZE as u64 } else { 0 });
    let mut chunk = vec![0u8; SCAN_CHUNK];
    while off < size {
        let n = ((size - off) as usize).min(SCAN_CHUNK);
        segment::read_exact_at(file, path, &mut chunk[..n], off)?;
        for (i, blk) in chunk[..n].chunks(BLOCK_SIZE).enumerate() {
            if format::is_zero(blk) {
                continue;
            }
            let at = off + (i * BLOCK_SIZE) as u64;
            last_nonzero_end = at + BLOCK_SIZE as u64;
            if let Ok(h) = format::decode_batch_header(blk, no) {
                // More than N-1 can never be a torn tail: stop collecting.
                if found.len() >= max_inflight as usize {
                    break;
                }
                found.push((at, h));
            }
        }
        if found.len() >= max_inflight.max(1) as usize {
            break;
        }
        off += n as u64;
    }
    Ok((found, last_nonzero_end))
}

/// Whether the valid batches `found` after the end position `pos` can be the
/// unacknowledged rest of a pipelined tail: the writer had up to `max_inflight`
/// writes in flight, so the first invalid (or never-landed, all-zero) batch at
/// `pos` may be followed by at most `max_inflight - 1` valid batches, with
/// contiguous seqs after `expected`, inside the segment, and nothing valid after
/// them (the scan collected every valid header to the end of the segment). A stale
/// block at `pos` cannot start such a tail (pipelining only happens over known-zero
/// space). Returns (end of the span, batches discarded, last seq discarded).
fn tail_span(
    stale_at_end: bool,
    pos: u64,
    expected: Seq,
    size: u64,
    max_inflight: u32,
    found: &[(u64, format::BatchHeader)],
) -> Option<(u64, u64, Seq)> {
    if stale_at_end || found.is_empty() || found.len() >= max_inflight.max(1) as usize {
        return None;
    }
    let mut prev: Option<&format::BatchHeader> = None;
    for (at, h) in found {
        if *at < pos || at + h.disk_len() > size {
            return None;
        }
        match prev {
            None if h.first_seq <= expected => return None,
            Some(p) if h.first_seq != p.last_seq + 1 => return None,
            _ => {}
        }
        prev = Some(h);
    }
    let (at, h) = found.last()?;
    Some((at + h.disk_len(), 1 + found.len() as u64, h.last_seq))
}
