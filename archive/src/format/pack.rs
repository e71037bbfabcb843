//! A pack: consecutive whole write-sets of one epoch, compressed, in one object.
//! Pure: bytes in, bytes out (zstd is computation, not IO). Layout in FORMAT.md.
//!
//! Version 2 (what [`encode`] writes) puts an extent index between the header and
//! the body: every record without its payload, writes with their offset in the
//! uncompressed body. A reader that only needs to know *where* a pack wrote (an
//! archive view opening a point, a restore choosing which packs it needs) range-reads
//! the header and the index ([`decode_header`], [`index_range`], [`decode_index`])
//! instead of the whole object. Version 1 packs (no index) still decode; their index
//! is computed from the body ([`index_of`]).
//!
//! Decoding never trusts a length it has not checked against the bytes it holds and
//! against [`MAX_RAW_LEN`]: a pack comes from a bucket other people can write to.
use bytes::Bytes;
use ferry_codec::{rd_u16, rd_u32, rd_u64, wr_u16, wr_u32, wr_u64};
use sm3::{Digest, Sm3};

use super::FormatError;

pub const MAGIC: [u8; 8] = *b"FERRYPK\0";
/// What [`encode`] writes: with an extent index.
pub const VERSION: u16 = 2;
/// The first layout, without an index: still read.
pub const VERSION_1: u16 = 1;
/// Version 1's header.
pub const HEADER_LEN: usize = 72;
/// Version 2's header (the index's lengths and SM3 added).
pub const HEADER_LEN_V2: usize = 112;
pub const DIGEST_LEN: usize = 32;
/// Largest uncompressed body a reader accepts (and a writer makes): memory for one
/// pack stays bounded whatever the object claims.
pub const MAX_RAW_LEN: usize = 128 << 20;
/// Largest single write payload (ferry's NBD frontend accepts at most 64 MiB).
pub const MAX_PAYLOAD: u32 = 64 << 20;
const FLAG_ZSTD: u16 = 1;
/// Version 2: an extent index follows the header.
const FLAG_INDEX: u16 = 2;
const WS_HEADER_LEN: usize = 20;
const REC_HEADER_LEN: usize = 25;

/// What a record does to its volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    Write(Bytes),
    /// Discard: reads as zeros afterwards (the archive does not keep holes apart).
    Trim,
    Zero,
    /// A named point (bookmark) at the end of a write-set; `offset`/`len` unused.
    Seal(String),
}

impl Op {
    fn kind(&self) -> u8 {
        match self {
            Op::Write(_) => 1,
            Op::Trim => 2,
            Op::Zero => 3,
            Op::Seal(_) => 4,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    pub volume: u32,
    pub offset: u64,
    /// Bytes affected (for a write, the payload's length).
    pub len: u32,
    pub op: Op,
}

/// A write-set: the unit of consistency; restore points are their ends.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteSet {
    /// Sequence of the write-set's last record (its boundary).
    pub end_seq: u64,
    /// The primary's time of the write-set (ns since the Unix epoch).
    pub timestamp_ns: u64,
    pub records: Vec<Record>,
}

impl WriteSet {
    /// Bytes this write-set takes in a pack body.
    pub fn encoded_len(&self) -> usize {
        WS_HEADER_LEN
            + self
                .records
                .iter()
                .map(|r| REC_HEADER_LEN + payload(&r.op).len())
                .sum::<usize>()
    }
}

fn payload(op: &Op) -> &[u8] {
    match op {
        Op::Write(b) => b,
        Op::Seal(l) => l.as_bytes(),
        Op::Trim | Op::Zero => &[],
    }
}

/// A pack's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PackHeader {
    /// [`VERSION_1`] or [`VERSION`].
    pub version: u16,
    pub epoch: u64,
    pub write_sets: u32,
    pub first_seq: u64,
    pub last_seq: u64,
    pub first_ts: u64,
    pub last_ts: u64,
    pub raw_len: u32,
    pub body_len: u32,
    /// The extent index, uncompressed and as stored (0 in version 1).
    pub index_raw_len: u32,
    pub index_len: u32,
    /// SM3 of the stored index bytes (zeros in version 1).
    pub index_sm3: [u8; 32],
}

impl PackHeader {
    /// Bytes before the index (or, in version 1, the body).
    pub fn header_len(&self) -> usize {
        if self.version == VERSION_1 {
            HEADER_LEN
        } else {
            HEADER_LEN_V2
        }
    }

