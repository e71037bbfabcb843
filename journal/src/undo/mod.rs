//! Undo log of a standby: before-images of every block range a write-set
//! overwrites, made durable *before* the write-set is applied to the replica, so the
//! replica can be viewed or rolled back to any write-set boundary.
//!
//! See `journal/FORMAT.md`, section "Undo log", for the byte layout, checksums,
//! recovery rules and crash-case table.
//!
//! * A directory of segment files `NNNNNNNNNNNNNNNN.undo` (16-digit, zero padded,
//!   consecutive numbers). Each starts with a 64-byte segment header. In an *aligned*
//!   segment (header flag [`UNDO_SEGMENT_FLAG_ALIGNED`], every segment this code
//!   creates) the header block and every entry are zero-padded to 4 KiB, so entries
//!   are appended with O_DIRECT + `fdatasync`: before-images are written once, from
//!   the applier's buffer, and never occupy the page cache (the log is written for
//!   every write-set and read only by views and rollbacks). Segments without the flag
//!   (written by earlier versions) hold entries back to back; they stay readable.
//! * One entry per write-set: a 56-byte entry header, then the body: extents, each a
//!   16-byte extent header followed by the before-image bytes.
//! * CRC32C salted with the segment number, like the redo journal.
//!
//! Single owner, synchronous: the standby's applier thread owns the [`UndoLog`].

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use crate::engine::AlignedBuf;
use crate::format::{rd_u16, rd_u32, rd_u64, salted_crc};

/// Segment header length (bytes). In a packed segment entries start right after it;
/// in an aligned one at [`UNDO_ALIGN`].
pub const UNDO_SEGMENT_HEADER_LEN: usize = 64;
/// Alignment and padding unit of an aligned segment (O_DIRECT friendly).
pub const UNDO_ALIGN: u64 = 4096;
/// Segment header flag: the header block and every entry are zero-padded to
/// [`UNDO_ALIGN`]. A reader that does not know a flag refuses the segment.
pub const UNDO_SEGMENT_FLAG_ALIGNED: u16 = 1;
/// Entry header length (bytes).
pub const UNDO_ENTRY_HEADER_LEN: usize = 56;
/// Extent header length (bytes), followed by `length` bytes of before-image.
pub const UNDO_EXTENT_HEADER_LEN: usize = 16;
pub const UNDO_SEGMENT_MAGIC: [u8; 8] = *b"FERRYUND";
pub const UNDO_ENTRY_MAGIC: [u8; 4] = *b"FRYU";
/// Current undo format version (segment and entry headers).
pub const UNDO_FORMAT_VERSION: u16 = 1;
/// Largest entry body (extent headers + before-images). Bounds every allocation
/// made from a length read off disk.
pub const UNDO_MAX_BODY: u64 = 1 << 30;
/// Smallest accepted `segment_size` (a soft limit: an entry larger than it goes
/// alone in its segment).
pub const UNDO_MIN_SEGMENT_SIZE: u64 = 4096;

pub const UNDO_SEGMENT_SUFFIX: &str = ".undo";
pub const UNDO_TMP_SUFFIX: &str = ".undo.tmp";

// The applier thread owns the log; the daemon may move it between threads.
const _: () = {
    const fn assert_send<T: Send>() {}
    assert_send::<UndoLog>();
    assert_send::<UndoError>();
};

// ---------------------------------------------------------------- errors

#[derive(thiserror::Error, Debug)]
pub enum UndoError {
    /// A system call failed.
    #[error("undo io error: {context}")]
    Io {
        context: String,
        #[source]
        source: io::Error,
    },
    /// Data on disk is not what the undo log wrote: never silently truncated.
    #[error("undo log corruption in {} at offset {offset}: {reason}", file.display())]
    Corruption {
        file: PathBuf,
        offset: u64,
        reason: String,
    },
    #[error("undo segment {} belongs to cluster {found:02x?}, expected {expected:02x?}", file.display())]
    ClusterMismatch {
        file: PathBuf,
        expected: [u8; 16],
        found: [u8; 16],
    },
    /// The entry handed to `append` is malformed (caller bug).
    #[error("invalid undo entry: {0}")]
    InvalidEntry(String),
    /// A rollback / truncate / view target that the log cannot serve (inside a
    /// write-set, or older than the oldest retained entry).
    #[error("invalid undo target: {0}")]
    InvalidTarget(String),
    #[error("invalid undo log options: {0}")]
    InvalidOptions(String),
    /// The position does not name an entry of this log.
    #[error("unknown undo position {0:?}")]
    UnknownPosition(UndoPosition),
    /// An earlier write or truncate failed part-way; the in-memory state may not
    /// match the files. Reopen (recovery repairs the tail).
    #[error("undo log is poisoned by an earlier io error; reopen it")]
    Poisoned,
}

impl UndoError {
    fn io(context: impl Into<String>, source: io::Error) -> UndoError {
        UndoError::Io {
            context: context.into(),
            source,
        }
    }
    fn corrupt(file: &Path, offset: u64, reason: impl Into<String>) -> UndoError {
        UndoError::Corruption {
            file: file.to_path_buf(),
            offset,
            reason: reason.into(),
        }
    }
}

/// Why bytes do not decode (pure format layer; the log adds file and offset).
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum UndoFormatError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: u64, have: u64 },
    #[error("all zero")]
    Zero,
    #[error("bad magic")]
    BadMagic,
    #[error("header crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("body crc mismatch (stored {stored:#010x}, computed {computed:#010x})")]
    BodyCrc { stored: u32, computed: u32 },
    /// CRC-valid header with a version this code does not know.
    #[error("unsupported undo format version {0}")]
    UnsupportedVersion(u16),
    /// CRC-valid but a field is out of range (never a torn write).
    #[error("invalid field: {0}")]
    Invalid(String),
}

impl UndoFormatError {
    /// A CRC-valid header that is nevertheless wrong: written on purpose by another
    /// version or damaged in place, never torn.
    pub fn is_checksummed(&self) -> bool {
        matches!(
            self,
            UndoFormatError::UnsupportedVersion(_) | UndoFormatError::Invalid(_)
        )
    }
}

