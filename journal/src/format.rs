//! Pure on-disk format of the journal: no IO, no clock, no panics on bad input.
//!
//! See `journal/FORMAT.md` for byte diagrams, checksum definitions and the
//! crash-case analysis. Everything here is little-endian.
//!
//! * A segment file starts with a 4 KiB segment header block
//!   ([`SEGMENT_HEADER_LEN`] meaningful bytes, rest zero).
//! * Batches follow at 4 KiB-aligned offsets: an 80-byte [`BatchHeader`], then the
//!   body (records back to back: a 32-byte [`RecordHeader`] then the data), then zero
//!   padding up to the next 4 KiB boundary.
//! * Both CRC32C checksums are *salted* with the segment number (the CRC state is
//!   seeded with `crc32c(segment_no.to_le_bytes())`), so a batch left over in a
//!   recycled segment file never validates under the file's new number.
//! * Encrypted journals (format version 2, FORMAT.md "Encryption at rest") add the
//!   segment's wrapped data key after the v1 header fields and seal each batch body
//!   with SM4-GCM ([`encode_batch_sealed`], [`decode_batch_body_at`]); headers stay
//!   readable, and the body CRC covers the ciphertext, so torn writes are found
//!   without the key.

use bytes::Bytes;
use ferry_gm::atrest::{DataKey, KeyId, WrappedKey, KEY_ID_LEN, WRAPPED_KEY_LEN};
use ferry_gm::TAG_LEN;

/// Alignment and padding unit of every write (O_DIRECT friendly).
pub const BLOCK_SIZE: usize = 4096;
/// Bytes reserved at the start of each segment file for its header.
pub const SEGMENT_HEADER_BLOCK: u64 = BLOCK_SIZE as u64;
/// Meaningful bytes of the segment header (the rest of its block is zero).
pub const SEGMENT_HEADER_LEN: usize = 64;
/// Size of the fixed batch header.
pub const BATCH_HEADER_LEN: usize = 80;
/// Size of each record header inside a batch body.
pub const RECORD_HEADER_LEN: usize = 32;
/// Largest payload a Seal record may carry (e.g. a bookmark name).
pub const MAX_SEAL_PAYLOAD: usize = 4096;

pub const SEGMENT_MAGIC: [u8; 8] = *b"FERRYSEG";
pub const BATCH_MAGIC: [u8; 4] = *b"FRYB";
/// Current format version written by this code. See FORMAT.md "Versioning".
pub const FORMAT_VERSION: u16 = 1;
/// Version of encrypted segment headers and batches (written only with a key).
pub const FORMAT_VERSION_ENCRYPTED: u16 = 2;
/// Meaningful bytes of an encrypted (version 2) segment header.
pub const SEGMENT_HEADER_V2_LEN: usize = 128;
/// Bytes a sealed batch body adds to the records: the SM4-GCM tag.
pub const BODY_TAG_LEN: usize = TAG_LEN;
/// Header bytes a batch's SM4-GCM tag authenticates (everything up to and including
/// `body_len`; `body_crc` and `header_crc` are checksums of what is authenticated).
const BATCH_AAD_LEN: usize = 72;
/// Segment header bytes the wrapped data key is bound to (v1 fields and the key id).
const SEGMENT_AAD_LEN: usize = 72;

/// Largest writer pipeline depth a segment header may record (see FORMAT.md,
/// segment header `max_inflight`).
pub const MAX_INFLIGHT_BATCHES: u32 = 8;

/// Batch flag: the batch contains at least one Seal record (lets a shipper find
/// write-set boundaries from headers alone).
pub const BATCH_FLAG_HAS_SEAL: u16 = 1;
const BATCH_FLAGS_KNOWN: u16 = BATCH_FLAG_HAS_SEAL;

const _: () = assert!(SEGMENT_HEADER_V2_LEN <= BLOCK_SIZE);
const _: () = assert!(SEGMENT_AAD_LEN + WRAPPED_KEY_LEN + 8 + 4 == SEGMENT_HEADER_V2_LEN);
const _: () = assert!(SEGMENT_HEADER_LEN + KEY_ID_LEN == SEGMENT_AAD_LEN);
const _: () = assert!(BATCH_HEADER_LEN & 7 == 0 && RECORD_HEADER_LEN & 7 == 0);
const _: () = assert!(BLOCK_SIZE.is_power_of_two());

/// Whether `n` is a multiple of [`BLOCK_SIZE`].
pub fn is_block_aligned(n: u64) -> bool {
    n & (BLOCK_SIZE as u64 - 1) == 0
}

/// Global sequence number; starts at 1, 0 means "none".
pub type Seq = u64;

/// Operation carried by a record.
#[repr(u8)]
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Op {
    Write = 1,
    Trim = 2,
    WriteZeroes = 3,
    /// Write-set seal marker; data may carry a small payload (bookmark name).
    Seal = 4,
}

impl Op {
    pub fn from_u8(v: u8) -> Option<Op> {
        match v {
            1 => Some(Op::Write),
            2 => Some(Op::Trim),
            3 => Some(Op::WriteZeroes),
            4 => Some(Op::Seal),
            _ => None,
        }
    }
}