    /// The whole object's length.
    pub fn object_len(&self) -> usize {
        self.header_len() + self.index_len as usize + self.body_len as usize + DIGEST_LEN
    }
}

/// An encoded pack and what its manifest entry needs.
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub header: PackHeader,
    /// SM3 of the header and body: the object's last 32 bytes.
    pub sm3: [u8; 32],
}

/// Encodes `sets` (non-empty, in order) of `epoch` as a version-2 pack (with its
/// extent index); `level` is zstd's.
pub fn encode(epoch: u64, sets: &[WriteSet], level: i32) -> Result<Encoded, FormatError> {
    encode_version(epoch, sets, level, VERSION)
}

/// [`encode`] in layout `version`: [`VERSION_1`] is what ferry wrote before the extent
/// index (kept so tests can show that readers still take such packs).
pub fn encode_version(
    epoch: u64,
    sets: &[WriteSet],
    level: i32,
    version: u16,
) -> Result<Encoded, FormatError> {
    let (Some(first), Some(last)) = (sets.first(), sets.last()) else {
        return Err(FormatError::Invalid(
            "a pack holds at least one write-set".into(),
        ));
    };
    if version != VERSION && version != VERSION_1 {
        return Err(FormatError::Version(version));
    }
    let raw = encode_body(sets)?;
    let body =
        zstd::bulk::compress(&raw, level).map_err(|e| FormatError::Compress(e.to_string()))?;
    let index = if version == VERSION {
        let raw_index = encode_index(&index_of(sets));
        let z = zstd::bulk::compress(&raw_index, level)
            .map_err(|e| FormatError::Compress(e.to_string()))?;
        Some((raw_index.len(), z))
    } else {
        None
    };
    let first_seq = first.records.first().map_or(first.end_seq, |r| r.seq);
    let header = PackHeader {
        version,
        epoch,
        write_sets: sets.len() as u32,
        first_seq,
        last_seq: last.end_seq,
        first_ts: first.timestamp_ns,
        last_ts: last.timestamp_ns,
        raw_len: raw.len() as u32,
        body_len: body.len() as u32,
        index_raw_len: index.as_ref().map_or(0, |(n, _)| *n as u32),
        index_len: index.as_ref().map_or(0, |(_, z)| z.len() as u32),
        index_sm3: index
            .as_ref()
            .map_or([0; 32], |(_, z)| Sm3::digest(z).into()),
    };
    let mut bytes = vec![0u8; header.header_len()];
    write_header(&mut bytes, &header);
    if let Some((_, z)) = &index {
        bytes.extend_from_slice(z);
    }
    bytes.extend_from_slice(&body);
    let sm3: [u8; 32] = Sm3::digest(&bytes).into();
    bytes.extend_from_slice(&sm3);
    Ok(Encoded { bytes, header, sm3 })
}

fn encode_body(sets: &[WriteSet]) -> Result<Vec<u8>, FormatError> {
    let total: usize = sets.iter().map(WriteSet::encoded_len).sum();
    if total > MAX_RAW_LEN {
        return Err(FormatError::Invalid(format!(
            "{total} bytes of write-sets exceed a pack's {MAX_RAW_LEN}"
        )));
    }
    let mut out = Vec::with_capacity(total);
    let mut prev = 0u64;
    for ws in sets {
        if ws.end_seq <= prev {
            return Err(FormatError::Invalid(format!(
                "write-set {} is not after {prev}",
                ws.end_seq
            )));
        }
        prev = ws.end_seq;
        let mut h = [0u8; WS_HEADER_LEN];
        wr_u64(&mut h, 0, ws.end_seq);
        wr_u64(&mut h, 8, ws.timestamp_ns);
        wr_u32(&mut h, 16, ws.records.len() as u32);
        out.extend_from_slice(&h);
        for r in &ws.records {
            encode_record(&mut out, r, ws.end_seq)?;
        }
    }
    Ok(out)
}

fn encode_record(out: &mut Vec<u8>, r: &Record, end_seq: u64) -> Result<(), FormatError> {
    let p = payload(&r.op);
    if r.seq > end_seq {
        return Err(FormatError::Invalid(format!(
            "record {} after its write-set's end {end_seq}",
            r.seq
        )));
    }
    if p.len() > MAX_PAYLOAD as usize {
        return Err(FormatError::Invalid(format!(
            "a {} byte payload exceeds {MAX_PAYLOAD}",
            p.len()
        )));
    }
    let mut h = [0u8; REC_HEADER_LEN];
    wr_u64(&mut h, 0, r.seq);
    wr_u32(&mut h, 8, r.volume);
    h[12] = r.op.kind();
    wr_u64(&mut h, 13, r.offset);
    let len = match &r.op {
        Op::Write(b) => b.len() as u32,
        Op::Seal(l) => l.len() as u32,
        Op::Trim | Op::Zero => r.len,
    };
    wr_u32(&mut h, 21, len);
    out.extend_from_slice(&h);
    out.extend_from_slice(p);
    Ok(())
}

