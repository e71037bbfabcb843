//! Pure byte format of the undo log: layout constants, segment and entry headers,
//! entry encode/decode and their salted CRC32C checksums. No IO, no clock, no
//! panics on bad input (see `journal/FORMAT.md`, section "Undo log").

use bytes::Bytes;

use crate::format::{rd_u16, rd_u32, rd_u64, salted_crc};
use crate::undo::entry::{EntryKind, UndoEntry, UndoExtent, UndoPosition};
use crate::undo::error::UndoError;

/// Segment header length (bytes). In a packed segment entries start right after it;
/// in an aligned one at [`UNDO_ALIGN`].
pub const UNDO_SEGMENT_HEADER_LEN: usize = 64;
/// Alignment and padding unit of an aligned segment (O_DIRECT friendly).
pub const UNDO_ALIGN: u64 = 4096;
/// Segment header flag: the header block and every entry are zero-padded to
/// [`UNDO_ALIGN`]. A reader that does not know a flag refuses the segment.
pub const UNDO_SEGMENT_FLAG_ALIGNED: u16 = 1;
/// Segment header flag (format version 3, only with [`UNDO_SEGMENT_FLAG_ALIGNED`]):
/// the segment is encrypted; a 64-byte key part follows the header (see
/// `undo::seal`) and every entry is sealed ([`UNDO_ENTRY_FLAG_SEALED`]).
pub const UNDO_SEGMENT_FLAG_SEALED: u16 = 2;
/// Entry header length (bytes).
pub const UNDO_ENTRY_HEADER_LEN: usize = 56;
/// Extent header length (bytes), followed by `length` bytes of before-image.
pub const UNDO_EXTENT_HEADER_LEN: usize = 16;
pub const UNDO_SEGMENT_MAGIC: [u8; 8] = *b"FERRYUND";
pub const UNDO_ENTRY_MAGIC: [u8; 4] = *b"FRYU";
/// Newest undo format version (segment and entry headers) this code reads and
/// writes. Version 2 added write-set pieces ([`UNDO_ENTRY_FLAG_PART`]); version 3
/// added encrypted segments and entries ([`UNDO_SEGMENT_FLAG_SEALED`]), and only
/// those are written as version 3: a plaintext log is written as version 2, byte
/// for byte as before (so an older ferry still reads it).
pub const UNDO_FORMAT_VERSION: u16 = 3;
/// Version of the plaintext segments and entries this code writes.
pub const UNDO_PLAIN_FORMAT_VERSION: u16 = 2;
/// Oldest version this code reads (version 1 is version 2 without pieces).
pub const UNDO_MIN_FORMAT_VERSION: u16 = 1;
/// Largest entry body (extent headers + before-images). Bounds every allocation
/// made from a length read off disk.
pub const UNDO_MAX_BODY: u64 = 1 << 30;
/// Smallest accepted `segment_size` (a soft limit: an entry larger than it goes
/// alone in its segment).
pub const UNDO_MIN_SEGMENT_SIZE: u64 = 4096;

/// Entry header flag: the entry is part of a resync transition (see FORMAT.md
/// "Undo log", "Resync entries"): the replica state right after it is not a
/// recovery point.
pub const UNDO_ENTRY_FLAG_RESYNC: u16 = 1;
/// Entry header flag, only with [`UNDO_ENTRY_FLAG_RESYNC`] or
/// [`UNDO_ENTRY_FLAG_PART`]: the first entry of a resync transition or of a
/// write-set's pieces, so the state right *before* it is consistent (the point the
/// resync or the write-set started from). Lets that point stay reachable when
/// retention (or a crash in the middle of a release) leaves this entry as the
/// oldest one.
pub const UNDO_ENTRY_FLAG_RESYNC_START: u16 = 2;
/// Entry header flag (format version 2): a piece of a write-set's before-images,
/// with an empty sequence range; the write-set's own entry follows its pieces. The
/// state right after a piece is not a recovery point. Lets a write-set of any size
/// be captured in bounded memory.
pub const UNDO_ENTRY_FLAG_PART: u16 = 4;
/// Entry header flag (format version 3): the body is stored sealed (a tag per
/// 4 KiB chunk, then the ciphertext; see `undo::seal`). Set exactly in the
/// entries of a sealed segment.
pub const UNDO_ENTRY_FLAG_SEALED: u16 = 8;