// ---------------------------------------------------------------- public types

/// Before-image of one byte range of one volume.
///
/// A range that held only zeros (a hole, or zeroed blocks) is stored as a *zero
/// extent*: `zeros` is its length and `data` is empty, so trimming a large empty
/// region costs 16 bytes of undo, not its size. Otherwise `zeros` is 0 and `data` is
/// the before-image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoExtent {
    pub volume: u32,
    pub offset: u64,
    pub data: Bytes,
    pub zeros: u32,
}

impl UndoExtent {
    /// An extent holding `data`.
    pub fn data(volume: u32, offset: u64, data: Bytes) -> UndoExtent {
        UndoExtent {
            volume,
            offset,
            data,
            zeros: 0,
        }
    }

    /// A range of `len` bytes that held zeros.
    pub fn zeros(volume: u32, offset: u64, len: u32) -> UndoExtent {
        UndoExtent {
            volume,
            offset,
            data: Bytes::new(),
            zeros: len,
        }
    }

    /// Bytes of the volume this extent covers.
    pub fn len(&self) -> u64 {
        if self.zeros > 0 {
            self.zeros as u64
        } else {
            self.data.len() as u64
        }
    }

    /// Whether the extent covers nothing (never true of a valid extent).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes the extent occupies in an entry body after its header.
    fn stored_len(&self) -> u64 {
        self.data.len() as u64
    }
}

/// Entry header flag: the entry is part of a resync transition (see FORMAT.md
/// "Undo log", "Resync entries"): the replica state right after it is not a
/// recovery point.
pub const UNDO_ENTRY_FLAG_RESYNC: u16 = 1;
/// Entry header flag, only with [`UNDO_ENTRY_FLAG_RESYNC`]: the first entry of a
/// resync transition, so the state right *before* it is consistent (the point the
/// resync started from). Lets that point stay reachable when retention (or a crash
/// in the middle of a release) leaves this entry as the oldest one.
pub const UNDO_ENTRY_FLAG_RESYNC_START: u16 = 2;

/// What an entry is (entry header flags bits 0 and 1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum EntryKind {
    /// One write-set: the state after it is a recovery point (flags 0).
    #[default]
    WriteSet,
    /// The first entry of a resync transition (flags RESYNC | RESYNC_START).
    ResyncStart,
    /// A later entry of a resync transition (flags RESYNC).
    Resync,
}

impl EntryKind {
    /// Whether the state right after the entry is a recovery point.
    pub fn is_point(self) -> bool {
        self == EntryKind::WriteSet
    }

    fn flags(self) -> u16 {
        match self {
            EntryKind::WriteSet => 0,
            EntryKind::ResyncStart => UNDO_ENTRY_FLAG_RESYNC | UNDO_ENTRY_FLAG_RESYNC_START,
            EntryKind::Resync => UNDO_ENTRY_FLAG_RESYNC,
        }
    }

    fn from_flags(flags: u16) -> Option<EntryKind> {
        match flags {
            0 => Some(EntryKind::WriteSet),
            1 => Some(EntryKind::Resync),
            3 => Some(EntryKind::ResyncStart),
            _ => None,
        }
    }
}

/// High bit of an extent header's `length`: the range held zeros, no bytes follow.
pub const UNDO_EXTENT_ZERO_FLAG: u32 = 1 << 31;
/// Largest extent length (the high bit of the field is the zero flag).
pub const UNDO_MAX_EXTENT_LEN: u32 = UNDO_EXTENT_ZERO_FLAG - 1;

/// The before-images of one write-set (sequences `first_seq..=last_seq`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UndoEntry {
    pub first_seq: u64,
    /// `>= first_seq`, or `first_seq - 1` for an empty entry (resync data, or the
    /// marker that ends a resync): it covers no sequence.
    pub last_seq: u64,
    /// Primary's timestamp of the write-set, ns since the Unix epoch.
    pub timestamp_ns: u64,
    pub extents: Vec<UndoExtent>,
    /// A write-set, or part of a resync transition (the state after it is not a
    /// recovery point).
    pub kind: EntryKind,
}

impl UndoEntry {
    /// Bytes of the encoded entry: header, then each extent's header and stored bytes.
    pub fn encoded_len(&self) -> u64 {
        UNDO_ENTRY_HEADER_LEN as u64
            + self
                .extents
                .iter()
                .map(|x| UNDO_EXTENT_HEADER_LEN as u64 + x.stored_len())
                .sum::<u64>()
    }
}

/// File offsets (in the entry's segment file) of the before-image bytes of each
/// extent of `entry`, read at `pos`; `None` for zero extents. Lets a reader serve
/// parts of a verified entry with plain `pread`s instead of decoding it again.
pub fn extent_data_offsets(pos: &UndoPosition, entry: &UndoEntry) -> Vec<Option<u64>> {
    let mut at = pos.offset + UNDO_ENTRY_HEADER_LEN as u64;
    entry
        .extents
        .iter()
        .map(|x| {
            at += UNDO_EXTENT_HEADER_LEN as u64;
            let here = (x.zeros == 0).then_some(at);
            at += x.stored_len();
            here
        })
        .collect()
}

/// Where an entry lives: segment number, byte offset of its header, total length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct UndoPosition {
    pub segment_no: u64,
    pub offset: u64,
    pub len: u64,
}

/// One time-index point: the replica state right after write-set `seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoPoint {
    /// The write-set's `last_seq`: the point is the state after it.
    pub seq: u64,
    /// The write-set's `first_seq` (the point just before it is `first_seq - 1`).
    pub first_seq: u64,
    pub timestamp_ns: u64,
    pub position: UndoPosition,
    /// A resync entry's end is not a recovery point (it is indexed here all the
    /// same: views and rollbacks apply it).
    pub kind: EntryKind,
}

impl UndoPoint {
    /// Whether the state after this entry is a recovery point.
    pub fn is_point(&self) -> bool {
        self.kind.is_point()
    }
}

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
}

// ---------------------------------------------------------------- pure format