/// One journal record.
///
/// * `Write`: `length == data.len()`.
/// * `Trim` / `WriteZeroes`: `data` empty, `length` is the range.
/// * `Seal`: `offset == 0`, `length == 0`, `data` an optional marker (<= 4 KiB).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub volume: u32,
    pub op: Op,
    pub offset: u64,
    pub length: u32,
    pub data: Bytes,
}

impl Record {
    pub fn write(volume: u32, offset: u64, data: Bytes) -> Record {
        Record {
            volume,
            op: Op::Write,
            offset,
            length: data.len() as u32,
            data,
        }
    }
    pub fn trim(volume: u32, offset: u64, length: u32) -> Record {
        Record {
            volume,
            op: Op::Trim,
            offset,
            length,
            data: Bytes::new(),
        }
    }
    pub fn write_zeroes(volume: u32, offset: u64, length: u32) -> Record {
        Record {
            volume,
            op: Op::WriteZeroes,
            offset,
            length,
            data: Bytes::new(),
        }
    }
    pub fn seal(volume: u32, marker: Bytes) -> Record {
        Record {
            volume,
            op: Op::Seal,
            offset: 0,
            length: 0,
            data: marker,
        }
    }
    /// Bytes this record occupies inside a batch body.
    pub fn encoded_len(&self) -> usize {
        RECORD_HEADER_LEN + self.data.len()
    }
}

/// Checks the per-op invariants of a record (shared by the writer and decoder).
pub fn validate_record(rec: &Record) -> Result<(), String> {
    if rec.data.len() > u32::MAX as usize {
        return Err(format!("data length {} exceeds u32", rec.data.len()));
    }
    match rec.op {
        Op::Write => {
            if rec.length as usize != rec.data.len() {
                return Err(format!(
                    "write: length {} != data length {}",
                    rec.length,
                    rec.data.len()
                ));
            }
        }
        Op::Trim | Op::WriteZeroes => {
            if !rec.data.is_empty() {
                return Err(format!(
                    "{:?}: data must be empty, has {} bytes",
                    rec.op,
                    rec.data.len()
                ));
            }
        }
        Op::Seal => {
            if rec.offset != 0 || rec.length != 0 {
                return Err(format!(
                    "seal: offset {} and length {} must be 0",
                    rec.offset, rec.length
                ));
            }
            if rec.data.len() > MAX_SEAL_PAYLOAD {
                return Err(format!(
                    "seal: payload {} bytes > {MAX_SEAL_PAYLOAD}",
                    rec.data.len()
                ));
            }
        }
    }
    Ok(())
}

/// Why a piece of bytes did not decode. Positions are relative to the slice given.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("truncated: need {need} bytes, have {have}")]
    Truncated { need: usize, have: usize },
    #[error("all-zero block (never written)")]
    Zero,
    #[error("bad magic {found:02x?}")]
    BadMagic { found: Vec<u8> },
    #[error("header crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    HeaderCrc { stored: u32, computed: u32 },
    #[error("stale batch written for segment {written_for} (file is segment {segment})")]
    Stale { written_for: u64, segment: u64 },
    #[error("body crc mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    BodyCrc { stored: u32, computed: u32 },
    #[error("unsupported format version {0}")]
    UnsupportedVersion(u16),
    #[error("invalid field: {0}")]
    Invalid(String),
    /// An encrypted batch was read without its segment's data key.
    #[error("batch is encrypted and no data key was given")]
    KeyRequired,
    /// The body checksum is right but the SM4-GCM tag is not: the ciphertext, tag or
    /// header was altered after it was written (a torn write fails the CRC first).
    #[error("batch failed SM4-GCM authentication (body or header altered, or the wrong data key)")]
    Authentication,
}

/// CRC32C salted with the segment number. Why: a recycled segment keeps its old
/// bytes; seeding with the number makes those stale batches fail validation.
pub fn salted_crc(segment_no: u64, bytes: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&segment_no.to_le_bytes()), bytes)
}

/// Rounds `n` up to the next multiple of [`BLOCK_SIZE`].
pub fn align_up(n: u64) -> u64 {
    n.div_ceil(BLOCK_SIZE as u64) * BLOCK_SIZE as u64
}

/// On-disk length (header + body + padding) of a batch with `body_len` body bytes.
pub fn batch_disk_len(body_len: u64) -> u64 {
    align_up(BATCH_HEADER_LEN as u64 + body_len)
}

pub fn is_zero(bytes: &[u8]) -> bool {
    bytes.iter().all(|&b| b == 0)
}

pub(crate) use ferry_codec::{rd_u16, rd_u32, rd_u64};

// ---------------------------------------------------------------- segment header

/// Header at offset 0 of every active segment file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    pub segment_no: u64,
    pub cluster_id: [u8; 16],
    /// Sequence of the first record in this segment.
    pub first_seq: Seq,
    /// File size the segment was created with.
    pub segment_size: u64,
    /// Most batch writes the writer had in flight at once in this segment (>= 1).
    /// Recovery tolerates a torn tail of up to this many batches. Stored as 0
    /// when 1, so a depth-1 header is byte-identical to the original v1 layout.
    pub max_inflight: u32,
    /// Flags bit 0 ([`SEGMENT_FLAG_SEQ_JUMP`]): `first_seq` does not continue the
    /// previous data segment; the sequences in between were skipped on purpose
    /// ([`crate::Journal::skip_to`], a standby resync). Recovery accepts a gap
    /// (never an overlap) only in front of such a segment.
    pub seq_jump: bool,
}