/// High bit of an extent header's `length`: the range held zeros, no bytes follow.
pub const UNDO_EXTENT_ZERO_FLAG: u32 = 1 << 31;
/// Largest extent length (the high bit of the field is the zero flag).
pub const UNDO_MAX_EXTENT_LEN: u32 = UNDO_EXTENT_ZERO_FLAG - 1;

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

/// The entry header's flag bits 0 and 1 of each kind.
impl EntryKind {
    pub(super) fn flags(self) -> u16 {
        match self {
            EntryKind::WriteSet => 0,
            EntryKind::ResyncStart => UNDO_ENTRY_FLAG_RESYNC | UNDO_ENTRY_FLAG_RESYNC_START,
            EntryKind::Resync => UNDO_ENTRY_FLAG_RESYNC,
            EntryKind::PartStart => UNDO_ENTRY_FLAG_PART | UNDO_ENTRY_FLAG_RESYNC_START,
            EntryKind::Part => UNDO_ENTRY_FLAG_PART,
        }
    }

    /// The kind of an entry header's flags in format `version` (pieces are
    /// version 2: a version-1 entry carrying the bit is invalid).
    fn from_flags(flags: u16, version: u16) -> Option<EntryKind> {
        match flags {
            0 => Some(EntryKind::WriteSet),
            1 => Some(EntryKind::Resync),
            3 => Some(EntryKind::ResyncStart),
            4 if version >= 2 => Some(EntryKind::Part),
            6 if version >= 2 => Some(EntryKind::PartStart),
            _ => None,
        }
    }
}