fn write_header(b: &mut [u8], h: &PackHeader) {
    b[0..8].copy_from_slice(&MAGIC);
    wr_u16(b, 8, h.version);
    let flags = if h.version == VERSION_1 {
        FLAG_ZSTD
    } else {
        FLAG_ZSTD | FLAG_INDEX
    };
    wr_u16(b, 10, flags);
    wr_u32(b, 12, h.write_sets);
    wr_u64(b, 16, h.epoch);
    wr_u64(b, 24, h.first_seq);
    wr_u64(b, 32, h.last_seq);
    wr_u64(b, 40, h.first_ts);
    wr_u64(b, 48, h.last_ts);
    wr_u32(b, 56, h.raw_len);
    wr_u32(b, 60, h.body_len);
    // Version 1 ends its CRC-covered part at 64; version 2 adds the index's lengths
    // and SM3 there, so its CRC moves to 104.
    let crc_at = if h.version == VERSION_1 {
        64
    } else {
        wr_u32(b, 64, h.index_raw_len);
        wr_u32(b, 68, h.index_len);
        b[72..104].copy_from_slice(&h.index_sm3);
        104
    };
    let crc = crc32c::crc32c(&b[..crc_at]);
    wr_u32(b, crc_at, crc);
    wr_u32(b, crc_at + 4, 0);
}

/// Checks magic, version, header CRC and lengths; returns the header. Needs the
/// header's bytes only ([`HEADER_LEN_V2`] covers either version): what a range read
/// of an object's start gives.
pub fn decode_header(b: &[u8]) -> Result<PackHeader, FormatError> {
    if b.len() < HEADER_LEN {
        return Err(FormatError::Truncated {
            need: HEADER_LEN,
            have: b.len(),
        });
    }
    if b[0..8] != MAGIC {
        return Err(FormatError::Invalid("not a ferry pack (bad magic)".into()));
    }
    let version = rd_u16(b, 8);
    let (crc_at, flags) = match version {
        VERSION_1 => (64, FLAG_ZSTD),
        VERSION if b.len() >= HEADER_LEN_V2 => (104, FLAG_ZSTD | FLAG_INDEX),
        VERSION => {
            return Err(FormatError::Truncated {
                need: HEADER_LEN_V2,
                have: b.len(),
            })
        }
        v => return Err(FormatError::Version(v)),
    };
    if rd_u32(b, crc_at) != crc32c::crc32c(&b[..crc_at]) {
        return Err(FormatError::Checksum("pack header"));
    }
    if rd_u16(b, 10) != flags {
        return Err(FormatError::Invalid(format!(
            "unknown pack flags {:#x}",
            rd_u16(b, 10)
        )));
    }
    let mut index_sm3 = [0u8; 32];
    let (index_raw_len, index_len) = if version == VERSION {
        index_sm3.copy_from_slice(&b[72..104]);
        (rd_u32(b, 64), rd_u32(b, 68))
    } else {
        (0, 0)
    };
    let h = PackHeader {
        version,
        index_raw_len,
        index_len,
        index_sm3,
        write_sets: rd_u32(b, 12),
        epoch: rd_u64(b, 16),
        first_seq: rd_u64(b, 24),
        last_seq: rd_u64(b, 32),
        first_ts: rd_u64(b, 40),
        last_ts: rd_u64(b, 48),
        raw_len: rd_u32(b, 56),
        body_len: rd_u32(b, 60),
    };
    if h.raw_len as usize > MAX_RAW_LEN || h.index_raw_len as usize > MAX_RAW_LEN {
        return Err(FormatError::Invalid(format!(
            "pack claims {} raw bytes and a {} byte index (max {MAX_RAW_LEN})",
            h.raw_len, h.index_raw_len
        )));
    }
    if h.first_seq > h.last_seq {
        return Err(FormatError::Invalid(
            "pack's first sequence is after its last".into(),
        ));
    }
    Ok(h)
}