/// Segment header flag: this segment's `first_seq` jumps over sequences that were
/// never written (see [`SegmentHeader::seq_jump`]).
pub const SEGMENT_FLAG_SEQ_JUMP: u16 = 1;

/// Encodes the 64 meaningful bytes; the caller writes them into a zeroed 4 KiB block.
pub fn encode_segment_header(h: &SegmentHeader) -> [u8; SEGMENT_HEADER_LEN] {
    encode_segment_header_version(h, FORMAT_VERSION)
}

fn encode_segment_header_version(h: &SegmentHeader, version: u16) -> [u8; SEGMENT_HEADER_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_LEN];
    b[0..8].copy_from_slice(&SEGMENT_MAGIC);
    b[8..10].copy_from_slice(&version.to_le_bytes());
    // 10..12 flags (0 unless the segment jumps), 12..16 header block size
    let flags = if h.seq_jump { SEGMENT_FLAG_SEQ_JUMP } else { 0 };
    b[10..12].copy_from_slice(&flags.to_le_bytes());
    b[12..16].copy_from_slice(&(BLOCK_SIZE as u32).to_le_bytes());
    b[16..24].copy_from_slice(&h.segment_no.to_le_bytes());
    b[24..40].copy_from_slice(&h.cluster_id);
    b[40..48].copy_from_slice(&h.first_seq.to_le_bytes());
    b[48..56].copy_from_slice(&h.segment_size.to_le_bytes());
    // 56..60 max_inflight (0 means 1; written as 0 for depth 1)
    let depth = if h.max_inflight <= 1 {
        0
    } else {
        h.max_inflight
    };
    b[56..60].copy_from_slice(&depth.to_le_bytes());
    let crc = salted_crc(h.segment_no, &b[0..60]);
    b[60..64].copy_from_slice(&crc.to_le_bytes());
    b
}

/// What an encrypted segment header adds: the id of the KEK and the segment's data
/// key wrapped under it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentKeyInfo {
    pub key_id: KeyId,
    pub wrapped: WrappedKey,
}

/// The bytes of an encrypted segment header that its wrapped data key is bound to
/// (the AAD of the wrap): the v1 fields with version 2, and the key id.
pub fn segment_key_aad(h: &SegmentHeader, key_id: KeyId) -> [u8; SEGMENT_AAD_LEN] {
    let mut b = [0u8; SEGMENT_AAD_LEN];
    b[..SEGMENT_HEADER_LEN]
        .copy_from_slice(&encode_segment_header_version(h, FORMAT_VERSION_ENCRYPTED));
    b[SEGMENT_HEADER_LEN..].copy_from_slice(&key_id.0);
    b
}