/// Undo segment header (64 bytes at offset 0 of each segment file).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoSegmentHeader {
    pub segment_no: u64,
    pub cluster_id: [u8; 16],
    /// `first_seq` of the first entry in the segment.
    pub first_seq: u64,
    /// [`UNDO_SEGMENT_FLAG_ALIGNED`]: entries at 4 KiB boundaries.
    pub aligned: bool,
}

impl UndoSegmentHeader {
    /// Offset of the segment's first entry.
    pub fn first_entry_offset(&self) -> u64 {
        first_entry_offset(self.aligned)
    }
}

fn first_entry_offset(aligned: bool) -> u64 {
    if aligned {
        UNDO_ALIGN
    } else {
        UNDO_SEGMENT_HEADER_LEN as u64
    }
}

/// `n` rounded up to the segment's entry alignment.
fn pad_to(n: u64, aligned: bool) -> u64 {
    if aligned {
        n.div_ceil(UNDO_ALIGN) * UNDO_ALIGN
    } else {
        n
    }
}

pub fn encode_undo_segment_header(h: &UndoSegmentHeader) -> [u8; UNDO_SEGMENT_HEADER_LEN] {
    let mut b = [0u8; UNDO_SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(&UNDO_SEGMENT_MAGIC);
    b[8..10].copy_from_slice(&UNDO_FORMAT_VERSION.to_le_bytes());
    let flags = if h.aligned {
        UNDO_SEGMENT_FLAG_ALIGNED
    } else {
        0
    };
    b[10..12].copy_from_slice(&flags.to_le_bytes());
    // 12..16 reserved
    b[16..24].copy_from_slice(&h.segment_no.to_le_bytes());
    b[24..40].copy_from_slice(&h.cluster_id);
    b[40..48].copy_from_slice(&h.first_seq.to_le_bytes());
    // 48..60 reserved
    let crc = salted_crc(h.segment_no, &b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_undo_segment_header(
    b: &[u8],
    segment_no: u64,
) -> Result<UndoSegmentHeader, UndoFormatError> {
    if b.len() < UNDO_SEGMENT_HEADER_LEN {
        return Err(UndoFormatError::Truncated {
            need: UNDO_SEGMENT_HEADER_LEN as u64,
            have: b.len() as u64,
        });
    }
    let b = &b[..UNDO_SEGMENT_HEADER_LEN];
    if b.iter().all(|&x| x == 0) {
        return Err(UndoFormatError::Zero);
    }
    if b[0..8] != UNDO_SEGMENT_MAGIC {
        return Err(UndoFormatError::BadMagic);
    }
    let stored = rd_u32(b, 60);
    let computed = salted_crc(segment_no, &b[0..60]);
    if stored != computed {
        return Err(UndoFormatError::HeaderCrc { stored, computed });
    }
    let version = rd_u16(b, 8);
    if version != UNDO_FORMAT_VERSION {
        return Err(UndoFormatError::UnsupportedVersion(version));
    }
    let flags = rd_u16(b, 10);
    if flags & !UNDO_SEGMENT_FLAG_ALIGNED != 0 {
        return Err(UndoFormatError::Invalid(format!(
            "segment header flags {flags:#06x}: unknown flags"
        )));
    }
    if rd_u32(b, 12) != 0 || b[48..60].iter().any(|&x| x != 0) {
        return Err(UndoFormatError::Invalid(
            "segment header reserved bytes not zero".into(),
        ));
    }
    let mut cluster_id = [0u8; 16];
    cluster_id.copy_from_slice(&b[24..40]);
    let h = UndoSegmentHeader {
        segment_no: rd_u64(b, 16),
        cluster_id,
        first_seq: rd_u64(b, 40),
        aligned: flags & UNDO_SEGMENT_FLAG_ALIGNED != 0,
    };
    if h.segment_no != segment_no {
        return Err(UndoFormatError::Invalid(format!(
            "segment header names segment {}, file is {segment_no}",
            h.segment_no
        )));
    }
    if h.first_seq == 0 {
        return Err(UndoFormatError::Invalid("segment first_seq is 0".into()));
    }
    Ok(h)
}

/// Fixed header in front of every entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UndoEntryHeader {
    pub first_seq: u64,
    pub last_seq: u64,
    pub timestamp_ns: u64,
    pub extent_count: u32,
    pub body_crc: u32,
    pub body_len: u64,
    /// Flag bits 0 and 1.
    pub kind: EntryKind,
}

impl UndoEntryHeader {
    /// Header + body bytes.
    pub fn total_len(&self) -> u64 {
        UNDO_ENTRY_HEADER_LEN as u64 + self.body_len
    }
}

pub fn encode_undo_entry_header(
    h: &UndoEntryHeader,
    segment_no: u64,
) -> [u8; UNDO_ENTRY_HEADER_LEN] {
    let mut b = [0u8; UNDO_ENTRY_HEADER_LEN];
    b[0..4].copy_from_slice(&UNDO_ENTRY_MAGIC);
    b[4..6].copy_from_slice(&UNDO_FORMAT_VERSION.to_le_bytes());
    b[6..8].copy_from_slice(&h.kind.flags().to_le_bytes());
    b[8..16].copy_from_slice(&h.first_seq.to_le_bytes());
    b[16..24].copy_from_slice(&h.last_seq.to_le_bytes());
    b[24..32].copy_from_slice(&h.timestamp_ns.to_le_bytes());
    b[32..36].copy_from_slice(&h.extent_count.to_le_bytes());
    b[36..40].copy_from_slice(&h.body_crc.to_le_bytes());
    b[40..48].copy_from_slice(&h.body_len.to_le_bytes());
    // 48..52 reserved (0)
    let crc = salted_crc(segment_no, &b[0..52]);
    b[52..56].copy_from_slice(&crc.to_le_bytes());
    b
}

pub fn decode_undo_entry_header(
    b: &[u8],
    segment_no: u64,
) -> Result<UndoEntryHeader, UndoFormatError> {
    if b.len() < UNDO_ENTRY_HEADER_LEN {
        return Err(UndoFormatError::Truncated {
            need: UNDO_ENTRY_HEADER_LEN as u64,
            have: b.len() as u64,
        });
    }
    let b = &b[..UNDO_ENTRY_HEADER_LEN];
    if b.iter().all(|&x| x == 0) {
        return Err(UndoFormatError::Zero);
    }
    if b[0..4] != UNDO_ENTRY_MAGIC {
        return Err(UndoFormatError::BadMagic);
    }
    let stored = rd_u32(b, 52);
    let computed = salted_crc(segment_no, &b[0..52]);
    if stored != computed {
        return Err(UndoFormatError::HeaderCrc { stored, computed });
    }
    let version = rd_u16(b, 4);
    if version != UNDO_FORMAT_VERSION {
        return Err(UndoFormatError::UnsupportedVersion(version));
    }
    let flags = rd_u16(b, 6);
    let kind = EntryKind::from_flags(flags);
    let Some(kind) = kind.filter(|_| rd_u32(b, 48) == 0) else {
        return Err(UndoFormatError::Invalid(format!(
            "entry flags {flags:#06x} unknown or reserved not zero"
        )));
    };
    let h = UndoEntryHeader {
        first_seq: rd_u64(b, 8),
        last_seq: rd_u64(b, 16),
        timestamp_ns: rd_u64(b, 24),
        extent_count: rd_u32(b, 32),
        body_crc: rd_u32(b, 36),
        body_len: rd_u64(b, 40),
        kind,
    };
    check_header_fields(&h).map_err(UndoFormatError::Invalid)?;
    Ok(h)
}

/// Valid sequence range of an entry: `first_seq >= 1`, `last_seq >= first_seq - 1`
/// (an empty range covers no write-set: resync data, or the end-of-resync marker).
fn valid_range(first: u64, last: u64) -> bool {
    first != 0 && last >= first - 1 && last != u64::MAX
}

fn check_header_fields(h: &UndoEntryHeader) -> Result<(), String> {
    if !valid_range(h.first_seq, h.last_seq) {
        return Err(format!("entry seq range {}..={}", h.first_seq, h.last_seq));
    }
    if h.body_len > UNDO_MAX_BODY {
        return Err(format!(
            "entry body_len {} exceeds {UNDO_MAX_BODY}",
            h.body_len
        ));
    }
    if (h.extent_count as u64) * (UNDO_EXTENT_HEADER_LEN as u64) > h.body_len {
        return Err(format!(
            "body_len {} too small for {} extents",
            h.body_len, h.extent_count
        ));
    }
    Ok(())
}

/// Encodes a whole entry (header + body) for segment `segment_no`.
pub fn encode_undo_entry(e: &UndoEntry, segment_no: u64) -> Result<Vec<u8>, UndoError> {
    let bad = |m: String| Err(UndoError::InvalidEntry(m));
    if !valid_range(e.first_seq, e.last_seq) {
        return bad(format!("seq range {}..={}", e.first_seq, e.last_seq));
    }
    for (i, x) in e.extents.iter().enumerate() {
        if (x.zeros > 0) != x.data.is_empty() || x.len() > UNDO_MAX_EXTENT_LEN as u64 {
            return bad(format!(
                "extent {i}: {} data bytes, {} zero bytes (exactly one must be 1..={UNDO_MAX_EXTENT_LEN})",
                x.data.len(),
                x.zeros
            ));
        }
        if x.offset.checked_add(x.len()).is_none() {
            return bad(format!("extent {i} offset {} overflows", x.offset));
        }
    }
    let body_len = e.encoded_len() - UNDO_ENTRY_HEADER_LEN as u64;
    if body_len > UNDO_MAX_BODY {
        return bad(format!("body {body_len} bytes exceeds {UNDO_MAX_BODY}"));
    }
    let extent_count = u32::try_from(e.extents.len())
        .map_err(|_| UndoError::InvalidEntry("too many extents".into()))?;
    let mut out = vec![0u8; UNDO_ENTRY_HEADER_LEN + body_len as usize];
    let mut pos = UNDO_ENTRY_HEADER_LEN;
    for x in &e.extents {
        out[pos..pos + 4].copy_from_slice(&x.volume.to_le_bytes());
        // Checked above: the length fits below the flag bit.
        let field = if x.zeros > 0 {
            x.zeros | UNDO_EXTENT_ZERO_FLAG
        } else {
            x.data.len() as u32
        };
        out[pos + 4..pos + 8].copy_from_slice(&field.to_le_bytes());
        out[pos + 8..pos + 16].copy_from_slice(&x.offset.to_le_bytes());
        pos += UNDO_EXTENT_HEADER_LEN;
        out[pos..pos + x.data.len()].copy_from_slice(&x.data);
        pos += x.data.len();
    }
    let h = UndoEntryHeader {
        first_seq: e.first_seq,
        last_seq: e.last_seq,
        timestamp_ns: e.timestamp_ns,
        extent_count,
        body_crc: salted_crc(segment_no, &out[UNDO_ENTRY_HEADER_LEN..]),
        body_len,
        kind: e.kind,
    };
    out[..UNDO_ENTRY_HEADER_LEN].copy_from_slice(&encode_undo_entry_header(&h, segment_no));
    Ok(out)
}

/// Verifies the body CRC and decodes the extents. `body` must be exactly
/// `h.body_len` bytes; extent data are zero-copy slices of it.
pub fn decode_undo_entry_body(
    h: &UndoEntryHeader,
    segment_no: u64,
    body: &Bytes,
) -> Result<UndoEntry, UndoFormatError> {
    if body.len() as u64 != h.body_len {
        return Err(UndoFormatError::Truncated {
            need: h.body_len,
            have: body.len() as u64,
        });
    }
    let computed = salted_crc(segment_no, body);
    if computed != h.body_crc {
        return Err(UndoFormatError::BodyCrc {
            stored: h.body_crc,
            computed,
        });
    }
    let cap = (h.extent_count as usize).min(body.len() / UNDO_EXTENT_HEADER_LEN);
    let mut extents = Vec::with_capacity(cap);
    let mut pos = 0usize;
    for i in 0..h.extent_count {
        if body.len() - pos < UNDO_EXTENT_HEADER_LEN {
            return Err(UndoFormatError::Invalid(format!(
                "extent {i} header at body offset {pos} overruns body"
            )));
        }
        let volume = rd_u32(body, pos);
        let field = rd_u32(body, pos + 4);
        let offset = rd_u64(body, pos + 8);
        pos += UNDO_EXTENT_HEADER_LEN;
        let zero = field & UNDO_EXTENT_ZERO_FLAG != 0;
        let len = (field & !UNDO_EXTENT_ZERO_FLAG) as usize;
        if len == 0 || (!zero && len > body.len() - pos) {
            return Err(UndoFormatError::Invalid(format!(
                "extent {i} length {len} at body offset {pos} invalid or overruns body"
            )));
        }
        if offset.checked_add(len as u64).is_none() {
            return Err(UndoFormatError::Invalid(format!(
                "extent {i} offset {offset} overflows"
            )));
        }
        if zero {
            extents.push(UndoExtent::zeros(volume, offset, len as u32));
            continue;
        }
        extents.push(UndoExtent::data(volume, offset, body.slice(pos..pos + len)));
        pos += len;
    }
    if pos != body.len() {
        return Err(UndoFormatError::Invalid(format!(
            "{} trailing body bytes",
            body.len() - pos
        )));
    }
    Ok(UndoEntry {
        first_seq: h.first_seq,
        last_seq: h.last_seq,
        timestamp_ns: h.timestamp_ns,
        extents,
        kind: h.kind,
    })
}

/// Decodes one whole entry from the front of `b` (for tests and fuzzers).
/// Returns the entry and the bytes it occupies.
pub fn decode_undo_entry(b: &Bytes, segment_no: u64) -> Result<(UndoEntry, u64), UndoFormatError> {
    let h = decode_undo_entry_header(b, segment_no)?;
    let have = (b.len() - UNDO_ENTRY_HEADER_LEN) as u64;
    if h.body_len > have {
        return Err(UndoFormatError::Truncated {
            need: h.total_len(),
            have: b.len() as u64,
        });
    }
    let body = b.slice(UNDO_ENTRY_HEADER_LEN..UNDO_ENTRY_HEADER_LEN + h.body_len as usize);
    let e = decode_undo_entry_body(&h, segment_no, &body)?;
    Ok((e, h.total_len()))
}

// ---------------------------------------------------------------- files

pub fn undo_segment_file_name(no: u64) -> String {
    format!("{no:016}{UNDO_SEGMENT_SUFFIX}")
}

/// `0000000000000001.undo` → 1; anything else → None.
pub fn parse_undo_segment_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(UNDO_SEGMENT_SUFFIX)?;
    if digits.len() < 16 || digits.len() > 20 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn sync_dir(dir: &Path) -> Result<(), UndoError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| UndoError::io(format!("fsync directory {}", dir.display()), e))
}