/// Verifies the whole object (length, SM3) and decodes its write-sets.
pub fn decode(b: &[u8]) -> Result<(PackHeader, Vec<WriteSet>), FormatError> {
    let (h, _, sets) = decode_shared(b)?;
    Ok((h, sets))
}

/// As [`decode`], and also returns the uncompressed body: every `Op::Write` payload is
/// a slice of it (no copy), so [`payload_offset`] locates a write inside the body. What
/// an archive view keeps to serve reads from a cached body by offset.
///
/// A version-2 pack's index must say exactly what its body holds: one that does not
/// is refused (an index that hid a write would make a view serve older bytes).
pub fn decode_shared(b: &[u8]) -> Result<(PackHeader, Bytes, Vec<WriteSet>), FormatError> {
    let h = decode_header(b)?;
    let end = h.object_len() - DIGEST_LEN;
    if b.len() != h.object_len() {
        return Err(FormatError::Truncated {
            need: h.object_len(),
            have: b.len(),
        });
    }
    let sm3: [u8; 32] = Sm3::digest(&b[..end]).into();
    if sm3[..] != b[end..] {
        return Err(FormatError::Checksum("pack contents (SM3)"));
    }
    let body_at = h.header_len() + h.index_len as usize;
    let raw = zstd::bulk::decompress(&b[body_at..end], h.raw_len as usize)
        .map_err(|e| FormatError::Compress(e.to_string()))?;
    if raw.len() != h.raw_len as usize {
        return Err(FormatError::Invalid(
            "pack body's length differs from its header".into(),
        ));
    }
    let raw = Bytes::from(raw);
    let sets = decode_body(&raw, h.write_sets)?;
    check_bounds(&h, &sets)?;
    if h.version == VERSION {
        let stored = &b[h.header_len()..body_at];
        if decode_index(&h, stored)? != index_of(&sets) {
            return Err(FormatError::Invalid(
                "the pack's extent index disagrees with its body".into(),
            ));
        }
    }
    Ok((h, raw, sets))
}

/// Where `payload` (a write's data from [`decode_shared`]) starts in `raw`, that call's
/// body; `None` for bytes that are not a slice of it.
pub fn payload_offset(raw: &Bytes, payload: &Bytes) -> Option<usize> {
    let off = (payload.as_ptr() as usize).checked_sub(raw.as_ptr() as usize)?;
    (off.checked_add(payload.len())? <= raw.len()).then_some(off)
}

fn check_bounds(h: &PackHeader, sets: &[WriteSet]) -> Result<(), FormatError> {
    match sets.last() {
        Some(last) if last.end_seq == h.last_seq => Ok(()),
        _ => Err(FormatError::Invalid(
            "the pack's write-sets do not end at its last sequence".into(),
        )),
    }
}

/// What a record did, as the extent index keeps it: a write's bytes stay in the body,
/// named by their offset there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExtentOp {
    /// The payload is `len` bytes at `body_at` of the uncompressed body.
    Write {
        body_at: u32,
    },
    Trim,
    Zero,
    Seal(String),
}

/// One record of the extent index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Extent {
    pub seq: u64,
    pub volume: u32,
    pub offset: u64,
    pub len: u32,
    pub op: ExtentOp,
}

/// A write-set as the extent index keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexedSet {
    pub end_seq: u64,
    pub timestamp_ns: u64,
    pub extents: Vec<Extent>,
}

/// The extent index of `sets`: where each write's payload is in their encoded body.
pub fn index_of(sets: &[WriteSet]) -> Vec<IndexedSet> {
    let mut at = 0usize;
    sets.iter()
        .map(|ws| {
            at += WS_HEADER_LEN;
            let extents = ws
                .records
                .iter()
                .map(|r| {
                    at += REC_HEADER_LEN;
                    let op = match &r.op {
                        Op::Write(_) => ExtentOp::Write { body_at: at as u32 },
                        Op::Trim => ExtentOp::Trim,
                        Op::Zero => ExtentOp::Zero,
                        Op::Seal(l) => ExtentOp::Seal(l.clone()),
                    };
                    at += payload(&r.op).len();
                    let len = match &r.op {
                        Op::Write(b) => b.len() as u32,
                        Op::Seal(l) => l.len() as u32,
                        Op::Trim | Op::Zero => r.len,
                    };
                    Extent {
                        seq: r.seq,
                        volume: r.volume,
                        offset: r.offset,
                        len,
                        op,
                    }
                })
                .collect();
            IndexedSet {
                end_seq: ws.end_seq,
                timestamp_ns: ws.timestamp_ns,
                extents,
            }
        })
        .collect()
}