/// Encodes an encrypted (version 2) segment header: bytes 0..64 laid out as in
/// version 1 (so older code sees a valid checksum and refuses the version), then
/// the key id, the wrapped data key, 8 reserved zero bytes and a second CRC.
pub fn encode_segment_header_encrypted(
    h: &SegmentHeader,
    key: &SegmentKeyInfo,
) -> [u8; SEGMENT_HEADER_V2_LEN] {
    let mut b = [0u8; SEGMENT_HEADER_V2_LEN];
    b[..SEGMENT_AAD_LEN].copy_from_slice(&segment_key_aad(h, key.key_id));
    b[SEGMENT_AAD_LEN..SEGMENT_AAD_LEN + WRAPPED_KEY_LEN].copy_from_slice(&key.wrapped.0);
    // 116..124 reserved (0)
    let crc = salted_crc(h.segment_no, &b[..124]);
    b[124..128].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a version 1 segment header for the file named `segment_no` (an
/// encrypted one is `UnsupportedVersion(2)`: see [`decode_segment_header_any`]).
/// `Err(Zero)` means the header was never written (a prepared spare or a torn
/// activation write).
pub fn decode_segment_header(b: &[u8], segment_no: u64) -> Result<SegmentHeader, FormatError> {
    match decode_segment_header_any(b, segment_no)? {
        (h, None) => Ok(h),
        (_, Some(_)) => Err(FormatError::UnsupportedVersion(FORMAT_VERSION_ENCRYPTED)),
    }
}

/// Decodes a segment header of either version; the key info is `Some` for an
/// encrypted (version 2) one. `b` should hold the whole header block.
pub fn decode_segment_header_any(
    b: &[u8],
    segment_no: u64,
) -> Result<(SegmentHeader, Option<SegmentKeyInfo>), FormatError> {
    let h = decode_segment_header_fields(b, segment_no)?;
    if rd_u16(b, 8) == FORMAT_VERSION {
        return Ok((h, None));
    }
    // Version 2: the first 64 bytes verified; the key part has its own CRC, so a
    // header torn between the two parts is a bad header (HeaderCrc), never misread.
    if b.len() < SEGMENT_HEADER_V2_LEN {
        return Err(FormatError::Truncated {
            need: SEGMENT_HEADER_V2_LEN,
            have: b.len(),
        });
    }
    let stored = rd_u32(b, 124);
    let computed = salted_crc(segment_no, &b[..124]);
    if stored != computed {
        return Err(FormatError::HeaderCrc { stored, computed });
    }
    if !is_zero(&b[116..124]) {
        return Err(FormatError::Invalid(
            "encrypted segment header reserved bytes not zero".into(),
        ));
    }
    let mut key_id = [0u8; KEY_ID_LEN];
    key_id.copy_from_slice(&b[SEGMENT_HEADER_LEN..SEGMENT_AAD_LEN]);
    let mut wrapped = [0u8; WRAPPED_KEY_LEN];
    wrapped.copy_from_slice(&b[SEGMENT_AAD_LEN..SEGMENT_AAD_LEN + WRAPPED_KEY_LEN]);
    let key = SegmentKeyInfo {
        key_id: KeyId(key_id),
        wrapped: WrappedKey(wrapped),
    };
    Ok((h, Some(key)))
}

/// Meaningful bytes of a segment header with this version (the rest of the block
/// must be zero).
pub fn segment_header_len(encrypted: bool) -> usize {
    if encrypted {
        SEGMENT_HEADER_V2_LEN
    } else {
        SEGMENT_HEADER_LEN
    }
}

/// The 64 bytes shared by both versions, checked (first CRC, fields).
fn decode_segment_header_fields(b: &[u8], segment_no: u64) -> Result<SegmentHeader, FormatError> {
    if b.len() < SEGMENT_HEADER_LEN {
        return Err(FormatError::Truncated {
            need: SEGMENT_HEADER_LEN,
            have: b.len(),
        });
    }
    let b = &b[..SEGMENT_HEADER_LEN];
    if is_zero(b) {
        return Err(FormatError::Zero);
    }
    if b[0..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadMagic {
            found: b[0..8].to_vec(),
        });
    }
    let stored = rd_u32(b, 60);
    let computed = salted_crc(segment_no, &b[0..60]);
    if stored != computed {
        let written_for = rd_u64(b, 16);
        if written_for != segment_no && salted_crc(written_for, &b[0..60]) == stored {
            return Err(FormatError::Stale {
                written_for,
                segment: segment_no,
            });
        }
        return Err(FormatError::HeaderCrc { stored, computed });
    }
    let version = rd_u16(b, 8);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_ENCRYPTED {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let flags = rd_u16(b, 10);
    let block = rd_u32(b, 12);
    let depth = rd_u32(b, 56);
    if flags & !SEGMENT_FLAG_SEQ_JUMP != 0
        || block as usize != BLOCK_SIZE
        || depth > MAX_INFLIGHT_BATCHES
    {
        return Err(FormatError::Invalid(format!(
            "segment header flags {flags} / block size {block} / max_inflight {depth}"
        )));
    }
    let mut cluster_id = [0u8; 16];
    cluster_id.copy_from_slice(&b[24..40]);
    let h = SegmentHeader {
        segment_no: rd_u64(b, 16),
        cluster_id,
        first_seq: rd_u64(b, 40),
        segment_size: rd_u64(b, 48),
        max_inflight: depth.max(1),
        seq_jump: flags & SEGMENT_FLAG_SEQ_JUMP != 0,
    };
    if h.segment_no != segment_no {
        return Err(FormatError::Invalid(format!(
            "segment header names segment {}, file is {segment_no}",
            h.segment_no
        )));
    }
    if h.first_seq == 0 {
        return Err(FormatError::Invalid("segment first_seq is 0".into()));
    }
    if !is_block_aligned(h.segment_size) || h.segment_size < 2 * BLOCK_SIZE as u64 {
        return Err(FormatError::Invalid(format!(
            "segment size {} not a multiple of 4 KiB",
            h.segment_size
        )));
    }
    Ok(h)
}

// ---------------------------------------------------------------- batch header

/// Fixed header in front of every batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    pub flags: u16,
    pub segment_no: u64,
    pub cluster_id: [u8; 16],
    pub epoch: u64,
    pub first_seq: Seq,
    pub last_seq: Seq,
    pub timestamp_ns: u64,
    pub record_count: u32,
    /// Body bytes (record headers + data, and the tag when `encrypted`), excluding
    /// padding.
    pub body_len: u32,
    pub body_crc: u32,
    /// Version 2: the body is SM4-GCM ciphertext of the records followed by its tag.
    pub encrypted: bool,
}

impl BatchHeader {
    /// Bytes the whole batch occupies on disk (multiple of 4 KiB).
    pub fn disk_len(&self) -> u64 {
        batch_disk_len(self.body_len as u64)
    }
}

pub fn encode_batch_header(h: &BatchHeader) -> [u8; BATCH_HEADER_LEN] {
    let mut b = [0u8; BATCH_HEADER_LEN];
    b[0..4].copy_from_slice(&BATCH_MAGIC);
    let version = if h.encrypted {
        FORMAT_VERSION_ENCRYPTED
    } else {
        FORMAT_VERSION
    };
    b[4..6].copy_from_slice(&version.to_le_bytes());
    b[6..8].copy_from_slice(&h.flags.to_le_bytes());
    b[8..16].copy_from_slice(&h.segment_no.to_le_bytes());
    b[16..32].copy_from_slice(&h.cluster_id);
    b[32..40].copy_from_slice(&h.epoch.to_le_bytes());
    b[40..48].copy_from_slice(&h.first_seq.to_le_bytes());
    b[48..56].copy_from_slice(&h.last_seq.to_le_bytes());
    b[56..64].copy_from_slice(&h.timestamp_ns.to_le_bytes());
    b[64..68].copy_from_slice(&h.record_count.to_le_bytes());
    b[68..72].copy_from_slice(&h.body_len.to_le_bytes());
    b[72..76].copy_from_slice(&h.body_crc.to_le_bytes());
    let crc = salted_crc(h.segment_no, &b[0..76]);
    b[76..80].copy_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes and validates a batch header read from segment `segment_no`.
pub fn decode_batch_header(b: &[u8], segment_no: u64) -> Result<BatchHeader, FormatError> {
    if b.len() < BATCH_HEADER_LEN {
        return Err(FormatError::Truncated {
            need: BATCH_HEADER_LEN,
            have: b.len(),
        });
    }
    let b = &b[..BATCH_HEADER_LEN];
    if is_zero(b) {
        return Err(FormatError::Zero);
    }
    if b[0..4] != BATCH_MAGIC {
        return Err(FormatError::BadMagic {
            found: b[0..4].to_vec(),
        });
    }
    let stored = rd_u32(b, 76);
    let computed = salted_crc(segment_no, &b[0..76]);
    if stored != computed {
        let written_for = rd_u64(b, 8);
        if written_for != segment_no && salted_crc(written_for, &b[0..76]) == stored {
            return Err(FormatError::Stale {
                written_for,
                segment: segment_no,
            });
        }
        return Err(FormatError::HeaderCrc { stored, computed });
    }
    let version = rd_u16(b, 4);
    if version != FORMAT_VERSION && version != FORMAT_VERSION_ENCRYPTED {
        return Err(FormatError::UnsupportedVersion(version));
    }
    let mut cluster_id = [0u8; 16];
    cluster_id.copy_from_slice(&b[16..32]);
    let h = BatchHeader {
        flags: rd_u16(b, 6),
        segment_no: rd_u64(b, 8),
        cluster_id,
        epoch: rd_u64(b, 32),
        first_seq: rd_u64(b, 40),
        last_seq: rd_u64(b, 48),
        timestamp_ns: rd_u64(b, 56),
        record_count: rd_u32(b, 64),
        body_len: rd_u32(b, 68),
        body_crc: rd_u32(b, 72),
        encrypted: version == FORMAT_VERSION_ENCRYPTED,
    };
    if h.flags & !BATCH_FLAGS_KNOWN != 0 {
        return Err(FormatError::Invalid(format!(
            "unknown batch flags {:#06x}",
            h.flags
        )));
    }
    if h.segment_no != segment_no {
        return Err(FormatError::Invalid(format!(
            "batch names segment {}, file is {segment_no}",
            h.segment_no
        )));
    }
    if h.record_count == 0 || h.first_seq == 0 || h.last_seq < h.first_seq {
        return Err(FormatError::Invalid(format!(
            "batch seq range {}..={} with {} records",
            h.first_seq, h.last_seq, h.record_count
        )));
    }
    if h.last_seq - h.first_seq != h.record_count as u64 - 1 {
        return Err(FormatError::Invalid(format!(
            "batch seq range {}..={} does not match {} records",
            h.first_seq, h.last_seq, h.record_count
        )));
    }
    let tag = if h.encrypted { BODY_TAG_LEN as u64 } else { 0 };
    if (h.body_len as u64) < h.record_count as u64 * RECORD_HEADER_LEN as u64 + tag {
        return Err(FormatError::Invalid(format!(
            "body_len {} too small for {} records",
            h.body_len, h.record_count
        )));
    }
    Ok(h)
}

// ---------------------------------------------------------------- record header

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub seq: Seq,
    pub offset: u64,
    pub volume: u32,
    pub length: u32,
    pub data_len: u32,
    pub op: Op,
}

pub fn encode_record_header(h: &RecordHeader) -> [u8; RECORD_HEADER_LEN] {
    let mut b = [0u8; RECORD_HEADER_LEN];
    b[0..8].copy_from_slice(&h.seq.to_le_bytes());
    b[8..16].copy_from_slice(&h.offset.to_le_bytes());
    b[16..20].copy_from_slice(&h.volume.to_le_bytes());
    b[20..24].copy_from_slice(&h.length.to_le_bytes());
    b[24..28].copy_from_slice(&h.data_len.to_le_bytes());
    b[28] = h.op as u8;
    b
}

pub fn decode_record_header(b: &[u8]) -> Result<RecordHeader, FormatError> {
    if b.len() < RECORD_HEADER_LEN {
        return Err(FormatError::Truncated {
            need: RECORD_HEADER_LEN,
            have: b.len(),
        });
    }
    let op =
        Op::from_u8(b[28]).ok_or_else(|| FormatError::Invalid(format!("unknown op {}", b[28])))?;
    if b[29..32] != [0, 0, 0] {
        return Err(FormatError::Invalid(
            "record reserved bytes not zero".into(),
        ));
    }
    Ok(RecordHeader {
        seq: rd_u64(b, 0),
        offset: rd_u64(b, 8),
        volume: rd_u32(b, 16),
        length: rd_u32(b, 20),
        data_len: rd_u32(b, 24),
        op,
    })
}

// ---------------------------------------------------------------- whole batches

/// Parameters of a batch to encode (everything except the records).
#[derive(Debug, Clone, Copy)]
pub struct BatchParams {
    pub segment_no: u64,
    pub cluster_id: [u8; 16],
    pub epoch: u64,
    pub first_seq: Seq,
    pub timestamp_ns: u64,
}

/// Body length of a batch holding `records`.
pub fn body_len<'a>(records: impl IntoIterator<Item = &'a Record>) -> u64 {
    records.into_iter().map(|r| r.encoded_len() as u64).sum()
}