impl UndoExtent {
    /// Bytes the extent occupies in an entry body after its header.
    fn stored_len(&self) -> u64 {
        self.data.len() as u64
    }
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
///
/// In a sealed entry the offsets name where the plaintext bytes would be in the
/// body, which starts after the chunk tags (`pos.len` minus the body's length);
/// `UndoImageReader::read_image` reads them there.
pub fn extent_data_offsets(pos: &UndoPosition, entry: &UndoEntry) -> Vec<Option<u64>> {
    let body_len = entry.encoded_len() - UNDO_ENTRY_HEADER_LEN as u64;
    let tags = if pos.len > UNDO_ENTRY_HEADER_LEN as u64 + body_len {
        super::seal::tags_len(body_len)
    } else {
        0
    };
    let mut at = pos.offset + UNDO_ENTRY_HEADER_LEN as u64 + tags;
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

pub(super) fn first_entry_offset(aligned: bool) -> u64 {
    if aligned {
        UNDO_ALIGN
    } else {
        UNDO_SEGMENT_HEADER_LEN as u64
    }
}

/// `n` rounded up to the segment's entry alignment.
pub(super) fn pad_to(n: u64, aligned: bool) -> u64 {
    if aligned {
        n.div_ceil(UNDO_ALIGN) * UNDO_ALIGN
    } else {
        n
    }
}

/// The 64-byte header of a plaintext segment (format version 2).
pub fn encode_undo_segment_header(h: &UndoSegmentHeader) -> [u8; UNDO_SEGMENT_HEADER_LEN] {
    let flags = if h.aligned {
        UNDO_SEGMENT_FLAG_ALIGNED
    } else {
        0
    };
    encode_segment_base(h, UNDO_PLAIN_FORMAT_VERSION, flags)
}

/// Bytes 0..64 of a segment header: `version` and `flags` as given.
pub(super) fn encode_segment_base(
    h: &UndoSegmentHeader,
    version: u16,
    flags: u16,
) -> [u8; UNDO_SEGMENT_HEADER_LEN] {
    let mut b = [0u8; UNDO_SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(&UNDO_SEGMENT_MAGIC);
    b[8..10].copy_from_slice(&version.to_le_bytes());
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
    if !(UNDO_MIN_FORMAT_VERSION..=UNDO_FORMAT_VERSION).contains(&version) {
        return Err(UndoFormatError::UnsupportedVersion(version));
    }
    let flags = rd_u16(b, 10);
    // Sealed segments are version 3 and aligned; their key part is decoded by
    // `seal::decode_segment_key`.
    let known = if version >= 3 {
        UNDO_SEGMENT_FLAG_ALIGNED | UNDO_SEGMENT_FLAG_SEALED
    } else {
        UNDO_SEGMENT_FLAG_ALIGNED
    };
    let sealed_unaligned =
        flags & UNDO_SEGMENT_FLAG_SEALED != 0 && flags & UNDO_SEGMENT_FLAG_ALIGNED == 0;
    if flags & !known != 0 || sealed_unaligned {
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
    /// Bytes of the (plaintext) body: extent headers and before-images.
    pub body_len: u64,
    /// Flag bits 0 to 2.
    pub kind: EntryKind,
    /// [`UNDO_ENTRY_FLAG_SEALED`]: the body is stored as chunk tags and ciphertext
    /// (`body_crc` covers those stored bytes).
    pub sealed: bool,
}

impl UndoEntryHeader {
    /// Bytes stored after the header: the body, or a sealed body's tags and
    /// ciphertext.
    pub fn stored_body_len(&self) -> u64 {
        if self.sealed {
            super::seal::sealed_len(self.body_len)
        } else {
            self.body_len
        }
    }

    /// Header + stored body bytes.
    pub fn total_len(&self) -> u64 {
        UNDO_ENTRY_HEADER_LEN as u64 + self.stored_body_len()
    }
}

pub fn encode_undo_entry_header(
    h: &UndoEntryHeader,
    segment_no: u64,
) -> [u8; UNDO_ENTRY_HEADER_LEN] {
    let mut b = [0u8; UNDO_ENTRY_HEADER_LEN];
    let (version, sealed) = if h.sealed {
        (UNDO_FORMAT_VERSION, UNDO_ENTRY_FLAG_SEALED)
    } else {
        (UNDO_PLAIN_FORMAT_VERSION, 0)
    };
    b[0..4].copy_from_slice(&UNDO_ENTRY_MAGIC);
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&(h.kind.flags() | sealed).to_le_bytes());
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
    if !(UNDO_MIN_FORMAT_VERSION..=UNDO_FORMAT_VERSION).contains(&version) {
        return Err(UndoFormatError::UnsupportedVersion(version));
    }
    let flags = rd_u16(b, 6);
    let sealed = version >= 3 && flags & UNDO_ENTRY_FLAG_SEALED != 0;
    let kind = EntryKind::from_flags(flags & !UNDO_ENTRY_FLAG_SEALED, version)
        .filter(|_| sealed || flags & UNDO_ENTRY_FLAG_SEALED == 0);
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
        sealed,
    };
    check_header_fields(&h).map_err(UndoFormatError::Invalid)?;
    Ok(h)
}

/// Valid sequence range of an entry: `first_seq >= 1`, `last_seq >= first_seq - 1`
/// (an empty range covers no write-set: resync data, or the end-of-resync marker).
fn valid_range(first: u64, last: u64) -> bool {
    first != 0 && last >= first - 1 && last != u64::MAX
}

/// A piece of a write-set covers no sequence: its range is empty.
fn valid_kind_range(kind: EntryKind, first: u64, last: u64) -> bool {
    valid_range(first, last) && (!kind.is_part() || last == first - 1)
}

fn check_header_fields(h: &UndoEntryHeader) -> Result<(), String> {
    if !valid_kind_range(h.kind, h.first_seq, h.last_seq) {
        return Err(format!(
            "entry seq range {}..={} (kind {:?})",
            h.first_seq, h.last_seq, h.kind
        ));
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

/// Encodes a whole plaintext entry (header + body) for segment `segment_no`.
pub fn encode_undo_entry(e: &UndoEntry, segment_no: u64) -> Result<Vec<u8>, UndoError> {
    let (mut out, h) = encode_plain_parts(e, segment_no)?;
    out[..UNDO_ENTRY_HEADER_LEN].copy_from_slice(&encode_undo_entry_header(&h, segment_no));
    Ok(out)
}

/// The entry's bytes with its header left zero, and that header (plaintext body
/// and its checksum): the common part of plaintext and sealed encoding.
pub(super) fn encode_plain_parts(
    e: &UndoEntry,
    segment_no: u64,
) -> Result<(Vec<u8>, UndoEntryHeader), UndoError> {
    let bad = |m: String| Err(UndoError::InvalidEntry(m));
    if !valid_kind_range(e.kind, e.first_seq, e.last_seq) {
        return bad(format!(
            "seq range {}..={} (kind {:?}: a piece's range is empty)",
            e.first_seq, e.last_seq, e.kind
        ));
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
        sealed: false,
    };
    Ok((out, h))
}

/// Verifies the body CRC and decodes the extents of a plaintext entry. `body` must
/// be exactly `h.body_len` bytes; extent data are zero-copy slices of it. (A sealed
/// body is opened first: `UndoLog::read_entry`.)
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
    decode_undo_extents(h, body)
}

/// Decodes the extents of plaintext body `body` (exactly `h.body_len` bytes, its
/// checksum or authentication already checked).
pub(super) fn decode_undo_extents(
    h: &UndoEntryHeader,
    body: &Bytes,
) -> Result<UndoEntry, UndoFormatError> {
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
    if h.sealed {
        return Err(UndoFormatError::Invalid(
            "sealed entry: needs its segment's key".into(),
        ));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

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
            sealed: false,
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

    #[test]
    fn entry_round_trip_and_data_offsets() {
        let e = UndoEntry {
            first_seq: 5,
            last_seq: 9,
            timestamp_ns: 77,
            extents: vec![
                UndoExtent::data(1, 4096, Bytes::from_static(b"before")),
                UndoExtent::zeros(2, 1 << 40, 1 << 20),
                UndoExtent::data(3, 0, Bytes::from_static(b"x")),
            ],
            kind: EntryKind::ResyncStart,
        };
        let bytes = encode_undo_entry(&e, 42).unwrap();
        assert_eq!(bytes.len() as u64, e.encoded_len());
        let b = Bytes::from(bytes.clone());
        let (back, used) = decode_undo_entry(&b, 42).unwrap();
        assert_eq!(back, e);
        assert_eq!(used, e.encoded_len());
        // The checksums are salted: the same bytes do not decode as another segment's.
        assert!(matches!(
            decode_undo_entry(&b, 43),
            Err(UndoFormatError::HeaderCrc { .. })
        ));
        // Offsets name exactly the before-image bytes (relative to the entry here).
        let pos = UndoPosition {
            segment_no: 42,
            offset: 0,
            len: used,
        };
        let offs = extent_data_offsets(&pos, &e);
        assert_eq!(offs[1], None);
        for (x, off) in e.extents.iter().zip(&offs) {
            if let Some(o) = off {
                let o = *o as usize;
                assert_eq!(&bytes[o..o + x.data.len()], &x.data[..]);
            }
        }
    }

    #[test]
    fn segment_header_round_trip() {
        for aligned in [true, false] {
            let h = UndoSegmentHeader {
                segment_no: 7,
                cluster_id: [9; 16],
                first_seq: 1234,
                aligned,
            };
            let b = encode_undo_segment_header(&h);
            assert_eq!(decode_undo_segment_header(&b, 7), Ok(h));
            let first = if aligned {
                UNDO_ALIGN
            } else {
                UNDO_SEGMENT_HEADER_LEN as u64
            };
            assert_eq!(h.first_entry_offset(), first);
            // A header copied into another segment's file does not validate there.
            assert!(matches!(
                decode_undo_segment_header(&b, 8),
                Err(UndoFormatError::HeaderCrc { .. })
            ));
        }
        assert_eq!(
            decode_undo_segment_header(&[0; UNDO_SEGMENT_HEADER_LEN], 1),
            Err(UndoFormatError::Zero)
        );
    }

    #[test]
    fn padding_only_in_aligned_segments() {
        assert_eq!(pad_to(1, true), UNDO_ALIGN);
        assert_eq!(pad_to(UNDO_ALIGN, true), UNDO_ALIGN);
        assert_eq!(pad_to(UNDO_ALIGN + 1, true), 2 * UNDO_ALIGN);
        assert_eq!(pad_to(UNDO_ALIGN + 1, false), UNDO_ALIGN + 1);
    }
}