/// The index's uncompressed bytes: the body's layout with every write's payload
/// replaced by its 4-byte offset in the body (FORMAT.md).
fn encode_index(sets: &[IndexedSet]) -> Vec<u8> {
    let mut out = Vec::new();
    for ws in sets {
        let mut h = [0u8; WS_HEADER_LEN];
        wr_u64(&mut h, 0, ws.end_seq);
        wr_u64(&mut h, 8, ws.timestamp_ns);
        wr_u32(&mut h, 16, ws.extents.len() as u32);
        out.extend_from_slice(&h);
        for e in &ws.extents {
            let mut r = [0u8; REC_HEADER_LEN];
            wr_u64(&mut r, 0, e.seq);
            wr_u32(&mut r, 8, e.volume);
            r[12] = match e.op {
                ExtentOp::Write { .. } => 1,
                ExtentOp::Trim => 2,
                ExtentOp::Zero => 3,
                ExtentOp::Seal(_) => 4,
            };
            wr_u64(&mut r, 13, e.offset);
            wr_u32(&mut r, 21, e.len);
            out.extend_from_slice(&r);
            match &e.op {
                ExtentOp::Write { body_at } => out.extend_from_slice(&body_at.to_le_bytes()),
                ExtentOp::Seal(l) => out.extend_from_slice(l.as_bytes()),
                ExtentOp::Trim | ExtentOp::Zero => {}
            }
        }
    }
    out
}

/// Where a version-2 pack's stored index is in the object (`None`: version 1, no
/// index; read the whole pack and use [`index_of`]).
pub fn index_range(h: &PackHeader) -> Option<std::ops::Range<u64>> {
    (h.version == VERSION).then(|| {
        let start = h.header_len() as u64;
        start..start + h.index_len as u64
    })
}

/// Checks a version-2 pack's stored index (`stored`: the bytes at [`index_range`])
/// against the header's SM3 and lengths, and decodes it: every write inside the body,
/// the write-sets in order and ending at the pack's last sequence.
pub fn decode_index(h: &PackHeader, stored: &[u8]) -> Result<Vec<IndexedSet>, FormatError> {
    if h.version != VERSION {
        return Err(FormatError::Invalid(format!(
            "a version {} pack has no extent index",
            h.version
        )));
    }
    if stored.len() != h.index_len as usize {
        return Err(FormatError::Truncated {
            need: h.index_len as usize,
            have: stored.len(),
        });
    }
    let sm3: [u8; 32] = Sm3::digest(stored).into();
    if sm3 != h.index_sm3 {
        return Err(FormatError::Checksum("pack extent index (SM3)"));
    }
    let raw = zstd::bulk::decompress(stored, h.index_raw_len as usize)
        .map_err(|e| FormatError::Compress(e.to_string()))?;
    if raw.len() != h.index_raw_len as usize {
        return Err(FormatError::Invalid(
            "pack index's length differs from its header".into(),
        ));
    }
    let sets = decode_index_body(&raw, h)?;
    match sets.last() {
        Some(last) if last.end_seq == h.last_seq => Ok(sets),
        _ => Err(FormatError::Invalid(
            "the pack's index does not end at its last sequence".into(),
        )),
    }
}

fn decode_index_body(raw: &[u8], h: &PackHeader) -> Result<Vec<IndexedSet>, FormatError> {
    let mut c = Cursor { b: raw, at: 0 };
    let mut sets = Vec::new();
    let mut prev = 0u64;
    for _ in 0..h.write_sets {
        let wh = c.take(WS_HEADER_LEN)?;
        let (end_seq, ts, n) = (rd_u64(wh, 0), rd_u64(wh, 8), rd_u32(wh, 16));
        if end_seq <= prev {
            return Err(FormatError::Invalid(format!(
                "index: write-set {end_seq} is not after {prev}"
            )));
        }
        prev = end_seq;
        let mut extents = Vec::new();
        for _ in 0..n {
            extents.push(decode_extent(&mut c, h, end_seq)?);
        }
        sets.push(IndexedSet {
            end_seq,
            timestamp_ns: ts,
            extents,
        });
    }
    if c.at != raw.len() {
        return Err(FormatError::Invalid(
            "bytes after the index's last write-set".into(),
        ));
    }
    Ok(sets)
}