/// Encodes a batch (header, body, zero padding) into the front of `out`, which must
/// be at least `batch_disk_len(body_len(records))` bytes. Returns the header and the
/// number of bytes used (a multiple of 4 KiB). Records get consecutive sequences
/// starting at `p.first_seq`.
pub fn encode_batch<'a>(
    out: &mut [u8],
    p: &BatchParams,
    records: impl IntoIterator<Item = &'a Record>,
) -> Result<(BatchHeader, usize), FormatError> {
    encode_batch_with_crcs(out, p, records.into_iter().map(|r| (r, None)))
}

/// Records at least this large are worth checksumming ahead of the batch (see
/// [`data_crc`]); below it the writer's own pass over the freshly copied, cache-hot
/// body is cheaper than combining.
pub const PRECOMPUTE_CRC_MIN: usize = 128 << 10;

/// Plain CRC32C (seed 0) of a record's data, for [`encode_batch_with_crcs`]. Why:
/// the journal writer is one thread; appenders compute this for large records in
/// parallel, while the data is still in their cache, and the writer only combines.
pub fn data_crc(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// CRC32C's reflected polynomial.
const CRC32C_POLY: u32 = 0x82F6_3B78;

/// a(x)·b(x) mod P(x), both in CRC32C's reflected representation (bit 31 = x^0).
const fn multmodp(a: u32, mut b: u32) -> u32 {
    let mut m = 1u32 << 31;
    let mut p = 0u32;
    loop {
        if a & m != 0 {
            p ^= b;
            if a & (m - 1) == 0 {
                break;
            }
        }
        m >>= 1;
        b = if b & 1 != 0 {
            (b >> 1) ^ CRC32C_POLY
        } else {
            b >> 1
        };
    }
    p
}

/// x^(2^n) mod P(x) for n in 0..67 (reflected): enough for any `8 · len` of a u64
/// length, without assuming the cycle `x^(2^32) = x` (true only for an irreducible P).
const X2N: [u32; 67] = {
    let mut t = [0u32; 67];
    t[0] = 1 << 30; // x^1
    let mut n = 1;
    while n < 67 {
        t[n] = multmodp(t[n - 1], t[n - 1]);
        n += 1;
    }
    t
};

/// CRC32C of A‖B from crc(A), crc(B) and |B|, in O(log |B|) carry-less products.
/// Why not `crc32c::crc32c_combine`: that is zlib's old matrix-squaring method,
/// ~10 µs per call for 1 MiB, which on the single journal writer thread cost a
/// third of what the checksum it replaces did.
pub fn crc32c_combine(crc1: u32, crc2: u32, len2: usize) -> u32 {
    // x^(8·len2) mod P: multiply x^(2^k) for each bit k of 8·len2.
    let mut n = len2 as u64;
    let mut k = 3usize;
    let mut xp = 1u32 << 31; // x^0
    while n != 0 {
        if n & 1 != 0 {
            xp = multmodp(X2N[k], xp);
        }
        n >>= 1;
        k += 1;
    }
    multmodp(xp, crc1) ^ crc2
}

/// [`encode_batch`], with each record's [`data_crc`] given where the caller already
/// has it. The bytes written are identical; only the work differs: record data with a
/// known CRC is copied and folded in by `crc32c_combine` instead of read twice.
pub fn encode_batch_with_crcs<'a>(
    out: &mut [u8],
    p: &BatchParams,
    records: impl IntoIterator<Item = (&'a Record, Option<u32>)>,
) -> Result<(BatchHeader, usize), FormatError> {
    let laid = lay_out_records(out, p, records, true)?;
    finish_batch(out, p, &laid, laid.crc, false)
}

/// Records written into a batch buffer by [`lay_out_records`].
struct LaidOut {
    /// End of the body in the buffer.
    pos: usize,
    count: u32,
    flags: u16,
    /// Salted CRC of the body (when asked for).
    crc: u32,
}

/// Writes the record headers and data after the batch header; with `want_crc` also
/// the salted body CRC (using the records' known data CRCs).
fn lay_out_records<'a>(
    out: &mut [u8],
    p: &BatchParams,
    records: impl IntoIterator<Item = (&'a Record, Option<u32>)>,
    want_crc: bool,
) -> Result<LaidOut, FormatError> {
    let mut pos = BATCH_HEADER_LEN;
    // Running salted CRC of the body up to `crc_pos`; bytes in [crc_pos, pos) are not
    // folded in yet (small records are checksummed in runs, after copying).
    let mut crc = salted_crc(p.segment_no, &[]);
    let mut crc_pos = pos;
    let mut count: u64 = 0;
    let mut flags = 0u16;
    for (rec, known) in records {
        validate_record(rec).map_err(FormatError::Invalid)?;
        let need = pos + rec.encoded_len();
        if need > out.len() {
            return Err(FormatError::Truncated {
                need,
                have: out.len(),
            });
        }
        if rec.op == Op::Seal {
            flags |= BATCH_FLAG_HAS_SEAL;
        }
        let rh = RecordHeader {
            seq: p.first_seq + count,
            offset: rec.offset,
            volume: rec.volume,
            length: rec.length,
            data_len: rec.data.len() as u32,
            op: rec.op,
        };
        out[pos..pos + RECORD_HEADER_LEN].copy_from_slice(&encode_record_header(&rh));
        pos += RECORD_HEADER_LEN;
        out[pos..pos + rec.data.len()].copy_from_slice(&rec.data);
        if let (Some(dcrc), true) = (known, want_crc) {
            crc = crc32c::crc32c_append(crc, &out[crc_pos..pos]);
            crc = crc32c_combine(crc, dcrc, rec.data.len());
            crc_pos = pos + rec.data.len();
        }
        pos += rec.data.len();
        count += 1;
    }
    if want_crc {
        crc = crc32c::crc32c_append(crc, &out[crc_pos..pos]);
    }
    if count == 0 || p.first_seq == 0 {
        return Err(FormatError::Invalid("empty batch or first_seq 0".into()));
    }
    let count =
        u32::try_from(count).map_err(|_| FormatError::Invalid("too many records".into()))?;
    Ok(LaidOut {
        pos,
        count,
        flags,
        crc,
    })
}

/// The header for a batch whose body ends at `end` in `out`: zero padding, header.
fn finish_batch(
    out: &mut [u8],
    p: &BatchParams,
    laid: &LaidOut,
    body_crc: u32,
    encrypted: bool,
) -> Result<(BatchHeader, usize), FormatError> {
    let h = batch_header_for(out.len(), p, laid, body_crc, encrypted)?;
    let end = BATCH_HEADER_LEN + h.body_len as usize;
    let disk = h.disk_len() as usize;
    out[end..disk].fill(0);
    out[..BATCH_HEADER_LEN].copy_from_slice(&encode_batch_header(&h));
    Ok((h, disk))
}

/// The header of a batch laid out as `laid` (plus the tag when `encrypted`), checked
/// to fit a buffer of `have` bytes.
fn batch_header_for(
    have: usize,
    p: &BatchParams,
    laid: &LaidOut,
    body_crc: u32,
    encrypted: bool,
) -> Result<BatchHeader, FormatError> {
    let body = laid.pos - BATCH_HEADER_LEN + if encrypted { BODY_TAG_LEN } else { 0 };
    let body_len = u32::try_from(body)
        .map_err(|_| FormatError::Invalid(format!("body {body} bytes exceeds u32")))?;
    let disk = batch_disk_len(body as u64) as usize;
    if disk > have {
        return Err(FormatError::Truncated { need: disk, have });
    }
    Ok(BatchHeader {
        flags: laid.flags,
        segment_no: p.segment_no,
        cluster_id: p.cluster_id,
        epoch: p.epoch,
        first_seq: p.first_seq,
        last_seq: p.first_seq + laid.count as u64 - 1,
        timestamp_ns: p.timestamp_ns,
        record_count: laid.count,
        body_len,
        body_crc,
        encrypted,
    })
}

/// Body length of an encrypted batch holding `records` (records and the tag).
pub fn sealed_body_len<'a>(records: impl IntoIterator<Item = &'a Record>) -> u64 {
    body_len(records) + BODY_TAG_LEN as u64
}