/// Opens a segment for appends with O_DIRECT, or buffered where the file system
/// refuses O_DIRECT (older tmpfs, for instance; durability is the same `fdatasync`).
fn open_direct(path: &Path) -> Result<File, UndoError> {
    static WARNED: std::sync::Once = std::sync::Once::new();
    let (f, direct) = crate::segment::open_direct_or_buffered(path)
        .map_err(|e| UndoError::io(format!("open {}", path.display()), e))?;
    if !direct {
        WARNED.call_once(|| {
            tracing::warn!(path = %path.display(), "undo log: O_DIRECT not supported here; appending through the page cache");
        });
    }
    Ok(f)
}

fn read_at(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<(), UndoError> {
    file.read_exact_at(buf, offset).map_err(|e| {
        UndoError::io(
            format!("read {} bytes of {} at {offset}", buf.len(), path.display()),
            e,
        )
    })
}

#[derive(Debug)]
struct Segment {
    no: u64,
    path: PathBuf,
    /// Buffered descriptor: reads, truncation.
    file: File,
    /// Appends (O_DIRECT where the file system allows it), opened on first use.
    /// Only aligned segments are appended to.
    direct: Option<File>,
    /// Entries are 4 KiB aligned (see [`UNDO_SEGMENT_FLAG_ALIGNED`]).
    aligned: bool,
    /// File length: the next entry's offset.
    len: u64,
    /// Index in `points` of this segment's first entry.
    first_point: usize,
    entries: usize,
}

/// The standby's undo log. See the module docs and FORMAT.md "Undo log".
#[derive(Debug)]
pub struct UndoLog {
    dir: PathBuf,
    cluster_id: [u8; 16],
    segment_size: u64,
    segments: Vec<Segment>,
    points: Vec<UndoPoint>,
    /// Running maximum of `points[..=i].timestamp_ns` (for `find_by_time` with a
    /// primary clock that may step back).
    max_ts: Vec<u64>,
    /// `first_seq` the next entry must have (contiguity), if known.
    next_seq: Option<u64>,
    next_segment_no: u64,
    poisoned: bool,
    /// Aligned staging buffer for O_DIRECT appends (grown as needed, reused).
    staging: Option<AlignedBuf>,
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
        if segment_size < UNDO_MIN_SEGMENT_SIZE {
            return Err(UndoError::InvalidOptions(format!(
                "segment_size {segment_size} below {UNDO_MIN_SEGMENT_SIZE}"
            )));
        }
        fs::create_dir_all(dir)
            .map_err(|e| UndoError::io(format!("create {}", dir.display()), e))?;
        let lock = crate::segment::lock_dir(dir)
            .map_err(|e| UndoError::InvalidOptions(format!("undo log {}: {e}", dir.display())))?;
        let mut rec = UndoRecovery::default();
        let mut nos = Vec::new();
        let rd =
            fs::read_dir(dir).map_err(|e| UndoError::io(format!("list {}", dir.display()), e))?;
        for ent in rd {
            let ent = ent.map_err(|e| UndoError::io(format!("list {}", dir.display()), e))?;
            let name = ent.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.ends_with(UNDO_TMP_SUFFIX) {
                let p = ent.path();
                fs::remove_file(&p)
                    .map_err(|e| UndoError::io(format!("remove {}", p.display()), e))?;
                rec.removed_tmp.push(p);
            } else if let Some(no) = parse_undo_segment_name(name) {
                nos.push(no);
            }
        }
        if !rec.removed_tmp.is_empty() {
            sync_dir(dir)?;
        }
        nos.sort_unstable();
        let mut log = UndoLog {
            dir: dir.to_path_buf(),
            cluster_id,
            segment_size,
            segments: Vec::with_capacity(nos.len()),
            points: Vec::new(),
            max_ts: Vec::new(),
            next_seq: None,
            next_segment_no: nos.last().map_or(1, |n| n + 1),
            poisoned: false,
            staging: None,
            _lock: lock,
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
            log.recover_segment(no, path, last, &mut rec)?;
        }
        // An empty last segment (header only) holds nothing: delete it so the next
        // append starts a segment whose header names its first entry.
        if log.segments.last().is_some_and(|s| s.entries == 0) {
            let s = log.segments.pop().expect("checked non-empty");
            fs::remove_file(&s.path)
                .map_err(|e| UndoError::io(format!("remove {}", s.path.display()), e))?;
            sync_dir(dir)?;
            rec.removed_empty = Some(s.path);
        }
        rec.segments = log.segments.len();
        rec.entries = log.points.len();
        log.next_seq = log.points.last().map(|p| p.seq + 1);
        Ok((log, rec))
    }

    fn recover_segment(
        &mut self,
        no: u64,
        path: PathBuf,
        last: bool,
        rec: &mut UndoRecovery,
    ) -> Result<(), UndoError> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(|e| UndoError::io(format!("open {}", path.display()), e))?;
        let mut len = file
            .metadata()
            .map_err(|e| UndoError::io(format!("stat {}", path.display()), e))?
            .len();
        if len < UNDO_SEGMENT_HEADER_LEN as u64 {
            return Err(UndoError::corrupt(
                &path,
                0,
                format!("file of {len} bytes is shorter than a segment header"),
            ));
        }
        // Below: `len` may not cover a whole header block (aligned segments are only
        // ever renamed into place complete, so that is corruption, caught next).
        let mut hb = [0u8; UNDO_SEGMENT_HEADER_LEN];
        read_at(&file, &path, &mut hb, 0)?;
        let sh = decode_undo_segment_header(&hb, no)
            .map_err(|e| UndoError::corrupt(&path, 0, format!("segment header: {e}")))?;
        if sh.cluster_id != self.cluster_id {
            return Err(UndoError::ClusterMismatch {
                file: path,
                expected: self.cluster_id,
                found: sh.cluster_id,
            });
        }
        let aligned = sh.aligned;
        if len < sh.first_entry_offset() {
            return Err(UndoError::corrupt(
                &path,
                0,
                format!("file of {len} bytes is shorter than its header block"),
            ));
        }
        if self.segments.last().is_some_and(|s| s.entries == 0) {
            let prev = self.segments.last().expect("checked");
            return Err(UndoError::corrupt(
                &prev.path,
                UNDO_SEGMENT_HEADER_LEN as u64,
                "segment holds no entries but is not the last",
            ));
        }
        let first_point = self.points.len();
        let mut entries = 0usize;
        let mut pos = sh.first_entry_offset();
        while pos < len {
            let mut eb = [0u8; UNDO_ENTRY_HEADER_LEN];
            let avail = (len - pos).min(UNDO_ENTRY_HEADER_LEN as u64) as usize;
            read_at(&file, &path, &mut eb[..avail], pos)?;
            let torn_reason: String;
            match decode_undo_entry_header(&eb[..avail], no) {
                Err(e) if e.is_checksummed() => {
                    return Err(UndoError::corrupt(&path, pos, format!("entry header: {e}")));
                }
                Err(e) => {
                    torn_reason = format!("entry header: {e}");
                    // A bad header is a torn tail only if nothing valid follows it.
                    if let Some(q) = find_valid_header(&file, &path, no, pos + 1, len)? {
                        return Err(UndoError::corrupt(
                            &path,
                            pos,
                            format!("{torn_reason}; a valid entry follows at offset {q}"),
                        ));
                    }
                }
                Ok(h) => {
                    let expect = if entries == 0 {
                        Some(sh.first_seq)
                    } else {
                        self.points.last().map(|p| p.seq + 1)
                    };
                    if let Some(x) = expect.filter(|&x| x != h.first_seq) {
                        return Err(UndoError::corrupt(
                            &path,
                            pos,
                            format!("entry first_seq {} expected {x}", h.first_seq),
                        ));
                    }
                    if entries == 0 {
                        if let Some(p) = self.points.last().filter(|p| p.seq + 1 != h.first_seq) {
                            return Err(UndoError::corrupt(
                                &path,
                                pos,
                                format!(
                                    "segment starts at seq {}, previous segment ends at {}",
                                    h.first_seq, p.seq
                                ),
                            ));
                        }
                    }
                    // The next entry's offset; an aligned entry's padding is part
                    // of its write, so a file ending inside it holds a torn append.
                    let end = pad_to(pos + h.total_len(), aligned);
                    let mut torn = None;
                    if end > len {
                        torn = Some(format!(
                            "entry of {} bytes ({} with padding) extends past end of file ({len})",
                            h.total_len(),
                            end - pos
                        ));
                    } else if last && end == len {
                        // The last entry of the log: its body may be torn.
                        let mut body = vec![0u8; h.body_len as usize];
                        read_at(&file, &path, &mut body, pos + UNDO_ENTRY_HEADER_LEN as u64)?;
                        let computed = salted_crc(no, &body);
                        if computed != h.body_crc {
                            torn = Some(format!(
                                "last entry body crc mismatch (stored {:#010x}, computed {computed:#010x})",
                                h.body_crc
                            ));
                        }
                    }
                    match torn {
                        None => {
                            self.push_point(UndoPoint {
                                seq: h.last_seq,
                                first_seq: h.first_seq,
                                timestamp_ns: h.timestamp_ns,
                                position: UndoPosition {
                                    segment_no: no,
                                    offset: pos,
                                    len: h.total_len(),
                                },
                                kind: h.kind,
                            });
                            entries += 1;
                            pos = end;
                            continue;
                        }
                        Some(r) => torn_reason = r,
                    }
                }
            }
            // Torn tail at `pos`.
            if !last {
                return Err(UndoError::corrupt(
                    &path,
                    pos,
                    format!("{torn_reason} (not the last segment: cannot be torn)"),
                ));
            }
            let cut = len - pos;
            tracing::warn!(file = %path.display(), offset = pos, bytes = cut, reason = %torn_reason, "undo: truncating torn last entry");
            file.set_len(pos)
                .and_then(|()| file.sync_all())
                .map_err(|e| UndoError::io(format!("truncate {} to {pos}", path.display()), e))?;
            rec.truncated = Some((path.clone(), pos, cut));
            len = pos;
            break;
        }
        self.segments.push(Segment {
            no,
            path,
            file,
            direct: None,
            aligned,
            len,
            first_point,
            entries,
        });
        Ok(())
    }

    fn push_point(&mut self, p: UndoPoint) {
        let m = self
            .max_ts
            .last()
            .map_or(p.timestamp_ns, |&m| m.max(p.timestamp_ns));
        self.points.push(p);
        self.max_ts.push(m);
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
            Some(s) => {
                let size = pad_to(e.encoded_len(), true);
                s.entries > 0 && s.len.saturating_add(size) > self.segment_size
            }
        };
        let pos = if roll {
            let no = self.next_segment_no;
            let bytes = encode_undo_entry(e, no)?;
            self.create_segment(no, e.first_seq, &bytes)?
        } else {
            let no = self
                .segments
                .last()
                .expect("not rolling: a segment exists")
                .no;
            let bytes = encode_undo_entry(e, no)?;
            match self.append_aligned(&bytes) {
                Ok(pos) => pos,
                Err(err) => {
                    self.poisoned = true;
                    return Err(err);
                }
            }
        };
        self.push_point(UndoPoint {
            seq: e.last_seq,
            first_seq: e.first_seq,
            timestamp_ns: e.timestamp_ns,
            position: pos,
            kind: e.kind,
        });
        self.next_seq = Some(e.last_seq + 1);
        Ok(pos)
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
        f.write_all_at(out, off)
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

    /// New segment `no` holding its header and first entry: written under
    /// `.undo.tmp`, fdatasync'ed, renamed, directory fsync'ed.
    fn create_segment(
        &mut self,
        no: u64,
        first_seq: u64,
        entry: &[u8],
    ) -> Result<UndoPosition, UndoError> {
        let tmp = self.dir.join(format!("{no:016}{UNDO_TMP_SUFFIX}"));
        let path = self.dir.join(undo_segment_file_name(no));
        let hdr = encode_undo_segment_header(&UndoSegmentHeader {
            segment_no: no,
            cluster_id: self.cluster_id,
            first_seq,
            aligned: true,
        });
        // Header block and first entry, each zero-padded to UNDO_ALIGN. Creation is
        // rare (once per segment_size), so this one goes through the page cache.
        let mut image = vec![0u8; UNDO_ALIGN as usize + pad_to(entry.len() as u64, true) as usize];
        image[..hdr.len()].copy_from_slice(&hdr);
        image[UNDO_ALIGN as usize..UNDO_ALIGN as usize + entry.len()].copy_from_slice(entry);
        let res = (|| -> Result<File, UndoError> {
            let _ = fs::remove_file(&tmp);
            let mut f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&tmp)
                .map_err(|e| UndoError::io(format!("create {}", tmp.display()), e))?;
            f.write_all(&image)
                .and_then(|()| f.sync_data())
                .map_err(|e| UndoError::io(format!("write {}", tmp.display()), e))?;
            fs::rename(&tmp, &path).map_err(|e| {
                UndoError::io(format!("rename {} → {}", tmp.display(), path.display()), e)
            })?;
            sync_dir(&self.dir)?;
            Ok(f)
        })();
        let file = match res {
            Ok(f) => f,
            Err(e) => {
                self.poisoned = true;
                return Err(e);
            }
        };
        self.next_segment_no = no + 1;
        self.segments.push(Segment {
            no,
            path,
            file,
            direct: None,
            aligned: true,
            len: image.len() as u64,
            first_point: self.points.len(),
            entries: 1,
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
        &self.points
    }

    /// The entries whose end is a recovery point (not resync entries), oldest first.
    pub fn recovery_points(&self) -> impl DoubleEndedIterator<Item = &UndoPoint> + '_ {
        self.points.iter().filter(|p| p.is_point())
    }

    /// Newest recovery point with `seq <= seq`.
    pub fn find_by_seq(&self, seq: u64) -> Option<UndoPoint> {
        let i = self.points.partition_point(|p| p.seq <= seq);
        self.points[..i]
            .iter()
            .rev()
            .find(|p| p.is_point())
            .copied()
    }

    /// Newest recovery point at or before `ts_ns`: the last point of the longest
    /// prefix of write-sets all stamped `<= ts_ns` (so a primary clock stepping back
    /// never makes a view include a write-set stamped after `ts_ns`).
    pub fn find_by_time(&self, ts_ns: u64) -> Option<UndoPoint> {
        let i = self.max_ts.partition_point(|&m| m <= ts_ns);
        self.points[..i]
            .iter()
            .rev()
            .find(|p| p.is_point())
            .copied()
    }

    /// Index of the first entry after the boundary `seq`, or why `seq` is not a
    /// reachable boundary (inside a write-set, inside a resync, or older than the
    /// oldest retained entry).
    fn target_index(&self, seq: u64) -> Result<usize, UndoError> {
        let mut i = self.points.partition_point(|p| p.seq <= seq);
        // Empty resync entries may end "at" `seq` too (a resync whose snapshot equals
        // the point it started from): the boundary is the position before them,
        // the last consistent state at `seq`.
        while let Some(p) = i.checked_sub(1).map(|k| &self.points[k]) {
            if !p.is_point() && p.seq == seq && p.first_seq > seq {
                i -= 1;
            } else {
                break;
            }
        }
        if let Some(p) = self.points.get(i) {
            if p.first_seq <= seq {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is inside write-set {}..={}",
                    p.first_seq, p.seq
                )));
            }
            if i == 0 && seq + 1 < p.first_seq {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is older than the oldest retained point {}",
                    p.first_seq - 1
                )));
            }
            if i == 0 && p.kind == EntryKind::Resync {
                return Err(UndoError::InvalidTarget(format!(
                    "seq {seq} is inside a resync whose start is no longer retained \
                     (the oldest entry {}..={} continues it)",
                    p.first_seq, p.seq
                )));
            }
        }
        if let Some(p) = i
            .checked_sub(1)
            .map(|k| &self.points[k])
            .filter(|p| !p.is_point())
        {
            // The transition's consistent ends: before its first entry, and the end
            // of the first non-resync entry after it.
            let start = self.points[..i]
                .iter()
                .rposition(|q| q.is_point())
                .map_or(self.points[0].first_seq - 1, |k| self.points[k].seq);
            let end = self.points[i..]
                .iter()
                .find(|q| q.is_point())
                .map(|q| q.seq);
            return Err(UndoError::InvalidTarget(format!(
                "seq {seq} is inside a resync (the replica was being resynced after \
                 {start}; entry {}..={} is not a consistent point); the nearest \
                 consistent points are {start} and {}",
                p.first_seq,
                p.seq,
                end.map_or("the end of the resync (not reached yet)".to_string(), |e| e
                    .to_string())
            )));
        }
        Ok(i)
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
        let key = (pos.segment_no, pos.offset);
        let known = self
            .points
            .binary_search_by(|p| (p.position.segment_no, p.position.offset).cmp(&key))
            .is_ok_and(|i| self.points[i].position == *pos);
        let s = self
            .segment(pos.segment_no)
            .filter(|_| known)
            .ok_or(UndoError::UnknownPosition(*pos))?;
        if pos.len < UNDO_ENTRY_HEADER_LEN as u64
            || pos.offset < UNDO_SEGMENT_HEADER_LEN as u64
            || pos.offset.checked_add(pos.len).is_none_or(|e| e > s.len)
        {
            return Err(UndoError::UnknownPosition(*pos));
        }
        let mut hb = [0u8; UNDO_ENTRY_HEADER_LEN];
        read_at(&s.file, &s.path, &mut hb, pos.offset)?;
        let h = decode_undo_entry_header(&hb, s.no)
            .map_err(|e| UndoError::corrupt(&s.path, pos.offset, format!("entry header: {e}")))?;
        if h.total_len() != pos.len {
            return Err(UndoError::corrupt(
                &s.path,
                pos.offset,
                format!("entry is {} bytes, index says {}", h.total_len(), pos.len),
            ));
        }
        // body_len <= pos.len <= file length: bounded before allocating.
        let mut body = vec![0u8; h.body_len as usize];
        read_at(
            &s.file,
            &s.path,
            &mut body,
            pos.offset + UNDO_ENTRY_HEADER_LEN as u64,
        )?;
        decode_undo_entry_body(&h, s.no, &Bytes::from(body))
            .map_err(|e| UndoError::corrupt(&s.path, pos.offset, format!("entry body: {e}")))
    }

    /// The time-index points after boundary `seq`, oldest first (their entries hold
    /// what the write-sets after `seq` overwrote), or why `seq` is not reachable.
    pub fn points_after(&self, seq: u64) -> Result<&[UndoPoint], UndoError> {
        self.check()?;
        let i = self.target_index(seq)?;
        Ok(&self.points[i..])
    }

    /// Entries of the write-sets after boundary `seq`, newest first: applying their
    /// extents in this order restores the replica as it was right after `seq`.
    /// If `seq` is not a reachable boundary the iterator yields one
    /// [`UndoError::InvalidTarget`].
    pub fn entries_after(
        &self,
        seq: u64,
    ) -> impl Iterator<Item = Result<UndoEntry, UndoError>> + '_ {
        let (start, err) = match self.target_index(seq) {
            Ok(i) => (i, None),
            Err(e) => (self.points.len(), Some(e)),
        };
        err.into_iter().map(Err).chain(
            self.points[start..]
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
        let i = self.target_index(seq)?;
        if i == self.points.len() {
            return Ok(());
        }
        let cut = self.points[i].position;
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
        self.points.truncate(i);
        self.max_ts.truncate(i);
        self.next_seq = Some(seq + 1);
        Ok(())
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
            let last = &self.points[self.segments[k + 1].first_point - 1];
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
            self.points.drain(..n);
            self.max_ts.drain(..n);
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
        self.points.clear();
        self.max_ts.clear();
        self.next_seq = None;
        Ok(freed)
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
    use super::*;

    #[test]
    fn segment_names_round_trip() {
        assert_eq!(undo_segment_file_name(1), "0000000000000001.undo");
        assert_eq!(parse_undo_segment_name("0000000000000001.undo"), Some(1));
        assert_eq!(
            parse_undo_segment_name(&undo_segment_file_name(u64::MAX)),
            Some(u64::MAX)
        );
        assert_eq!(parse_undo_segment_name("0000000000000001.seg"), None);
        assert_eq!(parse_undo_segment_name("1.undo"), None);
        assert_eq!(parse_undo_segment_name("0000000000000001.undo.tmp"), None);
    }

    #[test]
    fn header_fields_bounded() {
        let h = UndoEntryHeader {
            first_seq: 1,
            last_seq: 1,
            timestamp_ns: 0,
            extent_count: 3,
            body_crc: 0,
            body_len: 47,
            kind: EntryKind::WriteSet,
        };
        assert!(check_header_fields(&h).is_err());
        let h = UndoEntryHeader {
            body_len: UNDO_MAX_BODY + 1,
            extent_count: 0,
            ..h
        };
        assert!(check_header_fields(&h).is_err());
        let h = UndoEntryHeader {
            body_len: 48,
            extent_count: 3,
            ..h
        };
        assert!(check_header_fields(&h).is_ok());
    }
}