fn decode_extent(c: &mut Cursor, h: &PackHeader, end_seq: u64) -> Result<Extent, FormatError> {
    let r = c.take(REC_HEADER_LEN)?;
    let (seq, volume, kind, offset, len) = (
        rd_u64(r, 0),
        rd_u32(r, 8),
        r[12],
        rd_u64(r, 13),
        rd_u32(r, 21),
    );
    if seq > end_seq || offset.checked_add(len as u64).is_none() {
        return Err(FormatError::Invalid(format!(
            "index: record {seq} out of its write-set or range"
        )));
    }
    let op =
        match kind {
            1 => {
                let body_at = rd_u32(c.take(4)?, 0);
                if body_at as u64 + len as u64 > h.raw_len as u64 {
                    return Err(FormatError::Invalid(format!(
                        "index: record {seq} points past the body"
                    )));
                }
                ExtentOp::Write { body_at }
            }
            2 => ExtentOp::Trim,
            3 => ExtentOp::Zero,
            4 => ExtentOp::Seal(String::from_utf8(c.take(len as usize)?.to_vec()).map_err(
                |_| FormatError::Invalid(format!("index: record {seq}: seal label is not UTF-8")),
            )?),
            k => {
                return Err(FormatError::Invalid(format!(
                    "index: record {seq}: unknown kind {k}"
                )))
            }
        };
    Ok(Extent {
        seq,
        volume,
        offset,
        len,
        op,
    })
}

/// Bounds-checked reads over a decompressed body.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], FormatError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|&e| e <= self.b.len())
            .ok_or(FormatError::Truncated {
                need: self.at.saturating_add(n),
                have: self.b.len(),
            })?;
        let s = &self.b[self.at..end];
        self.at = end;
        Ok(s)
    }
}

fn decode_body(raw: &Bytes, count: u32) -> Result<Vec<WriteSet>, FormatError> {
    let mut c = Cursor { b: raw, at: 0 };
    let mut sets = Vec::new();
    let mut prev = 0u64;
    for _ in 0..count {
        let h = c.take(WS_HEADER_LEN)?;
        let (end_seq, ts, n) = (rd_u64(h, 0), rd_u64(h, 8), rd_u32(h, 16));
        if end_seq <= prev {
            return Err(FormatError::Invalid(format!(
                "write-set {end_seq} is not after {prev}"
            )));
        }
        prev = end_seq;
        let mut records = Vec::new();
        for _ in 0..n {
            records.push(decode_record(&mut c, raw, end_seq)?);
        }
        sets.push(WriteSet {
            end_seq,
            timestamp_ns: ts,
            records,
        });
    }
    if c.at != raw.len() {
        return Err(FormatError::Invalid(
            "bytes after the pack's last write-set".into(),
        ));
    }
    Ok(sets)
}