/// SM4-GCM nonce index of the batch at `offset` in its segment: its 4 KiB block
/// number. Unique within one activation of a segment (the writer writes each
/// offset once per activation, see FORMAT.md "Encryption at rest").
fn batch_nonce_index(offset: u64) -> Result<u32, FormatError> {
    if !is_block_aligned(offset) {
        return Err(FormatError::Invalid(format!(
            "batch offset {offset} not 4 KiB aligned"
        )));
    }
    u32::try_from(offset / BLOCK_SIZE as u64)
        .map_err(|_| FormatError::Invalid(format!("batch offset {offset} beyond 16 TiB")))
}

/// [`encode_batch`] for an encrypted segment: the body (record headers and data) is
/// sealed with SM4-GCM under the segment's data key, nonce (segment number, block
/// number of `offset`, where the batch is written), AAD the header up to `body_len`;
/// the 16-byte tag follows the ciphertext and the body CRC covers both.
pub fn encode_batch_sealed<'a>(
    out: &mut [u8],
    p: &BatchParams,
    records: impl IntoIterator<Item = &'a Record>,
    key: &DataKey,
    offset: u64,
) -> Result<(BatchHeader, usize), FormatError> {
    let index = batch_nonce_index(offset)?;
    let laid = lay_out_records(out, p, records.into_iter().map(|r| (r, None)), false)?;
    let h = batch_header_for(out.len(), p, &laid, 0, true)?;
    let aad = encode_batch_header(&h);
    let (body, rest) = out[BATCH_HEADER_LEN..].split_at_mut(laid.pos - BATCH_HEADER_LEN);
    let tag = key
        .seal(p.segment_no, index, &aad[..BATCH_AAD_LEN], body)
        .map_err(|e| FormatError::Invalid(format!("sealing batch: {e}")))?;
    rest[..BODY_TAG_LEN].copy_from_slice(&tag);
    let end = laid.pos + BODY_TAG_LEN;
    let crc = salted_crc(p.segment_no, &out[BATCH_HEADER_LEN..end]);
    finish_batch(out, p, &laid, crc, true)
}

/// Convenience for tests, benches and fuzzers: encodes a batch into a new Vec.
pub fn encode_batch_vec(p: &BatchParams, records: &[Record]) -> Result<Vec<u8>, FormatError> {
    let mut out = vec![0u8; batch_disk_len(body_len(records)) as usize];
    let (_, n) = encode_batch(&mut out, p, records)?;
    out.truncate(n);
    Ok(out)
}

/// Verifies the body checksum and decodes the records of a batch. `body` must be
/// exactly `h.body_len` bytes (the bytes after the header); records' data are
/// zero-copy slices of it.
pub fn decode_batch_body(h: &BatchHeader, body: &Bytes) -> Result<Vec<(Seq, Record)>, FormatError> {
    decode_batch_body_at(h, body, 0, None)
}

/// Checks a batch body's length and salted CRC (no key needed: for an encrypted
/// batch the CRC covers the ciphertext and tag, so a torn write shows here).
pub fn check_body_crc(h: &BatchHeader, body: &[u8]) -> Result<(), FormatError> {
    if body.len() != h.body_len as usize {
        return Err(FormatError::Truncated {
            need: h.body_len as usize,
            have: body.len(),
        });
    }
    let computed = salted_crc(h.segment_no, body);
    if computed != h.body_crc {
        return Err(FormatError::BodyCrc {
            stored: h.body_crc,
            computed,
        });
    }
    Ok(())
}