fn decode_record(c: &mut Cursor, raw: &Bytes, end_seq: u64) -> Result<Record, FormatError> {
    let h = c.take(REC_HEADER_LEN)?;
    let (seq, volume, kind, offset, len) = (
        rd_u64(h, 0),
        rd_u32(h, 8),
        h[12],
        rd_u64(h, 13),
        rd_u32(h, 21),
    );
    if seq > end_seq {
        return Err(FormatError::Invalid(format!(
            "record {seq} after its write-set's end {end_seq}"
        )));
    }
    if offset.checked_add(len as u64).is_none() {
        return Err(FormatError::Invalid(format!(
            "record {seq}: offset {offset} + {len} overflows"
        )));
    }
    let op = match kind {
        1 => {
            let at = c.at;
            c.take(len as usize)?;
            Op::Write(raw.slice(at..at + len as usize))
        }
        2 => Op::Trim,
        3 => Op::Zero,
        4 => {
            let l = c.take(len as usize)?;
            Op::Seal(String::from_utf8(l.to_vec()).map_err(|_| {
                FormatError::Invalid(format!("record {seq}: seal label is not UTF-8"))
            })?)
        }
        k => {
            return Err(FormatError::Invalid(format!(
                "record {seq}: unknown kind {k}"
            )))
        }
    };
    Ok(Record {
        seq,
        volume,
        offset,
        len,
        op,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample() -> Vec<WriteSet> {
        vec![
            WriteSet {
                end_seq: 3,
                timestamp_ns: 1_000,
                records: vec![
                    Record {
                        seq: 2,
                        volume: 0,
                        offset: 4096,
                        len: 4,
                        op: Op::Write(Bytes::from_static(b"abcd")),
                    },
                    Record {
                        seq: 3,
                        volume: 1,
                        offset: 0,
                        len: 8192,
                        op: Op::Trim,
                    },
                ],
            },
            WriteSet {
                end_seq: 5,
                timestamp_ns: 2_000,
                records: vec![
                    Record {
                        seq: 4,
                        volume: 0,
                        offset: 512,
                        len: 512,
                        op: Op::Zero,
                    },
                    Record {
                        seq: 5,
                        volume: 0,
                        offset: 0,
                        len: 7,
                        op: Op::Seal("nightly".into()),
                    },
                ],
            },
        ]
    }

    /// Version 1's layout in FORMAT.md, byte for byte (what older ferry wrote and every
    /// reader still takes).
    #[test]
    fn golden_bytes() {
        let e = encode_version(9, &sample(), 3, VERSION_1).unwrap();
        let want_header = "4645525259504b00010001000200000009000000000000000200000000000000\
                           0500000000000000e803000000000000d007000000000000";
        assert_eq!(hex::encode(&e.bytes[..56]), want_header);
        let raw = encode_body(&sample()).unwrap();
        assert_eq!(
            hex::encode(&raw[..WS_HEADER_LEN + REC_HEADER_LEN]),
            "0300000000000000e8030000000000000200000002000000000000000000000001001000000000000004000000"
        );
        assert_eq!(rd_u32(&e.bytes, 56) as usize, raw.len());
        let (h, sets) = decode(&e.bytes).unwrap();
        assert_eq!(
            (h.version, h.epoch, h.first_seq, h.last_seq, h.write_sets),
            (1, 9, 2, 5, 2)
        );
        assert_eq!(sets, sample());
    }

    /// Version 2's header and extent index, byte for byte (FORMAT.md): a change to
    /// either must be deliberate and bump VERSION.
    #[test]
    fn golden_bytes_v2() {
        let e = encode(9, &sample(), 3).unwrap();
        assert_eq!(
            hex::encode(&e.bytes[..56]),
            "4645525259504b00020003000200000009000000000000000200000000000000\
             0500000000000000e803000000000000d007000000000000"
        );
        let raw_index = encode_index(&index_of(&sample()));
        assert_eq!(
            hex::encode(&raw_index),
            [
                "0300000000000000e80300000000000002000000",
                "020000000000000000000000010010000000000000040000002d000000",
                "03000000000000000100000002000000000000000000200000",
                "0500000000000000d00700000000000002000000",
                "04000000000000000000000003000200000000000000020000",
                "050000000000000000000000040000000000000000070000006e696768746c79",
            ]
            .concat()
        );
        let h = decode_header(&e.bytes).unwrap();
        assert_eq!(rd_u32(&e.bytes, 64) as usize, raw_index.len());
        assert_eq!(h.index_raw_len as usize, raw_index.len());
        assert_eq!(
            rd_u32(&e.bytes, 104),
            crc32c::crc32c(&e.bytes[..104]),
            "the CRC covers bytes 0..104"
        );
        let r = index_range(&h).unwrap();
        assert_eq!(r.start, HEADER_LEN_V2 as u64);
        let idx = decode_index(&h, &e.bytes[r.start as usize..r.end as usize]).unwrap();
        assert_eq!(idx, index_of(&sample()));
        assert_eq!(
            idx[0].extents[0].op,
            ExtentOp::Write {
                body_at: (WS_HEADER_LEN + REC_HEADER_LEN) as u32
            }
        );
        let (h2, raw, sets) = decode_shared(&e.bytes).unwrap();
        assert_eq!((h2, sets), (h, sample()));
        assert_eq!(&raw[45..49], b"abcd");
    }

    /// The index of a decoded body names the bytes the body holds.
    #[test]
    fn index_offsets_point_at_the_payloads() {
        let e = encode(1, &sample(), 3).unwrap();
        let (_, raw, _) = decode_shared(&e.bytes).unwrap();
        for ws in index_of(&sample()) {
            for x in ws.extents {
                if let ExtentOp::Write { body_at } = x.op {
                    let at = body_at as usize;
                    assert_eq!(&raw[at..at + x.len as usize], b"abcd");
                }
            }
        }
    }

    /// A version-2 pack whose index disagrees with its body (a hidden write) is
    /// refused even when every checksum is recomputed to match.
    #[test]
    fn an_index_that_disagrees_with_the_body_is_refused() {
        let e = encode(1, &sample(), 3).unwrap();
        let mut idx = index_of(&sample());
        idx[1].extents.remove(0);
        idx[1].extents.insert(
            0,
            Extent {
                seq: 4,
                volume: 0,
                offset: 4096,
                len: 512,
                op: ExtentOp::Zero,
            },
        );
        let raw_index = encode_index(&idx);
        let z = zstd::bulk::compress(&raw_index, 3).unwrap();
        let mut h = decode_header(&e.bytes).unwrap();
        let body = &e.bytes[h.header_len() + h.index_len as usize..e.bytes.len() - DIGEST_LEN];
        h.index_raw_len = raw_index.len() as u32;
        h.index_len = z.len() as u32;
        h.index_sm3 = Sm3::digest(&z).into();
        let mut b = vec![0u8; HEADER_LEN_V2];
        write_header(&mut b, &h);
        b.extend_from_slice(&z);
        b.extend_from_slice(body);
        let sm3: [u8; 32] = Sm3::digest(&b).into();
        b.extend_from_slice(&sm3);
        let forged = decode_header(&b).unwrap();
        let r = index_range(&forged).unwrap();
        assert!(
            decode_index(&forged, &b[r.start as usize..r.end as usize]).is_ok(),
            "the forged index is well-formed on its own"
        );
        let err = decode(&b).unwrap_err();
        assert!(err.to_string().contains("disagrees"), "{err}");
    }

    #[test]
    fn a_changed_index_fails_its_sm3() {
        let e = encode(1, &sample(), 3).unwrap();
        let h = decode_header(&e.bytes).unwrap();
        let r = index_range(&h).unwrap();
        for i in r.start as usize..r.end as usize {
            let mut b = e.bytes[r.start as usize..r.end as usize].to_vec();
            b[i - r.start as usize] ^= 0x01;
            assert!(decode_index(&h, &b).is_err(), "flip at {i} accepted");
        }
        assert!(decode_index(&h, &e.bytes[r.start as usize..r.end as usize - 1]).is_err());
        let v1 = encode_version(1, &sample(), 3, VERSION_1).unwrap();
        let h1 = decode_header(&v1.bytes).unwrap();
        assert!(index_range(&h1).is_none());
        assert!(decode_index(&h1, &[]).is_err());
    }

    #[test]
    fn any_flipped_byte_or_cut_is_refused() {
        for version in [VERSION_1, VERSION] {
            flips_and_cuts_refused(version);
        }
    }

    fn flips_and_cuts_refused(version: u16) {
        let e = encode_version(1, &sample(), 3, version).unwrap();
        for i in 0..e.bytes.len() {
            let mut b = e.bytes.clone();
            b[i] ^= 0x40;
            assert!(decode(&b).is_err(), "flip at {i} accepted");
        }
        for n in 0..e.bytes.len() {
            assert!(decode(&e.bytes[..n]).is_err(), "cut at {n} accepted");
        }
    }

    #[test]
    fn a_header_claiming_a_huge_body_is_refused_before_allocation() {
        for (version, field, crc_at) in
            [(VERSION_1, 56, 64), (VERSION, 56, 104), (VERSION, 64, 104)]
        {
            let mut e = encode_version(1, &sample(), 3, version).unwrap();
            wr_u32(&mut e.bytes, field, u32::MAX);
            let crc = crc32c::crc32c(&e.bytes[..crc_at]);
            wr_u32(&mut e.bytes, crc_at, crc);
            assert!(matches!(decode(&e.bytes), Err(FormatError::Invalid(_))));
        }
    }

    proptest! {
        #[test]
        fn round_trip(lens in proptest::collection::vec(0usize..3000, 1..20), fill in any::<u8>()) {
            let mut sets = Vec::new();
            for (i, len) in lens.iter().enumerate() {
                let seq = i as u64 + 1;
                sets.push(WriteSet {
                    end_seq: seq,
                    timestamp_ns: i as u64,
                    records: vec![Record { seq, volume: i as u32 % 3, offset: (i * 4096) as u64, len: *len as u32, op: Op::Write(Bytes::from(vec![fill; *len])) }],
                });
            }
            let e = encode(2, &sets, 1).unwrap();
            let (h, got) = decode(&e.bytes).unwrap();
            prop_assert_eq!(&got, &sets);
            let r = index_range(&h).unwrap();
            let idx = decode_index(&h, &e.bytes[r.start as usize..r.end as usize]).unwrap();
            prop_assert_eq!(idx, index_of(&sets));
            let old = encode_version(2, &sets, 1, VERSION_1).unwrap();
            prop_assert_eq!(decode(&old.bytes).unwrap().1, sets);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..400)) {
            let _ = decode(&b);
            if let Ok(h) = decode_header(&b) {
                let _ = decode_index(&h, &b);
            }
        }
    }
}