/// [`decode_batch_body`] for a batch read at `offset` of its segment, with the
/// segment's data key when it is encrypted: CRC first (torn writes), then the tag
/// ([`FormatError::Authentication`]), then the records. A plaintext batch in an
/// encrypted segment (`key` given) is `Invalid`; an encrypted one without a key is
/// [`FormatError::KeyRequired`].
pub fn decode_batch_body_at(
    h: &BatchHeader,
    body: &Bytes,
    offset: u64,
    key: Option<&DataKey>,
) -> Result<Vec<(Seq, Record)>, FormatError> {
    check_body_crc(h, body)?;
    match (h.encrypted, key) {
        (false, None) => decode_records(h, body),
        (true, None) => Err(FormatError::KeyRequired),
        (false, Some(_)) => Err(FormatError::Invalid(
            "plaintext (version 1) batch in an encrypted segment".into(),
        )),
        (true, Some(k)) => {
            let index = batch_nonce_index(offset)?;
            let split = body.len().checked_sub(BODY_TAG_LEN).ok_or_else(|| {
                FormatError::Invalid(format!("encrypted body of {} bytes", body.len()))
            })?;
            let mut tag = [0u8; BODY_TAG_LEN];
            tag.copy_from_slice(&body[split..]);
            let mut plain = body[..split].to_vec();
            let aad = encode_batch_header(h);
            k.open(h.segment_no, index, &aad[..BATCH_AAD_LEN], &mut plain, &tag)
                .map_err(|_| FormatError::Authentication)?;
            decode_records(h, &Bytes::from(plain))
        }
    }
}

/// The records of a body whose checksum (and tag) verified; `body` holds exactly
/// the record headers and data.
fn decode_records(h: &BatchHeader, body: &Bytes) -> Result<Vec<(Seq, Record)>, FormatError> {
    // The count comes from a checksummed header, but cap the pre-allocation anyway.
    let mut out = Vec::with_capacity((h.record_count as usize).min(body.len() / RECORD_HEADER_LEN));
    let mut pos = 0usize;
    for i in 0..h.record_count as u64 {
        let rh = decode_record_header(&body[pos.min(body.len())..])
            .map_err(|e| FormatError::Invalid(format!("record {i} at body offset {pos}: {e}")))?;
        pos += RECORD_HEADER_LEN;
        let expect_seq = h.first_seq + i;
        if rh.seq != expect_seq {
            return Err(FormatError::Invalid(format!(
                "record {i} has seq {}, expected {expect_seq}",
                rh.seq
            )));
        }
        let end = pos
            .checked_add(rh.data_len as usize)
            .filter(|&e| e <= body.len())
            .ok_or_else(|| {
                FormatError::Invalid(format!(
                    "record seq {} data length {} overruns body",
                    rh.seq, rh.data_len
                ))
            })?;
        let rec = Record {
            volume: rh.volume,
            op: rh.op,
            offset: rh.offset,
            length: rh.length,
            data: body.slice(pos..end),
        };
        validate_record(&rec)
            .map_err(|e| FormatError::Invalid(format!("record seq {}: {e}", rh.seq)))?;
        if rec.op == Op::Seal && h.flags & BATCH_FLAG_HAS_SEAL == 0 {
            return Err(FormatError::Invalid(
                "seal record in batch without HAS_SEAL flag".into(),
            ));
        }
        pos = end;
        out.push((rh.seq, rec));
    }
    if pos != body.len() {
        return Err(FormatError::Invalid(format!(
            "{} trailing body bytes",
            body.len() - pos
        )));
    }
    Ok(out)
}
